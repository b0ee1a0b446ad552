"""benchmarks/quality.py's protocol: bootstrap intervals, verdicts, LR choice on val, time-to-quality,
the report, and the ``--quick`` smoke run on the tiny model.

Expected values are worked out by hand in the comments (binomial tails, seed resampling cases,
medians of hand-written step stamps), not produced by the code under test.
"""

import importlib.util
import json
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from benchmarks import quality
from benchmarks.quality_report import curve_series, plot_curves, pooled, render_protocol, summarise, time_to_quality
from benchmarks.quality_stats import (
    bootstrap_interval,
    crossing_step,
    curve_from_log,
    implied_defaults,
    lr_past_edge,
    mean_curve,
    median_curve,
    paired_difference,
    seconds_to_step,
    select_lr,
    slow_runs,
    steps_to_reach,
    value_at,
    verdict,
)
from torchtune_xgb.eval.plot import parse_metric_lines


def test_bootstrap_items_only_matches_the_binomial_tails():
    # one seed, 10 items, 5 correct: a resample's mean is X/10 with X ~ Binomial(10, 1/2).
    # P(X <= 1) = 11/1024 = 1.1% < 2.5% <= P(X <= 2) = 56/1024 = 5.5%: the 2.5th percentile is 0.2,
    # and by symmetry the 97.5th is 0.8
    est, low, high = bootstrap_interval([[1] * 5 + [0] * 5], draws=20000)
    assert (est, low, high) == (0.5, pytest.approx(0.2), pytest.approx(0.8))


def test_bootstrap_resamples_seeds_too():
    # seed A gets every item right, seed B none: the seed draw is {A,A} (mean 1) with prob 1/4,
    # {B,B} (mean 0) with 1/4, mixed (0.5) with 1/2, so the 95% interval is [0, 1] although each
    # run alone has no item-level spread at all
    assert bootstrap_interval([[1] * 10, [0] * 10], draws=4000) == (0.5, 0.0, 1.0)
    assert bootstrap_interval([[1] * 10, [1] * 10]) == (1.0, 1.0, 1.0)


def test_bootstrap_weights_make_a_token_mean():
    # item losses 1.0 over 3 answer tokens and 3.0 over 1 token: token mean (3 + 3) / 4 = 1.5
    est, low, high = bootstrap_interval([[1.0, 3.0]], weights=[[3, 1]])
    assert est == 1.5 and low == pytest.approx(1.0) and high == pytest.approx(3.0)
    with pytest.raises(ValueError):
        bootstrap_interval([[1.0, 2.0]], weights=[[1.0]])


def test_paired_difference_sees_what_overlapping_intervals_cannot():
    # 100 items, the reference right on the first 50; the method right on those and 10 more. Apart,
    # 60% [~50, ~70] and 50% [~40, ~60] overlap: "level". Paired, each item's difference is 1 on 10
    # items and 0 elsewhere, so a resample's mean difference is X/100 with X ~ Binomial(100, 0.1):
    # P(X <= 4) = 2.37% < 2.5% <= P(X <= 5) = 5.76% and P(X <= 15) = 96.0% < 97.5% <= P(X <= 16) =
    # 97.9%, so the interval is [0.04-0.05, 0.16]: ahead, which overlap could not say
    reference = [[1] * 50 + [0] * 50]
    method = [[1] * 60 + [0] * 40]
    assert verdict(bootstrap_interval(method, draws=20000), bootstrap_interval(reference, draws=20000)) == "level"
    est, low, high = paired_difference(method, reference, draws=20000)
    assert est == pytest.approx(0.10) and 0.04 <= low <= 0.05 and high == pytest.approx(0.16)
    # seed-to-seed swings both methods share cancel: seed A easy for both, seed B hard for both
    assert paired_difference([[1] * 10, [0] * 10], [[1] * 10, [0] * 10]) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="same"):
        paired_difference([[1, 0]], [[1, 0], [0, 1]])


@pytest.mark.parametrize(
    "interval, reference, higher_is_better, expected",
    [
        ((0.50, 0.40, 0.60), (0.30, 0.20, 0.39), True, "ahead"),
        ((0.50, 0.40, 0.60), (0.30, 0.20, 0.40), True, "level"),  # touching intervals overlap
        ((0.20, 0.10, 0.30), (0.50, 0.31, 0.70), True, "behind"),
        ((0.20, 0.10, 0.30), (0.50, 0.31, 0.70), False, "ahead"),  # a loss: lower is better
        ((0.45, 0.30, 0.60), (0.50, 0.40, 0.70), True, "level"),
    ],
)
def test_verdict_by_interval_overlap(interval, reference, higher_is_better, expected):
    assert verdict(interval, reference, higher_is_better) == expected


def test_select_lr_uses_val_only():
    runs = [
        {"lr": 1e-3, "val_exact_match": 0.5, "val_loss": 0.4, "test_exact_match": 0.1},
        {"lr": 1e-3, "val_exact_match": 0.7, "val_loss": 0.4, "test_exact_match": 0.1},  # mean 0.6, loss 0.4
        {"lr": 3e-3, "val_exact_match": 0.6, "val_loss": 0.3, "test_exact_match": 0.2},
        {"lr": 3e-4, "val_exact_match": 0.6, "val_loss": 0.2, "test_exact_match": 0.0},  # ties 0.6, lowest loss
        {"lr": 1e-2, "val_exact_match": 0.1, "val_loss": 2.0, "test_exact_match": 0.99},  # best on test: ignored
        {"lr": 5e-2, "failed": True},
    ]
    assert select_lr(runs) == 3e-4
    assert select_lr(runs[:3]) == 3e-3  # 0.6 vs 0.6: lower val loss
    assert select_lr([dict(runs[2], lr=1.0), runs[2]]) == runs[2]["lr"]  # full tie: the smaller lr
    assert select_lr([runs[-1]]) is None


# The recipe's metric log with periodic evaluation every 2 steps (issue 11's names) and a merge.
LOG = """\
Step 1 | loss:2.0 lr:0.001 time:100.0
Step 2 | loss:1.8 lr:0.001 time:101.0
Step 2 | val_loss:1.5 time:101.5
Step 2 | exact_match:0.1 time:103.0
Step 3 | loss:1.6 lr:0.001 time:105.0
Step 3 | round:0 merge_seconds:0.4 reset_seconds:0.1 kept_fraction:0.9999 time:105.5
Step 4 | loss:1.4 lr:0.001 time:107.0
Step 4 | val_loss:1.2 time:107.2
Step 4 | exact_match:0.3 time:108.0
Step 5 | loss:1.2 lr:0.001 time:110.0
Step 6 | loss:1.0 lr:0.001 time:112.0
Step 6 | val_loss:1.0 time:112.5
Step 6 | exact_match:0.5 time:113.0
Step 6 | exact_match:0.55 time:113.5
"""


