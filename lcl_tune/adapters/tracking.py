"""MLflow layout of a study, written with the plain client (not Ray's MLflowLoggerCallback).

* one **experiment** per study, named by the study;
* one **parent run** per study (tags: study, kind, git commit, package version; artifacts: the
  resolved study YAML and the command), which gets the summary when the study ends: best trial,
  ``results.parquet``, a parallel-coordinates plot and parameter importances, and the cost ledger;
* one **child run** per trial (tag ``mlflow.parentRunId``), named from its config
  (``lcl·separate·τ=0.12·λ=0.31``), params under the YAML's dotted keys, one ``log_batch`` call
  per reported result (all metrics at their step), artifacts: config, confusion matrix (JSON and
  PNG, of the latest report), per-class F1 table; its outcome (completed / stopped early /
  errored) as a tag.

A trial's run is found again by its Ray trial id, so retries and ``--resume`` continue the same
run: exactly one run per trial. Tracking never kills a trial: a failed log call is retried, then
warned about.

Adapter module: imports MLflow (with an install hint when missing).
"""

from __future__ import annotations

import base64
import dataclasses
import fcntl
import json
import math
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from lcl_tune.adapters.spool import SenderProcess, Spool, SpoolSender, replay, spools
from lcl_tune.schema.trial import ConfigError
from lcl_tune.util import log, redact

try:
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("lcl_tune.adapters.tracking needs MLflow: pip install 'mlflow>=3.10'") from e

TAG_ROLE = "lcl_tune.role"  # study | trial (ablation | arm | seed for ablations)
TAG_STUDY = "lcl_tune.study"
TAG_FOLDER = "lcl_tune.folder"  # the study folder: tells two studies of the same name apart
TAG_STORAGE = "lcl_tune.storage"  # a study's storage URI, when remote: the same study from another driver's folder
TAG_TRIAL = "lcl_tune.trial_id"
TAG_PREVIOUS = "lcl_tune.previous_trial_id"  # the Ray trial whose run a takeover handed on (hand_over_run)
TAG_STATUS = "lcl_tune.status"
TAG_STOPPED = "lcl_tune.stopped_early"
TAG_ERROR = "lcl_tune.error"
TAG_PARENT = "mlflow.parentRunId"
TAG_NAME = "mlflow.runName"
MAX_PARAM_CHARS = 6000


@dataclass(frozen=True)
class TrackingTarget:
    """Where a study's runs go; small and picklable, shipped to every trial."""

    uri: str
    experiment_id: str
    parent_run_id: str
    spool_dir: str | None = None  # the study's spool folder (see adapters/spool.py); None: send directly

    def client(self) -> MlflowClient:
        return MlflowClient(tracking_uri=self.uri)

    def as_dict(self) -> dict[str, str | None]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------
# Store, experiment, parent run (driver side)
# --------------------------------------------------------------------------------------------


STORE_NAME = "mlflow.db"
ARTIFACTS_NAME = "mlartifacts"
SPOOL_DIR = "spool"  # in a study folder: the tracking journals not yet sent (adapters/spool.py)


def default_uri(root: Path) -> str:
    """The embedded store of a storage root: SQLite at an absolute path, ``<root>/mlflow.db``."""
    return f"sqlite:///{Path(root).resolve() / STORE_NAME}"


def store_root(folder: Path) -> Path:
    """Where the store of a study, ablation or final training in ``folder`` lives: every study
    under one storage root shares ``<root>/mlflow.db`` (one experiment each), so one MLflow UI
    browses and compares them all. A folder made before stores were shared keeps its own
    ``mlflow.db``, and is used as it is (``--resume``, ``lcl-tune ui``)."""
    folder = Path(folder).resolve()
    return folder if (folder / STORE_NAME).is_file() else folder.parent


def find_store(folder: Path) -> Path | None:
    """The store that holds the runs of ``folder`` (a storage root or a folder in one), or None."""
    folder = Path(folder).resolve()
    for candidate in (folder, folder.parent):
        if (candidate / STORE_NAME).is_file():
            return candidate
    return None


def artifact_root(uri: str) -> Path | None:
    """Artifacts of a SQLite store live beside it (``<root>/mlartifacts/<experiment>``); a server
    or another database keeps them where its own configuration says (None)."""
    return Path(uri[len("sqlite:///"):]).parent / ARTIFACTS_NAME if uri.startswith("sqlite:///") else None


