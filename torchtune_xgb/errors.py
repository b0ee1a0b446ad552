"""Errors that end a run with one line (``error: …``) instead of a traceback."""


class ConfigError(ValueError):
    """A bad config value or file. The message is one line and starts with the config key."""


class RunError(RuntimeError):
    """A run that cannot go on and must not report success: training diverged, an export could
    not be written, no intact resume checkpoint. The message is one line that says what happened
    and what is left on disk; the entry point prints it and exits with status 1."""


class StoppedBySignal(RunError):
    """The run stopped at a step boundary on SIGTERM or Ctrl-C, after writing a resume checkpoint
    (stop_signal.py). Exit status 128 + the signal's number, as the shell reports a signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum
