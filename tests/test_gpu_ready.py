"""The GPU path, tested where the CPU cannot see it: each test simulates what only a GPU would show.

Host syncs: on a GPU, a Python-level read of a device tensor (``bool(t)``, ``t.item()``, ``float(t)``,
``t.tolist()``, ``t.cpu()``…) stalls the CPU until the device catches up. On the CPU they cost
nothing, so a test counts them instead: every such call made from ``lcl_tune``'s own code (not
from torch's, e.g. AdamW's step counters on the CPU) during training steps outside the logging and
evaluation windows must be zero.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import pytest
import torch

import lcl_tune
from lcl_tune.core.engine import Trainer
from lcl_tune.core.weighting import REGISTRY

PACKAGE = str(Path(lcl_tune.__file__).resolve().parent)
SYNCS = ("__bool__", "__float__", "__int__", "__index__", "item", "tolist", "cpu", "numpy")


@contextlib.contextmanager
def counting_host_syncs():
    """Patch the tensor reads that sync a device; yield the list of (method, file, line) of those
    called from ``lcl_tune``'s frames."""
    calls: list[tuple[str, str, int]] = []
    originals = {name: torch.Tensor.__dict__.get(name) for name in SYNCS}

    def counted(name: str, original):
        def read(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(PACKAGE):
                calls.append((name, caller, sys._getframe(1).f_lineno))
            return original(self, *args, **kwargs)
        return read

    for name in SYNCS:
        setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
    try:
        yield calls
    finally:
        for name, original in originals.items():
            if original is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, original)


def test_the_counter_sees_a_sync_in_project_code_and_not_in_torchs():
    """The counter itself: a read from a frame in lcl_tune counts, one from elsewhere does not."""
    from lcl_tune.core import losses

    t = torch.tensor([1.0])
    with counting_host_syncs() as calls:
        bool(t), t.item(), float(t)  # this test's frames: not lcl_tune's
        assert calls == []
        with pytest.raises(ValueError):  # lcl_tune's label check reads a tensor to build its message
            losses.label_aware_contrastive_loss(torch.randn(2, 3), torch.tensor([0, 5]), torch.ones(2, 2) / 2, 0.3)
    assert calls and all(c[1].startswith(PACKAGE) for c in calls)


@pytest.mark.parametrize("loss,weighting", [("ce", "self"), ("scl", "self"),
                                            *[("lcl", name) for name in sorted(REGISTRY)]])
def test_a_training_step_reads_nothing_back_from_the_device(tiny_cfg, loss, weighting):
    trainer = Trainer(tiny_cfg(loss__name=loss, loss__lam=0.5 if loss != "ce" else 1.0, weighting__name=weighting,
                               train__log_every=100, train__eval_every=100, train__max_steps=100), progress=False)
    batches = trainer.epoch_batches(0)
    trainer._step(batches[0])  # the first step may set things up (optimiser state)
    with counting_host_syncs() as calls:
        for rows in batches[1:4]:
            trainer._step(rows)
    assert calls == [], f"host syncs in a training step: {calls}"


def test_labels_outside_the_names_are_refused_once_when_the_data_are_prepared(tiny_cfg):
    """The range check the loss no longer makes per step, made once on the host."""
    import dataclasses

    from lcl_tune.core.engine import prepare_trial_data

    data, _ = prepare_trial_data(tiny_cfg(), progress=False)
    bad = dataclasses.replace(data.dev, labels=data.dev.labels.copy())
    bad.labels[3] = data.num_labels
    with pytest.raises(ValueError, match=r"dev labels lie in \[0, 4\], outside \[0, 4\)"):
        dataclasses.replace(data, dev=bad)


# ---- out of memory, however the GPU reports it (point 5)

GPU_OOM_TEXTS = [
    "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 23.69 GiB total capacity)",
    "CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported",
    "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
    "cuDNN error: CUDNN_STATUS_ALLOC_FAILED",
]


@pytest.mark.parametrize("text", GPU_OOM_TEXTS)
def test_every_way_a_shared_gpu_reports_running_out_of_memory_is_out_of_memory(text):
    """A shared GPU reports a failed allocation as a plain RuntimeError from cuBLAS or CUDA, not
    only as torch.cuda.OutOfMemoryError; each is a resource problem, retried."""
    from lcl_tune.core.failures import TrialOutOfMemory, error_kind, oom_is_a_resource_problem

    with pytest.raises(TrialOutOfMemory):
        with oom_is_a_resource_problem(gpu=0.5, batch_size=32):
            raise RuntimeError(text)
    assert error_kind(f"Traceback …\nRuntimeError: {text}") == "out of memory"


