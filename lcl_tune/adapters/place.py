"""Where a study lives: its folder on the driver, and with ``--storage URI`` its copy next to the
trials, kept current while the study runs, so that ``--resume`` works from the URI alone.

On a cluster the driver runs inside ``ray job submit``, whose working directory is Ray's unpacked
copy of the job (``/tmp/ray/session_*/runtime_resources/...``), gone with the Ray session. So a
study with remote storage keeps its driver files in a stable, absolute home, ``$LCL_TUNE_HOME`` or
``~/lcl_runs`` (:func:`driver_home`), and :class:`StudySync` copies them to the storage URI while it
runs: every :data:`SYNC_EVERY_S` seconds and within :data:`SYNC_AFTER_END_S` of each trial's end,
only the files that changed, on a thread of its own. A driver whose machine is gone resumes from
the URI: :func:`sync_down` brings the files back first.

Adapter module: imports Ray (the callback) and pyarrow.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import tune

from lcl_tune.util import log, redact

HOME_ENV = "LCL_TUNE_HOME"
SYNC_EVERY_S = 60.0
SYNC_AFTER_END_S = 5.0
DRIVER_FILE = "driver.json"  # where the driver kept the study: a resume elsewhere maps that folder to its own
LIVE_FILES = ("study.yaml", "ablation.yaml", "command.txt", DRIVER_FILE, "optuna.journal", "progress.json", "spool",
              "cells", "tuned.json")  # what --resume needs, and what a user follows while the study runs
END_FILES = (*LIVE_FILES, "results.parquet", "rung_correlation.json", "plots", "report")


def study_folder(storage: str | os.PathLike, name: str) -> Path:
    return (Path(storage).expanduser() / name).resolve()


def is_uri(storage: str | os.PathLike) -> bool:
    return "://" in str(storage)


def filesystem_of(path: str) -> tuple[Any, str]:
    """The pyarrow filesystem of a local path or a storage URI, and the path inside it."""
    from pyarrow import fs

    return fs.FileSystem.from_uri(path) if is_uri(path) else (fs.LocalFileSystem(), path)


def driver_home() -> Path:
    """The driver's folder for studies with remote storage: ``$LCL_TUNE_HOME``, else ``~/lcl_runs``."""
    return Path(os.environ.get(HOME_ENV) or Path.home() / "lcl_runs").expanduser().resolve()


@dataclass(frozen=True)
class StudyPlace:
    """Where a study lives. ``folder``: on the driver (study.yaml, results.parquet, the Optuna
    journal, the SQLite MLflow store, plots). ``remote``: with ``--storage s3://...`` (or any
    URI Ray and pyarrow understand) Ray keeps trials and checkpoints there, readable from every
    node, and the driver's files are copied there while the study runs; None for a local or shared
    path, where everything is in ``folder``."""

    folder: Path
    remote: str | None = None

    @property
    def ray_storage(self) -> str:
        return self.remote or str(self.folder)

    @property
    def ray_dir(self) -> str:
        return f"{self.ray_storage}/ray"


def study_place(storage: str | os.PathLike, name: str, local_dir: str | os.PathLike | None = None) -> StudyPlace:
    if is_uri(storage):
        return StudyPlace(study_folder(local_dir or driver_home(), name), f"{str(storage).rstrip('/')}/{name}")
    return StudyPlace(study_folder(storage, name))


RELOCATED: dict[str, str] = {}
"""A resumed study's folder as its first driver had it -> the folder now. Ray pickles the searcher
and the callbacks with the experiment, paths included; restored on another machine (``--resume``
from the storage URI alone) they are mapped here (:func:`relocate`), in their ``__setstate__``."""


def relocate(path: Any) -> Any:
    """``path`` (a str or Path) in the study folder as it is now (see :data:`RELOCATED`)."""
    if path is None:
        return None
    text = str(path)
    for old, new in RELOCATED.items():
        if text == old or text.startswith(old + os.sep):
            moved = new + text[len(old):]
            return moved if isinstance(path, str) else type(path)(moved)
    return path


def record_folder(folder: Path) -> None:
    """Note where this driver keeps the study (``driver.json``); a driver that finds another
    folder there maps the old one to its own (:data:`RELOCATED`) before Ray restores anything."""
    import json
    import socket

    path = folder / DRIVER_FILE
    try:
        before = json.loads(path.read_text()).get("folder")
    except (OSError, ValueError):
        before = None
    if before and before != str(folder):
        RELOCATED[before] = str(folder)
        log.info(f"the study was kept in {before} by its last driver; it is in {folder} now")
    path.write_text(json.dumps({"folder": str(folder), "host": socket.gethostname()}) + "\n")


