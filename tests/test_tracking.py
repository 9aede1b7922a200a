"""MLflow layout without Ray: run reuse, batched logging, names, artifacts, fail-fast."""

from __future__ import annotations

import dataclasses
import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lcl_tune.adapters import tracking as T
from lcl_tune.schema.trial import ConfigError, TrialConfig

REPO = Path(__file__).resolve().parents[1]
REFUSED = f"[Errno {errno.ECONNREFUSED}] {os.strerror(errno.ECONNREFUSED)}"

DETAILS = {"label_names": ["neg", "pos"], "dev/confusion": [[3, 1], [0, 4]],
           "dev/per_class_f1": {"neg": 0.857, "pos": 0.889}}


@pytest.fixture()
def target(tmp_path) -> T.TrackingTarget:
    """A study's target that sends straight to the store (no spool): what the store holds is
    checked right after each call. The spooled path has its own tests (test_spool.py)."""
    return dataclasses.replace(T.start_study("unit", tmp_path / "study", kind="study"), spool_dir=None)


def test_store_experiment_and_parent_are_created_once(tmp_path):
    folder = tmp_path / "study"
    first = T.start_study("unit", folder)
    assert (tmp_path / "mlflow.db").is_file()  # the storage root's store, created by the driver before any trial
    again = T.start_study("unit", folder)  # a resumed study finds its parent run again
    assert again == first and first.spool_dir == str(folder / T.SPOOL_DIR)
    other = T.start_study("unit", tmp_path / "elsewhere")  # same name, other folder: other study
    assert other.parent_run_id != first.parent_run_id


def test_studies_of_one_root_share_one_store_with_an_experiment_each(tmp_path):
    a = T.start_study("study-a", tmp_path / "study-a")
    b = T.start_study("study-b", tmp_path / "study-b", kind="ablation")
    assert a.uri == b.uri == T.default_uri(tmp_path) and a.experiment_id != b.experiment_id
    assert not (tmp_path / "study-a" / "mlflow.db").exists() and not (tmp_path / "study-b" / "mlflow.db").exists()
    client = a.client()
    assert {e.name for e in client.search_experiments()} == {"Default", "study-a", "study-b"}
    assert client.get_experiment(a.experiment_id).artifact_location == (tmp_path / "mlartifacts" / "study-a").as_uri()
    assert T.study_experiment(client, tmp_path / "study-b") == b.experiment_id  # found by folder, not by name
    assert T.find_store(tmp_path) == T.find_store(tmp_path / "study-a") == tmp_path.resolve()


def test_a_study_folder_with_its_own_store_keeps_using_it(tmp_path):
    """Folders made before stores were shared hold their own mlflow.db: --resume keeps logging there."""
    folder = tmp_path / "old-study"
    legacy = T.start_study("old", folder, uri=T.default_uri(folder))
    assert T.store_root(folder) == folder.resolve() and T.find_store(folder) == folder.resolve()
    resumed = T.start_study("old", folder)
    assert resumed == legacy and not (tmp_path / "mlflow.db").exists()


WRITER = """
import sys
from pathlib import Path
from lcl_tune.adapters import tracking as T
root, name, trials, steps = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
target = T.start_study(name, root / name)
for i in range(trials):
    run = T.TrialRun(target, f"{name}-t{i}", {"seed": i})
    for step in range(steps):
        run.log_report({"dev/accuracy": step / steps, "train/loss": 1.0 / (step + 1)}, step)
    assert run.close(timeout=120)
"""


