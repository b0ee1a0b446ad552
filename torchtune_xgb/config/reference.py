"""The configuration reference, rendered from the code's own key definitions.

The documentation build (``docs/hooks.py``) puts :func:`render_reference` into
``docs/reference/configuration.md``; nothing rendered is committed, so the page lists exactly the
keys the parsers accept (``tests/config/test_config_reference.py`` feeds every listed key, and
unlisted ones, through them).
"""

import json
from typing import Dict, List

from torchtune_xgb.config.boost_config import AdapterConfig, BoostConfig
from torchtune_xgb.config.checks import PLUGIN_KEYS
from torchtune_xgb.config.keys import KeyDoc, documented_keys
from torchtune_xgb.eval.config import EvalConfig
from torchtune_xgb.export.config import ExportConfig
from torchtune_xgb.run.guard import GuardConfig

# block name → the dataclass that defines (and whose parser accepts) its keys
BLOCKS: Dict[str, type] = {
    "boost": BoostConfig,
    "adapter": AdapterConfig,
    "guard": GuardConfig,
    "export": ExportConfig,
    "eval": EvalConfig,
}


def top_level_keys() -> List[KeyDoc]:
    """The top-level keys the plugin adds to torchtune's (config/checks.py)."""
    return [KeyDoc(name, accepts, default, doc) for name, (accepts, default, doc) in PLUGIN_KEYS.items()]


def block_keys() -> Dict[str, List[KeyDoc]]:
    """Every key of every block, dotted from the top of the config."""
    return {name: documented_keys(cls, name) for name, cls in BLOCKS.items()}


def _default(row: KeyDoc) -> str:
    value = row.default
    if row.required:
        return "required"
    if value is None:
        return "`null`"
    return f"`{json.dumps(value) if not isinstance(value, str) else value}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _table(rows: List[KeyDoc]) -> List[str]:
    lines = ["| key | accepts | default | meaning |", "|---|---|---|---|"]
    lines += [f"| `{r.key}` | {_cell(r.accepts)} | {_default(r)} | {_cell(r.doc)} |" for r in rows]
    return lines


def render_reference() -> str:
    """Markdown: a table of the plugin's top-level keys, then one table per block."""
    lines = ["## Top-level keys", "", "Beside torchtune's own keys, a config may set:", "", *_table(top_level_keys())]
    for name, rows in block_keys().items():
        summary = " ".join(BLOCKS[name].__doc__.split("\n\n")[0].split()).replace("``", "`")
        lines += ["", f"## `{name}:`", "", summary, "", *_table(rows)]
    return "\n".join(lines) + "\n"
