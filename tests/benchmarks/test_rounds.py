"""``python -m benchmarks.rounds --quick --out FILE.md`` on the 2-layer test model: the table it
writes, its structure and its deterministic columns (the timed ones are only checked for being there)."""

import json

import pytest

from benchmarks import rounds


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rounds")
    out = tmp / "rounds.md"
    # rounds 100 and 300: the test model's ledgers are dense at both (small modules), so a merge
    # does the same work at each; NF4 views are full (rank ≤ 32 < 100)
    code = rounds.main(["--quick", "--bases", "bf16", "nf4", "--rounds", "100", "300", "--steps", "1", "--warmup", "0",
                        "--out", str(out), "--workdir", str(tmp / "work")])
    assert code == 0
    return out


def test_quick_writes_the_table_with_every_row_and_round_count(quick):
    text = quick.read_text()
    assert text.startswith("## Rounds: cost per step, merge and checkpoint")
    assert "Hardware: " in text and "2-layer test model" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| base")]
    assert [r.split(" | ")[:3] for r in rows] == [
        ["| bf16", "torchtune LoRA r=8", "–"], ["| bf16", "XGBLoRA bf16", "100"], ["| bf16", "XGBLoRA bf16", "300"],
        ["| nf4", "torchtune QLoRA r=8", "–"], ["| nf4", "XGBLoRA nf4", "100"], ["| nf4", "XGBLoRA nf4", "300"],
    ]
    assert all(len(r.split(" | ")) == 14 for r in rows)
    goal_lines = [line for line in text.splitlines() if line.startswith("- PASS") or line.startswith("- MISS")]
    assert len(goal_lines) == 8  # step, memory, merge share and checkpoint, per base


def test_quick_counts_do_not_grow_from_round_100_to_300(quick):
    data = json.loads(quick.with_suffix(".json").read_text())
    ours = [r for r in data["rows"] if "rounds" in r]
    assert data["header"]["device"] == "cpu" and len(ours) == 4
    for base in ("bf16", "nf4"):
        at = {r["rounds"]: r for r in ours if r["base"] == base}
        assert at[100]["step_counts"] == at[300]["step_counts"] and at[100]["step_counts"]["flops"] > 0
        assert at[100]["merge_counts"] == at[300]["merge_counts"] and at[100]["merge_counts"]["bytes"] > 0
        for r in at.values():
            assert r["step_seconds"] > 0 and r["merge_seconds"] > 0 and r["checkpoint_seconds"] > 0
            assert 0 < r["checkpoint_bytes"] < 4 * 2**20  # the rounds since the last sealed segment, not all of them
            # three ends of round, each with a checkpoint, per round count; the table shows medians
            assert len(r["merge_samples"]) == len(r["checkpoint_samples"]) == 3
            assert r["merge_seconds"] == sorted(r["merge_samples"])[1]
            assert r["checkpoint_seconds"] == sorted(r["checkpoint_samples"])[1]
    assert "merge and checkpoint the median of 3 per round count" in quick.read_text()


def test_goals_from_hand_made_rows():
    rows = [
        {"base": "bf16", "run": "torchtune LoRA r=8", "step_seconds": 1.0, "memory_mib": 100.0},
        {"base": "bf16", "run": "XGBLoRA bf16", "rounds": 1, "step_seconds": 1.0, "memory_mib": 104.0,
         "merge_seconds": 0.2, "checkpoint_seconds": 0.010},
        {"base": "bf16", "run": "XGBLoRA bf16", "rounds": 500, "step_seconds": 1.06, "memory_mib": 106.0,
         "merge_seconds": 0.25, "checkpoint_seconds": 0.0135},
    ]
    lines = rounds.goals(rows, kappa=50)
    assert lines[0].startswith("- MISS: bf16 step at round 500 / round 1 = 1.060")
    assert lines[1].startswith("- MISS") and "worst 1.060×" in lines[1]
    assert lines[2] == "- PASS: bf16 merge + re-init + reset at κ = 50: worst 0.469% (≤ 0.5%)"  # 0.25 / (0.25 + 53)
    assert lines[3].startswith("- PASS")  # 13.5 ms ≤ 1.25 · 10 ms + 1 ms


def test_set_overrides_reach_both_recipes_of_a_base_and_the_worker(tmp_path):
    dataset = '{"_component_": "benchmarks.synthetic_data.random_tokens", "seq_len": 48, "n": 4}'
    argv = ["--quick", "--isolate", "--workdir", str(tmp_path), "--set", "tokenizer.max_seq_len=48", "--set", f"dataset={dataset}"]
    args = rounds.parse_args(argv)
    for cfg in (rounds.our_config(args, "bf16", tmp_path / "ours"), rounds.torchtune_config(args, "nf4", tmp_path / "tt")):
        assert cfg["tokenizer"]["max_seq_len"] == 48
        assert cfg["dataset"] == {"_component_": "benchmarks.synthetic_data.random_tokens", "seq_len": 48, "n": 4}
    assert "boost" not in rounds.torchtune_config(args, "bf16", tmp_path / "tt2")
    assert args.passthrough[-4:] == ["--set", "tokenizer.max_seq_len=48", "--set", f"dataset={dataset}"]  # what --isolate's workers get


def test_profile_of_an_end_of_round_names_where_an_nf4_merge_spends_its_time():
    from benchmarks.round_counts import perturb_adapters, simulate_rounds, tiny_booster

    booster = tiny_booster("nf4")
    simulate_rounds(booster, 40, seed=1)  # past the views' rank: this merge truncates each view (QRs, an SVD)
    perturb_adapters(booster, seed=2)
    prof = rounds.profile_end_of_round(booster, cuda=False)
    top = {t["op"]: t for t in prof["top"]}
    shapes = {tuple(m.weight.shape) for m in booster.active_modules().values()}
    assert top["aten::linalg_qr"]["calls"] == 2 * len(shapes)  # the views truncated together: two QRs per module shape
    assert prof["wall_ms"] > 0 and prof["host_ms"] > 0 and prof["device_ms"] == 0 and len(prof["top"]) <= 12
    text = "\n".join(rounds.render_profiles([{"run": "XGBLoRA nf4", "rounds": 40, "merge_profile": prof}], {"device": "cpu"}))
    assert "XGBLoRA nf4 at round 40" in text and "| aten::linalg_qr |" in text and "most host time" in text