def study_experiment(client: MlflowClient, folder: Path) -> str | None:
    """The experiment of the study (or ablation) in ``folder``: the one holding the parent run
    tagged with that folder. A shared store holds many studies, possibly of the same name in
    other roots, so the folder, not the name, identifies it."""
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              f"tags.`{TAG_FOLDER}` = '{_quote(str(Path(folder).resolve()))}'", max_results=1)
    return runs[0].info.experiment_id if runs else None


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast (before any trial) when a tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    parts = urllib.parse.urlsplit(uri)
    request = urllib.request.Request(parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl().rstrip("/")
                                     + "/health")
    if parts.username:  # user:password@host: basic auth, as MLflow's own client (requests) sends it
        token = base64.b64encode(f"{urllib.parse.unquote(parts.username)}:"
                                 f"{urllib.parse.unquote(parts.password or '')}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            if resp.status >= 400:
                raise urllib.error.URLError(f"HTTP {resp.status}")
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise ConfigError("--tracking-uri", f"cannot reach the MLflow tracking server at {uri} ({reason})",
                          "start it (mlflow server --host ... --port ...) or fix the address; "
                          "leave --tracking-uri out to use the storage root's own SQLite store") from None


def open_store(uri: str) -> MlflowClient:
    """Create (migrate) the store before any trial touches it: concurrent first use of a new SQLite
    file by several processes can corrupt it. Two drivers starting on one new root take turns
    under a file lock, so the schema is migrated once per root."""
    check_reachable(uri)
    if not uri.startswith("sqlite:///"):
        client = MlflowClient(tracking_uri=uri)
        client.search_experiments(max_results=1)
        return client
    db = Path(uri[len("sqlite:///"):])
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(f".{db.name}.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        client = MlflowClient(tracking_uri=uri)  # MLflow opens (and migrates) the store here
        client.search_experiments(max_results=1)
    return client


def get_or_create_experiment(client: MlflowClient, name: str, artifact_root: Path | None) -> str:
    """The experiment ``name``; a new one keeps its artifacts under ``artifact_root/name``."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = (artifact_root / name).resolve().as_uri() if artifact_root is not None else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # noqa: BLE001 - another driver on the same root created it first
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def find_runs(client: MlflowClient, experiment_id: str, tags: Mapping[str, str]) -> list[Any]:
    query = " and ".join(f"tags.`{k}` = '{_quote(v)}'" for k, v in tags.items())
    return list(client.search_runs([experiment_id], query, max_results=5000))


def _quote(value: str) -> str:
    return str(value).replace("'", "\\'")


def start_study(name: str, folder: Path, *, kind: str = "study", uri: str | None = None,
                extra_tags: Mapping[str, str] | None = None, artifacts: Iterable[Path] = (),
                parent: TrackingTarget | None = None, storage: str | None = None) -> TrackingTarget:
    """Experiment + parent run for the study in ``folder`` (the same parent again on resume); with
    ``parent``, the study's run is a child of that run, in its store and experiment (the tuning
    study of an ablation's arm). With ``storage`` (the study's storage URI) the parent run is
    found by it too: a study resumed from its URI on another machine has another folder."""
    uri = parent.uri if parent is not None else (uri or default_uri(store_root(folder)))
    client = open_store(uri)
    exp_id = parent.experiment_id if parent is not None else get_or_create_experiment(client, name, artifact_root(uri))
    if parent is not None:
        extra_tags = {TAG_PARENT: parent.parent_run_id, **(extra_tags or {})}
    found = find_runs(client, exp_id, {TAG_ROLE: kind, TAG_FOLDER: str(folder)})
    if not found and storage:
        found = find_runs(client, exp_id, {TAG_ROLE: kind, TAG_STORAGE: redact(storage)})
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        client.set_tag(run_id, TAG_FOLDER, str(folder))  # where the driver keeps it now
    else:
        tags = {TAG_ROLE: kind, TAG_STUDY: name, TAG_FOLDER: str(folder), "lcl_tune.kind": kind,
                **({TAG_STORAGE: redact(storage)} if storage else {}),
                "lcl_tune.git_commit": git_commit(), "lcl_tune.version": package_version(), **(extra_tags or {})}
        run_id = client.create_run(exp_id, run_name=name, tags=tags).info.run_id
    for path in artifacts:
        client.log_artifact(run_id, str(path))
    return TrackingTarget(uri, exp_id, run_id, str(Path(folder) / SPOOL_DIR))


def child_target(parent: TrackingTarget, name: str, tags: Mapping[str, str]) -> TrackingTarget:
    """A nested run (found again by its tags) that becomes the parent of further runs: the arm
    level of an ablation (ablation → arm → seed)."""
    client = parent.client()
    found = find_runs(client, parent.experiment_id, {TAG_PARENT: parent.parent_run_id, **tags})
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
    else:
        run_id = client.create_run(parent.experiment_id, run_name=name,
                                   tags={TAG_PARENT: parent.parent_run_id, **tags}).info.run_id
    return TrackingTarget(parent.uri, parent.experiment_id, run_id, parent.spool_dir)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lcl-tune")
    except PackageNotFoundError:
        return "unknown"


# --------------------------------------------------------------------------------------------
# Child runs (trial side)
# --------------------------------------------------------------------------------------------


def run_name(flat: Mapping[str, Any]) -> str:
    """``lcl·separate·τ=0.12·λ=0.31`` / ``scl·τ=0.3·λ=0.5`` / ``ce·lr=2e-05``."""
    loss = flat.get("loss.name", "?")
    if loss == "ce" or flat.get("loss.lam") == 1.0:
        return f"ce·lr={flat.get('optim.lr', 0):.2g}"
    parts = [loss] + ([str(flat.get("weighting.name"))] if loss == "lcl" else [])
    parts += [f"τ={flat.get('loss.temperature', 0):.2g}", f"λ={flat.get('loss.lam', 0):.2f}"]
    return "·".join(parts)


def _retry(fn: Callable[[], Any], what: str, attempts: int = 4) -> Any:
    """SQLite stores answer 'database is locked' under concurrent trials: back off and retry;
    after the last attempt warn instead of killing the trial."""
    for i in range(attempts):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - tracking must never kill training
            if i == attempts - 1:
                log.warning(f"MLflow {what} failed: {e}")
                return None
            time.sleep(0.2 * 2**i)


class TrialRun:
    """The child run of one Ray trial, created once and found again on retries and resumes.

    With a spool folder (every study's target has one) nothing here waits on the store: each
    call is journalled durably in ``spool/trial-<id>.jsonl`` and sent in order by a background
    thread (:mod:`lcl_tune.adapters.spool`), so an outage of the tracking server costs training
    nothing and loses nothing. Without one, calls go straight to the store."""

    def __init__(self, target: TrackingTarget, trial_id: str, flat_config: Mapping[str, Any],
                 extra_tags: Mapping[str, str] | None = None, name: str | None = None):
        self.target, self.trial_id = target, trial_id
        tags = {TAG_PARENT: target.parent_run_id, TAG_ROLE: "trial", TAG_TRIAL: trial_id, TAG_STATUS: "running",
                **(extra_tags or {})}
        params = {k: _param_value(v) for k, v in flat_config.items()}
        self.sender = None
        self.state: dict[str, Any] = {}
        if target.spool_dir:
            self.sender = SpoolSender(Spool(Path(target.spool_dir) / f"trial-{trial_id}.jsonl"), execute,
                                      what=f"trial {trial_id}")
        self._record("open", target=target.as_dict(), trial_id=trial_id, name=name or run_name(flat_config),
                     tags=tags, params=params, ts=int(time.time() * 1000))

    @property
    def client(self) -> MlflowClient:
        return self.target.client()

    @property
    def run_id(self) -> str | None:
        """The run's id once it exists in the store (at once without a spool; after the sender
        created it with one, see :meth:`flush`)."""
        return (self.sender.state if self.sender is not None else self.state).get("run_id")

    def flush(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds until everything logged so far is in the store."""
        return self.sender.flush(timeout) if self.sender is not None else True

    def _record(self, op: str, files: Path | None = None, **args: Any) -> None:
        if self.sender is not None:
            self.sender.append(op, files, **args)
        else:
            execute({"op": op, "args": {**args, **({"dir": str(files)} if files else {})}}, self.state)

    def log_report(self, metrics: Mapping[str, float], step: int) -> None:
        ts = int(time.time() * 1000)
        self._record("metrics", metrics=[[k, float(v), ts, step] for k, v in metrics.items()
                                         if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)])

    def log_details(self, details: Mapping[str, Any], config_yaml: str) -> None:
        """The latest confusion matrix (JSON and figure), per-class F1 table and resolved config;
        each report overwrites them, so when the trial ends (however it ends: ASHA's stop is not
        seen by the trial) they are its final ones. The figure is drawn by whoever sends the record
        (:func:`execute`): the trial's own sender thread, off its training loop, and never the driver,
        whose cost per trial must not include a figure (0.07 s for 4 classes, 1.8 s for 77)."""
        with tempfile.TemporaryDirectory() as tmp:
            write_trial_artifacts(Path(tmp), details, config_yaml, figure=False)
            self._record("artifacts", Path(tmp), figure=True)

    def close(self, timeout: float = 10.0) -> bool:
        """Send what is journalled, waiting at most ``timeout`` seconds (the rest stays spooled)."""
        return self.sender.close(timeout) if self.sender is not None else True


