"""The ablation YAML schema: arms × seeds, validated without Ray or torch.

An ablation compares *arms* (named config variants) over a list of *seeds*. Seeds are paired: the
same seed gives the same data order and the same initial weights in every arm, so per-seed
differences between arms measure the arms, not the luck of the draw::

    name: ablation_quick
    base: ../configs/quickstart_trial.yaml
    fixed: {train.max_steps: 60}
    metric: {name: dev/weighted_f1, mode: max}
    baseline: ce
    arms:                              # named overrides ...
      ce: {loss.name: ce}
      scl: {loss.name: scl}
      lcl_separate: {loss.name: lcl, weighting.name: separate}
    factors:                           # ... and/or the product of factors
      loss.name: [scl, lcl]
      weighting.name: [separate, self, uniform]
    seeds: [1, 2, 3]
    tune:                              # optional: an Optuna/ASHA study inside each arm first
      space: {optim.lr: {type: loguniform, low: 1.0e-5, high: 1.0e-4}}
      search: {num_samples: 8}
      scheduler: {max_t: 4}
      seed: 0                          # the seed that selects (default 0): never one of the seeds that measure
    resources: {cpu: 1, gpu: 0}

Factor combinations that cannot differ are merged: the weighting network only matters to LCL with
``λ < 1``, so ``ce × {separate, self, uniform}`` is one arm, ``ce``.

Selection without leakage: the tuning phase trains on ``tune.seed``, which must not be one of the
``seeds`` that then measure the selected configurations (the best of N draws scored on the seed it
was picked on is optimistic: the winner's curse). ``tune.allow_seed_overlap: true`` permits it,
and the report says so.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from lcl_tune.schema import trial as C
from lcl_tune.schema.trial import ConfigError
from lcl_tune.schema.study import (SECTION_KEYS, Study, apply_overrides, base_tree, check_gpu_share, check_no_test_split, load_spec,
                                   parse_metric, trial_key)

ABLATION_KEYS = ("name", "description", "base", "fixed", "metric", "baseline", "arms", "factors", "seeds", "tune",
                 "resources", "failure")
TUNE_KEYS = ("space", "search", "scheduler", "checkpoint", "seed", "allow_seed_overlap")
DEFAULT_TUNE_SEED = 0


@dataclass
class Ablation:
    name: str
    path: str
    base: dict[str, Any]  # trial-config tree: base file + fixed, relative paths resolved
    base_dir: str
    arms: dict[str, dict[str, Any]]  # arm name -> dotted overrides
    seeds: list[int]
    baseline: str
    metric: str = "dev/weighted_f1"
    mode: str = "max"
    tune: dict[str, Any] | None = None  # the study sections of the per-arm tuning phase
    cpu: float = 1.0
    gpu: float = 0.0
    max_retries: int = 2
    description: str = ""
    tuned: dict[str, dict[str, Any]] = field(default_factory=dict)  # arm -> best params of its tuning phase
    final: bool = False  # the final phase: each arm's selected configuration, the test split evaluated once

    # Duck-types the parts of Study that the trainable uses: trial_config(params), cpu, name.
    def trial_config(self, params: Mapping[str, Any]) -> C.TrialConfig:
        """The config of a cell: base + arm overrides (+ its tuned params) + seed."""
        arm, seed = cell_of(params)
        cfg = self.config_for({**self.arms[arm], **self.tuned.get(arm, {})}, seed)
        cfg.train.eval_test = self.final
        return cfg

    def config_for(self, overrides: Mapping[str, Any], seed: int) -> C.TrialConfig:
        tree = copy.deepcopy(self.base)
        for key, value in overrides.items():
            C.set_dotted(tree, key, value)
        tree["seed"] = int(seed)
        return C.from_dict(tree, base_dir=self.base_dir, source=self.path, check_files=False)

    def run_labels(self, params: Mapping[str, Any]) -> tuple[str | None, dict[str, str]]:
        """A cell's MLflow run: ``<arm>·seed <k>``, nested under its arm's run (the third level)."""
        arm, seed = cell_of(params)
        stage = "test" if self.final else "seed"
        return (f"{arm}·{'test·' if self.final else ''}seed {seed}",
                {"lcl_tune.role": stage, "lcl_tune.ablation": self.name, "lcl_tune.arm": arm, "lcl_tune.seed": str(seed)})

    def cells(self) -> list[dict[str, Any]]:
        """Every cell as trial params: ``{"cell": "<arm>__seed<k>"}``."""
        return [{"cell": cell_name(arm, seed)} for arm in self.arms for seed in self.seeds]

    @property
    def tune_metric(self) -> str:
        return f"best/{self.metric}"

    def arm_study(self, arm: str) -> Study:
        """The tuning phase of one arm: a study whose base is the arm's config on the selection seed."""
        from lcl_tune.schema.study import parse_study

        assert self.tune is not None
        base = self.trial_config({"arm": arm, "seed": self.selection_seed}).to_dict()
        base.get("train", {}).pop("metric", None)
        sections = {k: v for k, v in copy.deepcopy(self.tune).items() if k not in ("seed", "allow_seed_overlap")}
        tree = {"name": f"{self.name}.{arm}", "base": base, "metric": {"name": self.metric, "mode": self.mode},
                "resources": {"cpu": self.cpu, "gpu": self.gpu}, "failure": {"max_retries": self.max_retries},
                **sections}
        return parse_study(tree, Path(self.path), (), False)

    @property
    def selection_seed(self) -> int | None:
        """The seed the tuning phase selects on (None without a tuning phase)."""
        return int(self.tune.get("seed", DEFAULT_TUNE_SEED)) if self.tune else None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "base": self.base,
                "metric": {"name": self.metric, "mode": self.mode}, "baseline": self.baseline,
                "arms": self.arms, "seeds": self.seeds, "tune": self.tune,
                "resources": {"cpu": self.cpu, "gpu": self.gpu}, "failure": {"max_retries": self.max_retries}}

    def budget(self) -> dict[str, Any]:
        return {"arms": len(self.arms), "seeds": len(self.seeds), "cells": len(self.arms) * len(self.seeds),
                "tuning_trials": len(self.arms) * (self.tune or {}).get("search", {}).get("num_samples", 8)
                if self.tune else 0}


