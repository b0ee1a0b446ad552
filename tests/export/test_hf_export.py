"""Outputs every tool loads: ``epoch_0/`` is a plain merged model, ``epoch_0/adapter/`` a PEFT LoRA.

Runs (shared with test_e2e / test_e2e_loraxs, each once per session): one-round LoRA-XS, XGBLoRA
(3 rounds, one random block of two per round, so module ranks differ and a block may be untouched),
boosted LoRA-XS (rotate basis). All fp32 on the tiny 2-layer model.

Two independent checks of the adapter:
- in plain torch, applying PEFT's rule W + (α/r)·B·A per module (with rank_pattern/alpha_pattern)
  to the base checkpoint gives the merged export (no Hugging Face code involved);
- with the real loaders (transformers ``from_pretrained``, ``PeftModel``, ``AutoPeftModelForCausalLM``)
  in venvs of their own, ``.venv-hf`` (transformers 5) and ``.venv-hf4`` (transformers 4), built by
  ``make test`` (peft 0.21 refuses torchao 0.15, which the main venv pins; transformers 4 needs
  huggingface_hub < 1, which the main venv's datasets excludes), run as a subprocess by
  tests/hf_peft_check.py.
"""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torchtune.models.convert_weights import hf_to_tune
from torchtune.models.llama3_2._component_builders import llama3_2

from tests.e2e_fixture import REPO, make_tiny_model_dir
from tests.tiny_model import TINY

RUNS = ("loraxs_plain", "xgblora", "xgblora_xs")
EXPORT = "model-00001-of-00001.safetensors"
# the loaders' venvs, one per transformers major version users have (make test builds both)
HF_PYTHONS = {
    "5": Path(os.environ.get("TORCHTUNE_XGB_HF_PYTHON", REPO / ".venv-hf" / "bin" / "python")),
    "4": Path(os.environ.get("TORCHTUNE_XGB_HF4_PYTHON", REPO / ".venv-hf4" / "bin" / "python")),
}
TOKENS = torch.arange(1, 17).unsqueeze(0)
# fp32 runs: logits of two loaders of the same weights agree to ~1e-6; an adapter applied twice or
# left out moves them by ≥ 8e-3 in these runs (asserted below: > 10 × the tolerance)
LOGITS_ATOL = 1e-4


@pytest.fixture(scope="module")
def runs(single_process_run):
    return {name: single_process_run(name) for name in RUNS}


def _adapter(run: Path):
    d = run / "epoch_0" / "adapter"
    return load_file(d / "adapter_model.safetensors"), json.loads((d / "adapter_config.json").read_text())


def _apply_peft_rule(base, tensors, config):
    """PEFT's LoRA forward as a weight update, in plain torch: W + (α_m / r_m)·B·A."""
    out = dict(base)
    for key, lora_a in tensors.items():
        if ".lora_A." not in key:
            continue
        module = key[len("base_model.model."):].rsplit(".lora_A.", 1)[0]
        rank = config["rank_pattern"].get(module, config["r"])
        alpha = config["alpha_pattern"].get(module, config["lora_alpha"])
        lora_b = tensors[key.replace(".lora_A.", ".lora_B.")]
        assert lora_a.shape[0] == lora_b.shape[1] == rank, module
        out[f"{module}.weight"] = base[f"{module}.weight"] + (alpha / rank) * lora_b @ lora_a
    return out


def _torchtune_logits(hf_state) -> torch.Tensor:
    model = llama3_2(**TINY)
    sd = hf_to_tune(hf_state, num_heads=TINY["num_heads"], num_kv_heads=TINY["num_kv_heads"], dim=TINY["embed_dim"])
    model.load_state_dict(sd, strict=False)  # tied output: no separate output.weight
    model.eval()
    with torch.no_grad():
        return model(TOKENS)[0]


