"""An ``output_dir`` belongs to one run.

A new run started in a directory that holds another run's resume state or export would overwrite
its model, append to its metrics log and leave its resume state behind, so that a later
``resume_from_checkpoint=True`` resumes the *old* run. So a fresh run refuses such a directory
(one line: resume it, choose another ``output_dir``, or pass ``overwrite_output_dir=True``, which
removes only what a run of ours wrote there), and every run holds an exclusive lock on
``output_dir/.xgb_run.lock`` for its whole life: a second run started there at the same time is
refused (run/run_lock.py: an ``flock``, or a lock file where the filesystem has none). Under
torchrun only rank 0 takes it.

Nothing a run writes there goes through a symbolic link (run/safe_files.py), and before writing
anything a run refuses, in one line naming it, a link planted at any path it will write: its own
files, ``xgb_resume/`` and what is in it, ``epoch_N/``, torchtune's ``torchtune_config.yaml`` and
the metric log (torchtune writes those two through links). Holding the lock, a resume then
finishes or undoes an export a killed run left half-way (export/staged.py).
"""

import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import List, Optional

from omegaconf import DictConfig, OmegaConf
from torchtune import utils

from torchtune_xgb.errors import ConfigError
from torchtune_xgb.export.staged import STAGING_PREFIX, recover_exports
from torchtune_xgb.run.checkpointing import RESUME_DIR
from torchtune_xgb.run.run_lock import LOCK_FILE, OWNER_FILE, RunLock, acquire_lock, in_use_error, lock_holder
from torchtune_xgb.run.safe_files import LinkRefused, first_link, write_atomically
from torchtune_xgb.run.summary import SUMMARY_FILE

log = utils.get_logger("INFO")

RUN_FILE = "xgb_run.json"
TORCHTUNE_CONFIG = "torchtune_config.yaml"  # torchtune's metric loggers write it (training.metric_logging.save_config)



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


def _holds_another_run(output_dir: Path, found: List[str]) -> ConfigError:
    return ConfigError(
        f"output_dir: {output_dir} holds another run ({', '.join(found)}); resume it with resume_from_checkpoint=True, "
        "choose another output_dir, or pass overwrite_output_dir=True to replace it"
    )


def refuse_planted_links(output_dir: Path, metrics_file: Optional[str] = None) -> None:
    """Raise a one-line ConfigError naming the first symbolic link at a path a run writes in
    ``output_dir`` (module docstring); ``metrics_file``: the metric logger's file."""
    if not output_dir.is_dir():
        return
    paths = [output_dir / name for name in (LOCK_FILE, OWNER_FILE, RUN_FILE, SUMMARY_FILE, RESUME_DIR, TORCHTUNE_CONFIG)]
    paths += sorted(output_dir.glob("epoch_*")) + sorted(output_dir.glob(f"{STAGING_PREFIX}*"))
    resume = output_dir / RESUME_DIR
    if resume.is_dir() and not resume.is_symlink():
        paths += sorted(resume.iterdir())
    if metrics_file:  # and each directory between output_dir (as the config spells it) and it
        metrics = Path(metrics_file).expanduser().absolute()
        base = next((q for q in metrics.parents if q.resolve() == output_dir), None)
        if base is not None:
            parts = metrics.relative_to(base).parts
            paths += [base.joinpath(*parts[: i + 1]) for i in range(len(parts))]
    link = first_link(paths)
    if link is not None:
        raise ConfigError(f"output_dir: {LinkRefused(link)}: remove the link, or choose another output_dir")


def check_output_dir(output_dir: str, resume: bool, overwrite: bool = False, metrics_file: Optional[str] = None) -> None:
    """What :func:`claim_output_dir` would refuse, checked without writing anything (``tune-xgb
    validate``): a run in progress there, a planted symbolic link, or another run's artifacts for a
    fresh run."""
    out = Path(output_dir).expanduser().resolve()
    refuse_planted_links(out, metrics_file)
    holder = lock_holder(out)
    if holder is not None:
        raise in_use_error(out, holder)
    found = [] if resume or overwrite else run_artifacts(out)
    if found:
        raise _holds_another_run(out, found)


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
) -> Optional[RunLock]:
    """Make ``output_dir`` this run's, before any weights load. Returns the held lock (or None).

    A fresh run refuses a directory holding another run's artifacts unless ``overwrite``; a
    resume requires them (checked by the resume validation). ``metrics_file``: the metric
    logger's file, removed with the artifacts on overwrite (torchtune's DiskLogger appends).
    """
    if not take_lock:  # torchrun ranks > 0: rank 0 decides (and its refusal ends the job)
        return None
    out = Path(output_dir).expanduser().resolve()
    refuse_planted_links(out, metrics_file)
    lock = acquire_lock(out)
    if resume:
        for line in recover_exports(str(out)):  # an export a kill interrupted: finished or undone
            log.info(f"export: {line}")
        return lock
    found = run_artifacts(out)
    if found and not overwrite:
        lock.close()
        raise _holds_another_run(out, found)
    if found:
        extra = [Path(metrics_file).expanduser().resolve()] if metrics_file else []
        remove_run_artifacts(out, [p for p in extra if out in p.parents])
    record = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "pid": os.getpid(), "host": socket.gethostname()}
    write_atomically(out / RUN_FILE, json.dumps(record, indent=1).encode())
    return lock


def disk_logger_file(cfg: DictConfig) -> Optional[str]:
    """The file torchtune's DiskLogger appends to (None for other loggers or a generated name)."""
    log_dir, filename = OmegaConf.select(cfg, "metric_logger.log_dir"), OmegaConf.select(cfg, "metric_logger.filename")
    if isinstance(log_dir, str) and isinstance(filename, str):
        return str(Path(log_dir) / filename)
    return None
