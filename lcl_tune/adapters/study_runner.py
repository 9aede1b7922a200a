"""Study runner: Ray Tune schedules trials, Optuna proposes them, ASHA stops the poor ones early.

Everything of a study lives in ``<storage>/<name>/``::

    study.yaml        the resolved study (base config, space, search, scheduler, resources)
    command.txt       the exact command that started (or resumed) it
    ray/              Ray Tune's experiment folder (trial folders, checkpoints, searcher state)
    optuna.journal    the Optuna study (``optuna-dashboard optuna.journal``; ``optuna.load_study``)
    results.parquet   one row per trial: dotted config columns, final + best metrics, status, wall time
    rung_correlation.json  how well each period's metric predicted the final one (ASHA's signal)
    progress.json     the live snapshot of the trials (``lcl-tune status``; :mod:`lcl_tune.adapters.progress`)
    ray_status.log    Ray's own status table and log lines (the terminal shows the progress table)

The Optuna study lives in ``optuna.journal`` from the first trial on (:mod:`lcl_tune.adapters.searcher`):
trials ASHA stopped are PRUNED with their intermediate values, ``optuna-dashboard`` shows a study
while it runs, and ``--resume`` continues the same Optuna study, one Optuna trial per Ray trial.
Ray's results stay the source of truth for ``results.parquet``.

Adapter module: imports Ray and Optuna (with install hints when missing).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import shlex
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from lcl_tune.schema.trial import DATA_ENV, WEIGHTING_ENCODERS, ConfigError
from lcl_tune.schema.study import Study, check_schedule, load_study

try:
    import optuna
    import ray
    from ray import tune
except ImportError as e:  # pragma: no cover - exercised only without the extras
    raise ImportError(f"lcl_tune.adapters.study_runner needs Ray Tune and Optuna ({e.name} is missing): "
                      "pip install 'ray[tune]>=2.44' 'optuna>=4.0'") from e

from lcl_tune.adapters import tracking as T
from lcl_tune.adapters.keeper import checkpoint_config, tune_callbacks
from lcl_tune.adapters.place import (StudySync, exists, filesystem_of, record_folder, relocate, study_place, sync_down,
                                    sync_up)
from lcl_tune.adapters.progress import (TRIAL_LOGS, parallel_slots, ray_status_reporter, reported, showing_progress, strip_ansi,
                                        study_progress, trial_error_text, trial_log_tail, warn_on_error)
from lcl_tune.analysis import rungs as R
from lcl_tune.analysis.progress import last_error_line
from lcl_tune.adapters.searcher import (STATUS_COMPLETED, STATUS_ERRORED, STATUS_STOPPED, StudySearcher,
                                        check_sampler_options, journal_curves, make_scheduler, trial_status)
from lcl_tune.adapters.trainable import lcl_trainable
from lcl_tune.core.failures import error_kind
from lcl_tune.util import atomic_write, log, redact

# Keys whose value changes the tokenised data: a study searching them prepares data per trial.
DATA_KEYS = ("model.name", "model.tokenizer", "model.max_length", "weighting.model")


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


def run_study(study: Study, storage: str | os.PathLike = "lcl_runs", *, resume: bool = False,
              address: str | None = None, tracking_uri: str | None = None, command: str | None = None,
              verbose: int = 1, local_dir: str | os.PathLike | None = None,
              tracking_parent: "T.TrackingTarget | None" = None) -> "Any":
    """Run (or resume) ``study``; returns the results table (a pandas DataFrame). With
    ``tracking_parent`` (an ablation's arm) the study's run nests under that run, in its experiment."""
    place = study_place(storage, study.name, local_dir)
    folder, ray_dir = place.folder, place.ray_dir
    check_sampler_options(study)
    if resume:
        sync_down(place)  # a driver on a new machine: the study's files from the storage URI
    grown_from = _check_folder(study, folder, ray_dir, resume)
    folder.mkdir(parents=True, exist_ok=True)
    record_folder(folder)
    _write_study(study, folder, command)
    # The MLflow store, experiment and parent run exist before any trial starts (and are found
    # again on resume); an unreachable tracking server fails here, before Ray starts.
    target = T.start_study(study.name, folder, kind="study", uri=tracking_uri, parent=tracking_parent, storage=place.remote,
                           artifacts=[folder / "study.yaml", folder / "command.txt"])

    t_prepare = time.time()
    data, w_data = shared_data(study)
    t_prepare = time.time() - t_prepare
    derive_schedule(study, data)  # ASHA's max_t against the periods a trial has, before Ray starts
    _init_ray(address)
    cluster = ray.cluster_resources()
    check_resources(study, cluster)
    check_tracking_reach(target.uri)
    warn_gpu_memory(study)
    trainable = tune.with_resources(
        tune.with_parameters(lcl_trainable, study=study, data=data, w_data=w_data, tracking=target),
        {"cpu": study.cpu, "gpu": study.gpu})

    if resume:
        log.info(f"resuming study {study.name!r} from {ray_dir}")
        if grown_from is not None:
            log.info(f"extending study {study.name!r} from {grown_from} to {study.num_samples} trials")
            raise_sample_count(ray_dir, study.num_samples)
        tuner = tune.Tuner.restore(ray_dir, trainable, resume_unfinished=True, resume_errored=False)
    else:
        slots = parallel_slots(study.max_concurrent, cluster, study.cpu, study.gpu)
        run_config = _run_config(study, place.ray_storage, verbose,
                                 [TrialOutcomes(target, study), study_progress(study, folder, slots), StudySync(place)],
                                 folder)
        tuner = tune.Tuner(trainable, tune_config=_tune_config(study, folder / "optuna.journal", target),
                           run_config=run_config)
    start = time.time()
    with showing_progress(folder):
        grid = tuner.fit()
    t_fit = time.time() - start
    table = results_table(grid, study, place.remote)
    write_results(table, folder)
    rungs = write_rung_correlation(study, folder)
    summarise_in_mlflow(target, table, study, folder)
    sync_up(place)
    print_summary(table, study, folder, time.time() - start, rungs)
    table.attrs["timings"] = {"prepare_s": t_prepare, "fit_s": t_fit, "summary_s": time.time() - start - t_fit}
    return table


def _check_folder(study: Study, folder: Path, ray_dir: str, resume: bool) -> int | None:
    """Whether the study may start (or resume) in ``folder``; on ``--resume`` with a larger
    ``search.num_samples`` and nothing else changed, the trials it had (an extension)."""
    grown_from = None
    if resume:
        if not tune.Tuner.can_restore(ray_dir):
            raise ConfigError("--resume", f"no study to resume in {folder}",
                              "drop --resume to start it, or pass the --storage/--name it was started with")
        saved = load_study(folder / "study.yaml", check_files=False)
        if saved.num_samples != study.num_samples:
            if study.num_samples < saved.num_samples:
                raise ConfigError("search.num_samples", f"{study.num_samples} is fewer than the {saved.num_samples} "
                                  f"trials the study in {folder} was started with", "a study can be extended, not cut: "
                                  f"pass search.num_samples={saved.num_samples} or more")
            grown_from = saved.num_samples
        if _without_budget(saved) != _without_budget(study):
            raise ConfigError("--resume", f"the study differs from the one started in {folder}",
                              "resume with the same file and --set values (only search.num_samples may grow: an "
                              "extension), or start a new --name")
        torn = torn_ray_state(Path(ray_dir)) if "://" not in str(ray_dir) else []
        if torn:  # Ray would log that it cannot restore, and silently run every trial again
            raise ConfigError("--resume", f"{torn[0]} is torn (the driver was killed while Ray copied it into the "
                              "study folder), so Ray cannot resume the study", "start it again under a new --name")
    elif exists(ray_dir):
        raise ConfigError("--name", f"{folder} already holds study {study.name!r}",
                          "pass --resume to continue it, or choose another --name")
    return grown_from


def _without_budget(study: Study) -> dict[str, Any]:
    tree = study.to_dict()
    tree["search"] = {k: v for k, v in tree["search"].items() if k != "num_samples"}
    return tree


def raise_sample_count(ray_dir: str, num_samples: int) -> None:
    """Extend a study: Tune restores the number of trials to create from its saved search state
    (``search_gen_state-*.json``, the newest: a cloudpickled dict), so the number is raised there
    before the restore. The searcher then goes on asking the same Optuna study, which keeps what
    it learned."""
    import pyarrow.fs

    import ray.cloudpickle as cloudpickle

    fs, base = filesystem_of(ray_dir)
    files = [f.path for f in fs.get_file_info(pyarrow.fs.FileSelector(base))
             if Path(f.path).name.startswith("search_gen_state-") and f.path.endswith(".json")]
    if not files:
        raise ConfigError("search.num_samples", f"Ray saved no search state in {ray_dir}, so the study cannot be "
                          "extended", "start a new --name with the trials you want")
    newest = max(files)  # Ray's own pick (tune.utils.util._load_newest_checkpoint): names sort by time
    with fs.open_input_stream(newest) as fh:
        state = cloudpickle.loads(fh.readall())
    state.update(total_samples=num_samples, finished=False)
    tmp = newest + ".tmp"
    with fs.open_output_stream(tmp) as fh:
        fh.write(cloudpickle.dumps(state))
    fs.move(tmp, newest)


RAY_STATE_FILES = ("experiment_state-*.json", "search_gen_state-*.json", "searcher-state-*.pkl",
                   "basic-variant-state-*.json")  # what Tuner.restore reads: the newest of each


def torn_ray_state(experiment: Path) -> list[Path]:
    """The newest of each of Ray's state files in ``experiment`` that does not load. The driver
    writes them atomically in its staging folder, then copies them into the experiment folder with
    a plain copy: a SIGKILL during the copy leaves one torn (0 bytes, seen in CI), and Ray's restore
    then fails, logs it, and starts the experiment again from scratch."""
    import json

    import ray.cloudpickle as cloudpickle

    torn = []
    for pattern in RAY_STATE_FILES:
        newest = max(experiment.glob(pattern), default=None)
        try:
            if newest is not None:  # experiment_state is JSON; the others are cloudpickles named .json/.pkl
                (json.loads if pattern.startswith("experiment_state") else cloudpickle.loads)(newest.read_bytes())
        except Exception:  # noqa: BLE001 - EOF, decoding or unpickling errors: torn
            torn.append(newest)
    return torn


def _write_study(study: Study, folder: Path, command: str | None) -> None:
    import yaml

    (folder / "study.yaml").write_text(yaml.safe_dump(study.to_dict(), sort_keys=False))
    line = redact(command or " ".join(shlex.quote(a) for a in sys.argv))
    with open(folder / "command.txt", "a") as fh:
        fh.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')}  {line}\n")


STATE_SAVE_PERIOD = "auto"  # TUNE_GLOBAL_CHECKPOINT_S unless the user sets it: seconds, or Tune's "auto"


def _init_ray(address: str | None) -> None:
    """Connect to ``address`` or start a local Ray. Ray's classic output engine, because its newer
    one ignores a passed reporter and prints to the terminal: ours writes Ray's status to a file
    (:mod:`lcl_tune.adapters.progress`)."""
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    # Tune saves its whole experiment state (every trial's record) on a period, not at every step:
    # a save costs O(trials), so saving at every step made the driver O(trials²). "auto" (Tune's
    # own default, named here on purpose) keeps saves under 5 % of the time, at least 10 s apart.
    # A kill between two saves loses nothing: docs/cluster.md, "What a kill can cost".
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", STATE_SAVE_PERIOD)
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")  # keeper.tune_callbacks adds the ones read
    os.environ.setdefault("TUNE_ONLY_STORE_CHECKPOINT_SCORE_ATTRIBUTE", "1")  # a checkpoint's record in the state: small
    if ray.is_initialized():
        return
    if address is None:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local cluster bound to localhost
        # "local": a new one, even when another Ray cluster runs on this machine (ray.init() would
        # join the one /tmp/ray/ray_current_cluster names; joining one takes --address auto)
        ray.init(address="local", include_dashboard=False, log_to_driver=False, configure_logging=False)
    else:
        env = {k: os.environ[k] for k in (DATA_ENV,) if k in os.environ}  # the cluster's workers read data there too
        ray.init(address=address, log_to_driver=False, runtime_env={"env_vars": env} if env else None)


def derive_schedule(study: Study, data: Any) -> None:
    """Check (or derive) ASHA's ``max_t`` now that the training rows are known, when the study
    file alone could not tell the periods of a trial (``train.epochs`` with ``train.eval_every``)."""
    n_train = len(data.train) if data is not None else None
    if not check_schedule(study, n_train, max_t_given=bool(study.max_t)) and not study.max_t:
        raise ConfigError("scheduler.max_t", "cannot be derived: the periods of a trial depend on searched data keys",
                          "set scheduler.max_t to the evaluation periods of a trial")


def check_resources(study: Study, cluster: dict[str, float]) -> None:
    """Fail fast: a trial asking for GPUs (or CPUs) the cluster lacks would wait forever."""
    gpus, cpus = cluster.get("GPU", 0.0), cluster.get("CPU", 0.0)
    if study.gpu > 0 and gpus < min(study.gpu, 1.0):
        raise ConfigError("resources.gpu", f"each trial asks for {study.gpu} GPU but the Ray cluster has "
                          f"{gpus:g} GPUs", "set resources.gpu: 0 (CPU) or connect --address to a GPU cluster")
    if study.cpu > cpus:
        raise ConfigError("resources.cpu", f"each trial asks for {study.cpu:g} CPUs but the Ray cluster has {cpus:g}",
                          f"set resources.cpu: {max(1, int(cpus))} or less")


def warn_gpu_memory(spec: Any, trials: list[Any] | None = None) -> str | None:
    """Before trials share a GPU, compare the heaviest trial's memory estimate
    (:mod:`lcl_tune.core.memory`; ``trials``: an ablation's cells, else the study's heaviest corner)
    with its share of the smallest GPU in the cluster, and warn when it will not fit."""
    from lcl_tune.core.memory import GPU_MEMORY_GIB, GiB, check_gpu_fraction, estimate_for_arch, heaviest_trial

    if spec.gpu <= 0:
        return None
    types = {k.split(":", 1)[1] for n in ray.nodes() if n.get("Alive") for k in n.get("Resources", {})
             if k.startswith("accelerator_type:")}
    sizes = [GPU_MEMORY_GIB[t] for t in types if t in GPU_MEMORY_GIB]
    if not sizes:
        return None
    est = max((estimate_for_arch(c) for c in trials or [heaviest_trial(spec)]), key=lambda e: e.total)
    warning = check_gpu_fraction(est, spec.gpu, int(min(sizes) * GiB))
    if warning:
        log.warning(warning)
    return warning


def check_tracking_reach(uri: str) -> None:
    """A SQLite store lives on the driver's disk: trials on other machines cannot log to it."""
    if uri.startswith(("http://", "https://")):
        return
    hosts = {n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")}
    if len(hosts) > 1:
        raise ConfigError("--tracking-uri", f"the Ray cluster spans {len(hosts)} machines, and trials on the others "
                          f"cannot reach the study's local store {uri}",
                          "run an MLflow tracking server and pass --tracking-uri http://HOST:5000")


def shared_data(study: Study) -> tuple[Any, Any]:
    """Tokenise once on the driver (trials get it through the object store), unless the space
    searches a key that changes the tokenised data; then each trial prepares (and caches) its own."""
    if any(p.key.startswith("data.") or p.key in DATA_KEYS for p in study.params):
        return None, None
    from lcl_tune.core.engine import prepare_trial_data

    probe: dict[str, Any] = {}
    for p in study.params:  # make sure a second tokenizer is prepared if any trial can need it
        if p.key == "weighting.name" and any(WEIGHTING_ENCODERS.get(str(v)) for v in p.values or []):
            probe["weighting.name"] = next(v for v in p.values if WEIGHTING_ENCODERS.get(str(v)))
        if p.key == "loss.name" and "lcl" in (p.values or []):
            probe["loss.name"] = "lcl"
        if p.key == "loss.lam":  # a λ below 1, so the weighting network (and its tokenizer) is built
            probe["loss.lam"] = min(p.values) if p.type == "categorical" else p.low
    return prepare_trial_data(study.trial_config(probe))


def hand_over_run(target: "T.TrackingTarget", previous: str, trial_id: str) -> None:
    """The searcher's takeover of an orphaned trial, in MLflow: the new Ray trial logs to the run
    the orphan opened (:func:`~lcl_tune.adapters.tracking.hand_over_run`). If the store does not
    answer, the orphan's run is left behind, and the summary marks it superseded."""
    warn_on_error(functools.partial(T.hand_over_run, target, previous, trial_id),
                  f"handing the MLflow run of trial {previous} to trial {trial_id}")


def _tune_config(study: Study, journal: Path, target: "T.TrackingTarget") -> "tune.TuneConfig":
    # pickled with the experiment: a resumed study's searcher hands runs over too
    searcher = StudySearcher(study, journal, on_takeover=functools.partial(hand_over_run, target))
    return tune.TuneConfig(metric=study.tune_metric, mode=study.mode, search_alg=searcher,
                           scheduler=make_scheduler(study, journal), num_samples=study.num_samples,
                           max_concurrent_trials=study.max_concurrent, reuse_actors=True)


def _run_config(study: Study, storage: str, verbose: int, callbacks: list, folder: Path) -> "tune.RunConfig":
    """The terminal shows the progress callback's table; Ray's own status goes to ray_status.log."""
    # conditional parameters are absent from some trials' configs, which Ray's reporter cannot show
    reporter = ray_status_reporter(folder, study.metric, study.tune_metric, [p.key for p in study.params if not p.when])
    return tune.RunConfig(
        name="ray", storage_path=storage, progress_reporter=reporter, verbose=verbose,
        callbacks=[*callbacks, *tune_callbacks(study.checkpoint_keep, study.metric, study.mode)],
        # each trial's own stdout/stderr (its warnings too), uploaded with its checkpoints to its trial folder
        log_to_file=TRIAL_LOGS, sync_config=tune.SyncConfig(sync_artifacts=True),
        # the best periods by the study metric and the latest (CheckpointKeeper in the callbacks)
        checkpoint_config=checkpoint_config(),
        failure_config=tune.FailureConfig(max_failures=study.max_retries))


class TrialOutcomes(tune.Callback):
    """Driver-side: closes each trial's MLflow run with its outcome and cost. Only the driver knows
    whether ASHA stopped a trial (a stopped trial's code never runs again). Pickled with the
    experiment, so a resumed study keeps closing the same runs.

    Closing a run (store round trips) is journalled and sent by a process of the driver's own
    (:func:`~lcl_tune.adapters.tracking.driver_sender`): Tune calls callbacks inside its event loop,
    which starts the next trial only after they return, and neither a tracking server that is down
    nor the store's work may stall it. The summary drains the spools before it reads them."""

    def __init__(self, target: "T.TrackingTarget", study: Study):
        self.target, self.study = target, study

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.target = dataclasses.replace(self.target, spool_dir=relocate(self.target.spool_dir))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        result = reported(trial)
        self._close(trial, trial_status(result, None, self.study), result)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._close(trial, STATUS_ERRORED, reported(trial), error=trial_error_text(trial))

    def _close(self, trial: Any, status: str, result: dict, error: str | None = None) -> None:
        cost = T.trial_cost(float(result.get("time_total_s", 0.0)), self.study.cpu, self.study.gpu)
        warn_on_error(functools.partial(T.close_trial, self.target, trial.trial_id, status, cost=cost, error=error,
                                        step=int(result.get("step", 0)), run_id=result.get("mlflow_run_id")),
                      f"closing the MLflow run of trial {trial.trial_id}")  # journalled: returns at once


SPOOL_DRAIN_S = 60.0  # how long the end of a study waits for the tracking spools to be sent


def wait_for_spools(target: "T.TrackingTarget", folder: Path, timeout: float = SPOOL_DRAIN_S) -> bool:
    """Send what the study's spools still hold, for at most ``timeout`` seconds; True when all
    went. Otherwise say which could not, and how to send them later: the results on disk are
    complete either way."""
    deadline = time.monotonic() + timeout
    T.close_driver_sender(target.spool_dir, timeout)
    left = T.drain_spools(folder, max(0.0, deadline - time.monotonic()))
    if left:
        log.warning(f"tracking: {sum(left.values())} records in {len(left)} spools could not be sent within "
                    f"{timeout:.0f}s ({', '.join(sorted(left)[:3])}{', ...' if len(left) > 3 else ''} in "
                    f"{folder / T.SPOOL_DIR}); the results in {folder} are complete. Send them when the "
                    f"server answers: lcl-tune sync {folder}")
    return not left


def summarise_in_mlflow(target: "T.TrackingTarget", table: Any, study: Study, folder: Path) -> None:
    """The parent run's summary: best trial, results table, plots, cost ledger (sum of children),
    once the spools are sent (if they cannot be, ``lcl-tune sync`` writes it later)."""
    if not wait_for_spools(target, folder):
        return
    T.drop_superseded(target, set(table["trial_id"]) if len(table) else set())
    rows = table.to_dict("records") if len(table) else []
    T.close_left_running(target, {r["trial_id"]: (r["status"], T.trial_cost(_or_zero(r.get("wall_s")), study.cpu,
                                                                             study.gpu), int(_or_zero(r.get("step"))))
                                  for r in rows})
    asha_periods = study.scheduler == "asha" and study.time_unit == "period"
    summary = T.cost_summary(target, rows, study.max_t if asha_periods else None)
    counts = {s: sum(r["status"] == s for r in rows) for s in (STATUS_COMPLETED, STATUS_STOPPED, STATUS_ERRORED)}
    summary.update({f"trials/{k.replace(' ', '_')}": v for k, v in counts.items()})
    tags = {"lcl_tune.trials": str(len(rows))}
    best = best_row(table, study)
    if best is not None:
        summary[study.tune_metric] = best[study.tune_metric]
        tags.update({"lcl_tune.best_trial_id": best["trial_id"]})
        runs = T.find_runs(target.client(), target.experiment_id,
                           {T.TAG_PARENT: target.parent_run_id, T.TAG_TRIAL: best["trial_id"]})
        if runs:
            tags["lcl_tune.best_run_id"] = runs[0].info.run_id
    plots = folder / "plots"
    plots.mkdir(exist_ok=True)
    artifacts = [folder / "results.parquet", *study_plots(table, study, plots, folder / "optuna.journal")]
    T.finish_study(target, summary_metrics=summary, tags=tags, artifacts=artifacts)


def _or_zero(value: Any) -> float:
    return 0.0 if value is None or _isnan(value) else float(value)


def study_plots(table: Any, study: Study, folder: Path, journal: Path) -> list[Path]:
    """Optuna's own figures of the study in ``journal``: parallel coordinates of the searched
    parameters against the metric, and fANOVA parameter importances (when at least two trials
    finished and the metric varies)."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    from optuna.visualization import matplotlib as vis

    from lcl_tune.analysis.plots import save_figure

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning, module="lcl_tune")
    ostudy = optuna.load_study(study_name=study.name, storage=JournalStorage(JournalFileBackend(str(journal))))
    complete = [t for t in ostudy.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        return []
    name = study.tune_metric
    with warnings.catch_warnings():  # a parameter with one value gives matplotlib a flat axis, and a warning
        warnings.filterwarnings("ignore", message="Attempting to set identical low and high", category=UserWarning)
        figure = vis.plot_parallel_coordinate(ostudy, target_name=name)
    out = [save_figure(figure, folder / "parallel_coordinates.png", f"{study.name}: {len(complete)} trials")]
    try:
        if len(complete) >= 2:
            out.append(save_figure(vis.plot_param_importances(ostudy, target_name=name), folder / "importance.png",
                                   f"{study.name}: parameter importances (fANOVA)"))
    except (ValueError, RuntimeError, KeyError) as e:  # too few or too uniform trials for fANOVA
        log.info("(no importance plot: %s)", e)
    return out


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


def results_table(grid: Any, study: Study, remote: str | None = None):
    """One row per Ray trial (deduplicated by trial id): config columns under their dotted keys,
    final metrics, ``best/<metric>``, status, periods, wall time, error text, and ``path``, the
    trial folder (a URI when the study's storage is remote)."""
    import pandas as pd

    rows: dict[str, dict[str, Any]] = {}
    for result in grid:
        metrics = dict(result.metrics or {})
        params = dict(result.config or {})
        trial_id = metrics.get("trial_id") or Path(result.path).name
        row: dict[str, Any] = {"trial_id": trial_id}
        row["status"] = trial_status(metrics, result.error, study)
        cfg = study.trial_config(params).flat()
        row.update({k: (v if not isinstance(v, list) else ",".join(map(str, v))) for k, v in cfg.items()})
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and (k.startswith(("dev/", "train/", "best/", "time/", "data/"))
                                                                           or k in ("step", "epoch", "samples")):
                row[k] = v
        row["periods"] = metrics.get("training_iteration", 0)
        row["wall_s"] = metrics.get("time_total_s", math.nan)
        row["sampled"] = ",".join(sorted(params))
        row["error"] = _error_text(result) if result.error is not None else ""
        row["error_kind"] = error_kind(row["error"])
        row["node_id"] = metrics.get("node_id", "")
        row["path"] = f"{remote.split('://')[0]}://{result.path}" if remote else str(result.path)
        rows[trial_id] = row
    table = pd.DataFrame(list(rows.values()))
    return table.sort_values("trial_id").reset_index(drop=True) if len(table) else table


def _error_text(result: Any) -> str:
    """The trial's traceback: Ray's ``error.txt`` (one block per failed attempt) when it exists,
    else the exception's text; at most the last 20,000 characters."""
    file = Path(result.path) / "error.txt"
    text = file.read_text(errors="replace") if file.is_file() else str(result.error)
    return strip_ansi(text)[-20000:]


def write_results(table: Any, folder: Path) -> Path:
    return atomic_write(folder / "results.parquet", lambda tmp: table.to_parquet(tmp, index=False))


def _isnan(x: Any) -> bool:
    return isinstance(x, float) and math.isnan(x)


def best_row(table: Any, study: Study) -> dict[str, Any] | None:
    ok = table[table["status"] != STATUS_ERRORED] if len(table) else table
    if not len(ok) or study.tune_metric not in ok:
        return None
    ok = ok.dropna(subset=[study.tune_metric])
    if not len(ok):
        return None
    idx = ok[study.tune_metric].idxmax() if study.mode == "max" else ok[study.tune_metric].idxmin()
    return ok.loc[idx].to_dict()


def write_rung_correlation(study: Study, folder: Path) -> dict[str, Any]:
    """How well each period's metric predicted the final one, from the journal's curves, written
    beside ``results.parquet`` (:mod:`lcl_tune.analysis.rungs`)."""
    curves = journal_curves(folder / "optuna.journal", study.name)
    asha = study.scheduler == "asha" and study.time_unit == "period"
    final = study.max_t if asha and study.max_t else max((p for c in curves.values() for p in c), default=0)
    rungs = R.asha_rungs(study.grace_period, study.reduction_factor, final) if asha else []
    doc = R.document(curves, final, rungs, study.grace_period, study.tune_metric)
    R.write(folder, doc)
    return doc


def print_summary(table: Any, study: Study, folder: Path, seconds: float, rungs: dict[str, Any] | None = None) -> None:
    counts = table["status"].value_counts().to_dict() if len(table) else {}
    log.info(f"\nstudy {study.name!r}: {len(table)} trials in {seconds:.0f}s "
          f"({', '.join(f'{n} {s}' for s, n in counts.items())})")
    best = best_row(table, study)
    if best is not None:
        params = ", ".join(f"{p.key}={_fmt(best.get(p.key))}" for p in study.params if p.active(best))
        log.info(f"best trial {best['trial_id']}: {study.tune_metric} = {best[study.tune_metric]:.4f} ({params})")
    for row in table[table["status"] == STATUS_ERRORED].to_dict("records") if len(table) else []:
        log.info(f"errored trial {row['trial_id']} ({row['error_kind']}): {last_error_line(row['error'], 200)}")
        tail = trial_log_tail(row["path"]) if "://" not in str(row["path"]) else ""
        if tail:
            log.info("  its last lines (" + str(Path(row["path"]) / TRIAL_LOGS[1]) + "):\n    " + tail.replace("\n", "\n    "))
    for line in R.lines(rungs) if rungs else []:
        log.info(line)
    log.info(f"results: {folder / 'results.parquet'}\noptuna:  {folder / 'optuna.journal'}")


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
