"""End to end: ``tune run xgblora_finetune`` as a subprocess on a tiny 2-layer model in HF format."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.tiny_model import TINY
from tests.e2e_fixture import EXPORT, TUNE, kill_and_resume, losses, make_tiny_model_dir, read_metric, run_recipe, tiny_config

GOLDEN = json.loads((Path(__file__).parent.parent / "golden" / "tiny_xgblora_losses.json").read_text())["losses"]


@pytest.fixture(scope="module")
def full_run(single_process_run):
    return single_process_run("xgblora")  # tiny_config, shared with test_hf_export


def test_golden_losses(full_run):
    got = losses(full_run)
    assert len(got) == len(GOLDEN) == 12
    assert got == pytest.approx(GOLDEN, rel=1e-4)
    assert got[-1] < got[0]  # it learns


def test_round_metrics_and_summary(full_run):
    kept = read_metric(full_run, "kept_fraction")
    assert sorted(kept) == [4, 8, 12]  # one merge per κ = 4 steps
    assert all(v >= 0.99 for v in kept.values())
    assert set(read_metric(full_run, "merge_seconds")) == {4, 8, 12}
    summary = json.loads((full_run / "xgb_summary.json").read_text())
    for key in ("method", "rounds", "steps", "trainable_params", "distinct_params_touched", "wall_seconds",
                "merge_seconds", "min_kept_fraction", "final_loss", "exact_match_before", "exact_match_after"):
        assert key in summary, key
    assert summary["method"] == "xgblora" and summary["rounds"] == 3 and summary["steps"] == 12
    # rank-1 on q, v (64×64, 32×64… see TINY) and the MLP (w1, w2, w3) of ONE block per round:
    # q: 1×64 + 64×1, v: 64 + 32, w1: 64 + 128, w2: 128 + 64, w3: 64 + 128  → 800
    assert summary["trainable_params"] == (64 + 64) + (64 + 32) + (64 + 128) + (128 + 64) + (64 + 128)
    assert summary["final_loss"] == pytest.approx(GOLDEN[-1], rel=1e-4)


def test_resume_after_sigkill_matches_uninterrupted(root, full_run):
    # κ = 4, checkpoints every 3 steps: killed after step 7, resumes from step 6 (mid-round 1)
    out = kill_and_resume(run_recipe, tiny_config(root, root / "killed"), root, full_run, rel=1e-5, killed_code=-9)
    a, b = load_file(full_run / EXPORT), load_file(out / EXPORT)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key


def test_export_changes_only_adapted_weights_and_generate_loads_it(root, full_run):
    base = load_file(make_tiny_model_dir(root) / "model.safetensors")
    merged = load_file(full_run / EXPORT)
    assert base.keys() == merged.keys()  # plain model keys: no lora_* left
    for key in base:
        adapted = any(t in key for t in ("q_proj", "v_proj", "mlp."))
        changed = not torch.equal(base[key], merged[key])
        assert changed == adapted, key
    gen_cfg = {
        "output_dir": str(root / "gen"),
        "model": {"_component_": "torchtune.models.llama3_2._component_builders.llama3_2", **TINY},
        "checkpointer": {
            "_component_": "torchtune.training.FullModelHFCheckpointer",
            "checkpoint_dir": str(full_run / "epoch_0"),
            "checkpoint_files": ["model-00001-of-00001.safetensors"],
            "output_dir": str(root / "gen"),
            "model_type": "LLAMA3_2",
        },
        "device": "cpu", "dtype": "fp32", "seed": 0,
        "tokenizer": tiny_config(root, root / "x")["tokenizer"],
        "prompt": {"system": None, "user": "What is 12 + 34? Answer with the number only."},
        "max_new_tokens": 5, "temperature": 0.6, "top_k": 50, "enable_kv_cache": True, "quantizer": None,
    }
    path = root / "generate.yaml"
    path.write_text(yaml.safe_dump(gen_cfg))
    result = subprocess.run([TUNE, "run", "generate", "--config", str(path)], cwd=root,
                            capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "tokens/sec" in result.stderr + result.stdout


def test_bad_config_stops_before_loading_with_one_line(root):
    result = run_recipe(tiny_config(root, root / "bad_cli"), root, "boost.steps_per_round=0")
    assert result.returncode == 2
    err_lines = [l for l in result.stderr.splitlines() if l.startswith("error:")]
    assert err_lines == ["error: boost.steps_per_round: must be an integer ≥ 1, got 0"], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert "Model is initialized" not in result.stderr + result.stdout  # no weights were loaded