def test_time_to_quality_from_a_metrics_log():
    lines = parse_metric_lines(LOG.splitlines())
    curve = curve_from_log(lines)
    assert curve == {2: {"exact_match": 0.1, "loss": 1.5}, 4: {"exact_match": 0.3, "loss": 1.2},
                     6: {"exact_match": 0.55, "loss": 1.0}}  # a step logged twice keeps its last value
    # step intervals 1, 4 (an evaluation in it), 2, 3, 2 → median 2; the merge at step 3 took 0.5 s
    assert seconds_to_step(lines, 2, skip=0) == pytest.approx(4.0)
    assert seconds_to_step(lines, 4, skip=0) == pytest.approx(8.5)
    assert seconds_to_step(lines, 6, skip=3) == pytest.approx(2.0 * 6 + 0.5)  # intervals 2, 3, 2 → 2
    em = {0: 0.0, **{s: p["exact_match"] for s, p in curve.items()}}
    assert steps_to_reach(em, 0.3) == 4 and steps_to_reach(em, 0.56) is None and steps_to_reach(em, 0.0) == 0
    assert mean_curve([curve, {2: {"exact_match": 0.3}, 6: {"exact_match": 0.45}}]) == {2: 0.2, 6: 0.5}


def test_time_to_quality_against_lora_r8():
    summary = {
        "base": {"exact_match": (0.0, 0.0, 0.0), "curve": {}},
        "lora_r8": {"exact_match": (0.5, 0.4, 0.6), "curve": {20: 0.2, 40: 0.5, 60: 0.5},
                    "seconds": {20: 12.0, 40: 24.0, 60: 36.0}},
        "xgblora": {"exact_match": (0.6, 0.5, 0.7), "curve": {20: 0.5, 40: 0.55, 60: 0.6},
                    "seconds": {20: 10.0, 40: 20.0, 60: 30.0}},
        "full": {"exact_match": (0.3, 0.2, 0.4), "curve": {20: 0.1, 40: 0.2, 60: 0.3}, "seconds": {}},
    }
    ttq = time_to_quality(summary, summary["base"])
    assert ttq["lora_r8"] == {"target": 0.5, "steps": 40, "crossing": 40.0, "seconds": 24.0, "ratio": 1.0, "budget": 60}
    # XGBLoRA: 0.0 at step 0, 0.5 at step 20 → crosses 0.5 exactly at 20, in 10 s
    assert ttq["xgblora"]["steps"] == 20 and ttq["xgblora"]["ratio"] == 0.5 and ttq["xgblora"]["seconds"] == 10.0
    assert ttq["full"]["steps"] is None and ttq["full"]["ratio"] is None and ttq["full"]["seconds"] is None
    # between evaluated points: 0.4 at 20, 0.6 at 40 → 0.5 is crossed at 30 (15 s on a 10 s / 20 steps clock);
    # LoRA r=8 crosses at 40 (0.2 at 20, 0.5 at 40), so 30 / 40 = 0.75
    summary["xgblora"].update(curve={20: 0.4, 40: 0.6, 60: 0.6})
    ttq = time_to_quality(summary, summary["base"])["xgblora"]
    assert ttq["steps"] == 40 and ttq["crossing"] == pytest.approx(30.0)
    assert ttq["ratio"] == pytest.approx(0.75) and ttq["seconds"] == pytest.approx(15.0)


def test_crossing_step_and_value_at():
    assert crossing_step({0: 0.0, 20: 0.2, 40: 0.6}, 0.5) == pytest.approx(35.0)  # 0.2 → 0.6 over 20 steps
    assert crossing_step({0: 0.1, 20: 0.2}, 0.05) == 0.0 and crossing_step({0: 0.1, 20: 0.2}, 0.3) is None
    assert crossing_step({0: 0.0, 10: 0.5, 20: 0.4, 30: 0.9}, 0.45) == pytest.approx(9.0)  # the first crossing
    assert value_at({0: 0.0, 20: 10.0, 40: 30.0}, 30) == pytest.approx(20.0)
    assert value_at({0: 0.0, 20: 10.0}, 50) is None and value_at({0: 0.0, 20: 10.0}, 0) == 0.0
    assert median_curve([{2: {"seconds": 1.0}}, {2: {"seconds": 9.0}}, {2: {"seconds": 2.0}, 4: {"seconds": 3.0}}],
                        "seconds") == {2: 2.0}


def _rows():
    """Two seeds × 4 test items per method, chosen LRs, built so that every interval is degenerate."""
    def run(key, method, lr, seed, correct, chosen=True, val=0.5):
        return {"key": key, "method": method, "task": "dates", "lr": lr, "seed": seed, "chosen": chosen,
                "val_exact_match": val, "val_loss": 1.0, "test_correct": correct, "test_item_loss": [0.5] * 4,
                "test_item_tokens": [2] * 4, "trainable_params": 100,
                "curve": {"20": {"exact_match": sum(correct) / 4, "seconds": 5.0}}, "merges": [20]}

    return [
        {"key": "base", "method": "base (no training)", "task": "dates", "lr": None, "seed": None,
         "test_correct": [0] * 4, "test_item_loss": [2.0] * 4, "test_item_tokens": [2] * 4, "trainable_params": 0},
        run("lora_r8", "torchtune LoRA r=8", 1e-3, 0, [0, 0, 0, 0]),
        run("lora_r8", "torchtune LoRA r=8", 3e-3, 0, [1, 1, 1, 1], chosen=False, val=0.1),
        run("lora_r8", "torchtune LoRA r=8", 1e-3, 1, [0, 0, 0, 0]),
        run("xgblora", "XGBLoRA r=1 boosted", 2e-3, 0, [1, 1, 1, 1]),
        run("xgblora", "XGBLoRA r=1 boosted", 2e-3, 1, [1, 1, 1, 1]),
        run("loraxs", "LoRA-XS r=16", 4e-3, 0, [0, 0, 0, 0]),
        run("loraxs", "LoRA-XS r=16", 4e-3, 1, [0, 0, 0, 0]),
    ]


