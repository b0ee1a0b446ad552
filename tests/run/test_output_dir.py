"""output_dir ownership, in process: a fresh run refuses another run's directory with only safe
suggestions, ``overwrite_output_dir`` removes exactly what the earlier run recorded writing and
never an input of this run, a dead run without a checkpoint does not block a retry, and the run
lock. The same refusals end to end: tests/run/test_faults.py."""

import json
import os
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from torchtune_xgb.errors import ConfigError
from torchtune_xgb.run.checkpointing import save_resume_state
from torchtune_xgb.run.output_dir import acquire_lock, check_output_dir, claim_output_dir
from torchtune_xgb.run.run_record import RUN_FILE, record_output


def _cfg(tmp_path: Path, out: Path, **overrides):
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    (model / "model.safetensors").write_bytes(b"base weights")
    (model / "tokenizer.json").write_text("{}")
    cfg = {
        "output_dir": str(out),
        "epochs": 1,
        "metric_logger": {"_component_": "torchtune.training.metric_logging.DiskLogger", "log_dir": str(out / "logs"),
                          "filename": "metrics.txt"},
        "checkpointer": {"checkpoint_dir": str(model), "checkpoint_files": ["model.safetensors"], "output_dir": str(out)},
        "tokenizer": {"path": str(model / "tokenizer.json")},
    }
    return OmegaConf.merge(OmegaConf.create(cfg), OmegaConf.from_dotlist([f"{k}={v}" for k, v in overrides.items()]))


def _earlier_run(cfg, checkpoint=True, export=True, summary=True):
    """What a run of ours leaves: its record, metrics log, resume checkpoint, export and summary."""
    out = Path(cfg.output_dir)
    claim_output_dir(cfg).close()  # the process ended
    (out / "logs").mkdir(exist_ok=True)
    (out / "logs" / "metrics.txt").write_text("Step 1 | loss:1.0\n")
    if checkpoint:
        record_output(str(out), "xgb_resume", "resume")
        save_resume_state(str(out), 3, {"x": torch.tensor([1.0])})
    if export:
        record_output(str(out), "epoch_0", "export")
        (out / "epoch_0").mkdir()
        (out / "epoch_0" / "model-00001-of-00001.safetensors").write_bytes(b"trained model")
        (out / "epoch_0" / "tokenizer.json").write_text("{}")
        (out / "epoch_0" / "xgb_export.json").write_text("{}")
    if summary:
        record_output(str(out), "xgb_summary.json", "summary")
        (out / "xgb_summary.json").write_text("{}")


def _tree(path: Path):
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file() and p.name != ".xgb_run.lock"}


def _refused(cfg) -> str:
    with pytest.raises(ConfigError) as err:
        claim_output_dir(cfg)
    message = str(err.value)
    assert "\n" not in message
    with pytest.raises(ConfigError) as again:  # tune-xgb validate says the same, writing nothing
        check_output_dir(cfg)
    assert str(again.value) == message
    return message


def test_a_new_run_refuses_another_runs_directory_and_overwrite_removes_exactly_what_it_recorded(tmp_path):
    out = tmp_path / "out"
    cfg = _cfg(tmp_path, out)
    _earlier_run(cfg)
    (out / "notes.txt").write_text("the user's own file")
    (out / "epoch_7").mkdir()  # another tool's, named like an export: not in the record
    (out / "epoch_7" / "model.safetensors").write_bytes(b"someone else's model")
    (out / "logs" / "mine.txt").write_text("the user's log")
    before = _tree(out)
    assert _refused(cfg) == (f"output_dir: {out} holds another run (epoch_0/, xgb_resume/, xgb_summary.json); choose "
                             "another output_dir, or pass overwrite_output_dir=True to replace it")  # finished: no resume
    assert _tree(out) == before

    claim_output_dir(_cfg(tmp_path, out, overwrite_output_dir=True)).close()
    assert sorted(_tree(out)) == ["epoch_7/model.safetensors", "logs/mine.txt", "notes.txt", RUN_FILE]
    assert all(_tree(out)[k] == before[k] for k in ("epoch_7/model.safetensors", "logs/mine.txt", "notes.txt"))
    record = json.loads((out / RUN_FILE).read_text())
    assert record["outputs"] == {"logs/metrics.txt": "metrics"} and record["pid"] == os.getpid()


INSIDE = [  # (override, the input's key): each puts one input of the new run inside the earlier run's epoch_0/
    ("checkpointer.checkpoint_dir", "checkpointer.checkpoint_dir"),
    ("tokenizer.path", "tokenizer.path"),
    ("dataset.data_files", "dataset.data_files"),
    ("eval.examples.path", "eval.examples.path"),
]


