"""The adapter export's pure transforms (torchtune_xgb/export/adapter.py), table-driven, in process."""

import math

import pytest
import torch
from omegaconf import OmegaConf
from torchtune.models.convert_weights import tune_to_hf

from torchtune_xgb.errors import ConfigError
from torchtune_xgb.export.adapter import lora_factors, peft_adapter
from torchtune_xgb.export.config import parse_export_config

SINGULAR = torch.tensor([4.0, 3.0, 2.0, 1.0])


def _known_update(out_dim=12, in_dim=10, seed=0):
    """L = Q1·diag(4, 3, 2, 1)·Q2ᵀ with random orthonormal Q1, Q2: its SVD is known by construction."""
    gen = torch.Generator().manual_seed(seed)
    q1, _ = torch.linalg.qr(torch.randn(out_dim, 4, generator=gen, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(in_dim, 4, generator=gen, dtype=torch.float64))
    return q1, q2, (q1 * SINGULAR.double()) @ q2.T


def test_exact_factors_are_kept_as_they_are():
    u, v = torch.randn(12, 3), torch.randn(3, 10)
    factors, report = lora_factors({"layers.0.attn.q_proj": (u, v)})
    b, a = factors["layers.0.attn.q_proj"]
    assert torch.equal(b, u) and torch.equal(a, v)
    assert report["layers.0.attn.q_proj"] == {"rank": 3, "kept_fraction": 1.0}


@pytest.mark.parametrize("form", ["factors", "dense"])
@pytest.mark.parametrize("max_rank", [None, 1, 2, 3, 4, 9])
def test_truncation_keeps_top_directions_and_reports_the_kept_fraction(form, max_rank):
    q1, q2, full = _known_update()
    # the factor form deliberately unbalanced and non-orthogonal: U·V = L only as a product
    mix = torch.tensor([[1.0, 2.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 3.0, 1.0], [0.0, 0.0, 0.0, 0.5]], dtype=torch.float64)
    update = {"dense": full.float()} if form == "dense" else ((q1 * SINGULAR.double()) @ mix, torch.linalg.inv(mix) @ q2.T)
    if form == "factors":
        update = (update[0].float(), update[1].float())
    factors, report = lora_factors({"m": update}, max_rank)
    b, a = factors["m"]
    k = 4 if max_rank is None else min(max_rank, 4)
    expected = (q1[:, :k] * SINGULAR[:k].double()) @ q2[:, :k].T
    assert torch.allclose((b.double() @ a.double()), expected, atol=1e-5)
    kept = 1.0 - math.sqrt(float(SINGULAR[k:].square().sum()) / float(SINGULAR.square().sum()))
    assert report["m"]["kept_fraction"] == pytest.approx(kept, abs=1e-6)
    if form == "dense" and max_rank is None:
        assert report["m"]["rank"] == 10  # a dense ledger's exact SVD: min(out, in) directions


def _tiny_hf_config(layers=2):
    return {"num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 64, "num_hidden_layers": layers}


def test_peft_keys_and_q_k_rows_follow_the_checkpointers_hf_conversion():
    gen = torch.Generator().manual_seed(1)
    factors = {
        f"layers.{i}.attn.{p}": (torch.randn(rows, 2, generator=gen), torch.randn(2, 64, generator=gen))
        for i in range(2) for p, rows in (("q_proj", 64), ("k_proj", 32))
    }
    tensors, config = peft_adapter(factors, _tiny_hf_config(), "/base", torch.float32)
    for name, (b, a) in factors.items():
        i, proj = name.split(".")[1], name.rsplit(".", 1)[1]
        hf_name = f"model.layers.{i}.self_attn.{proj}"
        # what FullModelHFCheckpointer writes for a merged weight B·A of this module
        hf_weight = tune_to_hf({f"{name}.weight": b @ a}, num_heads=4, num_kv_heads=2, dim=64)[f"{hf_name}.weight"]
        lora_b = tensors[f"base_model.model.{hf_name}.lora_B.weight"]
        lora_a = tensors[f"base_model.model.{hf_name}.lora_A.weight"]
        assert torch.allclose(lora_b @ lora_a, hf_weight, atol=1e-5), name
    assert config["target_modules"] == ["k_proj", "q_proj"] and config["rank_pattern"] == {}
    assert config["r"] == config["lora_alpha"] == 2 and config["base_model_name_or_path"] == "/base"


def test_differing_ranks_and_untouched_modules_are_described_exactly():
    factors = {
        "layers.0.attn.q_proj": (torch.ones(64, 3), torch.ones(3, 64)),
        "layers.0.mlp.w1": (torch.ones(128, 1), torch.ones(1, 64)),
        "layers.1.mlp.w1": (torch.ones(128, 1), torch.ones(1, 64)),
        # layers.1.attn.q_proj: never trained, no factors
    }
    _, config = peft_adapter(factors, _tiny_hf_config(), "/base", torch.bfloat16)
    assert config["r"] == config["lora_alpha"] == 1
    assert config["rank_pattern"] == config["alpha_pattern"] == {"model.layers.0.self_attn.q_proj": 3}
    assert config["target_modules"] == [
        "model.layers.0.mlp.gate_proj", "model.layers.0.self_attn.q_proj", "model.layers.1.mlp.gate_proj",
    ]


@pytest.mark.parametrize(
    "block,key",
    [
        ({"adapter_rank": 0}, "export.adapter_rank"),
        ({"adapter_rank": 1.5}, "export.adapter_rank"),
        ({"adapter_rank": True}, "export.adapter_rank"),
        ({"adapter_rnak": 4}, "export.adapter_rnak"),
        ("yes", "export"),
    ],
)
def test_bad_export_block_names_the_key(block, key):
    with pytest.raises(ConfigError) as err:
        parse_export_config(OmegaConf.create({"export": block}))
    assert str(err.value).startswith(f"{key}:") and "\n" not in str(err.value), str(err.value)


def test_export_block_is_optional():
    assert parse_export_config(OmegaConf.create({})).adapter_rank is None
    assert parse_export_config(OmegaConf.create({"export": {"adapter_rank": 8}})).adapter_rank == 8