def execute(record: dict[str, Any], state: dict[str, Any]) -> None:
    """Perform one spooled tracking record (idempotently: see :mod:`lcl_tune.adapters.spool`)."""
    op, a = record["op"], record["args"]
    if "target" in a:
        state["target"] = a["target"]
    target = TrackingTarget(**state["target"])
    client = target.client()
    if op == "open":
        run_id, found = _open_trial_run(client, target, a["trial_id"], a["name"], a["tags"], a["params"], a.get("ts"))
        # What a found run holds already counts, whatever this spool's acknowledgement says: it can be
        # older than the store (a spool copied back from the storage URI, acknowledged after the copy).
        mine = state.get("logged_step", -1) if state.get("run_id") == run_id else -1
        state["logged_step"] = max(mine, _last_logged_step(client, run_id)) if found else mine
        state["run_id"] = run_id
    elif op == "metrics":
        # A period run again (a trial restored from a checkpoint older than its last report: a kill
        # between the report and Ray's registering its checkpoint) was logged already: each step once.
        last = max((step for _, _, _, step in a["metrics"]), default=None)
        if last is None or last <= state.get("logged_step", -1):
            return
        batch = [Metric(k, v, ts, step) for k, v, ts, step in a["metrics"]]
        for i in range(0, len(batch), 1000):  # MLflow takes at most 1000 metrics per batch
            client.log_batch(state["run_id"], metrics=batch[i:i + 1000])
        state["logged_step"] = last  # kept with the spool's acknowledgement, so a restored trial's process knows it
    elif op == "artifacts":
        folder = Path(a["dir"])
        if folder.is_dir():  # its folder goes only after it was sent and acknowledged
            if a.get("figure"):
                draw_confusion_figure(folder)
            client.log_artifacts(state["run_id"], a["dir"])
    elif op == "close":
        close_trial(target, **{k: v for k, v in a.items() if k != "target"}, direct=True)
    else:
        raise ValueError(f"unknown tracking record {op!r}")


