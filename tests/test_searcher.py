"""The searcher, driven as Ray's controller drives it (suggest / on_trial_result / on_trial_complete),
without training: what reaches the Optuna journal, and how a restored searcher carries on."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import yaml

import optuna

from lcl_tune.adapters.searcher import StudySearcher, check_sampler_options, make_sampler, sampler_kwargs
from lcl_tune.schema.study import load_study
from lcl_tune.schema.trial import ConfigError

TrialState = optuna.trial.TrialState
METRIC = "best/dev/weighted_f1"


def make_study(tmp_path: Path, space: dict | None = None, scheduler: dict | None = None, **search):
    tree = {
        "name": "unit",
        "base": {"data": {"preset": "sst5"}, "train": {"max_steps": 40, "eval_every": 10}},
        "metric": {"name": "dev/weighted_f1", "mode": "max"},
        "space": {"loss.temperature": {"type": "loguniform", "low": 0.05, "high": 1.0},
                  "weighting.name": {"type": "categorical", "values": ["self", "ema"]},
                  "weighting.ema_alpha": {"type": "uniform", "low": 0.5, "high": 0.99, "when": {"weighting.name": "ema"}}},
        "search": {"sampler": "tpe", "seed": 0, "num_samples": 8, "max_concurrent": 2, **search},
        "scheduler": {"name": "asha", "max_t": 4, "grace_period": 1, "reduction_factor": 2},
    }
    if space is not None:
        tree["space"] = space
    if scheduler is not None:
        tree["scheduler"] = scheduler
    path = tmp_path / "unit.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return load_study(path)


def report(searcher: StudySearcher, trial_id: str, periods: int, finished: bool = False) -> dict:
    """Periods 1..``periods`` of a trial whose best-so-far metric climbs 0.5, 0.6, ...; as Ray does,
    the last result (the one that ends the trial) is returned for ``on_trial_complete``, not reported."""
    result = {}
    for k in range(1, periods + 1):
        result = {"training_iteration": k, METRIC: round(0.4 + 0.1 * k, 6), "finished": finished and k == periods}
        if k < periods:
            searcher.on_trial_result(trial_id, result)
    return result


def journal_trials(path: Path) -> list:
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
    return optuna.load_study(study_name="unit", storage=storage).get_trials(deepcopy=False)


def test_stopped_trials_are_pruned_with_their_intermediate_values(tmp_path):
    journal = tmp_path / "optuna.journal"
    searcher = StudySearcher(make_study(tmp_path), journal)
    for tid in ("a", "b", "c"):
        params = searcher.suggest(tid)
        assert 0.05 <= params["loss.temperature"] <= 1.0
        assert ("weighting.ema_alpha" in params) == (params["weighting.name"] == "ema")  # conditional
    searcher.on_trial_complete("a", report(searcher, "a", 4, finished=True))  # ran its full length
    searcher.on_trial_complete("b", report(searcher, "b", 1))  # ASHA stopped it after one period
    searcher.on_trial_complete("c", report(searcher, "c", 2), error=True)

    a, b, c = journal_trials(journal)  # read back from the file, as optuna-dashboard would
    assert (a.state, a.value, a.intermediate_values) == (TrialState.COMPLETE, 0.8, {1: 0.5, 2: 0.6, 3: 0.7, 4: 0.8})
    assert (b.state, b.value, b.intermediate_values) == (TrialState.PRUNED, 0.5, {1: 0.5})
    assert (c.state, c.intermediate_values) == (TrialState.FAIL, {1: 0.5, 2: 0.6})
    assert [t.user_attrs["ray_trial_id"] for t in (a, b, c)] == ["a", "b", "c"]
    assert [t.user_attrs["status"] for t in (a, b, c)] == ["completed", "stopped early", "errored"]


def test_a_running_study_is_readable_from_its_journal(tmp_path):
    journal = tmp_path / "optuna.journal"
    searcher = StudySearcher(make_study(tmp_path), journal)
    searcher.suggest("a"), searcher.suggest("b")
    searcher.on_trial_complete("a", report(searcher, "a", 1))
    states = [t.state for t in journal_trials(journal)]
    assert states == [TrialState.PRUNED, TrialState.RUNNING]


def test_a_restored_searcher_continues_the_same_study(tmp_path):
    """Ray pickles the searcher with its experiment state; the journal holds the study."""
    journal = tmp_path / "optuna.journal"
    first = StudySearcher(make_study(tmp_path), journal)
    params = first.suggest("a")
    report(first, "a", 2)
    first.save(str(tmp_path / "searcher.pkl"))
    del first  # the driver dies

    again = StudySearcher(make_study(tmp_path), journal)
    again.restore(str(tmp_path / "searcher.pkl"))
    assert again.suggest("a") == params  # Ray asks again for a trial it already had
    again.on_trial_complete("a", report(again, "a", 4, finished=True))
    again.suggest("b")
    trials = journal_trials(journal)
    assert len(trials) == 2 and trials[0].state == TrialState.COMPLETE and len(trials[0].intermediate_values) == 4
    assert pickle.loads(pickle.dumps(again)).numbers == {"a": 0, "b": 1}  # picklable, study reopened lazily


def test_a_trial_told_after_ray_last_saved_the_searcher_is_not_told_again(tmp_path):
    """The driver told Optuna a trial ended, then was killed before Ray saved the searcher: after
    the resume Ray ends that trial again (stopped, or failed on stopping), and the journal's
    finished trial must not make the study crash (UpdateFinishedTrialError, seen in a SIGKILL test)."""
    journal = tmp_path / "optuna.journal"
    first = StudySearcher(make_study(tmp_path), journal)
    first.suggest("a")
    first.save(str(tmp_path / "searcher.pkl"))  # Ray's last save
    first.on_trial_complete("a", report(first, "a", 2, finished=True))  # told; then the driver dies

    again = StudySearcher(make_study(tmp_path), journal)
    again.restore(str(tmp_path / "searcher.pkl"))
    again.on_trial_complete("a", report(again, "a", 3), error=True)  # raised UpdateFinishedTrialError
    [trial] = journal_trials(journal)
    assert trial.state == TrialState.COMPLETE and trial.user_attrs["periods"] == 2 and "a" in again.told


def test_an_optuna_trial_of_a_ray_trial_lost_in_a_kill_is_taken_over(tmp_path):
    """The driver asked Optuna for trial "b" after Ray last saved its state, then was killed: Ray
    never knew "b" and starts a new trial instead; it must get "b"'s Optuna trial, not a new one."""
    journal = tmp_path / "optuna.journal"
    first = StudySearcher(make_study(tmp_path), journal)
    first.suggest("a")
    first.save(str(tmp_path / "searcher.pkl"))  # Ray's last save: it knows "a" only
    lost = first.suggest("b")
    del first

    handed = []
    again = StudySearcher(make_study(tmp_path), journal, on_takeover=lambda old, new: handed.append((old, new)))
    again.restore(str(tmp_path / "searcher.pkl"))
    assert again.suggest("c") == lost
    again.suggest("d")
    trials = journal_trials(journal)
    assert [t.user_attrs["ray_trial_id"] for t in trials] == ["a", "c", "d"]  # one Optuna trial per Ray trial
    assert handed == [("b", "c")]  # "c" takes over "b"'s MLflow run too, before it starts


