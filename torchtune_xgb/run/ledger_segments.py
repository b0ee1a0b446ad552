"""Sealed ledger segments of the resume checkpoints: written once, shared by later checkpoints.

The merged rounds are append-only (method/ledger.py). Every ``segment_rounds`` rounds the rounds
since the previous boundary are sealed (method/merged_state.py); a resume checkpoint holds only
the rounds after the last boundary and lists the sealed segments it needs, each a file written once
by the first checkpoint after its boundary. So what a checkpoint writes (and, under FSDP2,
gathers) does not grow with the number of rounds.

Layout::

    <output_dir>/xgb_resume/segments/rounds_<first>-<end>_<sha16>.pt          the segment
    <output_dir>/xgb_resume/segments/rounds_<first>-<end>_<sha16>.replica.pt  the same bytes again

Each manifest lists its segments in order (``{"file", "rounds", "bytes", "sha256"}``). Every
later checkpoint shares a segment, so each is written twice: a corrupted or truncated copy still
leaves the other, as the two kept checkpoints do for the rest of the state. The name carries the
content's hash, so a run resumed from an older checkpoint that seals the same rounds again never
overwrites a file another checkpoint lists. Segments no kept checkpoint lists are removed after
each save (only files with this module's names, in this directory).
"""

import hashlib
import io
import json
import re
from pathlib import Path
from typing import Any, Dict, Iterable, List, Sequence

import torch

from torchtune_xgb.errors import RunError
from torchtune_xgb.run.faults import fault_point
from torchtune_xgb.run.safe_files import fsync_dir, make_dir, write_atomically

SEGMENT_DIR = "segments"
REPLICA = ".replica.pt"
_NAME = re.compile(r"^rounds_\d+-\d+_[0-9a-f]{16}(\.replica)?\.pt$")
_TMP_PREFIX = ".rounds_"  # safe_files.write_atomically's temporary files: ".<name>.tmp-…"


class CorruptSegment(Exception):
    """No intact copy of a segment a checkpoint lists (the message names it)."""


def segment_dir(resume_root: Path) -> Path:
    return resume_root / SEGMENT_DIR


def _copies(directory: Path, entry: Any) -> List[Path]:
    """The segment's two paths; :class:`CorruptSegment` for an entry that is no segment of ours
    (a manifest names files in this directory only, by this module's names)."""
    name = entry.get("file") if isinstance(entry, dict) else None
    if not isinstance(name, str) or not _NAME.match(name) or name.endswith(REPLICA):
        raise CorruptSegment(f"{directory}: the manifest lists {name!r}, which is no ledger segment name")
    return [directory / name, directory / (name[: -len(".pt")] + REPLICA)]


def _intact(path: Path, entry: Dict[str, Any]) -> bool:
    from torchtune_xgb.run.checkpointing import file_sha256

    try:
        return (not path.is_symlink() and path.is_file() and path.stat().st_size == entry.get("bytes")
                and file_sha256(path) == entry.get("sha256"))
    except OSError:
        return False


def write_segments(resume_root: Path, payloads: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Write each payload (Booster.segment_payloads: plain tensors, lists, numbers) as a segment
    and its replica; return their manifest entries, in order. A copy already on disk with the
    same content is kept. Raises :class:`RunError` naming the path if the disk is full or not
    writable (then no checkpoint lists the new segments; they are removed at the next save)."""
    directory = segment_dir(resume_root)
    entries = []
    if not payloads:  # no directory until a segment is sealed
        return entries
    try:
        resume_root.parent.mkdir(parents=True, exist_ok=True)  # output_dir (the run's claim made it)
        make_dir(make_dir(resume_root) / SEGMENT_DIR)  # a planted link raises LinkRefused (an OSError): named below
        for payload in payloads:
            buffer = io.BytesIO()
            torch.save(payload, buffer)
            data = buffer.getvalue()
            sha = hashlib.sha256(data).hexdigest()
            first, end = payload["rounds"]
            entry = {"file": f"rounds_{first:06d}-{end:06d}_{sha[:16]}.pt", "rounds": [first, end],
                     "bytes": len(data), "sha256": sha}
            for path in _copies(directory, entry):
                if not _intact(path, entry):
                    fault_point("segment_write")
                    write_atomically(path, data)  # a new file renamed into place, never through a link
            entries.append(entry)
        fsync_dir(directory)
    except OSError as err:
        raise RunError(
            f"save_every_n_steps: could not write the ledger segment in {directory}: {err.strerror or err}; "
            "the previous checkpoint is intact"
        ) from err
    return entries


def verify_segments(resume_root: Path, entries: Any) -> None:
    """Raise :class:`CorruptSegment` naming the first segment with no intact copy."""
    directory = segment_dir(resume_root)
    if not isinstance(entries, list):
        raise CorruptSegment(f"{directory}: the manifest's segment list is unreadable")
    for entry in entries:
        copies = _copies(directory, entry)
        if not any(_intact(path, entry) for path in copies):
            raise CorruptSegment(f"{copies[0]} and its replica are missing or do not match their sha256 "
                                 "in the manifest (corrupted)")


def load_segments(resume_root: Path, entries: Iterable[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The payloads of ``entries``, in order, each from a copy that matches its manifest entry
    (read with ``weights_only=True``: tensors, lists, numbers and strings only)."""
    directory = segment_dir(resume_root)
    payloads = []
    for entry in entries:
        copy = next((path for path in _copies(directory, entry) if _intact(path, entry)), None)
        if copy is None:
            raise RunError(f"resume_from_checkpoint: no intact copy of the ledger segment {directory / entry['file']}")
        payloads.append(torch.load(copy, map_location="cpu", weights_only=True))
    return payloads


def evict_segments(resume_root: Path, manifests: Iterable[Path]) -> None:
    """Remove segment files (this module's names only) that none of ``manifests`` lists, and
    leftover temporary files. Nothing is removed if a manifest cannot be read: it might list any."""
    directory = segment_dir(resume_root)
    if not directory.is_dir() or directory.is_symlink():
        return
    listed = set()
    for manifest in manifests:
        try:
            entries = json.loads(manifest.read_text()).get("segments", [])
            for entry in entries:
                listed.update(path.name for path in _copies(directory, entry))
        except (OSError, ValueError, AttributeError, KeyError, TypeError, CorruptSegment):
            return
    for path in directory.iterdir():
        if path.name.startswith(_TMP_PREFIX) or (_NAME.match(path.name) and path.name not in listed):
            try:
                path.unlink()
            except OSError:
                pass
