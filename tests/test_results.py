"""The results the README reports are the files in benchmarks/results (the table cannot drift)."""

from __future__ import annotations

from pathlib import Path


import pandas as pd

REPO = Path(__file__).resolve().parents[1]
GOEMOTIONS = REPO / "benchmarks" / "results" / "ablation_goemotions_cpu"
ARMS = ["ce", "scl", "lcl-separate", "lcl-self", "lcl-uniform"]


def _pct(mean: float, std: float) -> str:
    return f"{100 * mean:.1f} ({100 * std:.1f})"


def test_the_goemotions_ablation_has_five_arms_with_five_seeds_each():
    for path in (GOEMOTIONS / "arms.csv", GOEMOTIONS / "test" / "arms.csv"):
        arms = pd.read_csv(path).set_index("arm")
        assert sorted(arms.index) == sorted(ARMS) and (arms["n_seeds"] >= 5).all(), path


def test_the_readme_table_is_the_one_in_the_results_files():
    readme = (REPO / "README.md").read_text()
    dev = pd.read_csv(GOEMOTIONS / "arms.csv").set_index("arm")
    test = pd.read_csv(GOEMOTIONS / "test" / "arms.csv").set_index("arm")
    for arm in ARMS:
        t, d = test.loc[arm], dev.loc[arm]
        row = (f"| {arm} | {int(t['n_seeds'])} | {_pct(t['accuracy_mean'], t['accuracy_std'])} | "
               f"{_pct(t['weighted_f1_mean'], t['weighted_f1_std'])} |")
        assert row in readme, row
        assert readme.split(row, 1)[1].split("\n", 1)[0].rstrip().endswith(
            f"| {_pct(d['weighted_f1_mean'], d['weighted_f1_std'])} |"), arm
