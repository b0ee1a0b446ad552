"""Invariants of the XGBLoRA round lifecycle on a tiny model (CPU, fast).

Every expected value is computed here independently of the code under test: reference merges
are written out with plain tensor algebra from weights the test itself sets.
"""

import pytest
import torch

from tests.tiny_model import tiny_lora
from torchtune_xgb.config.boost_config import BoostConfig
from torchtune_xgb.method.boosting import Booster
from torchtune_xgb.method.xgblora import XGBLoRALinear

TOKENS = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(1))


def perturb_adapters(booster, seed=0, std_b=0.05):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in booster.active_modules().values():
            module.lora_b.weight.copy_(torch.randn(module.lora_b.weight.shape, generator=gen) * std_b)
            module.lora_a.weight.copy_(torch.randn(module.lora_a.weight.shape, generator=gen) * 0.1)


def model_without_adapters(model, tokens):
    from torchtune.modules.peft import disable_adapter

    with torch.no_grad(), disable_adapter(model):
        return model(tokens).float()


@pytest.mark.parametrize(
    "dtype,rel_tol",
    # bf16: logits of size ~15 have a rounding step of 0.06-0.125, so compare in relative norm
    [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)],
)
@pytest.mark.parametrize("rank", [1, 4])
def test_merge_leaves_function_unchanged(dtype, rel_tol, rank):
    model = tiny_lora(rank=rank, alpha=2.0 * rank, targets=("q_proj", "k_proj", "v_proj", "output_proj"), mlp=True, dtype=dtype)
    booster = Booster(model, BoostConfig(steps_per_round=1, blocks_per_round="all")).start()
    perturb_adapters(booster)
    # reference merge by hand, from the weights as they are now
    expected = {
        name: m.weight.detach().float() + (m.alpha / m.rank) * m.lora_b.weight.detach().float() @ m.lora_a.weight.detach().float()
        for name, m in booster.modules.items()
    }
    with torch.no_grad():
        before = model(TOKENS).float()
    assert booster.trainable_params() > 0
    no_adapter_logits = model_without_adapters(model, TOKENS)
    report = booster.end_round()
    with torch.no_grad():
        after = model(TOKENS).float()
    rel = torch.linalg.vector_norm(before - after) / torch.linalg.vector_norm(before)
    assert rel < rel_tol, rel
    # the adapter mattered: the check above is not trivially true
    effect = torch.linalg.vector_norm(before - no_adapter_logits) / torch.linalg.vector_norm(before)
    assert effect > 10 * rel, (effect, rel)
    assert report.kept_fraction > 0.999
    for name, m in booster.modules.items():
        if dtype == torch.bfloat16:
            assert torch.equal(m.weight, expected[name].to(dtype)), name  # one rounding from the exact sum
        else:  # fp32 merges in place: equal up to fp32 arithmetic
            torch.testing.assert_close(m.weight, expected[name], rtol=0, atol=1e-6)
        assert not torch.any(m.lora_b.weight)  # re-initialised: B = 0 …
    # … so the model's output did not move at the re-init either: checked by `after` above


def test_reinit_resets_only_reinitialised_optimizer_state():
    model = tiny_lora(rank=1, targets=("q_proj", "v_proj"), num_layers=4)
    norm = model.norm.scale
    norm.requires_grad_(True)  # a non-adapter trainable parameter whose state must survive
    booster = Booster(model, BoostConfig(steps_per_round=1, blocks_per_round=2, seed=3)).start()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    booster.attach(opt)
    perturb_adapters(booster)
    model(TOKENS).float().pow(2).mean().backward()
    opt.step()
    active = dict(booster.active_modules())
    inactive = {n: m for n, m in booster.modules.items() if n not in active}
    assert active and inactive
    norm_state = {k: v.clone() for k, v in opt.state[norm].items()}
    a_before = {n: m.lora_a.weight.detach().clone() for n, m in active.items()}
    for m in active.values():
        assert m.lora_a.weight in opt.state and m.lora_b.weight in opt.state
    for m in inactive.values():  # never got a gradient, so no state either
        assert m.lora_a.weight not in opt.state
    booster.after_optimizer_step()  # κ = 1: this ends the round
    for name, m in active.items():
        assert m.lora_a.weight not in opt.state and m.lora_b.weight not in opt.state, name
        assert not torch.equal(m.lora_a.weight, a_before[name])  # fresh A
        assert not torch.any(m.lora_b.weight)
    assert set(opt.state[norm]) == set(norm_state)
    for key, value in norm_state.items():
        assert torch.equal(opt.state[norm][key], value)


