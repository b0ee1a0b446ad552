"""The long-budget quality protocol (``benchmarks.quality --long``): Holm–Bonferroni, the paired
bootstrap p-value, the effective rank of an update against rounds, the long report, a partial
record's interim report, and the ``--long --quick`` run on the tiny model.

Expected values are worked out by hand in the comments (binomial tails, Holm's step-down, singular
values of hand-built factors), not produced by the code under test.
"""

import importlib.util
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from benchmarks import quality
from benchmarks.common import hardware
from benchmarks.quality_long import LONG_GRIDS, progress, rank_rounds, render_long
from benchmarks.quality_report import hardware_line
from benchmarks.quality_rank import run_effective_rank
from benchmarks.quality_stats import energy_rank, entropy_rank, holm, paired_p_value, prefix_singular_values


def test_holm_steps_down_by_hand():
    # sorted: d 0.005 ×4 = 0.02, a 0.01 ×3 = 0.03, c 0.03 ×2 = 0.06, b 0.04 ×1 = 0.04 → kept at the
    # running maximum 0.06. At 5%: d and a rejected; unadjusted, all four would be
    got = holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": 0.005})
    assert got == {"d": (pytest.approx(0.02), True), "a": (pytest.approx(0.03), True),
                   "c": (pytest.approx(0.06), False), "b": (pytest.approx(0.06), False)}
    # step-down beats Bonferroni: 0.01 ×3 = 0.03, 0.02 ×2 = 0.04, 0.03 ×1 → 0.04 (running max): all
    # three rejected, where Bonferroni (×3: 0.03, 0.06, 0.09) rejects one
    assert {k: v[1] for k, v in holm({"x": 0.01, "y": 0.02, "z": 0.03}).items()} == {"x": True, "y": True, "z": True}
    # capped at 1: 0.6 ×2 = 1.2 → 1
    assert holm({"u": 0.6, "v": 0.7}) == {"u": (1.0, False), "v": (1.0, False)}
    assert holm({}) == {}


def test_paired_p_value_is_the_bootstraps_two_sided_tail():
    # one seed, 10 items, the method right on 2 items the reference misses: a resample's difference
    # is X/10 with X ~ Binomial(10, 0.2); P(X = 0) = 0.8^10 = 0.1074, so p = 2 × 0.1074 = 0.215
    method, reference = [[1, 1] + [0] * 8], [[0] * 10]
    assert paired_p_value(method, reference, draws=20000) == pytest.approx(0.2147, abs=0.015)
    assert paired_p_value(reference, method, draws=20000) == pytest.approx(0.2147, abs=0.015)  # two-sided
    assert paired_p_value(method, method) == 1.0
    # 10 more items right of 100: P(X = 0) = 0.9^100 = 3e-5, so no resample reaches 0: p = 0 (the
    # 95% interval [+4, +16] of test_quality_protocol excludes 0 likewise)
    assert paired_p_value([[1] * 60 + [0] * 40], [[1] * 50 + [0] * 50]) == 0.0
    with pytest.raises(ValueError, match="same"):
        paired_p_value([[1, 0]], [[1, 0], [0, 1]])


def test_effective_rank_of_singular_values():
    # σ = (4, 3): p = (4/7, 3/7), H = −(4/7 ln 4/7 + 3/7 ln 3/7) = 0.3198 + 0.3631 = 0.6829, exp = 1.9797
    assert entropy_rank([4, 3]) == pytest.approx(1.9797, abs=1e-4)
    assert entropy_rank([2, 2, 2]) == pytest.approx(3.0) and entropy_rank([5, 0]) == 1.0 and entropy_rank([0]) == 0.0
    assert energy_rank([4, 3]) == 2  # 16 / 25 = 64% < 90%
    assert energy_rank([3, 1]) == 1  # 9 / 10 = 90% exactly
    assert energy_rank([1, 3, 0]) == 1 and energy_rank([0, 0]) == 0  # order-free