def test_an_optuna_trial_asked_just_before_a_kill_is_taken_over(tmp_path):
    """The kill fell between Optuna's ``ask`` and the journal write of the trial's Ray id (seen in
    the SIGKILL test under load): that running trial, without a Ray id or parameters, is taken
    over too, so every Optuna trial belongs to a Ray trial."""
    journal = tmp_path / "optuna.journal"
    first = StudySearcher(make_study(tmp_path), journal)
    first.suggest("a")
    first.save(str(tmp_path / "searcher.pkl"))
    first.ostudy.ask()  # the lost trial's journal holds this much
    del first

    again = StudySearcher(make_study(tmp_path), journal)
    again.restore(str(tmp_path / "searcher.pkl"))
    again.suggest("c")
    trials = journal_trials(journal)
    assert [t.user_attrs.get("ray_trial_id") for t in trials] == ["a", "c"] and "loss.temperature" in trials[1].params


def test_points_to_evaluate_come_first_and_only_once(tmp_path):
    journal = tmp_path / "optuna.journal"
    study = make_study(tmp_path, points_to_evaluate=[{"loss.temperature": 0.3, "weighting.name": "self"}])
    searcher = StudySearcher(study, journal)
    assert searcher.suggest("a") == {"loss.temperature": 0.3, "weighting.name": "self"}
    again = StudySearcher(study, journal)  # reopening the study does not enqueue the point again
    assert again.ostudy.get_trials(states=(TrialState.WAITING,)) == []


