"""The run summary, ``output_dir/xgb_summary.json``: what a finished run did, in stable keys.

Written last, only by a run that exported (a resume that finds it knows the run is complete).
"""

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, Optional

from torchtune_xgb.config.boost_config import AdapterConfig
from torchtune_xgb.errors import RunError
from torchtune_xgb.run.safe_files import write_atomically

SUMMARY_FILE = "xgb_summary.json"


def run_summary(booster, adapter: AdapterConfig, *, steps: int, wall_seconds: float, final_loss: Optional[float],
                lora_rank: int, extra: Dict[str, Any]) -> Dict[str, Any]:
    """The summary of a run whose rounds ``booster`` (a :class:`~torchtune_xgb.method.boosting.Booster`)
    ran; ``extra`` (evaluation, export and resume fields the recipe collected) is added last."""
    reports = booster.reports
    kept = [r.kept_fraction for r in reports if r.merged_modules]
    deviations = [r.view_deviation for r in reports if r.view_deviation is not None]
    summary = {
        "method": adapter.method,
        "rounds": len(reports),
        "steps": steps,
        "trainable_params": max((r.trainable_params for r in reports), default=booster.trainable_params()),
        "distinct_params_touched": booster.distinct_params_touched(),
        "wall_seconds": wall_seconds,
        "merge_seconds": sum(r.merge_seconds + r.reset_seconds for r in reports),
        "min_kept_fraction": min(kept) if kept else None,
        "merged_state_bytes": booster.merged.nbytes(),
        # NF4 bases: the largest part of the merged rounds the forward pass's rank-R view left out
        "max_view_deviation": max(deviations) if deviations else None,
        "final_loss": final_loss,
        "lora_rank": lora_rank,
        "svd_seconds": booster.svd_seconds,
        "boost": asdict(booster.config),
        "adapter": asdict(adapter),
        "round_reports": [asdict(r) for r in reports],
    }
    summary.update(extra)
    return summary


def write_summary(output_dir: str, summary: Dict[str, Any]) -> Path:
    """Write ``summary`` to ``output_dir/xgb_summary.json`` through a new file renamed into place,
    so a reader never sees half a summary, and never through a symbolic link. Returns the path.

    Raises :class:`RunError` (one line naming the file, or the link) if it cannot be written; the
    export is complete by then, and a resume writes the summary."""
    path = Path(output_dir) / SUMMARY_FILE
    try:
        return write_atomically(path, json.dumps(summary, indent=2).encode())
    except OSError as err:
        raise RunError(
            f"summary: could not write {path}: {err.strerror or err}; the export is complete, "
            "resume_from_checkpoint=True writes the summary"
        ) from err
