"""What the forward pass sees of the merged rounds: one training view per kind of base weight.

The exact merged state S = W0 + L lives in the ledgers (method/ledger.py, on ``base_device``);
the forward pass needs a view of it whose cost per step and per merge does not grow with the
number of rounds k. Every view is updated from what the ledger stored (``Ledger.last_added``),
so it never holds anything the exact state does not.

- fp32 weights (:func:`add_in_place`): the weight is S itself, W += u·v (a 24-bit mantissa keeps
  even a 1e-4 round), as before.
- bf16 (any non-fp32 dense) weights (:class:`CompensatedView`): the working weight is
  hi = round(S̃) and ``lo`` = S̃ − hi is kept in fp32 on ``base_device``. Each merge rounds once,
  in fp32, the small sum lo + u·v (at most half a bf16 step plus the round), never anything of
  the size of W: S̃ stays within ~2⁻²⁴ of the rounds' own size (+ 2⁻³³·|W| each) of S, and the
  working weight is one rounding of the exact state, as when it was re-derived as round(W0 + U·V)
  from the whole ledger (a GEMM of rank k per merge). A merge now costs O(out·in) per module
  whatever k: lo travels to the GPU and back (4 bytes per parameter each way, asynchronously from
  pinned memory), hi is the weight.
- NF4 weights (:class:`LowRankView`): the 4-bit weight cannot take the rounds (re-quantizing
  destroys them, design.md §2) and an exact view beside it grows with k, so the forward pass adds
  a view of rank at most R (``boost.nf4_view_rank``): exact while the rounds fit (k·r ≤ R), then
  the best rank-R approximation of (view + new round), kept by a QR of each side and an SVD of
  the small core, O((out+in)·R²) per merge. What it leaves out is measured every merge (a
  sketch, :class:`LowRankView`), logged as ``view_deviation``; the ledger stays exact for export
  and resume.
"""

import math
from typing import Dict, Optional, Tuple

import torch

from torchtune_xgb.distributed.sharding import (
    broadcast_from_rank0,
    gather_rows,
    is_sharded,
    local,
    local_rows,
    rows_like,
)

# Columns of the random sketch that measures a low-rank view's deviation: a Gaussian sketch
# estimates ‖E‖_F² with relative standard deviation ≤ √(2/p) (a rank-1 E; a spread spectrum,
# the usual case, far less): p = 16 gives the deviation to within ~18% at worst.
SKETCH_COLUMNS = 16


