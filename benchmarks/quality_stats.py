"""The arithmetic of the quality protocol: bootstrap intervals, verdicts, LR choice, time-to-quality.

Pure functions on numbers and parsed metric logs (no runs), so each is unit-tested against values
worked out by hand (tests/benchmarks/test_quality_protocol.py).
"""

from __future__ import annotations

import statistics
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from torchtune_xgb.eval.plot import MetricLine

LEVEL = 0.95


def _resampled(values, weights, draws: int, seed: int) -> Tuple[np.ndarray, float]:
    """The statistic of each bootstrap resample over seeds and items, and of the data itself."""
    v = np.asarray(values, dtype=float)
    w = np.ones_like(v) if weights is None else np.asarray(weights, dtype=float)
    if v.ndim != 2 or v.size == 0 or w.shape != v.shape:
        raise ValueError(f"values must be a non-empty [seeds][items] table (weights the same shape), got {v.shape}")
    n_seeds, n_items = v.shape
    rng = np.random.default_rng(seed)
    seeds = rng.integers(0, n_seeds, size=(draws, n_seeds))[:, :, None]
    items = rng.integers(0, n_items, size=(draws, n_items))[:, None, :]
    stats = (v[seeds, items] * w[seeds, items]).sum(axis=(1, 2)) / w[seeds, items].sum(axis=(1, 2))
    return stats, float((v * w).sum() / w.sum())


def bootstrap_interval(
    values: Sequence[Sequence[float]],
    weights: Optional[Sequence[Sequence[float]]] = None,
    draws: int = 4000,
    seed: int = 0,
    level: float = LEVEL,
) -> Tuple[float, float, float]:
    """``(estimate, low, high)``: a percentile bootstrap over seeds *and* items.

    Args:
        values: ``values[s][i]``, the score of item ``i`` in the run with seed ``s`` (1/0 for exact
            match; an item's mean answer loss for held-out loss). Every seed scores the same items.
        weights: same shape; the estimate is ``Σ w·v / Σ w`` (answer-token counts make the loss a
            token mean, as the held-out loss is). Default: all 1 (a plain mean).
        draws: bootstrap resamples; seed: the resampling RNG's seed (the interval is reproducible).
        level: coverage (0.95 → the 2.5th and 97.5th percentiles).

    Each resample draws the seeds with replacement and, independently, the items with replacement
    (the same items for every drawn seed: an item is equally hard in every run), so the interval
    covers both run-to-run and test-set variation. One seed gives an items-only bootstrap.
    """
    stats, estimate = _resampled(values, weights, draws, seed)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(stats, [tail, 100 - tail])
    return estimate, float(low), float(high)


def paired_difference(
    values: Sequence[Sequence[float]],
    reference: Sequence[Sequence[float]],
    draws: int = 4000,
    seed: int = 0,
    level: float = LEVEL,
) -> Tuple[float, float, float]:
    """``(estimate, low, high)`` of ``mean(values) − mean(reference)``, bootstrapped as pairs.

    Both are ``[seeds][items]`` tables of the same shape, row ``s`` of each from the same seed (the
    same data order) and column ``i`` the same test item. Each resample draws the same seeds and the
    same items for both methods, so what the two runs share (an item every method finds hard, a
    seed whose data order suits every method) cancels: the interval of the difference is narrower
    than two overlapping per-method intervals suggest. Unweighted (exact match).
    """
    # the mean of the differences is the difference of the means, resample by resample
    return bootstrap_interval(_differences(values, reference), draws=draws, seed=seed, level=level)


def _differences(values, reference) -> np.ndarray:
    v, r = np.asarray(values, dtype=float), np.asarray(reference, dtype=float)
    if v.shape != r.shape:
        raise ValueError(f"paired tables must have the same [seeds][items] shape, got {v.shape} and {r.shape}")
    return v - r


def paired_p_value(
    values: Sequence[Sequence[float]],
    reference: Sequence[Sequence[float]],
    draws: int = 4000,
    seed: int = 0,
) -> float:
    """Two-sided bootstrap p-value of "no difference" for :func:`paired_difference`'s resamples.

    ``2 · min(P*(d ≤ 0), P*(d ≥ 0))`` over the same resamples (same ``draws`` and ``seed``) that
    give the interval, capped at 1: the level at which the percentile interval would just touch
    0, so p < 0.05 where the 95% interval excludes 0 (up to how the percentile is interpolated).
    Resolution ``1 / draws``; a table of identical runs (every resample 0) gives 1.
    """
    stats, _ = _resampled(_differences(values, reference), None, draws, seed)
    return float(min(1.0, 2 * min(np.mean(stats <= 0), np.mean(stats >= 0))))


