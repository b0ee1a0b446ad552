"""The benchmarks' log parsing, aggregation, ratios, goals and tables, and `tune-xgb plot`.

Hand-written DiskLogger lines, numbers checked against values worked out by hand. No real runs,
no timing thresholds.
"""

import importlib.util
import json

import pytest

from benchmarks import common, quality, throughput
from torchtune_xgb import cli
from torchtune_xgb.eval.plot import loss_curve, merge_steps, parse_metric_lines, parse_value, read_run

# torchtune's own recipes log loss and tokens/s as tensors; ours as floats; one merge at step 3.
LOG = """\
Step 1 | loss:tensor(2.5000) lr:0.0002 tokens_per_second_per_gpu:tensor(100.) time:10.0
Step 2 | loss:2.0 lr:0.0004 tokens_per_second_per_gpu:120.0 round:0 trainable_params:305280 time:11.5
Step 3 | loss:1.5 lr:0.0006 tokens_per_second_per_gpu:80 round:0 trainable_params:305280 time:13.5
Step 3 | round:0 merge_seconds:0.25 reset_seconds:0.05 kept_fraction:0.99999 trainable_params:305280 merged_modules:210 time:13.6
Step 4 | loss:1.0 lr:0.0008 tokens_per_second_per_gpu:90 round:1 time:14.5
Writing logs to somewhere
Step 5 | loss:0.5 lr:0.001 tokens_per_second_per_gpu:110 round:1 time:17.0
Step 6 | loss:tensor(0.4000, device='cuda:0') peak_memory_alloc:3.25 time:18.0
"""


@pytest.fixture
def lines():
    return parse_metric_lines(LOG.splitlines())


def test_parse_value():
    assert parse_value("0.5") == 0.5
    assert parse_value("tensor(2.5000)") == 2.5
    assert parse_value("tensor(1.5e-03, device='cuda:0')") == 0.0015
    assert parse_value("tensor(100.)") == 100.0
    assert parse_value("abc") is None


def test_parse_metric_lines(lines):
    assert [s for s, _ in lines] == [1, 2, 3, 3, 4, 5, 6]  # the non-"Step" line is skipped
    assert lines[0][1] == {"loss": 2.5, "lr": 0.0002, "tokens_per_second_per_gpu": 100.0, "time": 10.0}
    assert lines[6][1]["loss"] == 0.4 and lines[6][1]["peak_memory_alloc"] == 3.25
    assert lines[3][1]["kept_fraction"] == 0.99999


def test_loss_curve_and_merges(lines):
    assert loss_curve(lines) == ([1, 2, 3, 4, 5, 6], [2.5, 2.0, 1.5, 1.0, 0.5, 0.4])
    assert merge_steps(lines) == [3]


def test_step_seconds(lines):
    # stamps 10, 11.5, 13.5, 14.5, 17, 18 (the merge line at step 3 is not a step line)
    assert common.step_seconds(lines, skip=0) == pytest.approx([1.5, 2.0, 1.0, 2.5, 1.0])
    assert common.step_seconds(lines, skip=3) == pytest.approx([1.0, 2.5, 1.0])


def test_logged_values(lines):
    # steps 2..5 log tokens/s 120, 80, 90, 110 → median (90 + 110) / 2
    assert common.logged_median(lines, "tokens_per_second_per_gpu", skip=1) == pytest.approx(100.0)
    assert common.logged_max(lines, "peak_memory_alloc") == 3.25
    assert common.logged_max(lines, "nothing") is None
    assert common.merge_seconds_from_log(lines) == pytest.approx(0.30)


def test_aggregate_pools_repeats_and_skips_failures():
    gib = common.GIB
    runs = [
        {"returncode": 0, "step_seconds": [1.0, 2.0, 3.0], "tokens_per_second": 100.0, "peak_rss_bytes": 1 * gib,
         "trainable_params": 305280, "merge_seconds": 1.0, "wall_seconds": 100.0, "merges": 2},
        {"returncode": 0, "step_seconds": [2.0, 4.0], "tokens_per_second": 120.0, "peak_rss_bytes": 3 * gib,
         "trainable_params": 305280, "merge_seconds": 3.0, "wall_seconds": 100.0, "merges": 2},
        {"returncode": 1},
    ]
    row = throughput.aggregate("x", runs, kappa=5, cuda=False)
    assert row["failed"] == 1 and row["runs"] == 3
    assert row["step_seconds"] == 2.0  # median of 1, 2, 3, 2, 4
    assert row["step_seconds_per_repeat"] == [2.0, 3.0]
    assert row["tokens_per_second"] == 110.0
    assert row["peak_memory_gib"] == pytest.approx(2.0)
    assert row["merge_share"] == pytest.approx(0.02)  # median of 1% and 3%
    assert row["seconds_per_merge"] == pytest.approx(1.0)  # 4 s over 4 merges