def test_sampler_arguments_follow_the_study(tmp_path):
    kwargs = sampler_kwargs(make_study(tmp_path))
    assert kwargs == {"seed": 0, "n_startup_trials": 2, "multivariate": True, "group": True, "constant_liar": True}
    assert sampler_kwargs(make_study(tmp_path, sampler_options={"n_startup_trials": 5, "gamma": None}))[
        "n_startup_trials"] == 5
    assert isinstance(make_sampler(make_study(tmp_path, scheduler={"name": "fifo"}, sampler="gp")),
                      optuna.samplers.GPSampler)


def test_an_unknown_sampler_option_is_a_one_line_error(tmp_path):
    study = make_study(tmp_path, sampler_options={"n_startup_trial": 3})
    with pytest.raises(ConfigError) as e:
        check_sampler_options(study)
    msg = str(e.value)
    assert msg.startswith(f"{study.path}: search.sampler_options.n_startup_trial: not an option of the tpe sampler")
    assert "did you mean 'n_startup_trials'?" in msg and "\n" not in msg


def test_a_grid_study_suggests_every_point_once(tmp_path):
    study = make_study(tmp_path, {"weighting.name": {"type": "categorical", "values": ["self", "ema", "uniform"]}},
                       sampler="grid", num_samples=3)
    searcher = StudySearcher(study, None)
    seen = []
    for tid in "abc":
        seen.append(searcher.suggest(tid)["weighting.name"])
        searcher.on_trial_complete(tid, report(searcher, tid, 4, finished=True))
    assert sorted(seen) == ["ema", "self", "uniform"]


def test_orphans_are_looked_for_once_per_session_not_at_every_suggestion(tmp_path, monkeypatch):
    """The scan of the running trials grew with the study at every suggestion (issue 22): it runs
    once after a start or a restore, and the orphans it found are taken over one by one."""
    journal = tmp_path / "optuna.journal"
    first = StudySearcher(make_study(tmp_path), journal)
    first.suggest("a")
    first.save(str(tmp_path / "searcher.pkl"))  # Ray's last save: it knows "a" only
    lost = [first.suggest("b"), first.suggest("c")]  # asked, then the driver dies
    del first

    again = StudySearcher(make_study(tmp_path), journal)
    again.restore(str(tmp_path / "searcher.pkl"))
    scans = []
    get_trials = type(again.ostudy).get_trials
    monkeypatch.setattr(type(again.ostudy), "get_trials",
                        lambda self, *a, **k: scans.append(k.get("states")) or get_trials(self, *a, **k))
    assert [again.suggest(t) for t in ("d", "e")] == lost  # both orphans, in order
    again.suggest("f")
    again.suggest("g")
    assert sum(states is not None for states in scans) == 1, scans  # one scan of the running trials
    assert [t.user_attrs["ray_trial_id"] for t in journal_trials(journal)] == ["a", "d", "e", "f", "g"]


class _Trial:
    def __init__(self, trial_id: str):
        self.trial_id, self.config, self.status = trial_id, {}, "RUNNING"


def test_a_trial_the_journal_holds_finished_ends_where_the_journal_says(tmp_path):
    """Ray's state saved before a trial's end: the resumed trial runs again from its checkpoint,
    and the scheduler ends it at the period the journal recorded, whatever ASHA would now decide
    (here ASHA alone would stop the weaker trial at its first rung, and let the stronger one run)."""
    from lcl_tune.adapters.searcher import make_scheduler

    study, journal = make_study(tmp_path), tmp_path / "optuna.journal"
    searcher = StudySearcher(study, journal)
    for tid, periods, finished in (("pruned", 3, False), ("done", 1, False)):
        searcher.suggest(tid)
        searcher.on_trial_complete(tid, report(searcher, tid, periods, finished))  # told before the kill
    # the resumed session: a new scheduler, Ray's older state has both as running
    scheduler = make_scheduler(study, journal)
    scheduler.set_search_properties(METRIC, "max")
    decisions = {}
    for tid, values in (("other", [0.9, 0.9, 0.9, 0.9]), ("pruned", [0.1, 0.1, 0.1, 0.1]), ("done", [0.95])):
        scheduler.on_trial_add(None, _Trial(tid))
        for k, value in enumerate(values, start=1):
            decisions.setdefault(tid, []).append(scheduler.on_trial_result(None, _Trial(tid), {
                "training_iteration": k, METRIC: value}))
            if decisions[tid][-1] == scheduler.STOP:
                break
    assert decisions["pruned"] == [scheduler.CONTINUE, scheduler.CONTINUE, scheduler.STOP]  # ASHA: stop at 1
    assert decisions["done"] == [scheduler.STOP]  # the journal has it stopped after period 1
    assert scheduler.STOP not in decisions["other"][:-1]  # a trial the journal does not hold: ASHA decides
    assert pickle.loads(pickle.dumps(scheduler)).finished_periods() == {"pruned": 3, "done": 1}


