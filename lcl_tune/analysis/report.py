"""Ablation report: is arm X better than the baseline arm, how sure are we, and where does it differ?

An ablation runs several *arms* (named config variants: ``ce``, ``scl``, ``lcl_separate``, ...) over
the same seeds. Seeds are *paired*: seed ``s`` gives every arm the same data order and the same
initial weights, so most run-to-run noise is shared between arms at the same seed. Comparisons
therefore use the per-seed differences ``arm - baseline`` (over the seeds both arms finished), not
two independent samples: that is what makes 3-5 seeds informative at all.

What the report holds (:class:`AblationReport`, plain pandas DataFrames):

* ``arms`` - per arm and metric: mean, std, Student-t CI of the mean, the paired difference to the
  baseline with its CI, paired t-test and Wilcoxon p-values, Holm-corrected over the arms;
* ``per_class`` - per-class F1 of the baseline and each arm's paired per-class F1 difference
  (LCL's claim is about confusable classes, so the aggregate metric is not enough);
* ``confused_pairs`` - the most-confused ordered class pairs (true -> predicted) of each arm, next to
  the baseline's rate for the same pair, so one sees whether an arm reduced that confusion.

Rendering: each table is a DataFrame of formatted cells that pandas renders: :func:`to_markdown`
(``DataFrame.to_markdown``, i.e. tabulate), :func:`to_latex` (``Styler.to_latex``, booktabs);
:func:`write_report` (atomic files) and :func:`plot_arms` (matplotlib, imported lazily).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np
import pandas as pd
from scipy import stats

from lcl_tune.util import atomic_write

DEFAULT_METRICS: tuple[str, ...] = ("accuracy", "macro_f1", "weighted_f1")
PRETTY_METRICS = {"accuracy": "Accuracy", "macro_f1": "Macro-F1", "weighted_f1": "Weighted-F1"}
# Per-metric columns of ``AblationReport.arms`` (each prefixed with ``{metric}_``).
METRIC_FIELDS: tuple[str, ...] = (
    "n", "mean", "std", "ci_low", "ci_high", "lcb", "n_paired", "diff", "diff_ci_low", "diff_ci_high",
    "p_ttest", "p_wilcoxon", "p_ttest_holm", "p_wilcoxon_holm",
)
# Metrics are ratios of counts; differences that agree to 12 decimals are the same difference, and
# float noise below that must not decide signs, ties or ranks in the tests.
_DIFF_DECIMALS = 12


# --------------------------------------------------------------------------------------------- input


@dataclass
class Cell:
    """One finished (arm, seed) run with its final dev-set evaluation."""

    arm: str
    seed: int
    metrics: dict[str, float]
    per_class_f1: dict[str, float]
    confusion: list[list[int]]  # [C, C], row = true class, column = predicted class
    label_names: list[str]


def cells_from_table(df: pd.DataFrame, prefix: str = "dev/") -> list[Cell]:
    """Cells from a results table (one row per finished run) as the trainable reports them.

    Columns: ``arm``, ``seed``, numeric ``dev/<metric>`` columns (every one becomes a metric, the
    prefix stripped) and ``details``: JSON text (or an already parsed mapping) holding
    ``label_names``, ``dev/per_class_f1`` and ``dev/confusion``. A row without details still yields
    a cell (its scalar metrics count; it adds nothing to the per-class and confusion sections).
    """
    missing = {"arm", "seed"} - set(df.columns)
    if missing:
        raise ValueError(f"results table lacks column(s) {sorted(missing)}")
    metric_cols = [c for c in df.columns if isinstance(c, str) and c.startswith(prefix)
                   and pd.api.types.is_numeric_dtype(df[c])]
    cells = []
    for rec in df.to_dict("records"):
        details = _parse_details(rec.get("details"))
        f1 = {str(k): float(v) for k, v in (details.get(f"{prefix}per_class_f1") or {}).items()}
        cells.append(Cell(
            arm=str(rec["arm"]),
            seed=int(rec["seed"]),
            metrics={c[len(prefix):]: float(rec[c]) for c in metric_cols},
            per_class_f1=f1,
            confusion=[[int(x) for x in row] for row in (details.get(f"{prefix}confusion") or [])],
            label_names=[str(n) for n in (details.get("label_names") or list(f1))],
        ))
    return cells


def _parse_details(raw: Any) -> dict[str, Any]:
    """``details`` may arrive as JSON text (CSV / parquet round trip), a mapping, or be missing."""
    if isinstance(raw, Mapping):
        return dict(raw)
    if isinstance(raw, (str, bytes)) and raw.strip():
        return json.loads(raw)
    return {}


# ------------------------------------------------------------------------------------------ statistics


class MeanCI(NamedTuple):
    """Sample size, mean, std (ddof=1) and the Student-t confidence interval of the mean."""

    n: int
    mean: float
    std: float
    low: float
    high: float


def mean_ci(values: Sequence[float] | np.ndarray, confidence: float = 0.95) -> MeanCI:
    """Mean with a Student-t interval; non-finite values are dropped.

    With one value there is no spread estimate, so std and the interval are NaN (never a
    zero-width interval that would look like certainty).
    """
    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    n = int(x.size)
    if n == 0:
        return MeanCI(0, math.nan, math.nan, math.nan, math.nan)
    mean = float(x.mean())
    if n < 2:
        return MeanCI(n, mean, math.nan, math.nan, math.nan)
    std = float(x.std(ddof=1))
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1)) * std / math.sqrt(n)
    return MeanCI(n, mean, std, mean - half, mean + half)


def _clean_diffs(d: np.ndarray) -> np.ndarray:
    return np.round(np.asarray(d, dtype=float), _DIFF_DECIMALS)


def paired_ttest_p(arm_values: np.ndarray, baseline_values: np.ndarray) -> float:
    """Two-sided paired t-test p (``scipy.stats.ttest_rel``) of arm against baseline.

    The t statistic divides by the std of the differences, which is 0 when every seed moved by the
    same amount; scipy then answers NaN (0/0) or warns. Convention instead: all differences 0 ->
    p = 1.0 (no evidence of any difference); all differences equal and nonzero -> p = 0.0 (a
    perfectly consistent shift; the limit of t -> infinity). Fewer than 2 pairs -> NaN.
    """
    a = np.asarray(arm_values, dtype=float)
    b = np.asarray(baseline_values, dtype=float)
    d = _clean_diffs(a - b)
    if d.size < 2:
        return math.nan
    if np.all(d == 0):
        return 1.0
    if np.all(d == d[0]):
        return 0.0
    return float(stats.ttest_rel(a, b, alternative="two-sided").pvalue)


def wilcoxon_p(diffs: np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p of the paired differences (``scipy.stats.wilcoxon``).

    Zero differences are dropped (``zero_method="wilcox"``); all differences zero -> p = 1.0.
    ``method="auto"`` uses the exact null distribution for up to 50 differences without ties or
    zeros, and exhaustive sign-flip permutations (also exact) with ties or zeros for up to 13,
    which covers every realistic seed count.

    Being a rank test, it cannot go below ``2 / 2**n`` with n (nonzero) paired seeds: 0.25 for 3
    seeds, 0.125 for 4, 0.0625 for 5. With few seeds a "non-significant" Wilcoxon p says more about
    the seed count than about the arms; read it next to the t-test and the CI of the difference.
    """
    d = _clean_diffs(diffs)
    d = d[np.isfinite(d)]
    if d.size == 0:
        return math.nan
    if np.all(d == 0):
        return 1.0
    return float(stats.wilcoxon(d, zero_method="wilcox", alternative="two-sided", method="auto").pvalue)


