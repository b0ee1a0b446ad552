"""Checks of the evaluation inputs that can run before any weights load (called by validation.py).

- ``eval.normalize`` is a known normaliser;
- ``eval.examples`` from the user's file (``json_eval_examples``) is read now, so a missing file
  or column stops the run with one line naming the key (the file is only read);
- the generated arithmetic task (``dataset``, ``dataset_val``, ``eval.examples``) would not have
  to overwrite a file it did not write in ``data_dir`` (checked, nothing written).
"""

from omegaconf import DictConfig, ListConfig, OmegaConf
from torchtune import config

from torchtune_xgb.data.arithmetic import check_split_writable
from torchtune_xgb.errors import ConfigError
from torchtune_xgb.eval.exact_match import NORMALIZERS

_ARITHMETIC = ("torchtune_xgb.data.arithmetic_dataset", "torchtune_xgb.data.arithmetic.arithmetic_dataset")
_ARITHMETIC_EVAL = ("torchtune_xgb.data.load_eval_examples", "torchtune_xgb.data.arithmetic.load_eval_examples")
_JSON_EVAL = ("torchtune_xgb.data.json_eval_examples", "torchtune_xgb.data.json_eval.json_eval_examples")


def validate_eval_config(cfg: DictConfig) -> None:
    """Raise ConfigError (one line, naming the key) on the first problem; writes nothing."""
    normalize = OmegaConf.select(cfg, "eval.normalize")
    if normalize is not None and normalize not in NORMALIZERS:
        raise ConfigError(f"eval.normalize: must be one of {', '.join(sorted(NORMALIZERS))}, got {normalize!r}")
    examples = OmegaConf.select(cfg, "eval.examples")
    if isinstance(examples, DictConfig):
        component = examples.get("_component_")
        if component in _JSON_EVAL:
            config.instantiate(examples)  # reads (only) the user's file: ConfigError names the key
        elif component in _ARITHMETIC_EVAL:
            args = OmegaConf.to_container(examples, resolve=True)
            check_split_writable(args.pop("data_dir", None), args.pop("split", "eval"), **args)
    for key in ("dataset", "dataset_val"):
        block = cfg.get(key)
        for entry in block if isinstance(block, ListConfig) else [block]:
            if isinstance(entry, DictConfig) and entry.get("_component_") in _ARITHMETIC:
                args = OmegaConf.to_container(entry, resolve=True)
                check_split_writable(args.pop("data_dir", None), args.pop("split", "train"), **args)
