"""Fault injection end to end: ``tune run xgblora_finetune`` on the tiny model, killed, corrupted,
diverged, out of disk, started twice. Each case asserts the exit status, the one-line message, and
what is on disk: either complete and equal to the uninterrupted run's, or absent.

Faults are injected with ``TORCHTUNE_XGB_FAULT=ACTION:PHASE[:STEP]`` (torchtune_xgb/run/faults.py):
SIGKILL at a named phase, or ENOSPC raised where the export writes (no tmpfs is needed, so the
test runs unprivileged; the error path is the same OSError the kernel raises).
"""

import fcntl
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.e2e_fixture import EXPORT, SHARED_RUNS, read_metric, run_recipe, tiny_config
from torchtune_xgb.run.checkpointing import load_resume_state, select_resume_checkpoint, step_name
from torchtune_xgb.run.faults import FAULT_ENV

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference(single_process_run):
    """The uninterrupted run (12 steps, κ = 4, resume checkpoints every 3 steps), shared with test_e2e."""
    return single_process_run("xgblora")


def _errors(result):
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


WALL_CLOCK = ("wall_seconds", "merge_seconds", "svd_seconds", "reset_seconds")


def _timeless(summary):
    """A run summary without its wall-clock fields (also inside the round reports)."""
    if isinstance(summary, dict):
        return {k: _timeless(v) for k, v in summary.items() if k not in WALL_CLOCK}
    return [_timeless(v) for v in summary] if isinstance(summary, list) else summary


def _same_summary(out: Path, reference: Path) -> None:
    """The summaries agree key by key, but for wall-clock times."""
    a, b = (_timeless(json.loads((d / "xgb_summary.json").read_text())) for d in (reference, out))
    assert sorted(b) == sorted(a)
    for key in a:
        assert b[key] == a[key], key


def _same_run(out: Path, reference: Path) -> None:
    """Identical losses on every step, an identical, complete export and the same summary."""
    a, b = read_metric(reference, "loss"), read_metric(out, "loss")
    assert sorted(b) == list(range(1, 13))
    assert [b[s] for s in range(1, 13)] == pytest.approx([a[s] for s in range(1, 13)], rel=1e-5)
    ref, got = load_file(reference / EXPORT), load_file(out / EXPORT)
    assert ref.keys() == got.keys()
    for key in ref:
        assert torch.allclose(ref[key], got[key], atol=1e-6), key
    assert (out / "epoch_0" / "xgb_export.json").is_file() and (out / "epoch_0" / "config.json").is_file()
    assert not list(out.glob(".export-*"))  # no staging left behind
    assert json.loads((out / "xgb_summary.json").read_text())["steps"] == 12
    _same_summary(out, reference)


def _kill_then_resume(root, name, fault, resumed_from, expect_export_before=False):
    out = root / name
    cfg = tiny_config(root, out)
    killed = run_recipe(cfg, root, env_extra={FAULT_ENV: fault})
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert (out / "epoch_0").exists() == expect_export_before  # never a half export
    assert not (out / "xgb_summary.json").exists()  # success is never reported
    resumed = run_recipe(cfg, root, "resume_from_checkpoint=True")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resumed at step {resumed_from}" in resumed.stderr + resumed.stdout
    return out, resumed


@pytest.mark.parametrize(
    "fault,resumed_from",
    [
        ("kill:mid_step:8", 6),  # during step 8's forward/backward: step 6 is the newest checkpoint
        ("kill:mid_save:9", 6),  # step 9's files written, not renamed into place
        ("kill:before_pointer:9", 6),  # step 9 in place, `latest` still names step 6
        ("kill:after_step:12", 12),  # after the last save, before the export
        ("kill:mid_export", 12),  # export written to staging, not renamed into place
    ],
)
def test_sigkill_at_each_phase_then_resume_equals_the_uninterrupted_run(root, reference, fault, resumed_from):
    out, _ = _kill_then_resume(root, fault.replace(":", "_"), fault, resumed_from)
    _same_run(out, reference)


