"""The run lock: one run at a time in an ``output_dir``.

Every run holds an exclusive ``flock`` on ``output_dir/.xgb_run.lock`` for its whole life: a second
run started there meanwhile is refused in one line naming the holder. The kernel releases an
``flock`` when the process ends, however it ends (a SIGKILLed run leaves no stale lock). Under
torchrun only rank 0 takes it. The lock file is opened with ``O_NOFOLLOW``: a symbolic link there
is refused, never written through.

Filesystems without ``flock`` (Lustre mounted ``noflock``, some FUSE and NFS mounts without a lock
daemon: ``flock`` fails with ENOLCK, EOPNOTSUPP or ENOSYS) get one warning line, and the lock is
``output_dir/.xgb_run.owner`` instead: a file created with ``O_EXCL`` (only one process can create
it) that names its run (pid, host, the process's start time) and is removed when that process
exits. A run killed with SIGKILL, or on a node that died, leaves it behind. The next run on the
same host sees that the process is gone (or that its pid now belongs to another process) and takes
the lock over; a run on another host cannot tell, and refuses in one line naming the file: delete
it once that run has ended. All hosts sharing an ``output_dir`` should see the same ``flock``
support (a run that has ``flock`` does not look at ``.xgb_run.owner``).
"""

import atexit
import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from torchtune import utils

from torchtune_xgb.errors import ConfigError
from torchtune_xgb.run.safe_files import LinkRefused, create_new_file, refuse_link

log = utils.get_logger("INFO")

LOCK_FILE = ".xgb_run.lock"
OWNER_FILE = ".xgb_run.owner"  # the lock where the filesystem has no flock
BUSY = (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN)  # flock: another process holds it
NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)  # flock: this filesystem has none


def in_use_error(output_dir: Path, holder: str, remedy: str = "wait for it to end or choose another output_dir") -> ConfigError:
    return ConfigError(f"output_dir: {output_dir} is in use by another run ({holder}); {remedy}")


class RunLock:
    """A held run lock; keep it for the run's whole life. ``close()`` releases it (so does the
    process's end: the kernel drops an ``flock``; :func:`release_owner_locks` removes
    ``.xgb_run.owner``)."""

    def __init__(self, fd: Optional[int] = None, owner: Optional[Path] = None, record: Optional[Dict[str, Any]] = None):
        self._fd, self._owner, self._record = fd, owner, record
        if owner is not None:
            _owner_locks.append(self)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._owner is not None:
            if _read_owner(self._owner) == self._record:  # still ours: nobody took over a lock they thought stale
                self._owner.unlink(missing_ok=True)
            _owner_locks.remove(self)
            self._owner = None


_owner_locks: List[RunLock] = []  # this process's .xgb_run.owner locks


@atexit.register
def release_owner_locks() -> None:
    """Remove this process's ``.xgb_run.owner`` files. Runs at exit; a process that ends with
    ``os._exit`` (the distributed worker) calls it first."""
    for lock in list(_owner_locks):
        lock.close()


def _process_start(pid: int) -> Optional[str]:
    """When process ``pid`` started (clock ticks since boot, /proc/PID/stat field 22): tells a
    reused pid from the process that wrote a lock. None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()  # after the command name, which may hold spaces
    return fields[19] if len(fields) > 19 else None


def _owner_record() -> Dict[str, Any]:
    pid = os.getpid()
    return {
        "pid": pid,
        "host": socket.gethostname(),
        "process_start": _process_start(pid),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _read_owner(path: Path) -> Optional[Dict[str, Any]]:
    """The record in ``.xgb_run.owner`` (None: no such file; {}: unreadable, e.g. being written)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError:
        return {}
    with os.fdopen(fd, "rb") as f:
        try:
            record = json.loads(f.read())
        except (ValueError, UnicodeDecodeError):
            return {}
    return record if isinstance(record, dict) else {}


def _owner_alive(record: Dict[str, Any]) -> Optional[bool]:
    """Whether the run that wrote ``record`` still runs: True/False on its own host, None on
    another host (or for an unreadable record): cannot tell."""
    pid = record.get("pid")
    if record.get("host") != socket.gethostname() or not isinstance(pid, int) or pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        pass
    started, now = record.get("process_start"), _process_start(pid)
    return started is None or now is None or started == now


