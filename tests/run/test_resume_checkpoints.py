"""Resume checkpoints: atomic writes, manifests that catch corruption, fallback, the run's identity.

In-process and cheap: each corruption of each file, truncation, a crash and a full disk while
saving, and every changed-config resume the reliability issue found. The end-to-end versions
(a real run killed, corrupted and resumed) are in test_faults.py.
"""

import hashlib
import io
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from tests.e2e_fixture import tiny_config
from torchtune_xgb.config.validation import validate_resume
from torchtune_xgb.errors import ConfigError, RunError
from torchtune_xgb.run import checkpointing
from torchtune_xgb.run.base_fingerprint import base_checkpoint_files, sampled_fingerprint
from torchtune_xgb.run.faults import FAULT_ENV
from torchtune_xgb.run.identity import BASE_KEY, run_identity


def _save(out: Path, step: int, value: float, run=None) -> Path:
    return checkpointing.save_resume_state(str(out), step, {"x": torch.tensor([value])}, run=run)


def _loaded_value(out: Path):
    chosen = checkpointing.select_resume_checkpoint(str(out))
    return checkpointing.load_resume_state(chosen)["x"].item(), chosen


def test_two_checkpoints_are_kept_and_a_crash_mid_write_leaves_the_previous(tmp_path, monkeypatch):
    _save(tmp_path, 3, 3.0)
    real_save = torch.save

    def crash(obj, f, *a, **k):
        f.write(b"partial")  # some bytes reach the disk, then the process "dies"
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 6, 6.0)
    monkeypatch.setattr(torch, "save", real_save)
    assert _loaded_value(tmp_path)[0] == 3.0
    _save(tmp_path, 9, 9.0)
    _save(tmp_path, 12, 12.0)
    left = sorted(p.name for p in checkpointing.resume_root(str(tmp_path)).iterdir())
    assert left == ["latest", "step_00000009", "step_00000012"]  # the newest two; no temp dir
    manifest = json.loads((tmp_path / "xgb_resume" / "step_00000012" / "manifest.json").read_text())
    state = tmp_path / "xgb_resume" / "step_00000012" / "state.pt"
    assert manifest["step"] == 12 and manifest["files"]["state.pt"]["bytes"] == state.stat().st_size


def _flip_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 8] = bytes(b ^ 0xFF for b in data[middle : middle + 8])
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


