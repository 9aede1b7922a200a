"""Tests for lcl_tune.core.losses against a slow, literal float64 reference of the two formulas."""

from __future__ import annotations

import math

import pytest
import torch

from lcl_tune.core.losses import label_aware_contrastive_loss, mixed_objective, supervised_contrastive_loss

D = 8  # feature width used throughout


# --------------------------------------------------------------------------------------------------
# Reference: plain Python floats, loops over i, p, a, following the formula literally
# --------------------------------------------------------------------------------------------------


def reference_loss(features: torch.Tensor, labels: torch.Tensor, class_probs: torch.Tensor | None, tau: float) -> float:
    """LCL (class_probs given) or SCL (class_probs None: every weight 1), in Python floats.

    l_i = -(w_{i,y_i} / |P(i)|) * sum_{p in P(i)} [s_ip - log sum_{a in A(i)} w_{i,y_a} exp(s_ia)],
    averaged over anchors with |P(i)| > 0; 0 when there is none. An anchor with w_{i,y_i} = 0 has
    l_i = 0 (the limit; also avoids 0 * log 0 when all its weights are 0) and still counts.
    """
    x = features.detach().double().tolist()
    y = labels.tolist()
    w = None if class_probs is None else class_probs.detach().double().tolist()
    m = len(x)

    z = []
    for row in x:
        norm = math.sqrt(sum(v * v for v in row))
        z.append([v / norm for v in row])

    def s(i: int, j: int) -> float:
        return sum(z[i][k] * z[j][k] for k in range(len(z[i]))) / tau

    def weight(i: int, a: int) -> float:
        return 1.0 if w is None else w[i][y[a]]

    losses = []
    for i in range(m):
        positives = [p for p in range(m) if p != i and y[p] == y[i]]
        if not positives:
            continue
        w_anchor = weight(i, i)
        if w_anchor == 0.0:
            losses.append(0.0)
            continue
        denom = 0.0
        for a in range(m):
            if a != i:
                denom += weight(i, a) * math.exp(s(i, a))
        total = 0.0
        for p in positives:
            total += s(i, p) - math.log(denom)
        losses.append(-w_anchor / len(positives) * total)
    return sum(losses) / len(losses) if losses else 0.0


# --------------------------------------------------------------------------------------------------
# Input builders
# --------------------------------------------------------------------------------------------------


def make_features(m: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(m, D, generator=g, dtype=torch.float64) * 3.0).to(dtype)


def make_labels(m: int, c: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1000)
    return torch.randint(0, c, (m,), generator=g)


def dirichlet_rows(m: int, c: int, seed: int, zero_frac: float = 0.0) -> torch.Tensor:
    """Non-uniform probability rows (Gamma(0.5) draws, normalised); optionally with exact zeros."""
    g = torch.Generator().manual_seed(seed + 2000)
    draws = torch.log(torch.rand(m, c, generator=g, dtype=torch.float64)) ** 2 + 1e-3  # heavy spread
    if zero_frac:
        zero = torch.rand(m, c, generator=g, dtype=torch.float64) < zero_frac
        zero[:, 0] = False  # keep every row normalisable
        draws = draws.masked_fill(zero, 0.0)
    return draws / draws.sum(dim=1, keepdim=True)


def lcl(features, labels, probs, tau=0.3):
    return label_aware_contrastive_loss(features, labels, probs, tau)


def scl(features, labels, tau=0.3):
    return supervised_contrastive_loss(features, labels, tau)


# --------------------------------------------------------------------------------------------------
# Agreement with the reference
# --------------------------------------------------------------------------------------------------

SEEDS = [0, 1, 2]
SIZES = [2, 5, 16]
CLASSES = [2, 4, 7]


@pytest.mark.parametrize("c", CLASSES)
@pytest.mark.parametrize("m", SIZES)
@pytest.mark.parametrize("seed", SEEDS)
def test_lcl_matches_reference_random(seed, m, c):
    f, y, w = make_features(m, seed), make_labels(m, c, seed), dirichlet_rows(m, c, seed)
    tau = [0.07, 0.3, 1.0][seed]
    got = label_aware_contrastive_loss(f, y, w, tau)
    assert got.dtype == torch.float64 and got.ndim == 0
    assert abs(got.item() - reference_loss(f, y, w, tau)) <= 1e-6


@pytest.mark.parametrize("c", CLASSES)
@pytest.mark.parametrize("m", SIZES)
@pytest.mark.parametrize("seed", SEEDS)
def test_scl_matches_reference_random(seed, m, c):
    f, y = make_features(m, seed), make_labels(m, c, seed)
    tau = [0.07, 0.3, 1.0][seed]
    got = supervised_contrastive_loss(f, y, tau)
    assert got.dtype == torch.float64 and got.ndim == 0
    assert abs(got.item() - reference_loss(f, y, None, tau)) <= 1e-6


