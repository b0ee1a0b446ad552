"""Speed, memory and merge overhead: XGBLoRA vs torchtune's own LoRA recipe, side by side.

    python -m benchmarks.throughput                       # SmolLM2-135M, defaults below
    python -m benchmarks.throughput --steps 30 --repeats 2 --kappa 10 --out benchmarks/results/throughput_cpu.md
    python -m benchmarks.throughput --device cuda --dtype bf16 --model 1b-random --steps 200   # on a GPU

Every row is one ``tune run`` subprocess on a config generated from the packaged
``smollm2_135m_xgblora`` (same model, tokenizer, data, batch, sequence length, dtype, optimizer
and steps), run ``--repeats`` times interleaved (A B C A B C …) so that machine drift hits every
row alike. The floor row, "bare frozen base", is forward + backward of the same model with no
adapter and gradients flowing only into the input-embedding activations (nothing any adapter
method can beat); it runs in-process in a worker subprocess of this script.

Measured per row: median step wall time after ``--warmup`` steps (from the time stamps every
metric-log line gets, see timed_logger.py), its ratio to torchtune LoRA r=8, median tokens/s as
torchtune logs it (label tokens only), peak memory (peak RSS of the whole process on CPU, including
model load and export; max allocated from torchtune's memory stats on CUDA), merge + re-init +
optimizer-reset seconds as a share of the run's wall time (``xgb_summary.json``), trainable
parameters per step. Prints a markdown table, the goals of issue 6 with PASS/MISS, and with
``--profile`` the top operators of a few profiled steps of each recipe. ``--out FILE.md`` also
writes the table (markdown) and ``FILE.json`` (raw numbers). Run outputs go under ``--workdir``
(default ``outputs/bench/throughput``, git-ignored).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from benchmarks.common import (
    GIB,
    OURS,
    REPO,
    TORCHTUNE_LORA,
    Method,
    available,
    build_config,
    check_model_ready,
    clean_dir,
    count_params,
    fmt,
    hardware,
    logged_max,
    logged_median,
    markdown_table,
    median_or_none,
    parse_sets,
    read_log,
    run_subprocess,
    step_seconds,
    tail,
    today,
    tune_command,
    write_config,
)

FLOOR = "floor"
LORA_R8 = "torchtune LoRA r=8"
LORA_R16 = "torchtune LoRA r=16"
BOOSTED = "XGBLoRA r=1 boosted"
BOOSTED_THIRD = "XGBLoRA r=1 boosted, 1/3 blocks"
LORAXS = "LoRA-XS r=16"
BOOSTED_XS = "boosted LoRA-XS r=16"
FLOOR_NAME = "bare frozen base (floor)"


def methods(kappa: int) -> List[Method]:
    """The rows, in run order. LoRA-XS rows are dropped (with a note) until their configs exist."""
    return [
        Method(LORA_R8, TORCHTUNE_LORA, overrides={"model.lora_rank": 8, "model.lora_alpha": 16}),
        Method(LORA_R16, TORCHTUNE_LORA, overrides={"model.lora_rank": 16, "model.lora_alpha": 32}),
        Method(BOOSTED, OURS, overrides={"boost.steps_per_round": kappa}),
        Method(BOOSTED_THIRD, OURS, overrides={"boost.steps_per_round": kappa, "boost.blocks_per_round": 0.34}),
        Method(LORAXS, OURS, "smollm2_135m_loraxs", {"adapter.method": "loraxs"}),
        Method(BOOSTED_XS, OURS, "smollm2_135m_xgblora_xs", {"adapter.method": "loraxs", "boost.steps_per_round": kappa}),
        Method(FLOOR_NAME, FLOOR),
    ]


# --- the floor: bare frozen base, in-process ------------------------------------------------
def floor_stepper(cfg) -> Callable[[], int]:
    """A function running one forward + backward of the frozen base on the next batch.

    Same model weights, tokenizer, data order, batch, collate, loss and dtype as the recipes; no
    adapter, every parameter frozen; the input-embedding output is made a leaf that requires
    grad, so backward runs through every block (what any adapter method must at least pay) but
    computes no weight gradient. Returns the step's number of label tokens.
    """
    from functools import partial

    import torch
    from torch.utils.data import DataLoader, DistributedSampler
    from torchtune import config, training, utils
    from torchtune.data import padded_collate_sft

    device = utils.get_device(cfg.device)
    dtype = training.get_dtype(cfg.dtype, device)
    training.set_seed(cfg.seed)
    with training.set_default_dtype(dtype), device:
        model = config.instantiate(cfg.model)
    model.load_state_dict(config.instantiate(cfg.checkpointer).load_checkpoint()[training.MODEL_KEY])
    model.requires_grad_(False)
    model.tok_embeddings.register_forward_hook(lambda _m, _i, out: out.detach().requires_grad_(True))
    loss_fn = config.instantiate(cfg.loss)
    model.set_num_output_chunks(loss_fn.num_output_chunks)
    tokenizer = config.instantiate(cfg.tokenizer)
    dataset = config.instantiate(cfg.dataset, tokenizer)
    # the recipes' sampler: one replica, seed 0, same shuffle → the same batches in the same order
    sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=cfg.shuffle, seed=0)
    collate = partial(padded_collate_sft, padding_idx=tokenizer.pad_id, ignore_idx=loss_fn.ignore_index)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, collate_fn=collate, drop_last=True)
    batches = iter(loader)

    def step() -> int:
        batch = next(batches)
        tokens, labels = batch["tokens"].to(device), batch["labels"].to(device)
        num_tokens = int((labels != loss_fn.ignore_index).sum())
        # shift as the recipes do: append an ignored label instead of slicing the logits
        ignore = torch.full((labels.shape[0], 1), loss_fn.ignore_index, device=device)
        labels = torch.hstack((labels[..., 1:], ignore))
        logits = model(tokens)
        loss = loss_fn(logits, labels) * num_tokens
        del logits
        loss.backward()
        return num_tokens

    return step


def run_floor_worker(config_path: str) -> int:
    """``--floor-worker CONFIG``: run the floor for the config's steps, logging like a recipe."""
    import torch
    from omegaconf import OmegaConf
    from torchtune import config, training, utils

    cfg = OmegaConf.load(config_path)
    step = floor_stepper(cfg)
    logger = config.instantiate(cfg.metric_logger)
    device = utils.get_device(cfg.device)
    for i in range(1, cfg.max_steps_per_epoch + 1):
        t0 = time.perf_counter()
        num_tokens = step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        metrics = {"loss": 0.0, "tokens_per_second_per_gpu": num_tokens / (time.perf_counter() - t0)}
        if device.type == "cuda":
            metrics.update(training.get_memory_stats(device=device))
        logger.log_dict(metrics, step=i)
    logger.close()
    return 0


