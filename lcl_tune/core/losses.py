"""Contrastive objectives: label-aware (LCL) and supervised (SCL) contrastive losses.

LCL is the loss of Suresh & Ong (EMNLP 2021), "Not All Negatives are Equal: Label-Aware Contrastive
Loss for Fine-grained Text Classification", written the way the authors' code computes it. With
``z`` the L2-normalised features, ``s_ij = z_i . z_j / tau``, ``A(i) = {j != i}``,
``P(i) = {p in A(i) : y_p = y_i}`` and ``w_i`` the class-probability vector of row ``i`` (from a
"weighting network", see :mod:`lcl_tune.core.weighting`)::

    l_i = -(w_{i,y_i} / |P(i)|) * sum_{p in P(i)} [ s_ip - log sum_{a in A(i)} w_{i,y_a} exp(s_ia) ]

    loss = mean of l_i over the anchors i with |P(i)| > 0

Negatives ``a`` from classes the anchor is easily confused with (large ``w_{i,y_a}``) weigh more
in the denominator, and anchors the weighting network already finds easy (large ``w_{i,y_i}``)
weigh more overall. SCL (Gunel et al., ICLR 2021) is the same formula with every weight 1.

Conventions shared by both losses:

* Anchors without a positive contribute nothing and are not counted in the mean (as in
  SupContrast). A batch with no positive at all returns an exact 0 that is still attached to the
  graph (like ``features.sum() * 0``), so ``loss.backward()`` works and yields zero gradients for
  ``features`` and ``class_probs``, never NaN.
* An anchor with ``w_{i,y_i} = 0`` has ``l_i = 0`` (the limit as the weight goes to 0) and *is*
  counted in the mean, because it does have positives.
* Gradients flow into ``class_probs`` (the paper trains the weighting network through them);
  callers that want fixed weights pass ``class_probs.detach()``.
* Half-precision inputs, or a call under ``torch.autocast``, are computed in float32 with autocast
  disabled: ``exp``/``logsumexp`` over ``1/tau``-scaled similarities lose too much in bfloat16.
  float64 inputs stay float64.
* The rows of ``class_probs`` are *not* required to sum to 1 (nothing in the formula needs it, and
  checking it would cost a device sync); only non-negativity matters for the log.

Zero weights. The denominator is computed as ``logsumexp_a(s_ia + log w_{i,y_a})`` over ``A(i)``,
with ``log w`` taken of ``w.clamp_min(tiny)`` (``tiny = torch.finfo(dtype).tiny``). For ``w >= tiny``
this is exact; a ``w = 0`` entry adds ``tiny * exp(s_ia)``, ~1e-308 relative in float64 and ~1e-38
in float32, far below rounding. Unlike masking zeros to ``-inf``, every term stays finite, so a row
whose weights are all zero cannot turn into ``logsumexp(-inf, ...) = -inf`` and a NaN gradient.
The price: an entry with ``w < tiny`` receives a zero gradient through the denominator instead of
the one-sided derivative ``exp(s_ia) / sum``. That is harmless for softmax-produced weights: a
probability that has underflowed to 0 has a zero softmax Jacobian anyway. (The prefactor
``w_{i,y_i}`` is used unclamped, so its own partial derivative stays exact even at 0.)

Uniform weights. With ``w = 1/C`` everywhere, ``LCL = SCL / C - log(C) / C`` (for a batch with at
least one positive). So comparing LCL with SCL also changes the effective weight of the
contrastive term (and adds a constant): a fair ablation should keep that in mind when tuning
``lam`` or the learning rate.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["label_aware_contrastive_loss", "supervised_contrastive_loss", "mixed_objective"]


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def label_aware_contrastive_loss(features: Tensor, labels: Tensor, class_probs: Tensor, temperature: float,
                                 *, check_labels: bool = True) -> Tensor:
    """Label-aware contrastive loss (LCL) of Suresh & Ong (2021); see the module docstring.

    Args:
        features: [M, D] embeddings; L2-normalised here, so their scale does not matter.
        labels: [M] integer class ids in ``[0, C)``.
        class_probs: [M, C] non-negative weights, normally probabilities (rows summing to 1) that
            row ``i`` belongs to class ``c``. Not detached: gradients reach the weighting network.
        temperature: tau > 0.
        check_labels: check that every label lies in ``[0, C)``. That reads a value back from the
            device (a host sync on a GPU), so the training loop, whose labels were checked once
            when the data were prepared (``PreparedData``), passes False.

    Returns:
        A scalar: float64 for float64 inputs, float32 otherwise (also under autocast).

    Raises:
        ValueError: on shape mismatches, non-floating features/weights, non-integer labels,
            labels outside ``[0, C)`` or ``temperature <= 0``.
    """
    _check_features_labels(features, labels)
    _check_class_probs(class_probs, labels, features.shape[0], check_labels)
    tau = _check_temperature(temperature)
    if features.shape[0] < 2:  # no pair at all: nothing to contrast
        return _attached_zero(features, class_probs)

    dtype = _compute_dtype(features, class_probs)
    with _autocast_disabled(features.device.type):
        labels = labels.long()
        sim = _similarities(features.to(dtype), tau)  # [M, M]
        pair_w = class_probs.to(dtype)[:, labels]  # [M, M]: pair_w[i, a] = w_{i, y_a}
        anchor_w = pair_w.diagonal()  # [M]: w_{i, y_i}, unclamped so its gradient is exact
        log_pair_w = pair_w.clamp_min(torch.finfo(dtype).tiny).log()  # finite even where w = 0
        return _contrastive_mean(sim, labels, log_pair_w, anchor_w)


def supervised_contrastive_loss(features: Tensor, labels: Tensor, temperature: float) -> Tensor:
    """Supervised contrastive loss (SCL) of Gunel et al. (2021): LCL with every weight equal to 1.

    Args:
        features: [M, D] embeddings; L2-normalised here.
        labels: [M] integer class ids (any integers; only equality matters).
        temperature: tau > 0.

    Returns:
        A scalar: float64 for float64 inputs, float32 otherwise (also under autocast).

    Raises:
        ValueError: on shape mismatches, non-floating features, non-integer labels or
            ``temperature <= 0``.
    """
    _check_features_labels(features, labels)
    tau = _check_temperature(temperature)
    if features.shape[0] < 2:
        return _attached_zero(features)

    dtype = _compute_dtype(features)
    with _autocast_disabled(features.device.type):
        sim = _similarities(features.to(dtype), tau)
        return _contrastive_mean(sim, labels, log_pair_w=None, anchor_w=None)


def mixed_objective(ce: Tensor, contrastive: Tensor | None, lam: float) -> Tensor:
    """``lam * ce + (1 - lam) * contrastive``, the fine-tuning objective of SCL and LCL.

    When ``contrastive`` is None (the cross-entropy-only baseline) ``ce`` is returned as is, not
    ``lam * ce``: the baseline should train at full CE weight instead of having ``lam`` silently act
    as a learning-rate multiplier on it.
    """
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam!r}")
    if contrastive is None:
        return ce
    return lam * ce + (1.0 - lam) * contrastive


# --------------------------------------------------------------------------------------------------
# Shared computation
# --------------------------------------------------------------------------------------------------


def _similarities(features: Tensor, tau: float) -> Tensor:
    """[M, D] -> [M, M] cosine similarities divided by tau (so each entry lies in [-1/tau, 1/tau])."""
    z = F.normalize(features, dim=1)
    return z @ z.T / tau


def _contrastive_mean(sim: Tensor, labels: Tensor, log_pair_w: Tensor | None, anchor_w: Tensor | None) -> Tensor:
    """Mean over anchors with a positive of ``-(anchor_w / |P|) sum_P [s_ip - logsumexp_A(s + log w)]``.

    sim [M, M], labels [M], log_pair_w [M, M] or None (all weights 1), anchor_w [M] or None, M >= 2.

    Every intermediate is finite for M >= 2 (each row keeps at least one non-self, finite entry in
    the logsumexp), which is what lets anchors without positives be dropped by ``masked_fill``
    instead of a data-dependent branch: no host sync, and a no-positive batch yields an exact,
    graph-attached 0.
    """
    m = sim.shape[0]
    self_mask = torch.eye(m, dtype=torch.bool, device=sim.device)
    pos_mask = (labels[:, None] == labels[None, :]) & ~self_mask  # [M, M]

    logits = sim if log_pair_w is None else sim + log_pair_w
    log_denom = logits.masked_fill(self_mask, float("-inf")).logsumexp(dim=1)  # [M], over A(i)

    n_pos = pos_mask.sum(dim=1)  # [M]
    # sum_P [s_ip - log_denom_i] / |P| = mean_P s_ip - log_denom_i, split so no [M, M] term is needed.
    mean_pos_sim = sim.masked_fill(~pos_mask, 0.0).sum(dim=1) / n_pos.clamp_min(1)
    per_anchor = log_denom - mean_pos_sim  # [M], = -(1/|P|) sum_P log p_ip
    if anchor_w is not None:
        per_anchor = anchor_w * per_anchor

    has_pos = n_pos > 0
    return per_anchor.masked_fill(~has_pos, 0.0).sum() / has_pos.sum().clamp_min(1)


# --------------------------------------------------------------------------------------------------
# Dtypes, autocast, degenerate batches
# --------------------------------------------------------------------------------------------------


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """The promoted floating dtype of the inputs, raised to at least float32 (bf16/fp16 -> float32)."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return torch.promote_types(dtype, torch.float32)


