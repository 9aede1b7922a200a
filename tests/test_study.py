"""Study YAML schema: every bad input is a one-line error naming the file, key and fix, and
validation needs neither Ray nor torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lcl_tune.schema.trial import ConfigError
from lcl_tune.schema.study import load_study

REPO = Path(__file__).resolve().parents[1]

GOOD = {
    "name": "s",
    "base": {"data": {"preset": "sst5"}, "train": {"max_steps": 4}},
    "metric": {"name": "dev/weighted_f1", "mode": "max"},
    "space": {
        "loss.temperature": {"type": "loguniform", "low": 0.05, "high": 1.0},
        "loss.lam": {"type": "uniform", "low": 0.05, "high": 1.0},
        "weighting.name": {"type": "categorical", "values": ["separate", "self", "ema", "uniform"]},
        "weighting.ema_alpha": {"type": "uniform", "low": 0.5, "high": 0.99, "when": {"weighting.name": "ema"}},
        "train.batch_size": {"type": "int", "low": 8, "high": 32},
    },
    "search": {"sampler": "tpe", "seed": 0, "num_samples": 4, "max_concurrent": 2},
    "scheduler": {"name": "asha", "max_t": 4, "grace_period": 1, "reduction_factor": 2},
    "resources": {"cpu": 1, "gpu": 0},
}


def write(tmp_path: Path, tree: dict) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def broken(tmp_path: Path, edit) -> str:
    tree = yaml.safe_load(yaml.safe_dump(GOOD))
    edit(tree)
    path = write(tmp_path, tree)
    with pytest.raises(ConfigError) as e:
        load_study(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: ") and "Fix:" in msg and "\n" not in msg, msg
    return msg


def test_good_study_parses_with_budget(tmp_path):
    study = load_study(write(tmp_path, GOOD))
    assert [p.key for p in study.params][:3] == ["loss.temperature", "loss.lam", "weighting.name"]
    assert study.tune_metric == "best/dev/weighted_f1"
    assert study.base["train"]["metric"] == "weighted_f1"  # trials track the study metric's best
    assert study.budget()["max_periods_total"] == 16
    cfg = study.trial_config({"loss.temperature": 0.1, "weighting.name": "ema", "weighting.ema_alpha": 0.8})
    assert (cfg.loss.temperature, cfg.weighting.name, cfg.weighting.ema_alpha) == (0.1, "ema", 0.8)


def test_resolved_study_reloads_identically(tmp_path):
    study = load_study(write(tmp_path, GOOD))
    again = load_study(write(tmp_path, study.to_dict()))
    assert again.to_dict() == study.to_dict()


def test_unknown_study_key(tmp_path):
    msg = broken(tmp_path, lambda t: t.update(schedular={"name": "asha"}))
    assert "schedular: unknown study key. Fix: did you mean 'scheduler'?" in msg


def test_unknown_key_in_section(tmp_path):
    msg = broken(tmp_path, lambda t: t["search"].update(num_sample=3))
    assert "search.num_sample: unknown key. Fix: did you mean 'search.num_samples'?" in msg


def test_space_key_must_be_a_trial_key(tmp_path):
    msg = broken(tmp_path, lambda t: t["space"].update({"loss.tau": {"type": "uniform", "low": 0.1, "high": 1}}))
    assert "space.loss.tau: not a trial-config key" in msg


def test_low_not_below_high(tmp_path):
    msg = broken(tmp_path, lambda t: t["space"]["loss.lam"].update(low=0.9, high=0.1))
    assert "space.loss.lam.low: low (0.9) must be < high (0.1)" in msg


def test_loguniform_low_must_be_positive(tmp_path):
    msg = broken(tmp_path, lambda t: t["space"]["loss.temperature"].update(low=0.0))
    assert "space.loss.temperature.low: loguniform needs low > 0" in msg


def test_bound_outside_the_trial_config_domain(tmp_path):
    msg = broken(tmp_path, lambda t: t["space"]["loss.lam"].update(high=1.5))
    assert "space.loss.lam: value 1.5: must lie in [0, 1]" in msg


def test_unknown_weighting_name(tmp_path):
    msg = broken(tmp_path, lambda t: t["space"]["weighting.name"]["values"].append("seperate"))
    assert "space.weighting.name.values: value 'seperate': unknown value" in msg and "did you mean 'separate'" in msg


def test_unknown_categorical_value_in_when(tmp_path):
    msg = broken(tmp_path, lambda t: t["space"]["weighting.ema_alpha"].update(when={"weighting.name": "emma"}))
    assert "space.weighting.ema_alpha.when: ['emma'] are not values of weighting.name" in msg


def test_metric_not_reported(tmp_path):
    msg = broken(tmp_path, lambda t: t["metric"].update(name="dev/f1"))
    assert "metric.name: 'dev/f1' is not reported by the trainable" in msg and "dev/weighted_f1" in msg


def test_metric_mode_must_match(tmp_path):
    msg = broken(tmp_path, lambda t: t["metric"].update(mode="min"))
    assert "metric.mode: dev/weighted_f1 should be maximised" in msg


def test_unknown_scheduler(tmp_path):
    msg = broken(tmp_path, lambda t: t["scheduler"].update(name="hyperband"))
    assert "scheduler.name: unknown value 'hyperband'. Fix: choose one of asha, fifo" in msg


def test_unknown_sampler(tmp_path):
    msg = broken(tmp_path, lambda t: t["search"].update(sampler="tpee"))
    assert "search.sampler: unknown value 'tpee'. Fix: did you mean 'tpe'?" in msg


def test_grace_period_within_max_t(tmp_path):
    msg = broken(tmp_path, lambda t: t["scheduler"].update(grace_period=9))
    assert "scheduler.grace_period: must lie in [1, max_t=4]" in msg


def test_fractional_gpu_above_one_rejected(tmp_path):
    msg = broken(tmp_path, lambda t: t["resources"].update(gpu=1.5))
    assert "resources.gpu: a trial trains on one GPU, got 1.5" in msg


def test_point_to_evaluate_outside_space(tmp_path):
    msg = broken(tmp_path, lambda t: t["search"].update(points_to_evaluate=[{"loss.lam": 3.0}]))
    assert "search.points_to_evaluate[0].loss.lam: 3.0 is outside the space" in msg


def test_missing_base_file(tmp_path):
    msg = broken(tmp_path, lambda t: t.update(base="nowhere.yaml"))
    assert "base: trial config not found" in msg


def test_bad_base_key_is_named(tmp_path):
    msg = broken(tmp_path, lambda t: t["base"].update(loss={"temprature": 0.1}))
    assert "base.loss.temprature: unknown key" in msg


def test_overrides_reach_study_and_trial_keys(tmp_path):
    study = load_study(write(tmp_path, GOOD), ["search.num_samples=9", "train.max_steps=7", "scheduler.max_t=2"])
    assert study.num_samples == 9 and study.max_t == 2 and study.base["train"]["max_steps"] == 7


def test_gpu_request_on_a_cpu_cluster_fails_fast():
    from lcl_tune.adapters.study_runner import check_resources

    study = load_study(REPO / "search_spaces" / "quickstart.yaml", ["resources.gpu=0.25"], check_files=False)
    with pytest.raises(ConfigError) as e:
        check_resources(study, {"CPU": 2.0})
    assert "resources.gpu: each trial asks for 0.25 GPU but the Ray cluster has 0 GPUs" in str(e.value)
    check_resources(study, {"CPU": 2.0, "GPU": 1.0})  # fine where GPUs exist


STUDIES = sorted(p for p in (REPO / "search_spaces").glob("*.yaml") if not p.name.startswith("ablation_"))


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.name)
def test_every_shipped_study_validates(path):
    study = load_study(path, check_files=False)
    assert study.params and study.num_samples >= 1
    for p in study.params:  # every categorical value and bound builds a valid trial config
        for value in (p.values if p.type == "categorical" else [p.low, p.high]):
            study.trial_config({p.key: value})


def test_validate_cli_is_instant_and_imports_nothing_heavy():
    code = ("import sys; from lcl_tune.cli.main import main; rc = main(['validate', 'search_spaces/quickstart.yaml']); "
            "heavy = [m for m in ('torch', 'ray', 'optuna', 'mlflow', 'transformers') if m in sys.modules]; "
            "print('HEAVY', heavy); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "valid study 'quickstart'" in proc.stdout and "HEAVY []" in proc.stdout


def test_gpu_memory_warning_before_trials_share_a_gpu(monkeypatch):
    """The shipped GoEmotions study (ELECTRA-base + a separate weighting encoder, 2 trials per GPU)
    fits an H100 and the A10G of cluster.yaml (fused attention) but not a 15 GiB T4: the study warns
    before any trial dies of OOM."""
    from lcl_tune.adapters import study_runner as search

    study = load_study(REPO / "search_spaces" / "goemotions_lcl.yaml", check_files=False)

    def cluster(kind):
        return lambda: [{"Alive": True, "Resources": {"CPU": 8, "GPU": 1, f"accelerator_type:{kind}": 1}}]

    monkeypatch.setattr(search.ray, "nodes", cluster("H100"))
    assert search.warn_gpu_memory(study) is None
    monkeypatch.setattr(search.ray, "nodes", cluster("A10G"))
    assert search.warn_gpu_memory(study) is None
    monkeypatch.setattr(search.ray, "nodes", cluster("T4"))
    warning = search.warn_gpu_memory(study)
    assert warning.startswith("resources.gpu=0.5: 2 trials per 15 GiB GPU") and "Fix: set resources.gpu: 1" in warning


# ---------------------------------------------------------------------------------- the scheduler fits the trial


def periods_study(**scheduler) -> dict:
    """A study whose trials have 40 steps, evaluated every 10: 4 periods."""
    tree = yaml.safe_load(yaml.safe_dump(GOOD))
    tree["base"]["train"] = {"max_steps": 40, "eval_every": 10}
    del tree["space"]["train.batch_size"]
    tree["scheduler"] = {"name": "asha", "grace_period": 1, "reduction_factor": 2, **scheduler}
    return tree


def test_max_t_must_be_the_periods_a_trial_has(tmp_path):
    tree = periods_study(max_t=2)
    msg = broken(tmp_path, lambda t: t.update(tree))
    assert ("scheduler.max_t: is 2 but a trial has 4 evaluation periods (train.max_steps or train.epochs over "
            "train.eval_every). Fix: set scheduler.max_t: 4, or change train.eval_every so a trial has 2 periods") in msg


def test_max_t_left_out_is_the_periods_of_a_trial(tmp_path):
    assert load_study(write(tmp_path, periods_study())).max_t == 4
    epochs = periods_study()
    epochs["base"]["train"] = {"epochs": 3}  # one period per epoch, whatever the training rows
    assert load_study(write(tmp_path, epochs)).max_t == 3


def test_grace_period_must_leave_asha_something_to_stop(tmp_path):
    tree = periods_study(max_t=4, grace_period=4)
    msg = broken(tmp_path, lambda t: t.update(tree))
    assert "scheduler.grace_period: is 4 but a trial has 4 evaluation periods, so ASHA could never stop one early" in msg


def test_a_searched_evaluation_interval_gives_trials_of_several_lengths(tmp_path):
    """max_t is the longest trial's periods; shorter trials end on their own (completed)."""
    tree = periods_study(max_t=4)
    tree["space"]["train.eval_every"] = {"type": "categorical", "values": [10, 20]}
    assert load_study(write(tmp_path, tree)).max_t == 4
    tree["scheduler"]["max_t"] = 2
    msg = broken(tmp_path, lambda t: t.update(tree))
    assert "scheduler.max_t: is 2 but a trial has 2 to 4 evaluation periods" in msg and "set scheduler.max_t: 4" in msg


