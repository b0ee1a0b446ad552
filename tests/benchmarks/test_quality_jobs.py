"""``benchmarks.quality --jobs N``: the protocol's (family, method) groups in N processes.

The record it leaves is the one a single process leaves (same runs, same figures: compared with a
single-process run of one group, one torch thread each); a group that fails fails the command and
leaves the other groups' rows in the record; a row cut short by a kill is left out; an interrupted
command leaves no group running.
"""

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from benchmarks import quality, quality_jobs

# a stand-in for one group's process: argv = runs_file, exit code, what to write
FAKE_GROUP = textwrap.dedent("""
    import json, sys, time
    runs_file, code, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    with open(runs_file, "a") as f:
        f.write(json.dumps({"id": "fake-" + runs_file.rsplit("/", 1)[-1], "key": "lora_r8", "task": "t"}) + "\\n")
        if mode == "cut":
            f.write('{"id": "cut-short", "ke')  # killed while writing its next row
    if mode == "sleep":  # as a group's process waits for the recipe it started
        import subprocess
        recipe = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        open(runs_file + ".recipe_pid", "w").write(str(recipe.pid))
        time.sleep(120)
    sys.exit(code)
""")


def fake_groups(monkeypatch, outcome):
    """Replace each group's command by FAKE_GROUP; ``outcome(group name)`` → (exit code, mode)."""
    def argv(args, task, key, runs_file, record):
        code, mode = outcome(quality_jobs.group_name(task.name, key))
        return [sys.executable, "-c", FAKE_GROUP, str(runs_file), str(code), mode]

    monkeypatch.setattr(quality_jobs, "child_argv", argv)