def holm(pvalues: Sequence[float] | np.ndarray) -> np.ndarray:
    """Holm-Bonferroni step-down adjusted p-values (same order as the input).

    The i-th smallest of m p-values is multiplied by (m - i + 1); a running maximum keeps the
    adjusted values monotone in the raw ones, and they are capped at 1. NaN p-values (arms with
    too few paired seeds) stay NaN and are not counted in m: they were never tested.
    """
    p = np.asarray(pvalues, dtype=float)
    out = np.full(p.shape, math.nan)
    ok = np.flatnonzero(np.isfinite(p))
    m = ok.size
    if m == 0:
        return out
    order = ok[np.argsort(p[ok], kind="stable")]
    scaled = (m - np.arange(m)) * p[order]
    out[order] = np.minimum(np.maximum.accumulate(scaled), 1.0)
    return out


# ------------------------------------------------------------------------------------------- summary


@dataclass
class AblationReport:
    """Everything :func:`summarise` found; the DataFrames are ready to render or save.

    ``values``: one row per cell (columns ``arm``, ``seed`` and one per metric), kept for plots.
    ``arms``: indexed by ``arm`` (baseline first), columns ``is_baseline``, ``n_seeds``,
    ``n_paired`` and ``{metric}_{field}`` for each field of :data:`METRIC_FIELDS`.
    ``per_class``: indexed by ``class``; column ``baseline_f1`` then one column per other arm with
    its mean paired per-class F1 difference.
    ``confused_pairs``: see :func:`confused_pairs_table`.
    """

    baseline: str
    arm_order: list[str]
    metrics: tuple[str, ...]
    confidence: float
    top_k: int
    seeds: dict[str, list[int]]
    values: pd.DataFrame
    arms: pd.DataFrame
    per_class: pd.DataFrame
    confused_pairs: pd.DataFrame
    selection_seeds: list[int] | None = None  # the seeds a tuning phase selected the configurations on


