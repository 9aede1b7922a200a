"""benchmarks/bench_gpu.py: its CPU-side logic (data fallback, timing, packing math) and a CPU smoke run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "bench_gpu.py"


@pytest.fixture(scope="module")
def bench(load_benchmark):
    return load_benchmark("bench_gpu")


def test_the_script_imports_no_ray_mlflow_optuna_or_datasets():
    code = (f"import runpy, sys; runpy.run_path({str(SCRIPT)!r}, run_name='bench_gpu'); "
            "bad = [m for m in ('ray', 'mlflow', 'optuna', 'datasets') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(REPO))


# ---------------------------------------------------------------------------- synthetic data


def test_synthetic_data_has_the_recorded_shape(bench):
    """The synthetic split's token rows (built from offsets) have the recorded lengths and labels,
    shuffled; the recorded figures themselves are checked against the real data below."""
    assert sum(bench.GOEMOTIONS_TRAIN_LENGTHS.values()) == 23_485
    data = bench.synthetic_goemotions(max_length=128)
    row_lengths = np.array([len(data.train.row(i)) for i in range(len(data.train))])
    values, counts = np.unique(row_lengths, return_counts=True)
    assert dict(zip(values.tolist(), counts.tolist())) == bench.GOEMOTIONS_TRAIN_LENGTHS
    assert not np.array_equal(row_lengths, np.sort(row_lengths))  # shuffled
    assert np.bincount(data.train.labels).tolist() == bench.GOEMOTIONS_TRAIN_LABEL_COUNTS
    assert data.num_labels == 27 and data.pad_id == 0 and len(data.dev) == 256
    rows = [data.train.row(i) for i in range(50)]
    assert all(r[0] == bench.CLS_ID and r[-1] == bench.SEP_ID for r in rows)
    assert all(((r[1:-1] >= 1000) & (r[1:-1] < bench.VOCAB_SIZE)).all() for r in rows)
    short = bench.synthetic_goemotions(max_length=32)
    assert short.train.lengths.max() == 32 and len(short.train) == 23_485


def test_recorded_histogram_is_that_of_the_real_data(bench, shared_datasets, tokenizer):
    from lcl_tune.schema.trial import DataConfig
    from lcl_tune.core.data import load_raw, tokenize_split

    raw = load_raw(DataConfig(preset="goemotions", root=str(shared_datasets / "goemotions")))
    real = tokenize_split(raw.train, tokenizer, 128)
    assert bench.length_histogram(real.lengths) == bench.GOEMOTIONS_TRAIN_LENGTHS
    assert np.bincount(raw.train.labels).tolist() == bench.GOEMOTIONS_TRAIN_LABEL_COUNTS
    assert raw.label_names == bench.GOEMOTIONS_LABEL_NAMES
    assert (tokenizer.pad_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id, len(tokenizer)) == (
        bench.PAD_ID, bench.CLS_ID, bench.SEP_ID, bench.VOCAB_SIZE)


def test_synthetic_tokenizer_and_data_train_without_tokenizer_files(bench, tmp_path):
    """The GPU machine's path: no MiniLM package, no dataset; the engine still builds and steps."""
    from transformers import AutoTokenizer

    from lcl_tune.core.engine import Trainer

    folder = bench.write_synthetic_tokenizer(tmp_path / "tok")
    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    assert (len(tok), tok.pad_token_id, tok.cls_token_id, tok.sep_token_id) == (30522, 0, 101, 102)
    cfg = bench.build_config({"model.name": "tiny", "model.tokenizer": str(folder), "data.preset": "goemotions",
                              "weighting.name": "separate", "train.device": "cpu", "train.threads": 1,
                              "train.length_buckets": True, "train.max_steps": 10**6})
    trainer = Trainer(cfg, bench.synthetic_goemotions(), progress=False)
    timing = bench.time_trainer(trainer, warmup_steps=2, windows=bench.one_window(0.2), min_steps=3)
    (w,) = timing.windows
    assert w.steps >= 3 and w.samples == 32 * w.steps and w.seconds > 0 and w.samples_per_s > 0
    assert trainer.step == 2 + w.steps and timing.step == "Trainer._step"
    assert 3 <= w.mean_padded_len <= 82


def test_time_trainer_pads_fixed_batches_and_syncs_per_step_when_asked(bench, tmp_path):
    from lcl_tune.core.engine import Trainer

    folder = bench.write_synthetic_tokenizer(tmp_path / "tok")
    cfg = bench.build_config({"model.name": "tiny", "model.tokenizer": str(folder), "data.preset": "goemotions",
                              "loss.name": "ce", "train.device": "cpu", "train.threads": 1, "train.pad_to": 64})
    trainer = Trainer(cfg, bench.synthetic_goemotions(), progress=False)
    windows = iter([(0.0, 0.0), (0.0, 0.0)])  # two windows of min_steps steps each
    seen = []
    timing = bench.time_trainer(trainer, warmup_steps=1, windows=windows, min_steps=2, pad_to=64,
                                sync_per_step=True, on_window=seen.append)
    assert [w.steps for w in timing.windows] == [2, 2] and seen == timing.windows
    assert all(w.mean_padded_len == 64 for w in timing.windows)
    assert timing.step == "Trainer.train_step"


