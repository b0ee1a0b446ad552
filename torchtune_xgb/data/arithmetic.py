"""The default example task: two-operand integer arithmetic with an exact answer, in chat form.

A sample is one user turn and one assistant turn::

    user:      "What is 47 + 38? Answer with the number only."
    assistant: "85"

Operands have ``digits`` digits (default 2, i.e. 10..99) and the operator is ``+`` or ``-``;
subtraction always puts the larger operand first so that answers are non-negative. A chat model
such as SmolLM2-135M-Instruct answers in the wrong format (it echoes "53 - 16" or starts "To solve
this problem, ..."): 0/100 exact on the default eval split, measured; short fine-tuning teaches
the bare-number format first (25/100 after 20 XGBLoRA steps) and then the arithmetic.

Splits are disjoint by construction: every possible question is assigned to ``"train"`` or
``"eval"`` by a hash of its text (``EVAL_FRACTION`` of them go to eval), independently of the
seed, and each split samples without replacement from its own part. So any train set and any
eval set never share a question, whatever their seeds or sizes.

The files are JSON lines (one object per line, ``.json`` suffix) with a ``messages`` column in
OpenAI chat form and an ``answer`` column, read by torchtune's own ``chat_dataset``.

A file in ``data_dir`` is only ever replaced if this module generated it (recorded with its
sha256 in ``.torchtune_xgb_generated.json`` beside it) or it lies in the cache: pointing
``data_dir`` at a folder holding the user's own ``eval.json`` stops with an error instead of
overwriting it. For evaluation on one's own file see ``json_eval_examples``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import random
from pathlib import Path
from typing import Any, Optional, Sequence

from torchtune_xgb.data.generated_files import MANIFEST, chat_file_dataset, check_overwrite, write_if_changed  # noqa: F401 (MANIFEST)
from torchtune_xgb.models.cache import cache_path

SPLITS = ("train", "eval")
OPS = ("+", "-")
EVAL_FRACTION = 0.1
PROMPT_TEMPLATE = "What is {a} {op} {b}? Answer with the number only."
DEFAULT_N_TRAIN = 2000
DEFAULT_N_EVAL = 100


def _split_of(question: str) -> str:
    """The split that owns ``question``: a fixed hash, so it never depends on seed or sizes."""
    digest = hashlib.sha256(question.encode("utf-8")).digest()
    bucket = int.from_bytes(digest[:8], "big") / 2**64
    return "eval" if bucket < EVAL_FRACTION else "train"


@functools.lru_cache(maxsize=8)
def _candidates(split: str, ops: tuple[str, ...], digits: int) -> tuple[tuple[int, str, int], ...]:
    """Every ``(a, op, b)`` that belongs to ``split``, in a fixed order (cached: ~0.1 s to build)."""
    lo, hi = 10 ** (digits - 1), 10**digits - 1
    if digits == 1:
        lo = 0  # one-digit operands include 0
    out = []
    for op in ops:
        for a in range(lo, hi + 1):
            for b in range(lo, hi + 1):
                if op == "-" and b > a:
                    continue  # keep answers non-negative
                if _split_of(PROMPT_TEMPLATE.format(a=a, op=op, b=b)) == split:
                    out.append((a, op, b))
    return tuple(out)


def make_arithmetic_examples(
    n: int,
    seed: int = 0,
    split: str = "train",
    *,
    ops: Sequence[str] = OPS,
    digits: int = 2,
) -> list[dict[str, Any]]:
    """Generate ``n`` distinct examples of ``split`` deterministically.

    Args:
        n: number of examples; at most the number of questions owned by the split.
        seed: sampling seed, mixed with ``split`` (same arguments -> same list, in the same order).
        split: ``"train"`` or ``"eval"``; the two never share a question (see module docstring).
        ops: operators to draw from, a subset of ``("+", "-")``.
        digits: digits per operand (2 -> operands 10..99); every pair is enumerated, so keep it <= 3.

    Returns:
        A list of dicts ``{"question": str, "answer": str, "messages": [user, assistant]}`` where
        each message is ``{"role": ..., "content": ...}`` and the assistant content is the answer.
        The list for a smaller ``n`` is a prefix of the list for a larger one.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    bad_ops = [op for op in ops if op not in OPS]
    if bad_ops or not ops:
        raise ValueError(f"ops must be a non-empty subset of {OPS}, got {list(ops)!r}")
    if digits < 1:
        raise ValueError(f"digits must be >= 1, got {digits}")
    pool = _candidates(split, tuple(ops), digits)
    if not 0 <= n <= len(pool):
        raise ValueError(
            f"n={n} is outside [0, {len(pool)}], the {split} split's size for {digits}-digit {list(ops)}"
        )
    # A string seed goes through SHA-512 in random.Random, so it is stable across runs and
    # PYTHONHASHSEED; mixing in the split keeps train and eval draws independent. Shuffling the
    # whole pool and taking a prefix (rather than rng.sample, whose algorithm depends on n)
    # makes a smaller n a prefix of a larger one, so changing n_eval only truncates the set.
    rng = random.Random(f"arithmetic:{seed}:{split}")
    order = list(pool)
    rng.shuffle(order)
    examples = []
    for a, op, b in order[:n]:
        question = PROMPT_TEMPLATE.format(a=a, op=op, b=b)
        answer = str(a + b if op == "+" else a - b)
        examples.append(
            {
                "question": question,
                "answer": answer,
                "messages": [
                    {"role": "user", "content": question},
                    {"role": "assistant", "content": answer},
                ],
            }
        )
    return examples


