"""Progress of a running study or ablation, from Ray Tune's events: the live table (or one line per
event), ``progress.json``, and Ray's own output moved to ``ray_status.log``.

Ray's classic reporter prints a ~30-line ``== Status ==`` block every few seconds (with a ``Result
logdir`` in /tmp/ray) and its logger talks about checkpoints and trial ends; with ``RAY_AIR_NEW_OUTPUT=0``
(set by :func:`lcl_tune.adapters.study_runner._init_ray`; Ray's newer output engine ignores a passed
reporter) the reporter is ours: :class:`RayStatusFile` renders the same block into
``<folder>/ray_status.log``, and :func:`ray_logs_to` sends the ``ray`` logger there too, so the
terminal shows only the project's table and its own log messages.

:class:`ProgressCallback` keeps the snapshot :mod:`lcl_tune.analysis.progress` describes, from the
events Tune calls it with, writes it atomically to ``<folder>/progress.json`` (at most every
:data:`WRITE_EVERY_S` while something changed, a heartbeat every
:data:`~lcl_tune.analysis.progress.HEARTBEAT_S`, and at the end), and shows it: redrawn in place
on a terminal, one line per event otherwise. The work is incremental, so it does not grow with the
study: an event touches its own trial's row, only trials Tune added since the last event are
looked at, and a write serialises only the rows that changed since the last one (the others' JSON
is kept).

Adapter module: imports Ray.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from ray import tune

from lcl_tune.analysis import progress as P
from lcl_tune.util import RedactFilter, atomic_write, json_safe, log, redact

WRITE_EVERY_S = 2.0  # progress.json is rewritten at most this often (and at the end)
RAY_STATUS_EVERY_S = 30  # Ray's status block in ray_status.log
ERROR_TAIL_LINES = 5


class RayStatusFile(tune.CLIReporter):
    """Ray's own ``== Status ==`` block (trial table, scheduler state, resources), appended to a
    file instead of printed. Pickled with the experiment (a resumed study keeps writing there)."""

    def __init__(self, path: str | os.PathLike, **kwargs: Any):
        super().__init__(**kwargs)
        self.path = str(path)

    def __setstate__(self, state: dict[str, Any]) -> None:
        from lcl_tune.adapters.place import relocate

        self.__dict__.update(state)
        self.path = relocate(self.path)

    def _print(self, msg: str) -> None:
        with open(self.path, "a") as fh:
            fh.write(redact(msg) + "\n")  # a storage URI may carry credentials


def ray_status_reporter(folder: Path, metric: str, best_key: str, parameter_columns: list[str]) -> RayStatusFile:
    return RayStatusFile(folder / P.RAY_STATUS_LOG, parameter_columns=parameter_columns,
                         metric_columns={"training_iteration": "period", best_key: "best", metric: "last",
                                         "time_total_s": "seconds"},
                         max_report_frequency=RAY_STATUS_EVERY_S, sort_by_metric=True)


@contextmanager
def ray_logs_to(path: str | os.PathLike) -> Iterator[None]:
    """While a study runs, the ``ray`` logger (Tune's trial-end and checkpoint messages, its
    warnings) writes to ``path`` instead of the terminal; afterwards it is as it was."""
    ray_log = logging.getLogger("ray")
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactFilter())  # Ray names storage URIs in its messages: no credentials in the file
    saved = ray_log.handlers[:], ray_log.propagate, ray_log.level
    ray_log.handlers[:] = [handler]
    ray_log.propagate = False
    ray_log.setLevel(logging.INFO)
    try:
        yield
    finally:
        ray_log.handlers[:], ray_log.propagate = saved[0], saved[1]
        ray_log.setLevel(saved[2])
        handler.close()


_ACTIVE: list["ProgressCallback"] = []  # set up by Tune (a restored experiment brings its own instance)


@contextmanager
def showing_progress(folder: Path) -> Iterator[None]:
    """Around ``Tuner.fit()``: Ray's output to ``<folder>/ray_status.log``, and, however the fit
    ends, the live table closed (the terminal left clean) and the snapshot marked ended."""
    path = folder / P.RAY_STATUS_LOG
    with open(path, "a") as fh:
        fh.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()}: {redact(' '.join(sys.argv))}\n")
    try:
        with ray_logs_to(path):
            yield
    finally:
        while _ACTIVE:
            _ACTIVE.pop().close(interrupted=True)


class ProgressCallback(tune.Callback):
    """Driver-side: the snapshot of the trials from Tune's events, written to ``progress.json``
    and shown on ``sys.stderr``. ``describe(config)`` gives a trial's shown values (the searched
    keys, or arm and seed), ``classify(last_result)`` a finished trial's status, ``max_t(config)``
    its periods. Pickled with the experiment: what cannot be pickled (the terminal) is made in
    :meth:`setup`."""

    def __init__(self, folder: Path, header: dict[str, Any], describe: Callable[[dict], dict],
                 classify: Callable[[dict], str], max_t: Callable[[dict], int | None]):
        self.folder, self.header = Path(folder), header
        self.describe, self.classify, self.max_t = describe, classify, max_t
        self._reset()

    def _reset(self) -> None:
        self.snap: dict[str, Any] = {}
        self.rows: dict[str, dict[str, Any]] = {}
        self.live: P.LiveView | None = None
        self.lines = False
        self._hold: Any = None
        self._written = -math.inf
        self._seen = 0  # Tune's trials list only grows: the ones before this index were looked at
        self._row_json: dict[str, str] = {}  # each row's JSON as last written
        self._dirty: set[str] = set()  # rows an event touched since the last write

    def __getstate__(self) -> dict[str, Any]:
        return {k: self.__dict__[k] for k in ("folder", "header", "describe", "classify", "max_t")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        from lcl_tune.adapters.place import relocate

        self.__dict__.update(state)
        self.folder = relocate(self.folder)
        self._reset()

    # -- Tune's hooks ---------------------------------------------------------------------------

    def setup(self, **info: Any) -> None:
        now = time.time()
        self.snap = {"version": P.VERSION, **self.header, "host": socket.gethostname(), "pid": os.getpid(),
                     "started": now, "updated": now, "ended": None, "outcome": None,
                     "ray_status_log": P.RAY_STATUS_LOG, "trials": []}
        if self.header.get("kind") == "study" and info.get("total_num_samples"):  # an extended study's new total
            self.snap["total"] = int(info["total_num_samples"])
        self.rows = {}
        self._open_display()
        _ACTIVE.append(self)
        self._changed(force=True)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._sync(trials)
        row = self._row(trial)
        self._take_result(row, reported(trial))  # a resumed trial goes on from its last period
        row.update(status=P.RUNNING, started=row["started"] or time.time())  # a retry keeps its first start
        if row["retries"] == 0:
            self._event(row, "started")
        self._changed(redraw=True)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self._sync(trials)
        row = self._row(trial)
        period = int(result.get("training_iteration") or 0)
        new = period > (row["period"] or 0)
        self._take_result(row, result)
        row["reported"] = time.time()
        if new:
            self._event(row, "result")
        self._changed()

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finish(trials, trial, self.classify(reported(trial)))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finish(trials, trial, P.ERRORED)

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        row = self._row(trial)
        row.update(status=P.PENDING, retries=row["retries"] + 1, error=_last_error_line(trial))
        self._event(row, "retry")
        self._changed(redraw=True)

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        self._sync(trials)
        self._changed(heartbeat=True)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self._sync(trials)
        self.close(interrupted=any(r["status"] not in P.FINAL for r in self.rows.values()))

    # -- the snapshot -------------------------------------------------------------------------------

    def _row(self, trial: Any) -> dict[str, Any]:
        """The trial's row, marked changed: every event that asks for it may change it."""
        self._dirty.add(trial.trial_id)
        if trial.trial_id not in self.rows:
            config = dict(trial.config or {})
            row = {"id": trial.trial_id, "params": self.describe(config), "status": P.PENDING, "period": None,
                   "max_t": self.max_t(config), "last": None, "best": None, "started": None, "reported": None,
                   "ended": None, "wall_s": None, "retries": 0, "error": "", "log_tail": "",
                   "path": str(trial.path or "")}
            self.rows[trial.trial_id] = row
            self.snap["trials"].append(row)
        return self.rows[trial.trial_id]

    def _sync(self, trials: list) -> None:
        """Trials Tune knows that no event told us of (pending ones; finished ones of a resumed study).
        Only those added since the last call: Tune appends to its list and never removes."""
        for trial in trials[self._seen:]:
            known = trial.trial_id in self.rows
            row = self._row(trial)
            if known or row["status"] in P.FINAL:
                continue
            if trial.status == "TERMINATED":
                self._take_result(row, reported(trial))
                row["status"] = self.classify(reported(trial))
            elif trial.status == "ERROR":
                self._take_result(row, reported(trial))
                row.update(status=P.ERRORED, error=_last_error_line(trial))
            elif trial.status in ("RUNNING", "PAUSED"):
                self._take_result(row, reported(trial))
                row.update(status=trial.status.lower(), started=time.time())
        self._seen = len(trials)

    def _take_result(self, row: dict[str, Any], result: dict) -> None:
        if not result:
            return
        metric, best = self.snap["metric"], self.snap["best_key"]
        row["period"] = int(result.get("training_iteration") or 0) or row["period"]
        row["last"] = _number(result.get(metric), row["last"])
        row["best"] = _number(result.get(best), row["best"])
        row["wall_s"] = _number(result.get("time_total_s"), row["wall_s"])

    def _finish(self, trials: list, trial: Any, status: str) -> None:
        self._sync(trials)
        row = self._row(trial)
        if row["status"] in P.FINAL:  # Tune may report an end twice (an error while stopping)
            return
        self._take_result(row, reported(trial))
        row.update(status=status, ended=time.time())
        if status == P.ERRORED:
            row["error"] = _last_error_line(trial)
            row["log_file"], row["log_tail"] = _stderr_tail(trial)
        self._event(row, "finished")
        if self.lines and P.counts(self.snap)["done"] < int(self.snap.get("total") or 0):  # the last: close() says it
            self._write_line(P.study_line(self.snap, time.time()))
        self._changed(redraw=True)

    def _changed(self, force: bool = False, heartbeat: bool = False, redraw: bool = False) -> None:
        """Write the snapshot (now with ``force``; else when something changed and the last write is
        :data:`WRITE_EVERY_S` old, or a heartbeat is due) and redraw the table."""
        now = time.time()
        due = now - self._written >= (P.HEARTBEAT_S if heartbeat and not self._dirty else WRITE_EVERY_S)
        if force or (due and (self._dirty or heartbeat)):
            self.snap["updated"] = now
            self.snap["summary"] = P.summary(self.snap, now)
            warn_on_error(self._write, f"writing {self.folder / P.SNAPSHOT}", errors=(OSError,))  # a full disk: a convenience lost
            self._written = now
        if self.live is not None and (force or redraw or self.live.due()):
            width, height = P.terminal_size()
            self.live.update(P.render(self.snap, now, width, height - 1), force=force)

    def _write(self) -> None:
        """``progress.json``, re-serialising only the rows changed since the last write; atomic (a
        reader never meets half a file), not fsync'd (a convenience: a power loss may lose it)."""
        for trial_id in self._dirty:
            self._row_json[trial_id] = json.dumps(json_safe(self.rows[trial_id]))
        self._dirty.clear()
        header = json.dumps(json_safe({k: v for k, v in self.snap.items() if k != "trials"}))
        rows = ",\n ".join(self._row_json[t["id"]] for t in self.snap["trials"])
        atomic_write(self.folder / P.SNAPSHOT, f'{header[:-1]}, "trials": [\n {rows}]}}\n', durable=False)

    def close(self, interrupted: bool = False) -> None:
        """The last snapshot (``ended``, ``outcome``) and the last frame, left on the terminal."""
        if self in _ACTIVE:
            _ACTIVE.remove(self)
        if not self.snap or self.snap.get("ended"):
            return
        self.snap.update(ended=time.time(), outcome="interrupted" if interrupted else "finished")
        self._changed(force=True)
        if self.lines:
            self._write_line(P.study_line(self.snap, time.time()))
        if self._hold is not None:
            self._hold.__exit__(None, None, None)
            self._hold = None
        self.live = None

    # -- the terminal ------------------------------------------------------------------------------

    def _open_display(self) -> None:
        """In place on a terminal, lines otherwise; nothing with ``-q`` (only warnings wanted)."""
        self.live, self.lines = None, False
        if log.getEffectiveLevel() > logging.INFO:
            return
        self._write_line(f"progress: {self.folder / P.SNAPSHOT} (`lcl-tune status` on the folder shows it); "
                         f"Ray's own output: {P.RAY_STATUS_LOG} next to it")
        if P.is_terminal(sys.stderr):
            self.live = P.LiveView(sys.stderr)
            self._hold = self.live.around_logging(log)
            self._hold.__enter__()
        else:
            self.lines = True
            self._write_line(P.study_line(self.snap, time.time()))

    def _event(self, row: dict[str, Any], event: str) -> None:
        if self.lines:
            self._write_line(P.event_line(self.snap, row, event, time.time()))

    @staticmethod
    def _write_line(text: str) -> None:
        sys.stderr.write(text + "\n")
        sys.stderr.flush()