def test_choose_data_falls_back_to_synthetic_data(bench, tmp_path):
    choice = bench.choose_data(tmp_path, 128, force_synthetic=True, log=lambda m: None)
    assert choice.source == "synthetic" and not choice.stub_tokenizer
    assert Path(choice.tokenizer) == tmp_path / "_synthetic_tokenizer" and (Path(choice.tokenizer) / "vocab.txt").is_file()
    assert bench.length_histogram(choice.data.train.lengths) == bench.GOEMOTIONS_TRAIN_LENGTHS


def test_vocabulary_stub_is_enough_for_the_engine(bench, monkeypatch):
    """Last resort when not even the synthetic vocabulary loads: the engine only needs its size."""
    import lcl_tune.core.engine as engine

    monkeypatch.setattr(engine, "load_tokenizer", engine.load_tokenizer)  # restored after the test
    bench.stub_engine_tokenizer()
    cfg = bench.build_config({"model.name": "tiny", "model.tokenizer": "/nonexistent/tokenizer", "data.preset": "goemotions",
                              "loss.name": "ce", "train.device": "cpu", "train.threads": 1})
    trainer = engine.Trainer(cfg, bench.synthetic_goemotions(), progress=False)
    assert trainer.model.encoder.config.vocab_size == bench.VOCAB_SIZE


def test_prepared_data_round_trips_through_npz(bench, tmp_path):
    data = bench.synthetic_goemotions()
    bench.save_prepared(data, tmp_path / "d.npz")
    back = bench.load_prepared(tmp_path / "d.npz")
    assert np.array_equal(back.train.ids, data.train.ids) and np.array_equal(back.train.offsets, data.train.offsets)
    assert np.array_equal(back.dev.labels, data.dev.labels)
    assert back.label_names == data.label_names and back.pad_id == data.pad_id


# ---------------------------------------------------------------------------- the math


def test_packing_aggregation_sums_the_trials_that_finished(bench):
    workers = [{"status": "ok", "samples_per_s": 300.0, "mean_padded_len": 40.0},
               {"status": "ok", "samples_per_s": 280.0, "mean_padded_len": 36.0},
               {"status": "oom", "error": "CUDA out of memory"},
               {"status": "error", "error": "boom"}]
    agg = bench.aggregate_packing(4, workers)
    assert agg["aggregate_samples_per_s"] == 580.0 and agg["per_trial_samples_per_s"] == 290.0
    assert (agg["ok"], agg["oom"], agg["failed"]) == (2, 1, 2)
    assert agg["min_trial_samples_per_s"] == 280.0 and agg["mean_padded_len"] == 38.0
    assert bench.aggregate_packing(1, [{"status": "oom"}])["aggregate_samples_per_s"] == 0.0


def test_packing_summary_against_k1_and_the_peak_bound(bench):
    rounds = [bench.aggregate_packing(1, [{"status": "ok", "samples_per_s": 500.0, "mean_padded_len": 128.0}]),
              bench.aggregate_packing(2, [{"status": "ok", "samples_per_s": 600.0, "mean_padded_len": 64.0}] * 2)]
    one, two = bench.packing_summary(rounds, peak_bound=5900.0, bound_tokens=128, goal=0.4)
    assert one["vs_k1"] == 1.0 and two["vs_k1"] == pytest.approx(2.4)
    assert two["of_peak"] == pytest.approx(1200 / 5900)
    assert two["of_length_adjusted_peak"] == pytest.approx(1200 / (5900 * 2))  # half the tokens: twice the bound
    assert not two["goal_met"]
    big = bench.packing_summary([bench.aggregate_packing(1, [{"status": "ok", "samples_per_s": 2400.0,
                                                             "mean_padded_len": 128.0}])])
    assert big[0]["goal_met"]
    no_base = bench.packing_summary([bench.aggregate_packing(1, [{"status": "oom"}])])
    assert no_base[0]["vs_k1"] is None


def test_compile_break_even(bench):
    compiled = {"status": "ok", "warmup_s": 31.0, "warmup_steps": 10, "ms_per_step": 100.0, "first_step_s": 25.0}
    eager = {"status": "ok", "ms_per_step": 150.0}
    costs = bench.compile_costs(compiled, eager)
    assert costs["compile_s"] == pytest.approx(30.0) and costs["saved_ms_per_step"] == pytest.approx(50.0)
    assert costs["break_even_steps"] == pytest.approx(600.0)
    assert bench.compile_costs(compiled, {"status": "ok", "ms_per_step": 90.0})["break_even_steps"] is None
    assert bench.compile_costs({"status": "oom"}, eager) == {}


def test_ratio_needs_two_measured_cases(bench):
    assert bench.ratio({"status": "ok", "samples_per_s": 30.0}, {"status": "ok", "samples_per_s": 10.0}) == 3.0
    assert bench.ratio({"status": "ok", "samples_per_s": 30.0}, {"status": "not run (budget)"}) is None
    assert bench.ratio(None, {"status": "ok", "samples_per_s": 10.0}) is None


