"""Quality per parameter on the default task: exact match and held-out loss after the same budget.

    python -m benchmarks.quality                                  # 60 steps, one LR per method
    python -m benchmarks.quality --steps 300 --grid               # the bigger setting: full LR grid
    python -m benchmarks.quality --lrs lora_r8=1e-3,3e-3 full=1e-5 --out benchmarks/results/quality_cpu.md

Every method trains SmolLM2-135M-Instruct on the generated arithmetic task with the same steps,
batch, data order and seed (configs generated from the packaged ``smollm2_135m_xgblora``):
torchtune's ``lora_finetune_single_device`` at r=8, our boosted rank-1 XGBLoRA, LoRA-XS r=16 and
boosted LoRA-XS (when their packaged configs exist), and torchtune's
``full_finetune_single_device`` (full fine-tuning of the plain model). Then, per run:

- exact match on the 100 held-out questions: from ``xgb_summary.json`` for our recipe; for
  torchtune's recipes the merged checkpoint ``output_dir/epoch_0`` is loaded into the plain
  ``smollm2_135m`` and scored with the same ``torchtune_xgb.evaluation.exact_match``;
- held-out loss: token-mean cross-entropy on the answers of the held-out split, on the merged
  checkpoint (the same code for every method);
- trainable parameters per step, and distinct parameters touched (base-weight entries the run
  changed: all adapted matrices for LoRA, as our summary reports for ours, everything for full).

A "base (no training)" row scores the untouched model. Prints a markdown table; ``--out FILE.md``
also writes it and ``FILE.json``. Runs go under ``--workdir`` (default ``outputs/bench/quality``,
git-ignored; each run's checkpoint is deleted after scoring unless ``--keep-checkpoints``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List

from benchmarks.common import (
    OURS,
    REPO,
    TORCHTUNE_FULL,
    TORCHTUNE_LORA,
    Method,
    adapted_weight_entries,
    available,
    build_config,
    check_model_ready,
    clean_dir,
    count_params,
    fmt,
    hardware,
    markdown_table,
    run_subprocess,
    tail,
    today,
    tune_command,
    write_config,
)

# name → (row, learning rates: the first is the default, the rest complete the grid)
METHODS = {
    "lora_r8": (Method("torchtune LoRA r=8", TORCHTUNE_LORA, overrides={"model.lora_rank": 8, "model.lora_alpha": 16}),
                [1e-3, 3e-4, 3e-3]),
    "xgblora": (Method("XGBLoRA r=1 boosted", OURS), [2e-3, 1e-3, 4e-3]),
    "loraxs": (Method("LoRA-XS r=16", OURS, "smollm2_135m_loraxs", {"adapter.method": "loraxs"}), [4e-3, 1e-3, 1e-2]),
    "xgblora_xs": (Method("boosted LoRA-XS r=16", OURS, "smollm2_135m_xgblora_xs", {"adapter.method": "loraxs"}),
                   [4e-3, 1e-3, 1e-2]),
    "full": (Method("full fine-tuning", TORCHTUNE_FULL), [2e-5, 1e-5, 5e-5]),
}


def parse_lrs(items: List[str]) -> Dict[str, List[float]]:
    """``["lora_r8=1e-3,3e-3", "full=1e-5"]`` → ``{"lora_r8": [1e-3, 3e-3], "full": [1e-5]}``."""
    out = {}
    for item in items:
        name, _, values = item.partition("=")
        if name not in METHODS or not values:
            raise SystemExit(f"error: --lrs {item!r}: expected METHOD=LR[,LR…] with METHOD in {', '.join(METHODS)}")
        out[name] = [float(v) for v in values.split(",")]
    return out


# --- scoring a merged checkpoint ------------------------------------------------------------
def load_merged(checkpoint_dir: Path, cfg):
    """The plain model with the weights of a merged checkpoint dir (as torchtune's generate does)."""
    import torch
    from omegaconf import OmegaConf
    from torchtune import config, training
    from torchtune.training import FullModelHFCheckpointer

    from benchmarks.common import PLAIN_MODELS

    files = sorted(p.name for p in checkpoint_dir.glob("model*.safetensors"))
    # the checkpointer wants an output dir even to read; keep it out of the model/cache dirs
    checkpointer = FullModelHFCheckpointer(
        checkpoint_dir=str(checkpoint_dir), checkpoint_files=files, model_type=cfg.checkpointer.model_type,
        output_dir=tempfile.mkdtemp(prefix="xgb_scoring_"),
    )
    plain = PLAIN_MODELS.get(cfg.model._component_, cfg.model._component_)
    with training.set_default_dtype(torch.float32):
        model = config.instantiate(OmegaConf.create({"_component_": plain}))
    model.load_state_dict(checkpointer.load_checkpoint()[training.MODEL_KEY])
    return model.eval()


def heldout_loss(model, tokenizer, n_eval: int = 100, batch_size: int = 25) -> float:
    """Token-mean cross-entropy on the answers of the held-out split (prompt tokens masked)."""
    import torch
    from torchtune.data import CROSS_ENTROPY_IGNORE_IDX, padded_collate_sft

    from torchtune_xgb.data import arithmetic_dataset

    dataset = arithmetic_dataset(tokenizer, split="eval", n_eval=n_eval)
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            batch = padded_collate_sft([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))],
                                       padding_idx=tokenizer.pad_id)
            logits = model(batch["tokens"])[:, :-1].float()
            labels = batch["labels"][:, 1:]
            total += torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                ignore_index=CROSS_ENTROPY_IGNORE_IDX, reduction="sum").item()
            count += int((labels != CROSS_ENTROPY_IGNORE_IDX).sum())
    return total / count


