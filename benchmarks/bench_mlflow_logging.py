"""MLflow logging overhead per reported result: ``lcl_tune.adapters.tracking`` vs Ray's ``MLflowLoggerCallback``.

A benchmark, not a timed test: it measures both contenders side by side in one process and one
run, and reports the *ratio* of their costs (absolute milliseconds depend on the machine, its
disk and its load; the ratio mostly depends on how many store round trips each design makes).

What is measured
----------------
Only the logging code paths, not Tune: Ray's callback is driven directly, the way Tune's driver
drives it (``setup()``, then ``log_trial_start`` / ``log_trial_result`` / ``log_trial_end`` with a
minimal stand-in for ``ray.tune.experiment.Trial``), and ``lcl_tune.adapters.tracking`` is called the way
the trainable and the driver call it (``TrialRun(...)``, ``TrialRun.log_report(...)``,
``close_trial(...)``). Three phases are timed separately, per call:

* **trial start** - run creation plus the trial's 48 params (``TrialConfig().flat()``);
* **per result** - logging one reported result: the trainable's ~18 scalar metrics (what
  ``lcl_tune.adapters.trainable`` reports per evaluation period). Ray's callback gets what Tune would hand
  it: the same metrics plus Tune's auto-filled keys (``training_iteration``, ``time_total_s``,
  ``pid``, ``timestamp``, ..., and ``config``), all of which it logs as metrics when numeric;
* **trial end** - closing the run (ours also logs the cost ledger and the outcome tags).

Contenders: ``lcl_tune`` (one ``log_batch`` per result), ``ray`` (the callback fed a Tune-like
result) and ``ray-reported`` (the callback fed only the keys the trainable itself reports plus
``training_iteration``, which the callback needs for its step): the last one separates "one call
per metric" from "more metrics".

Fairness
--------
* same backend type: a fresh file-based SQLite store per contender and round, in a temp dir
  (copied from one template whose schema was created once: creating MLflow's schema takes ~10 s);
* same workload: identical trial configs and metric values for every contender;
* lockstep interleaving: within a round the contenders advance together (trial i starts for all
  of them, then result k is logged by all of them, ...), alternating their order, so load from
  other processes hits them alike; rounds repeat with fresh stores;
* an untimed, instrumented warm-up pass first: it pays one-off costs (imports, SQL compilation)
  and counts store calls, SQL statements and SQLite transactions (HTTP requests with ``--http``)
  per phase, which explain the ratio. Timed rounds run without instrumentation;
* Ray's stand-in trial has the full 48-key config as ``trial.config`` (so both log the same 48
  params); Tune copies ``trial.config`` into every result, where the callback logs its numeric
  values as ``config/...`` metrics. With only the sampled keys as ``trial.config`` (how
  ``lcl_tune.adapters.study_runner`` builds its Tune config) Ray would log fewer params and ~4 ``config/...``
  metrics: its cost per result then lies between the ``ray-reported`` and ``ray`` rows.

With ``--http``, the same again against one local ``mlflow server`` (127.0.0.1, its own fresh
SQLite store behind it) shared by all contenders, each in its own experiment per round, with a
smaller workload: every store call is an HTTP round trip there. Its start-up (10-50 s on a busy
2-core machine) is not timed.

Usage::

    python benchmarks/bench_mlflow_logging.py [--trials 3 --results 6 --rounds 3] [--http]
                                              [--write-results]

Writes nothing into the repository unless ``--write-results`` is given: then it replaces (or
appends) the section "## MLflow logging overhead" of ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import inspect
import math
import os
import platform
import random
import re
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

REPO = Path(__file__).resolve().parents[1]
RESULTS_FILE = REPO / "benchmarks" / "RESULTS.md"
SECTION = "## MLflow logging overhead"
RESULTS_HEADER = ("# Benchmark results\n\n"
                  "Figures are ratios measured side by side in one run (same process, same workload), "
                  "with the machine and date they were measured on.\n")

sys.path.insert(0, str(REPO))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # Ray is imported, never started
os.environ["MLFLOW_ENABLE_ASYNC_LOGGING"] = "false"  # both contenders log synchronously

import mlflow  # noqa: E402
import ray  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402
from ray._private.dict import flatten_dict  # noqa: E402
from ray.air._internal.mlflow import _MLflowLoggerUtil  # noqa: E402
from ray.air.integrations.mlflow import MLflowLoggerCallback  # noqa: E402

from lcl_tune.adapters import tracking as tracking  # noqa: E402
from lcl_tune.schema.trial import TrialConfig  # noqa: E402

PHASES = ("start", "result", "end")
STUDY = "bench"


# --------------------------------------------------------------------------------------------
# Workload: identical trial configs and reported results for every contender
# --------------------------------------------------------------------------------------------


@dataclass
class TrialSpec:
    """One trial: its Ray id, its full flat config (48 params) and where Tune would keep it."""

    trial_id: str
    config: dict[str, Any]
    local_path: str


class StandInTrial:
    """The attributes of ``ray.tune.experiment.Trial`` that ``MLflowLoggerCallback`` reads:
    it keys its run table by the trial object (hash), names the run ``str(trial)``, logs
    ``trial.config`` as params and, with ``save_artifact=True`` only, uploads ``trial.local_path``."""

    def __init__(self, spec: TrialSpec):
        self.trial_id, self.config, self.local_path = spec.trial_id, spec.config, spec.local_path

    def __str__(self) -> str:  # Tune's Trial.__str__: "<trainable>_<trial_id>"
        return f"lcl_trainable_{self.trial_id}"


def make_trials(n: int, rng: random.Random, folder: Path) -> list[TrialSpec]:
    """``n`` trials: the default TrialConfig with the quickstart search space's keys sampled."""
    # Tune's ids are 5 hex digits + "_" + 5 digits; one with a hex letter, because Ray's callback
    # logs an all-digit one ("12345_00000" parses as a float) as a `trial_id` metric
    prefix = f"{rng.getrandbits(16):04x}e"
    specs = []
    for i in range(n):
        flat = TrialConfig().flat()
        flat.update({"loss.temperature": round(math.exp(rng.uniform(math.log(0.05), 0.0)), 6),
                     "loss.lam": round(rng.random(), 6),
                     "weighting.name": rng.choice(["separate", "self", "ema", "uniform"]),
                     "optim.lr": round(math.exp(rng.uniform(math.log(3e-5), math.log(3e-4))), 9)})
        trial_id = f"{prefix}_{i:05d}"
        path = folder / f"lcl_trainable_{trial_id}"
        path.mkdir(parents=True, exist_ok=True)
        specs.append(TrialSpec(trial_id, flat, str(path)))
    return specs


