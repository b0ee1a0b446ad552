"""The training views of the merged rounds (method/views.py) against exact references.

bf16: the working weight stays one rounding of the exact state over hundreds of rounds, with hi + lo
equal to S far below a bf16 step and an fp32 master's error (computed here in float64 from the
stored factors). NF4: the
rank-R view holds the rounds exactly while they fit, is the best rank-R approximation once they
do not (an SVD here), and the deviation the merge reports matches ‖L − L̃‖/‖L‖ computed densely.
"""

import math

import pytest
import torch

from tests.method.test_merge_measurement import lora_modules, perturb
from tests.quant.test_nf4 import nf4_module
from torchtune_xgb.method.merged_state import MergedState
from torchtune_xgb.method.views import truncate, truncate_many


def exact_delta(state, name):
    """L = U·V in float64 from the stored factors."""
    ledger = state._ledgers[name]
    return ledger.u.double() @ ledger.v.double()


def test_bf16_weight_stays_one_rounding_of_the_exact_state_over_300_rounds():
    """Rounds of relative size ~1e-2 in bf16 factors: after 300 of them hi + lo equals S up to one
    fp32 rounding per round of lo + u·v (~2⁻²⁴ of the round plus half a bf16 step, never of |W|)
    and one coding of lo per round (half a code unit, ≤ 2⁻²²·the row's largest |W0|), within 8× of
    an fp32 copy of S accumulated round by round (computed alongside); the weight is round(S) wherever S is not
    that close to a rounding boundary; the deviation each merge reports is the measured one."""
    modules, gen = lora_modules(torch.bfloat16, out_dim=512, in_dim=384)  # factored for > 300 rounds
    module = modules["m0"]
    w0 = module.weight.detach().double().clone()
    fp32_master = w0.float()
    state = MergedState(modules)
    bound = torch.zeros_like(w0)
    for _ in range(300):
        perturb(module, gen, size=1e-3)
        u, v = module.merge_factors(1.0)
        fp32_master += u @ v
        half_step = (module.weight.detach().float().abs() * 2**-9).double()
        bound += 2**-24 * (half_step + (u.double() @ v.double()).abs())
        report = state.merge_round(["m0"])
        assert report.kept_fraction == 1.0
        bound += 2**-22 * w0.abs().amax(dim=1, keepdim=True)  # this round's coding of lo
    exact = w0 + exact_delta(state, "m0")
    held = module.weight.detach().double() + state._compensated.remainder("m0", module.weight.detach()).double()
    assert ((held - exact).abs() <= bound).all()
    assert (held - exact).abs().max() < 8 * (fp32_master.double() - exact).abs().max()
    # the deviation the merge reports: ‖S̃ − S‖ / ‖L‖, estimated by the sketches, against the dense value
    measured = ((held - exact).norm() / (exact - w0).norm()).item()
    assert 0 < measured < 1e-3 and 0.6 * measured < report.view_deviation < 1.6 * measured
    mismatched = (module.weight.detach() != exact.to(torch.bfloat16)).float().mean().item()
    assert mismatched < 2e-3, mismatched  # entries within ~2⁻¹² of a step of a rounding boundary only
    scale = w0.abs().max().item()
    assert (exact - w0).abs().max().item() > 2**-7 * scale  # the rounds moved the weights by several bf16 steps
    # the export in fp32 is S̃: S to the deviation above
    exported = state.export_weight("m0", torch.float32, live=None).double()
    assert ((exported - exact).abs() <= bound + 2**-24 * exact.abs()).all()


