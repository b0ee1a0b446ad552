"""Where merged rounds live until export, without being rounded away, at a cost that does not
grow with the number of rounds.

Folding a small rank-1 round into bf16 weights keeps only ~29% of it at relative size 1e-3
(design.md §2), and the loss compounds over rounds. So the merged state of each adapted module
is kept exactly, as

    S = W0 + L,    L = U·V  (factors, one rank-r block appended per merged round, stored in
                             bf16 where that is exact and in fp32 otherwise: see ledger.Ledger)

The ledgers live on ``base_device`` (the CPU by default), append-only: a merge copies the new
round's factors there (asynchronously from a GPU) and never touches the earlier ones, so nothing
of them grows on the accelerator and a merge costs the same at round 1,000 as at round 1. Once a
module's factors would take more memory than a dense matrix (k·(out+in) ≥ out·in), L is stored
as a dense fp32 matrix plus the rounds since the last segment boundary as factors, folded into
the matrix at each boundary; both forms are exact up to fp32 arithmetic. The ledgers are what
the export folds and what a resume reloads.

The forward pass uses a training view of S per base (method/views.py), updated from what the
ledger stored, in O(out·in) (fp32, bf16) or O((out+in)·R²) (NF4) per module and merge:

- fp32 weights: the weight is S (merged in place);
- bf16 (any non-fp32) weights: the weight is round(S̃) and lo = S̃ − weight (held as int16 codes
  of 2⁻¹⁶ of the weight's step, on ``base_device``) carries what the rounding left out; S̃ equals S
  up to one coding per round (≤ 2⁻²⁴·|W|, an fp32 master weight's precision, never accumulated by
  rounding the weight itself), so the weight is one rounding of S̃ and bf16 rounding never
  accumulates across rounds; what S̃ leaves out of S is measured every merge (``view_deviation``);
- NF4 weights: re-quantizing after a merge destroys small updates (kept fraction −0.10 at relative
  size 1e-2, design.md §2), so rounds are never folded into the NF4 tensor; the forward adds a
  view of rank ≤ ``nf4_view_rank`` beside it (``merged_u``/``merged_v``; see xgblora.merged_path),
  exact while the rounds fit and the best rank-R approximation after, with its deviation from
  the exact rounds measured every merge (``view_deviation``). W0 is the dequantized NF4 weight
  (the weights training saw, ``merge_base="dequantized"``) or a CPU copy of the checkpoint's
  full-precision weight (``merge_base="original"``).

Under FSDP2 the state is sharded like the weights: W0, lo, U and the view's left factor hold this
rank's rows of the weight, V is replicated (see sharding.py); only the resume state and the
export gather rows.

Resume checkpoints stay bounded: every ``segment_rounds`` rounds the factors merged since the
previous boundary form a sealed segment, written once to its own file by the next checkpoint
(run/ledger_segments.py); each checkpoint holds only the rounds since the last boundary.

Memory cost (docs/how-it-works.md): ``base_device`` holds the ledgers (2·k·(out+in) bytes per module after k
merged rank-1 updates of bf16 adapters, 4·k·(out+in) in fp32, capped at 4·out·in), lo's codes of every
bf16 module (2 bytes/parameter), NF4 ``merge_base="original"`` copies (2 bytes/parameter in
bf16); the accelerator holds only the NF4 views (4·R·(out+in) bytes per module plus a 4·out·16
sketch) and two 4·out·16 sketches per bf16 module, whatever k.
"""

import math
import time
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn

from torchtune_xgb.config.boost_config import BoostConfig
from torchtune_xgb.distributed.sharding import all_sum, gather_rows, is_sharded, local, local_rows
from torchtune_xgb.method.base_weights import Prefetch
from torchtune_xgb.method.ledger import Ledger, storage_dtype
from torchtune_xgb.method.merge_stats import AppendedRounds, exact_fp32_matmuls, full_stats
from torchtune_xgb.method.merged_checkpoint import MergedStateCheckpoint
from torchtune_xgb.method.views import CompensatedView, LowRankView, add_in_place, deviation, finish_truncations
from torchtune_xgb.quant.nf4 import dequantize, is_nf4

# Rounds per sealed ledger segment in resume checkpoints: a save writes at most this many rounds of
# factors in its state (plus, every SEGMENT_ROUNDS rounds, one segment and its replica). Measured on
# SmolLM2 with 64: saves wrote 2.6 MB at round 1, 23 MB at round 100 (36 open rounds); 16 keeps
# that spread small at one file pair per 16 rounds.
SEGMENT_ROUNDS = 16


