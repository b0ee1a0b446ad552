"""One command that proves the GPU path: CUDA tests, NCCL, throughput, NF4 memory, merge cost, compile.

    python -m benchmarks.gpu_check --out DIR [--budget-s 480] [--dry-run] [--parts a c e]

Parts, in order, each in its own subprocess under its own time limit (a share of ``--budget-s``;
time a part leaves unused goes to the next ones):

a. the CUDA tests: ``pytest -m gpu tests/gpu/test_cuda.py`` (bf16 merges with W0 on the CPU and on
   the GPU, CUDA vs CPU merges, block selection and re-initialisation vs the CPU, NF4 merges and
   export vs a CPU reference, kill + resume of a CUDA run);
b. NCCL: ``tune run --nproc_per_node 1 xgblora_finetune`` (the FSDP2 recipe: NCCL for CUDA
   tensors) on the 2-layer test model, bf16 and NF4, 3 merges each; the export is loaded back
   with torchtune's checkpointer into the plain model;
c. throughput and peak memory at the Llama-3.2-1B shape with random weights
   (``benchmarks.throughput``: torchtune LoRA r=8/16 with torchtune's own recipe, XGBLoRA rank 1 on
   all blocks and on 1/3, LoRA-XS r=16, boosted LoRA-XS, the frozen-base floor; interleaved, 2
   repeats; random 2048-token sequences, batch 4);
d. NF4 memory at the 1B shape (``benchmarks.nf4_memory``): torchtune's QLoRA recipe vs XGBLoRA NF4,
   100 rounds at κ = 1;
e. merge cost at Llama-3-8B shapes (``benchmarks.merge_cost``): real all-block merges of 224
   bf16 modules with W0 in pageable CPU, pinned CPU and GPU memory, plus re-initialisation; the
   merge share at κ = 50 against (c)'s XGBLoRA step time scaled to 8B by matmul FLOPs;
f. ``compile=True``: a few rounds of the recipe compiled, graphs compiled per round counted;
g. long runs at the 1B shape (``benchmarks.rounds``): bf16 and NF4 after 1, 100 and 500 merged
   rounds, step time, GPU memory, merge share and checkpoint write beside torchtune's LoRA and
   QLoRA recipes, each setup in its own process.

After every part ``DIR/gpu_report.md`` and ``DIR/gpu_report.json`` are rewritten (status, seconds,
the part's tables) and ``DIR/gpu_logs.tar.gz`` holds every part's log, so a part that fails or
runs out of time is recorded and the next one still runs. Work files (the 2.5 GB random 1B
checkpoint, run outputs) go to ``--workdir`` (default /tmp/gpu_check), never under DIR.

``--dry-run`` runs every part on the CPU with the 2-layer model, gloo in place of NCCL, tiny
shapes and a subset of rows (a test in ``make test`` runs it, so this script cannot rot).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

REPO = Path(__file__).resolve().parent.parent
# key → (title, share of the budget)
PARTS = {
    "a": ("CUDA tests (pytest -m gpu)", 0.16),
    "b": ("NCCL: FSDP2 recipe on 1 process, bf16, NF4 and NF4 with fsdp_cpu_offload", 0.11),
    "c": ("throughput and peak memory, Llama-3.2-1B shape", 0.31),
    "d": ("NF4 memory vs torchtune QLoRA, 1B shape, 100 rounds", 0.15),
    "e": ("merge cost at Llama-3-8B shapes", 0.12),
    "f": ("compile=True: graphs compiled per round", 0.15),
    "g": ("long runs: step time, memory, merge and checkpoint at rounds 1, 100, 500, 1B shape", 0.25),
}
TUNE = str(Path(sys.executable).with_name("tune")) if Path(sys.executable).with_name("tune").exists() else "tune"  # else on PATH


# --- the driver --------------------------------------------------------------------------------
def environment(args) -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    # `pip install --target DIR` puts console scripts (`tune`) in DIR/bin: put them on PATH
    scripts = [str(Path(p) / "bin") for p in env["PYTHONPATH"].split(os.pathsep) if (Path(p) / "bin" / "tune").exists()]
    env["PATH"] = os.pathsep.join(scripts + [env.get("PATH", "")])
    env.setdefault("TORCHTUNE_XGB_CACHE", str(args.workdir / "cache"))
    env.update(PYTHONUNBUFFERED="1", HF_DATASETS_OFFLINE="1", PYTHONHASHSEED="0")
    return env


def run_limited(cmd: List[str], log: Path, limit: float, env: Dict[str, str], cwd: Path = REPO) -> Dict[str, Any]:
    """Run ``cmd`` in its own process group with output to ``log``; kill the group at ``limit`` s."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "a") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)
        try:
            code = proc.wait(timeout=max(limit, 1))
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            code, timed_out = proc.wait(), True
    return {"returncode": code, "timed_out": timed_out, "seconds": time.perf_counter() - start}


def tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def header(args) -> Dict[str, Any]:
    import torch

    from benchmarks.common import hardware, today

    device = "cpu" if args.dry_run else "cuda"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    return {"date": today(), "hardware": hardware(device), "torch": torch.__version__,
            "cuda": torch.version.cuda, "dry_run": args.dry_run, "budget_s": args.budget_s,
            "commit": commit or None, "python": sys.version.split()[0]}


def write_report(out: Path, head: Dict[str, Any], results: List[Dict[str, Any]], workdir: Path) -> None:
    from benchmarks.common import markdown_table

    lines = [
        f"# GPU check{' (dry run: CPU, tiny shapes, gloo)' if head['dry_run'] else ''}: {head['date']}",
        "",
        f"Hardware: {head['hardware']}. torch {head['torch']} (CUDA {head['cuda']}), Python {head['python']}, "
        f"commit {head['commit']}, budget {head['budget_s']:.0f} s.",
        "",
        markdown_table(["part", "status", "seconds", "limit (s)", "summary"],
                       [[f"{r['key']}. {r['title']}", r["status"], f"{r['seconds']:.0f}", f"{r['limit']:.0f}", r.get("summary")]
                        for r in results]),
        "",
    ]
    for r in results:
        lines += [f"## {r['key']}. {r['title']} — {r['status']}", ""]
        if r.get("markdown"):  # a benchmark's own report: its headings one level down
            text = r["markdown"].strip()
            lines += [("#" + text if text.startswith("## ") else text).replace("\n## ", "\n### "), ""]
        if r["status"] != "ok":
            lines += ["Last lines of the log:", "", "```", r.get("log_tail", ""), "```", ""]
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_report.md").write_text("\n".join(lines))
    (out / "gpu_report.json").write_text(json.dumps({"header": head, "parts": results}, indent=2, default=str))
    with tarfile.open(out / "gpu_logs.tar.gz", "w:gz") as tar:
        for log in sorted((workdir / "logs").glob("*.log")):
            tar.add(log, arcname=log.name)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.part:
        return run_part(args)
    args.workdir.mkdir(parents=True, exist_ok=True)
    # results of an earlier run must never be read as this run's (the 1B checkpoint is kept)
    for stale in [*(args.workdir / "logs").glob("*.log"), *args.workdir.glob("*.json"), *args.workdir.glob("*.md")]:
        stale.unlink()
    head = header(args)
    keys = [k for k in PARTS if not args.parts or k in args.parts]
    deadline = time.perf_counter() + args.budget_s
    total_share = sum(PARTS[k][1] for k in keys)
    results: List[Dict[str, Any]] = []
    carry = 0.0
    for i, key in enumerate(keys):
        title, share = PARTS[key]
        remaining = deadline - time.perf_counter()
        limit = min(share / total_share * args.budget_s + carry, remaining)
        if limit < 5:
            results.append({"key": key, "title": title, "status": "not run (budget spent)", "seconds": 0.0, "limit": max(limit, 0)})
            write_report(args.out, head, results, args.workdir)
            continue
        print(f"[gpu_check] part {key}: {title} (limit {limit:.0f} s)", flush=True)
        log = args.workdir / "logs" / f"part_{key}.log"
        cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--part", key, "--out", str(args.out),
               "--workdir", str(args.workdir), "--limit-s", f"{limit:.0f}"] + (["--dry-run"] if args.dry_run else [])
        run = run_limited(cmd, log, limit, environment(args))
        carry = max(limit - run["seconds"], 0.0)
        result_file = args.workdir / f"part_{key}.json"
        part = json.loads(result_file.read_text()) if result_file.exists() else {}
        if run["timed_out"]:
            status = f"timed out after {limit:.0f} s"
        elif run["returncode"] != 0:
            status = f"failed (exit {run['returncode']})"
        elif not part.get("ok", False):
            status = "failed (checks)"
        else:
            status = "ok"
        results.append({"key": key, "title": title, "status": status, "seconds": run["seconds"], "limit": limit,
                        "summary": part.get("summary"), "markdown": part.get("markdown"), "data": part.get("data"),
                        "log_tail": tail(log)})
        print(f"[gpu_check] part {key}: {status} in {run['seconds']:.0f} s — {part.get('summary')}", flush=True)
        write_report(args.out, head, results, args.workdir)
    print((args.out / "gpu_report.md").read_text())
    return 0 if all(r["status"] == "ok" for r in results) else 1