def test_a_plain_error_stays_an_exception():
    from lcl_tune.core.failures import error_kind, oom_is_a_resource_problem

    with pytest.raises(RuntimeError, match="mat1 and mat2 shapes"):
        with oom_is_a_resource_problem(gpu=0.5, batch_size=32):
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 5x6)")
    assert error_kind("RuntimeError: mat1 and mat2 shapes cannot be multiplied") == "exception"


def test_the_gpu_benchmark_classifies_out_of_memory_with_the_cores_function():
    import importlib

    from lcl_tune.core import failures

    bench_gpu = importlib.import_module("benchmarks.bench_gpu")
    assert bench_gpu.is_oom is failures.is_oom


# ---- the GPU check on a bare GPU machine: torch and transformers, nothing else (point 7)

BARE = ("ray", "optuna", "mlflow", "pyarrow", "pandas", "datasets", "sklearn")


def test_the_gpu_check_imports_on_a_machine_with_only_torch_and_transformers():
    """``python -m benchmarks.bench_gpu`` on the lent GPU machine, which has torch and transformers
    but no Ray, Optuna, MLflow or pyarrow: simulated by blocking those imports."""
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    code = (f"import sys\nfor name in {BARE!r}:\n    sys.modules[name] = None\n"
            "import runpy\nsys.argv = ['bench_gpu', '--help']\nrunpy.run_module('benchmarks.bench_gpu', run_name='__main__')")
    out = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "usage" in out.stdout


# ---- final training frees each seed's model before building the next (point 6)


def test_final_training_frees_each_seeds_model_before_building_the_next(tiny_cfg, tmp_path, monkeypatch):
    """On a GPU, a seed's model, gradients and optimiser state still held while the next seed's are
    built double the peak memory of ``final``. Simulated: weak references to each seed's model and
    optimiser must be dead when the next Trainer is built, and CUDA's cache emptied in between."""
    import weakref

    from lcl_tune.core import engine
    from lcl_tune.workflows import final

    refs, alive_at_build, events = [], [], []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: events.append("empty_cache"))

    class Watched(engine.Trainer):
        def __init__(self, *args, **kwargs):
            alive_at_build.append(sum(ref() is not None for ref in refs))
            events.append("build")
            super().__init__(*args, **kwargs)
            refs.extend([weakref.ref(self.model), weakref.ref(self.optimizer)])

    monkeypatch.setattr(engine, "Trainer", Watched)
    final.train_final(tiny_cfg(train__max_steps=2, train__eval_every=2), tmp_path / "final", seeds=[1, 2, 3])
    assert alive_at_build == [0, 0, 0], "a previous seed's model or optimiser was alive when the next was built"
    assert events == ["build", "empty_cache", "build", "empty_cache", "build", "empty_cache"]


# ---- precision and devices (point 4)

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("kind", ["study", "ablation"])
def test_a_trial_reserving_more_than_one_gpu_is_a_one_line_error(tmp_path, kind):
    """The engine trains on one device: a trial that reserved two GPUs would leave one idle."""
    import yaml

    from lcl_tune.schema.ablation import load_ablation
    from lcl_tune.schema.study import load_study
    from lcl_tune.schema.trial import ConfigError

    if kind == "study":
        path, load = REPO / "search_spaces" / "quickstart.yaml", load_study
    else:
        path, load = tmp_path / "abl.yaml", load_ablation
        path.write_text(yaml.safe_dump({"name": "abl", "base": {"data": {"preset": "sst5"}, "train": {"max_steps": 4}},
                                        "arms": {"ce": {"loss.name": "ce"}, "scl": {"loss.name": "scl"}}, "seeds": [1]}))
    with pytest.raises(ConfigError) as e:
        load(path, ["resources.gpu=2"], check_files=False)
    msg = str(e.value)
    assert "resources.gpu: a trial trains on one GPU, got 2" in msg and "Fix:" in msg and "\n" not in msg
    load(path, ["resources.gpu=1"], check_files=False)
    load(path, ["resources.gpu=0.25"], check_files=False)