def test_prefix_singular_values_by_hand_and_against_the_product():
    # round 1 adds 3·e1e1ᵀ, round 2 adds 4·e2e2ᵀ: σ = (3), then (4, 3)
    u, v = np.array([[3.0, 0], [0, 4], [0, 0]]), np.array([[1.0, 0, 0, 0], [0, 1, 0, 0]])
    assert [s.tolist() for s in prefix_singular_values(u, v)] == [pytest.approx([3.0]), pytest.approx([4.0, 3.0])]
    # two rounds along the same direction: the update stays rank 1 (σ = 2)
    same = prefix_singular_values(np.array([[1.0, 1], [0, 0]]), np.array([[1.0, 0, 0], [1, 0, 0]]))[1]
    assert same == pytest.approx([2.0, 0.0]) and entropy_rank(same) == 1.0
    rng = np.random.default_rng(0)
    for out, k, inn, block in ((40, 6, 30, 1), (40, 6, 30, 2), (4, 6, 30, 3)):  # the last: k > out, no QR
        u, v = rng.normal(size=(out, k)), rng.normal(size=(k, inn))
        got = prefix_singular_values(u, v, block)
        assert len(got) == k // block
        for j, s in enumerate(got, start=1):
            ref = np.linalg.svd(u[:, :j * block] @ v[:j * block], compute_uv=False)
            assert np.allclose(s, ref[:len(s)]) and np.allclose(ref[len(s):], 0)


def _write_adapter(path, factors):
    """A PEFT adapter file: ``{module: (B, A)}`` under PEFT's keys."""
    import torch
    from safetensors.torch import save_file

    tensors = {}
    for name, (b, a) in factors.items():
        tensors[f"base_model.model.{name}.lora_B.weight"] = torch.tensor(b, dtype=torch.float32)
        tensors[f"base_model.model.{name}.lora_A.weight"] = torch.tensor(a, dtype=torch.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))


def test_rank_curves_per_module_type_from_an_exported_adapter(tmp_path):
    """Layer 0's q_proj: rounds 3·e1e1ᵀ, 4·e2e2ᵀ, then a live partial round 5·e3e3ᵀ (not merged:
    left out); layer 1's: e1e1ᵀ twice (rank 1). After round 1: σ (3) and (1) → entropy 1, 1. After
    round 2: (4, 3) → 1.9797 / 2 and (2) → 1 / 1: medians 1.4898 and 1.5. v_proj: one layer,
    a single round of 2·e1e2ᵀ."""
    e = np.eye(4)
    q0 = (np.stack([3 * e[0], 4 * e[1], 5 * e[2]], axis=1), np.stack([e[0], e[1], e[2]]))
    q1 = (np.stack([e[0], e[0]], axis=1), np.stack([e[0], e[0]]))
    v0 = (2 * e[:, :1], e[1:2])
    names = {"model.layers.0.self_attn.q_proj": q0, "model.layers.1.self_attn.q_proj": q1,
             "model.layers.0.self_attn.v_proj": v0}
    epoch = tmp_path / "epoch_0"
    _write_adapter(epoch / "adapter" / "adapter_model.safetensors", names)
    got = run_effective_rank(epoch, block=1, rounds=2)
    assert got["block"] == 1 and got["rounds"] == 2 and set(got["types"]) == {"q_proj", "v_proj"}
    q = got["types"]["q_proj"]
    assert q["entropy"] == [pytest.approx(1.0), pytest.approx((1.9797 + 1.0) / 2, abs=1e-4)]
    assert q["energy90"] == [1, 1.5]
    assert got["types"]["v_proj"] == {"entropy": [pytest.approx(1.0)], "energy90": [1]}
    # torchtune's LoRA export (no rounds): the whole B·A, one point; layer 0's three directions
    # (5, 4, 3): entropy exp(−Σ p ln p) with p = (5, 4, 3)/12, 90% of 50 needs all three (41/50 < 90%)
    _write_adapter(tmp_path / "lora" / "adapter_model.safetensors", {"model.layers.0.self_attn.q_proj": q0})
    lora = run_effective_rank(tmp_path / "lora", block=3, rounds=None)["types"]["q_proj"]
    p = np.array([5, 4, 3]) / 12
    assert lora == {"entropy": [pytest.approx(math.exp(-(p * np.log(p)).sum()))], "energy90": [3]}
    assert run_effective_rank(tmp_path / "full_finetuning_epoch", block=1, rounds=None) is None


def test_rank_rounds():
    assert rank_rounds(25) == [1, 2, 5, 10, 20, 25]
    assert rank_rounds(1) == [1] and rank_rounds(10) == [1, 2, 5, 10] and rank_rounds(3) == [1, 2, 3]
    assert rank_rounds(100) == [1, 2, 5, 10, 20, 50, 100]


