"""The resume state of a Booster: what a checkpoint holds, and the sealed ledger segments it lists.

What grows with the rounds (the merged factors and the round reports) is split at the merged
state's segment boundaries (method/merged_checkpoint.py): each sealed segment is handed out once,
to be written once (:meth:`BoosterCheckpoint.segment_payloads`), and :meth:`state_dict` holds only
what came after the last boundary, so a checkpoint's size does not grow with the number of rounds.
"""

from dataclasses import asdict
from typing import List, Sequence

import torch


class BoosterCheckpoint:
    """Checkpointing of :class:`~torchtune_xgb.method.boosting.Booster` (mixed into it)."""

    def state_dict(self) -> dict:
        """Everything needed to continue exactly, except the sealed ledger segments
        (:meth:`segment_payloads`, written once each): step, the ledgers' rounds since the last
        sealed segment, NF4 views, live adapters (LoRA-XS: with their frozen factors), the round
        reports since the last sealed segment, per-module round counts and the LoRA-XS SVD. Its
        size does not grow with the number of rounds."""
        open_from = self.merged.open_from_round
        return {
            "method": self.adapter.method,
            "step": self.step,
            "merged": self.merged.state_dict(),
            "merged_views": self.merged.view_state(),
            "merged_rounds": self.merged.rounds,
            "merged_open_from_round": open_from,
            "ledger_segments": self.merged.sealed_segments,
            "reports": [asdict(r) for r in self.reports[open_from:]],
            "adapters": {name: m.adapter_state() for name, m in self.modules.items()},
            "rounds_trained": dict(self.rounds_trained),
            "svd_factors": self.svd_factors,
            "svd_seconds": self.svd_seconds,
        }

    def segment_payloads(self, first: int) -> List[dict]:
        """Sealed ledger segments ``first``… as plain dicts (``rounds``: [first, end) round,
        ``merged``: the factors merged in them, ``reports``: their round reports), for the resume
        checkpoint that writes them once (asking again from an earlier ``first``: that save never
        landed). FSDP2: rows gathered, a collective on every rank."""
        payloads = []
        for index, ((begin, end), factors) in enumerate(self.merged.segment_states(first), start=first):
            payloads.append({"index": index, "rounds": [begin, end], "merged": factors,
                             "reports": [asdict(r) for r in self.reports[begin:end]]})
        return payloads

    @torch.no_grad()
    def load_state_dict(self, state: dict, segments: Sequence[dict] = ()) -> None:
        """Restore :meth:`state_dict` after the sealed ``segments`` it names (their payloads, in order)."""
        from torchtune_xgb.method.boosting import RoundReport  # (boosting imports this module)

        if state.get("method", "xgblora") != self.adapter.method:
            raise ValueError(f"adapter.method: the checkpoint was trained with {state.get('method')!r}")
        if len(segments) != state.get("ledger_segments", 0):
            raise ValueError(f"the checkpoint names {state.get('ledger_segments', 0)} ledger segments, "
                             f"{len(segments)} were given")
        self.step = int(state["step"])
        reports = [r for segment in segments for r in segment["reports"]] + list(state["reports"])
        self.reports = [RoundReport(**r) for r in reports]
        rounds = int(state.get("merged_rounds", len(self.reports)))
        if rounds != len(self.reports):
            raise ValueError(f"the checkpoint holds {len(self.reports)} round reports for {rounds} merged rounds")
        self.merged.load_state_dict(state["merged"], segments=[s["merged"] for s in segments],
                                    views=state.get("merged_views"), rounds=rounds,
                                    open_from_round=int(state.get("merged_open_from_round", 0)))
        self.rounds_trained = dict(state["rounds_trained"])
        self.svd_factors = state["svd_factors"]
        self.svd_seconds = state["svd_seconds"]
        for name, module in self.modules.items():
            module.load_adapter_state(state["adapters"][name])  # the live round's factors as saved
        self._set_active(self.round)
