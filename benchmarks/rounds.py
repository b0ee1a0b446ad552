"""Cost per step, per merge and per resume checkpoint at rounds 1 / 100 / 500, next to torchtune.

    python -m benchmarks.rounds                                   # SmolLM2-135M on the CPU
    python -m benchmarks.rounds --quick --out /tmp/rounds.md      # the 2-layer test model, seconds
    python -m benchmarks.rounds --device cuda --model 1b-random --bases bf16 nf4   # on a GPU

For each base (``--bases``: fp32, bf16, NF4) one setup of torchtune's own LoRA recipe (r=8; with
an NF4 base that is QLoRA) and one of ours, built in this process (``--isolate``: each in its own
subprocess, so CPU peak memory is that setup's alone), on the same model, data, batch, sequence
length and dtype. For each round count k (``--rounds``) our recipe's merged state is given k
random rank-1 rounds directly (benchmarks/round_counts.simulate_rounds: what a resume at round k
would load; training k rounds would take hours), then:

- step: median wall time of ``--steps`` optimizer steps after ``--warmup`` (no merge among them);
- memory: CUDA max allocated during those steps, or on a CPU the process's resident memory after
  them (peak RSS only means something per process: ``--isolate``);
- merge: merge + re-init + optimizer reset of an end of round (adapters given random updates), the
  median of ``--repeats``, and its share of wall time at κ = ``--kappa``: merge / (merge + κ·step);
- checkpoint: wall time (the median of ``--repeats``, one after each of those ends of round) and
  bytes (the largest) of a resume checkpoint written just after round k (the sealed ledger
  segments before k already on disk, as in a run);
- counted (deterministic): FLOPs and bytes touched by one forward + backward of every adapted
  module (all that merged rounds could add to a step) and by one end of round.

The table names the hardware; PASS/MISS lines check the goals of issue 26: the step at the last
round count within 5% of the step at the first, memory within 5% of torchtune's, merge share
≤ 0.5%, checkpoint writes not growing (within 25% + 1 ms of the first round count's; their bytes
are bounded by the segment length, not the round count).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

from benchmarks.common import REPO, fmt, hardware, markdown_table, today, write_report

BASES = ("fp32", "bf16", "nf4")
GOAL_STEP, GOAL_MEMORY, GOAL_MERGE_SHARE = 1.05, 1.05, 0.005
MIB = 1024**2


# --- configs ----------------------------------------------------------------------------------
def our_config(args, base: str, out: Path) -> Dict[str, Any]:
    """Our recipe's config for ``base``: no merges or saves during the timed steps (those are
    triggered by hand), no evaluation."""
    if args.quick:
        from tests.e2e_fixture import tiny_config, tiny_nf4_config

        root = args.workdir / "tiny"
        root.mkdir(parents=True, exist_ok=True)
        cfg = tiny_nf4_config(root, out) if base == "nf4" else tiny_config(root, out, dtype=base)
        cfg.pop("eval", None)
        cfg.update(device=args.device, batch_size=args.batch_size, max_steps_per_epoch=None, save_every_n_steps=None)
    else:
        from omegaconf import OmegaConf

        from benchmarks.common import OURS, Method, build_config

        name = "smollm2_135m_xgblora_nf4" if base == "nf4" else "smollm2_135m_xgblora"
        built = build_config(Method("XGBLoRA", OURS, name), out, steps=10**6, batch_size=args.batch_size,
                             device=args.device, dtype="bf16" if base == "nf4" else base, model=args.model)
        cfg = OmegaConf.to_container(built, resolve=True)
        cfg.update(max_steps_per_epoch=None, save_every_n_steps=None)
    cfg["boost"] = dict(cfg.get("boost") or {}, steps_per_round=10**9, rewarmup_steps=0)
    cfg["overwrite_output_dir"] = True  # a rerun replaces what the last one recorded writing there
    if args.nf4_view_rank is not None:  # the alternative: an exact view whose rank grows with the rounds
        cfg["boost"]["nf4_view_rank"] = None if args.nf4_view_rank == "none" else int(args.nf4_view_rank)
    cfg["metric_logger"] = {"_component_": "torchtune.training.metric_logging.DiskLogger", "log_dir": str(out / "logs")}
    return apply_sets(cfg, args.set)


def apply_sets(cfg: Dict[str, Any], items: List[str]) -> Dict[str, Any]:
    """``cfg`` with ``--set KEY=VALUE`` overrides (dotted keys, JSON or YAML values) applied last,
    so both recipes of a base see the same model, data and lengths."""
    if not items:
        return cfg
    from omegaconf import OmegaConf

    from benchmarks.common import parse_sets

    merged = OmegaConf.create(cfg)
    for key, value in parse_sets(items).items():
        OmegaConf.update(merged, key, value, merge=False, force_add=True)
    return OmegaConf.to_container(merged, resolve=True)


def torchtune_config(args, base: str, out: Path) -> Dict[str, Any]:
    """torchtune's LoRA recipe (QLoRA with an NF4 base), rank 8, on the same model and data."""
    cfg = our_config(args, base, out)
    for key in ("boost", "eval", "adapter", "save_every_n_steps", "overwrite_output_dir"):
        cfg.pop(key, None)
    cfg["model"] = dict(cfg["model"], lora_rank=8, lora_alpha=16)
    return cfg


