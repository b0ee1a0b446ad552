"""Where merged rounds live until export, without being rounded away.

Folding a small rank-1 round into bf16 weights keeps only ~29% of it at relative size 1e-3
(design.md §2), and the loss compounds over rounds. So the merged state of each adapted module
is kept exactly, as

    S = W0 + L,    L = U·V  (factors, one rank-r block appended per merged round, stored in
                             bf16 where that is exact and in fp32 otherwise: see _Ledger)

where W0 is a copy of the weight as loaded (kept on ``base_device``, CPU by default: merges are
rare, so the copy only travels when its module is merged). The weight the forward pass uses is
re-derived as ``round(W0 + L)`` after each merge: it differs from S by exactly one rounding to
the training dtype, and rounding never accumulates across rounds.

Once a module's factors would take more memory than a dense matrix (k·(out+in) ≥ out·in), L is
stored as a dense fp32 matrix instead; both forms are exact up to fp32 arithmetic.

Under FSDP2 the state is sharded like the weights: W0 and U hold this rank's rows of the weight,
V is replicated (see sharding.py); only the resume state and the export gather rows.

When the weights are on a GPU and ``base_device`` is the CPU, W0 sits in pinned memory and is
copied back asynchronously, one module at a time, only for the modules a round merged.

Memory cost (README): ``base_device`` holds one copy of every adapted weight in its checkpoint
dtype (2 bytes/parameter in bf16); the factors take 2·k·(out+in) bytes per module after k
merged rank-1 updates of bf16 adapters (4·k·(out+in) in fp32), capped at 4·out·in bytes.

NF4 bases: re-quantizing after a merge destroys small updates (kept fraction −0.10 at relative
size 1e-2, design.md §2), so rounds are never folded into the NF4 tensor. The module's forward
adds the merged state as a frozen low-rank path instead (``merged_u``/``merged_v``, or
``merged_dense``; see adapters.merged_path), and W0 is the dequantized NF4 weight (the weights
training saw, ``merge_base="dequantized"``) or a CPU copy of the checkpoint's full-precision
weight (``merge_base="original"``). No copy of W0 is kept in the first case. Under FSDP2 the
NF4 weight, the ledger rows of U (or of dense L) and the original's copy are sharded alike; the
forward pass gathers the rows it needs (sharding.linear_frozen).
"""

import math
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from torchtune_xgb.quant.nf4 import dequantize, is_nf4
from torchtune_xgb.distributed.sharding import all_sum, gather_rows, is_sharded, local, local_rows, rows_like


@dataclass
class MergeReport:
    """What one merge did.

    kept_fraction: min over merged modules of 1 − ‖S_after − S_before − ΔW‖ / ‖ΔW‖, measured on
        the stored state S (1.0 = the whole update arrived). Modules whose update is exactly zero
        are skipped (nothing to keep); 1.0 if all were zero.
    seconds: wall time of the merge, including re-deriving the working weights.
    modules: number of modules whose non-zero update was merged.
    update_norm: Frobenius norm of all merged updates together.
    """

    kept_fraction: float
    seconds: float
    modules: int
    update_norm: float