def test_report_tables_and_goals():
    summaries = summarise(_rows())
    assert summaries["dates"]["lora_r8"]["seeds"] == 2  # the unchosen grid run is not pooled in
    header = {"date": "2026-11-29", "model": "SmolLM2-135M-Instruct", "hardware": "test CPU", "seeds": [0, 1],
              "grid": {}, "arithmetic": {"dates": False},
              "setting": {"steps": 20, "every": 20, "batch_size": 8, "dtype": "fp32"}}
    text = render_protocol(_rows(), header)
    assert "| dates | torchtune LoRA r=8 | 0.001 | 0.0% [0.0%, 0.0%] | – | – | 0.500 [0.500, 0.500] | 100 | 2 |" in text
    # all four items right against none, every seed: +100 points paired, no spread
    assert "| dates | XGBLoRA r=1 boosted | 0.002 | 100.0% [100.0%, 100.0%] | ahead | +100.0 [+100.0, +100.0] |" in text
    assert "| dates | LoRA-XS r=16 | 0.004 | 0.0% [0.0%, 0.0%] | level | +0.0 [+0.0, +0.0] |" in text
    assert "| dates | base (no training) | – | 0.0% [0.0%, 0.0%] | – | – | 2.000 [2.000, 2.000] | 0 | 1 |" in text
    # LoRA r=8 ends at 0%, the untrained model's score: reached at step 0, no ratio to speak of
    assert "| dates | XGBLoRA r=1 boosted | 0.0% | 0 | 0 | – | 0 |" in text
    assert "- PASS: XGBLoRA r=1 ≥ LoRA r=8 within the interval on every family — dates ahead" in text
    assert "- n/a: XGBLoRA reaches LoRA r=8's final exact match in ≤ 0.8× its steps" in text
    assert "- PASS: LoRA-XS within 2 points of LoRA r=8 — dates +0.0 points (paired 95%: [+0.0, +0.0])" in text
    assert "| dates | torchtune LoRA r=8 | 0.003 | 10.0% | 1.000 |  |" in text  # grid: val figures, not chosen
    # 1e-3 chosen below the only other rate tried (3e-3): still on the grid's edge, and the table says so;
    # XGBLoRA's one-rate grid has no edge
    assert "| dates | torchtune LoRA r=8 | 0.001 | 50.0% | 1.000 | ✓ (still on the grid's edge) |" in text
    assert "| dates | XGBLoRA r=1 boosted | 0.002 | 50.0% | 1.000 | ✓ |" in text


def test_paired_difference_in_the_report_pairs_runs_by_seed_not_by_order():
    # LoRA r=8: seed 0 gets all 4 items, seed 1 none; LoRA-XS the same per seed, its rows written
    # seed 1 first. Paired by seed: 0 points, no spread; paired by row order it would be ±100
    rows = [r for r in _rows() if r["key"] in ("lora_r8", "loraxs")]
    rows[0]["test_correct"] = [1, 1, 1, 1]
    rows[4]["test_correct"], rows[3]["seed"], rows[4]["seed"] = [1, 1, 1, 1], 1, 0
    header = {"date": "2026-11-29", "model": "m", "hardware": "h", "seeds": [0, 1], "grid": {},
              "arithmetic": {}, "setting": {"steps": 20, "every": 20, "batch_size": 8, "dtype": "fp32"}}
    assert "| dates | LoRA-XS r=16 | 0.004 | 50.0% [0.0%, 100.0%] | level | +0.0 [+0.0, +0.0] |" in render_protocol(rows, header)


def test_boosted_loraxs_goal_against_plain_loraxs_with_its_paired_difference():
    # boosted LoRA-XS right on items 1-2 of 4 in both seeds, LoRA-XS on none: +50 points. Paired,
    # each resample's difference is X/4, X ~ Binomial(4, 1/2) over the drawn items (seeds agree):
    # P(X = 0) = P(X = 4) = 1/16 > 2.5%, so the interval is [0, +100]; apart, [0%, 100%] overlaps
    # LoRA-XS's [0%, 0%]: level
    rows = _rows() + [dict(r, key="xgblora_xs", method="boosted LoRA-XS r=16", test_correct=[1, 1, 0, 0])
                      for r in _rows() if r["key"] == "loraxs"]
    header = {"date": "2026-11-29", "model": "m", "hardware": "h", "seeds": [0, 1], "grid": {},
              "arithmetic": {}, "setting": {"steps": 20, "every": 20, "batch_size": 8, "dtype": "fp32"}}
    text = render_protocol(rows, header)
    assert "- PASS: boosted LoRA-XS ≥ LoRA-XS (within the interval) — dates level of LoRA-XS " \
           "(+50.0 [+0.0, +100.0] points paired)" in text


def test_pooled_rows_take_every_familys_items_together():
    # dates (from _rows): LoRA r=8 0/4 items, XGBLoRA 4/4, both seeds. facts: both 4/4. Pooled per
    # seed: 8 items, XGBLoRA 8/8 = 100%, LoRA r=8 4/8 = 50%. The paired difference per item is 1 on
    # the 4 dates items and 0 on the 4 facts items (the seeds agree), so a resample's mean is X/8
    # with X ~ Binomial(8, 1/2): P(X <= 0) = 0.4% < 2.5% <= P(X <= 1) = 3.5%, so the interval is
    # [1/8, 7/8] = [+12.5, +87.5] points. Loss: every item 0.5 over 2 tokens → 0.500. LoRA-XS
    # only ran on dates: no pooled row.
    facts = [dict(r, task="facts", test_correct=[1, 1, 1, 1]) for r in _rows() if r["key"] in ("base", "lora_r8", "xgblora")]
    header = {"date": "2026-11-29", "model": "m", "hardware": "h", "seeds": [0, 1], "grid": {},
              "arithmetic": {}, "setting": {"steps": 20, "every": 20, "batch_size": 8, "dtype": "fp32"}}
    text = render_protocol(_rows() + facts, header)
    assert "| all families (pooled) | XGBLoRA r=1 boosted | per family | 100.0% [100.0%, 100.0%] | ahead | " \
           "+50.0 [+12.5, +87.5] | 0.500 [0.500, 0.500] | 100 | 2 |" in text
    assert "| all families (pooled) | LoRA-XS r=16 |" not in text
    # LoRA r=8 alone: 4 of 8 items every seed, the same X/8 resampling: [12.5%, 87.5%]
    assert "| all families (pooled) | torchtune LoRA r=8 | per family | 50.0% [12.5%, 87.5%] | – | – |" in text


