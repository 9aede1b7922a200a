"""Trial-config validation: every bad input is a one-line error naming the key and the fix."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lcl_tune.schema import trial as C
from lcl_tune.schema.trial import ConfigError

REPO = Path(__file__).resolve().parents[1]
BASE = {"data": {"preset": "sst5"}}  # the hub preset: needs no file, so only the key under test fails


def load_tree(tree: dict, **kw) -> C.TrialConfig:
    return C.from_dict(tree, source="trial.yaml", **kw)


def with_(**sections: dict) -> dict:
    """BASE plus the given sections' keys."""
    return {**BASE, **{k: {**BASE.get(k, {}), **v} for k, v in sections.items()}}


def assert_one_line(err: ConfigError, key: str, *fragments: str) -> None:
    msg = str(err)
    assert "\n" not in msg
    assert msg.startswith("trial.yaml: ") or msg.startswith("--set: ")
    assert f"{key}:" in msg
    assert "Fix:" in msg
    for frag in fragments:
        assert frag in msg, (frag, msg)


def test_defaults_are_valid_and_flat_keys_round_trip():
    cfg = load_tree(BASE)
    flat = cfg.flat()
    assert flat["loss.temperature"] == 0.3 and flat["weighting.name"] == "separate"
    assert set(flat) == set(C.valid_keys())
    again = C.from_dict(cfg.to_dict(), check_files=False)
    assert again == cfg


def test_unknown_key_suggests_nearest():
    with pytest.raises(ConfigError) as e:
        load_tree(with_(loss={"temprature": 0.1}))
    assert_one_line(e.value, "loss.temprature", "unknown key", "did you mean 'loss.temperature'?")


def test_unknown_section_suggests_nearest():
    with pytest.raises(ConfigError) as e:
        load_tree(with_(weightng={"name": "self"}))
    assert_one_line(e.value, "weightng", "did you mean 'weighting'?")


def test_wrong_type():
    with pytest.raises(ConfigError) as e:
        load_tree(with_(train={"batch_size": "big"}))
    assert_one_line(e.value, "train.batch_size", "expected int", "'big'")


def test_bool_is_not_a_number():
    with pytest.raises(ConfigError) as e:
        load_tree(with_(optim={"lr": True}))
    assert_one_line(e.value, "optim.lr", "expected float")


@pytest.mark.parametrize("tau", [0, -0.5])
def test_temperature_must_be_positive(tau):
    with pytest.raises(ConfigError) as e:
        load_tree(with_(loss={"temperature": tau}))
    assert_one_line(e.value, "loss.temperature", "must be > 0")


@pytest.mark.parametrize("lam", [-0.1, 1.5])
def test_lambda_in_unit_interval(lam):
    with pytest.raises(ConfigError) as e:
        load_tree(with_(loss={"lam": lam}))
    assert_one_line(e.value, "loss.lam", "[0, 1]")


def test_unknown_weighting_name():
    with pytest.raises(ConfigError) as e:
        load_tree(with_(weighting={"name": "seperate"}))
    assert_one_line(e.value, "weighting.name", "did you mean 'separate'?")


def test_missing_data_file(tmp_path):
    cfg_file = tmp_path / "trial.yaml"
    cfg_file.write_text("data:\n  train_file: nowhere.csv\n")
    with pytest.raises(ConfigError) as e:
        C.load(cfg_file)
    msg = str(e.value)
    assert msg.startswith(f"{cfg_file}: data.train_file: file not found") and "Fix:" in msg
    assert str(tmp_path / "nowhere.csv") in msg  # resolved against the config file's folder


def test_missing_label_column(tmp_path):
    (tmp_path / "train.csv").write_text("sentence,target\nhello,a\nbye,b\n")
    cfg_file = tmp_path / "trial.yaml"
    cfg_file.write_text("data:\n  train_file: train.csv\n  text_column: sentence\n")
    with pytest.raises(ConfigError) as e:
        C.load(cfg_file)
    msg = str(e.value)
    assert "data.label_column: column 'label' not in train.csv (columns: sentence, target)" in msg
    assert "Fix: set data.label_column" in msg