def test_two_studies_writing_to_one_new_root_at_once_lose_no_run_or_metric(tmp_path):
    """Two drivers start on a root with no store yet (the migration runs once, under a lock), then
    their trials log at the same time into the one SQLite file."""
    trials, steps = 4, 15
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), name, str(trials), str(steps)],
                              stderr=subprocess.PIPE, text=True) for name in ("a", "b")]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
    client = T.MlflowClient(tracking_uri=T.default_uri(tmp_path))
    for name in ("a", "b"):
        exp_id = T.study_experiment(client, tmp_path / name)
        runs = [r for r in client.search_runs([exp_id]) if r.data.tags.get(T.TAG_ROLE) == "trial"]
        assert sorted(r.data.tags[T.TAG_TRIAL] for r in runs) == [f"{name}-t{i}" for i in range(trials)]
        for run in runs:
            for key in ("dev/accuracy", "train/loss"):
                assert len(client.get_metric_history(run.info.run_id, key)) == steps


def test_a_trial_has_exactly_one_run_across_retries(target):
    flat = TrialConfig().flat()
    a = T.TrialRun(target, "t1", flat)
    b = T.TrialRun(target, "t1", flat)  # a retry or a resumed trial
    assert a.run_id == b.run_id
    runs = T.child_runs(target)
    assert len(runs) == 1 and runs[0].data.tags[T.TAG_PARENT] == target.parent_run_id
    assert runs[0].data.params["loss.temperature"] == "0.3" and runs[0].data.params["weighting.name"] == "separate"


def test_one_log_batch_call_per_reported_result(target, monkeypatch):
    run = T.TrialRun(target, "t2", TrialConfig().flat())
    calls = []
    original = T.MlflowClient.log_batch
    monkeypatch.setattr(T.MlflowClient, "log_batch", lambda self, *a, **k: (calls.append(k), original(self, *a, **k))[1])
    metrics = {f"dev/m{i}": i / 10 for i in range(20)} | {"finished": True, "lr": float("nan")}
    run.log_report(metrics, step=7)
    run.log_report(metrics, step=14)
    assert len(calls) == 2
    logged = {m.key for m in calls[0]["metrics"]}
    assert logged == {f"dev/m{i}" for i in range(20)}  # booleans and NaN are not metrics
    history = run.client.get_metric_history(run.run_id, "dev/m3")
    assert [(m.step, m.value) for m in history] == [(7, 0.3), (14, 0.3)]


def test_trial_artifacts_and_outcome(target):
    run = T.TrialRun(target, "t3", TrialConfig().flat())
    run.log_details(DETAILS, "seed: 1\n")
    files = {f.path for f in run.client.list_artifacts(run.run_id)}
    assert files == {"config.yaml", "confusion_matrix.json", "confusion_matrix.png", "per_class_f1.csv"}
    png = Path(run.client.download_artifacts(run.run_id, "confusion_matrix.png")).read_bytes()
    assert png.startswith(b"\x89PNG")  # each report's sender draws its confusion matrix: ASHA's stop needs no drawing
    T.close_trial(target, "t3", "stopped early", cost=T.trial_cost(10.0, cpu=2, gpu=0.25), step=30, details=DETAILS)
    r = run.client.get_run(run.run_id)
    assert r.data.tags[T.TAG_STATUS] == "stopped early" and r.data.tags[T.TAG_STOPPED] == "true"
    assert r.data.metrics == {"cost/wall_s": 10.0, "cost/cpu_s": 20.0, "cost/accelerator_s": 2.5}
    assert r.info.status == "FINISHED"
    table = Path(run.client.download_artifacts(run.run_id, "per_class_f1.csv")).read_text().splitlines()
    assert table == ["class,f1,support", "neg,0.857000,4", "pos,0.889000,4"]