def summarise(cells: Sequence[Cell], baseline: str, metrics: Sequence[str] = DEFAULT_METRICS,
              confidence: float = 0.95, top_k: int = 5, selection_seeds: Sequence[int] | None = None) -> AblationReport:
    """Build the report: arm statistics, per-class differences and confused pairs.

    Paired quantities (``diff``, its CI, both p-values) use only the seeds present, with a finite
    value, in both the arm and the baseline; their count is ``{metric}_n_paired``. Holm correction
    runs over the non-baseline arms, separately per metric and per test.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    arm_order = _arm_order(cells, baseline)
    metrics = tuple(metrics)
    values = _values_table(cells, metrics)
    seeds = {arm: sorted(int(s) for s in values.loc[values["arm"] == arm, "seed"]) for arm in arm_order}
    labels = _label_order(cells)
    return AblationReport(
        baseline=baseline, arm_order=arm_order, metrics=metrics, confidence=confidence, top_k=top_k,
        seeds=seeds, values=values,
        arms=_arms_table(values, arm_order, baseline, metrics, confidence),
        per_class=per_class_table(cells, arm_order, baseline, labels),
        confused_pairs=confused_pairs_table(cells, arm_order, baseline, labels, top_k),
        selection_seeds=sorted(selection_seeds) if selection_seeds is not None else None,
    )


def _arm_order(cells: Sequence[Cell], baseline: str) -> list[str]:
    """Baseline first, then arms as they first appear; duplicate (arm, seed) cells are an error
    because they would silently break the pairing."""
    seen: set[tuple[str, int]] = set()
    order: list[str] = []
    for c in cells:
        key = (c.arm, int(c.seed))
        if key in seen:
            raise ValueError(f"duplicate cell for arm {c.arm!r}, seed {c.seed}")
        seen.add(key)
        if c.arm not in order:
            order.append(c.arm)
    if baseline not in order:
        raise ValueError(f"baseline arm {baseline!r} has no cells (arms: {order})")
    return [baseline] + [a for a in order if a != baseline]


def _values_table(cells: Sequence[Cell], metrics: tuple[str, ...]) -> pd.DataFrame:
    """One row per cell; a metric missing from a cell is NaN (and then left out of its n)."""
    absent = [m for m in metrics if not any(m in c.metrics for c in cells)]
    if absent:
        raise ValueError(f"no cell reports metric(s) {absent}")
    rows = [{"arm": c.arm, "seed": int(c.seed), **{m: float(c.metrics.get(m, math.nan)) for m in metrics}}
            for c in cells]
    return pd.DataFrame(rows, columns=["arm", "seed", *metrics])


def _metric_series(values: pd.DataFrame, arm: str, metric: str) -> pd.Series:
    """Finite values of one arm's metric, indexed by seed."""
    sub = values.loc[values["arm"] == arm].set_index("seed")[metric].astype(float)
    return sub[np.isfinite(sub.to_numpy())]