@pytest.mark.parametrize("name", RUNS)
def test_merged_export_is_plain_and_adapter_dir_is_complete(runs, name):
    epoch = runs[name] / "epoch_0"
    assert not list(epoch.glob("adapter_*")), "adapter files beside the merged weights get applied twice"
    tensors, config = _adapter(runs[name])
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert Path(config["base_model_name_or_path"]).is_absolute()
    assert (Path(config["base_model_name_or_path"]) / "model.safetensors").is_file()
    assert set(k.rsplit(".", 1)[-1] for k in config["target_modules"]) <= {"q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"}
    assert all(k.startswith("base_model.model.model.layers.") for k in tensors)
    summary = json.loads((runs[name] / "xgb_summary.json").read_text())
    assert summary["adapter_bytes"] == (epoch / "adapter" / "adapter_model.safetensors").stat().st_size
    assert summary["adapter_min_kept_fraction"] == 1.0  # no export.adapter_rank: exact


def test_module_ranks_are_the_ledger_ranks(runs):
    """XGBLoRA, rank 1 × one block per round: each module's rank = rounds its block was picked."""
    summary = json.loads((runs["xgblora"] / "xgb_summary.json").read_text())
    picked = [0, 0]
    for report in summary["round_reports"]:
        for block in report["blocks"]:
            picked[block] += 1
    tensors, config = _adapter(runs["xgblora"])
    for layer, count in enumerate(picked):
        key = f"base_model.model.model.layers.{layer}.self_attn.q_proj.lora_A.weight"
        if count == 0:
            assert key not in tensors and f"model.layers.{layer}.self_attn.q_proj" not in config["target_modules"]
        else:
            assert tensors[key].shape[0] == count


@pytest.mark.parametrize("name", RUNS)
def test_adapter_by_peft_rule_on_base_equals_merged_export(runs, name):
    base = load_file(make_tiny_model_dir(runs[name].parent) / "model.safetensors")
    merged = load_file(runs[name] / "epoch_0" / EXPORT)
    tensors, config = _adapter(runs[name])
    by_hand = _apply_peft_rule(base, tensors, config)
    assert by_hand.keys() == merged.keys()
    for key in merged:
        assert torch.allclose(by_hand[key], merged[key], rtol=0, atol=1e-6), (key, (by_hand[key] - merged[key]).abs().max())
    reference = _torchtune_logits(merged)
    assert (reference - _torchtune_logits(base)).abs().max() > 10 * LOGITS_ATOL  # the run changed the model


@pytest.fixture(scope="module", params=sorted(HF_PYTHONS, reverse=True), ids=lambda major: f"transformers{major}")
def hf_logits(runs, tmp_path_factory, request):
    """Logits of transformers / PEFT loaders, from the HF venv of one transformers major version
    (skips without it)."""
    major, python = request.param, HF_PYTHONS[request.param]
    if not python.is_file():
        pytest.skip(f"no Hugging Face venv at {python} (make test builds .venv-hf and .venv-hf4: transformers + peft)")
    base_dir = make_tiny_model_dir(runs["xgblora"].parent)
    out = tmp_path_factory.mktemp("hf") / "logits.safetensors"
    result = subprocess.run(
        [str(python), str(REPO / "tests" / "hf_peft_check.py"), str(base_dir), str(out), *map(str, runs.values())],
        capture_output=True, text=True, timeout=600, env=dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1"),
    )
    assert result.returncode == 0, result.stderr[-4000:]
    info = json.loads(out.with_suffix(".json").read_text())
    assert info["transformers"].split(".")[0] == major, f"{python} has transformers {info['transformers']}"
    return load_file(out), info


@pytest.mark.parametrize("name", RUNS)
def test_transformers_loads_merged_export_as_the_torchtune_model(runs, hf_logits, name):
    logits, info = hf_logits
    reference = _torchtune_logits(load_file(runs[name] / "epoch_0" / EXPORT))
    got = logits[f"{name}/merged"]
    assert torch.allclose(got, reference, rtol=0, atol=LOGITS_ATOL), (got - reference).abs().max()
    assert not info["runs"][name]["merged_has_adapter"] and not info["runs"][name]["merged_warnings"]
    assert (logits["base"] - reference).abs().max() > 10 * LOGITS_ATOL  # tolerance far below the run's change


