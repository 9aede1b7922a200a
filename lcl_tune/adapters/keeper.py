"""Which checkpoints of a trial are kept: ``checkpoint.keep`` best by the study metric, the latest,
and every one that a saved experiment state may still name; decided by the driver, never by a save.

Ray's own keep rule (``CheckpointConfig(num_to_keep=K)``) deletes a trial's older checkpoints as
new ones come, and so that its saved experiment state never names a deleted one, it *forces* a
blocking save of the whole experiment state whenever any trial has made K checkpoints since the
last save (``_ExperimentCheckpointManager.on_trial_checkpoint`` in Ray 2.44-2.60). With 64 trials
reporting, that is a save at nearly every step: the O(trials²) cost the save period was meant to
remove. So Ray is told to keep every checkpoint (no keep rule, no forced save), and
:class:`CheckpointKeeper`, a Tune callback, deletes instead. It knows when Ray saves the experiment
state (Tune asks every callback for its state at each save, :meth:`CheckpointKeeper.get_state`), so
it keeps the checkpoint each trial's state named at the last :data:`PINNED_SAVES` saves: a
``--resume`` after a kill at any moment restores every trial from a checkpoint that exists.

Adapter module: imports Ray.
"""

from __future__ import annotations

import json
import math
from collections import deque
from dataclasses import dataclass
from typing import Any

from ray import tune

from lcl_tune.adapters.progress import reported
from lcl_tune.adapters.trainable import DETAILS_FILE  # in every checkpoint: its period's metrics (the score)
from lcl_tune.util import log

PINNED_SAVES = 3  # a save is copied to the experiment folder in the background; the last three may be the one on disk


@dataclass
class Kept:
    path: str
    score: float | None  # the study metric of the checkpoint's period (None: unknown)
    order: int  # registration order: the highest is the trial's latest


class CheckpointKeeper(tune.Callback):
    """Keeps, per trial: the ``keep`` best checkpoints by ``metric`` (``mode``), the latest, and
    those pinned by recent experiment-state saves; deletes the others (driver side, as Ray did).

    Pickled with the experiment. A resumed study's keeper starts empty; a trial it has not seen
    yet is seeded from the checkpoints in its folder (their ``details.json``), once."""

    def __init__(self, keep: int, metric: str, mode: str):
        self.keep, self.metric, self.mode = keep, metric, mode
        self._reset()

    def _reset(self) -> None:
        self._held: dict[str, list[Kept]] = {}
        self._latest: dict[str, str] = {}  # trial id -> its latest checkpoint's path
        self._pins: deque[dict[str, str]] = deque(maxlen=PINNED_SAVES)
        self._order = 0

    def __getstate__(self) -> dict[str, Any]:
        return {"keep": self.keep, "metric": self.metric, "mode": self.mode}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset()

    # -- Tune's hooks ---------------------------------------------------------------------------

    def get_state(self) -> None:
        """Called by Tune inside each experiment-state save: the checkpoints it names now are pinned.
        Nothing to save (a resumed keeper re-reads the trial folders)."""
        self._pins.append(dict(self._latest))
        return None

    def on_checkpoint(self, iteration: int, trials: list, trial: Any, checkpoint: Any, **info: Any) -> None:
        held = self._held.get(trial.trial_id)
        if held is None:
            held = self._held[trial.trial_id] = self._seed(checkpoint)
        held[:] = [k for k in held if k.path != checkpoint.path]  # a period re-run after a resume rewrites its folder
        self._order += 1
        held.append(Kept(checkpoint.path, _score(reported(trial).get(self.metric)), self._order))
        self._latest[trial.trial_id] = checkpoint.path
        self._prune(trial.trial_id, held, checkpoint.filesystem)

    # -- the rule ---------------------------------------------------------------------------------

    def kept(self, trial_id: str, held: list[Kept]) -> set[str]:
        """The paths to keep of a trial's checkpoints ``held``."""
        latest = max(held, key=lambda k: k.order)
        sign = 1.0 if self.mode == "max" else -1.0
        scored = sorted((k for k in held if k.score is not None), key=lambda k: (sign * k.score, k.order), reverse=True)
        pinned = {pins[trial_id] for pins in self._pins if trial_id in pins}
        return {latest.path} | {k.path for k in scored[:self.keep]} | pinned

    def _prune(self, trial_id: str, held: list[Kept], filesystem: Any) -> None:
        keep = self.kept(trial_id, held)
        for k in [k for k in held if k.path not in keep]:
            try:
                filesystem.delete_dir(k.path)
            except FileNotFoundError:
                pass
            except OSError as e:  # a checkpoint left behind costs disk, not the study
                log.warning(f"could not delete checkpoint {k.path}: {e}")
                continue
            held.remove(k)

    def _seed(self, checkpoint: Any) -> list[Kept]:
        """The checkpoints already in the trial's folder (a resumed trial's), oldest first."""
        from pyarrow import fs

        folder = checkpoint.path.rstrip("/").rsplit("/", 1)[0]
        try:
            infos = checkpoint.filesystem.get_file_info(fs.FileSelector(folder))
        except (FileNotFoundError, OSError):
            return []
        held = []
        for info in sorted((i for i in infos if i.type == fs.FileType.Directory and i.base_name.startswith("checkpoint_")),
                           key=lambda i: i.base_name):
            if info.path != checkpoint.path:
                self._order += 1
                held.append(Kept(info.path, self._read_score(checkpoint.filesystem, info.path), self._order))
        return held

    def _read_score(self, filesystem: Any, path: str) -> float | None:
        try:
            with filesystem.open_input_stream(f"{path}/{DETAILS_FILE}") as fh:
                return _score(json.loads(fh.read()).get("metrics", {}).get(self.metric))
        except (OSError, ValueError):  # no details (a torn checkpoint): unscored, kept only while latest or pinned
            return None


def _score(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def tune_callbacks(keep: int, metric: str, mode: str) -> list[tune.Callback]:
    """The callbacks every study and ablation adds to its own: the checkpoint keeper, and the two
    of Tune's automatic loggers whose files are read (``progress.csv``: the README's trial folder,
    the tests; ``result.json``: the benchmarks, the tests). TensorBoard's is left out (nothing
    reads it); :func:`~lcl_tune.adapters.study_runner._init_ray` turns the automatic ones off."""
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    return [CheckpointKeeper(keep, metric, mode), CSVLoggerCallback(), JsonLoggerCallback()]


def checkpoint_config() -> "tune.CheckpointConfig":
    """Ray keeps every checkpoint: :class:`CheckpointKeeper` deletes (see the module docstring)."""
    return tune.CheckpointConfig(num_to_keep=None)
