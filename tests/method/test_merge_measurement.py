"""The kept fraction computed from factors is the full-matrix measurement, and it catches losses.

``MergedState.merge_round`` measures what arrived in the stored state from r×r Gram matrices
(no out×in matrix) where the state is factored. These tests compute the design.md §2 definition,
1 − ‖S_after − S_before − ΔW‖ / ‖ΔW‖, with full fp32 matrices from ``merged_weight`` (S) and the
adapter's own ``delta_weight`` (ΔW) next to it, on states perturbed by earlier rounds, and break
the ledger on purpose to check that a lossy merge is reported as one.
"""

import math

import pytest
import torch

from tests.tiny_model import tiny_lora
from torchtune_xgb.method.ledger import Ledger
from torchtune_xgb.method.merged_state import MergedState
from torchtune_xgb.method.xgblora import convert_to_xgblora


def lora_modules(dtype, out_dim=48, in_dim=32, count=1, seed=0):
    """``count`` XGBLoRA modules (rank 1, α = 2) with random bf16/fp32 base weights."""
    from torchtune.modules.peft import LoRALinear

    gen = torch.Generator().manual_seed(seed)
    holder = torch.nn.Module()
    for i in range(count):
        m = LoRALinear(in_dim, out_dim, rank=1, alpha=2.0)
        with torch.no_grad():
            m.weight.copy_(torch.randn(out_dim, in_dim, generator=gen) * 0.02)
        holder.add_module(f"m{i}", m.to(dtype))
    return convert_to_xgblora(holder), gen


def perturb(module, gen, size=1e-2):
    with torch.no_grad():
        module.lora_b.weight.copy_(torch.randn(module.lora_b.weight.shape, generator=gen) * size)
        module.lora_a.weight.copy_(torch.randn(module.lora_a.weight.shape, generator=gen))


def full_matrix_kept(state, name, merge):
    """Merge one round via ``merge()`` and return the kept fraction by the definition, in fp32, on
    the stored state S = W0 + L (W0 cancels: S_after − S_before = L_after − L_before)."""
    module = state.modules[name]
    update = 0.5 * module.delta_weight()  # merge_rate 0.5 below
    before = state.delta(name)
    report = merge()
    after = state.delta(name)
    lost = torch.linalg.matrix_norm(after - before - update) / torch.linalg.matrix_norm(update)
    return report, 1.0 - lost.item()


def ledger_that(keep):
    """A ``Ledger.add`` replacement storing ``keep(u, v) -> (u', v')`` instead of (u, v)."""
    original = Ledger.add

    def add(self, u, v, dtype=torch.float32):
        original(self, *keep(u, v), dtype)

    return add


@pytest.mark.parametrize(
    "dtype,earlier_rounds,form",
    [
        (torch.bfloat16, 3, "factors"),  # bf16 base, factored ledger: kept from Gram matrices
        (torch.float32, 3, "in place"),  # fp32: the weight is the state, full-matrix measurement
        # bf16 factors: 2·40·(48+32) ≥ 4·48·32 bytes: the ledger has turned dense (at a segment
        # boundary: one after every round here, so each merge below also folds into the matrix)
        (torch.bfloat16, 40, "dense"),
    ],
)
def test_kept_fraction_equals_full_matrix_measurement(monkeypatch, dtype, earlier_rounds, form):
    modules, gen = lora_modules(dtype)
    state = MergedState(modules, segment_rounds=1)
    name, module = "m0", modules["m0"]
    for _ in range(earlier_rounds):  # a state that is not W0: earlier rounds in the ledger
        perturb(module, gen)
        state.merge_round([name])
    ledger = state._ledgers[name]
    assert (ledger.dense is not None) == (form == "dense")
    assert (name in state._in_place) == (form == "in place")
    perturb(module, gen)
    report, reference = full_matrix_kept(state, name, lambda: state.merge_round([name], merge_rate=0.5))
    assert report.modules == 1
    assert reference == pytest.approx(1.0, abs=1e-4)  # a faithful merge keeps everything …
    assert report.kept_fraction == pytest.approx(reference, abs=1e-4)
    update = 0.5 * module.delta_weight()
    assert report.update_norm == pytest.approx(torch.linalg.matrix_norm(update).item(), rel=1e-5)

    if form == "in place":
        return  # the fp32 weight itself is the state there; its ledger only serves resume
    # … and a ledger that stores 70% of u and a perturbed v is measured as the definition says
    perturb(module, gen)
    noise = torch.randn(1, 32, generator=gen) * 0.3
    monkeypatch.setattr(Ledger, "add", ledger_that(lambda u, v: (0.7 * u, v + noise)))
    report, reference = full_matrix_kept(state, name, lambda: state.merge_round([name], merge_rate=0.5))
    assert reference < 0.9  # clearly lossy
    assert report.kept_fraction == pytest.approx(reference, abs=1e-4)


