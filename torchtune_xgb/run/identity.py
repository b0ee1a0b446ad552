"""What defines a run, so that a resume can refuse to continue a different one.

A resume continues the run that wrote the checkpoint, step for step. If the config changed in
anything that defines that run — method, rank, alpha, target modules, the ``adapter:`` and
``boost:`` blocks, optimizer and scheduler, batch size, gradient accumulation, the dataset (its
config and the bytes of any local file it names, of every file in a local ``source`` directory
and of every match of a ``data_files`` glob), dtype, epochs and max steps, seed, the base
checkpoint (a fingerprint of its files: base_fingerprint.py), the tokenizer files, the number of
processes — the continuation would silently be a different run. The identity is the resolved
config flattened to dotted keys, minus the keys that only say where output goes, how often to log
or save, what to evaluate, or how to execute (device, compile, activation checkpointing), which
may change freely.

Inputs may move: a base directory, tokenizer file or local data file at another path is the same
run when its recorded fingerprint matches (a job that copies the model to node-local disk gets a
new path every time it is resumed). A path without a fingerprint (a directory the recipe reads,
a checkpoint written before the tokenizer was fingerprinted) must stay where it was.

Changing the optimizer, scheduler or gradient clipping on purpose (typically: resuming a run that
diverged with a lower learning rate) is allowed when the resume lists the keys in
``resume_allow_changes``. Listing ``world_size`` lets the number of processes change, and with it
``batch_size`` and ``gradient_accumulation_steps``, as long as the global batch and the steps per
epoch stay the same (batch_layout.py: the resume then continues from the same global sample);
nothing else can be changed on resume.

What only the loaded data shows (its size, the steps per epoch, a hub dataset's resolved
revision) is added to the identity once the data has loaded and compared then (data_identity.py).
"""

import glob
import hashlib
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Tuple

from omegaconf import DictConfig, OmegaConf
from torchtune import utils

from torchtune_xgb.errors import ConfigError
from torchtune_xgb.run.base_fingerprint import MODEL_CONFIG, base_fingerprints
from torchtune_xgb.run.batch_layout import LAYOUT_KEYS, SAMPLES_KEY, WORLD_SIZE, check_layout_change

log = utils.get_logger("INFO")

# Keys (and key prefixes) that do not define the run: output, logging, saving, evaluation, execution.
FREE_KEYS = (
    "output_dir", "resume_from_checkpoint", "resume_allow_changes", "overwrite_output_dir",
    "save_every_n_steps", "log_every_n_steps", "log_peak_memory_stats", "log_level",
    "metric_logger", "profiler", "eval", "dataset_val", "run_val_every_n_steps", "batch_size_val", "export",
    "checkpointer.output_dir", "checkpointer.recipe_checkpoint", "device", "compile",
    "enable_activation_checkpointing", "enable_activation_offloading", "low_cpu_ram",
    "boost.base_device", "save_adapter_weights_only", "guard", "fsdp_cpu_offload",
    "cudnn_deterministic_mode", "model_dir",
)
# Keys a resume may change when it names them in resume_allow_changes.
CHANGEABLE_ON_REQUEST = ("optimizer.", "lr_scheduler.", "clip_grad_norm", "world_size")
# The base files' fingerprints: checked on their own, with a message about the files, not the config.
BASE_KEY = "checkpointer#base_weights"
# Blocks whose local files are hashed (``KEY#sha256``), so their bytes define the run and their paths may move.
HASHED_BLOCKS = ("dataset", "tokenizer")
HASH_SUFFIX = "#sha256"
# Keys the recipe adds once the data has loaded (data_identity.py): compared then, not before.
REVISIONS_KEY, STEPS_KEY = "dataset#revisions", "dataset#steps_per_epoch"
LOADED_KEYS = (SAMPLES_KEY, STEPS_KEY, REVISIONS_KEY)
_HASH_LIMIT = 1 << 30  # files above 1 GiB: size and the first and last MiB, not every byte


def _is_free(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in FREE_KEYS)


def _flatten(value: Any, prefix: str = "") -> Dict[str, Any]:
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def file_fingerprint(path: Path) -> str:
    """sha256 of a local data file (large files: size + first and last MiB)."""
    digest = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size <= _HASH_LIMIT:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        else:
            digest.update(f.read(1 << 20))
            f.seek(-(1 << 20), os.SEEK_END)
            digest.update(f.read())
            digest.update(str(size).encode())
    return digest.hexdigest()