SPECIAL_LABELS = {
    # one pair shares a class, the rest are singletons (anchors without positives)
    "singletons": [0, 1, 2, 3, 0, 4, 5],
    "all_one_label": [3] * 6,
    "two_pairs_and_singletons": [6, 6, 1, 2, 2, 5, 0],
}


@pytest.mark.parametrize("name", sorted(SPECIAL_LABELS))
@pytest.mark.parametrize("seed", SEEDS)
def test_special_batches_match_reference(name, seed):
    y = torch.tensor(SPECIAL_LABELS[name])
    m, c = len(y), 7
    f, w = make_features(m, seed), dirichlet_rows(m, c, seed)
    assert abs(lcl(f, y, w).item() - reference_loss(f, y, w, 0.3)) <= 1e-6
    assert abs(scl(f, y).item() - reference_loss(f, y, None, 0.3)) <= 1e-6


@pytest.mark.parametrize("seed", SEEDS)
def test_singletons_do_not_count_in_the_mean(seed):
    # The only positive pair is (0, 1): the loss is the mean of exactly those two anchors' terms
    # (the singletons 2..4 still act as negatives in both denominators).
    y = torch.tensor([0, 0, 1, 2, 3])
    f = make_features(5, seed)
    ref = reference_loss(f, y, None, 0.3)
    z = torch.nn.functional.normalize(f, dim=1)
    s = z @ z.T / 0.3
    terms = [torch.logsumexp(torch.cat([s[i, :i], s[i, i + 1 :]]), 0) - s[i, 1 - i] for i in (0, 1)]
    assert scl(f, y).item() == pytest.approx(ref, abs=1e-9)
    assert scl(f, y).item() == pytest.approx(((terms[0] + terms[1]) / 2).item(), abs=1e-9)


@pytest.mark.parametrize("m", [1, 2, 5, 7])
def test_no_positives_returns_attached_exact_zero(m):
    f = make_features(m, 0).requires_grad_()
    w = dirichlet_rows(m, 7, 0).requires_grad_()
    y = torch.arange(m)  # every label distinct
    for loss, leaves in ((lcl(f, y, w), (f, w)), (scl(f, y), (f,))):
        assert loss.item() == 0.0
        assert loss.requires_grad
        f.grad = w.grad = None
        loss.backward()
        for leaf in leaves:
            assert leaf.grad is not None and (leaf.grad == 0).all()


@pytest.mark.parametrize("m,c", [(5, 4), (16, 7), (16, 2)])
@pytest.mark.parametrize("seed", SEEDS)
def test_weights_with_exact_zeros(seed, m, c):
    f = make_features(m, seed).requires_grad_()
    y = make_labels(m, c, seed)
    w = dirichlet_rows(m, c, seed, zero_frac=0.4)
    # force an anchor whose own-class weight is 0, and a row whose weights on every class present
    # in the batch are 0 (all its mass on a class absent from the batch): both must give l_i = 0
    y[0] = y[1] = 1
    w[0] = 0.0
    w[0, 0] = 1.0
    y[y == 0] = 1
    w[2] = 0.0
    w[2, 0] = 1.0
    assert (w == 0).any()
    w.requires_grad_()
    got = lcl(f, y, w)
    assert abs(got.item() - reference_loss(f, y, w, 0.3)) <= 1e-6
    got.backward()
    assert torch.isfinite(f.grad).all() and torch.isfinite(w.grad).all()
    # the zero prefactor still gets its exact gradient (-mean_P log p_ip, nonzero)
    assert w.grad[0, 1] != 0


def test_gradcheck_lcl_features_with_zero_weights():
    # With class_probs fixed (zeros included) LCL is smooth in the features: gradcheck applies.
    m, c = 6, 3
    f = make_features(m, 3).requires_grad_()
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    w = dirichlet_rows(m, c, 3, zero_frac=0.5)
    w[1, 0] = 0.0  # anchor 1 has w_{1,y_1} = 0
    assert torch.autograd.gradcheck(lambda x: lcl(x, y, w), (f,))


# --------------------------------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("labels", [[0, 0, 1, 1, 2, 0], [1, 1, 1, 1, 1, 1], [0, 1, 2, 0, 3, 4]])
def test_gradcheck_lcl_features_and_class_probs(labels):
    y = torch.tensor(labels)
    m, c = len(y), 5
    f = make_features(m, 7).requires_grad_()
    w = dirichlet_rows(m, c, 7).requires_grad_()  # strictly positive: finite differences stay valid
    assert torch.autograd.gradcheck(lambda x, p: lcl(x, y, p, 0.2), (f, w))