def test_optimizer_reset_none_keeps_state():
    model = tiny_lora(rank=1)
    booster = Booster(model, BoostConfig(steps_per_round=1, optimizer_reset="none")).start()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    booster.attach(opt)
    perturb_adapters(booster)
    model(TOKENS).float().pow(2).mean().backward()
    opt.step()
    n_states = len(opt.state)
    booster.after_optimizer_step()
    assert len(opt.state) == n_states > 0


def test_unselected_blocks_get_no_gradient():
    model = tiny_lora(rank=1, targets=("q_proj", "v_proj"), mlp=True, num_layers=4)
    booster = Booster(model, BoostConfig(steps_per_round=5, blocks_per_round=2, seed=11)).start()
    chosen = set(booster.selected_blocks(0))
    assert len(chosen) == 2
    perturb_adapters(booster)
    model(TOKENS).float().pow(2).mean().backward()
    for name, module in booster.modules.items():
        block = int(name.split(".")[1])
        grads = [module.lora_a.weight.grad, module.lora_b.weight.grad]
        if block in chosen:
            assert all(g is not None and torch.any(g) for g in grads), name
        else:
            assert all(g is None for g in grads), name
    # gated-off modules add nothing: same output as with their B set to garbage
    with torch.no_grad():
        out = model(TOKENS)
        for name, module in booster.modules.items():
            if int(name.split(".")[1]) not in chosen:
                module.lora_b.weight.fill_(10.0)
        assert torch.equal(out, model(TOKENS))


def test_block_selection_reproducible_from_seed():
    def selections(seed, bpr=0.34, layers=6):
        model = tiny_lora(rank=1, num_layers=layers)
        booster = Booster(model, BoostConfig(steps_per_round=1, blocks_per_round=bpr, seed=seed)).start()
        return [booster.selected_blocks(r) for r in range(20)]

    first, again, other = selections(0), selections(0), selections(1)
    assert first == again
    assert first != other
    assert all(len(s) == 2 and s == sorted(set(s)) for s in first)  # round(0.34 × 6) = 2
    assert len({tuple(s) for s in first}) > 1  # the subset changes between rounds


def test_rank_of_cumulative_update_grows_with_rounds():
    model = tiny_lora(rank=1, targets=("q_proj",), num_layers=1)
    booster = Booster(model, BoostConfig(steps_per_round=1, blocks_per_round="all")).start()
    name = "layers.0.attn.q_proj"
    w0 = booster.modules[name].weight.detach().clone()
    ranks = []
    for t in range(6):
        perturb_adapters(booster, seed=t)
        booster.end_round()
        delta = dict(booster.export_weights(torch.float32))[name] - w0
        ranks.append(int(torch.linalg.matrix_rank(delta, rtol=1e-4)))
    assert ranks == [1, 2, 3, 4, 5, 6]


