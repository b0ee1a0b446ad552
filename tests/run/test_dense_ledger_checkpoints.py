"""Dense ledgers in resume checkpoints: the matrix written once, the rounds after it as factors.

A ledger turns dense at a segment boundary once its factors take as many bytes as a dense fp32
matrix; after that each boundary folds the rounds since the last one into the matrix (ledger.py).
A checkpoint writes the matrix once (its *base*, in the segment of the boundary where the ledger
turned dense) and the folded rounds as factors (merged_checkpoint.py). Checked on the 2-layer test
model with an fp32 base (every ledger dense by round ~90, segments every 4 rounds): a resume
replays the segments and gets every matrix back bit for bit; a run that saves rarely holds no more
than a quarter of a matrix in waiting tails and writes the matrix instead; a save that never
landed (full disk) makes the next one write the matrices whose tails it had taken; a checkpoint
of the earlier format (the matrix in the checkpoint's own state) still loads.
"""

import pytest
import torch

from benchmarks.round_counts import perturb_adapters, tiny_booster
from tests.run.segment_runs import Run, resumed
from torchtune_xgb.errors import RunError
from torchtune_xgb.method import merged_checkpoint, merged_state
from torchtune_xgb.run import checkpointing
from torchtune_xgb.run.faults import FAULT_ENV

SEGMENT = 4


@pytest.fixture(autouse=True)
def short_segments(monkeypatch):
    monkeypatch.setattr(merged_state, "SEGMENT_ROUNDS", SEGMENT)


def assert_same_ledgers(booster, reference):
    """Every ledger as the reference holds it, bit for bit: the matrix, the tail, the form."""
    for name, ledger in reference.merged._ledgers.items():
        again = booster.merged._ledgers[name]
        assert (again.dense is None) == (ledger.dense is None), name
        if ledger.dense is not None:
            assert torch.equal(again.dense, ledger.dense), name
        assert torch.equal(again.u, ledger.u) and torch.equal(again.v, ledger.v), name


def continue_both(*boosters, rounds=6, seed=500):
    for booster in boosters:
        for k in range(rounds):
            perturb_adapters(booster, seed=seed + k)
            booster.step += 1
            booster.end_round()


def bases_written(out) -> list:
    directory = checkpointing.resume_root(str(out)) / "segments"
    return sorted(name for p in directory.iterdir() if not p.name.endswith(".replica.pt")
                  for name, part in torch.load(p, weights_only=True)["merged"].items() if "dense" in part)


def test_a_resume_restores_dense_ledgers_bit_for_bit_and_continues_alike(tmp_path):
    run = Run(tmp_path, base="fp32")
    for _ in range(35):  # saves every 3 rounds, boundaries every 4: tails cross saves both ways
        run.merge(3)
        run.save()
    assert run.booster.merged.rounds == 105
    assert sum(led.dense is not None for led in run.booster.merged._ledgers.values()) >= 8
    assert any(led.dense is not None and led.columns for led in run.booster.merged._ledgers.values())  # a tail
    booster, _ = resumed(tmp_path, base="fp32")
    assert_same_ledgers(booster, run.booster)
    for name in run.booster.merged._ledgers:  # the working weights: W0 + L, one addition against 105
        assert torch.allclose(booster.modules[name].weight, run.booster.modules[name].weight, atol=1e-6), name
    # both continue across two boundaries (folds) alike
    continue_both(run.booster, booster, rounds=7)
    assert_same_ledgers(booster, run.booster)
    assert booster.merged.nbytes() == run.booster.merged.nbytes()


def test_a_run_that_saves_rarely_holds_a_quarter_matrix_at_most_then_writes_the_matrix(tmp_path):
    run = Run(tmp_path, base="fp32")
    merged = run.booster.merged
    run.merge(100)  # every ledger dense by now; no save yet
    run.save()
    written = set(bases_written(tmp_path))
    assert written == set(merged._ledgers)
    for _ in range(60):  # then no save for 60 rounds: 15 boundaries whose tails wait
        run.merge()
        for name, ledger in merged._ledgers.items():
            matrix_bytes = ledger.dense.numel() * ledger.dense.element_size()
            assert merged._held_bytes[name] <= merged_checkpoint.HELD_TAIL_FRACTION * matrix_bytes, name
    outgrown, waiting = set(merged._needs_base), {name for name, b in merged._held_bytes.items() if b}
    assert outgrown and not outgrown & waiting
    before = bases_written(tmp_path)
    run.save()
    # the modules whose tails outgrew the bound wrote their matrix again (once, in the last
    # segment); the others their waiting tails
    new = list(bases_written(tmp_path))
    for name in before:
        new.remove(name)
    assert sorted(new) == sorted(outgrown)
    assert sum(merged._held_bytes.values()) == 0 and not merged._needs_base  # handed over
    booster, _ = resumed(tmp_path, base="fp32")
    assert_same_ledgers(booster, run.booster)


