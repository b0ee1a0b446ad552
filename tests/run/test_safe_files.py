"""No write of a run follows a symbolic link out of the directory it belongs to.

A link is planted at each path a run writes, pointing at a file (or directory) outside; the
writer refuses in one line naming the link, or writes beside it, and the link's target keeps its
bytes. In process and cheap; the end-to-end refusal of a real run is in test_faults.py.
"""

import os
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from torchtune_xgb.errors import ConfigError, RunError
from torchtune_xgb.export.staged import STAGING_PREFIX, staged_export
from torchtune_xgb.run import checkpointing
from tests.helpers import output_dir_cfg
from torchtune_xgb.run.output_dir import claim_output_dir
from torchtune_xgb.run.run_lock import acquire_lock
from torchtune_xgb.run.safe_files import LinkRefused, create_new_file, make_dir, write_atomically
from torchtune_xgb.run.summary import write_summary

VICTIM_BYTES = b"someone else's file: must keep these bytes\n"


@pytest.fixture
def victim(tmp_path) -> Path:
    """A file outside every output_dir, with known bytes, and a directory beside it."""
    outside = tmp_path / "outside"
    (outside / "dir").mkdir(parents=True)
    (outside / "dir" / "kept.txt").write_bytes(VICTIM_BYTES)
    (outside / "file.txt").write_bytes(VICTIM_BYTES)
    return outside / "file.txt"


def _outside_unchanged(victim: Path) -> None:
    outside = victim.parent
    assert sorted(str(p.relative_to(outside)) for p in outside.rglob("*")) == ["dir", "dir/kept.txt", "file.txt"]
    assert victim.read_bytes() == VICTIM_BYTES and (outside / "dir" / "kept.txt").read_bytes() == VICTIM_BYTES


def _plant(link: Path, target: Path) -> Path:
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)
    return link


def _one_line_naming(err, link: Path) -> None:
    message = str(err.value)
    assert "\n" not in message and f"{link} is a symbolic link (to {os.readlink(link)})" in message, message
    assert link.is_symlink()  # the link itself is left as it was


# --- the primitives ----------------------------------------------------------------------------


def test_write_atomically_replaces_a_file_whole_and_refuses_a_link(tmp_path, victim):
    path = tmp_path / "out" / "record.json"
    path.parent.mkdir()
    path.write_bytes(b"old")
    write_atomically(path, b"new")
    assert path.read_bytes() == b"new" and not path.is_symlink()
    link = _plant(tmp_path / "out" / "linked.json", victim)
    with pytest.raises(LinkRefused) as err:
        write_atomically(link, b"new")
    _one_line_naming(err, link)
    assert sorted(p.name for p in path.parent.iterdir()) == ["linked.json", "record.json"]  # no temporary file left
    _outside_unchanged(victim)


@pytest.mark.parametrize("dangling", [False, True])
def test_a_new_file_is_never_opened_through_a_link_even_a_dangling_one(tmp_path, victim, dangling):
    target = victim.parent / "not_yet_there.txt" if dangling else victim
    link = _plant(tmp_path / "out" / "state.pt", target)
    with pytest.raises(LinkRefused):
        create_new_file(link)
    with pytest.raises(LinkRefused):
        make_dir(link)
    assert not (victim.parent / "not_yet_there.txt").exists()
    _outside_unchanged(victim)


# --- each writer of a run ----------------------------------------------------------------------


def test_the_summary_refuses_a_link_at_its_name_and_never_writes_through_its_old_temporary_name(tmp_path, victim):
    out = tmp_path / "out"
    _plant(out / ".xgb_summary.json.tmp", victim)  # where the summary's temporary file used to be
    assert write_summary(str(out), {"steps": 12}).read_text() == '{\n  "steps": 12\n}'
    (out / "xgb_summary.json").unlink()
    link = _plant(out / "xgb_summary.json", victim)
    with pytest.raises(RunError) as err:
        write_summary(str(out), {"steps": 12})
    _one_line_naming(err, link)
    assert str(err.value).startswith(f"summary: could not write {link}: ")
    _outside_unchanged(victim)


def _save(out: Path, step: int, parent_step=None) -> Path:
    return checkpointing.save_resume_state(str(out), step, {"x": torch.tensor([float(step)])}, parent_step=parent_step)