def reported(trial: Any) -> dict:
    """A trial's last reported result ({} before its first report). Not Ray's ``Trial.last_result``:
    for a trial that has not reported yet, that property asks the trial's actor for its default
    metrics, a blocking ``ray.get`` on Tune's event loop (~50 ms at every trial start, measured)."""
    metadata = getattr(trial, "run_metadata", None)
    result = metadata.last_result if metadata is not None else getattr(trial, "last_result", None)
    return dict(result or {})


def _number(value: Any, default: Any) -> Any:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else default


TRIAL_LOGS = ("stdout.log", "stderr.log")  # Ray's log_to_file: each trial's own output, in its folder


def strip_ansi(text: str) -> str:
    """Ray colours its tracebacks for terminals; files and MLflow tags get plain text."""
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def trial_log_tail(path: str | os.PathLike, lines: int = 5) -> str:
    """The last ``lines`` lines a trial wrote to stderr (its folder's ``stderr.log``), or ''."""
    log_file = Path(path) / TRIAL_LOGS[1]
    if not log_file.is_file():
        return ""
    return "\n".join(strip_ansi(log_file.read_text(errors="replace")).rstrip().splitlines()[-lines:])


def trial_error_text(trial: Any) -> str:
    """A failed trial's traceback as plain text (Ray's error file, else the exception)."""
    file = Path(trial.error_file) if trial.error_file else None
    text = file.read_text(errors="replace") if file is not None and file.is_file() else str(trial.get_error())
    return strip_ansi(text)


