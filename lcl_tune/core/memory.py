"""How much GPU memory one trial needs, before it starts: choose a safe ``resources.gpu`` fraction.

Core module: plain arithmetic on a :class:`~lcl_tune.schema.trial.TrialConfig` and a model's sizes. It
imports neither torch nor transformers (a model's sizes come from the built-in table or from the
``config.json`` of its folder, read as JSON), so a study can check its trials on the driver in
microseconds.

What one training process holds at its peak (all in bytes, summed: a deliberately cautious bound)

=====================  ==========================================================================
``weights``            every parameter in fp32 (``bf16`` autocasts on the fly; master weights stay fp32)
``grads``              one fp32 gradient per parameter
``optimizer``          AdamW's ``exp_avg`` and ``exp_avg_sq``: 2 x fp32 per parameter
``weight_casts``       ``bf16`` only: autocast's bf16 copy of every matmul weight (2 bytes each),
                       kept for the backward pass
``workspace``          the foreach AdamW step's temporary (``sqrt(exp_avg_sq)``, 4 bytes per
                       parameter); 0 with ``optim.fused``
``activations``        tensors saved for the backward pass, per encoder:
                       ``batch x seq x (layers x (C_HIDDEN x hidden + C_INTERMEDIATE x intermediate)
                       + C_EMBEDDING x hidden)`` bytes
``attention``          attention probabilities (and their dropout), per encoder:
                       ``batch x heads x seq² x layers x C_ATTENTION`` bytes. Fused attention
                       kernels (SDPA's flash / memory-efficient paths on CUDA) do not keep them:
                       ``fused_attention=True`` drops this term
``cuda_context``       the CUDA context of the process (~500 MiB), which every trial process pays
=====================  ==========================================================================

Parameters: one encoder (+ head), or two when LCL uses a ``separate*`` weighting network (the
paper's second encoder). ``seq`` is ``model.max_length`` (or ``train.pad_to`` when larger): dynamic
padding usually needs far less, but the longest batch of an epoch decides whether a trial dies.

Calibration of the activation constants
---------------------------------------
Measured on CPU (torch 2.13, transformers 5.24, BERT encoders in train mode, dropout 0.1, half of
the rows padded to half length): the bytes of every distinct tensor saved for backward by one
forward pass (``torch.autograd.graph.saved_tensors_hooks``, de-duplicated by storage, parameters
excluded), for 6 BERT shapes (hidden 32-128, 2-4 layers, intermediate 2-4 x hidden, 2-4 heads) x
4 (batch, seq) pairs (8-16 x 32-128), least-squares fit of ``bytes = a·b·s·h·L + g·b·s·i·L +
β·b·heads·s²·L + e·b·s·h``:

* fp32: a = 40.3, g = 8.0, β = 12.0, e = 11.9 (max relative error of the fit 1 %);
* bf16 (CPU autocast): a = 34.7, g = 4.7, β = 11.6, e = 11.7 (max relative error 10 %).

With the usual ``intermediate = 4 x hidden`` the activation constant is
**c = 72 bytes per token x hidden x layer in fp32** (~18 fp32 values), plus 12 bytes per attention
probability (``batch x heads x seq²`` per layer), and **54 bytes in bf16** (0.75 x: LayerNorm and
softmax run in fp32 under autocast and dropout masks are bytes, so bf16 does *not* halve
activations). ``benchmarks/bench_gpu.py`` (part ``memory``)
re-measures the same fit on the GPU and compares the whole estimate with
``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from lcl_tune.schema.trial import WEIGHTING_ENCODERS, TrialConfig

MiB = 1024**2
GiB = 1024**3

CUDA_CONTEXT_BYTES = 500 * MiB
"""CUDA context + kernel images of one process (torch 2.x with lazy module loading: ~0.4-0.6 GiB)."""

# Saved-activation bytes per token (see the module docstring for how they were measured).
ACTIVATION_BYTES: dict[str, dict[str, float]] = {
    "fp32": {"hidden": 40.3, "intermediate": 8.0, "embedding": 11.9, "attention": 12.0},
    "bf16": {"hidden": 34.7, "intermediate": 4.7, "embedding": 11.7, "attention": 11.6},
}

DEFAULT_HEADROOM = 0.85
"""Share of a GPU's memory a study plans to use: the rest absorbs allocator fragmentation, cuBLAS
workspaces and the variance of the estimate. It stays until ``benchmarks/bench_gpu.py``'s memory part
(measured peak beside this estimate) has run on a GPU: the estimate's activation constants were
measured on saved tensors, the allocator's overhead never."""

