"""The resume state of a MergedState: rounds since the last sealed segment, sealed segments, views.

Every ``segment_rounds`` rounds (merged_state.SEGMENT_ROUNDS) a segment is sealed: the factors
merged since the previous boundary, each written once by the next resume checkpoint
(run/ledger_segments.py) and never again. Each checkpoint holds only the rounds after the last
boundary, so what a save writes (and under FSDP2 gathers) does not grow with the number of rounds.

Dense ledgers (ledger.Ledger) take part alike: at each boundary the tail is folded into the matrix
and handed to the segment as factors, so the matrix itself is written once, by the checkpoint after
the boundary where the ledger turned dense (its *base*), and never again. A resume replays the
segments in order: factors appended, each boundary's fold repeated on the same factors, a base
taking the place of everything before it, so the matrix comes back bit for bit. Two cases write a
base again: a checkpoint that never landed after its segments' tails were handed over, and tails
waiting for a checkpoint that would take more than a quarter of the matrix's bytes (a run that saves
rarely): then the matrix is the smaller thing to write, and memory stays bounded.
"""

from typing import Dict, List, Optional, Sequence, Set, Tuple, Union

import torch

from torchtune_xgb.distributed.sharding import local_rows
from torchtune_xgb.method.merge_stats import full_stats

# A dense ledger's tails waiting for a checkpoint, in bytes, beyond which the next checkpoint writes
# the matrix instead (a fraction of the matrix's own bytes).
HELD_TAIL_FRACTION = 0.25

# what a sealed segment holds of one module: a column range of a factored ledger, or a dense
# ledger's tail as folded (held until a checkpoint takes it; None once handed over)
Part = Union[Tuple[int, int], Optional[Tuple[torch.Tensor, torch.Tensor]]]


def _is_tail(part: Part) -> bool:
    return part is not None and not isinstance(part[0], int)


