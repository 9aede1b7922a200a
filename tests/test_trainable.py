"""The trainable's choices inside a Ray worker, without Ray: here, the device a trial trains on.

Ray sets ``CUDA_VISIBLE_DEVICES`` only for trials that reserved a GPU. A trial that reserved none
(``resources.gpu: 0``) on a GPU node sees every GPU, so ``train.device: auto`` would pick CUDA and
land on GPU 0: a CPU ablation (no concurrency cap) would put one CUDA context per CPU on one card.
The GPU is simulated: ``torch.cuda.is_available`` says yes and ``CUDA_VISIBLE_DEVICES`` names one.
"""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch

from lcl_tune.adapters import trainable
from lcl_tune.core import engine
from lcl_tune.schema.study import load_study

REPO = Path(__file__).resolve().parents[1]


class Built(Exception):
    """Raised by the stand-in Trainer: the trial got as far as building its Trainer."""


@pytest.fixture()
def visible_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")


@pytest.fixture()
def built_device(monkeypatch):
    """Run the trainable up to its Trainer; return the device that Trainer would train on."""
    monkeypatch.setattr(trainable.tune, "get_context", lambda: types.SimpleNamespace(get_trial_id=lambda: "t1"))
    seen = {}

    class Trainer:
        def __init__(self, cfg, device=None, **kwargs):
            seen["device"] = engine.pick_device(device or cfg.train.device)
            seen["recorded"] = cfg.train.device
            raise Built

    monkeypatch.setattr(engine, "Trainer", Trainer)

    def run(gpu: float, device: str = "auto") -> torch.device:
        study = load_study(REPO / "search_spaces" / "quickstart.yaml", [f"resources.gpu={gpu}", f"train.device={device}"],
                           check_files=False)
        with pytest.raises(Built):
            trainable.lcl_trainable({}, study)
        assert seen["recorded"] == device  # the trial's config keeps `auto`: its export runs anywhere
        return seen["device"]

    return run


def test_a_trial_that_reserved_no_gpu_trains_on_the_cpu(visible_gpu, built_device):
    assert built_device(gpu=0) == torch.device("cpu")


def test_a_trial_that_reserved_a_gpu_trains_on_it(visible_gpu, built_device):
    assert built_device(gpu=0.5) == torch.device("cuda")


def test_an_explicit_device_is_kept(visible_gpu, built_device):
    """``train.device: cuda`` with no GPU reserved is the user's word (validate may warn); only
    ``auto`` follows the reservation."""
    assert built_device(gpu=0, device="cuda") == torch.device("cuda")