def _long_rows():
    """facts, 2 seeds × 4 items: LoRA r=8 gets none, XGBLoRA all (every paired resample +100: p 0),
    LoRA r=32 exactly LoRA r=8's (every resample 0: p 1)."""
    def run(key, method, lr, seed, correct, rank=None):
        return {"key": key, "method": method, "task": "facts", "lr": lr, "seed": seed, "chosen": True,
                "val_exact_match": 0.5, "val_loss": 1.0, "test_correct": correct, "test_item_loss": [0.5] * 4,
                "test_item_tokens": [2] * 4, "trainable_params": 10, "total_seconds": 1800.0,
                "curve": {"50": {"exact_match": sum(correct) / 4, "loss": 0.5, "seconds": 60.0 + seed}},
                "merges": [20, 40], **({"effective_rank": rank} if rank else {})}

    lora = {"block": 8, "rounds": None, "types": {"q_proj": {"entropy": [5.0], "energy90": [4]}}}
    xgb = [{"block": 1, "rounds": 3, "types": {"q_proj": {"entropy": e, "energy90": [1, 2, 3]}}}
           for e in ([1.0, 1.6, 2.4], [1.0, 2.0, 3.0])]
    return [
        {"key": "base", "method": "base (no training)", "task": "facts", "lr": None, "seed": None,
         "test_correct": [0] * 4, "test_item_loss": [2.0] * 4, "test_item_tokens": [2] * 4, "trainable_params": 0},
        *(run("lora_r8", "torchtune LoRA r=8", 1e-3, s, [0] * 4, lora) for s in (0, 1)),
        *(run("lora_r32", "torchtune LoRA r=32", 1e-3, s, [0] * 4) for s in (0, 1)),
        *(run("xgblora", "XGBLoRA r=1 boosted", 2e-3, s, [1] * 4, xgb[s]) for s in (0, 1)),
    ]


HEADER = {"date": "2026-12-04", "model": "m", "hardware": "h", "seeds": [0, 1], "grid": {}, "arithmetic": {},
          "protocol": "long", "setting": {"steps": 100, "every": 50, "batch_size": 4, "dtype": "fp32"}}


def test_long_report_holm_claims_and_effective_rank_table(tmp_path):
    text = render_long(_long_rows(), HEADER, png=tmp_path / "long.png")
    # p: XGBLoRA 0 (Holm: 2 × 0 = 0), LoRA r=32 1 (→ 1): one claim, one "no difference"
    assert "### Claims against LoRA r=8, Holm-corrected (2 comparisons, family-wise α = 0.05)" in text
    assert "| facts | XGBLoRA r=1 boosted | +100.0 [+100.0, +100.0] | 0.0000 | 0.0000 | ahead of LoRA r=8 |" in text
    assert "| facts | torchtune LoRA r=32 | +0.0 [+0.0, +0.0] | 1.0000 | 1.0000 | no difference shown |" in text
    assert "Interim" not in text and "### Progress" not in text
    # effective rank: XGBLoRA's seed medians (1.0, 1.8, 2.7) / (1, 2, 3) after 1, 2, 3 merges; LoRA r=8 at the end
    assert "| task | module | XGBLoRA r=1 boosted, after 1 merges | XGBLoRA r=1 boosted, after 2 merges | " \
           "XGBLoRA r=1 boosted, after 3 merges | torchtune LoRA r=8, end |" in text
    assert "| facts | q_proj | 1.0 / 1 | 1.8 / 2 | 2.7 / 3 | 5.0 / 4 |" in text
    assert "| facts | torchtune LoRA r=32 | 0.001 | 0.0% [0.0%, 0.0%] | level | +0.0 [+0.0, +0.0] |" in text
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "long_facts.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_partial_record_says_what_is_missing():
    rows = _long_rows()
    # LoRA r=8's grid half run (its rate not chosen yet), XGBLoRA's seed 1 missing
    rows[1:3] = [dict(rows[1], chosen=False),
                 {"key": "lora_r8", "method": "torchtune LoRA r=8", "task": "facts", "lr": 5e-4, "seed": 0,
                  "failed": True, "missing": True},
                 *({"key": "lora_r8", "method": "torchtune LoRA r=8", "task": "facts", "lr": None, "seed": s,
                    "failed": True, "missing": True} for s in (1, 2))]
    rows[-1] = {"key": "xgblora", "method": "XGBLoRA r=1 boosted", "task": "facts", "lr": 2e-3, "seed": 1,
                "failed": True, "missing": True}
    text = render_long(rows, HEADER)
    assert "| facts | torchtune LoRA r=8 | – | not run: 3 run(s) not in the record |" in text
    assert "**Interim: 2 comparison(s) not yet possible" in text  # nothing to compare with LoRA r=8
    assert "- facts / torchtune LoRA r=8: 1 run(s) recorded, lr to be chosen (grid incomplete); missing: " \
           "lr 0.0005 seed 0, seed 1 (lr pending), seed 2 (lr pending)" in text
    assert "- facts / XGBLoRA r=1 boosted: 1 run(s) recorded, lr 0.002 chosen; missing: lr 0.002 seed 1" in text
    # 4 missing runs at the recorded median of 1800 s (LoRA r=8 and XGBLoRA each have a timed run) = 2.0 h
    assert progress(rows)[-1] == "- time left at the recorded median per run: ~2.0 h"


