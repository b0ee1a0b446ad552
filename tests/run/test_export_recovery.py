"""An export killed half-way is finished or undone at the next start, by its record.

A real process runs :func:`staged_export` (a stand-in checkpointer writes the model file) and is
SIGKILLed at a phase (run/faults.py); the next run's claim of the ``output_dir`` must leave one
complete ``epoch_0/`` (the new one where it was complete, else the older one) and no leftovers.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from torchtune_xgb.errors import ConfigError
from torchtune_xgb.export.staged import EXPORT_RECORD, OLD_PREFIX, export_complete
from torchtune_xgb.run.faults import FAULT_ENV
from tests.helpers import output_dir_cfg
from torchtune_xgb.run.output_dir import claim_output_dir

EXPORT_SCRIPT = """
import sys
from pathlib import Path
from torchtune_xgb.export.staged import staged_export
from torchtune_xgb.run.faults import fault_point

class Checkpointer:  # what staged_export needs of torchtune's: the directory it writes into
    _output_dir = None

out = Path(sys.argv[1])
with staged_export(Checkpointer(), str(out), 0, 12, None) as staged:
    staged.mkdir(parents=True)
    (staged / "model.safetensors").write_bytes(b"new model")
    fault_point("export_write", 12)  # as the recipe announces it while the model files are written
    (staged / "config.json").write_text("{}")
"""


def _old_export(out: Path, where: Path = None) -> None:
    """A complete export of an earlier attempt at ``out/epoch_0`` (or ``where``)."""
    where = where or out / "epoch_0"
    where.mkdir(parents=True)
    (where / "model.safetensors").write_bytes(b"old model")
    (where / EXPORT_RECORD).write_text(json.dumps({"epoch": 0, "step": 12, "files": {"model.safetensors": 9}}))


def _killed_export(out: Path, phase: str) -> None:
    env = {FAULT_ENV: f"kill:{phase}:12", "PYTHONPATH": ":".join(sys.path)}
    killed = subprocess.run([sys.executable, "-c", EXPORT_SCRIPT, str(out)], env=env, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr[-2000:]


def _next_start(out: Path, caplog) -> str:
    with caplog.at_level("INFO"):
        claim_output_dir(output_dir_cfg(out, resume=True)).close()
    return caplog.text


@pytest.mark.parametrize("phase,older,left", [
    ("export_swap", True, b"new model"),  # between the two renames: the older epoch_0 moved aside, the new one staged
    ("mid_export", False, b"new model"),  # complete in staging, not renamed into place
    ("export_write", True, b"old model"),  # the new one half-written: the older one stays
])
def test_a_kill_during_an_export_leaves_one_complete_export_after_the_next_start(tmp_path, caplog, phase, older, left):
    out = tmp_path / "out"
    out.mkdir()
    if older:
        _old_export(out)
    _killed_export(out, phase)
    assert list(out.glob(".export-staging-*"))  # what the kill left
    log = _next_start(out, caplog)
    assert export_complete(str(out), 0) and (out / "epoch_0" / "model.safetensors").read_bytes() == left
    assert sorted(p.name for p in out.iterdir()) == [".xgb_run.lock", "epoch_0"]  # no staging or older copy left
    if left == b"new model":
        assert f"finished the interrupted export {out / 'epoch_0'}" in log


def test_an_incomplete_staged_export_is_not_put_in_place(tmp_path, caplog):
    out = tmp_path / "out"
    out.mkdir()
    _killed_export(out, "mid_export")
    (staged,) = out.glob(".export-staging-*/epoch_0")
    (staged / "model.safetensors").write_bytes(b"new")  # shorter than its record says: lost on a crash
    _next_start(out, caplog)
    assert sorted(p.name for p in out.iterdir()) == [".xgb_run.lock"]  # a resume writes the export again


@pytest.mark.parametrize("case", ["epoch_0 missing", "epoch_0 present", "no record"])
def test_an_older_copy_left_by_earlier_versions_is_restored_removed_or_left_by_its_record(tmp_path, caplog, case):
    """Before the staging layout an export moved the older epoch_0 to .export-old-PID, which a kill
    between the two renames left behind and nothing cleaned up."""
    out = tmp_path / "out"
    old = out / f"{OLD_PREFIX}4242"
    _old_export(out, where=old)
    if case == "epoch_0 present":
        (out / "epoch_0").mkdir()
        (out / "epoch_0" / EXPORT_RECORD).write_text("{}")
    if case == "no record":
        (old / EXPORT_RECORD).unlink()
    log = _next_start(out, caplog)
    names = sorted(p.name for p in out.iterdir())
    if case == "epoch_0 missing":
        assert names == [".xgb_run.lock", "epoch_0"] and (out / "epoch_0" / "model.safetensors").read_bytes() == b"old model"
    elif case == "epoch_0 present":
        assert names == [".xgb_run.lock", "epoch_0"] and f"removed {old}" in log
    else:  # not an export of ours by its record: neither restored nor deleted
        assert names == [old.name, ".xgb_run.lock"] and f"left {old}" in log


def test_a_new_run_refused_in_that_directory_changes_nothing(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    _old_export(out)
    (out / "xgb_run.json").write_text("{}")  # what the killed run's start wrote
    _killed_export(out, "export_swap")
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    with pytest.raises(ConfigError, match=r"holds \.export-staging-\S+/, which this run would write but no run recorded"):
        claim_output_dir(output_dir_cfg(out, resume=False))
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == sorted(before + [".xgb_run.lock"])
