"""Resume checkpoints write a bounded amount however many rounds were merged (ledger segments).

A Booster on the 2-layer test model merges one round per step; sealed segments every 4 rounds
(``SEGMENT_ROUNDS`` patched down from 64). Each checkpoint is saved as the recipe saves it
(recipe_mixin._save_resume: the new segments, then the state and the manifest listing them all).
Checked: the bytes each save writes do not grow with the rounds; a resume from segments plus the
last state restores every round bit for bit; and the failures new to shared segment files: a
corrupted copy (its replica is used), both copies corrupted (one line naming the file), a save
killed after its segment was written (the orphan is removed by the next save), a full disk, a
planted symbolic link, a manifest naming a file outside the segment directory.
"""

import json
import os
from pathlib import Path

import pytest
import torch

from benchmarks.round_counts import perturb_adapters
from tests.run.segment_runs import Run, resumed, segment_files
from torchtune_xgb.errors import RunError
from torchtune_xgb.method import merged_state
from torchtune_xgb.run import checkpointing, ledger_segments
from torchtune_xgb.run.faults import FAULT_ENV

SEGMENT = 4


@pytest.fixture(autouse=True)
def short_segments(monkeypatch):
    monkeypatch.setattr(merged_state, "SEGMENT_ROUNDS", SEGMENT)