def test_the_hardware_line_names_where_each_run_was_made():
    trained = lambda hw: {"key": "xgblora", **({"hardware": hw} if hw else {})}  # noqa: E731
    rows = [{"key": "base", "hardware": "elsewhere"}, trained("EPYC, 1 torch threads"), trained("EPYC, 1 torch threads"),
            trained("H200"), trained(None), dict(trained(None), missing=True)]
    assert hardware_line({"hardware": "here"}, rows) == \
        "Runs made on: EPYC, 1 torch threads (2 runs); H200 (1 runs); not recorded for 1 runs"
    assert hardware_line({"hardware": "here"}, [trained(None)]) == "Hardware: here"  # an older record


def test_report_only_leaves_the_rate_of_a_partial_grid_unchosen(monkeypatch):
    """protocol() on a partial record: a missing grid run (or edge extension) leaves the rate
    pending (no run marked chosen), and the other seeds are listed as missing runs."""
    def fake_run(key, task, lr, seed, setting, args, cache):
        if lr == 1e-3:
            return {"lr": lr, "seed": seed, "failed": True, "missing": True, "method": "m", "key": key}
        return {"lr": lr, "seed": seed, "val_exact_match": {1e-5: 0.1, 1e-4: 0.4}[lr], "val_loss": 1.0}

    monkeypatch.setattr(quality, "run_method", fake_run)
    monkeypatch.setattr(quality, "base_row", lambda *a: {"key": "base"})
    task = quality.task_specs(["strings"], [])[0]
    rows = quality.protocol([task], ["full"], {"full": [1e-5, 1e-4, 1e-3]}, [0, 1, 2], None, None, None)
    assert not any(r.get("chosen") for r in rows[1:])
    assert [(r["lr"], r["seed"], bool(r.get("missing"))) for r in rows[1:]] == [
        (1e-5, 0, False), (1e-4, 0, False), (1e-3, 0, True), (None, 1, True), (None, 2, True)]
    # the grid there but its edge's extension (1e-3 past the best 1e-4) missing: still pending
    rows = quality.protocol([task], ["full"], {"full": [1e-5, 1e-4]}, [0, 1], None, None, None)
    assert [(r["lr"], bool(r.get("missing")), r.get("chosen")) for r in rows[1:]] == [
        (1e-5, False, False), (1e-4, False, False), (1e-3, True, False), (None, True, None)]


def test_long_preset_and_same_density_grids():
    args = quality.parse_args(["--long"])
    assert args.setting == quality.PRESETS["long"] and args.setting.steps == 500 and args.setting.steps // 20 == 25
    assert args.tasks == ["facts", "ordering", "arithmetic_fresh"] and args.seeds == 3 and args.grid
    assert args.methods == ["lora_r8", "lora_r32", "full", "xgblora"]
    assert quality.parse_args(["--long", "--gpu"]).setting == quality.PRESETS["long_gpu"]
    quick = quality.parse_args(["--long", "--quick"])
    assert quick.setting.model == "tiny" and not quick.grid and quick.seeds == 1
    for key, grid in LONG_GRIDS.items():  # the centre, then ×½ and ×2: one density for every method
        assert grid[1] == pytest.approx(grid[0] / 2) and grid[2] == pytest.approx(grid[0] * 2), key
    # the 60-step protocol's defaults (its committed record) are untouched by the long preset
    short = quality.parse_args([])
    assert short.setting == quality.PRESETS["cpu"] and short.methods == ["lora_r8", "xgblora", "loraxs",
                                                                        "xgblora_xs", "full"]
    with pytest.raises(SystemExit):
        quality.parse_args(["--long", "--sweep"])


