"""The run lock where the filesystem has no flock (Lustre ``noflock``, some FUSE and NFS mounts).

``fcntl.flock`` is made to fail as such a filesystem fails it (ENOLCK, EOPNOTSUPP, ENOSYS); a run
then locks with ``.xgb_run.owner`` (run/run_lock.py). Checked: one warning line, a second run
refused in one line, the file removed at the end, a dead run's file taken over on its own host
(also when its pid now belongs to another process), another host's refused with the way out.
The end-to-end refusal (exit status 2) is in test_faults.py.
"""

import errno
import fcntl
import json
import os
import socket
import subprocess
import sys

import pytest

from torchtune_xgb.errors import ConfigError
from torchtune_xgb.run import run_lock
from tests.helpers import output_dir_cfg
from torchtune_xgb.run.output_dir import check_output_dir, claim_output_dir
from torchtune_xgb.run.run_lock import OWNER_FILE, acquire_lock, lock_holder


@pytest.fixture(params=[errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS], ids=["ENOLCK", "EOPNOTSUPP", "ENOSYS"])
def no_flock(request, monkeypatch):
    def flock(fd, operation):
        raise OSError(request.param, os.strerror(request.param))

    monkeypatch.setattr(fcntl, "flock", flock)
    return request.param


def _owner(out):
    return json.loads((out / OWNER_FILE).read_text())


def test_without_flock_a_run_says_so_locks_with_its_own_file_and_removes_it_at_the_end(tmp_path, no_flock, caplog):
    out = tmp_path / "out"
    with caplog.at_level("WARNING"):
        first = claim_output_dir(output_dir_cfg(out, resume=False))
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warning.startswith(f"output_dir: {out} is on a filesystem without flock ({os.strerror(no_flock)})")
    assert str(out / OWNER_FILE) in warning
    record = _owner(out)
    assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
    with pytest.raises(ConfigError) as err:  # a second run meanwhile
        claim_output_dir(output_dir_cfg(out, resume=True))
    assert str(err.value) == (
        f"output_dir: {out} is in use by another run (pid {os.getpid()} on {socket.gethostname()} since "
        f"{record['started']}); wait for it to end or choose another output_dir"
    )
    with pytest.raises(ConfigError, match="is in use by another run"):
        check_output_dir(output_dir_cfg(out, resume=True))  # tune-xgb validate says the same
    first.close()  # what the end of the process does (an exit handler)
    assert not (out / OWNER_FILE).exists() and lock_holder(out) is None
    acquire_lock(out).close()


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


@pytest.mark.parametrize("how", ["its process is gone", "its pid is another process now"])
def test_a_dead_runs_lock_file_on_this_host_is_taken_over(tmp_path, no_flock, caplog, how):
    out = tmp_path / "out"
    out.mkdir()
    pid, start = (_dead_pid(), None) if how == "its process is gone" else (os.getpid(), "1")  # started at tick 1: not us
    (out / OWNER_FILE).write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "process_start": start, "started": "then"}))
    assert lock_holder(out) is None
    with caplog.at_level("WARNING"):
        lock = acquire_lock(out)
    assert f"taking over {out / OWNER_FILE}: the run it names (pid {pid} on" in caplog.text
    assert _owner(out)["pid"] == os.getpid() and _owner(out)["process_start"] == run_lock._process_start(os.getpid())
    lock.close()


@pytest.mark.parametrize("content", ["another host", "unreadable"])
def test_a_lock_file_this_host_cannot_judge_is_refused_with_the_way_out_and_kept(tmp_path, no_flock, content):
    out = tmp_path / "out"
    out.mkdir()
    text = json.dumps({"pid": 4242, "host": "node-17", "process_start": "99", "started": "2025-01-01T00:00:00Z"})
    (out / OWNER_FILE).write_text(text if content == "another host" else "")
    with pytest.raises(ConfigError) as err:
        claim_output_dir(output_dir_cfg(out, resume=False))
    holder = "pid 4242 on node-17 since 2025-01-01T00:00:00Z" if content == "another host" else "unknown"
    assert str(err.value) == (
        f"output_dir: {out} is in use by another run ({holder}, by {out / OWNER_FILE}: this filesystem has no flock); "
        f"if that run has ended, delete {out / OWNER_FILE}; else wait for it to end or choose another output_dir"
    )
    assert (out / OWNER_FILE).read_text() == (text if content == "another host" else "")
    assert sorted(p.name for p in out.iterdir()) == [".xgb_run.lock", OWNER_FILE]  # nothing else written


def test_another_flock_error_is_one_line_naming_the_lock_file(tmp_path, monkeypatch):
    def flock(fd, operation):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(fcntl, "flock", flock)
    with pytest.raises(ConfigError) as err:
        acquire_lock(tmp_path)
    assert str(err.value) == f"output_dir: cannot lock {tmp_path / '.xgb_run.lock'}: {os.strerror(errno.EIO)}"


def test_the_lock_file_goes_when_the_process_exits(tmp_path):
    """A run ends through sys.exit (run_entry_point): the exit handler removes the file."""
    script = (
        "import errno, fcntl, sys\n"
        "from pathlib import Path\n"
        "def flock(fd, op): raise OSError(errno.ENOLCK, 'No locks available')\n"
        "fcntl.flock = flock\n"
        "from torchtune_xgb.run.run_lock import acquire_lock\n"
        "lock = acquire_lock(Path(sys.argv[1]))\n"
        "assert (Path(sys.argv[1]) / '.xgb_run.owner').is_file()\n"
        "sys.exit(3)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=":".join(sys.path)))
    assert done.returncode == 3, done.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".xgb_run.lock"]
