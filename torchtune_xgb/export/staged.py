"""Exports appear complete or not at all.

torchtune's checkpointer writes ``<output_dir>/epoch_N/`` file by file (model shards, index,
config, tokenizer); a kill or a full disk half-way leaves a directory that looks like a
checkpoint. Here the checkpointer writes into a staging directory instead
(``<output_dir>/.export-staging-<pid>/epoch_N``), a small ``xgb_export.json`` records what was
written (files and sizes, step, epoch), and only then is the directory renamed to ``epoch_N``. So
``epoch_N/`` exists only once complete; a resume redoes an export that never arrived.

An older ``epoch_N/`` being replaced is first moved into the staging directory
(``epoch_N.replaced``), so everything one export attempt leaves lies in its staging directory. A
kill can leave one behind; the resume of that run (:func:`recover_exports`, under the run lock)
finishes or undoes it by the record: a staged export that its record shows complete is renamed
into place if ``epoch_N/`` is missing (a kill between its two renames, or just before them), else
a replaced ``epoch_N`` goes back where it was; then the staging directory goes. So a complete
export that is the only copy is never deleted. (A new run in that directory is refused, or with
``overwrite_output_dir`` replaces that run: its export removes such leftovers.)
The record also keeps what the export adds to the run summary (adapter size, kept fraction…), so a
resume after a kill between the last export and the summary writes the same summary.
"""

import json
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

from torchtune_xgb.errors import RunError
from torchtune_xgb.run.faults import fault_point
from torchtune_xgb.run.safe_files import create_new_file, fsync_dir, fsync_tree, refuse_link

EXPORT_RECORD = "xgb_export.json"
STAGING_PREFIX = ".export-staging-"
REPLACED_SUFFIX = ".replaced"
# where versions before the staging layout put a replaced epoch_N: output_dir/.export-old-<pid>
OLD_PREFIX = ".export-old-"
EPOCH_NAME = re.compile(r"epoch_\d+")


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


def _record(path: Path) -> Optional[dict]:
    """The export record of directory ``path`` (None: none, or unreadable)."""
    try:
        record = json.loads((path / EXPORT_RECORD).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) else None


def _complete(path: Path) -> bool:
    """Whether staged export ``path`` holds every file its record lists, at the recorded size."""
    record = _record(path)
    files = record.get("files") if record else None
    if not isinstance(files, dict):
        return False
    for name, size in files.items():
        file = path / name
        if file.is_symlink() or not file.is_file() or file.stat().st_size != size:
            return False
    return True


def _real_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def recover_exports(output_dir: str) -> List[str]:
    """Finish or undo the exports a killed run left in ``output_dir`` (see the module docstring);
    call it holding the run lock. Returns one line per thing done or left, for the log."""
    out = Path(output_dir)
    done = []
    for staging in sorted(p for p in out.glob(f"{STAGING_PREFIX}*") if _real_dir(p)):
        # the new export first: the older one it was replacing goes back only where none went
        for entry in sorted(staging.iterdir(), key=lambda e: (e.name.endswith(REPLACED_SUFFIX), e.name)):
            target = out / entry.name.removesuffix(REPLACED_SUFFIX)
            if not EPOCH_NAME.fullmatch(target.name) or not _real_dir(entry) or target.is_symlink() or target.exists():
                continue
            if entry.name.endswith(REPLACED_SUFFIX):
                os.rename(entry, target)
                done.append(f"restored {target} (an interrupted export had moved it to {entry})")
            elif _complete(entry):
                os.rename(entry, target)
                done.append(f"finished the interrupted export {target} (complete in {entry})")
        shutil.rmtree(staging, ignore_errors=True)
        fsync_dir(out)
    for old in sorted(p for p in out.glob(f"{OLD_PREFIX}*") if _real_dir(p)):
        record = _record(old)
        epoch = record.get("epoch") if record else None
        if not isinstance(epoch, int):
            done.append(f"left {old}: it has no {EXPORT_RECORD}, so it is no export of this tool to restore or delete")
            continue
        target = epoch_dir(output_dir, epoch)
        if target.exists() or target.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
            done.append(f"removed {old}, an older copy of {target}")
        else:
            os.rename(old, target)
            done.append(f"restored {target} (an interrupted export had moved it to {old})")
    return done


@contextmanager
def staged_export(checkpointer, output_dir: str, epoch: int, step: int, resume_hint: Optional[str],
                  summary: Optional[Dict[str, Any]] = None) -> Iterator[Path]:
    """Point ``checkpointer`` at a staging directory for the body; then rename its ``epoch_N``
    into ``output_dir`` (replacing an older one). Yields the staged ``epoch_N`` path.
    ``summary``: a dict the body fills with the export's run-summary entries; recorded in
    ``xgb_export.json`` (:func:`exported_summary` reads them back).

    Any failure (full disk, permissions, a symbolic link at ``epoch_N``; safetensors reports I/O
    errors as its own type) becomes a one-line :class:`RunError` that names the directory and says
    what is left (``resume_hint``: the intact resume checkpoint); the staging directory is removed
    and an existing ``epoch_N/`` is left as it was.
    """
    out = Path(output_dir)
    staging = out / f"{STAGING_PREFIX}{os.getpid()}"
    final = epoch_dir(output_dir, epoch)
    replaced = staging / f"{final.name}{REPLACED_SUFFIX}"
    saved_output_dir = checkpointer._output_dir
    try:
        for stale in out.glob(f"{STAGING_PREFIX}*"):  # a replaced run's (a resume recovered its own at the start)
            shutil.rmtree(stale, ignore_errors=True)  # never follows a link (nor removes one)
        refuse_link(staging)
        os.mkdir(staging)
        checkpointer._output_dir = staging
        staged = staging / final.name
        yield staged
        checkpointer._output_dir = saved_output_dir
        files = {str(p.relative_to(staged)): p.stat().st_size for p in sorted(staged.rglob("*")) if p.is_file()}
        record = {"epoch": epoch, "step": step, "files": files, "summary": summary or {}}
        with create_new_file(staged / EXPORT_RECORD) as f:
            f.write(json.dumps(record, indent=1).encode())
        fsync_tree(staged)
        fault_point("mid_export", step)
        refuse_link(final)
        if final.exists():
            os.rename(final, replaced)
        fault_point("export_swap", step)
        os.rename(staged, final)
        fsync_dir(out)
        shutil.rmtree(staging, ignore_errors=True)
    except Exception as err:  # noqa: BLE001 - safetensors reports a full disk as its own error type
        if _real_dir(replaced) and not (final.exists() or final.is_symlink()):
            os.rename(replaced, final)  # the older export back in place
        shutil.rmtree(staging, ignore_errors=True)
        why = err.strerror if isinstance(err, OSError) and err.strerror else f"{type(err).__name__}: {err}"
        left = f"; {resume_hint}" if resume_hint else ""
        raise RunError(f"export: could not write {final}: {why}; {final.name}/ was not written{left}".replace("\n", " ")) from err
    finally:
        checkpointer._output_dir = saved_output_dir
