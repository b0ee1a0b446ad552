"""Task families selectable by name, as torchtune dataset builders and eval-example loaders.

    dataset:
      _component_: torchtune_xgb.data.task_dataset
      task: strings            # arithmetic | strings | ordering | dates | facts (| arithmetic_fresh)
      split: train
    eval:
      examples:
        _component_: torchtune_xgb.data.load_task_eval_examples
        task: strings
        split: test            # train | val | test

Every family is generated in code (no network), deterministic for a given ``seed``, with exact
answers and disjoint ``train`` / ``val`` / ``test`` splits (see each family's module:
``arithmetic``, ``strings``, ``ordering``, ``dates``, ``facts``). Rows are written as JSON lines
``{"messages": [user, assistant], "answer": ...}`` under ``cache_path("tasks")/TASK/`` (one file
per split, size and seed) and read back by torchtune's own ``chat_dataset``.

A generated file is only ever replaced when the generator wrote it (the arithmetic task's rule and
manifest: a file outside the cache that matches neither the new rows nor the manifest's SHA-256,
someone else's file, stops the run with a ConfigError).

``arithmetic`` is the demo's task unchanged: its ``test`` split is its ``eval`` split (same
questions, same order); its ``val`` split comes from the same held-out pool, taken from the other
end of the same seeded order (each of val and test may use up to half of that pool, so they never
meet), so adding it changed neither the train nor the eval files.

``arithmetic_fresh`` is ``arithmetic`` with a test split no one has scored: its train and val
splits are arithmetic's, its test split is drawn from the part of the held-out pool that neither
the demo's 100 test questions nor any val split (seed 0) touch. The demo's test split was looked at
while the packaged defaults were chosen, so it can no longer tell how well they generalise. It is
a variant, not a family of its own: ``TASKS`` ("all" in the benchmark) leaves it out.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from torchtune_xgb.data import dates, facts, ordering, strings
from torchtune_xgb.data.generated_files import chat_file_dataset, write_if_changed
from torchtune_xgb.data.task_splits import QA, SPLITS, chat_row
from torchtune_xgb.errors import ConfigError
from torchtune_xgb.models.cache import cache_path



@dataclass(frozen=True)
class TaskFamily:
    """One generated task family.

    Args:
        name: what ``task=`` selects.
        generate: ``(split, n, seed) → [(question, answer), …]``, deterministic.
        sizes: default ``n`` per split.
        max_new_tokens: enough greedy tokens for every answer with the SmolLM2 tokenizer.
        arithmetic: whether the family is arithmetic (the benchmark reports it).
        variant_of: the family whose questions this one re-splits (not counted in ``TASKS``).
    """

    name: str
    generate: Callable[[str, int, int], List[QA]]
    sizes: Dict[str, int]
    max_new_tokens: int
    arithmetic: bool = False
    variant_of: Optional[str] = None


# --- arithmetic, with a val split added without touching its train/eval files ----------------
def _arithmetic_generate(split: str, n: int, seed: int = 0) -> List[QA]:
    from torchtune_xgb.data.arithmetic import OPS, _candidates, make_arithmetic_examples

    if split == "train":
        rows = make_arithmetic_examples(n, seed=seed, split="train")
    else:
        half = len(_candidates("eval", OPS, 2)) // 2
        if not 0 <= n <= half:
            raise ValueError(f"arithmetic: n={n} is outside [0, {half}] for the {split} split (half the held-out pool)")
        if split == "test":  # the demo's eval split, exactly
            rows = make_arithmetic_examples(n, seed=seed, split="eval")
        else:  # val: the same seeded order read from the other end
            rows = make_arithmetic_examples(2 * half, seed=seed, split="eval")[::-1][:n]
    return [(r["question"], r["answer"]) for r in rows]


def _arithmetic_fresh_generate(split: str, n: int, seed: int = 0) -> List[QA]:
    """``arithmetic_fresh``: arithmetic's train and val; a test split disjoint from the demo's.

    The test questions come from the first half of the held-out pool in seed 0's order (val, of
    any size up to half the pool, reads the other half from the end), after the demo's
    ``DEFAULT_N_EVAL`` test questions; ``seed`` shuffles that remainder and ``n`` takes a prefix.
    """
    from torchtune_xgb.data.arithmetic import DEFAULT_N_EVAL, OPS, _candidates, make_arithmetic_examples

    if split != "test":
        return _arithmetic_generate(split, n, seed)
    half = len(_candidates("eval", OPS, 2)) // 2
    unused = make_arithmetic_examples(half, seed=0, split="eval")[DEFAULT_N_EVAL:]
    if not 0 <= n <= len(unused):
        raise ValueError(f"arithmetic_fresh: n={n} is outside [0, {len(unused)}] for the test split "
                         "(the held-out questions no other split uses)")
    random.Random(f"arithmetic_fresh:{seed}:test").shuffle(unused)
    return [(r["question"], r["answer"]) for r in unused[:n]]


STANDARD_SIZES = {"train": 2000, "val": 100, "test": 100}
FAMILIES: Dict[str, TaskFamily] = {
    f.name: f
    for f in (
        TaskFamily("arithmetic", _arithmetic_generate, STANDARD_SIZES, max_new_tokens=6, arithmetic=True),
        TaskFamily("strings", strings.generate, STANDARD_SIZES, max_new_tokens=8),
        TaskFamily("ordering", ordering.generate, STANDARD_SIZES, max_new_tokens=18),
        TaskFamily("dates", dates.generate, STANDARD_SIZES, max_new_tokens=12),
        TaskFamily("facts", facts.generate, {"train": 2000, "val": 90, "test": 90}, max_new_tokens=6),
        TaskFamily("arithmetic_fresh", _arithmetic_fresh_generate, STANDARD_SIZES, max_new_tokens=6, arithmetic=True,
                   variant_of="arithmetic"),
    )
}
TASKS = tuple(name for name, fam in FAMILIES.items() if fam.variant_of is None)  # the distinct families


def family(task: str) -> TaskFamily:
    """The family named ``task``; ConfigError naming the choices otherwise."""
    if task not in FAMILIES:
        raise ConfigError(f"task: unknown task {task!r}; choose one of {', '.join(FAMILIES)}")
    return FAMILIES[task]


def _check(task: str, split: str, n: Optional[int]) -> tuple[TaskFamily, int]:
    fam = family(task)
    if split not in SPLITS:
        raise ConfigError(f"split: must be one of {', '.join(SPLITS)}, got {split!r}")
    n = fam.sizes[split] if n is None else n
    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"n: must be an integer >= 1, got {n!r}")
    return fam, n


def make_task_examples(task: str, split: str = "train", n: Optional[int] = None, seed: int = 0) -> List[Dict[str, Any]]:
    """``n`` rows ``{"question", "answer", "messages"}`` of ``task``'s ``split`` (default size if None)."""
    fam, n = _check(task, split, n)
    return [chat_row(q, a) for q, a in fam.generate(split, n, seed)]