def _open_trial_run(client: MlflowClient, target: TrackingTarget, trial_id: str, name: str,
                    tags: Mapping[str, str], params: Mapping[str, str], opened_ms: int | None = None) -> tuple[str, bool]:
    """The run of ``trial_id`` (found by its tag: a retry or a replay finds the same one; a replay
    of a trial whose run was handed over, by :data:`TAG_PREVIOUS`), else a new one; and whether it
    was found. A found run is marked running again, unless it was closed after this open was
    journalled (a replay after the driver's close was sent): its outcome stands."""
    found = (find_runs(client, target.experiment_id, {TAG_PARENT: target.parent_run_id, TAG_TRIAL: trial_id})
             or find_runs(client, target.experiment_id, {TAG_PARENT: target.parent_run_id, TAG_PREVIOUS: trial_id}))
    if found:
        run = found[0]
        if not (opened_ms and run.info.end_time and run.info.end_time >= opened_ms):
            client.update_run(run.info.run_id, status="RUNNING")
            client.set_tag(run.info.run_id, TAG_STATUS, "running")
        return run.info.run_id, True
    run_id = client.create_run(target.experiment_id, run_name=name, tags=dict(tags)).info.run_id
    log_params(client, run_id, params)
    return run_id, False


def _last_logged_step(client: MlflowClient, run_id: str) -> int:
    """The last step a found run holds (-1: none). Reports log every metric at their step, so the
    steps of one metric are those of all: a report at or below it was logged already."""
    metrics = client.get_run(run_id).data.metrics
    if not metrics:
        return -1
    return max((m.step for m in client.get_metric_history(run_id, next(iter(metrics)))), default=-1)


