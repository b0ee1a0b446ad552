"""benchmarks/merge_cost.py: the shapes it models and what it counts for one merge."""

import pytest

from benchmarks import merge_cost


def test_matmul_parameters_match_the_published_model_sizes():
    # Llama-3-8B: 8.03 B parameters, of which the input embedding (128256 × 4096 = 0.525 B) is no
    # matmul; Llama-3.2-1B: 1.24 B with the embedding tied to the output head (which is a matmul)
    assert merge_cost.matmul_params(merge_cost.SHAPES["llama3-8b"]) == pytest.approx(8.03e9 - 128_256 * 4096, rel=0.01)
    assert merge_cost.matmul_params(merge_cost.SHAPES["llama3.2-1b"]) == pytest.approx(1.24e9, rel=0.01)


def test_step_time_scales_with_matmul_flops():
    one = merge_cost.scale_step_seconds(1.0, 1000, "llama3.2-1b", "llama3-8b", 1000)
    assert one == pytest.approx(6.07, rel=0.01)  # 7.50 B / 1.236 B
    assert merge_cost.scale_step_seconds(1.0, 1000, "llama3.2-1b", "llama3-8b", 2000) == pytest.approx(2 * one)


def test_a_merge_reads_back_twice_and_makes_a_fixed_number_of_full_size_passes_per_module_whatever_the_rounds():
    """Host reads do not grow with the number of blocks; per module the only out×in-sized work is
    the compensated update of the bf16 weight: lo decoded (+ u·v), the upcast of hi, hi + t, its
    rounding into the weight, hi − hi', + t into lo, lo coded again (scaled, rounded, clamped, cast,
    what it left out) and copied back; ≤ 17 (on these tiny shapes the 2×out×16 sketches count as
    full-size too). Nothing depends on the rounds already merged."""
    assert merge_cost.host_reads(None, layers=1) == merge_cost.host_reads(None, layers=32) == 2
    shape = merge_cost.TINY_SHAPE["tiny"]
    counts = merge_cost.count_block_merge(shape, rounds=3)
    projections = merge_cost.block_projections(*shape[1:4])
    assert 12 * len(projections) <= counts.full_passes <= 17 * len(projections)
    entries = sum(o * i for o, i in projections.values())
    # the rank-1 update of lo, and the 16-column sketch of what its coding left out
    assert counts.flops >= 2 * entries * (1 + 16)
    assert counts.flops < 2 * entries * (1 + 16) * 1.1  # Gram matrices and the round's sketch add little
    later = merge_cost.count_block_merge(shape, rounds=12)  # (still factored: more would turn k_proj dense)
    assert (later.flops, later.full_passes, later.kernels) == (counts.flops, counts.full_passes, counts.kernels)


def test_kernels_of_a_merge_over_many_blocks_follow_from_one_and_two():
    """The model extrapolates the kernels of an all-layer merge from merges over 1 and 2 blocks
    (modules of one shape are measured together across blocks): a merge over 4 blocks, counted
    directly, is that line; and each further block costs a fixed number of kernels per module (its
    ledger append and view update)."""
    shape = merge_cost.TINY_SHAPE["tiny"]
    one, two, four = (merge_cost.count_block_merge(shape, rounds=3, blocks=b).kernels for b in (1, 2, 4))
    assert four == one + 3 * (two - one)
    assert (two - one) / 7 <= 28  # the append and its measurement, the bf16 view with its codes and sketches