def exists(path: str) -> bool:
    """A local path or a storage URI (s3://, gs://, file://...) exists."""
    from pyarrow import fs

    filesystem, inner = filesystem_of(path)
    return filesystem.get_file_info(inner).type != fs.FileType.NotFound


def _local_files(folder: Path, names: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    """Relative path -> (mtime in ns, size) of the files under ``names`` in ``folder``."""
    out = {}
    for name in names:
        src = folder / name
        paths = [p for p in src.rglob("*") if p.is_file()] if src.is_dir() else [src] if src.is_file() else []
        for path in paths:
            try:
                st = path.stat()
            except FileNotFoundError:  # a temporary file renamed away meanwhile
                continue
            out[str(path.relative_to(folder))] = (st.st_mtime_ns, st.st_size)
    return out


def sync_up(place: StudyPlace, names: tuple[str, ...] = END_FILES, sent: dict[str, tuple[int, int]] | None = None) -> None:
    """Copy the driver's files of a study to its remote storage (no-op for local storage). With
    ``sent`` (what an earlier call copied), only the files that changed since; it is updated."""
    if place.remote is None:
        return
    from pyarrow import fs

    dst_fs, root = fs.FileSystem.from_uri(place.remote)
    local = fs.LocalFileSystem()
    made: set[str] = set()
    for rel, stamp in _local_files(place.folder, names).items():
        if sent is not None and sent.get(rel) == stamp:
            continue
        parent = f"{root}/{rel}".rsplit("/", 1)[0]
        if parent not in made:
            dst_fs.create_dir(parent, recursive=True)
            made.add(parent)
        try:
            fs.copy_files(str(place.folder / rel), f"{root}/{rel}", source_filesystem=local, destination_filesystem=dst_fs)
        except FileNotFoundError:  # gone meanwhile (an acknowledged spool's artifact folder)
            continue
        if sent is not None:
            sent[rel] = stamp


def sync_down(place: StudyPlace, names: tuple[str, ...] = LIVE_FILES) -> bool:
    """Bring a study's driver files back from its remote storage into an empty folder (a driver on
    a new machine, ``--resume`` with the URI alone); True when it did."""
    if place.remote is None or (place.folder / "study.yaml").exists() or (place.folder / "ablation.yaml").exists():
        return False
    from pyarrow import fs

    src_fs, root = fs.FileSystem.from_uri(place.remote)
    found = False
    for name in names:
        info = src_fs.get_file_info(f"{root}/{name}")
        if info.type == fs.FileType.NotFound:
            continue
        found = True
        dst = place.folder / name
        (dst if info.type == fs.FileType.Directory else dst.parent).mkdir(parents=True, exist_ok=True)
        fs.copy_files(f"{root}/{name}", str(dst), source_filesystem=src_fs, destination_filesystem=fs.LocalFileSystem())
    if found:
        log.info(f"the study's files were brought back from {redact(place.remote)} into {place.folder}")
    return found


class StudySync(tune.Callback):
    """Driver-side, with remote storage: copies the driver's files (:data:`LIVE_FILES`) to the storage
    URI every :data:`SYNC_EVERY_S` seconds and within :data:`SYNC_AFTER_END_S` of a trial's end, only
    what changed, on a thread (the copy never holds up Tune's event loop). Pickled with the
    experiment; the thread is made in :meth:`setup`."""

    def __init__(self, place: StudyPlace):
        self.place = place
        self._reset()

    def _reset(self) -> None:
        self._due = 0.0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sent: dict[str, tuple[int, int]] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"place": self.place}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.place = StudyPlace(relocate(self.place.folder), self.place.remote)
        self._reset()

    def setup(self, **info: Any) -> None:
        if self.place.remote is None or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._loop, name="lcl-tune-study-sync", daemon=True)
        self._thread.start()

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._soon()

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._soon()

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self.close()

    def _soon(self) -> None:
        self._due = min(self._due, time.monotonic() + SYNC_AFTER_END_S)
        self._wake.set()

    def close(self) -> None:
        """Stop the thread after one last copy (the study's end copies everything again)."""
        if self._thread is None:
            return
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=60)
        self._thread = None

    def _loop(self) -> None:
        while True:
            wait = max(0.0, self._due - time.monotonic())
            self._wake.wait(timeout=wait)
            self._wake.clear()
            stopping = self._stop.is_set()
            if stopping or time.monotonic() >= self._due:
                self._due = time.monotonic() + SYNC_EVERY_S
                try:
                    sync_up(self.place, LIVE_FILES, self._sent)
                except OSError as e:  # the storage is unreachable for now: the next period tries again
                    log.warning(f"copying the study's files to {redact(self.place.remote or '')} failed: {e}")
            if stopping:
                return
