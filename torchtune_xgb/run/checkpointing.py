"""Mid-run checkpoints for exact resume: written atomically, verified on load, two kept.

torchtune's resume reloads the original base plus one adapter, which is wrong once rounds have
been merged. Ours stores what cannot be recomputed: the merged-state ledgers, the live adapters,
the optimizer and RNG state, and the step. The base weights are reloaded from the original
checkpoint (W0), so a resume state is small.

Layout::

    <output_dir>/xgb_resume/step_NNNNNNNN/state.pt
    <output_dir>/xgb_resume/step_NNNNNNNN/manifest.json   sha256 and size of every file, the step,
                                                          the run's identity (run_identity.py) and
                                                          the ledger segments it needs
    <output_dir>/xgb_resume/segments/                     sealed ledger segments, each written once
                                                          and shared (ledger_segments.py)
    <output_dir>/xgb_resume/latest                        names the newest complete checkpoint

A step directory is written under a temporary name (state, then manifest, each fsynced) and
renamed into place; only then does ``latest`` move (atomic replace), and only then are other
checkpoints removed: two are kept, the new one and the one this run continued from (the one it
resumed from, or its previous save). That record, not the step numbers, decides: after a resume
that fell back past a corrupted newest checkpoint, and with another ``save_every_n_steps``, the
corrupted one may carry a higher step than every later save; it goes at the next save, and the
checkpoint the run came from stays. A kill at any moment leaves ``latest`` naming a complete
checkpoint. ``torch.load`` does not check the zip CRCs, so overwritten bytes would load silently:
every load verifies the manifest first, and a corrupted or truncated newest checkpoint falls back
to the previous intact one with a warning naming both.

The manifest's checksums sit next to the state, so whoever can write the one can write the other:
they catch accidents, not someone else's file. What keeps a crafted ``state.pt`` from running code
is how it is read: ``torch.load(weights_only=True)``, which builds only tensors and plain
containers (all a resume state holds: dicts, lists, numbers, strings, tensors). A file holding
anything else is refused in one line naming it, when the resume is chosen, before any weights
load. Nothing here writes through a symbolic link (run/safe_files.py).
"""

import hashlib
import json
import os
import pickle
import re
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
from torchtune import utils

from torchtune_xgb.errors import RunError
from torchtune_xgb.run.faults import fault_point
from torchtune_xgb.run.safe_files import create_new_file, fsync_dir, make_dir, refuse_link, write_atomically
from torchtune_xgb.run.ledger_segments import CorruptSegment, evict_segments, load_segments, verify_segments

log = utils.get_logger("INFO")

RESUME_DIR = "xgb_resume"
LATEST = "latest"
STATE_FILE = "state.pt"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1


def resume_root(output_dir: str) -> Path:
    return Path(output_dir) / RESUME_DIR


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def step_dirs(output_dir: str) -> List[Path]:
    """Complete-looking checkpoint directories, newest step first (links are none of ours)."""
    root = resume_root(output_dir)
    if not root.is_dir():
        return []
    found = [
        p for p in root.iterdir()
        if p.name.startswith("step_") and p.name[5:].isdigit() and p.is_dir() and not p.is_symlink()
    ]
    return sorted(found, key=lambda p: int(p.name[5:]), reverse=True)


def save_resume_state(
    output_dir: str, step: int, state: Dict[str, Any], run: Optional[Dict[str, Any]] = None,
    parent_step: Optional[int] = None, segments: Sequence[Dict[str, Any]] = (),
) -> Path:
    """Write ``state`` as the checkpoint of ``step``. Returns its dir.

    ``run`` is the run's identity (recorded in the manifest; a resume compares it before any
    weights load). ``parent_step``: the step of the checkpoint this state continues from (the one
    the run resumed from or saved last); None: the one ``latest`` names. That one and the new one
    are kept, every other checkpoint directory is removed. Raises :class:`RunError` naming the
    path if the disk is full or not writable, or a path to write is a symbolic link; what was on
    disk before is then untouched (the half-written directory is removed).
    ``segments``: the entries of the ledger segments the state continues, already written
    (ledger_segments.write_segments); segments no kept checkpoint lists any more are removed after
    the older checkpoints.
    """
    root = resume_root(output_dir)
    name = step_name(step)
    final = root / name
    tmp = root / f".tmp-{name}-{os.getpid()}"
    parent = step_name(parent_step) if parent_step is not None else latest_name(output_dir)
    try:
        Path(output_dir).mkdir(parents=True, exist_ok=True)  # the run's claim made it; output_dir may be a link
        make_dir(root)
        refuse_link(tmp)
        shutil.rmtree(tmp, ignore_errors=True)  # a dead process's with this pid
        os.mkdir(tmp)
        with create_new_file(tmp / STATE_FILE) as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        manifest = {
            "format": MANIFEST_FORMAT,
            "step": step,
            "files": {STATE_FILE: {"bytes": (tmp / STATE_FILE).stat().st_size, "sha256": file_sha256(tmp / STATE_FILE)}},
            "run": run or {},
            "segments": list(segments),
        }
        with create_new_file(tmp / MANIFEST_FILE) as f:
            f.write(json.dumps(manifest, indent=1, sort_keys=True).encode())
            f.flush()
            os.fsync(f.fileno())
        fault_point("mid_save", step)
        fsync_dir(tmp)
        refuse_link(final)
        if final.exists():  # an abandoned save of this step (killed before `latest` moved)
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_dir(root)
        fault_point("before_pointer", step)
        write_atomically(root / LATEST, name.encode())
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RunError(
            f"save_every_n_steps: could not write the resume checkpoint {final}: {err.strerror or err}; "
            f"the previous checkpoint ({latest_name(output_dir) or 'none'}) is intact"
        ) from err
    for old in step_dirs(output_dir):
        if old.name not in (name, parent):
            shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)  # never follows a link (nor removes one)
    evict_segments(root, [path / MANIFEST_FILE for path in step_dirs(output_dir)])
    return final