def test_curve_plot_draws_exact_match_and_loss_from_the_untrained_model(tmp_path):
    rows = _rows()
    for row in rows[1:]:  # a loss point beside every exact-match point: 1.5 at step 20, seed 1 lower
        row["curve"]["20"]["loss"] = 1.5 - 0.25 * row["seed"]
    em, loss = curve_series(summarise(rows)["dates"])
    # step 0 is the untrained model: 0% exact match, item losses all 2.0 → token mean 2.0
    assert em["XGBLoRA r=1 boosted"] == ([0, 20], [0.0, 1.0]) and em["torchtune LoRA r=8"] == ([0, 20], [0.0, 0.0])
    assert loss["LoRA-XS r=16"] == ([0, 20], [2.0, 1.375])  # seed mean of 1.5 and 1.25
    assert list(loss) == ["torchtune LoRA r=8", "XGBLoRA r=1 boosted", "LoRA-XS r=16"]  # the table's order
    png = plot_curves(summarise(rows), tmp_path / "curves.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plain_model_of_the_tiny_lora_config():
    from tests.tiny_model import TINY

    lora = OmegaConf.create({"_component_": "torchtune.models.llama3_2._component_builders.lora_llama3_2",
                             "lora_attn_modules": ["q_proj"], "apply_lora_to_mlp": True, "lora_rank": 8,
                             "lora_alpha": 16, **TINY})
    assert quality.plain_model_config(lora) == {
        "_component_": "torchtune.models.llama3_2._component_builders.llama3_2", **TINY}
    smollm2 = OmegaConf.create({"_component_": "torchtune_xgb.models.smollm2.lora_smollm2_135m", "lora_rank": 1})
    assert quality.plain_model_config(smollm2) == {"_component_": "torchtune_xgb.models.smollm2.smollm2_135m"}


@pytest.mark.slow
def test_quick_smoke(tmp_path, monkeypatch):
    """The whole protocol on the tiny model: 2 methods × 2 seeds × 4 steps, curves every 2 steps."""
    from torchtune_xgb.models.cache import CACHE_ENV, cache_path

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))  # generated task files (the runs inherit it)
    out = tmp_path / "quick.md"
    assert quality.main(["--quick", "--workdir", str(tmp_path / "work"), "--out", str(out)]) == 0
    report = out.read_text()
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    runs = [r for r in rows if r["key"] != "base"]
    assert sorted((r["key"], r["seed"]) for r in runs) == [("lora_r8", 0), ("lora_r8", 1), ("xgblora", 0), ("xgblora", 1)]
    for r in runs:
        assert not r.get("failed"), r
        assert sorted(int(s) for s in r["curve"]) == [2, 4]  # our recipe's log / torchtune's epoch checkpoints
        assert len(r["test_correct"]) == 6 and 0 <= r["test_exact_match"] <= 1 and r["test_loss"] > 0
    xgb = [r for r in runs if r["key"] == "xgblora"]
    assert xgb[0]["merges"] == [2, 4]  # κ = 2 on the tiny model
    assert xgb[0]["curve"]["2"]["loss"] != xgb[1]["curve"]["2"]["loss"]  # seeds differ (data, rounds)
    assert "| strings | XGBLoRA r=1 boosted | 0.002 |" in report and "### Time to LoRA r=8's final" in report
    assert sorted(p.name for p in cache_path("tasks/strings").glob("[!.]*.json")) == [
        "test-n6-seed0.json", "train-n2000-seed0.json", "train-n2000-seed1.json", "val-n6-seed0.json"]
    if importlib.util.find_spec("matplotlib") is not None:
        assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a second start skips every finished run (runs.jsonl) and writes the same table
    assert quality.main(["--quick", "--workdir", str(tmp_path / "work"), "--out", str(out)]) == 0
    assert out.read_text() == report


def _user_task_dir(tmp_path, columns=False):
    folder = tmp_path / "mine"
    folder.mkdir()
    for split, (q, a) in {"train": ("2+2?", "4"), "val": ("3+3?", "6"), "test": ("5+5?", "10")}.items():
        row = {"q": q, "a": a} if columns else {"messages": [{"role": "user", "content": q},
                                                             {"role": "assistant", "content": a}]}
        (folder / f"{split}.jsonl").write_text(json.dumps(row) + "\n")
    return folder


@pytest.mark.parametrize("columns", [False, True])
def test_json_task_reads_the_users_files_without_writing(tmp_path, columns):
    import hashlib

    from torchtune import config

    from tests.helpers import build_tiny_tokenizer_json
    from torchtune_xgb.models.chatml import chatml_tokenizer

    folder = _user_task_dir(tmp_path, columns)
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}
    if importlib.util.find_spec("torchtune_xgb.data.json_eval") is None:
        with pytest.raises(SystemExit, match="json_eval_examples"):
            quality.json_task_spec(f"mine={folder}")
        pytest.skip("the eval: reader for user files (issue 11) is not in this checkout")
    spec = quality.json_task_spec(f"mine={folder}" + (",input=q,output=a,max_new_tokens=4" if columns else ""))
    assert spec.files["test"] == str(folder / "test.jsonl") and spec.max_new_tokens == (4 if columns else 32)
    tok = chatml_tokenizer(str(build_tiny_tokenizer_json(tmp_path / "tok.json")), max_seq_len=64)
    train = config.instantiate(OmegaConf.create(quality.dataset_cfg(spec, "train", None)), tok)
    assert len(train) == 1 and "4" in tok.decode([t for t in train[0]["labels"] if t >= 0])
    examples = config.instantiate(OmegaConf.create(quality.examples_cfg(spec, "test", None)))
    assert examples == [{"prompt_messages": [{"role": "user", "content": "5+5?"}], "answer": "10"}]
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()} == before


def test_json_task_argument_errors(tmp_path):
    with pytest.raises(SystemExit, match="expected NAME=DIR"):
        quality.json_task_spec(f"mine={tmp_path},input=q")  # input without output


def test_sweep_table_marks_the_best_on_val():
    from benchmarks.quality_report import render_sweep

    def run(value, val_em, val_loss, test_em, seed=0, default=False, seconds=None):
        # every test item right (1.0) or wrong (0.0): the bootstrap interval is the point itself
        return {"task": "strings", "factor": "κ (steps per round)", "value": value, "default": default, "seed": seed,
                "val_exact_match": val_em, "val_loss": val_loss, "test_exact_match": test_em, "test_loss": 1.0,
                "test_correct": [int(test_em)] * 4, "train_seconds": seconds}

    rows = [run(5, 0.4, 1.0, 1.0, seconds=100.0), run(5, 0.2, 1.0, 1.0, seed=1, seconds=140.0),  # val 0.3; test ignored
            run(20, 0.3, 0.8, 0.0, default=True, seconds=90.0),  # val 0.3 too, lower val loss: chosen
            run(40, 0.1, 0.5, 0.0), {"task": "strings", "factor": "κ (steps per round)", "value": 80, "default": False,
                                     "failed": True}]
    header = {"date": "d", "hardware": "h", "seeds": [0, 1], "setting": {"steps": 60, "batch_size": 8, "dtype": "fp32"}}
    text = render_sweep(rows, header)
    # training seconds: the median over seeds (100 and 140 → 120)
    assert "| strings | κ (steps per round) | 5 | 30.0% | 1.000 | 100.0% [100.0%, 100.0%] | 1.000 | 120 |  |" in text
    assert "| strings | κ (steps per round) | 20 (packaged) | 30.0% | 0.800 | 0.0% [0.0%, 0.0%] | 1.000 | 90 | ✓ |" in text
    assert "| strings | κ (steps per round) | 40 | 10.0% | 0.500 | 0.0% [0.0%, 0.0%] | 1.000 | – |  |" in text
    assert "| strings | κ (steps per round) | 80 | FAILED | – | – | – | – |  |" in text


