"""What the forward pass sees of the merged rounds: one training view per kind of base weight.

The exact merged state S = W0 + L lives in the ledgers (method/ledger.py, on ``base_device``);
the forward pass needs a view of it whose cost per step and per merge does not grow with the
number of rounds k. Every view is updated from what the ledger stored (``Ledger.last_added``),
so it never holds anything the exact state does not.

- fp32 weights (:func:`add_in_place`): the weight is S itself, W += u·v (a 24-bit mantissa keeps
  even a 1e-4 round), as before.
- bf16 (any non-fp32 dense) weights (:class:`CompensatedView`): the working weight is
  hi = round(S̃) and lo = S̃ − hi is kept on ``base_device`` as int16 codes in units of 2⁻¹⁶ of
  hi's step. Each merge rounds once, in fp32, the small sum lo + u·v (at most half a bf16 step
  plus the round), never anything of the size of W, then codes the new lo (an error of ≤ 2⁻¹⁷ of
  a step, ≤ 2⁻²⁴·|W|: an fp32 master weight's precision). So the working weight is one rounding of
  S̃, bf16 rounding never accumulates, and what S̃ leaves out of S is measured at every merge
  (``view_deviation``, sketched as for NF4). A merge costs O(out·in) per module whatever k: the
  codes travel to the GPU and back (2 bytes per parameter each way, asynchronously from pinned
  memory, the bytes W0 took one way when the weight was re-derived as round(W0 + U·V) from the
  whole ledger, a GEMM of rank k per merge); hi is the weight. An fp32 lo (4 bytes each way, a
  few 2⁻²⁴ of the rounds' own size) modelled at twice the merge time of an 8B model on an H200.
- NF4 weights (:class:`LowRankView`): the 4-bit weight cannot take the rounds (re-quantizing
  destroys them, design.md §2) and an exact view beside it grows with k, so the forward pass adds
  a view of rank at most R (``boost.nf4_view_rank``): exact while the rounds fit (k·r ≤ R), then
  the best rank-R approximation of (view + new round), kept by a QR of each side and an SVD of
  the small core, O((out+in)·R²) per merge (a merge truncates all its full views together: QRs
  batched per module shape, the cores SVD'd in one host call, :func:`truncate_many`). What it
  leaves out is measured every merge (a sketch, :class:`LowRankView`), logged as
  ``view_deviation``; the ledger stays exact for export and resume.
"""

import math
from typing import Dict, List, Optional, Sequence, Tuple

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


# lo is held as int16 codes in a fixed unit per row: 2⁻¹⁵ of the bf16 step at twice the row's
# largest |W0| (rows are this rank's under FSDP2). |lo| ≤ half the step at its own entry (+ 2⁻¹⁶
# of one, fp32 rounding), so |code| ≤ 2¹⁴ while the row's weights stay below twice their largest
# start (2¹⁵ − 1 clamps beyond 4×; a clamp shows in the deviation). A code rounds lo to half a unit,
# ≤ 2⁻²²·max|W0 row| per round: every entry's error is of the size of an fp32 master weight's
# rounding of the row's largest entries, never relative to the entry's own size.
CODE_UNIT_BITS = 15
_CODE_LIMIT = 2**15 - 1


def code_units(weight: torch.Tensor) -> torch.Tensor:
    """Per row of ``weight`` (a bf16 or other non-fp32 dense weight holding W0), the fp32 value of
    one code unit: 2⁻¹⁵ of the dtype's step at 2·max|row| (a power of two; one kernel per reduction,
    no out×in temporary). A row far smaller than the matrix (all zeros, say) counts as 2⁻⁸ of the
    matrix's largest |W0|, so its rounds stay codable."""
    mantissa_bits = round(-math.log2(torch.finfo(weight.dtype).eps))  # bf16: 7, fp16: 10
    largest = torch.linalg.vector_norm(weight, ord=math.inf, dim=1, dtype=torch.float32)
    floor = (largest.max() if largest.numel() else largest.new_zeros(())) * 2**-8
    largest = torch.maximum(largest, floor.clamp(min=2**-100))  # an all-zero matrix: finite units
    exponent = torch.frexp(2 * largest).exponent  # 2·max in [2^(x−1), 2^x)
    return torch.ldexp(torch.ones_like(largest), exponent - (1 + mantissa_bits + CODE_UNIT_BITS)).unsqueeze(1)


