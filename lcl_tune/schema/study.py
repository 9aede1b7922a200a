"""The study (search-space) YAML schema: parsed and validated without Ray, Optuna or torch.

A study file names a base trial config, the parameters to search (by their dotted trial-config
keys), the metric, the Optuna sampler, the ASHA scheduler and the resources of each trial::

    name: quickstart
    base: ../configs/quickstart_trial.yaml      # or an inline mapping of trial-config sections
    fixed: {train.max_steps: 30}                # overrides applied to every trial
    metric: {name: dev/weighted_f1, mode: max}
    space:
      loss.temperature: {type: loguniform, low: 0.05, high: 1.0}
      loss.lam:         {type: uniform, low: 0.0, high: 1.0}
      weighting.name:   {type: categorical, values: [separate, self, ema, uniform]}
      weighting.ema_alpha: {type: uniform, low: 0.5, high: 0.99, when: {weighting.name: ema}}
    search: {sampler: tpe, seed: 0, num_samples: 8, max_concurrent: 2}
    scheduler: {name: asha, time_unit: period, max_t: 4, grace_period: 1, reduction_factor: 2}
    resources: {cpu: 1, gpu: 0}

Every problem is a one-line :class:`~lcl_tune.schema.trial.ConfigError` naming the file, the key and the
fix, raised before Ray starts. :meth:`Study.budget` says what a study will cost at most.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from lcl_tune.schema import trial as C
from lcl_tune.schema.trial import ConfigError

PARAM_TYPES = ("loguniform", "uniform", "int", "categorical")
SAMPLERS = ("tpe", "random", "qmc", "grid", "gp")
MODEL_SAMPLERS = ("tpe", "gp")  # samplers with a random start-up phase before their model takes over
SCHEDULERS = ("asha", "fifo")
TIME_UNITS = {"period": "training_iteration", "step": "step", "samples": "samples"}
REPORTED_METRICS = tuple(f"dev/{m}" for m in C.METRIC_NAMES)

STUDY_KEYS = ("name", "description", "base", "fixed", "metric", "space", "search", "scheduler", "resources",
              "checkpoint", "failure")
SECTION_KEYS = {
    "metric": ("name", "mode"),
    "search": ("sampler", "seed", "num_samples", "max_concurrent", "points_to_evaluate", "sampler_options"),
    "scheduler": ("name", "time_unit", "max_t", "grace_period", "reduction_factor"),
    "resources": ("cpu", "gpu"),
    "checkpoint": ("keep",),
    "failure": ("max_retries",),
}
PARAM_KEYS = ("type", "low", "high", "values", "log", "when")


@dataclass
class Param:
    """One searched parameter, named by its dotted trial-config key."""

    key: str
    type: str
    low: float | None = None
    high: float | None = None
    values: list[Any] | None = None
    when: dict[str, list[Any]] = field(default_factory=dict)  # active only if every key takes one of these

    def active(self, params: Mapping[str, Any]) -> bool:
        return all(params.get(k) in allowed for k, allowed in self.when.items())

    def contains(self, value: Any) -> bool:
        if self.type == "categorical":
            return value in (self.values or [])
        return self.low <= value <= self.high  # type: ignore[operator]


@dataclass
class Study:
    name: str
    path: str | None  # the YAML file, for messages
    base: dict[str, Any]  # trial-config tree (base file + fixed overrides), relative paths resolved
    base_dir: str
    metric: str = "dev/weighted_f1"
    mode: str = "max"
    params: list[Param] = field(default_factory=list)
    sampler: str = "tpe"
    seed: int = 0
    num_samples: int = 8
    max_concurrent: int = 2
    points_to_evaluate: list[dict[str, Any]] = field(default_factory=list)
    sampler_options: dict[str, Any] = field(default_factory=dict)  # passed to the Optuna sampler
    scheduler: str = "asha"
    time_unit: str = "period"
    max_t: int = 4
    grace_period: int = 1
    reduction_factor: float = 2.0
    cpu: float = 1.0
    gpu: float = 0.0
    checkpoint_keep: int = 2  # best-scoring kept besides the latest; >= 2 so a damaged one has a fallback
    max_retries: int = 2
    description: str = ""

    @property
    def tune_metric(self) -> str:
        """What Optuna and ASHA see: the best-so-far value (Optuna takes a trial's last report)."""
        return f"best/{self.metric}"

    @property
    def startup_trials(self) -> int:
        """Random trials before TPE's or GP's model takes over: a quarter of the budget, at least
        2 and at most 10 (Optuna's own default, 10, would make a study of 8 trials random search),
        unless ``search.sampler_options.n_startup_trials`` says otherwise; 0 for other samplers."""
        if self.sampler not in MODEL_SAMPLERS:
            return 0
        return int(self.sampler_options.get("n_startup_trials", max(2, min(10, self.num_samples // 4))))

    @property
    def grid_size(self) -> int:
        """Points of the grid a ``grid`` sampler walks: the product of the listed values."""
        return math.prod(len(p.values or []) for p in self.params)

    @property
    def time_attr(self) -> str:
        return TIME_UNITS[self.time_unit]

    def trial_config(self, params: Mapping[str, Any]) -> C.TrialConfig:
        """The full, validated trial config for sampled ``params`` (dotted keys)."""
        tree = copy.deepcopy(self.base)
        for key, value in params.items():
            C.set_dotted(tree, key, value)
        return C.from_dict(tree, base_dir=self.base_dir, source=self.path, check_files=False)

    def run_labels(self, params: Mapping[str, Any]) -> tuple[str | None, dict[str, str]]:
        """MLflow run name (None: named from the config) and tags of a trial."""
        return None, {"lcl_tune.study": self.name}

    def budget(self) -> dict[str, Any]:
        """Upper bounds: trials, evaluation periods per trial and in all (without early stopping)."""
        return {"trials": self.num_samples, "max_periods_per_trial": self.max_t if self.time_unit == "period" else None,
                "max_periods_total": self.num_samples * self.max_t if self.time_unit == "period" else None,
                "time_unit": self.time_unit, "max_t": self.max_t, "concurrency": self.max_concurrent,
                "scheduler": self.scheduler, "sampler": self.sampler, "startup_trials": self.startup_trials,
                "resources": {"cpu": self.cpu, "gpu": self.gpu}}

    def notes(self) -> list[str]:
        """One-line remarks on a valid study worth a user's attention (printed by ``validate``)."""
        notes = []
        if self.startup_trials and 2 * self.startup_trials >= self.num_samples:
            notes.append(f"{self.startup_trials} of the {self.num_samples} trials are the {self.sampler} sampler's "
                         "random start-up, so this study is mostly random search; raise search.num_samples or "
                         "lower search.sampler_options.n_startup_trials")
        return notes

    def to_dict(self) -> dict[str, Any]:
        """The resolved study, as written to ``<storage>/<name>/study.yaml``."""
        return {
            "name": self.name, "description": self.description, "base": self.base,
            "metric": {"name": self.metric, "mode": self.mode},
            "space": {p.key: {k: v for k, v in (("type", p.type), ("low", p.low), ("high", p.high),
                                                ("values", p.values), ("when", p.when or None)) if v is not None}
                      for p in self.params},
            "search": {"sampler": self.sampler, "seed": self.seed, "num_samples": self.num_samples,
                       "max_concurrent": self.max_concurrent, "points_to_evaluate": self.points_to_evaluate,
                       "sampler_options": self.sampler_options},
            "scheduler": {"name": self.scheduler, "time_unit": self.time_unit, "max_t": self.max_t,
                          "grace_period": self.grace_period, "reduction_factor": self.reduction_factor},
            "resources": {"cpu": self.cpu, "gpu": self.gpu},
            "checkpoint": {"keep": self.checkpoint_keep},
            "failure": {"max_retries": self.max_retries},
        }


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_study(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = (), *,
               check_files: bool = True) -> Study:
    """Parse and validate a study YAML; ``overrides`` (``key=value``) address study keys
    (``search.num_samples=4``) or trial-config keys (``train.max_steps=10``, added to ``fixed``)."""
    return load_spec(path, "SPACE", "a study YAML (see search_spaces/)", parse_study, overrides, check_files)


def load_spec(path: str | os.PathLike, arg: str, what: str, parse: Any, overrides, check_files: bool) -> Any:
    """Read a study/ablation YAML and parse it; every error is attributed to the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(arg, f"file not found: {path}", f"pass the path of {what}")
    try:
        return parse(C.load_yaml(path), path, overrides, check_files)
    except ConfigError as e:
        raise e if e.source else e.with_source(str(path))


def apply_overrides(tree: dict[str, Any], overrides, own: tuple[str, ...]) -> dict[str, Any]:
    """``--set`` values: keys whose head is one of the file's ``own`` keys edit the file; any other
    key is a trial-config key applied to every trial (added to ``fixed``)."""
    tree = copy.deepcopy(tree)
    for text in overrides:
        key, value = C.parse_override(text)
        if key.split(".")[0] in own:
            C.set_dotted(tree, key, value)
        else:
            tree.setdefault("fixed", {})[key] = value
    return tree


def parse_study(tree: dict[str, Any], path: Path, overrides, check_files: bool) -> Study:
    tree = apply_overrides(tree, overrides, (*SECTION_KEYS, "name", "description"))
    for key in tree:
        if key not in STUDY_KEYS:
            raise ConfigError(str(key), "unknown study key", C.suggest(str(key), list(STUDY_KEYS)))
    for section, allowed in SECTION_KEYS.items():
        value = tree.get(section) or {}
        if not isinstance(value, Mapping):
            raise ConfigError(section, "expected a mapping", f"write '{section}:' followed by indented keys")
        for key in value:
            if key not in allowed:
                full = f"{section}.{key}"
                raise ConfigError(full, "unknown key", C.suggest(full, [f"{section}.{a}" for a in allowed]))

    name = tree.get("name")
    C.check(isinstance(name, str) and name.strip() != "" and "/" not in name, "name",
          f"must be a non-empty name without '/', got {name!r}", "set name: my_study")
    base_dir = path.resolve().parent
    base = base_tree(tree.get("base"), base_dir, check_files)
    fixed = tree.get("fixed") or {}
    C.check(isinstance(fixed, Mapping), "fixed", "expected a mapping of dotted keys", "write fixed: {train.max_steps: 30}")
    for key, value in fixed.items():
        trial_key(f"fixed.{key}", key)
        C.set_dotted(base, key, value)

    m_name, mode = parse_metric(tree.get("metric") or {}, base)

    search = tree.get("search") or {}
    sched = tree.get("scheduler") or {}
    res = tree.get("resources") or {}
    study = Study(
        name=name, path=str(path), base=base, base_dir=str(base_dir), metric=m_name, mode=mode,
        sampler=_typed("search.sampler", search.get("sampler", "tpe"), str),
        seed=_typed("search.seed", search.get("seed", 0), int),
        num_samples=_typed("search.num_samples", search.get("num_samples", 0), int),
        max_concurrent=_typed("search.max_concurrent", search.get("max_concurrent", 2), int),
        points_to_evaluate=list(search.get("points_to_evaluate") or []),
        sampler_options=_options(search.get("sampler_options")),
        scheduler=_typed("scheduler.name", sched.get("name", "asha"), str),
        time_unit=_typed("scheduler.time_unit", sched.get("time_unit", "period"), str),
        max_t=_typed("scheduler.max_t", sched.get("max_t", 0), int),
        grace_period=_typed("scheduler.grace_period", sched.get("grace_period", 1), int),
        reduction_factor=_typed("scheduler.reduction_factor", sched.get("reduction_factor", 2), float),
        cpu=_typed("resources.cpu", res.get("cpu", 1), float),
        gpu=_typed("resources.gpu", res.get("gpu", 0), float),
        checkpoint_keep=_typed("checkpoint.keep", (tree.get("checkpoint") or {}).get("keep", 2), int),
        max_retries=_typed("failure.max_retries", (tree.get("failure") or {}).get("max_retries", 2), int),
        description=str(tree.get("description") or ""),
    )
    space = tree.get("space") or {}
    C.check(isinstance(space, Mapping) and len(space) > 0, "space", "no parameters to search",
          "add e.g. space: {loss.temperature: {type: loguniform, low: 0.05, high: 1.0}}")
    study.params = [_param(key, spec) for key, spec in space.items()]
    _check_grid(study)
    if not study.num_samples:  # a grid search runs its grid once; other samplers 8 trials
        study.num_samples = study.grid_size if study.sampler == "grid" else 8
    _check_settings(study)
    _check_params(study, check_files)
    _check_schedule(study, sched.get("max_t") is not None)
    return study


def parse_metric(metric: Mapping[str, Any], base: dict[str, Any]) -> tuple[str, str]:
    """``metric: {name, mode}`` -> (``dev/<m>``, mode); sets the trials' ``train.metric`` to match so
    the trainable tracks the best-so-far value of the same metric."""
    m_name = metric.get("name", "dev/weighted_f1")
    if m_name.startswith("best/"):
        m_name = m_name[5:]
    if m_name not in REPORTED_METRICS:
        raise ConfigError("metric.name", f"{m_name!r} is not reported by the trainable",
                          C.hint(m_name, REPORTED_METRICS))
    expected = "min" if m_name == "dev/loss" else "max"
    mode = metric.get("mode", expected)
    C.one_of("metric.mode", mode, ("max", "min"))
    C.check(mode == expected, "metric.mode", f"{m_name} should be {expected}imised, got mode {mode}",
            f"set metric.mode: {expected}")
    C.set_dotted(base, "train.metric", m_name.split("/", 1)[1])
    return m_name, mode


def base_tree(base: Any, base_dir: Path, check_files: bool) -> dict[str, Any]:
    """The base trial config as a tree with its relative paths resolved (so `fixed` can add more)."""
    if base is None:
        raise ConfigError("base", "missing", "set base: path/to/trial.yaml (relative to the study file) or inline sections")
    if isinstance(base, str):
        file = (base_dir / base).resolve()
        if not file.is_file():
            raise ConfigError("base", f"trial config not found: {file}", "check the path (relative to the study file)")
        cfg = C.load(file, check_files=False)
    elif isinstance(base, Mapping):
        try:
            cfg = C.from_dict(base, base_dir=base_dir, check_files=False)
        except ConfigError as e:
            raise ConfigError(f"base.{e.key}", e.problem, e.fix) from None
    else:
        raise ConfigError("base", f"expected a path or a mapping, got {type(base).__name__}", "set base: trial.yaml")
    return cfg.to_dict()


def trial_key(where: str, key: str) -> None:
    if key not in C.valid_keys():
        raise ConfigError(where, "not a trial-config key", C.suggest(key, C.valid_keys()))


def _param(key: str, spec: Any) -> Param:
    where = f"space.{key}"
    trial_key(where, key)
    C.check(isinstance(spec, Mapping), where, "expected a mapping with a type",
          "write e.g. {type: uniform, low: 0.0, high: 1.0}")
    for k in spec:
        if k not in PARAM_KEYS:
            raise ConfigError(f"{where}.{k}", "unknown key", C.suggest(str(k), list(PARAM_KEYS)))
    ptype = spec.get("type")
    C.one_of(f"{where}.type", ptype, PARAM_TYPES)
    when = spec.get("when") or {}
    C.check(isinstance(when, Mapping), f"{where}.when", "expected a mapping", "write when: {weighting.name: ema}")
    when = {k: (list(v) if isinstance(v, (list, tuple)) else [v]) for k, v in when.items()}
    if ptype == "categorical":
        values = spec.get("values")
        C.check(isinstance(values, list) and len(values) > 0, f"{where}.values", "needs a non-empty list",
              "write values: [a, b]")
        return Param(key, ptype, values=list(values), when=when)
    low, high = spec.get("low"), spec.get("high")
    for k, v in (("low", low), ("high", high)):
        C.check(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v), f"{where}.{k}",
              f"needs a number, got {v!r}", f"set {k}: a number")
    C.check(low < high, f"{where}.low", f"low ({low}) must be < high ({high})", "swap or widen the bounds")
    if ptype == "loguniform":
        C.check(low > 0, f"{where}.low", f"loguniform needs low > 0, got {low}",
              "use a positive low bound (e.g. 1.0e-3) or type: uniform")
    if ptype == "int":
        C.check(float(low).is_integer() and float(high).is_integer(), f"{where}.low", "int bounds must be integers",
              "use whole numbers")
        return Param(key, ptype, int(low), int(high), when=when)
    return Param(key, ptype, float(low), float(high), when=when)


def _check_settings(s: Study) -> None:
    C.one_of("search.sampler", s.sampler, SAMPLERS)
    C.one_of("scheduler.name", s.scheduler, SCHEDULERS)
    C.one_of("scheduler.time_unit", s.time_unit, tuple(TIME_UNITS))
    C.check(s.num_samples >= 1, "search.num_samples", "must be >= 1", "use e.g. 8")
    C.check(s.max_concurrent >= 1, "search.max_concurrent", "must be >= 1", "use e.g. 2")
    C.check(s.max_t >= 0, "scheduler.max_t", "must be >= 1", "use e.g. 4, or leave it out: a trial's periods")
    C.check(s.reduction_factor > 1, "scheduler.reduction_factor", "must be > 1", "use 2, 3 or 4")
    C.check(not (s.sampler == "gp" and s.scheduler == "asha"), "search.sampler",
            "gp learns only from trials that ran to full length (Optuna's GPSampler skips stopped ones), and ASHA "
            "stops most trials", "use sampler: tpe with ASHA (it learns from stopped trials too), or "
            "scheduler: {name: fifo} with gp")
    C.check(s.cpu > 0, "resources.cpu", "must be > 0", "use e.g. 1")
    check_gpu_share(s.gpu)
    C.check(s.checkpoint_keep >= 2, "checkpoint.keep", f"must be >= 2, got {s.checkpoint_keep}",
            "use 2: a retry or --resume falls back to the previous checkpoint when the latest is damaged")
    C.check(s.max_retries >= 0, "failure.max_retries", "must be >= 0", "use e.g. 2")


def check_gpu_share(gpu: float) -> None:
    """A trial's GPU reservation: none, a share of one GPU, or one GPU. The engine trains on one
    device, so a trial that reserved two would leave one idle."""
    C.check(gpu >= 0, "resources.gpu", f"must be >= 0, got {gpu:g}", "use 0, a fraction such as 0.25, or 1")
    C.check(gpu <= 1, "resources.gpu", f"a trial trains on one GPU, got {gpu:g}",
            "use 1 (a GPU per trial) or a fraction such as 0.5 (trials sharing a GPU)")


def _check_grid(study: Study) -> None:
    """A grid search walks the listed values of every parameter: each must be categorical, and a
    conditional parameter would leave holes in the grid."""
    if study.sampler != "grid":
        return
    for p in study.params:
        C.check(p.type == "categorical", f"space.{p.key}", "a grid search needs the values to walk, got a range",
                "write {type: categorical, values: [...]} (numbers are fine), or choose another search.sampler")
        C.check(not p.when, f"space.{p.key}.when", "a grid search cannot skip a parameter",
                "drop the condition, or choose another search.sampler")


def trial_periods(study: Study, n_train: int | None = None) -> tuple[int, int] | None:
    """The fewest and most evaluation periods a trial of the study can have (the space may search
    the batch size, the steps, the epochs or the evaluation interval); None when that depends on
    the number of training rows and ``n_train`` is not given."""
    shaping = [p for p in study.params if p.key in ("train.batch_size", "train.max_steps", "train.epochs",
                                                    "train.eval_every")]
    choices = [{}] + [{p.key: v} for p in shaping for v in (p.values if p.type == "categorical" else [p.low, p.high])]
    periods = [study.trial_config(c).periods(n_train) for c in choices]
    return None if None in periods else (min(periods), max(periods))


def check_schedule(study: Study, n_train: int | None = None, *, max_t_given: bool = True) -> bool:
    """ASHA counts evaluation periods: its ``max_t`` must be the periods a trial has (fewer would
    stop every trial part-way through its learning-rate schedule and call it completed; more would
    leave its top rungs empty), and ``grace_period`` must be below that. A left-out ``max_t`` is set
    to the periods. Returns whether the periods were known (else the runner checks again once it
    knows the training rows)."""
    if study.scheduler != "asha" or study.time_unit != "period":
        study.max_t = study.max_t or 4
        return True
    known = trial_periods(study, n_train)
    if known is None and not study.max_t:
        return False  # derived by the runner, which knows the training rows
    if known is not None:
        low, high = known
        if not max_t_given and not study.max_t:
            study.max_t = high
        varies = f"{low} to {high}" if low != high else str(high)
        C.check(study.max_t == high, "scheduler.max_t", f"is {study.max_t} but a trial has {varies} evaluation "
                "periods (train.max_steps or train.epochs over train.eval_every)",
                f"set scheduler.max_t: {high}, or change train.eval_every so a trial has {study.max_t} periods")
        C.check(study.grace_period < low or low == high == 1, "scheduler.grace_period",
                f"is {study.grace_period} but a trial has {low} evaluation periods, so ASHA could never stop one "
                "early", f"set scheduler.grace_period below {low} (e.g. 1), or use scheduler.name: fifo")
    C.check(1 <= study.grace_period <= study.max_t, "scheduler.grace_period",
            f"must lie in [1, max_t={study.max_t}]", "use e.g. 1")
    return known is not None


def _check_schedule(study: Study, max_t_given: bool) -> None:
    check_schedule(study, None, max_t_given=max_t_given)


def check_no_test_split(cfg: C.TrialConfig, key: str) -> None:
    """Selection (a study's trials, an ablation's cells) never looks at the test split: a choice
    made with it would be scored on the data that should judge it."""
    C.check(not cfg.train.eval_test, key, "a study or ablation selects on dev and never evaluates the test split",
            "leave it false; the test split is evaluated by lcl-tune train --final or lcl-tune ablate --final")


def _check_params(study: Study, check_files: bool) -> None:
    """Every value a parameter can take must give a valid trial config (checked at its bounds and
    for every categorical value), and ``when`` must refer to categorical parameters."""
    by_key = {p.key: p for p in study.params}
    for p in study.params:
        for k, allowed in p.when.items():
            other = by_key.get(k)
            C.check(other is not None and other.type == "categorical", f"space.{p.key}.when",
                  f"{k!r} is not a categorical parameter of this space", "condition on a categorical space key")
            bad = [v for v in allowed if v not in (other.values or [])]
            C.check(not bad, f"space.{p.key}.when", f"{bad} are not values of {k}", f"use values from {other.values}")
    lam = by_key.get("loss.lam")
    if lam is not None:
        C.check(0.0 not in (lam.values if lam.type == "categorical" else [lam.low]), "space.loss.lam",
                "λ = 0 gives the classification head no gradient (its CE term has weight 0), so such a trial "
                "cannot train a classifier", "bound λ away from 0, e.g. low: 0.05")
    check_no_test_split(study.trial_config({}), "base.train.eval_test")  # the base itself (files checked below)
    C.check("train.eval_test" not in by_key, "space.train.eval_test", "a study never looks at the test split",
            "remove it from the space")
    for p in study.params:
        for value in (p.values if p.type == "categorical" else [p.low, p.high]):
            try:
                study.trial_config({p.key: value})
            except ConfigError as e:
                where = f"space.{p.key}.values" if p.type == "categorical" else f"space.{p.key}"
                raise ConfigError(where, f"value {value!r}: {e.problem}", e.fix) from None
    for i, point in enumerate(study.points_to_evaluate):
        C.check(isinstance(point, Mapping), f"search.points_to_evaluate[{i}]", "expected a mapping", "write {key: value}")
        for k, v in point.items():
            C.check(k in by_key, f"search.points_to_evaluate[{i}].{k}", "not a parameter of this space",
                  "use keys of space")
            C.check(by_key[k].contains(v), f"search.points_to_evaluate[{i}].{k}", f"{v!r} is outside the space",
                  "use a value inside the bounds")
    if check_files:
        C.from_dict(study.base, base_dir=study.base_dir, check_files=True)


def _options(value: Any) -> dict[str, Any]:
    C.check(value is None or isinstance(value, Mapping), "search.sampler_options",
            f"expected a mapping of the sampler's own options, got {value!r}", "write e.g. {n_startup_trials: 4}")
    return dict(value or {})


def _typed(key: str, value: Any, tp: type) -> Any:
    return C.coerce(key, value, tp)
