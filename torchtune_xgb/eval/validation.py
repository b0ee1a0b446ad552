"""Checks of the evaluation inputs that can run before any weights load (called by config/validation.py).

- the ``eval:`` block's keys (eval/config.py);
- ``eval.examples`` from the user's file (``json_eval_examples``) is read now, so a missing file
  or column stops the run with one line naming the key (the file is only read);
- the generated arithmetic task (``dataset``, ``dataset_val``, ``eval.examples``) would not have
  to overwrite a file it did not write in ``data_dir`` (checked, nothing written).
"""

from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from torchtune import config
from torchtune.config._utils import _get_component_from_path

from torchtune_xgb.data.arithmetic import arithmetic_dataset, check_split_writable, load_eval_examples
from torchtune_xgb.data.json_eval import json_eval_examples
from torchtune_xgb.eval.config import parse_eval_config


def _builder(block) -> Any:
    """The function a ``_component_`` block names (under any of its import paths; None: none or
    unresolvable, which the component check reports)."""
    component = block.get("_component_") if isinstance(block, DictConfig) else None
    if not isinstance(component, str):
        return None
    try:
        return _get_component_from_path(component)
    except Exception:  # noqa: BLE001 - named by the component-args check with its key
        return None


def validate_eval_config(cfg: DictConfig) -> None:
    """Raise ConfigError (one line, naming the key) on the first problem; writes nothing."""
    parse_eval_config(cfg)
    examples = OmegaConf.select(cfg, "eval.examples")
    if isinstance(examples, DictConfig):
        builder = _builder(examples)
        if builder is json_eval_examples:
            config.instantiate(examples)  # reads (only) the user's file: ConfigError names the key
        elif builder is load_eval_examples:
            args = OmegaConf.to_container(examples, resolve=True)
            check_split_writable(args.pop("data_dir", None), args.pop("split", "eval"), **args)
    for key in ("dataset", "dataset_val"):
        block = cfg.get(key)
        for entry in block if isinstance(block, ListConfig) else [block]:
            if _builder(entry) is arithmetic_dataset:
                args = OmegaConf.to_container(entry, resolve=True)
                check_split_writable(args.pop("data_dir", None), args.pop("split", "train"), **args)