def score(checkpoint_dir: Path, cfg, need_exact_match: bool) -> Dict[str, float]:
    """``{"heldout_loss", "exact_match"?}`` of a merged checkpoint (eval settings of our config)."""
    from torchtune import config

    from torchtune_xgb.data import load_eval_examples
    from torchtune_xgb.evaluation import exact_match

    model = load_merged(checkpoint_dir, cfg)
    tokenizer = config.instantiate(cfg.tokenizer)
    out = {"heldout_loss": heldout_loss(model, tokenizer)}
    if need_exact_match:
        out["exact_match"] = exact_match(model, tokenizer, load_eval_examples(split="eval", n_eval=100),
                                         max_new_tokens=6, batch_size=25)
    return out


# --- runs -----------------------------------------------------------------------------------
def run_method(key: str, lr: float, args) -> Dict[str, Any]:
    method, _ = METHODS[key]
    out_dir = clean_dir(args.workdir / f"{key}_lr{lr:g}")
    cfg = build_config(method, out_dir, steps=args.steps, batch_size=args.batch_size, device=args.device,
                       dtype=args.dtype, lr=lr, seed=args.seed, keep_eval=method.recipe == OURS)
    result = run_subprocess(tune_command(method.recipe, write_config(cfg, out_dir / "config.yaml")), out_dir / "stdout.txt")
    row: Dict[str, Any] = {"method": method.name, "key": key, "lr": lr, "seconds": result.wall_seconds}
    if result.returncode != 0:
        print(f"  {method.name} lr={lr:g}: FAILED (exit {result.returncode}); last lines of {result.stdout_path}:\n{tail(result.stdout_path)}")
        row["failed"] = True
        return row
    checkpoint = out_dir / "epoch_0"
    if method.recipe == OURS:
        summary = json.loads((out_dir / "xgb_summary.json").read_text())
        row.update(exact_match=summary["exact_match_after"], trainable_params=summary["trainable_params"],
                   distinct_params_touched=summary["distinct_params_touched"], final_loss=summary.get("final_loss"))
        row.update(score(checkpoint, cfg, need_exact_match=False))
    else:
        row.update(score(checkpoint, cfg, need_exact_match=True))
        if method.recipe == TORCHTUNE_LORA:
            row["trainable_params"] = count_params(cfg.model)["adapter"]
            row["distinct_params_touched"] = adapted_weight_entries(cfg.model)
        else:  # full fine-tuning trains (and may change) every parameter
            row["trainable_params"] = row["distinct_params_touched"] = count_params(cfg.model)["total"]
    if not args.keep_checkpoints:
        shutil.rmtree(checkpoint, ignore_errors=True)
    print(f"  {method.name} lr={lr:g}: exact match {row['exact_match']:.0%}, held-out loss {row['heldout_loss']:.3f} "
          f"({result.wall_seconds:.0f} s)")
    return row