def _describe(record: Dict[str, Any]) -> str:
    if not record.get("pid"):
        return "unknown"
    return f"pid {record['pid']} on {record.get('host', '?')} since {record.get('started', '?')}"


def _owner_holder(output_dir: Path) -> Optional[Dict[str, Any]]:
    """The record of the run holding ``.xgb_run.owner`` (None: nobody, or a dead run on this host)."""
    record = _read_owner(output_dir / OWNER_FILE)
    if record is None or _owner_alive(record) is False:
        return None
    return record


def _refuse_owner(output_dir: Path, record: Dict[str, Any]) -> ConfigError:
    owner = output_dir / OWNER_FILE
    if _owner_alive(record):
        return in_use_error(output_dir, _describe(record))
    return in_use_error(  # another host's run, or an unreadable record: this host cannot tell
        output_dir, f"{_describe(record)}, by {owner}: this filesystem has no flock",
        f"if that run has ended, delete {owner}; else wait for it to end or choose another output_dir",
    )


def _take_owner_file(output_dir: Path) -> RunLock:
    """The lock without flock: create ``.xgb_run.owner`` (O_EXCL), taking over a dead run's."""
    owner = output_dir / OWNER_FILE
    record = _owner_record()
    for _ in range(2):  # a dead run's file is removed once, then created anew
        try:
            with create_new_file(owner) as f:
                f.write(json.dumps(record).encode())
                f.flush()
                os.fsync(f.fileno())
            return RunLock(owner=owner, record=record)
        except LinkRefused as err:
            raise ConfigError(f"output_dir: cannot use {output_dir}: {err.strerror}") from err
        except FileExistsError:
            held = _owner_holder(output_dir)
            if held is not None:
                raise _refuse_owner(output_dir, held) from None
            log.warning(f"output_dir: taking over {owner}: the run it names ({_describe(_read_owner(owner) or {})}) has ended")
            owner.unlink(missing_ok=True)
        except OSError as err:
            raise ConfigError(f"output_dir: cannot create the lock file {owner}: {err.strerror or err}") from err
    raise in_use_error(output_dir, f"another run took {owner} at the same moment")


def lock_holder(output_dir: Path) -> Optional[str]:
    """Who holds the run lock of ``output_dir`` now (None: nobody). Creates nothing."""
    try:
        fd = os.open(output_dir / LOCK_FILE, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:  # no lock file (no run has used the directory), unreadable, or a link
        fd = None
    if fd is not None:
        with os.fdopen(fd, "rb") as handle:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                return None  # closing the file releases the shared lock
            except OSError as err:
                if err.errno in BUSY:
                    return handle.read().decode(errors="replace").strip() or "unknown"
                if err.errno not in NO_FLOCK:
                    raise
    held = _owner_holder(output_dir)
    return _describe(held) if held is not None else None


def acquire_lock(output_dir: Path) -> RunLock:
    """Take the run lock of ``output_dir`` (created if needed); keep the returned lock for the
    run's whole life. Raises a one-line ConfigError if another run holds it, or the lock file is a
    symbolic link; without flock, warns in one line and uses ``.xgb_run.owner`` (module docstring)."""
    path = output_dir / LOCK_FILE
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        refuse_link(path)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    except OSError as err:
        if path.is_symlink():  # created between the check and the open
            err = LinkRefused(path)
        raise ConfigError(f"output_dir: cannot use {output_dir}: {err.strerror or err}") from err
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        if err.errno in BUSY:
            raise in_use_error(output_dir, holder) from None
        if err.errno not in NO_FLOCK:
            raise ConfigError(f"output_dir: cannot lock {path}: {err.strerror or err}") from err
        log.warning(
            f"output_dir: {output_dir} is on a filesystem without flock ({err.strerror}); the run lock is "
            f"{output_dir / OWNER_FILE} instead, removed when the run ends (a run killed on another host "
            "leaves it behind: delete it once that run is gone)"
        )
        return _take_owner_file(output_dir)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
    return RunLock(fd=fd)