def test_bf16_resume_rebuilds_the_same_working_weight():
    modules, gen = lora_modules(torch.bfloat16)
    state = MergedState(modules)
    for _ in range(30):
        perturb(modules["m0"], gen, size=1e-3)
        state.merge_round(["m0"])
    again, _ = lora_modules(torch.bfloat16)  # the same seed: the same W0
    restored = MergedState(again)
    assert state.sealed_segments == 30 // state.segment_rounds > 0  # the resume reads segments too
    segments = [factors for _, factors in state.segment_states(0)]
    restored.load_state_dict(state.state_dict(), segments=segments, rounds=30, open_from_round=state.open_from_round)
    mismatched = (again["m0"].weight != modules["m0"].weight).float().mean().item()
    assert mismatched < 3e-3  # one rounding of S̃ each: entries within the codes' precision of a tie may differ
    lo = state._compensated.remainder("m0", modules["m0"].weight)
    lo_again = restored._compensated.remainder("m0", again["m0"].weight)
    held = modules["m0"].weight.double() + lo.double()
    held_again = again["m0"].weight.double() + lo_again.double()
    # the rebuild sums L in one fp32 GEMM and codes lo once, the run round by round: both within
    # 30 codings (≤ 2⁻²²·max|W0| each) of S
    assert (held - held_again).abs().max().item() < 31 * 2**-22 * modules["m0"].weight.double().abs().max().item()


def nf4_rounds(state, module, gen, count, size=1e-2):
    for _ in range(count):
        with torch.no_grad():
            module.lora_b.weight.copy_(torch.randn(module.lora_b.weight.shape, generator=gen) * size)
            module.lora_a.weight.copy_(torch.randn(module.lora_a.weight.shape, generator=gen))
        report = state.merge_round(["m"])
    return report


def test_nf4_view_is_exact_while_the_rounds_fit_then_the_best_rank_r_approximation():
    module = nf4_module(out_dim=128, in_dim=64)
    state = MergedState({"m": module}, nf4_view_rank=6)
    gen = torch.Generator().manual_seed(0)
    report = nf4_rounds(state, module, gen, 6)
    exact = exact_delta(state, "m")
    view = module.merged_u.double() @ module.merged_v.double()
    assert torch.allclose(view, exact, rtol=0, atol=1e-9)
    assert report.view_deviation < 1e-6  # exact: the sketch sees fp32 noise only
    report = nf4_rounds(state, module, gen, 1)  # the 7th round: truncated from rank 7 to 6
    exact = exact_delta(state, "m")
    u, s, vh = torch.linalg.svd(exact)
    best = (u[:, :6] * s[:6]) @ vh[:6]
    view = module.merged_u.double() @ module.merged_v.double()
    assert torch.allclose(view, best, rtol=0, atol=1e-6 * s[0].item())
    true = (s[6:].square().sum().sqrt() / s.square().sum().sqrt()).item()
    assert 0.01 < true and report.view_deviation == pytest.approx(true, rel=0.5)


def test_nf4_view_deviation_tracks_the_dense_measurement_over_many_rounds():
    """40 random rounds into a rank-8 view: the reported deviation (a 16-column sketch) is within
    the sketch's accuracy (±18% per σ at worst) of ‖L − L̃‖_F / ‖L‖_F computed densely, every round."""
    module = nf4_module(out_dim=128, in_dim=64)
    state = MergedState({"m": module}, nf4_view_rank=8)
    gen = torch.Generator().manual_seed(1)
    ratios = []
    for _ in range(40):
        report = nf4_rounds(state, module, gen, 1)
        exact = exact_delta(state, "m")
        view = module.merged_u.double() @ module.merged_v.double()
        true = (torch.linalg.matrix_norm(exact - view) / torch.linalg.matrix_norm(exact)).item()
        if true > 0.05:
            ratios.append(report.view_deviation / true)
    assert len(ratios) > 25
    assert 0.6 < min(ratios) and max(ratios) < 1.4, (min(ratios), max(ratios))
    assert module.merged_u.shape == (128, 8)  # the view never grows