def hand_over_run(target: TrackingTarget, previous: str, trial_id: str) -> None:
    """A Ray trial that takes over an orphaned Optuna trial (one its driver asked just before it was
    killed, which Ray's saved state does not know; see ``StudySearcher._orphan``) takes over its
    MLflow run too, so each trial is one run: the run is re-tagged with the new Ray trial id before
    the new trial opens it. The Optuna trial number is the trial's identity; Ray ids are aliases."""
    client = target.client()
    for run in find_runs(client, target.experiment_id, {TAG_PARENT: target.parent_run_id, TAG_TRIAL: previous}):
        client.set_tag(run.info.run_id, TAG_PREVIOUS, previous)
        client.set_tag(run.info.run_id, TAG_TRIAL, trial_id)


def drain_spools(folder: Path, timeout: float) -> dict[str, int]:
    """Send what the study's spools still hold (processes that died, trials still sending), for
    up to ``timeout`` seconds in all; returns ``{spool: records left}`` for those that could not drain."""
    deadline = time.monotonic() + timeout
    left = {}
    paths = spools(Path(folder) / SPOOL_DIR)  # the trials' first, then the driver's closes
    for path in sorted(paths, key=lambda p: p.name == "driver.jsonl"):
        n = replay(path, execute, max(0.0, deadline - time.monotonic()))
        if n:
            left[path.name] = n
    return left


def log_metrics(client: MlflowClient, run_id: str, metrics: Mapping[str, float], step: int) -> None:
    """All scalar metrics of one reported result in one ``log_batch`` call, at ``step``."""
    ts = int(time.time() * 1000)
    batch = [Metric(k, float(v), ts, step) for k, v in metrics.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
    _retry(lambda: client.log_batch(run_id, metrics=batch), "log_batch")


def log_details(client: MlflowClient, run_id: str, details: Mapping[str, Any], config_yaml: str, *,
                figure: bool = True) -> None:
    """The artifacts of :func:`write_trial_artifacts`, sent at once (the final training's run)."""
    with tempfile.TemporaryDirectory() as tmp:
        write_trial_artifacts(Path(tmp), details, config_yaml, figure=figure)
        _retry(lambda: client.log_artifacts(run_id, tmp), "log_artifacts")


def draw_confusion_figure(folder: Path) -> None:
    """``confusion_matrix.png`` beside the ``confusion_matrix.json`` of a report's artifacts."""
    from lcl_tune.analysis.plots import confusion_matrix_png

    source, figure = folder / "confusion_matrix.json", folder / "confusion_matrix.png"
    if source.is_file() and not figure.is_file():
        cm = json.loads(source.read_text())
        confusion_matrix_png(cm["matrix"], list(cm["labels"]), figure, title="dev confusion matrix")


def log_params(client: MlflowClient, run_id: str, flat_config: Mapping[str, Any]) -> None:
    params = [Param(k, _param_value(v)) for k, v in flat_config.items()]
    for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run_id, params=params[i:i + 100])


def _param_value(v: Any) -> str:
    text = ",".join(map(str, v)) if isinstance(v, list) else str(v)
    return text[:MAX_PARAM_CHARS]


def write_trial_artifacts(folder: Path, details: Mapping[str, Any], config_yaml: str, *, figure: bool = True) -> None:
    """A report's artifacts: resolved config, confusion matrix (JSON, and with ``figure`` a PNG)
    and per-class F1 table. A trial's reports leave the figure to their sender
    (:func:`draw_confusion_figure`); a final training draws it with its artifacts."""
    from lcl_tune.analysis.plots import confusion_matrix_png

    labels = list(details.get("label_names", []))
    cm = details.get("dev/confusion")
    (folder / "config.yaml").write_text(config_yaml)
    if cm is not None:
        (folder / "confusion_matrix.json").write_text(json.dumps({"labels": labels, "matrix": cm}))
        if figure:
            confusion_matrix_png(cm, labels, folder / "confusion_matrix.png", title="dev confusion matrix")
    f1 = details.get("dev/per_class_f1") or {}
    support = [sum(row) for row in cm] if cm is not None else [None] * len(f1)
    lines = ["class,f1,support"] + [f"{_csv(name)},{value:.6f},{s}" for (name, value), s in zip(f1.items(), support)]
    (folder / "per_class_f1.csv").write_text("\n".join(lines) + "\n")


def _csv(text: str) -> str:
    return f'"{text}"' if "," in text else text


