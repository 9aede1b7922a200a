"""The searcher: an Optuna study, asked and told by Ray Tune, living in its journal from the first trial.

Ray's stock ``OptunaSearch`` tells Optuna that a trial ASHA stopped is COMPLETE, with the
best-so-far value it had at its last rung: TPE then ranks a one-period run as a full run, and the
parameter importances mix short runs with full ones. :class:`StudySearcher` tells Optuna what
happened instead:

* every reported period is an intermediate value (``trial.report(value, period)``);
* a trial ASHA stopped is **PRUNED** (TPE ranks pruned trials by how far they got, then by their
  last value, as it ranks trials pruned by Optuna's own pruners);
* an errored trial is **FAIL**, a trial that ran its full length **COMPLETE**.

The study is kept in ``<study>/optuna.journal`` (Optuna's journal storage) from the first
suggestion on, so ``optuna-dashboard optuna.journal`` shows a running study, a killed driver loses
nothing, and ``--resume`` continues the same study. Ray checkpoints this searcher with its
experiment: the checkpoint holds which Ray trial is which Optuna trial, the journal holds the rest.
Each Ray trial is exactly one Optuna trial, also after a SIGKILL. Ray saves its state on a period,
so after a kill it can be older than the journal, and then **the journal decides**: a trial's
identity is its Optuna trial number (Ray ids are aliases). An Optuna trial asked for a Ray trial
that Ray's last saved state does not know is handed to the next Ray trial instead of being left
behind; a trial Ray restores as running that the journal holds finished runs again from its
checkpoint and ends where the journal says (:class:`JournalDecides`).

Adapter module: imports Ray and Optuna.
"""

from __future__ import annotations

import inspect
import pickle
import warnings
from pathlib import Path
from typing import Any, Callable

from lcl_tune.analysis import progress as P
from lcl_tune.schema.study import Param, Study
from lcl_tune.schema.trial import ConfigError
from lcl_tune.util import did_you_mean, drop_torn_tail, log

try:
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    from optuna.trial import TrialState
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import Searcher
except ImportError as e:  # pragma: no cover - exercised only without the extras
    raise ImportError(f"lcl_tune.adapters.searcher needs Ray Tune and Optuna ({e.name} is missing): "
                      "pip install 'ray[tune]>=2.44' 'optuna>=4.0'") from e

RAY_TRIAL_ATTR = "ray_trial_id"
REUSED_ATTR = "reused_from"  # an Optuna trial told a finished point's result again (no Ray trial)
MAX_REUSES_IN_A_ROW = 50  # proposals that all repeat finished points: the space is searched
STATUS_COMPLETED, STATUS_STOPPED, STATUS_ERRORED = P.COMPLETED, P.STOPPED, P.ERRORED  # the project's words


# --------------------------------------------------------------------------------------------
# The search space as Optuna sees it
# --------------------------------------------------------------------------------------------


class DefineByRun:
    """Optuna define-by-run space: conditional parameters (``when:``) are only sampled when their
    condition holds, so e.g. ``weighting.ema_alpha`` exists only in ``ema`` trials.

    A class (not a closure) so Ray can pickle it with a searcher's state."""

    def __init__(self, params: list[Param]):
        self.params = sorted(params, key=lambda p: bool(p.when))  # conditions are sampled first

    def __call__(self, trial: "optuna.Trial") -> dict[str, Any]:
        chosen: dict[str, Any] = {}
        for p in self.params:
            if p.active(chosen):
                chosen[p.key] = suggest(trial, p)
        return chosen


def suggest(trial: "optuna.Trial", p: Param) -> Any:
    if p.type == "categorical":
        return trial.suggest_categorical(p.key, p.values)
    if p.type == "int":
        return trial.suggest_int(p.key, int(p.low), int(p.high))
    return trial.suggest_float(p.key, p.low, p.high, log=p.type == "loguniform")


