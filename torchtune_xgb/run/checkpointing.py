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
renamed into place; only then does ``latest`` move (atomic replace), and only then are older
checkpoints removed, keeping the newest two. A kill at any moment leaves ``latest`` naming a
complete checkpoint. ``torch.load`` does not check the zip CRCs, so overwritten bytes would load
silently: every load verifies the manifest first, and a corrupted or truncated newest checkpoint
falls back to the previous intact one with a warning naming both.
"""

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
from torchtune import utils

from torchtune_xgb.errors import RunError
from torchtune_xgb.run.faults import fault_point
from torchtune_xgb.run.ledger_segments import CorruptSegment, evict_segments, load_segments, verify_segments

log = utils.get_logger("INFO")

RESUME_DIR = "xgb_resume"
LATEST = "latest"
STATE_FILE = "state.pt"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1
KEEP = 2  # the newest and one before it: a corrupted newest one still leaves a way back


def resume_root(output_dir: str) -> Path:
    return Path(output_dir) / RESUME_DIR


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def step_dirs(output_dir: str) -> List[Path]:
    """Complete-looking checkpoint directories, newest step first."""
    root = resume_root(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]), reverse=True)


def save_resume_state(
    output_dir: str, step: int, state: Dict[str, Any], run: Optional[Dict[str, Any]] = None, keep: int = KEEP,
    segments: Sequence[Dict[str, Any]] = (),
) -> Path:
    """Write ``state`` as the checkpoint of ``step``; keep the newest ``keep``. Returns its dir.

    ``run`` is the run's identity (recorded in the manifest; a resume compares it before any
    weights load). ``segments``: the entries of the ledger segments the state continues, already
    written (ledger_segments.write_segments); segments no kept checkpoint lists any more are
    removed after the older checkpoints. Raises :class:`RunError` naming the path if the disk is
    full or not writable; what was on disk before is then untouched (the half-written directory
    is removed).
    """
    root = resume_root(output_dir)
    name = f"step_{step:08d}"
    final = root / name
    tmp = root / f".tmp-{name}-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        with open(tmp / STATE_FILE, "wb") as f:
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
        _write_synced(tmp / MANIFEST_FILE, json.dumps(manifest, indent=1, sort_keys=True).encode())
        fault_point("mid_save", step)
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
        fault_point("before_pointer", step)
        pointer_tmp = root / f".{LATEST}.tmp-{os.getpid()}"
        _write_synced(pointer_tmp, name.encode())
        os.replace(pointer_tmp, root / LATEST)
        _fsync_dir(root)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RunError(
            f"save_every_n_steps: could not write the resume checkpoint {final}: {err.strerror or err}; "
            f"the previous checkpoint ({latest_name(output_dir) or 'none'}) is intact"
        ) from err
    for old in step_dirs(output_dir)[keep:] if keep > 0 else []:
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
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
    naming each file and why) if there are checkpoints but none is intact."""
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
            return ResumeCheckpoint(path, verify_checkpoint(path), skipped)
        except CorruptCheckpoint as err:
            skipped.append(str(err))
    raise RunError(f"resume_from_checkpoint: no intact checkpoint under {resume_root(output_dir)}: " + "; ".join(skipped))


def load_resume_state(checkpoint: ResumeCheckpoint) -> Dict[str, Any]:
    """Load a verified checkpoint's state (CPU tensors). Raises :class:`RunError` naming the file
    if it cannot be unpickled even so."""
    file = checkpoint.path / STATE_FILE
    try:
        return torch.load(file, map_location="cpu", weights_only=False)
    except Exception as err:  # a file that matched its checksum but still fails: say which
        raise RunError(f"resume_from_checkpoint: cannot load {file}: {type(err).__name__}: {err}".replace("\n", " ")) from err


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