@pytest.mark.parametrize("where", ["latest", "the new step directory", "its temporary directory", "xgb_resume"])
def test_a_resume_checkpoint_save_refuses_a_link_and_keeps_the_previous_checkpoint(tmp_path, victim, where):
    out = tmp_path / "out"
    root = out / "xgb_resume"
    if where == "xgb_resume":
        out.mkdir()
        link = _plant(root, victim.parent / "dir")
    else:
        _save(out, 3)
        link = {
            "latest": root / "latest",
            "the new step directory": root / "step_00000006",
            "its temporary directory": root / f".tmp-step_00000006-{os.getpid()}",
        }[where]
        target = victim if where == "latest" else victim.parent / "dir"
        link.unlink(missing_ok=True)
        _plant(link, target)
    with pytest.raises(RunError) as err:
        _save(out, 6, parent_step=3)
    _one_line_naming(err, link)
    assert str(err.value).startswith("save_every_n_steps: could not write the resume checkpoint")
    kept = [p.name for p in checkpointing.step_dirs(str(out))]
    if where == "latest":  # in place but not pointed to, as after a kill before the pointer moves
        assert kept == ["step_00000006", "step_00000003"]
    elif where != "xgb_resume":
        assert kept == ["step_00000003"] and checkpointing.latest_name(str(out)) == "step_00000003"
    _outside_unchanged(victim)


def test_the_latest_pointer_never_writes_through_its_old_temporary_name(tmp_path, victim):
    out = tmp_path / "out"
    _save(out, 3)
    _plant(out / "xgb_resume" / f".latest.tmp-{os.getpid()}", victim)  # the pointer's temporary name before
    _save(out, 6, parent_step=3)
    assert (out / "xgb_resume" / "latest").read_text() == "step_00000006"
    _outside_unchanged(victim)


class _Checkpointer:
    """What staged_export needs of torchtune's checkpointer: the directory it writes into."""

    def __init__(self, output_dir: Path):
        self._output_dir = output_dir


@contextmanager
def _export(out: Path, epoch: int = 0):
    with staged_export(_Checkpointer(out), str(out), epoch, 12, None) as staged:
        staged.mkdir(parents=True)
        (staged / "model.safetensors").write_bytes(b"model")
        yield staged


@pytest.mark.parametrize("where", ["epoch_0", "staging"])
def test_an_export_refuses_a_link_at_its_directory_or_its_staging_directory(tmp_path, victim, where):
    out = tmp_path / "out"
    out.mkdir()
    link = out / ("epoch_0" if where == "epoch_0" else f"{STAGING_PREFIX}{os.getpid()}")
    _plant(link, victim.parent / "dir")
    with pytest.raises(RunError) as err:
        with _export(out):
            pass
    _one_line_naming(err, link)
    assert str(err.value).startswith(f"export: could not write {out / 'epoch_0'}: ")
    assert sorted(p.name for p in out.iterdir()) == [link.name]
    _outside_unchanged(victim)


def test_the_run_lock_refuses_a_link_at_its_file(tmp_path, victim):
    link = _plant(tmp_path / "out" / ".xgb_run.lock", victim)
    with pytest.raises(ConfigError) as err:
        acquire_lock(tmp_path / "out")
    _one_line_naming(err, link)
    _outside_unchanged(victim)


def test_the_loss_plot_refuses_a_link_at_its_png(tmp_path, victim):
    pytest.importorskip("matplotlib")
    from torchtune_xgb.eval.plot import plot_run

    out = tmp_path / "out"
    (out / "logs").mkdir(parents=True)
    (out / "logs" / "metrics.txt").write_text("Step 1 | loss:2.0\nStep 2 | loss:1.5\n")
    link = _plant(out / "loss.png", victim)
    with pytest.raises(LinkRefused) as err:
        plot_run(str(out))
    _one_line_naming(err, link)
    _outside_unchanged(victim)


# --- the run's start refuses every planted link before it writes anything ----------------------

PLANTED_FILES = [".xgb_run.lock", ".xgb_run.owner", "xgb_run.json", "xgb_summary.json", "torchtune_config.yaml",
                 "xgb_resume/latest", "logs/metrics.txt"]
PLANTED_DIRS = ["xgb_resume", "xgb_resume/step_00000003", "epoch_0", f"{STAGING_PREFIX}1", "logs"]


@pytest.mark.parametrize("resume", [False, True], ids=["fresh", "resume"])
@pytest.mark.parametrize("name", PLANTED_FILES + PLANTED_DIRS)
def test_the_claim_refuses_a_link_at_any_path_a_run_writes_before_writing_anything(tmp_path, victim, name, resume):
    out = tmp_path / "out"
    out.mkdir()
    link = _plant(out / name, victim.parent / "dir" if name in PLANTED_DIRS else victim)
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    with pytest.raises(ConfigError) as err:
        claim_output_dir(output_dir_cfg(out, resume=resume, metrics_file=str(out / "logs" / "metrics.txt")))
    _one_line_naming(err, link)
    assert str(err.value).startswith(f"output_dir: {link} is a symbolic link") and "remove the link" in str(err.value)
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before  # nothing written, no lock file
    _outside_unchanged(victim)