@pytest.mark.parametrize("key", list(quality.METHODS))
def test_real_model_run_configs(tmp_path, key, smollm2_dir, monkeypatch):
    """The configs the full run generates for SmolLM2 (built, not run): epochs of `every` steps,
    the seed in the data and rounds, periodic evaluation only for our recipe, and our recipe's
    own validation passes (it loads no weights)."""
    from argparse import Namespace

    from torchtune_xgb.models.cache import CACHE_ENV
    from torchtune_xgb.config.validation import validate_config

    monkeypatch.setenv(CACHE_ENV, str(smollm2_dir.parent))  # ${xgb_cache:smollm2-135m-instruct}
    task = quality.task_specs(["facts"], [])[0]
    cfg = quality.run_config(key, task, 1e-3, 2, tmp_path / "run", quality.PRESETS["cpu"], Namespace())
    assert (cfg.epochs, cfg.max_steps_per_epoch, cfg.batch_size) == (3, 20, 8)
    assert cfg.dataset == {"_component_": "torchtune_xgb.data.task_dataset", "split": "train", "task": "facts",
                           "seed": 2}
    assert cfg.optimizer.lr == 1e-3 and cfg.seed == 2
    recipe = quality.METHODS[key][0].recipe
    if recipe == quality.OURS:
        assert cfg.eval.every_n_steps == 20 and cfg.run_val_every_n_steps == 20
        assert cfg.eval.examples.split == "test" and cfg.dataset_val.split == "test" and cfg.eval.max_new_tokens == 6
        assert ("boost" in cfg) == (key != "loraxs")  # one-round LoRA-XS must not become boosted
        if "boost" in cfg:
            assert cfg.boost.seed == 2
        validate_config(cfg)
    else:
        assert not {"eval", "dataset_val", "boost", "adapter"} & set(cfg)


def test_tiny_run_configs_keep_one_round_loraxs_unboosted(tmp_path):
    from argparse import Namespace

    from tests.e2e_fixture import make_tiny_model_dir

    args = Namespace(tiny_dir=make_tiny_model_dir(tmp_path))
    task = quality.task_specs(["strings"], [])[0]
    quick = quality.PRESETS["quick"]
    plain = quality.run_config("loraxs", task, 1e-3, 0, tmp_path / "a", quick, args)
    boosted = quality.run_config("xgblora_xs", task, 1e-3, 0, tmp_path / "b", quick, args)
    assert "boost" not in plain and boosted.boost.steps_per_round == 2 and boosted.boost.basis == "rotate"
    assert plain.model.lora_rank == 16 and plain.model._component_.endswith("lora_llama3_2")
    full = quality.run_config("full", task, 1e-5, 0, tmp_path / "c", quick, args)
    assert full.model._component_.endswith("._component_builders.llama3_2") and "lora_rank" not in full.model


def test_lr_past_edge():
    # top edge: 5e-5 is 2.5× its neighbour 2e-5, so one step on is 5e-5 × 2.5 = 1.25e-4
    assert lr_past_edge([2e-5, 1e-5, 5e-5], 5e-5) == 1.25e-4
    # bottom edge: 1e-5 is half of 2e-5, so 5e-6
    assert lr_past_edge([2e-5, 1e-5, 5e-5], 1e-5) == 5e-6
    # inside the range: nothing to add; after one extension the old edge is inside
    assert lr_past_edge([2e-5, 1e-5, 5e-5], 2e-5) is None
    assert lr_past_edge([2e-5, 1e-5, 5e-5, 1.25e-4], 5e-5) is None
    # 3 significant digits keep run ids stable: 4e-3 × 4e-3 / 1e-3 = 1.6e-2 (not 0.016000000000000004)
    assert lr_past_edge([1e-3, 4e-3], 4e-3) == 0.016
    assert lr_past_edge([3e-3], 3e-3) is None


def test_protocol_extends_the_grid_past_an_edge_best(monkeypatch):
    """protocol(): with val exact match rising with the LR up to 1e-3, the grid [1e-5, 1e-4] is
    extended to 1e-3 (best, still the edge), then 1e-2 (worse): 1e-3 is chosen and its seeds run."""
    calls = []

    def fake_run(key, task, lr, seed, setting, args, cache):
        calls.append((lr, seed))
        return {"lr": lr, "seed": seed, "val_exact_match": {1e-5: 0.1, 1e-4: 0.2, 1e-3: 0.4, 1e-2: 0.3}[lr],
                "val_loss": 1.0}

    monkeypatch.setattr(quality, "run_method", fake_run)
    monkeypatch.setattr(quality, "base_row", lambda *a: {"key": "base"})
    task = quality.task_specs(["strings"], [])[0]
    rows = quality.protocol([task], ["full"], {"full": [1e-5, 1e-4]}, [0, 1, 2], None, None, None)
    assert calls == [(1e-5, 0), (1e-4, 0), (1e-3, 0), (1e-2, 0), (1e-3, 1), (1e-3, 2)]
    assert [r["lr"] for r in rows[1:] if r["chosen"]] == [1e-3, 1e-3, 1e-3]


def test_slow_runs_against_their_group_lower_quartile():
    def run(ident, seconds, task="a", key="xgblora", overrides=None, **extra):
        return {"id": ident, "task": task, "key": key, "overrides": overrides or {}, "train_seconds": seconds, **extra}

    rows = [
        # lower quartile (inclusive) of 100, 110, 120, 160, 400 is 110; 1.5 × 110 = 165: 400 is slow,
        # 160 (another learning rate) is not
        run("a1", 100), run("a2", 110), run("a3", 120), run("a4", 400), run("a5", 160, lr=0.004),
        # another task: its own quartile (300, 310, 320 → 305), so 320 is not slow there
        run("b1", 300, task="b"), run("b2", 310, task="b"), run("b3", 320, task="b"),
        # half a group slowed (the record's ordering LoRA r=8 times): the median 300 would pass
        # 383 and 403; the lower quartile 211.75 (× 1.5 = 317.6) flags all three
        *(run(f"o{i}", t, task="o") for i, t in enumerate([206, 210, 217, 383, 403, 1309])),
        # a sweep variant (overrides) is its own group; two runs are too few to judge
        run("c1", 100, overrides={"boost.steps_per_round": 5}), run("c2", 900, overrides={"boost.steps_per_round": 5}),
        # failed and untimed rows neither count nor get flagged
        run("d1", 5000, failed=True), run("d2", None),
    ]
    assert slow_runs(rows) == ["a4", "o3", "o4", "o5"]
    assert sorted(slow_runs(rows, minimum=2)) == ["a4", "c2", "o3", "o4", "o5"]