def test_nf4_view_and_its_sketch_resume_as_saved_and_an_old_checkpoint_gets_the_best_rank_r():
    module = nf4_module(out_dim=128, in_dim=64)
    state = MergedState({"m": module}, nf4_view_rank=4)
    gen = torch.Generator().manual_seed(2)
    nf4_rounds(state, module, gen, 9)
    again = nf4_module(out_dim=128, in_dim=64)
    restored = MergedState({"m": again}, nf4_view_rank=4)
    restored.load_state_dict(state.state_dict(), views=state.view_state(), rounds=9)
    assert torch.equal(again.merged_u, module.merged_u) and torch.equal(again.merged_v, module.merged_v)
    x = torch.randn(3, 64, generator=gen).bfloat16()
    module.active = again.active = False  # the merged rounds only, not the last round's adapter
    assert torch.equal(again(x), module(x))
    # and the next round continues both alike (the sketch too: the same deviation)
    report = nf4_rounds(state, module, torch.Generator().manual_seed(99), 1)
    report_again = nf4_rounds(restored, again, torch.Generator().manual_seed(99), 1)
    assert torch.equal(again.merged_u, module.merged_u) and report_again.view_deviation == report.view_deviation
    # a checkpoint written before views existed: the ledger's best rank-4 approximation
    older = nf4_module(out_dim=128, in_dim=64)
    rebuilt = MergedState({"m": older}, nf4_view_rank=4)
    rebuilt.load_state_dict(state.state_dict(), rounds=10)  # no views=
    exact = exact_delta(state, "m")
    u, s, vh = torch.linalg.svd(exact)
    best = (u[:, :4] * s[:4]) @ vh[:4]
    assert torch.allclose(older.merged_u.double() @ older.merged_v.double(), best, atol=1e-6 * s[0].item())


def test_truncate_is_the_svd_of_the_product():
    gen = torch.Generator().manual_seed(3)
    u, v = torch.randn(40, 9, generator=gen), torch.randn(9, 30, generator=gen)
    a, b, lost = truncate(u, v, 5)
    s = torch.linalg.svdvals((u @ v).double())
    assert torch.allclose(torch.linalg.svdvals((a @ b).double())[:5], s[:5], rtol=1e-5)
    assert lost.item() == pytest.approx(s[5:].square().sum().item(), rel=1e-5)
    assert math.isclose(torch.linalg.matrix_norm((a @ b - u @ v).double()).item(), lost.sqrt().item(), rel_tol=1e-4)


def test_truncate_many_truncates_each_pair_as_alone_whatever_the_shapes():
    """Pairs of three shapes (one with as many rows as the rank: a 5×9 core) in one call: each result is
    the best rank-5 approximation of its own product (dense SVD here), identical to the pair
    truncated alone."""
    gen = torch.Generator().manual_seed(5)
    shapes = [(40, 9, 30), (24, 9, 50), (40, 9, 30), (5, 9, 30), (24, 9, 50)]  # rank ≤ out, as a view's
    pairs = [(torch.randn(o, m, generator=gen), torch.randn(m, i, generator=gen)) for o, m, i in shapes]
    together = truncate_many(pairs, 5)
    for (u, v), (a, b, lost) in zip(pairs, together):
        alone = truncate_many([(u, v)], 5)[0]
        assert all(torch.allclose(x, y, rtol=1e-6, atol=1e-7) for x, y in zip((a, b, lost), alone))
        uu, s, vh = torch.linalg.svd((u @ v).double())
        r = min(5, len(s))
        best = (uu[:, :r] * s[:r]) @ vh[:r]
        assert torch.allclose((a @ b).double(), best, rtol=0, atol=1e-5 * s[0].item())
        assert lost.item() == pytest.approx(s[r:].square().sum().item(), rel=1e-5, abs=1e-9)


