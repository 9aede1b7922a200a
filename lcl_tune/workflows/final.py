"""Final training of an exported config: ``lcl-tune train best.yaml --final [--seeds ...]``.

For each seed: train the exact config, evaluate the test split once, save the fine-tuned encoder
and tokenizer with ``save_pretrained`` (plus the classification head, the config and the label
names), and log a final MLflow run that points back at the run the config was exported from.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch

from lcl_tune.schema.trial import TrialConfig
from lcl_tune.util import log, write_json


def save_model(trainer: Any, folder: Path) -> Path:
    """``folder/encoder`` (save_pretrained), ``folder/tokenizer``, ``head.pt`` (state dict),
    ``labels.json``, ``config.yaml``: everything needed to classify with the model again."""
    from lcl_tune.core.model import load_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    trainer.model.encoder.save_pretrained(folder / "encoder")
    load_tokenizer(trainer.cfg.model.name, trainer.cfg.model.tokenizer).save_pretrained(folder / "tokenizer")
    torch.save(trainer.model.head.state_dict(), folder / "head.pt")
    (folder / "labels.json").write_text(json.dumps(trainer.data.label_names))
    (folder / "config.yaml").write_text(trainer.cfg.to_yaml())
    return folder


def train_final(cfg: TrialConfig, out: Path, seeds: list[int] | None = None,
                provenance: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Train ``cfg`` once per seed (default: its own); returns one summary per seed."""
    from lcl_tune.core.engine import Trainer, prepare_trial_data

    data, w_data = prepare_trial_data(cfg)
    summaries = []
    for seed in seeds or [cfg.seed]:
        run_cfg = copy.deepcopy(cfg)
        run_cfg.seed = seed
        run_cfg.train.eval_test = True
        folder = out / f"seed{seed}"
        folder.mkdir(parents=True, exist_ok=True)
        log.info(f"final training, seed {seed} -> {folder}")
        trainer = Trainer(run_cfg, data=data, w_data=w_data)
        summary = trainer.fit()
        save_model(trainer, folder / "model")
        summary["model_dir"] = str(folder / "model")
        summary["mlflow"] = log_final_run(run_cfg, summary, folder, provenance)
        write_json(folder / "metrics.json", summary)
        summaries.append(summary)
    return summaries


def log_final_run(cfg: TrialConfig, summary: dict[str, Any], folder: Path,
                  provenance: dict[str, Any] | None) -> dict[str, str] | None:
    """A ``final`` run in the experiment the config was exported from (linked by the
    ``lcl_tune.exported_from`` tag); without a source store, in an experiment ``final`` of the
    store of the storage root the output folder is in (``lcl_runs/mlflow.db`` for the default
    ``lcl_runs/final/<name>``), or of the output folder's parent when no store is found."""
    from lcl_tune.adapters import tracking as T

    source = (provenance or {}).get("mlflow") or {}
    uri = source.get("tracking_uri") or T.default_uri(_store_above(folder.parent))
    try:
        client = T.open_store(uri)
    except Exception as e:  # noqa: BLE001 - the model is saved; tracking must not lose it
        log.warning(f"MLflow unavailable at {uri}: {e}; final run not logged (the model is saved)")
        return None
    exp_id = source.get("experiment_id") or T.get_or_create_experiment(client, "final", T.artifact_root(uri))
    tags = {T.TAG_ROLE: "final", "lcl_tune.seed": str(cfg.seed)}
    if source.get("run_id"):
        tags["lcl_tune.exported_from"] = source["run_id"]
    if provenance:
        tags["lcl_tune.source"] = f"{provenance.get('source')}:{provenance.get('name')}"
    run_id = client.create_run(exp_id, run_name=f"final·seed {cfg.seed}", tags=tags).info.run_id
    metrics = {k: v for k, v in summary["final"].items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    test = summary.get("test") or {}
    metrics.update({f"test/{k}": test[k] for k in ("accuracy", "macro_f1", "weighted_f1", "loss") if k in test})
    T.log_params(client, run_id, cfg.flat())
    T.log_metrics(client, run_id, metrics, step=int(summary["final"].get("step", 0)))
    T.log_details(client, run_id, summary.get("details", {}), cfg.to_yaml())
    client.set_terminated(run_id, "FINISHED")
    return {"tracking_uri": uri, "experiment_id": exp_id, "run_id": run_id}


def _store_above(folder: Path) -> Path:
    """The nearest folder at or above ``folder`` that holds a store, else ``folder`` itself."""
    from lcl_tune.adapters.tracking import STORE_NAME

    folder = folder.resolve()
    return next((f for f in (folder, *folder.parents) if (f / STORE_NAME).is_file()), folder)