# --- the parts (each runs in its own process: ``--part KEY``) ---------------------------------
def run_part(args) -> int:
    # children get the part's remaining time less a margin, so the part itself can still record
    # what they did before the driver's own limit ends it
    args.deadline = time.perf_counter() + args.limit_s - 8
    result = PART_FUNCTIONS[args.part](args)
    (args.workdir / f"part_{args.part}.json").write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps({k: result[k] for k in ("ok", "summary")}), flush=True)
    return 0


def log_path(args, name: str) -> Path:
    return args.workdir / "logs" / f"{name}.log"


def sub(args, name: str, cmd: List[str], limit: Optional[float] = None, **env_extra: str) -> Dict[str, Any]:
    """A child command of a part, logged to its own file, killed at ``limit`` seconds (default:
    what is left of the part's time)."""
    env = environment(args)
    env.update(env_extra)
    left = max(args.deadline - time.perf_counter(), 1.0)
    run = run_limited(cmd, log_path(args, name), left if limit is None else min(limit, left), env)
    run["log"] = str(log_path(args, name))
    return run


def tiny_root(args) -> Path:
    from tests.e2e_fixture import make_tiny_model_dir

    root = args.workdir / "tiny"
    make_tiny_model_dir(root)
    return root


def part_a_cuda_tests(args) -> Dict[str, Any]:
    import re

    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "tests/gpu/test_cuda.py", "-v", "-rs", "-p", "no:cacheprovider"]
    env = {}
    if args.dry_run:  # the same tests on the CPU (no pinned memory, no kill + resume run)
        cmd += ["-k", "not resume"]
        env["XGB_TEST_DEVICE"] = "cpu"
    run = sub(args, "a_pytest", cmd, **env)
    text = Path(run["log"]).read_text(errors="replace")
    # per-test lines of -v ("tests/gpu/test_cuda.py::name PASSED"): counted even if pytest was cut off
    outcomes = dict(re.findall(r"^tests/gpu/test_cuda\.py::(\S+) (PASSED|FAILED|SKIPPED|ERROR)", text, flags=re.M))
    counts: Dict[str, int] = {}
    for outcome in outcomes.values():
        counts[outcome.lower()] = counts.get(outcome.lower(), 0) + 1
    ok = run["returncode"] == 0 and counts.get("passed", 0) > 0 and not counts.get("skipped")
    summary = ", ".join(f"{n} {k}" for k, n in counts.items()) or "no test ran"
    if run["timed_out"]:
        summary += " (pytest cut off at the time limit)"
    from benchmarks.common import markdown_table

    table = markdown_table(["test", "outcome"], sorted(outcomes.items()))
    return {"ok": ok, "summary": summary, "data": dict(counts, tests=outcomes),
            "markdown": f"`{' '.join(cmd[2:])}`: {summary}.\n\n{table}"}


