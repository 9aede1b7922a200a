"""The training loop on tiny random-initialised encoders (seconds each), on cued texts the tests
write and, where real text adds something, on a real tweet sample."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lcl_tune.schema import trial as C
from lcl_tune.schema.trial import WEIGHTING_ENCODERS, WEIGHTING_NAMES
from lcl_tune.core.engine import Trainer, linear_schedule
from lcl_tune.core.metrics import classification_metrics
from lcl_tune.core.weighting import REGISTRY


def test_registry_matches_config_names():
    assert tuple(REGISTRY)[:len(WEIGHTING_NAMES)] == WEIGHTING_NAMES
    assert {name: cls.has_encoder for name, cls in REGISTRY.items()} == WEIGHTING_ENCODERS


@pytest.fixture()
def sharpened_weighting():
    """A weighting network registered from outside the package, removed again afterwards."""
    from lcl_tune.core.weighting import WeightingNetwork, WeightOutput, register

    @register
    class Sharpened(WeightingNetwork):
        """The main classifier's detached softmax at temperature ``1 - ema_alpha`` (a made-up choice)."""

        name, cost = "sharpened", "free"

        def __init__(self, num_labels: int, temperature: float):
            super().__init__(num_labels)
            self.temperature = temperature

        @classmethod
        def build(cls, cfg, num_labels, num_examples, make_classifier):
            return cls(num_labels, 1.0 - cfg.ema_alpha)

        def forward(self, batch, main_logits, lam):
            return WeightOutput(torch.softmax(main_logits.detach().float() / self.temperature, dim=-1))

    yield Sharpened
    REGISTRY.pop("sharpened")
    WEIGHTING_ENCODERS.pop("sharpened")


def test_a_registered_weighting_network_is_validated_built_and_trained(tiny_cfg, sharpened_weighting):
    """The registry is the extension point: no special case per name in the schema or the engine."""
    trainer = Trainer(tiny_cfg(weighting__name="sharpened", weighting__ema_alpha=0.5, loss__lam=0.5), progress=False)
    assert isinstance(trainer.weighting, sharpened_weighting) and trainer.weighting.temperature == 0.5
    parts = trainer.train_step(np.arange(16))
    assert math.isfinite(parts["loss"]) and parts["contrastive"] != 0.0
    with pytest.raises(C.ConfigError, match="did you mean 'sharpened'"):
        tiny_cfg(weighting__name="sharpend")


@pytest.fixture(params=["cued", "real"])
def either_cfg(request):
    """Both data sources: the cued texts every checkout has, and real tweets (shared datasets)."""
    return request.getfixturevalue({"cued": "tiny_cfg", "real": "real_tiny_cfg"}[request.param])


def test_training_lowers_the_training_loss(either_cfg):
    """64 rows seen for 20 epochs: the model fits them. Cross-entropy falls well below its
    start; the total falls less, because LCL's prefactor (the weighting's probability of the
    anchor's own class, here the model's own softmax) grows as the model grows confident."""
    trainer = Trainer(either_cfg(data__max_train_samples=64, train__max_steps=80, optim__lr=3e-3), progress=False)
    rows = [np.arange(i * 16, (i + 1) * 16) for i in range(4)]
    parts = [trainer.train_step(rows[s % 4]) for s in range(80)]
    ce = [p["ce"] for p in parts]
    total = [p["loss"] for p in parts]
    assert np.mean(ce[-4:]) < 0.5 * np.mean(ce[:4]), (ce[:4], ce[-4:])
    assert np.mean(total[-4:]) < 0.85 * np.mean(total[:4]), (total[:4], total[-4:])


def _grad_norm(module: torch.nn.Module) -> float:
    grads = [p.grad.norm().item() for p in module.parameters() if p.grad is not None]
    return float(sum(grads))


