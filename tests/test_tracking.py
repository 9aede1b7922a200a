"""MLflow layout without Ray: run reuse, batched logging, names, artifacts, fail-fast."""

from __future__ import annotations

import dataclasses

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mlflow")

from lcl_tune.adapters import tracking as T  # noqa: E402
from lcl_tune.schema.trial import ConfigError, TrialConfig  # noqa: E402

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
    assert {e.name for e in client.search_experiments()} >= {"study-a", "study-b"}
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
    assert files == {"config.yaml", "confusion_matrix.json", "per_class_f1.csv"}  # each report: no drawing
    T.close_trial(target, "t3", "stopped early", cost=T.trial_cost(10.0, cpu=2, gpu=0.25), step=30, details=DETAILS)
    r = run.client.get_run(run.run_id)
    files = {f.path for f in run.client.list_artifacts(run.run_id)}
    assert files == {"config.yaml", "confusion_matrix.json", "confusion_matrix.png", "per_class_f1.csv"}
    png = Path(run.client.download_artifacts(run.run_id, "confusion_matrix.png")).read_bytes()
    assert png.startswith(b"\x89PNG")  # the trial's end draws its last confusion matrix
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


def test_unreachable_tracking_server_fails_fast():
    with pytest.raises(ConfigError) as e:
        T.check_reachable("http://127.0.0.1:9", timeout=2)
    assert str(e.value).startswith("--tracking-uri: cannot reach the MLflow tracking server at http://127.0.0.1:9")


def test_tune_with_unreachable_server_fails_before_ray(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "lcl_tune.cli", "tune", str(repo / "search_spaces" / "quickstart.yaml"),
                           "--storage", str(tmp_path), "--tracking-uri", "http://127.0.0.1:9"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --tracking-uri: cannot reach the MLflow tracking server")
    assert not (tmp_path / "quickstart" / "ray").exists()  # Ray never started
