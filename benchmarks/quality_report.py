"""Tables, goals and the curves plot of benchmarks/quality.py (from its run rows; no runs here)."""

from __future__ import annotations

import json
import statistics
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Optional

from benchmarks.common import fmt, markdown_table
from benchmarks.quality_stats import (
    DEFAULT_MARGIN,
    bootstrap_interval,
    crossing_step,
    implied_defaults,
    lr_past_edge,
    mean_curve,
    paired_difference,
    median_curve,
    steps_to_reach,
    value_at,
    verdict,
)

REFERENCE = "lora_r8"
ORDER = ["lora_r8", "lora_r32", "full", "xgblora", "loraxs", "xgblora_xs"]


def _pct(interval) -> str:
    est, low, high = interval
    return f"{est:.1%} [{low:.1%}, {high:.1%}]"


def _points(interval) -> str:
    est, low, high = (100 * x for x in interval)
    return f"{est:+.1f} [{low:+.1f}, {high:+.1f}]"


def paired_versus(s: Dict[str, Any], ref: Dict[str, Any]):
    """``paired_difference`` of a method's test exact match against the reference's over the seeds
    both ran (same seed = same data order); None without a common seed."""
    seeds = sorted(set(s["correct_by_seed"]) & set(ref["correct_by_seed"]), key=str)
    if not seeds:
        return None
    return paired_difference([s["correct_by_seed"][k] for k in seeds], [ref["correct_by_seed"][k] for k in seeds])


POOLED = "all families (pooled)"


def pooled(summaries: Dict[str, Dict[str, Dict[str, Any]]]) -> Dict[str, Dict[str, Any]]:
    """Per method, every family's test items taken together, over the seeds every family ran
    (for the method and for LoRA r=8): exact match and loss intervals, and the paired difference
    from LoRA r=8 (a seed row holds that seed's run of each family, so resampling a seed draws
    all its runs; items are resampled over the union, 100 per family, equal weight per item).
    Empty with fewer than two families, or where a family lacks the method or the reference."""
    if len(summaries) < 2:
        return {}
    out = {}
    for key in ORDER:
        runs = [summary.get(key) for summary in summaries.values()]
        refs = [summary.get(REFERENCE) for summary in summaries.values()]
        if any(r is None or r.get("failed") for r in runs + refs):
            continue
        seeds = set.intersection(*(set(r["correct_by_seed"]) for r in runs + refs))
        if not seeds:
            continue
        seeds = sorted(seeds, key=str)

        # the loss of a seed that diverged in some family is not known: the loss pools the others
        loss_seeds = [k for k in seeds if all(k in r["loss_by_seed"] for r in runs)]

        def by_seed(summaries_of, pick, over=seeds):  # one row per seed: that seed's items of every family, in family order
            return [sum((list(pick(s, k)) for s in summaries_of), []) for k in over]

        def correct(s, k):
            return s["correct_by_seed"][k]

        out[key] = {
            "method": runs[0]["method"],
            "seeds": len(seeds),
            "exact_match": bootstrap_interval(by_seed(runs, correct)),
            "loss": bootstrap_interval(by_seed(runs, lambda s, k: s["loss_by_seed"][k][0], loss_seeds),
                                       by_seed(runs, lambda s, k: s["loss_by_seed"][k][1], loss_seeds)) if loss_seeds else None,
            "trainable_params": runs[0]["trainable_params"],
            "difference": None if key == REFERENCE else paired_difference(by_seed(runs, correct),
                                                                           by_seed(refs, correct)),
        }
    return out


def _loss(interval) -> str:
    if interval is None:
        return "–"
    est, low, high = interval
    return f"{est:.3f} [{low:.3f}, {high:.3f}]"