def paired_values(values: pd.DataFrame, arm: str, baseline: str, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """(arm, baseline) values over the seeds both have, in seed order."""
    a = _metric_series(values, arm, metric)
    b = _metric_series(values, baseline, metric)
    common = a.index.intersection(b.index).sort_values()
    return a.loc[common].to_numpy(), b.loc[common].to_numpy()


def _metric_stats(values: pd.DataFrame, arm: str, baseline: str, metric: str, confidence: float) -> dict[str, float]:
    """Unadjusted per-metric fields of one arm (the Holm columns are filled in afterwards)."""
    own = mean_ci(_metric_series(values, arm, metric).to_numpy(), confidence)
    out = {"n": own.n, "mean": own.mean, "std": own.std, "ci_low": own.low, "ci_high": own.high, "lcb": own.low}
    if arm == baseline:
        return {**out, "n_paired": own.n, "diff": math.nan, "diff_ci_low": math.nan, "diff_ci_high": math.nan,
                "p_ttest": math.nan, "p_wilcoxon": math.nan}
    a, b = paired_values(values, arm, baseline, metric)
    diff = mean_ci(a - b, confidence)
    return {**out, "n_paired": diff.n, "diff": diff.mean, "diff_ci_low": diff.low, "diff_ci_high": diff.high,
            "p_ttest": paired_ttest_p(a, b), "p_wilcoxon": wilcoxon_p(a - b)}


def _arms_table(values: pd.DataFrame, arm_order: list[str], baseline: str, metrics: tuple[str, ...],
                confidence: float) -> pd.DataFrame:
    """Wide table, one row per arm, ``{metric}_{field}`` columns."""
    base_seeds = set(values.loc[values["arm"] == baseline, "seed"])
    rows = []
    for arm in arm_order:
        arm_seeds = set(values.loc[values["arm"] == arm, "seed"])
        row: dict[str, Any] = {"arm": arm, "is_baseline": arm == baseline, "n_seeds": len(arm_seeds),
                               "n_paired": len(arm_seeds & base_seeds)}
        for m in metrics:
            row.update({f"{m}_{k}": v for k, v in _metric_stats(values, arm, baseline, m, confidence).items()})
        rows.append(row)
    table = pd.DataFrame(rows).set_index("arm")
    others = [a for a in arm_order if a != baseline]
    for m in metrics:
        for test in ("p_ttest", "p_wilcoxon"):
            table[f"{m}_{test}_holm"] = math.nan
            table.loc[others, f"{m}_{test}_holm"] = holm(table.loc[others, f"{m}_{test}"].to_numpy())
    columns = ["is_baseline", "n_seeds", "n_paired"] + [f"{m}_{f}" for m in metrics for f in METRIC_FIELDS]
    return table[columns]


def metric_table(report: AblationReport, metric: str) -> pd.DataFrame:
    """The ``arms`` columns of one metric with the prefix removed (columns = :data:`METRIC_FIELDS`)."""
    if metric not in report.metrics:
        raise KeyError(f"metric {metric!r} not in report (has {list(report.metrics)})")
    cols = {f"{metric}_{f}": f for f in METRIC_FIELDS}
    return report.arms[list(cols)].rename(columns=cols)


def arm_metrics(report: AblationReport) -> dict[str, dict[str, float]]:
    """Per arm, a flat ``{"n_seeds": .., "{metric}_{field}": ..}`` dict of the finite numbers only:
    ready for MLflow summary metrics or a JSON document, where NaN is rejected or invalid."""
    out: dict[str, dict[str, float]] = {}
    for arm, r in report.arms.drop(columns="is_baseline").iterrows():
        out[str(arm)] = {str(k): float(v) for k, v in r.items() if _is_num(v)}
    return out


def best_arm(report: AblationReport, metric: str, rule: str = "mean") -> str:
    """The arm with the highest mean (``rule="mean"``) or the highest lower confidence bound
    (``rule="lcb"``: prefers an arm that is reliably good over one that is good on average but
    erratic across seeds). Arms without the quantity (e.g. one seed under ``lcb``) are skipped;
    ties go to the earlier arm in report order."""
    if rule not in ("mean", "lcb"):
        raise ValueError(f"rule must be 'mean' or 'lcb', got {rule!r}")
    scores = metric_table(report, metric)[rule].astype(float).dropna()
    if scores.empty:
        raise ValueError(f"no arm has a finite {rule} for {metric!r} (lcb needs >= 2 seeds)")
    return str(scores.idxmax())


# ----------------------------------------------------------------------------------- per class / pairs


def _label_order(cells: Sequence[Cell]) -> list[str]:
    """Union of class names in first-appearance order (cells normally share one label set)."""
    return list(dict.fromkeys(name for c in cells for name in [*c.label_names, *c.per_class_f1]))


def per_class_table(cells: Sequence[Cell], arm_order: list[str], baseline: str, labels: list[str]) -> pd.DataFrame:
    """Index ``class``; ``baseline_f1`` = the baseline's mean F1 over all its seeds; one column per
    other arm = mean over the paired seeds of (arm F1 - baseline F1) for that class."""
    rows = [{"arm": c.arm, "seed": int(c.seed), "class": k, "f1": float(v)}
            for c in cells for k, v in c.per_class_f1.items()]
    out = pd.DataFrame(index=pd.Index(labels, name="class"))
    if not rows:
        out["baseline_f1"] = math.nan
        for arm in arm_order[1:]:
            out[arm] = math.nan
        return out
    wide = pd.DataFrame(rows).set_index(["arm", "seed", "class"])["f1"].unstack("class").reindex(columns=labels)
    arms_present = set(wide.index.get_level_values("arm"))
    base = wide.loc[baseline] if baseline in arms_present else pd.DataFrame(columns=labels, dtype=float)
    out["baseline_f1"] = base.mean()
    for arm in arm_order:
        if arm == baseline:
            continue
        if arm not in arms_present:
            out[arm] = math.nan
            continue
        mine = wide.loc[arm]
        common = mine.index.intersection(base.index)
        out[arm] = (mine.loc[common] - base.loc[common]).mean()
    return out


def pooled_confusion(cells: Sequence[Cell], labels: list[str]) -> dict[str, np.ndarray]:
    """Per arm, the confusion counts summed over its seeds, laid out in ``labels`` order."""
    pos = {name: i for i, name in enumerate(labels)}
    pooled: dict[str, np.ndarray] = {}
    for c in cells:
        if not c.confusion:
            continue
        m = np.asarray(c.confusion, dtype=np.int64)
        if m.shape != (len(c.label_names), len(c.label_names)):
            raise ValueError(f"arm {c.arm!r} seed {c.seed}: confusion shape {m.shape} does not match "
                             f"{len(c.label_names)} label names")
        idx = [pos[name] for name in c.label_names]
        total = pooled.setdefault(c.arm, np.zeros((len(labels), len(labels)), dtype=np.int64))
        total[np.ix_(idx, idx)] += m
    return pooled


def confusion_rates(counts: np.ndarray) -> np.ndarray:
    """Row-normalised rates (count / row total of the true class); NaN rows for absent classes."""
    support = counts.sum(1, keepdims=True).astype(float)
    return np.divide(counts, support, out=np.full(counts.shape, math.nan), where=support > 0)


def ranked_pairs(counts: np.ndarray, labels: list[str]) -> pd.DataFrame:
    """Off-diagonal (true, predicted) pairs with at least one confusion, most confused first
    (rate, then count; ties keep label order), with a 1-based ``rank``."""
    rates = confusion_rates(counts)
    i, j = np.nonzero(~np.eye(len(labels), dtype=bool) & (counts > 0))
    df = pd.DataFrame({"true": [labels[k] for k in i], "predicted": [labels[k] for k in j],
                       "count": counts[i, j], "support": counts.sum(1)[i], "rate": rates[i, j]})
    df = df.sort_values(["rate", "count"], ascending=[False, False], kind="stable").reset_index(drop=True)
    df["rank"] = np.arange(1, len(df) + 1)
    return df


def confused_pairs_table(cells: Sequence[Cell], arm_order: list[str], baseline: str, labels: list[str],
                         top_k: int = 5) -> pd.DataFrame:
    """Most-confused ordered pairs per arm, each with the baseline's rate for the same pair.

    Rates pool each arm's seeds (summed counts / summed row totals; on a fixed dev set this is the
    mean of the per-seed rates). For a non-baseline arm the rows are its own top-k pairs followed by
    the baseline's top-k pairs that are not among them: a confusion the arm *removed* drops out of
    its own top-k, and would otherwise be invisible. ``in_top_k`` / ``in_baseline_top_k`` say why a
    row is there; ``rank`` / ``baseline_rank`` are positions in the full rankings (NA: never confused).

    Columns: arm, true, predicted, count, support, rate, baseline_rate, rate_diff (rate -
    baseline_rate), rank, baseline_rank, in_top_k, in_baseline_top_k.
    """
    pooled = pooled_confusion(cells, labels)
    base_counts = pooled.get(baseline)
    base_rates = confusion_rates(base_counts) if base_counts is not None else None
    base_ranked = ranked_pairs(base_counts, labels) if base_counts is not None else None
    frames = [_arm_pairs(arm, pooled[arm], labels, base_rates, base_ranked, top_k, arm == baseline)
              for arm in arm_order if arm in pooled]
    columns = ["arm", "true", "predicted", "count", "support", "rate", "baseline_rate", "rate_diff",
               "rank", "baseline_rank", "in_top_k", "in_baseline_top_k"]
    frames = [f for f in frames if not f.empty]
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)
    for col in ("rank", "baseline_rank"):
        table[col] = table[col].astype("Int64")
    return table[columns]