@pytest.mark.parametrize("name", WEIGHTING_NAMES)
@pytest.mark.parametrize("lam", [0.0, 0.5])
def test_every_weighting_network_trains_and_gets_the_right_gradients(tiny_cfg, name, lam):
    trainer = Trainer(tiny_cfg(weighting__name=name, loss__lam=lam), progress=False)
    parts = trainer.train_step(np.arange(16))
    assert math.isfinite(parts["loss"]) and "contrastive" in parts
    assert _grad_norm(trainer.model.encoder) > 0  # the main encoder always learns
    w = trainer.weighting
    assert w is not None and w.name == name
    if name == "separate":  # joint λ·CE and, through its non-detached probabilities, the LCL term
        assert _grad_norm(w.classifier.encoder) > 0
    elif name == "separate_detached":  # only its own λ·CE: no gradient at all when λ = 0
        assert (_grad_norm(w.classifier.encoder) > 0) == (lam > 0)
    else:
        assert not any(p.requires_grad for p in w.parameters())
    if name == "ema":
        assert (w.visits[:16] == 1).all() and (w.visits[16:] == 0).all()  # the batch's rows, once
        assert torch.allclose(w.table[:16].sum(1), torch.full((16,), 1 - w.alpha))  # uncorrected moments
        assert (w.table[16:] == 0).all()


def test_separate_lcl_gradient_reaches_weighting_only_when_not_detached(tiny_cfg):
    """λ = 0 isolates the LCL term: it trains `separate`'s encoder, never `separate_detached`'s."""
    for name, expect in (("separate", True), ("separate_detached", False)):
        trainer = Trainer(tiny_cfg(weighting__name=name, loss__lam=0.0), progress=False)
        trainer.train_step(np.arange(16))
        assert (_grad_norm(trainer.weighting.classifier) > 0) is expect


@pytest.mark.parametrize("loss,lam", [("ce", 0.5), ("scl", 0.5), ("lcl", 1.0)])
def test_no_weighting_network_when_it_cannot_matter(tiny_cfg, loss, lam):
    trainer = Trainer(tiny_cfg(loss__name=loss, loss__lam=lam, weighting__name="separate"), progress=False)
    assert trainer.weighting is None
    parts = trainer.train_step(np.arange(16))
    assert ("contrastive" in parts) == (loss == "scl")


def test_reports_carry_all_metrics_and_best_so_far(tiny_cfg):
    reports = list(Trainer(tiny_cfg(), progress=False).run())
    assert [r["step"] for r in reports] == [3, 6] and [r["period"] for r in reports] == [1, 2]
    last = reports[-1]
    for key in ("train/loss", "train/ce", "train/contrastive", "dev/loss", "dev/accuracy", "dev/macro_f1",
                "dev/weighted_f1", "best/dev/weighted_f1", "lr"):
        assert math.isfinite(last[key]), key
    assert last["best/dev/weighted_f1"] == max(r["dev/weighted_f1"] for r in reports)
    details = last["details"]
    assert details["label_names"] == ["anger", "joy", "optimism", "sadness"]
    assert set(details["dev/per_class_f1"]) == set(details["label_names"])
    cm = np.array(details["dev/confusion"])
    assert cm.shape == (4, 4) and cm.sum() == 48
    assert last["finished"] is True and reports[0]["finished"] is False


def test_same_seed_same_metrics_and_other_seed_differs(either_cfg):
    a = Trainer(either_cfg(), progress=False).fit()["history"]
    b = Trainer(either_cfg(), progress=False).fit()["history"]
    c = Trainer(either_cfg(seed=4), progress=False).fit()["history"]
    drop = ("time/train_s", "time/samples_per_s")
    strip = lambda h: [{k: v for k, v in r.items() if k not in drop} for r in h]  # noqa: E731
    assert strip(a) == strip(b)
    assert strip(a) != strip(c)