# --- files ----------------------------------------------------------------------------------
def write_generated(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` unless it is already there; never replace a file we did not write.

    The same rule and manifest as the arithmetic task's files (``generated_files.write_if_changed``):
    the folder's manifest records the SHA-256 of each file generated there; an existing file is
    replaced only when it is one of those (from another generator version), any other existing
    file outside the cache raises ConfigError naming it. Writes are atomic (temp file + rename).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    write_if_changed(path, text)
    return path


def task_file(task: str, split: str = "train", n: Optional[int] = None, seed: int = 0,
              data_dir: Optional[str | os.PathLike] = None) -> Path:
    """The JSON-lines file of ``task``/``split`` (written if needed): ``DATA_DIR/TASK/SPLIT-nN-seedS.json``."""
    fam, n = _check(task, split, n)
    rows = make_task_examples(task, split, n, seed)
    text = "".join(json.dumps({"messages": r["messages"], "answer": r["answer"]}) + "\n" for r in rows)
    root = Path(data_dir).expanduser().resolve() if data_dir is not None else cache_path("tasks")
    return write_generated(root / fam.name / f"{split}-n{n}-seed{seed}.json", text)


# --- torchtune builders ---------------------------------------------------------------------
def task_dataset(
    tokenizer,
    task: str = "arithmetic",
    split: str = "train",
    n: Optional[int] = None,
    seed: int = 0,
    data_dir: Optional[str | os.PathLike] = None,
    train_on_input: bool = False,
    packed: bool = False,
    **load_dataset_kwargs: Any,
):
    """torchtune dataset builder for a task family (``_component_: torchtune_xgb.data.task_dataset``).

    Args:
        tokenizer: a torchtune ``ModelTokenizer``.
        task: a name in ``TASKS`` or the variant ``arithmetic_fresh``; split: ``train``, ``val``, ``test``.
        n: examples (default: the family's size for the split); seed: sampling seed.
        data_dir: where the files go (default ``cache_path("tasks")``).
        train_on_input, packed, **load_dataset_kwargs: as torchtune's ``chat_dataset``.

    Returns:
        torchtune's ``chat_dataset`` over the generated local JSON file (items with ``tokens``
        and ``labels``; the loss is on the answer only unless ``train_on_input``).
    """
    path = task_file(task, split, n, seed, data_dir)
    return chat_file_dataset(tokenizer, path, train_on_input=train_on_input, packed=packed, **load_dataset_kwargs)


def load_task_eval_examples(
    task: str = "arithmetic",
    split: str = "test",
    n: Optional[int] = None,
    seed: int = 0,
    data_dir: Optional[str | os.PathLike] = None,
) -> List[Dict[str, Any]]:
    """Prompts with reference answers of a task's split, read from its file (written if needed).

    Returns:
        ``[{"prompt_messages": [{"role": "user", "content": ...}], "answer": str}, …]``, the
        format ``torchtune_xgb.eval.exact_match.exact_match`` and the recipe's ``eval:`` block take.
    """
    path = task_file(task, split, n, seed, data_dir)
    examples = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                messages = json.loads(line)["messages"]
                examples.append({"prompt_messages": messages[:-1], "answer": messages[-1]["content"]})
    return examples