def distribution(p: Param) -> "optuna.distributions.BaseDistribution":
    d = optuna.distributions
    if p.type == "categorical":
        return d.CategoricalDistribution(p.values)
    if p.type == "int":
        return d.IntDistribution(int(p.low), int(p.high))
    return d.FloatDistribution(p.low, p.high, log=p.type == "loguniform")


# --------------------------------------------------------------------------------------------
# Samplers and schedulers
# --------------------------------------------------------------------------------------------


def sampler_class(name: str) -> type:
    return {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler,
            "qmc": optuna.samplers.QMCSampler, "grid": optuna.samplers.GridSampler,
            "gp": optuna.samplers.GPSampler}[name]


def sampler_kwargs(study: Study) -> dict[str, Any]:
    """The sampler's arguments: the study's seed, start-up trials scaled to the budget
    (:attr:`Study.startup_trials`), the grid of a grid search, and ``search.sampler_options``
    (which win). TPE models the parameters jointly (``multivariate``), by groups when the space is
    conditional, and with a constant liar when trials run in parallel, so two workers are not sent
    to the same spot."""
    kwargs: dict[str, Any] = {"seed": study.seed}
    if study.sampler in ("tpe", "gp"):
        kwargs["n_startup_trials"] = study.startup_trials
    if study.sampler == "tpe":
        kwargs.update(multivariate=True, group=any(p.when for p in study.params),
                      constant_liar=study.max_concurrent > 1)
    if study.sampler == "grid":
        kwargs["search_space"] = {p.key: list(p.values) for p in study.params}
    return {**kwargs, **study.sampler_options}


def check_sampler_options(study: Study) -> None:
    """An option the sampler does not take is a one-line error before anything starts."""
    cls = sampler_class(study.sampler)
    accepted = [n for n in inspect.signature(cls.__init__).parameters if n not in ("self", "args", "kwargs")]
    for key in study.sampler_options:
        if key not in accepted:
            close = did_you_mean(key, accepted)
            raise ConfigError(f"search.sampler_options.{key}", f"not an option of the {study.sampler} sampler "
                              f"(optuna.samplers.{cls.__name__})",
                              (f"did you mean '{close}'? " if close else "") + f"options: {', '.join(accepted)}",
                              source=study.path)


def make_sampler(study: Study) -> "optuna.samplers.BaseSampler":
    check_sampler_options(study)
    with warnings.catch_warnings():  # TPE's `group` and GPSampler are marked experimental by Optuna
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return sampler_class(study.sampler)(**sampler_kwargs(study))


class JournalDecides:
    """Scheduler mixin: a trial that the Optuna journal holds finished ends as the journal says.

    Tune saves its experiment state on a period (``study_runner._init_ray``), so after a kill
    Ray's restored state can be older than the journal, which has every event. **A trial's identity
    and outcome are its Optuna trial's** (its number; a Ray id is an alias): a trial Ray restores as
    running whose Optuna trial was told COMPLETE or PRUNED before the kill runs again from its
    checkpoint, and is stopped at the period the journal recorded (not before, not after), whatever
    ASHA's older state would now decide; a trial Ray lost is taken over by the next one
    (``StudySearcher._orphan``). The journal is read once per session, at the first result."""

    journal: str | None = None
    study_name: str = ""

    def finished_periods(self) -> dict[str, int]:
        if getattr(self, "_finished", None) is None:
            self._finished = finished_periods(self.journal, self.study_name) if self.journal else {}
        return self._finished

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        action = super().on_trial_result(tune_controller, trial, result)
        periods = self.finished_periods().get(trial.trial_id)
        if periods is None:
            return action
        return self.STOP if int(result.get("training_iteration", 0)) >= periods else self.CONTINUE

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        super().on_trial_add(tune_controller, trial)
        unended = self._unended()
        unended.pop(trial, None)  # a retry is added again, and Tune moves it to the end of its list
        unended[trial] = None

    def choose_trial_to_run(self, tune_controller: Any) -> Any:
        """Ray's choice (the first PENDING trial Tune added, else the first PAUSED one), made among
        the trials that have not ended. Ray's walks every trial the study ever had at every step of
        Tune's loop (about 10 a second): at 1,000 trials that is a driver cost growing with the
        study. An ended trial (TERMINATED, ERROR) never runs again in a session: a retry is
        requeued as PENDING before it could end, and added again (at the end, as Tune moves it);
        a restore adds every trial anew."""
        unended = self._unended()
        for trial in [t for t in unended if t.is_finished()]:
            del unended[trial]
        for status in ("PENDING", "PAUSED"):
            for trial in unended:
                if trial.status == status:
                    return trial
        return None

    def _unended(self) -> dict[Any, None]:
        """The trials added and not seen ended, in the order Tune added them (a dict: ordered, O(1))."""
        if getattr(self, "_unended_trials", None) is None:
            self._unended_trials = {}
        return self._unended_trials

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_finished": None, "_unended_trials": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        from lcl_tune.adapters.place import relocate

        self.__dict__.update(state)
        self.journal = relocate(self.journal)