def test_checkpoint_resume_continues_exactly(tiny_cfg, tmp_path):
    cfg = tiny_cfg(weighting__name="ema")
    straight = Trainer(cfg, progress=False).fit()["history"]

    first = Trainer(cfg, progress=False)
    run = first.run()
    next(run)  # stop after the first evaluation period (step 3)
    first.save(tmp_path / "ckpt.pt")
    second = Trainer(cfg, progress=False)
    second.restore(tmp_path / "ckpt.pt")
    assert second.step == 3
    resumed = second.fit()["history"]
    key = lambda h: [(r["step"], r["train/loss"], r["dev/weighted_f1"]) for r in h]  # noqa: E731
    assert key(resumed) == key(straight)


def test_same_seed_gives_same_initial_main_model_in_every_arm(tiny_cfg):
    """Pairing: arms that differ in loss/weighting start from identical main weights."""
    heads = [Trainer(tiny_cfg(loss__name=loss, weighting__name=w), progress=False).model.state_dict()
             for loss, w in (("ce", "self"), ("lcl", "separate"), ("lcl", "ema"))]
    for other in heads[1:]:
        assert all(torch.equal(heads[0][k], other[k]) for k in heads[0])
    assert torch.equal(heads[0]["hf.classifier.weight"], heads[1]["hf.classifier.weight"])
    other_seed = Trainer(tiny_cfg(seed=9), progress=False).model.state_dict()
    assert not torch.equal(heads[0]["hf.classifier.weight"], other_seed["hf.classifier.weight"])


def test_same_seed_gives_same_batches_in_every_arm(tiny_cfg):
    """Pairing: arms see the same rows in the same order (over epochs), whatever they train."""
    def batches(**flat) -> list[list[int]]:
        trainer = Trainer(tiny_cfg(train__max_steps=14, train__eval_every=100, **flat), progress=False)
        seen: list[list[int]] = []
        step = trainer._step
        trainer._step = lambda rows: (seen.append(rows.tolist()), step(rows))[1]
        trainer.fit()
        return seen

    ce = batches(loss__name="ce")
    lcl = batches(loss__name="lcl", weighting__name="separate")
    assert ce == lcl and len(ce) == 14  # 96 rows / 16 = 6 steps an epoch: crosses two epoch boundaries
    assert ce[:6] != ce[6:12]  # reshuffled each epoch
    assert batches(loss__name="ce", seed=5) != ce


def test_length_buckets_cut_padding_keep_every_row_and_pair_by_seed(tiny_cfg):
    trainer = Trainer(tiny_cfg(train__length_buckets=True, data__max_train_samples=96), progress=False)
    buckets = trainer.epoch_batches(0)
    assert sorted(np.concatenate(buckets).tolist()) == list(range(96))  # every row once
    assert [b.tolist() for b in buckets] == [b.tolist() for b in trainer.epoch_batches(0)]
    assert [b.tolist() for b in buckets] != [b.tolist() for b in trainer.epoch_batches(1)]
    lengths = trainer.data.train.lengths
    plain = Trainer(tiny_cfg(data__max_train_samples=96), progress=False).epoch_batches(0)
    padded = lambda bs: sum(len(b) * lengths[b].max() for b in bs)  # noqa: E731 - tokens incl. padding
    assert padded(buckets) < padded(plain)
    assert math.isfinite(trainer.train_step(buckets[0])["loss"])


def test_fixed_padding_and_fused_optimizer_train(tiny_cfg):
    trainer = Trainer(tiny_cfg(train__pad_to=32, optim__fused=True), progress=False)
    batch = trainer._batch(trainer.data.train, np.arange(4), None)
    assert batch["input_ids"].shape == (4, 32)
    assert math.isfinite(trainer.train_step(np.arange(16))["loss"])


def test_bf16_on_cpu_warns_and_trains_in_fp32(tiny_cfg, caplog):
    with caplog.at_level("WARNING", logger="lcl_tune"):
        trainer = Trainer(tiny_cfg(train__precision="bf16"), progress=False)
    assert "train.precision=bf16 runs on CUDA only" in caplog.text
    assert not trainer.use_bf16
    assert math.isfinite(trainer.train_step(np.arange(16))["loss"])