class _Ledger:
    """Exact record L of one module's merged updates: factors U (out×k), V (k×in), or dense.

    Factors are stored in the narrowest dtype that holds them *exactly* (``add``'s ``dtype``):
    bf16 when the round's factors are bf16 adapter values scaled by a power of two (then the
    stored factors equal the fp32 ones bit for bit, at half the memory), else fp32. A ledger only
    ever widens (bf16 → fp32, exact). Products and sums of the factors are always formed in fp32
    (``float()``), never in the storage dtype; the kept fraction of every merge measures the stored
    factors, so a storage that lost anything would show there.
    """

    def __init__(self, out_dim: int, in_dim: int, device: torch.device, full_out: Optional[int] = None):
        self.u = torch.zeros(out_dim, 0, device=device)
        self.v = torch.zeros(0, in_dim, device=device)
        self.dense: Optional[torch.Tensor] = None
        self.full_out = out_dim if full_out is None else full_out  # all ranks' rows (FSDP2)

    @property
    def rank_bound(self) -> int:
        return self.u.shape[1] if self.dense is None else min(self.full_out, self.dense.shape[1])

    def matrix(self) -> torch.Tensor:
        return self.dense if self.dense is not None else self.u.float() @ self.v.float()

    def add(self, u: torch.Tensor, v: torch.Tensor, dtype: torch.dtype = torch.float32) -> None:
        """Append u·v (fp32 factors); ``dtype``: what they are stored in, one that holds them exactly."""
        if self.dense is not None:
            self.dense.addmm_(u.float(), v.float())
            return
        if self.u.shape[1] == 0:  # an empty ledger takes the round's factors in its storage dtype
            # (copies: v may be the adapter's own A, which the re-initialisation overwrites)
            self.u, self.v = u.to(dtype, copy=True), v.to(dtype, copy=True)
        else:
            if dtype != self.u.dtype:  # mixed rounds: widen to fp32 (exact), never narrow
                self.u, self.v = self.u.float(), self.v.float()
            self.u = torch.cat([self.u, u.to(self.u.dtype)], dim=1)
            self.v = torch.cat([self.v, v.to(self.v.dtype)], dim=0)
        out_dim, in_dim = self.full_out, self.v.shape[1]  # the same decision on every rank
        # dense once the factors hold as many bytes as a dense fp32 matrix would: bf16 factors
        # stay factored twice as many rounds as fp32 ones (switching earlier would double memory)
        if self.u.element_size() * self.u.shape[1] * (out_dim + in_dim) >= 4 * out_dim * in_dim:
            self.dense = self.u.float() @ self.v.float()
            self.u = self.u[:, :0]
            self.v = self.v[:0]

    def state(self) -> Dict[str, torch.Tensor]:
        if self.dense is not None:
            return {"dense": self.dense.cpu()}
        return {"u": self.u.cpu(), "v": self.v.cpu()}

    def load(self, state: Dict[str, torch.Tensor]) -> None:
        device = self.u.device
        if "dense" in state:
            self.dense = state["dense"].to(device=device, dtype=torch.float32)
        else:  # as saved: bf16 factors stay bf16 (exact), anything else becomes fp32
            dtype = torch.bfloat16 if state["u"].dtype == state["v"].dtype == torch.bfloat16 else torch.float32
            self.u = state["u"].to(device=device, dtype=dtype)
            self.v = state["v"].to(device=device, dtype=dtype)
            self.dense = None


def _base_copy(weight: torch.Tensor, base_device: str) -> torch.Tensor:
    """A copy of W0 on ``base_device``. A CPU copy of a GPU weight goes to pinned (page-locked)
    memory, so re-deriving the weight after a merge copies it back asynchronously at full PCIe
    speed (pageable memory is staged through a bounce buffer, at a fraction of it); if pinning
    fails (a locked-memory limit), the copy stays pageable, with a warning."""
    target = torch.device(base_device)
    if target.type != "cpu" or weight.device.type != "cuda":
        return weight.to(device=target, copy=True)
    try:
        copy = torch.empty(weight.shape, dtype=weight.dtype, pin_memory=True)
    except RuntimeError as err:  # pragma: no cover - depends on the host's limits
        warnings.warn(f"boost.base_device: cannot pin {weight.numel() * weight.element_size()} bytes ({err}); W0 stays pageable")
        return weight.to(device=target, copy=True)
    return copy.copy_(weight)


class _W0Prefetch:
    """Copies W0 of the next module to the GPU on a side stream while this one is re-derived.

    A merge with W0 in pinned CPU memory is bound by PCIe (2 bytes per parameter against ~20
    bytes of HBM traffic at ~100× the bandwidth), so the copy engine should never wait for the
    compute: module i+1's W0 is in flight while module i's GEMM runs. A no-op (``take`` returns
    None) unless W0 is pinned on the CPU and the weights are on a GPU.
    """

    def __init__(self, bases: Dict[str, torch.Tensor], names: List[str], modules: Dict[str, nn.Module]):
        self.bases, self.pending = bases, {}
        self.names = [n for n in names if bases[n].is_pinned() and local(modules[n].weight).is_cuda]
        if not self.names:
            return
        self.device = local(modules[self.names[0]].weight).device
        self.stream = torch.cuda.Stream(self.device)
        self.order = iter(self.names)
        self._issue()

    def _issue(self) -> None:
        name = next(self.order, None)
        if name is None:
            return
        with torch.cuda.stream(self.stream):
            copy = self.bases[name].to(self.device, non_blocking=True)
            self.pending[name] = (copy, self.stream.record_event())

    def take(self, name: str) -> Optional[torch.Tensor]:
        if name not in self.pending:
            return None
        self._issue()  # the next module's W0 travels while this one is used
        copy, ready = self.pending.pop(name)
        current = torch.cuda.current_stream(self.device)
        current.wait_event(ready)
        copy.record_stream(current)  # allocated on the side stream, freed after use on this one
        return copy


