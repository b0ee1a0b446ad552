"""LoRA-XS: SVD factors, the r×r core, boosted bases. Expected values are built by hand here."""

import pytest
import torch

from tests.tiny_model import tiny_lora
from torchtune_xgb.config.boost_config import AdapterConfig, BoostConfig, SVDConfig
from torchtune_xgb.method import loraxs
from torchtune_xgb.method.boosting import Booster
from torchtune_xgb.method.loraxs import LoRAXSLinear, truncated_svd

TOKENS = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(1))
TARGETS = ("q_proj", "k_proj", "v_proj", "output_proj")


def xs_booster(rank=4, basis="rotate", kappa=1, sigma="input", init="normal", num_layers=2, total_steps=None, **boost):
    model = tiny_lora(rank=rank, alpha=float(rank), targets=TARGETS, mlp=True, num_layers=num_layers)
    booster = Booster(model, BoostConfig(steps_per_round=kappa, basis=basis, **boost),
                      AdapterConfig(method="loraxs", sigma=sigma, init=init))
    return model, booster.start(total_steps=total_steps)


def set_cores(booster, seed, std=0.3, identity=0.0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in booster.active_modules().values():
            noise = torch.randn(m.xs_core.shape, generator=gen) * std
            m.xs_core.copy_(noise + identity * torch.eye(m.rank))


def rel(a, b):
    return (torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b)).item()


def test_init_keeps_output_one_step_changes_it_and_only_core_learns():
    base = tiny_lora(rank=4, targets=TARGETS, mlp=True)
    with torch.no_grad():
        reference = base(TOKENS)  # same base weights, LoRA B = 0: the plain model's output
    model, booster = xs_booster(rank=4)
    with torch.no_grad():
        assert rel(model(TOKENS), reference) < 1e-4
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all(any(p is m.xs_core for m in booster.modules.values()) for p in trainable)
    assert len(trainable) == len(booster.modules)
    assert booster.trainable_params() == 4 * 4 * len(booster.modules) == sum(p.numel() for p in trainable)
    frozen = {n: (m.xs_a.clone(), m.xs_b.clone(), m.weight.detach().clone()) for n, m in booster.modules.items()}
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    for _ in range(3):
        model(TOKENS).float().pow(2).mean().backward()
        for p in model.parameters():
            assert p.grad is None or any(p is m.xs_core for m in booster.modules.values())
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        assert rel(model(TOKENS), reference) > 1e-3  # training moved it
    for name, m in booster.modules.items():  # A, B and W stayed frozen
        assert all(torch.equal(x, y) for x, y in zip((m.xs_a, m.xs_b, m.weight), frozen[name]))


@pytest.mark.parametrize("sigma", ["input", "sqrt"])
def test_factors_of_a_weight_with_known_singular_values(sigma):
    gen = torch.Generator().manual_seed(0)
    out_dim, in_dim, r = 24, 16, 3
    u_full, _ = torch.linalg.qr(torch.randn(out_dim, in_dim, generator=gen))
    v_full, _ = torch.linalg.qr(torch.randn(in_dim, in_dim, generator=gen))
    s = torch.tensor([9.0, 7.0, 5.0] + [1.0 / (i + 1) for i in range(in_dim - 3)])
    weight = u_full @ torch.diag(s) @ v_full.T
    module = LoRAXSLinear(in_dim, out_dim, r, alpha=r, sigma=sigma)
    module.weight = torch.nn.Parameter(weight, requires_grad=False)
    module.set_basis(*truncated_svd(weight, r, SVDConfig()))
    for i in range(r):
        sign = torch.sign(module.xs_b[:, i] @ u_full[:, i])  # singular vectors are defined up to sign
        if sigma == "input":
            exp_b, exp_a = u_full[:, i], s[i] * v_full[:, i]
        else:
            exp_b, exp_a = s[i].sqrt() * u_full[:, i], s[i].sqrt() * v_full[:, i]
        assert torch.allclose(module.xs_b[:, i], sign * exp_b, atol=1e-5)
        assert torch.allclose(module.xs_a[i], sign * exp_a, atol=1e-5)
    # and B·A is the best rank-3 approximation: Σ_{i<3} s_i u_i v_iᵀ
    best = u_full[:, :r] @ torch.diag(s[:r]) @ v_full[:, :r].T
    assert torch.allclose(module.xs_b @ module.xs_a, best, atol=1e-4)