def test_the_journal_is_appended_without_fsync_or_a_lock_file_and_optuna_reads_it(tmp_path, monkeypatch):
    """At ~13 appends a trial, Optuna's own backend (symlink lock, open, fsync, close each time)
    costs the driver's loop ~2 ms each; the study's appends are one write each, in Optuna's format."""
    import os

    synced = []
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd))
    monkeypatch.setattr(os, "symlink", lambda *a: (_ for _ in ()).throw(AssertionError("a symlink lock")))
    journal = tmp_path / "optuna.journal"
    searcher = StudySearcher(make_study(tmp_path), journal)
    for tid in ("a", "b"):
        searcher.suggest(tid)
        searcher.on_trial_complete(tid, report(searcher, tid, 4, True))
    assert synced == []
    trials = journal_trials(journal)  # Optuna's own reader (optuna-dashboard reads it the same way)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2 and trials[0].intermediate_values


def test_a_journal_append_torn_by_a_kill_is_cut_before_the_next(tmp_path):
    journal = tmp_path / "optuna.journal"
    study = make_study(tmp_path)
    searcher = StudySearcher(study, journal)
    searcher.suggest("a")
    searcher.on_trial_complete("a", report(searcher, "a", 4, True))
    with open(journal, "a") as fh:
        fh.write('{"op_code": 5, "worker_id": "x", "trial_id": 0, "para')  # the driver died mid-append
    restored = StudySearcher(study, journal)
    restored.suggest("b")
    restored.on_trial_complete("b", report(restored, "b", 4, True))
    assert [t.state for t in journal_trials(journal)] == [TrialState.COMPLETE] * 2


def test_a_trial_missing_from_a_journal_behind_rays_state_is_asked_again_with_its_config(tmp_path):
    """The journal copied back from remote storage can be older than Ray's saved state: a trial
    the restored searcher knows is not in it. It is asked again with the Ray trial's config, and
    told, so the study still holds one Optuna trial per Ray trial."""
    study, journal = make_study(tmp_path), tmp_path / "optuna.journal"
    searcher = StudySearcher(study, journal)
    searcher.suggest("z")  # the sampler's first draw, so that "a" is not what a fresh seeded sampler draws first
    params = searcher.suggest("a")
    state = searcher.get_state()
    lines = journal.read_text().splitlines(keepends=True)
    journal.write_text("".join(lines[:1]))  # only the study's creation: both trials lost
    restored = StudySearcher(study, journal)
    restored.set_state(state)
    for k in range(1, 4):  # Ray's results carry the trial's config
        restored.on_trial_result("a", {"training_iteration": k, METRIC: 0.5, "config": params})
    restored.on_trial_complete("a", {"training_iteration": 4, METRIC: 0.6, "finished": True, "config": params})
    (trial,) = journal_trials(journal)
    assert trial.user_attrs["ray_trial_id"] == "a" and trial.params == params and trial.state == TrialState.COMPLETE
    assert sorted(trial.intermediate_values) == [1, 2, 3, 4]