def cell_name(arm: str, seed: int) -> str:
    return f"{arm}__seed{seed}"


def cell_of(params: Mapping[str, Any]) -> tuple[str, int]:
    """``{"cell": "lcl-self__seed3"}`` (or ``{"arm": ..., "seed": ...}``) -> ("lcl-self", 3)."""
    if "cell" in params:
        arm, _, seed = str(params["cell"]).rpartition("__seed")
        return arm, int(seed)
    return str(params["arm"]), int(params["seed"])


CELL_DIR = "cells"  # an ablation folder's finished (arm, seed) cells, one JSON each
FINAL_DIR = "final"  # --final: each arm's selected configuration, trained again, evaluated on test once


def dev_cell_dir(folder: Path) -> str:
    """Where the dev-phase cells of ``folder`` are: ``cells/``, or ``final/`` for a fixed-point
    ablation run with ``--final`` only (its cells trained once, in the final phase)."""
    return CELL_DIR if any((folder / CELL_DIR).glob("*.json")) or not (folder / FINAL_DIR).is_dir() else FINAL_DIR


def load_cells(folder: Path, cell_dir: str | None = None) -> list[dict[str, Any]]:
    """The finished cells of ``folder`` (``cell_dir``, default :func:`dev_cell_dir`), by file name."""
    cell_dir = cell_dir or dev_cell_dir(folder)
    return [json.loads(p.read_text()) for p in sorted((folder / cell_dir).glob("*.json"))]


def is_ablation(tree: Mapping[str, Any]) -> bool:
    return "seeds" in tree or "arms" in tree or "factors" in tree


def load_ablation(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = (), *,
                  check_files: bool = True) -> Ablation:
    return load_spec(path, "ABLATION", "an ablation YAML (see search_spaces/ablation_*.yaml)", _parse_ablation,
                     overrides, check_files)


def _parse_ablation(tree: dict[str, Any], path: Path, overrides, check_files: bool) -> Ablation:
    tree = apply_overrides(tree, overrides, ("seeds", "baseline", "name", "description", "resources", "failure", "tune"))
    for key in tree:
        if key not in ABLATION_KEYS:
            raise ConfigError(str(key), "unknown ablation key", C.suggest(str(key), list(ABLATION_KEYS)))
    name = tree.get("name")
    C.check(isinstance(name, str) and name.strip() != "" and "/" not in name, "name",
            f"must be a non-empty name without '/', got {name!r}", "set name: my_ablation")
    base_dir = path.resolve().parent
    base = base_tree(tree.get("base"), base_dir, check_files)
    for key, value in (tree.get("fixed") or {}).items():
        trial_key(f"fixed.{key}", key)
        C.set_dotted(base, key, value)
    metric, mode = parse_metric(tree.get("metric") or {}, base)

    seeds = tree.get("seeds")
    C.check(isinstance(seeds, list) and len(seeds) >= 1 and all(isinstance(s, int) and not isinstance(s, bool)
                                                                for s in seeds), "seeds",
            f"needs a list of integer seeds, got {seeds!r}", "write seeds: [1, 2, 3]")
    C.check(len(set(seeds)) == len(seeds), "seeds", "has duplicates", "list each seed once")
    ablation = Ablation(name=name, path=str(path), base=base, base_dir=str(base_dir), arms={}, seeds=list(seeds),
                        baseline=str(tree.get("baseline") or ""), metric=metric, mode=mode,
                        description=str(tree.get("description") or ""))
    res = tree.get("resources") or {}
    for key in res:
        C.check(key in SECTION_KEYS["resources"], f"resources.{key}", "unknown key", "use cpu and gpu")
    ablation.cpu = C.coerce("resources.cpu", res.get("cpu", 1), float)
    ablation.gpu = C.coerce("resources.gpu", res.get("gpu", 0), float)
    check_gpu_share(ablation.gpu)
    ablation.max_retries = C.coerce("failure.max_retries", (tree.get("failure") or {}).get("max_retries", 2), int)
    ablation.arms = _arms(tree, ablation)
    C.check(len(ablation.arms) >= 2, "arms", f"an ablation needs at least two arms, got {list(ablation.arms)}",
            "add arms: or factors:")
    if not ablation.baseline:
        ablation.baseline = next(iter(ablation.arms))
    C.check(ablation.baseline in ablation.arms, "baseline", f"{ablation.baseline!r} is not an arm",
            C.hint(ablation.baseline, tuple(ablation.arms)))
    if tree.get("tune"):
        ablation.tune = _tune_section(tree["tune"], ablation.seeds)
        for arm in ablation.arms:  # each arm's tuning study must validate
            ablation.arm_study(arm)
    for arm in ablation.arms:
        check_no_test_split(ablation.trial_config({"arm": arm, "seed": ablation.seeds[0]}), f"arms.{arm}")
    if check_files:
        C.from_dict(ablation.base, base_dir=base_dir, check_files=True)
    return ablation