def part_b_nccl(args) -> Dict[str, Any]:
    import yaml

    from tests.e2e_fixture import read_metric, tiny_config, tiny_nf4_config

    root = tiny_root(args)
    device = "cpu" if args.dry_run else "cuda"
    variants = {"bf16": lambda out: tiny_config(root, out, device=device, dtype="fp32" if args.dry_run else "bf16")}
    if not args.dry_run:  # NF4 on the CPU is slow; the dry run keeps the bf16 run only
        variants["nf4"] = lambda out: dict(tiny_nf4_config(root, out), device=device)
        # torchtune's fsdp_cpu_offload (CPUOffloadPolicy: shards live on the CPU between uses, so
        # the merge works on CPU shards of the NF4 weights): GPU-only, never run before
        variants["nf4_cpu_offload"] = lambda out: dict(tiny_nf4_config(root, out), device=device, fsdp_cpu_offload=True)
    rows, ok = [], True
    for name, make in variants.items():
        out = args.workdir / f"nccl_{name}"
        cfg = make(out)
        cfg.pop("eval", None)
        # 6 steps, κ = 2: three merges (the last at the final step), no mid-run resume states
        cfg.update(max_steps_per_epoch=6, save_every_n_steps=None)
        cfg["boost"] = dict(cfg["boost"], steps_per_round=2)
        cfg_path = args.workdir / f"nccl_{name}.yaml"
        cfg_path.write_text(yaml.safe_dump(cfg))
        run = sub(args, f"b_{name}", [TUNE, "run", "--nproc_per_node", "1", "xgblora_finetune", "--config", str(cfg_path)],
                  NCCL_DEBUG="INFO")
        log = Path(run["log"]).read_text(errors="replace")
        nccl_lines = log.count("NCCL INFO")
        kept = read_metric(out, "kept_fraction") if (out / "logs" / "metrics.txt").exists() else {}
        loaded = load_export(out / "epoch_0", root) if run["returncode"] == 0 else "not run"
        # NCCL INFO lines are evidence, not a condition: a 1-process group may skip collectives
        good = run["returncode"] == 0 and len(kept) >= 3 and all(v >= 0.99 for v in kept.values()) and loaded == "ok"
        ok &= good
        rows.append([name, run["returncode"], len(kept), round(min(kept.values()), 6) if kept else None, nccl_lines, loaded,
                     f"{run['seconds']:.0f}"])
    from benchmarks.common import markdown_table

    table = markdown_table(["run", "exit", "merges", "min kept fraction", "NCCL INFO lines", "export loaded back", "seconds"], rows)
    backend = "gloo (dry run)" if args.dry_run else "cuda:nccl,cpu:gloo"
    return {"ok": ok, "summary": "; ".join(f"{r[0]}: {'ok' if r[1] == 0 else 'exit ' + str(r[1])}, {r[2]} merges, export {r[5]}" for r in rows),
            "data": rows, "markdown": f"`tune run --nproc_per_node 1 xgblora_finetune` on the 2-layer model, backend {backend}:\n\n{table}"}


def load_export(epoch_dir: Path, root: Path) -> str:
    """Load an exported checkpoint with torchtune's checkpointer into the plain model (strict)."""
    try:
        import torch
        from torchtune.models.llama3_2._component_builders import llama3_2
        from torchtune.training import FullModelHFCheckpointer

        from tests.tiny_model import TINY

        files = sorted(p.name for p in epoch_dir.glob("*.safetensors"))
        ckpt = FullModelHFCheckpointer(checkpoint_dir=str(epoch_dir), checkpoint_files=files, model_type="LLAMA3_2",
                                       output_dir=str(root / "reload"))
        state = ckpt.load_checkpoint()["model"]
        model = llama3_2(**TINY)
        model.load_state_dict(state, strict=True)
        with torch.no_grad():
            logits = model(torch.arange(12).reshape(1, 12))
        return "ok" if torch.isfinite(logits).all() else "non-finite logits"
    except Exception as err:  # recorded in the report, not raised: the part goes on
        return f"error: {type(err).__name__}: {err}"[:200]


