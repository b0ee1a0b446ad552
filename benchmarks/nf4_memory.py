"""Peak memory of a QLoRA-style XGBLoRA run (NF4 base + merged state) vs torchtune's own QLoRA.

    python -m benchmarks.nf4_memory                                  # 100 rounds, batch 2, CPU
    python -m benchmarks.nf4_memory --rounds 100 --out benchmarks/results/nf4_memory_cpu.md
    python -m benchmarks.nf4_memory --rounds 20 --project-to 100    # CPU-friendly: measure 20, project 100
    python -m benchmarks.nf4_memory --device cuda --rounds 100       # on a GPU

Rows, all on SmolLM2-135M-Instruct with NF4 base weights, the same data, batch, sequence length
and steps (configs generated from the packaged ``smollm2_135m_xgblora_nf4``):

- torchtune QLoRA r=8: torchtune's ``lora_finetune_single_device`` with ``quantize_base=True``,
  run through ``benchmarks.torchtune_nf4_recipe`` (stock torchao blocks cannot build SmolLM2's
  576×576 projections; that wrapper only supplies the blocks our recipe uses);
- XGBLoRA NF4, κ = 1: one merge per step, so ``--rounds`` steps are that many rounds, every merge
  adds a rank-1 factor pair to each merged module's ledger: the worst case for memory;
- the same with ``blocks_per_round`` from ``--blocks`` (default 0.34, the paper's third).

Peak memory is the peak RSS of the whole process on CPU (model load, training and export: both
recipes export a merged bf16 model), with glibc's mmap threshold fixed for every row (see
``ALLOCATOR_ENV``), CUDA max allocated from torchtune's memory stats on GPUs.
The merged state's own size comes from ``xgb_summary.json`` (``merged_state_bytes``); it grows
linearly with rounds (2·(out+in) bytes per merged module and round for bf16 adapters, stored
exactly in bf16; 4·(out+in) for fp32 ones; until a module's ledger turns dense), and the table prints the per-round growth next to it. NF4 steps are slow on CPUs (torchao
dequantizes every weight in every forward and backward, ~10 s per step on 2 cores), so a CPU run
may measure fewer rounds and ``--project-to`` adds the measured per-round growth of the merged
state to the measured peak. That assumes nothing else grows with rounds: check it with one direct
run at the target (a projection from 20 rounds once hid an 8 MiB-per-round leak that only
``--rounds 100`` showed).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List

from benchmarks.common import (
    GIB,
    OURS,
    REPO,
    TORCHTUNE_LORA,
    Method,
    build_config,
    check_model_ready,
    clean_dir,
    fmt,
    hardware,
    logged_max,
    markdown_table,
    parse_sets,
    read_log,
    run_subprocess,
    tail,
    today,
    tune_command,
    write_config,
    write_report,
)

NF4_CONFIG = "smollm2_135m_xgblora_nf4"
# glibc's dynamic mmap threshold lets NF4 quantization's many transient buffers fragment the heap:
# the same 3-step run peaked anywhere from 1.9 to 3.4 GiB RSS. A fixed threshold returns every
# large freed buffer to the OS, so RSS tracks live memory for every row.
# (4 MiB rather than glibc's 128 KiB floor: smaller thresholds mmap every activation and ran 2×
# slower; with 4 MiB the same 3-step run peaked at 1.43 GiB, 64 KiB gave 1.27 GiB.)
ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": str(4 * 1024**2), "MALLOC_TRIM_THRESHOLD_": "0"}
MIB = 1024**2
GOAL = 1.05  # issue 4: peak memory ≤ 1.05 × torchtune's QLoRA at 100 rounds


def methods(blocks: List[str]) -> List[Method]:
    rows = [Method("torchtune QLoRA r=8", TORCHTUNE_LORA, NF4_CONFIG, {"model.lora_rank": 8, "model.lora_alpha": 16})]
    for b in blocks:
        label = "all blocks" if b == "all" else f"blocks_per_round {b}"
        overrides = {"boost.steps_per_round": 1, "boost.rewarmup_steps": 0, "boost.blocks_per_round": b if b == "all" else float(b)}
        rows.append(Method(f"XGBLoRA NF4 κ=1, {label}", OURS, NF4_CONFIG, overrides))
    return rows


def command(method: Method, config_path: Path) -> List[str]:
    if method.recipe == TORCHTUNE_LORA:
        return [sys.executable, "-m", "benchmarks.torchtune_nf4_recipe", method.recipe, "--config", str(config_path)]
    return tune_command(method.recipe, config_path)


def run_one(method: Method, args: argparse.Namespace, index: int) -> Dict[str, Any]:
    out_dir = clean_dir(args.workdir / f"run{index}")
    cfg = build_config(method, out_dir, steps=args.rounds, batch_size=args.batch_size, device=args.device, dtype="bf16",
                       model=args.model, extra=parse_sets(args.set))
    config_path = write_config(cfg, out_dir / "config.yaml")
    print(f"run {index + 1}: {method.name} ({args.rounds} steps)", flush=True)
    result = run_subprocess(command(method, config_path), out_dir / "stdout.txt", extra_env=ALLOCATOR_ENV)
    if result.returncode != 0:
        print(f"error: {method.name} failed (exit {result.returncode}); last lines of {result.stdout_path}:\n{tail(result.stdout_path)}")
        return {"name": method.name, "failed": True}
    row: Dict[str, Any] = {"name": method.name, "failed": False, "process_seconds": result.wall_seconds}
    if args.device.startswith("cuda"):
        row["peak_gib"] = logged_max(read_log(out_dir), "peak_memory_alloc")
    else:
        row["peak_gib"] = result.peak_rss_bytes / GIB
    summary_path = out_dir / "xgb_summary.json"
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
        row["rounds"] = summary["rounds"]
        row["merged_state_bytes"] = summary["merged_state_bytes"]
        row["min_kept_fraction"] = summary["min_kept_fraction"]
    if not args.keep_checkpoints:
        for path in out_dir.glob("epoch_*"):
            clean_dir(path).rmdir()
    return row


def report(header: Dict[str, Any], rows: List[Dict[str, Any]]) -> str:
    base = next((r for r in rows if r["name"].startswith("torchtune") and not r["failed"]), None)
    mem_label = "CUDA max allocated (GiB)" if header["device"].startswith("cuda") else "peak RSS (GiB)"
    table_rows = []
    for r in rows:
        if r["failed"]:
            table_rows.append([r["name"], "failed", None, None, None, None, None])
            continue
        ratio = r["peak_gib"] / base["peak_gib"] if base and r["peak_gib"] else None
        state = r.get("merged_state_bytes")
        per_round = state / r["rounds"] / MIB if state is not None and r.get("rounds") else None
        table_rows.append([
            r["name"], fmt(r["peak_gib"], ".3f"), fmt(ratio, ".3f"), r.get("rounds"),
            fmt(state / MIB if state is not None else None, ".1f"), fmt(per_round, ".2f"),
            fmt(r.get("min_kept_fraction"), ".5f"),
        ])
    target = header.get("project_to")
    projections = []
    for r in rows:
        if r["failed"] or r is base or not base or r.get("merged_state_bytes") is None or not target or target <= r["rounds"]:
            continue
        # only the merged state grows with rounds (factor ledgers: linear until a module turns dense,
        # which takes ≥ 288 rounds on SmolLM2's smallest projections, ≥ 576 with bf16 factors), so add its growth to the peak
        extra = r["merged_state_bytes"] / r["rounds"] * (target - r["rounds"])
        ratio = (r["peak_gib"] + extra / GIB) / base["peak_gib"]
        projections.append(
            f"- {'PASS' if ratio <= GOAL else 'MISS'} (projected): {r['name']} at {target} rounds — "
            f"{r['peak_gib'] + extra / GIB:.3f} GiB, {ratio:.3f}× (measured peak + {extra / MIB:.1f} MiB of merged state)"
        )
    lines = [
        f"## NF4 memory: {header.get('model', 'smollm2-135m')}, {header['date']}",
        "",
        f"Hardware: {header['hardware']}. Device {header['device']}, bf16 compute, NF4 base weights, batch "
        f"{header['batch_size']}, {header['rounds']} steps per run (XGBLoRA: κ = 1, so {header['rounds']} rounds). "
        "CPU rows run with glibc's mmap threshold fixed at 4 MiB (RSS = live memory, not heap fragmentation).",
        "",
        markdown_table(
            ["run", mem_label, "× torchtune QLoRA", "rounds", "merged state (MiB)", "MiB per round", "min kept fraction"],
            table_rows,
        ),
        "",
        "Peak memory covers model load, training and export for both recipes. The merged state is "
        "rank-1 factor pairs (2·(out+in) bytes per merged module and round for bf16 adapters, stored "
        "exactly in bf16; 4·(out+in) for fp32 ones); its growth is linear in rounds.",
        "",
        f"Goal (issue 4): peak memory ≤ {GOAL} × torchtune QLoRA (measured at {header['rounds']} rounds):",
        "",
    ]
    for r in rows:
        if r["failed"] or r is base or not base:
            continue
        ratio = r["peak_gib"] / base["peak_gib"]
        lines.append(f"- {'PASS' if ratio <= GOAL else 'MISS'}: {r['name']} — measured {ratio:.3f}×")
    if projections:
        lines += ["", f"Projected to {target} rounds (goal ≤ {GOAL}×):", ""] + projections
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=100, help="steps per run = XGBLoRA rounds at κ=1 (default 100)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--project-to", type=int, default=100,
                   help="also project the peak to this many rounds from the measured merged-state growth (default 100)")
    p.add_argument("--blocks", nargs="*", default=["all", "0.34"], help="blocks_per_round of the XGBLoRA rows")
    p.add_argument("--device", default="cpu")
    p.add_argument("--workdir", type=Path, default=REPO / "outputs" / "bench" / "nf4_memory")
    p.add_argument("--keep-checkpoints", action="store_true")
    p.add_argument("--model", default="smollm2-135m", choices=["smollm2-135m", "1b-random"])
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override for every row (YAML value)")
    p.add_argument("--out", type=Path, default=None, help="also write the table to OUT (.md) and OUT.json")
    args = p.parse_args(argv)
    if not args.set:
        check_model_ready(args.model)
    header = {"date": today(), "hardware": hardware(args.device), "device": args.device, "model": args.model,
              "batch_size": args.batch_size, "rounds": args.rounds, "project_to": args.project_to}
    rows = [run_one(m, args, i) for i, m in enumerate(methods(args.blocks))]
    text = report(header, rows)
    print(text)
    if args.out is not None:
        write_report(args.out, text, {"header": header, "rows": rows})
    return 0 if all(not r["failed"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
