"""The boosting round lifecycle, shared by the single-device and distributed recipes.

Round t (0-based) covers optimizer steps [t·κ, (t+1)·κ). At its start a seeded random subset
of blocks is switched on; after its last step the adapters of those blocks are merged into the
exact merged state, re-initialised (A fresh, B = 0, so the output does not change), and their
optimizer state is dropped. Everything random is a pure function of (seed, round), so every
rank draws the same and a resumed run continues exactly.
"""

import hashlib
import math
import re
import time
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torchtune import utils

from torchtune_xgb.config.boost_config import AdapterConfig, BoostConfig
from torchtune_xgb.distributed.sharding import all_sum, any_nonzero, gather_rows, local, local_rows
from torchtune_xgb.errors import RunError
from torchtune_xgb.method.booster_checkpoint import BoosterCheckpoint
from torchtune_xgb.method.loraxs import convert_to_loraxs, svd_all, truncated_svd_once
from torchtune_xgb.method.merge_stats import product_sq_norms
from torchtune_xgb.method.merged_state import MergedState
from torchtune_xgb.method.xgblora import convert_to_xgblora

log = utils.get_logger("INFO")

_BLOCK_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def seeded_generator(seed: int, purpose: str, round_index: int) -> torch.Generator:
    """A CPU generator that depends only on (seed, purpose, round): stable across runs and ranks."""
    digest = hashlib.sha256(f"{seed}:{purpose}:{round_index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def block_index(module_name: str) -> Optional[int]:
    """Transformer block of a module name like ``layers.3.attn.q_proj`` (None: outside blocks)."""
    match = _BLOCK_RE.search(module_name)
    return int(match.group(1)) if match else None


def reset_optimizer_state(optimizer: torch.optim.Optimizer, params: List[nn.Parameter]) -> int:
    """Drop all optimizer state (moments, step count) of ``params``; return how many had state."""
    dropped = 0
    for param in params:
        if optimizer.state.pop(param, None) is not None:
            dropped += 1
    return dropped


@dataclass
class RoundReport:
    """Metrics of one finished round, logged at the merge."""

    round: int
    step: int
    blocks: List[int]
    trainable_params: int
    merge_seconds: float
    reset_seconds: float
    kept_fraction: float
    merged_modules: int
    update_norm: float
    view_deviation: Optional[float] = None  # NF4: what the forward's rank-R view leaves out (MergeReport)

    def metrics(self) -> Dict[str, float]:
        """What the metric logger records at the merge (docs/reference/metrics.md, per merge)."""
        metrics = {
            "round": self.round,
            "merge_seconds": self.merge_seconds,
            "reset_seconds": self.reset_seconds,
            "kept_fraction": self.kept_fraction,
            "trainable_params": self.trainable_params,
            "merged_modules": self.merged_modules,
        }
        if self.view_deviation is not None:
            metrics["view_deviation"] = self.view_deviation
        return metrics


def holds_non_finite(tensors: List[torch.Tensor]) -> torch.Tensor:
    """A one-element bool tensor: does any of ``tensors`` hold a NaN or ±inf (on their device)?

    0·x is 0 for every finite x and NaN for NaN and ±inf, so the norm of all the products is NaN
    exactly when some value is non-finite: a few grouped (foreach) kernels for a whole model,
    where a per-tensor ``isfinite().any()`` launches several per module (the check runs at every
    merge; on a GPU those launches, not the arithmetic, are its cost). Huge finite values cannot
    overflow it."""
    if not tensors:
        return torch.zeros(1, dtype=torch.bool)
    return torch.isnan(torch.nn.utils.get_total_norm(torch._foreach_mul(tensors, 0.0))).reshape(1)


class Booster(BoosterCheckpoint):
    """Runs the rounds on a model whose LoRA modules it converts to the configured adapter.

    Args:
        model: a torchtune model built by a ``lora_*`` builder, with the base weights loaded.
        config: the parsed ``boost:`` block.
        adapter: the parsed ``adapter:`` block (XGBLoRA by default, or LoRA-XS).

    The constructor converts the modules (XGBLoRALinear in place, or LoRAXSLinear replacing
    them) and snapshots W0; nothing is trained yet. Then call :meth:`start` once (fresh, or with
    a saved :meth:`state_dict` to resume), and :meth:`after_optimizer_step` after every
    optimizer step; it returns a :class:`RoundReport` when a round ended.
    """

    def __init__(
        self,
        model: nn.Module,
        config: BoostConfig,
        adapter: Optional[AdapterConfig] = None,
        originals: Optional[Dict[str, torch.Tensor]] = None,
    ):
        """``originals``: full-precision weights by module name for NF4 bases (the checkpoint's,
        before quantization): LoRA-XS decomposes them, and ``merge_base="original"`` adds the
        rounds to them at export. References are kept only while needed (a QLoRA run must not
        hold a full-precision copy of the model): by the "top" basis for the whole run, by
        "rotate" until :meth:`start` has taken its SVD, and by the merged state for "original"."""
        self.config = config
        self.adapter = adapter or AdapterConfig()
        self.originals = originals if self.adapter.method == "loraxs" else None
        if self.adapter.method == "loraxs":
            self.modules = convert_to_loraxs(model, self.adapter.sigma, self.adapter.init)
        else:
            self.modules = convert_to_xgblora(model)
        self.block_of = {name: block_index(name) for name in self.modules}
        blocks = {b for b in self.block_of.values() if b is not None}
        self.num_blocks = (max(blocks) + 1) if blocks else 0
        self.blocks_per_round = config.blocks_per_round_count(max(self.num_blocks, 1))
        self.merged = MergedState(
            self.modules,
            base_device=config.base_device,
            originals=originals if self.adapter.merge_base == "original" else None,
            nf4_view_rank=config.nf4_view_rank,
        )
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.step = 0
        self.reports: List[RoundReport] = []
        self.rounds_trained = {name: 0 for name in self.modules}  # LoRA-XS: next singular block
        self.svd_factors: Dict[str, tuple] = {}  # LoRA-XS "rotate": the one SVD, CPU fp32
        self.svd_seconds = 0.0
        self._wrapped_warned = False
        self._trainable = 0
        self._base_norm_sq: Dict[str, torch.Tensor] = {}  # ‖W0‖² per module, all ranks (the guard's yardstick)

    @property
    def is_loraxs(self) -> bool:
        return self.adapter.method == "loraxs"

    def start(self, total_steps: Optional[int] = None, state: Optional[dict] = None,
              segments: Sequence[dict] = ()) -> "Booster":
        """Begin round 0, or restore a saved run exactly (the SVD is then loaded, not recomputed).

        ``total_steps`` bounds how many rounds a module can train, i.e. how many singular blocks
        the LoRA-XS "rotate" basis needs (None: the whole spectrum); the round that ends on the
        last step starts no successor (no basis, no SVD for a round that never trains).
        """
        self.total_steps = total_steps
        if state is not None:
            self.load_state_dict(state, segments)  # the saved SVD is used, never recomputed
        else:
            self._start_fresh(total_steps)
        if self.config.basis != "top":
            self.originals = None  # the one SVD is taken: drop the full-precision references
        return self

    def _start_fresh(self, total_steps: Optional[int]) -> None:
        """Round 0 of a new run: the LoRA-XS "rotate" SVD, seeded adapters, the first gating."""
        if self.is_loraxs and self.config.basis == "rotate":
            max_rounds = math.ceil(total_steps / self.config.steps_per_round) if total_steps else None
            blocks = {}
            for name, m in self.modules.items():
                available = min(m.weight.shape) // m.rank
                if available < 1:
                    raise ValueError(f"model.lora_rank: {m.rank} exceeds min(out, in) of {name}")
                blocks[name] = available if max_rounds is None else min(max_rounds, available)
            self.svd_factors, self.svd_seconds = svd_all(
                self.modules, max(blocks.values()), self.adapter.svd_config(), weights=self.originals
            )
            log.info(f"LoRA-XS: SVD of {len(self.modules)} modules in {self.svd_seconds:.2f} s")
        for name, module in self.modules.items():
            module.reset_adapter(seeded_generator(self.config.seed, f"init:{name}", 0))
        self._activate(0)

    # --- round structure ---------------------------------------------------------------
    @property
    def round(self) -> int:
        """Index of the round the next optimizer step belongs to."""
        return self.step // self.config.steps_per_round

    def selected_blocks(self, round_index: int) -> List[int]:
        """Blocks trained in ``round_index`` (sorted); modules outside blocks are always on."""
        if self.blocks_per_round >= self.num_blocks:
            return list(range(self.num_blocks))
        gen = seeded_generator(self.config.seed, "select", round_index)
        return sorted(torch.randperm(self.num_blocks, generator=gen)[: self.blocks_per_round].tolist())

    def active_modules(self) -> Dict[str, nn.Module]:
        return {n: m for n, m in self.modules.items() if m.active}

    def trainable_params(self) -> int:
        """Adapter parameters that are trained in the current round (counted when it starts)."""
        return self._trainable

    def _set_active(self, round_index: int) -> None:
        """Gate each module on or off for ``round_index`` (modules outside blocks: always on)."""
        chosen = set(self.selected_blocks(round_index))
        for name, module in self.modules.items():
            block = self.block_of[name]
            module.active = block is None or block in chosen
        # counted here, once a round, so the training step's logging does not walk the modules
        self._trainable = sum(p.numel() for m in self.active_modules().values() for p in m.trainable())

    def _activate(self, round_index: int) -> None:
        """Start ``round_index``: gate the modules and give LoRA-XS ones their round's basis."""
        self._set_active(round_index)
        if self.is_loraxs:
            for name, module in self.active_modules().items():
                self._set_loraxs_basis(name, module)

    @torch.no_grad()
    def _set_loraxs_basis(self, name: str, module) -> None:
        """The frozen factors for this module's next round (see BoostConfig.basis)."""
        r = module.rank
        if self.config.basis == "top":
            weight = self.merged.merged_weight(name)
            if self.originals is not None and name in self.originals:  # NF4: full-precision W0 (FSDP2: its rows)
                original = local_rows(self.originals[name], module.weight).float().to(weight.device)
                weight = weight - self.merged.base_weight(name) + original
            # FSDP2: gather this module's merged rows once, SVD on rank 0, broadcast
            merged = gather_rows(weight, module.weight, module.weight.shape[0])
            u, s, vh = truncated_svd_once(merged, r, self.adapter.svd_config(), module.weight)
        else:
            u, s, vh = self.svd_factors[name]
            available = u.shape[1] // r
            k = self.rounds_trained[name]
            if k >= available and not self._wrapped_warned:
                log.warning(f"LoRA-XS rotate: {name} ran out of singular blocks after {available}; wrapping")
                self._wrapped_warned = True
            k %= available
            u, s, vh = u[:, k * r : (k + 1) * r], s[k * r : (k + 1) * r], vh[k * r : (k + 1) * r]
        module.set_basis(u.to(module.weight.device), s.to(module.weight.device), vh.to(module.weight.device))

    # --- lifecycle ---------------------------------------------------------------------
    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    def after_optimizer_step(self) -> Optional[RoundReport]:
        """Count a step; at the end of a round merge, re-initialise, reset, and start the next."""
        self.step += 1
        if self.step % self.config.steps_per_round:
            return None
        return self.end_round(start_next=self.total_steps is None or self.step < self.total_steps)

    def end_round(self, start_next: bool = True) -> RoundReport:
        """Merge the active adapters now (also used to fold a final partial round)."""
        finished = (self.step - 1) // self.config.steps_per_round
        active = self.active_modules()
        self._refuse_non_finite(active, finished)
        trainable = self.trainable_params()
        merge = self.merged.merge_round(active.keys(), merge_rate=self.config.merge_rate)
        start = time.perf_counter()
        for name, module in active.items():
            module.reset_adapter(seeded_generator(self.config.seed, f"reinit:{name}", finished))
            self.rounds_trained[name] += 1
        if self.optimizer is not None and self.config.optimizer_reset == "full":
            reset_optimizer_state(self.optimizer, [p for m in active.values() for p in m.trainable()])
        reset_seconds = time.perf_counter() - start
        report = RoundReport(
            round=finished,
            step=self.step,
            blocks=self.selected_blocks(finished),
            trainable_params=trainable,
            merge_seconds=merge.seconds,
            reset_seconds=reset_seconds,
            kept_fraction=merge.kept_fraction,
            merged_modules=merge.modules,
            update_norm=merge.update_norm,
            view_deviation=merge.view_deviation,
        )
        self.reports.append(report)
        if start_next:
            self._activate(self.round)
        return report

    def _refuse_non_finite(self, active: Dict[str, nn.Module], round_index: int) -> None:
        """Never fold a round that holds NaN or Inf into the merged state (as PEFT's safe_merge):
        the state stays what it was before the round, the last good resume checkpoint stays
        valid. Same answer on every rank (the flag is reduced over shards)."""
        params = {name: module.trainable() for name, module in active.items()}
        if not params:
            return
        flat = [local(p.detach()) for ps in params.values() for p in ps]
        # reduced over ranks (same answer everywhere), one host sync; which module: only on failure
        if any_nonzero(holds_non_finite(flat), next(iter(params.values()))[0]):
            per_module = [any(bool(holds_non_finite([local(p.detach())])) for p in ps) for ps in params.values()]
            bad_here = [name for name, bad in zip(params, per_module) if bad]
            where = bad_here[0] if bad_here else "an adapter on another rank"
            raise RunError(
                f"training diverged in round {round_index}: {where} holds non-finite values at step {self.step}; "
                "the round was not merged and no export was written (resume from the last good checkpoint "
                "with a lower optimizer.lr: resume_from_checkpoint=True resume_allow_changes=[optimizer.lr])"
            )

    @torch.no_grad()
    def live_update_ratio(self) -> Tuple[torch.Tensor, List[str]]:
        """The largest ‖η·ΔW‖/‖W0‖ (Frobenius) of a live adapter this round, and its module, left
        on the device: a float64 tensor ``[ratio, i]`` and the module names ``i`` indexes. Nothing
        is read back to the host: the guard reads it together with other values (run/loop.py).

        For the divergence guard, every step: from the factors of each active adapter by r×r Gram
        matrices in float64, batched over the modules of one shape (merge_stats.product_sq_norms),
        so no out×in matrix is built, the cost is a few kernels per module shape, and an adapter
        whose product would overflow fp32 still gives a finite, huge ratio (inf if it holds NaN).
        ‖W0‖² is taken once per module (all ranks' rows). Under FSDP2 the sums cover all ranks'
        rows (one reduction per step), so every rank gets the same answer."""
        active = self.active_modules()
        if not active:
            return torch.zeros(2, dtype=torch.float64), []
        names = list(active)
        like = next(iter(active.values())).weight
        missing = [n for n in names if n not in self._base_norm_sq]
        if missing:  # the same names on every rank: once per module, at its first round
            local_sq = torch.stack([self.merged.base_sq_norms[n] for n in missing])
            self._base_norm_sq.update(zip(missing, all_sum(local_sq, like)))
        factors = [active[n].update_factors() for n in names]
        update_sq = product_sq_norms([(left, right) for left, right, _ in factors])
        update_sq = all_sum(update_sq * update_sq.new_tensor([(self.config.merge_rate * c) ** 2 for _, _, c in factors]), like)
        base_sq = torch.stack([self._base_norm_sq[n].to(update_sq.device) for n in names])
        ratios = (update_sq / base_sq.clamp_min(1e-300)).sqrt()
        ratios = torch.where(torch.isnan(ratios), torch.full_like(ratios, math.inf), ratios)
        worst, index = ratios.max(dim=0)
        return torch.stack([worst, index.to(worst.dtype)]), names

    def finish(self) -> Optional[RoundReport]:
        """End training: fold a partial last round (steps not a multiple of κ) so nothing trained
        is lost, then switch every adapter off, so the model is exactly its merged state (what
        the export writes and what the evaluation after training measures). Returns the partial
        round's report, or None if there was none."""
        already_merged = bool(self.reports) and self.reports[-1].step == self.step
        report = None
        if self.step % self.config.steps_per_round and not already_merged:
            report = self.end_round(start_next=False)
        for module in self.modules.values():
            module.active = False
        self._trainable = 0
        return report

    # --- accounting and checkpoint -----------------------------------------------------
    def distinct_params_touched(self) -> int:
        """Base-weight entries the merged updates changed over the run (dense per module)."""
        return sum(self.modules[n].weight.numel() for n in self.merged.touched_modules())

    @torch.no_grad()
    def export_weights(self, dtype: torch.dtype) -> Iterator[Tuple[str, torch.Tensor]]:
        """(module name, round(W0 + L + live adapter) in ``dtype``), one module at a time.

        What an export writes, streamed: each weight is produced only when the consumer asks for
        it, so at most one module's fp32 sum exists at once, and none when the working weight is
        already exact (see :meth:`MergedState.export_weight`). Under FSDP2: this rank's rows.
        """
        for name, module in self.modules.items():
            live = None
            if module.active and module.has_update():
                live = self.config.merge_rate * module.delta_weight()
            yield name, self.merged.export_weight(name, dtype, live)