def test_implied_defaults_need_a_margin_on_val():
    def run(factor, value, task, val_em, default=False, val_loss=1.0):
        return {"factor": factor, "value": value, "task": task, "val_exact_match": val_em, "val_loss": val_loss,
                "default": default, "test_exact_match": 1.0 - val_em}

    rows = [
        # κ: 10 averages (0.50 + 0.40) / 2 = 0.45 vs the default 20's (0.40 + 0.30) / 2 = 0.35 → +10 points: change
        run("κ", 10, "a", 0.50), run("κ", 10, "b", 0.40), run("κ", 20, "a", 0.40, True), run("κ", 20, "b", 0.30, True),
        # α: 32 is best but by (0.42 + 0.40) / 2 - (0.40 + 0.38) / 2 = 2 points only: keep 16
        run("α", 32, "a", 0.42), run("α", 32, "b", 0.40), run("α", 16, "a", 0.40, True), run("α", 16, "b", 0.38, True),
        run("α", 8, "a", 0.10), run("α", 8, "b", 0.10),
        # lr: a tie on val exact match goes to the lower val loss (the default here)
        run("lr", 0.004, "a", 0.3, val_loss=0.9), run("lr", 0.002, "a", 0.3, True, val_loss=0.8),
        {"factor": "lr", "value": 0.001, "task": "a", "failed": True},
    ]
    got = implied_defaults(rows)
    assert got["κ"]["best"] == "10" and got["κ"]["change"] and got["κ"]["gain"] == pytest.approx(0.10)
    assert got["α"]["best"] == "32" and not got["α"]["change"] and got["α"]["gain"] == pytest.approx(0.02)
    assert got["lr"] == {"best": "0.002", "default": "0.002", "gain": 0.0, "change": False}


def test_packaged_defaults_follow_the_recorded_sweep():
    """benchmarks/results/sweep_cpu.json (written by `python -m benchmarks.quality --sweep`, shown in
    docs/results/sweep.md) decides the packaged defaults by implied_defaults' rule: a changed default
    without a new sweep, or a sweep result not carried into the configs, fails here."""
    recorded = json.loads((quality.REPO / "benchmarks" / "results" / "sweep_cpu.json").read_text())
    implied = implied_defaults(recorded["rows"])
    factor_key = {factor: name for factor, (_, name, _) in quality.SWEEP.items()}
    assert set(implied) == set(factor_key)
    for factor, decision in implied.items():
        key = factor_key[factor]
        wanted = decision["best"] if decision["change"] else decision["default"]
        assert str(recorded["header"]["centre"][key]) == decision["default"]  # the sweep centred on what it says
        assert str(quality.SWEEP_DEFAULTS[key]) == wanted, (factor, quality.SWEEP_DEFAULTS[key], decision)


def test_a_diverged_run_is_that_lrs_result_and_a_crash_is_tried_again(tmp_path, monkeypatch):
    """The recipe's guard stops a diverging run (exit 1, one ``error: training diverged`` line): that
    is the learning rate's outcome, recorded and not rerun on every restart; a crash is rerun."""
    import argparse

    from benchmarks.common import RunResult
    from benchmarks.quality_report import _grid_score
    from tests.e2e_fixture import make_tiny_model_dir

    outputs = iter([
        ("round 0|step 14|loss 0.57\nerror: training diverged at step 15 (round 0): loss spiked to 6.9 …\n", 1),
        ("Traceback (most recent call last):\nRuntimeError: boom\n", 1),
        ("error: training diverged at step 3 (round 0): loss is nan …\n", 1),
    ])
    calls = []

    def fake_subprocess(cmd, stdout_path, extra_env=None):
        text, code = next(outputs)
        calls.append(stdout_path.parent.name)
        stdout_path.parent.mkdir(parents=True, exist_ok=True)
        stdout_path.write_text(text)
        return RunResult(code, 1.0, 0, stdout_path)

    monkeypatch.setattr(quality, "run_subprocess", fake_subprocess)
    args = argparse.Namespace(workdir=tmp_path / "work", keep_checkpoints=False, tiny_dir=make_tiny_model_dir(tmp_path))
    task, setting = quality.task_specs(["strings"], [])[0], quality.PRESETS["quick"]

    def run(seed):  # a fresh RunCache each time: what a restarted benchmark reads from runs.jsonl
        return quality.run_method("xgblora", task, 4e-3, seed, setting, args, quality.RunCache(args.workdir / "runs.jsonl"))

    first = run(0)
    assert first["failed"] and first["diverged_at"] == 15 and _grid_score(first) == "diverged at step 15"
    assert run(0)["diverged_at"] == 15 and len(calls) == 1  # not run again
    crashed = run(1)
    assert crashed["failed"] and "diverged_at" not in crashed and _grid_score(crashed) == "FAILED"
    assert run(1)["diverged_at"] == 3 and len(calls) == 3  # the crash was tried again
    assert first["guard_rule"] == quality.GUARD_RULE == 2


