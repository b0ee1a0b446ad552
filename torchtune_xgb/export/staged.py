"""Exports appear complete or not at all.

torchtune's checkpointer writes ``<output_dir>/epoch_N/`` file by file (model shards, index,
config, tokenizer); a kill or a full disk half-way leaves a directory that looks like a
checkpoint. Here the checkpointer writes into a staging directory instead
(``<output_dir>/.export-staging-<pid>/epoch_N``), a small ``xgb_export.json`` records what was
written (files and sizes, step, epoch), and only then is the directory renamed to ``epoch_N``. So
``epoch_N/`` exists only once complete; a resume redoes an export that never arrived. The record
also keeps what the export adds to the run summary (adapter size, kept fraction…), so a resume
after a kill between the last export and the summary writes the same summary.
"""

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

from torchtune_xgb.errors import RunError
from torchtune_xgb.run.faults import fault_point

EXPORT_RECORD = "xgb_export.json"
STAGING_PREFIX = ".export-staging-"


def epoch_dir(output_dir: str, epoch: int) -> Path:
    return Path(output_dir) / f"epoch_{epoch}"


def export_complete(output_dir: str, epoch: int) -> bool:
    """Whether ``epoch_N/`` was renamed into place by a finished export (it carries the record)."""
    return (epoch_dir(output_dir, epoch) / EXPORT_RECORD).is_file()


def exported_summary(output_dir: str, epoch: int) -> Dict[str, Any]:
    """The run-summary entries a finished export of epoch ``epoch`` recorded (``{}``: none)."""
    try:
        summary = json.loads((epoch_dir(output_dir, epoch) / EXPORT_RECORD).read_text()).get("summary", {})
    except (OSError, ValueError, AttributeError):
        return {}
    return summary if isinstance(summary, dict) else {}


def _fsync_tree(path: Path) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            with open(Path(root) / name, "rb") as f:
                os.fsync(f.fileno())
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextmanager
def staged_export(checkpointer, output_dir: str, epoch: int, step: int, resume_hint: Optional[str],
                  summary: Optional[Dict[str, Any]] = None) -> Iterator[Path]:
    """Point ``checkpointer`` at a staging directory for the body; then rename its ``epoch_N``
    into ``output_dir`` (replacing an older one). Yields the staged ``epoch_N`` path.
    ``summary``: a dict the body fills with the export's run-summary entries; recorded in
    ``xgb_export.json`` (:func:`exported_summary` reads them back).

    Any failure (full disk, permissions; safetensors reports I/O errors as its own type) becomes a one-line :class:`RunError` that names the
    directory and says what is left (``resume_hint``: the intact resume checkpoint); the staging
    directory is removed and an existing ``epoch_N/`` is left as it was.
    """
    out = Path(output_dir)
    staging = out / f"{STAGING_PREFIX}{os.getpid()}"
    final = epoch_dir(output_dir, epoch)
    saved_output_dir = checkpointer._output_dir
    try:
        for stale in out.glob(f"{STAGING_PREFIX}*"):  # left by a killed export
            shutil.rmtree(stale, ignore_errors=True)
        staging.mkdir(parents=True)
        checkpointer._output_dir = staging
        staged = staging / final.name
        yield staged
        checkpointer._output_dir = saved_output_dir
        files = {str(p.relative_to(staged)): p.stat().st_size for p in sorted(staged.rglob("*")) if p.is_file()}
        record = {"epoch": epoch, "step": step, "files": files, "summary": summary or {}}
        (staged / EXPORT_RECORD).write_text(json.dumps(record, indent=1))
        _fsync_tree(staged)
        fault_point("mid_export", step)
        old = out / f".export-old-{os.getpid()}"
        if final.exists():
            os.rename(final, old)
        os.rename(staged, final)
        shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(staging, ignore_errors=True)
    except Exception as err:  # noqa: BLE001 - safetensors reports a full disk as its own error type
        shutil.rmtree(staging, ignore_errors=True)
        why = err.strerror if isinstance(err, OSError) and err.strerror else f"{type(err).__name__}: {err}"
        left = f"; {resume_hint}" if resume_hint else ""
        raise RunError(f"export: could not write {final}: {why}; {final.name}/ was not written{left}".replace("\n", " ")) from err
    finally:
        checkpointer._output_dir = saved_output_dir
