"""The long-budget quality protocol (``python -m benchmarks.quality --long``): its plan and report.

Where boosting is boosting: 500 steps per run, 25 merged rounds at the packaged κ = 20, on
``facts``, ``ordering`` and ``arithmetic_fresh`` (arithmetic scored on a test split no one had
looked at: torchtune_xgb.data.tasks), against torchtune LoRA r=8 and r=32 and full fine-tuning.
Every method's learning-rate grid has the same density: its centre and one ×2 step either side,
extended past an edge the best sits on by the existing rule (``quality.EDGE_STEPS``). 3 seeds.

The report is the 60-step protocol's (quality_report.render_protocol) plus:

- claims against LoRA r=8 corrected for multiple comparisons: Holm–Bonferroni over every
  (family, method) comparison on the paired bootstrap's two-sided p-values;
- the effective rank of each method's update per module type, XGBLoRA's against rounds
  (quality_rank: from the final PEFT adapter, whose ledger factors hold every round in order);
- one plot per family: test exact match and loss against steps and against training seconds to
  the end of the run, and XGBLoRA's effective rank against rounds;
- while runs are missing (``--report-only`` on a partial record): what is recorded, what is
  missing per family and method, whose learning rate is still to be chosen, and the hours left
  at the recorded runs' median time.

Sizing (2-core AMD EPYC, fp32, 2026-12-04). Seconds per step at batch 8 are the 60-step record's
(lower quartile over runs, mean over the three families; LoRA r=32 = r=8 × 1.09, its measured CPU
ratio); batch 4 scales them by each method's single-thread CPU-seconds per step measured on real
arithmetic batches (batch 4 / batch 8: LoRA 0.54, r=32 0.53, rank-1 0.51, full 0.72: the full
model's AdamW step does not shrink with the batch). Evaluation: 28-40 s per curve point (100 test
items, greedy; ordering's 18-token answers the slowest), at each point and twice more for the
final val + test scores. Runs: 12 (family, method) groups × (3 rates + 0.68 edge extensions, the
60-step record's mean, + 2 seeds) ≈ 68, between 60 and 84.

    setting              LoRA r=8  r=32  full  XGBLoRA   per run   protocol
    batch 8, every 50      3.11    3.39  2.96   2.77    ~33 min   ~37 h (33-46)
    batch 8, every 100       "       "     "      "     ~30 min   ~34 h
    batch 4, every 50      1.67    1.79  2.15   1.42    ~22 min   ~25 h (22-31)   ← the preset
    batch 4, every 100       "       "     "      "     ~19 min   ~22 h

on an otherwise idle machine. Under ``nice -n 19`` beside other work it is far slower: with the
load average at ~7, a niced XGBLoRA step at batch 4 took ~20 s and one curve point ~12 min.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any, Dict, List, Optional

from benchmarks.common import markdown_table
from benchmarks.quality_report import ORDER, PANELS, REFERENCE, _base, _points, curve_series, paired_versus, summarise
from benchmarks.quality_stats import holm, paired_p_value

LONG_TASKS = ["facts", "ordering", "arithmetic_fresh"]
LONG_METHODS = ["lora_r8", "lora_r32", "full", "xgblora"]
# centre first (the only rate without --grid), then ×½ and ×2: one density for every method.
# Centres: the 60-step protocol's choices moved down for a budget 8× longer (LoRA 1e-3, full
# fine-tuning 2e-5) and the packaged rates (XGBLoRA 2e-3, LoRA-XS 4e-3).
LONG_GRIDS = {
    "lora_r8": [1e-3, 5e-4, 2e-3],
    "lora_r32": [1e-3, 5e-4, 2e-3],
    "full": [2e-5, 1e-5, 4e-5],
    "xgblora": [2e-3, 1e-3, 4e-3],
    "loraxs": [4e-3, 2e-3, 8e-3],
    "xgblora_xs": [4e-3, 2e-3, 8e-3],
}
LONG_QUICK_TASKS, LONG_QUICK_METHODS = ["arithmetic_fresh"], ["lora_r8", "xgblora"]
ALPHA = 0.05  # family-wise error rate of the Holm-corrected claims


# --- claims, Holm-corrected -------------------------------------------------------------------
def holm_rows(summaries: Dict[str, Dict[str, Dict[str, Any]]]) -> List[List[Any]]:
    """One row per (family, method ≠ LoRA r=8) both summarised: Δ paired [95%], its two-sided
    bootstrap p, the Holm-adjusted p over all these comparisons, and the claim at ``ALPHA``."""
    tests, shown = {}, {}
    for task, summary in summaries.items():
        ref = summary.get(REFERENCE)
        for key in [k for k in ORDER if k != REFERENCE and k in summary]:
            s = summary[key]
            if s.get("failed") or not ref or ref.get("failed"):
                continue
            seeds = sorted(set(s["correct_by_seed"]) & set(ref["correct_by_seed"]), key=str)
            if not seeds:
                continue
            name = f"{task}/{key}"
            tests[name] = paired_p_value([s["correct_by_seed"][k] for k in seeds],
                                         [ref["correct_by_seed"][k] for k in seeds])
            shown[name] = (task, s["method"], paired_versus(s, ref))
    adjusted = holm(tests, ALPHA)
    rows = []
    for name, (task, method, paired) in shown.items():
        p_adj, rejected = adjusted[name]
        claim = ("ahead of" if paired[0] > 0 else "behind") + " LoRA r=8" if rejected else "no difference shown"
        rows.append([task, method, _points(paired), f"{tests[name]:.4f}", f"{p_adj:.4f}", claim])
    return rows


# --- effective rank ---------------------------------------------------------------------------
def rank_rounds(rounds: int) -> List[int]:
    """The rounds the table shows: 1, 2, 5, 10, 20, 50, … up to ``rounds``, and ``rounds`` itself."""
    marks, step = [], 1
    while step < rounds:
        marks += [m for m in (step, 2 * step, 5 * step) if m < rounds]
        step *= 10
    return sorted(set(marks)) + [rounds]


def chosen_rank_curves(rows: List[Dict[str, Any]], task: str, key: str) -> Optional[Dict[str, Dict[str, List]]]:
    """Per module type and measure, the seed-median curve of the runs at the chosen rate."""
    runs = [r["effective_rank"] for r in rows if r["task"] == task and r["key"] == key and r.get("chosen")
            and not r.get("failed") and r.get("effective_rank")]
    if not runs:
        return None
    out: Dict[str, Dict[str, List]] = {}
    for kind in runs[0]["types"]:
        for measure in ("entropy", "energy90"):
            curves = [r["types"][kind][measure] for r in runs if kind in r["types"]]
            length = min(len(c) for c in curves)
            out.setdefault(kind, {})[measure] = [
                statistics.median(v) if None not in (v := [c[j] for c in curves]) else None for j in range(length)]
    return out


def _cell(curves: Dict[str, List], index: int) -> Optional[str]:
    entropy, energy = (curves[m][index] if index < len(curves[m]) else None for m in ("entropy", "energy90"))
    return None if entropy is None else f"{entropy:.1f} / {energy:g}"


def rank_table(rows: List[Dict[str, Any]], tasks: List[str]) -> tuple:
    """``(headers, rows)``: per family and module type, XGBLoRA's effective rank after the rounds
    of ``rank_rounds``, and every other adapter method's at the end ("entropy / 90%" cells)."""
    keys = [k for k in ORDER if any(r["key"] == k and r.get("effective_rank") for r in rows)]
    boosted = [k for k in keys if any(r["key"] == k and r["effective_rank"].get("rounds") for r in rows
                                      if r.get("effective_rank"))]
    merges = max([len(c) for r in rows if r["key"] in boosted and r.get("effective_rank")
                  for t in r["effective_rank"]["types"].values() for c in t.values()], default=0)
    marks = rank_rounds(merges) if merges else []
    names = {k: next(r["method"] for r in rows if r["key"] == k) for k in keys}
    headers = ["task", "module"] + [f"{names[k]}, after {m} merges" for k in boosted for m in marks] + \
              [f"{names[k]}, end" for k in keys if k not in boosted]
    table = []
    for task in tasks:
        curves = {k: chosen_rank_curves(rows, task, k) for k in keys}
        kinds = sorted({kind for c in curves.values() if c for kind in c})
        for kind in kinds:
            cells = [_cell(curves[k][kind], m - 1) if curves[k] and kind in curves[k] else None
                     for k in boosted for m in marks]
            cells += [_cell(curves[k][kind], 0) if curves[k] and kind in curves[k] else None
                      for k in keys if k not in boosted]
            table.append([task, kind] + cells)
    return headers, table


