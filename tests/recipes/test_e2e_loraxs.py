"""End to end LoRA-XS through ``tune run xgblora_finetune`` on the tiny 2-layer model."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torchtune.models.convert_weights import hf_to_tune
from torchtune.models.llama3_2._component_builders import llama3_2

from tests.e2e_fixture import EXPORT, losses, make_tiny_model_dir, read_metric
from tests.tiny_model import TINY

GOLDEN = json.loads((Path(__file__).parent.parent / "golden" / "tiny_xgblora_xs_losses.json").read_text())["losses"]
# q, v and the three MLP projections of both blocks, each with an r×r = 4×4 core
MODULES = 2 * 5


def test_boosted_loraxs_golden_losses_and_parameter_count(single_process_run):
    out = single_process_run("xgblora_xs")  # tiny_loraxs_config(..., boosted=True), shared with test_hf_export
    assert losses(out) == pytest.approx(GOLDEN, rel=1e-4)
    summary = json.loads((out / "xgb_summary.json").read_text())
    assert summary["method"] == "loraxs" and summary["rounds"] == 3
    # blocks_per_round = 1 in the tiny config: one block's 5 modules per round, r² each
    assert summary["trainable_params"] == 5 * 4 * 4
    assert all(v >= 0.99 for v in read_metric(out, "kept_fraction").values())
    assert (out / "epoch_0" / "adapter" / "adapter_model.safetensors").exists()  # boosted runs too
    assert not list((out / "epoch_0").glob("adapter_*"))  # the merged export is a plain model


def test_plain_loraxs_exports_an_equivalent_peft_lora(root, single_process_run):
    out = single_process_run("loraxs_plain")  # tiny_loraxs_config(..., boosted=False) on one process
    summary = json.loads((out / "xgb_summary.json").read_text())
    assert summary["rounds"] == 1 and summary["trainable_params"] == MODULES * 16
    got = losses(out)
    assert got[-1] < got[0]

    config = json.loads((out / "epoch_0" / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 4 and config["peft_type"] == "LORA"
    adapter = load_file(out / "epoch_0" / "adapter" / "adapter_model.safetensors")
    base = load_file(make_tiny_model_dir(root) / "model.safetensors")
    merged = load_file(out / EXPORT)
    # apply the PEFT adapter by hand, in plain torch, in HF layout: W + (alpha/r)·B·A
    by_hand = dict(base)
    for key in adapter:
        if ".lora_A." not in key:
            continue
        target = key.replace("base_model.model.", "").replace(".lora_A.weight", ".weight")
        lora_b = adapter[key.replace(".lora_A.", ".lora_B.")]
        by_hand[target] = base[target] + (config["lora_alpha"] / config["r"]) * lora_b @ adapter[key]
    assert sum(".lora_A." in k for k in adapter) == MODULES
    for key in base:
        assert torch.allclose(by_hand[key], merged[key], atol=1e-5), key

    def logits(hf_state):
        model = llama3_2(**TINY)
        sd = hf_to_tune(hf_state, num_heads=TINY["num_heads"], num_kv_heads=TINY["num_kv_heads"], dim=TINY["embed_dim"])
        model.load_state_dict(sd, strict=False)  # tied output: no separate output.weight
        with torch.no_grad():
            return model(torch.arange(1, 17).unsqueeze(0))

    reference = logits(by_hand)
    assert torch.allclose(logits(merged), reference, atol=1e-4)
    assert not torch.allclose(logits(base), reference, atol=1e-3)  # the adapter changed the model
