"""Datasets for the plugin's example tasks (usable as torchtune ``_component_`` builders)."""

from torchtune_xgb.data.json_eval import json_eval_examples  # noqa: F401  (eval on the user's file)
from torchtune_xgb.data.arithmetic import (
    arithmetic_dataset,
    load_eval_examples,
    make_arithmetic_examples,
    write_arithmetic_dataset,
)
from torchtune_xgb.data.tasks import TASKS, load_task_eval_examples, make_task_examples, task_dataset

__all__ = [
    "TASKS",
    "load_task_eval_examples",
    "make_task_examples",
    "task_dataset",
    "arithmetic_dataset",
    "load_eval_examples",
    "make_arithmetic_examples",
    "write_arithmetic_dataset",
]