@torch.no_grad()
def compensated_add(weight: torch.Tensor, code: torch.Tensor, unit: torch.Tensor, u: torch.Tensor,
                    v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """hi + lo += u·v for a bf16 (any non-fp32) ``weight`` (hi, changed in place) and its
    remainder's ``code`` (int16, on the weight's device; ``unit``: :func:`code_units`). Returns (the
    new code, what coding the new lo left out in units: out×in fp32, for the deviation sketch).

    t = lo + u·v is small (≤ half a step of hi plus the round), so its fp32 rounding is ~2⁻²⁴·|t|;
    hi' = round(hi + t); hi − hi' is exact in fp32 (two nearby values of the weight's dtype); lo' =
    (hi − hi') + t rounds relative to |lo'| again; its code rounds to half a unit. Nothing is ever
    rounded relative to |W| in fp32. Twelve out×in passes, O(out·in) whatever the rounds.
    """
    t = torch.mul(code, unit).addmm_(u, v)
    hi = weight.float()
    weight.copy_(hi + t)
    return _coded(t.add_(hi.sub_(weight)), unit)


def _coded(lo: torch.Tensor, unit: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(int16 code of fp32 ``lo``, what it leaves out in units), ``lo`` consumed."""
    scaled = lo.div_(unit)  # a power of two: exact
    rounded = scaled.round().clamp_(-_CODE_LIMIT, _CODE_LIMIT)
    return rounded.to(torch.int16), scaled.sub_(rounded)


@torch.no_grad()
def compensated_split(weight: torch.Tensor, delta: torch.Tensor, unit: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Make ``weight`` (holding W0) hi = round(W0 + delta); return the code of lo = (W0 − hi) +
    delta and what it leaves out in units (``delta`` consumed)."""
    hi = weight.float()
    weight.copy_(hi + delta)
    return _coded(delta.add_(hi.sub_(weight)), unit)


class CompensatedView:
    """hi/lo views of bf16 (any non-fp32 dense) modules, and what they leave out.

    ``codes[name]``: lo as int16 codes (this rank's rows, on ``base_device``: pinned when the
    weights are on a GPU, so a merge moves 2 bytes per parameter each way, asynchronously);
    ``units[name]``: each row's code unit, fixed from W0 when the view is made (a resume makes the
    same ones from the same W0). lo starts at 0 (the loaded weight is W0 exactly).

    Deviation: S̃ = hi + lo differs from the exact S by the sum D of what each coding left out.
    Two sketches on the weight's device, D·Ω (``left_out_sketch``) and L·Ω (``rounds_sketch``) (Ω: the fixed in×16 Gaussian of
    :func:`_sketch_matrix`), are updated at every merge, and ‖D·Ω‖ / ‖L·Ω‖ estimates ‖S̃ − S‖_F /
    ‖L‖_F, the relative part of the merged rounds the forward pass does not see, as for the NF4
    view: 2·out·in·16 FLOPs per module and merge, whatever the number of rounds.
    """

    def __init__(self, weights: Dict[str, torch.Tensor], base_device: str):
        from torchtune_xgb.method.base_weights import host_empty

        pin = lambda w: torch.device(base_device).type == "cpu" and w.device.type == "cuda"  # noqa: E731
        self.codes = {name: host_empty(w.shape, torch.int16, base_device, pin(w)).zero_() for name, w in weights.items()}
        self.units = {name: code_units(w) for name, w in weights.items()}
        self.left_out_sketch = {name: torch.zeros(w.shape[0], SKETCH_COLUMNS, device=w.device) for name, w in weights.items()}
        self.rounds_sketch = {name: torch.zeros(w.shape[0], SKETCH_COLUMNS, device=w.device) for name, w in weights.items()}
        self._omegas: Dict[Tuple[int, str], torch.Tensor] = {}

    def _omega(self, in_dim: int, device: torch.device) -> torch.Tensor:
        key = (in_dim, str(device))
        if key not in self._omegas:
            self._omegas[key] = _sketch_matrix(in_dim, device)
        return self._omegas[key]

    def add(self, name: str, weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor,
            code_on_device: Optional[torch.Tensor] = None) -> torch.Tensor:
        """hi + lo += u·v (u, v fp32 on the weight's device); ``code_on_device``: the code already
        copied there (prefetched). Returns this rank's (‖D·Ω‖², ‖L·Ω‖²) after the round."""
        held, unit = self.codes[name], self.units[name]
        code = code_on_device if code_on_device is not None else held.to(weight.device, non_blocking=True)
        new_code, left_out = compensated_add(weight, code, unit, u, v)
        held.copy_(new_code, non_blocking=True)  # back to pinned host memory, asynchronously
        omega = self._omega(weight.shape[1], weight.device)
        self.left_out_sketch[name].add_((left_out @ omega).mul_(unit))
        self.rounds_sketch[name].addmm_(u, v @ omega)
        return self.deviation_parts(name)

    def deviation_parts(self, name: str) -> torch.Tensor:
        return torch.stack([self.left_out_sketch[name], self.rounds_sketch[name]]).double().square().sum(dim=(1, 2))

    def rebuild(self, name: str, weight: torch.Tensor, delta: torch.Tensor) -> None:
        """After a resume: ``weight`` holds W0, ``delta`` = L (fp32, on the weight's device,
        consumed). What the resumed view leaves out is the rebuild's one coding."""
        omega, unit = self._omega(weight.shape[1], weight.device), self.units[name]
        self.rounds_sketch[name] = delta @ omega
        code, left_out = compensated_split(weight, delta, unit)
        self.codes[name].copy_(code)
        self.left_out_sketch[name] = (left_out @ omega).mul_(unit)

    def remainder(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """lo (fp32, on the weight's device) as the codes hold it."""
        return torch.mul(self.codes[name].to(weight.device), self.units[name])

    def merged_weight(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """S̃ = hi + lo, rounded once to fp32 (summed in fp64)."""
        return (weight.double() + self.remainder(name, weight).double()).float()

    def nbytes(self) -> int:
        tensors = [*self.codes.values(), *self.units.values(), *self.left_out_sketch.values(), *self.rounds_sketch.values()]
        return sum(t.numel() * t.element_size() for t in tensors)


def truncate(u: torch.Tensor, v: torch.Tensor, rank: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` approximation of u·v (u out×m, v m×in) by a QR of each side and an SVD
    of the m×m core, in fp64: (u', v', discarded ‖·‖²) with √σ on each side, fp32. Never forms u·v."""
    return truncate_many([(u, v)], rank)[0]


def truncate_many(pairs: Sequence[Tuple[torch.Tensor, torch.Tensor]], rank: int) -> List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """:func:`truncate` of every (u, v) in ``pairs`` (each pair's own product, in order). The QRs
    run batched over the pairs of one shape, on their device; the small cores (≤ m×m) of one
    shape go to the host in one copy and are SVD'd there in one batched call, then back: a wait
    for the device per core shape (one, as a rule), where an SVD per module on a GPU waits for it
    each time (and a host LAPACK answers the same on every device and rank). A merge truncates
    all its NF4 views with one call (merged_state via :func:`finish_truncations`)."""
    groups: Dict[Tuple, List[int]] = {}
    for i, (u, v) in enumerate(pairs):
        groups.setdefault((tuple(u.shape), tuple(v.shape), u.device), []).append(i)
    sides = []  # per group: (indices, qu, qv, core)
    for indices in groups.values():
        qu, ru = torch.linalg.qr(torch.stack([pairs[i][0] for i in indices]).double())
        qv, rv = torch.linalg.qr(torch.stack([pairs[i][1] for i in indices]).double().transpose(-2, -1))
        sides.append((indices, qu, qv, ru @ rv.transpose(-2, -1)))
    by_size: Dict[Tuple, List[int]] = {}  # cores of one shape (and device) SVD'd together, whatever their group
    for g, side in enumerate(sides):
        by_size.setdefault((tuple(side[3].shape[-2:]), side[3].device), []).append(g)
    results: List[Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = [None] * len(pairs)
    for members in by_size.values():
        cores = torch.cat([sides[g][3] for g in members]).cpu()  # one copy back, one wait
        w, s, zt = torch.linalg.svd(cores)
        first = 0
        for g in members:
            indices, qu, qv, core = sides[g]
            count = len(indices)
            gw, gs, gzt = (t[first : first + count].to(core.device) for t in (w, s, zt))
            first += count
            root = gs[:, :rank].sqrt()
            new_u = (qu @ (gw[:, :, :rank] * root[:, None, :])).float()
            new_v = ((root[:, :, None] * gzt[:, :rank]) @ qv.transpose(-2, -1)).float()
            lost = gs[:, rank:].square().sum(dim=1)
            for j, i in enumerate(indices):
                results[i] = (new_u[j], new_v[j], lost[j])
    return results  # type: ignore[return-value]


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
        self.pending: Optional[Tuple[torch.Tensor, torch.Tensor]] = None  # (view + round) to truncate
        self._publish()

    def _publish(self) -> None:
        self.module.merged_u = rows_like(self.u, self.module.weight, self.full_out)
        self.module.merged_v = self.v

    @torch.no_grad()
    def add(self, u: torch.Tensor, v: torch.Tensor, defer: bool = False) -> Optional[torch.Tensor]:
        """Add the round u·v (fp32; this rank's rows of u; as the ledger stored them); return this
        rank's (‖Y − L̃Ω‖², ‖Y‖²) after it. ``defer``: a view that must truncate (and is not
        sharded) only records view + round in ``pending`` and returns None; :func:`finish_truncations`
        then truncates every such view of the merge together and returns their parts."""
        r = u.shape[1]
        if self.growing and self.used + r > self.u.shape[1] and self.used < self.rank:
            self._grow(min(self.rank, max(2 * self.u.shape[1], self.used + r)))
        self.sketch.addmm_(u, v @ self.omega)  # the exact rounds' sketch: whatever the view keeps
        if self.used + r <= self.u.shape[1]:
            self.u[:, self.used : self.used + r] = u
            self.v[self.used : self.used + r] = v
            self.used += r
        elif defer and not is_sharded(self.module.weight):
            self.pending = (torch.cat([self.u, u], dim=1), torch.cat([self.v, v], dim=0))
            return None
        else:
            self._truncate_with(u, v)
        self._publish()
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


@torch.no_grad()
def finish_truncations(views: Dict[str, "LowRankView"]) -> Dict[str, torch.Tensor]:
    """Truncate every view with a ``pending`` round (``LowRankView.add(defer=True)``) with one
    :func:`truncate_many` call per view rank; their (‖Y − L̃Ω‖², ‖Y‖²) by name."""
    waiting: Dict[int, List[str]] = {}
    for name, view in views.items():
        if view.pending is not None:
            waiting.setdefault(view.rank, []).append(name)
    parts = {}
    for rank, names in waiting.items():
        for name, (new_u, new_v, _) in zip(names, truncate_many([views[n].pending for n in names], rank)):
            view = views[name]
            view.u, view.v, view.pending = new_u, new_v, None
            view._publish()
            parts[name] = view.deviation_parts()
    return parts


def deviation(gap_sq: float, total_sq: float) -> float:
    """sqrt(‖Y − L̃Ω‖² / ‖Y‖²) from the parts summed over ranks (0 for an empty state; NaN stays NaN)."""
    return math.sqrt(gap_sq / total_sq) if total_sq > 0 else (0.0 if total_sq == 0 else math.nan)