def test_runs_left_running_by_a_killed_driver_are_closed_from_the_outcomes(target):
    cfg = TrialConfig().flat()
    for trial_id in ("done", "open", "unknown"):
        T.TrialRun(target, trial_id, cfg)
    T.close_trial(target, "done", "completed", cost=T.trial_cost(5.0, 1, 0))
    outcomes = {tid: ("stopped early", T.trial_cost(7.0, 1, 0), 20) for tid in ("done", "open")}
    assert T.close_left_running(target, outcomes) == ["open"]  # "unknown" has no outcome: left as it is
    runs = {r.data.tags[T.TAG_TRIAL]: r for r in T.child_runs(target)}
    assert runs["open"].data.tags[T.TAG_STATUS] == "stopped early" and runs["open"].info.status == "FINISHED"
    assert runs["open"].data.metrics["cost/wall_s"] == 7.0
    assert runs["done"].data.tags[T.TAG_STATUS] == "completed" and runs["done"].data.metrics["cost/wall_s"] == 5.0
    assert runs["unknown"].data.tags[T.TAG_STATUS] == "running"
    assert T.close_left_running(target, outcomes) == []


def test_an_error_before_the_run_existed_still_gets_a_failed_run(target):
    T.close_trial(target, "t4", "errored", cost=T.trial_cost(0.0, 1, 0), error="Traceback ...\nValueError: boom")
    (run,) = T.child_runs(target)
    assert run.info.status == "FAILED" and run.data.tags[T.TAG_ERROR] == "ValueError: boom"


def test_parent_ledger_sums_children_and_projects_savings(target):
    for tid, wall in (("a", 4.0), ("b", 6.0)):
        T.TrialRun(target, tid, TrialConfig().flat())
        T.close_trial(target, tid, "completed", cost=T.trial_cost(wall, 1, 0.5))
    rows = [{"status": "completed", "periods": 4, "wall_s": 6.0},
            {"status": "stopped early", "periods": 1, "wall_s": 4.0}]
    summary = T.cost_summary(target, rows, max_t=4)
    assert summary["cost/wall_s"] == 10.0 and summary["cost/accelerator_s"] == 5.0
    assert summary["cost/saved_by_early_stopping_s"] == 12.0  # 4 s/period × 3 periods not run
    assert summary["cost/saved_fraction"] == pytest.approx(12 / 22)


def test_drop_superseded_keeps_only_known_trials(target):
    for tid in ("keep", "old"):
        T.TrialRun(target, tid, TrialConfig().flat())
    assert T.drop_superseded(target, {"keep"}) == 1
    assert [r.data.tags[T.TAG_TRIAL] for r in T.child_runs(target)] == ["keep"]


@pytest.mark.parametrize("flat,name", [
    ({"loss.name": "lcl", "weighting.name": "separate", "loss.temperature": 0.1234, "loss.lam": 0.314}, "lcl·separate·τ=0.12·λ=0.31"),
    ({"loss.name": "scl", "loss.temperature": 0.3, "loss.lam": 0.5}, "scl·τ=0.3·λ=0.50"),
    ({"loss.name": "ce", "optim.lr": 2e-5}, "ce·lr=2e-05"),
])
def test_run_names(flat, name):
    assert T.run_name(flat) == name


def test_unreachable_tracking_server_fails_fast(closed_port):
    uri = f"http://127.0.0.1:{closed_port}"
    with pytest.raises(ConfigError, match=r"^--tracking-uri: cannot reach the MLflow tracking server at ") as e:
        T.check_reachable(uri, timeout=2)
    assert str(e.value) == (f"--tracking-uri: cannot reach the MLflow tracking server at {uri} ({REFUSED}). Fix: start "
                            "it (mlflow server --host ... --port ...) or fix the address; leave --tracking-uri out to "
                            "use the storage root's own SQLite store")
    assert "\n" not in str(e.value)


