"""Stop a diverging run before it damages anything: the optional ``guard:`` config block.

Checked every step on the step's loss (token mean over all ranks) and the global gradient norm,
after backward and *before* the optimizer applies the step, so a bad step is never applied, its
round is never merged, and the newest resume checkpoint is one of the good steps. Every rank
sees the same numbers (reduced over ranks) and so stops at the same step (no rank is left in a
collective). The loop reads everything the guard needs in one host read per step
(run/loop.py), as torchtune's LoRA recipe reads its loss once.

It stops on:

- a loss or gradient norm that is NaN or infinite;
- a live adapter whose update has grown larger than its weight (``max_update_ratio``), measured
  after the optimizer step: a run at ``optimizer.lr=1e30`` can saturate a small model so that its
  loss stays finite and flat while the adapters hold values near 1e30. This check lags one step:
  step N's ratio is read with step N+1's loss, before step N+1 is applied, and the run stops
  naming step N. Where step N is merged (a round's last step), saved (``save_every_n_steps``,
  a stop signal) or exported (an epoch's last step), its ratio is read at once instead, so an
  out-of-bounds adapter is never merged, saved or exported;
- a loss spike that persists: the loss exceeds ``spike_factor`` × the median of the last
  ``window`` losses *and* that median by more than ``spike_margin`` nats on ``spike_patience``
  steps in a row. The ratio alone would fire on a late run whose loss wobbles around 0.05, the
  margin alone on a run that starts at a large loss; together they catch a run that leaves its
  loss level for good (``optimizer.lr=1e3`` on SmolLM2: from ≈ 1 to ln(vocab) ≈ 10.8 within a
  few steps). A spike before that is skipped, not applied (no optimizer step; it counts for the
  schedule and the rounds, is left out of the median and counted as ``spike_skipped_steps``,
  with a warning): a healthy run has them. XGBLoRA at a high rate measured one (1.83 against a
  median of 0.39, the second step after a merge reset the optimizer) that the run left behind at
  once (0.59, 0.64, 0.34 on the next steps), where stopping at the first spike lost the run. A
  run whose weights went bad spikes again on the next batches, which see the same weights (the
  skipped steps change nothing), and stops. A spike on a step that would be merged (a round's
  last), saved or exported stops the run at once, and a stop signal during a spike writes no
  checkpoint, so nothing measured on spiking weights is ever merged, saved or exported.
  ``spike_patience: 1`` stops at the first spike; ``spike_factor: null`` turns the spike check
  off (non-finite values always stop the run).

A step whose micro-batches hold no label token at all (every label masked) is not a divergence:
its loss is 0/0; the loop skips it (no optimizer step, counted as ``skipped_steps``) and the
guard does not see it.

Rounds are checked again where they are merged (Booster.end_round): a round whose adapter holds
a non-finite value is never folded into the merged state.
"""

import math
import statistics
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, List, Mapping, Optional

from torchtune_xgb.config.keys import build_block, key
from torchtune_xgb.errors import ConfigError, RunError


@dataclass(frozen=True)
class GuardConfig:
    """The ``guard:`` block: when a diverging run is stopped (non-finite losses and gradients always stop it).

    Each key is defined below with its default, accepted values and meaning (config/keys.py)."""

    spike_factor: Optional[float] = key(
        4.0, "number > 1 or null",
        "Stop when the loss exceeds this × the median of the last `window` losses (and `spike_margin` "
        "more than that median); null turns the spike check off (non-finite values always stop the run).")
    spike_margin: float = key(1.0, "number ≥ 0", "… and exceeds that median by more than this many nats.")
    window: int = key(20, "integer ≥ 1", "How many recent losses the median is taken over.")
    spike_patience: int = key(
        3, "integer ≥ 1",
        "Stop after this many spiking steps in a row; a spike before that is skipped (not applied, left "
        "out of the median, counted as `spike_skipped_steps`). A spike on a step that would be merged, "
        "saved or exported stops the run at once. 1: stop at the first spike.")
    max_update_ratio: Optional[float] = key(
        1.0, "number > 0 or null",
        "Stop when a live adapter's update ‖η·ΔW‖ exceeds this × ‖W0‖ of its module (measured after "
        "every optimizer step and read with the next step's loss, before that step is applied; at once "
        "where the step is merged, saved or exported); null turns it off. A healthy round is orders of "
        "magnitude below 1 (SmolLM2 demo: ~1e-3).")

    @classmethod
    def from_mapping(cls, block: Optional[Mapping[str, Any]]) -> "GuardConfig":
        return build_block(cls, "guard", block)

    def validate(self) -> None:
        if self.spike_factor is not None and not _finite_number(self.spike_factor, above=1.0):
            raise ConfigError(f"guard.spike_factor: must be a finite number > 1 or null, got {self.spike_factor!r}")
        if not _finite_number(self.spike_margin, above=-1e-300):
            raise ConfigError(f"guard.spike_margin: must be a finite number ≥ 0, got {self.spike_margin!r}")
        if self.max_update_ratio is not None and not _finite_number(self.max_update_ratio, above=0.0):
            raise ConfigError(f"guard.max_update_ratio: must be a finite number > 0 or null, got {self.max_update_ratio!r}")
        if not isinstance(self.window, int) or isinstance(self.window, bool) or self.window < 1:
            raise ConfigError(f"guard.window: must be an integer ≥ 1, got {self.window!r}")
        if not isinstance(self.spike_patience, int) or isinstance(self.spike_patience, bool) or self.spike_patience < 1:
            raise ConfigError(f"guard.spike_patience: must be an integer ≥ 1, got {self.spike_patience!r}")


