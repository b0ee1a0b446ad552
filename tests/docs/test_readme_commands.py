"""Every command shown in README.md runs, so the front page cannot rot.

The commands are read from the README's ```bash blocks (continuation lines joined, comments
dropped) and run in the README's order in an empty directory, so a file one command makes
(``tune-xgb cp … my.yaml``) is there for the next. What would train or take long runs its cheap
form instead:

- ``make TARGET``: ``make -n TARGET`` (the target exists and expands);
- ``pip install REQ… -e PATH``: a ``--dry-run --no-index --no-deps`` of the requirements (they are
  what this environment holds) and PATH is this project;
- ``tune-xgb ls|cp|path …`` run as they are; the other subcommands with ``--help``;
- ``tune run [--nproc_per_node N] RECIPE --config CONFIG [key=value …]``: ``--help`` once per
  launch form (recipe, under torchrun or not; torchrun with one process), which imports the recipe
  through ``tune run`` as a user's run does; and per command, in process, what ``--help`` does not
  reach: CONFIG resolves as the recipe resolves it, and for our recipe the overrides merge onto it as
  ``tune run`` merges them and every plugin block parses.

A command of another kind fails the test: give it a cheap form here.
"""

import argparse
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
OURS = ("xgblora_finetune", "xgblora_finetune_distributed")


def readme_commands():
    text = (REPO / "README.md").read_text()
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(words)
    return commands


def _tool(name: str) -> str:
    return str(BIN / name) if (BIN / name).exists() else name


def _run(args, cwd, timeout=300):
    env = dict(os.environ, HF_DATASETS_OFFLINE="1")
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _tune_run_parts(words):
    """(nproc or None, recipe, config, overrides) of ``tune run …``."""
    args = words[2:]
    nproc = None
    if args[0] == "--nproc_per_node":
        nproc, args = args[1], args[2:]
    recipe, args = args[0], args[1:]
    assert args[0] == "--config", words
    return nproc, recipe, args[1], args[2:]


def _check_config(recipe, config, overrides, cwd):
    """What ``--help`` does not reach: the config resolves as the recipe resolves it; for ours the
    overrides merge as ``tune run`` merges them and every plugin block parses."""
    from torchtune.config._utils import _merge_yaml_and_cli_args

    from torchtune_xgb.config.boost_config import AdapterConfig, BoostConfig
    from torchtune_xgb.config.checks import check_top_level_keys
    from torchtune_xgb.config.names import resolve_config, torchtune_config
    from torchtune_xgb.eval.config import parse_eval_config
    from torchtune_xgb.export.config import parse_export_config
    from torchtune_xgb.models.cache import register_resolvers
    from torchtune_xgb.run.guard import GuardConfig

    if recipe not in OURS:  # one of torchtune's recipes: tune run resolves its config names
        assert torchtune_config(config) is not None or (cwd / config).is_file(), config
        return
    path = Path(resolve_config(config if not (cwd / config).is_file() else str(cwd / config)))
    register_resolvers()
    yaml_args = argparse.Namespace(**OmegaConf.to_container(OmegaConf.load(path), resolve=False))
    cfg = _merge_yaml_and_cli_args(yaml_args, list(overrides))
    check_top_level_keys(cfg)
    block = lambda name: OmegaConf.to_container(cfg[name], resolve=True) if cfg.get(name) is not None else None  # noqa: E731
    BoostConfig.from_mapping(block("boost"))
    AdapterConfig.from_mapping(block("adapter"))
    GuardConfig.from_mapping(block("guard"))
    parse_export_config(cfg)
    parse_eval_config(cfg)


def test_the_readme_opens_with_the_two_commands():
    assert readme_commands()[:2] == [["make", "demo"], ["make", "test"]]
    assert len((REPO / "README.md").read_text().splitlines()) <= 200


def test_every_readme_command_runs(tmp_path):
    launches = {}  # (torchrun?, recipe) → the --help command of that launch form
    for words in readme_commands():
        program = words[0]
        if program == "make":
            done = _run(["make", "-n", *words[1:]], REPO)
        elif program == "pip":
            requirements = [w for w in words[2:] if not w.startswith("-") and w != "."]
            project = words[words.index("-e") + 1]
            assert (REPO / project / "pyproject.toml").is_file() and 'name = "torchtune_xgb"' in (REPO / project / "pyproject.toml").read_text()
            done = _run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--no-deps", *requirements], tmp_path)
        elif program == "tune-xgb":
            cheap = words if words[1] in ("ls", "cp", "path") else [*words, "--help"]
            done = _run([_tool("tune-xgb"), *cheap[1:]], tmp_path)
        elif program == "tune" and words[1] == "run":
            nproc, recipe, config, overrides = _tune_run_parts(words)
            _check_config(recipe, config, overrides, tmp_path)
            launch = ["--nproc_per_node", "1"] if nproc else []
            launches.setdefault((bool(nproc), recipe), [_tool("tune"), "run", *launch, recipe, "--config", config, "--help"])
            continue
        else:
            pytest.fail(f"README command without a cheap form in this test: {shlex.join(words)}")
        assert done.returncode == 0, (shlex.join(words), done.stdout[-2000:], done.stderr[-2000:])
    assert {recipe for _, recipe in launches} >= {"xgblora_finetune", "lora_finetune_single_device"}
    # the launches import torch and torchtune (seconds each): started together
    env = dict(os.environ, HF_DATASETS_OFFLINE="1")
    started = {key: subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for key, args in launches.items()}
    for key, process in started.items():
        output, _ = process.communicate(timeout=300)
        assert process.returncode == 0 and "--config CONFIG" in output, (launches[key], output[-3000:])
