"""Each ``_component_`` block's keys against its builder's signature, before any weights load.

torchtune builds the optimizer, the dataset and the evaluation examples only after the model's
weights are loaded, so a misspelt key (``optimizer.betas2``) or a key left behind when an
override swaps the builder (``eval.examples._component_=…json_eval_examples`` keeps the packaged
``split:``) used to end minutes into a large run with a TypeError traceback. Here: one line
naming the key and the builder, with the closest argument name when there is one.

Only what the signature can say is checked: a builder that takes ``**kwargs`` accepts any key,
and arguments the recipe passes itself (the tokenizer to a dataset, the parameters to the
optimizer) must not be set in the config.
"""

import difflib
import inspect
from typing import Any, Callable, Dict, Iterator, Tuple

from omegaconf import DictConfig, ListConfig, OmegaConf
from torchtune.config._utils import _get_component_from_path

from torchtune_xgb.errors import ConfigError

# block → how many leading positional arguments the recipe passes to its builder
BLOCKS: Dict[str, int] = {
    "model": 0,
    "tokenizer": 0,
    "checkpointer": 0,
    "dataset": 1,  # the tokenizer
    "dataset_val": 1,
    "optimizer": 1,  # the parameters
    "lr_scheduler": 1,  # the optimizer
    "loss": 0,
    "metric_logger": 0,
    "eval.examples": 0,
}


def _entries(cfg: DictConfig) -> Iterator[Tuple[str, DictConfig, int]]:
    for key, positional in BLOCKS.items():
        block = OmegaConf.select(cfg, key)
        if isinstance(block, ListConfig):  # torchtune's list of datasets
            for i, entry in enumerate(block):
                if isinstance(entry, DictConfig) and "_component_" in entry:
                    yield f"{key}[{i}]", entry, positional
        elif isinstance(block, DictConfig) and "_component_" in block:
            yield key, block, positional


def _builder(where: str, path: Any) -> Callable:
    try:
        return _get_component_from_path(str(path))
    except Exception as err:  # torchtune raises InstantiationError with a multi-line message
        raise ConfigError(f"{where}._component_: cannot import {path!r} ({' '.join(str(err).split())})") from None


def check_component_args(cfg: DictConfig) -> None:
    """Raise a one-line ConfigError for the first key a block's builder does not accept."""
    for where, block, positional in _entries(cfg):
        builder = _builder(where, block._component_)
        try:
            params = list(inspect.signature(builder).parameters.values())
        except (TypeError, ValueError):  # no signature to check against (some builtins)
            continue
        if any(p.kind is p.VAR_KEYWORD for p in params):
            continue
        name = getattr(builder, "__qualname__", getattr(builder, "__name__", str(block._component_)))
        passed = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)][:positional]
        by_keyword = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        for key in block:
            if key == "_component_":
                continue
            if key in passed:
                raise ConfigError(f"{where}.{key}: the recipe passes {name}() its {key!r} itself; remove the key")
            if key not in by_keyword:
                takes = sorted(by_keyword - set(passed))
                close = difflib.get_close_matches(str(key), takes, n=1)
                hint = (f"did you mean {close[0]}?" if close else
                        f"it takes {', '.join(takes) or 'no keys'}; if the config file set it for a builder "
                        f"an override replaced, remove it with ~{where}.{key}")
                raise ConfigError(f"{where}.{key}: {name}() has no argument {key!r} ({hint})")
