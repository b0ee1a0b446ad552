"""Datasets for the plugin's example tasks (usable as torchtune ``_component_`` builders)."""

from torchtune_xgb.data.json_eval import json_eval_examples  # noqa: F401  (eval on the user's file)
from torchtune_xgb.data.arithmetic import (
    arithmetic_dataset,
    load_eval_examples,
    make_arithmetic_examples,
    write_arithmetic_dataset,
)

__all__ = [
    "arithmetic_dataset",
    "load_eval_examples",
    "make_arithmetic_examples",
    "write_arithmetic_dataset",
]