def latest_name(output_dir: str) -> Optional[str]:
    """What ``latest`` names (None without a readable pointer)."""
    pointer = resume_root(output_dir) / LATEST
    try:
        return pointer.read_text().strip() or None
    except (OSError, UnicodeDecodeError):
        return None


class CorruptCheckpoint(Exception):
    """A checkpoint directory that fails verification (the message says why)."""


def verify_checkpoint(path: Path) -> Dict[str, Any]:
    """Check every file of checkpoint ``path`` against its manifest; return the manifest.

    Raises :class:`CorruptCheckpoint` naming the file: missing, unreadable manifest, wrong size
    (truncated), or wrong sha256 (overwritten bytes)."""
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        raise CorruptCheckpoint(f"{manifest_path} is missing")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise CorruptCheckpoint(f"{manifest_path} is unreadable ({type(err).__name__})") from err
    if STATE_FILE not in files:
        raise CorruptCheckpoint(f"{manifest_path} lists no {STATE_FILE}")
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            raise CorruptCheckpoint(f"{file} is missing")
        size = file.stat().st_size
        if size != expected.get("bytes"):
            raise CorruptCheckpoint(f"{file} has {size} bytes, the manifest says {expected.get('bytes')} (truncated?)")
        if file_sha256(file) != expected.get("sha256"):
            raise CorruptCheckpoint(f"{file} does not match its sha256 in {MANIFEST_FILE} (corrupted)")
    try:
        verify_segments(path.parent, manifest.get("segments", []))
    except CorruptSegment as err:
        raise CorruptCheckpoint(str(err)) from err
    return manifest


@dataclass
class ResumeCheckpoint:
    """The checkpoint a resume will load: its directory, verified manifest, and what was skipped."""

    path: Path
    manifest: Dict[str, Any]
    skipped: List[str]  # "<dir>: <why>" for each newer checkpoint that failed verification

    @property
    def run(self) -> Dict[str, Any]:
        return self.manifest.get("run") or {}


def select_resume_checkpoint(output_dir: str) -> Optional[ResumeCheckpoint]:
    """The newest intact checkpoint: the one ``latest`` names, else the newest that verifies.

    Returns None if ``output_dir`` holds no checkpoint at all; raises :class:`RunError` (one line
    naming each file and why) if there are checkpoints but none is intact, or if the chosen one's
    state holds more than tensors and plain containers (a crafted file: refused, not skipped)."""
    candidates = step_dirs(output_dir)
    if not candidates:
        return None
    pointed = latest_name(output_dir)
    order = sorted(candidates, key=lambda p: p.name != pointed)  # the pointer's target first, then newest first
    skipped = []
    if pointed is None or pointed not in {p.name for p in candidates}:
        skipped.append(f"{resume_root(output_dir) / LATEST}: names no checkpoint directory ({pointed!r})")
    for path in order:
        try:
            manifest = verify_checkpoint(path)
        except CorruptCheckpoint as err:
            skipped.append(str(err))
            continue
        _load_state(path / STATE_FILE, mmap=True)  # refuses a crafted file now: reads the pickle, not the tensors
        return ResumeCheckpoint(path, manifest, skipped)
    raise RunError(f"resume_from_checkpoint: no intact checkpoint under {resume_root(output_dir)}: " + "; ".join(skipped))


def _load_state(file: Path, mmap: bool = False) -> Dict[str, Any]:
    """``torch.load`` that builds only tensors and plain containers, or a one-line RunError naming
    ``file``. A file that matched its checksum and still holds anything else was not written by
    this tool (its checksums are as easy to rewrite as the file): refused, never fallen back from."""
    if not zipfile.is_zipfile(file):  # torch.save's format; an old-style pickle is no state of ours
        raise RunError(
            f"resume_from_checkpoint: refused {file}: not in torch.save's zip format, which every resume state of this tool is"
        )
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:  # weights_only met something that could run code
        found = re.search(r"GLOBAL (\S+)", str(err))
        what = f"loading it would call {found.group(1)}" if found else "it holds more than tensors and plain containers"
        raise RunError(
            f"resume_from_checkpoint: refused {file}: {what}; a resume state written by this tool holds only "
            "tensors and plain containers, so this one was written by something else (not loaded)"
        ) from err
    except Exception as err:  # a file that matched its checksum but still fails: say which
        raise RunError(f"resume_from_checkpoint: cannot load {file}: {type(err).__name__}: {err}".replace("\n", " ")) from err


def load_resume_state(checkpoint: ResumeCheckpoint) -> Dict[str, Any]:
    """Load a verified checkpoint's state (CPU tensors). Raises :class:`RunError` naming the file
    if it holds anything but tensors and plain containers, or cannot be read."""
    return _load_state(checkpoint.path / STATE_FILE)


def load_resume_segments(checkpoint: ResumeCheckpoint) -> List[Dict[str, Any]]:
    """The ledger segments a verified checkpoint lists, in order (see ledger_segments.py)."""
    return load_segments(checkpoint.path.parent, checkpoint.manifest.get("segments", []))


def latest_resume_dir(output_dir: str) -> Optional[Path]:
    """The checkpoint ``latest`` names if its directory exists (no verification), else None."""
    name = latest_name(output_dir)
    if name is None:
        return None
    path = resume_root(output_dir) / name
    return path if (path / STATE_FILE).is_file() else None