# Keys whose value may name a local *directory* of data (``dataset.source: /data/mine``:
# datasets.load_dataset reads every data file under it) or a glob of files (``data_files:
# data/*.jsonl``): the files they cover define the run, by name and bytes. Not ``data_dir``: our
# generated datasets write their files there (their config values define the data), so its bytes
# at start may be another run's, regenerated before training.
DIR_KEYS = ("source", "data_files")
try:  # load_dataset's own builders: ``source: json`` names the builder even where ./json/ exists
    from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES as _PACKAGED

    BUILDER_NAMES = frozenset(_PACKAGED)
except ImportError:  # pragma: no cover - a datasets without the table
    BUILDER_NAMES = frozenset({"json", "csv", "text", "parquet", "arrow", "pandas", "webdataset", "xml"})
_GLOB = "*?["


def _visible(path: Path, root: Path) -> bool:
    """datasets skips hidden files and folders (``.cache``, ``.git``) and ``__pycache__``-like ones."""
    return not any(part.startswith((".", "__")) for part in path.relative_to(root).parts)


def _data_files(value: Any, key: str = "") -> Iterable[Tuple[str, Path]]:
    """The local files a config value names, as ``(label, path)``: a path (label ""), or paths
    anywhere in its lists and dicts (torchtune's list of datasets is one value, ``dataset``, since
    ``_flatten`` keeps lists); under a ``DIR_KEYS`` key also a directory (every visible file under
    it, labelled by its path inside it) or a glob (the matches, labelled by name). A label keeps a
    file's name in its fingerprint where the name is what load_dataset sees (train.jsonl vs
    test.jsonl in a directory) and leaves the directory free to move."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _data_files(v, str(k))
        return
    if isinstance(value, (list, tuple)):
        for v in value:
            yield from _data_files(v, key)
        return
    if not isinstance(value, str) or len(value) >= 4096:
        return
    p = Path(value).expanduser()
    name = key.rsplit(".", 1)[-1]
    if p.is_file():
        yield "", p
    elif name not in DIR_KEYS or "://" in value:
        return
    elif p.is_dir() and not (name == "source" and value in BUILDER_NAMES):
        for f in sorted(q for q in p.rglob("*") if q.is_file() and _visible(q, p)):
            yield f.relative_to(p).as_posix(), f
    elif name == "data_files" and any(ch in value for ch in _GLOB):
        for f in sorted(Path(m) for m in glob.glob(str(p), recursive=True) if Path(m).is_file()):
            yield f.name, f


def _only_files_differ(before: Any, now: Any, key: str = "") -> bool:
    """``before`` and ``now`` are the same value but for strings that now name local files."""
    if isinstance(before, dict) and isinstance(now, dict):
        return before.keys() == now.keys() and all(_only_files_differ(before[k], now[k], str(k)) for k in before)
    if isinstance(before, list) and isinstance(now, list):
        return len(before) == len(now) and all(_only_files_differ(b, n, key) for b, n in zip(before, now))
    return before == now or (isinstance(before, str) and any(True for _ in _data_files(now, key)))


def _fingerprints(value: Any, key: str) -> List[str]:
    """sha256 of each file ``value`` names; a directory's or glob's files as ``label:sha256``."""
    return [f"{label}:{file_fingerprint(p)}" if label else file_fingerprint(p) for label, p in _data_files(value, key)]


def run_identity(cfg: DictConfig, world_size: int = 1) -> Dict[str, Any]:
    """The run-defining values of ``cfg`` as ``{dotted key: JSON value}``."""
    flat = _flatten(OmegaConf.to_container(cfg, resolve=True))
    identity = {k: v for k, v in flat.items() if not _is_free(k)}
    for key, value in list(identity.items()):
        if key.split(".")[0] in HASHED_BLOCKS:
            prints = _fingerprints(value, key)
            if prints:
                identity[key + HASH_SUFFIX] = prints
    if cfg.get("checkpointer") is not None:
        identity[BASE_KEY] = base_fingerprints(cfg.checkpointer)
    identity[WORLD_SIZE] = world_size
    return identity


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def differences(saved: Dict[str, Any], current: Dict[str, Any]) -> List[Tuple[str, Any, Any]]:
    """(key, saved value, current value) for every key that differs (a missing key is None)."""
    missing = object()
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, missing), current.get(key, missing)
        if a != b:
            out.append((key, None if a is missing else a, None if b is missing else b))
    return out


def check_resume_identity(saved: Dict[str, Any], current: Dict[str, Any], allowed: Iterable[str], checkpoint: Path) -> None:
    """Raise a one-line :class:`ConfigError` listing every run-defining key that differs from the
    checkpoint's run and is not allowed to change (``allowed``: the ``resume_allow_changes`` list)."""
    allowed = list(allowed or [])
    for key in allowed:
        if not any(key == k.rstrip(".") or key.startswith(k) for k in CHANGEABLE_ON_REQUEST):
            raise ConfigError(
                f"resume_allow_changes: {key!r} cannot change on resume (only optimizer.*, lr_scheduler.*, "
                "clip_grad_norm, world_size); start a new run in another output_dir"
            )
    # with world_size allowed, processes, per-rank batch and accumulation are judged together
    judged_together = LAYOUT_KEYS if WORLD_SIZE in allowed else ()
    refused = [
        (key, a, b)
        for key, a, b in differences(saved, current)
        if key != BASE_KEY and not _unrecorded_hash(key, saved) and not _moved(key, a, b, saved, current)
        if not (key in LOADED_KEYS and key not in current) and key not in judged_together
        if not any(key == k or key.startswith(k + ".") or key.startswith(k + "#") for k in allowed)
    ]
    if refused:
        listed = ", ".join(f"{k} (checkpoint {_short(a)}, now {_short(b)})" for k, a, b in refused)
        # a new number of processes needs its per-rank batch or accumulation changed with it
        with_processes = LAYOUT_KEYS if any(k == WORLD_SIZE for k, _, _ in refused) else ()
        changeable = [k for k, _, _ in refused if any(k.startswith(c) for c in CHANGEABLE_ON_REQUEST) or k in with_processes]
        listed_keys = [k for k in changeable if k == WORLD_SIZE or k not in LAYOUT_KEYS]  # world_size covers the other two
        hint = (f"; to change them on purpose: resume_allow_changes=[{','.join(listed_keys)}]"
                if len(changeable) == len(refused) else "")
        raise ConfigError(
            f"resume_from_checkpoint: the config differs from the run that wrote {checkpoint} in {listed}; "
            f"a resume must continue the same run (choose another output_dir for a new one){hint}"
        )
    if judged_together:
        check_layout_change(saved, current)
    _check_base_weights(saved, current, checkpoint)  # after the config: a moved checkpoint_dir is said as such