@contextmanager
def _exact_fp32_matmuls():
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


def _full_stats(arrived: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(‖u·v‖², ‖arrived − u·v‖², 0): the full-matrix measurement, for states stored densely."""
    lost = (arrived - u @ v).double().square().sum()
    return torch.stack([product_sq_norm(u, v), lost, torch.zeros_like(lost)])


def _stacked_fp64(tensors: List[torch.Tensor]) -> torch.Tensor:
    """``torch.stack(tensors)`` in fp64: one cast for the stack (ledgers of one shape may differ in
    storage dtype: those are widened to fp32 first, exactly)."""
    if len({t.dtype for t in tensors}) > 1:
        tensors = [t.float() for t in tensors]
    return torch.stack(tensors).double()


def storage_dtype(module: nn.Module, merge_rate: float) -> torch.dtype:
    """The dtype a module's merged factors are stored in: ``module.factor_dtype(merge_rate)`` where
    the adapter defines it (a dtype that holds ``merge_factors(merge_rate)`` exactly), else fp32."""
    exact = getattr(module, "factor_dtype", None)
    return exact(merge_rate) if exact is not None else torch.float32


@dataclass
class _Appended:
    """A round appended to a factored ledger: the ledger after the append, its rank k before, and
    the round's factors (what the residual and ‖ΔW‖² are measured from)."""

    ledger: "_Ledger"
    k: int
    u: torch.Tensor
    v: torch.Tensor


# Elements of earlier factors compared per foreach call. The factors before the append are held
# (and their differences materialised) only until their chunk is compared, so a merge's transient
# memory stays ~2·4·_COMPARE_CHUNK bytes beyond one module's ledger, while a round costs a few
# calls rather than several kernels per module.
_COMPARE_CHUNK = 1 << 22


class _AppendedRounds:
    """The rounds a merge appends to factored ledgers, measured together (:meth:`stats`).

    The stored state changed by L_after − L_before = U'·V' − U·V. When the first k factors are
    the old ones (``changed``, the largest difference of an earlier factor, is 0), that is exactly
    u'·v' for the appended factors (u', v'), and the residual u'·v' − u·v = (u' − u)·v' + u·(v' − v)
    is a product of two rank-2r factors whose entries scale with the error: no cancellation of
    large terms, so a lossless append measures exactly 0 and a lossy one its true loss.

    Batched: the norms by one stacked Gram product per module shape, the comparison of earlier
    factors by foreach calls over chunks of modules, instead of ~30 kernels per module.
    """

    def __init__(self):
        self.records: List[_Appended] = []
        self._pending: List[Tuple[int, torch.Tensor, torch.Tensor]] = []  # (record, now, before)
        self._pending_size = 0
        self._changed: List[Tuple[int, torch.Tensor]] = []

    def add(self, ledger: "_Ledger", old_u: torch.Tensor, old_v: torch.Tensor, k: int, u: torch.Tensor, v: torch.Tensor) -> None:
        index = len(self.records)
        self.records.append(_Appended(ledger, k, u, v))
        for now, before in ((ledger.u[:, :k], old_u), (ledger.v[:k], old_v)):
            if now.numel():  # FSDP2: a rank may hold no rows of u; k = 0: nothing earlier
                self._pending.append((index, now, before))
                self._pending_size += now.numel()
        if self._pending_size >= _COMPARE_CHUNK:
            self._compare()

    def _compare(self) -> None:
        """The largest |difference| of each pending earlier factor, then the old factors are dropped."""
        if not self._pending:
            return
        diffs = torch._foreach_sub([now for _, now, _ in self._pending], [before for _, _, before in self._pending])
        norms = torch._foreach_norm(diffs, ord=math.inf)
        self._changed += [(index, norm) for (index, _, _), norm in zip(self._pending, norms)]
        self._pending, self._pending_size = [], 0

    def stats(self) -> torch.Tensor:
        """(‖u·v‖², ‖residual‖², changed) of each appended round, one row each (``changed``: the
        largest |difference| of an earlier factor; NaN where one was NaN)."""
        self._compare()
        records = self.records
        update_sq = product_sq_norms([(r.u, r.v) for r in records])

        def residual_sq(members: List[int]) -> torch.Tensor:
            group = [records[i] for i in members]
            # fp64 before subtracting: the stored factors may be bf16, the round's are fp32
            new_u = _stacked_fp64([r.ledger.u[:, r.k:] for r in group])
            new_v = _stacked_fp64([r.ledger.v[r.k:] for r in group])
            u, v = _stacked_fp64([r.u for r in group]), _stacked_fp64([r.v for r in group])
            return _stacked_sq_norms(torch.cat([new_u - u, u], dim=2), torch.cat([new_v, new_v - v], dim=1))

        residual = _grouped(len(records), lambda i: _shape_key(records[i].u, records[i].v), residual_sq)
        changed = torch.zeros_like(residual)
        if self._changed:
            index = torch.tensor([i for i, _ in self._changed], device=changed.device)
            changed.index_add_(0, index, torch.stack([norm for _, norm in self._changed]).to(changed))
        return torch.stack([update_sq, residual, changed], dim=1)


class MergedState:
    """Exact merged state S = W0 + L for every adapted module.

    bf16 (any non-fp32) weights: W0 copied to ``base_device``, L in the ledger, weight =
    round(W0 + L). fp32 weights: S is the weight itself (merged in place, no copy of W0), the
    ledger records L for resume. NF4 weights: see the module docstring.

    Args:
        modules: the adapted modules by name (their weights must already hold the loaded base).
        base_device: where the copy of W0 lives ("cpu" keeps it off the accelerator).

    The object owns the working weights of these modules: after :meth:`merge_round` or
    :meth:`load_state_dict` each ``module.weight`` equals ``round(W0 + L)``.
    """

    def __init__(
        self,
        modules: Dict[str, nn.Module],
        base_device: str = "cpu",
        originals: Optional[Dict[str, torch.Tensor]] = None,
    ):
        """``originals``: full-precision weights by module name, used as W0 of NF4 modules
        (``merge_base="original"``); without one, an NF4 module's W0 is its dequantized weight."""
        self.modules = modules
        self._base: Dict[str, torch.Tensor] = {}
        self._ledgers: Dict[str, _Ledger] = {}
        # fp32 weights are their own exact state: an fp32 merge keeps ~all of even a 1e-4 update
        # (24-bit mantissa), so they are merged in place and need no copy of W0
        self._in_place = set()
        for name, module in modules.items():
            weight = local(module.weight.detach())  # FSDP2: this rank's rows
            if is_nf4(weight):
                if originals is not None:  # full-size checkpoint weights: keep this rank's rows
                    rows = local_rows(originals[name].detach(), module.weight)
                    # taken over, not copied (the caller's dict is dropped); a slice of rows would
                    # keep the whole tensor alive, so a shard is cloned
                    sharded = rows.numel() != originals[name].numel()
                    self._base[name] = rows.to(device=base_device, copy=sharded)
            elif weight.dtype == torch.float32:
                self._in_place.add(name)
            else:
                self._base[name] = _base_copy(weight, base_device)
            self._ledgers[name] = _Ledger(weight.shape[0], weight.shape[1], weight.device, module.weight.shape[0])

    # --- reading the state -------------------------------------------------------------
    def base_weight(self, name: str) -> torch.Tensor:
        """W0 of module ``name`` in fp32 on the module's device."""
        module = self.modules[name]
        if name in self._in_place:
            return local(module.weight.detach()) - self.delta(name)
        base = self._base.get(name)
        if base is None:  # NF4, merge base "dequantized": the weights training saw
            base = dequantize(local(module.weight))
        return base.to(device=local(module.weight).device, dtype=torch.float32)

    def delta(self, name: str) -> torch.Tensor:
        """L = S − W0 of module ``name`` (fp32)."""
        return self._ledgers[name].matrix()

    def merged_weight(self, name: str) -> torch.Tensor:
        """S = W0 + L of module ``name`` (fp32; a new tensor the caller may change)."""
        if name in self._in_place:
            return local(self.modules[name].weight.detach()).clone()
        return self.base_weight(name) + self.delta(name)

    def export_weight(self, name: str, dtype: torch.dtype, live: Optional[torch.Tensor] = None) -> torch.Tensor:
        """round(S + live) in ``dtype`` (this rank's rows), for export; read-only.

        ``live`` is an fp32 update not merged yet (a partial round). Without one, the working
        weight already *is* round(S) (fp32: S itself; bf16: re-derived from S after every merge),
        so it is returned without a copy: exporting costs no second copy of the model. Otherwise
        (NF4, a live update, another dtype) S is summed in fp32 for this module only and cast once.
        """
        weight = local(self.modules[name].weight.detach())
        if live is None and not is_nf4(weight) and weight.dtype == dtype:
            return weight
        merged = self.merged_weight(name)
        if live is not None:
            merged += live
        return merged.to(dtype)

    def ledger_rank(self, name: str) -> int:
        """Number of stored rank-1 factors (upper bound on rank(L))."""
        return self._ledgers[name].rank_bound

    def nbytes(self) -> int:
        """Memory the merged state holds (this rank): the ledgers plus any copies of W0."""
        tensors = list(self._base.values())
        for led in self._ledgers.values():
            tensors += [led.u, led.v] + ([led.dense] if led.dense is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def gathered_factors(self, name: str) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """(U, V) with L = U·V and all rows of U (FSDP2: gathered, a collective: call on every
        rank), as stored (bf16 or fp32, see _Ledger), or None once L is stored dense."""
        ledger = self._ledgers[name]
        if ledger.dense is not None:
            return None
        return gather_rows(ledger.u, self.modules[name].weight, ledger.full_out), ledger.v

    def touched_modules(self) -> Iterable[str]:
        """Names of modules whose state differs from W0."""
        return [n for n, led in self._ledgers.items() if led.rank_bound > 0]

    # --- changing the state ------------------------------------------------------------
    @torch.no_grad()
    def merge_round(self, names: Iterable[str], merge_rate: float = 1.0) -> MergeReport:
        """Fold ``merge_rate · delta_weight()`` of each named adapter module into its state.

        Modules provide ``merge_factors(rate) -> (u, v)`` with ``u·v = rate·delta_weight()``
        (XGBLoRALinear, LoRAXSLinear). A module whose ``u`` is zero on every rank has nothing to
        merge and is skipped (its update u·v is exactly zero).

        The adapters themselves are left as they are (the caller re-initialises them). Returns a
        :class:`MergeReport` whose ``kept_fraction`` is measured on the stored state.

        Cost (why it is built this way, see benchmarks/merge_cost.py): the per-module numbers are
        computed on the module's device and read back once for the whole round, so a round
        synchronises with the host twice (which modules have an update; the report), not once
        per module. Where the state is factored (bf16 and NF4 bases until a ledger turns dense)
        ‖ΔW‖ and the residual come from r×r Gram matrices, exactly, with no out×in matrix; the
        only full-size work left is re-deriving a bf16 working weight: one GEMM ``W0 + U·V``
        into the fp32 upcast of W0 (copied asynchronously from pinned memory when W0 lives on
        the CPU and the weights on a GPU) and one cast into the weight.
        """
        start = time.perf_counter()
        with _exact_fp32_matmuls():
            factors = {name: self.modules[name].merge_factors(merge_rate) for name in names}
            todo = self._with_update(factors)
            prefetch = _W0Prefetch(self._base, [n for n in todo if self._rederives_from_base(n)], self.modules)
            measured: Dict[str, torch.Tensor] = {}  # full-matrix stats (dense or in-place states)
            appended, appended_names = _AppendedRounds(), []  # factored ledgers, measured together
            for name in todo:
                stats = self._merge_module(name, *factors.pop(name), appended, w0=prefetch.take(name),
                                           merge_rate=merge_rate)
                if stats is None:
                    appended_names.append(name)
                else:
                    measured[name] = stats
            # one read-back for the whole round (waits for every queued re-derivation too)
            numbers = self._round_stats(todo, measured, appended_names, appended).tolist() if todo else []
        kept, merged, sq_norm = 1.0, 0, 0.0
        for name, (update_sq, lost_sq, changed) in zip(todo, numbers):
            if changed:
                raise RuntimeError(
                    f"merged state of {name}: the ledger changed earlier rounds' factors while appending "
                    "one round; the kept fraction cannot be measured (internal error)"
                )
            sq_norm += update_sq
            if update_sq == 0:
                continue  # u ≠ 0 but u·v = 0: nothing to keep
            merged += 1
            if not math.isfinite(update_sq) or not math.isfinite(lost_sq):
                kept = math.nan
            elif not math.isnan(kept):
                kept = min(kept, 1.0 - math.sqrt(lost_sq) / math.sqrt(update_sq))
        return MergeReport(kept, time.perf_counter() - start, merged, math.sqrt(sq_norm))

    def _with_update(self, factors: Dict[str, Tuple[torch.Tensor, torch.Tensor]]) -> List[str]:
        """Names whose u is non-zero on some rank: the largest |u| of every module in one foreach
        call (NaN counts as non-zero, as in torch.any), one read-back."""
        names = list(factors)
        if not names:
            return []
        first = self.modules[names[0]].weight
        device = local(first).device
        held = [i for i, n in enumerate(names) if factors[n][0].numel()]  # FSDP2: a rank may hold no rows
        flags = torch.zeros(len(names), dtype=torch.int32, device=device)
        if held:
            largest = torch.stack([m.to(device) for m in torch._foreach_norm([factors[names[i]][0] for i in held], ord=math.inf)])
            flags[torch.tensor(held, device=device)] = (largest != 0).to(torch.int32)
        if is_sharded(first):  # rows of u are sharded: every rank must agree (all modules share the mesh)
            flags = all_sum(flags, first)
        return [n for n, flag in zip(names, flags.tolist()) if flag]

    def _round_stats(self, todo: List[str], measured: Dict[str, torch.Tensor], appended_names: List[str],
                     appended: _AppendedRounds) -> torch.Tensor:
        """(len(todo) × 3) per-module (‖ΔW‖², ‖residual‖², changed) in ``todo``'s order, summed
        over shards under FSDP2 (the squares are sums over rows of u; v is replicated)."""
        first = self.modules[todo[0]].weight
        device = local(first).device
        parts, order = [], []
        if measured:
            parts.append(torch.stack([stats.to(device) for stats in measured.values()]))
            order += list(measured)
        if appended_names:
            parts.append(appended.stats().to(device))
            order += appended_names
        stacked = torch.cat(parts) if len(parts) > 1 else parts[0]
        if order != todo:
            position = {name: i for i, name in enumerate(todo)}
            index = torch.tensor([position[name] for name in order], device=device)
            stacked = torch.empty_like(stacked).index_copy_(0, index, stacked)
        return all_sum(stacked, first) if is_sharded(first) else stacked

    def _rederives_from_base(self, name: str) -> bool:
        return name in self._base and name not in self._in_place and not is_nf4(local(self.modules[name].weight))

    def _merge_module(self, name: str, u: torch.Tensor, v: torch.Tensor, appended: _AppendedRounds,
                      w0: Optional[torch.Tensor] = None, merge_rate: float = 1.0) -> Optional[torch.Tensor]:
        """Add u·v to one module's state; return its (‖u·v‖², ‖residual‖², changed) on its device
        (this rank's part of the squares under FSDP2: rows of u are sharded, v is replicated), or
        None for a round appended to a factored ledger (handed to ``appended``, measured later)."""
        module = self.modules[name]
        ledger = self._ledgers[name]
        dtype = storage_dtype(module, merge_rate)
        if name in self._in_place:
            # the fp32 weight is the state: what arrived is the difference of two full matrices
            weight = local(module.weight.data)
            before = weight.clone()
            weight.addmm_(u, v)
            ledger.add(u, v, dtype)
            return _full_stats(weight - before, u, v)
        if ledger.dense is not None:  # dense ledger: updated in place, so keep a copy to compare
            before = ledger.dense.clone()
            ledger.add(u, v, dtype)
            stats = _full_stats(ledger.dense - before, u, v)
        else:
            old_u, old_v, k = ledger.u, ledger.v, ledger.u.shape[1]
            ledger.add(u, v, dtype)
            if ledger.dense is not None:  # this round turned the ledger dense
                stats = _full_stats(ledger.dense - old_u.float() @ old_v.float(), u, v)
            elif ledger.u.shape[1] != k + u.shape[1] or (k and ledger.u.dtype != old_u.dtype):
                # not a plain append, or earlier rounds widened to fp32: compare the products, in
                # fp32 (an empty ledger taking the round's dtype is a plain append)
                stats = _full_stats(ledger.matrix() - old_u.float() @ old_v.float(), u, v)
            else:
                appended.add(ledger, old_u, old_v, k, u, v)
                stats = None
        self._rederive(name, w0)
        return stats

    def _rederive(self, name: str, w0: Optional[torch.Tensor] = None) -> None:
        """Make the working weight round(W0 + L) again (``w0``: W0 already on the weight's device)."""
        module = self.modules[name]
        if is_nf4(local(module.weight)):
            # never into the NF4 tensor: hand the forward pass the merged state itself (FSDP2: the
            # rows of U or L stay sharded like the weight; adapters.merged_path gathers them).
            # References to the ledger, not copies: merged_path widens bf16 factors per call.
            ledger = self._ledgers[name]
            sharded = lambda rows: rows_like(rows, module.weight, ledger.full_out)  # noqa: E731
            if ledger.dense is not None:
                module.merged_u = module.merged_v = None
                module.merged_dense = sharded(ledger.dense)
            else:
                module.merged_dense = None
                module.merged_u, module.merged_v = sharded(ledger.u), ledger.v
            return
        weight = local(module.weight.data)
        if name in self._in_place:  # only after a resume: the weight is the freshly loaded W0
            weight.add_(self.delta(name))
            return
        # one rounding from the exact state, never from the previous working weight: the fp32
        # upcast of W0 (asynchronous from pinned memory) takes U·V in one GEMM, then one cast
        if w0 is None:
            w0 = self._base[name].to(weight.device, non_blocking=True)
        exact = w0.to(torch.float32)
        ledger = self._ledgers[name]
        if ledger.dense is not None:
            exact.add_(ledger.dense)
        elif ledger.u.shape[1]:
            exact.addmm_(ledger.u.float(), ledger.v.float())
        weight.copy_(exact)

    # --- checkpointing -----------------------------------------------------------------
    def state_dict(self) -> Dict[str, Dict[str, torch.Tensor]]:
        """The ledgers (not W0: resume reloads the original base checkpoint).

        Under FSDP2 the rows of U (or of a dense L) are gathered (a collective: call on every
        rank), so the saved state has the single-device layout whatever the world size.
        """
        out = {}
        for name, led in self._ledgers.items():
            if led.rank_bound > 0:
                weight = self.modules[name].weight
                out[name] = {k: (v if k == "v" else gather_rows(v, weight, led.full_out).cpu()) for k, v in led.state().items()}
        return out

    def load_state_dict(self, state: Dict[str, Dict[str, torch.Tensor]]) -> None:
        """Restore ledgers saved by :meth:`state_dict` and re-derive the working weights."""
        unknown = set(state) - set(self._ledgers)
        if unknown:
            raise ValueError(f"merged state has modules the model lacks: {sorted(unknown)[:3]}")
        for name, ledger_state in state.items():
            weight = self.modules[name].weight
            self._ledgers[name].load({k: (v if k == "v" else local_rows(v, weight)) for k, v in ledger_state.items()})
            self._rederive(name)