CORRUPTIONS = {
    "state bytes overwritten": ("state.pt", _flip_bytes, "sha256"),
    "state truncated": ("state.pt", _truncate, "bytes"),
    "state deleted": ("state.pt", Path.unlink, "missing"),
    "manifest garbled": ("manifest.json", lambda p: p.write_text("{not json"), "unreadable"),
    "manifest truncated": ("manifest.json", _truncate, "unreadable"),
    "manifest deleted": ("manifest.json", Path.unlink, "missing"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_a_corrupted_newest_checkpoint_falls_back_to_the_previous_one_and_names_both(tmp_path, case):
    name, corrupt, why = CORRUPTIONS[case]
    _save(tmp_path, 3, 3.0)
    newest = _save(tmp_path, 6, 6.0)
    corrupt(newest / name)
    value, chosen = _loaded_value(tmp_path)
    assert value == 3.0 and chosen.path.name == "step_00000003"
    assert len(chosen.skipped) == 1 and str(newest / name) in chosen.skipped[0] and why in chosen.skipped[0]


@pytest.mark.parametrize("pointer", ["garbage\x00", "step_00000099", ""])
def test_a_broken_latest_pointer_uses_the_newest_intact_checkpoint(tmp_path, pointer):
    _save(tmp_path, 3, 3.0)
    _save(tmp_path, 6, 6.0)
    (tmp_path / "xgb_resume" / "latest").write_text(pointer)
    value, chosen = _loaded_value(tmp_path)
    assert value == 6.0 and "latest" in chosen.skipped[0]


def test_no_intact_checkpoint_is_one_line_naming_every_file(tmp_path):
    a, b = _save(tmp_path, 3, 3.0), _save(tmp_path, 6, 6.0)
    _flip_bytes(a / "state.pt")
    _truncate(b / "state.pt")
    with pytest.raises(RunError) as err:
        checkpointing.select_resume_checkpoint(str(tmp_path))
    message = str(err.value)
    assert message.startswith("resume_from_checkpoint:") and "\n" not in message
    assert str(a / "state.pt") in message and str(b / "state.pt") in message


def test_full_disk_while_saving_is_one_line_and_keeps_the_previous(tmp_path, monkeypatch):
    _save(tmp_path, 3, 3.0)
    monkeypatch.setenv(FAULT_ENV, "enospc:mid_save:6")
    with pytest.raises(RunError) as err:
        _save(tmp_path, 6, 6.0)
    assert str(err.value).startswith("save_every_n_steps:") and "No space left" in str(err.value)
    assert "step_00000003" in str(err.value)  # says what is intact
    assert sorted(p.name for p in (tmp_path / "xgb_resume").iterdir()) == ["latest", "step_00000003"]
    assert _loaded_value(tmp_path)[0] == 3.0


# --- a crafted state runs nothing -----------------------------------------------------------------


class _RunsCode:
    """Pickles as a call of os.system: what an attacker's state.pt holds."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _replace_state(checkpoint: Path, payload: bytes) -> Path:
    """Put ``payload`` in as ``state.pt`` and rewrite the manifest's size and sha256 to match, as
    whoever can write the one can."""
    state = checkpoint / "state.pt"
    state.write_bytes(payload)
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    manifest["files"]["state.pt"] = {"bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))
    return state


@pytest.mark.parametrize("fmt", ["torch.save", "plain pickle"])
def test_a_crafted_state_with_a_matching_manifest_is_refused_in_one_line_and_runs_nothing(tmp_path, fmt):
    _save(tmp_path, 3, 3.0)
    newest = _save(tmp_path, 6, 6.0)
    marker = tmp_path / "marker"
    crafted = {"x": torch.tensor([6.0]), "booster": _RunsCode(f"touch {marker}")}
    payload = io.BytesIO()
    torch.save(crafted, payload) if fmt == "torch.save" else pickle.dump(crafted, payload)
    state = _replace_state(newest, payload.getvalue())
    with pytest.raises(RunError) as err:  # when the resume is chosen: before any weights load
        checkpointing.select_resume_checkpoint(str(tmp_path))
    message = str(err.value)
    assert message.startswith(f"resume_from_checkpoint: refused {state}: ") and "\n" not in message
    assert ("loading it would call posix.system" in message) == (fmt == "torch.save")  # a plain pickle: not torch's format
    assert not marker.exists()
    with pytest.raises(RunError):  # nor does the load itself run it
        checkpointing.load_resume_state(checkpointing.ResumeCheckpoint(newest, {}, []))
    assert not marker.exists()


def test_states_with_every_type_a_resume_state_holds_load_as_saved(tmp_path):
    """What the recipe saves (recipe_mixin._resume_state): nested dicts and lists of tensors of
    several dtypes, ints, floats, strings, None, tuples (the optimizer's betas), bools."""
    state = {
        "booster": {"merged": {"a": torch.randn(3, 2)}, "reports": [{"kept_fraction": 0.5, "merged_modules": ["q"]}]},
        "optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(2, dtype=torch.bfloat16)}},
                      "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "foreach": None, "amsgrad": False}]},
        "rng": torch.get_rng_state(), "cuda_rng": None, "last_loss": float("nan"), "guard_recent": [1.0, 2.0],
    }
    checkpointing.save_resume_state(str(tmp_path), 3, state)
    loaded = checkpointing.load_resume_state(checkpointing.select_resume_checkpoint(str(tmp_path)))
    assert torch.equal(loaded["booster"]["merged"]["a"], state["booster"]["merged"]["a"])
    assert loaded["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    assert loaded["optimizer"]["state"][0]["exp_avg"].dtype == torch.bfloat16 and torch.equal(loaded["rng"], state["rng"])
    assert loaded["guard_recent"] == [1.0, 2.0] and loaded["cuda_rng"] is None


# --- which checkpoints are kept -----------------------------------------------------------------


def _step_dirs(out: Path):
    return [p.name for p in checkpointing.step_dirs(str(out))]


def test_a_corrupted_newest_checkpoint_with_a_higher_step_goes_and_the_one_resumed_from_stays(tmp_path):
    # save_every_n_steps 5: steps 5 and 10; step 10 corrupted, the resume falls back to step 5
    _save(tmp_path, 5, 5.0)
    _flip_bytes(_save(tmp_path, 10, 10.0) / "state.pt")
    value, chosen = _loaded_value(tmp_path)
    assert value == 5.0 and chosen.skipped
    # the resumed run saves every 3 steps: 6, 9, 12 (each continuing the previous one)
    checkpointing.save_resume_state(str(tmp_path), 6, {"x": torch.tensor([6.0])}, parent_step=5)
    assert _step_dirs(tmp_path) == ["step_00000006", "step_00000005"]  # not the corrupted step 10
    checkpointing.save_resume_state(str(tmp_path), 9, {"x": torch.tensor([9.0])}, parent_step=6)
    assert _step_dirs(tmp_path) == ["step_00000009", "step_00000006"]
    value, chosen = _loaded_value(tmp_path)
    assert value == 9.0 and chosen.skipped == []


# --- the run's identity: a resume must continue the same run -----------------------------------


def _checkpointed_cfg(root: Path, name: str):
    out = root / name
    cfg = OmegaConf.create(tiny_config(root, out))
    _save(out, 6, 6.0, run=run_identity(cfg))
    cfg.resume_from_checkpoint = True
    return cfg


REFUSED = [
    ("model.lora_rank=2", "model.lora_rank"),
    ("model.lora_alpha=32", "model.lora_alpha"),
    ("model.lora_attn_modules=[q_proj]", "model.lora_attn_modules"),
    ("model.apply_lora_to_mlp=False", "model.apply_lora_to_mlp"),
    ("boost.optimizer_reset=none", "boost.optimizer_reset"),
    ("boost.lr_restart=none", "boost.lr_restart"),
    ("boost.steps_per_round=3", "boost.steps_per_round"),
    ("+adapter.method=loraxs", "adapter.method"),
    ("optimizer.lr=0.001", "optimizer.lr"),
    ("optimizer.weight_decay=0.1", "optimizer.weight_decay"),
    ("lr_scheduler.num_warmup_steps=5", "lr_scheduler.num_warmup_steps"),
    ("batch_size=2", "batch_size"),
    ("gradient_accumulation_steps=2", "gradient_accumulation_steps"),
    ("dataset.n_train=32", "dataset.n_train"),
    ("dtype=bf16", "dtype"),
    ("max_steps_per_epoch=10", "max_steps_per_epoch"),
    ("epochs=2", "epochs"),
    ("seed=1", "seed"),
    ("shuffle=False", "shuffle"),
]


@pytest.mark.parametrize("override,key", REFUSED)
def test_a_resume_with_a_changed_run_defining_key_is_refused_in_one_line(root, override, key):
    cfg = _checkpointed_cfg(root, "refused")
    changed = OmegaConf.merge(cfg, OmegaConf.from_dotlist([override.lstrip("+")]))
    with pytest.raises(ConfigError) as err:
        validate_resume(changed)
    message = str(err.value)
    assert message.startswith("resume_from_checkpoint:") and "\n" not in message
    assert f" {key} (checkpoint " in message, message


@pytest.mark.parametrize(
    "override", ["log_every_n_steps=5", "save_every_n_steps=4", "eval.batch_size=2", "metric_logger.filename=m.txt",
                 "compile=True", "device=cpu", "boost.base_device=cpu"]
)
def test_logging_saving_and_execution_keys_may_change(root, override):
    cfg = _checkpointed_cfg(root, "free")
    chosen = validate_resume(OmegaConf.merge(cfg, OmegaConf.from_dotlist([override])))
    assert chosen.path.name == "step_00000006"


def test_a_listed_optimizer_change_is_accepted_but_a_model_change_never(root):
    cfg = _checkpointed_cfg(root, "allowed")
    lower = OmegaConf.merge(cfg, OmegaConf.from_dotlist(["optimizer.lr=0.001", "resume_allow_changes=[optimizer.lr]"]))
    assert validate_resume(lower) is not None
    with pytest.raises(ConfigError, match=r"^resume_allow_changes: 'model.lora_rank' cannot change"):
        validate_resume(OmegaConf.merge(cfg, OmegaConf.from_dotlist(["model.lora_rank=2", "resume_allow_changes=[model.lora_rank]"])))
    with pytest.raises(ConfigError, match="resume_allow_changes=\\[optimizer.lr\\]"):  # the hint names the key
        validate_resume(OmegaConf.merge(cfg, OmegaConf.from_dotlist(["optimizer.lr=0.001"])))


def test_a_changed_local_data_file_is_a_different_run(root, tmp_path):
    data = tmp_path / "train.json"
    data.write_text(json.dumps([{"input": "a", "output": "b"}]))
    cfg = _checkpointed_cfg(root, "data")
    cfg.dataset = {"_component_": "torchtune.datasets.instruct_dataset", "source": "json", "data_files": str(data)}
    out = Path(cfg.output_dir)
    _save(out, 9, 9.0, run=run_identity(cfg))
    assert validate_resume(cfg).path.name == "step_00000009"
    moved = tmp_path / "elsewhere" / "train.json"
    moved.parent.mkdir()
    shutil.copy(data, moved)
    cfg.dataset.data_files = str(moved)  # the same bytes at another path: the same run
    assert validate_resume(cfg).path.name == "step_00000009"
    moved.write_text(json.dumps([{"input": "a", "output": "c"}]))  # moved and changed
    with pytest.raises(ConfigError, match=r"in dataset.data_files \(checkpoint .*dataset.data_files#sha256"):
        validate_resume(cfg)
    cfg.dataset.data_files = str(data)
    data.write_text(json.dumps([{"input": "a", "output": "c"}]))  # same name, other content
    with pytest.raises(ConfigError, match=r"dataset.data_files#sha256"):
        validate_resume(cfg)


def test_files_in_torchtunes_list_of_datasets_define_the_run_and_may_move(root, tmp_path):
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(json.dumps([{"input": "a", "output": "b"}]))
    second.write_text(json.dumps([{"input": "c", "output": "d"}]))
    cfg = _checkpointed_cfg(root, "data_list")
    entry = {"_component_": "torchtune.datasets.instruct_dataset", "source": "json", "split": "train"}
    cfg.dataset = [dict(entry, data_files=str(first)), dict(entry, data_files=str(second))]
    _save(Path(cfg.output_dir), 9, 9.0, run=run_identity(cfg))
    assert validate_resume(cfg).path.name == "step_00000009"

    moved = tmp_path / "elsewhere" / "b.json"
    moved.parent.mkdir()
    shutil.copy(second, moved)
    cfg.dataset[1].data_files = str(moved)  # the same bytes at another path
    assert validate_resume(cfg).path.name == "step_00000009"
    cfg.dataset[1].split = "train[:50%]"  # moved, and another change in the same list: refused
    with pytest.raises(ConfigError, match=r"^resume_from_checkpoint: .* in dataset \(checkpoint "):
        validate_resume(cfg)
    cfg.dataset[1].split = "train"
    second.write_text(json.dumps([{"input": "c", "output": "e"}]))  # other bytes in place
    cfg.dataset[1].data_files = str(second)
    with pytest.raises(ConfigError, match=r"in dataset#sha256 \(checkpoint "):
        validate_resume(cfg)


def _jsonl(path: Path, *answers: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"input": "q", "output": a}) + "\n" for a in answers))
    return path


def test_every_file_of_a_local_dataset_directory_defines_the_run_and_it_may_move(root, tmp_path):
    """``dataset.source: /data/mine`` (datasets.load_dataset reads every data file under it): the
    files' names and bytes define the run, the directory may move; hidden files are not data."""
    folder = tmp_path / "mine"
    _jsonl(folder / "train.jsonl", "a")
    _jsonl(folder / "more" / "extra.jsonl", "b")
    cfg = _checkpointed_cfg(root, "data_dir")
    cfg.dataset = {"_component_": "torchtune.datasets.instruct_dataset", "source": str(folder), "split": "train"}
    _save(Path(cfg.output_dir), 9, 9.0, run=run_identity(cfg))
    recorded = run_identity(cfg)["dataset.source#sha256"]
    expected = [f"{name}:{hashlib.sha256((folder / name).read_bytes()).hexdigest()}" for name in ("more/extra.jsonl", "train.jsonl")]
    assert recorded == expected  # computed here, from the bytes
    assert validate_resume(cfg).path.name == "step_00000009"
    (folder / ".DS_Store").write_bytes(b"x")  # not data to datasets, not to the run
    assert validate_resume(cfg).path.name == "step_00000009"

    moved = tmp_path / "node_local" / "mine"
    shutil.copytree(folder, moved)
    cfg.dataset.source = str(moved)  # the same files elsewhere: the same run
    assert validate_resume(cfg).path.name == "step_00000009"
    for change in (lambda d: _jsonl(d / "train.jsonl", "a", "c"),  # a file edited
                   lambda d: _jsonl(d / "new.jsonl", "d"),  # a file added
                   lambda d: (d / "train.jsonl").rename(d / "test.jsonl")):  # renamed: another split to datasets
        shutil.rmtree(moved)
        shutil.copytree(folder, moved)
        change(moved)
        with pytest.raises(ConfigError, match=r"in dataset.source \(checkpoint .*dataset.source#sha256"):
            validate_resume(cfg)
    cfg.dataset.source = str(folder)
    _jsonl(folder / "more" / "extra.jsonl", "changed")  # in place
    with pytest.raises(ConfigError, match=r"in dataset.source#sha256 \(checkpoint "):
        validate_resume(cfg)
    # a checkpoint written before directories were fingerprinted resumes in place, as before
    older = {k: v for k, v in run_identity(cfg).items() if k != "dataset.source#sha256"}
    _save(Path(cfg.output_dir), 12, 12.0, run=older)
    assert validate_resume(cfg).path.name == "step_00000012"


def test_the_files_a_data_files_glob_matches_define_the_run(root, tmp_path, monkeypatch):
    folder = tmp_path / "shards"
    _jsonl(folder / "part-0.jsonl", "a")
    _jsonl(folder / "part-1.jsonl", "b")
    cfg = _checkpointed_cfg(root, "data_glob")
    cfg.dataset = {"_component_": "torchtune.datasets.instruct_dataset", "source": "json",
                   "data_files": str(folder / "part-*.jsonl"), "split": "train"}
    _save(Path(cfg.output_dir), 9, 9.0, run=run_identity(cfg))
    assert [p.split(":")[0] for p in run_identity(cfg)["dataset.data_files#sha256"]] == ["part-0.jsonl", "part-1.jsonl"]
    assert validate_resume(cfg).path.name == "step_00000009"
    _jsonl(folder / "part-2.jsonl", "c")  # one more shard matches
    with pytest.raises(ConfigError, match=r"in dataset.data_files#sha256 \(checkpoint "):
        validate_resume(cfg)
    # a relative glob resolves against the working directory, as load_dataset resolves it
    monkeypatch.chdir(tmp_path)
    cfg.dataset.data_files = "shards/part-[01].jsonl"
    assert validate_resume(cfg).path.name == "step_00000009"


def test_a_builder_name_and_a_generators_data_dir_are_not_data_directories(tmp_path, monkeypatch):
    """``source: json`` is load_dataset's json builder even when ./json/ exists (datasets tries its
    packaged builders first); a generated dataset's ``data_dir`` is where it writes its files (what
    is there at start may be another run's, regenerated before training): neither is fingerprinted."""
    _jsonl(tmp_path / "json" / "unrelated.jsonl", "a")
    monkeypatch.chdir(tmp_path)
    cfg = OmegaConf.create({"dataset": {"_component_": "torchtune.datasets.instruct_dataset", "source": "json",
                                        "data_files": "json/unrelated.jsonl"}})
    identity = run_identity(cfg)
    assert "dataset.source#sha256" not in identity  # the builder
    assert len(identity["dataset.data_files#sha256"]) == 1  # the file it names
    cfg = OmegaConf.create({"dataset": {"_component_": "torchtune_xgb.data.arithmetic_dataset", "data_dir": "json"}})
    assert "dataset.data_dir#sha256" not in run_identity(cfg)


# --- the base weights: a resume rebuilds W0 from checkpointer.checkpoint_dir --------------------


def test_the_base_fingerprint_reads_samples_of_large_files_and_all_of_small_ones(tmp_path):
    small = tmp_path / "small.bin"
    small.write_bytes(b"weights" * 1000)
    expected = hashlib.sha256(b"7000" + b"weights" * 1000).hexdigest()  # the size, then every byte
    assert sampled_fingerprint(small) == f"7000:{expected}"

    big = tmp_path / "big.safetensors"
    size = 40 << 20
    data = bytearray(torch.randint(0, 256, (size,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)).numpy().tobytes())
    big.write_bytes(data)
    before = sampled_fingerprint(big)
    copy = tmp_path / "copy.safetensors"
    shutil.copy(big, copy)  # other timestamps, same bytes: the same base
    assert sampled_fingerprint(copy) == before

    def changed_at(offset: int) -> str:
        edited = bytearray(data)
        edited[offset] ^= 0xFF
        big.write_bytes(edited)
        return sampled_fingerprint(big)

    # the header region, a sampled block (the 10th of 64 evenly spaced after the first MiB), the tail
    stride = (size - (2 << 20)) // 64
    for offset in (100, (1 << 20) + 10 * stride + 5, size - 1):
        assert changed_at(offset) != before, offset
    # the documented limit: a byte between two samples is not read
    assert changed_at((1 << 20) + 10 * stride + (64 << 10) + 1000) == before
    big.write_bytes(data[:-1])  # one byte shorter
    assert sampled_fingerprint(big) != before


def test_base_files_in_torchtunes_two_forms(tmp_path):
    formatted = OmegaConf.create({"checkpoint_dir": str(tmp_path), "checkpoint_files": {
        "filename_format": "model-{}-of-{}.safetensors", "max_filename": "00003"}})
    assert [p.name for p in base_checkpoint_files(formatted)] == [
        "model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors"]
    listed = OmegaConf.create({"checkpoint_dir": str(tmp_path), "checkpoint_files": ["a.safetensors", "b.safetensors"]})
    assert base_checkpoint_files(listed) == [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    with pytest.raises(ConfigError, match="^checkpointer.checkpoint_files: "):
        base_checkpoint_files(OmegaConf.create({"checkpoint_dir": str(tmp_path), "checkpoint_files": {"max_filename": "2"}}))


@pytest.fixture
def private_base(tmp_path):
    """A copy of the tiny model that a test may change (the module's ``root`` is shared)."""
    from tests.e2e_fixture import make_tiny_model_dir

    make_tiny_model_dir(tmp_path)
    return tmp_path


def test_a_resume_on_changed_base_weights_is_refused_in_one_line(private_base):
    cfg = _checkpointed_cfg(private_base, "base")
    weights = Path(cfg.checkpointer.checkpoint_dir) / "model.safetensors"
    original = weights.read_bytes()
    assert validate_resume(cfg).path.name == "step_00000006"
    tensors = load_file(weights)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 0.01  # e.g. a merged model saved over its own base
    save_file(tensors, weights)
    with pytest.raises(ConfigError) as err:
        validate_resume(cfg)
    message = str(err.value)
    assert message.startswith("checkpointer.checkpoint_dir: the base weights changed") and "\n" not in message
    assert "model.safetensors (other bytes)" in message and "step_00000006" in message
    weights.unlink()
    with pytest.raises(ConfigError, match=r"model.safetensors \(missing\)"):
        validate_resume(cfg)
    weights.write_bytes(original)  # the same bytes again (new timestamps): the same run
    assert validate_resume(cfg).path.name == "step_00000006"


def test_the_base_config_json_is_part_of_the_base(private_base, tmp_path):
    """torchtune's HF checkpointer converts q/k weights with the head counts in config.json: the
    same weights under another config.json are another model. A checkpoint written before
    config.json was fingerprinted resumes as before (nothing recorded to compare)."""
    cfg = _checkpointed_cfg(private_base, "config_json")
    config_json = Path(cfg.checkpointer.checkpoint_dir) / "config.json"
    original = config_json.read_text()
    assert run_identity(cfg)[BASE_KEY]["config.json"] == (
        f"{len(original.encode())}:{hashlib.sha256(str(len(original.encode())).encode() + original.encode()).hexdigest()}")
    changed = json.loads(original)
    changed["num_key_value_heads"] = changed["num_attention_heads"]
    config_json.write_text(json.dumps(changed))
    with pytest.raises(ConfigError, match=r"^checkpointer.checkpoint_dir: the base weights changed .*config.json \(other bytes\)"):
        validate_resume(cfg)
    older = dict(run_identity(cfg))  # as an older version recorded it: the weights only
    older[BASE_KEY] = {k: v for k, v in older[BASE_KEY].items() if k != "config.json"}
    _save(Path(cfg.output_dir), 9, 9.0, run=older)
    assert validate_resume(cfg).path.name == "step_00000009"


def test_a_checkpoint_from_before_base_fingerprints_resumes_with_a_warning(private_base, caplog):
    cfg = _checkpointed_cfg(private_base, "older")
    out = Path(cfg.output_dir)
    older = {k: v for k, v in run_identity(cfg).items() if k != BASE_KEY}
    _save(out, 9, 9.0, run=older)
    with caplog.at_level("WARNING"):
        assert validate_resume(cfg).path.name == "step_00000009"
    assert "without a fingerprint of the base weights" in caplog.text


def _move_model(cfg, to: Path) -> None:
    """Copy the base directory and tokenizer to ``to`` and point the config there."""
    shutil.copytree(cfg.checkpointer.checkpoint_dir, to)
    cfg.checkpointer.checkpoint_dir = str(to)
    cfg.tokenizer.path = str(to / "tokenizer.json")


def test_a_moved_base_and_tokenizer_resume_when_their_bytes_are_the_same(private_base, tmp_path):
    cfg = _checkpointed_cfg(private_base, "moved")
    original = Path(cfg.checkpointer.checkpoint_dir)
    _move_model(cfg, tmp_path / "node_b")
    assert validate_resume(cfg).path.name == "step_00000006"

    tokenizer = Path(cfg.tokenizer.path)
    text = tokenizer.read_text()
    tokenizer.write_text(text + " ")  # other bytes at the new path
    with pytest.raises(ConfigError, match=r"^resume_from_checkpoint: .* tokenizer.path \(checkpoint .*tokenizer.path#sha256"):
        validate_resume(cfg)
    tokenizer.write_text(text)

    weights = Path(cfg.checkpointer.checkpoint_dir) / "model.safetensors"
    tensors = load_file(weights)
    name = sorted(tensors)[0]
    save_file({**tensors, name: tensors[name] + 0.01}, weights)  # another base at the new path
    with pytest.raises(ConfigError) as err:
        validate_resume(cfg)
    assert str(err.value).startswith(f"checkpointer.checkpoint_dir: {tmp_path / 'node_b'} holds other base weights "
                                     f"than {original}, where the run that wrote ")
    assert "model.safetensors (other bytes)" in str(err.value)


def test_a_checkpoint_without_tokenizer_fingerprints_resumes_in_place_but_not_moved(private_base, tmp_path):
    cfg = _checkpointed_cfg(private_base, "no_tokenizer_print")
    out = Path(cfg.output_dir)
    older = {k: v for k, v in run_identity(cfg).items() if not k.startswith("tokenizer.") or "#" not in k}
    assert len(older) == len(run_identity(cfg)) - 1  # only tokenizer.path#sha256 left out
    _save(out, 9, 9.0, run=older)
    assert validate_resume(cfg).path.name == "step_00000009"
    _move_model(cfg, tmp_path / "node_b")  # nothing recorded vouches for the tokenizer at its new path
    with pytest.raises(ConfigError, match=r"^resume_from_checkpoint: .* in tokenizer.path \(checkpoint "):
        validate_resume(cfg)
