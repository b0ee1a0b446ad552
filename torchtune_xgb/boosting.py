"""The boosting round lifecycle, shared by the single-device and distributed recipes.

Round t (0-based) covers optimizer steps [t·κ, (t+1)·κ). At its start a seeded random subset
of blocks is switched on; after its last step the adapters of those blocks are merged into the
exact merged state, re-initialised (A fresh, B = 0, so the output does not change), and their
optimizer state is dropped. Everything random is a pure function of (seed, round), so every
rank draws the same and a resumed run continues exactly.
"""

import hashlib
import re
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional

import torch
from torch import nn

from torchtune_xgb.adapters import XGBLoRALinear, convert_to_xgblora
from torchtune_xgb.boost_config import BoostConfig
from torchtune_xgb.merged_state import MergedState

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


class Booster:
    """Runs the rounds on a model whose LoRA modules it converts to :class:`XGBLoRALinear`.

    Args:
        model: a torchtune model built by a ``lora_*`` builder, with the base weights loaded.
        config: the parsed ``boost:`` block.

    Call :meth:`attach` with the optimizer once it exists, then :meth:`after_optimizer_step`
    after every optimizer step; it returns a :class:`RoundReport` when a round ended.
    """

    def __init__(self, model: nn.Module, config: BoostConfig):
        self.config = config
        self.modules: Dict[str, XGBLoRALinear] = convert_to_xgblora(model)
        self.block_of = {name: block_index(name) for name in self.modules}
        blocks = {b for b in self.block_of.values() if b is not None}
        self.num_blocks = (max(blocks) + 1) if blocks else 0
        self.blocks_per_round = config.blocks_per_round_count(max(self.num_blocks, 1))
        self.merged = MergedState(self.modules, base_device=config.base_device)
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.step = 0
        self.reports: List[RoundReport] = []
        for module in self.modules.values():
            module.reset_adapter(seeded_generator(config.seed, "init", 0))
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

    def active_modules(self) -> Dict[str, XGBLoRALinear]:
        return {n: m for n, m in self.modules.items() if m.active}

    def trainable_params(self) -> int:
        """Adapter parameters that are trained in the current round."""
        return sum(p.numel() for m in self.active_modules().values() for p in (m.lora_a.weight, m.lora_b.weight))

    def _activate(self, round_index: int) -> None:
        chosen = set(self.selected_blocks(round_index))
        for name, module in self.modules.items():
            block = self.block_of[name]
            module.active = block is None or block in chosen

    # --- lifecycle ---------------------------------------------------------------------
    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    def after_optimizer_step(self) -> Optional[RoundReport]:
        """Count a step; at the end of a round merge, re-initialise, reset, and start the next."""
        self.step += 1
        if self.step % self.config.steps_per_round:
            return None
        return self.end_round(start_next=True)

    def end_round(self, start_next: bool = True) -> RoundReport:
        """Merge the active adapters now (also used to fold a final partial round)."""
        finished = (self.step - 1) // self.config.steps_per_round
        active = self.active_modules()
        trainable = self.trainable_params()
        merge = self.merged.merge_round(active.keys(), merge_rate=self.config.merge_rate)
        start = time.perf_counter()
        for name, module in active.items():
            module.reset_adapter(seeded_generator(self.config.seed, f"reinit:{name}", finished))
        if self.optimizer is not None and self.config.optimizer_reset == "full":
            reset_optimizer_state(
                self.optimizer, [p for m in active.values() for p in (m.lora_a.weight, m.lora_b.weight)]
            )
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
        )
        self.reports.append(report)
        if start_next:
            self._activate(self.round)
        return report

    def finish(self) -> Optional[RoundReport]:
        """Fold a partial last round (steps not a multiple of κ) so nothing trained is lost."""
        already_merged = bool(self.reports) and self.reports[-1].step == self.step
        if self.step % self.config.steps_per_round == 0 or already_merged:
            return None
        return self.end_round(start_next=False)

    # --- accounting and checkpoint -----------------------------------------------------
    def distinct_params_touched(self) -> int:
        """Base-weight entries the merged updates changed over the run (dense per module)."""
        return sum(self.modules[n].weight.numel() for n in self.merged.touched_modules())

    @torch.no_grad()
    def merged_weights(self) -> Dict[str, torch.Tensor]:
        """Module name → full-precision weight the export should hold: W0 + L + live adapter.

        The live term is the current round's adapter (zero after :meth:`finish`), so an export
        taken mid-run loses nothing either.
        """
        weights = {}
        for name, module in self.modules.items():
            weight = self.merged.merged_weight(name)
            if module.active:
                weight += self.config.merge_rate * module.delta_weight()
            weights[name] = weight.cpu()
        return weights

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "merged": self.merged.state_dict(),
            "reports": [asdict(r) for r in self.reports],
            "adapters": {
                name: {"lora_a": m.lora_a.weight.detach().cpu(), "lora_b": m.lora_b.weight.detach().cpu()}
                for name, m in self.modules.items()
            },
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.merged.load_state_dict(state["merged"])
        self.reports = [RoundReport(**r) for r in state["reports"]]
        for name, tensors in state["adapters"].items():
            module = self.modules[name]
            module.lora_a.weight.copy_(tensors["lora_a"])
            module.lora_b.weight.copy_(tensors["lora_b"])
        self._activate(self.round)