@pytest.mark.parametrize("labels", [[0, 0, 1, 1, 2, 0], [1, 1, 1, 1, 1, 1], [0, 1, 2, 0, 3, 4]])
def test_gradcheck_scl_features(labels):
    y = torch.tensor(labels)
    f = make_features(len(y), 8).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: scl(x, y, 0.2), (f,))


def test_gradients_flow_into_class_probs_unless_detached():
    f, y = make_features(8, 0), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    w = dirichlet_rows(8, 4, 0).requires_grad_()
    lcl(f, y, w).backward()
    assert w.grad is not None and w.grad.abs().sum() > 0
    assert not lcl(f, y, w.detach()).requires_grad


# --------------------------------------------------------------------------------------------------
# Identities and invariances
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("c", CLASSES)
@pytest.mark.parametrize("m", [5, 16])
@pytest.mark.parametrize("seed", SEEDS)
def test_uniform_weights_identity(seed, m, c):
    f, y = make_features(m, seed), make_labels(m, c, seed)
    y[1] = y[0]  # at least one positive, else both sides are 0 and the identity does not hold
    uniform = torch.full((m, c), 1.0 / c, dtype=torch.float64)
    expected = scl(f, y) / c - math.log(c) / c
    assert lcl(f, y, uniform).item() == pytest.approx(expected.item(), abs=1e-12)


@pytest.mark.parametrize("scale", [1e-3, 0.5, 7.0, 1e3])
def test_invariant_to_positive_feature_scale(scale):
    f, y, w = make_features(9, 4), make_labels(9, 3, 4), dirichlet_rows(9, 3, 4)
    assert lcl(f * scale, y, w).item() == pytest.approx(lcl(f, y, w).item(), abs=1e-12)
    assert scl(f * scale, y).item() == pytest.approx(scl(f, y).item(), abs=1e-12)


def test_invariant_to_batch_permutation():
    f, y, w = make_features(12, 5), make_labels(12, 4, 5), dirichlet_rows(12, 4, 5)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    assert lcl(f[perm], y[perm], w[perm]).item() == pytest.approx(lcl(f, y, w).item(), abs=1e-12)
    assert scl(f[perm], y[perm]).item() == pytest.approx(scl(f, y).item(), abs=1e-12)


def test_lcl_weights_change_the_loss():
    # guard against weights being silently ignored: a non-uniform w differs from SCL's all-ones
    f, y, w = make_features(8, 6), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]), dirichlet_rows(8, 4, 6)
    ones = torch.ones(8, 4, dtype=torch.float64)
    assert lcl(f, y, ones).item() == pytest.approx(scl(f, y).item(), abs=1e-12)
    assert abs(lcl(f, y, w).item() - scl(f, y).item()) > 1e-3


# --------------------------------------------------------------------------------------------------
# Precision: float32, bf16 autocast, extreme temperatures and weights
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tau", [0.05, 0.5])
@pytest.mark.parametrize("seed", SEEDS)
def test_float32_matches_float64(seed, tau):
    f, y, w = make_features(16, seed), make_labels(16, 4, seed), dirichlet_rows(16, 4, seed, zero_frac=0.2)
    f32, w32 = f.float(), w.float()
    got = lcl(f32, y, w32, tau)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(lcl(f, y, w, tau).item(), abs=1e-4, rel=1e-5)
    got = scl(f32, y, tau)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(scl(f, y, tau).item(), abs=1e-4, rel=1e-5)


def test_autocast_is_disabled_inside():
    # float32 inputs under bf16 autocast must give the float32 result (a bf16 matmul would be ~1e-2 off)
    f, y, w = make_features(16, 0, torch.float32), make_labels(16, 4, 0), dirichlet_rows(16, 4, 0).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got_lcl, got_scl = lcl(f, y, w, 0.05), scl(f, y, 0.05)
    assert got_lcl.dtype == got_scl.dtype == torch.float32
    assert got_lcl.item() == pytest.approx(lcl(f, y, w, 0.05).item(), abs=1e-6)
    assert got_scl.item() == pytest.approx(scl(f, y, 0.05).item(), abs=1e-6)


