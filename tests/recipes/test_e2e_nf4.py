"""End to end on an NF4 base (QLoRA-style) through ``tune run xgblora_finetune``."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.e2e_fixture import EXPORT, kill_and_resume, losses, make_tiny_model_dir, read_metric, run_recipe, tiny_nf4_config

GOLDEN = json.loads((Path(__file__).parent.parent / "golden" / "tiny_xgblora_nf4_losses.json").read_text())["losses"]


def test_nf4_golden_losses_kept_fraction_and_resume(root, single_process_run):
    full = single_process_run("xgblora_nf4")  # tiny_nf4_config(...) on one process
    assert losses(full) == pytest.approx(GOLDEN, rel=1e-3)
    kept = read_metric(full, "kept_fraction")
    assert sorted(kept) == [4, 8, 12] and all(v >= 0.99 for v in kept.values())
    # three rank-1 rounds fit in the rank-32 view (the default) beside the NF4 weights: the forward pass sees
    # the exact rounds (the deviation a 16-column sketch measures is fp32 noise)
    deviation = read_metric(full, "view_deviation")
    assert sorted(deviation) == [4, 8, 12] and all(v < 1e-5 for v in deviation.values())
    summary = json.loads((full / "xgb_summary.json").read_text())
    assert summary["max_view_deviation"] == max(deviation.values())
    # killed after step 7, resumed from the mid-round checkpoint at step 6
    out = kill_and_resume(run_recipe, tiny_nf4_config(root, root / "killed"), root, full, rel=1e-5, killed_code=-9)
    exported, again = load_file(full / EXPORT), load_file(out / EXPORT)
    base = load_file(make_tiny_model_dir(root) / "model.safetensors")
    assert exported.keys() == base.keys()
    for key in exported:
        assert exported[key].dtype == torch.bfloat16
        assert torch.allclose(exported[key].float(), again[key].float(), atol=1e-6), key


def test_nf4_loraxs_runs_and_decomposes_full_precision_weights(single_process_run):
    out = single_process_run("loraxs_nf4")  # tiny_nf4_config(..., method="loraxs") on one process
    summary = json.loads((out / "xgb_summary.json").read_text())
    assert summary["method"] == "loraxs" and summary["min_kept_fraction"] >= 0.99
    got = losses(out)
    assert got[-1] < got[0]