def test_a_save_that_never_landed_makes_the_next_write_the_matrices_it_took(tmp_path, monkeypatch):
    run = Run(tmp_path, base="fp32")
    for _ in range(25):
        run.merge(4)
        run.save()
    listed = list(run.entries)
    bases = bases_written(tmp_path)
    run.merge(4)  # one more boundary: tails handed to the save below, which fails
    taken = {name for name, b in run.booster.merged._held_bytes.items() if b}
    assert taken
    monkeypatch.setenv(FAULT_ENV, "enospc:segment_write")
    with pytest.raises(RunError, match="could not write the ledger segment"):
        run.save()
    monkeypatch.delenv(FAULT_ENV)
    # on disk: the previous checkpoint, listing what it listed; no new manifest
    assert checkpointing.latest_name(str(tmp_path)) == "step_00000100"
    assert checkpointing.load_resume_state(checkpointing.select_resume_checkpoint(str(tmp_path)))["booster"]["step"] == 100
    assert run.entries == listed and sum(run.booster.merged._held_bytes.values()) == 0
    run.merge(1)
    run.save()  # asks again for the segment the failed save took: its tails went with it
    new = list(bases_written(tmp_path))
    for name in bases:
        new.remove(name)
    assert sorted(new) == sorted(taken)
    booster, _ = resumed(tmp_path, base="fp32")
    assert booster.merged.rounds == 105
    assert_same_ledgers(booster, run.booster)
    continue_both(run.booster, booster)
    assert_same_ledgers(booster, run.booster)


def test_a_checkpoint_with_the_matrix_in_its_own_state_still_loads_and_the_next_ones_keep_it():
    """Checkpoints before this format held a dense ledger's whole matrix in every state, and no
    factors of it in later segments: it replaces the factors the earlier segments hold. No segment
    of the old checkpoint holds that matrix, so the checkpoints after the resume keep writing it in
    their state until a newly sealed segment carries it; resumes from each get the ledger back."""
    booster = tiny_booster("fp32")
    booster.merged.segment_rounds = SEGMENT
    gen = torch.Generator().manual_seed(0)
    early, matrices = {}, {}
    for name, module in booster.modules.items():
        rows, cols = module.weight.shape
        early[name] = {"u": torch.randn(rows, 4, generator=gen), "v": torch.randn(4, cols, generator=gen)}
        matrices[name] = torch.randn(rows, cols, generator=gen)
    booster.merged.load_state_dict({n: {"dense": m} for n, m in matrices.items()}, segments=[early], rounds=5,
                                   open_from_round=4)
    for name, ledger in booster.merged._ledgers.items():
        assert torch.equal(ledger.dense, matrices[name]) and ledger.columns == 0
        assert torch.equal(booster.merged.delta(name), matrices[name])

    def resume(state, segments):
        again = tiny_booster("fp32")
        again.merged.segment_rounds = SEGMENT
        again.merged.load_state_dict(state, segments=segments, rounds=booster.merged.rounds)
        return again

    booster.step, booster.reports = 5, [None] * 5
    continue_both(booster, rounds=2)  # rounds 6-7: no boundary yet
    state = booster.merged.state_dict()
    assert all(torch.equal(state[name]["dense"], matrix) for name, matrix in matrices.items())
    assert any("u" in part for part in state.values())  # the matrix and the rounds since, in one entry
    assert_same_ledgers(resume(state, [early]), booster)
    continue_both(booster, rounds=1, seed=900)  # round 8: a boundary; its segment carries the matrices
    segments = [early] + [factors for _, factors in booster.merged.segment_states(1)]
    state = booster.merged.state_dict()
    assert all("dense" in segments[-1][name] for name in matrices) and not any("dense" in p for p in state.values())
    assert_same_ledgers(resume(state, segments), booster)