class StudyASHA(JournalDecides, ASHAScheduler):
    pass


class StudyFIFO(JournalDecides, FIFOScheduler):
    pass


def finished_periods(journal: str, study_name: str) -> dict[str, int]:
    """Ray trial id -> periods, of the trials the journal holds COMPLETE or PRUNED."""
    if not Path(journal).is_file():
        return {}
    try:
        trials = optuna.load_study(study_name=study_name, storage=journal_storage(journal)).get_trials(
            deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    except KeyError:  # no such study in it yet
        return {}
    return {t.user_attrs[RAY_TRIAL_ATTR]: int(t.user_attrs["periods"]) for t in trials
            if RAY_TRIAL_ATTR in t.user_attrs and "periods" in t.user_attrs}


def point_key(params: dict[str, Any]) -> tuple:
    """A point of the space, comparable and hashable."""
    return tuple(sorted((k, repr(v)) for k, v in params.items()))


def journal_curves(journal: str | Path, study_name: str) -> dict[str, dict[int, float]]:
    """Optuna trial number -> {period: the metric ASHA saw}, of every trial the journal holds that
    did not fail: the curves :mod:`lcl_tune.analysis.rungs` measures the rungs on."""
    if not Path(journal).is_file():
        return {}
    try:
        trials = optuna.load_study(study_name=study_name, storage=journal_storage(journal)).get_trials(
            deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING))
    except KeyError:  # no such study in it yet
        return {}
    return {str(t.number): {int(k): float(v) for k, v in t.intermediate_values.items()} for t in trials
            if REUSED_ATTR not in t.user_attrs}  # a repeated point's copy is not a second trial


def make_scheduler(study: Study, journal: str | Path | None = None):
    """ASHA (or FIFO) as the study says; with the study's ``journal``, one that ends a trial the
    journal holds finished as the journal says (:class:`JournalDecides`)."""
    if study.scheduler == "fifo":
        scheduler = StudyFIFO()
    else:
        scheduler = StudyASHA(time_attr=study.time_attr, max_t=study.max_t, grace_period=study.grace_period,
                              reduction_factor=study.reduction_factor)
    scheduler.journal, scheduler.study_name = (str(journal) if journal is not None else None), study.name
    return scheduler


def trial_status(metrics: dict[str, Any], error: Any, study: Study) -> str:
    """``errored``; ``completed`` (ran its full length or reached ASHA's max_t); else ``stopped early``.

    Ray marks every last result ``done``, so the engine's own ``finished`` flag and the time
    attribute against ``max_t`` tell a natural end from an ASHA stop."""
    if error:
        return STATUS_ERRORED
    if metrics.get("finished") or (study.scheduler == "asha" and metrics.get(study.time_attr, 0) >= study.max_t):
        return STATUS_COMPLETED
    return STATUS_STOPPED if study.scheduler == "asha" else STATUS_COMPLETED


