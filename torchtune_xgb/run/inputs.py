"""The local files and directories a run reads, so that nothing it removes from its ``output_dir``
can be one of them (``overwrite_output_dir`` over a run whose ``epoch_0/`` is this run's base)."""

import glob
import os
from pathlib import Path
from typing import Any, Iterable, List, Optional, Tuple

from omegaconf import DictConfig, OmegaConf

from torchtune_xgb.run.base_fingerprint import base_checkpoint_files

# Config blocks whose string values may name what the run reads: the base model, the tokenizer's
# files, the training and validation data, the evaluation examples.
INPUT_BLOCKS = ("checkpointer", "tokenizer", "dataset", "dataset_val", "eval")
_GLOB = "*?["


def _paths(value: Any, key: str) -> Iterable[Tuple[str, Path]]:
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, f"{key}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, f"{key}[{i}]")
    elif isinstance(value, str) and value and "://" not in value and len(value) < 4096:
        path = Path(value).expanduser()
        if os.path.lexists(path):
            yield key, path
        elif any(ch in value for ch in _GLOB):  # data_files: data/*.jsonl
            yield from ((key, Path(match)) for match in glob.glob(str(path), recursive=True))


def run_inputs(cfg: DictConfig) -> List[Tuple[str, Path]]:
    """``(config key, absolute path)`` of every existing local path the config's input blocks name
    (``checkpointer.output_dir`` aside), and the base checkpoint files, which torchtune names
    relative to ``checkpointer.checkpoint_dir``."""
    found: List[Tuple[str, Path]] = []
    for block in INPUT_BLOCKS:
        value = OmegaConf.select(cfg, block)
        if value is None:
            continue
        container = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
        if isinstance(container, dict) and block == "checkpointer":
            container = {k: v for k, v in container.items() if k != "output_dir"}
        found.extend(_paths(container, block))
    checkpointer = cfg.get("checkpointer")
    if checkpointer is not None and checkpointer.get("checkpoint_dir") is not None:
        found.extend(("checkpointer.checkpoint_files", p) for p in base_checkpoint_files(checkpointer) if p.exists())
    return [(key, Path(os.path.abspath(path))) for key, path in found]


def input_inside(path: Path, inputs: List[Tuple[str, Path]]) -> Optional[Tuple[str, Path]]:
    """The first ``(key, input)`` of ``inputs`` that is ``path`` or lies under it, as written or
    with its links resolved (None: none does). ``path`` itself is not resolved: removing a link
    leaves its target alone."""
    for key, given in inputs:
        for candidate in (given, given.resolve()):
            if candidate == path or path in candidate.parents:
                return key, given
    return None
