"""Weighting networks: where LCL's per-negative weights come from.

LCL weighs negative ``a`` of anchor ``i`` by ``w_{i, y_a}``, the probability that ``i`` belongs to
``a``'s class, so negatives from confusable classes count more. Which network produces ``w`` is a
choice that studies search over (``weighting.name``). Every choice returns, per batch, the class
probabilities ``probs [B, C]`` and optionally its own training loss, which the engine adds to the
objective of the main encoder.

| name                | extra encoders | extra forward passes per step | gradients into w |
|---------------------|----------------|-------------------------------|------------------|
| ``separate``        | 1 (+ head)     | 1 encoder fwd + bwd           | yes (paper)      |
| ``separate_detached`` | 1 (+ head)   | 1 encoder fwd + bwd           | no               |
| ``self``            | 0              | 0                             | no               |
| ``ema``             | 0 (N×C table)  | 0                             | no               |
| ``uniform``         | 0              | 0                             | no               |

Core module: imports torch only (and :mod:`lcl_tune.core.model` for the second encoder).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lcl_tune.schema.trial import WEIGHTING_ENCODERS, WeightingConfig
from lcl_tune.core.model import EncoderClassifier


@dataclass
class WeightOutput:
    probs: torch.Tensor  # [B, C], rows sum to 1
    loss: torch.Tensor | None = None  # the weighting network's own objective, already scaled (λ·CE_w)


class WeightingNetwork(nn.Module):
    """Base class. Subclasses set ``name`` and ``cost`` and implement :meth:`forward`."""

    name: ClassVar[str]
    cost: ClassVar[str]  # one line for docs, logs and the README table
    has_encoder: ClassVar[bool] = False

    def __init__(self, num_labels: int):
        super().__init__()
        self.num_labels = num_labels

    @classmethod
    def build(cls, cfg: WeightingConfig, num_labels: int, num_examples: int,
              make_classifier: Callable[[], EncoderClassifier]) -> "WeightingNetwork":
        """Instantiate from the trial's ``weighting`` section; ``make_classifier`` builds a second
        encoder + head (for networks with ``has_encoder``), ``num_examples`` is the training-set size.
        Override when the network needs more than the number of classes."""
        return cls(num_labels)

    def forward(self, batch: dict[str, torch.Tensor], main_logits: torch.Tensor, lam: float) -> WeightOutput:
        """batch: the collated batch (``input_ids``, ``attention_mask``, ``labels``, ``idx``, and
        ``w_input_ids``/``w_attention_mask`` when the weighting encoder has its own tokenizer);
        main_logits [B, C]: the main classifier's logits for the same rows."""
        raise NotImplementedError


REGISTRY: dict[str, type[WeightingNetwork]] = {}


def register(cls: type[WeightingNetwork]) -> type[WeightingNetwork]:
    """Make ``cls`` a choice of ``weighting.name`` (a class decorator): the engine builds it through
    ``cls.build``, and the schema accepts its name (in every process that imported the class)."""
    REGISTRY[cls.name] = cls
    WEIGHTING_ENCODERS[cls.name] = cls.has_encoder
    return cls


@register
class Separate(WeightingNetwork):
    """The paper's weighting network: a second encoder + classifier trained jointly with ``λ·CE``.

    Its softmax is *not* detached, so the LCL term also trains it (as in the authors' code).
    It may be a different pretrained model than the main encoder (``weighting.model``).
    """

    name = "separate"
    cost = "2nd encoder + head in memory; +1 encoder forward/backward per step (~2x step time)"
    has_encoder = True
    detach = False

    def __init__(self, num_labels: int, classifier: EncoderClassifier):
        super().__init__(num_labels)
        self.classifier = classifier

    @classmethod
    def build(cls, cfg, num_labels, num_examples, make_classifier):
        return cls(num_labels, make_classifier())

    def forward(self, batch, main_logits, lam):
        ids = batch.get("w_input_ids", batch["input_ids"])
        mask = batch.get("w_attention_mask", batch["attention_mask"])
        logits, _ = self.classifier(ids, mask)
        probs = F.softmax(logits.float(), dim=-1)
        loss = lam * F.cross_entropy(logits.float(), batch["labels"]) if lam > 0 else None
        return WeightOutput(probs.detach() if self.detach else probs, loss)


@register
class SeparateDetached(Separate):
    """As ``separate`` but its probabilities are detached: it learns from its own CE only."""

    name = "separate_detached"
    cost = "as separate; no LCL gradient reaches the weighting encoder"
    detach = True


@register
class SelfWeighting(WeightingNetwork):
    """The main classifier's own detached softmax: no second encoder, free."""

    name = "self"
    cost = "free: reuses the main logits (detached)"

    def forward(self, batch, main_logits, lam):
        return WeightOutput(F.softmax(main_logits.detach().float(), dim=-1))


@register
class EMAWeighting(WeightingNetwork):
    """Per-example moving average of the main classifier's detached softmax, bias-corrected.

    Smooths the noisy single-step estimate of ``self``: row ``i`` keeps
    ``m_i = alpha * m_i + (1 - alpha) * softmax_i`` (updated only while training) and is weighted by
    ``m_i / (1 - alpha ** n_i)`` after its ``n_i``-th visit, as Adam corrects its moments. Without
    the correction a table started at 1/C stays near uniform until a row has been seen many times:
    in a one-epoch run, where no row is seen twice, ``ema`` would be ``uniform``. Corrected, a row's
    first visit gives its current softmax (``self``) and later visits average over epochs.
    The table and the visit counts are buffers, so checkpoints save and restore them.
    """

    name = "ema"
    cost = "free compute; an N_train x C float table in memory"

    def __init__(self, num_labels: int, num_examples: int, alpha: float):
        super().__init__(num_labels)
        self.alpha = alpha
        self.register_buffer("table", torch.zeros(num_examples, num_labels))
        self.register_buffer("visits", torch.zeros(num_examples, dtype=torch.long))

    @classmethod
    def build(cls, cfg, num_labels, num_examples, make_classifier):
        return cls(num_labels, num_examples, cfg.ema_alpha)

    def forward(self, batch, main_logits, lam):
        idx = batch["idx"]
        current = F.softmax(main_logits.detach().float(), dim=-1)
        if not self.training:
            return WeightOutput(current)
        self.table[idx] = self.alpha * self.table[idx] + (1 - self.alpha) * current
        self.visits[idx] += 1
        correction = 1.0 - self.alpha ** self.visits[idx].to(current.dtype)
        return WeightOutput(self.table[idx] / correction.clamp_min(1e-12).unsqueeze(-1))


@register
class Uniform(WeightingNetwork):
    """Every class weighted 1/C: LCL then equals (1/C)·SCL − (log C)/C (an ablation control)."""

    name = "uniform"
    cost = "free"

    def forward(self, batch, main_logits, lam):
        b = main_logits.shape[0]
        return WeightOutput(main_logits.new_full((b, self.num_labels), 1.0 / self.num_labels, dtype=torch.float32))


def build_weighting(cfg: WeightingConfig, num_labels: int, num_examples: int,
                    make_classifier: Callable[[], EncoderClassifier]) -> WeightingNetwork:
    """Instantiate the registered network ``cfg.name``."""
    return REGISTRY[cfg.name].build(cfg, num_labels, num_examples, make_classifier)
