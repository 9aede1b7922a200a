"""Ablation runner: arms × paired seeds on Ray Tune, resumable cell by cell, reported with
statistics and logged to MLflow as ablation → arm → seed runs.

Everything of an ablation lives in ``<storage>/<name>/``::

    ablation.yaml    the resolved ablation
    command.txt      every command that ran it
    tune/<name>.<arm>/   the optional per-arm tuning studies (see lcl_tune.adapters.study_runner)
    tuned.json       each arm's best parameters from its tuning phase
    cells/           one JSON per finished (arm, seed) cell: metrics, details, config, run ids
    final/           with --final: the same per arm and seed for the final phase (test split evaluated)
    ray/cells-<k>/   the Ray experiments of the cells (an interrupted one is resumed by the next run)
    progress.json    the live snapshot of the cells running now (``lcl-tune status``); ray_status.log: Ray's output
    report/          report.md / report.tex / *.csv / arms.png (also `lcl-tune report DIR`)

A rerun of the same command skips finished cells (and finished tuning phases), and continues the
cells an interrupted run left unfinished from their checkpoints, in the same Ray experiment, so each
cell keeps its one MLflow run.

Adapter module: imports Ray (through :mod:`lcl_tune.adapters.study_runner`) and MLflow.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from lcl_tune.adapters import tracking as T
from lcl_tune.schema.ablation import CELL_DIR, FINAL_DIR, Ablation, cell_name, cell_of, dev_cell_dir, load_cells
from lcl_tune.schema.trial import ConfigError, load_yaml
from lcl_tune.adapters.keeper import checkpoint_config, tune_callbacks
from lcl_tune.adapters.place import StudyPlace, StudySync, record_folder, relocate, study_place, sync_down, sync_up
from lcl_tune.adapters.study_runner import (DATA_KEYS, STATUS_ERRORED, _init_ray, best_row, check_resources,
                     check_tracking_reach, run_study, torn_ray_state, tune, wait_for_spools, warn_gpu_memory)
from lcl_tune.adapters.progress import (TRIAL_LOGS, cells_progress, parallel_slots, ray_status_reporter, reported,
                                        showing_progress, trial_error_text)
from lcl_tune.adapters.trainable import lcl_trainable, result_details
from lcl_tune.util import atomic_write, log, redact, write_json



def run_ablation(ab: Ablation, storage: str | os.PathLike = "lcl_runs", *, address: str | None = None,
                 tracking_uri: str | None = None, command: str | None = None, final: bool = False) -> Path:
    """Run every unfinished cell of ``ab`` (after each arm's tuning phase, if any), then write the
    report; with ``final``, then the final phase (:func:`run_final`). Returns the ablation folder
    (on the driver; see :class:`~lcl_tune.adapters.study_runner.StudyPlace`)."""
    place = study_place(storage, ab.name)
    folder = place.folder
    sync_down(place)  # a driver on a new machine: the ablation's files from the storage URI
    _check_same_ablation(ab, folder)
    (folder / CELL_DIR).mkdir(parents=True, exist_ok=True)
    record_folder(folder)
    (folder / "ablation.yaml").write_text(yaml.safe_dump(ab.to_dict(), sort_keys=False))
    with open(folder / "command.txt", "a") as fh:
        fh.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')}  {redact(command or ' '.join(sys.argv))}\n")

    top = T.start_study(ab.name, folder, kind="ablation", uri=tracking_uri, storage=place.remote,
                        artifacts=[folder / "ablation.yaml", folder / "command.txt"])
    arm_targets = {arm: T.child_target(top, arm, {"lcl_tune.role": "arm", "lcl_tune.arm": arm}) for arm in ab.arms}
    if final and not ab.tune and not load_cells(folder, CELL_DIR):
        # A fixed-point ablation selects nothing, so its dev cells would be the final cells without
        # the test split: train each cell once, in the final phase, and report dev and test from it.
        log.info(f"ablation {ab.name!r}: no tuning phase, so each cell trains once, in the final phase")
        run_final(ab, place, arm_targets, address)
        write_ablation_report(ab, folder, top, arm_targets)
        wait_for_spools(top, folder)
        sync_up(place)
        return folder
    if ab.tune:
        tune_arms(ab, place, address, arm_targets)

    pending = [c["cell"] for c in ab.cells() if not (folder / CELL_DIR / f"{c['cell']}.json").exists()]
    done = len(ab.cells()) - len(pending)
    log.info(f"ablation {ab.name!r}: {len(ab.arms)} arms × {len(ab.seeds)} seeds = {len(ab.cells())} cells "
          f"({done} finished, {len(pending)} to run)")
    if pending:
        run_cells(ab, place, pending, arm_targets, address, CELL_DIR)
    write_ablation_report(ab, folder, top, arm_targets)
    if final:
        run_final(ab, place, arm_targets, address)
        # the final cells' closes (each draws its confusion matrix) are sent, and the sender stopped,
        # before the command returns: a sender still drawing as the interpreter shut down aborted it
        wait_for_spools(top, folder)
    sync_up(place)
    return folder


def run_final(ab: Ablation, place: StudyPlace, arm_targets: dict[str, T.TrackingTarget], address: str | None) -> None:
    """The final phase: each arm's selected configuration (its tuned parameters, if it had a tuning
    phase) trained on every seed again, the test split evaluated once at the end of each; then the
    test-split report with the paired tests against the baseline and the paper-layout table. The
    dev cells chose nothing here that the test split could leak into: selection ended before."""
    final = dataclasses.replace(ab, final=True)
    pending = [c["cell"] for c in final.cells() if not (place.folder / FINAL_DIR / f"{c['cell']}.json").exists()]
    log.info(f"final phase: {len(final.cells())} cells on the test split ({len(pending)} to run)")
    if pending:
        run_cells(final, place, pending, arm_targets, address, FINAL_DIR)
    write_test_report(final, place.folder)


def _check_same_ablation(ab: Ablation, folder: Path) -> None:
    """A rerun may add arms or seeds, never change what finished cells were trained with."""
    saved = folder / "ablation.yaml"
    if not saved.exists():
        return
    old = load_yaml(saved)  # bounded, like every YAML file read
    new = ab.to_dict()
    for key in ("base", "metric", "tune"):
        if old.get(key) != new.get(key):
            raise ConfigError(key, f"differs from the ablation already in {folder}",
                              "rerun with the same settings, or start a new name")
    for arm, overrides in old.get("arms", {}).items():
        if arm in new["arms"] and new["arms"][arm] != overrides:
            raise ConfigError(f"arms.{arm}", f"differs from the arm already run in {folder}",
                              "rename the arm, or start a new name")


def tune_arms(ab: Ablation, place: StudyPlace, address: str | None, arm_targets: dict[str, T.TrackingTarget]) -> None:
    """Per-arm tuning phase: an Optuna/ASHA study inside each arm, on the selection seed; its best
    params are kept in ``tuned.json`` and used by the confirm phase (every seed, no early stopping).
    In MLflow each study sits under its arm: ablation → arm → tuning study → trials."""
    path = place.folder / "tuned.json"
    tuned = json.loads(path.read_text()) if path.exists() else {}
    storage = f"{place.remote}/tune" if place.remote else place.folder / "tune"
    for arm in ab.arms:
        if arm not in tuned:
            study = ab.arm_study(arm)
            sub = study_place(storage, study.name, place.folder / "tune")
            table = run_study(study, storage, resume=tune.Tuner.can_restore(sub.ray_dir), address=address,
                              local_dir=place.folder / "tune", tracking_parent=arm_targets[arm])
            best = best_row(table, study)
            if best is None:
                raise RuntimeError(f"tuning arm {arm!r}: no trial finished; see {sub.folder}")
            tuned[arm] = {p.key: best[p.key] for p in study.params if p.active(best)}
            write_json(path, tuned)
        ab.tuned[arm] = tuned[arm]


def run_cells(ab: Ablation, place: StudyPlace, cells: list[str], arm_targets: dict[str, T.TrackingTarget],
              address: str | None, cell_dir: str = CELL_DIR) -> None:
    """The cells on Ray (FIFO: ablations never stop a cell early). An experiment an earlier,
    interrupted run left with unfinished cells is resumed first (its cells continue from their
    checkpoints, under their Ray trial ids, so in their MLflow runs); the cells no experiment holds
    run in a new one."""
    import ray

    from lcl_tune.core.engine import prepare_trial_data

    _init_ray(address)
    cluster = ray.cluster_resources()
    check_resources(ab, cluster)
    configs = {c: ab.trial_config({"cell": c}) for c in cells}
    warn_gpu_memory(ab, list(configs.values()))
    check_tracking_reach(next(iter(arm_targets.values())).uri)
    data = w_data = None
    if len({_data_identity(c) for c in configs.values()}) == 1:  # every arm tokenises the same: do it once
        needs_w = [c for c in configs.values() if c.uses_weighting_encoder]
        data, w_data = prepare_trial_data(needs_w[0] if needs_w else next(iter(configs.values())))
    trainable = tune.with_resources(
        tune.with_parameters(lcl_trainable, study=ab, data=data, w_data=w_data, tracking=arm_targets),
        {"cpu": ab.cpu, "gpu": ab.gpu})
    def finished(cell: str) -> bool:
        return (place.folder / cell_dir / f"{cell}.json").exists()

    (place.folder / cell_dir).mkdir(parents=True, exist_ok=True)
    experiments = _cell_experiments(place.folder, cell_dir)
    restorable = {name: held for name, held in experiments.items()
                  if tune.Tuner.can_restore(f"{place.ray_storage}/ray/{name}")}  # killed before Ray saved: rerun
    for name, held in restorable.items():
        if any(not finished(c) for c in held):
            log.info(f"resuming the cells of {name}: {', '.join(c for c in held if not finished(c))}")
            # the grid again, as it was: without it Ray's restored variant generator adds an empty trial
            grid = held if "://" in place.ray_storage else _grid_to_restore(place.folder / "ray" / name, held)
            with showing_progress(place.folder):  # the experiment's own progress callback and reporter
                tune.Tuner.restore(f"{place.ray_storage}/ray/{name}", trainable, resume_unfinished=True,
                                   resume_errored=True, param_space={"cell": tune.grid_search(grid)}).fit()
    held = {c for cells_of in restorable.values() for c in cells_of}
    new = [c for c in cells if c not in held and not finished(c)]
    if not new:
        return
    name = f"{cell_dir}-{len(experiments) + 1}"
    (place.folder / "ray").mkdir(parents=True, exist_ok=True)
    write_json(place.folder / "ray" / f"{name}.json", new)  # which cells this experiment holds, before it runs
    n_train = len(data.train) if data is not None else None
    progress = cells_progress(ab, place.folder, {c: configs[c].periods(n_train) for c in new}, cell_dir,
                              parallel_slots(None, cluster, ab.cpu, ab.gpu))
    tuner = tune.Tuner(
        trainable,
        param_space={"cell": tune.grid_search(new)},
        tune_config=tune.TuneConfig(reuse_actors=True, max_concurrent_trials=None),
        run_config=tune.RunConfig(
            name=name, storage_path=f"{place.ray_storage}/ray", verbose=1, log_to_file=TRIAL_LOGS,
            sync_config=tune.SyncConfig(sync_artifacts=True),
            callbacks=[CellRecorder(place.folder / cell_dir, arm_targets, ab.cpu, ab.gpu), progress, StudySync(place),
                       *tune_callbacks(2, ab.metric, ab.mode)],  # best 2 + latest
            progress_reporter=ray_status_reporter(place.folder, ab.metric, ab.tune_metric, ["cell"]),
            checkpoint_config=checkpoint_config(),
            failure_config=tune.FailureConfig(max_failures=ab.max_retries)))
    with showing_progress(place.folder):
        tuner.fit()


def _grid_to_restore(experiment: Path, held: list[str]) -> list[str]:
    """The cells Ray's restore is to generate trials for: all it holds, which its variant
    generator's saved state marks as generated already. A SIGKILL while the driver copied that
    state into the experiment folder (a plain copy) leaves it torn; Ray then fails to restore,
    logs it, and silently starts the experiment again, every cell from scratch under a new MLflow
    run. The torn file is set aside instead, and the fresh generator gets only the cells that have
    no trial in the experiment's state, so the others continue from their checkpoints."""
    torn = torn_ray_state(experiment)
    if not torn:
        return held
    if torn != [t for t in torn if t.name.startswith("basic-variant-state-")]:
        raise ConfigError("ray state", f"{torn[0]} is torn (the driver was killed while Ray copied it), so Ray cannot "
                          "resume these cells", f"move {experiment} and {experiment}.json aside: the cells run again")
    log.warning(f"{torn[0]} is torn, as a kill left it: set aside; the cells continue from their checkpoints")
    torn[0].rename(torn[0].with_name(f".torn-{torn[0].name}"))
    newest = max(experiment.glob("experiment_state-*.json"), default=None)
    trials = json.loads(newest.read_text())["trial_data"] if newest is not None else []
    have = {json.loads(t[0])["config"].get("cell") for t in trials}
    return [c for c in held if c not in have]