def test_test_split_only_when_asked(tiny_cfg):
    assert "test" not in Trainer(tiny_cfg(train__max_steps=1), progress=False).fit()
    summary = Trainer(tiny_cfg(train__max_steps=1, train__eval_test=True,
                               data__max_test_samples=20), progress=False).fit()
    assert sum(map(sum, summary["test"]["confusion"])) == 20


def test_linear_schedule_warms_up_then_decays():
    f = linear_schedule(warmup_steps=4, total_steps=10)
    values = [f(s) for s in range(11)]
    assert values[:4] == [0.25, 0.5, 0.75, 1.0]
    assert values[4] == 1.0 and values[10] == 0.0
    assert all(a >= b for a, b in zip(values[4:], values[5:]))


def test_classification_metrics_by_hand():
    labels = np.array([0, 0, 1, 1, 2])
    preds = np.array([0, 1, 1, 1, 0])
    m = classification_metrics(labels, preds, ["a", "b", "c"])
    # class a: tp1 fp1 fn1 -> f1 .5; b: tp2 fp1 fn0 -> .8; c: tp0 fn1 -> 0
    assert m["per_class_f1"] == pytest.approx({"a": 0.5, "b": 0.8, "c": 0.0})
    assert m["accuracy"] == pytest.approx(0.6)
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8) / 3)
    assert m["weighted_f1"] == pytest.approx((2 * 0.5 + 2 * 0.8) / 5)
    assert m["confusion"] == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]


def test_stop_step_reproduces_a_period_that_is_not_the_last(tiny_cfg):
    """What export -> train --final relies on: stopping at a selected step of the full schedule
    gives that period's metrics exactly (the learning-rate schedule still spans every step)."""
    full = list(Trainer(tiny_cfg(train__max_steps=9, train__eval_every=3), progress=False).run())
    middle = full[1]  # period 2 of 3
    stopped = list(Trainer(tiny_cfg(train__max_steps=9, train__eval_every=3, train__stop_step=middle["step"]),
                           progress=False).run())
    assert len(stopped) == 2 and stopped[-1]["finished"] and not middle["finished"]
    keys = ("dev/loss", "dev/accuracy", "dev/weighted_f1", "train/loss")
    assert {k: stopped[-1][k] for k in keys} == {k: middle[k] for k in keys}


def test_ema_is_bias_corrected_a_first_visit_gives_the_current_softmax():
    from lcl_tune.core.weighting import EMAWeighting

    ema = EMAWeighting(num_labels=3, num_examples=4, alpha=0.9).train()
    batch = {"idx": torch.tensor([0, 2])}
    first, second = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), torch.tensor([[0.0, 0.0, 2.0], [0.0, 1.0, 0.0]])
    p1, p2 = torch.softmax(first, -1), torch.softmax(second, -1)
    assert torch.allclose(ema(batch, first, 0.5).probs, p1)  # no pull towards 1/C on a first visit
    expected = (0.9 * 0.1 * p1 + 0.1 * p2) / (1 - 0.9 ** 2)  # the bias-corrected average of two visits
    out = ema(batch, second, 0.5).probs
    assert torch.allclose(out, expected) and torch.allclose(out.sum(1), torch.ones(2))


def test_ema_differs_from_uniform_over_two_epochs(tiny_cfg):
    """Seen twice, rows are weighted by their averaged predictions, not 1/C: the two arms train differently."""
    two_epochs = {"data__max_train_samples": 32, "train__max_steps": None, "train__epochs": 2, "loss__lam": 0.5}
    ema = Trainer(tiny_cfg(weighting__name="ema", **two_epochs), progress=False)
    ema_history = ema.fit()["history"]
    w = ema.weighting.eval()
    assert (w.visits == 2).all()
    corrected = w.table / (1 - w.alpha ** 2)
    assert (corrected - 0.25).abs().max() > 1e-3 and torch.allclose(corrected.sum(1), torch.ones(len(corrected)))
    uniform = Trainer(tiny_cfg(weighting__name="uniform", **two_epochs), progress=False).fit()["history"]
    assert [h["train/loss"] for h in ema_history] != [h["train/loss"] for h in uniform]