def _arm_pairs(arm: str, counts: np.ndarray, labels: list[str], base_rates: np.ndarray | None,
               base_ranked: pd.DataFrame | None, top_k: int, is_baseline: bool) -> pd.DataFrame:
    """Rows of :func:`confused_pairs_table` for one arm."""
    ranked = ranked_pairs(counts, labels)
    own_top = list(zip(ranked["true"].head(top_k), ranked["predicted"].head(top_k)))
    base_top: list[tuple[str, str]] = []
    if base_ranked is not None:
        base_top = list(zip(base_ranked["true"].head(top_k), base_ranked["predicted"].head(top_k)))
    pairs = own_top + ([] if is_baseline else [p for p in base_top if p not in own_top])
    rank = {(t, p): r for t, p, r in zip(ranked["true"], ranked["predicted"], ranked["rank"])}
    base_rank = {} if base_ranked is None else {
        (t, p): r for t, p, r in zip(base_ranked["true"], base_ranked["predicted"], base_ranked["rank"])}
    rates = confusion_rates(counts)
    pos = {name: i for i, name in enumerate(labels)}
    rows = []
    for t, p in pairs:
        i, j = pos[t], pos[p]
        b_rate = float(base_rates[i, j]) if base_rates is not None else math.nan
        rows.append({"arm": arm, "true": t, "predicted": p, "count": int(counts[i, j]),
                     "support": int(counts[i].sum()), "rate": float(rates[i, j]), "baseline_rate": b_rate,
                     "rate_diff": float(rates[i, j]) - b_rate, "rank": rank.get((t, p), pd.NA),
                     "baseline_rank": base_rank.get((t, p), pd.NA), "in_top_k": (t, p) in own_top,
                     "in_baseline_top_k": (t, p) in base_top})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------- rendering


def _is_num(x: Any) -> bool:
    return x is not None and x is not pd.NA and isinstance(x, (int, float, np.number)) and math.isfinite(float(x))


def _fmt(x: Any, digits: int, signed: bool = False) -> str:
    """Fixed decimals (a sign when it is a difference); a dash where there is no number."""
    return f"{float(x):{'+' if signed else ''}.{digits}f}" if _is_num(x) else "—"


def _fmt_p(p: Any) -> str:
    """p-values to 3 decimals; tiny ones as '<0.001' rather than a misleading 0.000."""
    if not _is_num(p):
        return "—"
    return "<0.001" if 0 < p < 0.001 else f"{float(p):.3f}"


def _fmt_interval(low: Any, high: Any, digits: int, signed: bool = False) -> str:
    return f"[{_fmt(low, digits, signed)}, {_fmt(high, digits, signed)}]" if _is_num(low) and _is_num(high) else "—"


def _pretty(metric: str) -> str:
    return PRETTY_METRICS.get(metric, metric)


