"""``python -m benchmarks.quality --jobs N``: the protocol's (family, method) groups in N processes.

A group (one task family, one method: its learning-rate grid on the first seed, the edge
extensions, then the other seeds at the chosen rate) depends on no other group, so N groups can
run at once: two one-thread processes fill a 2-core CPU; on a GPU, several processes share one
device that a 135M model at batch 4 leaves mostly idle. Each group runs as
``python -m benchmarks.quality … --tasks FAMILY --methods METHOD`` in the same workdir (runs go to
``WORKDIR/runs/``, the tiny model of ``--quick`` is shared, so run ids are those of one process),
with its own record ``WORKDIR/jobs/FAMILY_METHOD.jsonl`` and log ``WORKDIR/jobs/FAMILY_METHOD.log``.

The record a group starts from is ``WORKDIR/runs.jsonl``, which only this process writes, each
time whole (a temporary file renamed over it): a group starting while another's rows are merged
reads the record before or after, never half of it. A group's rows are merged when it ends, and
at the start of the next ``--jobs`` command (a group killed with the machine leaves its finished
runs in its own record). Groups start in order, family by family; a process that ends makes
room for the next group. Threads: ``OMP_NUM_THREADS`` as set, else the cores divided among the
jobs (each run records the threads it had).

The command exits 1 when a group failed (its log is named and its runs are missing from the
report), 0 when every group's command finished; the report is rendered from the merged record,
as ``--report-only`` would.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

from benchmarks.common import REPO, tail


def group_name(task: str, key: str) -> str:
    return f"{task}_{key}"


def child_argv(args, task, key: str, runs_file: Path, record: Path) -> List[str]:
    """The command line of one group's process: this command's settings, one family, one method,
    the same workdir, its own record, the merged record to start from."""
    argv = [sys.executable, "-m", "benchmarks.quality"]
    argv += [flag for flag, on in (("--long", args.long), ("--quick", args.quick), ("--gpu", args.gpu),
                                   ("--grid", args.grid), ("--keep-checkpoints", args.keep_checkpoints),
                                   ("--rerun-slow", args.rerun_slow)) if on]
    setting = args.setting
    argv += ["--seeds", str(args.seeds), "--steps", str(setting.steps), "--every", str(setting.every),
             "--batch-size", str(setting.batch_size)]
    if args.lrs:
        argv += ["--lrs", *args.lrs]
    json_items = {item.partition("=")[0]: item for item in args.json_task}
    argv += ["--tasks", "--json-task", json_items[task.name]] if task.files else ["--tasks", task.name]
    argv += ["--methods", key, "--workdir", str(args.workdir), "--runs-file", str(runs_file), "--reuse", str(record)]
    return argv


def child_env(jobs: int) -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def merge_records(cache, files: List[Path]) -> int:
    """The groups' records (a row cut short by a kill left out) merged into ``cache``. Returns how
    many rows were added."""
    from benchmarks.quality import read_runs

    return sum(cache.merge(read_runs(path, cut_short_ok=True)) for path in files)


def run_groups(tasks, methods: List[str], args, cache, poll_seconds: float = 1.0) -> List[Tuple[str, Path]]:
    """Run every (family, method) group in at most ``args.jobs`` processes at once; merge their
    rows into ``cache`` (``WORKDIR/runs.jsonl``). Returns (group, log) of each group that failed."""
    jobs_dir = args.workdir / "jobs"
    jobs_dir.mkdir(parents=True, exist_ok=True)
    merge_records(cache, sorted(jobs_dir.glob("*.jsonl")))  # groups of an earlier command killed before their merge
    cache.path.touch()  # the record every group starts from, empty on a first run
    queue = [(task, key) for task in tasks for key in methods]
    env = child_env(args.jobs)
    running: Dict[str, Tuple[subprocess.Popen, Path, Path, float]] = {}
    failed: List[Tuple[str, Path]] = []
    print(f"--jobs {args.jobs}: {len(queue)} groups (family × method), OMP_NUM_THREADS={env['OMP_NUM_THREADS']}; "
          f"logs in {jobs_dir}")
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)  # `kill` stops the groups too (below)
    try:
        while queue or running:
            while queue and len(running) < args.jobs:
                task, key = queue.pop(0)
                name = group_name(task.name, key)
                runs_file, log = jobs_dir / f"{name}.jsonl", jobs_dir / f"{name}.log"
                # its rows from an earlier command are merged (above): it starts from the merged record
                runs_file.unlink(missing_ok=True)
                with open(log, "a") as out:  # its own session: stopping it stops the recipe it runs too
                    proc = subprocess.Popen(child_argv(args, task, key, runs_file, cache.path), stdout=out,
                                            stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
                running[name] = (proc, runs_file, log, time.perf_counter())
                print(f"  started {name} (pid {proc.pid})")
            time.sleep(poll_seconds)
            for name, (proc, runs_file, log, start) in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[name]
                merged = merge_records(cache, [runs_file])
                minutes = (time.perf_counter() - start) / 60
                if proc.returncode != 0:
                    failed.append((name, log))
                    print(f"  FAILED {name} (exit {proc.returncode}, {minutes:.1f} min); last lines of {log}:\n{tail(log)}")
                else:
                    print(f"  finished {name}: {merged} rows merged ({minutes:.1f} min)")
    finally:
        signal.signal(signal.SIGTERM, previous)
        for proc, *_ in running.values():  # interrupted: no group (nor the run it started) outlives this command
            _signal_group(proc, signal.SIGTERM)
        for proc, *_ in running.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait()
            _signal_group(proc, signal.SIGKILL)  # what the group's process left running
        if running:
            merge_records(cache, [runs_file for _, runs_file, *_ in running.values()])
    return failed


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


def _signal_group(proc: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(proc.pid, signum)
    except ProcessLookupError:  # the whole group has already ended
        pass


def describe(failed: List[Tuple[str, Path]]) -> str:
    return "; ".join(f"{name} (log: {log})" for name, log in failed)