def random_sequence_sets(seq_len: int, n: int) -> List[str]:
    """``--set`` overrides for ``n`` random sequences of ``seq_len`` tokens (benchmarks/synthetic_data.py)."""
    dataset = {"_component_": "benchmarks.synthetic_data.random_tokens", "seq_len": seq_len, "n": n}
    return ["--set", f"tokenizer.max_seq_len={seq_len}", "--set", f"dataset={json.dumps(dataset)}"]


def tiny_model_sets(root: Path, seq_len: int) -> List[str]:
    """``--set`` overrides that swap the 2-layer test model and random sequences into a benchmark."""
    from tests.e2e_fixture import tiny_config

    model = tiny_config(root, root / "unused")["model"]
    return ["--set", f"model_dir={root / 'tiny_model'}", "--set", f"model={json.dumps(model)}"] + random_sequence_sets(seq_len, 64)


def ensure_random_1b(args) -> None:
    from benchmarks.random_1b import random_1b_dir

    random_1b_dir(tokenizer_json=tiny_root(args) / "tiny_model" / "tokenizer.json")


THROUGHPUT_SEQ, THROUGHPUT_BATCH, THROUGHPUT_KAPPA = 2048, 4, 5


def part_c_throughput(args) -> Dict[str, Any]:
    """Repeats run as separate invocations (rows interleaved within each), so a repeat cut off
    by the time limit still leaves the earlier ones in the report."""
    from benchmarks import throughput

    cmd = [sys.executable, "-m", "benchmarks.throughput", "--kappa", str(THROUGHPUT_KAPPA), "--repeats", "1"]
    if args.dry_run:
        repeats = 1
        cmd += ["--device", "cpu", "--dtype", "fp32", "--steps", "4", "--warmup", "1", "--batch-size", "2",
                "--only", "LoRA r=8", "1/3 blocks"] + tiny_model_sets(tiny_root(args), 32)
    else:
        repeats = 2
        ensure_random_1b(args)
        cmd += ["--device", "cuda", "--dtype", "bf16", "--model", "1b-random", "--steps", "14", "--warmup", "4",
                "--batch-size", str(THROUGHPUT_BATCH), *random_sequence_sets(THROUGHPUT_SEQ, 256),
                "--set", 'adapter.svd={"method": "randomized"}', "--only", "LoRA r=8", "boosted", "LoRA-XS", "floor"]
    deadline = args.deadline
    raw: Dict[str, List[Dict[str, Any]]] = {}
    head, notes, last = None, [], 0.0
    for repeat in range(repeats):
        left = deadline - time.perf_counter()
        if repeat and left < 1.1 * last:
            notes.append(f"repeat {repeat + 1} not run: {left:.0f} s left, the previous took {last:.0f} s")
            break
        out = args.workdir / f"throughput_r{repeat}.md"
        run = sub(args, f"c_throughput_{repeat}", cmd + ["--out", str(out), "--workdir", str(args.workdir / f"throughput_r{repeat}")],
                  limit=max(left, 1))
        last = run["seconds"]
        if not out.with_suffix(".json").exists():
            notes.append(f"repeat {repeat + 1}: {'timed out' if run['timed_out'] else 'exit ' + str(run['returncode'])}, no report")
            break
        data = json.loads(out.with_suffix(".json").read_text())
        head = head or data["header"]
        for name, runs in data["runs"].items():
            raw.setdefault(name, []).extend(dict(r, repeat=repeat) for r in runs)
    if head is None:
        return {"ok": False, "summary": "; ".join(notes) or "no report", "data": {}, "markdown": None}
    head["repeats"] = max(len(v) for v in raw.values())
    cuda = head["device"].startswith("cuda")
    rows = [throughput.aggregate(name, runs, head["kappa"], cuda) for name, runs in raw.items()]
    goal_list = throughput.goals({r["method"]: r for r in rows}, head["kappa"])
    report = throughput.render(rows, goal_list, head) + "".join(f"\n\nNote: {n}." for n in notes)
    throughput.save(args.workdir / "throughput.md", report, {"header": head, "rows": rows, "goals": goal_list, "runs": raw})
    ok = all(not r.get("failed") and r.get("step_seconds") for r in rows) and head["repeats"] == repeats
    return {"ok": ok, "summary": throughput_summary({"rows": rows}), "data": {"header": head, "rows": rows, "notes": notes},
            "markdown": report}