def holm(p_values: Mapping[str, float], alpha: float = 1 - LEVEL) -> Dict[str, Tuple[float, bool]]:
    """Holm–Bonferroni over a family of tests: ``{name: (adjusted p, rejected at alpha)}``.

    With the m p-values sorted ascending, p₍ⱼ₎ is adjusted to ``max over i ≤ j of min(1, (m−i+1)·p₍ᵢ₎)``
    (the step-down adjustment, monotone in the order), and a hypothesis is rejected when its
    adjusted p is ≤ ``alpha``: every rejection at once holds the family-wise error rate at alpha.
    Ties keep their input order (their adjusted values come out equal either way).
    """
    order = sorted(p_values, key=lambda name: p_values[name])
    m, running, out = len(order), 0.0, {}
    for i, name in enumerate(order):
        running = max(running, min(1.0, (m - i) * p_values[name]))
        out[name] = (running, running <= alpha)
    return out


def verdict(interval: Sequence[float], reference: Sequence[float], higher_is_better: bool = True) -> str:
    """``"ahead"``, ``"level"`` or ``"behind"`` the reference: level whenever the intervals overlap.

    ``interval`` and ``reference`` are ``(estimate, low, high)`` (or ``(low, high)``).
    """
    low, high = interval[-2], interval[-1]
    ref_low, ref_high = reference[-2], reference[-1]
    if low > ref_high:
        return "ahead" if higher_is_better else "behind"
    if high < ref_low:
        return "behind" if higher_is_better else "ahead"
    return "level"


def select_lr(runs: Iterable[Mapping]) -> Optional[float]:
    """The learning rate with the best *validation* exact match (mean over the seeds run with it).

    ``runs``: dicts with ``lr``, ``val_exact_match``, ``val_loss`` (failed runs, marked
    ``failed``, are ignored). Ties go to the lower mean validation loss, then to the smaller lr.
    None if no run succeeded. The test split is never looked at.
    """
    by_lr: Dict[float, List[Mapping]] = {}
    for run in runs:
        if not run.get("failed"):
            by_lr.setdefault(run["lr"], []).append(run)
    if not by_lr:
        return None

    def key(lr: float):
        rows = by_lr[lr]
        # rounded: the mean of equal scores over different seed counts must tie exactly
        return (-round(statistics.mean(r["val_exact_match"] for r in rows), 9),
                statistics.mean(r["val_loss"] for r in rows), lr)

    return min(by_lr, key=key)


def lr_past_edge(tried: Iterable[float], best: float) -> Optional[float]:
    """The next learning rate to try when ``best`` is the largest or smallest of ``tried``: one
    geometric step past it (its ratio to the nearest tried value), to 3 significant digits.
    None when ``best`` lies inside the tried range (or fewer than two values were tried).

    A best value on the grid's edge says the optimum may lie beyond it; a reference tuned short
    of its optimum would flatter the methods compared with it.
    """
    values = sorted(set(tried))
    if len(values) < 2 or values[0] < best < values[-1]:
        return None
    inner = values[-2] if best == values[-1] else values[1]
    return float(f"{best * best / inner:.3g}")


# --- time-to-quality ------------------------------------------------------------------------
Curve = Dict[int, Dict[str, float]]  # step → {"exact_match": …, "loss": …}


def curve_from_log(lines: Sequence[MetricLine], em_key: str = "exact_match", loss_key: str = "val_loss") -> Curve:
    """The periodic-eval points of a metric log: ``{step: {"exact_match", "loss"}}``.

    Reads the recipe's ``exact_match`` (``eval.every_n_steps``) and ``val_loss``
    (``run_val_every_n_steps``) lines; a step logged twice keeps its last value.
    """
    curve: Curve = {}
    for step, values in lines:
        if em_key in values:
            curve.setdefault(step, {})["exact_match"] = values[em_key]
        if loss_key in values:
            curve.setdefault(step, {})["loss"] = values[loss_key]
    return curve