@pytest.mark.slow
def test_long_quick_run_and_its_report_from_the_record(tmp_path, monkeypatch):
    """``--long --quick``: LoRA r=8 and XGBLoRA on the tiny model, 6 steps (3 rounds of κ = 2),
    scored on arithmetic_fresh's test split; the report has the Holm table and the effective-rank
    table, and ``--report-only`` renders the same figures from the record alone."""
    from torchtune_xgb.models.cache import CACHE_ENV, cache_path

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    out = tmp_path / "long.md"
    assert quality.main(["--long", "--quick", "--workdir", str(tmp_path / "work"), "--out", str(out)]) == 0
    text = out.read_text()
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    runs = {r["key"]: r for r in rows if r["key"] != "base"}
    assert set(runs) == {"lora_r8", "xgblora"} and not any(r.get("failed") for r in runs.values())
    # each run records where it was made (a record made in parts may mix machines or thread counts)
    assert {r["hardware"] for r in runs.values()} == {hardware("cpu")}
    assert f"Runs made on: {hardware('cpu')} (2 runs)." in text
    assert sorted(int(s) for s in runs["xgblora"]["curve"]) == [2, 4, 6] and runs["xgblora"]["merges"] == [2, 4, 6]
    # XGBLoRA: one rank-1 block per merge, as many merges per module as its blocks were chosen
    # (the tiny preset merges 1 of 2 blocks a round); LoRA r=8: one point
    xgb_rank, lora_rank = runs["xgblora"]["effective_rank"], runs["lora_r8"]["effective_rank"]
    assert xgb_rank["rounds"] == 3 and xgb_rank["block"] == 1 and lora_rank["block"] == 8
    assert all(1 <= len(c["entropy"]) <= 3 and c["entropy"][0] == pytest.approx(1.0) for c in xgb_rank["types"].values())
    assert all(len(c["entropy"]) == 1 and 1 < c["entropy"][0] <= 8 for c in lora_rank["types"].values())
    assert "| arithmetic_fresh | XGBLoRA r=1 boosted |" in text
    assert re.search(r"\| arithmetic_fresh \| XGBLoRA r=1 boosted \| [^|]+ \| [01]\.\d{4} \| [01]\.\d{4} \| ", text)
    assert "| task | module | XGBLoRA r=1 boosted, after 1 merges |" in text and "torchtune LoRA r=8, end |" in text
    assert sorted(p.name for p in cache_path("tasks/arithmetic_fresh").glob("test-*.json")) == ["test-n6-seed0.json"]
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "long_arithmetic_fresh.png").is_file()
    monkeypatch.setattr(quality, "run_subprocess", lambda *a, **k: pytest.fail("--report-only started a run"))
    again = tmp_path / "again.md"
    # the same workdir: the tiny model is written into it, so its path is part of a quick run's id
    assert quality.main(["--long", "--quick", "--report-only", "--workdir", str(tmp_path / "work"),
                         "--out", str(again)]) == 0

    def figures(text):
        return [line for line in text.splitlines() if line.startswith(("| ", "- "))]

    assert figures(again.read_text()) == figures(text)


RESULTS = Path(quality.REPO) / "benchmarks" / "results"
LONG_REPORTS = sorted(p.name for p in RESULTS.glob("quality_long_cpu*.md"))


@pytest.mark.parametrize("report", LONG_REPORTS)
def test_a_committed_long_report_is_what_its_record_renders(report, tmp_path, monkeypatch):
    """A committed long-protocol report (interim or final) against ``--long --report-only`` of
    benchmarks/results/quality_long_cpu_runs.jsonl: every table row and list line must match.
    Command that writes it: ``python -m benchmarks.quality --long --report-only --reuse
    benchmarks/results/quality_long_cpu_runs.jsonl --workdir DIR --out benchmarks/results/quality_long_cpu.md``."""
    text = (RESULTS / report).read_text()
    families = re.fullmatch(r"## Quality: .*, task families: (.*), \d{4}-\d{2}-\d{2}", text.splitlines()[0]).group(1)
    monkeypatch.setattr(quality, "run_subprocess", lambda *a, **k: pytest.fail("--report-only started a run"))
    out = tmp_path / report
    quality.main(["--long", "--tasks", *families.split(", "), "--report-only", "--reuse",
                  str(RESULTS / "quality_long_cpu_runs.jsonl"), "--workdir", str(tmp_path / "work"), "--out", str(out)])

    def figures(text):
        return [line for line in text.splitlines() if line.startswith(("| ", "- "))]

    assert figures(out.read_text()) == figures(text)