def _markdown(cells: pd.DataFrame) -> str:
    """``cells`` (already formatted text) as a GitHub pipe table, rendered by pandas / tabulate:
    first column left-aligned, the numeric rest right-aligned. ``disable_numparse``: tabulate would
    otherwise re-read "0.8100" as a number and drop its trailing zeros. A ``|`` in a name (cell or
    header) would end the cell, so it is escaped; nothing else needs escaping in a pipe table."""
    def esc(text: Any) -> str:
        return str(text).replace("|", r"\|")

    cells = cells.map(esc).rename(columns=esc)
    align = ["left"] + ["right"] * (cells.shape[1] - 1)
    return cells.to_markdown(index=False, disable_numparse=True, colalign=align)


def design_sentence(report: AblationReport) -> str:
    """One paragraph stating the baseline, the seeds and how the comparisons were made."""
    base_seeds = report.seeds[report.baseline]
    all_seeds = sorted({s for seeds in report.seeds.values() for s in seeds})
    gaps = [f"{arm} lacks seed(s) {', '.join(map(str, sorted(set(all_seeds) - set(seeds))))}"
            for arm, seeds in report.seeds.items() if set(seeds) != set(all_seeds)]
    n_other = len(report.arm_order) - 1
    conf = f"{report.confidence * 100:g}%"
    return (f"Baseline: **{report.baseline}**. Arms: {', '.join(report.arm_order)}. "
            f"Seeds: {', '.join(map(str, all_seeds))} ({len(all_seeds)} seeds"
            + (f"; {'; '.join(gaps)}" if gaps else "") + "). "
            f"Paired design: a seed gives every arm the same data order and initial weights, so each arm "
            f"is compared with the baseline through the per-seed differences (arm − baseline) over the "
            f"seeds both finished (n paired). Δ is their mean with a {conf} Student-t interval; p-values "
            f"come from a two-sided paired t-test and a Wilcoxon signed-rank test, Holm-corrected over the "
            f"{n_other} non-baseline arm(s), per metric and test. With n paired seeds the smallest "
            f"possible Wilcoxon p is 2/2^n ({2 / 2 ** max(len(base_seeds), 1):.3g} for {len(base_seeds)} seeds). "
            + _selection_sentence(report.selection_seeds, all_seeds))


def _selection_sentence(selected: list[int] | None, measured: list[int]) -> str:
    """Which seeds chose each arm's configuration, and whether they also scored it."""
    if selected is None:
        return "No tuning phase: each arm runs its configuration as written."
    both = sorted(set(selected) & set(measured))
    text = (f"Each arm's configuration was selected by a tuning phase on seed(s) {', '.join(map(str, selected))} "
            f"and measured on seed(s) {', '.join(map(str, measured))}")
    if both:
        return text + (f"; seed(s) {', '.join(map(str, both))} both selected and measured (tune.allow_seed_overlap), "
                       "so those cells are optimistically biased.")
    return text + ", disjoint from them."


def _md_metric_row(report: AblationReport, arm: str, r: pd.Series, digits: int) -> dict[str, str]:
    """One arm's cells: the spread of its own seeds, then the paired comparison with the baseline
    (a dash for the baseline itself, which is not compared with itself)."""
    conf = f"{report.confidence * 100:g}% CI"
    own = {"arm": f"{arm} (baseline)" if arm == report.baseline else str(arm), "n": str(int(r["n"])),
           "mean ± std": f"{_fmt(r['mean'], digits)} ± {_fmt(r['std'], digits)}",
           conf: _fmt_interval(r["ci_low"], r["ci_high"], digits)}
    vs_base = {
        f"Δ vs {report.baseline} [{conf}]": f"{_fmt(r['diff'], digits, True)} "
                                           f"{_fmt_interval(r['diff_ci_low'], r['diff_ci_high'], digits, signed=True)}",
        "n paired": str(int(r["n_paired"])),
        "p t-test (Holm)": f"{_fmt_p(r['p_ttest'])} ({_fmt_p(r['p_ttest_holm'])})",
        "p Wilcoxon (Holm)": f"{_fmt_p(r['p_wilcoxon'])} ({_fmt_p(r['p_wilcoxon_holm'])})",
    }
    return {**own, **{k: "—" if arm == report.baseline else v for k, v in vs_base.items()}}


def _md_metric_table(report: AblationReport, metric: str, digits: int) -> str:
    return _markdown(pd.DataFrame([_md_metric_row(report, arm, r, digits)
                                   for arm, r in metric_table(report, metric).iterrows()]))


def _md_per_class(report: AblationReport, digits: int) -> str:
    pc = report.per_class
    others = [a for a in report.arm_order if a != report.baseline]
    cells = pd.DataFrame({f"{report.baseline} F1": pc["baseline_f1"].map(lambda x: _fmt(x, digits)),
                          **{f"Δ {a}": pc[a].map(lambda x: _fmt(x, digits, True)) for a in others}})
    return _markdown(cells.rename_axis("class").reset_index())