def test_lambda_zero_cannot_train_a_classifier(tmp_path):
    msg = broken(tmp_path, lambda t: t["space"]["loss.lam"].update(low=0.0))
    assert "space.loss.lam: λ = 0 gives the classification head no gradient" in msg and "low: 0.05" in msg


# ---------------------------------------------------------------------------------- samplers


def test_grid_sampler_walks_the_listed_values_once(tmp_path):
    tree = periods_study()
    tree["search"] = {"sampler": "grid", "seed": 0, "max_concurrent": 2}
    tree["space"] = {"loss.temperature": {"type": "categorical", "values": [0.1, 0.3, 0.7]},
                     "loss.lam": {"type": "categorical", "values": [0.3, 0.7]}}
    study = load_study(write(tmp_path, tree))
    assert study.grid_size == study.num_samples == 6 and study.startup_trials == 0


def test_grid_sampler_needs_listed_values(tmp_path):
    msg = broken(tmp_path, lambda t: t["search"].update(sampler="grid"))
    assert "a grid search needs the values to walk, got a range" in msg


def test_gp_under_asha_is_a_one_line_error_naming_the_alternatives(tmp_path):
    """Optuna's GPSampler learns only from COMPLETE trials, and ASHA stops most trials (PRUNED):
    the model would learn from the few that ran to full length."""
    msg = broken(tmp_path, lambda t: t["search"].update(sampler="gp"))
    assert "search.sampler" in msg and "sampler: tpe" in msg and "fifo" in msg
    tree = yaml.safe_load(yaml.safe_dump(GOOD))
    tree["search"]["sampler"], tree["scheduler"] = "gp", {"name": "fifo"}
    assert load_study(write(tmp_path, tree)).sampler == "gp"