# --- recipes in-process (for --profile) -----------------------------------------------------
def recipe_stepper(method: Method, cfg) -> Callable[[], Any]:
    """Set up ``method``'s recipe in this process; return a function running one optimizer step."""
    from torchtune import training, utils

    if method.recipe == FLOOR:
        return floor_stepper(cfg)
    if method.recipe == OURS:
        import xgblora_finetune

        recipe = xgblora_finetune.XGBLoRAFinetuneRecipeSingleDevice(cfg=cfg)
    else:
        from torchtune_xgb.torchtune_recipes import load_recipe_module

        recipe = load_recipe_module(method.recipe).LoRAFinetuneRecipeSingleDevice(cfg=cfg)
    recipe.setup(cfg=cfg)
    batches = iter(recipe._dataloader)
    if method.recipe == OURS:
        return lambda: recipe._train_step(batches)

    def step() -> None:  # torchtune's LoRA loop body, one optimizer step
        batch = next(batches)
        utils.batch_to_device(batch, recipe._device)
        num_tokens = (batch["labels"] != recipe._loss_fn.ignore_index).sum()
        loss = recipe._loss_step(batch) * num_tokens
        loss.backward()
        training.scale_grads(recipe._model, 1 / num_tokens)
        recipe._optimizer.step()
        recipe._optimizer.zero_grad(set_to_none=True)
        recipe._lr_scheduler.step()

    return step