# --- progress of a partial record -------------------------------------------------------------
def progress(rows: List[Dict[str, Any]]) -> List[str]:
    """What a partial record holds and lacks, per family and method, and the hours left at the
    recorded runs' median time (runs without ``total_seconds``, or a method with none, are not
    estimated; a learning rate still to be chosen may add up to ``EDGE_STEPS`` runs more)."""
    lines, left, unknown = [], 0.0, 0
    groups = dict.fromkeys((r["task"], r["key"]) for r in rows if r["key"] != "base")
    timed = {}
    for r in rows:
        if r.get("total_seconds") and not r.get("missing"):
            timed.setdefault(r["key"], []).append(r["total_seconds"])
    for task, key in groups:
        runs = [r for r in rows if r["task"] == task and r["key"] == key]
        done = [r for r in runs if not r.get("missing")]
        missing = [r for r in runs if r.get("missing")]
        chosen = next((r["lr"] for r in runs if r.get("chosen") and r["lr"] is not None), None)
        lr = f"lr {chosen:g} chosen" if chosen is not None else "lr to be chosen (grid incomplete)"
        what = ", ".join(f"lr {r['lr']:g} seed {r['seed']}" if r["lr"] is not None else f"seed {r['seed']} (lr pending)"
                         for r in missing)
        name = runs[0]["method"]
        lines.append(f"- {task} / {name}: {len(done)} run(s) recorded, {lr}" + (f"; missing: {what}" if missing else ""))
        if key in timed:
            left += len(missing) * statistics.median(timed[key])
        else:
            unknown += len(missing)
    base = [r for r in rows if r["key"] == "base" and r.get("missing")]
    if base:
        lines.append(f"- untrained model not scored on: {', '.join(r['task'] for r in base)}")
    lines.append(f"- time left at the recorded median per run: ~{left / 3600:.1f} h"
                 + (f", plus {unknown} run(s) of methods with no timed run yet" if unknown else ""))
    return lines