GPU_MEMORY_GIB: dict[str, float] = {
    "H100": 79.6, "H200": 140.4, "A100": 40.0, "A10G": 22.5, "L4": 22.5, "L40S": 45.0, "T4": 15.0, "V100": 15.8,
}
"""The memory a card can give a process, by the accelerator type Ray advertises
(``accelerator_type:<name>``): the total nvidia-smi reports (e.g. 23,028 MiB on an A10G, 81,559 MiB
on an H100 80GB HBM3), not the marketing figure. ``A100`` is the 40 GB card (Ray names both A100s
alike)."""

FUSED_ATTENTION = ("sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")
"""Attention implementations that keep no attention probabilities for the backward pass on CUDA."""

GPU_FRACTIONS = (1.0, 0.5, 0.25, 0.125)
"""``resources.gpu`` values a study picks from: 1, 2, 4 or 8 trials per GPU."""

VOCAB_MINILM = 30522
"""Vocabulary of the packaged MiniLM tokenizer, which the built-in random archs borrow."""


@dataclass(frozen=True)
class ArchSize:
    """The sizes of a BERT-like encoder that decide its memory."""

    hidden: int
    layers: int
    vocab: int
    intermediate: int
    heads: int
    max_positions: int = 512
    source: str = ""  # where the sizes came from, e.g. "built-in tiny" or "/path/config.json"
    assumed: bool = False  # True when the sizes are a guess from the model's name
    model_type: str = "bert"  # config.json's model_type: which transformers class loads it
    attn_implementation: str | None = None  # config.json's own choice, when it makes one


# Kept equal to lcl_tune.core.model.BUILTIN_ARCHS (tested), without importing torch.
BUILTIN_SIZES: dict[str, ArchSize] = {
    "tiny": ArchSize(hidden=32, layers=2, vocab=VOCAB_MINILM, intermediate=64, heads=2, source="built-in tiny"),
    "bert-base": ArchSize(hidden=768, layers=12, vocab=VOCAB_MINILM, intermediate=3072, heads=12,
                          source="built-in bert-base"),
}

BERT_BASE = ArchSize(hidden=768, layers=12, vocab=30522, intermediate=3072, heads=12, source="BERT-base sizes",
                     assumed=True)
BERT_LARGE = ArchSize(hidden=1024, layers=24, vocab=30522, intermediate=4096, heads=16, source="BERT-large sizes",
                      assumed=True)


@dataclass
class MemoryEstimate:
    """Peak GPU memory of one trial process, by part (bytes); :attr:`total` is what to plan for."""

    weights: int
    grads: int
    optimizer: int
    weight_casts: int
    workspace: int
    activations: int
    attention: int
    cuda_context: int
    params: int  # parameter count, all encoders and heads
    encoders: int
    batch: int
    seq: int
    precision: str
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return (self.weights + self.grads + self.optimizer + self.weight_casts + self.workspace
                + self.activations + self.attention + self.cuda_context)

    @property
    def allocated(self) -> int:
        """What ``torch.cuda.max_memory_allocated`` should show: the total without the CUDA context."""
        return self.total - self.cuda_context

    def parts(self) -> dict[str, int]:
        return {"weights": self.weights, "grads": self.grads, "optimizer": self.optimizer,
                "weight_casts": self.weight_casts, "workspace": self.workspace, "activations": self.activations,
                "attention": self.attention, "cuda_context": self.cuda_context}

    def to_dict(self) -> dict:
        return {**self.parts(), "total": self.total, "params": self.params, "encoders": self.encoders,
                "batch": self.batch, "seq": self.seq, "precision": self.precision, "notes": list(self.notes)}

    def pretty(self) -> str:
        """One line: ``~6.9 GiB per trial (weights 0.82 + grads 0.82 + ... GiB; 2 encoders, ...)``."""
        parts = " + ".join(f"{k.replace('_', ' ')} {v / GiB:.2f}" for k, v in self.parts().items() if v)
        head = (f"~{self.total / GiB:.1f} GiB per trial ({parts} GiB; {self.encoders} encoder"
                f"{'s' if self.encoders > 1 else ''}, {self.params / 1e6:.1f}M params, batch {self.batch} x "
                f"{self.seq} tokens, {self.precision})")
        return head + "".join(f"; {n}" for n in self.notes)


