"""Tracking that never makes training wait: a durable, ordered spool and one sender.

Every tracking call of a trial is appended to a JSON-lines journal, fsync'd, and handed to a
background thread that sends the journal in order; the caller returns at once. An MLflow server
that is down for minutes costs the training loop one fsync per call. The sender retries with
back-off until the server answers again. The driver's closes of trial runs are appended (without
fsync: a killed process loses nothing) and sent by a process of their own (:class:`SenderProcess`),
so not even the driver's interpreter does the store's work.

What has been sent is acknowledged in a sidecar file (the last sequence number sent, and the
run it went to), so a journal left by a process that died (a killed trial, a stopped driver)
is replayed from there: by the driver at the end of the study (for a bounded time), or later by
``lcl-tune sync STUDY``. Replays are idempotent, so a record sent twice (sent, then the process
died before its acknowledgement) is harmless: metrics carry their own timestamps (MLflow stores
a (key, timestamp, step, value) point once), tags and params are set to the same values,
artifacts are overwritten, and a run is found by its trial tag before one is created.

MLflow's own ``synchronous=False`` queue serves the same goal inside one process, but it lives
in memory (lost with the process) and does not cover run creation or artifacts; the spool does
both, so it replaces it here rather than wrapping it.

Layout, in the study folder: ``spool/<name>.jsonl`` (the journal), ``<name>.ack`` (JSON: ``seq``
and the sender's state: the target, the run id), ``<name>.lock`` (held by the process sending it), ``<name>.files/<seq>/`` (artifacts).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from lcl_tune.util import drop_torn_tail, log, write_json

Execute = Callable[[dict[str, Any], dict[str, Any]], None]
"""``execute(record, state)`` performs one record against the store; ``state`` carries what a
record leaves for the next ones (``target``, ``run_id``) and is persisted with the ack."""


class Spool:
    """One append-only journal of tracking records (``{"seq", "op", "args"}`` per line).

    ``durable``: each append is fsync'd (a trial's records survive a power loss); without it an
    append is one ``write`` (a killed process still loses nothing: the kernel has it). ``remember``:
    keep appended records in memory for a sender in this process (the driver's spool, sent by a
    process of its own, does not). A reader in another process picks up appends with :meth:`refresh`."""

    def __init__(self, path: str | os.PathLike, durable: bool = True, remember: bool = True):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.ack_path = self.path.with_suffix(".ack")
        self.files = self.path.with_suffix(".files")
        self.durable, self.remember = durable, remember
        self._lock = threading.Lock()
        self._offset = 0  # bytes of whole lines read so far (refresh reads on from here)
        self._records = self._read_new()  # read once: later records are kept as they are appended
        self._seq = max((r["seq"] for r in self._records), default=0)
        self._acked = self.acked()["seq"]
        self._fh: Any = None  # opened by the first append, held for the spool's life

    def append(self, op: str, files: Path | None = None, **args: Any) -> int:
        """Journal one record (durably, before returning); ``files``: a folder of artifacts, copied
        into the spool so the record still has them after the caller's temporary folder is gone."""
        with self._lock:
            self._seq += 1
            if files is not None:
                kept = self.files / str(self._seq)
                shutil.copytree(files, kept, dirs_exist_ok=True)
                args["dir"] = str(kept)
            record = {"seq": self._seq, "op": op, "args": args}
            if self._fh is None:  # the writer: only it may cut a torn tail (a reader could cut a write in progress)
                drop_torn_tail(self.path)
                self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
            self._fh.write(json.dumps(record) + "\n")
            self._fh.flush()
            if self.durable:
                os.fsync(self._fh.fileno())
            if self.remember:
                self._records.append(record)
            return self._seq

    @property
    def last_seq(self) -> int:
        return self._seq

    def records(self) -> list[dict[str, Any]]:
        """Every whole record; a torn last line (the process died mid-write) is ignored."""
        return Spool(self.path, remember=True)._records if self.path.exists() else []

    def _read_new(self) -> list[dict[str, Any]]:
        """The whole records after ``_offset`` (a line still being written is left for later)."""
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self._offset)
                data = fh.read()
        except FileNotFoundError:
            return []
        data = data[:data.rfind(b"\n") + 1]
        self._offset += len(data)
        out = []
        for line in data.decode("utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                log.debug(f"{self.path}: ignoring a torn record")
        return out

    def refresh(self) -> None:
        """Take in the records another process appended since the last look."""
        with self._lock:
            new = [r for r in self._read_new() if r["seq"] > self._seq]
            self._records.extend(new)
            self._seq = max([self._seq, *(r["seq"] for r in new)])

    def acked(self) -> dict[str, Any]:
        try:
            return json.loads(self.ack_path.read_text())
        except (OSError, json.JSONDecodeError):
            return {"seq": 0}

    def state(self) -> dict[str, Any]:
        """What the last acknowledged record left for the next ones (the target, the run id)."""
        return {k: v for k, v in self.acked().items() if k != "seq"}

    def ack(self, seq: int, state: dict[str, Any]) -> None:
        write_json(self.ack_path, {"seq": seq, **state})  # state: plain JSON (the target, the run id)
        with self._lock:
            self._acked = seq
            self._records = [r for r in self._records if r["seq"] > seq]
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(self.files / str(seq))

    @property
    def acked_seq(self) -> int:
        return self._acked

    def pending(self) -> list[dict[str, Any]]:
        """The records not acknowledged yet, in order (from memory: the journal is read once)."""
        with self._lock:
            return [r for r in self._records if r["seq"] > self._acked]

    def send_pending(self, execute: Execute, state: dict[str, Any]) -> None:
        """Perform and acknowledge every pending record in order; the first failure stops (and
        raises), leaving it and the rest pending."""
        for rec in self.pending():
            if "dir" in rec["args"]:  # its artifacts where this spool keeps them now (the study may have moved)
                rec = {**rec, "args": {**rec["args"], "dir": str(self.files / str(rec["seq"]))}}
            execute(rec, state)
            self.ack(rec["seq"], state)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()


class SpoolSender:
    """The one thread that sends a spool in order, retrying with back-off while the store is down.
    Holds the spool's lock file for its life, so a replay elsewhere leaves a live spool alone.
    ``follow``: the records are appended by another process (looked for every ``poll_s``)."""

    def __init__(self, spool: Spool, execute: Execute, *, what: str, max_backoff_s: float = 30.0,
                 follow: bool = False, poll_s: float = 1.0):
        self.spool, self.execute, self.what, self.max_backoff_s = spool, execute, what, max_backoff_s
        self.follow, self.poll_s = follow, poll_s
        self.state: dict[str, Any] = spool.state()
        self._wake = threading.Condition()
        self._closed = False
        self._lockfile = open(spool.path.with_suffix(".lock"), "a")  # noqa: SIM115
        if not _lock(self._lockfile, time.monotonic() + 10.0):  # a replay, or a process about to exit
            log.warning(f"{spool.path} is locked by another process; sending it from here as well "
                        "(records are idempotent, and training must not wait)")
        self._thread = threading.Thread(target=self._loop, name=f"lcl-tune-spool-{spool.path.stem}", daemon=True)
        self._thread.start()

    def append(self, op: str, files: Path | None = None, **args: Any) -> None:
        """Journal a record and return at once; the thread sends it."""
        self.spool.append(op, files, **args)
        with self._wake:
            self._wake.notify()

    def flush(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for everything journalled to be sent; True if it was."""
        deadline = time.monotonic() + timeout
        if self.follow:
            self.spool.refresh()
        while self.spool.acked_seq < self.spool.last_seq:
            if time.monotonic() >= deadline:
                return False
            with self._wake:
                self._wake.notify()
            time.sleep(0.05)
        return True

    def close(self, timeout: float = 10.0) -> bool:
        """Flush for up to ``timeout`` seconds, then stop; what is left stays in the journal."""
        drained = self.flush(timeout)
        self._closed = True
        with self._wake:
            self._wake.notify()
        self._thread.join(timeout=1.0)
        self.spool.close()
        self._lockfile.close()
        if not drained:
            warn_unsent(self.what, len(self.spool.pending()), self.spool.path)
        return drained

    def _loop(self) -> None:
        backoff, down_since = 0.5, None
        while not self._closed:
            if self.follow:
                self.spool.refresh()
            if not self.spool.pending():
                with self._wake:
                    self._wake.wait(timeout=self.poll_s)
                continue
            try:
                self.spool.send_pending(self.execute, self.state)
                if down_since is not None:
                    log.info(f"{self.what}: tracking store answers again after {time.monotonic() - down_since:.0f}s; "
                             "the spooled records are sent")
                backoff, down_since = 0.5, None
            except Exception as e:  # noqa: BLE001 - the store is down or refusing: keep the record, retry
                if down_since is None:
                    down_since = time.monotonic()
                    log.warning(f"{self.what}: tracking store unavailable ({str(e).splitlines()[0][:160] if str(e) else e!r}); "
                                f"training goes on, records are kept in {self.spool.path} and retried")
                with self._wake:
                    self._wake.wait(timeout=backoff)
                backoff = min(backoff * 2, self.max_backoff_s)


class SenderProcess:
    """A spool appended here and sent by a process of its own (``python -m lcl_tune.adapters.sender``):
    the driver's closes of trial runs. Closing a run takes store round trips (and, with a server,
    the network); in the driver, even on a thread, they would compete with Tune's event loop for
    the interpreter. Appending costs one ``write``. The process is started at the first record (and
    again if it died); it sends in order, as :class:`SpoolSender` does, and when the driver closes
    its pipe (or dies) it sends what is left, for a bounded time, and exits."""

    def __init__(self, spool: Spool, *, what: str):
        self.spool, self.what = spool, what
        self.proc: subprocess.Popen | None = None

    def append(self, op: str, files: Path | None = None, **args: Any) -> None:
        self.spool.append(op, files, **args)
        if self.proc is None or self.proc.poll() is not None:
            self.proc = subprocess.Popen([sys.executable, "-m", "lcl_tune.adapters.sender", str(self.spool.path)],
                                         stdin=subprocess.PIPE)

    def flush(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds until the process acknowledged every record appended."""
        deadline = time.monotonic() + timeout
        while self.spool.acked()["seq"] < self.spool.last_seq:
            if time.monotonic() >= deadline or (self.proc is not None and self.proc.poll() is not None):
                return self.spool.acked()["seq"] >= self.spool.last_seq
            time.sleep(0.05)
        return True

    def close(self, timeout: float = 10.0) -> bool:
        """Flush for up to ``timeout`` seconds, then stop the process; what is left stays in the journal."""
        drained = self.flush(timeout)
        if self.proc is not None and self.proc.poll() is None:
            if drained:
                self.proc.stdin.close()  # its cue: nothing more will come
            else:
                self.proc.terminate()
            try:
                self.proc.wait(timeout=10.0)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.spool.close()
        if not drained:
            warn_unsent(self.what, self.spool.last_seq - self.spool.acked()["seq"], self.spool.path)
        return drained


def warn_unsent(what: str, n: int, path: Path) -> None:
    log.warning(f"{what}: {n} tracking records not sent yet; they are kept in {path} and sent at the end of the "
                "study or by lcl-tune sync")


def _lock(fh: Any, deadline: float) -> bool:
    """Take the spool's lock file, polling until ``deadline``; False if another process still holds it."""
    while True:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.2)


def replay(path: str | os.PathLike, execute: Execute, timeout: float) -> int:
    """Send what a spool holds that was not acknowledged, for up to ``timeout`` seconds, unless a
    live process holds it (then it is that process's to send). Returns the records still pending."""
    path = Path(path)
    deadline, backoff = time.monotonic() + timeout, 0.5
    lock = open(path.with_suffix(".lock"), "a")  # noqa: SIM115
    try:
        if not _lock(lock, deadline):  # a process still sending it (a trial's last seconds) releases it when it exits
            return len(Spool(path).pending())
        spool = Spool(path)
        state = spool.state()
        while spool.pending() and time.monotonic() < deadline:
            try:
                spool.send_pending(execute, state)
            except Exception as e:  # noqa: BLE001 - the store is still down: wait, retry until the deadline
                log.debug(f"replaying {path}: {e}")
                time.sleep(min(backoff, max(0.0, deadline - time.monotonic())))
                backoff = min(backoff * 2, 10.0)
        spool.close()
        return len(spool.pending())
    finally:
        lock.close()


def spools(folder: str | os.PathLike) -> list[Path]:
    return sorted(Path(folder).glob("*.jsonl"))