def reported_metrics(k: int, rng: random.Random, steps_per_period: int = 50) -> dict[str, Any]:
    """What ``lcl_tune.adapters.trainable`` passes to ``log_report`` for evaluation period ``k + 1``: the
    Trainer's report (18 scalars and the ``finished`` flag) plus ``time/trial_wall_s``."""
    step = (k + 1) * steps_per_period
    acc = min(0.95, 0.4 + 0.05 * k + rng.uniform(-0.02, 0.02))
    return {
        "step": step, "period": k + 1, "epoch": round(step / 400, 4), "samples": step * 32,
        "lr": 2e-5 * (1 - step / 2000),
        "train/ce": rng.uniform(0.3, 1.5), "train/contrastive": rng.uniform(2.0, 4.0),
        "train/weighting_ce": rng.uniform(0.3, 1.5), "train/loss": rng.uniform(1.0, 3.0),
        "dev/loss": rng.uniform(0.5, 1.5), "dev/accuracy": acc, "dev/macro_f1": acc - 0.03,
        "dev/weighted_f1": acc - 0.01, "best/dev/weighted_f1": acc - 0.01, "best/step": step,
        "time/train_s": 3.1 * (k + 1), "time/samples_per_s": 515.0 + rng.uniform(-5, 5),
        "finished": False, "time/trial_wall_s": 3.4 * (k + 1),
    }


def tune_result(metrics: dict[str, Any], spec: TrialSpec, k: int) -> dict[str, Any]:
    """The result dict Tune hands to logger callbacks for that report: what the trainable passed
    to ``tune.report`` (metrics + ``trial_id``) plus the keys Tune fills in (checked against Ray
    2.60 by capturing a real result in a LoggerCallback)."""
    now = time.time()
    return {**metrics, "trial_id": spec.trial_id,
            "checkpoint_dir_name": f"checkpoint_{k:06d}", "config": spec.config,
            "date": dt.datetime.fromtimestamp(now).strftime("%Y-%m-%d_%H-%M-%S"), "done": False,
            "hostname": platform.node(), "node_ip": "127.0.0.1", "pid": os.getpid(),
            "iterations_since_restore": k + 1, "training_iteration": k + 1,
            "time_this_iter_s": 3.4, "time_since_restore": 3.4 * (k + 1), "time_total_s": 3.4 * (k + 1),
            "timestamp": int(now)}


def reported_only(metrics: dict[str, Any], spec: TrialSpec, k: int) -> dict[str, Any]:
    """The keys the trainable itself reports, plus the ``training_iteration`` the callback needs."""
    return {**metrics, "trial_id": spec.trial_id, "training_iteration": k + 1}