# ---------------------------------------------------------------------------- the CPU smoke run


def test_an_exhausted_budget_marks_parts_not_run(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--device", "cpu", "--model", "tiny", "--synthetic-data",
                           "--budget-seconds", "0", "--out", str(out)], capture_output=True, text=True, timeout=120,
                          cwd=str(REPO))
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((out / "results.json").read_text())
    assert {k: p["status"] for k, p in res["parts"].items()} == {k: "not run (budget)" for k in
                                                                 ("faults", "throughput", "padding", "levers", "packing", "memory")}
    assert res["meta"]["data_source"] == "synthetic"
    assert "not run (budget)" in (out / "results.md").read_text()


@pytest.mark.slow
def test_cpu_smoke_run_writes_every_part(tmp_path):
    """``--quick --device cpu --model tiny``: every part has numbers, ratios use this run's baseline."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--device", "cpu", "--model", "tiny", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=str(REPO))
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    meta, parts = res["meta"], res["parts"]
    assert set(parts) == {"faults", "throughput", "padding", "levers", "packing", "memory"}
    assert all(p["status"] == "ok" for p in parts.values()), {k: p["status"] for k, p in parts.items()}
    faults = {r["check"]: r for r in parts["faults"]["rows"]}
    resume = faults["resume after SIGKILL"]  # killed after period 2 of 3, restored in a new process
    assert resume["status"] == "ok" and resume["restored_step"] == 20 and resume["steps"] == [10, 20, 30]
    assert resume["abs_diff_last_dev_loss"] == 0.0  # on CPU the resumed run is the uninterrupted one
    assert faults["out of memory"]["status"] == "not run (no CUDA)"
    assert faults["compile"]["status"] == "not run (--no-compile)"
    assert meta["device"] == "cpu" and meta["device_name"].startswith("cpu")

    rows = parts["throughput"]["rows"]
    assert {(r["loss"], r["precision"]) for r in rows} == {(loss, p) for loss in ("ce", "scl", "lcl-self", "lcl-separate")
                                                          for p in ("fp32", "bf16")}
    assert all(r["status"] == "ok" and r["samples_per_s"] > 0 and r["ms_per_step"] > 0 for r in rows)
    assert all(r["device"] == meta["device_name"] for r in rows)

    for r in parts["padding"]["rows"]:
        assert r["speedup_dynamic_vs_fixed"] == pytest.approx(r["dynamic_samples_per_s"] / r["fixed_samples_per_s"])

    levers = {r["name"]: r for r in parts["levers"]["rows"]}
    naive = levers["naive (pad to 128, sync per step)"]
    assert naive["status"] == "ok" and naive["vs_naive"] == pytest.approx(1.0)
    measured = [r for r in levers.values() if r["status"] == "ok"]
    assert len(measured) >= 5
    for r in measured:
        assert r["vs_naive"] == pytest.approx(r["samples_per_s"] / naive["samples_per_s"])
        assert r["vs_issue_reference"] == pytest.approx(r["samples_per_s"] / 349.0)
    assert levers["torch.compile"]["status"].startswith("skipped")  # compile is skipped in CPU quick mode
    goal = parts["levers"]["goal"]
    assert goal["vs_naive"] == pytest.approx(levers[goal["best"]]["vs_naive"])

    rounds = parts["packing"]["rounds"]
    assert [r["k"] for r in rounds] == [1, 2]
    assert all(r["ok"] == r["k"] and r["aggregate_samples_per_s"] > 0 for r in rounds)
    assert rounds[0]["vs_k1"] == pytest.approx(1.0)
    assert rounds[1]["aggregate_samples_per_s"] == pytest.approx(sum(w["samples_per_s"] for w in rounds[1]["workers"]))
    assert rounds[1]["of_peak"] == pytest.approx(rounds[1]["aggregate_samples_per_s"] / 5900.0)

    acts = parts["memory"]["activations"]
    assert isinstance(acts, list) and acts[0]["measured"] > 0
    assert acts[0]["estimate_over_measured"] == pytest.approx(1.0, rel=0.03)  # CPU fp32 (tests/test_memory.py)

    md = (out / "results.md").read_text()
    assert meta["device_name"] in md and md.startswith(f"# GPU benchmark: {meta['device_name']}")
    for title in ("## Throughput", "## Padding", "## Levers", "## Packing", "## Memory"):
        assert title in md
    assert md.strip() in proc.stdout  # the table is printed too


def test_host_syncs_are_counted_from_torchs_sync_debug_warnings(bench, monkeypatch):
    """On CUDA, torch's sync debug mode warns at each host sync; simulated here (the CPU has none)."""
    import warnings

    modes = []
    monkeypatch.setattr(bench.torch.cuda, "set_sync_debug_mode", modes.append)
    with bench.counting_host_syncs(True) as syncs:
        warnings.warn("called a synchronizing CUDA operation", UserWarning)
        warnings.warn("called a synchronizing CUDA operation", UserWarning)
        warnings.warn("something else", UserWarning)
    assert syncs == [2] and modes == ["warn", 0]
    with bench.counting_host_syncs(False) as syncs:
        pass
    assert syncs == []