@torch.no_grad()
def add_in_place(weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> None:
    """fp32 weight: S += u·v in place (``weight``: this rank's rows)."""
    weight.addmm_(u.float(), v.float())


@torch.no_grad()
def compensated_add(weight: torch.Tensor, lo: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """hi + lo += u·v for a bf16 ``weight`` (hi, changed in place) and its fp32 ``lo`` (on the
    weight's device, overwritten); returns the new lo.

    t = lo + u·v is small (≤ half a bf16 step of hi plus the round), so its fp32 rounding is
    ~2⁻²⁴·|t|; hi' = round(hi + t); hi − hi' is exact in fp32 (two nearby bf16 values); lo' =
    (hi − hi') + t rounds relative to |lo'| again. Nothing is ever rounded relative to |W| in fp32.
    """
    t = lo.addmm_(u, v)
    hi = weight.float()
    weight.copy_(hi + t)
    return t.add_(hi.sub_(weight))


@torch.no_grad()
def compensated_split(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Make bf16 ``weight`` (holding W0) hi = round(W0 + delta); return lo = (W0 − hi) + delta."""
    hi = weight.float()
    weight.copy_(hi + delta)
    return delta.add_(hi.sub_(weight))


class CompensatedView:
    """hi/lo views of bf16 modules: ``lo[name]`` (fp32, this rank's rows, on ``base_device``:
    pinned when the weights are on a GPU). lo starts at 0 (the loaded weight is W0 exactly)."""

    def __init__(self, weights: Dict[str, torch.Tensor], base_device: str):
        from torchtune_xgb.method.base_weights import host_empty

        pin = lambda w: torch.device(base_device).type == "cpu" and w.device.type == "cuda"  # noqa: E731
        self.lo = {name: host_empty(w.shape, torch.float32, base_device, pin(w)).zero_() for name, w in weights.items()}

    def add(self, name: str, weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor,
            lo_on_device: Optional[torch.Tensor] = None) -> None:
        """hi + lo += u·v (u, v fp32 on the weight's device); ``lo_on_device``: lo already copied
        there (prefetched)."""
        held = self.lo[name]
        lo = lo_on_device if lo_on_device is not None else held.to(weight.device, non_blocking=True)
        new_lo = compensated_add(weight, lo, u, v)
        if new_lo is not held:
            held.copy_(new_lo, non_blocking=True)  # back to pinned host memory, asynchronously

    def rebuild(self, name: str, weight: torch.Tensor, delta: torch.Tensor) -> None:
        """After a resume: ``weight`` holds W0, ``delta`` = L (fp32, on the weight's device)."""
        self.lo[name].copy_(compensated_split(weight, delta))

    def merged_weight(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """S̃ = hi + lo, rounded once to fp32 (summed in fp64)."""
        return (weight.double() + self.lo[name].to(weight.device).double()).float()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.lo.values())


def truncate(u: torch.Tensor, v: torch.Tensor, rank: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` approximation of u·v (u out×m, v m×in) by a QR of each side and an SVD
    of the m×m core, in fp64: (u', v', discarded ‖·‖²) with √σ on each side, fp32. Never forms u·v."""
    qu, ru = torch.linalg.qr(u.double())
    qv, rv = torch.linalg.qr(v.double().T)
    w, s, zt = torch.linalg.svd(ru @ rv.T)
    root = s[:rank].sqrt()
    return (qu @ (w[:, :rank] * root)).float(), ((root[:, None] * zt[:rank]) @ qv.T).float(), s[rank:].square().sum()


def _sketch_matrix(in_dim: int, device: torch.device) -> torch.Tensor:
    """The fixed Gaussian test matrix Ω (in×p) of a width: the same on every rank and every run."""
    gen = torch.Generator().manual_seed(1_000_003 * in_dim + SKETCH_COLUMNS)
    return torch.randn(in_dim, SKETCH_COLUMNS, generator=gen).to(device)


class LowRankView:
    """The rank-≤R view of one NF4 module's merged rounds, and the sketch that measures it.

    ``module.merged_u`` (out×R) · ``module.merged_v`` (R×in), fp32 on the weight's device, zero
    past the rounds held: fixed shapes, so a step costs the same at every round (and the CPU's
    oneDNN keeps no kernels for new shapes). ``rank=None``: no bound but min(out, in), so the view
    is exact and its columns grow (doubling) with the rounds, as does the cost of a step. Under
    FSDP2 ``merged_u``'s rows are sharded like the weight (a DTensor; the forward gathers them,
    sharding.linear_frozen).

    Deviation: the sketch Y = L·Ω of the exact rounds (Ω: in×p Gaussian, fixed) is updated with
    every round, and ‖Y − L̃·Ω‖_F / ‖Y‖_F estimates ‖L − L̃‖_F / ‖L‖_F, the relative part of the
    merged rounds the forward pass does not see: O((out+in)·(R+r)·p) per merge, constant in k.
    """

    def __init__(self, module, rank: Optional[int]):
        weight = module.weight
        rows, in_dim = local(weight).shape
        device = local(weight).device
        self.module, self.full_out = module, weight.shape[0]
        self.growing = rank is None
        self.rank = min(rank or in_dim, self.full_out, in_dim)  # rank(L) never exceeds min(out, in)
        self.used = 0
        capacity = min(SKETCH_COLUMNS, self.rank) if self.growing else self.rank
        self.u = torch.zeros(rows, capacity, device=device)
        self.v = torch.zeros(capacity, in_dim, device=device)
        self.omega = _sketch_matrix(in_dim, device)
        self.sketch = torch.zeros(rows, SKETCH_COLUMNS, device=device)  # L·Ω, this rank's rows
        self._publish()

    def _publish(self) -> None:
        self.module.merged_u = rows_like(self.u, self.module.weight, self.full_out)
        self.module.merged_v = self.v

    @torch.no_grad()
    def add(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Add the round u·v (fp32; this rank's rows of u; as the ledger stored them); return this
        rank's (‖Y − L̃Ω‖², ‖Y‖²) after it."""
        r = u.shape[1]
        if self.growing and self.used + r > self.u.shape[1] and self.used < self.rank:
            self._grow(min(self.rank, max(2 * self.u.shape[1], self.used + r)))
        if self.used + r <= self.u.shape[1]:
            self.u[:, self.used : self.used + r] = u
            self.v[self.used : self.used + r] = v
            self.used += r
        else:
            self._truncate_with(u, v)
        self._publish()
        self.sketch.addmm_(u, v @ self.omega)
        return self.deviation_parts()

    def _grow(self, capacity: int) -> None:
        """More (zero) columns for an unbounded view."""
        extra = capacity - self.u.shape[1]
        self.u = torch.cat([self.u, self.u.new_zeros(self.u.shape[0], extra)], dim=1)
        self.v = torch.cat([self.v, self.v.new_zeros(extra, self.v.shape[1])], dim=0)

    def deviation_parts(self) -> torch.Tensor:
        gap = self.sketch - self.u @ (self.v @ self.omega)
        return torch.stack([gap.double().square().sum(), self.sketch.double().square().sum()])

    def _truncate_with(self, u: torch.Tensor, v: torch.Tensor) -> None:
        """view ← best rank-R approximation of view + u·v; under FSDP2 the (out×(R+r)) left side
        is gathered and the factorisation computed on rank 0 and broadcast (one answer everywhere)."""
        left, right = torch.cat([self.u, u], dim=1), torch.cat([self.v, v], dim=0)
        weight = self.module.weight
        if not is_sharded(weight):
            self.u, self.v, _ = truncate(left, right, self.rank)
            return
        full_left = gather_rows(left, weight, self.full_out)
        shapes = [(self.full_out, self.rank), (self.rank, right.shape[1])]
        new_u, new_v = broadcast_from_rank0(lambda: truncate(full_left, right, self.rank)[:2], shapes,
                                            left.device, weight)
        self.u, self.v = local_rows(new_u, weight).contiguous(), new_v

    @torch.no_grad()
    def rebuild(self, u: torch.Tensor, v: torch.Tensor) -> None:
        """From the exact rounds u·v (all of them, this rank's rows of u), for a checkpoint that
        holds no view: the best rank-R approximation (the view itself while they fit), and the
        sketch of u·v."""
        u, v = u.float(), v.float()
        self.u.zero_()
        self.v.zero_()
        self.sketch.zero_()
        k = u.shape[1]
        if self.growing and k > self.u.shape[1]:
            self._grow(min(self.rank, k))
        if k <= self.u.shape[1]:
            self.u[:, :k], self.v[:k], self.used = u, v, k
        else:
            self.used = self.rank
            self._truncate_with(u, v)  # the zero view adds nothing to the factorisation
        self.sketch.addmm_(u, v @ self.omega)
        self._publish()

    def state(self) -> Dict[str, torch.Tensor]:
        """The view and its sketch (all rows: gathered under FSDP2, a collective), CPU."""
        # copies: the view changes in place after this (never alias a state someone keeps)
        rows = lambda t: gather_rows(t, self.module.weight, self.full_out).to("cpu", copy=True)  # noqa: E731
        return {"u": rows(self.u), "v": self.v.to("cpu", copy=True), "sketch": rows(self.sketch),
                "used": torch.tensor(self.used)}

    def load(self, state: Dict[str, torch.Tensor]) -> None:
        weight = self.module.weight
        device = self.u.device
        own = lambda t: t.to(device=device, dtype=torch.float32, memory_format=torch.contiguous_format, copy=True)  # noqa: E731
        self.u = own(local_rows(state["u"], weight))
        self.v = own(state["v"])
        self.sketch = own(local_rows(state["sketch"], weight))
        self.used = int(state["used"])
        self._publish()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.u, self.v, self.sketch))


def deviation(gap_sq: float, total_sq: float) -> float:
    """sqrt(‖Y − L̃Ω‖² / ‖Y‖²) from the parts summed over ranks (0 for an empty state; NaN stays NaN)."""
    return math.sqrt(gap_sq / total_sq) if total_sq > 0 else (0.0 if total_sq == 0 else math.nan)