# --------------------------------------------------------------------------------------------
# Parameter counts and the estimate
# --------------------------------------------------------------------------------------------


def encoder_parameters(a: ArchSize, num_labels: int = 27) -> tuple[int, int]:
    """(all parameters, matmul weights) of a BERT encoder with pooler, plus a linear head.

    Matches ``count_parameters`` of a transformers ``BertModel`` exactly (embeddings with 2 token
    types, per layer q/k/v/o + FFN + 2 LayerNorms, pooler).
    """
    h, i = a.hidden, a.intermediate
    embeddings = (a.vocab + a.max_positions + 2) * h + 2 * h
    layer = 4 * (h * h + h) + (h * i + i) + (i * h + h) + 4 * h
    pooler = h * h + h
    head = h * num_labels + num_labels
    matmul = a.layers * (4 * h * h + 2 * h * i) + h * h + h * num_labels
    return embeddings + a.layers * layer + pooler + head, matmul


def activation_bytes(a: ArchSize, batch: int, seq: int, precision: str) -> tuple[int, int]:
    """(saved activations, attention probabilities) of one encoder's forward pass, in bytes."""
    c = ACTIVATION_BYTES["bf16" if precision == "bf16" else "fp32"]
    per_token = a.layers * (c["hidden"] * a.hidden + c["intermediate"] * a.intermediate) + c["embedding"] * a.hidden
    attention = c["attention"] * batch * a.heads * seq * seq * a.layers
    return int(batch * seq * per_token), int(attention)


def activation_constant(precision: str = "fp32", intermediate_ratio: float = 4.0) -> float:
    """The calibrated ``c``: saved bytes per token x hidden x layer (72 in fp32, 54 in bf16 at 4h)."""
    c = ACTIVATION_BYTES["bf16" if precision == "bf16" else "fp32"]
    return c["hidden"] + intermediate_ratio * c["intermediate"]


def _encoders(cfg: TrialConfig) -> int:
    return 2 if cfg.uses_weighting_encoder else 1


def _seq(cfg: TrialConfig) -> int:
    pad_to = getattr(cfg.train, "pad_to", None)  # a newer config key; absent -> dynamic padding
    return max(int(cfg.model.max_length), int(pad_to or 0))