def test_tpe_start_up_scales_with_the_budget_and_validate_says_when_it_dominates(tmp_path):
    tree = yaml.safe_load(yaml.safe_dump(GOOD))
    sizes = {}
    for n in (6, 8, 40, 200):
        tree["search"]["num_samples"] = n
        sizes[n] = load_study(write(tmp_path, tree)).startup_trials
    assert sizes == {6: 2, 8: 2, 40: 10, 200: 10}
    tree["search"].update(num_samples=8, sampler_options={"n_startup_trials": 6})
    study = load_study(write(tmp_path, tree))
    assert study.startup_trials == 6 and len(study.notes()) == 1 and "mostly random search" in study.notes()[0]
    out = subprocess.run([sys.executable, "-m", "lcl_tune.cli", "validate", str(write(tmp_path, tree))],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0 and "(6 random start-up trials)" in out.stdout
    assert [line for line in out.stdout.splitlines() if line.startswith("note: ")] == [f"note: {study.notes()[0]}"]


def test_sampler_options_must_be_a_mapping(tmp_path):
    msg = broken(tmp_path, lambda t: t["search"].update(sampler_options=[1, 2]))
    assert "search.sampler_options: expected a mapping" in msg


def test_a_study_never_evaluates_the_test_split(tmp_path):
    msg = broken(tmp_path, lambda t: t["base"]["train"].update(eval_test=True))
    assert "base.train.eval_test: a study or ablation selects on dev and never evaluates the test split" in msg
    assert "lcl-tune ablate --final" in msg
