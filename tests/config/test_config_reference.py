"""The configuration reference (docs/reference/configuration.md) is rendered from the code's key
definitions: it must list every key each block's parser accepts, and nothing else. What "accepts"
means comes from the parsers themselves: each listed key goes through them, and the key list that a
parser's own unknown-key error names must equal the listed keys."""

import re

import pytest
import yaml
from omegaconf import OmegaConf

from torchtune_xgb.config.boost_config import AdapterConfig, BoostConfig
from torchtune_xgb.config.checks import check_top_level_keys
from torchtune_xgb.config.reference import render_reference
from torchtune_xgb.errors import ConfigError
from torchtune_xgb.eval.config import parse_eval_config
from torchtune_xgb.export.config import parse_export_config
from torchtune_xgb.run.guard import GuardConfig

EXAMPLES = {"_component_": "torchtune_xgb.json_eval_examples", "path": "mine.jsonl"}

# block → what the recipe calls to read it (config/validation.py), given the block's mapping
PARSERS = {
    "boost": BoostConfig.from_mapping,
    "adapter": AdapterConfig.from_mapping,
    "adapter.svd": lambda block: AdapterConfig.from_mapping({"svd": block}),
    "guard": GuardConfig.from_mapping,
    "export": lambda block: parse_export_config(OmegaConf.create({"export": block})),
    "eval": lambda block: parse_eval_config(OmegaConf.create({"eval": {"examples": EXAMPLES, **block}})),
}
# a value each key accepts where its default is "absent"
SAMPLES = {"adapter.svd": {}, "adapter.rank": 4, "adapter.alpha": 8.0, "export.adapter_rank": 8,
           "eval.examples": EXAMPLES, "eval.every_n_steps": 5}


def listed_keys():
    """(section, key, default cell) of every table row of the rendered reference."""
    rows, section = [], None
    for line in render_reference().splitlines():
        if line.startswith("## "):
            section = line[3:].strip("`:")
        match = re.match(r"\| `([^`]+)` \| .* \| (\S+|`[^`]*`) \| .* \|$", line)
        if match:
            rows.append((section, match.group(1), match.group(2)))
    return rows


def block_of(key):
    """The innermost block a dotted key belongs to: ``adapter.svd.niter`` → ``adapter.svd``."""
    return max((b for b in PARSERS if key.startswith(b + ".")), key=len)


def keys_named_by_the_parser(block):
    """The known keys a parser lists when it refuses an unknown one."""
    with pytest.raises(ConfigError) as err:
        PARSERS[block]({"no_such_key": 1})
    message = str(err.value)
    assert message.startswith(f"{block}.no_such_key: unknown key"), message
    return set(re.search(r"\(known: (.*)\)$", message).group(1).split(", "))


def test_every_block_key_is_listed_and_nothing_else():
    rows = listed_keys()
    listed = {}
    for section, key, _ in rows:
        if section != "Top-level keys":
            assert key.startswith(section + "."), (section, key)  # each key under its block's heading
            listed.setdefault(block_of(key), set()).add(key.rsplit(".", 1)[1])
    assert set(listed) | {"adapter.svd"} == set(PARSERS)
    for block in PARSERS:
        assert listed.get(block, set()) == keys_named_by_the_parser(block), block


@pytest.mark.parametrize("key", [key for section, key, _ in listed_keys() if section != "Top-level keys"])
def test_each_listed_key_is_accepted_by_its_block_with_its_default(key):
    block = block_of(key)
    name = key[len(block) + 1:]
    default = next(d for _, k, d in listed_keys() if k == key)
    value = SAMPLES[key] if key in SAMPLES else yaml.safe_load(default.strip("`"))
    parsed = PARSERS[block]({name: value})
    if block == "adapter.svd":
        parsed = parsed.svd_config()
    if key not in SAMPLES:  # the listed default is what the parser fills in
        assert getattr(parsed, name) == value


def test_each_top_level_key_is_accepted_and_a_near_miss_is_not():
    top = [key for section, key, _ in listed_keys() if section == "Top-level keys"]
    assert set(top) >= set(PARSERS) - {"adapter.svd"} and "save_every_n_steps" in top
    check_top_level_keys(OmegaConf.create({key: 1 for key in top}))
    for key in top:
        with pytest.raises(ConfigError, match=rf"^{key}x: unknown top-level key"):
            check_top_level_keys(OmegaConf.create({key + "x": 1}))


def test_a_block_key_defined_without_its_documentation_is_refused():
    from dataclasses import dataclass

    from torchtune_xgb.config.keys import documented_keys, key

    @dataclass(frozen=True)
    class Undocumented:
        documented: int = key(1, "integer", "a key")
        bare: int = 2

    with pytest.raises(TypeError, match="Undocumented.bare"):
        documented_keys(Undocumented, "x")