@pytest.mark.parametrize("key,named", INSIDE)
def test_overwrite_is_refused_before_anything_is_removed_when_an_input_of_this_run_lies_inside(tmp_path, key, named):
    """Fine-tuning again from outputs/run1/epoch_0 into outputs/run1: the earlier model stays."""
    out = tmp_path / "out"
    _earlier_run(_cfg(tmp_path, out), summary=False)
    value = {
        "checkpointer.checkpoint_dir": out / "epoch_0",
        "tokenizer.path": out / "epoch_0" / "tokenizer.json",
        "dataset.data_files": out / "epoch_0" / "*.safetensors",  # a glob matching the exported model
        "eval.examples.path": out / "epoch_0" / "tokenizer.json",
    }[key]
    before = _tree(out)
    message = _refused(_cfg(tmp_path, out, overwrite_output_dir=True, **{key: value}))
    shown = out / "epoch_0" / "model-00001-of-00001.safetensors" if key == "dataset.data_files" else value
    assert message == (f"overwrite_output_dir: would delete {out / 'epoch_0'}, which holds this run's {named} {shown}; "
                       "resume it with resume_from_checkpoint=True, or choose another output_dir")
    assert _tree(out) == before
    # without the flag: the refusal does not suggest it
    message = _refused(_cfg(tmp_path, out, **{key: value}))
    assert message == (f"output_dir: {out} holds another run (epoch_0/, xgb_resume/); resume it with "
                       "resume_from_checkpoint=True, or choose another output_dir (not overwrite_output_dir: "
                       f"epoch_0 holds this run's {named} {shown})")
    assert _tree(out) == before


def test_a_dead_run_without_a_checkpoint_does_not_block_a_retry(tmp_path):
    """A run that failed before its first resume checkpoint (a dataset error, a kill at step 1)."""
    out = tmp_path / "out"
    cfg = _cfg(tmp_path, out)
    _earlier_run(cfg, checkpoint=False, export=False, summary=False)
    record_output(str(out), "xgb_resume", "resume")  # killed while writing its first checkpoint
    (out / "xgb_resume" / ".tmp-step_00000003-4242").mkdir(parents=True)
    (out / "xgb_resume" / ".tmp-step_00000003-4242" / "state.pt").write_bytes(b"half")
    (out / "notes.txt").write_text("the user's own file")
    earlier = json.loads((out / RUN_FILE).read_text())
    check_output_dir(cfg)  # validate: a fresh run may start
    claim_output_dir(cfg).close()
    assert sorted(_tree(out)) == ["notes.txt", RUN_FILE]  # its log and half checkpoint gone, the user's file kept
    assert json.loads((out / RUN_FILE).read_text())["started"] >= earlier["started"]

    # one that left a checkpoint does block a fresh run, and the way out offered first is the resume
    _earlier_run(cfg, export=False, summary=False)
    assert _refused(cfg) == (f"output_dir: {out} holds another run (xgb_resume/); resume it with "
                             "resume_from_checkpoint=True, choose another output_dir, or pass overwrite_output_dir=True "
                             "to replace it")


def test_what_no_run_recorded_writing_is_never_removed(tmp_path):
    out = tmp_path / "out"
    (out / "epoch_0").mkdir(parents=True)  # another tool's export where ours would go, no record
    (out / "epoch_0" / "model.safetensors").write_bytes(b"someone else's model")
    before = _tree(out)
    for overwrite in (False, True):
        assert _refused(_cfg(tmp_path, out, overwrite_output_dir=overwrite)) == (
            f"output_dir: {out} holds epoch_0/, which this run would write but no run recorded writing ({RUN_FILE}); "
            "move it out of the way, or choose another output_dir")
    assert _tree(out) == before

    # a record is untrusted: entries leaving output_dir, or passing through a link, are ignored
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("outside")
    (out / "epoch_0" / "model.safetensors").unlink()
    (out / "epoch_0").rmdir()
    (out / "link").symlink_to(elsewhere)
    (out / "notes.txt").write_text("the user's own file")
    outputs = {"../elsewhere/keep.txt": "export", str(elsewhere / "keep.txt"): "export", "link/keep.txt": "metrics",
               "link": "export", ".xgb_run.lock": "export", "./notes.txt": "export", "notes.txt/": "export"}
    (out / RUN_FILE).write_text(json.dumps({"outputs": outputs}))
    claim_output_dir(_cfg(tmp_path, out, overwrite_output_dir=True)).close()
    assert (elsewhere / "keep.txt").read_text() == "outside" and (out / "notes.txt").is_file()
    assert (out / ".xgb_run.lock").is_file()  # removing the held lock's file would let a second run in
    assert not (out / "link").exists() and not (out / "link").is_symlink()  # the recorded link itself goes


def test_the_run_lock_refuses_a_second_concurrent_run_and_is_released_with_the_process(tmp_path):
    cfg = _cfg(tmp_path, tmp_path / "out")
    first = claim_output_dir(cfg)
    with pytest.raises(ConfigError) as err:
        claim_output_dir(_cfg(tmp_path, tmp_path / "out", resume_from_checkpoint=True))
    assert str(err.value).startswith("output_dir:") and f"pid {os.getpid()}" in str(err.value)
    first.close()  # what process exit does, however the process ends
    acquire_lock(tmp_path / "out").close()
