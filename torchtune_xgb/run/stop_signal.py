"""SIGTERM and Ctrl-C during training: finish the step, write a resume checkpoint, stop.

A scheduler that pre-empts a job (SLURM, Kubernetes, spot instances) sends SIGTERM and kills the
job a grace period later (SLURM's KillWait and torchrun's own shutdown: 30 s by default); a user
stops a run with Ctrl-C. By default either one ends the process mid-step, and everything trained
since the last ``save_every_n_steps`` checkpoint is lost. While the training steps run, the
recipe holds a :class:`StopOnSignal`: the first SIGTERM or SIGINT only records the request, the
step in progress finishes, a resume checkpoint of that step is written, and the run ends with
exit status 128 + the signal's number (143 for SIGTERM, 130 for SIGINT) and one line saying
where to resume from. ``resume_from_checkpoint=True`` then continues exactly.

The same signal again, more than ``FORCE_AFTER_S`` seconds later, takes its default effect at
once (a second Ctrl-C stops now). Repeats sooner than that are the same request delivered twice:
under torchrun a Ctrl-C reaches every worker from the terminal and again from the agent, which
forwards the signals it receives to its workers.

Outside the training steps (model loading, the final export and evaluation) the handlers are not
installed and both signals act as usual; the export is staged, so a kill there leaves the
previous state intact (docs/reliability.md).
"""

import signal
import time
from types import FrameType
from typing import Callable, Dict, Optional

from torchtune import utils

log = utils.get_logger("INFO")

SIGNALS = (signal.SIGTERM, signal.SIGINT)
FORCE_AFTER_S = 1.0


class StopOnSignal:
    """Context manager: while inside, SIGTERM/SIGINT set :attr:`requested` to the signal's number
    instead of ending the process. Handlers are restored on exit. Only the main thread can
    install handlers; elsewhere it does nothing (``requested`` stays None)."""

    def __init__(self, on_request: Optional[Callable[[int], None]] = None):
        self.requested: Optional[int] = None
        self._at = 0.0
        self._previous: Dict[int, object] = {}
        self._on_request = on_request

    def __enter__(self) -> "StopOnSignal":
        try:
            for sig in SIGNALS:
                previous = signal.signal(sig, self._handle)
                self._previous[sig] = previous
                if previous is signal.SIG_IGN:  # e.g. SIGINT of a background job (`cmd &`): stays ignored
                    signal.signal(sig, signal.SIG_IGN)
        except ValueError:  # not the main thread: leave the process's handlers alone
            self._restore()
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        if self.requested is None:
            self.requested, self._at = signum, time.monotonic()
            if self._on_request is not None:
                self._on_request(signum)
            return
        if time.monotonic() - self._at < FORCE_AFTER_S:
            return  # the same request delivered twice (terminal and torchrun agent)
        previous = self._previous.get(signum, signal.SIG_DFL)
        self._restore()
        if callable(previous):  # Python's SIGINT handler: KeyboardInterrupt, as without us
            previous(signum, frame)
        else:
            signal.raise_signal(signum)


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name