def mean_curve(curves: Sequence[Curve], key: str = "exact_match", reduce=statistics.mean) -> Dict[int, float]:
    """``{step: reduce(values over runs)}`` (the mean by default) at the steps every run has ``key`` at."""
    steps = set.intersection(*({s for s, v in c.items() if key in v} for c in curves)) if curves else set()
    return {s: reduce([c[s][key] for c in curves]) for s in sorted(steps)}


def median_curve(curves: Sequence[Curve], key: str) -> Dict[int, float]:
    """``{step: median over runs}`` at the steps every run has ``key`` at."""
    return mean_curve(curves, key, reduce=statistics.median)


def steps_to_reach(curve: Mapping[int, float], target: float, tolerance: float = 1e-9) -> Optional[int]:
    """The first step whose value is ≥ ``target``; None if the curve never gets there."""
    for step in sorted(curve):
        if curve[step] >= target - tolerance:
            return step
    return None


def crossing_step(curve: Mapping[int, float], target: float, tolerance: float = 1e-9) -> Optional[float]:
    """The step at which ``curve`` first reaches ``target``, interpolated linearly between the
    last evaluated point below it and the first at or above it (the curve is only evaluated every
    few steps; this is the estimate a reader would draw by eye). None if never reached."""
    previous = None
    for step in sorted(curve):
        if curve[step] >= target - tolerance:
            if previous is None or curve[step] == curve[previous]:
                return float(step)
            fraction = (target - curve[previous]) / (curve[step] - curve[previous])
            return previous + min(max(fraction, 0.0), 1.0) * (step - previous)
        previous = step
    return None


def value_at(curve: Mapping[int, float], step: float) -> Optional[float]:
    """``curve`` linearly interpolated at ``step`` (None outside its evaluated range)."""
    points = sorted(curve)
    for low, high in zip(points, points[1:]):
        if low <= step <= high:
            return curve[low] + (curve[high] - curve[low]) * (step - low) / (high - low)
    return curve[points[0]] if points and step == points[0] else None


def seconds_to_step(lines: Sequence[MetricLine], step: int, skip: int = 3) -> Optional[float]:
    """Training seconds to reach ``step``: median step time × ``step`` + merge seconds up to it.

    The median of the logged step intervals (after ``skip`` warm-up steps) leaves out the time of
    evaluations and checkpoint exports, which differ between recipes and are not training; the
    merges (lines carrying ``kept_fraction``) are training cost, so their logged seconds are added.
    None when the log has no step times.
    """
    stamps: Dict[int, float] = {}
    for s, values in lines:
        if "loss" in values and "time" in values:
            stamps.setdefault(s, values["time"])
    intervals = [stamps[s] - stamps[s - 1] for s in sorted(stamps) if s > max(skip, 1) and s - 1 in stamps]
    if not intervals:
        return None
    merges = sum(v.get("merge_seconds", 0.0) + v.get("reset_seconds", 0.0)
                 for s, v in lines if "kept_fraction" in v and s <= step)
    return statistics.median(intervals) * step + merges


SLOW_FACTOR = 1.5  # a run this many times its group's lower-quartile training time shared the cores


def slow_runs(rows: Iterable[Mapping], factor: float = SLOW_FACTOR, minimum: int = 3) -> List[str]:
    """Ids of runs whose ``train_seconds`` exceed ``factor`` × the lower quartile of their group.

    A group is one task, method and set of overrides (the learning rate and seed do not change the
    cost of a step), judged only with at least ``minimum`` timed runs. Such a run shared the cores
    with other work (a test suite beside a niced benchmark): its scores stand, its seconds do not.
    The reference is the lower quartile, not the median, because slowed runs raise a median: in
    the 2026-12-03 record three of ordering's six LoRA r=8 runs were slowed (383, 403, 1309 s
    against 206-217 s), the median 300 s flagged only the 1309 s one.
    """
    groups: Dict[Tuple[str, str, str], List[Mapping]] = {}
    for row in rows:
        if row.get("failed") or not row.get("train_seconds"):
            continue
        key = (row["task"], row["key"], repr(sorted((row.get("overrides") or {}).items())))
        groups.setdefault(key, []).append(row)
    slow = []
    for group in groups.values():
        if len(group) < minimum:
            continue
        lower = statistics.quantiles([r["train_seconds"] for r in group], n=4, method="inclusive")[0]
        slow += [r["id"] for r in group if r["train_seconds"] > factor * lower]
    return slow


