"""Where a step's samples come from, so that a resume on another number of processes continues
from the same global sample or is refused.

torchtune's recipes draw an epoch's samples through torchdata's ``StatefulDistributedSampler``,
a ``DistributedSampler``: one seeded permutation of the dataset (the same for any number of
processes W), padded by repeating its start to a multiple of W; rank r takes positions
r, r+W, r+2W, … of it and its DataLoader cuts them into micro-batches of ``batch_size`` b
(an incomplete last one dropped). So micro-batch j of all ranks together holds positions
[j·b·W, (j+1)·b·W), and optimizer step s, of ``gradient_accumulation_steps`` a micro-batches,
holds positions [s·G, (s+1)·G) with the global batch G = b·W·a. The samples of a step depend on
G alone, not on how it is split over ranks and micro-batches (the loss and gradients are token
sums over all of them, normalised once). A resume may therefore change W, b and a together when
G and the steps per epoch stay the same: after ``done`` steps of the epoch every rank continues at
its own position done·G / W, which is what its sampler's ``yielded`` counts. Anything else would
skip or repeat samples, or end an epoch at another step, and is refused before any weights load.
"""

from typing import Any, Mapping, Optional

from torchtune_xgb.errors import ConfigError

WORLD_SIZE, BATCH_SIZE, ACCUMULATION = "world_size", "batch_size", "gradient_accumulation_steps"
LAYOUT_KEYS = (WORLD_SIZE, BATCH_SIZE, ACCUMULATION)  # identity keys that may change together
SAMPLES_KEY = "dataset#samples"  # recorded once the data has loaded (data_identity.py)


def global_batch(layout: Mapping[str, Any]) -> int:
    """Samples per optimizer step over all ranks: ``batch_size × world_size × gradient_accumulation_steps``."""
    return int(layout.get(BATCH_SIZE) or 1) * int(layout.get(WORLD_SIZE) or 1) * int(layout.get(ACCUMULATION) or 1)


def steps_per_epoch(samples: int, world_size: int, batch_size: int, accumulation: int, max_steps: Optional[int]) -> int:
    """The steps of an epoch as torchtune's recipes count them: each rank's ⌈samples / W⌉ padded
    positions in whole micro-batches, in whole steps, at most ``max_steps_per_epoch``."""
    steps = (-(-samples // world_size) // batch_size) // accumulation
    return min(steps, max_steps) if max_steps is not None else steps


def rank_position(steps_done: int, samples_per_step: int, world_size: int) -> int:
    """What each rank's sampler has yielded after ``steps_done`` steps of ``samples_per_step``
    samples (the global batch) over ``world_size`` ranks: the global position, per rank."""
    return steps_done * samples_per_step // world_size  # a whole number: the global batch is b·W·a


def _steps(layout: Mapping[str, Any], samples: int) -> int:
    return steps_per_epoch(samples, int(layout.get(WORLD_SIZE) or 1), int(layout.get(BATCH_SIZE) or 1),
                           int(layout.get(ACCUMULATION) or 1), layout.get("max_steps_per_epoch"))


def _keeping(saved_batch: int, current: Mapping[str, Any]) -> str:
    """The settings that give ``saved_batch`` on the current number of processes, as advice."""
    w, b, a = (int(current.get(k) or 1) for k in LAYOUT_KEYS)
    options = [f"{key}={saved_batch // (w * other)}" for key, other in ((BATCH_SIZE, a), (ACCUMULATION, b))
               if saved_batch % (w * other) == 0]
    if options:
        return f"set {' or '.join(options)} to keep {saved_batch}"
    return f"no batch_size × gradient_accumulation_steps on {w} processes makes {saved_batch}: resume on another number"


def check_layout_change(saved: Mapping[str, Any], current: Mapping[str, Any]) -> None:
    """Refuse, in one :class:`ConfigError` line, a resume whose processes, per-rank batch and
    accumulation (run-identity keys, ``saved`` from the checkpoint) change the global batch or
    the steps per epoch; changes that keep both are exact (module docstring). The steps per epoch
    come from the dataset size the checkpoint recorded (the data itself is compared once loaded)."""
    if all(saved.get(k) == current.get(k) for k in LAYOUT_KEYS):
        return
    change = ", ".join(f"{k} {saved.get(k)} → {current.get(k)}" for k in LAYOUT_KEYS if saved.get(k) != current.get(k))
    before, now = global_batch(saved), global_batch(current)
    if before != now:
        raise ConfigError(
            f"resume_allow_changes: {change} changes the global batch {before} → {now} "
            f"(batch_size × processes × gradient_accumulation_steps): {_keeping(before, current)}"
        )
    samples = saved.get(SAMPLES_KEY)
    if samples is None:
        raise ConfigError(
            f"resume_allow_changes: {change}: the checkpoint does not record its dataset size (an older version wrote it), "
            f"so its steps per epoch on {current.get(WORLD_SIZE)} processes are unknown: resume with "
            + ", ".join(f"{k}={saved.get(k)}" for k in LAYOUT_KEYS)
        )
    steps_before, steps_now = _steps(saved, int(samples)), _steps(current, int(samples))
    if steps_before != steps_now:
        raise ConfigError(
            f"resume_allow_changes: {change} changes the steps per epoch {steps_before} → {steps_now} "
            f"({samples} samples padded to a multiple of the processes): resume with "
            + ", ".join(f"{k}={saved.get(k)}" for k in LAYOUT_KEYS)
        )