def _md_confused(report: AblationReport, arm: str, digits: int) -> str:
    """The baseline's table lists its own rates; other arms' tables add the baseline's rate and rank."""
    sub = report.confused_pairs[report.confused_pairs["arm"] == arm]
    if sub.empty:
        return "_no confusions recorded_"
    base = report.baseline
    rank, base_rank = (sub[c].astype("string").fillna("—") for c in ("rank", "baseline_rank"))
    cells = pd.DataFrame({"true → predicted": sub["true"].astype(str) + " → " + sub["predicted"].astype(str),
                          "count / support": sub["count"].astype(str) + " / " + sub["support"].astype(str),
                          "rate": sub["rate"].map(lambda x: _fmt(x, digits))})
    if arm == base:
        cells["rank"] = rank
    else:
        cells[f"{base} rate"] = sub["baseline_rate"].map(lambda x: _fmt(x, digits))
        cells["Δ rate"] = sub["rate_diff"].map(lambda x: _fmt(x, digits, True))
        cells[f"rank ({arm} / {base})"] = rank + " / " + base_rank
    return _markdown(cells)


def to_markdown(report: AblationReport, metric_order: Sequence[str] | None = None, digits: int = 4,
                title: str = "Ablation report") -> str:
    """Readable report: the design sentence, one table per metric, per-class F1 differences and
    the confused pairs of each arm."""
    metric_order = list(metric_order or report.metrics)
    parts = [f"# {title}", design_sentence(report)]
    for m in metric_order:
        parts += [f"## {_pretty(m)}", _md_metric_table(report, m, digits)]
    if not report.per_class.empty:
        parts += ["## Per-class F1 (Δ vs baseline, paired over seeds)", _md_per_class(report, digits)]
    if not report.confused_pairs.empty:
        parts.append(f"## Most-confused class pairs (true → predicted, rate = share of the true class, "
                     f"seeds pooled; top {report.top_k} per arm, plus the baseline's top {report.top_k})")
        for arm in report.arm_order:
            parts += [f"### {arm}" + (" (baseline)" if arm == report.baseline else ""),
                      _md_confused(report, arm, digits)]
    return "\n\n".join(parts) + "\n"


def _tex_signed(x: Any, digits: int) -> str:
    return f"${_fmt(x, digits, signed=True)}$" if _is_num(x) else "--"


def _tex_p(p: Any) -> str:
    return "--" if not _is_num(p) else ("$<$0.001" if 0 < p < 0.001 else f"{float(p):.3f}")


def _tex_mean_std(mean: Any, std: Any, digits: int, bold: bool) -> str:
    """``$m \\pm s$`` with the mean in ``\\mathbf`` when bold (``\\textbf`` does not reach into math)."""
    if not _is_num(mean):
        return "--"
    m = f"{float(mean):.{digits}f}"
    m = rf"\mathbf{{{m}}}" if bold else m
    s = rf" \pm {float(std):.{digits}f}" if _is_num(std) else ""
    return f"${m}{s}$"


def _tex_metric_cells(report: AblationReport, metric: str, digits: int) -> pd.DataFrame:
    """The three LaTeX cells of one metric per arm: mean ± std (the best mean bold), Δ vs the
    baseline, Holm-corrected p of t-test / Wilcoxon (dashes for the baseline)."""
    t = metric_table(report, metric)
    best = _safe_best(report, metric)
    cells = pd.DataFrame({
        r"mean $\pm$ std": [_tex_mean_std(r["mean"], r["std"], digits, arm == best) for arm, r in t.iterrows()],
        r"$\Delta$": t["diff"].map(lambda x: _tex_signed(x, digits)),
        "$p_t$ / $p_W$": [f"{_tex_p(a)} / {_tex_p(b)}" for a, b in zip(t["p_ttest_holm"], t["p_wilcoxon_holm"])],
    }, index=t.index)
    cells.loc[report.baseline, cells.columns[1:]] = "--"
    return cells


def _with_cmidrules(tex: str, groups: int) -> str:
    """Styler draws no rule under a ``\\multicolumn`` header; booktabs style puts a ``\\cmidrule``
    under each metric's group (columns 3-5, 6-8, ...), right after the first header row."""
    rules = " ".join(rf"\cmidrule(lr){{{3 + 3 * k}-{5 + 3 * k}}}" for k in range(groups))
    head, sep, rest = tex.partition("\\\\\n")
    return f"{head}{sep}{rules}\n{rest}"