# --- defaults from the sweep ----------------------------------------------------------------
# A packaged default moves only when another value beats it by more than this on the validation
# exact match averaged over the sweep's families: at 100 items a single score's standard error is
# up to 5 points, so a 2-family mean below 5 points apart is not evidence.
DEFAULT_MARGIN = 0.05


def implied_defaults(rows: Iterable[Mapping], margin: float = DEFAULT_MARGIN) -> Dict[str, Dict[str, object]]:
    """Per sweep factor: ``{"best", "default", "change", "gain"}`` from the *validation* split.

    ``rows``: sweep rows with ``factor``, ``value``, ``default`` (True on the packaged value),
    ``task``, ``val_exact_match``, ``val_loss`` (``failed`` rows ignored). A value's score is its
    val exact match averaged over seeds within a task, then over the tasks where every value of the
    factor ran; ``best`` is the highest (ties to the lower mean val loss); ``change`` is True when
    ``best`` is not the packaged value and beats it by more than ``margin`` (``gain``).
    """
    cells: Dict[str, Dict[str, Dict[str, List[Mapping]]]] = {}
    defaults: Dict[str, str] = {}
    for row in rows:
        if row.get("failed"):
            continue
        value = str(row["value"])
        cells.setdefault(row["factor"], {}).setdefault(value, {}).setdefault(row["task"], []).append(row)
        if row.get("default"):
            defaults[row["factor"]] = value
    out: Dict[str, Dict[str, object]] = {}
    for factor, by_value in cells.items():
        tasks = set.intersection(*(set(t) for t in by_value.values()))
        if not tasks or factor not in defaults:
            continue

        def score(value: str, metric: str) -> float:
            return statistics.mean(statistics.mean(r[metric] for r in by_value[value][t]) for t in sorted(tasks))

        best = min(by_value, key=lambda v: (-round(score(v, "val_exact_match"), 9), score(v, "val_loss")))
        gain = score(best, "val_exact_match") - score(defaults[factor], "val_exact_match")
        out[factor] = {"best": best, "default": defaults[factor], "gain": gain,
                       "change": best != defaults[factor] and gain > margin + 1e-12}
    return out


# --- effective rank of an accumulated low-rank update -----------------------------------------
def prefix_singular_values(u: np.ndarray, v: np.ndarray, block: int = 1) -> List[np.ndarray]:
    """Singular values of ``U[:, :j]·V[:j]`` for j = block, 2·block, … ≤ k, never forming U·V.

    ``u``: out×k, ``v``: k×in, the factors of an update built block by block (XGBLoRA's ledger
    appends one rank-``block`` block per merged round, in order, so prefix j·block is the update
    after j rounds). With U = Q_u·R_u and Vᵀ = Q_v·R_v (reduced QR), U·V = Q_u·(R_u·R_vᵀ)·Q_vᵀ, and
    the QR of a column prefix is the same Q's prefix with R's leading block (R is triangular):
    every prefix costs one j×j SVD. Factors wider than they are tall (k > out or in) take the
    SVD of each prefix product instead.
    """
    u, v = np.asarray(u, dtype=np.float64), np.asarray(v, dtype=np.float64)
    k = u.shape[1]
    prefixes = range(block, k + 1, block)
    if k > min(u.shape[0], v.shape[1]):
        return [np.linalg.svd(u[:, :j] @ v[:j], compute_uv=False) for j in prefixes]
    ru = np.linalg.qr(u, mode="r")
    rv = np.linalg.qr(v.T, mode="r")
    return [np.linalg.svd(ru[:j, :j] @ rv[:j, :j].T, compute_uv=False) for j in prefixes]


def entropy_rank(singular_values: Sequence[float]) -> float:
    """Entropy effective rank (Roy & Vetterli 2007): exp of the Shannon entropy of σ / Σσ.

    k equal singular values give k; one dominant direction gives ~1; an all-zero update 0."""
    s = np.asarray(singular_values, dtype=np.float64)
    s = s[s > 0]
    if not s.size:
        return 0.0
    p = s / s.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


def energy_rank(singular_values: Sequence[float], fraction: float = 0.9) -> int:
    """How many of the largest singular values hold ``fraction`` of ‖ΔW‖²_F = Σσ² (0 for zero)."""
    energy = np.sort(np.asarray(singular_values, dtype=np.float64) ** 2)[::-1]
    total = energy.sum()
    if total == 0:
        return 0
    return int(np.searchsorted(np.cumsum(energy) / total, fraction - 1e-12) + 1)