def _out_dir(out_dir: Optional[str | os.PathLike]) -> Path:
    out = Path(out_dir).expanduser().resolve() if out_dir is not None else cache_path("arithmetic")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _split_text(split: str, n: int, seed: int) -> str:
    rows = make_arithmetic_examples(n, seed=seed, split=split)
    return "".join(json.dumps({"messages": r["messages"], "answer": r["answer"]}) + "\n" for r in rows)


def _write_split(out: Path, split: str, n: int, seed: int) -> Path:
    """Write one split's file (only if its content changed) and return its path."""
    path = out / f"{split}.json"
    write_if_changed(path, _split_text(split, n, seed))
    return path


def check_split_writable(
    data_dir: Optional[str | os.PathLike], split: str, n_train: int = DEFAULT_N_TRAIN,
    n_eval: int = DEFAULT_N_EVAL, seed: int = 0, **_: Any,
) -> None:
    """Raise ConfigError now if generating ``split`` would have to overwrite a file this module did
    not write (the config check calls this before any weights load; nothing is written)."""
    if data_dir is None or split not in SPLITS:
        return
    path = Path(data_dir).expanduser().resolve() / f"{split}.json"
    check_overwrite(path, _split_text(split, n_train if split == "train" else n_eval, seed))


def write_arithmetic_dataset(
    out_dir: Optional[str | os.PathLike] = None,
    n_train: int = DEFAULT_N_TRAIN,
    n_eval: int = DEFAULT_N_EVAL,
    seed: int = 0,
) -> dict[str, Path]:
    """Write ``train.json`` and ``eval.json`` (JSON lines) under ``out_dir``.

    Each line is ``{"messages": [{"role": "user", ...}, {"role": "assistant", ...}], "answer": ...}``.
    Idempotent: a file whose content is already right is not rewritten (its mtime is kept).

    Args:
        out_dir: target folder, created if missing; default ``cache_path("arithmetic")``.
        n_train, n_eval: examples per split.
        seed: generation seed (see :func:`make_arithmetic_examples`).

    Returns:
        ``{"train": Path, "eval": Path}``, absolute paths of the two files.
    """
    out = _out_dir(out_dir)
    return {
        "train": _write_split(out, "train", n_train, seed),
        "eval": _write_split(out, "eval", n_eval, seed),
    }


def arithmetic_dataset(
    tokenizer,
    split: str = "train",
    n_train: int = DEFAULT_N_TRAIN,
    n_eval: int = DEFAULT_N_EVAL,
    seed: int = 0,
    data_dir: Optional[str | os.PathLike] = None,
    train_on_input: bool = False,
    packed: bool = False,
    **load_dataset_kwargs: Any,
):
    """torchtune dataset builder for the arithmetic task.

    Usable in YAML as ``_component_: torchtune_xgb.data.arithmetic_dataset``.

    Writes the split's file if needed (see :func:`write_arithmetic_dataset`; only that split's
    file, so a train builder and an eval loader with other sizes never rewrite each other's), then
    returns torchtune's ``chat_dataset`` over that local JSON file; no network is used.

    Args:
        tokenizer: a torchtune ``ModelTokenizer`` (applied to every sample).
        split: ``"train"`` or ``"eval"`` (which file to read).
        n_train, n_eval, seed, data_dir: as in :func:`write_arithmetic_dataset` (only the size of
            ``split`` is used).
        train_on_input: also compute the loss on the user turn (default: answer only).
        packed: pack samples to ``tokenizer.max_seq_len`` (torchtune ``PackedDataset``).
        **load_dataset_kwargs: extra arguments for ``datasets.load_dataset`` (e.g. ``cache_dir``).

    Returns:
        A torchtune ``SFTDataset`` (or ``PackedDataset`` if ``packed``) whose items hold
        ``tokens`` and ``labels``.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    path = _write_split(_out_dir(data_dir), split, n_train if split == "train" else n_eval, seed)
    return chat_file_dataset(tokenizer, path, train_on_input=train_on_input, packed=packed, **load_dataset_kwargs)


def load_eval_examples(
    split: str = "eval",
    n_train: int = DEFAULT_N_TRAIN,
    n_eval: int = DEFAULT_N_EVAL,
    seed: int = 0,
    data_dir: Optional[str | os.PathLike] = None,
) -> list[dict[str, Any]]:
    """Read a split's file (writing it if needed) as prompts with reference answers.

    Reading the file rather than regenerating keeps evaluation on exactly what was written.
    Arguments are as in :func:`write_arithmetic_dataset`; only the size of ``split`` is used.

    Returns:
        A list of ``{"prompt_messages": [{"role": "user", "content": ...}], "answer": str}``:
        every message except the final assistant turn, whose content is the answer.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    path = _write_split(_out_dir(data_dir), split, n_train if split == "train" else n_eval, seed)
    examples = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            row = json.loads(line)
            messages = row["messages"]
            if not messages or messages[-1]["role"] != "assistant":
                raise ValueError(f"{path}: a row does not end with an assistant message")
            examples.append({"prompt_messages": messages[:-1], "answer": messages[-1]["content"]})
    return examples