def throughput_summary(data: Dict[str, Any]) -> str:
    parts = []
    for row in data.get("rows", []):
        if row.get("step_seconds"):
            parts.append(f"{row['method']}: {row['step_seconds']:.3f} s/step")
    return "; ".join(parts) or "no rows"


def benchmark_result(run: Dict[str, Any], out: Path, summarize: Callable[[Dict[str, Any]], str]) -> Dict[str, Any]:
    """A benchmark module's report (its OUT.md and OUT.json) as a part result."""
    json_path = out.with_suffix(".json")
    data = json.loads(json_path.read_text()) if json_path.exists() else {}
    rows = data.get("rows", [])
    failed = [r for r in rows if r.get("failed")]
    ok = run["returncode"] == 0 and bool(rows) and not failed
    return {"ok": ok, "summary": summarize(data) if data else f"exit {run['returncode']}, no report",
            "data": data, "markdown": out.read_text() if out.exists() else None}


def part_d_nf4(args) -> Dict[str, Any]:
    out = args.workdir / "nf4_memory.md"
    # the worst case for memory only (all blocks merged every round), next to torchtune's QLoRA
    cmd = [sys.executable, "-m", "benchmarks.nf4_memory", "--out", str(out), "--workdir", str(args.workdir / "nf4_memory"),
           "--blocks", "all"]
    if args.dry_run:
        root = tiny_root(args)
        cmd += ["--device", "cpu", "--rounds", "2", "--project-to", "0", "--batch-size", "2",
                "--set", f"model_dir={root / 'tiny_model'}",
                "--set", f"model={json.dumps(dict(tiny_model_model(root), quantize_base=True))}", "--set", "tokenizer.max_seq_len=64"]
    else:
        ensure_random_1b(args)
        cmd += ["--device", "cuda", "--model", "1b-random", "--rounds", "100", "--project-to", "0", "--batch-size", "2"]
    run = sub(args, "d_nf4_memory", cmd)
    return benchmark_result(run, out, lambda data: "; ".join(
        f"{r['name']}: {r['peak_gib']:.2f} GiB" for r in data.get("rows", []) if not r.get("failed") and r.get("peak_gib")))


def tiny_model_model(root: Path) -> Dict[str, Any]:
    from tests.e2e_fixture import tiny_config

    return tiny_config(root, root / "unused")["model"]