def test_bf16_on_a_gpu_without_native_bf16_warns_and_fp32_uses_tf32_by_default(monkeypatch, caplog):
    """A T4 or V100 emulates bf16 (slower than fp32): simulated by torch's own capability query."""
    import logging

    from lcl_tune.core import engine

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        with caplog.at_level(logging.WARNING):
            engine.set_cuda_precision(torch.device("cuda"), "bf16", tf32=True)
        assert "train.precision=bf16 on Tesla T4, which has no native bf16" in caplog.text and "Fix:" in caplog.text
        assert torch.get_float32_matmul_precision() == "high"  # TF32 matmuls
        caplog.clear()
        engine.set_cuda_precision(torch.device("cuda"), "fp32", tf32=False)
        assert torch.get_float32_matmul_precision() == "highest" and not caplog.text
        engine.set_cuda_precision(torch.device("cpu"), "bf16", tf32=True)  # nothing to set on a CPU
        assert torch.get_float32_matmul_precision() == "highest"
    finally:
        torch.set_float32_matmul_precision(before)


def test_the_trainer_sets_its_devices_precision(tiny_cfg, monkeypatch):
    from lcl_tune.core import engine

    seen = []
    monkeypatch.setattr(engine, "set_cuda_precision", lambda device, precision, tf32: seen.append((device.type, precision, tf32)))
    engine.Trainer(tiny_cfg(train__tf32=False), progress=False)
    assert seen == [("cpu", "fp32", False)]
    assert tiny_cfg().train.tf32 is True  # the default: TF32 matmuls on GPUs that have them


# ---- torch.compile that stays compiled (point 3)


def test_compiled_trials_in_one_process_stay_compiled(tiny_cfg, monkeypatch):
    """A reused Ray actor runs trial after trial in one process. Dynamo's caches are per code
    object, so every trial with another dropout (a guarded constant) adds graphs to the same cache
    until ``recompile_limit`` is hit, after which the encoder runs eager, silently. Here with the
    cheap ``eager`` backend and the limit lowered to 3, two trials: over batches of several lengths, with the
    train/eval switch and the last short batch, each trial compiles the same few graphs (one
    training graph whatever the lengths), and a later trial as many as the first, none run eager."""
    import torch._dynamo
    from torch import nn
    from torch._dynamo.utils import counters

    from lcl_tune.core.engine import Trainer

    original = nn.Module.compile
    monkeypatch.setattr(nn.Module, "compile", lambda self, *a, **k: original(self, *a, **{**k, "backend": "eager"}))
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 3)
    torch._dynamo.reset()
    per_trial = []
    for trial in range(2):
        cfg = tiny_cfg(model__dropout=0.05 + 0.02 * trial, train__compile=True, train__max_steps=10,
                       train__eval_every=5, train__batch_size=20, weighting__name="uniform")
        before = counters["stats"]["unique_graphs"]
        trainer = Trainer(cfg, progress=False)
        lengths = {len(rows) for rows in trainer.epoch_batches(0)}
        for _ in trainer.run():
            pass
        per_trial.append(counters["stats"]["unique_graphs"] - before)
    torch._dynamo.reset()
    assert len(lengths) > 1  # a last short batch
    assert 1 <= per_trial[0] <= 3 and per_trial == [per_trial[0]] * 2, per_trial


# ---- memory packing that reflects the GPU (point 2)

INSTANCE_GPUS = {"g5.2xlarge": "A10G", "g5.12xlarge": "A10G"}  # cluster.yaml's GPU worker types


