"""An ``output_dir`` belongs to one run.

A new run started in a directory that holds another run's resume state or export would overwrite
its model, append to its metrics log and leave its resume state behind, so that a later
``resume_from_checkpoint=True`` resumes the *old* run. So a fresh run refuses such a directory,
with one line that offers only what is safe there: resume it (if it left a checkpoint and did not
finish), choose another ``output_dir``, or ``overwrite_output_dir=True``, which removes exactly
what the earlier run recorded writing (run_record.py) and is refused — before anything is removed —
when an input of this run (base checkpoint, tokenizer, data, eval file) lies inside what would go.
A dead run that left no resume checkpoint and no export (it failed before its first save) does not
block a retry: its record and metrics log are replaced. What this run would write but no run
recorded writing (another tool's ``epoch_0/``, an older version's outputs) is never removed: such a
directory is refused.

Every run holds an exclusive lock on ``output_dir/.xgb_run.lock`` for its whole life: a second run
started there at the same time is refused (run/run_lock.py: an ``flock``, or a lock file where the
filesystem has none). Under torchrun only rank 0 takes it.

Nothing a run writes there goes through a symbolic link (run/safe_files.py), and before writing
anything a run refuses, in one line naming it, a link planted at any path it will write: its own
files, ``xgb_resume/`` and what is in it, ``epoch_N/``, torchtune's ``torchtune_config.yaml`` and
the metric log (torchtune writes those two through links). Holding the lock, a resume then
finishes or undoes an export a killed run left half-way (export/staged.py).
"""

import os
from pathlib import Path
from typing import List, Optional, Tuple

from omegaconf import DictConfig, OmegaConf
from torchtune import utils

from torchtune_xgb.errors import ConfigError
from torchtune_xgb.export.staged import STAGING_PREFIX, recover_exports
from torchtune_xgb.run.checkpointing import RESUME_DIR, step_dirs
from torchtune_xgb.run.inputs import input_inside, run_inputs
from torchtune_xgb.run.run_lock import LOCK_FILE, OWNER_FILE, RunLock, acquire_lock, in_use_error, lock_holder
from torchtune_xgb.run.run_record import RUN_FILE, record_started, recorded_outputs, remove_outputs, start_record
from torchtune_xgb.run.safe_files import LinkRefused, first_link
from torchtune_xgb.run.summary import SUMMARY_FILE

log = utils.get_logger("INFO")

TORCHTUNE_CONFIG = "torchtune_config.yaml"  # torchtune's metric loggers write it (training.metric_logging.save_config)


def _overwrite_requested(cfg: DictConfig) -> bool:
    overwrite = bool(cfg.get("overwrite_output_dir", False))
    if overwrite and cfg.get("resume_from_checkpoint"):
        raise ConfigError("overwrite_output_dir: cannot be True together with resume_from_checkpoint=True")
    return overwrite


def _metrics_name(cfg: DictConfig, out: Path) -> Optional[str]:
    """The DiskLogger file's path relative to ``out`` (None: another logger, or a file elsewhere)."""
    path = disk_logger_file(cfg)
    if path is None:
        return None
    path = Path(path).expanduser().resolve()
    return path.relative_to(out).as_posix() if out in path.parents else None


def _occupied(path: Path) -> bool:
    if path.is_dir() and not path.is_symlink():
        return any(path.iterdir())
    return os.path.lexists(path)


def _listing(out: Path, names: List[str]) -> str:
    return ", ".join(n + "/" if (out / n).is_dir() and not (out / n).is_symlink() else n for n in sorted(names))


def _either(options: List[str]) -> str:
    return options[0] if len(options) == 1 else ", ".join(options[:-1]) + ", or " + options[-1]