def _cell_experiments(folder: Path, cell_dir: str) -> dict[str, list[str]]:
    """The Ray experiments of ``cell_dir``'s cells, oldest first, with the cells each holds."""
    manifests = sorted((folder / "ray").glob(f"{cell_dir}-*.json"), key=lambda p: int(p.stem.rsplit("-", 1)[1]))
    return {p.stem: json.loads(p.read_text()) for p in manifests}


def _data_identity(cfg: Any) -> str:
    flat = cfg.flat()
    return repr(sorted((k, v) for k, v in flat.items() if k.startswith("data.") or k in DATA_KEYS))


class CellRecorder(tune.Callback):
    """Writes ``cells/<arm>__seed<k>.json`` the moment a cell finishes (so a killed driver loses no
    finished cell) and closes its MLflow run."""

    def __init__(self, cell_dir: Path, arm_targets: dict[str, T.TrackingTarget], cpu: float, gpu: float):
        self.cell_dir, self.arm_targets, self.cpu, self.gpu = cell_dir, arm_targets, cpu, gpu

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.cell_dir = relocate(self.cell_dir)
        self.arm_targets = {arm: dataclasses.replace(t, spool_dir=relocate(t.spool_dir)) for arm, t in self.arm_targets.items()}

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        result = reported(trial)
        arm, seed = cell_of(trial.config)
        if not result.get("finished"):
            return self._close(trial, arm, result, STATUS_ERRORED, "the cell ended before training finished")
        record = {"arm": arm, "seed": seed, "trial_id": trial.trial_id,
                  "metrics": {k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)},
                  "details": result_details(result)}
        write_json(self.cell_dir / f"{cell_name(arm, seed)}.json", record, indent=1)
        self._close(trial, arm, result, "completed")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        arm, _ = cell_of(trial.config)
        self._close(trial, arm, reported(trial), STATUS_ERRORED, trial_error_text(trial))

    def _close(self, trial: Any, arm: str, result: dict, status: str, error: str | None = None) -> None:
        cost = T.trial_cost(float(result.get("time_total_s", 0.0)), self.cpu, self.gpu)
        T.close_trial(self.arm_targets[arm], trial.trial_id, status, cost=cost, error=error,
                      step=int(result.get("step", 0)), run_id=result.get("mlflow_run_id"))