def write_encoder(folder: Path, **config) -> str:
    """A local model folder holding only a config.json (BERT-base sizes unless ``config`` says)."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 768, "num_hidden_layers": 12,
                                                    "vocab_size": 30522, "intermediate_size": 3072,
                                                    "num_attention_heads": 12, **config}))
    return str(folder)


def test_the_attention_term_follows_the_attention_implementation(tmp_path, tiny_cfg):
    """BERT and ELECTRA load with PyTorch's fused attention (SDPA) on CUDA, which keeps no [B, H, L, L]
    probabilities for the backward pass; a model that loads eager (its config asks, or its class
    has no SDPA in the installed transformers) keeps them."""
    from lcl_tune.core import memory as M

    cases = {"sdpa": write_encoder(tmp_path / "bert"),
             "eager": write_encoder(tmp_path / "eager", attn_implementation="eager"),
             "no sdpa": write_encoder(tmp_path / "mpnet", model_type="mpnet")}
    impl = {k: M.attention_implementation(M.arch_size(v)) for k, v in cases.items()}
    assert impl == {"sdpa": "sdpa", "eager": "eager", "no sdpa": "eager"}
    attention = {k: M.estimate_for_arch(tiny_cfg(model__name=v, weighting__name="self")).attention for k, v in cases.items()}
    assert attention["sdpa"] == 0 and attention["eager"] > 0 and attention["no sdpa"] > 0


def test_the_gpu_table_holds_what_a_card_can_use():
    from lcl_tune.core import memory as M

    assert M.GPU_MEMORY_GIB["A10G"] == pytest.approx(22.5, abs=0.1)  # nvidia-smi: 23028 MiB, not 24 GiB
    assert all(M.GPU_MEMORY_GIB[k] < nominal for k, nominal in (("H100", 80), ("L4", 24), ("T4", 16)))


def shipped_gpu_specs() -> list[tuple[str, object, list]]:
    """(file, study or ablation, the trial configs to fit) for every shipped spec that asks for GPUs."""
    import yaml

    from lcl_tune.core.memory import heaviest_trial
    from lcl_tune.schema.ablation import is_ablation, load_ablation
    from lcl_tune.schema.study import load_study

    out = []
    for path in sorted((REPO / "search_spaces").glob("*.yaml")):
        tree = yaml.safe_load(path.read_text())
        if not (tree.get("resources") or {}).get("gpu"):
            continue
        if is_ablation(tree):
            ab = load_ablation(path, check_files=False)
            out.append((path.name, ab, [ab.trial_config({"cell": c["cell"]}) for c in ab.cells()]))
        else:
            study = load_study(path, check_files=False)
            out.append((path.name, study, [heaviest_trial(study)]))
    return out


def test_every_shipped_gpu_study_and_ablation_fits_the_packing_cluster_yaml_gives_it():
    import yaml

    from lcl_tune.core import memory as M

    cluster = yaml.safe_load((REPO / "cluster.yaml").read_text())
    gpus = {INSTANCE_GPUS[t["node_config"]["InstanceType"]] for t in cluster["available_node_types"].values()
            if t["resources"].get("GPU")}
    specs = shipped_gpu_specs()
    assert {name for name, _, _ in specs} >= {"goemotions_lcl.yaml", "sst5_lcl.yaml", "ablation_goemotions.yaml"}
    for name, spec, trials in specs:
        est = max((M.estimate_for_arch(c) for c in trials), key=lambda e: e.total)
        for gpu in gpus:
            problem = M.check_gpu_fraction(est, spec.gpu, int(M.GPU_MEMORY_GIB[gpu] * M.GiB))
            assert problem is None, f"{name} on {gpu}: {problem}"


def test_validate_names_the_gpus_of_the_table(capsys):
    from lcl_tune.cli.main import main

    assert main(["validate", str(REPO / "search_spaces" / "goemotions_lcl.yaml")]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if "memory" in x)
    assert "2 per A10G (22.5 GiB)" in line and "per H100" in line and "24 GiB" not in line


def test_an_ablation_warns_before_its_cells_share_a_gpu_too_small(monkeypatch, caplog, tmp_path):
    """The ablation runner, like a study, compares its heaviest cell with its GPU share first."""
    import logging

    from lcl_tune.adapters import ablation_runner as AR
    from lcl_tune.adapters import study_runner as SR

    name, ab, _ = next(s for s in shipped_gpu_specs() if s[0] == "ablation_goemotions.yaml")
    assert ab.gpu == 0.5  # two cells per GPU: a 15 GiB T4 is too small for its separate-encoder cells
    monkeypatch.setattr(AR, "_init_ray", lambda address: None)
    monkeypatch.setattr(AR, "check_resources", lambda spec, cluster: None)
    monkeypatch.setattr(SR.ray, "cluster_resources", lambda: {"CPU": 8, "GPU": 1})
    monkeypatch.setattr(SR.ray, "nodes", lambda: [{"Alive": True, "Resources": {"GPU": 1, "accelerator_type:T4": 1}}])

    class Reached(Exception):
        pass

    def stop(uri):
        raise Reached

    monkeypatch.setattr(AR, "check_tracking_reach", stop)
    with caplog.at_level(logging.WARNING), pytest.raises(Reached):
        AR.run_cells(ab, None, [c["cell"] for c in ab.cells()], {"x": type("T", (), {"uri": "u"})()}, None)
    assert f"resources.gpu={ab.gpu:g}" in caplog.text and "Fix:" in caplog.text