def test_a_run_the_guard_stopped_under_an_earlier_rule_is_run_again_and_reported_as_recorded(tmp_path, monkeypatch):
    """A change to what stops a run (guard.spike_patience, 2026-12-04) differs only on the runs the
    old rule stopped: those rows (without ``guard_rule``: rule 1) are run again by a protocol that
    runs, and a report renders them as recorded; the other rows are kept."""
    import argparse

    from benchmarks.common import RunResult
    from tests.e2e_fixture import make_tiny_model_dir

    calls = []

    def fake_subprocess(cmd, stdout_path, extra_env=None):
        calls.append(stdout_path.parent.name)
        stdout_path.parent.mkdir(parents=True, exist_ok=True)
        stdout_path.write_text("error: training diverged at step 9 (round 0): loss spiked to 6.9 …\n")
        return RunResult(1, 1.0, 0, stdout_path)

    monkeypatch.setattr(quality, "run_subprocess", fake_subprocess)
    args = argparse.Namespace(workdir=tmp_path / "work", keep_checkpoints=False, tiny_dir=make_tiny_model_dir(tmp_path))
    task, setting = quality.task_specs(["strings"], [])[0], quality.PRESETS["quick"]
    record = args.workdir / "runs.jsonl"

    def run(seed, report_only=False):
        args.report_only = report_only
        return quality.run_method("xgblora", task, 4e-3, seed, setting, args, quality.RunCache(record))

    stopped, finished = run(0), run(1)
    assert len(calls) == 2
    # as the record of 2026-12-03 holds them: seed 0 stopped under rule 1 (no key), seed 1 finished
    rows = [json.loads(line) for line in record.read_text().splitlines()]
    old = {**next(r for r in rows if r["id"] == stopped["id"]), "diverged_at": 62}
    del old["guard_rule"]
    done = {**next(r for r in rows if r["id"] == finished["id"]), "failed": False, "test_exact_match": 1.0}
    done.pop("diverged_at"), done.pop("guard_rule")
    record.write_text(json.dumps(old) + "\n" + json.dumps(done) + "\n")
    assert run(0, report_only=True)["diverged_at"] == 62 and run(1, report_only=True)["test_exact_match"] == 1.0
    assert len(calls) == 2  # a report starts nothing
    again = run(0)
    assert len(calls) == 3 and again["diverged_at"] == 9 and again["guard_rule"] == 2
    assert run(1)["test_exact_match"] == 1.0 and run(0)["diverged_at"] == 9 and len(calls) == 3  # nothing else reran


def test_runs_recorded_elsewhere_are_reused_and_copied_into_the_workdir(tmp_path, monkeypatch):
    """``--reuse``: a protocol too long for one sitting continues from a fresh clone. The rows of a
    committed record count as done (no subprocess), land in the new workdir's runs.jsonl (the whole
    record of the report), a workdir's own row wins over the record's, and a record's crashed row
    is still tried again."""
    import argparse

    from benchmarks.common import RunResult
    from tests.e2e_fixture import make_tiny_model_dir

    calls = []

    def fake_subprocess(cmd, stdout_path, extra_env=None):
        calls.append(stdout_path.parent.name)
        stdout_path.parent.mkdir(parents=True, exist_ok=True)
        # seed 0 diverges (a result); seed 1 crashes (not a result)
        text = "error: training diverged at step 7 (round 0): loss is nan\n" if "seed0" in stdout_path.parent.name else "boom\n"
        stdout_path.write_text(text)
        return RunResult(1, 1.0, 0, stdout_path)

    monkeypatch.setattr(quality, "run_subprocess", fake_subprocess)
    tiny = make_tiny_model_dir(tmp_path)
    task, setting = quality.task_specs(["strings"], [])[0], quality.PRESETS["quick"]

    def run(workdir, seed, reuse=()):
        args = argparse.Namespace(workdir=workdir, keep_checkpoints=False, tiny_dir=tiny)
        return quality.run_method("xgblora", task, 4e-3, seed, setting, args,
                                  quality.RunCache(workdir / "runs.jsonl", [Path(p) for p in reuse]))

    # the first machine: elsewhere in the filesystem, another checkout's paths
    first = tmp_path / "first" / "work"
    assert run(first, 0)["diverged_at"] == 7 and run(first, 1)["failed"] and len(calls) == 2
    record = tmp_path / "committed_runs.jsonl"
    record.write_text((first / "runs.jsonl").read_text())

    fresh = tmp_path / "fresh" / "work"
    assert run(fresh, 0, [record])["diverged_at"] == 7 and len(calls) == 2  # reused, not run
    copied = quality.read_runs(fresh / "runs.jsonl")
    assert {r["seed"] for r in copied.values()} == {0, 1}  # the record's rows are now the workdir's
    assert run(fresh, 1, [record])["failed"] and len(calls) == 3  # a recorded crash is tried again
    # the workdir's own (newer) row of an id wins over the record's
    own = quality.read_runs(fresh / "runs.jsonl")
    assert [r["out_dir"].startswith(str(fresh)) for r in sorted(own.values(), key=lambda r: r["seed"])] == [False, True]
    assert quality.RunCache(fresh / "runs.jsonl", [record]).rows == own
    with pytest.raises(SystemExit, match="--reuse .*missing.jsonl: file not found"):
        quality.RunCache(fresh / "runs.jsonl", [tmp_path / "missing.jsonl"])


def test_report_only_renders_the_record_and_starts_nothing(tmp_path, monkeypatch):
    """``--report-only``: the report from what the record holds, no run started, nothing added to
    the record; what it lacks is named as not run and kept out of the figures."""
    from benchmarks.common import RunResult

    def must_not_run(*args, **kwargs):
        raise AssertionError("--report-only started a run")

    monkeypatch.setattr(quality, "run_subprocess", must_not_run)
    monkeypatch.setattr(quality, "score_checkpoint", must_not_run)
    work, out = tmp_path / "work", tmp_path / "report.md"
    assert quality.main(["--quick", "--report-only", "--workdir", str(work), "--out", str(out)]) == 0
    text = out.read_text()
    # --quick: the untrained model's scores and 2 methods × 2 seeds at each one's only LR
    assert "**Incomplete: 5 runs of this protocol are not in the record**" in text
    assert "| strings | base (no training) | – | not run: 1 run(s) not in the record |" in text
    assert "| strings | torchtune LoRA r=8 | – | not run: 2 run(s) not in the record |" in text
    assert "| strings | XGBLoRA r=1 boosted | 0.002 | not run | – | ✓ |" in text  # the grid table
    assert not (work / "runs.jsonl").exists()  # nothing entered the record

    # a record that holds the runs (each diverged: a result) and the untrained model's scores
    def diverged(cmd, stdout_path, extra_env=None):
        stdout_path.parent.mkdir(parents=True, exist_ok=True)
        stdout_path.write_text("error: training diverged at step 3 (round 0): loss is nan\n")
        return RunResult(1, 1.0, 0, stdout_path)

    split = {"exact_match": 0.5, "loss": 1.0, "correct": [1, 0], "item_loss": [1.0, 1.0], "item_tokens": [1, 1]}
    monkeypatch.setattr(quality, "run_subprocess", diverged)
    monkeypatch.setattr(quality, "score_checkpoint", lambda *a, **k: {"val": split, "test": split})
    quality.main(["--quick", "--workdir", str(work)])
    recorded = (work / "runs.jsonl").read_text()
    monkeypatch.setattr(quality, "run_subprocess", must_not_run)
    monkeypatch.setattr(quality, "score_checkpoint", must_not_run)
    assert quality.main(["--quick", "--report-only", "--workdir", str(work), "--out", str(out)]) == 0
    text = out.read_text()
    assert "Incomplete" not in text and "not run" not in text
    assert "| strings | base (no training) | – | 50.0% [0.0%, 100.0%] |" in text  # 1 of 2 items
    assert "| strings | XGBLoRA r=1 boosted | 0.002 | diverged at step 3 |" in text
    assert (work / "runs.jsonl").read_text() == recorded