def test_bf16_autocast_end_to_end():
    # features coming out of a layer run under autocast are bf16; the loss must upcast them
    g = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(12, D)
    x = torch.randn(16, 12, generator=g)
    y = make_labels(16, 4, 0)
    logits = torch.randn(16, 4, generator=g, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feats = layer(x)
        probs = logits.softmax(dim=1).to(torch.bfloat16)
        assert feats.dtype == torch.bfloat16
        got_lcl, got_scl = lcl(feats, y, probs, 0.1), scl(feats, y, 0.1)
    ref_lcl, ref_scl = lcl(layer(x), y, logits.softmax(dim=1), 0.1), scl(layer(x), y, 0.1)
    for got, ref in ((got_lcl, ref_lcl), (got_scl, ref_scl)):
        assert got.dtype == torch.float32 and torch.isfinite(got)
        assert got.item() == pytest.approx(ref.item(), rel=3e-2, abs=3e-2)
    (got_lcl + got_scl).backward()
    assert layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extreme_temperature_and_tiny_weights_stay_finite(dtype):
    # tau = 0.005 puts similarities at +-200 (exp overflows float32 without log-sum-exp) and
    # softmax weights of ~1e-40 on the batch's classes (all mass on absent class 3) underflow
    f = make_features(10, 1, dtype).requires_grad_()
    y = torch.tensor([0, 0, 1, 1, 2, 2, 0, 1, 2, 0])
    logits = torch.tensor([-95.0, -90.0, -92.0, 0.0], dtype=dtype).repeat(10, 1)
    logits[5:] = torch.randn(5, 4, generator=torch.Generator().manual_seed(1), dtype=dtype)
    logits.requires_grad_()
    loss = scl(f, y, 0.005)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(f.grad).all()
    f.grad = None
    probs = logits.softmax(dim=1)
    loss = lcl(f, y, probs, 0.005)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(f.grad).all() and torch.isfinite(logits.grad).all()
    if dtype == torch.float64:
        assert abs(loss.item() - reference_loss(f, y, probs, 0.005)) <= 1e-6 * max(1.0, abs(loss.item()))


# --------------------------------------------------------------------------------------------------
# mixed_objective
# --------------------------------------------------------------------------------------------------


def test_mixed_objective():
    ce, con = torch.tensor(2.0, requires_grad=True), torch.tensor(5.0)
    assert mixed_objective(ce, con, 0.25).item() == pytest.approx(0.25 * 2.0 + 0.75 * 5.0)
    assert mixed_objective(ce, con, 1.0).item() == pytest.approx(2.0)
    assert mixed_objective(ce, None, 0.25) is ce  # CE-only baseline: full CE, lam ignored
    with pytest.raises(ValueError, match="lam"):
        mixed_objective(ce, con, 1.5)


# --------------------------------------------------------------------------------------------------
# Bad inputs
# --------------------------------------------------------------------------------------------------

F4 = torch.randn(4, D)
Y4 = torch.tensor([0, 0, 1, 1])
W4 = torch.full((4, 3), 1 / 3)

BAD_LCL = {
    "features_1d": (torch.randn(4), Y4, W4, 0.1, "features"),
    "features_int": (torch.ones(4, D, dtype=torch.long), Y4, W4, 0.1, "floating"),
    "labels_wrong_length": (F4, torch.tensor([0, 0, 1]), W4, 0.1, "labels"),
    "labels_2d": (F4, Y4[:, None], W4, 0.1, "labels"),
    "labels_float": (F4, Y4.float(), W4, 0.1, "integer"),
    "probs_wrong_rows": (F4, Y4, torch.full((5, 3), 1 / 3), 0.1, "class_probs"),
    "probs_1d": (F4, Y4, torch.full((4,), 1 / 3), 0.1, "class_probs"),
    "probs_no_classes": (F4, Y4, torch.empty(4, 0), 0.1, "C >= 1"),
    "label_too_big": (F4, torch.tensor([0, 0, 3, 1]), W4, 0.1, r"\[0, 3\)"),
    "label_negative": (F4, torch.tensor([0, -1, 1, 1]), W4, 0.1, r"\[0, 3\)"),
    "tau_zero": (F4, Y4, W4, 0.0, "temperature"),
    "tau_negative": (F4, Y4, W4, -0.1, "temperature"),
    "tau_nan": (F4, Y4, W4, float("nan"), "temperature"),
    "tau_inf": (F4, Y4, W4, float("inf"), "temperature"),
}


@pytest.mark.parametrize("case", sorted(BAD_LCL))
def test_lcl_bad_inputs_raise(case):
    f, y, w, tau, match = BAD_LCL[case]
    with pytest.raises(ValueError, match=match):
        label_aware_contrastive_loss(f, y, w, tau)


@pytest.mark.parametrize("case", sorted(k for k in BAD_LCL if "probs" not in k and "label_" not in k))
def test_scl_bad_inputs_raise(case):
    f, y, _, tau, match = BAD_LCL[case]
    with pytest.raises(ValueError, match=match):
        supervised_contrastive_loss(f, y, tau)