def test_a_fold_into_a_dense_matrix_is_measured_and_a_lossy_one_reported(monkeypatch):
    """At a segment boundary a dense ledger adds the rounds since the last one to its matrix in
    fp32. Where the matrix dwarfs them (entries ~1e4, a round ~1e-5) most of them round away: the
    boundary's report says so, equal to the full-matrix measurement of S_after − S_before − ΔW."""
    modules, gen = lora_modules(torch.bfloat16)
    state = MergedState(modules, segment_rounds=4)
    name, module = "m0", modules["m0"]
    for _ in range(40):  # dense at the boundary of round 40
        perturb(module, gen)
        state.merge_round([name])
    ledger = state._ledgers[name]
    assert ledger.dense is not None and ledger.columns == 0
    ledger.dense += 1e4  # a matrix whose fp32 spacing (~1e-3) dwarfs the next rounds
    for k in range(1, 4):  # rounds 41-43: appended exactly, nothing folded
        perturb(module, gen, size=1e-5)
        assert state.merge_round([name]).kept_fraction == pytest.approx(1.0, abs=1e-6)
        assert ledger.columns == k
    perturb(module, gen, size=1e-5)
    waiting, latest = ledger.factors(), module.merge_factors(1.0)
    folded = (waiting[0].double() @ waiting[1].double() + latest[0].double() @ latest[1].double()).float()
    matrix_before = ledger.dense.clone()
    report = state.merge_round([name])  # round 44: appended, then the four rounds folded
    assert ledger.columns == 0
    fold_kept = 1.0 - (torch.linalg.matrix_norm(ledger.dense - matrix_before - folded) / torch.linalg.matrix_norm(folded)).item()
    assert fold_kept < 0.5  # clearly lossy
    assert report.kept_fraction == pytest.approx(fold_kept, abs=1e-4)


def test_dropped_rows_of_the_update_are_reported_lost(monkeypatch):
    """A ledger that drops the last third of u's rows keeps 1 − ‖dropped rows of u‖/‖u‖ (rank 1:
    ‖u·v‖ = ‖u‖·‖v‖), a value computed here from u alone."""
    modules, gen = lora_modules(torch.bfloat16)
    module = modules["m0"]
    state = MergedState(modules)
    perturb(module, gen)
    state.merge_round(["m0"])
    perturb(module, gen)
    u, _ = module.merge_factors(1.0)
    expected = 1.0 - (u[32:].norm() / u.norm()).item()

    def drop_rows(u, v):
        u = u.clone()
        u[32:] = 0
        return u, v

    monkeypatch.setattr(Ledger, "add", ledger_that(drop_rows))
    report = state.merge_round(["m0"])
    assert 0.2 < expected < 0.8
    assert report.kept_fraction == pytest.approx(expected, abs=1e-5)


def test_a_ledger_that_drops_the_round_keeps_nothing(monkeypatch):
    modules, gen = lora_modules(torch.bfloat16)
    state = MergedState(modules)
    perturb(modules["m0"], gen)
    monkeypatch.setattr(Ledger, "add", lambda self, u, v, dtype=None: None)
    report = state.merge_round(["m0"])
    assert report.modules == 1 and report.kept_fraction == pytest.approx(0.0, abs=1e-6)


