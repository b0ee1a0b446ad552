"""Mid-run checkpoints for exact resume, written atomically.

torchtune's resume reloads the original base plus one adapter, which is wrong once rounds have
been merged. Ours stores what cannot be recomputed: the merged-state ledgers, the live adapters,
the optimizer and RNG state, and the step. The base weights are reloaded from the original
checkpoint (W0), so a resume state is small.

Layout: ``<output_dir>/xgb_resume/step_NNNNNNNN/state.pt`` and a ``latest`` file naming the
newest complete one. A step directory is written under a temporary name and renamed, then
``latest`` is replaced atomically, then older steps are removed: a kill at any moment leaves
``latest`` pointing at a complete checkpoint.
"""

import os
import shutil
from pathlib import Path
from typing import Any, Dict, Optional

import torch

RESUME_DIR = "xgb_resume"
LATEST = "latest"


def resume_root(output_dir: str) -> Path:
    return Path(output_dir) / RESUME_DIR


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_resume_state(output_dir: str, step: int, state: Dict[str, Any], keep: int = 1) -> Path:
    """Write ``state`` as the checkpoint of ``step``; keep the newest ``keep`` ones. Returns its dir."""
    root = resume_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:08d}"
    final = root / name
    tmp = root / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    with open(tmp / "state.pt", "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    pointer_tmp = root / f".{LATEST}.tmp-{os.getpid()}"
    pointer_tmp.write_text(name)
    with open(pointer_tmp) as f:
        os.fsync(f.fileno())
    os.replace(pointer_tmp, root / LATEST)
    _fsync_dir(root)
    steps = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))
    for old in steps[:-keep] if keep > 0 else []:
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    return final


def latest_resume_dir(output_dir: str) -> Optional[Path]:
    """The newest complete checkpoint dir, or None if there is none."""
    pointer = resume_root(output_dir) / LATEST
    if not pointer.is_file():
        return None
    path = resume_root(output_dir) / pointer.read_text().strip()
    return path if (path / "state.pt").is_file() else None


def load_resume_state(output_dir: str) -> Dict[str, Any]:
    path = latest_resume_dir(output_dir)
    if path is None:
        raise FileNotFoundError(f"resume_from_checkpoint: no checkpoint under {resume_root(output_dir)}")
    return torch.load(path / "state.pt", map_location="cpu", weights_only=False)
