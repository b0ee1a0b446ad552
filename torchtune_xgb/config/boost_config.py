"""The ``boost:`` and ``adapter:`` config blocks, parsed and validated before any weights load.

Each key is defined once, with its default, accepted values and meaning (``config/keys.py``); the
configuration reference in the documentation is rendered from these definitions.
"""

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Union

from torchtune_xgb.config.keys import build_block, key, one_of
from torchtune_xgb.errors import ConfigError

OPTIMIZER_RESETS = ("full", "none")
LR_RESTARTS = ("jagged", "none", "per_round")
BASES = ("rotate", "top")
METHODS = ("xgblora", "loraxs")
MERGE_BASES = ("dequantized", "original")
SIGMAS = ("input", "sqrt")
INITS = ("normal", "zeros")
SVD_METHODS = ("exact", "randomized")


@dataclass(frozen=True)
class BoostConfig:
    """The ``boost:`` block: how long a round lasts, which blocks it adapts and how it is merged.

    Each key is defined below with its default, accepted values and meaning (config/keys.py)."""

    steps_per_round: int = key(50, "integer ≥ 1", "κ: optimizer steps trained in each round, after which the round is merged.")
    blocks_per_round: Union[int, float, str] = key(
        "all", "count ≥ 1, fraction in (0, 1], or `all`",
        "Transformer blocks that get a live adapter each round (a fraction is rounded to the nearest "
        "count, at least 1). The paper's best for Llama-3-8B was about a third.")
    merge_rate: float = key(1.0, "number > 0", "η in W ← W + η·(α/r)·B·A.")
    optimizer_reset: str = key(
        "full", one_of(OPTIMIZER_RESETS),
        "`full`: at each merge drop the whole optimizer state (moments *and* step count) of the "
        "re-initialised adapters; `none`: keep it.")
    rewarmup_steps: int = key(0, "integer in [0, steps_per_round)", "Linear LR re-warmup over this many steps after each merge (0: off).")
    lr_restart: str = key(
        "jagged", one_of(LR_RESTARTS),
        "`jagged`: the global schedule × the re-warmup after each merge (ReLoRA-style); `none`: the "
        "global schedule only; `per_round`: the configured schedule restarted every round.")
    seed: int = key(
        0, "integer",
        "Seeds block selection and adapter re-initialisation: a pure function of (seed, round), the "
        "same on every rank, so a resume is exact.")
    base_device: str = key(
        "cpu", "device (`cpu`, `cuda`, `cuda:1`, …)",
        "Where the exact record of the merged rounds (the ledger) and, for bf16 weights, the rounding "
        "remainder lo = S − weight (fp32) live; pinned CPU memory when the weights are on a GPU. "
        "`cuda` keeps them in GPU memory.")
    basis: str = key(
        "rotate", one_of(BASES),
        "Boosted LoRA-XS only. `rotate`: round k of a module uses singular block k of the SVD taken "
        "once, so the cumulative rank grows by r per round; `top`: the top-r SVD of the current merged "
        "weight each round (paper-faithful; the update stays within rank r).")
    nf4_view_rank: Optional[int] = key(
        32, "integer ≥ 1 or null",
        "NF4 bases only: the rank R of the view of the merged rounds that the forward pass adds beside "
        "the 4-bit weight: exact while a module's rounds fit, then their best rank-R approximation "
        "(what it leaves out is logged per round as `view_deviation`). Its memory (4·R·(out+in) bytes "
        "per module) and step cost are fixed; null: no bound, the view stays exact and its cost grows "
        "with the rounds. The merged state itself stays exact for the export and resume.")

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


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class SVDConfig:
    """``adapter.svd``: how LoRA-XS's factors are computed (keys defined as in config/keys.py)."""

    method: str = key(
        "exact", one_of(SVD_METHODS),
        "`exact`: `torch.linalg.svd`; `randomized`: `torch.svd_lowrank` (faster on large matrices, "
        "approximate where the spectrum is flat around σ_r).")
    niter: int = key(4, "integer ≥ 0", "`randomized` only: subspace iterations.")
    oversample: int = key(8, "integer ≥ 0", "`randomized` only: extra directions sampled beyond r.")

    def validate(self) -> None:
        if self.method not in SVD_METHODS:
            raise ConfigError(f"adapter.svd.method: must be one of {SVD_METHODS}, got {self.method!r}")
        if not isinstance(self.niter, int) or self.niter < 0:
            raise ConfigError(f"adapter.svd.niter: must be an integer ≥ 0, got {self.niter!r}")
        if not isinstance(self.oversample, int) or self.oversample < 0:
            raise ConfigError(f"adapter.svd.oversample: must be an integer ≥ 0, got {self.oversample!r}")


@dataclass(frozen=True)
class AdapterConfig:
    """The ``adapter:`` block: which method the rounds train (default ``xgblora``).

    Each key is defined below with its default, accepted values and meaning (config/keys.py)."""

    method: str = key(
        "xgblora", one_of(METHODS),
        "`xgblora`: a rank-r LoRA per round; `loraxs`: frozen SVD factors around a trainable r×r core.")
    sigma: str = key(
        "input", one_of(SIGMAS),
        "LoRA-XS: `input` puts Σ in A (A = Σ_r V_rᵀ, B = U_r, the paper); `sqrt` puts √Σ on each side.")
    init: str = key("normal", one_of(INITS), "LoRA-XS core R at the start of a round: `normal` N(0, 1e-5²) (the paper) or `zeros`.")
    svd: Optional[Mapping[str, Any]] = key(None, "mapping", "LoRA-XS: how the SVD is computed (keys below).", block=SVDConfig)
    rank: Optional[int] = key(
        None, "integer or null",
        "Optional; must equal `model.lora_rank`, the one source of the rank (set both or only the model's).")
    alpha: Optional[float] = key(None, "number or null", "Optional; must equal `model.lora_alpha`.")
    merge_base: str = key(
        "dequantized", one_of(MERGE_BASES),
        "NF4 bases only: what the merged rounds are added to at export. `dequantized`: the NF4 "
        "weights training saw, so the export reproduces the trained model; `original`: the "
        "checkpoint's full-precision weights (closer to the base model, but the rounds were fitted "
        "to the quantized one; kept on the CPU).")

    @classmethod
    def from_mapping(cls, block: Optional[Mapping[str, Any]]) -> "AdapterConfig":
        """Build from the config's ``adapter`` mapping; raise ConfigError naming the bad key."""
        return build_block(cls, "adapter", block)

    def svd_config(self) -> SVDConfig:
        return build_block(SVDConfig, "adapter.svd", self.svd)

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"adapter.method: must be one of {METHODS}, got {self.method!r}")
        if self.sigma not in SIGMAS:
            raise ConfigError(f"adapter.sigma: must be one of {SIGMAS}, got {self.sigma!r}")
        if self.merge_base not in MERGE_BASES:
            raise ConfigError(f"adapter.merge_base: must be one of {MERGE_BASES}, got {self.merge_base!r}")
        if self.init not in INITS:
            raise ConfigError(f"adapter.init: must be one of {INITS}, got {self.init!r}")
        self.svd_config()