def test_missing_preset_folder(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_tree({"data": {"preset": "goemotions", "root": str(tmp_path / "absent")}})
    assert_one_line(e.value, "data.root", "folder not found")


def test_two_data_sources_rejected():
    with pytest.raises(ConfigError) as e:
        load_tree({"data": {"preset": "sst5", "hub": "SetFit/sst5"}})
    assert_one_line(e.value, "data", "exactly one data source")


def test_missing_model_package():
    with pytest.raises(ConfigError) as e:
        load_tree(with_(model={"name": "pkg:no_such_package_xyz/model"}))
    assert_one_line(e.value, "model.name", "not installed", "pip install --no-deps no-such-package-xyz")


def test_overrides_parse_yaml_values_and_reject_unknown_keys(tmp_path):
    cfg = C.load(None, ["data.preset=sst5", "loss.temperature=0.05", "weighting.name=ema", "train.max_steps=7"])
    assert cfg.loss.temperature == 0.05 and cfg.weighting.name == "ema" and cfg.train.max_steps == 7
    with pytest.raises(ConfigError) as e:
        C.load(None, ["data.preset=sst5", "loss.tau=0.1"])
    assert str(e.value).startswith("--set: loss.tau: unknown key")


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("loss:\n  name: lcl\n   temperature: [\n")
    with pytest.raises(ConfigError) as e:
        C.load(bad)
    assert str(e.value).startswith(f"{bad}: line ")


def test_yaml_is_read_with_the_safe_loader(tmp_path):
    """A tag that would run a command is refused before it runs. The rest of the file is a valid
    config, so an unsafe loader would run the command and load the file (os.system returns 0, a
    valid seed): the test would then fail on both counts."""
    marker = tmp_path / "pwned"
    (tmp_path / "train.csv").write_text("text,label\na,x\nb,y\n")
    evil = tmp_path / "evil.yaml"
    evil.write_text(f"data:\n  train_file: train.csv\nseed: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError) as e:
        C.load(evil)
    assert not marker.exists(), "the YAML tag ran a command"
    assert str(e.value) == (f"{evil}: line 3: not valid YAML (tag 'tag:yaml.org,2002:python/object/apply:os.system' "
                            "is not allowed (YAML is read with the safe loader)). Fix: remove the tag and write a plain value")


def test_every_shipped_trial_config_loads():
    files = sorted((REPO / "configs").glob("*.yaml"))
    assert files, "configs/ ships trial configs"
    for f in files:
        cfg = C.load(f, check_files=False)
        assert cfg.loss.name in C.LOSS_NAMES


def test_config_module_imports_nothing_heavy():
    code = ("import sys, lcl_tune.schema.trial, lcl_tune.cli.main; "
            "print(','.join(m for m in ('torch','ray','mlflow','optuna','transformers','datasets') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""


def test_cli_reports_config_errors_in_one_line(tmp_path):
    cfg_file = tmp_path / "trial.yaml"
    cfg_file.write_text("data:\n  preset: sst5\nloss:\n  lam: 2\n")
    proc = subprocess.run([sys.executable, "-m", "lcl_tune.cli", "train", str(cfg_file)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {cfg_file}: loss.lam: must lie in [0, 1], got 2.0. "
                                                 "Fix: λ weighs CE against the contrastive term; use e.g. 0.5"]


# ------------------------------------------------------------------ data root: configs that run anywhere


def _env_without_data_root() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k != C.DATA_ENV}


def test_every_shipped_yaml_validates_on_a_checkout_without_the_shared_folder(tmp_path):
    """A fresh clone has no ../shared beside it: every shipped config and study still validates
    (presets then come from the hub), so none refers to a path outside the repository."""
    import shutil

    checkout = tmp_path / "clone" / "lcl_tune"
    for folder in ("configs", "search_spaces"):
        shutil.copytree(REPO / folder, checkout / folder)
    files = sorted(checkout.glob("configs/*.yaml")) + sorted(checkout.glob("search_spaces/*.yaml"))
    assert len(files) >= 9 and not (checkout.parent / "shared").exists()
    for f in files:
        assert "shared/datasets/" not in "".join(line for line in f.read_text().splitlines() if not line.lstrip().startswith("#"))
        proc = subprocess.run([sys.executable, "-m", "lcl_tune.cli", "validate", str(f)], cwd=checkout,
                              capture_output=True, text=True, env=_env_without_data_root())
        assert proc.returncode == 0, f"{f.name}: {proc.stderr}"


def test_presets_read_the_data_root_and_fall_back_to_the_hub(monkeypatch, shared_datasets):
    from lcl_tune.core.data import _preset_root

    d = C.DataConfig(preset="tweeteval_emotion")
    monkeypatch.delenv(C.DATA_ENV, raising=False)
    assert _preset_root(d) is None  # the hub
    monkeypatch.setenv(C.DATA_ENV, str(shared_datasets))
    assert _preset_root(d) == shared_datasets.resolve() / "tweeteval_emotion"
    assert _preset_root(C.DataConfig(preset="trec_fine")) == shared_datasets.resolve() / "trec"
    explicit = C.DataConfig(preset="tweeteval_emotion", root=str(shared_datasets / "sst5"))
    assert _preset_root(explicit) == shared_datasets / "sst5"  # data.root wins


def test_a_data_root_without_the_preset_is_a_one_line_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lcl_tune.cli", "--data-root", str(tmp_path), "validate",
                           str(REPO / "configs" / "tweeteval_minilm.yaml")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: {REPO / 'configs' / 'tweeteval_minilm.yaml'}: data.preset: {C.DATA_ENV}={tmp_path} has no "
        f"tweeteval_emotion/ folder. Fix: put the tweeteval_emotion files in {tmp_path / 'tweeteval_emotion'} "
        f"(layout: shared/datasets/README.md), or unset {C.DATA_ENV} to use the hub"]
