"""Held-out loss (`dataset_val` + `run_val_every_n_steps`) and periodic exact match during training.

One tiny end-to-end run (12 steps, κ = 4): `val_loss` every 5 steps and at the final step, over an
8-example validation set in batches of 3 (the last batch is short: nothing may be dropped), and
`exact_match` every 6 steps on the user's own JSON-lines file (input/output columns, `number`
normaliser; its sha256 is checked unchanged afterwards). The final `val_loss` is checked against the cross-entropy of the
exported model computed here with plain torch (the last round merges at step 12, so the model
scored at the final step is exactly the export).
"""

import hashlib
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from safetensors.torch import load_file

from tests.e2e_fixture import EXPORT, make_tiny_model_dir, read_metric, run_recipe, tiny_config
from tests.tiny_model import TINY, tiny_base



def _val_dataset_cfg(root):
    return {
        "_component_": "torchtune_xgb.data.arithmetic_dataset",
        "split": "eval", "n_eval": 8, "data_dir": str(root / "data"),
    }


def _write_user_eval_file(root) -> Path:
    """The user's own evaluation file: input/output columns, JSON lines, read-only for the run."""
    path = root / "user" / "my_eval.jsonl"
    path.parent.mkdir(exist_ok=True)
    rows = [{"question": f"What is {a} + {b}? Answer with the number only.", "result": str(a + b)}
            for a, b in ((12, 30), (47, 38), (5, 5), (70, 11))]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def user_eval_file(root):
    path = _write_user_eval_file(root)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def run(root, user_eval_file):
    out = root / "run"
    cfg = tiny_config(root, out, dataset_val=_val_dataset_cfg(root), run_val_every_n_steps=5, batch_size_val=3)
    cfg["eval"] = {
        "examples": {"_component_": "torchtune_xgb.data.json_eval_examples", "path": str(user_eval_file[0]),
                     "input_column": "question", "output_column": "result"},
        "normalize": "number", "every_n_steps": 6, "max_new_tokens": 4, "batch_size": 8,
    }
    cfg["export"] = {"adapter_rank": 1}  # checked in test_truncated_adapter_keeps_the_top_direction
    result = run_recipe(cfg, root)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def _reference_val_loss(root, export_path) -> float:
    """Token-mean CE of the exported model over the validation set, one sample at a time."""
    from torchtune.models.convert_weights import hf_to_tune

    from torchtune_xgb.data import arithmetic_dataset
    from torchtune_xgb.models.chatml import chatml_tokenizer

    tokenizer = chatml_tokenizer(path=str(make_tiny_model_dir(root) / "tokenizer.json"), max_seq_len=64)
    dataset = arithmetic_dataset(tokenizer, **{k: v for k, v in _val_dataset_cfg(root).items() if k != "_component_"})
    model = tiny_base()
    sd = hf_to_tune(load_file(export_path), num_heads=TINY["num_heads"], num_kv_heads=TINY["num_kv_heads"],
                    dim=TINY["embed_dim"])
    model.load_state_dict(sd, strict=False)  # tied output: no separate key
    model.eval()
    loss_sum, count = 0.0, 0
    assert len(dataset) == 8
    with torch.no_grad():
        for sample in dataset:
            tokens = torch.tensor(sample["tokens"])[None]
            labels = torch.tensor(sample["labels"])[None]
            logits = model(tokens)
            loss_sum += F.cross_entropy(logits[0, :-1].double(), labels[0, 1:], ignore_index=-100, reduction="sum").item()
            count += int((labels[0, 1:] != -100).sum())
    return loss_sum / count


def test_val_loss_logged_at_interval_and_end(root, run):
    val = read_metric(run, "val_loss")
    assert sorted(val) == [5, 10, 12]
    assert val[12] == pytest.approx(_reference_val_loss(root, run / EXPORT), rel=1e-4)
    assert val[5] != val[10] != val[12]  # scored on the model of that step, not once


def test_exact_match_on_the_users_file_logged_at_interval_and_end(run, user_eval_file):
    em = read_metric(run, "exact_match")
    assert sorted(em) == [6, 12]
    summary = json.loads((run / "xgb_summary.json").read_text())
    assert em[12] == pytest.approx(summary["exact_match_after"])
    assert all(v * 4 == int(v * 4) for v in em.values())  # a fraction of the file's 4 records
    path, digest = user_eval_file
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest  # the run never wrote to it
    assert sorted(p.name for p in path.parent.iterdir()) == ["my_eval.jsonl"]  # nor beside it


@pytest.mark.parametrize(
    "update,key",
    [
        ({"run_val_every_n_steps": 5}, "run_val_every_n_steps"),  # no dataset_val
        ({"run_val_every_n_steps": 0, "dataset_val": {"_component_": "x"}}, "run_val_every_n_steps"),
        ({"dataset_val": "alpaca"}, "dataset_val"),
        ({"dataset_val": {"_component_": "x"}, "batch_size_val": -1}, "batch_size_val"),
        ({"eval": {"every_n_steps": 5}}, "eval.every_n_steps"),  # no eval.examples
        ({"eval": {"every_n_steps": 1.5, "examples": {}}}, "eval.every_n_steps"),
    ],
)
def test_bad_periodic_eval_config_names_the_key(update, key):
    from torchtune_xgb.errors import ConfigError
    from torchtune_xgb.eval.config import parse_eval_config
    from torchtune_xgb.eval.periodic import validate_periodic_eval_config

    cfg = OmegaConf.create({"batch_size": 4, **update})
    with pytest.raises(ConfigError) as err:
        validate_periodic_eval_config(cfg)
        parse_eval_config(cfg)  # eval.every_n_steps is checked with its block
    assert str(err.value).startswith(f"{key}:") and "\n" not in str(err.value), str(err.value)


def test_truncated_adapter_keeps_the_top_direction(root, run):
    """`export.adapter_rank: 1`: per module, the adapter is the top singular direction of what the
    run changed (export − base, computed here), and the reported kept fraction is 1 − ‖L − L₁‖/‖L‖."""
    base = load_file(make_tiny_model_dir(root) / "model.safetensors")
    merged = load_file(run / EXPORT)
    adapter_dir = run / "epoch_0" / "adapter"
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["r"] == 1 and not config["rank_pattern"]
    kept_reported = [m["kept_fraction"] for m in json.loads((adapter_dir / "xgb_adapter.json").read_text())["modules"].values()]
    kept_here = []
    for key in tensors:
        if ".lora_A." not in key:
            continue
        module = key[len("base_model.model."):].rsplit(".lora_A.", 1)[0]
        delta = (merged[f"{module}.weight"] - base[f"{module}.weight"]).double()
        u, s, vh = torch.linalg.svd(delta)
        top = s[0] * torch.outer(u[:, 0], vh[0])
        lora = tensors[key.replace(".lora_A.", ".lora_B.")].double() @ tensors[key].double()
        assert torch.allclose(lora, top, atol=1e-5 * float(s[0])), module
        kept_here.append(1.0 - float(s[1:].square().sum().sqrt() / s.square().sum().sqrt()))
    assert sorted(kept_reported) == pytest.approx(sorted(kept_here), abs=1e-3)
    summary = json.loads((run / "xgb_summary.json").read_text())
    assert summary["adapter_min_kept_fraction"] == pytest.approx(min(kept_reported))
    assert summary["adapter_min_kept_fraction"] < 0.99  # some module had rank > 1: the cut is real