def _unrecorded_hash(key: str, saved: Dict[str, Any]) -> bool:
    """A fingerprint the checkpoint's version did not record (tokenizer files before they were
    hashed): nothing to compare; the path itself is still compared."""
    return key.endswith(HASH_SUFFIX) and key not in saved and key[: -len(HASH_SUFFIX)] in saved


def _moved(key: str, before: Any, now: Any, saved: Dict[str, Any], current: Dict[str, Any]) -> bool:
    """``key`` names an input at another path whose recorded fingerprint is the same (the base
    directory is left to ``_check_base_weights``, which says which files differ)."""
    if key == "checkpointer.checkpoint_dir":
        moved = bool(saved.get(BASE_KEY))
    else:  # every differing part a file whose bytes are the recorded ones, in the same order
        prints = saved.get(key + HASH_SUFFIX)
        moved = bool(prints) and prints == current.get(key + HASH_SUFFIX) and _only_files_differ(before, now, key)
    if moved:
        log.info(f"{key}: moved from {before} to {now}; resuming on its recorded fingerprint")
    return moved


def _check_base_weights(saved: Dict[str, Any], current: Dict[str, Any], checkpoint: Path) -> None:
    """The base files must be the bytes the checkpoint's run started from (base_fingerprint.py)."""
    if BASE_KEY not in saved:  # written before base fingerprints were recorded
        log.warning(f"{checkpoint}: written without a fingerprint of the base weights; "
                    "resuming without checking that checkpointer.checkpoint_dir holds the same files")
        return
    before, now = saved[BASE_KEY], current.get(BASE_KEY, {})
    unrecorded = {MODEL_CONFIG} - set(before)  # a checkpoint from before config.json was fingerprinted
    changed = sorted(name for name in (set(before) | set(now)) - unrecorded if before.get(name) != now.get(name))
    if changed:
        what = ", ".join(f"{name} ({'new' if name not in before else 'missing' if name not in now else 'other bytes'})"
                         for name in changed)
        key = "checkpointer.checkpoint_dir"
        where = (f"{current.get(key)} holds other base weights than {saved.get(key)}, where the run that wrote "
                 f"{checkpoint} started" if saved.get(key) != current.get(key) else
                 f"the base weights changed since the run that wrote {checkpoint} started")
        raise ConfigError(
            f"{key}: {where} ({what}); a resume rebuilds the model from these files and would continue on weights "
            "the run never saw: restore the original files, or start a new run in another output_dir"
        )