def summarise(rows: List[Dict[str, Any]]) -> Dict[str, Dict[str, Dict[str, Any]]]:
    """``{task: {method key: summary}}`` over the runs at each method's chosen LR.

    A summary holds the method name, chosen ``lr``, ``seeds``, the exact-match and loss intervals
    (bootstrap over seeds and test items), trainable parameters, the seed-mean test curve, the
    curve seconds per step, and XGBLoRA's merge steps (first seed).
    """
    out: Dict[str, Dict[str, Dict[str, Any]]] = {}
    for task in dict.fromkeys(r["task"] for r in rows):
        out[task] = {}
        for key in dict.fromkeys(r["key"] for r in rows if r["task"] == task):
            not_run = [r for r in rows if r["task"] == task and r["key"] == key and r.get("missing")]
            runs = [r for r in rows if r["task"] == task and r["key"] == key and not r.get("failed")
                    and (key == "base" or r.get("chosen"))]
            # a seed the guard stopped at the chosen rate left no model: it scores 0 on every item
            # (as a run that collapses does), never dropped, which would report only the seeds that held
            diverged = [r for r in rows if r["task"] == task and r["key"] == key and r.get("chosen")
                        and r.get("diverged_at") is not None]
            if not_run:  # --report-only: an incomplete method is not summarised from part of its runs
                out[task][key] = {"failed": True, "missing": len(not_run), "method": not_run[0]["method"]}
                continue
            if not runs:
                out[task][key] = {"failed": True, "method": next(r["method"] for r in rows if r["key"] == key)}
                continue
            items = len(runs[0]["test_correct"])
            correct = {r["seed"]: r["test_correct"] for r in runs} | {r["seed"]: [0] * items for r in diverged}
            correct = {seed: correct[seed] for seed in sorted(correct, key=str)}
            curves = [{int(s): p for s, p in r["curve"].items()} for r in runs if r.get("curve")]
            out[task][key] = {
                "method": runs[0]["method"],
                "lr": runs[0]["lr"],
                "seeds": len(correct) if not diverged else f"{len(correct)} ({len(diverged)} diverged, scored 0)",
                "diverged": len(diverged),
                "exact_match": bootstrap_interval(list(correct.values())),
                "correct_by_seed": correct,
                "loss_by_seed": {r["seed"]: (r["test_item_loss"], r["test_item_tokens"]) for r in runs},
                "loss": bootstrap_interval([r["test_item_loss"] for r in runs], [r["test_item_tokens"] for r in runs]),
                "trainable_params": runs[0].get("trainable_params"),
                "curve": mean_curve(curves) if curves else {},
                "loss_curve": mean_curve(curves, "loss") if curves else {},
                # the median over seeds: one run slowed by a neighbour on the machine does not move it
                "seconds": median_curve(curves, "seconds") if curves else {},
                "merges": runs[0].get("merges", []),
            }
    return out