def part_e_merge_cost(args) -> Dict[str, Any]:
    import torch

    from benchmarks.common import fmt, markdown_table
    from benchmarks.merge_cost import scale_step_seconds, time_merges

    device = "cpu" if args.dry_run else "cuda"
    shape = "tiny" if args.dry_run else "llama3-8b"
    # pinned first (the default), then lo on the GPU, then pageable (the slowest) if time is left
    timed = time_merges(shape, ["pinned", "gpu", "pageable"], device, repeats=2, layers=2 if args.dry_run else None,
                        deadline=args.deadline)
    step_8b, how = None, "no XGBLoRA step time from part c"
    throughput = args.workdir / "throughput.json"
    if throughput.exists() and not args.dry_run:
        rows = {r["method"]: r for r in json.loads(throughput.read_text())["rows"]}
        step_1b = rows.get("XGBLoRA r=1 boosted", {}).get("step_seconds")
        if step_1b:
            tokens = THROUGHPUT_SEQ * THROUGHPUT_BATCH
            step_8b = scale_step_seconds(step_1b, tokens, "llama3.2-1b", "llama3-8b", tokens)
            how = (f"part c's XGBLoRA (all blocks) step at the 1B shape, {step_1b:.3f} s for {tokens} tokens, × the ratio "
                   f"of matmul parameters 8B/1B (4·N·T FLOPs, same tokens) = {step_8b:.3f} s")
    rows = []
    for t in timed:
        merge = min(t["seconds"])
        total = merge + min(t["reset_seconds"])
        share = total / (total + 50 * step_8b) if step_8b else None
        t["share_k50"] = share
        rows.append([t["base"] + (" (pinned)" if t["pinned"] else ""), t["modules"], fmt(merge, ".3f"),
                     fmt(min(t["reset_seconds"]), ".3f"), fmt(t["kept_fraction"], ".6f"), fmt(share, ".3%")])
    table = markdown_table(["merged state (lo) memory", "modules", "merge (s)", "re-init + reset (s)", "kept fraction", "share at κ=50"], rows)
    ok = len(timed) == 3 and all(t["kept_fraction"] >= 0.99 for t in timed) and (args.dry_run or step_8b is not None)
    peak = torch.cuda.max_memory_allocated() / 1024**3 if device == "cuda" else None
    text = (f"One all-block merge over {timed[0]['layers']} blocks × 7 bf16 projections at the {shape} shape "
            f"(random weights, rank-1 rounds, fastest of 2 after a warm-up). Step time at 8B: {how}."
            + (f" Peak GPU memory {peak:.1f} GiB." if peak else "") + f"\n\n{table}")
    return {"ok": ok, "summary": "; ".join(f"{r[0]}: {r[2]} s/merge, {r[5] or '–'} at κ=50" for r in rows),
            "data": {"timed": timed, "step_seconds_8b": step_8b}, "markdown": text}


def part_f_compile(args) -> Dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--compile-worker", "--workdir", str(args.workdir),
           "--out", str(args.out)] + (["--dry-run"] if args.dry_run else [])
    env = {"TORCH_LOGS": "recompiles"}
    if args.dry_run:
        env["TORCH_COMPILE_BACKEND"] = "eager"  # dynamo traces and guards as on a GPU; no C++ compile
    run = sub(args, "f_compile", cmd, **env)
    result_path = args.workdir / "compile.json"
    data = json.loads(result_path.read_text()) if result_path.exists() else {}
    per_round = data.get("graphs_per_round", [])
    from benchmarks.common import markdown_table

    table = markdown_table(["round", "blocks", "new graphs compiled", "recompile messages"],
                           [[r["round"], r["blocks"], r["new_graphs"], r["recompiles"]] for r in per_round])
    ok = run["returncode"] == 0 and len(per_round) >= 3 and data.get("finite", False)
    summary = ", ".join(str(r["new_graphs"]) for r in per_round)
    return {"ok": ok, "summary": f"new graphs per round: {summary or 'none recorded'}", "data": data,
            "markdown": f"`compile=True` (backend {data.get('backend')}), κ = 2, 1 of 2 blocks per round:\n\n{table}"}