# --------------------------------------------------------------------------------------------
# Contenders
# --------------------------------------------------------------------------------------------


class Ours:
    """``lcl_tune.adapters.tracking``: child run + params in 1 search, 1 create and 1 ``log_batch`` call;
    one ``log_batch`` per reported result; the driver's ``close_trial`` at the end."""

    name = "lcl_tune"
    result_keys = "trainable's metrics"

    def __init__(self, uri: str, folder: Path, experiment: str = STUDY):
        self.uri, self.folder, self.experiment = uri, folder, experiment
        self.target = tracking.start_study(experiment, folder, uri=uri)
        self.runs: dict[str, tracking.TrialRun] = {}
        self.steps: dict[str, int] = {}

    def activate(self) -> None:
        """Nothing to do: every client names its store explicitly."""

    def restarted(self) -> "Ours":
        """The same study after a driver restart (``--resume``): a new object on the same store."""
        return Ours(self.uri, self.folder, self.experiment)

    def start(self, spec: TrialSpec) -> None:
        self.runs[spec.trial_id] = tracking.TrialRun(self.target, spec.trial_id, spec.config,
                                                     {"lcl_tune.study": STUDY})

    def result(self, spec: TrialSpec, k: int, metrics: dict[str, Any], iteration: int) -> None:
        self.steps[spec.trial_id] = metrics["step"]
        self.runs[spec.trial_id].log_report(metrics, step=metrics["step"])

    def end(self, spec: TrialSpec) -> None:
        tracking.close_trial(self.target, spec.trial_id, "completed", cost=tracking.trial_cost(30.0, 1.0, 0.0),
                             step=self.steps.get(spec.trial_id, 0))

    def metrics_per_result(self, spec: TrialSpec, metrics: dict[str, Any]) -> int:
        return sum(1 for v in metrics.values() if isinstance(v, (int, float)) and not isinstance(v, bool))

    def runs_of(self, spec: TrialSpec) -> list[Any]:
        return tracking.find_runs(MlflowClient(self.uri), self.target.experiment_id, {tracking.TAG_TRIAL: spec.trial_id})


class RayCallback:
    """Ray's ``MLflowLoggerCallback``, driven as Tune's driver drives it. ``make_result`` builds
    the result dict it is fed (Tune-like, or the trainable's keys only)."""

    def __init__(self, uri: str, folder: Path, experiment: str = STUDY, *, reported_keys_only: bool = False):
        self.uri, self.folder, self.experiment, self.reported_keys_only = uri, folder, experiment, reported_keys_only
        self.name = "ray-reported" if reported_keys_only else "ray"
        self.result_keys = "trainable's keys + training_iteration" if reported_keys_only else "Tune's result dict"
        self.make_result = reported_only if reported_keys_only else tune_result
        self.trials: dict[str, StandInTrial] = {}
        self.callback = MLflowLoggerCallback(tracking_uri=uri, experiment_name=experiment)
        self.activate()
        self.callback.setup(stop=None, num_samples=1, total_num_samples=1)

    def activate(self) -> None:
        """The callback keeps its store in MLflow's *global* tracking URI (``mlflow.set_tracking_uri``
        in ``setup``, read back per call): with several contenders in one process, point it back
        at this contender's store before each (timed) call. One callback per Tune run in practice."""
        mlflow.set_tracking_uri(self.uri)

    def restarted(self) -> "RayCallback":
        """After a driver restart (``Tuner.restore``) Tune builds a new callback and new Trial
        objects: the callback's trial -> run table is in memory only."""
        return RayCallback(self.uri, self.folder, self.experiment, reported_keys_only=self.reported_keys_only)

    def trial(self, spec: TrialSpec) -> StandInTrial:
        if spec.trial_id not in self.trials:
            self.trials[spec.trial_id] = StandInTrial(spec)
        return self.trials[spec.trial_id]

    def start(self, spec: TrialSpec) -> None:
        self.callback.log_trial_start(self.trial(spec))

    def result(self, spec: TrialSpec, k: int, metrics: dict[str, Any], iteration: int) -> None:
        self.callback.log_trial_result(iteration, self.trial(spec), self.make_result(metrics, spec, k))

    def end(self, spec: TrialSpec) -> None:
        self.callback.log_trial_end(self.trial(spec), failed=False)

    def metrics_per_result(self, spec: TrialSpec, metrics: dict[str, Any]) -> int:
        return len(_MLflowLoggerUtil()._parse_dict(flatten_dict(self.make_result(metrics, spec, 0))))

    def runs_of(self, spec: TrialSpec) -> list[Any]:
        client = MlflowClient(self.uri)
        exp = client.get_experiment_by_name(self.experiment)
        return tracking.find_runs(client, exp.experiment_id, {"trial_name": str(StandInTrial(spec))})