def test_gradients_are_clipped_per_network(tiny_cfg, monkeypatch):
    """A `separate` weighting encoder has its own gradient norm budget: clipping jointly would let
    its gradients shrink the main encoder's update, one more thing that differs by arm."""
    calls = []
    real = torch.nn.utils.clip_grad_norm_

    def recording(params, max_norm, *args, **kwargs):
        params = list(params)
        calls.append((len(params), float(real(params, max_norm, *args, **kwargs))))
        return calls[-1][1]

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording)
    trainer = Trainer(tiny_cfg(weighting__name="separate", optim__max_grad_norm=0.5), progress=False)
    trainer.train_step(np.arange(16))
    main = sum(1 for p in trainer.model.parameters() if p.grad is not None)
    weighting = sum(1 for p in trainer.weighting.parameters() if p.grad is not None)
    assert [n for n, _ in calls] == [main, weighting]
    for net in (trainer.model, trainer.weighting):
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in net.parameters() if p.grad is not None]))
        assert norm <= 0.5 + 1e-5


# ------------------------------------------------------------------ pairing: random streams per purpose


@pytest.fixture()
def noisy_uniform():
    """A weighting network that draws random numbers (a random layer, dropout, noise) but weights
    every class 1/C, like ``uniform``: the main model's computation is that of a ``uniform`` arm."""
    from lcl_tune.core.weighting import WeightingNetwork, WeightOutput, register

    @register
    class NoisyUniform(WeightingNetwork):
        name, cost = "noisy_uniform", "free"

        def __init__(self, num_labels: int):
            super().__init__(num_labels)
            self.layer = torch.nn.Linear(num_labels, num_labels)  # its init draws from the global generator
            self.drop = torch.nn.Dropout(0.5)

        @classmethod
        def build(cls, cfg, num_labels, num_examples, make_classifier):
            return cls(num_labels)

        def forward(self, batch, main_logits, lam):
            noise = self.drop(self.layer(torch.randn_like(main_logits)))  # draws, then thrown away
            return WeightOutput(torch.full_like(main_logits, 1.0 / self.num_labels) + 0.0 * noise.detach())

    yield NoisyUniform
    REGISTRY.pop("noisy_uniform")
    WEIGHTING_ENCODERS.pop("noisy_uniform")


def test_arms_that_are_the_same_computation_give_identical_metrics(tiny_cfg, noisy_uniform):
    """Two arms whose main model computes the same thing under different names, one of which draws
    extra random numbers in its weighting network, give identical metrics at every period: what
    the weighting network draws never shifts the main encoder's dropout."""
    runs = {w: Trainer(tiny_cfg(weighting__name=w), progress=False).fit()["history"]
            for w in ("uniform", "noisy_uniform")}
    strip = lambda h: [{k: v for k, v in r.items() if not k.startswith("time/")} for r in h]  # noqa: E731
    assert strip(runs["uniform"]) == strip(runs["noisy_uniform"])
    other = Trainer(tiny_cfg(weighting__name="uniform", seed=4), progress=False).fit()["history"]
    assert strip(other) != strip(runs["uniform"])  # the check can fail: another seed differs


def _dropout_masks(trainer: Trainer, steps: int) -> list[list[torch.Tensor]]:
    """The main encoder's dropout masks (which elements were zeroed) at each of ``steps`` steps."""
    masks: list[torch.Tensor] = []

    def hook(module, inputs, output):
        if module.training and module.p > 0:
            masks.append((output == 0) & (inputs[0] != 0))

    handles = [m.register_forward_hook(hook) for m in trainer.model.modules() if isinstance(m, torch.nn.Dropout)]
    per_step = []
    for rows in trainer.epoch_batches(0)[:steps]:
        masks.clear()
        trainer.train_step(rows)
        per_step.append(list(masks))
    for h in handles:
        h.remove()
    return per_step


