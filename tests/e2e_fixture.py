"""A tiny 2-layer model saved in HF format plus a config, for end-to-end recipe runs.

Used by the tests and by ``tests/golden/make_golden.py`` (which records the golden losses), so
both run exactly the same configuration.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

import pytest
import yaml

from tests.helpers import build_tiny_tokenizer_json
from tests.tiny_model import TINY, tiny_base
from torchtune_xgb.models.hf_io import llama_hf_config, save_hf_checkpoint

REPO = Path(__file__).resolve().parent.parent
# the merged export a one-epoch run leaves, relative to its output_dir
EXPORT = "epoch_0/model-00001-of-00001.safetensors"
# the venv's own `tune`; else the one on PATH (a `pip install --target DIR` puts it in DIR/bin)
_VENV_TUNE = Path(sys.executable).parent / "tune"
TUNE = str(_VENV_TUNE) if _VENV_TUNE.exists() else (shutil.which("tune") or "tune")


def make_tiny_model_dir(root: Path) -> Path:
    """Write the tiny base model (seeded random weights) + tokenizer.json in HF format."""
    model_dir = root / "tiny_model"
    if (model_dir / "config.json").exists():
        return model_dir
    tok = root / "tokenizer.json"
    build_tiny_tokenizer_json(tok)
    hf_config = llama_hf_config(
        vocab_size=TINY["vocab_size"],
        num_layers=TINY["num_layers"],
        num_heads=TINY["num_heads"],
        num_kv_heads=TINY["num_kv_heads"],
        embed_dim=TINY["embed_dim"],
        intermediate_dim=TINY["intermediate_dim"],
        max_seq_len=TINY["max_seq_len"],
        rope_base=TINY["rope_base"],
        norm_eps=TINY["norm_eps"],
        tie_word_embeddings=True,
    )
    save_hf_checkpoint(tiny_base(seed=0).state_dict(), model_dir, hf_config, tokenizer_json=tok)
    return model_dir


def tiny_config(root: Path, output_dir: Path, **overrides) -> Dict:
    """The packaged SmolLM2 config with the tiny model, tiny data and short schedule swapped in."""
    model_dir = make_tiny_model_dir(root)
    cfg = yaml.safe_load((REPO / "configs" / "smollm2_135m_xgblora.yaml").read_text())
    cfg["output_dir"] = str(output_dir)
    cfg["model_dir"] = str(model_dir)
    cfg["model"] = {
        "_component_": "torchtune.models.llama3_2._component_builders.lora_llama3_2",
        "lora_attn_modules": ["q_proj", "v_proj"],
        "apply_lora_to_mlp": True,
        "lora_rank": 1,
        "lora_alpha": 2.0,
        **{k: v for k, v in TINY.items()},
    }
    cfg["tokenizer"] = {
        "_component_": "torchtune_xgb.models.chatml.chatml_tokenizer",
        "path": str(model_dir / "tokenizer.json"),
        "max_seq_len": 64,
    }
    data = {"data_dir": str(root / "data"), "n_train": 64, "n_eval": 8}
    cfg["dataset"] = {"_component_": "torchtune_xgb.data.arithmetic_dataset", "split": "train", **data}
    cfg["eval"] = {
        "examples": {"_component_": "torchtune_xgb.data.load_eval_examples", "split": "eval", **data},
        "max_new_tokens": 4,
        "batch_size": 8,
    }
    cfg["boost"] = dict(cfg["boost"], steps_per_round=4, blocks_per_round=1, rewarmup_steps=1, seed=0)
    cfg.update(batch_size=4, max_steps_per_epoch=12, epochs=1, save_every_n_steps=3, dtype="fp32")
    cfg["optimizer"]["lr"] = 1e-2
    cfg["lr_scheduler"]["num_warmup_steps"] = 2
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


# a user prompt of more than 64 tiny-tokenizer tokens: with train_on_input=False and the tiny
# configs' max_seq_len of 64 it leaves no label token
LONG_PROMPT = "Describe " + " ".join(f"thing{j}" for j in range(60))


def chat(i: int, long: bool = False) -> Dict:
    """An OpenAI-style chat sample: a short sum and its answer, or ``LONG_PROMPT`` and that answer."""
    prompt = LONG_PROMPT if long else f"What is {i} + {i + 3}?"
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": f"The answer is {2 * i + 3}."}]}


def chat_config(root: Path, output_dir: Path, chats: List[Dict], **overrides) -> Dict:
    """:func:`tiny_config` on ``chats`` (written to ``<output_dir>.jsonl``) through torchtune's
    ``chat_dataset`` with ``train_on_input=False``; no eval, no mid-run resume checkpoints."""
    data = output_dir.with_name(f"{output_dir.name}.jsonl")
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text("\n".join(json.dumps(c) for c in chats))
    cfg = tiny_config(root, output_dir, **{"save_every_n_steps": None, **overrides})
    cfg.pop("eval")
    cfg["dataset"] = {"_component_": "torchtune.datasets.chat_dataset", "source": "json", "data_files": str(data),
                      "split": "train", "conversation_column": "messages", "conversation_style": "openai",
                      "train_on_input": False}
    return cfg


def loraxs_overrides(boosted: bool) -> Dict:
    """Config changes that turn the tiny XGBLoRA config into (boosted) LoRA-XS, rank 4."""
    over = {"adapter": {"method": "loraxs", "sigma": "input", "init": "normal", "svd": {"method": "exact"}}}
    if not boosted:
        over["boost"] = None  # no boosting: one round
    return over


def tiny_loraxs_config(root: Path, output_dir: Path, boosted: bool) -> Dict:
    cfg = tiny_config(root, output_dir, **loraxs_overrides(boosted))
    cfg["model"].update(lora_rank=4, lora_alpha=4.0)
    if cfg["boost"] is None:
        del cfg["boost"]
    else:
        cfg["boost"]["basis"] = "rotate"
    return cfg


def tiny_nf4_config(root: Path, output_dir: Path, method: str = "xgblora") -> Dict:
    """NF4 base (QLoRA-style): bf16 compute, all tiny shapes quantize with fitted scaler blocks."""
    cfg = tiny_loraxs_config(root, output_dir, boosted=True) if method == "loraxs" else tiny_config(root, output_dir)
    cfg["model"]["quantize_base"] = True
    cfg["dtype"] = "bf16"
    return cfg


# name → config builder of each golden end-to-end run (tests/golden/make_golden.py records them)
GOLDEN_RUNS = {
    "xgblora": lambda root, out: tiny_config(root, out),
    "xgblora_xs": lambda root, out: tiny_loraxs_config(root, out, boosted=True),
    "xgblora_nf4": lambda root, out: tiny_nf4_config(root, out),
}


# name → config builder of the one-process runs that several test files compare against; each
# runs once per test session (conftest.single_process_run)
SHARED_RUNS = {
    "xgblora": lambda root, out: tiny_config(root, out),
    "xgblora_xs": lambda root, out: tiny_loraxs_config(root, out, boosted=True),
    "xgblora_nf4": lambda root, out: tiny_nf4_config(root, out),
    "loraxs_nf4": lambda root, out: tiny_nf4_config(root, out, method="loraxs"),
    "loraxs_plain": lambda root, out: tiny_loraxs_config(root, out, boosted=False),
}


def run_recipe(cfg: Dict, cwd: Path, *extra: str, env_extra: Dict[str, str] = None) -> subprocess.CompletedProcess:
    """``tune run xgblora_finetune --config <cfg>`` in ``cwd`` (not the repo: proves install)."""
    cfg_path = cwd / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, PYTHONHASHSEED="0", HF_DATASETS_OFFLINE="1", **(env_extra or {}))
    return subprocess.run(
        [TUNE, "run", "xgblora_finetune", "--config", str(cfg_path), *extra],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=600,
        # Ctrl-C as at a terminal even when the suite runs as a background job (SIGINT ignored,
        # which a child inherits and the recipe rightly keeps ignoring)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def read_metric(output_dir: Path, name: str) -> Dict[int, float]:
    """``{step: value}`` of metric ``name`` from the DiskLogger file (last value per step wins)."""
    values: Dict[int, float] = {}
    pattern = re.compile(rf"(?:^| ){re.escape(name)}:(\S+)")
    for line in (output_dir / "logs" / "metrics.txt").read_text().splitlines():
        if not line.startswith("Step "):
            continue
        step = int(line.split()[1])
        match = pattern.search(line.split("|", 1)[1])
        if match:
            values[step] = float(match.group(1))
    return values


def losses(output_dir: Path) -> List[float]:
    per_step = read_metric(output_dir, "loss")
    return [per_step[s] for s in sorted(per_step)]


def kill_and_resume(run, cfg: Dict, cwd: Path, reference_dir: Path, rel: float, killed_code: Optional[int] = None) -> Path:
    """SIGKILL a run after step 7, resume it, and check it repeats the uninterrupted run.

    ``run`` is :func:`run_recipe` or a distributed launcher with the same signature; ``cfg`` must
    write resume state every 3 steps over 12 steps (the tiny configs do), so the run resumes from
    step 6, mid-round. Asserts that the killed run wrote no export, that the resume starts at step 6
    and that steps 7–12 have ``reference_dir``'s losses within ``rel``. Returns the output dir.
    """
    from torchtune_xgb.run.faults import KILL_AT_STEP_ENV

    out = Path(cfg["output_dir"])
    killed = run(cfg, cwd, env_extra={KILL_AT_STEP_ENV: "7"})
    assert killed.returncode != 0 if killed_code is None else killed.returncode == killed_code, killed.stderr[-2000:]
    assert not (out / "epoch_0").exists()
    resumed = run(cfg, cwd, "resume_from_checkpoint=True")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "Resumed at step 6" in resumed.stderr + resumed.stdout
    full, again = read_metric(reference_dir, "loss"), read_metric(out, "loss")
    assert sorted(again) == list(range(1, 13))
    for step in range(7, 13):  # recomputed after the resume
        assert again[step] == pytest.approx(full[step], rel=rel), step
    return out
