"""A running study's progress as a snapshot, and its rendering: the live table of ``lcl-tune tune`` /
``ablate`` and ``lcl-tune status``.

The driver keeps one *snapshot* per study (or ablation phase) and writes it to
``<folder>/progress.json`` on every change (:mod:`lcl_tune.adapters.progress`); everything shown
is a pure function of it, so the live table, the lines of a log file and ``lcl-tune status`` run
elsewhere or later all say the same. No Ray, torch or MLflow (pandas only for a study folder of an
earlier version): ``lcl-tune status`` answers at once.

The snapshot (``version`` 1), JSON::

    kind, name, phase      "study" | "ablation", its name, the ablation phase ("cells" | "final")
    metric, best_key, mode the study metric, the best-so-far key trials report, "max" | "min"
    columns                the searched keys (dotted) shown per trial; an ablation: arm, seed
    total, slots           trials (cells) in all, how many run at once
    host, pid              the driver
    started, updated, ended, outcome   epoch seconds; outcome "finished" | "interrupted" once ended
    ray_status_log         Ray's own status dump and log lines, next to the snapshot
    trials                 one dict per trial: id, params, status, period, max_t, last, best,
                           started, reported, ended, wall_s, retries, error (its last line),
                           log_file and log_tail (an errored trial's stderr.log, last lines), path
    summary                the study line's numbers at ``updated`` (for scripts; renderers recompute)

Statuses are the project's words: ``pending``, ``running``, ``paused``, and the final ones of
:func:`lcl_tune.adapters.searcher.trial_status`: ``completed``, ``stopped early`` (by ASHA), ``errored``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Callable, Iterator

from lcl_tune.analysis import rungs
from lcl_tune.schema.trial import ConfigError, load_yaml
from lcl_tune.util import json_safe

SNAPSHOT = "progress.json"
RAY_STATUS_LOG = "ray_status.log"
VERSION = 1
STALE_AFTER_S = 300.0  # a running driver rewrites its snapshot at least every HEARTBEAT_S
HEARTBEAT_S = 30.0

PENDING, RUNNING, PAUSED = "pending", "running", "paused"
COMPLETED, STOPPED, ERRORED = "completed", "stopped early", "errored"  # a trial's final status (searcher.STATUS_*)
FINAL = (COMPLETED, STOPPED, ERRORED)


# --------------------------------------------------------------------------------------------
# Numbers: counts, best, ETA
# --------------------------------------------------------------------------------------------


def fmt_value(v: Any) -> str:
    """A parameter or metric, compact: floats to 4 significant digits, missing as ``-``."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    text = str(v)
    return text if len(text) <= 16 else text[:15] + "…"


def last_error_line(text: str | None, limit: int) -> str:
    """The last non-blank line of an error text (the exception itself), at most ``limit`` characters."""
    lines = [x.strip() for x in str(text or "").splitlines() if x.strip()]
    return lines[-1][:limit] if lines else ""


