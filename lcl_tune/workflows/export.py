"""Export the selected trial (of a study) or arm (of an ablation) as a complete trial config with
provenance, ready for ``lcl-tune train best.yaml --final``.

The exported file is a plain trial config (the loader ignores its ``provenance:`` section) holding
exactly what the selected trial trained with, plus where it came from: study or ablation name,
MLflow run id, the selection rule and its metric values, git commit, package versions and the data
fingerprint.
"""

from __future__ import annotations

import json
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import yaml

from lcl_tune.schema import trial as C
from lcl_tune.schema.trial import ConfigError
from lcl_tune.util import json_safe, redact

SELECT_RULES = ("best", "mean", "lcb")
PACKAGES = ("lcl-tune", "torch", "transformers", "datasets", "ray", "optuna", "mlflow", "pyarrow")


def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def export(folder: str | Path, select: str = "best") -> dict[str, Any]:
    """The exported document (trial config + ``provenance``) for the study or ablation in ``folder``."""
    folder = Path(folder).resolve()
    C.one_of("--select", select, SELECT_RULES)
    if (folder / "study.yaml").is_file():
        return _export_study(folder, select)
    if (folder / "ablation.yaml").is_file():
        return _export_ablation(folder, select)
    raise ConfigError("DIR", f"{folder} is neither a study nor an ablation folder",
                      "pass STORAGE/NAME of a finished `lcl-tune tune` or `lcl-tune ablate`")


def _export_study(folder: Path, select: str) -> dict[str, Any]:
    import pandas as pd

    from lcl_tune.adapters.study_runner import best_row
    from lcl_tune.schema.study import load_study

    if select != "best":
        raise ConfigError("--select", f"{select!r} ranks arms over seeds and needs an ablation folder",
                          "use --select best for a study")
    results = folder / "results.parquet"
    C.check(results.is_file(), "DIR", f"no results.parquet in {folder}", "let the study finish (or --resume it)")
    study = load_study(folder / "study.yaml", check_files=False)
    row = best_row(pd.read_parquet(results), study)
    C.check(row is not None, "DIR", "no trial of this study finished", "look at the errors in results.parquet")
    details, checkpoint = best_checkpoint(row["path"], study.metric, study.mode)
    selected = details.get("metrics", {})
    step = int(selected.get("step", row.get("step", 0)))
    selection = {"rule": "best", "metric": study.tune_metric, "value": float(row[study.tune_metric]),
                 "final": {k: float(selected.get(k, row.get(k))) for k in ("dev/accuracy", "dev/macro_f1",
                                                                            "dev/weighted_f1") if k in selected or k in row},
                 "trial_id": row["trial_id"], "status": row["status"], "step": step, "checkpoint": checkpoint}
    config = details["trial_config"]
    config.setdefault("train", {})["stop_step"] = step  # train --final stops where the selected period ended
    return _document(config, "study", study.name, folder, row["trial_id"], selection,
                     details.get("data_fingerprint"))


def best_checkpoint(trial_dir: str, metric: str, mode: str) -> tuple[dict[str, Any], str]:
    """``details.json`` and path of the trial's checkpoint with the best ``metric`` (the period the
    study selected it by; the earliest of equals), in a local folder or a storage URI. Checkpoints
    written before they carried their metrics count as their own latest."""
    from pyarrow import fs

    filesystem, root = fs.FileSystem.from_uri(trial_dir) if "://" in trial_dir else (fs.LocalFileSystem(), trial_dir)
    infos = filesystem.get_file_info(fs.FileSelector(root, allow_not_found=True))
    checkpoints = sorted(i.path for i in infos if i.type == fs.FileType.Directory and i.base_name.startswith("checkpoint_"))
    C.check(bool(checkpoints), "DIR", f"no checkpoint with details in {trial_dir}", "the trial must have reported once")
    found = []
    for path in checkpoints:
        with filesystem.open_input_stream(f"{path}/details.json") as fh:
            found.append((json.loads(fh.read().decode()), path))
    sign = 1.0 if mode == "max" else -1.0

    def rank(i: int) -> tuple[bool, float, int]:
        value = found[i][0].get("metrics", {}).get(metric)
        return value is not None, sign * value if value is not None else 0.0, -i

    best = max(range(len(found)), key=rank)
    details, path = found[best] if rank(best)[0] else found[-1]
    return details, (f"{trial_dir.split('://')[0]}://{path}" if "://" in trial_dir else path)