def compile_worker(args) -> int:
    """In-process: the recipe with compile=True on the 2-layer model; graphs compiled per round."""
    import logging

    import torch
    from omegaconf import OmegaConf
    from torch._dynamo.utils import counters

    import xgblora_finetune
    from tests.e2e_fixture import tiny_config

    recompiles = []

    class Catch(logging.Handler):
        def emit(self, record):
            recompiles.append(record.getMessage())

    logging.getLogger("torch._dynamo").addHandler(Catch())
    root = tiny_root(args)
    device = "cpu" if args.dry_run else "cuda"
    raw = tiny_config(root, args.workdir / "compile_run", device=device, dtype="fp32" if args.dry_run else "bf16",
                      compile=True, max_steps_per_epoch=10, save_every_n_steps=None)
    raw["boost"].update(steps_per_round=2, blocks_per_round=1)
    raw.pop("eval", None)
    # fixed-length sequences: recompilations then come from the rounds, not from sequence lengths
    raw["dataset"] = {"_component_": "benchmarks.synthetic_data.random_tokens", "seq_len": 48, "n": 64}
    cfg = OmegaConf.create(raw)
    recipe = xgblora_finetune.XGBLoRAFinetuneRecipeSingleDevice(cfg=cfg)
    recipe.setup(cfg=cfg)
    batches = iter(recipe._dataloader)
    rounds: Dict[int, Dict[str, Any]] = {}
    finite = True
    for _ in range(10):
        round_index = recipe._booster.round
        graphs, messages = counters["stats"]["unique_graphs"], len(recompiles)
        metrics = recipe._train_step(batches)
        finite &= bool(torch.isfinite(torch.tensor(metrics["loss"])))
        entry = rounds.setdefault(round_index, {"round": round_index, "blocks": recipe._booster.selected_blocks(round_index),
                                                "new_graphs": 0, "recompiles": 0})
        entry["new_graphs"] += counters["stats"]["unique_graphs"] - graphs
        entry["recompiles"] += len(recompiles) - messages
        # after every step: a worker cut off by the time limit still leaves the rounds it did
        result = {"backend": os.environ.get("TORCH_COMPILE_BACKEND", "inductor"), "finite": finite,
                  "graphs_per_round": [rounds[k] for k in sorted(rounds)], "recompile_messages": recompiles[:20]}
        (args.workdir / "compile.json").write_text(json.dumps(result, indent=2))
    return 0


def part_g_long_runs(args) -> Dict[str, Any]:
    out = args.workdir / "rounds.md"
    cmd = [sys.executable, "-m", "benchmarks.rounds", "--out", str(out), "--workdir", str(args.workdir / "rounds"),
           "--bases", "bf16", "nf4", "--profile-merge"]
    # part (c)'s sequences and batch (a training step's shape, not the short arithmetic samples
    # that leave a GPU waiting on the host), so both parts' steps can be read side by side
    if args.dry_run:  # the 2-layer model, rounds 2 and 3, random sequences of 32 tokens
        cmd += ["--quick", "--rounds", "2", "3", "--steps", "1", "--warmup", "0", "--batch-size", "2",
                *random_sequence_sets(32, 16)]
    else:
        ensure_random_1b(args)
        cmd += ["--device", "cuda", "--model", "1b-random", "--isolate", "--steps", "6", "--warmup", "2",
                "--batch-size", str(THROUGHPUT_BATCH), *random_sequence_sets(THROUGHPUT_SEQ, 64)]
    run = sub(args, "g_rounds", cmd)
    return benchmark_result(run, out, lambda data: "; ".join(
        f"{r['run']}{' k=' + str(r['rounds']) if 'rounds' in r else ''}: {r['step_seconds']:.3f} s, {r['memory_mib']:.0f} MiB"
        for r in data.get("rows", []) if not r.get("failed")))


PART_FUNCTIONS = {"a": part_a_cuda_tests, "b": part_b_nccl, "c": part_c_throughput, "d": part_d_nf4,
                  "e": part_e_merge_cost, "f": part_f_compile, "g": part_g_long_runs}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="gpu_report.md, gpu_report.json and gpu_logs.tar.gz go here")
    p.add_argument("--budget-s", type=float, default=480, help="wall-clock budget for all parts (default 480)")
    p.add_argument("--dry-run", action="store_true", help="CPU, 2-layer model, tiny shapes, gloo, fewer rows")
    p.add_argument("--parts", nargs="*", default=None, choices=list(PARTS), help="run only these parts")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/gpu_check"), help="work files (large; not under --out)")
    p.add_argument("--part", default=None, choices=list(PARTS), help=argparse.SUPPRESS)
    p.add_argument("--limit-s", type=float, default=600, help=argparse.SUPPRESS)
    p.add_argument("--compile-worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.out, args.workdir = args.out.resolve(), args.workdir.resolve()
    return args


if __name__ == "__main__":
    _args = parse_args()
    sys.exit(compile_worker(_args) if _args.compile_worker else main())
