"""``output_dir/xgb_run.json``: the run's own record of what it wrote in its ``output_dir``.

A fresh run starts the record (who started it, when, and the metrics log it is about to create);
every later output is added to it *before* it is written (write-ahead: a kill between the two
leaves a record naming something absent, never something present and unrecorded)::

    {"format": 1, "started": "...", "pid": 123, "host": "node7",
     "outputs": {"logs/metrics.txt": "metrics", "xgb_resume": "resume", "epoch_0": "export",
                 "xgb_summary.json": "summary"}}

``overwrite_output_dir`` and the retry after a dead run remove exactly what the record names
(output_dir.py decides when), so a user's files in ``output_dir`` — and anything another tool or
an older version wrote — are never deleted. The record is read as untrusted JSON: an entry that
would leave ``output_dir`` (absolute, ``..``) or pass through a symbolic link is ignored.
"""

import json
import os
import shutil
import socket
import time
from pathlib import Path, PurePosixPath
from typing import Any, Dict, List

from torchtune_xgb.run.safe_files import write_atomically

RUN_FILE = "xgb_run.json"
RECORD_FORMAT = 1
# kinds of output: "metrics" (torchtune's DiskLogger file), "resume" (the resume checkpoints
# directory), "export" (an epoch_N/ model), "summary" (the finished run's summary)


def _write_record(out: Path, record: Dict[str, Any]) -> None:
    """Write the record through a new file in ``out`` renamed over the old one (never through a
    link), synced before the output it announces is written."""
    write_atomically(out / RUN_FILE, json.dumps(record, indent=1).encode())


def _safe_name(out: Path, name: object) -> bool:
    """``name`` is a relative path in canonical form (no ``.``, ``..``, ``//``) that stays inside
    ``out`` without passing through a link, and is not the record itself."""
    if not isinstance(name, str) or name in ("", RUN_FILE):
        return False
    path = PurePosixPath(name)
    if path.is_absolute() or str(path) != name or ".." in path.parts:
        return False
    return not any(out.joinpath(*path.parts[:i]).is_symlink() for i in range(1, len(path.parts)))


def recorded_outputs(out: Path) -> Dict[str, str]:
    """``{path relative to out: kind}`` of what the record in ``out`` says a run of ours wrote
    there; ``{}`` without a readable record (none, another tool's file, an older version's)."""
    try:
        record = json.loads((out / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    outputs = record.get("outputs") if isinstance(record, dict) else None
    if not isinstance(outputs, dict):
        return {}
    return {name: kind for name, kind in outputs.items() if _safe_name(out, name) and isinstance(kind, str)}


def record_started(out: Path) -> str:
    """Who started the recorded run, for messages: ``pid P on HOST, started T`` (or "unknown")."""
    try:
        record = json.loads((out / RUN_FILE).read_text(encoding="utf-8"))
        return f"pid {record['pid']} on {record['host']}, started {record['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "unknown"


def start_record(out: Path, outputs: Dict[str, str]) -> None:
    """Replace the record in ``out`` with a new run's (``outputs``: what it is about to write)."""
    record = {
        "format": RECORD_FORMAT,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "outputs": outputs,
    }
    _write_record(out, record)


def record_output(output_dir: str, name: str, kind: str) -> None:
    """Add ``name`` (relative to ``output_dir``) to the run's record before writing it."""
    out = Path(output_dir)
    try:
        record = json.loads((out / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        record = None
    if not isinstance(record, dict) or not isinstance(record.get("outputs"), dict):
        # a resume of a run without a (readable) record: start one that lists what comes next
        start_record(out, {name: kind})
        return
    if record["outputs"].get(name) == kind:
        return
    record["outputs"][name] = kind
    _write_record(out, record)


def remove_outputs(out: Path, names: List[str]) -> None:
    """Delete the recorded outputs ``names`` (a link is removed, never followed)."""
    for name in names:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif os.path.lexists(path):
            path.unlink()