def to_latex(report: AblationReport, metric_order: Sequence[str] | None = None, digits: int = 3) -> str:
    """booktabs tabular of the main table: per metric mean ± std (best mean in bold), Δ vs the
    baseline, and Holm-corrected p (t-test / Wilcoxon). Needs ``\\usepackage{booktabs}``.

    Rendered by pandas' Styler (jinja2, which torch already requires). Only names are escaped
    (arm names such as ``lcl_self`` and custom metric names carry ``_``, ``&``, ...); the cells
    are LaTeX built here and pass through as they are."""
    metrics = list(metric_order or report.metrics)
    n = report.arms["n_seeds"].astype(int).astype(str).to_frame("$n$")
    cells = pd.concat({"": n, **{_pretty(m): _tex_metric_cells(report, m, digits) for m in metrics}}, axis=1)
    cells.index = [f"{a} (baseline)" if a == report.baseline else str(a) for a in cells.index]
    cells.columns.names = [None, "Arm"]  # the lower header row starts with "Arm"
    tex = (cells.style.format_index(escape="latex", axis=0).format_index(escape="latex", axis=1, level=0)
           .to_latex(hrules=True, column_format="lr" + "ccc" * len(metrics), multicol_align="c"))
    return (f"% Ablation vs baseline {report.baseline}; paired over seeds; p: Holm-corrected "
            f"(paired t-test / Wilcoxon). Requires \\usepackage{{booktabs}}.\n" + _with_cmidrules(tex, len(metrics)))


def paper_table(reports: Mapping[str, AblationReport], metrics: Sequence[str] = ("accuracy", "weighted_f1")) -> str:
    """The layout of the LCL paper's Table 1: one row per arm, per dataset its accuracy and
    weighted-F1 in percent over seeds, the std in parentheses, the best mean of a column bold.
    ``reports``: dataset name -> the test-split report of that dataset's ablation. Needs booktabs."""
    columns = {}
    for dataset, report in reports.items():
        for metric in metrics:
            t, best = metric_table(report, metric), _safe_best(report, metric)
            columns[(dataset, _pretty(metric))] = [
                (rf"\textbf{{{100 * r['mean']:.1f}}}" if arm == best else f"{100 * r['mean']:.1f}") + f" ({100 * r['std']:.1f})"
                for arm, r in t.iterrows()]
            arms = list(t.index)
    cells = pd.DataFrame(columns, index=arms)
    cells.columns.names = [None, "Arm"]
    tex = (cells.style.format_index(escape="latex", axis=0).format_index(escape="latex", axis=1, level=0)
           .to_latex(hrules=True, column_format="l" + "cc" * len(reports), multicol_align="c"))
    n = sorted({len(s) for r in reports.values() for s in r.seeds.values()})
    return (f"% Test split, mean (std) over {'/'.join(map(str, n))} seeds, in percent. Requires \\usepackage{{booktabs}}.\n"
            + tex)


def _safe_best(report: AblationReport, metric: str) -> str | None:
    try:
        return best_arm(report, metric, "mean")
    except ValueError:
        return None


# ------------------------------------------------------------------------------------------- output


def write_report(report: AblationReport, folder: str | Path) -> dict[str, Path]:
    """Write ``report.md``, ``report.tex``, ``arms.csv``, ``per_class_f1_diff.csv`` and
    ``confused_pairs.csv`` (each atomically: a reader never sees half a report); returns them
    keyed by kind."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    outputs = {
        "markdown": ("report.md", to_markdown(report)),
        "latex": ("report.tex", to_latex(report)),
        "arms": ("arms.csv", report.arms.to_csv()),
        "per_class": ("per_class_f1_diff.csv", report.per_class.to_csv()),
        "confused_pairs": ("confused_pairs.csv", report.confused_pairs.to_csv(index=False)),
    }
    return {kind: atomic_write(folder / name, text) for kind, (name, text) in outputs.items()}


def _pyplot():
    """matplotlib on the headless Agg backend (imported on first plot only)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_arms(report: AblationReport, metric: str, path: str | Path) -> Path:
    """Per-seed values (points) with each arm's mean and CI (error bar); the baseline in a
    different colour with its mean as a dashed reference line. matplotlib is imported here so
    the module stays light for table-only use."""
    plt = _pyplot()
    t = metric_table(report, metric)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(report.arm_order) + 1.5), 4.0))
    for x, arm in enumerate(report.arm_order):
        colour = "tab:red" if arm == report.baseline else "tab:blue"
        pts = _metric_series(report.values, arm, metric).to_numpy()
        offsets = np.linspace(-0.12, 0.12, pts.size) if pts.size > 1 else np.zeros(pts.size)
        ax.scatter(x - 0.18 + offsets, pts, s=18, color=colour, alpha=0.6, zorder=2)
        r = t.loc[arm]
        if _is_num(r["mean"]):
            lo = r["mean"] - r["ci_low"] if _is_num(r["ci_low"]) else 0.0
            hi = r["ci_high"] - r["mean"] if _is_num(r["ci_high"]) else 0.0
            ax.errorbar([x + 0.12], [r["mean"]], yerr=[[lo], [hi]], fmt="D", color=colour, capsize=4, zorder=3)
        if arm == report.baseline and _is_num(r["mean"]):
            ax.axhline(r["mean"], color=colour, ls="--", lw=1, alpha=0.6, zorder=1)
    ax.set_xticks(range(len(report.arm_order)),
                  [f"{a}\n(baseline)" if a == report.baseline else a for a in report.arm_order], fontsize=8)
    ax.set_ylabel(_pretty(metric))
    ax.set_title(f"{_pretty(metric)}: seeds (dots), mean ± {report.confidence * 100:g}% CI", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