def cells_table(folder: Path, cell_dir: str | None = None):
    """One row per finished cell: arm, seed, final dev (and, in the final phase, test) metrics,
    details (JSON), trial id. ``cell_dir`` defaults to :func:`dev_cell_dir`."""
    import pandas as pd

    keys = [f"{split}/{m}" for split in ("dev", "test") for m in ("accuracy", "macro_f1", "weighted_f1", "loss")]
    rows = []
    for cell in load_cells(folder, cell_dir):
        m = cell["metrics"]
        rows.append({"arm": cell["arm"], "seed": cell["seed"], "trial_id": cell["trial_id"],
                     **{k: m.get(k) for k in (*keys, "best/dev/weighted_f1", "time_total_s") if k in m},
                     "details": json.dumps(cell["details"])})
    return pd.DataFrame(rows)


def write_ablation_report(ab: Ablation, folder: Path, top: T.TrackingTarget | None = None,
                          arm_targets: dict[str, T.TrackingTarget] | None = None) -> dict[str, Path]:
    """The statistics report (Markdown, LaTeX, CSV, plot), printed and logged to MLflow."""
    from lcl_tune.analysis import report as R

    table = cells_table(folder)
    if not len(table):
        raise RuntimeError(f"no finished cells in {folder / dev_cell_dir(folder)}")
    selection = [ab.selection_seed] if ab.selection_seed is not None else None
    rep = R.summarise(R.cells_from_table(table), baseline=ab.baseline, selection_seeds=selection)
    out = folder / "report"
    out.mkdir(exist_ok=True)
    files = R.write_report(rep, out)
    metric = ab.metric.split("/", 1)[1]
    files["plot"] = R.plot_arms(rep, metric, out / "arms.png")
    table.to_parquet(out / "cells.parquet", index=False)
    log.info("\n" + R.to_markdown(rep))
    log.info(f"report: {out / 'report.md'}")
    if top is not None and arm_targets is not None and wait_for_spools(top, folder):
        log_report_to_mlflow(rep, ab, table, top, arm_targets, list(files.values()) + [out / "cells.parquet"])
    return files


