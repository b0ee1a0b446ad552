"""Where merged rounds live until export, without being rounded away.

Folding a small rank-1 round into bf16 weights keeps only ~29% of it at relative size 1e-3
(design.md §2), and the loss compounds over rounds. So the merged state of each adapted module
is kept exactly, as

    S = W0 + L,    L = U·V  (factors, one rank-r block appended per merged round, stored in
                             bf16 where that is exact and in fp32 otherwise: see ledger.Ledger)

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

Memory cost (docs/how-it-works.md): ``base_device`` holds one copy of every adapted weight in its checkpoint
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
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn

from torchtune_xgb.distributed.sharding import all_sum, gather_rows, is_sharded, local, local_rows, rows_like
from torchtune_xgb.method.base_weights import W0Prefetch, base_copy
from torchtune_xgb.method.ledger import Ledger, storage_dtype
from torchtune_xgb.method.merge_stats import AppendedRounds, exact_fp32_matmuls, full_stats
from torchtune_xgb.quant.nf4 import dequantize, is_nf4


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
        self._ledgers: Dict[str, Ledger] = {}
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
                self._base[name] = base_copy(weight, base_device)
            self._ledgers[name] = Ledger(weight.shape[0], weight.shape[1], weight.device, module.weight.shape[0])

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
        rank), as stored (bf16 or fp32, see Ledger), or None once L is stored dense."""
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
        with exact_fp32_matmuls():
            factors = {name: self.modules[name].merge_factors(merge_rate) for name in names}
            todo = self._with_update(factors)
            prefetch = W0Prefetch(self._base, [n for n in todo if self._rederives_from_base(n)], self.modules)
            measured: Dict[str, torch.Tensor] = {}  # full-matrix stats (dense or in-place states)
            appended, appended_names = AppendedRounds(), []  # factored ledgers, measured together
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
                     appended: AppendedRounds) -> torch.Tensor:
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

    def _merge_module(self, name: str, u: torch.Tensor, v: torch.Tensor, appended: AppendedRounds,
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
            return full_stats(weight - before, u, v)
        if ledger.dense is not None:  # dense ledger: updated in place, so keep a copy to compare
            before = ledger.dense.clone()
            ledger.add(u, v, dtype)
            stats = full_stats(ledger.dense - before, u, v)
        else:
            old_u, old_v, k = ledger.u, ledger.v, ledger.u.shape[1]
            ledger.add(u, v, dtype)
            if ledger.dense is not None:  # this round turned the ledger dense
                stats = full_stats(ledger.dense - old_u.float() @ old_v.float(), u, v)
            elif ledger.u.shape[1] != k + u.shape[1] or (k and ledger.u.dtype != old_u.dtype):
                # not a plain append, or earlier rounds widened to fp32: compare the products, in
                # fp32 (an empty ledger taking the round's dtype is a plain append)
                stats = full_stats(ledger.matrix() - old_u.float() @ old_v.float(), u, v)
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
