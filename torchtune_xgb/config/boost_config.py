"""The ``boost:`` config block, parsed and validated before any weights load."""

import math
from dataclasses import dataclass, fields
from typing import Any, Mapping, Optional, Union

from torchtune_xgb.errors import ConfigError

OPTIMIZER_RESETS = ("full", "none")
LR_RESTARTS = ("jagged", "none", "per_round")
BASES = ("rotate", "top")
METHODS = ("xgblora", "loraxs")
MERGE_BASES = ("dequantized", "original")


@dataclass(frozen=True)
class BoostConfig:
    """Settings of the boosting rounds (the YAML ``boost:`` block).

    steps_per_round: κ, optimizer steps trained before each merge.
    blocks_per_round: transformer blocks that get an adapter each round: an int count, a float
        fraction in (0, 1] (rounded to the nearest count, at least 1), or "all".
    merge_rate: η in W ← W + η·(α/r)·B·A.
    optimizer_reset: "full" drops the whole optimizer state (moments and step count) of the
        re-initialised adapter parameters at each merge; "none" keeps it.
    rewarmup_steps: after each merge the LR ramps linearly back over this many steps (0 = off).
    lr_restart: "jagged" (global schedule × re-warmup after each merge, ReLoRA-style), "none"
        (global schedule only), "per_round" (the configured schedule restarted every round).
    seed: seeds block selection and adapter re-initialisation (same on every rank, and a pure
        function of (seed, round), so resume is exact).
    base_device: where the exact copy of the original adapted weights is kept ("cpu" default).
    basis: LoRA-XS only. "rotate": a module's k-th round uses singular block k of the SVD taken
        once at the start, so the cumulative update gains rank each round; "top": the top-r SVD
        of the current merged weight each round (paper-faithful; stays within rank r).
    nf4_view_rank: NF4 bases only: the rank R of the view of the merged rounds that the forward
        pass adds beside the 4-bit weight (exact while a module's rounds fit, then their best
        rank-R approximation; what it leaves out is logged per round as ``view_deviation``). Its
        memory (4·R·(out+in) bytes per module) and step cost are fixed; null: no bound, the view
        stays exact and its cost grows with the rounds. The merged state itself stays exact for
        the export and resume.
    """

    steps_per_round: int = 50
    blocks_per_round: Union[int, float, str] = "all"
    merge_rate: float = 1.0
    optimizer_reset: str = "full"
    rewarmup_steps: int = 0
    lr_restart: str = "jagged"
    seed: int = 0
    base_device: str = "cpu"
    basis: str = "rotate"
    nf4_view_rank: Optional[int] = 32

    @classmethod
    def from_mapping(cls, block: Optional[Mapping[str, Any]]) -> "BoostConfig":
        """Build from the config's ``boost`` mapping; raise ConfigError naming the bad key."""
        return build_block(cls, "boost", block)

    def validate(self) -> None:
        if not _is_int(self.steps_per_round) or self.steps_per_round < 1:
            raise ConfigError(f"boost.steps_per_round: must be an integer ≥ 1, got {self.steps_per_round!r}")
        bpr = self.blocks_per_round
        if isinstance(bpr, str):
            if bpr != "all":
                raise ConfigError(f"boost.blocks_per_round: must be a count, a fraction in (0, 1] or 'all', got {bpr!r}")
        elif _is_int(bpr):
            if bpr < 1:
                raise ConfigError(f"boost.blocks_per_round: a count must be ≥ 1, got {bpr}")
        elif isinstance(bpr, float):
            if not 0.0 < bpr <= 1.0:  # also false for nan
                raise ConfigError(f"boost.blocks_per_round: a fraction must be in (0, 1], got {bpr}")
        else:
            raise ConfigError(f"boost.blocks_per_round: must be a count, a fraction in (0, 1] or 'all', got {bpr!r}")
        rate = self.merge_rate
        if not isinstance(rate, (int, float)) or isinstance(rate, bool) or not math.isfinite(rate) or rate <= 0:
            raise ConfigError(f"boost.merge_rate: must be a finite number > 0, got {rate!r}")
        if self.optimizer_reset not in OPTIMIZER_RESETS:
            raise ConfigError(f"boost.optimizer_reset: must be one of {OPTIMIZER_RESETS}, got {self.optimizer_reset!r}")
        if self.lr_restart not in LR_RESTARTS:
            raise ConfigError(f"boost.lr_restart: must be one of {LR_RESTARTS}, got {self.lr_restart!r}")
        if not _is_int(self.rewarmup_steps) or not 0 <= self.rewarmup_steps < self.steps_per_round:
            raise ConfigError(
                f"boost.rewarmup_steps: must be an integer in [0, steps_per_round), got {self.rewarmup_steps!r}"
            )
        if not _is_int(self.seed):
            raise ConfigError(f"boost.seed: must be an integer, got {self.seed!r}")
        if self.nf4_view_rank is not None and (not _is_int(self.nf4_view_rank) or self.nf4_view_rank < 1):
            raise ConfigError(f"boost.nf4_view_rank: must be an integer ≥ 1 or null, got {self.nf4_view_rank!r}")
        if self.basis not in BASES:
            raise ConfigError(f"boost.basis: must be one of {BASES}, got {self.basis!r}")
        from torchtune_xgb.config.checks import check_device

        check_device("boost.base_device", self.base_device)

    def blocks_per_round_count(self, num_blocks: int) -> int:
        """Resolve ``blocks_per_round`` against the model's number of blocks."""
        bpr = self.blocks_per_round
        if bpr == "all":
            return num_blocks
        if _is_int(bpr):
            if bpr > num_blocks:
                raise ConfigError(f"boost.blocks_per_round: {bpr} exceeds the model's {num_blocks} blocks")
            return int(bpr)
        return max(1, min(num_blocks, round(bpr * num_blocks)))


