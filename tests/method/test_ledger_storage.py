"""Merged factors are stored in the narrowest dtype that holds them exactly.

A round's factors are u = η(α/r)·B and v = A. With bf16 adapters and η·α/r a power of two, u is a
bf16 value again (scaling by 2^k moves the exponent only), so the merged state stores bf16 factors
at half the memory of fp32 ones and loses nothing; otherwise fp32. These tests check the choice
(table), that the stored factors are bit for bit the fp32 ones captured before each merge, the
bytes held (computed by hand), widening when the two kinds meet, resume, and that the view
beside an NF4 weight computes in the activation dtype without keeping a cast copy for the backward.
"""

import pytest
import torch

from tests.method.test_merge_measurement import lora_modules, perturb
from torchtune_xgb.method.merged_state import MergedState, storage_dtype
from torchtune_xgb.method.xgblora import merged_path

BF16, FP32 = torch.bfloat16, torch.float32


@pytest.mark.parametrize(
    "adapter_dtype, alpha, rank, merge_rate, expected",
    [
        (BF16, 2.0, 1, 1.0, BF16),    # η·α/r = 2
        (BF16, 16.0, 1, 0.25, BF16),  # 4: the packaged α/r = 16 at η = 1/4
        (BF16, 16.0, 1, 1.0, BF16),   # the packaged configs
        (BF16, 2.0, 1, 0.3, FP32),    # 0.6: η(α/r)·B is no bf16 value
        (BF16, 3.0, 1, 1.0, FP32),    # 3 = 1.5·2: one more mantissa bit
        (FP32, 2.0, 1, 1.0, FP32),    # fp32 adapters: fp32 values
    ],
)
def test_storage_dtype_is_bf16_only_where_it_is_exact(adapter_dtype, alpha, rank, merge_rate, expected):
    from torchtune.modules.peft import LoRALinear

    from torchtune_xgb.method.xgblora import convert_to_xgblora

    holder = torch.nn.Module()
    holder.add_module("m", LoRALinear(32, 48, rank=rank, alpha=alpha).to(adapter_dtype))
    module = convert_to_xgblora(holder)["m"]
    assert storage_dtype(module, merge_rate) == expected
    assert storage_dtype(torch.nn.Linear(2, 2), 1.0) == FP32  # an adapter that says nothing: fp32


def test_bf16_rounds_are_stored_bit_for_bit_at_half_the_bytes():
    modules, gen = lora_modules(BF16)  # bf16 base and adapters, rank 1, α = 2: η·α/r = 2
    module, state = modules["m0"], MergedState(modules)
    rounds = []
    for _ in range(5):
        perturb(module, gen)
        rounds.append(module.merge_factors(1.0))  # fp32, as merge_round takes them
        assert state.merge_round(["m0"]).kept_fraction == 1.0  # exactly
    ledger = state._ledgers["m0"]
    assert ledger.u.dtype == ledger.v.dtype == BF16
    assert torch.equal(ledger.u.float(), torch.cat([u for u, _ in rounds], dim=1))
    assert torch.equal(ledger.v.float(), torch.cat([v for _, v in rounds], dim=0))
    # lo, what the bf16 weight's rounding leaves out of S (int16 codes, 48×32), the rows' code
    # units (fp32, 48), its two sketches (fp32, 48×16 each), plus the ledger's first chunk, room for
    # eight bf16 rank-1 pairs
    assert state.nbytes() == 2 * 48 * 32 + 4 * 48 + 2 * 4 * 48 * 16 + 2 * 8 * (48 + 32)
    # S = W0 + Σ u·v, summed here in fp64 from the captured fp32 factors
    w0 = state.base_weight("m0").double()
    exact = w0 + sum(u.double() @ v.double() for u, v in rounds)
    assert torch.allclose(state.merged_weight("m0").double(), exact, atol=1e-6, rtol=0)
    assert torch.equal(module.weight, exact.float().to(BF16))  # one rounding of the exact state