def base_row(args) -> Dict[str, Any]:
    """The untouched model, scored like every run."""
    method, _ = METHODS["full"]
    cfg = build_config(method, args.workdir / "base", steps=1, batch_size=1, device="cpu", dtype="fp32")
    row = {"method": "base (no training)", "key": "base", "lr": None, "trainable_params": 0, "distinct_params_touched": 0}
    row.update(score(Path(cfg.checkpointer.checkpoint_dir), cfg, need_exact_match=True))
    return row


def render(rows: List[Dict[str, Any]], header: Dict[str, Any]) -> str:
    best = {}
    for r in rows:
        if not r.get("failed") and (r["key"] not in best or r["exact_match"] > best[r["key"]]["exact_match"]):
            best[r["key"]] = r
    table = markdown_table(
        ["method", "lr", "exact match", "held-out loss", "trainable params/step", "distinct params touched", "run (s)"],
        [
            [
                r["method"] + (" (best lr)" if header["grid"] and best.get(r["key"]) is r else ""),
                fmt(r.get("lr"), "g"),
                "FAILED" if r.get("failed") else fmt(r.get("exact_match"), ".0%"),
                fmt(r.get("heldout_loss"), ".3f"),
                None if r.get("trainable_params") is None else f"{int(r['trainable_params']):,}",
                None if r.get("distinct_params_touched") is None else f"{int(r['distinct_params_touched']):,}",
                fmt(r.get("seconds"), ".0f"),
            ]
            for r in rows
        ],
    )
    return "\n".join([
        f"## Quality: SmolLM2-135M-Instruct, arithmetic task, {header['date']}",
        "",
        f"Hardware: {header['hardware']}. {header['steps']} steps, batch {header['batch_size']}, seed "
        f"{header['seed']}, dtype {header['dtype']}, same data order for every method. Exact match on "
        "100 held-out questions (greedy, 6 new tokens); held-out loss: token-mean cross-entropy on their answers.",
        "",
        table,
    ])


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60, help="optimizer steps per run, same for all (default 60)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--grid", action="store_true", help="every LR of each method's grid (default: its first LR only)")
    p.add_argument("--lrs", nargs="*", default=[], metavar="METHOD=LR[,LR…]", help="LRs of a method, replacing its default/grid")
    p.add_argument("--no-base", action="store_true", help="skip the untrained-model row")
    p.add_argument("--keep-checkpoints", action="store_true")
    p.add_argument("--workdir", type=Path, default=REPO / "outputs" / "bench" / "quality")
    p.add_argument("--out", type=Path, default=None, help="also write the table to OUT (.md) and OUT.json")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    check_model_ready("smollm2-135m")
    chosen = {m.name for m in available([METHODS[k][0] for k in args.methods])}
    lrs = parse_lrs(args.lrs)
    plan = [(k, lr) for k in args.methods if METHODS[k][0].name in chosen
            for lr in lrs.get(k, METHODS[k][1] if args.grid else METHODS[k][1][:1])]
    rows = [] if args.no_base else [base_row(args)]
    for i, (key, lr) in enumerate(plan, 1):
        print(f"run {i}/{len(plan)}: {METHODS[key][0].name}, lr {lr:g}")
        rows.append(run_method(key, lr, args))
    header = {"date": today(), "hardware": hardware(args.device), "steps": args.steps, "batch_size": args.batch_size,
              "seed": args.seed, "dtype": args.dtype, "grid": args.grid or any(len(v) > 1 for v in lrs.values())}
    report = render(rows, header)
    print("\n" + report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report + "\n")
        args.out.with_suffix(".json").write_text(json.dumps({"header": header, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