RESULTS = Path(quality.REPO) / "benchmarks" / "results"
# The protocol's reports among the committed results (the pre-protocol one-task
# quality_cpu_arithmetic_single_seed.md has no "task families:" header and is not a rendering of the record).
PROTOCOL_REPORTS = sorted(p.name for p in RESULTS.glob("quality_cpu*.md")
                          if "task families: " in p.read_text().splitlines()[0])


def test_the_protocol_has_a_committed_report():
    assert PROTOCOL_REPORTS, "no benchmarks/results/quality_cpu*.md rendered from the protocol's record"


@pytest.mark.parametrize("report", PROTOCOL_REPORTS)
def test_a_committed_report_is_what_the_committed_record_renders(report, tmp_path, monkeypatch):
    """A committed protocol report (the figures of docs/results/quality.md) against a fresh rendering of
    benchmarks/results/quality_cpu_runs.jsonl (the measured runs, per test item) with
    ``--report-only``, for the families its header names: every table row and goal line must match,
    so the figures come from the record, and a change that alters a run's id (a packaged default, a
    recipe setting) or the statistics shows up here instead of leaving stale numbers in the documentation.
    Command that wrote the file: ``python -m benchmarks.quality --tasks FAMILIES --seeds 3 --grid
    --report-only --reuse benchmarks/results/quality_cpu_runs.jsonl --out …``."""
    text = (RESULTS / report).read_text()
    header = re.fullmatch(r"## Quality: .*, task families: (.*), \d{4}-\d{2}-\d{2}", text.splitlines()[0])
    families = header.group(1).split(", ")
    monkeypatch.setattr(quality, "run_subprocess", lambda *a, **k: pytest.fail("--report-only started a run"))
    out = tmp_path / report
    quality.main(["--tasks", *families, "--seeds", "3", "--grid", "--report-only",
                  "--reuse", str(RESULTS / "quality_cpu_runs.jsonl"), "--workdir", str(tmp_path / "work"),
                  "--out", str(out)])

    def figures(text):  # tables and goals; not the date, the hardware or the plot's path
        return [line for line in text.splitlines() if line.startswith(("| ", "- "))]

    committed = figures(text)
    assert len(committed) > 20 * len(families) and "not run" not in "".join(committed)
    assert figures(out.read_text()) == committed


def test_components_are_keyed_by_their_defining_path():
    """The packaged configs name builders by torchtune_xgb's public aliases; run ids and the plain
    model of a LoRA builder read the defining module's path, so both spellings are one run."""
    from benchmarks.common import PLAIN_MODELS, defining_path

    assert defining_path("torchtune_xgb.lora_smollm2_135m") == "torchtune_xgb.models.smollm2.lora_smollm2_135m"
    # an alias of another function keeps its own name (smollm2_tokenizer is chatml_tokenizer's)
    assert defining_path("torchtune_xgb.smollm2_tokenizer") == "torchtune_xgb.models.chatml.smollm2_tokenizer"
    for unchanged in ("torchtune.training.FullModelHFCheckpointer", "torchtune_xgb.no_such_name",
                      "torchtune_xgb.models.smollm2.smollm2_135m"):
        assert defining_path(unchanged) == unchanged
    assert defining_path("torchtune_xgb.lora_smollm2_135m") in PLAIN_MODELS
    aliased = OmegaConf.create({"model": {"_component_": "torchtune_xgb.lora_smollm2_135m", "lora_rank": 8}})
    spelled = OmegaConf.create({"model": {"_component_": "torchtune_xgb.models.smollm2.lora_smollm2_135m", "lora_rank": 8}})
    assert quality.config_fingerprint(aliased, Path("/x")) == quality.config_fingerprint(spelled, Path("/x"))


def test_a_seed_that_diverged_at_the_chosen_rate_scores_zero_not_dropped():
    """XGBLoRA's seeds 0 and 1 get all 4 items; seed 2 at the same (chosen) rate was stopped by
    the guard. Dropped, the method would read 100%; counted as a run that left no model it is
    (4 + 4 + 0) / 12 = 66.7%, and against LoRA r=8 (0% on every seed) +66.7 points paired. Its
    loss is that of the seeds that finished (0.5); pooled over two families, the same."""
    rows = _rows() + [{"key": "xgblora", "method": "XGBLoRA r=1 boosted", "task": "dates", "lr": 2e-3, "seed": 2,
                       "chosen": True, "failed": True, "diverged_at": 62},
                      {"key": "lora_r8", "method": "torchtune LoRA r=8", "task": "dates", "lr": 1e-3, "seed": 2,
                       "chosen": True, "val_exact_match": 0.5, "val_loss": 1.0, "test_correct": [0] * 4,
                       "test_item_loss": [0.5] * 4, "test_item_tokens": [2] * 4, "trainable_params": 100}]
    xgb = summarise(rows)["dates"]["xgblora"]
    assert xgb["correct_by_seed"] == {0: [1, 1, 1, 1], 1: [1, 1, 1, 1], 2: [0, 0, 0, 0]}
    assert xgb["exact_match"][0] == pytest.approx(8 / 12) and xgb["seeds"] == "3 (1 diverged, scored 0)"
    assert xgb["loss"] == pytest.approx((0.5, 0.5, 0.5))
    header = {"date": "2026-12-04", "model": "SmolLM2-135M-Instruct", "hardware": "test CPU", "seeds": [0, 1, 2],
              "grid": {}, "arithmetic": {"dates": False},
              "setting": {"steps": 20, "every": 20, "batch_size": 8, "dtype": "fp32"}}
    text = render_protocol(rows, header)
    assert re.search(r"\| dates \| XGBLoRA r=1 boosted \| 0\.002 \| 66\.7% \[[^|]+\] \| [a-z]+ \| \+66\.7 \[[^|]+\] \| "
                     r"0\.500 \[0\.500, 0\.500\] \| 100 \| 3 \(1 diverged, scored 0\) \|", text)
    twice = rows + [dict(r, task="facts") for r in rows]
    pool = pooled(summarise(twice))["xgblora"]
    assert pool["exact_match"][0] == pytest.approx(8 / 12) and pool["seeds"] == 3
    assert pool["loss"][0] == pytest.approx(0.5)  # over seeds 0 and 1, whose losses are known