@dataclass
class MergeReport:
    """What one merge did.

    kept_fraction: min over merged modules of 1 − ‖S_after − S_before − ΔW‖ / ‖ΔW‖, measured on
        the stored state S (1.0 = the whole update arrived). Modules whose update is exactly zero
        are skipped (nothing to keep); 1.0 if all were zero. At a segment boundary also over the
        dense ledgers' folds: what adding the rounds since the last boundary to the matrix kept.
    seconds: wall time of the merge, including updating the training views.
    modules: number of modules whose non-zero update was merged.
    update_norm: Frobenius norm of all merged updates together.
    view_deviation: max over the merged modules of ‖L − L̃‖_F / ‖L‖_F, the part of the exact
        merged rounds L that the forward pass's view L̃ leaves out: NF4 bases' rank-R view, bf16
        bases' coded remainder (estimated by 16-column Gaussian sketches, see views.py); None
        where every view is exact (fp32 bases).
    """

    kept_fraction: float
    seconds: float
    modules: int
    update_norm: float
    view_deviation: Optional[float] = None


def _lower_kept(kept: float, update_sq: float, lost_sq: float) -> float:
    """``kept`` after one more update of squared norm ``update_sq`` that lost ``lost_sq``: the
    smaller kept fraction; NaN once anything is not finite; unchanged by an update of zero."""
    if update_sq == 0:
        return kept
    if not math.isfinite(update_sq) or not math.isfinite(lost_sq):
        return math.nan
    return kept if math.isnan(kept) else min(kept, 1.0 - math.sqrt(lost_sq) / math.sqrt(update_sq))


