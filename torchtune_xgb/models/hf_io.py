"""Write torchtune state dicts as Hugging Face llama directories.

Used by ``tune-xgb prepare`` (GGUF -> HF) and by test fixtures that save tiny random models, so
nothing here is specific to one model. The directory this writes is what torchtune's
``FullModelHFCheckpointer(model_type="LLAMA3_2")`` and ``transformers.LlamaForCausalLM`` read.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any, List, Mapping, Optional, Union

import torch
from safetensors.torch import save_file

WEIGHTS_NAME = "model.safetensors"

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def llama_hf_config(
    vocab_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    embed_dim: int,
    intermediate_dim: int,
    max_seq_len: int,
    rope_base: float,
    norm_eps: float,
    tie_word_embeddings: bool = True,
    bos_token_id: Optional[int] = None,
    eos_token_id: Optional[int] = None,
    pad_token_id: Optional[int] = None,
    torch_dtype: str = "float32",
) -> dict:
    """A standard ``LlamaForCausalLM`` ``config.json`` as a dict.

    Takes torchtune's builder argument names (``embed_dim``, ``num_layers`` ...) and returns HF's
    names (``hidden_size``, ``num_hidden_layers`` ...). No RoPE scaling is written: the models
    this project builds use plain RoPE (torchtune ``scale_factor=1``).
    """
    if embed_dim % num_heads:
        raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": embed_dim,
        "intermediate_size": intermediate_dim,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": embed_dim // num_heads,
        "hidden_act": "silu",
        "max_position_embeddings": max_seq_len,
        "rms_norm_eps": norm_eps,
        "rope_theta": float(rope_base),
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": tie_word_embeddings,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
        "torch_dtype": torch_dtype,
    }


def save_hf_checkpoint(
    tune_state_dict: Mapping[str, torch.Tensor],
    out_dir: Union[str, Path],
    hf_config: dict,
    tokenizer_json: Union[str, Path, None] = None,
    extra_files: Optional[Mapping[str, Any]] = None,
) -> Path:
    """Write a torchtune-format llama state dict as an HF directory; returns ``out_dir``.

    Args:
        tune_state_dict: plain (no LoRA keys) torchtune llama state dict, e.g.
            ``model.state_dict()`` of a ``llama3_2`` decoder. With ``tie_word_embeddings`` an
            ``output.weight`` key, if present, is dropped (HF ties ``lm_head`` to the embedding).
        out_dir: the directory to create; an existing one is replaced as a whole.
        hf_config: a ``config.json`` dict (see :func:`llama_hf_config`); ``torch_dtype`` is
            overwritten with the dtype of the weights actually written.
        tokenizer_json: optional ``tokenizer.json`` to copy in.
        extra_files: optional ``{file name: content}``; content is ``str`` (text), ``bytes``,
            ``dict``/``list`` (written as JSON) or a ``Path`` (copied).

    Writes ``model.safetensors``, ``config.json``, ``generation_config.json`` (from the config's
    bos/eos ids, unless ``extra_files`` has one), the tokenizer and the extra files into a
    temporary sibling directory (named with this host and process id), fsyncs them, then renames
    it into place, so a crash never leaves a half-written ``out_dir``; the temporary directories a
    killed writer left next to ``out_dir`` are removed first (:func:`remove_stale_temp_dirs`).
    """
    # Imported here: torchtune costs seconds to import and callers of llama_hf_config don't need it.
    from torchtune.models.convert_weights import tune_to_hf

    out_dir = Path(out_dir)
    extra_files = dict(extra_files or {})
    state = dict(tune_state_dict)
    if any("lora" in k or "magnitude" in k for k in state):
        raise ValueError("save_hf_checkpoint: state dict has adapter keys; merge them first")
    if hf_config.get("tie_word_embeddings", False):
        # Tied models keep one matrix; a second copy would also share storage, which safetensors
        # refuses to save.
        state.pop("output.weight", None)
    elif "output.weight" not in state:
        raise ValueError("save_hf_checkpoint: untied config but the state dict has no output.weight")

    hf_state = tune_to_hf(
        state,
        num_heads=hf_config["num_attention_heads"],
        num_kv_heads=hf_config["num_key_value_heads"],
        dim=hf_config["hidden_size"],
        head_dim=hf_config.get("head_dim"),
    )
    # safetensors needs contiguous CPU tensors; tune_to_hf maps each key once, so none alias.
    hf_state = {k: v.detach().to("cpu").contiguous() for k, v in hf_state.items()}
    config = dict(hf_config)
    dtype = hf_state["model.embed_tokens.weight"].dtype
    config["torch_dtype"] = _DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))

    from torchtune_xgb.run.safe_files import fsync_dir, fsync_tree

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_dirs(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(out_dir, "tmp"), dir=out_dir.parent))
    try:
        save_file(hf_state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        _write_json(tmp / "config.json", config)
        if "generation_config.json" not in extra_files:
            gen = {k: config.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
            _write_json(tmp / "generation_config.json", {k: v for k, v in gen.items() if v is not None})
        if tokenizer_json is not None:
            shutil.copyfile(tokenizer_json, tmp / "tokenizer.json")
        for name, content in extra_files.items():
            _write_extra(tmp / name, content)
        _make_readable(tmp)
        fsync_tree(tmp)  # on disk before the rename publishes them: a crash never shows empty files
        _replace_dir(tmp, out_dir)
        fsync_dir(out_dir.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _owner() -> str:
    """``HOST-PID`` of this process, as temporary directory names carry it (no ``-`` in HOST)."""
    return f"{re.sub(r'[^A-Za-z0-9.]', '_', socket.gethostname())}-{os.getpid()}"


def _temp_prefix(out_dir: Path, kind: str) -> str:
    return f".{out_dir.name}.{kind}-{_owner()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temp_dirs(out_dir: Path) -> List[Path]:
    """Remove the temporary siblings of ``out_dir`` (``.NAME.tmp-HOST-PID-*`` being written,
    ``.NAME.old-HOST-PID-*`` being replaced) that a killed writer on this host left: its PID no
    longer runs. Another host's, or a live process's, are left alone. Returns what was removed."""
    host = _owner().rsplit("-", 1)[0]
    pattern = re.compile(rf"\.{re.escape(out_dir.name)}\.(?:tmp|old)-(?P<host>[A-Za-z0-9._]+)-(?P<pid>\d+)-[^-/]+")
    removed = []
    for entry in out_dir.parent.iterdir():
        match = pattern.fullmatch(entry.name)
        if match is None or match["host"] != host or int(match["pid"]) == os.getpid() or _alive(int(match["pid"])):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_extra(path: Path, content: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, Path):
        shutil.copyfile(content, path)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    elif isinstance(content, (dict, list)):
        _write_json(path, content)
    else:
        raise TypeError(f"extra file {path.name}: unsupported content type {type(content).__name__}")


def _make_readable(root: Path) -> None:
    """Give the temp dir (mkdtemp: 0700) and its files the modes a normal mkdir/open would."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(root, 0o777 & ~umask)
    for path in root.rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def _replace_dir(src: Path, dst: Path) -> None:
    """Move the finished directory ``src`` to ``dst``, replacing any old ``dst``.

    ``os.replace`` cannot overwrite a non-empty directory, so an old ``dst`` is first renamed
    aside and deleted after the new one is in place.
    """
    old = None
    if dst.exists():
        old = Path(tempfile.mkdtemp(prefix=_temp_prefix(dst, "old"), dir=dst.parent))
        os.replace(dst, old / dst.name)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
