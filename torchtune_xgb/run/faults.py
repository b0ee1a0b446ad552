"""Fault injection for the reliability tests: kill the process or fail a write at a named phase.

``TORCHTUNE_XGB_FAULT=ACTION:PHASE[:STEP]`` with ACTION ``kill`` (SIGKILL this process, as an OOM
killer or a pre-empted node would), ``term`` / ``int`` (send this process SIGTERM, as a scheduler
pre-empting the job does, or SIGINT, as Ctrl-C does) or ``enospc`` (raise ``OSError(ENOSPC)``, a
full disk), at one of the phases the recipe announces with :func:`fault_point`:

- ``mid_step``: after the forward/backward of a step, before the optimizer applies it;
- ``after_step``: after a step (and its merge, if it ended a round);
- ``mid_save``: a resume checkpoint's files are written, its directory is not renamed into place;
- ``before_pointer``: the checkpoint directory is in place, ``latest`` still names the previous one;
- ``segment_write``: before each copy of a sealed ledger segment is written (run/ledger_segments.py);
- ``mid_export``: the export's files are written to the staging directory, not renamed into place;
- ``export_swap``: an older ``epoch_N/`` is moved aside into the staging directory, the new one not yet in place;
- ``export_write``: while the export's model files are being written;
- ``before_summary``: the final export is in place (and evaluated), ``xgb_summary.json`` not written.

``nan:loss:STEP`` and ``inf:loss:STEP`` make the loss that the guard sees at STEP non-finite
(:func:`fault_value`), as a diverged forward pass would; ``spike:loss:STEP`` makes it 100× what it
is (the gradient is unchanged: a step the guard lets through trains as without the fault).

STEP, when given, restricts the fault to that global step (the step being trained for ``mid_step``,
the step just finished otherwise), or to several (``10,11``); several faults are separated by ``;``
(``spike:loss:5;term:after_step:5``). ``TORCHTUNE_XGB_FAULT_RANK=R`` restricts them to the process
of rank R under torchrun. Without the variable nothing happens; the check is one dict lookup.
"""

import errno
import math
import os
import signal
from typing import Optional

FAULT_ENV = "TORCHTUNE_XGB_FAULT"
FAULT_RANK_ENV = "TORCHTUNE_XGB_FAULT_RANK"
SIGNALS = {"term": signal.SIGTERM, "int": signal.SIGINT}
VALUES = {"nan": math.nan, "inf": math.inf, "spike": 100.0}  # fault_value's factors on a value
# Older spelling kept for the existing resume tests: SIGKILL right after the given step.
KILL_AT_STEP_ENV = "TORCHTUNE_XGB_KILL_AT_STEP"


def _configured(phase: str, step: Optional[int]) -> Optional[str]:
    """The action of the first fault in ``TORCHTUNE_XGB_FAULT`` that names ``phase`` (and ``step``), else None."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return None
    rank = os.environ.get(FAULT_RANK_ENV)
    if rank is not None and os.environ.get("RANK", "0") != rank:
        return None
    for fault in spec.split(";"):
        action, _, rest = fault.partition(":")
        want_phase, _, want_steps = rest.partition(":")
        if want_phase == phase and (not want_steps or str(step) in want_steps.split(",")):
            return action
    return None


def fault_point(phase: str, step: Optional[int] = None) -> None:
    """Inject the configured fault if ``phase`` (and ``step``) match; otherwise do nothing."""
    legacy = os.environ.get(KILL_AT_STEP_ENV)
    if legacy is not None and phase == "after_step" and str(step) == legacy:
        os.kill(os.getpid(), signal.SIGKILL)
    action = _configured(phase, step)
    if action is None or action in VALUES:  # see fault_value
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action in SIGNALS:
        os.kill(os.getpid(), SIGNALS[action])
    elif action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"<injected at {phase}>")
    else:
        raise ValueError(f"{FAULT_ENV}: unknown action {action!r} (kill, term, int, enospc, nan, inf, spike)")


def fault_value(phase: str, step: Optional[int] = None) -> float:
    """1.0, or NaN / Inf / 100 when ``TORCHTUNE_XGB_FAULT`` is ``nan|inf|spike:PHASE[:STEP]``."""
    action = _configured(phase, step)
    return VALUES.get(action, 1.0)
