"""An ``output_dir`` belongs to one run.

A new run started in a directory that holds another run's resume state or export would overwrite
its model, append to its metrics log and leave its resume state behind, so that a later
``resume_from_checkpoint=True`` resumes the *old* run. So a fresh run refuses such a directory
(one line: resume it, choose another ``output_dir``, or pass ``overwrite_output_dir=True``, which
removes only what a run of ours wrote there), and every run holds an exclusive lock on
``output_dir/.xgb_run.lock`` for its whole life: a second run started there at the same time is
refused. The lock is an ``flock``: the kernel releases it when the process ends, however it ends
(a SIGKILLed run leaves no stale lock). Under torchrun only rank 0 takes it.
"""

import errno
import fcntl
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import IO, List, Optional

from omegaconf import DictConfig, OmegaConf

from torchtune_xgb.errors import ConfigError
from torchtune_xgb.run.checkpointing import RESUME_DIR
from torchtune_xgb.run.summary import SUMMARY_FILE

LOCK_FILE = ".xgb_run.lock"
RUN_FILE = "xgb_run.json"



def run_artifacts(output_dir: Path) -> List[str]:
    """Names in ``output_dir`` that a run (ours, or torchtune's checkpointer) wrote there."""
    if not output_dir.is_dir():
        return []
    found = []
    for entry in sorted(output_dir.iterdir()):
        name = entry.name
        if name in (RUN_FILE, SUMMARY_FILE) or (name == RESUME_DIR and any(entry.iterdir())):
            found.append(name)
        elif entry.is_dir() and name.startswith("epoch_") and name[6:].isdigit():
            found.append(name + "/")
    return found


def _in_use(output_dir: Path, holder: str) -> ConfigError:
    return ConfigError(
        f"output_dir: {output_dir} is in use by another run ({holder}); wait for it to end or choose another output_dir"
    )


def _holds_another_run(output_dir: Path, found: List[str]) -> ConfigError:
    return ConfigError(
        f"output_dir: {output_dir} holds another run ({', '.join(found)}); resume it with resume_from_checkpoint=True, "
        "choose another output_dir, or pass overwrite_output_dir=True to replace it"
    )


def lock_holder(output_dir: Path) -> Optional[str]:
    """Who holds the run lock of ``output_dir`` now (None: nobody). Creates nothing."""
    try:
        handle = open(output_dir / LOCK_FILE)
    except OSError:  # no lock file: no run has used the directory, or it is not readable
        return None
    with handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
                raise
            return handle.read().strip() or "unknown"
    return None  # closing the file released the shared lock


def check_output_dir(output_dir: str, resume: bool, overwrite: bool = False) -> None:
    """What :func:`claim_output_dir` would refuse, checked without writing anything (``tune-xgb
    validate``): a run in progress there, or another run's artifacts for a fresh run."""
    out = Path(output_dir).expanduser().resolve()
    holder = lock_holder(out)
    if holder is not None:
        raise _in_use(out, holder)
    found = [] if resume or overwrite else run_artifacts(out)
    if found:
        raise _holds_another_run(out, found)


def acquire_lock(output_dir: Path) -> IO:
    """Take the run lock of ``output_dir`` (created if needed); keep the returned file open for
    the run's whole life. Raises a one-line ConfigError if another process holds it."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        handle = open(output_dir / LOCK_FILE, "a+")
    except OSError as err:
        raise ConfigError(f"output_dir: cannot use {output_dir}: {err.strerror or err}") from err
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno not in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
            raise
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise _in_use(output_dir, holder) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}")
    handle.flush()
    return handle


def remove_run_artifacts(output_dir: Path, extra_files: List[Path]) -> None:
    """``overwrite_output_dir``: delete what an earlier run wrote (nothing else in the directory)."""
    for name in run_artifacts(output_dir):
        path = output_dir / name.rstrip("/")
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    for path in extra_files:
        if path.is_file():
            path.unlink()


def claim_output_dir(
    output_dir: str,
    resume: bool,
    overwrite: bool = False,
    take_lock: bool = True,
    metrics_file: Optional[str] = None,
) -> Optional[IO]:
    """Make ``output_dir`` this run's, before any weights load. Returns the held lock (or None).

    A fresh run refuses a directory holding another run's artifacts unless ``overwrite``; a
    resume requires them (checked by the resume validation). ``metrics_file``: the metric
    logger's file, removed with the artifacts on overwrite (torchtune's DiskLogger appends).
    """
    if not take_lock:  # torchrun ranks > 0: rank 0 decides (and its refusal ends the job)
        return None
    out = Path(output_dir).expanduser().resolve()
    lock = acquire_lock(out)
    if resume:
        return lock
    found = run_artifacts(out)
    if found and not overwrite:
        lock.close()
        raise _holds_another_run(out, found)
    if found:
        extra = [Path(metrics_file).expanduser().resolve()] if metrics_file else []
        remove_run_artifacts(out, [p for p in extra if out in p.parents])
    record = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "pid": os.getpid(), "host": socket.gethostname()}
    (out / RUN_FILE).write_text(json.dumps(record, indent=1))
    return lock


def disk_logger_file(cfg: DictConfig) -> Optional[str]:
    """The file torchtune's DiskLogger appends to (None for other loggers or a generated name)."""
    log_dir, filename = OmegaConf.select(cfg, "metric_logger.log_dir"), OmegaConf.select(cfg, "metric_logger.filename")
    if isinstance(log_dir, str) and isinstance(filename, str):
        return str(Path(log_dir) / filename)
    return None