def warn_on_error(fn: Callable[[], Any], what: str, errors: tuple[type[BaseException], ...] = (Exception,)) -> None:
    """Run ``fn``; ``errors`` are logged as a warning: what the driver does on the side (closing a
    run, writing the snapshot) must not end the study."""
    try:
        fn()
    except errors as e:
        log.warning(f"{what} failed: {e}")


def _last_error_line(trial: Any) -> str:
    try:
        return P.last_error_line(trial_error_text(trial), 300)
    except Exception as e:  # noqa: BLE001 - an unreadable error file must not end the study
        return f"(error text unreadable: {e})"


def _stderr_tail(trial: Any) -> tuple[str, str]:
    """The trial's ``stderr.log`` (where it is now: synced to the trial folder, or still in the
    worker's folder on this machine) and its last lines."""
    places = [trial.path, trial.local_path]
    try:
        places.append(trial.storage.trial_working_directory)
    except Exception:  # noqa: BLE001 - not set up for a trial that never started
        pass
    for place in filter(None, places):
        if "://" not in str(place) and (Path(place) / TRIAL_LOGS[1]).is_file():
            return str(Path(place) / TRIAL_LOGS[1]), trial_log_tail(place, ERROR_TAIL_LINES)
    return "", ""


# --------------------------------------------------------------------------------------------
# For studies and ablations
# --------------------------------------------------------------------------------------------


