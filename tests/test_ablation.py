"""Ablation YAML schema: arms, factors, seeds, tuning phase; validated without Ray or torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lcl_tune.schema.ablation import cell_of, is_ablation, load_ablation
from lcl_tune.schema.trial import ConfigError

REPO = Path(__file__).resolve().parents[1]
GOOD = {
    "name": "abl",
    "base": {"data": {"preset": "sst5"}, "train": {"max_steps": 4}},
    "baseline": "ce",
    "arms": {"ce": {"loss.name": "ce"}, "scl": {"loss.name": "scl"}},
    "factors": {"loss.name": ["ce", "lcl"], "weighting.name": ["separate", "self", "uniform"]},
    "seeds": [1, 2, 3],
}


def load(tmp_path: Path, tree: dict, **kw):
    path = tmp_path / "abl.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return load_ablation(path, **kw), path


def broken(tmp_path: Path, edit) -> str:
    tree = yaml.safe_load(yaml.safe_dump(GOOD))
    edit(tree)
    with pytest.raises(ConfigError) as e:
        load(tmp_path, tree)
    msg = str(e.value)
    assert "Fix:" in msg and "\n" not in msg and msg.startswith(str(tmp_path)), msg
    return msg


def test_factors_expand_and_merge_arms_that_cannot_differ(tmp_path):
    ab, _ = load(tmp_path, GOOD)
    # ce × {separate, self, uniform} trains the same thing as the named `ce` arm: merged into it
    assert list(ab.arms) == ["ce", "scl", "lcl-separate", "lcl-self", "lcl-uniform"]
    assert len(ab.cells()) == 15 and ab.budget()["cells"] == 15


def test_cells_share_everything_but_the_arm(tmp_path):
    ab, _ = load(tmp_path, GOOD)
    a = ab.trial_config({"cell": "lcl-self__seed2"})
    b = ab.trial_config({"cell": "ce__seed2"})
    assert (a.loss.name, a.weighting.name, a.seed) == ("lcl", "self", 2)
    assert (b.loss.name, b.seed) == ("ce", 2) and a.data == b.data and a.optim == b.optim
    assert cell_of({"cell": "lcl-self__seed2"}) == ("lcl-self", 2)


def test_resolved_ablation_reloads_identically(tmp_path):
    ab, _ = load(tmp_path, GOOD)
    again, _ = load(tmp_path, ab.to_dict())
    assert again.to_dict() == ab.to_dict()


def test_unknown_key(tmp_path):
    assert "sed: unknown ablation key. Fix: did you mean 'seeds'?" in broken(tmp_path, lambda t: t.update(sed=[1]))


def test_unknown_trial_key_in_an_arm(tmp_path):
    msg = broken(tmp_path, lambda t: t["arms"]["scl"].update({"loss.tau": 0.1}))
    assert "arms.scl.loss.tau: not a trial-config key" in msg


def test_bad_value_in_a_factor(tmp_path):
    msg = broken(tmp_path, lambda t: t["factors"].update({"weighting.name": ["seperate"]}))
    assert "weighting.name: unknown value 'seperate'" in msg and "did you mean 'separate'" in msg


def test_baseline_must_be_an_arm(tmp_path):
    assert "baseline: 'xe' is not an arm" in broken(tmp_path, lambda t: t.update(baseline="xe"))


@pytest.mark.parametrize("seeds", [[], [1, 1], "1,2", [1.5]])
def test_seeds_must_be_distinct_integers(tmp_path, seeds):
    assert "seeds:" in broken(tmp_path, lambda t: t.update(seeds=seeds))


def test_one_arm_is_not_an_ablation(tmp_path):
    msg = broken(tmp_path, lambda t: (t.pop("factors"), t["arms"].pop("scl")))
    assert "arms: an ablation needs at least two arms" in msg


def test_tuning_phase_is_validated_per_arm(tmp_path):
    tree = {**GOOD, "tune": {"space": {"optim.lr": {"type": "loguniform", "low": 0.0, "high": 1e-4}}}}
    with pytest.raises(ConfigError) as e:
        load(tmp_path, tree)
    assert "space.optim.lr.low: loguniform needs low > 0" in str(e.value)
    ok, _ = load(tmp_path, {**GOOD, "tune": {"space": {"optim.lr": {"type": "loguniform", "low": 1e-5, "high": 1e-4}},
                                             "search": {"num_samples": 4}}})
    study = ok.arm_study("lcl-self")
    assert study.name == "abl.lcl-self" and study.num_samples == 4
    assert study.trial_config({"optim.lr": 3e-5}).weighting.name == "self"


def test_following_the_fix_of_a_missing_tuning_space_gives_a_valid_ablation(tmp_path):
    """The hint is YAML the user pastes: ``1e-5`` would be read as a string (YAML 1.1 needs the dot)."""
    msg = broken(tmp_path, lambda tree: tree.update(tune={"search": {"num_samples": 4}}))
    pasted = yaml.safe_load(msg.split("Fix: write ", 1)[1])
    ok, _ = load(tmp_path, {**GOOD, **pasted})
    assert ok.arm_study("ce").params[0].low == pytest.approx(1e-5)


@pytest.mark.parametrize("path", sorted((REPO / "search_spaces").glob("ablation_*.yaml")), ids=lambda p: p.name)
def test_every_shipped_ablation_validates(path):
    assert is_ablation(yaml.safe_load(path.read_text()))
    ab = load_ablation(path, check_files=False)
    assert len(ab.arms) >= 3 and ab.baseline == "ce"
    for cell in ab.cells():
        ab.trial_config(cell)


def test_validate_cli_prints_the_ablation_budget():
    proc = subprocess.run([sys.executable, "-m", "lcl_tune.cli", "validate", "search_spaces/ablation_goemotions.yaml"],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "valid ablation 'ablation_goemotions'" in proc.stdout and "cells      35" in proc.stdout


TUNE = {"space": {"optim.lr": {"type": "loguniform", "low": 1e-5, "high": 1e-4}}, "scheduler": {"max_t": 4}}


def test_the_tuning_phase_selects_on_a_seed_that_does_not_measure(tmp_path):
    ab, _ = load(tmp_path, {**GOOD, "tune": TUNE})
    assert ab.selection_seed == 0 and 0 not in ab.seeds
    assert {ab.arm_study(arm).trial_config({}).seed for arm in ab.arms} == {0}
    again, _ = load(tmp_path, ab.to_dict())  # the resolved tuning seed is kept
    assert again.tune == ab.tune


def test_a_tuning_seed_that_also_measures_is_a_one_line_error(tmp_path):
    msg = broken(tmp_path, lambda t: t.update(tune={**TUNE, "seed": 2}))
    assert "tune.seed: seed 2 selects the configurations and is also one of the seeds that measure them" in msg
    assert "tune.seed: 4" in msg and "tune.allow_seed_overlap: true" in msg
    ab, _ = load(tmp_path, {**GOOD, "tune": {**TUNE, "seed": 2, "allow_seed_overlap": True}})
    assert ab.selection_seed == 2


def test_the_report_says_which_seeds_selected_and_which_measured():
    from lcl_tune.analysis import report as R

    assert R._selection_sentence([0], [1, 2, 3]).endswith("measured on seed(s) 1, 2, 3, disjoint from them.")
    assert "seed(s) 2 both selected and measured" in R._selection_sentence([2], [1, 2, 3])
    assert R._selection_sentence(None, [1, 2]).startswith("No tuning phase")