def test_a_merge_truncates_its_full_nf4_views_together_as_each_alone():
    """Four NF4 modules of two shapes, rank-3 views, 6 rounds (full after 3): each view equals the
    view of the same module merged alone through the same rounds, and a merge runs 2 QRs per
    module shape and one SVD (the cores share a shape), not 3 factorizations per module."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    shapes = {"a": (96, 64), "b": (48, 64), "c": (96, 64), "d": (48, 64)}
    together = {n: nf4_module(out_dim=o, in_dim=i, seed=k) for k, (n, (o, i)) in enumerate(shapes.items())}
    alone = {n: nf4_module(out_dim=o, in_dim=i, seed=k) for k, (n, (o, i)) in enumerate(shapes.items())}
    state = MergedState(together, nf4_view_rank=3)
    singles = {n: MergedState({n: m}, nf4_view_rank=3) for n, m in alone.items()}

    class Calls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.count = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count[func.overloadpacket.__name__] += 1
            return func(*args, **(kwargs or {}))

    gen = torch.Generator().manual_seed(6)
    for round_ in range(6):
        for name in shapes:
            b = torch.randn(together[name].lora_b.weight.shape, generator=gen) * 1e-2
            a = torch.randn(together[name].lora_a.weight.shape, generator=gen)
            with torch.no_grad():
                for module in (together[name], alone[name]):
                    module.lora_b.weight.copy_(b)
                    module.lora_a.weight.copy_(a)
        calls = Calls()
        with calls:
            report = state.merge_round(list(shapes))
        for name in shapes:
            singles[name].merge_round([name])
        if round_ >= 3:  # every view full: each merge truncates all four
            assert calls.count["linalg_qr"] == 4 and calls.count["_linalg_svd"] == 1
            assert report.view_deviation > 0
    for name in shapes:
        assert torch.allclose(together[name].merged_u, alone[name].merged_u, rtol=1e-5, atol=1e-8)
        assert torch.allclose(together[name].merged_v, alone[name].merged_v, rtol=1e-5, atol=1e-8)
        exact = exact_delta(state, name)
        assert torch.equal(exact, exact_delta(singles[name], name))  # the ledgers: the same rounds


def test_an_unbounded_nf4_view_stays_exact_and_grows():
    """``nf4_view_rank: null``: the view holds every round exactly, its columns doubling as the
    rounds come (16, then 32), so its cost grows with them (the user's choice of fidelity)."""
    module = nf4_module(out_dim=128, in_dim=64)
    state = MergedState({"m": module}, nf4_view_rank=None)
    gen = torch.Generator().manual_seed(4)
    assert module.merged_u.shape == (128, 16)
    report = nf4_rounds(state, module, gen, 20)
    assert module.merged_u.shape == (128, 32) and report.view_deviation < 1e-6
    exact = exact_delta(state, "m")
    assert torch.allclose(module.merged_u.double() @ module.merged_v.double(), exact, rtol=0, atol=1e-9)
    nf4_rounds(state, module, gen, 50)  # past min(out, in) = 64 rounds: rank 64 holds L exactly
    assert module.merged_u.shape == (128, 64) and state.merge_round(["m"]).view_deviation < 1e-5


def test_a_resume_with_a_dense_bf16_ledger_leaves_the_ledger_as_saved():
    """Rebuilding the bf16 view consumes L in place: it must get a copy, never the dense ledger."""
    modules, gen = lora_modules(torch.bfloat16)
    state = MergedState(modules, segment_rounds=8)
    for _ in range(43):  # bf16 factors: 2·40·(48+32) ≥ 4·48·32 bytes, so the ledger turns dense at round 40
        perturb(modules["m0"], gen, size=1e-3)
        state.merge_round(["m0"])
    ledger = state._ledgers["m0"]
    assert ledger.dense is not None and ledger.columns == 3  # the matrix and three rounds since
    saved, segments = state.state_dict(), [factors for _, factors in state.segment_states(0)]
    again, _ = lora_modules(torch.bfloat16)
    restored = MergedState(again, segment_rounds=8)
    restored.load_state_dict(saved, segments=segments, rounds=43, open_from_round=40)
    assert torch.equal(restored._ledgers["m0"].dense, ledger.dense)
    assert torch.equal(restored._ledgers["m0"].u, ledger.u) and torch.equal(restored._ledgers["m0"].v, ledger.v)
    held = modules["m0"].weight.double() + state._compensated.remainder("m0", modules["m0"].weight).double()
    held_again = again["m0"].weight.double() + restored._compensated.remainder("m0", again["m0"].weight).double()
    # 40 codings (≤ 2⁻²²·max|W0| each) of S against one
    assert (held - held_again).abs().max().item() < 41 * 2**-22 * modules["m0"].weight.double().abs().max().item()