# --------------------------------------------------------------------------------------------
# Outcomes and the study summary (driver side)
# --------------------------------------------------------------------------------------------


def close_trial(target: TrackingTarget, trial_id: str, status: str, *, cost: Mapping[str, float],
                error: str | None = None, step: int = 0, details: Mapping[str, Any] | None = None,
                ts: int | None = None, direct: bool = False, run_id: str | None = None) -> None:
    """Mark a trial's run with its outcome and cost; called by the driver, which alone knows
    whether ASHA stopped the trial. With a spool folder (and not ``direct``) it is journalled in
    ``spool/driver.jsonl`` and sent by the driver's sender process (:func:`driver_sender`), so the
    driver never waits on the store. ``details`` (the last report's) are not needed any more: the
    trial's own sender drew its figure; taken so that records journalled by 0.2 still replay.
    ``run_id``: the run, as the trial reported it; closed by its id (a search of the store's runs by
    tag otherwise, whose cost grows with the runs)."""
    ts = ts if ts is not None else int(time.time() * 1000)
    if target.spool_dir and not direct:
        driver_sender(target.spool_dir).append("close", target=target.as_dict(), trial_id=trial_id, status=status,
                                               cost=dict(cost), error=error, step=step, ts=ts, run_id=run_id)
        return
    client = target.client()
    if run_id:
        try:  # straight to the run: a lookup first (get_run) would load all its params and tags
            _finish_run(client, run_id, status, cost, error, step, ts)
            return
        except Exception:  # noqa: BLE001 - gone (deleted by hand), or the store failed: by its tag instead
            log.debug("closing run %s by its id failed; looking it up by trial %s", run_id, trial_id, exc_info=True)
    found = find_runs(client, target.experiment_id, {TAG_PARENT: target.parent_run_id, TAG_TRIAL: trial_id})
    if not found:  # the trial failed before it could create its run: create it now, so it is seen
        run_id = client.create_run(target.experiment_id, run_name=f"trial {trial_id}",
                                   tags={TAG_PARENT: target.parent_run_id, TAG_ROLE: "trial", TAG_TRIAL: trial_id}
                                   ).info.run_id
    else:
        run_id = found[0].info.run_id
    _finish_run(client, run_id, status, cost, error, step, ts)


def _finish_run(client: MlflowClient, run_id: str, status: str, cost: Mapping[str, float], error: str | None,
                step: int, ts: int) -> None:
    """The outcome's tags, the cost, the error's text, and the run's end."""
    tags = [RunTag(TAG_STATUS, status), RunTag(TAG_STOPPED, str(status == "stopped early").lower())]
    if error:
        tags.append(RunTag(TAG_ERROR, error.strip().splitlines()[-1][:4000] if error.strip() else "error"))
    metrics = [Metric(k, float(v), ts, step) for k, v in cost.items()]
    client.log_batch(run_id, metrics=metrics, tags=tags)
    if error:
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "error.txt").write_text(error)
            client.log_artifact(run_id, str(Path(tmp) / "error.txt"))
    client.set_terminated(run_id, "FAILED" if status == "errored" else "FINISHED")


_DRIVER_SENDERS: dict[str, SenderProcess | SpoolSender] = {}
SENDER_PROCESS = True
"""The driver's closes are sent by a process of their own. Unit tests that fake the store inside
this process (by patching :func:`execute`) set it False: a sender thread here then sends them."""


def driver_sender(spool_dir: str) -> SenderProcess | SpoolSender:
    """The driver's one sender (per study folder) of ``spool/driver.jsonl``: the closes of trial
    runs, in order, off Tune's event loop and out of the driver's process. The journal is not
    fsync'd: a killed driver loses nothing (the kernel has every append), a power loss may lose
    the last closes, which the summary's :func:`close_left_running` makes again."""
    if spool_dir not in _DRIVER_SENDERS:
        if SENDER_PROCESS:
            spool = Spool(Path(spool_dir) / "driver.jsonl", durable=False, remember=False)
            _DRIVER_SENDERS[spool_dir] = SenderProcess(spool, what="driver")
        else:
            _DRIVER_SENDERS[spool_dir] = SpoolSender(Spool(Path(spool_dir) / "driver.jsonl", durable=False), execute,
                                                     what="driver")
    return _DRIVER_SENDERS[spool_dir]