def test_tune_with_unreachable_server_fails_before_ray(tmp_path, closed_port):
    uri = f"http://127.0.0.1:{closed_port}"
    proc = subprocess.run([sys.executable, "-m", "lcl_tune.cli", "tune", str(REPO / "search_spaces" / "quickstart.yaml"),
                           "--storage", str(tmp_path), "--tracking-uri", uri],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(
        f"error: --tracking-uri: cannot reach the MLflow tracking server at {uri} ({REFUSED}). Fix: ")
    assert (tmp_path / "quickstart" / "study.yaml").is_file()  # the study's folder was made...
    assert not (tmp_path / "quickstart" / "ray").exists()  # ...but Ray never started


# --------------------------------------------------------------------------------------------
# A Ray cluster on several machines needs a tracking server (README: "Fails fast")
# --------------------------------------------------------------------------------------------


def _node(host: str, alive: bool = True) -> dict:
    """An entry of ray.nodes(), with the keys check_tracking_reach reads."""
    return {"NodeID": f"{host}-{alive}", "NodeManagerAddress": host, "Alive": alive}


SPREAD = [_node("10.0.0.1"), _node("10.0.0.2"), _node("10.0.0.2")]  # three nodes on two machines


def test_a_cluster_on_several_machines_with_a_local_store_is_a_one_line_error(tmp_path, monkeypatch):
    from lcl_tune.adapters import study_runner as SR

    uri = T.default_uri(tmp_path)
    monkeypatch.setattr(SR.ray, "nodes", lambda: SPREAD)
    with pytest.raises(ConfigError, match=r"^--tracking-uri: the Ray cluster spans 2 machines") as e:
        SR.check_tracking_reach(uri)
    assert str(e.value) == (f"--tracking-uri: the Ray cluster spans 2 machines, and trials on the others cannot reach "
                            f"the study's local store {uri}. Fix: run an MLflow tracking server and pass "
                            "--tracking-uri http://HOST:5000")
    SR.check_tracking_reach("http://head:5000")  # a tracking server: every node reaches it
    SR.check_tracking_reach("https://mlflow.lab")


@pytest.mark.parametrize("nodes", [
    [_node("10.0.0.1")],
    [_node("10.0.0.1"), _node("10.0.0.1")],  # two nodes of one machine (ray.cluster_utils.Cluster, test_multinode)
    [_node("10.0.0.1"), _node("10.0.0.2", alive=False)],  # a machine that left the cluster does not count
], ids=["one-node", "two-nodes-one-machine", "one-machine-alive"])
def test_a_cluster_on_one_machine_keeps_its_local_store(tmp_path, monkeypatch, nodes):
    from lcl_tune.adapters import study_runner as SR

    monkeypatch.setattr(SR.ray, "nodes", lambda: nodes)
    SR.check_tracking_reach(T.default_uri(tmp_path))  # no error


def test_tune_on_several_machines_without_a_tracking_server_stops_before_any_trial(tmp_path, monkeypatch, capsys):
    """The CLI path: `lcl-tune tune` on such a cluster prints the one-line error and exits 2 before
    Ray Tune is asked to run anything. Ray is faked: a cluster of two machines with CPUs; the data
    is not tokenised (nothing depends on it before the check)."""
    from lcl_tune.adapters import study_runner as SR
    from lcl_tune.cli.main import main

    def no_tuner(*args, **kwargs):
        raise AssertionError("Ray Tune was started")

    monkeypatch.setattr(SR, "_init_ray", lambda address: None)
    monkeypatch.setattr(SR.ray, "cluster_resources", lambda: {"CPU": 8.0})
    monkeypatch.setattr(SR.ray, "nodes", lambda: SPREAD)
    monkeypatch.setattr(SR, "shared_data", lambda study: (None, None))
    monkeypatch.setattr(SR.tune, "Tuner", no_tuner)
    code = main(["tune", str(REPO / "search_spaces" / "quickstart.yaml"), "--storage", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    uri = T.default_uri(tmp_path)
    assert err.strip().splitlines()[-1] == (
        f"error: --tracking-uri: the Ray cluster spans 2 machines, and trials on the others cannot reach the "
        f"study's local store {uri}. Fix: run an MLflow tracking server and pass --tracking-uri http://HOST:5000")
    assert not (tmp_path / "quickstart" / "ray").exists()


def test_a_period_run_again_after_a_restore_is_logged_once(tmp_path):
    """What the kill test meets when the kill falls between a trial's report (logged to MLflow)
    and Ray's registering its checkpoint: the resumed trial, in a new process, runs that period
    again and reports it again. MLflow keeps the first report of each step, once."""
    target = T.start_study("again", tmp_path / "runs" / "again")
    first = T.TrialRun(target, "t1", {"seed": 1})
    for step in (10, 20):
        first.log_report({"dev/weighted_f1": step / 100}, step)
    assert first.close(timeout=60)  # the process is killed after this: its records were sent
    again = T.TrialRun(target, "t1", {"seed": 1})  # restored from the checkpoint of step 10 (or none)
    for step in (10, 20, 30):
        again.log_report({"dev/weighted_f1": step / 100 + 0.001}, step)
    assert again.close(timeout=60)
    history = target.client().get_metric_history(again.run_id, "dev/weighted_f1")
    assert [(m.step, m.value) for m in history] == [(10, 0.1), (20, 0.2), (30, 0.301)]


def test_a_trial_that_takes_over_an_orphan_logs_to_its_run(tmp_path):
    """A kill just after the driver asked for trial "old" (it opened its run and logged step 10),
    before Ray saved it: on resume Ray starts "new", which takes over the orphan's Optuna trial
    (searcher) and, through hand_over_run, its MLflow run. The orphan's spool, replayed at the end,
    finds the same run. One run for the trial, each step once, nothing soft-deleted."""
    from mlflow.entities import ViewType

    target = T.start_study("orphan", tmp_path / "runs" / "orphan")
    old = T.TrialRun(target, "old", {"seed": 1})
    old.log_report({"dev/weighted_f1": 0.1}, 10)
    assert old.close(timeout=60)
    T.hand_over_run(target, "old", "new")
    new = T.TrialRun(target, "new", {"seed": 1})  # no checkpoint: it starts again at step 10
    for step in (10, 20):
        new.log_report({"dev/weighted_f1": step / 100 + 0.001}, step)
    assert new.close(timeout=60) and new.run_id == old.run_id
    replay = T.TrialRun(target, "old", {"seed": 1})  # the orphan's spool sent again (lcl-tune sync, the drain)
    replay.log_report({"dev/weighted_f1": 0.1}, 10)
    assert replay.close(timeout=60) and replay.run_id == old.run_id
    client = target.client()
    runs = client.search_runs([target.experiment_id], run_view_type=ViewType.ALL)
    assert [r.data.tags.get(T.TAG_TRIAL) for r in runs if r.data.tags.get("lcl_tune.role") == "trial"] == ["new"]
    history = client.get_metric_history(new.run_id, "dev/weighted_f1")
    assert [(m.step, m.value) for m in history] == [(10, 0.1), (20, 0.201)]
    assert T.drop_superseded(target, {"new"}) == 0


def test_the_driver_closes_a_run_by_the_id_its_trial_reported_without_searching(target, monkeypatch):
    """A search of the store by tag grows with its runs, and a lookup by id loads all the run's
    params; the trial reports its run's id, and the close goes straight to it (and falls back to
    the search for a run id that is gone)."""
    run = T.TrialRun(target, "t7", TrialConfig().flat())
    never = lambda *a, **k: (_ for _ in ()).throw(AssertionError("looked up"))  # noqa: E731
    monkeypatch.setattr(T, "find_runs", never)
    monkeypatch.setattr(type(run.client), "get_run", never)
    T.close_trial(target, "t7", "completed", cost=T.trial_cost(4.0, 1, 0), step=9, run_id=run.run_id, direct=True)
    monkeypatch.undo()
    closed = run.client.get_run(run.run_id)
    assert closed.info.status == "FINISHED" and closed.data.tags[T.TAG_STATUS] == "completed"
    T.close_trial(target, "t7", "completed", cost=T.trial_cost(4.0, 1, 0), step=9, run_id="0" * 32, direct=True)
    assert len(T.child_runs(target)) == 1  # the unknown id: found by its tag, not a second run
