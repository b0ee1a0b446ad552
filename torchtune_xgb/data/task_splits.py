"""What every generated task family shares: hash splits, distinct sampling, chat rows, pseudo-words.

Splits: a question belongs to ``train``, ``val`` or ``test`` by a SHA-256 hash of its *split key*
(the question text, or a canonical form of it when several questions ask the same thing), salted
with the family's name. The assignment never depends on the seed or the sizes, so any train set
and any val/test set of a family are disjoint, whatever their seeds and sizes.

Sampling: a family yields candidates from a seeded stream (``random.Random("family:seed:split")``:
string seeds go through SHA-512, so the stream is stable across runs and ``PYTHONHASHSEED``); the
first ``n`` distinct candidates owned by the split are kept. A smaller ``n`` is therefore a prefix
of a larger one, as in the arithmetic task.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any, Callable, Iterable, Iterator, Sequence, Tuple

SPLITS = ("train", "val", "test")
VAL_FRACTION = 0.1
TEST_FRACTION = 0.1

QA = Tuple[str, str]  # (question, exact answer)


def split_of(family: str, key: str) -> str:
    """The split that owns split key ``key`` of ``family`` (fixed: no seed, no sizes)."""
    digest = hashlib.sha256(f"{family}:{key}".encode("utf-8")).digest()
    bucket = int.from_bytes(digest[:8], "big") / 2**64
    if bucket < TEST_FRACTION:
        return "test"
    if bucket < TEST_FRACTION + VAL_FRACTION:
        return "val"
    return "train"


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def family_rng(family: str, seed: int, split: str, extra: str = "") -> random.Random:
    return random.Random(f"{family}:{seed}:{split}{extra}")


def take_distinct(
    family: str,
    split: str,
    n: int,
    candidates: Iterable[Tuple[str, QA]],
    max_tries: int,
) -> list[QA]:
    """The first ``n`` distinct ``(question, answer)`` whose split key belongs to ``split``.

    Args:
        candidates: ``(split_key, (question, answer))`` pairs from a seeded stream.
        max_tries: candidates to draw before giving up (a clear error instead of an endless loop
            when ``n`` exceeds what the split can hold).
    """
    check_split(split)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    out: list[QA] = []
    seen: set[str] = set()
    tries = 0
    for key, qa in candidates:
        if len(out) == n:
            break
        tries += 1
        if tries > max_tries:
            raise ValueError(f"{family}: could not draw {n} distinct {split} questions (got {len(out)})")
        if qa[0] in seen or split_of(family, key) != split:
            continue
        seen.add(qa[0])
        out.append(qa)
    if len(out) < n:
        raise ValueError(f"{family}: the {split} split holds only {len(out)} questions, asked for {n}")
    return out


def chat_row(question: str, answer: str) -> dict[str, Any]:
    """``{"question", "answer", "messages"}``: one user turn, one assistant turn (OpenAI chat form)."""
    return {
        "question": question,
        "answer": answer,
        "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
    }


# --- pseudo-words ---------------------------------------------------------------------------
# Consonant-vowel syllables: pronounceable made-up words ("kelomu") that no pretrained model
# knows, generated in code so that nothing is downloaded or shipped.
CONSONANTS = "bdfgklmnprstvz"
VOWELS = "aeiou"
SYLLABLES = tuple(c + v for c in CONSONANTS for v in VOWELS)


def pseudo_word(rng: random.Random, syllables: Sequence[int] = (2, 3)) -> str:
    """A lower-case made-up word of ``rng.choice(syllables)`` consonant-vowel syllables."""
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.choice(tuple(syllables))))


def endless(make: Callable[[random.Random], Tuple[str, QA]], rng: random.Random) -> Iterator[Tuple[str, QA]]:
    """``make(rng)`` forever: the candidate stream of a family."""
    while True:
        yield make(rng)