def estimate_trial_memory(cfg: TrialConfig, *, hidden: int, layers: int, vocab: int,
                          intermediate: int | None = None, heads: int | None = None, num_labels: int = 27,
                          weighting_arch: ArchSize | None = None, fused_attention: bool = False,
                          cuda_context: int = CUDA_CONTEXT_BYTES) -> MemoryEstimate:
    """Peak GPU memory of one trial of ``cfg`` whose main encoder has the given sizes.

    ``intermediate`` defaults to 4 x hidden, ``heads`` to hidden / 64. A ``separate*`` weighting
    network adds a second encoder: ``weighting_arch`` when it is another model (``weighting.model``),
    else a copy of the main one. ``fused_attention`` drops the seq² attention term (flash /
    memory-efficient SDPA kernels do not keep attention probabilities).
    """
    main = ArchSize(hidden=hidden, layers=layers, vocab=vocab, intermediate=intermediate or 4 * hidden,
                    heads=heads or max(1, hidden // 64))
    archs = [main] + ([weighting_arch or main] if _encoders(cfg) == 2 else [])
    batch, seq, precision = int(cfg.train.batch_size), _seq(cfg), cfg.train.precision
    params = matmul = acts = attn = 0
    for a in archs:
        p, m = encoder_parameters(a, num_labels)
        s, t = activation_bytes(a, batch, seq, precision)
        params, matmul, acts, attn = params + p, matmul + m, acts + s, attn + t
    fused_optim = bool(getattr(cfg.optim, "fused", False))  # a newer config key
    notes = []
    if cfg.uses_weighting and cfg.weighting.name == "ema":
        notes.append("+ the ema table (train rows x classes x 4 bytes)")
    return MemoryEstimate(
        weights=4 * params, grads=4 * params, optimizer=8 * params,
        weight_casts=2 * matmul if precision == "bf16" else 0,
        workspace=0 if fused_optim else 4 * params,
        activations=acts, attention=0 if fused_attention else attn, cuda_context=int(cuda_context),
        params=params, encoders=len(archs), batch=batch, seq=seq, precision=precision, notes=notes)


# --------------------------------------------------------------------------------------------
# Model sizes without torch
# --------------------------------------------------------------------------------------------

_KEYS = {  # config.json names across BERT-like families (BERT, RoBERTa, ELECTRA, MiniLM, DistilBERT, ...)
    "hidden": ("hidden_size", "dim", "d_model"),
    "layers": ("num_hidden_layers", "n_layers", "num_layers"),
    "vocab": ("vocab_size",),
    "intermediate": ("intermediate_size", "hidden_dim", "ffn_dim"),
    "heads": ("num_attention_heads", "n_heads"),
    "max_positions": ("max_position_embeddings",),
}


def read_config_json(path: str | os.PathLike) -> ArchSize:
    """Sizes from a model folder's ``config.json`` (or the file itself); json only, no transformers."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    cfg = json.loads(path.read_text(encoding="utf-8"))
    found = {}
    for field_name, names in _KEYS.items():
        found[field_name] = next((int(cfg[n]) for n in names if cfg.get(n) is not None), None)
    missing = [k for k in ("hidden", "layers", "vocab") if found[k] is None]
    if missing:
        raise ValueError(f"{path}: no {', '.join(missing)} in config.json (keys {', '.join(_KEYS[missing[0]])})")
    return ArchSize(hidden=found["hidden"], layers=found["layers"], vocab=found["vocab"],
                    intermediate=found["intermediate"] or 4 * found["hidden"],
                    heads=found["heads"] or max(1, found["hidden"] // 64),
                    max_positions=found["max_positions"] or 512, source=str(path),
                    model_type=str(cfg.get("model_type") or "bert"),
                    attn_implementation=cfg.get("attn_implementation") or cfg.get("_attn_implementation"))


@functools.lru_cache(maxsize=None)  # an ablation estimates every cell: read each modeling file once
def attention_implementation(arch: ArchSize) -> str:
    """The attention transformers gives this encoder: its config.json's ``attn_implementation``
    when it sets one, else ``sdpa`` when the installed transformers' model class for its
    ``model_type`` declares ``_supports_sdpa = True`` (transformers then loads SDPA by default, and
    the project never asks otherwise), else ``eager``. Read from the installed source, not imported,
    so that ``validate`` stays free of torch; a class not found counts as ``eager`` (the larger
    estimate)."""
    if arch.attn_implementation:
        return str(arch.attn_implementation)
    spec = importlib.util.find_spec("transformers")
    if spec is None or not spec.submodule_search_locations:
        return "eager"
    module = arch.model_type.replace("-", "_")
    source = Path(list(spec.submodule_search_locations)[0]) / "models" / module / f"modeling_{module}.py"
    text = source.read_text(encoding="utf-8") if source.is_file() else ""
    return "sdpa" if re.search(r"_supports_sdpa\s*=\s*True", text) else "eager"


def _package_folder(name: str) -> Path | None:
    """``pkg:<module>/<sub>`` -> the folder inside the installed package (found, never imported)."""
    module, _, sub = name[4:].partition("/")
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / sub


def _hub_cache_config(name: str) -> Path | None:
    """A hub id's ``config.json`` in the local Hugging Face cache, if it was downloaded before."""
    hub = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface")), "hub")
    snapshots = Path(hub) / f"models--{name.replace('/', '--')}" / "snapshots"
    hits = sorted(snapshots.glob("*/config.json")) if snapshots.is_dir() else []
    return hits[-1] if hits else None


def arch_size(name: str) -> ArchSize:
    """Sizes of model ``name`` as ``model.name`` accepts it: a built-in arch, ``pkg:...``, a local
    folder, or a hub id (its cached ``config.json``, else BERT-large sizes for ``*large*`` names and
    BERT-base sizes for any other name, marked ``assumed``)."""
    if name in BUILTIN_SIZES:
        return BUILTIN_SIZES[name]
    folder = _package_folder(name) if name.startswith("pkg:") else Path(os.path.expanduser(name))
    if folder is not None and (folder / "config.json").is_file():
        return read_config_json(folder)
    if not name.startswith("pkg:") and "/" in name.strip("/") and not os.path.isabs(name):
        cached = _hub_cache_config(name)
        if cached is not None:
            return read_config_json(cached)
    guess = BERT_LARGE if "large" in name.lower() else BERT_BASE
    return replace(guess, source=f"{guess.source} assumed for {name!r} (no local config.json)")


def estimate_for_arch(cfg: TrialConfig, *, num_labels: int = 27, fused_attention: bool | None = None) -> MemoryEstimate:
    """:func:`estimate_trial_memory` with the sizes of ``cfg.model.name`` (and ``weighting.model``);
    the attention term as the encoders load on a GPU (:func:`attention_implementation`) unless
    ``fused_attention`` says."""
    main = arch_size(cfg.model.name)
    w = arch_size(cfg.weighting.model) if (_encoders(cfg) == 2 and cfg.weighting.model) else None
    if fused_attention is None:
        fused_attention = all(attention_implementation(a) in FUSED_ATTENTION for a in (main, w) if a is not None)
    est = estimate_trial_memory(cfg, hidden=main.hidden, layers=main.layers, vocab=main.vocab,
                                intermediate=main.intermediate, heads=main.heads, num_labels=num_labels,
                                weighting_arch=w, fused_attention=fused_attention)
    for a in (main, w):
        if a is not None and a.assumed:
            est.notes.append(f"sizes of {a.source}")
    return est


# --------------------------------------------------------------------------------------------
# Choosing the GPU share
# --------------------------------------------------------------------------------------------


def _fits(est: MemoryEstimate, fraction: float, gpu_memory_bytes: int, headroom: float) -> bool:
    return est.total <= min(fraction, 1.0) * gpu_memory_bytes * headroom


def safe_gpu_fraction(est: MemoryEstimate, gpu_memory_bytes: int, headroom: float = DEFAULT_HEADROOM) -> float:
    """The ``resources.gpu`` among 1, 0.5, 0.25, 0.125 that packs the most trials per GPU (the
    smallest share) while each trial still fits in its share of ``headroom x gpu_memory_bytes``.

    Raises ValueError when even a whole GPU is too small.
    """
    for fraction in sorted(GPU_FRACTIONS):
        if _fits(est, fraction, gpu_memory_bytes, headroom):
            return fraction
    raise ValueError(f"one trial needs {est.pretty()}, more than {headroom:.0%} of a "
                     f"{gpu_memory_bytes / GiB:.1f} GiB GPU. Fix: lower train.batch_size or model.max_length, "
                     "use train.precision=bf16, or a weighting network without a second encoder (self, ema)")


def check_gpu_fraction(est: MemoryEstimate, gpu_fraction: float, gpu_memory_bytes: int,
                       headroom: float = DEFAULT_HEADROOM) -> str | None:
    """A one-line warning when trials asking for ``resources.gpu = gpu_fraction`` would not fit in
    their share of the GPU (None when they fit)."""
    if gpu_fraction <= 0 or _fits(est, gpu_fraction, gpu_memory_bytes, headroom):
        return None
    per_gpu = max(1, round(1 / min(gpu_fraction, 1.0)))
    share = min(gpu_fraction, 1.0) * gpu_memory_bytes * headroom
    head = (f"resources.gpu={gpu_fraction:g}: {per_gpu} trial{'s' if per_gpu > 1 else ''} per "
            f"{gpu_memory_bytes / GiB:.3g} GiB GPU, but each needs ~{est.total / GiB:.1f} GiB and gets "
            f"{share / GiB:.1f} GiB ({headroom:.0%} of its share): trials would die of out-of-memory. Fix: ")
    try:
        safe = safe_gpu_fraction(est, gpu_memory_bytes, headroom)
    except ValueError:
        return head + ("even a whole GPU is too small; lower train.batch_size or model.max_length, use "
                       "train.precision=bf16, or a weighting network without a second encoder")
    n = round(1 / safe)
    return head + f"set resources.gpu: {safe:g} ({n} trial{'s' if n > 1 else ''} per GPU), or lower train.batch_size"


def heaviest_trial(study) -> TrialConfig:
    """The study's trial config at its most memory-hungry corner: a ``separate*`` weighting network
    if one is searched, and the largest searched batch size and sequence length."""
    params = {}
    for p in study.params:
        if p.key == "weighting.name":
            params[p.key] = next((v for v in p.values if WEIGHTING_ENCODERS.get(str(v))), p.values[0])
        elif p.key in ("train.batch_size", "model.max_length"):
            params[p.key] = max(p.values) if p.type == "categorical" else p.high
    return study.trial_config(params)
