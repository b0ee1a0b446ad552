"""How predictions and answers are compared in exact-match evaluation (``eval.normalize``).

Both go through the same normaliser, then ``==``:

- ``strip`` (default): surrounding whitespace removed. Deliberately strict otherwise: ``"85."``
  or ``"The answer is 85"`` do not match ``"85"``, because producing the requested bare format is
  part of what the example task measures (and what fine-tuning teaches);
- ``none``: the decoded text as is; ``lower``: stripped and case-folded;
- ``number``: the first number in the text (sign, digits, decimal point; thousands commas
  dropped), as a canonical decimal (``"85.0"``, ``"The answer is 85."`` → ``"85"``); text without
  a number compares stripped.
"""

import re
from decimal import Decimal, InvalidOperation

# a sign, digits (thousands commas only in groups of three), an optional decimal part
_NUMBER = re.compile(r"[-+]?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|\.\d+)")


def _first_number(text: str) -> str:
    match = _NUMBER.search(text)
    if match is None:
        return text.strip()
    try:
        value = Decimal(match.group(0).replace(",", ""))
    except InvalidOperation:
        return text.strip()
    if value == 0:
        return "0"  # also -0
    return format(value.normalize(), "f")


NORMALIZERS = {
    "none": lambda text: text,
    "strip": str.strip,
    "lower": lambda text: text.strip().casefold(),
    "number": _first_number,
}


def normalize_answer(text: str, normalize: str = "strip") -> str:
    """The form in which predictions and answers are compared (see the module docstring)."""
    if normalize not in NORMALIZERS:
        raise ValueError(f"normalize must be one of {sorted(NORMALIZERS)}, got {normalize!r}")
    return NORMALIZERS[normalize](text)