def make_contenders(uris: dict[str, str], folder: Path, tag: str) -> list[Any]:
    """The three contenders, each on its own store (``uris`` by contender name) and in its own
    experiment (they share one store on a tracking server)."""
    exp = {n: f"{STUDY}-{tag}-{n}" for n in CONTENDERS}
    return [Ours(uris["lcl_tune"], folder / "lcl_tune", exp["lcl_tune"]),
            RayCallback(uris["ray"], folder / "ray", exp["ray"]),
            RayCallback(uris["ray-reported"], folder / "ray-reported", exp["ray-reported"], reported_keys_only=True)]


CONTENDERS = ("lcl_tune", "ray", "ray-reported")


# --------------------------------------------------------------------------------------------
# Stores: SQLite from a template, or a local tracking server
# --------------------------------------------------------------------------------------------


def make_template(folder: Path) -> Path:
    """An empty SQLite store with MLflow's schema, created once (slow) and copied per contender."""
    path = folder / "template.db"
    MlflowClient(f"sqlite:///{path}").search_experiments(max_results=1)
    return path


def fresh_sqlite(template: Path, folder: Path, name: str) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.db"
    shutil.copyfile(template, path)
    return f"sqlite:///{path}"


@contextlib.contextmanager
def mlflow_server(folder: Path, timeout_s: float) -> Iterator[str | None]:
    """A local ``mlflow server`` on 127.0.0.1 with its own fresh SQLite store; yields its URI, or
    None when it does not answer within ``timeout_s``. Started in its own process group and
    stopped (that group only) on exit."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    folder.mkdir(parents=True, exist_ok=True)
    log = open(folder / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", f"sqlite:///{folder / 'server.db'}",
                             "--artifacts-destination", str(folder / "artifacts"), "--workers", "1"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=folder)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout_s
        while time.time() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(uri + "/health", timeout=2):
                    break
            except OSError:
                time.sleep(0.3)
        else:
            yield None
            return
        yield uri
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        log.close()


# --------------------------------------------------------------------------------------------
# Instrumentation (untimed pass only): store calls, SQL statements, transactions, HTTP requests
# --------------------------------------------------------------------------------------------


NOT_STORE_CALLS = {"shut_down_async_logging", "flush_async_logging"}  # housekeeping, no round trip


@dataclass
class Counts:
    store: Counter = field(default_factory=Counter)
    sql: int = 0
    txn: int = 0
    http: int = 0

    def total_store(self) -> int:
        return sum(self.store.values())


class Instrument:
    """Counts, while installed: outermost calls into the tracking store classes (what each
    ``MlflowClient``/fluent call turns into), SQL statements and commits on any SQLAlchemy
    engine (SQLite: one commit = one journal write + fsync), and HTTP requests of MLflow's REST
    client. ``phase(...)`` collects the counts of one call."""

    def __init__(self) -> None:
        self.current: Counts | None = None
        self._local = threading.local()
        self._undo: list[Callable[[], None]] = []

    @contextlib.contextmanager
    def phase(self) -> Iterator[Counts]:
        self.current = counts = Counts()
        try:
            yield counts
        finally:
            self.current = None

    def _wrap_store_class(self, cls: type) -> None:
        for name, fn in inspect.getmembers(cls, inspect.isfunction):
            if name.startswith("_") or name in NOT_STORE_CALLS or not inspect.isfunction(inspect.getattr_static(cls, name)):
                continue  # private helpers, housekeeping, static/class methods
            own = name in vars(cls)
            wrapper = self._store_wrapper(name, fn)
            setattr(cls, name, wrapper)
            self._undo.append((lambda c=cls, n=name, f=fn, o=own: setattr(c, n, f) if o else delattr(c, n)))

    def _store_wrapper(self, name: str, fn: Callable) -> Callable:
        local, inst = self._local, self

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            depth = getattr(local, "depth", 0)
            if depth == 0 and inst.current is not None:
                inst.current.store[name] += 1
            local.depth = depth + 1
            try:
                return fn(*args, **kwargs)
            finally:
                local.depth = depth

        wrapper.__wrapped__ = fn  # type: ignore[attr-defined]
        return wrapper

    @contextlib.contextmanager
    def installed(self) -> Iterator["Instrument"]:
        from mlflow.store.tracking.rest_store import RestStore
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
        from mlflow.utils import rest_utils
        from sqlalchemy import event
        from sqlalchemy.engine import Engine

        for cls in (SqlAlchemyStore, RestStore):
            self._wrap_store_class(cls)

        def on_sql(*_: Any) -> None:
            if self.current is not None:
                self.current.sql += 1

        def on_commit(*_: Any) -> None:
            if self.current is not None:
                self.current.txn += 1

        event.listen(Engine, "before_cursor_execute", on_sql)
        event.listen(Engine, "commit", on_commit)
        self._undo += [lambda: event.remove(Engine, "before_cursor_execute", on_sql),
                       lambda: event.remove(Engine, "commit", on_commit)]
        original_http = rest_utils.http_request

        def http_request(*args: Any, **kwargs: Any) -> Any:
            if self.current is not None:
                self.current.http += 1
            return original_http(*args, **kwargs)

        rest_utils.http_request = http_request
        self._undo.append(lambda: setattr(rest_utils, "http_request", original_http))
        try:
            yield self
        finally:
            while self._undo:
                self._undo.pop()()


# --------------------------------------------------------------------------------------------
# The lockstep loop
# --------------------------------------------------------------------------------------------


@dataclass
class Samples:
    """Per contender and phase: wall seconds of every call (timed rounds), per round."""

    times: dict[str, dict[str, list[list[float]]]] = field(default_factory=dict)
    counts: dict[str, dict[str, list[Counts]]] = field(default_factory=dict)

    def add_time(self, who: str, phase: str, rnd: int, seconds: float) -> None:
        rounds = self.times.setdefault(who, {p: [] for p in PHASES})[phase]
        while len(rounds) <= rnd:
            rounds.append([])
        rounds[rnd].append(seconds)

    def pooled(self, who: str, phase: str) -> list[float]:
        return [s for r in self.times.get(who, {}).get(phase, []) for s in r]


def run_lockstep(contenders: list[Any], trials: list[TrialSpec], results: int, rng: random.Random,
                 on_call: Callable[[Any, str, Callable[[], None]], None], flip: int = 0) -> None:
    """Advance all contenders together: trial i starts for each, then each logs result k, ...,
    then each ends it. The order of the contenders alternates between calls (``flip`` shifts it),
    so no contender always goes first after the workload generator or after another contender."""
    iteration = 0
    turn = flip

    def order() -> list[Any]:
        nonlocal turn
        turn += 1
        return list(contenders) if turn % 2 else list(reversed(contenders))

    for spec in trials:
        for c in order():
            on_call(c, "start", lambda c=c: c.start(spec))
        for k in range(results):
            metrics = reported_metrics(k, rng)
            iteration += 1
            for c in order():
                on_call(c, "result", lambda c=c: c.result(spec, k, metrics, iteration))
        for c in order():
            on_call(c, "end", lambda c=c: c.end(spec))


def timed_call(samples: Samples, rnd: int) -> Callable[[Any, str, Callable[[], None]], None]:
    def call(c: Any, phase: str, fn: Callable[[], None]) -> None:
        c.activate()
        t0 = time.perf_counter()
        fn()
        samples.add_time(c.name, phase, rnd, time.perf_counter() - t0)
    return call


def counted_call(samples: Samples, inst: Instrument) -> Callable[[Any, str, Callable[[], None]], None]:
    def call(c: Any, phase: str, fn: Callable[[], None]) -> None:
        c.activate()
        with inst.phase() as counts:
            fn()
        samples.counts.setdefault(c.name, {p: [] for p in PHASES})[phase].append(counts)
    return call


# --------------------------------------------------------------------------------------------
# Correctness observations (from the instrumented pass's stores)
# --------------------------------------------------------------------------------------------


def observe(contenders: list[Any], spec: TrialSpec, folder: Path) -> dict[str, dict[str, Any]]:
    """What each contender wrote for ``spec``: steps of ``dev/accuracy``, number of metric keys
    and params, artifacts; then a driver restart (a fresh contender object on the same store, as
    after ``--resume``/``Tuner.restore``) starting the same trial again: how many runs it has."""
    out: dict[str, dict[str, Any]] = {}
    for c in contenders:
        client = MlflowClient(c.uri)
        runs = c.runs_of(spec)
        run = client.get_run(runs[0].info.run_id)
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "dev/accuracy")]
        artifacts = [a.path for a in client.list_artifacts(run.info.run_id)]
        c.activate()
        again = c.restarted()
        again.activate()
        again.start(spec)
        keys = run.data.metrics
        out[c.name] = {"steps": steps, "metric_keys": len(keys), "params": len(run.data.params),
                       "config_keys": sum(k.startswith("config/") for k in keys),
                       "cost_keys": sum(k.startswith("cost/") for k in keys),
                       "artifacts": artifacts, "runs_after_restart": len(again.runs_of(spec))}
    return out


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def ms(x: float) -> str:
    return f"{x * 1e3:.1f}" if x < 1 else f"{x * 1e3:.0f}"


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def per_call_counts(counts: list[Counts], skip_first: bool) -> Counts:
    """Median counts of a phase; the first result of a trial is skipped when there are more
    (it inserts the metric keys the later ones only update)."""
    rows = counts[1:] if skip_first and len(counts) > 1 else counts
    if not rows:
        return Counts()
    store = Counter({k: round(statistics.median([r.store.get(k, 0) for r in rows])) for r in rows for k in r.store})
    return Counts(store, round(statistics.median([r.sql for r in rows])), round(statistics.median([r.txn for r in rows])),
                  round(statistics.median([r.http for r in rows])))


def paired_ratio(samples: Samples, who: str, base: str, phase: str) -> float:
    """Median of ``who``'s time / ``base``'s time over calls made back to back in the lockstep
    loop (same trial, same result): robust to load that changes during the run."""
    pairs = [a / b for ra, rb in zip(samples.times[who][phase], samples.times[base][phase]) for a, b in zip(ra, rb)]
    return median(pairs)


def round_ratios(samples: Samples, who: str, base: str, phase: str) -> list[float]:
    return [median(ra) / median(rb) for ra, rb in zip(samples.times[who][phase], samples.times[base][phase])]


def store_calls_text(c: Counts) -> str:
    parts = [f"{n}×{k}" if n > 1 else k for k, n in c.store.most_common() if n]
    return ", ".join(parts)


def report(label: str, samples: Samples, contenders: list[Any], spec: TrialSpec, *, http: bool,
           args_text: str) -> str:
    """A markdown table of medians per phase and call counts per result, then the ratios."""
    metrics = reported_metrics(1, random.Random(0))
    lines = [f"### {label}", "", args_text, ""]
    count_col = "HTTP requests" if http else "SQL stmts / commits"
    lines += [f"| contender | metrics / result | store calls / result | {count_col} / result | trial start (ms) "
              "| per result (ms) | trial end (ms) | whole trial (ms) |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    per_trial: dict[str, list[float]] = {}
    for c in contenders:
        res = per_call_counts(samples.counts[c.name]["result"], skip_first=True)
        meds = {p: median(samples.pooled(c.name, p)) for p in PHASES}
        rounds = [sum(samples.times[c.name]["start"][r]) + sum(samples.times[c.name]["result"][r])
                  + sum(samples.times[c.name]["end"][r]) for r in range(len(samples.times[c.name]["start"]))]
        n_trials = max(1, len(samples.times[c.name]["start"][0]))
        per_trial[c.name] = [x / n_trials for x in rounds]
        io = f"{res.http}" if http else f"{res.sql} / {res.txn}"
        lines.append(f"| `{c.name}` ({c.result_keys}) | {c.metrics_per_result(spec, metrics)} | {res.total_store()} | {io} "
                     f"| {ms(meds['start'])} | {ms(meds['result'])} | {ms(meds['end'])} | {ms(median(per_trial[c.name]))} |")
    lines.append("")
    for c in contenders:
        counts = samples.counts[c.name]
        lines.append(f"- `{c.name}` store calls: trial start: {store_calls_text(per_call_counts(counts['start'], False))}; "
                     f"per result: {store_calls_text(per_call_counts(counts['result'], True))}; "
                     f"trial end: {store_calls_text(per_call_counts(counts['end'], False))}")
    lines += ["", "Ratios: median over the paired calls (the same result or trial, logged back to back by "
              "both contenders), then per round the ratio of the round's medians:", ""]
    ours = contenders[0].name
    for c in contenders[1:]:
        for phase, what in (("result", "per result"), ("start", "per trial start"), ("end", "per trial end")):
            lines.append(f"- **{c.name} / {ours}, {what}: {paired_ratio(samples, c.name, ours, phase):.1f}×** "
                         "(per round: " + ", ".join(f"{x:.1f}×" for x in round_ratios(samples, c.name, ours, phase)) + ")")
        whole = [a / b for a, b in zip(per_trial[c.name], per_trial[ours])]
        lines.append(f"- {c.name} / {ours}, whole trial (start + results + end): {median(whole):.1f}× "
                     "(per round: " + ", ".join(f"{x:.1f}×" for x in whole) + ")")
    return "\n".join(lines) + "\n"


def machine_info(load_before: tuple[float, ...], tmp: Path) -> str:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        m = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu = m.group(1).strip() if m else cpu
    import sqlalchemy

    load_after = os.getloadavg()
    return (f"- date: {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}\n"
            f"- machine: {cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}; "
            f"load average (1 min) {load_before[0]:.1f} before, {load_after[0]:.1f} after\n"
            f"- stores in {tmp.parent} ({_fs_type(tmp)})\n"
            f"- Python {platform.python_version()}, mlflow {mlflow.__version__}, ray {ray.__version__}, "
            f"SQLAlchemy {sqlalchemy.__version__}, SQLite {sqlite3.sqlite_version}\n")


def _fs_type(path: Path) -> str:
    best, fstype = "", "unknown fs"
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) > 2 and str(path).startswith(parts[1]) and len(parts[1]) > len(best):
                best, fstype = parts[1], parts[2]
    return fstype


def observations_text(obs: dict[str, dict[str, Any]]) -> str:
    lines = ["Observed in the instrumented pass (same trial, same values):", ""]
    for name, o in obs.items():
        steps = o["steps"]
        lines.append(f"- `{name}`: `dev/accuracy` logged at steps {steps[:3]}{'…' if len(steps) > 3 else ''}, "
                     f"{o['metric_keys']} metric keys{_key_detail(o)}, {o['params']} params, "
                     f"artifacts: {o['artifacts'] or 'none'}; "
                     f"runs for the trial after a driver restart: {o['runs_after_restart']}")
    return "\n".join(lines) + "\n"


def _key_detail(o: dict[str, Any]) -> str:
    detail = ([f"{o['config_keys']} of them `config/...`"] if o["config_keys"] else []) + \
        ([f"{o['cost_keys']} of them the `cost/...` ledger logged at trial end"] if o["cost_keys"] else [])
    return f" ({'; '.join(detail)})" if detail else ""


CAVEATS = """Notes:

- `lcl_tune` logs in the trial process (one client per trial, runs in parallel); Ray's callback logs
  on the driver, inside Tune's event loop, so its time delays the processing of every trial's
  results. The per-call cost measured here is the same either way; where it is paid is not.
- Ray's callback checks the run exists (`get_run`, a full run read) and opens a client on every
  result, then makes one `log_metric` call (one store transaction; one HTTP request on a server)
  per metric. It logs Tune's bookkeeping (`pid`, `timestamp`, `time_*`, `done`, ...) and every
  numeric `config/...` value as metrics, at step `training_iteration` (not the training step).
  Params: one `log_param` call each. Its `_parse_dict` keeps whatever `float()` accepts: a Tune
  trial id whose 5 hex digits are all decimal (`12345_00000`; `float` accepts the underscore) is
  logged as a `trial_id` metric too (this benchmark's ids avoid that).
- Ray's trial -> run table lives in the callback's memory: after a driver restart
  (`Tuner.restore`) a resumed trial gets a second run, and its params are logged again there.
  `lcl_tune` finds the trial's run by its trial-id tag (that search is part of its trial start).
- `ray` gets the full 48-key config as `trial.config` (same params as `lcl_tune`), hence 19
  numeric `config/...` metrics per result; with only the sampled keys as Tune config (what
  `lcl_tune.adapters.study_runner` passes), it would be ~4, and the per-result ratio between the `ray-reported`
  and `ray` rows.
- Not timed: `lcl_tune`'s per-report artifacts (`log_details`: confusion matrix JSON, per-class
  F1, config) and the confusion-matrix PNG drawn when the trial ends, which Ray's callback has no
  counterpart for (`save_artifact=True` uploads the trial folder once, at trial end).