def test_a_round_that_is_no_bf16_value_widens_the_ledger_exactly():
    modules, gen = lora_modules(BF16)
    module, state = modules["m0"], MergedState(modules)
    rounds = []
    for rate in (1.0, 1.0, 0.3):  # the third round's u = 0.6·B: fp32
        perturb(module, gen)
        rounds.append(module.merge_factors(rate))
        report = state.merge_round(["m0"], merge_rate=rate)
        assert report.kept_fraction == pytest.approx(1.0, abs=1e-6)
    ledger = state._ledgers["m0"]
    assert ledger.u.dtype == FP32 and ledger.u.shape[1] == 3
    # the two bf16 rounds widened exactly, the fp32 one stored as it came
    assert torch.equal(ledger.u, torch.cat([u for u, _ in rounds], dim=1))
    assert torch.equal(ledger.v, torch.cat([v for _, v in rounds], dim=0))
    perturb(module, gen)  # and a bf16-exact round after that stays in the fp32 ledger
    state.merge_round(["m0"])
    assert ledger.u.dtype == FP32 and ledger.u.shape[1] == 4


def test_resume_restores_bf16_factors_as_saved():
    modules, gen = lora_modules(BF16)
    state = MergedState(modules)
    for _ in range(3):
        perturb(modules["m0"], gen)
        state.merge_round(["m0"])
    saved = state.state_dict()
    assert saved["m0"]["u"].dtype == BF16  # half the bytes in the resume checkpoint too
    again, _ = lora_modules(BF16)  # the same seed: the same base weights
    restored = MergedState(again)
    restored.load_state_dict(saved)
    ledger, original = restored._ledgers["m0"], state._ledgers["m0"]
    assert ledger.u.dtype == BF16 and torch.equal(ledger.u, original.u) and torch.equal(ledger.v, original.v)
    assert torch.equal(again["m0"].weight, modules["m0"].weight)  # re-derived to the same working weight
    # a checkpoint written before bf16 storage (fp32 factors) loads as fp32
    state_fp32 = {"m0": {k: t.float() for k, t in saved["m0"].items()}}
    older = MergedState(lora_modules(BF16)[0])
    older.load_state_dict(state_fp32)
    assert older._ledgers["m0"].u.dtype == FP32


def test_the_nf4_view_is_computed_in_the_activation_dtype_and_keeps_no_cast_copy():
    """Beside an NF4 weight the merged rounds' view (fp32 factors, fixed rank) is applied as
    x·Vᵀ·Uᵀ in the activation dtype (bf16: tensor cores on a GPU): the output and the input
    gradient are those of the factors cast to bf16 (bit for bit), and nothing bf16 of the factors'
    shapes is saved for the backward: the cast copy lives for one matmul, not for the whole step
    (autograd would otherwise keep a second copy of every view)."""
    g = torch.Generator().manual_seed(0)
    u = torch.randn(96, 12, generator=g)
    v = torch.randn(12, 80, generator=g)
    x = torch.randn(4, 7, 80, generator=g).to(BF16)

    def run(factors, plain=False):
        holder = torch.nn.Module()
        holder.merged_u, holder.merged_v = factors
        inp = x.clone().requires_grad_(True)
        saved = []

        def pack(t):
            saved.append((t.dtype, t.numel()))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            if plain:
                out = torch.nn.functional.linear(torch.nn.functional.linear(inp, factors[1]), factors[0])
            else:
                out = merged_path(holder, inp)
        out.float().square().sum().backward()
        return out, inp.grad, saved

    out, grad, saved = run((u, v))
    out_bf16, grad_bf16, _ = run((u.to(BF16), v.to(BF16)), plain=True)
    assert out.dtype == BF16 and torch.equal(out, out_bf16) and torch.equal(grad, grad_bf16)
    # (by size: a matmul saves the weight transposed)
    assert not [s for s in saved if s[0] == BF16 and s[1] in (u.numel(), v.numel())], saved


def test_bf16_factors_turn_dense_when_they_take_as_many_bytes_as_a_dense_fp32_matrix():
    """48×32 module: a dense fp32 L is 4·48·32 = 6144 bytes; k bf16 rank-1 pairs take 2·k·80
    bytes, so the ledger stays factored through k = 38 (6080 bytes) and turns dense at k = 39
    (6240): twice as many rounds as fp32 factors (4·k·80 ≥ 6144 at k = 20). A ledger changes form
    at segment boundaries only: here one after every round."""
    modules, gen = lora_modules(BF16)
    state = MergedState(modules, segment_rounds=1)
    ledger = state._ledgers["m0"]
    for k in range(1, 40):
        perturb(modules["m0"], gen)
        assert state.merge_round(["m0"]).kept_fraction == pytest.approx(1.0, abs=1e-6)
        assert (ledger.dense is None) == (k <= 38), k
    assert ledger.dense.dtype == FP32 and state.ledger_rank("m0") == 32  # min(out, in) bounds the rank
