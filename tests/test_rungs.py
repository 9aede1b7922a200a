"""ASHA's signal: the rank correlation of each period's metric with the final one (pure)."""

import math
import random

import pytest

from lcl_tune.analysis import rungs as R


def curves_with(first_rung_noise: float, n: int = 12, periods: int = 8, seed: int = 0) -> dict[str, dict[int, float]]:
    """Trials whose final value is their quality; period 1 sees it through ``first_rung_noise``,
    later periods almost exactly."""
    rng = random.Random(seed)
    out = {}
    for i in range(n):
        quality = rng.uniform(0.3, 0.8)
        curve = {1: quality + rng.gauss(0, first_rung_noise)}
        curve.update({p: quality - 0.001 * (periods - p) for p in range(2, periods + 1)})
        out[str(i)] = curve
    return out


def test_spearman_matches_hand_computed_values_and_handles_ties_and_constants():
    assert R.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert R.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks x: 1, 2.5, 2.5, 4; y: 1, 2, 3, 4 -> r = 4.5 / sqrt(4.5 * 5)
    assert R.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / math.sqrt(4.5 * 5))
    assert R.spearman([1, 1, 1], [1, 2, 3]) is None
    assert R.ranks([3.0, 1.0, 3.0]) == [2.5, 1.0, 2.5]


def test_asha_rungs_are_the_periods_it_compares_at():
    assert R.asha_rungs(1, 2, 8) == [1, 2, 4]
    assert R.asha_rungs(2, 3, 20) == [2, 6, 18]
    assert R.asha_rungs(4, 2, 4) == []


def test_correlation_is_measured_over_trials_that_ran_to_full_length():
    curves = curves_with(first_rung_noise=0.0)
    curves["stopped"] = {1: 0.9, 2: 0.1}  # stopped at period 2: no final value, so not counted
    rows = R.rung_correlation(curves, 8, range(1, 9), rungs=[1, 2, 4])
    assert [r["period"] for r in rows] == [1, 2, 3, 4, 5, 6, 7]
    first = rows[0]
    assert first["rung"] and first["n"] == 12 and first["spearman"] == pytest.approx(1.0)
    assert not rows[2]["rung"]


def test_fewer_than_the_minimum_of_trials_report_nothing():
    curves = dict(list(curves_with(0.0).items())[:R.MIN_TRIALS - 1])
    rows = R.rung_correlation(curves, 8, [1, 2], rungs=[1, 2])
    assert [(r["n"], r["spearman"]) for r in rows] == [(R.MIN_TRIALS - 1, None)] * 2
    doc = R.document(curves, 8, [1, 2, 4], 1, "best/dev/weighted_f1")
    assert doc["advice"] is None and "not measured" in R.lines(doc)[0]
    enough = dict(list(curves_with(0.0).items())[:R.MIN_TRIALS])
    assert R.rung_correlation(enough, 8, [1])[0]["spearman"] == pytest.approx(1.0)


def test_a_noisy_first_rung_is_named_with_its_fix_and_a_clean_one_is_not():
    noisy = R.document(curves_with(first_rung_noise=1.0, n=40), 8, [1, 2, 4], 1, "best/dev/weighted_f1")
    assert noisy["periods"][0]["spearman"] < R.LOW
    text = "\n".join(R.lines(noisy))
    assert "scheduler.grace_period (now 1)" in text and "period 1" in text and "survivors" in text
    clean = R.document(curves_with(first_rung_noise=0.0), 8, [1, 2, 4], 1, "best/dev/weighted_f1")
    assert clean["advice"] is None
    assert "period 1* 1.00 (n=12)" in R.lines(clean)[0]


def test_the_document_round_trips_through_its_file(tmp_path):
    doc = R.document(curves_with(0.5), 8, [1, 2, 4], 1, "best/dev/weighted_f1")
    R.write(tmp_path, doc)
    assert R.read(tmp_path) == doc
    (tmp_path / R.FILE).write_text("{torn")
    assert R.read(tmp_path) is None
