"""Ablation report: statistics checked against numpy/scipy computed independently here, pairing,
degenerate differences, per-class and confused-pair sections, best-arm rules, rendering, files."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import warnings

import numpy as np
import pandas as pd
import pytest
from conftest import need_program
from scipy import stats

from lcl_tune.analysis.report import (
    METRIC_FIELDS,
    Cell,
    arm_metrics,
    best_arm,
    cells_from_table,
    holm,
    metric_table,
    paper_table,
    plot_arms,
    summarise,
    to_latex,
    to_markdown,
    write_report,
)

SEEDS = [0, 1, 2]
# arm -> metric -> per-seed values (seed order 0, 1, 2); chosen so every difference is distinct.
VALUES = {
    "ce": {"accuracy": [0.80, 0.82, 0.81], "macro_f1": [0.70, 0.73, 0.71], "weighted_f1": [0.79, 0.81, 0.80]},
    "scl": {"accuracy": [0.82, 0.83, 0.84], "macro_f1": [0.72, 0.72, 0.75], "weighted_f1": [0.80, 0.83, 0.80]},
    "lcl_self": {"accuracy": [0.835, 0.845, 0.83], "macro_f1": [0.74, 0.78, 0.75], "weighted_f1": [0.83, 0.84, 0.82]},
}
LABELS = ["joy", "optimism", "sadness"]


def make_cells(values: dict[str, dict[str, list[float]]], seeds=SEEDS, skip=()) -> list[Cell]:
    """Cells for each (arm, seed) except those in ``skip``; a fixed confusion matrix."""
    cm = [[8, 1, 1], [1, 8, 1], [0, 1, 9]]
    return [Cell(arm, s, {m: v[i] for m, v in per_metric.items()}, {"joy": 0.8, "optimism": 0.8, "sadness": 0.9},
                 cm, LABELS)
            for arm, per_metric in values.items() for i, s in enumerate(seeds) if (arm, s) not in skip]


@pytest.fixture(scope="module")
def report():
    return summarise(make_cells(VALUES), baseline="ce")


def row(report, arm: str, metric: str) -> pd.Series:
    return metric_table(report, metric).loc[arm]


# ---------------------------------------------------------------------------------- hand-checkable stats


@pytest.mark.parametrize("metric", ["accuracy", "macro_f1", "weighted_f1"])
@pytest.mark.parametrize("arm", ["ce", "scl", "lcl_self"])
def test_mean_std_ci_match_numpy_scipy(report, arm, metric):
    x = np.array(VALUES[arm][metric])
    mean, std = x.mean(), x.std(ddof=1)
    half = stats.t.ppf(0.975, len(x) - 1) * std / np.sqrt(len(x))
    r = row(report, arm, metric)
    assert r["n"] == 3
    assert r["mean"] == pytest.approx(mean, abs=1e-12)
    assert r["std"] == pytest.approx(std, abs=1e-12)
    assert r["ci_low"] == pytest.approx(mean - half, abs=1e-12)
    assert r["ci_high"] == pytest.approx(mean + half, abs=1e-12)
    assert r["lcb"] == r["ci_low"]


@pytest.mark.parametrize("metric", ["accuracy", "macro_f1", "weighted_f1"])
@pytest.mark.parametrize("arm", ["scl", "lcl_self"])
def test_paired_diff_and_pvalues_match_scipy(report, arm, metric):
    a, b = np.array(VALUES[arm][metric]), np.array(VALUES["ce"][metric])
    d = a - b
    half = stats.t.ppf(0.975, 2) * d.std(ddof=1) / np.sqrt(3)
    r = row(report, arm, metric)
    assert r["n_paired"] == 3
    assert r["diff"] == pytest.approx(d.mean(), abs=1e-12)
    assert r["diff_ci_low"] == pytest.approx(d.mean() - half, abs=1e-12)
    assert r["diff_ci_high"] == pytest.approx(d.mean() + half, abs=1e-12)
    assert r["p_ttest"] == pytest.approx(stats.ttest_rel(a, b).pvalue, rel=1e-9)
    assert r["p_wilcoxon"] == pytest.approx(stats.wilcoxon(d).pvalue, rel=1e-9)


def test_baseline_row_has_no_comparison(report):
    r = row(report, "ce", "accuracy")
    assert all(math.isnan(r[f]) for f in ("diff", "p_ttest", "p_wilcoxon", "p_ttest_holm", "p_wilcoxon_holm"))


def test_arm_metrics_flat_and_finite(report):
    flat = arm_metrics(report)
    assert list(flat) == ["ce", "scl", "lcl_self"]
    assert flat["scl"]["accuracy_mean"] == pytest.approx(np.mean(VALUES["scl"]["accuracy"]))
    assert flat["scl"]["n_seeds"] == 3.0 and "accuracy_p_ttest_holm" in flat["scl"]
    assert "accuracy_diff" not in flat["ce"]  # NaN dropped: JSON / MLflow safe
    assert all(math.isfinite(v) for d in flat.values() for v in d.values())
    json.dumps(flat, allow_nan=False)


def test_wilcoxon_floor_with_three_seeds(report):
    # scl beats ce on every seed for accuracy: the best a two-sided signed-rank test can do is 2/2^3.
    assert row(report, "scl", "accuracy")["p_wilcoxon"] == pytest.approx(0.25)


def test_holm_hand_computed():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])  # capped at 1, monotone
    out = holm([0.01, math.nan, 0.04])  # untested arm: stays NaN, not counted in m
    assert out[0] == pytest.approx(0.02) and math.isnan(out[1]) and out[2] == pytest.approx(0.04)


@pytest.mark.parametrize("test", ["p_ttest", "p_wilcoxon"])
@pytest.mark.parametrize("metric", ["accuracy", "macro_f1"])
def test_holm_columns_over_non_baseline_arms(report, metric, test):
    p = [row(report, arm, metric)[test] for arm in ("scl", "lcl_self")]
    lo, hi = sorted(p)
    expected = {lo: min(1.0, 2 * lo), hi: min(1.0, max(2 * lo, hi))}  # Holm for m = 2 by hand
    for arm, raw in zip(("scl", "lcl_self"), p):
        assert row(report, arm, metric)[f"{test}_holm"] == pytest.approx(expected[raw])


def test_arms_table_layout(report):
    assert list(report.arms.index) == ["ce", "scl", "lcl_self"]
    assert report.arms.index.name == "arm"
    for m in ("accuracy", "macro_f1", "weighted_f1"):
        assert {f"{m}_{f}" for f in METRIC_FIELDS} <= set(report.arms.columns)
    assert report.arms["is_baseline"].tolist() == [True, False, False]


# ------------------------------------------------------------------------------------ pairing / edge cases


def test_missing_seed_uses_common_seeds_only():
    rep = summarise(make_cells(VALUES, skip={("scl", 2)}), baseline="ce")
    r = row(rep, "scl", "accuracy")
    a, b = np.array(VALUES["scl"]["accuracy"][:2]), np.array(VALUES["ce"]["accuracy"][:2])
    assert r["n"] == 2 and r["n_paired"] == 2
    assert rep.arms.loc["scl", "n_paired"] == 2 and rep.arms.loc["lcl_self", "n_paired"] == 3
    assert r["diff"] == pytest.approx((a - b).mean())
    assert r["p_ttest"] == pytest.approx(stats.ttest_rel(a, b).pvalue)
    assert "scl lacks seed(s) 2" in to_markdown(rep)


def test_baseline_missing_a_seed_also_restricts_pairs():
    rep = summarise(make_cells(VALUES, skip={("ce", 0)}), baseline="ce")
    assert row(rep, "lcl_self", "accuracy")["n_paired"] == 2
    a, b = np.array(VALUES["lcl_self"]["accuracy"][1:]), np.array(VALUES["ce"]["accuracy"][1:])
    assert row(rep, "lcl_self", "accuracy")["diff"] == pytest.approx((a - b).mean())


def test_all_zero_differences_give_p_one_without_warnings():
    values = {"ce": VALUES["ce"], "same": VALUES["ce"]}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rep = summarise(make_cells(values), baseline="ce")
    r = row(rep, "same", "accuracy")
    assert r["diff"] == 0.0
    assert r["p_ttest"] == 1.0 and r["p_wilcoxon"] == 1.0
    assert r["p_ttest_holm"] == 1.0 and r["p_wilcoxon_holm"] == 1.0


def test_constant_nonzero_shift_gives_ttest_p_zero():
    shifted = {m: [v + 0.01 for v in vals] for m, vals in VALUES["ce"].items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rep = summarise(make_cells({"ce": VALUES["ce"], "shift": shifted}), baseline="ce")
    r = row(rep, "shift", "accuracy")
    assert r["diff"] == pytest.approx(0.01)
    assert r["p_ttest"] == 0.0
    assert r["p_wilcoxon"] == pytest.approx(0.25)  # ties are fine: exact permutation distribution


def test_single_seed_has_nan_ci_not_zero_width():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rep = summarise(make_cells(VALUES, seeds=[7]), baseline="ce")
    r = row(rep, "scl", "accuracy")
    assert r["n"] == 1 and r["mean"] == pytest.approx(0.82)
    assert math.isnan(r["std"]) and math.isnan(r["ci_low"]) and math.isnan(r["p_ttest"])
    with pytest.raises(ValueError, match="lcb"):
        best_arm(rep, "accuracy", "lcb")


def test_rejects_duplicates_and_unknown_baseline():
    cells = make_cells(VALUES)
    with pytest.raises(ValueError, match="duplicate"):
        summarise(cells + cells[:1], baseline="ce")
    with pytest.raises(ValueError, match="baseline"):
        summarise(cells, baseline="nope")
    with pytest.raises(ValueError, match="metric"):
        summarise(cells, baseline="ce", metrics=("acuracy",))


# ------------------------------------------------------------------------------- per class / confusions


BASE_CM = [[6, 3, 1], [1, 8, 1], [0, 1, 9]]  # joy -> optimism 3/10
ARM_CM = [[8, 1, 1], [3, 6, 1], [0, 1, 9]]  # joy -> optimism 1/10, but optimism -> joy 3/10


@pytest.fixture(scope="module")
def class_report():
    f1 = {("ce", 0): [0.60, 0.70, 0.90], ("ce", 1): [0.62, 0.72, 0.88],
          ("lcl", 0): [0.70, 0.69, 0.90], ("lcl", 1): [0.75, 0.70, 0.90]}
    cells = [Cell(arm, seed, {"accuracy": 0.8, "macro_f1": 0.7, "weighted_f1": 0.8},
                  dict(zip(LABELS, f1[arm, seed])), BASE_CM if arm == "ce" else ARM_CM, LABELS)
             for arm, seed in f1]
    return summarise(cells, baseline="ce", top_k=1)


def test_per_class_paired_difference(class_report):
    pc = class_report.per_class
    assert list(pc.index) == LABELS and list(pc.columns) == ["baseline_f1", "lcl"]
    assert pc.loc["joy", "baseline_f1"] == pytest.approx(0.61)
    assert pc.loc["joy", "lcl"] == pytest.approx(((0.70 - 0.60) + (0.75 - 0.62)) / 2)
    assert pc.loc["optimism", "lcl"] == pytest.approx(((0.69 - 0.70) + (0.70 - 0.72)) / 2)
    assert pc.loc["sadness", "lcl"] == pytest.approx(0.01)


def test_confused_pairs_show_reduced_confusion_with_both_rates(class_report):
    cp = class_report.confused_pairs
    base = cp[cp["arm"] == "ce"]
    assert base[["true", "predicted"]].values.tolist() == [["joy", "optimism"]]  # baseline's top-1
    assert base["rate"].iloc[0] == pytest.approx(0.3)
    lcl = cp[cp["arm"] == "lcl"].set_index(["true", "predicted"])
    top = lcl.loc[("optimism", "joy")]  # the arm's own top-1 ...
    assert top["in_top_k"] and top["rate"] == pytest.approx(0.3) and top["baseline_rate"] == pytest.approx(0.1)
    fixed = lcl.loc[("joy", "optimism")]  # ... plus the baseline's top-1, which the arm reduced
    assert not fixed["in_top_k"] and fixed["in_baseline_top_k"]
    assert fixed["rate"] == pytest.approx(0.1) and fixed["baseline_rate"] == pytest.approx(0.3)
    assert fixed["rate_diff"] == pytest.approx(-0.2)
    assert fixed["count"] == 2 and fixed["support"] == 20  # pooled over the 2 seeds
    assert fixed["baseline_rank"] == 1
    header, *rows = md_table(to_markdown(class_report), "### lcl")
    assert header == ["true → predicted", "count / support", "rate", "ce rate", "Δ rate", "rank (lcl / ce)"]
    assert ["joy → optimism", "2 / 20", "0.1000", "0.3000", "-0.2000", "2 / 1"] in rows
    base_header, *base_rows = md_table(to_markdown(class_report), "### ce (baseline)")
    assert base_header[-1] == "rank" and base_rows == [["joy → optimism", "6 / 20", "0.3000", "1"]]


# ------------------------------------------------------------------------------------------- best arm


def test_best_arm_mean_vs_lcb():
    values = {"ce": {"accuracy": [0.80, 0.81, 0.79]},
              "wild": {"accuracy": [0.70, 0.95, 0.92]},  # highest mean, huge spread
              "steady": {"accuracy": [0.845, 0.85, 0.855]}}  # slightly lower mean, tiny spread
    cells = [Cell(arm, s, {"accuracy": v[i]}, {}, [], []) for arm, d in values.items()
             for v in d.values() for i, s in enumerate(SEEDS)]
    rep = summarise(cells, baseline="ce", metrics=("accuracy",))
    assert best_arm(rep, "accuracy", "mean") == "wild"
    assert best_arm(rep, "accuracy", "lcb") == "steady"
    assert rep.per_class.empty or rep.per_class.isna().all().all()
    assert rep.confused_pairs.empty
    with pytest.raises(ValueError, match="rule must be 'mean' or 'lcb', got 'median'"):
        best_arm(rep, "accuracy", "median")


# -------------------------------------------------------------------------------------- table input


def test_cells_from_table_round_trip(report):
    rows = []
    for c in make_cells(VALUES):
        details = {"label_names": c.label_names, "dev/per_class_f1": c.per_class_f1, "dev/confusion": c.confusion}
        rows.append({"arm": c.arm, "seed": c.seed, **{f"dev/{k}": v for k, v in c.metrics.items()},
                     "details": json.dumps(details), "trial_id": "x"})
    cells = cells_from_table(pd.DataFrame(rows))
    assert cells[0].metrics.keys() == {"accuracy", "macro_f1", "weighted_f1"}
    assert cells[0].label_names == LABELS and cells[0].confusion[0] == [8, 1, 1]
    again = summarise(cells, baseline="ce")
    pd.testing.assert_frame_equal(again.arms, report.arms)


# ------------------------------------------------------------------------------------------ rendering


def md_table(md: str, heading: str) -> list[list[str]]:
    r"""The pipe table right after ``heading`` as [header, *rows] of stripped cells (the alignment
    row dropped). Splits on unescaped pipes only, so an escaped ``\|`` stays inside its cell."""
    block = md.split(f"\n{heading}\n\n", 1)[1].split("\n\n", 1)[0]
    lines = block.strip().splitlines()
    assert re.fullmatch(r"\|:-+(\|-+:)+\|", lines[1]), lines[1]  # names left, numbers right
    return [[c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]] for line in [lines[0], *lines[2:]]]


def test_markdown_metric_table(report):
    md = to_markdown(report, metric_order=["macro_f1", "accuracy"])
    assert "Baseline: **ce**" in md and "Paired design" in md and "Seeds: 0, 1, 2 (3 seeds)" in md
    assert md.index("## Macro-F1") < md.index("## Accuracy") and "## Weighted-F1" not in md
    header, *rows = md_table(md, "## Accuracy")
    assert header == ["arm", "n", "mean ± std", "95% CI", "Δ vs ce [95% CI]", "n paired",
                      "p t-test (Holm)", "p Wilcoxon (Holm)"]
    assert [r[0] for r in rows] == ["ce (baseline)", "scl", "lcl_self"]
    base, scl = rows[0], rows[1]
    assert base[4:] == ["—"] * 4  # the baseline is not compared with itself
    r = row(report, "scl", "accuracy")
    assert scl[1:4] == ["3", f"{r['mean']:.4f} ± {r['std']:.4f}", f"[{r['ci_low']:.4f}, {r['ci_high']:.4f}]"]
    assert scl[4] == f"{r['diff']:+.4f} [{r['diff_ci_low']:+.4f}, {r['diff_ci_high']:+.4f}]"
    assert scl[5:] == ["3", f"{r['p_ttest']:.3f} ({r['p_ttest_holm']:.3f})",
                       f"{r['p_wilcoxon']:.3f} ({r['p_wilcoxon_holm']:.3f})"]


def test_markdown_keeps_trailing_zeros_and_dashes_missing_values():
    rep = summarise(make_cells(VALUES, seeds=[7]), baseline="ce")  # one seed: no std, no CI, no p
    md = to_markdown(rep)
    _, base, scl, _ = md_table(md, "## Accuracy")
    assert scl[2:7] == ["0.8200 ± —", "—", "+0.0200 —", "1", "— (—)"]  # (Wilcoxon: scipy's p for n = 1)
    header, *rows = md_table(md, "## Per-class F1 (Δ vs baseline, paired over seeds)")
    assert header == ["class", "ce F1", "Δ scl", "Δ lcl_self"]
    assert rows[0] == ["joy", "0.8000", "+0.0000", "+0.0000"]  # not re-read as numbers ("0.8")


ODD = {"ce": VALUES["ce"], "a|b_c&d": VALUES["scl"], "x%y~z": VALUES["lcl_self"]}


def test_markdown_escapes_pipes_in_names():
    md = to_markdown(summarise(make_cells(ODD), baseline="ce"))
    _, *rows = md_table(md, "## Accuracy")
    assert [r[0] for r in rows] == ["ce (baseline)", r"a\|b_c&d", "x%y~z"]
    assert {len(r) for r in rows} == {8}  # the pipe did not split the row
    header, *_ = md_table(md, "## Per-class F1 (Δ vs baseline, paired over seeds)")
    assert header[2] == r"Δ a\|b_c&d"


def test_latex_booktabs_and_escaping(report):
    tex = to_latex(report)
    for rule in (r"\toprule", r"\midrule", r"\bottomrule", r"\begin{tabular}{lrccccccccc}", r"\end{tabular}"):
        assert tex.count(rule) == 1
    assert r"\cmidrule(lr){3-5} \cmidrule(lr){6-8} \cmidrule(lr){9-11}" in tex
    assert r"\multicolumn{3}{c}{Macro-F1}" in tex
    assert r"lcl\_self" in tex and "lcl_self" not in tex
    head = tex.split(r"\midrule")[0].strip().splitlines()[-1]
    assert head.startswith(r"Arm & $n$ & mean $\pm$ std & $\Delta$ & $p_t$ / $p_W$ &")
    body = tex.split(r"\midrule")[1].split(r"\bottomrule")[0].strip().splitlines()
    assert len(body) == 3 and all(line.count("&") == 2 + 3 * 3 - 1 and line.endswith(r"\\") for line in body)
    base, scl, lcl = ([c.strip() for c in line.removesuffix(r"\\").split("&")] for line in body)
    assert base[:2] == ["ce (baseline)", "3"] and base[3:5] == ["--", "--"]
    r = row(report, "scl", "accuracy")
    assert scl[2:5] == [f"${r['mean']:.3f} \\pm {r['std']:.3f}$", f"${r['diff']:+.3f}$",
                        f"{r['p_ttest_holm']:.3f} / {r['p_wilcoxon_holm']:.3f}"]
    assert best_arm(report, "macro_f1") == "lcl_self"  # best mean bold, nowhere else
    assert lcl[5].startswith(r"$\mathbf{") and r"\mathbf" not in " ".join(base + scl)


def test_latex_escapes_arm_and_metric_names():
    cells = [Cell(c.arm, c.seed, {**c.metrics, "my_metric&x": 0.5}, {}, [], []) for c in make_cells(ODD)]
    tex = to_latex(summarise(cells, baseline="ce", metrics=("accuracy", "my_metric&x")))
    assert r"a|b\_c\&d &" in tex and r"x\%y\textasciitilde z &" in tex
    assert r"\multicolumn{3}{c}{my\_metric\&x}" in tex
    assert r"\Delta" in tex and r"\$" not in tex  # the cells' math is not escaped


@pytest.mark.parametrize("table", ["report.tex", "paper_table.tex"])
def test_latex_compiles_in_article_with_booktabs(report, tmp_path, table):
    """Both LaTeX files an ablation writes, as a user includes them (odd names escaped); pdflatex
    halts on the first error. CI installs pdflatex (texlive-latex-base and -recommended)."""
    pdflatex = need_program("pdflatex", "compiling the LaTeX tables")
    odd = summarise(make_cells(ODD), baseline="ce")
    body = (to_latex(odd) + to_latex(report) if table == "report.tex"
            else paper_table({"odd_set & co": odd, "toy": report}))
    doc = "\\documentclass{article}\n\\usepackage{booktabs}\n\\begin{document}\n" + body + "\n\\end{document}\n"
    (tmp_path / "t.tex").write_text(doc)
    proc = subprocess.run([pdflatex, "-interaction=nonstopmode", "-halt-on-error", "t.tex"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert (tmp_path / "t.pdf").stat().st_size > 1000


def test_module_imports_no_ray_mlflow_optuna():
    code = ("import sys, lcl_tune.analysis.report; "
            "print(sorted({'ray', 'mlflow', 'optuna'} & {m.split('.')[0] for m in sys.modules}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_write_report_writes_all_files_atomically(report, tmp_path):
    paths = write_report(report, tmp_path / "out")
    names = {p.name for p in paths.values()}
    assert names == {"report.md", "report.tex", "arms.csv", "per_class_f1_diff.csv", "confused_pairs.csv"}
    assert all(p.stat().st_size > 0 for p in paths.values())
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(names)  # no temp files left
    arms = pd.read_csv(paths["arms"], index_col="arm")
    assert arms.loc["scl", "accuracy_mean"] == pytest.approx(report.arms.loc["scl", "accuracy_mean"])
    assert "Baseline: **ce**" in paths["markdown"].read_text()


def test_plot_writes_png(report, tmp_path):
    out = plot_arms(report, "accuracy", tmp_path / "arms.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