class AppendJournal(JournalFileBackend):
    """Optuna's journal file (the same format: ``optuna-dashboard`` and ``optuna.load_study`` read
    it), appended the cheap way. Optuna's own backend takes a lock made of a symlink, opens the
    file, writes, fsyncs and closes it at every append: ~2 ms each, ~13 appends per trial, all on
    the driver's event loop. Here the one writer, the study's driver, keeps the file open and
    appends each batch of records with one ``write`` under ``flock``.

    What is protected: a record is in the file (the kernel's page cache) when the append returns,
    so a killed driver (SIGKILL, OOM, a Ray crash) loses nothing. What is not: without fsync, a
    power loss or a kernel crash may lose the last seconds of records; ``--resume`` then takes
    Ray's saved state for the trials the journal lost (their Optuna trials are asked again)."""

    def __init__(self, file_path: str):
        super().__init__(file_path)
        self._fd: int | None = None

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        import fcntl
        import json
        import os

        if self._fd is None:
            drop_torn_tail(self._file_path)  # a driver killed mid-append: cut its fragment before appending
            self._fd = os.open(self._file_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        data = memoryview(("\n".join(json.dumps(log, separators=(",", ":")) for log in logs) + "\n").encode("utf-8"))
        fcntl.flock(self._fd, fcntl.LOCK_EX)  # another process appending (a second driver by mistake) waits
        try:
            while data:
                data = data[os.write(self._fd, data):]
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fd": None}

    def __del__(self) -> None:
        import os

        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)


def journal_storage(journal: str | Path) -> "JournalStorage":
    return JournalStorage(AppendJournal(str(journal)))


def open_study(study: Study, journal: str | Path | None, sampler: Any = None) -> "optuna.Study":
    """The study's Optuna study, created or (``--resume``, a restored searcher) loaded again."""
    storage = journal_storage(journal) if journal is not None else None
    return optuna.create_study(study_name=study.name, storage=storage, load_if_exists=True,
                               sampler=sampler or make_sampler(study),
                               direction="maximize" if study.mode == "max" else "minimize")


# --------------------------------------------------------------------------------------------
# The searcher
# --------------------------------------------------------------------------------------------