def profile_ops(rows: List[Method], args, steps: int = 4, warmup: int = 2, top: int = 15) -> str:
    """Profile ``steps`` steps of each method in-process; a markdown table of self time per op."""
    import gc

    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = args.device.startswith("cuda")
    per_method: Dict[str, Dict[str, float]] = {}
    for method in rows:
        cfg = build_config(method, args.workdir / "profile" / slug(method.name), steps=steps + warmup + 1,
                           batch_size=args.batch_size, device=args.device, dtype=args.dtype, model=args.model)
        step = recipe_stepper(method, cfg)
        for _ in range(warmup):
            step()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            for _ in range(steps):
                step()
            if cuda:
                torch.cuda.synchronize()
        key = "self_device_time_total" if cuda else "self_cpu_time_total"
        per_method[method.name] = {e.key: getattr(e, key) / 1000 / steps for e in prof.key_averages()}
        del step, prof
        gc.collect()
    names = [m.name for m in rows]
    ref = per_method[BOOSTED] if BOOSTED in per_method else per_method[names[0]]
    ops = sorted(ref, key=ref.get, reverse=True)[:top]
    table = markdown_table(
        ["op (self time, ms/step)"] + names,
        [[f"`{op}`"] + [fmt(per_method[n].get(op, 0.0), ".1f") for n in names] for op in ops]
        + [["**total**"] + [fmt(sum(per_method[n].values()), ".1f") for n in names]],
    )
    return f"Top operators by self {'CUDA' if cuda else 'CPU'} time, {steps} profiled steps after {warmup} warm-up steps:\n\n{table}"


# --- running and aggregating ----------------------------------------------------------------
def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_").lower()


def run_once(method: Method, args, repeat: int) -> Dict[str, Any]:
    """One run of one row: the raw numbers from its log, summary and process."""
    out_dir = clean_dir(args.workdir / f"{slug(method.name)}_{repeat}")
    cfg = build_config(method, out_dir, steps=args.steps, batch_size=args.batch_size, device=args.device,
                       dtype=args.dtype, model=args.model, extra=parse_sets(args.set))
    config_path = write_config(cfg, out_dir / "config.yaml")
    if method.recipe == FLOOR:
        cmd = [sys.executable, "-m", "benchmarks.throughput", "--floor-worker", str(config_path)]
    else:
        cmd = tune_command(method.recipe, config_path)
    result = run_subprocess(cmd, out_dir / "stdout.txt")
    raw: Dict[str, Any] = {"method": method.name, "repeat": repeat, "returncode": result.returncode,
                           "process_seconds": result.wall_seconds, "peak_rss_bytes": result.peak_rss_bytes}
    if result.returncode != 0:
        print(f"  {method.name}: FAILED (exit {result.returncode}); last lines of {result.stdout_path}:\n{tail(result.stdout_path)}")
        return raw
    shutil.rmtree(out_dir / "epoch_0", ignore_errors=True)  # the exported model: not needed, ~0.5 GB
    lines = read_log(out_dir)
    raw["step_seconds"] = step_seconds(lines, skip=args.warmup)
    raw["tokens_per_second"] = logged_median(lines, "tokens_per_second_per_gpu", skip=args.warmup)
    raw["cuda_peak_alloc_gib"] = logged_max(lines, "peak_memory_alloc")
    raw["trainable_params"] = logged_max(lines, "trainable_params")
    summary_path = out_dir / "xgb_summary.json"
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
        raw["merge_seconds"] = summary["merge_seconds"]
        raw["wall_seconds"] = summary["wall_seconds"]
        raw["merges"] = sum(1 for r in summary["round_reports"] if r.get("merged_modules"))
        raw["trainable_params"] = summary["trainable_params"]
    elif method.recipe == TORCHTUNE_LORA:
        raw["trainable_params"] = count_params(cfg.model)["adapter"]
    elif method.recipe == FLOOR:
        raw["trainable_params"] = 0
    print(f"  {method.name}: median step {median_or_none(raw['step_seconds']) or float('nan'):.3f} s "
          f"({result.wall_seconds:.0f} s in all)")
    return raw