def test_a_kill_between_the_final_export_and_the_summary_resumes_to_the_uninterrupted_summary(root, tmp_path):
    """10 steps, κ = 4: the last round (steps 9-10) is partial. The checkpoint of step 10 is saved
    before it is folded and before the export knows its adapter; the resume must still write the
    summary of the run that finished: 3 rounds, their merged state, the adapter's entries."""
    from torchtune_xgb.export.staged import export_complete

    config = lambda out: tiny_config(root, out, max_steps_per_epoch=10)  # noqa: E731
    reference = tmp_path / "uninterrupted"
    finished = run_recipe(config(reference), root)
    assert finished.returncode == 0, finished.stderr[-3000:]
    expected = json.loads((reference / "xgb_summary.json").read_text())
    assert expected["rounds"] == 3 and expected["steps"] == 10 and expected["adapter_bytes"] > 0
    out = tmp_path / "killed_before_summary"
    killed = run_recipe(config(out), root, env_extra={FAULT_ENV: "kill:before_summary"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert export_complete(str(out), 0) and not (out / "xgb_summary.json").exists()
    export = {p.name: p.read_bytes() for p in (out / "epoch_0").rglob("*") if p.is_file()}
    resumed = run_recipe(config(out), root, "resume_from_checkpoint=True")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resumed at step 10" in resumed.stderr + resumed.stdout
    _same_summary(out, reference)
    assert {p.name: p.read_bytes() for p in (out / "epoch_0").rglob("*") if p.is_file()} == export  # not written again
    assert read_metric(out, "kept_fraction") == read_metric(reference, "kept_fraction")  # each merge logged once


def test_corrupted_newest_checkpoint_resumes_from_the_previous_one_with_a_warning(root, reference):
    out = root / "corrupted"
    cfg = tiny_config(root, out)
    killed = run_recipe(cfg, root, env_extra={FAULT_ENV: "kill:after_step:10"})
    assert killed.returncode == -9
    state = out / "xgb_resume" / "step_00000009" / "state.pt"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: torch.load would not notice
    state.write_bytes(bytes(data))
    # saving every 4 steps now: 8 and 12, so the corrupted step 9 is above the first later save
    resumed = run_recipe(cfg, root, "resume_from_checkpoint=True", "save_every_n_steps=4")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = resumed.stderr + resumed.stdout
    assert f"{state} does not match its sha256" in log and "step_00000006" in log and "Resumed at step 6" in log
    _same_run(out, reference)
    # kept: the last save and the one before it; the corrupted one went at the first save
    assert sorted(p.name for p in (out / "xgb_resume").iterdir()) == ["latest", "step_00000008", "step_00000012"]


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_a_non_finite_loss_stops_the_run_before_the_step_and_the_last_good_checkpoint_resumes_exactly(root, reference, value):
    out = root / f"{value}_loss"
    cfg = tiny_config(root, out)
    diverged = run_recipe(cfg, root, env_extra={FAULT_ENV: f"{value}:loss:5"})
    assert diverged.returncode == 1, diverged.stderr[-3000:]
    (line,) = _errors(diverged)
    assert line.startswith(f"error: training diverged at step 5 (round 1): loss is {value}") and "was not merged" in line
    assert str(out / "xgb_resume" / "step_00000003") in line  # names the last good checkpoint
    assert "Traceback" not in diverged.stderr
    assert not (out / "epoch_0").exists() and not (out / "xgb_summary.json").exists()
    assert max(read_metric(out, "loss")) == 4 and sorted(read_metric(out, "kept_fraction")) == [4]
    if value == "nan":  # the last good checkpoint resumes and finishes as if nothing had happened
        resumed = run_recipe(cfg, root, "resume_from_checkpoint=True")
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert "Resumed at step 3" in resumed.stderr + resumed.stdout
        _same_run(out, reference)


def test_a_transient_loss_spike_is_skipped_and_the_run_finishes(root, reference):
    # the loss the guard sees at step 7 is 100× the real one (the gradient is not changed): a
    # spike on a step that is neither merged (4, 8, 12), saved (3, 6, 9, 12) nor exported
    out = root / "spike_skipped"
    cfg = tiny_config(root, out)
    run = run_recipe(cfg, root, env_extra={FAULT_ENV: "spike:loss:7"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert not _errors(run)
    assert re.search(r"step 7 \(round 1\): loss spiked to \S+ from a median of \S+ over the last 6 steps .*; the optimizer "
                     r"step was skipped \(1 in a row; guard.spike_patience 3 in a row stop the run\); 1 skipped so far", run.stderr)
    a, b = read_metric(reference, "loss"), read_metric(out, "loss")
    assert [b[s] for s in range(1, 7)] == pytest.approx([a[s] for s in range(1, 7)], rel=1e-6)
    assert b[7] == pytest.approx(100 * a[7], rel=1e-5)  # the same weights and batch as the reference's step 7
    # had step 7 been applied, every later step would equal the reference's (only the logged
    # loss was changed): they differ, so it was not
    assert all(b[s] != pytest.approx(a[s], rel=1e-6) for s in range(8, 13))
    assert read_metric(out, "spike_skipped_steps") == {7: 1.0}
    summary = json.loads((out / "xgb_summary.json").read_text())
    assert summary["spike_skipped_steps"] == 1 and summary["steps"] == 12 and summary["rounds"] == 3
    assert json.loads((reference / "xgb_summary.json").read_text())["spike_skipped_steps"] == 0
    assert (out / EXPORT).is_file() and sorted(read_metric(out, "kept_fraction")) == [4, 8, 12]


@pytest.mark.parametrize("name, fault, extra, start, resumed_from", [
    # a spike on a round's last step: merging it would fold the spiking weights in
    ("merged_step", "spike:loss:8", (), "training diverged at step 8 (round 1): loss spiked to ", 6),
    # three in a row (patience 2 here): a run whose weights went bad keeps spiking on the same weights
    ("in_a_row", "spike:loss:10,11", ("guard.spike_patience=2",), "training diverged at step 11 (round 2): loss spiked to ", 9),
    # Ctrl-C or SIGTERM while the loss spiked: no checkpoint of the weights it was measured on
    ("signal", "spike:loss:7;term:after_step:7", (), "stopped by SIGTERM after step 7 (round 1) while the loss spiked (step 7: ", 6),
])
def test_a_spike_that_would_be_kept_or_persists_stops_the_run_and_the_last_good_checkpoint_resumes_exactly(
    root, reference, name, fault, extra, start, resumed_from
):
    out = root / f"spike_{name}"
    cfg = tiny_config(root, out)
    stopped = run_recipe(cfg, root, *extra, env_extra={FAULT_ENV: fault})
    assert stopped.returncode == 1, stopped.stderr[-3000:]
    (line,) = _errors(stopped)
    assert line.startswith(f"error: {start}"), line
    assert "was not merged" in line and str(out / "xgb_resume" / step_name(resumed_from)) in line
    if name == "merged_step":
        assert "on a step that would be merged, saved or exported" in line
    if name == "in_a_row":
        assert re.search(r"after 1 spiking step\(s\) skipped before it \(step 10: \S+; guard.spike_patience 2\)", line)
    if name == "signal":  # the line said at once (the signal came after step 7's loss spiked) names step 7
        assert ("SIGTERM: stopping after step 7 with a resume checkpoint, unless that step's loss spiked "
                "(then nothing is saved and the last good checkpoint stays the resume point)") in stopped.stderr
    assert "Traceback" not in stopped.stderr
    # nothing of the spiking steps was merged, saved or exported
    assert not (out / "epoch_0").exists() and not (out / "xgb_summary.json").exists()
    assert sorted(p.name for p in (out / "xgb_resume").glob("step_*"))[-1] == step_name(resumed_from)
    assert sorted(read_metric(out, "kept_fraction")) == [4, 8][: 1 + (name == "in_a_row")]  # the rounds before
    resumed = run_recipe(cfg, root, "resume_from_checkpoint=True")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resumed at step {resumed_from}" in resumed.stderr + resumed.stdout
    _same_run(out, reference)


def test_an_exploding_learning_rate_is_stopped_before_anything_is_merged_or_saved_and_the_corrected_retry_starts(
    root, reference
):
    # optimizer.lr=1e30 saturates the tiny model: its loss stays finite and flat (5.77 from step 3,
    # measured) while the adapters hold ±1e30, so only the update-size check can see it
    out = root / "lr_1e30"
    out.mkdir()
    (out / "notes.txt").write_text("the user's own file")
    cfg = tiny_config(root, out)
    cfg["optimizer"]["lr"] = 1e30
    diverged = run_recipe(cfg, root)
    assert diverged.returncode == 1, diverged.stderr[-3000:]
    (line,) = _errors(diverged)
    # step 1 runs at lr 0 (the first warmup step), so step 2 is the first real update
    assert line.startswith("error: training diverged at step 2 (round 0): the update of ") and "guard.max_update_ratio 1.0" in line
    assert "none was written yet" in line
    assert not (out / "epoch_0").exists() and not (out / "xgb_resume").exists() and not (out / "xgb_summary.json").exists()
    # the dead run left its record and metrics log but nothing to resume: the corrected run starts
    # there afresh (it was refused, and the suggested resume found no checkpoint)
    assert (out / "xgb_run.json").is_file() and read_metric(out, "loss")
    retry = run_recipe(tiny_config(root, out), root)
    assert retry.returncode == 0, retry.stderr[-3000:]
    assert "ended before its first resume checkpoint; starting afresh" in retry.stderr + retry.stdout
    _same_run(out, reference)
    assert _loss_lines(out) == _loss_lines(reference)  # the dead run's log was replaced, not appended to
    assert (out / "notes.txt").read_text() == "the user's own file"


def test_full_disk_during_export_fails_in_one_line_and_a_resume_writes_the_export(root, reference):
    out = root / "enospc"
    cfg = tiny_config(root, out)
    failed = run_recipe(cfg, root, env_extra={FAULT_ENV: "enospc:export_write"})
    assert failed.returncode == 1, failed.stderr[-3000:]
    (line,) = _errors(failed)
    assert line.startswith(f"error: export: could not write {out / 'epoch_0'}: No space left on device")
    assert "step_00000012" in line and "resume_from_checkpoint=True" in line
    assert not (out / "epoch_0").exists() and not list(out.glob(".export-*")) and not (out / "xgb_summary.json").exists()
    resumed = run_recipe(cfg, root, "resume_from_checkpoint=True")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "writing its missing export" in resumed.stderr + resumed.stdout
    _same_run(out, reference)


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs: room for training and its resume checkpoints (~150 KiB at most), not for
    the tiny model's export (~390 KiB). Skips where mounting is not permitted (not root)."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount_point)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}); the injected ENOSPC test covers the path")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def test_a_really_full_disk_during_export_leaves_no_export_and_a_resume_on_more_space_finishes(root, reference, small_disk):
    out = small_disk / "out"
    cfg = tiny_config(root, out)
    failed = run_recipe(cfg, root)
    assert failed.returncode == 1, failed.stderr[-3000:]
    (line,) = _errors(failed)
    assert line.startswith(f"error: export: could not write {out / 'epoch_0'}: ") and "step_00000012" in line
    assert not (out / "epoch_0").exists() and not list(out.glob(".export-*")) and not (out / "xgb_summary.json").exists()
    grown = subprocess.run(["mount", "-o", "remount,size=2m", str(small_disk)], capture_output=True, text=True)
    assert grown.returncode == 0, grown.stderr
    resumed = run_recipe(cfg, root, "resume_from_checkpoint=True")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _same_run(out, reference)


def _tree(path: Path):
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file() and p.name != ".xgb_run.lock"}


def test_a_new_run_in_a_finished_runs_directory_is_refused_and_changes_nothing(root, reference):
    before = _tree(reference)
    again = run_recipe(tiny_config(reference.parent, reference), root)
    assert again.returncode == 2
    (line,) = _errors(again)
    assert line.startswith(f"error: output_dir: {reference} holds another run") and "overwrite_output_dir=True" in line
    assert _tree(reference) == before


def test_overwrite_over_the_run_this_run_trains_from_is_refused_and_the_earlier_model_stays(root, reference, tmp_path):
    """Fine-tuning again from outputs/run1/epoch_0 with output_dir=outputs/run1: overwrite_output_dir
    would delete the base weights and tokenizer of this very run."""
    run1 = tmp_path / "run1"
    shutil.copytree(reference, run1)
    before = _tree(run1)
    cfg = tiny_config(root, run1, overwrite_output_dir=True, model_dir=str(run1 / "epoch_0"))
    cfg["checkpointer"]["checkpoint_files"] = [Path(EXPORT).name]
    cfg["tokenizer"]["path"] = str(run1 / "epoch_0" / "tokenizer.json")
    again = run_recipe(cfg, root)
    assert again.returncode == 2, again.stderr[-3000:]
    assert _errors(again) == [f"error: overwrite_output_dir: would delete {run1 / 'epoch_0'}, which holds this run's "
                              f"checkpointer.checkpoint_dir {run1 / 'epoch_0'}; choose another output_dir"]
    assert _tree(run1) == before


def _loss_lines(out: Path) -> int:
    return sum(" loss:" in line for line in (out / "logs" / "metrics.txt").read_text().splitlines())


def test_a_second_concurrent_run_is_refused(root, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    with open(out / ".xgb_run.lock", "a+") as held:  # a run in progress holds this
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        second = run_recipe(tiny_config(root, out), root)
    assert second.returncode == 2
    (line,) = _errors(second)
    assert line.startswith(f"error: output_dir: {out} is in use by another run")
    assert sorted(p.name for p in out.iterdir()) == [".xgb_run.lock"]


def test_a_resume_with_a_changed_config_is_refused_before_loading(root, reference, tmp_path):
    out = tmp_path / "changed"
    shutil.copytree(reference, out)
    cfg = tiny_config(reference.parent, out)  # the reference run's own config (its model and data dirs)
    before = _tree(out)
    refused = run_recipe(cfg, root, "resume_from_checkpoint=True", "model.lora_rank=2", "model.lora_alpha=32")
    assert refused.returncode == 2
    (line,) = _errors(refused)
    assert "model.lora_rank (checkpoint 1, now 2)" in line and "model.lora_alpha (checkpoint 2.0, now 32)" in line
    assert "Model is initialized" not in refused.stderr + refused.stdout
    assert _tree(out) == before
    # the same config resumes a finished run to "nothing left to do", changing nothing
    again = run_recipe(cfg, root, "resume_from_checkpoint=True")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Nothing left to do" in again.stderr + again.stdout
    # only the logs and torchtune's copy of the latest invocation's config change
    kept = lambda tree: {k: v for k, v in tree.items() if not k.startswith("logs/") and k != "torchtune_config.yaml"}  # noqa: E731
    assert kept(_tree(out)) == kept(before)


def test_merge_rate_nan_is_refused_before_loading(root, tmp_path):
    result = run_recipe(tiny_config(root, tmp_path / "nan_rate"), root, "boost.merge_rate=.nan")
    assert result.returncode == 2
    assert _errors(result) == ["error: boost.merge_rate: must be a finite number, got nan"]
    assert not (tmp_path / "nan_rate").exists() or not any((tmp_path / "nan_rate").iterdir())


def test_a_resume_on_changed_base_weights_is_refused_before_loading(tmp_path):
    """The base is read again on resume: other bytes there would continue the run on weights it never saw."""
    from safetensors.torch import save_file

    from tests.e2e_fixture import make_tiny_model_dir

    weights = make_tiny_model_dir(tmp_path) / "model.safetensors"  # a base of this test's own to change
    out = tmp_path / "base_changed"
    cfg = tiny_config(tmp_path, out)
    killed = run_recipe(cfg, tmp_path, env_extra={FAULT_ENV: "kill:mid_step:8"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    tensors = load_file(weights)
    tensors = {k: v + 0.01 if "layers.0.self_attn.q_proj" in k else v for k, v in tensors.items()}
    save_file(tensors, weights, metadata={"format": "pt"})  # a different base, same names and shapes
    before = _tree(out)
    refused = run_recipe(cfg, tmp_path, "resume_from_checkpoint=True")
    assert refused.returncode == 2
    (line,) = _errors(refused)
    assert line.startswith("error: checkpointer.checkpoint_dir: the base weights changed") and "model.safetensors (other bytes)" in line
    assert "Model is initialized" not in refused.stderr + refused.stdout
    assert _tree(out) == before and not (out / "epoch_0").exists() and not (out / "xgb_summary.json").exists()
    # the original bytes back resume (new timestamps, same fingerprint): tests/run/test_resume_checkpoints.py


def test_a_resume_after_the_model_moved_to_another_path_equals_the_uninterrupted_run(root, reference, tmp_path):
    """A job that copies the model to node-local disk resumes from another path: the same bytes
    (base files and tokenizer, by fingerprint) are the same run."""
    node_a, node_b = tmp_path / "node_a" / "model", tmp_path / "node_b" / "model"
    shutil.copytree(root / "tiny_model", node_a)
    out = tmp_path / "moved"
    cfg = tiny_config(root, out, model_dir=str(node_a))
    cfg["tokenizer"]["path"] = str(node_a / "tokenizer.json")
    killed = run_recipe(cfg, tmp_path, env_extra={FAULT_ENV: "kill:mid_step:8"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    node_b.parent.mkdir()
    node_a.rename(node_b)  # the old path is gone
    resumed = run_recipe(cfg, tmp_path, "resume_from_checkpoint=True", f"model_dir={node_b}",
                         f"tokenizer.path={node_b / 'tokenizer.json'}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resumed at step 6" in resumed.stderr + resumed.stdout
    _same_run(out, reference)


@pytest.mark.parametrize(
    "fault,code,stopped_at,saves",
    [
        ("term:mid_step:8", 143, 8, [3, 6, 8]),  # a scheduler pre-empts the job mid-step: step 8 finishes, saved
        # Ctrl-C in the last step, which save_every_n_steps saves anyway: saved once, no export; the resume writes it
        ("int:mid_step:12", 130, 12, [3, 6, 9, 12]),
    ],
)
def test_sigterm_or_ctrl_c_finishes_the_step_saves_it_and_the_resume_equals_the_uninterrupted_run(
        root, reference, tmp_path, fault, code, stopped_at, saves):
    out = tmp_path / "stopped"
    cfg = tiny_config(root, out)
    stopped = run_recipe(cfg, root, env_extra={FAULT_ENV: fault})
    assert stopped.returncode == code, stopped.stderr[-3000:]
    (line,) = _errors(stopped)
    name = "SIGTERM" if code == 143 else "SIGINT"
    checkpoint = out / "xgb_resume" / step_name(stopped_at)
    assert line.startswith(f"error: stopped by {name} after step {stopped_at} of 12") and str(checkpoint) in line
    assert f"{name}: stopping after step {stopped_at} with a resume checkpoint" in stopped.stderr  # said at once
    assert "Traceback" not in stopped.stderr
    # the interrupted step was trained, logged and saved; nothing after it; no export, no summary
    assert sorted(read_metric(out, "loss")) == list(range(1, stopped_at + 1))
    assert (out / "xgb_resume" / "latest").read_text().strip() == checkpoint.name
    assert re.findall(r"Saved resume checkpoint \S+step_0*(\d+)", stopped.stderr) == [str(s) for s in saves]
    assert not (out / "epoch_0").exists() and not (out / "xgb_summary.json").exists()
    resumed = run_recipe(cfg, root, "resume_from_checkpoint=True")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resumed at step {stopped_at}" in resumed.stderr + resumed.stdout
    _same_run(out, reference)


def test_a_key_the_optimizer_does_not_take_is_refused_before_loading(root, tmp_path):
    """torchtune would build the optimizer after the weights load and end in a TypeError traceback."""
    result = run_recipe(tiny_config(root, tmp_path / "betas2"), root, "optimizer.betas2=[0.9,0.99]")
    assert result.returncode == 2
    assert _errors(result) == ["error: optimizer.betas2: AdamW() has no argument 'betas2' (did you mean betas?)"]
    assert "Traceback" not in result.stderr and "Model is initialized" not in result.stderr + result.stdout
    assert not (tmp_path / "betas2").exists() or not any((tmp_path / "betas2").iterdir())


class _RunsCode:
    """Pickles as a call of os.system: what an attacker's state.pt holds."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_a_crafted_resume_state_is_refused_in_one_line_before_anything_loads_and_runs_nothing(root, reference, tmp_path):
    """Whoever can write state.pt can rewrite its manifest's checksum too: only the loader protects."""
    out = tmp_path / "crafted"
    shutil.copytree(reference, out)
    checkpoint = out / "xgb_resume" / (out / "xgb_resume" / "latest").read_text().strip()
    marker = tmp_path / "marker"
    payload = io.BytesIO()
    torch.save({"booster": _RunsCode(f"touch {marker}"), "global_step": 12}, payload)
    (checkpoint / "state.pt").write_bytes(payload.getvalue())
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    manifest["files"]["state.pt"] = {"bytes": len(payload.getvalue()), "sha256": hashlib.sha256(payload.getvalue()).hexdigest()}
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))
    before = _tree(out)
    refused = run_recipe(tiny_config(reference.parent, out), root, "resume_from_checkpoint=True")
    assert refused.returncode == 1, refused.stderr[-3000:]
    (line,) = _errors(refused)
    assert line.startswith(f"error: resume_from_checkpoint: refused {checkpoint / 'state.pt'}: loading it would call posix.system")
    assert not marker.exists()
    assert "Model is initialized" not in refused.stderr + refused.stdout and "Traceback" not in refused.stderr
    assert _tree(out) == before


@pytest.mark.parametrize("name", sorted(SHARED_RUNS))
def test_every_methods_resume_state_loads_as_a_resume_loads_it(single_process_run, name):
    """fp32 XGBLoRA, boosted and plain LoRA-XS, NF4 (bf16) XGBLoRA and LoRA-XS: their states hold
    only what ``weights_only=True`` builds (the runs are shared with other tests)."""
    chosen = select_resume_checkpoint(str(single_process_run(name)))
    state = load_resume_state(chosen)
    assert chosen.path.name == "step_00000012" and state["global_step"] == 12 and chosen.skipped == []


def test_links_planted_where_a_run_writes_are_refused_and_their_targets_keep_their_bytes(root, tmp_path):
    out, outside = tmp_path / "planted", tmp_path / "outside"
    outside.mkdir()
    (outside / "logs").mkdir()
    names = [".xgb_run.lock", "xgb_run.json", "xgb_summary.json", ".xgb_summary.json.tmp", "torchtune_config.yaml"]
    for name in names:
        (outside / f"victim{name}").write_text(f"the user's file, linked as {name}")
    (out / "logs").mkdir(parents=True)
    for name in names:
        (out / name).symlink_to(outside / f"victim{name}")
    (out / "logs" / "metrics.txt").symlink_to(outside / "logs" / "metrics.txt")  # dangling: would be created there
    before = _tree(outside)
    refused = run_recipe(tiny_config(root, out), root)
    assert refused.returncode == 2, refused.stderr[-3000:]
    (line,) = _errors(refused)
    assert line.startswith(f"error: output_dir: {out / '.xgb_run.lock'} is a symbolic link (to {outside / 'victim.xgb_run.lock'})")
    assert _tree(outside) == before and sorted(p.name for p in (outside / "logs").iterdir()) == []
    assert all((out / name).is_symlink() for name in names) and "Model is initialized" not in refused.stderr + refused.stdout


def test_without_flock_another_hosts_run_lock_is_refused_in_one_line_with_the_way_out(root, tmp_path):
    """Lustre ``noflock``: flock fails with ENOLCK (here by a sitecustomize of the recipe's process)."""
    shim = tmp_path / "no_flock"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(
        "import errno, fcntl, os\n"
        "def flock(fd, operation):\n"
        "    raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))\n"
        "fcntl.flock = flock\n"
    )
    out = tmp_path / "noflock"
    out.mkdir()
    owner = out / ".xgb_run.owner"
    owner.write_text(json.dumps({"pid": 4242, "host": "node-17", "process_start": "99", "started": "2025-01-01T00:00:00Z"}))
    pythonpath = os.pathsep.join(filter(None, [str(shim), os.environ.get("PYTHONPATH")]))
    refused = run_recipe(tiny_config(root, out), root, env_extra={"PYTHONPATH": pythonpath})
    assert refused.returncode == 2, refused.stderr[-3000:]
    (line,) = _errors(refused)
    assert line == (
        f"error: output_dir: {out} is in use by another run (pid 4242 on node-17 since 2025-01-01T00:00:00Z, by {owner}: "
        f"this filesystem has no flock); if that run has ended, delete {owner}; else wait for it to end or choose another output_dir"
    )
    assert f"output_dir: {out} is on a filesystem without flock (No locks available)" in refused.stderr
    assert "node-17" in owner.read_text() and sorted(p.name for p in out.iterdir()) == [".xgb_run.lock", ".xgb_run.owner"]
