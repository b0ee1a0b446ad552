"""Task family ``dates``: convert a date between written formats.

    user:      "Convert the date 2023-07-14 to DD/MM/YYYY. Answer with the date only."
    assistant: "14/07/2023"
    user:      "Convert the date 14 July 2023 to YYYY-MM-DD. Answer with the date only."
    assistant: "2023-07-14"

Dates are drawn uniformly from 1900-01-01 … 2099-12-31 (73,049 days × 2 directions); the split
key is the question. Format conversion, not arithmetic: the answer only rearranges (and for month
names, looks up) what the question says.
"""

from __future__ import annotations

import datetime
import random

from torchtune_xgb.data.task_splits import QA, endless, family_rng, take_distinct

NAME = "dates"
FIRST = datetime.date(1900, 1, 1)
DAYS = (datetime.date(2099, 12, 31) - FIRST).days + 1
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December")
TEMPLATE = "Convert the date {source} to {target}. Answer with the date only."


def iso(d: datetime.date) -> str:
    return f"{d.year:04d}-{d.month:02d}-{d.day:02d}"


def dmy_slash(d: datetime.date) -> str:
    return f"{d.day:02d}/{d.month:02d}/{d.year:04d}"


def written(d: datetime.date) -> str:
    return f"{d.day} {MONTHS[d.month - 1]} {d.year}"


# direction → (format of the question's date, name of the target format, format of the answer)
DIRECTIONS = {
    "iso_to_dmy": (iso, "DD/MM/YYYY", dmy_slash),
    "written_to_iso": (written, "YYYY-MM-DD", iso),
}


def _candidate(rng: random.Random):
    source, target, answer = DIRECTIONS[rng.choice(sorted(DIRECTIONS))]
    day = FIRST + datetime.timedelta(days=rng.randrange(DAYS))
    question = TEMPLATE.format(source=source(day), target=target)
    return question, (question, answer(day))


def generate(split: str, n: int, seed: int = 0) -> list[QA]:
    """``n`` distinct ``(question, answer)`` pairs of ``split`` (see module docstring)."""
    return take_distinct(NAME, split, n, endless(_candidate, family_rng(NAME, seed, split)), max_tries=50 * n + 100)