def aggregate(name: str, runs: List[Dict[str, Any]], kappa: int, cuda: bool) -> Dict[str, Any]:
    """Pool a row's runs: median step time over all post-warm-up steps of all repeats, etc."""
    ok = [r for r in runs if r["returncode"] == 0]
    row: Dict[str, Any] = {"method": name, "runs": len(runs), "failed": len(runs) - len(ok)}
    if not ok:
        return row
    steps = [s for r in ok for s in r["step_seconds"]]
    row["step_seconds"] = median_or_none(steps)
    row["step_seconds_per_repeat"] = [median_or_none(r["step_seconds"]) for r in ok]
    row["tokens_per_second"] = median_or_none([r["tokens_per_second"] for r in ok if r["tokens_per_second"]])
    if cuda:
        row["peak_memory_gib"] = max((r["cuda_peak_alloc_gib"] or 0.0) for r in ok) or None
    else:
        row["peak_memory_gib"] = statistics.median(r["peak_rss_bytes"] for r in ok) / GIB
    row["trainable_params"] = ok[0].get("trainable_params")
    if "merge_seconds" in ok[0]:
        row["merge_share"] = statistics.median(r["merge_seconds"] / r["wall_seconds"] for r in ok)
        merges = sum(r["merges"] for r in ok)
        row["seconds_per_merge"] = sum(r["merge_seconds"] for r in ok) / merges if merges else None
    return row


def merge_share_at(row: Dict[str, Any], kappa: int) -> Optional[float]:
    """Merge overhead share at ``kappa``: seconds per merge / (seconds per merge + κ median steps)."""
    per_merge, step = row.get("seconds_per_merge"), row.get("step_seconds")
    if per_merge is None or not step:
        return None
    return per_merge / (per_merge + kappa * step)


def ratio(rows: Dict[str, Dict[str, Any]], num: str, den: str, key: str = "step_seconds") -> Optional[float]:
    a, b = rows.get(num, {}).get(key), rows.get(den, {}).get(key)
    return a / b if a is not None and b else None


def goals(rows: Dict[str, Dict[str, Any]], kappa: int) -> List[Dict[str, Any]]:
    """Issue 6's goals with the measured values; ``passed`` is None where a row is missing."""
    boosted = rows.get(BOOSTED, {})
    share50 = merge_share_at(boosted, 50)
    mem = ratio(rows, BOOSTED, LORA_R8, "peak_memory_gib")
    out = [
        ("boosted rank-1 step time ≤ 0.98 × torchtune LoRA r=8", ratio(rows, BOOSTED, LORA_R8), 0.98, "×"),
        ("LoRA-XS r=16 step time ≤ 1.02 × torchtune LoRA r=16", ratio(rows, LORAXS, LORA_R16), 1.02, "×"),
        ("merge + re-init + reset ≤ 0.5% of wall time at κ=50"
         + ("" if kappa == 50 else f" (from seconds/merge measured at κ={kappa})"), share50, 0.005, "%"),
        ("peak memory (boosted) ≤ torchtune LoRA r=8", mem, 1.0, "×"),
        ("boosted rank-1 step time ≤ 1.05 × bare frozen base", ratio(rows, BOOSTED, FLOOR_NAME), 1.05, "×"),
    ]
    result = []
    for text, value, limit, unit in out:
        shown = None if value is None else (f"{value:.2%}" if unit == "%" else f"{value:.3f}×")
        result.append({"goal": text, "value": value, "shown": shown, "limit": limit,
                       "passed": None if value is None else value <= limit})
    return result