def state(pid: int):
    """A process's state letter from /proc (None once it is gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return None


def record_ids(path: Path):
    return [json.loads(line)["id"] for line in path.read_text().splitlines()]


def test_a_failed_group_fails_the_command_and_the_others_rows_stay(tmp_path, monkeypatch, capsys):
    fake_groups(monkeypatch, lambda name: (3, "cut") if name.endswith("xgblora") else (0, "row"))
    work = tmp_path / "work"
    code = quality.main(["--long", "--quick", "--jobs", "2", "--workdir", str(work), "--out", str(tmp_path / "r.md")])
    out = capsys.readouterr().out
    assert code == 1
    log = work / "jobs" / "arithmetic_fresh_xgblora.log"
    assert f"error: --jobs: 1 groups failed, their runs are missing from the report: arithmetic_fresh_xgblora (log: {log})" in out
    # both groups' complete rows are in the merged record; the row cut short is not
    assert sorted(record_ids(work / "runs.jsonl")) == ["fake-arithmetic_fresh_lora_r8.jsonl", "fake-arithmetic_fresh_xgblora.jsonl"]
    assert "its last line is cut short" in out
    assert (tmp_path / "r.md").is_file()  # the report of what is there, which says what is missing
    assert "Incomplete" in (tmp_path / "r.md").read_text()


def test_rows_left_by_a_killed_command_are_merged_by_the_next(tmp_path, monkeypatch):
    """A command killed with its machine leaves finished runs in the groups' own records only: the
    next ``--jobs`` command merges them before any group starts, and a group starts anew."""
    work = tmp_path / "work"
    (work / "jobs").mkdir(parents=True)
    left = {"id": "left-by-a-killed-command", "key": "xgblora", "task": "arithmetic_fresh"}
    (work / "jobs" / "arithmetic_fresh_xgblora.jsonl").write_text(json.dumps(left) + "\n")
    fake_groups(monkeypatch, lambda name: (0, "row"))
    assert quality.main(["--long", "--quick", "--jobs", "2", "--workdir", str(work)]) == 0
    assert record_ids(work / "runs.jsonl") == ["left-by-a-killed-command", "fake-arithmetic_fresh_lora_r8.jsonl",
                                               "fake-arithmetic_fresh_xgblora.jsonl"]
    # the group's own record was started afresh (from the merged record), not appended to
    assert record_ids(work / "jobs" / "arithmetic_fresh_xgblora.jsonl") == ["fake-arithmetic_fresh_xgblora.jsonl"]


def test_an_interrupted_command_leaves_no_group_running(tmp_path, monkeypatch):
    fake_groups(monkeypatch, lambda name: (0, "sleep"))
    started = []
    records = [tmp_path / "work" / "jobs" / f"arithmetic_fresh_{k}.jsonl" for k in ("lora_r8", "xgblora")]

    def recording_popen(*args, **kwargs):
        started.append(subprocess.Popen(*args, **kwargs))
        return started[-1]

    def interrupt(seconds):
        while len(started) < 2 or not all(Path(f"{p}.recipe_pid").is_file() for p in records):
            time.sleep(0.1)  # both groups running and their first row written
        raise KeyboardInterrupt

    monkeypatch.setattr(quality_jobs, "subprocess", SimpleNamespace(
        Popen=recording_popen, STDOUT=subprocess.STDOUT, TimeoutExpired=subprocess.TimeoutExpired))
    monkeypatch.setattr(quality_jobs, "time", SimpleNamespace(sleep=interrupt, perf_counter=time.perf_counter))
    with pytest.raises(KeyboardInterrupt):
        quality.main(["--long", "--quick", "--jobs", "2", "--workdir", str(tmp_path / "work")])
    assert len(started) == 2 and all(p.poll() is not None for p in started)
    for record in records:  # nor the recipe each group's process had started (gone, or a zombie left to init)
        pid = int(Path(f"{record}.recipe_pid").read_text())
        deadline = time.time() + 10
        while state(pid) not in (None, "Z") and time.time() < deadline:
            time.sleep(0.1)
        assert state(pid) in (None, "Z")
    # what the groups had finished is merged on the way out
    assert sorted(record_ids(tmp_path / "work" / "runs.jsonl")) == [
        "fake-arithmetic_fresh_lora_r8.jsonl", "fake-arithmetic_fresh_xgblora.jsonl"]


def test_a_group_runs_with_this_commands_settings(tmp_path):
    args = quality.parse_args(["--long", "--quick", "--jobs", "2", "--lrs", "xgblora=0.004", "--steps", "8",
                               "--every", "4", "--workdir", str(tmp_path), "--json-task", f"mine={tmp_path}"])
    task = quality.TaskSpec("mine", {}, 32, None, files={"train": "x"})
    argv = quality_jobs.child_argv(args, task, "xgblora", tmp_path / "g.jsonl", tmp_path / "runs.jsonl")
    assert argv[1:3] == ["-m", "benchmarks.quality"]
    again = quality.parse_args(argv[3:])
    assert again.setting == args.setting and again.seeds == args.seeds and again.grid == args.grid
    assert again.lrs == ["xgblora=0.004"] and again.methods == ["xgblora"] and again.jobs == 1
    assert again.tasks == [] and again.json_task == [f"mine={tmp_path}"]
    assert again.runs_file == tmp_path / "g.jsonl" and again.reuse == [tmp_path / "runs.jsonl"]
    with pytest.raises(SystemExit):
        quality.parse_args(["--sweep", "--jobs", "2"])


@pytest.mark.slow
def test_jobs_record_what_one_process_records(tmp_path, monkeypatch):
    """``--long --quick --jobs 2`` (LoRA r=8 and XGBLoRA at once) against one process running the
    XGBLoRA group alone, one torch thread each: the same runs and figures, only the seconds differ
    (the tiny model is written into the workdir, so run ids differ between the two workdirs)."""
    from torchtune_xgb.models.cache import CACHE_ENV

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    jobs, alone = tmp_path / "jobs", tmp_path / "alone"
    assert quality.main(["--long", "--quick", "--jobs", "2", "--workdir", str(jobs), "--out", str(tmp_path / "j.md")]) == 0
    assert sorted(p.name for p in (jobs / "jobs").iterdir()) == [
        "arithmetic_fresh_lora_r8.jsonl", "arithmetic_fresh_lora_r8.log",
        "arithmetic_fresh_xgblora.jsonl", "arithmetic_fresh_xgblora.log"]
    # the same harness in its own process, as each group's is: scoring runs in it, at its threads
    subprocess.run([sys.executable, "-m", "benchmarks.quality", "--long", "--quick", "--methods", "xgblora",
                    "--workdir", str(alone)], cwd=quality.REPO, env=quality_jobs.child_env(1), check=True,
                   stdout=subprocess.DEVNULL)

    def runs(workdir):
        rows = [json.loads(line) for line in (workdir / "runs.jsonl").read_text().splitlines()]
        return {(r["key"], r["lr"], r["seed"]): r for r in rows}

    together, single = runs(jobs), runs(alone)
    assert sorted(together, key=str) == sorted(list(single) + [("lora_r8", 0.001, 0)], key=str)
    timing = {"id", "seconds", "out_dir", "train_seconds", "total_seconds", "peak_rss_bytes"}
    for key, row in single.items():
        other = together[key]
        assert {k: v for k, v in row.items() if k not in timing | {"curve"}} == \
               {k: v for k, v in other.items() if k not in timing | {"curve"}}
        if "curve" in row:
            strip = lambda c: {s: {m: v for m, v in p.items() if m != "seconds"} for s, p in c.items()}  # noqa: E731
            assert strip(row["curve"]) == strip(other["curve"])
    assert single[("xgblora", 0.002, 0)]["merges"] == [2, 4, 6]
    assert together[("lora_r8", 0.001, 0)]["hardware"].endswith(", 1 torch threads")
    assert "| arithmetic_fresh | XGBLoRA r=1 boosted |" in (tmp_path / "j.md").read_text()


def test_a_killed_command_stops_its_groups_and_keeps_their_finished_runs(tmp_path):
    """``kill`` (SIGTERM) of a ``--jobs`` command: it exits 143 after stopping every group's
    process and the recipe each had started, and merges the runs the groups had finished."""
    work = tmp_path / "work"
    driver = textwrap.dedent(f"""
        import sys
        from benchmarks import quality, quality_jobs
        FAKE_GROUP = {FAKE_GROUP!r}
        quality_jobs.child_argv = lambda args, task, key, runs_file, record: [
            sys.executable, "-c", FAKE_GROUP, str(runs_file), "0", "sleep"]
        sys.exit(quality.main(["--long", "--quick", "--jobs", "2", "--workdir", {str(work)!r}]))
    """)
    command = subprocess.Popen([sys.executable, "-c", driver], cwd=quality.REPO, env=quality_jobs.child_env(1),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pid_files = [work / "jobs" / f"arithmetic_fresh_{k}.jsonl.recipe_pid" for k in ("lora_r8", "xgblora")]
    deadline = time.time() + 60
    while not all(p.is_file() for p in pid_files) and time.time() < deadline:
        time.sleep(0.1)
    assert all(p.is_file() for p in pid_files), "the groups did not start"
    command.terminate()
    assert command.wait(timeout=60) == 143
    for pid_file in pid_files:
        pid = int(pid_file.read_text())
        deadline = time.time() + 10
        while state(pid) not in (None, "Z") and time.time() < deadline:
            time.sleep(0.1)
        assert state(pid) in (None, "Z")
    assert sorted(record_ids(work / "runs.jsonl")) == [
        "fake-arithmetic_fresh_lora_r8.jsonl", "fake-arithmetic_fresh_xgblora.jsonl"]