# --- measuring one setup ---------------------------------------------------------------------
def _cycle(loader):
    while True:
        yield from loader


def _memory(device: str) -> float:
    """MiB: CUDA max allocated since the last reset, or this process's resident memory now."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / MIB
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MIB


def _timed_steps(step, args) -> Dict[str, float]:
    import torch

    cuda = args.device.startswith("cuda")
    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    seconds = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return {"step_seconds": statistics.median(seconds), "memory_mib": _memory(args.device),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def measure_torchtune(args, base: str) -> Dict[str, Any]:
    from omegaconf import OmegaConf

    from benchmarks.common import TORCHTUNE_LORA, Method
    from benchmarks.throughput import recipe_stepper
    from torchtune_xgb.quant.nf4 import fitting_nf4_blocks

    out = args.workdir / f"torchtune_{base}"
    cfg = OmegaConf.create(torchtune_config(args, base, out))
    with fitting_nf4_blocks():  # the blocks SmolLM2 needs (benchmarks/torchtune_nf4_recipe.py)
        step = recipe_stepper(Method("torchtune", TORCHTUNE_LORA), cfg)
    return {"base": base, "run": "torchtune QLoRA r=8" if base == "nf4" else "torchtune LoRA r=8",
            **_timed_steps(step, args)}


def measure_ours(args, base: str) -> List[Dict[str, Any]]:
    import torch
    from omegaconf import OmegaConf

    import xgblora_finetune
    from benchmarks.round_counts import count_work, merge_counts, perturb_adapters, simulate_rounds, step_of_adapted_modules
    from torchtune_xgb.run.checkpointing import resume_root
    from torchtune_xgb.run.ledger_segments import write_segments

    out = args.workdir / f"ours_{base}"
    cfg = OmegaConf.create(our_config(args, base, out))
    recipe = xgblora_finetune.XGBLoRAFinetuneRecipeSingleDevice(cfg=cfg)
    recipe.setup(cfg=cfg)
    booster = recipe._booster
    batches = _cycle(recipe._dataloader)
    recipe._train_start = time.perf_counter()
    rows = []
    for k in args.rounds:
        simulate_rounds(booster, k, seed=k)
        # the segments sealed before round k are on disk already, as in a run that got here
        sealed = [{"index": i, "rounds": [i * booster.merged.segment_rounds, (i + 1) * booster.merged.segment_rounds],
                   "merged": {}, "reports": []} for i in range(booster.merged.sealed_segments)]
        recipe._segment_entries = write_segments(resume_root(recipe._output_dir), sealed)
        view = "" if base != "nf4" or args.nf4_view_rank is None else f", view rank {args.nf4_view_rank}"
        row: Dict[str, Any] = {"base": base, "run": f"XGBLoRA {base}{view}", "rounds": k}
        row.update(_timed_steps(lambda: recipe._train_step(batches), args))
        row["step_counts"] = count_work(step_of_adapted_modules(booster))
        row["merge_counts"] = merge_counts(booster, seed=k)
        # --repeats ends of round, each followed by a resume checkpoint: medians (one sample of a
        # merge or a save is noise-sized on a shared machine); the rounds they add (k+2 … k+1+n)
        # stay within a few of k
        merges, saves, written = [], [], []
        for i in range(args.repeats):
            perturb_adapters(booster, seed=k + 1 + i)
            report = booster.end_round()
            merges.append(report.merge_seconds + report.reset_seconds)
            root = resume_root(recipe._output_dir)
            before = {p: p.stat().st_size for p in root.rglob("*") if p.is_file()}
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            recipe._save_resume()
            saves.append(time.perf_counter() - start)
            written.append(sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and before.get(p) != p.stat().st_size))
        row.update(merge_seconds=statistics.median(merges), checkpoint_seconds=statistics.median(saves),
                   checkpoint_bytes=max(written), merge_samples=merges, checkpoint_samples=saves)
        if args.profile_merge and k == args.rounds[-1]:
            perturb_adapters(booster, seed=k + 1 + args.repeats)
            row["merge_profile"] = profile_end_of_round(booster, args.device.startswith("cuda"))
        rows.append(row)
        print(f"  {base} k={k}: step {row['step_seconds']:.4f} s, merge {row['merge_seconds']:.4f} s, "
              f"checkpoint {row['checkpoint_seconds']:.4f} s", flush=True)
    return rows


def profile_end_of_round(booster, cuda: bool, top: int = 12) -> Dict[str, Any]:
    """One end of round under torch.profiler: its wall time, the summed self time of every op
    on the host and (CUDA) on the device, and the ``top`` ops by self time there (device time on
    CUDA, host time on a CPU). Device time well under the wall time means the merge waits on the
    host (launches, synchronisations, copies), not on the GPU's arithmetic."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        booster.end_round()
        if cuda:
            torch.cuda.synchronize()
    wall = time.perf_counter() - start
    events = prof.key_averages()
    device = lambda e: getattr(e, "self_device_time_total", 0.0) / 1e3  # noqa: E731  (ms)
    host = lambda e: e.self_cpu_time_total / 1e3  # noqa: E731
    ranked = sorted(events, key=device if cuda else host, reverse=True)[:top]
    return {"wall_ms": wall * 1e3, "host_ms": sum(host(e) for e in events), "device_ms": sum(device(e) for e in events),
            "top": [{"op": e.key, "calls": e.count, "host_ms": host(e), "device_ms": device(e)} for e in ranked]}