# --- plots --------------------------------------------------------------------------------------
def seconds_series(summary: Dict[str, Dict[str, Any]]) -> List[Dict[str, tuple]]:
    """``curve_series`` against training seconds: each step replaced by the seed-median seconds
    to reach it (step 0 → 0 s), steps without a recorded time left out."""
    out = []
    for series in curve_series(summary):
        by_name = {}
        for key in [k for k in ORDER if k in summary and not summary[k].get("failed")]:
            name = summary[key]["method"]
            if name not in series:
                continue
            clock = {0: 0.0, **summary[key]["seconds"]}
            steps, values = series[name]
            kept = [(clock[s], v) for s, v in zip(steps, values) if s in clock]
            by_name[name] = ([t for t, _ in kept], [v for _, v in kept])
        out.append(by_name)
    return out


def plot_family(task: str, summary: Dict[str, Dict[str, Any]], rows: List[Dict[str, Any]], png: Path) -> Path:
    """One family: exact match (top) and loss (bottom) against steps and seconds, and the
    effective rank (entropy top, 90%-energy count bottom) of XGBLoRA against rounds, per module type."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter, MaxNLocator

    fig, axes = plt.subplots(2, 3, figsize=(14, 7), dpi=100)
    for col, (series_rows, xlabel) in enumerate(((curve_series(summary), "optimizer step"),
                                                 (seconds_series(summary), "training seconds (median over seeds)"))):
        for row, series in enumerate(series_rows):
            ax = axes[row][col]
            for name, (x, y) in series.items():
                ax.plot(x, y, marker="o", ms=3, label=name)
            ax.set_ylabel(PANELS[row][2])
            ax.set_yscale(PANELS[row][3])
            if PANELS[row][3] == "log":  # 0.4, not 4×10⁻¹
                ax.yaxis.set_major_formatter(FormatStrFormatter("%.2g"))
                ax.yaxis.set_minor_formatter(FormatStrFormatter("%.2g"))
            ax.set_xlabel(xlabel)
            ax.grid(alpha=0.3)
    curves = chosen_rank_curves(rows, task, "xgblora") or {}
    for row, measure in enumerate(("entropy", "energy90")):
        ax = axes[row][2]
        for kind, by_measure in curves.items():
            values = by_measure[measure]
            ax.plot(range(1, len(values) + 1), values, marker=".", label=kind)
        for key, style in (("lora_r8", "--"), ("lora_r32", ":")):
            other = chosen_rank_curves(rows, task, key)
            if other:  # the median over module types of the LoRA's final value
                ax.axhline(statistics.median(c[measure][0] for c in other.values()), color="grey", ls=style,
                           label=f"{summary[key]['method']} (end)" if key in summary else key)
        ax.set_xlabel("XGBLoRA merges per module (= rounds, blocks_per_round: all)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("entropy effective rank" if measure == "entropy" else "singular values holding 90% of ‖ΔW‖²")
        ax.grid(alpha=0.3)
    for ax in (axes[0][0], axes[0][2]):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(task)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png)
    plt.close(fig)
    return png


# --- the report ---------------------------------------------------------------------------------
def render_long(rows: List[Dict[str, Any]], header: Dict[str, Any], png: Optional[Path] = None) -> str:
    """The 60-step protocol's report of ``rows`` followed by the long protocol's sections; with
    ``png``, one plot per family at ``png``'s stem + ``_FAMILY.png``."""
    from benchmarks.quality_report import render_protocol

    summaries = summarise(rows)
    text = [render_protocol(rows, header)]
    claims = holm_rows(summaries)
    expected = sum(1 for t in summaries for k in summaries[t] if k not in ("base", REFERENCE))
    text += ["", f"### Claims against LoRA r=8, Holm-corrected ({len(claims)} comparisons, family-wise α = {ALPHA:g})",
             "", "p: two-sided, from the same paired bootstrap as the interval (seeds and test items resampled "
             "together for both methods; resolution 1/4000). Holm–Bonferroni adjusts every (family, method) "
             "p-value of this table together; a claim is made where the adjusted p ≤ α, otherwise the data show "
             "no difference at that error rate."
             + ("" if len(claims) == expected else f" **Interim: {expected - len(claims)} comparison(s) not "
                "yet possible; the adjusted p-values change when they join.**"),
             "", markdown_table(["task", "method", "Δ paired, points [95%]", "p (paired bootstrap)",
                                 "Holm-adjusted p", f"claim at α = {ALPHA:g}"], claims)]
    headers, table = rank_table(rows, list(summaries))
    text += ["", "### Effective rank of the update (median over layers, then over seeds)", "",
             "Cells: entropy effective rank (exp of the entropy of σ/Σσ) / number of singular values holding "
             "90% of ‖ΔW‖²_F, per module type. A boosted method's update after j merges is its ledger's first j "
             "blocks (the exported adapter keeps them in merge order): round j of the run when every block merges "
             "every round (the packaged blocks_per_round: all). LoRA's is B·A at the end of the run.",
             "", markdown_table(headers, table) if table else "(no adapter recorded yet)"]
    if any(r.get("missing") for r in rows):
        text += ["", "### Progress of this record (runs still missing)", "", *progress(rows)]
    if png is not None:
        try:
            written = [plot_family(task, summary, rows, png.with_name(f"{png.stem}_{task}.png"))
                       for task, summary in summaries.items() if _base(summary) is not None or len(summary) > 1]
            text += ["", "Curves: " + ", ".join(f"`{p}`" for p in written)]
        except ImportError:
            text += ["", "(no curves plot: pip install matplotlib)"]
    return "\n".join(text)