def render(rows: List[Dict[str, Any]], goal_list: List[Dict[str, Any]], header: Dict[str, Any]) -> str:
    """The markdown report: header, table, goals."""
    by_name = {r["method"]: r for r in rows}
    mem_label = "CUDA max allocated (GiB)" if header["device"].startswith("cuda") else "peak RSS (GiB)"
    table = markdown_table(
        ["method", "median step (s)", "× LoRA r=8", "tokens/s", mem_label, "merge share", "trainable params/step"],
        [
            [
                r["method"] + (f" ({r['failed']}/{r['runs']} runs failed)" if r.get("failed") else ""),
                fmt(r.get("step_seconds"), ".3f"),
                fmt(ratio(by_name, r["method"], LORA_R8), ".3f"),
                fmt(r.get("tokens_per_second"), ".0f"),
                fmt(r.get("peak_memory_gib"), ".2f"),
                fmt(r.get("merge_share"), ".2%"),
                None if r.get("trainable_params") is None else f"{int(r['trainable_params']):,}",
            ]
            for r in rows
        ],
    )
    lines = [
        f"## Throughput: {header['model']}, {header['date']}",
        "",
        f"Hardware: {header['hardware']}. Device {header['device']}, dtype {header['dtype']}, batch "
        f"{header['batch_size']}, max_seq_len {header['max_seq_len']}, {header['steps']} steps per run "
        f"(median over steps > {header['warmup']}), {header['repeats']} interleaved repeats, κ = {header['kappa']}.",
        "",
        table,
        "",
        "tokens/s: label tokens per second as torchtune logs it. Merge share: merge + re-init + optimizer "
        "reset seconds / run wall time (`xgb_summary.json`). Peak memory on CPU: peak RSS of the whole "
        "process (model load, training and export).",
        "",
        "Goals (issue 6):",
        "",
    ]
    for g in goal_list:
        verdict = "n/a (row missing)" if g["passed"] is None else ("PASS" if g["passed"] else "MISS")
        lines.append(f"- {verdict}: {g['goal']}" + (f" — measured {g['shown']}" if g["shown"] else ""))
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60, help="optimizer steps per run (default 60)")
    p.add_argument("--repeats", type=int, default=2, help="interleaved repeats of every row (default 2)")
    p.add_argument("--warmup", type=int, default=3, help="first steps left out of the medians (default 3)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--kappa", type=int, default=50, help="κ = boost.steps_per_round of the boosted rows (default 50)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", help="fp32 | bf16 (bf16 on GPUs; CPUs without bf16 units are faster in fp32)")
    p.add_argument("--model", default="smollm2-135m", choices=["smollm2-135m", "1b-random"])
    p.add_argument("--only", nargs="*", default=None, help="run only the rows whose name contains one of these strings")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every row (YAML value), e.g. tokenizer.max_seq_len=2048")
    p.add_argument("--profile", action="store_true", help="also profile a few steps of each recipe in-process")
    p.add_argument("--workdir", type=Path, default=REPO / "outputs" / "bench" / "throughput")
    p.add_argument("--out", type=Path, default=None, help="also write the report to OUT (.md) and raw numbers to OUT.json")
    p.add_argument("--floor-worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.floor_worker:
        return run_floor_worker(args.floor_worker)
    if args.steps <= args.warmup + 1:
        sys.exit("error: --steps must exceed --warmup + 1")
    if not args.set:
        check_model_ready(args.model)
    rows = available(methods(args.kappa))
    if args.only:
        rows = [m for m in rows if any(s.lower() in m.name.lower() for s in args.only)]
    raw: Dict[str, List[Dict[str, Any]]] = {m.name: [] for m in rows}
    for repeat in range(args.repeats):
        print(f"repeat {repeat + 1}/{args.repeats}")
        for method in rows:
            raw[method.name].append(run_once(method, args, repeat))
    cuda = args.device.startswith("cuda")
    table_rows = [aggregate(m.name, raw[m.name], args.kappa, cuda) for m in rows]
    goal_list = goals({r["method"]: r for r in table_rows}, args.kappa)
    max_seq_len = build_config(rows[0], args.workdir, steps=1, batch_size=1, device=args.device,
                               dtype=args.dtype, model=args.model, extra=parse_sets(args.set)).tokenizer.max_seq_len
    header = {"model": args.model, "date": today(), "hardware": hardware(args.device), "device": args.device,
              "dtype": args.dtype, "batch_size": args.batch_size, "max_seq_len": max_seq_len, "steps": args.steps,
              "warmup": args.warmup, "repeats": args.repeats, "kappa": args.kappa}
    report = render(table_rows, goal_list, header)
    print("\n" + report)
    save(args.out, report, {"header": header, "rows": table_rows, "goals": goal_list, "runs": raw})
    if args.profile:  # after the table is saved: a failure here must not lose the measurements
        profile = profile_ops([m for m in rows if m.name in (FLOOR_NAME, LORA_R8, BOOSTED)], args)
        print("\n" + profile)
        save(args.out, report + "\n\n" + profile, None)
    return 0


def save(out: Optional[Path], report: str, numbers: Optional[Dict[str, Any]]) -> None:
    """Write the report to ``out`` (markdown) and, if given, the raw numbers to ``out.json``."""
    if out is None:
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report + "\n")
    if numbers is not None:
        out.with_suffix(".json").write_text(json.dumps(numbers, indent=2, default=str))


if __name__ == "__main__":
    sys.exit(main())
