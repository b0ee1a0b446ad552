"""A torchtune user's own LoRA config runs with our recipe: the recipe name and one ``boost`` key.

torchtune's ``llama3_2/1B_lora_single_device`` (its file, by name, as ``tune run`` resolves it)
with only what this machine needs swapped in: the tiny 2-layer Llama-3.2-shaped model for the 1B
weights, a local tokenizer and dataset (no download), ``device=cpu`` and a short run. Everything
else is torchtune's: rank 64 on q/v/output_proj and the MLP, gradient accumulation 8, fused AdamW,
the chunked cross-entropy loss, bf16, ``seed: null``, the profiler block.
"""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.e2e_fixture import EXPORT, TUNE, make_tiny_model_dir
from tests.tiny_model import TINY
from torchtune_xgb.cli import main
from torchtune_xgb.config.names import resolve_config

TORCHTUNE_CONFIG = "llama3_2/1B_lora_single_device"


def _swaps(root: Path, out: Path):
    """The overrides that put the tiny local model, tokenizer and data in place of the 1B ones."""
    tiny = make_tiny_model_dir(root)
    return [
        "model._component_=torchtune.models.llama3_2._component_builders.lora_llama3_2",
        *[f"model.{k}={v}" for k, v in TINY.items()],
        "tokenizer._component_=torchtune_xgb.models.chatml.chatml_tokenizer", f"tokenizer.path={tiny}/tokenizer.json",
        f"checkpointer.checkpoint_dir={tiny}",
        "dataset._component_=torchtune_xgb.data.arithmetic_dataset", "~dataset.packed", f"dataset.data_dir={root}/data",
        "dataset.n_train=300", "device=cpu", f"output_dir={out}", "max_steps_per_epoch=8",
    ]


def _tune_run(tmp_path: Path, *args: str):
    """``tune run <args>`` in ``tmp_path`` with datasets offline; asserts exit 0, returns the result."""
    result = subprocess.run([TUNE, "run", *args], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, HF_DATASETS_OFFLINE="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _changed_keys(tmp_path: Path, out: Path):
    """Keys of the tiny base whose exported tensor differs from the checkpoint's."""
    exported = load_file(out / EXPORT)
    base = load_file(tmp_path / "tiny_model" / "model.safetensors")
    return [k for k in base if not torch.equal(base[k].to(exported[k].dtype), exported[k])]


def test_torchtunes_config_names_resolve_to_torchtunes_files(tmp_path, capsys):
    path = Path(resolve_config(TORCHTUNE_CONFIG))
    assert path.parts[-4:] == ("recipes", "configs", "llama3_2", "1B_lora_single_device.yaml") and path.is_file()
    assert "lora_llama3_2_1b" in path.read_text()
    assert main(["validate", TORCHTUNE_CONFIG, *_swaps(tmp_path, tmp_path / "out"), "boost.steps_per_round=4"]) == 0
    assert capsys.readouterr().out.strip() == f"{path}: config is well-formed"
    with pytest.raises(FileNotFoundError, match=r"neither a file, a packaged config .* nor one of torchtune's"):
        resolve_config("llama3_2/1B_lora_single_devic")


@pytest.mark.slow
def test_torchtunes_own_lora_config_plus_one_boost_key_trains_boosted_rounds(tmp_path):
    out = tmp_path / "out"
    _tune_run(tmp_path, "xgblora_finetune", "--config", TORCHTUNE_CONFIG, *_swaps(tmp_path, out), "boost.steps_per_round=4")
    summary = json.loads((out / "xgb_summary.json").read_text())
    assert summary["steps"] == 8 and summary["rounds"] == 2  # κ = 4: a merge after step 4, the last at 8
    # torchtune's rank 64 on q, v, output_proj (64→64, 64→32, 64→64) and w1, w3 (64→128), w2 (128→64),
    # every block each round (the boost block's default): 64 × (128 + 96 + 128 + 3 × 192) × 2 layers
    assert summary["trainable_params"] == 64 * (128 + 96 + 128 + 3 * 192) * 2 == 118_784
    changed = _changed_keys(tmp_path, out)
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight", "o_proj.weight", "gate_proj.weight",
                                       "up_proj.weight", "down_proj.weight")) for k in changed), changed
    assert (out / "epoch_0" / "adapter" / "adapter_config.json").is_file()


@pytest.mark.slow
def test_torchtunes_distributed_lora_config_runs_under_fsdp_on_two_processes(tmp_path):
    """``tune run --nproc_per_node 2 xgblora_finetune --config llama3_2/1B_lora`` (gloo on CPU)."""
    out = tmp_path / "out"
    _tune_run(tmp_path, "--nproc_per_node", "2", "--standalone", "xgblora_finetune", "--config", "llama3_2/1B_lora",
              *_swaps(tmp_path, out), "boost.steps_per_round=4", "max_steps_per_epoch=4", "batch_size=2")
    summary = json.loads((out / "xgb_summary.json").read_text())
    assert summary["steps"] == 4 and summary["rounds"] == 1
    manifest = json.loads((out / "xgb_resume" / "step_00000004" / "manifest.json").read_text())
    assert manifest["run"]["world_size"] == 2  # the FSDP2 recipe ran, on two ranks
    assert any(k.endswith("q_proj.weight") for k in _changed_keys(tmp_path, out))