def parallel_slots(max_concurrent: int | None, cluster: dict[str, float], cpu: float, gpu: float) -> int:
    """How many trials run at once: the study's limit, and what the cluster's CPUs and GPUs allow."""
    limits = [max_concurrent or math.inf]
    if cpu > 0:
        limits.append(cluster.get("CPU", 0.0) // cpu)
    if gpu > 0:
        limits.append(cluster.get("GPU", 0.0) // gpu)
    return max(1, int(min(limits)) if min(limits) != math.inf else 1)


def _searched(config: dict, keys: tuple[str, ...]) -> dict:
    return {k: config[k] for k in keys if k in config}


def _constant(config: dict, value: int | None) -> int | None:
    return value


def _cell(config: dict) -> dict:
    from lcl_tune.schema.ablation import cell_of

    arm, seed = cell_of(config)
    return {"arm": arm, "seed": seed}


def _cell_periods(config: dict, periods: dict[str, int | None]) -> int | None:
    return periods.get(str(config.get("cell")))


def _cell_status(result: dict) -> str:
    """A cell runs to its end (no early stopping): one that ended before is an error."""
    return P.COMPLETED if result.get("finished") else P.ERRORED


def study_progress(study: Any, folder: Path, slots: int) -> ProgressCallback:
    """The progress of a tuning study: its searched keys, ASHA's ``max_t`` periods."""
    from lcl_tune.adapters.searcher import trial_status

    keys = tuple(p.key for p in study.params)
    header = {"kind": "study", "name": study.name, "phase": None, "metric": study.metric,
              "best_key": study.tune_metric, "mode": study.mode, "columns": list(keys),
              "total": study.num_samples, "slots": slots}
    max_t = study.max_t if study.time_unit == "period" and study.max_t else None
    return ProgressCallback(folder, header, functools.partial(_searched, keys=keys),
                            functools.partial(trial_status, error=None, study=study),
                            functools.partial(_constant, value=max_t))


def cells_progress(ab: Any, folder: Path, periods: dict[str, int | None], phase: str, slots: int) -> ProgressCallback:
    """The progress of an ablation's cells (``periods``: each cell's evaluation periods; ``phase``:
    the folder they are written to)."""
    header = {"kind": "ablation", "name": ab.name, "phase": phase, "metric": ab.metric,
              "best_key": ab.tune_metric, "mode": ab.mode, "columns": ["arm", "seed"], "total": len(periods),
              "slots": slots}
    return ProgressCallback(folder, header, _cell, _cell_status, functools.partial(_cell_periods, periods=periods))
