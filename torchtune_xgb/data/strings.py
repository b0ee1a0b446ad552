"""Task family ``strings``: reverse a made-up word, or write it in capital letters.

    user:      'Reverse the letters of the word "kelomu". Answer with the reversed word only.'
    assistant: "umolek"
    user:      'Write the word "kelomu" in capital letters. Answer with the word only.'
    assistant: "KELOMU"

Words are made-up consonant-vowel words of 2-3 syllables (4,900 + 343,000 possible), so the
model cannot have memorised them; the split key is the question (operation + word).
"""

from __future__ import annotations

import random

from torchtune_xgb.data.task_splits import QA, endless, family_rng, pseudo_word, take_distinct

NAME = "strings"
TEMPLATES = {
    "reverse": 'Reverse the letters of the word "{w}". Answer with the reversed word only.',
    "upper": 'Write the word "{w}" in capital letters. Answer with the word only.',
}
ANSWERS = {"reverse": lambda w: w[::-1], "upper": lambda w: w.upper()}


def _candidate(rng: random.Random):
    op = rng.choice(sorted(TEMPLATES))
    word = pseudo_word(rng)
    question = TEMPLATES[op].format(w=word)
    return question, (question, ANSWERS[op](word))


def generate(split: str, n: int, seed: int = 0) -> list[QA]:
    """``n`` distinct ``(question, answer)`` pairs of ``split`` (see module docstring)."""
    return take_distinct(NAME, split, n, endless(_candidate, family_rng(NAME, seed, split)), max_tries=50 * n + 100)
