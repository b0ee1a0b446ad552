"""``python -m benchmarks.gpu_check --dry-run`` runs every part on the CPU, so the GPU command
cannot rot; the driver records a part that fails or times out and runs the next one."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import gpu_check

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_dry_run_runs_every_part_and_writes_the_report(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", "--dry-run", "--out", str(out), "--workdir", str(work),
         "--budget-s", "600"],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )
    report = json.loads((out / "gpu_report.json").read_text())
    statuses = {p["key"]: p["status"] for p in report["parts"]}
    assert statuses == dict.fromkeys("abcdefg", "ok"), (statuses, done.stdout[-4000:])
    assert done.returncode == 0
    parts = {p["key"]: p for p in report["parts"]}
    assert parts["a"]["data"]["passed"] == 5  # the CUDA tests' own code, on the CPU
    (bf16,) = parts["b"]["data"]
    assert bf16[1] == 0 and bf16[2] >= 3 and bf16[3] >= 0.99 and bf16[5] == "ok"  # exit, merges, kept, export
    rows = {r["method"]: r for r in parts["c"]["data"]["rows"]}
    assert {"torchtune LoRA r=8", "XGBLoRA r=1 boosted, 1/3 blocks"} <= set(rows)
    assert all(r["step_seconds"] > 0 for r in rows.values())
    nf4 = {r["name"]: r for r in parts["d"]["data"]["rows"]}
    assert nf4["XGBLoRA NF4 κ=1, all blocks"]["rounds"] == 2 and not nf4["torchtune QLoRA r=8"]["failed"]
    timed = parts["e"]["data"]["timed"]
    assert [t["base"] for t in timed] == ["pinned", "gpu", "pageable"]
    assert all(t["modules"] == 14 and t["kept_fraction"] >= 0.99 for t in timed)
    per_round = parts["f"]["data"]["graphs_per_round"]
    assert len(per_round) == 5 and per_round[0]["new_graphs"] > 0  # the first round compiles
    long_runs = [r for r in parts["g"]["data"]["rows"] if "rounds" in r]
    assert sorted((r["base"], r["rounds"]) for r in long_runs) == [("bf16", 2), ("bf16", 3), ("nf4", 2), ("nf4", 3)]
    assert all(r["step_seconds"] > 0 and r["checkpoint_bytes"] > 0 for r in long_runs)
    assert "tokenizer.max_seq_len=32" in parts["g"]["data"]["header"]["set"]  # part (c)'s kind of sequences
    assert parts["g"]["markdown"].count("One end of round under torch.profiler") == 2  # bf16 and NF4, last round count
    text = (out / "gpu_report.md").read_text()
    for key, (title, _) in gpu_check.PARTS.items():
        assert f"## {key}. {title} — ok" in text
    assert (out / "gpu_logs.tar.gz").stat().st_size > 0
    assert sorted(p.name for p in out.iterdir()) == ["gpu_logs.tar.gz", "gpu_report.json", "gpu_report.md"]


def test_a_failed_or_timed_out_part_is_recorded_and_the_next_one_runs(tmp_path, monkeypatch):
    outcomes = {"a": {"returncode": -9, "timed_out": True}, "b": {"returncode": 1, "timed_out": False}}
    calls = []

    def fake_run(cmd, log, limit, env, cwd=REPO):
        key = cmd[cmd.index("--part") + 1]
        calls.append(key)
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(f"part {key} log line\n")
        return dict(outcomes[key], seconds=2.0)

    monkeypatch.setattr(gpu_check, "run_limited", fake_run)
    out = tmp_path / "out"
    code = gpu_check.main(["--dry-run", "--parts", "a", "b", "--out", str(out), "--workdir", str(tmp_path / "w")])
    assert code == 1 and calls == ["a", "b"]
    parts = json.loads((out / "gpu_report.json").read_text())["parts"]
    assert [p["status"] for p in parts] == [f"timed out after {parts[0]['limit']:.0f} s", "failed (exit 1)"]
    text = (out / "gpu_report.md").read_text()
    assert "part a log line" in text and "part b log line" in text


def test_run_limited_kills_the_whole_process_group(tmp_path):
    marker = tmp_path / "child_alive"
    # a shell that starts a grandchild which would write the marker after 3 s
    cmd = ["bash", "-c", f"(sleep 3; touch {marker}) & sleep 30"]
    start = time.perf_counter()
    run = gpu_check.run_limited(cmd, tmp_path / "log.txt", 1.0, {"PATH": "/usr/bin:/bin"})
    assert run["timed_out"] and time.perf_counter() - start < 10
    time.sleep(3.5)
    assert not marker.exists()
