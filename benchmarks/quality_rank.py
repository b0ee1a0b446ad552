"""The effective rank of a run's update, per module type, from the PEFT adapter it exported.

XGBLoRA's export (``epoch_N/adapter/adapter_model.safetensors``) holds each module's ledger factors
untouched: U (``lora_B``, out×k) and V (``lora_A``, k×in) with one rank-r block per merged round in
the order merged (torchtune_xgb.export.adapter: an exact adapter is the ledger itself). So the
update after j rounds is the product of the first j·r columns and rows, and the whole trajectory
against rounds comes from the final export alone: no intermediate checkpoint, no pickle (the file
is safetensors). torchtune's LoRA runs export ``epoch_N/adapter_model.safetensors`` in the same PEFT
form (B·A up to the scale α/r, which no effective rank sees): one point, the final update.

A ledger stored dense (once k·(out+in) ≥ out·in: 144 rounds on SmolLM2's k/v projections) is
exported through its SVD, which has no round order; such a module (more columns than rounds, plus
one live block) contributes its final value only.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from benchmarks.quality_stats import energy_rank, entropy_rank, prefix_singular_values

ADAPTER_FILES = ("adapter/adapter_model.safetensors", "adapter_model.safetensors")  # ours, torchtune's
ENERGY = 0.9


def adapter_factors(path: Path) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    """``{HF module name: (B out×k, A k×in)}`` of a PEFT adapter file, in float64."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    out = {}
    for key, a in tensors.items():
        if ".lora_A." in key:
            name = key[len("base_model.model."):].rsplit(".lora_A.", 1)[0]
            b = tensors[key.replace(".lora_A.", ".lora_B.")]
            out[name] = (b.double().numpy(), a.double().numpy())
    return out


def module_type(name: str) -> str:
    """``model.layers.3.self_attn.q_proj`` → ``q_proj``."""
    return name.rsplit(".", 1)[-1]


def rank_curves(factors: Dict[str, Tuple[np.ndarray, np.ndarray]], block: int,
                rounds: Optional[int]) -> Dict[str, Dict[str, List[float]]]:
    """Per module type: ``{"entropy": [...], "energy90": [...]}``, item j−1 the median over that
    type's modules (layers) after their j-th merged block of rank ``block`` (round j when every
    block merges every round; ``rounds``: the run's merged rounds; None or 0: the whole update as
    one point). Columns past the merged rounds (a live partial round)
    are left out; a module with more columns than rounds + 1 blocks (dense ledger) gives its
    final value at the last round only."""
    per_type: Dict[str, Dict[str, Dict[int, List[float]]]] = {}
    for name, (b, a) in factors.items():
        k = b.shape[1]
        if not rounds or k > (rounds + 1) * block:  # one point: the whole update
            points = {rounds or 1: prefix_singular_values(b, a, k)[-1]}
        else:
            used = min(k, rounds * block)
            points = dict(enumerate(prefix_singular_values(b[:, :used], a[:used], block), start=1))
        slot = per_type.setdefault(module_type(name), {"entropy": {}, "energy90": {}})
        for j, s in points.items():
            slot["entropy"].setdefault(j, []).append(entropy_rank(s))
            slot["energy90"].setdefault(j, []).append(energy_rank(s, ENERGY))
    return {kind: {measure: [statistics.median(values[j]) if j in values else None
                             for j in range(1, max(values) + 1)]
                   for measure, values in measures.items()}
            for kind, measures in sorted(per_type.items())}


def run_effective_rank(epoch_dir: Path, block: int, rounds: Optional[int]) -> Optional[Dict[str, object]]:
    """The row entry of a run whose last export ``epoch_dir`` holds a PEFT adapter (None without
    one: full fine-tuning): ``{"block", "rounds", "types": rank_curves(...)}``."""
    found = [Path(epoch_dir) / f for f in ADAPTER_FILES if (Path(epoch_dir) / f).is_file()]
    if not found:
        return None
    return {"block": block, "rounds": rounds, "types": rank_curves(adapter_factors(found[0]), block, rounds)}