def test_dropout_masks_of_ce_and_lcl_arms_agree_at_the_same_step(tiny_cfg):
    """Paired seeds share their noise: the main encoder's dropout masks of a CE, an SCL and an
    LCL-`separate` arm (whose weighting encoder has dropout of its own) agree at every step."""
    arms = {(loss, w): _dropout_masks(Trainer(tiny_cfg(loss__name=loss, weighting__name=w), progress=False), 3)
            for loss, w in (("ce", "self"), ("scl", "self"), ("lcl", "separate"))}
    ce = arms[("ce", "self")]
    assert len(ce) == 3 and all(len(step) > 0 for step in ce) and any(m.any() for m in ce[0])
    for other in arms.values():
        for a, b in zip(ce, other):
            assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))
    other_seed = _dropout_masks(Trainer(tiny_cfg(loss__name="ce", seed=4), progress=False), 1)
    assert not all(torch.equal(x, y) for x, y in zip(ce[0], other_seed[0]))


def test_streams_are_derived_from_the_seed_and_independent():
    from lcl_tune.core.rng import STREAMS, stream_seeds

    a, b = stream_seeds(3), stream_seeds(4)
    assert list(a) == list(STREAMS) and len(set(a.values())) == len(STREAMS)
    assert stream_seeds(3) == a and not set(a.values()) & set(b.values())


# ------------------------------------------------------------------ resume on another device


def _key(history):
    return [(r["step"], r["train/loss"], r["dev/weighted_f1"]) for r in history]


def test_checkpoint_restores_on_a_device_other_than_the_writers(tiny_cfg, tmp_path):
    """A GPU trial that restores a checkpoint must not move the random states to its device
    (``set_rng_state`` takes CPU byte tensors only). Simulated: the restoring trial's device is
    the meta device, which is where ``map_location=<trial device>`` would put every tensor; on
    a meta tensor the RNG restore fails just as a CUDA one does."""
    cfg = tiny_cfg(loss__name="lcl", weighting__name="separate")
    straight = Trainer(cfg, progress=False).fit()["history"]
    first = Trainer(cfg, progress=False)
    next(first.run())
    first.save(tmp_path / "ckpt.pt")

    second = Trainer(cfg, progress=False)
    second.device = torch.device("meta")  # the trial's device differs from the writer's (CPU)
    second.restore(tmp_path / "ckpt.pt")
    second.device = torch.device("cpu")  # (the model itself lives on the CPU here)
    assert second.step == 3
    assert _key(second.fit()["history"]) == _key(straight)


def test_checkpoint_from_a_gpu_restores_on_cpu_with_a_warning(tiny_cfg, tmp_path, caplog):
    """A checkpoint written on a GPU (its streams carry CUDA states) resumes on a CPU trial: the
    weights and optimiser continue, the warning says the GPU dropout streams do not."""
    cfg = tiny_cfg()
    first = Trainer(cfg, progress=False)
    next(first.run())
    state = first.state_dict()
    for st in state["rng"]["streams"].values():
        st["cuda"] = torch.zeros(16, dtype=torch.uint8)  # what a CUDA generator's state looks like
    state["rng"]["device"] = "cuda"
    torch.save(state, tmp_path / "gpu.pt")
    second = Trainer(cfg, progress=False)
    with caplog.at_level("WARNING", logger="lcl_tune"):
        second.restore(tmp_path / "gpu.pt")
    assert "written on cuda restored on cpu" in caplog.text
    assert second.step == 3 and torch.equal(second.model.hf.classifier.weight, first.model.hf.classifier.weight)
