"""How much of a merged round arrived in the stored state, measured without out×in matrices.

The kept fraction of a merge (design.md §2) needs ‖ΔW‖ and the residual ‖S_after − S_before − ΔW‖
of every merged module. Both come from r×r Gram matrices in fp64, batched over the modules of one
shape, so a round costs a few kernels per module shape; the guard uses the same norms every step.
"""

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch



@contextmanager
def exact_fp32_matmuls():
    """fp32 matmuls at full precision (no TF32) for the merge, whatever training set.

    Through the per-backend setting where torch has it (≥ 2.9): the global getter raises once a
    user has set a backend's precision through that newer API."""
    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):  # pragma: no cover - torch < 2.9
        previous = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest")
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(previous)
        return
    backends = [matmul]
    mkldnn = getattr(torch.backends, "mkldnn", None)
    if hasattr(getattr(mkldnn, "matmul", None), "fp32_precision"):
        backends.append(mkldnn.matmul)
    previous = [b.fp32_precision for b in backends]
    for backend in backends:  # CUDA (TF32) and oneDNN on CPUs (bf16/TF32 emulation)
        backend.fp32_precision = "ieee"
    try:
        yield
    finally:
        for backend, value in zip(backends, previous):
            backend.fp32_precision = value


def product_sq_norm(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """‖x·y‖²_F = Σ (xᵀx) ∘ (y·yᵀ) for x (m×r), y (r×n), in fp64 from two r×r Gram matrices:
    O(r²·(m+n)) work instead of an m×n matrix. Linear in the rows of x, so shards of x's rows
    give parts that sum to the whole."""
    x, y = x.double(), y.double()
    return ((x.T @ x) * (y @ y.T)).sum()


def _grouped(count: int, key, compute) -> torch.Tensor:
    """``compute(members)`` for each group of indices ``0..count-1`` with equal ``key(i)`` (a
    tensor whose first dim runs over the members), reassembled in index order: a few kernels per
    group instead of several per item."""
    groups: Dict[tuple, List[int]] = {}
    for i in range(count):
        groups.setdefault(key(i), []).append(i)
    parts = [compute(members) for members in groups.values()]
    grouped = torch.cat(parts) if len(parts) > 1 else parts[0]
    order = [i for members in groups.values() for i in members]
    if order == list(range(count)):
        return grouped
    index = torch.tensor(order, device=grouped.device)
    return torch.empty_like(grouped).index_copy_(0, index, grouped)  # back in index order


def _stacked_sq_norms(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """:func:`product_sq_norm` of each ``(x[i], y[i])`` of stacked factors (one batched Gram product)."""
    x, y = x.double(), y.double()
    return ((x.mT @ x) * (y @ y.mT)).sum(dim=(1, 2))


def _shape_key(*tensors: torch.Tensor) -> tuple:
    return tuple((tuple(t.shape), t.dtype, t.device) for t in tensors)


def product_sq_norms(pairs: Sequence[Tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """:func:`product_sq_norm` of every ``(x, y)`` pair, as one fp64 vector in the pairs' order.

    Pairs of the same shapes and dtype are stacked and go through one batched Gram product, so a
    whole model costs a few kernels per distinct module shape rather than several per module: the
    guard measures every live adapter after every step, and on a GPU the per-module version is
    bound by the host launching ~10 small kernels per module (a 1B Llama has 112 modules)."""
    if not pairs:
        return torch.zeros(0, dtype=torch.float64)
    return _grouped(len(pairs), lambda i: _shape_key(*pairs[i]),
                    lambda members: _stacked_sq_norms(torch.stack([pairs[i][0] for i in members]),
                                                      torch.stack([pairs[i][1] for i in members])))


def full_stats(arrived: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(‖u·v‖², ‖arrived − u·v‖², 0): the full-matrix measurement, for states stored densely."""
    lost = (arrived - u @ v).double().square().sum()
    return torch.stack([product_sq_norm(u, v), lost, torch.zeros_like(lost)])


def _stacked_fp64(tensors: List[torch.Tensor]) -> torch.Tensor:
    """``torch.stack(tensors)`` in fp64: one cast for the stack (ledgers of one shape may differ in
    storage dtype: those are widened to fp32 first, exactly)."""
    if len({t.dtype for t in tensors}) > 1:
        tensors = [t.float() for t in tensors]
    return torch.stack(tensors).double()


@dataclass
class _Appended:
    """A round appended to a factored ledger: the round's factors (u, v), what the ledger stored
    of them (its ``last_added``, None if nothing), and whether earlier rounds were rewritten."""

    u: torch.Tensor
    v: torch.Tensor
    stored: Optional[Tuple[torch.Tensor, torch.Tensor]]
    changed: bool


class AppendedRounds:
    """The rounds a merge appends to factored ledgers, measured together (:meth:`stats`).

    The stored state changed by L_after − L_before = u'·v' for the stored factors (u', v') when
    the earlier rounds are untouched (a ledger appends without copying them; that they were not
    reassigned during the append is ``changed``, from the ledger's generation), and the residual
    u'·v' − u·v = (u' − u)·v' + u·(v' − v) is a product of two rank-2r factors whose entries scale
    with the error: no cancellation of large terms, so a lossless append measures exactly 0 and a
    lossy one its true loss. O(r²·(out+in)) per round, whatever the number of earlier rounds.

    Batched: the norms by one stacked Gram product per module shape, instead of ~30 kernels per module.
    """

    def __init__(self):
        self.records: List[_Appended] = []

    def add(self, u: torch.Tensor, v: torch.Tensor, stored: Optional[Tuple[torch.Tensor, torch.Tensor]],
            changed: bool) -> None:
        self.records.append(_Appended(u, v, stored, changed))

    def stats(self) -> torch.Tensor:
        """(‖u·v‖², ‖residual‖², changed) of each appended round, one row each."""
        records = self.records
        update_sq = product_sq_norms([(r.u, r.v) for r in records])
        kept = [i for i, r in enumerate(records) if r.stored is not None]

        def residual_sq(members: List[int]) -> torch.Tensor:
            group = [records[kept[i]] for i in members]
            # fp64 before subtracting: the stored factors may be bf16, the round's are fp32
            new_u = _stacked_fp64([r.stored[0] for r in group])
            new_v = _stacked_fp64([r.stored[1] for r in group])
            u, v = _stacked_fp64([r.u for r in group]), _stacked_fp64([r.v for r in group])
            return _stacked_sq_norms(torch.cat([new_u - u, u], dim=2), torch.cat([new_v, new_v - v], dim=1))

        residual = update_sq.clone()  # nothing stored: the whole round is lost
        if kept:
            same_shape = lambda i: _shape_key(records[kept[i]].u, records[kept[i]].v, *records[kept[i]].stored)  # noqa: E731
            residual[torch.tensor(kept, device=residual.device)] = _grouped(len(kept), same_shape, residual_sq)
        changed = torch.tensor([float(r.changed) for r in records], dtype=residual.dtype, device=residual.device)
        return torch.stack([update_sq, residual, changed], dim=1)