def test_a_ledger_that_rewrites_earlier_rounds_is_an_error(monkeypatch):
    modules, gen = lora_modules(torch.bfloat16)
    state = MergedState(modules)
    perturb(modules["m0"], gen)
    state.merge_round(["m0"])
    original = Ledger.add

    def add_and_scale_old(self, u, v, dtype=torch.float32):
        self.u = self.u * 0.5  # halves every earlier round
        original(self, u, v, dtype)

    monkeypatch.setattr(Ledger, "add", add_and_scale_old)
    perturb(modules["m0"], gen)
    with pytest.raises(RuntimeError, match="m0: the ledger changed earlier rounds"):
        state.merge_round(["m0"])


def test_zero_updates_are_skipped_and_nonfinite_ones_reported():
    modules, gen = lora_modules(torch.bfloat16, count=3)
    state = MergedState(modules)
    perturb(modules["m1"], gen)  # m0 and m2 keep B = 0
    report = state.merge_round(["m0", "m1", "m2"])
    assert report.modules == 1
    assert [state.ledger_rank(n) for n in ("m0", "m1", "m2")] == [0, 1, 0]
    with torch.no_grad():
        modules["m2"].lora_b.weight.fill_(float("nan"))
    report = state.merge_round(["m2"])
    assert math.isnan(report.update_norm) and math.isnan(report.kept_fraction)


def test_host_reads_per_merge_do_not_grow_with_the_number_of_modules(monkeypatch):
    """Values come back from the device a fixed number of times per merge, not once per module
    (on a GPU every read-back is a synchronisation)."""
    reads = []
    for name in ("item", "tolist", "cpu", "__bool__", "__float__"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _o=original, _n=name, **k: (reads.append(_n), _o(self, *a, **k))[1])

    def reads_for(count):
        modules, gen = lora_modules(torch.bfloat16, count=count)
        state = MergedState(modules)
        for m in modules.values():
            perturb(m, gen)
        reads.clear()
        report = state.merge_round(list(modules))
        assert report.modules == count
        return len(reads)

    assert reads_for(2) == reads_for(12) <= 2


def test_rederived_weight_is_one_rounding_of_the_exact_state_after_many_rounds():
    """bf16 weight = round(W0 + U·V) computed here in fp64 from the stored factors."""
    model = tiny_lora(rank=2, alpha=4.0, targets=("q_proj", "v_proj"), dtype=torch.bfloat16)
    modules = convert_to_xgblora(model)
    w0 = {n: m.weight.detach().double().clone() for n, m in modules.items()}
    state = MergedState(modules)
    gen = torch.Generator().manual_seed(3)
    for _ in range(5):
        for m in modules.values():
            perturb(m, gen, size=1e-3)
        state.merge_round(list(modules))
    for name, m in modules.items():
        ledger = state._ledgers[name]
        exact = w0[name] + ledger.u.double() @ ledger.v.double()
        mismatched = (m.weight.detach() != exact.to(torch.bfloat16)).float().mean().item()
        assert mismatched < 1e-3, (name, mismatched)  # fp32 vs fp64 sums may differ at a tie
        assert not torch.equal(m.weight.detach().double(), w0[name])  # the rounds did arrive


@pytest.mark.parametrize("setting", ["legacy", "per-backend"])
def test_merge_leaves_the_users_matmul_precision_as_it_was(setting):
    """The merge runs fp32 GEMMs at full precision and restores what training set, whichever
    API set it (mixing them makes torch's global getter raise)."""
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    try:
        if setting == "legacy":
            torch.set_float32_matmul_precision("high")
        else:
            matmul.fp32_precision = "tf32"
        modules, gen = lora_modules(torch.bfloat16)
        state = MergedState(modules)
        perturb(modules["m0"], gen)
        assert state.merge_round(["m0"]).kept_fraction == pytest.approx(1.0, abs=1e-6)
        assert matmul.fp32_precision == "tf32"
    finally:
        matmul.fp32_precision = before