def _arms(tree: Mapping[str, Any], ablation: Ablation) -> dict[str, dict[str, Any]]:
    """Named arms, then factor combinations; arms that cannot differ from an earlier one are dropped."""
    arms: dict[str, dict[str, Any]] = {}
    named = tree.get("arms") or {}
    C.check(isinstance(named, Mapping), "arms", "expected a mapping of arm name -> overrides",
            "write arms: {ce: {loss.name: ce}}")
    for arm, overrides in named.items():
        overrides = overrides or {}
        C.check(isinstance(overrides, Mapping), f"arms.{arm}", "expected a mapping of dotted keys",
                "write e.g. {loss.name: scl}")
        for key in overrides:
            trial_key(f"arms.{arm}.{key}", key)
        arms[str(arm)] = dict(overrides)
    factors = tree.get("factors") or {}
    C.check(isinstance(factors, Mapping), "factors", "expected a mapping of dotted key -> list of values",
            "write factors: {loss.name: [ce, scl, lcl]}")
    for key, values in factors.items():
        trial_key(f"factors.{key}", key)
        C.check(isinstance(values, list) and values, f"factors.{key}", "needs a non-empty list", "write [a, b]")
    seen = {_effective(ablation, o, where=f"arms.{a}"): a for a, o in arms.items()}
    combos = itertools.product(*[[(k, v) for v in vs] for k, vs in factors.items()]) if factors else []
    for combo in combos:
        overrides = dict(combo)
        effective = _effective(ablation, overrides, where="factors")
        if effective in seen:
            continue
        cfg = ablation.config_for(overrides, 0)
        name = "-".join(str(v) for k, v in combo if cfg.uses_weighting or not k.startswith("weighting."))
        C.check(name not in arms, "factors", f"arm {name!r} is defined twice", "rename the named arm")
        arms[name] = overrides
        seen[effective] = name
    return arms


def _effective(ablation: Ablation, overrides: Mapping[str, Any], where: str) -> str:
    """What an arm really trains: its config without the weighting fields when they are unused."""
    try:
        cfg = ablation.config_for(overrides, 0)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e.key}", e.problem, e.fix) from None
    flat = cfg.flat()
    if not cfg.uses_weighting:
        flat = {k: v for k, v in flat.items() if not k.startswith("weighting.")}
    return repr(sorted(flat.items()))


def _tune_section(tune: Any, seeds: list[int]) -> dict[str, Any]:
    C.check(isinstance(tune, Mapping) and "space" in tune, "tune", "needs a space (and optionally search, scheduler)",
            "write tune: {space: {optim.lr: {type: loguniform, low: 1.0e-5, high: 1.0e-4}}}")
    for key in tune:
        C.check(key in TUNE_KEYS, f"tune.{key}", "unknown key", C.hint(str(key), TUNE_KEYS))
    tune = {**tune, "seed": C.coerce("tune.seed", tune.get("seed", DEFAULT_TUNE_SEED), int),
            "allow_seed_overlap": C.coerce("tune.allow_seed_overlap", tune.get("allow_seed_overlap", False), bool)}
    C.check(tune["allow_seed_overlap"] or tune["seed"] not in seeds, "tune.seed",
            f"seed {tune['seed']} selects the configurations and is also one of the seeds that measure them "
            f"({seeds}), so one cell per arm would be scored on the draw it was picked on",
            f"use a tuning seed outside seeds (e.g. tune.seed: {max(seeds) + 1}), or set tune.allow_seed_overlap: true")
    return tune