def test_a_repeated_point_of_a_finite_space_reuses_its_result_instead_of_training_again(tmp_path):
    """Optuna's FAQ pattern: on a space of categoricals, a proposal equal to a finished point (run
    to full length or stopped) is told that point's result, and the next proposal is asked for; a
    Ray trial is only started for a point not finished yet. When every proposal repeats, the
    space is searched: the searcher says it is finished."""
    from ray.tune.search import Searcher

    space = {"weighting.name": {"type": "categorical", "values": ["self", "ema"]},
             "loss.temperature": {"type": "categorical", "values": [0.1, 0.3]}}
    journal = tmp_path / "optuna.journal"
    searcher = StudySearcher(make_study(tmp_path, space, sampler="random", num_samples=20), journal)
    started = []
    for k in range(20):
        params = searcher.suggest(f"t{k}")
        if params == Searcher.FINISHED:
            break
        started.append((params["weighting.name"], params["loss.temperature"]))
        periods = 4 if k % 2 == 0 else 1  # every other trial ASHA stops after one period
        searcher.on_trial_complete(f"t{k}", report(searcher, f"t{k}", periods, finished=periods == 4))
    assert sorted(started) == sorted({(w, t) for w in ("self", "ema") for t in (0.1, 0.3)})  # each point trained once
    trials = journal_trials(journal)
    reused = [t for t in trials if "reused_from" in t.user_attrs]
    assert reused and all("ray_trial_id" not in t.user_attrs for t in reused)
    for t in reused:  # told exactly what the point it repeats got
        first = trials[t.user_attrs["reused_from"]]
        assert t.params == first.params and "reused_from" not in first.user_attrs
        assert (t.state, t.value, t.intermediate_values) == (first.state, first.value, first.intermediate_values)
    assert {t.user_attrs["ray_trial_id"] for t in trials if "ray_trial_id" in t.user_attrs} == {
        f"t{k}" for k in range(len(started))}


def test_a_continuous_space_never_reuses(tmp_path):
    searcher = StudySearcher(make_study(tmp_path, sampler="random"), tmp_path / "optuna.journal")
    for k in range(6):
        searcher.suggest(f"t{k}")
        searcher.on_trial_complete(f"t{k}", report(searcher, f"t{k}", 4, finished=True))
    assert not any("reused_from" in t.user_attrs for t in journal_trials(tmp_path / "optuna.journal"))


class _QueuedTrial:
    """What a scheduler reads of a Ray trial."""

    def __init__(self, n: int):
        self.trial_id, self.status, self.config = f"t{n:05d}", "PENDING", {}

    def is_finished(self) -> bool:
        return self.status in ("TERMINATED", "ERROR")


class _Controller:
    """Tune's controller as schedulers see it: its list of trials, with the reads of it counted."""

    def __init__(self):
        self.trials: list[_QueuedTrial] = []
        self.reads = 0

    def get_trials(self) -> list[_QueuedTrial]:
        self.reads += 1
        return self.trials


def test_the_trial_to_run_is_rays_choice_made_without_walking_every_trial(tmp_path):
    """Ray's FIFO/ASHA walk every trial of the study at every step of Tune's loop; the study's
    schedulers choose the same trial from those not yet ended, through every kind of event Tune
    sends (adds, starts, pauses, ends, errors, retries moved to the end of Tune's list)."""
    import random

    from ray.tune.schedulers import FIFOScheduler

    from lcl_tune.adapters.searcher import make_scheduler

    for kind in ("asha", "fifo"):
        rng, ray, controller = random.Random(0), FIFOScheduler(), _Controller()
        study = make_study(tmp_path, scheduler={"name": kind, **({"max_t": 4} if kind == "asha" else {})})
        ours = make_scheduler(study)
        ours.set_search_properties(METRIC, "max")
        agreed = 0
        for step in range(3000):
            op, live = rng.random(), [t for t in controller.trials if not t.is_finished()]
            if op < 0.3 or not live:
                trial = _QueuedTrial(len(controller.trials))
                controller.trials.append(trial)
                ours.on_trial_add(controller, trial)
            else:
                trial = rng.choice(live)
                if op < 0.8:
                    trial.status = rng.choice(["RUNNING", "PAUSED", "TERMINATED", "TERMINATED", "ERROR"])
                else:  # a retry: Tune requeues it as PENDING at the end of its list and adds it again
                    trial.status = "PENDING"
                    controller.trials.remove(trial)
                    controller.trials.append(trial)
                    ours.on_trial_add(controller, trial)
            reads = controller.reads
            expected = ray.choose_trial_to_run(controller)
            controller.reads = reads
            assert ours.choose_trial_to_run(controller) is expected, (kind, step)
            agreed += expected is not None
        assert controller.reads == 0, "the study's scheduler walked Tune's list of trials"
        assert agreed > 500 and len(controller.trials) > 500  # the choices were not all None, the study grew
        ours = pickle.loads(pickle.dumps(ours))  # saved with the experiment: a restore adds every trial anew
        assert ours.choose_trial_to_run(controller) is None
