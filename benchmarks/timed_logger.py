"""torchtune's DiskLogger plus a ``time:`` field on every line, for per-step wall times.

The benchmarks point every recipe's ``metric_logger`` at this class, so torchtune's LoRA/full
recipes and ours write the same file format (``Step N | loss:… lr:… tokens_per_second_per_gpu:…
time:…``). Why a timestamp: torchtune logs ``tokens_per_second`` over *label* tokens only and not
the token count, so the step time cannot be recovered from it; consecutive ``time`` values give
the wall time of each step (data loading, forward, backward, optimizer, merges) directly.
"""

import time
from typing import Mapping

from torchtune.training.metric_logging import DiskLogger


class TimedDiskLogger(DiskLogger):
    """A DiskLogger whose ``log_dict`` lines end with ``time:<time.perf_counter()>`` (seconds)."""

    def log_dict(self, payload: Mapping, step: int) -> None:
        super().log_dict({**payload, "time": time.perf_counter()}, step)