@pytest.mark.parametrize("name", RUNS)
def test_peft_adapter_on_base_gives_merged_logits(runs, hf_logits, name):
    logits, info = hf_logits
    merged = logits[f"{name}/merged"]
    for loader in ("peft", "auto_peft"):
        got = logits[f"{name}/{loader}"]
        assert torch.allclose(got, merged, rtol=0, atol=LOGITS_ATOL), (loader, (got - merged).abs().max())
    tensors, _ = _adapter(runs[name])
    assert info["runs"][name]["lora_modules"] == sum(".lora_A." in k for k in tensors)
    assert not [w for w in info["runs"][name]["peft_warnings"] if "key" in w.lower()], info["runs"][name]["peft_warnings"]


def test_nf4_run_writes_a_bf16_adapter_that_names_its_merge_base(single_process_run):
    run = single_process_run("xgblora_nf4")  # shared with test_e2e_nf4 / test_distributed
    assert not list((run / "epoch_0").glob("adapter_*"))
    tensors, config = _adapter(run)
    details = json.loads((run / "epoch_0" / "adapter" / "xgb_adapter.json").read_text())
    assert details["merge_base"] == "dequantized"  # applies to the NF4-quantized base (docs/guides/nf4.md)
    assert config["task_type"] == "CAUSAL_LM" and all(t.dtype == torch.bfloat16 for t in tensors.values())
    assert sum(".lora_A." in k for k in tensors) == len(details["modules"]) > 0


def test_save_adapter_weights_only_writes_the_same_adapter_and_no_merged_model(runs, tmp_path):
    """torchtune's ``save_adapter_weights_only: True``: on a large base the merged model is the base's
    size; the run's update is the adapter alone, identical to a full export's."""
    from tests.e2e_fixture import run_recipe, tiny_config

    root = runs["xgblora"].parent  # the shared runs' tiny model and data: the same run as "xgblora"
    out = tmp_path / "adapter_only"
    result = run_recipe(tiny_config(root, out), tmp_path, "save_adapter_weights_only=True")
    assert result.returncode == 0, result.stderr[-3000:]
    epoch = out / "epoch_0"
    assert sorted(p.name for p in epoch.iterdir()) == ["adapter", "xgb_export.json"]  # no model-*.safetensors
    tensors, config = _adapter(out)
    reference, reference_config = _adapter(runs["xgblora"])
    assert config == reference_config and tensors.keys() == reference.keys()
    for key in tensors:
        assert torch.equal(tensors[key], reference[key]), key
    summary = json.loads((out / "xgb_summary.json").read_text())
    assert summary["export"] == "adapter"
    assert json.loads((runs["xgblora"] / "xgb_summary.json").read_text())["export"] == "merged model and adapter"


def test_save_adapter_weights_only_needs_the_hf_checkpointer(tmp_path):
    from omegaconf import OmegaConf

    from tests.e2e_fixture import tiny_config
    from torchtune_xgb.errors import ConfigError
    from torchtune_xgb.config.validation import validate_config

    cfg = OmegaConf.create(tiny_config(tmp_path, tmp_path / "out"))
    cfg.save_adapter_weights_only = True
    validate_config(cfg)
    cfg.checkpointer._component_ = "torchtune.training.FullModelMetaCheckpointer"
    with pytest.raises(ConfigError, match=r"^save_adapter_weights_only: the run's update is written as a PEFT adapter, "
                                          r"which needs torchtune.training.FullModelHFCheckpointer"):
        validate_config(cfg)
    cfg.save_adapter_weights_only = "yes"
    with pytest.raises(ConfigError, match=r"^save_adapter_weights_only: must be true or false, got 'yes'"):
        validate_config(cfg)
