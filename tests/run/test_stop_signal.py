"""StopOnSignal in-process: the first SIGTERM/SIGINT is a request, a late repeat acts at once,
handlers are restored, an ignored signal stays ignored. End to end: tests/run/test_faults.py (single
process) and tests/distributed/test_distributed.py (a signal on one rank stops both)."""

import os
import signal
import threading

import pytest

from torchtune_xgb.run import stop_signal
from torchtune_xgb.run.stop_signal import StopOnSignal


@pytest.fixture(autouse=True)
def plain_handlers():
    """Python's own handlers before and after each test, whatever pytest installed."""
    saved = {sig: signal.getsignal(sig) for sig in stop_signal.SIGNALS}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_the_first_signal_is_a_request_and_handlers_come_back(sig):
    seen = []
    with StopOnSignal(seen.append) as stop:
        os.kill(os.getpid(), sig)  # without the handler: SIGTERM ends pytest, SIGINT raises KeyboardInterrupt
        assert stop.requested == sig and seen == [sig]
        os.kill(os.getpid(), sig)  # at once again: the same request delivered twice (torchrun forwards it)
        assert stop.requested == sig and seen == [sig]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_second_ctrl_c_after_the_window_interrupts_at_once(monkeypatch):
    clock = iter([100.0, 100.0 + stop_signal.FORCE_AFTER_S + 0.1])
    monkeypatch.setattr(stop_signal.time, "monotonic", lambda: next(clock))
    with pytest.raises(KeyboardInterrupt):
        with StopOnSignal() as stop:
            os.kill(os.getpid(), signal.SIGINT)
            assert stop.requested == signal.SIGINT
            os.kill(os.getpid(), signal.SIGINT)
            pytest.fail("the second Ctrl-C did not interrupt")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_an_ignored_signal_stays_ignored():
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a background job's SIGINT
    with StopOnSignal() as stop:
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested is None
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested == signal.SIGTERM
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def test_outside_the_main_thread_nothing_is_installed():
    result = {}

    def body():
        with StopOnSignal() as stop:
            result["handler"] = signal.getsignal(signal.SIGTERM)
            result["requested"] = stop.requested

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert result == {"handler": signal.SIG_DFL, "requested": None}