def _rows():
    return {
        throughput.LORA_R8: {"step_seconds": 2.0, "peak_memory_gib": 1.2},
        throughput.BOOSTED: {"step_seconds": 1.9, "peak_memory_gib": 1.5, "seconds_per_merge": 0.5},
        throughput.FLOOR_NAME: {"step_seconds": 1.85},
    }


def test_ratio_and_merge_share():
    rows = _rows()
    assert throughput.ratio(rows, throughput.BOOSTED, throughput.LORA_R8) == pytest.approx(0.95)
    assert throughput.ratio(rows, throughput.LORAXS, throughput.LORA_R16) is None
    # 0.5 s per merge, 50 steps of 1.9 s per round: 0.5 / 95.5
    assert throughput.merge_share_at(rows[throughput.BOOSTED], 50) == pytest.approx(0.5 / 95.5)


def test_goals():
    by_goal = {g["goal"].split(" ≤")[0]: g for g in throughput.goals(_rows(), kappa=50)}
    assert by_goal["boosted rank-1 step time"]["passed"] is True  # 0.95 ≤ 0.98 (and 1.027 ≤ 1.05)
    assert by_goal["LoRA-XS r=16 step time"]["passed"] is None  # rows missing
    assert by_goal["merge + re-init + reset"]["passed"] is False  # 0.524% > 0.5%
    assert by_goal["merge + re-init + reset"]["shown"] == "0.52%"
    assert by_goal["peak memory (boosted)"]["value"] == pytest.approx(1.25)
    floor = [g for g in throughput.goals(_rows(), 50) if "bare frozen base" in g["goal"]][0]
    assert floor["value"] == pytest.approx(1.9 / 1.85) and floor["passed"] is True


def test_render_table():
    rows = [dict(method=n, **v) for n, v in _rows().items()]
    header = {"model": "smollm2-135m", "date": "2026-11-23", "hardware": "cpu", "device": "cpu", "dtype": "fp32",
              "batch_size": 8, "max_seq_len": 256, "steps": 15, "warmup": 3, "repeats": 2, "kappa": 50}
    text = throughput.render(rows, throughput.goals(_rows(), 50), header)
    assert f"| {throughput.BOOSTED} | 1.900 | 0.950 | – | 1.50 | – | – |" in text
    assert "- PASS: boosted rank-1 step time ≤ 0.98" in text
    assert "- MISS: merge" in text and "n/a (row missing)" in text


def test_markdown_table():
    assert common.markdown_table(["a", "b"], [[1, None]]) == "| a | b |\n|---|---|\n| 1 | – |"


def test_build_config_rows(tmp_path):
    lora = common.build_config(throughput.methods(50)[0], tmp_path, steps=7, batch_size=4, device="cpu", dtype="fp32")
    assert "boost" not in lora and "eval" not in lora and lora.model.lora_rank == 8
    assert lora.max_steps_per_epoch == 7 and lora.batch_size == 4
    assert lora.metric_logger._component_ == "benchmarks.timed_logger.TimedDiskLogger"
    assert "${" not in json.dumps(common.OmegaConf.to_container(lora))  # torchtune needs no resolver
    ours = common.build_config(throughput.methods(50)[2], tmp_path, steps=7, batch_size=4, device="cpu", dtype="fp32")
    assert ours.boost.steps_per_round == 50 and "eval" not in ours and ours.save_every_n_steps is None
    full = common.build_config(quality.METHODS["full"][0], tmp_path, steps=7, batch_size=4, device="cpu",
                               dtype="fp32", lr=1e-5)
    assert full.model == {"_component_": "torchtune_xgb.models.smollm2.smollm2_135m"}
    assert full.optimizer.lr == 1e-5 and full.optimizer_in_bwd is False