def test_a_round_over_modules_of_several_shapes_and_histories_is_measured_per_module(monkeypatch):
    """The batched measurement (grouped by shape and storage dtype) gives
    each module its own full-matrix kept fraction: modules of three shapes, with 0-3 earlier
    rounds each, one of them stored lossily; the report is the lossy one's value, computed here
    with dense fp32 matrices, and a rewrite of one module's earlier factors among many is caught."""
    from torchtune.modules.peft import LoRALinear

    gen = torch.Generator().manual_seed(7)
    holder = torch.nn.Module()
    shapes = [(48, 32), (32, 48), (48, 32), (16, 16), (32, 48), (48, 32)]
    for i, (out_dim, in_dim) in enumerate(shapes):
        m = LoRALinear(in_dim, out_dim, rank=2 if i % 2 else 1, alpha=2.0)
        with torch.no_grad():
            m.weight.copy_(torch.randn(out_dim, in_dim, generator=gen) * 0.02)
        holder.add_module(f"m{i}", m.to(torch.bfloat16))
    modules = convert_to_xgblora(holder)
    state = MergedState(modules)
    for history in range(3):  # module i has min(i, 3) earlier rounds: ledgers of different k
        names = [n for i, n in enumerate(modules) if i > history]
        for n in names:
            perturb(modules[n], gen)
        state.merge_round(names)

    for m in modules.values():
        perturb(m, gen)
    updates = {n: m.delta_weight() for n, m in modules.items()}
    before = {n: state.merged_weight(n) for n in modules}
    original = Ledger.add

    def lossy_for_m3(self, u, v, dtype=torch.float32):  # only module m3's ledger keeps 60% of its round
        if self is state._ledgers["m3"]:  # 0.6·u is no bf16 value: stored in fp32 (widening m3's bf16 ledger)
            return original(self, 0.6 * u, v, torch.float32)
        original(self, u, v, dtype)

    monkeypatch.setattr(Ledger, "add", lossy_for_m3)
    report = state.merge_round(list(modules))
    kept = {n: 1.0 - (torch.linalg.matrix_norm(state.merged_weight(n) - before[n] - updates[n])
                      / torch.linalg.matrix_norm(updates[n])).item() for n in modules}
    assert kept["m3"] == pytest.approx(0.6, abs=1e-4)
    assert all(k == pytest.approx(1.0, abs=1e-4) for n, k in kept.items() if n != "m3")
    assert report.modules == 6 and report.kept_fraction == pytest.approx(0.6, abs=1e-4)
    total = sum(torch.linalg.matrix_norm(u).item() ** 2 for u in updates.values()) ** 0.5
    assert report.update_norm == pytest.approx(total, rel=1e-5)

    def rewrite_m4(self, u, v, dtype=torch.float32):  # m4's earlier rounds altered during the append
        if self is state._ledgers["m4"]:
            self.v = self.v.clone()
            self.v[0, 0] += 0.25  # a change bf16 storage can hold (its step near 1 is 2^-7)
        original(self, u, v, dtype)

    monkeypatch.setattr(Ledger, "add", rewrite_m4)
    for m in modules.values():
        perturb(m, gen)
    with pytest.raises(RuntimeError, match="m4: the ledger changed earlier rounds"):
        state.merge_round(list(modules))


def test_the_aten_ops_of_a_merge_do_not_grow_40_per_module():
    """On a GPU a merge of many small modules is bound by the host issuing kernels: the measurement
    is batched over module shapes, so each further module costs its own ledger append and view
    update (~20 ops; 22 in a round that allocates the ledger's storage chunk) and not ~44 as when
    each was measured alone."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.ops += 1
            return func(*args, **(kwargs or {}))

    def ops_for(count, rounds):
        modules, gen = lora_modules(torch.bfloat16, count=count)
        state = MergedState(modules)
        for _ in range(rounds):  # the last round's ops are counted
            for m in modules.values():
                perturb(m, gen)
            Count.ops = 0
            with Count():
                state.merge_round(list(modules))
        return Count.ops

    # the first round (empty ledgers taking bf16 storage: a plain append, not a full-matrix
    # comparison) and the second (appending to factored ledgers)
    for rounds in (1, 2):
        per_module = (ops_for(12, rounds) - ops_for(2, rounds)) / 10
        # ~20 for the append and its measurement, ~30 for the bf16 view: lo decoded and coded
        # again (frexp, ldexp, round, clamp) and its two deviation sketches
        assert per_module <= 52, (rounds, per_module)