def fmt_duration(seconds: float | None) -> str:
    if seconds is None or math.isnan(seconds):
        return "?"
    s = int(round(max(0.0, seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def counts(snap: dict) -> dict[str, int]:
    """Trials per status, plus ``done`` (any final status), and ``pending`` including the trials
    the searcher has not proposed yet (``total`` minus every trial Ray knows that is not pending)."""
    trials = snap.get("trials", [])
    by = {s: sum(t["status"] == s for t in trials) for s in (RUNNING, PAUSED, *FINAL)}
    by["done"] = sum(by[s] for s in FINAL)
    by["running"] = by.pop(RUNNING) + by.pop(PAUSED)
    by["pending"] = max(int(snap.get("total") or 0) - by["done"] - by["running"],
                        sum(t["status"] == PENDING for t in trials))
    return by


def best_trial(snap: dict) -> dict | None:
    """The trial with the best ``best/<metric>`` so far (errored ones included: what they reached
    before failing is real, and the study's final choice says otherwise if it differs)."""
    scored = [t for t in snap.get("trials", []) if isinstance(t.get("best"), (int, float))]
    if not scored:
        return None
    sign = -1.0 if snap.get("mode", "max") == "max" else 1.0
    return min(scored, key=lambda t: (sign * t["best"], str(t["id"])))  # ties: the first id, as results.parquet


def trial_seconds(t: dict, now: float) -> float:
    """Wall time of a trial: Ray's ``time_total_s`` at its last report, plus, while it runs, the
    time since that report (or since it started, before its first); a trial that ended without
    any report (an error at start-up, retries included), from its start to its end."""
    wall = float(t.get("wall_s") or 0.0)
    if not wall and t["status"] in FINAL and t.get("started") and t.get("ended"):
        return max(0.0, t["ended"] - t["started"])
    if t["status"] in (RUNNING, PAUSED):
        since = t.get("reported") or t.get("started")
        if since:
            wall += max(0.0, now - since)
    return wall


def eta_seconds(snap: dict, now: float) -> float | None:
    """Seconds until the study ends, or None before any trial finished.

    ``mean`` is the mean wall time of the finished trials, whatever their outcome (the mix of full
    runs and ASHA stops so far is the best guess for the rest); a pending trial has ``mean`` to
    go, a running one :func:`running_left`. That work is spread over the ``slots`` trials that run
    at once, and the study cannot end before its longest running trial does:
    ``ETA = max(longest running left, (running left + pending × mean) / slots)``."""
    trials = snap.get("trials", [])
    finished = [trial_seconds(t, now) for t in trials if t["status"] in FINAL]
    if not finished:
        return None
    mean = sum(finished) / len(finished)
    left = [running_left(t, mean, now) for t in trials if t["status"] in (RUNNING, PAUSED)]
    work = sum(left) + counts(snap)["pending"] * mean
    return max(max(left, default=0.0), work / max(1, int(snap.get("slots") or 1)))


def running_left(t: dict, mean: float, now: float) -> float:
    """What a running trial has left: ``mean`` minus its wall time so far, but at least the rest of
    the period it is in (ASHA stops trials only when they report); once it has outlived the mean
    (a trial ASHA keeps, most likely), its remaining periods at its own pace so far."""
    wall = trial_seconds(t, now)
    period, max_t = t.get("period"), t.get("max_t")
    if not period:
        return max(0.0, mean - wall)
    pace, since = float(t.get("wall_s") or 0.0) / period, now - (t.get("reported") or now)
    if wall < mean or not max_t:
        return max(0.0, mean - wall, pace - since)
    return max(0.0, (max_t - period) * pace - since)


def elapsed_seconds(snap: dict, now: float) -> float:
    return (snap.get("ended") or now) - (snap.get("started") or now)


def summary(snap: dict, now: float) -> dict[str, Any]:
    """The study line's numbers (stored in the snapshot for scripts: ``jq .summary progress.json``)."""
    best = best_trial(snap)
    return {**counts(snap), "best": best["best"] if best else None, "best_trial": best["id"] if best else None,
            "elapsed_s": round(elapsed_seconds(snap, now), 1),
            "eta_s": None if snap.get("ended") else _round(eta_seconds(snap, now))}


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 1)


# --------------------------------------------------------------------------------------------
# Text: the study line, the table, one line per event
# --------------------------------------------------------------------------------------------


def study_line(snap: dict, now: float) -> str:
    """``study 'q': 3/6 done (1 completed, 2 stopped early), 2 running, 1 pending | best
    dev/weighted_f1 0.6725 (trial f65ea575) | elapsed 1m35s | ETA 2m10s``; ``... | finished in 3m05s``
    once it ended."""
    c = counts(snap)
    parts = ", ".join(f"{c[s]} {s}" for s in FINAL if c[s])
    what = "ablation" if snap.get("kind") == "ablation" else "study"
    phase = f" ({snap['phase']})" if snap.get("phase") else ""
    line = (f"{what} {snap.get('name', '?')!r}{phase}: {c['done']}/{snap.get('total') or '?'} done"
            + (f" ({parts})" if parts else "") + f", {c['running']} running, {c['pending']} pending")
    best = best_trial(snap)
    line += f" | best {snap.get('metric')} {fmt_value(best['best'])} (trial {best['id']})" if best else " | best -"
    if snap.get("ended"):
        took = f" in {fmt_duration(elapsed_seconds(snap, now))}" if snap.get("started") else ""
        return line + f" | {snap.get('outcome') or 'ended'}{took}"
    return line + f" | elapsed {fmt_duration(elapsed_seconds(snap, now))} | ETA {fmt_duration(eta_seconds(snap, now))}"


def status_text(t: dict) -> str:
    retries = int(t.get("retries") or 0)
    return t["status"] + (f" (retry {retries})" if retries and t["status"] not in (COMPLETED, STOPPED) else "")


def period_text(t: dict) -> str:
    period, max_t = t.get("period"), t.get("max_t")
    if not period:
        return "-"
    return f"{period}/{max_t}" if max_t else str(period)


def _order(snap: dict) -> list[dict]:
    """Running and pending trials first (by start), then the finished ones best first, errored last."""
    sign = -1.0 if snap.get("mode", "max") == "max" else 1.0
    trials = snap.get("trials", [])
    live = [t for t in trials if t["status"] not in FINAL]
    live.sort(key=lambda t: (t["status"] == PENDING, t.get("started") or math.inf))
    done = [t for t in trials if t["status"] in FINAL]
    done.sort(key=lambda t: (t["status"] == ERRORED, not isinstance(t.get("best"), (int, float)),
                             sign * t["best"] if isinstance(t.get("best"), (int, float)) else 0.0, str(t["id"])))
    return live + done


def _pick_rows(snap: dict, max_rows: int | None) -> tuple[list[dict], list[dict]]:
    """The rows that fit (``max_rows``, one of them kept for the "N more" line when some do not):
    every running trial, then the best finished ones; and the rest."""
    ordered = _order(snap)
    if max_rows is None or len(ordered) <= max_rows:
        return ordered, []
    room = max(1, max_rows - 1)
    running = [t for t in ordered if t["status"] in (RUNNING, PAUSED)][:room]
    finished = [t for t in ordered if t["status"] in FINAL][:room - len(running)]
    shown = {id(t) for t in running + finished}
    return [t for t in ordered if id(t) in shown], [t for t in ordered if id(t) not in shown]


def table_lines(snap: dict, max_rows: int | None = None) -> list[str]:
    """The trials table: id, the searched values (or arm and seed), period / max_t, the metric's
    last value, best so far, status. At most ``max_rows`` trial rows (plus a header): when more
    trials than that exist, the running ones and the best finished ones, then a count of the rest."""
    columns = list(snap.get("columns", []))
    header = ["trial", *columns, "period", snap.get("metric", "metric"), "best", "status"]
    shown, rest = _pick_rows(snap, max_rows)
    rows = [[t["id"], *(fmt_value(t.get("params", {}).get(k)) for k in columns), period_text(t),
             fmt_value(t.get("last")), fmt_value(t.get("best")), status_text(t)] for t in shown]
    numeric = [i for i in range(len(header)) if rows and all(_is_number(r[i]) for r in rows)]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    lines = ["  ".join((c.rjust(w) if i in numeric else c.ljust(w)) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
             for r in [header, *rows]]
    if rest:
        by = {s: sum(t["status"] == s for t in rest) for s in (RUNNING, PENDING, *FINAL)}
        lines.append(f"… {len(rest)} more: " + ", ".join(f"{n} {s}" for s, n in by.items() if n))
    return lines


def _is_number(text: str) -> bool:
    try:
        float(text.split("/")[0])
        return True
    except ValueError:
        return text == "-"


def error_lines(snap: dict, limit: int = 2) -> list[str]:
    """The most recent errored trials: the error's last line and the last lines of their stderr."""
    errored = sorted((t for t in snap.get("trials", []) if t["status"] == ERRORED),
                     key=lambda t: t.get("ended") or 0.0, reverse=True)[:limit]
    lines: list[str] = []
    for t in errored:
        lines.append(f"errored trial {t['id']}: {t.get('error') or '(no error text)'}")
        log_tail = [x for x in (t.get("log_tail") or "").splitlines() if x.strip()][-3:]
        if log_tail:
            lines.append("  last stderr lines:")
            lines += [f"    {x}" for x in log_tail]
    return lines


def render(snap: dict, now: float, width: int | None = None, height: int | None = None) -> str:
    """Table, study line and errors, to fit ``height`` lines (rows are dropped, never the study
    line) of ``width`` columns (lines are cut: a wrapped line would break an in-place redraw)."""
    errors = error_lines(snap, limit=1 if height and height < 20 else 2)
    study = fold(study_line(snap, now), width)
    max_rows = None if height is None else max(3, height - 2 - len(study) - len(errors))
    lines = [*table_lines(snap, max_rows), *study, *errors]
    if width:
        lines = [x if len(x) < width else x[:width - 2] + "…" for x in lines]
    return "\n".join(lines)


def fold(line: str, width: int | None) -> list[str]:
    """``line`` on as many lines as it needs to fit ``width``, broken after its " | " parts (the
    study line's ETA is its last part: cutting it off would hide what a user looks for)."""
    if not width or len(line) < width:
        return [line]
    sep = " | "
    out = [""]
    for part in line.split(sep):
        joined = f"{out[-1]}{sep}{part}" if out[-1].strip() else f"{out[-1]}{part}"
        out[-1:] = [joined] if len(joined) < width or not out[-1].strip() else [out[-1], f"  {part}"]
    return out


def clock_prefix(snap: dict, now: float) -> str:
    s = int(max(0.0, now - (snap.get("started") or now)))
    return f"[{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}]"


def params_text(snap: dict, t: dict) -> str:
    return " ".join(f"{k}={fmt_value(t.get('params', {}).get(k))}" for k in snap.get("columns", [])
                    if k in t.get("params", {}))


def event_line(snap: dict, t: dict, event: str, now: float) -> str:
    """One line per event, for a log file or a pipe: ``started`` (with its values), ``result`` (a
    period's metric and best), ``finished`` (its outcome), ``retry``; errors add their stderr tail."""
    head = f"{clock_prefix(snap, now)} trial {t['id']}"
    if event == "started":
        return f"{head} started: {params_text(snap, t)}"
    if event == "retry":
        return f"{head} failed, retry {t.get('retries', 1)} (from its last checkpoint, if any): {t.get('error') or ''}"
    if event == "result":
        return (f"{head} period {period_text(t)}: {snap.get('metric')}={fmt_value(t.get('last'))} "
                f"best={fmt_value(t.get('best'))}")
    took = fmt_duration(trial_seconds(t, now))
    if t["status"] == ERRORED:
        where = f"at period {period_text(t)}" if t.get("period") else "before its first report"
        lines = [f"{head} errored {where} after {took}: {t.get('error') or ''}"]
        tail = [x for x in (t.get("log_tail") or "").splitlines() if x.strip()]
        if tail:
            lines += ["    " + x for x in [f"last lines of {t.get('log_file') or 'stderr.log'}:", *tail]]
        return "\n".join(lines)
    how = "stopped early by ASHA" if t["status"] == STOPPED else t["status"]
    return f"{head} {how} after {period_text(t)} periods in {took}: best={fmt_value(t.get('best'))}"


# --------------------------------------------------------------------------------------------
# Terminal: redraw in place, or append lines
# --------------------------------------------------------------------------------------------


def is_terminal(stream: IO[str]) -> bool:
    """Redraw in place only on a real terminal (not a pipe, a file or ``TERM=dumb``)."""
    return bool(getattr(stream, "isatty", lambda: False)()) and os.environ.get("TERM") != "dumb"


def terminal_size() -> tuple[int, int]:
    size = shutil.get_terminal_size((120, 40))
    return size.columns, size.lines


class LiveView:
    """A block of lines redrawn in place at the bottom of a terminal: the cursor goes back to the
    block's first line, each line is rewritten and cleared to its end, then the rest of the screen
    is cleared. Redraws only when the text changed and at most every ``min_interval`` seconds
    (``update(force=True)`` for events that must show now); one write per frame, so no flicker."""

    def __init__(self, stream: IO[str], min_interval: float = 0.25, clock: Callable[[], float] = time.monotonic):
        self.stream, self.min_interval, self.clock = stream, min_interval, clock
        self.text, self.drawn_lines, self.last_draw = "", 0, -math.inf

    def due(self) -> bool:
        """Whether a redraw may happen now (callers skip rendering a frame that would be dropped)."""
        return self.clock() - self.last_draw >= self.min_interval

    def update(self, text: str, force: bool = False) -> bool:
        """Show ``text``; True when it was drawn now."""
        if text == self.text and self.drawn_lines:
            return False
        if not force and not self.due():
            return False
        self._draw(text)
        return True

    def _draw(self, text: str) -> None:
        up = f"\r\x1b[{self.drawn_lines}A" if self.drawn_lines else "\r"
        lines = text.split("\n")
        self.stream.write(up + "".join(f"{line}\x1b[K\n" for line in lines) + "\x1b[J")
        self.stream.flush()
        self.text, self.drawn_lines, self.last_draw = text, len(lines), self.clock()

    def erase(self) -> None:
        """Remove the block (before someone else writes to the terminal)."""
        if self.drawn_lines:
            self.stream.write(f"\r\x1b[{self.drawn_lines}A\x1b[J")
            self.stream.flush()
            self.drawn_lines = 0

    def redraw(self) -> None:
        if self.text:
            self._draw(self.text)

    @contextmanager
    def around_logging(self, logger: logging.Logger) -> Iterator[None]:
        """While the block is shown, a message of ``logger`` to the same terminal erases it, is
        written, and the block is drawn again below it (so messages scroll up above the table)."""
        patched = [h for h in logger.handlers if getattr(h, "stream", None) is self.stream]
        for handler in patched:
            def emit(record: logging.LogRecord, _emit: Callable = handler.emit) -> None:
                self.erase()
                _emit(record)
                self.redraw()
            handler.emit = emit  # type: ignore[method-assign]
        try:
            yield
        finally:
            for handler in patched:
                del handler.emit


# --------------------------------------------------------------------------------------------
# Reading a folder: progress.json, or what an earlier version left
# --------------------------------------------------------------------------------------------


def read_snapshot(path: str | os.PathLike) -> dict | None:
    path = Path(path)
    try:
        snap = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return snap if isinstance(snap, dict) and "trials" in snap else None


def load_status(folder: str | os.PathLike) -> dict:
    """The snapshot of a study or ablation folder: its ``progress.json``, else (a folder an
    earlier version made) one rebuilt from ``results.parquet`` (a study) or ``cells/*.json`` (an
    ablation), marked ``source``."""
    folder = Path(folder)
    snap = read_snapshot(folder / SNAPSHOT)
    if snap is not None:
        return {**snap, "source": SNAPSHOT}
    if (folder / "study.yaml").is_file() and (folder / "results.parquet").is_file():
        return snapshot_from_results(folder)
    if (folder / "ablation.yaml").is_file():
        return snapshot_from_cells(folder)
    raise ConfigError("DIR", f"no {SNAPSHOT}, results.parquet or ablation.yaml in {folder}",
                      "pass the folder of a study or ablation (STORAGE/NAME)")


def snapshot_from_results(folder: Path) -> dict:
    """A finished study's snapshot from ``study.yaml`` and ``results.parquet``."""
    import pandas as pd

    spec = load_yaml(folder / "study.yaml")
    metric = spec.get("metric", {}).get("name", "dev/weighted_f1")
    scheduler = spec.get("scheduler", {})
    max_t = scheduler.get("max_t") if scheduler.get("time_unit", "period") == "period" else None
    table = pd.read_parquet(folder / "results.parquet")
    columns = [k for k in spec.get("space", {}) if k in table.columns]
    trials = []
    for row in table.to_dict("records"):
        trials.append({"id": row["trial_id"], "params": {k: json_safe(row.get(k)) for k in columns},
                       "status": row["status"], "period": json_safe(row.get("periods")), "max_t": max_t,
                       "last": json_safe(row.get(metric)), "best": json_safe(row.get(f"best/{metric}")),
                       "wall_s": json_safe(row.get("wall_s")), "error": last_error_line(row.get("error"), 200),
                       "path": row.get("path")})
    return _finished_snapshot("study", spec.get("name", folder.name), metric, spec.get("metric", {}).get("mode", "max"),
                              columns, spec.get("search", {}).get("num_samples") or len(trials), trials,
                              folder / "results.parquet")


def snapshot_from_cells(folder: Path) -> dict:
    """An ablation's snapshot from ``ablation.yaml`` and its finished cells (``cells/`` or, for a
    fixed-point ablation run with ``--final`` only, ``final/``)."""
    from lcl_tune.schema.ablation import dev_cell_dir, load_cells

    spec = load_yaml(folder / "ablation.yaml")
    metric = spec.get("metric", {}).get("name", "dev/weighted_f1")
    cell_dir = folder / dev_cell_dir(folder)
    trials = []
    for cell in load_cells(folder, cell_dir.name):
        m = cell.get("metrics", {})
        trials.append({"id": cell["trial_id"], "params": {"arm": cell["arm"], "seed": cell["seed"]},
                       "status": COMPLETED, "period": m.get("training_iteration"), "max_t": None,
                       "last": m.get(metric), "best": m.get(f"best/{metric}"), "wall_s": m.get("time_total_s")})
    total = len(spec.get("arms", {})) * len(spec.get("seeds", [])) or len(trials)
    return _finished_snapshot("ablation", spec.get("name", folder.name), metric, spec.get("metric", {}).get("mode", "max"),
                              ["arm", "seed"], total, trials, cell_dir)


def _finished_snapshot(kind: str, name: str, metric: str, mode: str, columns: list[str], total: int,
                       trials: list[dict], source: Path) -> dict:
    return {"version": VERSION, "kind": kind, "name": name, "metric": metric, "best_key": f"best/{metric}",
            "mode": mode, "columns": columns, "total": int(total), "slots": 1, "trials": trials,
            "outcome": "finished" if len(trials) >= int(total) else "incomplete",
            "ended": source.stat().st_mtime if source.exists() else time.time(),
            "source": source.name + ("/" if source.is_dir() else "")}


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def state_line(snap: dict, now: float) -> str:
    """Whether the study runs: ``running (updated 4s ago)``, ``finished``, ``interrupted``, or
    that its driver seems gone (its pid no longer runs on this host, or no update for
    ``STALE_AFTER_S`` while it should write every ``HEARTBEAT_S``)."""
    if snap.get("source") not in (None, SNAPSHOT):
        return (f"{snap.get('outcome')} (from {snap['source']}: no {SNAPSHOT}, so made by an earlier version, "
                "or not started yet)")
    ago = now - float(snap.get("updated") or now)
    if snap.get("ended"):
        outcome = snap.get("outcome") or "finished"
        when = f"ended {fmt_duration(now - float(snap['ended']))} ago"
        return f"{outcome} ({when}" + ("; resume it with the same command and --resume)" if outcome == "interrupted" else ")")
    where = f"driver pid {snap.get('pid')} on {snap.get('host')}"
    if snap.get("host") == socket.gethostname() and snap.get("pid") and not pid_alive(int(snap["pid"])):
        return f"stale: the {where} is gone (last update {fmt_duration(ago)} ago); the study did not finish"
    if ago > STALE_AFTER_S:
        return f"stale? no update for {fmt_duration(ago)} (the {where} should write every {HEARTBEAT_S:.0f}s)"
    return f"running (updated {fmt_duration(ago)} ago, {where})"


def status_report(folder: str | os.PathLike, snap: dict | None = None, now: float | None = None,
                  width: int | None = None, height: int | None = None) -> str:
    """What ``lcl-tune status`` prints: the state, the table, the study line, recent errors, and,
    for an ablation, a line per tuning study of its arms."""
    folder = Path(folder)
    now = time.time() if now is None else now
    snap = load_status(folder) if snap is None else snap
    tuning = [f"  tuning: {study_line(tuned, now)} [{state_line(tuned, now)}]"
              for tuned in map(read_snapshot, sorted((folder / "tune").glob(f"*/{SNAPSHOT}"))) if tuned is not None]
    doc = rungs.read(folder)
    signal = rungs.lines(doc) if doc else []
    height = None if height is None else height - 1 - len(tuning) - len(signal)
    return "\n".join([f"{folder}: {state_line(snap, now)}", render(snap, now, width, height), *tuning, *signal])


def watch_status(folder: str | os.PathLike, stream: IO[str], every: float | None = None,
                 clock: Callable[[], float] = time.time) -> None:
    """Print :func:`status_report` once, or every ``every`` seconds until the study ends or its
    driver is gone (redrawn in place on a terminal, appended otherwise); Ctrl-C stops watching.
    ``clock``: the wall clock "updated 3s ago" and the ETA are computed against (tests fix it)."""
    live = LiveView(stream, min_interval=0.0) if every and is_terminal(stream) else None
    try:
        while True:
            snap, now = load_status(folder), clock()
            width, height = terminal_size() if live else (None, None)
            text = status_report(folder, snap, now, width, None if height is None else height - 1)
            if live:
                live.update(text, force=True)
            else:
                stream.write(text + "\n")
                stream.flush()
            if not every or snap.get("ended") or state_line(snap, now).startswith("stale"):
                return
            time.sleep(every)
    except KeyboardInterrupt:
        return
