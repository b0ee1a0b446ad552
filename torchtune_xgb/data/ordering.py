"""Task family ``ordering``: sort four made-up words alphabetically.

    user:      "Sort these words alphabetically: tamo, bedi, kulo, fesa. Answer with the words
                separated by commas."
    assistant: "bedi, fesa, kulo, tamo"

Words are two-syllable made-up words (4,900 possible), four distinct per question. The split key
is the *set* of words (sorted), so every shuffled listing of the same four words falls in the same
split: a test question never asks to sort a set that training already sorted.
"""

from __future__ import annotations

import random

from torchtune_xgb.data.task_splits import QA, endless, family_rng, pseudo_word, take_distinct

NAME = "ordering"
WORDS_PER_QUESTION = 4
TEMPLATE = "Sort these words alphabetically: {words}. Answer with the words separated by commas."


def _candidate(rng: random.Random):
    words: list[str] = []
    while len(words) < WORDS_PER_QUESTION:
        word = pseudo_word(rng, syllables=(2,))
        if word not in words:
            words.append(word)
    answer = ", ".join(sorted(words))
    return answer, (TEMPLATE.format(words=", ".join(words)), answer)


def generate(split: str, n: int, seed: int = 0) -> list[QA]:
    """``n`` distinct ``(question, answer)`` pairs of ``split`` (see module docstring)."""
    return take_distinct(NAME, split, n, endless(_candidate, family_rng(NAME, seed, split)), max_tries=50 * n + 100)
