"""torchtune_xgb: XGBLoRA (boosted rank-1 LoRA) and LoRA-XS for torchtune.

The names a config's ``_component_`` or a user's code refers to are importable from here, e.g.
``torchtune_xgb.lora_smollm2_135m``, ``torchtune_xgb.arithmetic_dataset``,
``from torchtune_xgb import XGBLoRALinear``. They load on first use: ``import torchtune_xgb``
alone does not import torch or torchtune (the ``tune-xgb`` command stays quick).

Where things live (docs/contributing/architecture.md): ``method/`` the two methods and the exact
merged state, ``config/`` the config blocks and their checks, ``run/`` the training loop and run
safety, ``export/`` the merged checkpoint and adapter, ``eval/`` evaluation, ``data/`` datasets,
``models/`` model builders and preparation, ``quant/`` NF4, ``distributed/`` FSDP2 sharding.
"""

from importlib import import_module
from typing import Any, Dict

# public name -> module that defines it
_PUBLIC: Dict[str, str] = {
    # the methods
    "XGBLoRALinear": "torchtune_xgb.method.xgblora",
    "LoRAXSLinear": "torchtune_xgb.method.loraxs",
    "Booster": "torchtune_xgb.method.boosting",
    "MergedState": "torchtune_xgb.method.merged_state",
    "BoostConfig": "torchtune_xgb.config.boost_config",
    "AdapterConfig": "torchtune_xgb.config.boost_config",
    # model builders and tokenizers
    "smollm2_135m": "torchtune_xgb.models.smollm2",
    "lora_smollm2_135m": "torchtune_xgb.models.smollm2",
    "chatml_tokenizer": "torchtune_xgb.models.chatml",
    "smollm2_tokenizer": "torchtune_xgb.models.chatml",
    "prepare_model": "torchtune_xgb.models.prepare",
    # datasets and evaluation examples
    "arithmetic_dataset": "torchtune_xgb.data.arithmetic",
    "load_eval_examples": "torchtune_xgb.data.arithmetic",
    "task_dataset": "torchtune_xgb.data.tasks",
    "load_task_eval_examples": "torchtune_xgb.data.tasks",
    "json_eval_examples": "torchtune_xgb.data.json_eval",
    "exact_match": "torchtune_xgb.eval.exact_match",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'torchtune_xgb' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))