def _finite_number(value: Any, above: float) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > above


class TrainingGuard:
    """Call :meth:`check` once per step, before ``optimizer.step()``."""

    def __init__(self, config: GuardConfig):
        self.config = config
        self.recent: deque = deque(maxlen=config.window)
        self.spikes: List[str] = []  # the spiking steps skipped since the last healthy one ("step N: loss")

    def check(
        self, step: int, round_index: int, loss: float, grad_norm: Optional[float], last_good: Callable[[], str],
        may_skip: bool = False,
    ) -> Optional[str]:
        """Raise :class:`RunError` if step ``step`` (1-based, of round ``round_index``) diverged.
        Returns None for a healthy step (its loss joins the median), or, for a spike to skip (not
        apply), what happened in words: only where ``may_skip`` (the step will not be merged, saved
        or exported) and fewer than ``spike_patience`` steps in a row spiked.

        ``last_good()`` names the newest resume checkpoint (or says there is none), for the message."""
        problem = None
        if not math.isfinite(loss):
            problem = f"loss is {loss}"
        elif grad_norm is not None and not math.isfinite(grad_norm):
            problem = f"gradient norm is {grad_norm} (loss {loss:.4g})"
        elif self.config.spike_factor is not None and self.recent:
            median = statistics.median(self.recent)
            if loss > self.config.spike_factor * median and loss > median + self.config.spike_margin:
                spike = (
                    f"loss spiked to {loss:.4g} from a median of {median:.4g} over the last {len(self.recent)} steps "
                    f"(guard.spike_factor {self.config.spike_factor}, guard.spike_margin {self.config.spike_margin})"
                )
                patient = len(self.spikes) + 1 < self.config.spike_patience
                if may_skip and patient:
                    self.spikes.append(f"step {step}: {loss:.4g}")
                    return (f"{spike}; the optimizer step was skipped ({len(self.spikes)} in a row; "
                            f"guard.spike_patience {self.config.spike_patience} in a row stop the run)")
                problem = spike + self._skipped_before() + (" on a step that would be merged, saved or exported" if patient else "")
        if problem is None:
            self.recent.append(loss)
            self.spikes.clear()
            return None
        raise RunError(
            f"training diverged at step {step} (round {round_index}): {problem}; the step was not applied, "
            f"round {round_index} was not merged and no export was written; last good resume checkpoint: {last_good()} "
            "(resume with a lower optimizer.lr: resume_from_checkpoint=True resume_allow_changes=[optimizer.lr])"
        )

    def _skipped_before(self) -> str:
        if not self.spikes:
            return ""
        return f", after {len(self.spikes)} spiking step(s) skipped before it ({', '.join(self.spikes)}; guard.spike_patience {self.config.spike_patience})"

    def refuse_save_in_spike(self, step: int, round_index: int, why: str, last_good: Callable[[], str]) -> None:
        """Raise :class:`RunError` if the last step spiked (skipped): a checkpoint (``why``: what asked
        for one) would hold the weights the spike was measured on; the last good one is kept."""
        if not self.spikes:
            return
        raise RunError(
            f"{why} after step {step} (round {round_index}) while the loss spiked ({', '.join(self.spikes)}, skipped; "
            f"guard.spike_factor {self.config.spike_factor}): no resume checkpoint was written of the spiking weights and "
            f"round {round_index} was not merged; last good resume checkpoint: {last_good()} "
            "(resume_from_checkpoint=True continues from it)"
        )

    def check_update(self, step: int, round_index: int, ratio: float, module: Optional[str], last_good: Callable[[], str]) -> None:
        """After the optimizer step: raise :class:`RunError` if a live adapter grew out of bounds.

        ``ratio``: the largest ‖η·ΔW‖/‖W0‖ of the round's live adapters (Booster.live_update_ratio)."""
        limit = self.config.max_update_ratio
        if limit is None or ratio <= limit:
            return
        raise RunError(
            f"training diverged at step {step} (round {round_index}): the update of {module} is {ratio:.3g}× its "
            f"weight (guard.max_update_ratio {limit}); round {round_index} was not merged, this step is in no resume "
            f"checkpoint and no export was written; last good resume checkpoint: {last_good()} "
            "(resume with a lower optimizer.lr: resume_from_checkpoint=True resume_allow_changes=[optimizer.lr])"
        )