def test_randomized_svd_matches_exact_subspace():
    gen = torch.Generator().manual_seed(3)
    u, _ = torch.linalg.qr(torch.randn(256, 128, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(128, 128, generator=gen))
    weight = u @ torch.diag(torch.logspace(0, -3, 128)) @ v.T  # decaying spectrum, like trained weights
    exact = truncated_svd(weight, 16, SVDConfig(method="exact"))
    approx = truncated_svd(weight, 16, SVDConfig(method="randomized", niter=4, oversample=8))
    for i in (0, 2):  # left and right singular subspaces
        a, b = exact[i], approx[i]
        if i == 2:
            a, b = a.T, b.T
        cosines = torch.linalg.svdvals(a.T @ b).clamp(max=1.0)
        largest_angle = torch.arccos(cosines.min()).item()
        assert largest_angle < 1e-2, largest_angle


@pytest.mark.parametrize("basis,grows", [("rotate", True), ("top", False)])
def test_rank_of_cumulative_update_rotate_grows_top_stays(basis, grows):
    r, rounds = 2, 4
    model, booster = xs_booster(rank=r, basis=basis, kappa=1, num_layers=1, total_steps=rounds)
    name = "layers.0.attn.q_proj"
    ranks = []
    for t in range(rounds):
        # cores that grow the top-r singular values (the subspace trap's condition, design.md §1):
        # "top" then keeps re-finding the same subspaces, "rotate" moves on regardless
        set_cores(booster, seed=t, std=0.05, identity=0.3)
        report = booster.end_round()
        assert report.kept_fraction >= 0.99
        # the merged state minus W0 (the next round's live core, ~1e-5, is not part of it)
        ranks.append(int(torch.linalg.matrix_rank(booster.merged.delta(name), rtol=1e-5)))
    if grows:
        assert ranks == [r * (t + 1) for t in range(rounds)]
    else:
        assert max(ranks) <= r, ranks


def test_save_load_same_outputs_and_resume_does_not_recompute_svd(monkeypatch):
    model, booster = xs_booster(rank=4, kappa=3, total_steps=9)
    set_cores(booster, seed=1)
    booster.step = 3
    booster.end_round()  # one merged round, so the ledger is not empty either
    set_cores(booster, seed=2)
    with torch.no_grad():  # perturb A and B too, so a load that skipped them would show
        for m in booster.modules.values():
            m.xs_a.mul_(1.5)
            m.xs_b.add_(0.01)
        expected = model(TOKENS)
    state = booster.state_dict()

    def no_svd(*a, **k):
        raise AssertionError("resume recomputed an SVD")

    monkeypatch.setattr(loraxs, "truncated_svd", no_svd)
    monkeypatch.setattr("torchtune_xgb.method.boosting.svd_all", no_svd)
    monkeypatch.setattr("torchtune_xgb.method.boosting.truncated_svd_once", no_svd)
    fresh = tiny_lora(rank=4, alpha=4.0, targets=TARGETS, mlp=True)
    again = Booster(fresh, BoostConfig(steps_per_round=3), AdapterConfig(method="loraxs")).start(state=state)
    with torch.no_grad():
        assert torch.equal(fresh(TOKENS), expected)
    assert again.round == booster.round and again.rounds_trained == booster.rounds_trained


def test_torchtune_lora_helpers_never_see_loraxs_as_lora():
    from torchtune.modules.peft import get_adapter_state_dict

    model, booster = xs_booster(rank=4)
    sd = model.state_dict()
    assert any(k.endswith("xs_core") for k in sd) and any(k.endswith("xs_a") for k in sd)
    assert get_adapter_state_dict(sd) == {}  # nothing named like a LoRA, so nothing merged as one


def test_last_round_starts_no_successor_and_finish_leaves_exactly_the_merged_state(monkeypatch):
    """After the last step nothing live is left: no basis for a round that never trains (no SVD),
    no freshly initialised N(0, 1e-5²) core in the export, and the output is W0 + Σ B·R·A."""
    from torchtune_xgb.method import boosting

    calls = []
    real_svd = boosting.truncated_svd_once
    monkeypatch.setattr(boosting, "truncated_svd_once", lambda *a, **k: calls.append(1) or real_svd(*a, **k))
    model, booster = xs_booster(rank=4, basis="top", kappa=2, total_steps=4)
    n = len(booster.modules)
    assert len(calls) == n  # round 0's bases
    w0 = {name: m.weight.detach().clone() for name, m in booster.modules.items()}
    expected = {name: w.clone() for name, w in w0.items()}
    for round_index in range(2):
        set_cores(booster, seed=round_index)
        for name, m in booster.modules.items():  # the paper's update, α/r = 1 here
            expected[name] += m.xs_b @ m.xs_core.detach() @ m.xs_a
        booster.after_optimizer_step()
        booster.after_optimizer_step()
    assert len(calls) == 2 * n  # round 1's bases, and none for a round 2
    assert booster.finish() is None  # nothing partial to fold
    assert not booster.active_modules()
    for name, weight in booster.export_weights(torch.float32):
        assert torch.allclose(weight, expected[name], atol=1e-6)
        assert not torch.allclose(weight, w0[name], atol=1e-4)  # two rounds really arrived
    plain = tiny_lora(rank=4, targets=TARGETS, mlp=True)
    with torch.no_grad():
        for name, w in expected.items():
            plain.get_submodule(name).weight.copy_(w)
        assert rel(model(TOKENS), plain(TOKENS)) < 1e-5