class MergedStateCheckpoint:
    """Checkpointing of :class:`~torchtune_xgb.method.merged_state.MergedState` (mixed into it:
    uses its ledgers, views and modules)."""

    def _init_segments(self) -> None:
        # sealed segments: (first round, end round, {module: Part}); None for those a resume loaded
        self._segments: List[Optional[Tuple[int, int, Dict[str, Part]]]] = []
        self.open_from_round = 0  # the first round not sealed yet
        self._open_start = {name: 0 for name in self._ledgers}  # each ledger's first column not sealed
        self._needs_base: Set[str] = set()  # dense ledgers whose matrix the next checkpoint writes
        self._handed_until = 0  # segments [0, this) were handed to a checkpoint
        self._bases_handed: Dict[str, int] = {}  # module → the segment whose payload carried its base
        self._held_bytes = {name: 0 for name in self._ledgers}  # tails held for a checkpoint (all ranks' rows)

    def _seal_segment(self) -> Dict[str, torch.Tensor]:
        """A segment boundary: seal the rounds since the last one and fold every ledger (a dense
        one adds its tail to the matrix; a factored one may turn dense). Returns, per dense ledger
        that folded a tail U·V, what the fold kept of it as a merge measures it:
        (‖U·V‖², ‖D_after − D_before − U·V‖², 0), this rank's part under FSDP2."""
        parts: Dict[str, Part] = {}
        measured: Dict[str, torch.Tensor] = {}
        for name, ledger in self._ledgers.items():
            if ledger.dense is None:
                if ledger.columns > self._open_start[name]:
                    parts[name] = (self._open_start[name], ledger.columns)
                ledger.fold()
                if ledger.dense is not None:  # turned dense: its factors are gone, its matrix is the base
                    self._needs_base.add(name)
                self._open_start[name] = ledger.columns
                continue
            before = ledger.dense.clone() if ledger.columns else None
            tail = ledger.fold()
            if tail is not None:
                measured[name] = full_stats(ledger.dense - before, tail[0].float(), tail[1].float())
                if name not in self._needs_base:
                    parts[name] = tail
                    # all ranks' rows: every rank takes the same decisions (_bound_held_tails)
                    self._held_bytes[name] += tail[1].shape[0] * (ledger.full_out + tail[1].shape[1]) * tail[1].element_size()
            self._open_start[name] = 0
        self._segments.append((self.open_from_round, self.rounds, parts))
        self.open_from_round = self.rounds
        self._bound_held_tails()
        return measured

    def _bound_held_tails(self) -> None:
        """A dense ledger whose tails waiting for a checkpoint outgrow HELD_TAIL_FRACTION of its
        matrix drops them: the next checkpoint writes the matrix instead."""
        for name, held in self._held_bytes.items():
            ledger = self._ledgers[name]
            if held and ledger.dense is not None and held > HELD_TAIL_FRACTION * 4 * ledger.full_out * ledger.dense.shape[1]:
                self._release_tails(name, self._handed_until)
                self._needs_base.add(name)

    def held_tail_bytes(self) -> int:
        """Bytes (this rank) of the folded tails waiting for a checkpoint."""
        return sum(t.numel() * t.element_size() for segment in self._segments[self._handed_until:] if segment is not None
                   for part in segment[2].values() if _is_tail(part) for t in part)

    def _release_tails(self, name: str, first: int) -> None:
        for segment in self._segments[first:]:
            if segment is not None and _is_tail(segment[2].get(name)):
                segment[2][name] = None
        self._held_bytes[name] = 0

    # --- checkpointing -----------------------------------------------------------------
    @property
    def sealed_segments(self) -> int:
        return len(self._segments)

    def segment_states(self, first: int) -> List[Tuple[Tuple[int, int], Dict[str, Dict[str, torch.Tensor]]]]:
        """For the resume checkpoint that writes them: sealed segments ``first``… as
        ((first round, end round), per module ``{"u", "v"}`` factors as stored, or ``{"dense"}``:
        a dense ledger's matrix, its base, in the last segment only). Segments before ``first``
        count as written; asking again for segments already handed over means that save never
        landed, and the dense ledgers whose tails went with it write their base instead.
        FSDP2: rows gathered, a collective: call on every rank."""
        if first < self._handed_until:  # the checkpoint that took [first, handed) was not written
            for segment in self._segments[first:self._handed_until]:
                for name, part in (segment[2] if segment is not None else {}).items():
                    if part is None:
                        self._needs_base.add(name)
            self._needs_base |= {name for name, index in self._bases_handed.items() if index >= first}
        out = []
        for index in range(first, len(self._segments)):
            if self._segments[index] is None:
                raise ValueError(f"ledger segment {index} came from a checkpoint and is not held here")
            first_round, end_round, parts = self._segments[index]
            factors = {}
            for name, part in parts.items():
                if name in self._needs_base or part is None:
                    continue
                u, v = part if _is_tail(part) else self._ledgers[name].factors(*part)
                factors[name] = self._saved_factors(name, u, v)
            if index == len(self._segments) - 1:
                for name in sorted(self._needs_base):  # the matrix as of this boundary (the tail since is open)
                    factors[name] = {"dense": self._gathered(name, self._ledgers[name].dense).to("cpu", copy=True)}
                    self._bases_handed[name] = index
                self._needs_base.clear()
            out.append(((first_round, end_round), factors))
        for name in self._held_bytes:  # copied into the payloads: nothing left to hold
            self._release_tails(name, first)
        self._handed_until = len(self._segments)
        return out

    def _saved_factors(self, name: str, u: torch.Tensor, v: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Copies of some of a ledger's rounds (all rows), CPU: a slice would serialize the whole
        storage chunk it lies in."""
        return {"u": self._gathered(name, u).to("cpu", copy=True), "v": v.to("cpu", copy=True)}

    def state_dict(self) -> Dict[str, Dict[str, torch.Tensor]]:
        """The ledgers' rounds since the last sealed segment (a dense ledger's tail), per module.
        Not W0: resume reloads the original base checkpoint; not the sealed segments (written
        once, :meth:`segment_states`). Bounded by ``segment_rounds`` rounds whatever the round count
        (after a resume from a checkpoint of the earlier format, a dense ledger's matrix too, until
        a sealed segment carries it).

        Under FSDP2 the rows of U are gathered (a collective: call on every rank), so the saved
        state has the single-device layout whatever the world size.
        """
        out = {}
        # a base no sealed segment waiting for a checkpoint can carry (after a resume from a
        # checkpoint of the earlier format) goes into this state until one can
        unsealed = self._handed_until == len(self._segments)
        for name, ledger in self._ledgers.items():
            if ledger.columns > self._open_start[name]:
                u, v = ledger.factors(self._open_start[name])
                out[name] = self._saved_factors(name, u, v)
            if unsealed and name in self._needs_base:
                out.setdefault(name, {})["dense"] = self._gathered(name, ledger.dense).to("cpu", copy=True)
        return out

    def view_state(self) -> Dict[str, Dict[str, torch.Tensor]]:
        """The NF4 views and their sketches (not a function of the ledger: kept as trained)."""
        return {name: view.state() for name, view in self._views.items() if view.used}

    def load_state_dict(self, state: Dict[str, Dict[str, torch.Tensor]], segments: Sequence[Dict] = (),
                        views: Optional[Dict[str, Dict[str, torch.Tensor]]] = None, rounds: int = 0,
                        open_from_round: int = 0) -> None:
        """Restore ledgers from sealed ``segments`` (in order) and the state of :meth:`state_dict`
        after them, and rebuild every view: fp32 and bf16 ones from W0 (the freshly loaded weight)
        and L, NF4 ones from ``views`` as saved (without one, an older checkpoint: the best rank-R
        approximation of L). ``rounds``: merge rounds the checkpoint holds, the segments those
        before ``open_from_round``. A ``{"dense"}`` entry (a base; in the open state: a checkpoint
        of an earlier version) replaces what came before it; after each segment, dense ledgers
        fold their tail as the run did at that boundary."""
        unknown = (set(state) | {n for segment in segments for n in segment}) - set(self._ledgers)
        if unknown:
            raise ValueError(f"merged state has modules the model lacks: {sorted(unknown)[:3]}")
        self._init_segments()
        for name, ledger in self._ledgers.items():
            weight = self.modules[name].weight
            ledger.clear()
            for segment in segments:
                self._load_part(ledger, segment.get(name), weight)
                ledger.fold(densify=False)  # a ledger that turned dense there has its base in a segment
            self._load_part(ledger, state.get(name), weight)
            if "dense" in state.get(name, {}):  # a base only this state holds: the next checkpoint writes it too
                self._needs_base.add(name)
            opened = state[name]["u"].shape[1] if name in state and "u" in state[name] else 0
            self._open_start[name] = ledger.columns - opened
            if ledger.rank_bound:
                self._rebuild_view(name, (views or {}).get(name))
        self.rounds, self.open_from_round = rounds, open_from_round
        self._segments = [None] * len(segments)
        self._handed_until = len(segments)

    @staticmethod
    def _load_part(ledger, part: Optional[Dict[str, torch.Tensor]], weight: torch.Tensor) -> None:
        if not part:
            return
        if "dense" in part:  # the matrix as of the boundary: it replaces what came before
            ledger.load_dense(local_rows(part["dense"], weight))
        if "u" in part:
            ledger.extend(local_rows(part["u"], weight), part["v"])

    def _rebuild_view(self, name: str, view_state: Optional[Dict[str, torch.Tensor]]) -> None:
        weight = self._weight(name)
        if name in self._views:
            if view_state is not None:
                self._views[name].load(view_state)
            elif self._ledgers[name].dense is not None:  # all rows (FSDP2: gathered), factored
                u, s, vh = torch.linalg.svd(self._gathered(name, self.delta(name)).double(), full_matrices=False)
                self._views[name].rebuild(local_rows((u * s).float(), self.modules[name].weight), vh.float())
            else:
                ledger = self._ledgers[name]
                self._views[name].rebuild(ledger.u.to(weight.device), ledger.v.to(weight.device))
        elif name in self._in_place:  # the weight is the freshly loaded W0
            weight.add_(self.delta(name))
        else:
            self._compensated.rebuild(name, weight, self.delta(name))