def _export_ablation(folder: Path, select: str) -> dict[str, Any]:
    from lcl_tune.analysis import report as R
    from lcl_tune.adapters.ablation_runner import cells_table, load_cells
    from lcl_tune.schema.ablation import load_ablation

    ab = load_ablation(folder / "ablation.yaml", check_files=False)
    table = cells_table(folder)
    C.check(len(table) > 0, "DIR", f"no finished cells in {folder}", "let the ablation run (rerun the command)")
    metric = ab.metric.split("/", 1)[1]
    cells = {(c["arm"], c["seed"]): c for c in load_cells(folder)}
    if select == "best":
        ok = table.dropna(subset=[ab.metric])
        row = ok.loc[ok[ab.metric].idxmax() if ab.mode == "max" else ok[ab.metric].idxmin()]
        arm, seed = row["arm"], int(row["seed"])
        selection = {"rule": "best", "metric": ab.metric, "value": float(row[ab.metric]), "arm": arm, "seed": seed}
    else:
        rep = R.summarise(R.cells_from_table(table), baseline=ab.baseline)
        arm = R.best_arm(rep, metric, select)
        seed = min(s for (a, s) in cells if a == arm)
        values = [float(v) for v in table[table["arm"] == arm][ab.metric]]
        selection = {"rule": select, "metric": ab.metric, "arm": arm, "seeds": sorted(s for (a, s) in cells if a == arm),
                     "values": values, **R.arm_metrics(rep).get(arm, {})}
    cell = cells[(arm, seed)]
    selection["final"] = {k: cell["metrics"][k] for k in ("dev/accuracy", "dev/macro_f1", "dev/weighted_f1")}
    return _document(cell["details"]["trial_config"], "ablation", ab.name, folder, cell["trial_id"], selection,
                     cell["details"].get("data_fingerprint"))


def _document(trial_config: dict[str, Any], kind: str, name: str, folder: Path, trial_id: str,
              selection: dict[str, Any], fingerprint: str | None) -> dict[str, Any]:
    from lcl_tune.adapters.tracking import git_commit

    run = _mlflow_run(folder, trial_id)
    provenance = {"source": kind, "name": name, "folder": str(folder), "trial_id": trial_id,
                  "mlflow": run, "selection": selection, "git_commit": git_commit(),
                  "versions": package_versions(), "data_fingerprint": fingerprint,
                  "exported_at": time.strftime("%Y-%m-%d %H:%M:%S")}
    return {**trial_config, "provenance": provenance}


def _mlflow_run(folder: Path, trial_id: str) -> dict[str, str] | None:
    """The trial's MLflow run in the store of the study's storage root (or the study's own store,
    for a folder made before stores were shared); None when there is none."""
    from lcl_tune.adapters import tracking as T

    root = T.find_store(folder)
    if root is None:
        return None
    uri = T.default_uri(root)
    client = T.MlflowClient(tracking_uri=uri)
    exp_id = T.study_experiment(client, folder)
    runs = T.find_runs(client, exp_id, {T.TAG_TRIAL: trial_id}) if exp_id is not None else []
    if not runs:
        return None
    return {"tracking_uri": uri, "experiment_id": exp_id, "run_id": runs[0].info.run_id}


def write_export(doc: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.write_text(redact("# Exported by lcl-tune export; train it with:  lcl-tune train "
                           f"{path.name} --final\n" + yaml.safe_dump(json_safe(doc), sort_keys=False, allow_unicode=True)))
    return path


def read_provenance(path: str | Path) -> dict[str, Any] | None:
    """The ``provenance:`` section of an exported config (None for a hand-written one), checked:
    final training links its MLflow run through it."""
    prov = (C.load_yaml(path) or {}).get("provenance")
    if prov is None:
        return None
    fix = "re-export it with lcl-tune export, or delete the provenance section"
    if not isinstance(prov, dict):
        raise ConfigError("provenance", f"must be a mapping, got {type(prov).__name__}", fix, source=str(path))
    mlflow = prov.get("mlflow")
    if mlflow is not None and not (isinstance(mlflow, dict) and all(isinstance(v, str) for v in mlflow.values())):
        raise ConfigError("provenance.mlflow", "must map tracking_uri / experiment_id / run_id to strings", fix,
                          source=str(path))
    return prov
