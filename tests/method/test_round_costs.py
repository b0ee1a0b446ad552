"""Counted, not timed: what a step and a merge cost does not grow with the number of merged rounds.

On the 2-layer test model with an fp32, bf16 or NF4 base, k random rank-1 rounds are put into the
merged state (benchmarks.round_counts.simulate_rounds), then one forward + backward of every
adapted module and one end of round (merge, re-init, optimizer reset) run under torch's
FlopCounterMode and a dispatch mode adding up the bytes every aten operation reads and writes.

Bounds: with dense bases (the weight holds the rounds: fp32 in place, bf16 as round(S̃) with lo
beside it) a step and a merge cost exactly the same at k = 1 and k = 200. With NF4 the view beside
the 4-bit weight has a fixed rank R (here 4): a step costs the same at every k; a merge costs the
same at every k past R (each truncates rank R + 1 back to R) and no more than that before.
Before this design the merged path of an NF4 step cost 2·T·k·(in+out) FLOPs, and a bf16 merge
2·out·in·k (the re-derivation from the whole ledger): both grew linearly.
"""

import pytest

from benchmarks.round_counts import counts_at, tiny_booster

ROUNDS = (1, 3, 50, 200)
# 512-wide projections: 200 rounds of factors still take fewer bytes than a dense fp32 matrix, so
# every ledger stays factored (the tiny model's 64-wide ones turn dense: tested below)
WIDE = dict(embed_dim=512, num_heads=4, num_kv_heads=4, intermediate_dim=1024)


@pytest.fixture(scope="module", params=["fp32", "bf16", "nf4"])
def counted(request):
    base = request.param
    booster = tiny_booster(base, nf4_view_rank=4, **WIDE)
    return base, {k: counts_at(booster, k) for k in ROUNDS}


def test_a_step_costs_the_same_at_every_round_count(counted):
    base, counts = counted
    first = counts[1]["step"]
    assert first["flops"] > 0 and first["bytes"] > 0
    for k in ROUNDS:
        assert counts[k]["step"] == first, (base, k)


def test_a_merge_costs_no_more_at_round_200_than_at_round_1_or_past_the_view_rank(counted):
    base, counts = counted
    merges = {k: counts[k]["merge"] for k in ROUNDS}
    assert merges[1]["flops"] > 0 and merges[1]["bytes"] > 0
    if base == "nf4":  # k = 1, 3 fit in the rank-4 view (no truncation); 50 and 200 truncate alike
        assert merges[50] == merges[200]
        for k in (1, 3):
            assert merges[k]["flops"] <= merges[200]["flops"] and merges[k]["bytes"] <= merges[200]["bytes"]
    else:
        for k in ROUNDS:
            assert merges[k] == merges[1], (base, k)


@pytest.mark.parametrize("base", ["fp32", "bf16"])
def test_merges_into_dense_ledgers_cost_the_same_at_any_round_count(base):
    """Once k rounds of factors would take more bytes than a dense fp32 matrix, a module's ledger is
    dense (the tiny model's 64-wide projections: after at most 85 rounds): a merge then appends to
    its tail, at the same cost at round 100 as at round 400; a merge at a segment boundary also
    folds the rounds since the last one into the matrix, at the same cost at round 112 as at 400
    (the merges after k = 111 and k = 399 simulated rounds)."""
    booster = tiny_booster(base)
    counts = {}
    for k in (100, 400, 111, 399):
        counts[k] = counts_at(booster, k)
        assert all(ledger.dense is not None for ledger in booster.merged._ledgers.values())
    assert counts[100] == counts[400]
    assert counts[111] == counts[399]
    assert booster.merged.segment_rounds == 16
    assert counts[111]["merge"]["flops"] > counts[100]["merge"]["flops"]  # the fold: 16 rounds into each matrix