def test_twenty_small_rounds_on_bf16_lose_nothing():
    """Naive bf16 merging drops most of a small round; the merged state keeps it (design.md §2)."""
    model = tiny_lora(rank=1, alpha=1.0, targets=("q_proj",), num_layers=1, dtype=torch.bfloat16)
    booster = Booster(model, BoostConfig(steps_per_round=1, blocks_per_round="all")).start()
    module: XGBLoRALinear = booster.modules["layers.0.attn.q_proj"]
    w0 = module.weight.detach().clone()
    exact = w0.float().clone()
    naive = w0.clone()
    gen = torch.Generator().manual_seed(5)
    for _ in range(20):
        b = torch.randn(module.out_dim, 1, generator=gen)
        a = torch.randn(1, module.in_dim, generator=gen)
        # scale so that ‖ΔW‖ / ‖W‖ = 1e-3 in bf16 values
        delta = (b.bfloat16().float() @ a.bfloat16().float())
        s = 1e-3 * torch.linalg.matrix_norm(w0.float()) / torch.linalg.matrix_norm(delta)
        with torch.no_grad():
            module.lora_b.weight.copy_(b * s)
            module.lora_a.weight.copy_(a)
        delta = module.lora_b.weight.float() @ module.lora_a.weight.float()  # α/r = 1
        exact += delta
        naive = (naive.float() + delta).bfloat16()
        report = booster.end_round()
        assert report.kept_fraction >= 0.99
    total = torch.linalg.matrix_norm(exact - w0.float())
    exported = dict(booster.export_weights(torch.float32))["layers.0.attn.q_proj"]  # exact S in fp32
    export_error = torch.linalg.matrix_norm(exported - exact) / total
    naive_error = torch.linalg.matrix_norm(naive.float() - exact) / total
    assert export_error < 0.01
    assert naive_error > 0.3, naive_error  # the failure the merged state exists to prevent
    # the forward weight is one rounding of the exact state but where S lies within the codes'
    # precision (2⁻²² of the row's largest |W0| per round) of a rounding boundary: no accumulation
    assert (module.weight != exact.bfloat16()).float().mean().item() < 1e-3
    # memory held: lo (what the bf16 weight's rounding leaves out of S: int16 codes, a unit per
    # row, two out×16 deviation sketches) plus 20 rank-1 factor
    # pairs, stored in bf16: they are the bf16 adapter's own values (α/r = 1, η = 1), so bf16 holds
    # them exactly (the export above is exact), at 2 bytes per value instead of 4; the ledger's
    # chunks hold 8, 8 and 16 rounds (each as many as the rounds before it, from 8)
    out_dim, in_dim = module.out_dim, module.in_dim
    assert 20 * (out_dim + in_dim) < out_dim * in_dim  # still stored as factors
    assert booster.merged.nbytes() == (2 * out_dim * in_dim + 4 * out_dim + 2 * 4 * out_dim * 16
                                       + 2 * (8 + 8 + 16) * (out_dim + in_dim))
    # and so is the streamed bf16 export, which reuses that weight instead of a second copy
    streamed = dict(booster.export_weights(torch.bfloat16))["layers.0.attn.q_proj"]
    assert streamed.data_ptr() == module.weight.data_ptr()


def test_finish_folds_partial_round_and_export_includes_live_adapter():
    model = tiny_lora(rank=2, alpha=4.0)
    booster = Booster(model, BoostConfig(steps_per_round=10)).start()
    w0 = {n: m.weight.detach().float().clone() for n, m in booster.modules.items()}
    perturb_adapters(booster)
    live = {n: 2.0 * m.lora_b.weight.float() @ m.lora_a.weight.float() for n, m in booster.modules.items()}
    stream = booster.export_weights(torch.float32)  # mid-round: the live adapter is part of the export
    name, first = next(stream)  # lazily: one module at a time
    assert first.data_ptr() != booster.modules[name].weight.data_ptr()  # live term: a new sum
    exported = dict([(name, first), *stream])
    assert exported.keys() == live.keys()
    for name in live:
        assert torch.allclose(exported[name], w0[name] + live[name], atol=1e-6)
    booster.step = 3  # three steps into the round
    report = booster.finish()
    assert report is not None and report.round == 0
    for name, weight in booster.export_weights(torch.float32):
        assert torch.allclose(weight, w0[name] + live[name], atol=1e-6)
        # fp32 weights are the exact state: the export shares them rather than copying the model
        assert weight.data_ptr() == booster.modules[name].weight.data_ptr()
    assert booster.finish() is None  # idempotent: nothing left to fold
