"""Rounds without training them, and the work of a step or a merge counted (benchmarks/rounds.py, tests).

``simulate_rounds`` puts k random rank-1 rounds into a Booster's merged state directly, as a resume
from a checkpoint holding them would (sealed segments plus the rounds after the last boundary),
so a benchmark or a test can look at round 500 without training 500 rounds. ``count_work`` runs a
function under torch's FlopCounterMode and a dispatch mode that adds up the bytes of every
tensor each aten operation reads or writes: deterministic counts, comparable across round counts.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from torchtune_xgb.distributed.sharding import local

# aten operations that touch no tensor data: views, metadata and allocations
_NO_DATA = {"view", "_unsafe_view", "t", "transpose", "permute", "slice", "select", "expand", "alias",
            "detach", "unsqueeze", "squeeze", "is_pinned", "_reshape_alias", "as_strided", "empty",
            "empty_like", "empty_strided", "lift_fresh", "_to_copy_meta"}


def _nbytes(t: Any) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


class _ByteCounter(TorchDispatchMode):
    """Bytes read and written by every aten operation (inputs + outputs; a copy's destination
    counts once, as written); views and allocations touch nothing."""

    def __init__(self):
        super().__init__()
        self.bytes = 0
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if name not in _NO_DATA:
            leaves = torch.utils._pytree.tree_leaves((args, kwargs))
            moved = sum(_nbytes(a) for a in leaves) + sum(_nbytes(o) for o in torch.utils._pytree.tree_leaves(out))
            if name.endswith("_") or name == "copy_":  # in place: the destination is also the output
                moved -= _nbytes(args[0])
            self.bytes += moved
            self.ops += 1
        return out


def _addmm_flops(self_shape, a_shape, b_shape, out_shape=None, **kwargs) -> int:
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


def count_work(fn: Callable[[], Any]) -> Dict[str, int]:
    """``{"flops", "bytes", "ops"}`` of running ``fn()`` (FLOPs of matrix products as torch's
    FlopCounterMode counts them, plus the in-place ``addmm_`` it leaves out, which the merges
    use; bytes and ops that touch data from the dispatch mode above)."""
    counter = _ByteCounter()
    flops = FlopCounterMode(display=False, custom_mapping={torch.ops.aten.addmm_: _addmm_flops})
    with flops, counter:
        fn()
    return {"flops": flops.get_total_flops(), "bytes": counter.bytes, "ops": counter.ops}


def simulate_rounds(booster, rounds: int, seed: int = 0, scale: float = 1e-4) -> None:
    """Make ``booster`` hold ``rounds`` merged rounds of random rank-1 updates (of relative size
    ~``scale``, stored as the module's merges store them) in every adapted module, with ``rounds``
    round reports: the state a
    resume at round ``rounds`` would load (segments sealed every ``segment_rounds`` rounds, the
    rest open; a ledger that turns dense at a boundary has its matrix there, the rounds after it
    folded at each boundary). NF4 views of a fixed rank R get random factors of rank R (their cost depends on
    their shape only; a full view is the worst case, each merge truncating); an exact view
    (``nf4_view_rank: null``, growing) gets rank min(``rounds``, its bound), as after that many rounds. The working weights get the rounds on top of what they hold (for timing and
    counting: they need not start from W0). Replaces whatever rounds the booster held."""
    from dataclasses import replace

    from torchtune_xgb.method.boosting import RoundReport
    from torchtune_xgb.method.ledger import storage_dtype
    from torchtune_xgb.method.views import SKETCH_COLUMNS

    merged = booster.merged
    gen = torch.Generator().manual_seed(seed)
    boundary = rounds - rounds % merged.segment_rounds
    factors = {}
    for name, module in booster.modules.items():
        out_dim, in_dim = module.weight.shape
        dtype = storage_dtype(module, booster.config.merge_rate)  # as a merge of this module stores them
        u = torch.randn(out_dim, rounds, generator=gen) * scale
        v = torch.randn(rounds, in_dim, generator=gen) / in_dim**0.5
        factors[name] = (u.to(dtype), v.to(dtype))
    segments: List[Dict[str, Dict[str, torch.Tensor]]] = [{} for _ in range(0, boundary, merged.segment_rounds)]
    for name, (u, v) in factors.items():
        # what a run writes: factors, until the boundary where the ledger turns dense writes the
        # matrix (its base, formed as the ledger forms it); the rounds after it as factors again
        ledger = merged._ledgers[name]
        turned = next((b for b in range(merged.segment_rounds, boundary + 1, merged.segment_rounds)
                       if ledger.dense_at(b, u.dtype)), None)
        for index, first in enumerate(range(0, boundary, merged.segment_rounds)):
            stop = first + merged.segment_rounds
            if stop == turned:
                segments[index][name] = {"dense": u[:, :stop].to(ledger.device).float() @ v[:stop].to(ledger.device).float()}
            else:
                segments[index][name] = {"u": u[:, first:stop], "v": v[first:stop]}
    state = {n: {"u": u[:, boundary:], "v": v[boundary:]} for n, (u, v) in factors.items() if rounds > boundary}
    views = {}
    for name, view in merged._views.items():
        out_dim, in_dim = view.full_out, view.v.shape[1]
        used = min(rounds, view.rank) if view.growing else view.rank
        views[name] = {"u": torch.randn(out_dim, used, generator=gen) * scale,
                       "v": torch.randn(used, in_dim, generator=gen) / in_dim**0.5,
                       "sketch": torch.randn(out_dim, SKETCH_COLUMNS, generator=gen) * scale,
                       "used": torch.tensor(used)}
    merged.load_state_dict(state, segments=segments, views=views, rounds=rounds, open_from_round=boundary)
    template = RoundReport(round=0, step=0, blocks=[], trainable_params=0, merge_seconds=0.0, reset_seconds=0.0,
                           kept_fraction=1.0, merged_modules=len(booster.modules), update_norm=0.0)
    booster.reports = [replace(template, round=i) for i in range(rounds)]


def perturb_adapters(booster, seed: int, size: float = 1e-3) -> None:
    """Random non-zero adapters in every active module (something to merge)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in booster.active_modules().values():
            for param in module.trainable():
                target = local(param)
                target.copy_((torch.randn(target.shape, generator=gen) * size).to(target.dtype))


def step_of_adapted_modules(booster, tokens: int = 8, seed: int = 0) -> Callable[[], None]:
    """One forward and backward of every adapted module on ``tokens`` random inputs: all a
    training step spends where merged rounds could add work (fp32/bf16: none beyond the base
    linear; NF4: the view beside the 4-bit weight)."""
    gen = torch.Generator().manual_seed(seed)
    inputs = {}
    for name, module in booster.modules.items():
        dtype = module.lora_a.weight.dtype if hasattr(module, "lora_a") else torch.float32
        # drawn on the CPU (the same numbers on every device), then put where the module runs
        inputs[name] = torch.randn(tokens, module.weight.shape[1], generator=gen).to(device=module.weight.device, dtype=dtype)

    params = [p for module in booster.modules.values() for p in module.parameters() if p.requires_grad]

    def step() -> None:
        for param in params:  # as after zero_grad(set_to_none=True): every step starts alike
            param.grad = None
        for name, module in booster.modules.items():
            x = inputs[name].detach().requires_grad_(True)
            module(x).float().square().sum().backward()

    return step


def merge_counts(booster, seed: int = 1) -> Dict[str, int]:
    """Counts of one end of round (merge, re-init, optimizer reset) with random adapters."""
    perturb_adapters(booster, seed)
    return count_work(lambda: booster.end_round())


def counts_at(booster, rounds: int, seed: int = 0) -> Dict[str, Dict[str, int]]:
    """``{"step": counts, "merge": counts}`` of ``booster`` holding ``rounds`` simulated rounds."""
    simulate_rounds(booster, rounds, seed=seed)
    return {"step": count_work(step_of_adapted_modules(booster)), "merge": merge_counts(booster, seed=seed + 1)}


def tiny_booster(base: str, nf4_view_rank: Optional[int] = None, **dims):
    """A Booster on the 2-layer test model (q, v and the MLP adapted, rank 1; ``dims`` override
    its TINY sizes), one block per round, with an fp32, bf16 or NF4 base (``base``)."""
    from torchtune import training
    from torchtune.models.llama3_2._component_builders import lora_llama3_2

    from tests.tiny_model import TINY, tiny_base
    from torchtune_xgb.config.boost_config import BoostConfig
    from torchtune_xgb.method.boosting import Booster
    from torchtune_xgb.quant.nf4 import fitting_nf4_blocks

    dtype = torch.float32 if base == "fp32" else torch.bfloat16
    with training.set_default_dtype(dtype), fitting_nf4_blocks():
        model = lora_llama3_2(lora_attn_modules=["q_proj", "v_proj"], apply_lora_to_mlp=True, lora_rank=1,
                              lora_alpha=2.0, quantize_base=base == "nf4", **{**TINY, **dims})
    weights = tiny_base(seed=0).state_dict() if not dims else None
    if weights is None:  # other sizes: seeded random weights of those shapes
        torch.manual_seed(0)
        weights = {k: torch.randn(v.shape) * 0.02 for k, v in model.state_dict().items() if "lora" not in k}
    model.load_state_dict({k: v.to(dtype) for k, v in weights.items()}, strict=False)
    config = BoostConfig(steps_per_round=1, blocks_per_round=1, **({} if nf4_view_rank is None else
                                                                   {"nf4_view_rank": nf4_view_rank}))
    booster = Booster(model, config).start()
    optimizer = torch.optim.AdamW([p for m in booster.modules.values() for p in m.trainable()], lr=1e-3)
    booster.attach(optimizer)
    return booster