def time_to_quality(summary: Dict[str, Dict[str, Any]], base: Optional[Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """Per method: steps (and seconds) until its seed-mean test exact match reaches LoRA r=8's final one.

    Step 0 is the untrained model (``base``). ``steps``: the first evaluated step at or above the
    target; ``crossing``: that step interpolated linearly between the evaluated points (curves are
    evaluated every few steps only); ``ratio``: the method's crossing over LoRA r=8's own crossing
    of the same target (the same rule applied to LoRA r=8's curve); ``seconds``: the seed-median
    training seconds at the crossing, interpolated the same way.
    """
    ref = summary.get(REFERENCE)
    if not ref or ref.get("failed") or not ref["curve"]:
        return {}
    target = ref["exact_match"][0]
    start = {0: base["exact_match"][0]} if base else {}
    ref_crossing = crossing_step({**start, **ref["curve"]}, target)
    out = {}
    for key, s in summary.items():
        if key == "base" or s.get("failed") or not s["curve"]:
            continue
        curve = {**start, **s["curve"]}
        crossing = crossing_step(curve, target)
        out[key] = {
            "target": target,
            "steps": steps_to_reach(curve, target),
            "crossing": crossing,
            "seconds": None if crossing is None or not s["seconds"] else value_at({0: 0.0, **s["seconds"]}, crossing),
            "ratio": None if crossing is None or not ref_crossing else crossing / ref_crossing,
            "budget": max(s["curve"]),
        }
    return out


def goals(summaries: Dict[str, Dict[str, Dict[str, Any]]], ttq: Dict[str, Dict[str, Dict[str, Any]]]) -> List[str]:
    """The issue's goals, each PASS / MISS / n/a with the measured figures."""
    lines = []

    def status(ok: Optional[bool]) -> str:
        return "n/a" if ok is None else "PASS" if ok else "MISS"

    def per_task(key: str, test) -> List[str]:
        # test(task, summary, reference summary) → (True / False / None for "cannot tell", text)
        shown, oks = [], []
        for task, summary in summaries.items():
            s, ref = summary.get(key), summary.get(REFERENCE)
            if not s or not ref or s.get("failed") or ref.get("failed"):
                ok, text = None, "n/a"
            else:
                ok, text = test(task, s, ref)
            oks.append(ok)
            shown.append(f"{task} {text}")
        result = False if False in oks else True if oks and all(o is True for o in oks) else None
        return [status(result), "; ".join(shown)]

    ok, text = per_task("xgblora", lambda t, s, ref: (verdict(s["exact_match"], ref["exact_match"]) != "behind",
                                                      verdict(s["exact_match"], ref["exact_match"])))
    lines.append(f"- {ok}: XGBLoRA r=1 ≥ LoRA r=8 within the interval on every family — {text}")

    def reach(task, s, ref):
        t = ttq.get(task, {}).get("xgblora")
        if not t:
            return None, "n/a"
        if t["steps"] is None:
            return False, "not reached"
        if t["ratio"] is None:  # LoRA r=8 ended where the untrained model started
            return None, "n/a (LoRA r=8's final score = the untrained model's)"
        return t["ratio"] <= 0.8, f"{t['ratio']:.2f}× (interpolated crossing)"

    ok, text = per_task("xgblora", reach)
    lines.append(f"- {ok}: XGBLoRA reaches LoRA r=8's final exact match in ≤ 0.8× its steps — {text}")
    def within_two_points(task, s, ref):
        paired = paired_versus(s, ref)
        text = f"{(s['exact_match'][0] - ref['exact_match'][0]) * 100:+.1f} points"
        return s["exact_match"][0] - ref["exact_match"][0] >= -0.02, text + (
            "" if paired is None else f" (paired 95%: [{paired[1] * 100:+.1f}, {paired[2] * 100:+.1f}])")

    ok, text = per_task("loraxs", within_two_points)
    lines.append(f"- {ok}: LoRA-XS within 2 points of LoRA r=8 — {text}")

    def boosted_vs_plain(task, s, ref):
        plain = summaries[task].get("loraxs")
        if not plain or plain.get("failed"):
            return None, "n/a"
        v, paired = verdict(s["exact_match"], plain["exact_match"]), paired_versus(s, plain)
        return v != "behind", f"{v} of LoRA-XS" + ("" if paired is None else f" ({_points(paired)} points paired)")

    ok, text = per_task("xgblora_xs", boosted_vs_plain)
    lines.append(f"- {ok}: boosted LoRA-XS ≥ LoRA-XS (within the interval) — {text}")
    return lines


def hardware_line(header: Dict[str, Any], rows: List[Dict[str, Any]]) -> str:
    """Where the trained runs were made: each run records its machine and torch threads (older
    records do not: then this machine, the one rendering, is named)."""
    trained = [r for r in rows if r["key"] != "base" and not r.get("missing")]
    made = Counter(r["hardware"] for r in trained if r.get("hardware"))
    if not made:
        return f"Hardware: {header['hardware']}"
    parts = [f"{where} ({count} runs)" for where, count in made.most_common()]
    unnamed = len(trained) - sum(made.values())
    if unnamed:
        parts.append(f"not recorded for {unnamed} runs")
    return "Runs made on: " + "; ".join(parts)


def render_protocol(rows: List[Dict[str, Any]], header: Dict[str, Any], png: Optional[Path] = None) -> str:
    setting = header["setting"]
    summaries = summarise(rows)
    ttq = {task: time_to_quality(s, _base(s)) for task, s in summaries.items()}
    result_rows, ttq_rows = [], []
    for task, summary in summaries.items():
        ref = summary.get(REFERENCE)
        for key in ["base"] + [k for k in ORDER if k in summary]:
            s = summary.get(key)
            if s is None:
                continue
            if s.get("failed"):
                state = f"not run: {s['missing']} run(s) not in the record" if s.get("missing") else "FAILED"
                result_rows.append([task, s["method"], None, state, None, None, None, None, None])
                continue
            versus = difference = None
            if key not in ("base", REFERENCE) and ref and not ref.get("failed"):
                versus = verdict(s["exact_match"], ref["exact_match"])
                paired = paired_versus(s, ref)
                difference = None if paired is None else _points(paired)
            result_rows.append([task, s["method"], fmt(s["lr"], "g"), _pct(s["exact_match"]), versus, difference,
                                _loss(s["loss"]),
                                None if s["trainable_params"] is None else f"{int(s['trainable_params']):,}", s["seeds"]])
        for key in [k for k in ORDER if k in ttq[task]]:
            t = ttq[task][key]
            ttq_rows.append([task, summary[key]["method"], f"{t['target']:.1%}",
                             f"not reached in {t['budget']}" if t["steps"] is None else t["steps"],
                             fmt(t["crossing"], ".0f"), fmt(t["ratio"], ".2f"), fmt(t["seconds"], ".0f")])
    pool = pooled(summaries)
    for key, s in pool.items():
        versus = None if key == REFERENCE else verdict(s["exact_match"], pool[REFERENCE]["exact_match"])
        result_rows.append([POOLED, s["method"], "per family", _pct(s["exact_match"]), versus,
                            None if s["difference"] is None else _points(s["difference"]), _loss(s["loss"]),
                            None if s["trainable_params"] is None else f"{int(s['trainable_params']):,}", s["seeds"]])
    grid = [r for r in rows if r["key"] != "base" and r["seed"] == header["seeds"][0]]
    tried: Dict[Any, List[float]] = {}
    for r in grid:
        if not r.get("missing"):
            tried.setdefault((r["task"], r["key"]), []).append(r["lr"])
    grid_rows = [[r["task"], r["method"], fmt(r["lr"], "g"), _grid_score(r),
                  fmt(r.get("val_loss"), ".3f"), _chosen_mark(r, tried.get((r["task"], r["key"]), []))]
                 for r in grid]
    arithmetic = [t for t, a in header.get("arithmetic", {}).items() if a]
    missing = sum(1 for r in rows if r.get("missing"))
    text = [
        f"## Quality: {header['model']}, task families: {', '.join(summaries)}, {header['date']}",
        "",
        f"{hardware_line(header, rows)}. {setting['steps']} steps, batch {setting['batch_size']}, dtype "
        f"{setting['dtype']}, seeds {header['seeds']}, the same data order per seed for every method; learning "
        f"rate chosen on the validation split (first seed) from {header['grid']}, extended past a grid edge the best "
        "sat on (grid table below); figures on the test split; 95% "
        "intervals bootstrap over seeds and test items; 'vs LoRA r=8': level when the intervals overlap; "
        "'Δ paired': the difference from LoRA r=8 in points, bootstrapped over the same seeds and items for "
        "both (what the two share cancels, so it is the sharper test; the verdict keeps the overlap rule); "
        f"'{POOLED}': every family's test items together, each method at its own chosen rates. "
        f"Arithmetic families: {', '.join(arithmetic) or 'none'}."
        + (f" **Incomplete: {missing} runs of this protocol are not in the record** (--report-only; rows "
           "that lack any of their runs say so and are left out of the goals)." if missing else ""),
        "",
        markdown_table(["task", "method", "lr (val)", "test exact match [95%]", "vs LoRA r=8",
                        "Δ paired, points [95%]", "test loss [95%]",
                        "trainable params/step", "seeds"], result_rows),
        "",
        f"### Time to LoRA r=8's final test exact match (curves every {setting['every']} steps)",
        "",
        "Steps: the first evaluated step at or above the target; crossing: interpolated linearly between "
        "the evaluated points; × LoRA r=8: the crossing over LoRA r=8's own crossing of that score. Seconds "
        "(at the crossing, median over seeds): the run's median step time × steps + merge time up to then "
        "(evaluation and checkpoint writes left out).",
        "",
        markdown_table(["task", "method", "target", "steps (evaluated)", "crossing (interpolated)", "× LoRA r=8",
                        "seconds"], ttq_rows),
        "",
        "### Goals",
        "",
        *goals(summaries, ttq),
        "",
        "### Learning-rate grid (validation split, first seed)",
        "",
        markdown_table(["task", "method", "lr", "val exact match", "val loss", "chosen"], grid_rows),
    ]
    if png is not None:
        try:
            plot_curves(summaries, png)
            text += ["", f"Curves: `{png}`"]
        except ImportError:
            text += ["", "(no curves plot: pip install matplotlib)"]
    return "\n".join(text)


def _base(summary: Dict[str, Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """The untrained model's summary (the curves' step 0), None where it was not scored."""
    base = summary.get("base")
    return None if base is None or base.get("failed") else base


def _chosen_mark(run: Dict[str, Any], tried: List[float]) -> str:
    """✓ for the chosen rate; a chosen rate still on an edge of what was tried (the extensions past
    the edge used up) says so: the method may sit short of its best rate."""
    if not run.get("chosen"):
        return ""
    return "✓ (still on the grid's edge)" if lr_past_edge(tried, run["lr"]) is not None else "✓"


def _grid_score(run: Dict[str, Any]) -> str:
    if run.get("missing"):
        return "not run"
    if run.get("diverged_at") is not None:
        return f"diverged at step {run['diverged_at']}"
    return "FAILED" if run.get("failed") else f"{run['val_exact_match']:.1%}"


# (summary key, base row key, y label, y scale): the loss on a log scale, since the untrained
# model's loss (step 0) is several times the trained ones and would flatten their differences
PANELS = (("curve", "exact_match", "test exact match", "linear"),
          ("loss_curve", "loss", "test loss (per token, log scale)", "log"))


def curve_series(summary: Dict[str, Dict[str, Any]]) -> List[Dict[str, Dict[str, List[float]]]]:
    """What one task's column of the plot draws, one ``{method name: (steps, values)}`` per row of
    ``PANELS``: the seed-mean test exact match, then the test loss, with the untrained model
    (``base``) as step 0."""
    base = _base(summary)
    rows = []
    for curve_key, base_key, _, _ in PANELS:
        series = {}
        for key in [k for k in ORDER if k in summary and not summary[k].get("failed") and summary[k][curve_key]]:
            curve = dict(summary[key][curve_key])
            if base:
                curve = {0: base[base_key][0], **curve}
            steps = sorted(curve)
            series[summary[key]["method"]] = (steps, [curve[s] for s in steps])
        rows.append(series)
    return rows


def plot_curves(summaries: Dict[str, Dict[str, Dict[str, Any]]], png: Path) -> Path:
    """Seed-mean test exact match (top row) and test loss (bottom row) vs step, one column per
    task (``curve_series``); XGBLoRA's merges as dotted lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter

    tasks = list(summaries)
    fig, axes = plt.subplots(len(PANELS), len(tasks), figsize=(4.2 * len(tasks), 6.6), dpi=100, squeeze=False,
                             sharex="col")
    for col, task in enumerate(tasks):
        merges = (summaries[task].get("xgblora") or {}).get("merges", [])
        for row, series in enumerate(curve_series(summaries[task])):
            ax = axes[row][col]
            for name, (steps, values) in series.items():
                ax.plot(steps, values, marker="o", ms=3, label=name)
            for i, step in enumerate(merges):
                ax.axvline(step, color="tab:red", ls=":", lw=0.8, alpha=0.6, label="XGBLoRA merge" if i == 0 else None)
            ax.set_ylabel(PANELS[row][2])
            ax.set_yscale(PANELS[row][3])
            if PANELS[row][3] == "log":  # 0.4, not 4×10⁻¹
                ax.yaxis.set_major_formatter(FormatStrFormatter("%.2g"))
                ax.yaxis.set_minor_formatter(FormatStrFormatter("%.2g"))
            ax.grid(alpha=0.3)
        axes[0][col].set_title(task)
        axes[-1][col].set_xlabel("optimizer step")
    if axes[0][0].get_legend_handles_labels()[0]:  # a report of runs not yet made draws no curve
        axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png)
    plt.close(fig)
    return png


def render_sweep(rows: List[Dict[str, Any]], header: Dict[str, Any]) -> str:
    """One row per (task, factor, value): seed-mean val and test figures; the best on val marked
    (highest val exact match, ties to the lower val loss; the test split never decides)."""
    groups: Dict[tuple, List[Dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["task"], r["factor"], str(r["value"])), []).append(r)
    means: Dict[tuple, Optional[Dict[str, Any]]] = {}
    for group, runs in groups.items():
        ok = [r for r in runs if not r.get("failed")]
        means[group] = {k: statistics.mean(r[k] for r in ok) for k in ("val_exact_match", "val_loss",
                                                                       "test_exact_match", "test_loss")} if ok else None
        if ok:  # the test interval (bootstrap over the seeds and items), so a reader sees what is noise
            means[group]["test_interval"] = bootstrap_interval([r["test_correct"] for r in ok])
            timed = [r["train_seconds"] for r in ok if r.get("train_seconds") is not None]
            means[group]["train_seconds"] = statistics.median(timed) if timed else None
    best: Dict[tuple, tuple] = {}
    for (task, factor, value), m in means.items():
        if m is not None:
            rank = (round(m["val_exact_match"], 9), -m["val_loss"])  # rounded: means of equal scores tie
            if (task, factor) not in best or rank > best[(task, factor)][0]:
                best[(task, factor)] = (rank, value)
    table = []
    for (task, factor, value), m in means.items():
        default = groups[(task, factor, value)][0]["default"]
        table.append([task, factor, value + (" (packaged)" if default else ""),
                      "FAILED" if m is None else f"{m['val_exact_match']:.1%}", None if m is None else f"{m['val_loss']:.3f}",
                      None if m is None else _pct(m["test_interval"]), None if m is None else f"{m['test_loss']:.3f}",
                      None if m is None else fmt(m["train_seconds"], ".0f"),
                      "✓" if best.get((task, factor), (None, None))[1] == value else ""])
    setting = header["setting"]
    centre = ", ".join(f"{k} {v}" for k, v in header.get("centre", {}).items()) or "as packaged"
    return "\n".join([
        f"## Hyperparameter sweep: XGBLoRA and LoRA-XS, {header['date']}",
        "",
        f"Hardware: {header['hardware']}. {setting['steps']} steps, batch {setting['batch_size']}, dtype "
        f"{setting['dtype']}, seeds {header['seeds']}; one factor at a time around the packaged defaults "
        f"({centre}; LoRA-XS α = r). Best on the validation split ✓ "
        "(val exact match, ties to the lower val loss). Test exact match with its 95% interval (bootstrap over "
        "seeds and test items); training seconds: median step time × steps + merge time.",
        "",
        markdown_table(["task", "factor", "value", "val exact match", "val loss", "test exact match [95%]", "test loss",
                        "training s", "best (val)"], table),
        "",
        f"### Defaults the sweep implies (val exact match averaged over the families; a default moves only "
        f"when another value beats it by more than {DEFAULT_MARGIN * 100:.0f} points)",
        "",
        *[f"- {factor}: best {d['best']} ({d['gain'] * 100:+.1f} points over the packaged {d['default']}) → "
          + (f"change to {d['best']}" if d["change"] else f"keep {d['default']}")
          for factor, d in implied_defaults(rows).items()],
    ])


def write_outputs(out: Path, report: str, header: Dict[str, Any], rows: List[Dict[str, Any]]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report + "\n")
    out.with_suffix(".json").write_text(json.dumps({"header": header, "rows": rows}, indent=1))