class StudySearcher(Searcher):
    """Ray Tune searcher over an Optuna study in ``journal`` (``None``: in memory), asking for each
    new Ray trial and telling each result (see the module docstring)."""

    def __init__(self, study: Study, journal: str | Path | None = None,
                 on_takeover: Callable[[str, str], None] | None = None):
        super().__init__(metric=study.tune_metric, mode=study.mode)
        self.study, self.journal = study, (str(journal) if journal is not None else None)
        self.on_takeover = on_takeover  # (previous Ray trial id, new one) when an orphan is taken over
        self.space = DefineByRun(study.params)
        self.numbers: dict[str, int] = {}  # Ray trial id -> Optuna trial number
        self.told: set[str] = set()
        self._ostudy: Any = None
        self._trials: dict[str, Any] = {}  # Ray trial id -> optuna.Trial, this session's
        self._orphans: list[int] | None = None  # found once per session, at the first suggestion
        self._done: dict[tuple, int] | None = None  # finished points of a space of categoricals

    # -- the Optuna study, opened lazily (a restored searcher reopens the journal) -----------

    @property
    def ostudy(self) -> "optuna.Study":
        if self._ostudy is None:
            optuna.logging.set_verbosity(optuna.logging.WARNING)
            self._ostudy = open_study(self.study, self.journal)
            self._ostudy.set_user_attr("metric", self.study.tune_metric)
            if not self._ostudy.trials:  # a new study: the study's own starting points first
                for point in self.study.points_to_evaluate:
                    self._ostudy.enqueue_trial(dict(point))
        return self._ostudy

    def _trial(self, trial_id: str, config: dict[str, Any] | None = None) -> "optuna.Trial":
        """The live Optuna trial of a Ray trial (rebuilt from the journal after a restore). A
        journal behind Ray's saved state (copied back from remote storage, or cut by a power loss)
        may lack it: the trial is asked again with its ``config``, so it still has one."""
        if trial_id not in self._trials:
            trials = self.ostudy.get_trials(deepcopy=False)
            number = self.numbers[trial_id]
            if number < len(trials) and trials[number].user_attrs.get(RAY_TRIAL_ATTR, trial_id) == trial_id:
                self._trials[trial_id] = optuna.trial.Trial(self.ostudy, trials[number]._trial_id)
            else:
                log.warning(f"the Optuna journal lacks trial {trial_id} (it is older than Ray's state): asked again")
                self.ostudy.enqueue_trial({k: v for k, v in (config or {}).items()
                                           if k in {p.key for p in self.study.params}})
                trial = self.ostudy.ask()
                self.space(trial)
                trial.set_user_attr(RAY_TRIAL_ATTR, trial_id)
                self.numbers[trial_id], self._trials[trial_id] = trial.number, trial
                self.told.discard(trial_id)
        return self._trials[trial_id]

    # -- Ray's Searcher interface --------------------------------------------------------------

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        if trial_id in self.numbers:  # Ray asks again for a trial it already has (a restored study)
            return dict(self.ostudy.get_trials(deepcopy=False)[self.numbers[trial_id]].params)
        orphan = self._orphan()
        trial = optuna.trial.Trial(self.ostudy, orphan._trial_id) if orphan is not None else self.ostudy.ask()
        previous = orphan.user_attrs.get(RAY_TRIAL_ATTR) if orphan is not None else None
        on_takeover = getattr(self, "on_takeover", None)  # absent from a searcher pickled by 0.2.0
        if previous and on_takeover is not None:  # before the new trial starts: it opens that run
            on_takeover(previous, trial_id)
        params = self.space(trial)  # an orphan's parameters are suggested again: Optuna returns its own
        reused = 0
        while orphan is None and (earlier := self._finished_points().get(point_key(params))) is not None:
            self._reuse(trial, earlier)  # Optuna's FAQ pattern: no second training of a finished point
            reused += 1
            if reused >= MAX_REUSES_IN_A_ROW:
                log.info(f"the last {reused} proposals all repeated finished points: the space is searched")
                return Searcher.FINISHED
            trial = self.ostudy.ask()
            params = self.space(trial)
        trial.set_user_attr(RAY_TRIAL_ATTR, trial_id)
        self.numbers[trial_id], self._trials[trial_id] = trial.number, trial
        return params

    def _finished_points(self) -> dict[tuple, int]:
        """Of a space of categoricals only (a finite one): each finished point (run to full length
        or stopped) -> the Optuna trial that ran it. Read from the journal once per session, then
        kept by :meth:`on_trial_complete`; empty for any other space."""
        if getattr(self, "_done", None) is None:  # absent from a searcher pickled by 0.2.0
            self._done = {}
            if self._finite():
                for t in self.ostudy.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
                    if REUSED_ATTR not in t.user_attrs:
                        self._done.setdefault(point_key(t.params), t.number)
        return self._done

    def _finite(self) -> bool:
        return all(p.type == "categorical" for p in self.study.params)

    def _reuse(self, trial: "optuna.Trial", number: int) -> None:
        """Tell ``trial`` what trial ``number`` got at the same point: its periods, its outcome."""
        earlier = self.ostudy.get_trials(deepcopy=False)[number]
        trial.set_user_attr(REUSED_ATTR, number)
        for key in ("status", "periods"):
            if key in earlier.user_attrs:
                trial.set_user_attr(key, earlier.user_attrs[key])
        for step, value in sorted(earlier.intermediate_values.items()):
            trial.report(value, step)
        if earlier.state == TrialState.COMPLETE:
            self.ostudy.tell(trial, earlier.value)
        else:
            self.ostudy.tell(trial, state=TrialState.PRUNED)

    def _orphan(self) -> "optuna.trial.FrozenTrial | None":
        """An Optuna trial asked for a Ray trial that Ray does not know (its driver was killed
        before Ray saved the trial, maybe before the trial's Ray id or parameters were written):
        the next Ray trial takes it over, so none is left running. Only this searcher asks, and it
        records each trial it asks at once, so every running trial it does not know is one, and
        none appears later in a session: they are found once, at the first suggestion after a
        start or a restore, not by a scan of every trial at every suggestion."""
        if getattr(self, "_orphans", None) is None:  # absent from a searcher pickled by 0.2.0
            known = set(self.numbers.values())
            running = self.ostudy.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            self._orphans = [t.number for t in running if t.number not in known]
        if not self._orphans:
            return None
        return self.ostudy.get_trials(deepcopy=False)[self._orphans.pop(0)]

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        value, step = result.get(self.study.tune_metric), result.get("training_iteration")
        if trial_id in self.told or trial_id not in self.numbers or value is None or step is None:
            return
        try:
            with warnings.catch_warnings():  # a period re-run after a restore was reported already
                warnings.filterwarnings("ignore", message=".*is already reported")
                self._trial(trial_id, result.get("config")).report(float(value), int(step))
        except (RuntimeError, ValueError) as e:  # told already, NaN
            log.debug("intermediate value of trial %s not reported: %s", trial_id, e)

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        if trial_id in self.told or trial_id not in self.numbers:
            return
        result = result or {}
        self.on_trial_result(trial_id, result)  # Ray passes the result that ended a trial here only
        status = trial_status(result, error, self.study)
        value = result.get(self.study.tune_metric)
        trial = self._trial(trial_id, result.get("config"))
        try:  # a trial told before the driver was killed (after Ray last saved this searcher) is finished
            trial.set_user_attr("status", status)
            trial.set_user_attr("periods", int(result.get("training_iteration", 0)))
            if status == STATUS_ERRORED or value is None:
                self.ostudy.tell(trial, state=TrialState.FAIL)
            elif status == STATUS_STOPPED:  # Optuna takes the last intermediate value as its value
                self.ostudy.tell(trial, state=TrialState.PRUNED)
            else:
                self.ostudy.tell(trial, float(value))
            if status != STATUS_ERRORED and value is not None and self._finite():
                self._finished_points().setdefault(point_key(trial.params), trial.number)
        except (RuntimeError, ValueError) as e:  # UpdateFinishedTrialError is a RuntimeError
            log.debug("trial %s not told again: %s", trial_id, e)
        self.told.add(trial_id)

    # -- Ray checkpoints the searcher with its experiment --------------------------------------

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as fh:
            pickle.dump(self.get_state(), fh)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as fh:
            self.set_state(pickle.load(fh))

    def get_state(self) -> dict[str, Any]:
        return {"study": self.study, "journal": self.journal, "numbers": dict(self.numbers), "told": set(self.told)}

    def set_state(self, state: dict[str, Any]) -> None:
        from lcl_tune.adapters.place import relocate

        self.study, self.journal = state["study"], relocate(state["journal"])
        self.numbers, self.told = dict(state["numbers"]), set(state["told"])
        self.space, self._ostudy, self._trials = DefineByRun(self.study.params), None, {}
        self._orphans = self._done = None

    def __getstate__(self) -> dict[str, Any]:
        # an open journal is reopened, not pickled; orphans and finished points are read again after a restore
        return {**self.__dict__, "_ostudy": None, "_trials": {}, "_orphans": None, "_done": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        from lcl_tune.adapters.place import relocate

        self.__dict__.update(state)
        self.journal = relocate(self.journal)