def test_the_bytes_a_checkpoint_writes_do_not_grow_with_the_rounds(tmp_path):
    """fp32 factors: every ledger of the test model turns dense by round 92 (32×64 after 22
    rounds of its own, 128×64 after 43); a dense ledger's matrix is written once, in the segment
    of the boundary where it turned dense, and checkpoints after that write its tail only."""
    run = Run(tmp_path, base="fp32")
    written = []
    for _ in range(120):
        run.merge()
        written.append(run.save())
    assert all(led.dense is not None for led in run.booster.merged._ledgers.values())
    manifest = json.loads((checkpointing.latest_resume_dir(str(tmp_path)) / "manifest.json").read_text())
    assert len(manifest["segments"]) == 120 // SEGMENT
    entry_bytes = len(json.dumps(manifest["segments"][0], indent=1)) + 8  # one more segment listed
    early, late = max(written[:8]), max(written[96:])
    # only the manifest's list grows (each entry, indented in the list, within twice its own length)
    assert late <= early + 2 * entry_bytes * (120 // SEGMENT)
    assert late < 1.2 * early
    # while the rounds merged so far, each written once (one copy of every segment), are several
    # times that: a checkpoint does not rewrite them
    directory = checkpointing.resume_root(str(tmp_path)) / "segments"
    once = sorted(p for p in directory.iterdir() if not p.name.endswith(ledger_segments.REPLICA))
    assert sum(p.stat().st_size for p in once) > 3 * late
    # each matrix once, in one segment (and its replica), never in a checkpoint's own state
    bases = [name for p in once for name, part in torch.load(p, weights_only=True)["merged"].items() if "dense" in part]
    assert sorted(bases) == sorted(run.booster.merged._ledgers)
    state = checkpointing.load_resume_state(checkpointing.select_resume_checkpoint(str(tmp_path)))
    assert not any("dense" in part for part in state["booster"]["merged"].values())


def test_a_resume_from_segments_restores_every_round(tmp_path):
    run = Run(tmp_path)
    for _ in range(5):
        run.merge(3)
        run.save()
    booster, _ = resumed(tmp_path)
    assert booster.merged.rounds == run.booster.merged.rounds == 15 and len(booster.reports) == 15
    assert [r.round for r in booster.reports] == [r.round for r in run.booster.reports]
    for name, ledger in run.booster.merged._ledgers.items():
        again = booster.merged._ledgers[name]
        assert torch.equal(again.u, ledger.u) and torch.equal(again.v, ledger.v), name
        weight, weight_again = run.booster.modules[name].weight, booster.modules[name].weight
        # one rounding of S̃ each, S̃ within the remainder codes' precision of S: entries that close
        # to a rounding tie may differ
        assert (weight != weight_again).float().mean() < 3e-3, name
    # both continue alike, and the next checkpoint lists the same segments plus the new one
    for b in (run.booster, booster):
        perturb_adapters(b, seed=99)
        b.step += 1
        b.end_round()
    for name, ledger in run.booster.merged._ledgers.items():
        assert torch.equal(booster.merged._ledgers[name].u, ledger.u), name


def _corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_corrupted_segment_is_read_from_its_replica_and_both_corrupted_is_one_line(tmp_path):
    run = Run(tmp_path)
    run.merge(9)
    run.save()
    run.merge(1)
    run.save()
    directory = checkpointing.resume_root(str(tmp_path)) / "segments"
    first = run.entries[0]["file"]
    _corrupt(directory / first)
    booster, chosen = resumed(tmp_path)  # the replica: the newest checkpoint is still intact
    assert chosen.path.name == "step_00000010" and not chosen.skipped
    assert torch.equal(booster.merged._ledgers["layers.0.attn.q_proj"].u, run.booster.merged._ledgers["layers.0.attn.q_proj"].u)
    _corrupt(directory / first.replace(".pt", ".replica.pt"))
    # both checkpoints list the segment: neither is intact, and the error names it
    with pytest.raises(RunError, match=rf"no intact checkpoint .*{first} and its replica are missing or do not match"):
        checkpointing.select_resume_checkpoint(str(tmp_path))


def test_a_save_killed_after_its_segment_leaves_the_previous_checkpoint_and_the_next_save_removes_the_orphan(
        tmp_path, monkeypatch):
    run = Run(tmp_path)
    run.merge(3)
    run.save()  # no segment sealed yet
    run.merge(1)  # round 4 seals the first segment
    monkeypatch.setenv(FAULT_ENV, f"enospc:mid_save:{run.booster.step}")
    with pytest.raises(RunError, match="could not write the resume checkpoint"):
        run.save()
    monkeypatch.delenv(FAULT_ENV)
    assert len(segment_files(tmp_path)) == 2  # the segment and its replica, listed by no checkpoint
    booster, chosen = resumed(tmp_path)
    assert chosen.path.name == "step_00000003" and booster.merged.rounds == 3
    # the resumed run trains round 4 again, to other numbers: its segment gets its own name (the
    # orphan is never overwritten), and the save after it removes the orphan
    orphan = set(segment_files(tmp_path))
    perturb_adapters(booster, seed=1234)
    booster.step += 1
    booster.end_round()
    again = Run(tmp_path)
    again.booster, again.entries = booster, list(chosen.manifest["segments"])
    again.save()
    listed = {p.name for e in again.entries for p in ledger_segments._copies(tmp_path / "xgb_resume" / "segments", e)}
    assert len(listed) == 2 and set(segment_files(tmp_path)) == listed and not (orphan & listed)


def test_a_full_disk_while_writing_a_segment_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    run = Run(tmp_path)
    run.merge(3)
    run.save()
    run.merge(1)
    monkeypatch.setenv(FAULT_ENV, "enospc:segment_write")
    with pytest.raises(RunError) as err:
        run.save()
    monkeypatch.delenv(FAULT_ENV)
    assert "could not write the ledger segment" in str(err.value) and "\n" not in str(err.value)
    assert checkpointing.latest_name(str(tmp_path)) == "step_00000003"
    assert resumed(tmp_path)[0].merged.rounds == 3


def test_a_planted_symlink_for_the_segment_directory_is_refused(tmp_path):
    run = Run(tmp_path / "out")
    run.merge(4)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    root = checkpointing.resume_root(str(tmp_path / "out"))
    root.mkdir(parents=True)
    os.symlink(elsewhere, root / "segments")
    with pytest.raises(RunError, match="is a symbolic link .*nothing is written through a link"):
        run.save()
    assert list(elsewhere.iterdir()) == []


def test_a_manifest_naming_a_file_outside_the_segment_directory_is_not_intact(tmp_path):
    run = Run(tmp_path / "out")
    run.merge(4)
    run.save()
    path = checkpointing.latest_resume_dir(str(tmp_path / "out"))
    outside = tmp_path / "secret.pt"
    torch.save({"not": "ours"}, outside)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["segments"][0]["file"] = "../../../secret.pt"
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RunError, match=r"no ledger segment name"):
        checkpointing.select_resume_checkpoint(str(tmp_path / "out"))


def test_eviction_keeps_what_a_kept_checkpoint_lists_and_files_that_are_not_ours(tmp_path):
    run = Run(tmp_path)
    run.merge(4)
    run.save()
    directory = checkpointing.resume_root(str(tmp_path)) / "segments"
    (directory / "notes.txt").write_text("mine")
    (directory / "rounds_000000-000004_0123456789abcdef.pt").write_bytes(b"stale")  # ours, listed nowhere
    for _ in range(3):
        run.merge(4)
        run.save()
    assert (directory / "notes.txt").read_text() == "mine"
    assert not (directory / "rounds_000000-000004_0123456789abcdef.pt").exists()
    assert len(segment_files(tmp_path)) == 2 * 4 + 1  # four segments, two copies each, and notes.txt