class MergedState(MergedStateCheckpoint):
    """Exact merged state S = W0 + L for every adapted module, and the views the forward pass uses.

    fp32 weights: S is the weight itself (merged in place); bf16 (any non-fp32) weights:
    weight = round(S̃) with lo's codes on ``base_device``; NF4 weights: a rank-≤R view beside them (see
    the module docstring). The ledgers record L exactly in every case.

    Args:
        modules: the adapted modules by name (their weights must already hold the loaded base).
        base_device: where the ledgers and lo's codes live ("cpu" keeps them off the accelerator).
        originals: full-precision weights by module name, used as W0 of NF4 modules
            (``merge_base="original"``); without one, an NF4 module's W0 is its dequantized weight.
        nf4_view_rank: R, the rank of the view beside an NF4 weight (None: unbounded, exact).
        segment_rounds: rounds per sealed ledger segment (resume checkpoints; default ``SEGMENT_ROUNDS``).

    The object owns the working weights of these modules: after :meth:`merge_round` or
    :meth:`load_state_dict` each view equals the state it stands for.
    """

    def __init__(self, modules: Dict[str, nn.Module], base_device: str = "cpu",
                 originals: Optional[Dict[str, torch.Tensor]] = None, nf4_view_rank: Optional[int] = BoostConfig.nf4_view_rank,
                 segment_rounds: Optional[int] = None):
        self.modules = modules
        self._base: Dict[str, torch.Tensor] = {}  # NF4 merge_base="original": W0 rows
        self._ledgers: Dict[str, Ledger] = {}
        self._views: Dict[str, LowRankView] = {}  # NF4
        # fp32 weights are their own exact state: an fp32 merge keeps ~all of even a 1e-4 update
        # (24-bit mantissa), so they are merged in place and need no copy of W0
        self._in_place = set()
        compensated = {}
        for name, module in modules.items():
            weight = local(module.weight.detach())  # FSDP2: this rank's rows
            if is_nf4(weight):
                if originals is not None:  # full-size checkpoint weights: keep this rank's rows
                    rows = local_rows(originals[name].detach(), module.weight)
                    # taken over, not copied (the caller's dict is dropped); a slice of rows would
                    # keep the whole tensor alive, so a shard is cloned
                    sharded = rows.numel() != originals[name].numel()
                    self._base[name] = rows.to(device=base_device, copy=sharded)
                self._views[name] = LowRankView(module, nf4_view_rank)
            elif weight.dtype == torch.float32:
                self._in_place.add(name)
            else:
                compensated[name] = weight
            pin = torch.device(base_device).type == "cpu" and weight.device.type == "cuda"
            self._ledgers[name] = Ledger(weight.shape[0], weight.shape[1], base_device, module.weight.shape[0], pin=pin)
        self._compensated = CompensatedView(compensated, base_device)
        # this rank's ‖W0‖² per module, taken now while every weight is W0 (the guard's yardstick)
        self.base_sq_norms = {name: (self.base_weight(name) if name in self._views else self._weight(name))
                              .double().square().sum() for name in modules}
        self.rounds = 0  # merge_round calls so far
        self.segment_rounds = SEGMENT_ROUNDS if segment_rounds is None else segment_rounds
        self._init_segments()

    # --- reading the state -------------------------------------------------------------
    def _weight(self, name: str) -> torch.Tensor:
        return local(self.modules[name].weight.detach())

    def base_weight(self, name: str) -> torch.Tensor:
        """W0 of module ``name`` in fp32 on the module's device."""
        weight = self._weight(name)
        if name in self._views:
            base = self._base.get(name)
            if base is None:  # NF4, merge base "dequantized": the weights training saw
                base = dequantize(weight)
            return base.to(device=weight.device, dtype=torch.float32)
        return self.merged_weight(name) - self.delta(name)

    def delta(self, name: str) -> torch.Tensor:
        """L = S − W0 of module ``name`` (fp32, on the module's device; a product over every round)."""
        return self._ledgers[name].matrix(self._weight(name).device)

    def merged_weight(self, name: str) -> torch.Tensor:
        """S = W0 + L of module ``name`` (fp32; a new tensor the caller may change)."""
        weight = self._weight(name)
        if name in self._in_place:
            return weight.clone()
        if name in self._views:
            return self.base_weight(name) + self.delta(name)
        return self._compensated.merged_weight(name, weight)

    def export_weight(self, name: str, dtype: torch.dtype, live: Optional[torch.Tensor] = None) -> torch.Tensor:
        """round(S + live) in ``dtype`` (this rank's rows), for export; read-only.

        ``live`` is an fp32 update not merged yet (a partial round). Without one, the working
        weight already *is* round(S) (fp32: S itself; bf16: one rounding of S̃, see views.py), so it
        is returned without a copy: exporting costs no second copy of the model. Otherwise (NF4, a
        live update, another dtype) S is summed in fp32 for this module only and cast once.
        """
        weight = self._weight(name)
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
        """Memory the merged state holds (this rank): ledgers, lo, copies of W0, NF4 views, and dense
        ledgers' folded tails waiting for a checkpoint (merged_checkpoint.py)."""
        held = sum(t.numel() * t.element_size() for t in self._base.values()) + self.held_tail_bytes()
        return (held + sum(led.nbytes() for led in self._ledgers.values()) + self._compensated.nbytes()
                + sum(view.nbytes() for view in self._views.values()))

    def gathered_factors(self, name: str) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """(U, V) with L = U·V and all rows of U (FSDP2: gathered, a collective: call on every
        rank), as stored (bf16 or fp32, see Ledger), or None once L is stored dense."""
        ledger = self._ledgers[name]
        if ledger.dense is not None:
            return None
        return self._gathered(name, ledger.u), ledger.v

    def _gathered(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        """All ranks' rows of a tensor sharded like module ``name``'s weight (moved to the weight's
        device for the collective: NCCL gathers only there)."""
        weight = self.modules[name].weight
        if not is_sharded(weight):
            return rows
        return gather_rows(rows.to(local(weight).device), weight, self._ledgers[name].full_out)

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

        Cost: the per-module numbers are computed on the module's device and read back once for
        the whole round, so a round synchronises with the host twice (which modules have an
        update; the report), not once per module. Nothing depends on how many rounds came
        before: the ledger appends the round's factors only, ‖ΔW‖ and the residual come from r×r
        Gram matrices of the round's factors, and each view's update is O(out·in) (fp32: W += u·v;
        bf16: hi/lo, lo's int16 codes copied from pinned memory and back asynchronously) or
        O((out+in)·R²) (NF4). Every ``segment_rounds`` rounds a dense ledger also folds the rounds
        since the last boundary into its matrix (O(out·in·segment_rounds), on ``base_device``).
        """
        start = time.perf_counter()
        with exact_fp32_matmuls():
            factors = {name: self.modules[name].merge_factors(merge_rate) for name in names}
            todo = self._with_update(factors)
            device = self._weight(todo[0]).device if todo else None
            prefetch = Prefetch(self._compensated.codes, [n for n in todo if n in self._compensated.codes], device)
            measured: Dict[str, torch.Tensor] = {}  # full-matrix stats (dense or in-place states)
            appended, appended_names = AppendedRounds(), []  # factored ledgers, measured together
            view_parts: Dict[str, torch.Tensor] = {}
            for name in todo:
                stats, parts = self._merge_module(name, *factors.pop(name), appended, prefetch.take(name), merge_rate)
                if stats is None:
                    appended_names.append(name)
                else:
                    measured[name] = stats
                if parts is not None:
                    view_parts[name] = parts
            view_parts.update(finish_truncations(self._views))  # every full NF4 view at once (views.py)
            # one read-back for the whole round (waits for every queued view update too, and for
            # the round's factors copied into pinned ledger chunks: the fold below reads them)
            numbers = self._round_stats(todo, measured, appended_names, appended, view_parts).tolist() if todo else []
            self.rounds += 1
            if self.rounds % self.segment_rounds == 0:  # dense ledgers fold their tail, measured like a merge
                numbers += self._fold_stats(self._seal_segment())
        kept, merged, sq_norm, worst_view = 1.0, 0, 0.0, None
        for update_sq, lost_sq, *_ in numbers[len(todo):]:  # the folds: what they kept of their tails
            kept = _lower_kept(kept, update_sq, lost_sq)
        numbers = numbers[: len(todo)]
        for name, (update_sq, lost_sq, changed, gap_sq, view_sq) in zip(todo, numbers):
            if changed:
                raise RuntimeError(
                    f"merged state of {name}: the ledger changed earlier rounds' factors while appending "
                    "one round; the kept fraction cannot be measured (internal error)"
                )
            if name in view_parts:
                seen = deviation(gap_sq, view_sq)
                worst_view = seen if worst_view is None or math.isnan(seen) else max(worst_view, seen)
            sq_norm += update_sq
            if update_sq == 0:
                continue  # u ≠ 0 but u·v = 0: nothing to keep
            merged += 1
            kept = _lower_kept(kept, update_sq, lost_sq)
        return MergeReport(kept, time.perf_counter() - start, merged, math.sqrt(sq_norm), worst_view)

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
                     appended: AppendedRounds, view_parts: Dict[str, torch.Tensor]) -> torch.Tensor:
        """(len(todo) × 5) per-module (‖ΔW‖², ‖residual‖², changed, ‖Y − L̃Ω‖², ‖Y‖²) in ``todo``'s
        order, summed over shards under FSDP2 (the squares are sums over rows of u; v is
        replicated; the last two are 0 for modules without a low-rank view)."""
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
        position = {name: i for i, name in enumerate(todo)}
        if order != todo:
            index = torch.tensor([position[name] for name in order], device=device)
            stacked = torch.empty_like(stacked).index_copy_(0, index, stacked)
        views = torch.zeros(len(todo), 2, dtype=stacked.dtype, device=device)
        if view_parts:
            index = torch.tensor([position[name] for name in view_parts], device=device)
            views.index_copy_(0, index, torch.stack(list(view_parts.values())).to(views))
        stacked = torch.cat([stacked, views], dim=1)
        return all_sum(stacked, first) if is_sharded(first) else stacked

    def _fold_stats(self, folds: Dict[str, torch.Tensor]) -> List[List[float]]:
        """The folds' (‖U·V‖², ‖residual‖², 0) rows, summed over shards under FSDP2 (a collective
        and a read-back once per segment; on one device they are on ``base_device``, read there)."""
        if not folds:
            return []
        first = self.modules[next(iter(folds))].weight
        if is_sharded(first):
            return all_sum(torch.stack([f.to(local(first).device) for f in folds.values()]), first).tolist()
        return torch.stack(list(folds.values())).tolist()

    def _merge_module(self, name: str, u: torch.Tensor, v: torch.Tensor, appended: AppendedRounds,
                      code: Optional[torch.Tensor], merge_rate: float) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Add u·v to one module's ledger and its view from what the ledger stored. Returns (its
        (‖u·v‖², ‖residual‖², changed) on a device, or None for a round appended to a factored
        ledger (handed to ``appended``, measured later); the view's deviation parts or None).
        Under FSDP2 the squares are this rank's part: rows of u are sharded, v is replicated."""
        module, ledger = self.modules[name], self._ledgers[name]
        weight = local(module.weight.data)
        generation, ledger.last_added = ledger.generation, None
        ledger.add(u, v, storage_dtype(module, merge_rate))  # appended, dense or not (ledger.py)
        stored = ledger.last_added  # as stored, on base_device: in fp32 where the views are
        if stored is not None:
            stored = tuple(t.to(weight.device, torch.float32, non_blocking=True) for t in stored)
        changed = ledger.generation != generation
        parts = None
        if name in self._in_place:
            # the fp32 weight is the state: what arrived is the difference of two full matrices
            previous = weight.clone()
            if stored is not None:
                add_in_place(weight, *stored)
            return full_stats(weight - previous, u, v), parts
        if stored is not None:
            if name in self._views:
                parts = self._views[name].add(*stored, defer=True)  # truncated with the others below
            else:
                parts = self._compensated.add(name, weight, *stored, code_on_device=code)
        appended.add(u, v, stored, changed)
        return None, parts
