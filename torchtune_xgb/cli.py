"""``tune-xgb``: what ``tune ls`` / ``tune cp`` cannot do for a plugin, plus model preparation.

    tune-xgb ls                                   recipes and packaged configs
    tune-xgb cp NAME DEST                         copy a packaged config to edit it
    tune-xgb path NAME                            a packaged config's path (for torchtune's own
                                                  recipes: tune run generate --config $(tune-xgb path NAME))
    tune-xgb validate CONFIG [key=value ...]      check a config (name or path) as the recipe would,
                                                  before anything loads (`tune validate` cannot
                                                  resolve ${xgb_cache:…})
    tune-xgb prepare smollm2-135m-instruct [--output DIR] [--force]
    tune-xgb plot OUTPUT_DIR [--out PNG]          loss curve with merge boundaries (needs matplotlib)
"""

import argparse
import shutil
import sys
from pathlib import Path
from typing import List, Optional, Tuple

from torchtune_xgb.config.names import RECIPES, packaged_configs


def _ls(_: argparse.Namespace) -> int:
    configs = sorted(packaged_configs())
    rows = [(recipe, [c for c in configs if not c.endswith("_generate")]) for recipe in RECIPES]
    rows.append(("generate (torchtune's)", [c for c in configs if c.endswith("_generate")]))
    width = max(len(r) for r, _ in rows)
    print(f"{'RECIPE':<{width}}  CONFIG")
    for recipe, names in rows:
        for i, name in enumerate(names):
            print(f"{recipe if i == 0 else '':<{width}}  {name}")
    return 0


def _packaged(name: str) -> Optional[Tuple[str, Path]]:
    """(name, path) of a packaged config (``.yaml`` optional); None after printing the error."""
    configs = packaged_configs()
    stem = name[:-5] if name.endswith(".yaml") else name
    if stem not in configs:
        print(f"error: unknown config {name!r}; known: {', '.join(sorted(configs))}", file=sys.stderr)
        return None
    return stem, configs[stem]


def _cp(args: argparse.Namespace) -> int:
    found = _packaged(args.name)
    if found is None:
        return 2
    name, source = found
    dest = Path(args.dest)
    if dest.is_dir():
        dest = dest / f"{name}.yaml"
    elif dest.suffix == "":
        dest = dest.with_suffix(".yaml")
    if dest.exists() and not args.force:
        print(f"error: {dest} exists (use --force to overwrite)", file=sys.stderr)
        return 2
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, dest)
    print(f"Copied {name} to {dest}")
    return 0


def _path(args: argparse.Namespace) -> int:
    found = _packaged(args.name)
    if found is None:
        return 2
    print(found[1])
    return 0


def _validate(args: argparse.Namespace) -> int:
    """torchtune's component check (``tune validate``) plus, for training configs, the recipe's own
    checks (validation.validate_config), the resume checks (the same run, an intact checkpoint)
    and the output_dir checks (another run there, or one in progress), with the plugin's resolvers
    registered. Reads the resume manifests and hashes the inputs (as a resume does); writes nothing."""
    from omegaconf import OmegaConf
    from torchtune import config as tt_config
    from torchtune.config._errors import ConfigError as TorchtuneConfigError
    from torchtune.config._utils import _merge_yaml_and_cli_args

    from torchtune_xgb.config.names import resolve_config
    from torchtune_xgb.errors import ConfigError, RunError
    from torchtune_xgb.models.cache import register_resolvers

    register_resolvers()
    try:
        path = resolve_config(args.config)
        try:  # overrides exactly as `tune run` merges them (`block=builder`, `~key` removes a key)
            yaml_args = argparse.Namespace(**OmegaConf.to_container(OmegaConf.load(path), resolve=False))
            cfg = _merge_yaml_and_cli_args(yaml_args, list(args.overrides))
        except ValueError as err:
            raise ConfigError(f"{args.config}: {err}") from None
        OmegaConf.resolve(cfg)
        resumed = None
        if cfg.get("optimizer") is not None:  # a training config for the xgblora_finetune recipe
            from torchtune_xgb.run.output_dir import check_output_dir
            from torchtune_xgb.config.validation import validate_config, validate_resume

            validate_config(cfg)  # one line naming the key, builders' arguments included
            # as the recipe checks them before loading, without writing anything
            resumed = validate_resume(cfg, world_size=None)  # the same run; its number of processes: at launch
            check_output_dir(cfg)  # what the run would refuse there (nothing removed)
        try:
            tt_config.validate(cfg)
        except (TorchtuneConfigError, TypeError) as err:  # its partial-binding retry can raise TypeError
            raise ConfigError(" ".join(str(err).split())) from err
    except (ConfigError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RunError as err:  # no intact resume checkpoint: what the run would exit 1 with
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"{path}: config is well-formed" + (f"; the resume continues {resumed.path}" if resumed else ""))
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from torchtune_xgb.models.prepare import prepare_model

    try:
        path = prepare_model(args.name, args.output, force=args.force)
    except (ValueError, OSError, RuntimeError) as err:  # a refusal, a missing wheel, a full disk: one line
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    print(path)
    return 0


def _plot(args: argparse.Namespace) -> int:
    try:
        from torchtune_xgb.eval.plot import plot_run

        path = plot_run(args.output_dir, args.out)
    except ModuleNotFoundError as err:
        if (err.name or "").split(".")[0] != "matplotlib":
            raise
        print("error: tune-xgb plot needs matplotlib: pip install matplotlib", file=sys.stderr)
        return 2
    except (OSError, ValueError) as err:  # no logs, no losses, a link at the PNG's path
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tune-xgb", description="torchtune_xgb helpers")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("ls", help="list recipes and packaged configs").set_defaults(func=_ls)
    cp = sub.add_parser("cp", help="copy a packaged config")
    cp.add_argument("name")
    cp.add_argument("dest")
    cp.add_argument("--force", action="store_true")
    cp.set_defaults(func=_cp)
    path = sub.add_parser("path", help="print a packaged config's path")
    path.add_argument("name")
    path.set_defaults(func=_path)
    val = sub.add_parser("validate", help="check a config (packaged name or path) before anything loads")
    val.add_argument("config")
    val.add_argument("overrides", nargs="*", help="key=value overrides, as for tune run")
    val.set_defaults(func=_validate)
    prep = sub.add_parser("prepare", help="convert a packaged model to an HF-format directory")
    prep.add_argument("name")
    prep.add_argument("--output", type=Path, default=None)
    prep.add_argument("--force", action="store_true", help="rebuild a complete conversion (never removes files prepare did not write)")
    prep.set_defaults(func=_prepare)
    plot = sub.add_parser("plot", help="loss vs step of a run, merges marked (PNG; needs matplotlib)")
    plot.add_argument("output_dir", type=Path)
    plot.add_argument("--out", type=Path, default=None, help="PNG path (default OUTPUT_DIR/loss.png)")
    plot.set_defaults(func=_plot)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
