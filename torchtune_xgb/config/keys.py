"""A config block's keys, defined once.

Each block (``boost:``, ``adapter:``, ``guard:``, ``export:``, ``eval:``) is a frozen dataclass whose
fields are its keys. :func:`key` gives a field its default, the values it accepts and what it means;
:func:`build_block` (the parser every block goes through) accepts exactly those fields, and the
configuration reference of the documentation is rendered from the same fields
(``config/reference.py``), so the two cannot disagree.
"""

from dataclasses import MISSING, dataclass, field, fields
from typing import Any, List, Mapping, Optional

from torchtune_xgb.errors import ConfigError


def one_of(choices) -> str:
    """``accepts`` of a key that takes one of ``choices``: "`a`, `b` or `c`"."""
    quoted = [f"`{c}`" for c in choices]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"


def key(default: Any, accepts: str, doc: str, block: Optional[type] = None, required: bool = False) -> Any:
    """A block key: a dataclass field with ``default``, the values it ``accepts`` (as a reader would
    write them: ``integer ≥ 1``, :func:`one_of` a few names) and ``doc``, what it does. ``block``: the dataclass
    of a nested block (``adapter.svd``), whose keys the reference lists under this one. ``required``:
    the block's ``validate`` refuses it absent (``default`` stands for "absent")."""
    return field(default=default, metadata={"accepts": accepts, "doc": doc, "block": block, "required": required})


@dataclass(frozen=True)
class KeyDoc:
    """One row of the configuration reference."""

    key: str  # dotted, from the top of the config: ``boost.steps_per_round``
    accepts: str
    default: Any
    doc: str
    required: bool = False


def documented_keys(cls: type, prefix: str) -> List[KeyDoc]:
    """The keys of block ``cls`` under ``prefix`` (``"boost"``), nested blocks flattened, in
    definition order. A field defined without :func:`key` raises TypeError: every key is documented."""
    rows = []
    for f in fields(cls):
        if "doc" not in f.metadata:
            raise TypeError(f"{cls.__name__}.{f.name}: define it with config.keys.key(default, accepts, doc)")
        default = None if f.default is MISSING else f.default
        rows.append(KeyDoc(f"{prefix}.{f.name}", f.metadata["accepts"], default, f.metadata["doc"], f.metadata["required"]))
        if f.metadata["block"] is not None:
            rows.extend(documented_keys(f.metadata["block"], f"{prefix}.{f.name}"))
    return rows


def build_block(cls, prefix: str, block: Optional[Mapping[str, Any]]):
    """``cls(**block)`` validated; an unknown key (a typo) is an error naming it, not ignored."""
    block = dict(block or {})
    known = {f.name for f in fields(cls)}
    for name in block:
        if name not in known:
            raise ConfigError(f"{prefix}.{name}: unknown key (known: {', '.join(sorted(known))})")
    cfg = cls(**block)
    cfg.validate()
    return cfg