def close_driver_senders(timeout: float) -> list[str]:
    """Flush and stop every driver sender still running, within ``timeout`` seconds in all; returns
    the spool folders whose records were not all sent (they stay spooled for ``lcl-tune sync``).
    Every command calls it before it returns, so no sender is sending while the interpreter shuts
    down, and no sender process outlives its command."""
    deadline, left = time.monotonic() + timeout, []
    for spool_dir in list(_DRIVER_SENDERS):
        if not close_driver_sender(spool_dir, max(0.0, deadline - time.monotonic())):
            left.append(spool_dir)
    return left


def close_driver_sender(spool_dir: str | None, timeout: float) -> bool:
    """Flush and stop the driver's sender of ``spool_dir`` (True when everything was sent)."""
    sender = _DRIVER_SENDERS.pop(spool_dir, None) if spool_dir else None
    return sender.close(timeout) if sender is not None else True


def close_left_running(target: TrackingTarget, outcomes: Mapping[str, tuple[str, Mapping[str, float], int]]) -> list[str]:
    """Close the child runs still marked running whose trial has an outcome (trial id -> status,
    cost, step): the driver closes runs on a background thread, and a driver killed between a
    trial's end and its run's close would otherwise leave that run open after ``--resume``.
    Returns the trial ids closed here."""
    closed = []
    for run in child_runs(target):
        trial_id = run.data.tags.get(TAG_TRIAL)
        if run.data.tags.get(TAG_STATUS) == "running" and trial_id in outcomes:
            status, cost, step = outcomes[trial_id]
            close_trial(target, trial_id, status, cost=cost, step=step, direct=True)  # after the drain: straight to the store
            closed.append(trial_id)
    return closed


def trial_cost(wall_s: float, cpu: float, gpu: float) -> dict[str, float]:
    """The cost ledger of one trial: wall time and the resources it held for it."""
    return {"cost/wall_s": wall_s, "cost/cpu_s": wall_s * cpu, "cost/accelerator_s": wall_s * gpu}


def child_runs(target: TrackingTarget) -> list[Any]:
    return find_runs(target.client(), target.experiment_id, {TAG_PARENT: target.parent_run_id})


def drop_superseded(target: TrackingTarget, keep_trial_ids: set[str]) -> int:
    """Soft-delete child runs of trial ids that Ray no longer knows: after a driver was killed,
    trials that finished after Ray's last state save are re-run under new ids; their first runs
    are duplicates. Returns how many were deleted (they stay restorable in MLflow)."""
    client = target.client()
    n = 0
    for run in child_runs(target):
        if run.data.tags.get(TAG_TRIAL) not in keep_trial_ids:
            client.set_tag(run.info.run_id, TAG_STATUS, "superseded")
            client.delete_run(run.info.run_id)
            n += 1
    return n


COST_KEYS = ("cost/wall_s", "cost/cpu_s", "cost/accelerator_s")


def cost_summary(target: TrackingTarget, rows: list[dict[str, Any]], max_t: int | None) -> dict[str, float]:
    """The study's ledger: the sum of what its child runs logged, and what early stopping saved
    (each stopped trial projected to ``max_t`` periods at its own seconds per period)."""
    children = child_runs(target)
    total = {k: sum(r.data.metrics.get(k, 0.0) for r in children) for k in COST_KEYS}
    saved = 0.0
    for r in rows:
        periods, wall = r.get("periods") or 0, r.get("wall_s")
        if r.get("status") == "stopped early" and periods and max_t and wall == wall:  # wall == wall: not NaN
            saved += float(wall) / periods * (max_t - periods)
    total["cost/saved_by_early_stopping_s"] = saved
    full = total["cost/wall_s"] + saved
    total["cost/saved_fraction"] = saved / full if full > 0 else 0.0
    return total


def finish_study(target: TrackingTarget, *, summary_metrics: Mapping[str, float], tags: Mapping[str, str],
                 artifacts: Iterable[Path], status: str = "FINISHED") -> None:
    client = target.client()
    ts = int(time.time() * 1000)
    client.log_batch(target.parent_run_id, metrics=[Metric(k, float(v), ts, 0) for k, v in summary_metrics.items()
                                                    if v is not None and math.isfinite(float(v))],
                     tags=[RunTag(k, str(v)) for k, v in tags.items()])
    for path in artifacts:
        client.log_artifact(target.parent_run_id, str(path))
    client.set_terminated(target.parent_run_id, status)


def runs_page_url(base: str, experiment_id: str) -> str:
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs"