def write_test_report(ab: Ablation, folder: Path) -> dict[str, Path]:
    """The final phase's report on the test split (``report/test/``): mean ± 95% CI per arm, paired
    tests against the baseline, and ``paper_table.tex`` in the layout of the paper's Table 1."""
    from lcl_tune.analysis import report as R

    table = cells_table(folder, FINAL_DIR)
    if not len(table):
        raise RuntimeError(f"no finished final cells in {folder / FINAL_DIR}")
    selection = [ab.selection_seed] if ab.selection_seed is not None else None
    rep = R.summarise(R.cells_from_table(table, prefix="test/"), baseline=ab.baseline, selection_seeds=selection)
    out = folder / "report" / "test"
    files = R.write_report(rep, out)
    dataset = ab.base.get("data", {}).get("preset") or ab.name
    files["paper"] = atomic_write(out / "paper_table.tex", R.paper_table({dataset: rep}))
    log.info("\ntest split:\n" + R.to_markdown(rep))
    log.info(f"test report: {out / 'report.md'}; paper table: {files['paper']}")
    return files


def log_report_to_mlflow(rep: Any, ab: Ablation, table: Any, top: T.TrackingTarget,
                         arm_targets: dict[str, T.TrackingTarget], artifacts: list[Path]) -> None:
    """Arm runs get their mean/std/CI and cost totals; the ablation run gets the tables and plot."""
    from lcl_tune.analysis import report as R

    arms = R.arm_metrics(rep)
    for arm, target in arm_targets.items():
        ledger = T.cost_summary(target, [], None)
        T.finish_study(target, summary_metrics={**arms.get(arm, {}), **{k: ledger[k] for k in T.COST_KEYS}},
                       tags={"lcl_tune.cells": str(int((table["arm"] == arm).sum()))}, artifacts=[])
    totals = {k: 0.0 for k in T.COST_KEYS}
    for target in arm_targets.values():
        for run in T.child_runs(target):
            for k in T.COST_KEYS:
                totals[k] += run.data.metrics.get(k, 0.0)
    T.finish_study(top, summary_metrics=totals, tags={"lcl_tune.baseline": ab.baseline,
                                                      "lcl_tune.seeds": ",".join(map(str, ab.seeds))},
                   artifacts=artifacts)