def build_block(cls, prefix: str, block: Optional[Mapping[str, Any]]):
    """``cls(**block)`` validated; an unknown key (a typo) is an error naming it, not ignored."""
    block = dict(block or {})
    known = {f.name for f in fields(cls)}
    for key in block:
        if key not in known:
            raise ConfigError(f"{prefix}.{key}: unknown key (known: {', '.join(sorted(known))})")
    cfg = cls(**block)
    cfg.validate()
    return cfg


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class AdapterConfig:
    """The YAML ``adapter:`` block: which method the rounds train.

    method: "xgblora" (rank-r LoRA, default) or "loraxs" (frozen SVD factors, trainable r×r core).
    sigma: LoRA-XS: "input" puts Σ in A (paper), "sqrt" puts √Σ on each side.
    init: LoRA-XS core init, "normal" (N(0, 1e-5²), paper) or "zeros".
    svd: LoRA-XS: {method: exact | randomized, niter, oversample}.
    rank, alpha: optional; they must equal model.lora_rank / model.lora_alpha, the one source.
    merge_base: NF4 bases only: what the merged rounds are added to at export. "dequantized"
        (default): the NF4 weights training actually saw, so the export reproduces the trained
        model; "original": the checkpoint's full-precision weights (closer to the base model, but
        the rounds were fitted to the quantized one; kept on the CPU).
    """

    method: str = "xgblora"
    sigma: str = "input"
    init: str = "normal"
    svd: Optional[Mapping[str, Any]] = None
    rank: Optional[int] = None
    alpha: Optional[float] = None
    merge_base: str = "dequantized"

    @classmethod
    def from_mapping(cls, block: Optional[Mapping[str, Any]]) -> "AdapterConfig":
        """Build from the config's ``adapter`` mapping; raise ConfigError naming the bad key."""
        return build_block(cls, "adapter", block)

    def svd_config(self):
        from torchtune_xgb.method.loraxs import SVDConfig

        return build_block(SVDConfig, "adapter.svd", self.svd)

    def validate(self) -> None:
        from torchtune_xgb.method.loraxs import INITS, SIGMAS

        if self.method not in METHODS:
            raise ConfigError(f"adapter.method: must be one of {METHODS}, got {self.method!r}")
        if self.sigma not in SIGMAS:
            raise ConfigError(f"adapter.sigma: must be one of {SIGMAS}, got {self.sigma!r}")
        if self.merge_base not in MERGE_BASES:
            raise ConfigError(f"adapter.merge_base: must be one of {MERGE_BASES}, got {self.merge_base!r}")
        if self.init not in INITS:
            raise ConfigError(f"adapter.init: must be one of {INITS}, got {self.init!r}")
        self.svd_config()