def _autocast_disabled(device_type: str) -> contextlib.AbstractContextManager:
    """Turn autocast off for the loss: under it, the similarity matmul would run in bf16/fp16."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def _attached_zero(*tensors: Tensor) -> Tensor:
    """A 0 connected to every input, so backward runs and gives zero (not None) gradients."""
    dtype = _compute_dtype(*tensors)
    total = tensors[0].new_zeros((), dtype=dtype)
    for t in tensors:
        total = total + t.to(dtype).sum()
    return total * 0.0


# --------------------------------------------------------------------------------------------------
# Validation (shape/dtype checks are free; the label range check costs one device sync: optional)
# --------------------------------------------------------------------------------------------------


def _check_features_labels(features: Tensor, labels: Tensor) -> None:
    if not isinstance(features, Tensor) or features.ndim != 2:
        raise ValueError(f"features must be a [M, D] tensor, got shape {_shape(features)}")
    if not features.is_floating_point():
        raise ValueError(f"features must be floating point, got {features.dtype}")
    if not isinstance(labels, Tensor) or labels.ndim != 1 or labels.shape[0] != features.shape[0]:
        raise ValueError(
            f"labels must be a [M] tensor with M = features.shape[0] = {features.shape[0]}, got shape {_shape(labels)}"
        )
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")


def _check_class_probs(class_probs: Tensor, labels: Tensor, m: int, check_labels: bool = True) -> None:
    if not isinstance(class_probs, Tensor) or class_probs.ndim != 2 or class_probs.shape[0] != m:
        raise ValueError(f"class_probs must be a [M, C] tensor with M = {m}, got shape {_shape(class_probs)}")
    if not class_probs.is_floating_point():
        raise ValueError(f"class_probs must be floating point, got {class_probs.dtype}")
    c = class_probs.shape[1]
    if c == 0:
        raise ValueError("class_probs must have at least one class column (C >= 1)")
    if check_labels and labels.numel() and bool(((labels < 0) | (labels >= c)).any()):
        raise ValueError(
            f"labels must lie in [0, C) = [0, {c}) to index class_probs, got values in "
            f"[{int(labels.min())}, {int(labels.max())}]"
        )


def _check_temperature(temperature: float) -> float:
    tau = float(temperature)
    if not (tau > 0.0 and math.isfinite(tau)):  # also rejects NaN
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return tau


def _shape(x: object) -> str:
    return str(tuple(x.shape)) if isinstance(x, Tensor) else type(x).__name__
