"""Loss curve of a run with the merge boundaries marked: ``tune-xgb plot OUTPUT_DIR [--out PNG]``.

Reads what every run leaves behind: torchtune's DiskLogger metric files
``OUTPUT_DIR/logs/*.txt`` (lines ``Step N | loss:2.31 lr:0.002 … kept_fraction:0.99999``) and,
when present, ``OUTPUT_DIR/xgb_summary.json``. A merge is a log line carrying ``kept_fraction``
(the recipe logs one per merge). Works on torchtune's own LoRA/full runs too (no merges then).

matplotlib is optional (``pip install matplotlib``); only :func:`plot_run` needs it. The log
parser here is also what ``benchmarks/`` uses to read step times and tokens/s.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from torchtune_xgb.run.safe_files import write_atomically

_STEP_RE = re.compile(r"^Step (\d+) \| (.*)$")
# A value is a plain token, or a logged 0-d tensor such as "tensor(2.3017)" or
# "tensor(2.3, device='cuda:0')" (torchtune's own recipes log loss and tokens/s as tensors).
_PAIR_RE = re.compile(r"(\w+):(tensor\([^)]*\)|\S+)")
_NUMBER_RE = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|nan|inf", re.IGNORECASE)

MetricLine = Tuple[int, Dict[str, float]]


def parse_value(text: str) -> Optional[float]:
    """A logged value as a float: ``"0.5"`` → 0.5, ``"tensor(2.5)"`` → 2.5; non-numbers → None."""
    if text.startswith("tensor("):
        match = _NUMBER_RE.search(text[len("tensor(") :])
        return float(match.group(0)) if match else None
    try:
        return float(text)
    except ValueError:
        return None


def parse_metric_lines(lines) -> List[MetricLine]:
    """DiskLogger lines → ``[(step, {name: value}), …]`` in file order (one entry per line).

    Lines that are not ``Step N | …`` and values that are not numbers are skipped.
    """
    out: List[MetricLine] = []
    for line in lines:
        match = _STEP_RE.match(line.strip())
        if not match:
            continue
        values = {}
        for name, raw in _PAIR_RE.findall(match.group(2)):
            value = parse_value(raw)
            if value is not None:
                values[name] = value
        out.append((int(match.group(1)), values))
    return out


def read_metric_log(path) -> List[MetricLine]:
    """Parse one DiskLogger file (see :func:`parse_metric_lines`)."""
    with open(path, encoding="utf-8") as f:
        return parse_metric_lines(f)


def find_metric_logs(output_dir) -> List[Path]:
    """``OUTPUT_DIR/logs/*.txt``, oldest first (a resumed run appends or adds files)."""
    logs = sorted(Path(output_dir, "logs").glob("*.txt"), key=lambda p: (p.stat().st_mtime, p.name))
    if not logs:
        raise FileNotFoundError(f"no metric logs in {Path(output_dir, 'logs')} (DiskLogger writes *.txt there)")
    return logs


def loss_curve(lines: List[MetricLine]) -> Tuple[List[int], List[float]]:
    """(steps, losses) of the lines that carry ``loss``; a step logged twice keeps its last value."""
    by_step = {step: values["loss"] for step, values in lines if "loss" in values}
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def merge_steps(lines: List[MetricLine]) -> List[int]:
    """Steps at which a merge was logged (lines with ``kept_fraction``), sorted, unique."""
    return sorted({step for step, values in lines if "kept_fraction" in values})


def read_run(output_dir) -> Dict[str, object]:
    """Everything :func:`plot_run` draws: ``{"steps", "losses", "merges", "summary"}``."""
    lines: List[MetricLine] = []
    for path in find_metric_logs(output_dir):
        lines.extend(read_metric_log(path))
    steps, losses = loss_curve(lines)
    summary_path = Path(output_dir, "xgb_summary.json")
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else None
    return {"steps": steps, "losses": losses, "merges": merge_steps(lines), "summary": summary}


def _title(output_dir, summary: Optional[dict]) -> str:
    title = Path(output_dir).resolve().name
    if summary:
        parts = [summary.get("method", ""), f"{summary.get('rounds', '?')} rounds"]
        if summary.get("exact_match_after") is not None:
            parts.append(f"exact match {summary.get('exact_match_before', 0):.0%} → {summary['exact_match_after']:.0%}")
        title += " — " + ", ".join(p for p in parts if p)
    return title


def plot_run(output_dir, out_png=None) -> Path:
    """Draw loss vs step of the run in ``output_dir`` with a dashed line at every merge.

    Args:
        output_dir: a run's ``output_dir`` (the recipe's; torchtune's own recipes work too).
        out_png: where to write the PNG; default ``OUTPUT_DIR/loss.png``.

    Returns:
        The PNG path. Raises ImportError without matplotlib, FileNotFoundError without logs,
        ValueError when the logs hold no loss values, ``LinkRefused`` (an OSError) where the PNG's
        path is a symbolic link.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    run = read_run(output_dir)
    if not run["steps"]:
        raise ValueError(f"no loss values in {Path(output_dir, 'logs')}")
    out_png = Path(out_png) if out_png else Path(output_dir, "loss.png")
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    ax.plot(run["steps"], run["losses"], lw=1.2, label="training loss")
    for i, step in enumerate(run["merges"]):
        ax.axvline(step, color="tab:red", ls="--", lw=0.8, alpha=0.6, label="merge" if i == 0 else None)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(_title(output_dir, run["summary"]), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png")
    plt.close(fig)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    return write_atomically(out_png, png.getvalue())  # never through a symbolic link planted there
