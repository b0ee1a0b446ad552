"""Config names: ``--config smollm2_135m_xgblora`` works like a torchtune config name.

``tune run`` resolves torchtune's own config names for any recipe (so ``tune run xgblora_finetune
--config llama3_2/1B_lora_single_device`` reads torchtune's file, and it would swap in its own
file if one of our names equalled one of its configs, so none does); anything else reaches the
recipe as a path. We resolve our names before torchtune's parser sees the argument, and
torchtune's names too where ``tune run`` is not in between (``tune-xgb validate``).
"""

import sys
from importlib import resources
from pathlib import Path
from typing import Callable, Dict, List, Optional

RECIPES = {
    "xgblora_finetune": "XGBLoRA / LoRA-XS fine-tuning; one device, or FSDP2 under --nproc_per_node",
}


def packaged_configs() -> Dict[str, Path]:
    """Config name → path of every YAML shipped in ``torchtune_xgb.configs``."""
    root = resources.files("torchtune_xgb.configs")
    return {
        Path(entry.name).stem: Path(str(entry))
        for entry in root.iterdir()
        if entry.name.endswith(".yaml")
    }


def torchtune_config(name: str) -> Optional[Path]:
    """The file of one of torchtune's own config names (``llama3_2/1B_lora_single_device``), found
    as ``tune run`` finds it; None if torchtune has no such config."""
    from torchtune._cli.run import ROOT  # the root `tune run` resolves config names against
    from torchtune._recipe_registry import get_all_recipes

    for recipe in get_all_recipes():
        for config in recipe.configs:
            if config.name == name:
                return ROOT / "recipes" / "configs" / config.file_path
    return None


def resolve_config(value: str) -> str:
    """A path that exists is kept; a packaged name (with or without .yaml) becomes its path; so
    does one of torchtune's config names (``tune run xgblora_finetune --config
    llama3_2/1B_lora_single_device`` already reads torchtune's file: ``tune run`` resolves it)."""
    if Path(value).expanduser().exists():
        return value
    configs = packaged_configs()
    name = value[:-5] if value.endswith(".yaml") else value
    if name in configs:
        return str(configs[name])
    theirs = torchtune_config(value)
    if theirs is not None and theirs.is_file():
        return str(theirs)
    raise FileNotFoundError(
        f"--config: {value!r} is neither a file, a packaged config ({', '.join(sorted(configs))}) nor one of "
        "torchtune's (tune ls)"
    )


def resolve_config_arg(argv: List[str]) -> List[str]:
    """Return ``argv`` with the value of ``--config`` (or ``--config=``) resolved."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg == "--config" and i + 1 < len(out):
            out[i + 1] = resolve_config(out[i + 1])
        elif arg.startswith("--config="):
            out[i] = "--config=" + resolve_config(arg.split("=", 1)[1])
    return out


def run_entry_point(recipe_main: Callable[[], None]) -> int:
    """Run a ``@config.parse`` recipe main with our config names resolved. A config mistake
    (:class:`ConfigError`, a missing file) ends as one ``error:`` line (under torchrun, from the
    first worker of each node) and exit code 2; a run
    that cannot finish correctly (:class:`RunError`: divergence, a failed export, no intact
    checkpoint) as one ``error:`` line and exit code 1 (a stop on SIGTERM/Ctrl-C after its
    resume checkpoint: 128 + the signal's number). ``TORCHTUNE_XGB_DEBUG=1`` adds the
    traceback. Returns the exit code, also on success: torchtune's ``config.parse`` ends with
    ``sys.exit``, whose ``SystemExit`` is turned into the code here so that the caller decides
    how the process ends (the distributed worker must end without interpreter teardown)."""
    import os
    import traceback

    from torchtune_xgb.errors import ConfigError, RunError

    try:
        sys.argv = resolve_config_arg(sys.argv)
        recipe_main()
    except (ConfigError, FileNotFoundError, RunError) as err:
        if os.environ.get("TORCHTUNE_XGB_DEBUG"):
            traceback.print_exc()
        # a config mistake is the same on every rank of a node: said once per node under torchrun
        # (not only on rank 0: a file missing on one node of several is that node's to report)
        if isinstance(err, RunError) or os.environ.get("LOCAL_RANK", "0") == "0":
            print(f"error: {err}", file=sys.stderr)
        return getattr(err, "exit_code", 1) if isinstance(err, RunError) else 2
    except SystemExit as done:
        return exit_code(done)
    return 0


def exit_code(done: SystemExit) -> int:
    """The process exit code ``sys.exit`` would give: None → 0, an int as is, anything else
    (a message) printed to stderr → 1."""
    if done.code is None:
        return 0
    if isinstance(done.code, int):
        return done.code
    print(done.code, file=sys.stderr)
    return 1
