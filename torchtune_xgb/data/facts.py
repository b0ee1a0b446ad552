"""Task family ``facts``: recall facts about made-up people from a fixed generated table.

The table (fixed: it does not depend on the sampling seed) gives each of 30 made-up people a home
city (one of 10 made-up cities), a favourite colour (one of 8) and a birth year (1950-1999): 90
facts no pretrained model knows. Each attribute is asked with six phrasings::

    user:      "Where does Fulisaro live? Answer with the city only."      (a training phrasing)
    user:      "Name the city where Fulisaro lives. Answer with the city only."  (the test phrasing)
    assistant: "Midozo"

**What held-out means here.** A fact that never appears in training cannot be recalled, so the
held-out unit is the *question wording*, not the fact: the training split asks every fact with
four phrasings per attribute; the validation split asks every fact with a fifth phrasing and the
test split with a sixth, neither ever seen in training. A test item is therefore answerable only
by a model that stored the fact itself (not just the training string) and retrieves it from a new
question. Chance level is 1/10 (city), 1/8 (colour), 1/50 (year). The split is by phrasing (a
fixed role per template), so no test question string occurs in training, by construction.

The training split has 360 distinct questions; a larger ``n`` repeats them in further passes,
each pass in its own seeded order (like more epochs); val and test hold 90 questions each.
"""

from __future__ import annotations

import random
from typing import Dict, List

from torchtune_xgb.data.task_splits import QA, SYLLABLES, check_split, family_rng

NAME = "facts"
TABLE_SEED = "facts:table:v1"
N_PEOPLE = 30
COLOURS = ("red", "blue", "green", "yellow", "purple", "orange", "white", "black")
YEARS = tuple(range(1950, 2000))
N_CITIES = 10

# attribute → six phrasings: [0:4] train, [4] val, [5] test
PHRASINGS: Dict[str, List[str]] = {
    "city": [
        "Where does {p} live? Answer with the city only.",
        "In which city does {p} live? Answer with the city only.",
        "{p} lives in which city? Answer with the city only.",
        "What is the home city of {p}? Answer with the city only.",
        "Which city is home to {p}? Answer with the city only.",
        "Name the city where {p} lives. Answer with the city only.",
    ],
    "colour": [
        "What is the favourite colour of {p}? Answer with the colour only.",
        "Which colour does {p} like best? Answer with the colour only.",
        "{p} likes which colour best? Answer with the colour only.",
        "What colour does {p} prefer? Answer with the colour only.",
        "Which colour is the favourite of {p}? Answer with the colour only.",
        "Name the favourite colour of {p}. Answer with the colour only.",
    ],
    "year": [
        "In what year was {p} born? Answer with the year only.",
        "What is the birth year of {p}? Answer with the year only.",
        "{p} was born in which year? Answer with the year only.",
        "When was {p} born? Answer with the year only.",
        "Which year was {p} born in? Answer with the year only.",
        "Name the year in which {p} was born. Answer with the year only.",
    ],
}
ROLE_TEMPLATES = {"train": slice(0, 4), "val": slice(4, 5), "test": slice(5, 6)}


def _names(rng: random.Random, count: int, syllables: int, taken: set) -> List[str]:
    names: List[str] = []
    while len(names) < count:
        name = "".join(rng.choice(SYLLABLES) for _ in range(syllables)).capitalize()
        if name not in taken:
            taken.add(name)
            names.append(name)
    return names


def table() -> Dict[str, Dict[str, str]]:
    """``{person: {"city", "colour", "year"}}``: the fixed fact table (same on every call)."""
    rng = random.Random(TABLE_SEED)
    taken: set = set()
    cities = _names(rng, N_CITIES, 3, taken)
    people = _names(rng, N_PEOPLE, 4, taken)
    return {
        p: {"city": rng.choice(cities), "colour": rng.choice(COLOURS), "year": str(rng.choice(YEARS))}
        for p in people
    }


def questions(split: str) -> List[QA]:
    """Every distinct ``(question, answer)`` of ``split``, in table order."""
    check_split(split)
    out = []
    for person, facts in table().items():
        for attribute, templates in PHRASINGS.items():
            for template in templates[ROLE_TEMPLATES[split]]:
                out.append((template.format(p=person), facts[attribute]))
    return out


def generate(split: str, n: int, seed: int = 0) -> list[QA]:
    """``n`` ``(question, answer)`` pairs of ``split`` (train: repeated passes beyond 360)."""
    pool = questions(split)
    if n < 0 or (split != "train" and n > len(pool)):
        raise ValueError(f"{NAME}: n={n} is outside [0, {len(pool)}], the size of the {split} split")
    out: list[QA] = []
    passes = 0
    while len(out) < n:
        order = list(pool)
        family_rng(NAME, seed, split, f":pass{passes}").shuffle(order)
        out.extend(order[: n - len(out)])
        passes += 1
    return out
