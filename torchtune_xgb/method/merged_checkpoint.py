"""The resume state of a MergedState: rounds since the last sealed segment, sealed segments, views.

Every ``segment_rounds`` rounds (merged_state.SEGMENT_ROUNDS) the factors merged since the previous
boundary are sealed: each is written once by the next resume checkpoint (run/ledger_segments.py)
and never again, and each checkpoint holds only the rounds after the last boundary, so what a
save writes (and under FSDP2 gathers) does not grow with the number of rounds.
"""

from typing import Dict, Optional, Sequence, Tuple

import torch

from torchtune_xgb.distributed.sharding import local_rows


class MergedStateCheckpoint:
    """Checkpointing of :class:`~torchtune_xgb.method.merged_state.MergedState` (mixed into it:
    uses its ledgers, views and modules)."""

    def _seal_segment(self) -> None:
        """A segment boundary: the factors merged since the last one are sealed (see :meth:`segment_state`)."""
        ranges = {}
        for name, ledger in self._ledgers.items():
            if ledger.dense is None and ledger.columns > self._open_start[name]:
                ranges[name] = (self._open_start[name], ledger.columns)
            self._open_start[name] = ledger.columns
        self._segments.append((self.open_from_round, self.rounds, ranges))
        self.open_from_round = self.rounds

    # --- checkpointing -----------------------------------------------------------------
    @property
    def sealed_segments(self) -> int:
        return len(self._segments)

    def segment_state(self, index: int) -> Tuple[Tuple[int, int], Dict[str, Dict[str, torch.Tensor]]]:
        """((first round, end round), the factors) of sealed segment ``index``, per module, as
        stored; modules whose ledger has turned dense since are left out (the dense matrix in the
        checkpoint state replaces them). FSDP2: rows gathered, a collective: call on every rank."""
        if self._segments[index] is None:
            raise ValueError(f"ledger segment {index} came from a checkpoint and is not held here")
        first_round, end_round, ranges = self._segments[index]
        out = {}
        for name, (first, stop) in ranges.items():
            ledger = self._ledgers[name]
            if ledger.dense is None:
                u, v = ledger.factors(first, stop)
                out[name] = self._saved_factors(name, u, v)
        return (first_round, end_round), out

    def _saved_factors(self, name: str, u: torch.Tensor, v: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Copies of some of a ledger's rounds (all rows), CPU: a slice would serialize the whole
        storage chunk it lies in."""
        return {"u": self._gathered(name, u).to("cpu", copy=True), "v": v.to("cpu", copy=True)}

    def state_dict(self) -> Dict[str, Dict[str, torch.Tensor]]:
        """The ledgers' rounds since the last sealed segment (or dense matrices), per module. Not
        W0: resume reloads the original base checkpoint; not the sealed segments (written once,
        :meth:`segment_state`). Bounded by ``segment_rounds`` rounds whatever the round count.

        Under FSDP2 the rows of U (or of a dense L) are gathered (a collective: call on every
        rank), so the saved state has the single-device layout whatever the world size.
        """
        out = {}
        for name, ledger in self._ledgers.items():
            if ledger.dense is not None:  # a copy: the dense matrix changes in place after this
                out[name] = {"dense": self._gathered(name, ledger.dense).to("cpu", copy=True)}
            elif ledger.columns > self._open_start[name]:
                u, v = ledger.factors(self._open_start[name])
                out[name] = self._saved_factors(name, u, v)
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
        before ``open_from_round``."""
        unknown = (set(state) | {n for segment in segments for n in segment}) - set(self._ledgers)
        if unknown:
            raise ValueError(f"merged state has modules the model lacks: {sorted(unknown)[:3]}")
        held = {}
        for part in [*segments, state]:
            for name, factors in part.items():
                held.setdefault(name, []).append(factors)
        for name, parts in held.items():
            weight, ledger = self.modules[name].weight, self._ledgers[name]
            if "dense" in parts[-1]:
                ledger.load({"dense": local_rows(parts[-1]["dense"], weight)})
            else:
                u = torch.cat([local_rows(p["u"], weight) for p in parts], dim=1)
                ledger.load({"u": u, "v": torch.cat([p["v"] for p in parts])})
            opened = parts[-1]["u"].shape[1] if name in state and "u" in state[name] else 0
            self._open_start[name] = ledger.columns - opened
            self._rebuild_view(name, (views or {}).get(name))
        self.rounds, self.open_from_round = rounds, open_from_round
        self._segments = [None] * len(segments)

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