def test_available_skips_missing_configs(capsys):
    rows = common.available([common.Method("ghost", common.OURS, config="no_such_config")])
    assert rows == [] and "skipping ghost" in capsys.readouterr().out


def test_quality_lrs():
    assert quality.parse_lrs(["lora_r8=1e-3,3e-3", "full=1e-5"]) == {"lora_r8": [1e-3, 3e-3], "full": [1e-5]}
    with pytest.raises(SystemExit):
        quality.parse_lrs(["nope=1"])
    # the protocol's tables, intervals and goals are tested in tests/benchmarks/test_quality_protocol.py


def _run_dir(tmp_path):
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "metrics.txt").write_text(LOG)
    (tmp_path / "xgb_summary.json").write_text(json.dumps({"method": "xgblora", "rounds": 2}))
    return tmp_path


def test_read_run(tmp_path):
    run = read_run(_run_dir(tmp_path))
    assert run["steps"] == [1, 2, 3, 4, 5, 6] and run["merges"] == [3] and run["summary"]["rounds"] == 2


def test_plot_cli(tmp_path, capsys):
    out = tmp_path / "curve.png"
    rc = cli.main(["plot", str(_run_dir(tmp_path)), "--out", str(out)])
    if importlib.util.find_spec("matplotlib") is None:
        assert rc == 2 and "pip install matplotlib" in capsys.readouterr().err
    else:
        assert rc == 0 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_cli_without_logs(tmp_path, capsys):
    if importlib.util.find_spec("matplotlib") is None:
        pytest.skip("matplotlib not installed: the missing-dependency message is checked above")
    assert cli.main(["plot", str(tmp_path)]) == 2 and "no metric logs" in capsys.readouterr().err


def test_nf4_memory_report_ratios_growth_and_goal():
    from benchmarks import nf4_memory

    header = {"date": "2026-11-23", "hardware": "test CPU", "device": "cpu", "batch_size": 1, "rounds": 100, "project_to": 100}
    rows = [
        {"name": "torchtune QLoRA r=8", "failed": False, "peak_gib": 1.25},
        # 100 rounds × 305,280 fp32 entries = 122,112,000 bytes = 116.46 MiB, 1.16 MiB per round
        {"name": "XGBLoRA NF4 κ=1, all blocks", "failed": False, "peak_gib": 1.375, "rounds": 100,
         "merged_state_bytes": 122_112_000, "min_kept_fraction": 0.99991},
        {"name": "XGBLoRA NF4 κ=1, blocks_per_round 0.34", "failed": False, "peak_gib": 1.30, "rounds": 100,
         "merged_state_bytes": 40_704_000, "min_kept_fraction": 0.99993},
        {"name": "broken", "failed": True},
    ]
    text = nf4_memory.report(header, rows)
    assert "| XGBLoRA NF4 κ=1, all blocks | 1.375 | 1.100 | 100 | 116.5 | 1.16 | 0.99991 |" in text
    assert "| XGBLoRA NF4 κ=1, blocks_per_round 0.34 | 1.300 | 1.040 | 100 | 38.8 | 0.39 | 0.99993 |" in text
    assert "- MISS: XGBLoRA NF4 κ=1, all blocks — measured 1.100×" in text  # 1.375 / 1.25
    assert "- PASS: XGBLoRA NF4 κ=1, blocks_per_round 0.34 — measured 1.040×" in text
    assert "| broken | failed |" in text
    assert "projected" not in text  # measured at the target: nothing to project
    # measured at 100 rounds, projected to 200: + 100 × 1.1646 MiB = 0.1137 GiB → 1.4887 GiB, 1.191×
    projected = nf4_memory.report(dict(header, project_to=200), rows)
    assert "- MISS (projected): XGBLoRA NF4 κ=1, all blocks at 200 rounds — 1.489 GiB, 1.191×" in projected
    labels = [m.name for m in nf4_memory.methods(["all", "0.34"])]
    assert labels == ["torchtune QLoRA r=8", "XGBLoRA NF4 κ=1, all blocks", "XGBLoRA NF4 κ=1, blocks_per_round 0.34"]