def measure(args, what: str, base: str) -> List[Dict[str, Any]]:
    return [measure_torchtune(args, base)] if what == "torchtune" else measure_ours(args, base)


def measure_isolated(args, what: str, base: str) -> List[Dict[str, Any]]:
    """:func:`measure` in a subprocess of this script (its own peak memory)."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result = Path(f.name)
    argv = [sys.executable, "-m", "benchmarks.rounds", "--worker", what, base, str(result), *args.passthrough]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO), str(REPO / "recipes"),
                                                                  os.environ.get("PYTHONPATH")) if p))
    done = subprocess.run(argv, env=env, cwd=REPO)
    if done.returncode != 0:
        return [{"base": base, "run": what, "failed": True}]
    rows = json.loads(result.read_text())
    result.unlink()
    return rows


# --- report ---------------------------------------------------------------------------------
def _share(row: Dict[str, Any], kappa: int) -> float:
    return row["merge_seconds"] / (row["merge_seconds"] + kappa * row["step_seconds"])


def goals(rows: List[Dict[str, Any]], kappa: int) -> List[str]:
    lines = []
    for base in dict.fromkeys(r["base"] for r in rows):
        ours = [r for r in rows if r["base"] == base and "rounds" in r]
        theirs = next((r for r in rows if r["base"] == base and "rounds" not in r and not r.get("failed")), None)
        if len(ours) < 2:
            continue
        first, last = ours[0], ours[-1]
        ratio = last["step_seconds"] / first["step_seconds"]
        lines.append(f"- {'PASS' if ratio <= GOAL_STEP else 'MISS'}: {base} step at round {last['rounds']} / round "
                     f"{first['rounds']} = {ratio:.3f} (≤ {GOAL_STEP})")
        if theirs is not None:
            worst = max(r["memory_mib"] for r in ours) / theirs["memory_mib"]
            lines.append(f"- {'PASS' if worst <= GOAL_MEMORY else 'MISS'}: {base} memory ≤ {GOAL_MEMORY} × "
                         f"{theirs['run']} at every round count: worst {worst:.3f}×")
        share = max(_share(r, kappa) for r in ours)
        lines.append(f"- {'PASS' if share <= GOAL_MERGE_SHARE else 'MISS'}: {base} merge + re-init + reset at κ = {kappa}: "
                     f"worst {share:.3%} (≤ {GOAL_MERGE_SHARE:.1%})")
        grows = last["checkpoint_seconds"] > 1.25 * first["checkpoint_seconds"] + 1e-3
        lines.append(f"- {'MISS' if grows else 'PASS'}: {base} checkpoint write at round {last['rounds']}: "
                     f"{last['checkpoint_seconds']:.4f} s vs {first['checkpoint_seconds']:.4f} s at round {first['rounds']}")
    return lines


def render(rows: List[Dict[str, Any]], header: Dict[str, Any]) -> str:
    mem = "CUDA max allocated (MiB)" if header["device"].startswith("cuda") else "RSS after the steps (MiB)"
    table = []
    for r in rows:
        if r.get("failed"):
            table.append([r["base"], r["run"], None, "failed"] + [None] * 10)
            continue
        theirs = next((t for t in rows if t["base"] == r["base"] and "rounds" not in t and not t.get("failed")), None)
        ratio = r["step_seconds"] / theirs["step_seconds"] if theirs and "rounds" in r else None
        step, merge = r.get("step_counts", {}), r.get("merge_counts", {})
        table.append([
            r["base"], r["run"], r.get("rounds"), fmt(r["step_seconds"], ".4f"), fmt(ratio, ".3f"), fmt(r["memory_mib"], ".0f"),
            fmt(r.get("merge_seconds"), ".4f"), fmt(_share(r, header["kappa"]), ".3%") if "merge_seconds" in r else None,
            fmt(r.get("checkpoint_seconds"), ".4f"), fmt(r["checkpoint_bytes"] / MIB, ".2f") if "checkpoint_bytes" in r else None,
            step.get("flops"), step.get("bytes"), merge.get("flops"), merge.get("bytes"),
        ])
    return "\n".join([
        f"## Rounds: cost per step, merge and checkpoint against merged rounds, {header['date']}",
        "",
        f"Hardware: {header['hardware']}. Model {header['model']}, device {header['device']}, batch {header['batch_size']}, "
        f"{header['steps']} timed steps after {header['warmup']} per row (median), merge and checkpoint the median of "
        f"{header.get('repeats', 1)} per round count (the largest checkpoint's bytes), merge share at κ = {header['kappa']}. "
        + (f"Set for every setup: {', '.join(f'`{s}`' for s in header['set'])}. " if header.get("set") else "")
        + "Rounds simulated: k random rank-1 rounds put into the merged state (as a resume would load them). "
        "Counted columns: one forward + backward of every adapted module (step) and one end of round (merge), "
        "FLOPs as torch's FlopCounterMode counts them, bytes every aten op reads + writes.",
        "",
        markdown_table(["base", "run", "rounds", "step (s)", "× torchtune", mem, "merge + reset (s)", "merge share",
                        "checkpoint write (s)", "checkpoint (MiB)", "step FLOPs", "step bytes", "merge FLOPs",
                        "merge bytes"], table),
        "",
        *render_profiles(rows, header),
        "Goals (issue 26):",
        "",
        *goals([r for r in rows if not r.get("failed")], header["kappa"]),
        "",
    ])


def render_profiles(rows: List[Dict[str, Any]], header: Dict[str, Any]) -> List[str]:
    """The ``--profile-merge`` tables (none without it)."""
    lines = []
    where = "device" if header["device"].startswith("cuda") else "host"
    for r in rows:
        prof = r.get("merge_profile")
        if not prof:
            continue
        lines += [f"One end of round under torch.profiler, {r['run']} at round {r['rounds']}: wall {prof['wall_ms']:.1f} ms, "
                  f"ops' self time {prof['host_ms']:.1f} ms on the host and {prof['device_ms']:.1f} ms on the device; "
                  f"the ops with the most {where} time:", "",
                  markdown_table(["op", "calls", "host (ms)", "device (ms)"],
                                 [[t["op"], t["calls"], fmt(t["host_ms"], ".2f"), fmt(t["device_ms"], ".2f")] for t in prof["top"]]),
                  ""]
    return lines


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the 2-layer test model, few steps (seconds)")
    p.add_argument("--rounds", type=int, nargs="*", default=[1, 100, 500])
    p.add_argument("--bases", nargs="*", default=list(BASES), choices=BASES)
    p.add_argument("--steps", type=int, default=None, help="timed steps per row (default 10; --quick 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2; --quick 1)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--kappa", type=int, default=50)
    p.add_argument("--profile-merge", action="store_true",
                   help="also profile one end of round at the last round count (torch.profiler): where a merge's time goes")
    p.add_argument("--repeats", type=int, default=3,
                   help="ends of round (each with a resume checkpoint) timed per round count; the table shows medians")
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default="smollm2-135m", choices=["smollm2-135m", "1b-random"])
    p.add_argument("--nf4-view-rank", default=None,
                   help="boost.nf4_view_rank for the NF4 rows: an integer, or 'none' for the exact view whose "
                        "rank grows with the rounds (default: the packaged config's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every setup (JSON or YAML value), e.g. tokenizer.max_seq_len=2048")
    p.add_argument("--isolate", action="store_true", help="each setup in its own subprocess (CPU peak memory)")
    p.add_argument("--workdir", type=Path, default=REPO / "outputs" / "bench" / "rounds")
    p.add_argument("--out", type=Path, default=None, help="also write the table to OUT (.md) and OUT.json")
    p.add_argument("--worker", nargs=3, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.steps = args.steps or (3 if args.quick else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    args.passthrough = [a for a in (argv if argv is not None else sys.argv[1:]) if a not in ("--isolate",)]
    if "--worker" in args.passthrough:
        args.passthrough = args.passthrough[: args.passthrough.index("--worker")]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker is not None:  # one setup, in a subprocess of --isolate
        what, base, result = args.worker
        Path(result).write_text(json.dumps(measure(args, what, base)))
        return 0
    if not args.quick:
        from benchmarks.common import check_model_ready

        check_model_ready(args.model)
    args.workdir.mkdir(parents=True, exist_ok=True)
    run = measure_isolated if args.isolate else measure
    rows = []
    for base in args.bases:
        for what in ("torchtune", "ours"):
            print(f"{what} with a {base} base", flush=True)
            rows += run(args, what, base)
    header = {"date": today(), "hardware": hardware(args.device), "device": args.device,
              "model": "2-layer test model" if args.quick else args.model, "batch_size": args.batch_size,
              "steps": args.steps, "warmup": args.warmup, "kappa": args.kappa, "set": args.set,
              "repeats": args.repeats}
    text = render(rows, header)
    print(text)
    if args.out is not None:
        write_report(args.out, text, {"header": header, "rows": rows})
    return 0 if not any(r.get("failed") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