def plan_fresh_run(cfg: DictConfig) -> List[str]:
    """What a fresh run of ``cfg`` removes from its ``output_dir`` before it starts: the outputs
    an earlier run of ours recorded there (run_record.py), with ``overwrite_output_dir`` or when
    that run died before its first resume checkpoint (then only its record and metrics log).

    Raises a one-line ConfigError naming the key, before anything is removed, when the directory
    holds an earlier run's checkpoint or export (without ``overwrite_output_dir``), holds what this
    run would write but no run recorded writing, or when an input of this run lies inside what
    would be removed. Each message offers only what is safe in that situation. Writes nothing."""
    out = Path(cfg.output_dir).expanduser().resolve()
    overwrite = _overwrite_requested(cfg)
    outputs = {n: kind for n, kind in recorded_outputs(out).items() if n != LOCK_FILE and os.path.lexists(out / n)}
    checkpoints = bool(step_dirs(str(out)))
    resume = ["resume it with resume_from_checkpoint=True"] if checkpoints and not (out / SUMMARY_FILE).exists() else []
    targets = [RESUME_DIR, SUMMARY_FILE] + [f"epoch_{e}" for e in range(int(cfg.get("epochs") or 1))]
    # an export a killed run left half-way (export/staged.py) is that run's work: a resume
    # finishes or undoes it; a fresh run never removes it
    targets += sorted(p.name for p in out.glob(f"{STAGING_PREFIX}*"))
    unrecorded = [t for t in targets if t not in outputs and _occupied(out / t)]
    if unrecorded:
        it = "it" if len(unrecorded) == 1 else "them"
        raise ConfigError(
            f"output_dir: {out} holds {_listing(out, unrecorded)}, which this run would write but no run recorded "
            f"writing ({RUN_FILE}); {_either(resume + [f'move {it} out of the way', 'choose another output_dir'])}"
        )
    # a dead run's metrics log and an empty resume directory are no work to keep; anything else is
    kept = [n for n, kind in outputs.items() if kind != "metrics" and (kind != "resume" or checkpoints)]
    inputs = run_inputs(cfg)
    endangered: List[Tuple[str, Tuple[str, Path]]] = [
        (name, hit) for name in sorted(outputs) if (hit := input_inside(out / name, inputs)) is not None
    ]
    if kept and not overwrite:
        options = resume + ["choose another output_dir"] + ([] if endangered else ["pass overwrite_output_dir=True to replace it"])
        why = ""
        if endangered:
            name, (key, path) = endangered[0]
            why = f" (not overwrite_output_dir: {name} holds this run's {key} {path})"
        raise ConfigError(f"output_dir: {out} holds another run ({_listing(out, kept)}); {_either(options)}{why}")
    if endangered:
        name, (key, path) = endangered[0]
        raise ConfigError(
            f"{'overwrite_output_dir' if overwrite else 'output_dir'}: would delete {out / name}, which holds this "
            f"run's {key} {path}; {_either(resume + ['choose another output_dir'])}"
        )
    return sorted(outputs)


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


def check_output_dir(cfg: DictConfig) -> None:
    """What :func:`claim_output_dir` would refuse, checked without writing anything (``tune-xgb
    validate``): a run in progress there, or what :func:`plan_fresh_run` refuses for a fresh run."""
    out = Path(cfg.output_dir).expanduser().resolve()
    refuse_planted_links(out, disk_logger_file(cfg))
    holder = lock_holder(out)
    if holder is not None:
        raise in_use_error(out, holder)
    _overwrite_requested(cfg)
    if not cfg.get("resume_from_checkpoint"):
        plan_fresh_run(cfg)


def claim_output_dir(cfg: DictConfig, take_lock: bool = True) -> Optional[RunLock]:
    """Make ``cfg.output_dir`` this run's, before any weights load. Returns the held lock (or None).

    A resume (``resume_from_checkpoint``) takes the lock; its checkpoint is checked by the resume
    validation. A fresh run removes what :func:`plan_fresh_run` allows (or raises its one-line
    error, having removed nothing) and starts its own record, listing the metrics log it creates.
    """
    overwrite = _overwrite_requested(cfg)
    if not take_lock:  # torchrun ranks > 0: rank 0 decides (and its refusal ends the job)
        return None
    out = Path(cfg.output_dir).expanduser().resolve()
    refuse_planted_links(out, disk_logger_file(cfg))
    lock = acquire_lock(out)
    if cfg.get("resume_from_checkpoint"):
        for line in recover_exports(str(out)):  # an export a kill interrupted: finished or undone
            log.info(f"export: {line}")
        return lock
    try:
        remove = plan_fresh_run(cfg)
    except ConfigError:
        lock.close()
        raise
    if remove:
        listing, earlier = _listing(out, remove), record_started(out)
        remove_outputs(out, remove)
        if overwrite:
            log.info(f"overwrite_output_dir: removed the earlier run's {listing} ({earlier})")
        else:
            log.info(f"output_dir: the earlier run here ({earlier}) ended before its first resume checkpoint; "
                     f"starting afresh (removed its {listing})")
    metrics = _metrics_name(cfg, out)
    start_record(out, {metrics: "metrics"} if metrics is not None and not os.path.lexists(out / metrics) else {})
    return lock


def disk_logger_file(cfg: DictConfig) -> Optional[str]:
    """The file torchtune's DiskLogger appends to (None for other loggers or a generated name)."""
    log_dir, filename = OmegaConf.select(cfg, "metric_logger.log_dir"), OmegaConf.select(cfg, "metric_logger.filename")
    if isinstance(log_dir, str) and isinstance(filename, str):
        return str(Path(log_dir) / filename)
    return None