"""


def write_results(section: str) -> None:
    """Replace the section in ``benchmarks/RESULTS.md`` (or append it), keeping everything else."""
    text = RESULTS_FILE.read_text() if RESULTS_FILE.exists() else RESULTS_HEADER
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.M | re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section.rstrip("\n") + "\n\n", text).rstrip("\n") + "\n"
    else:
        text = text.rstrip("\n") + "\n\n" + section
    RESULTS_FILE.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_FILE.write_text(text)


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def measure(label: str, store_for: Callable[[str, str], str], trials: int, results: int, rounds: int, tmp: Path,
            rng: random.Random, http: bool) -> str:
    """Instrumented warm-up pass (1 trial, 3 results) + ``rounds`` timed lockstep rounds, each on
    fresh stores (``store_for(tag, contender)``) and with alternating contender order."""
    samples = Samples()
    slug = "http" if http else "sqlite"
    warm_dir = tmp / f"{slug}-warmup"
    warm_trials = make_trials(1, rng, warm_dir / "trials")
    contenders = make_contenders({n: store_for(f"{slug}-warmup", n) for n in CONTENDERS}, warm_dir, "warmup")
    with Instrument().installed() as inst:
        run_lockstep(contenders, warm_trials, 3, rng, counted_call(samples, inst))
    obs = observe(contenders, warm_trials[0], warm_dir)
    for rnd in range(rounds):
        rdir = tmp / f"{slug}-round{rnd}"
        cs = make_contenders({n: store_for(f"{slug}-round{rnd}", n) for n in CONTENDERS}, rdir, f"round{rnd}")
        if rnd % 2:
            cs = [cs[0]] + cs[:0:-1]  # vary which Ray variant is adjacent to ours too
        t0 = time.perf_counter()
        run_lockstep(cs, make_trials(trials, rng, rdir / "trials"), results, rng, timed_call(samples, rnd), flip=rnd)
        print(f"  {label}: round {rnd + 1}/{rounds} done in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    args_text = (f"{trials} trials × {results} results per contender per round, {rounds} rounds "
                 f"({trials * results * rounds} timed results each). Times: medians over all calls; "
                 "whole trial: the sum of a trial's calls (mean per round, median over rounds). "
                 "Counts: per call, from the instrumented pass.")
    return report(label, samples, contenders, warm_trials[0], http=http, args_text=args_text) + "\n" \
        + observations_text(obs)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    # Defaults sized to finish in ~1-2 min on a busy 2-core machine: Ray's callback costs
    # 0.3-0.6 s per result there (46 transactions), so the workload is small but still gives
    # 54 paired per-result samples per contender.
    p.add_argument("--trials", type=int, default=3, help="trials per round (default 3)")
    p.add_argument("--results", type=int, default=6, help="reported results per trial (default 6)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds, fresh stores each (default 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--http", action="store_true",
                   help="also measure against a local `mlflow server` on 127.0.0.1 (slow to start; smaller workload)")
    p.add_argument("--http-trials", type=int, default=2, help="trials per round with --http (default 2)")
    p.add_argument("--http-results", type=int, default=4, help="results per trial with --http (default 4)")
    p.add_argument("--http-rounds", type=int, default=2, help="rounds with --http (default 2)")
    p.add_argument("--server-timeout", type=float, default=90.0, help="seconds to wait for the server to answer")
    p.add_argument("--write-results", action="store_true",
                   help=f"replace/append the section '{SECTION}' in {RESULTS_FILE.relative_to(REPO)}")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started, load_before = time.perf_counter(), os.getloadavg()
    rng = random.Random(args.seed)
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="bench-mlflow-") as name:
        tmp = Path(name)
        os.chdir(tmp)  # MLflow's default artifact root is ./mlruns: keep it out of the repository
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                t0 = time.perf_counter()
                template = make_template(tmp)
                print(f"  SQLite template store created in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
                parts = [measure("SQLite (file)", lambda tag, n: fresh_sqlite(template, tmp / tag, n),
                                 args.trials, args.results, args.rounds, tmp, rng, http=False)]
                if args.http:
                    with mlflow_server(tmp / "server", args.server_timeout) as uri:
                        if uri is None:
                            parts.append("### HTTP (local mlflow server)\n\nskipped: the server did not answer "
                                         f"within {args.server_timeout:.0f}s\n")
                        else:
                            parts.append(measure("HTTP (local mlflow server, SQLite behind it)", lambda tag, n: uri,
                                                 args.http_trials, args.http_results, args.http_rounds, tmp,
                                                 rng, http=True))
            failed = [w for w in caught if "MLflow" in str(w.message) and "failed" in str(w.message)]
            if failed:  # lcl_tune's _retry turns errors into warnings: a benchmark must not hide them
                raise RuntimeError(f"logging failed during the benchmark: {failed[0].message}")
            info = machine_info(load_before, tmp)
        finally:
            os.chdir(cwd)
    command = " ".join(["python", "benchmarks/bench_mlflow_logging.py", *(argv if argv is not None else sys.argv[1:])])
    section = (f"{SECTION}\n\n`{command}` — logging cost of one trial's MLflow "
               "tracking: `lcl_tune.adapters.tracking` (one `log_batch` per reported result) vs Ray's "
               "`MLflowLoggerCallback` (driven directly, same process, interleaved, fresh store each).\n\n"
               + info + f"- took {time.perf_counter() - started:.0f} s in all\n\n" + "\n".join(parts) + "\n" + CAVEATS)
    print(section)
    print(f"(finished in {time.perf_counter() - started:.0f}s)", file=sys.stderr)
    if args.write_results:
        write_results(section)
        print(f"wrote {RESULTS_FILE}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
