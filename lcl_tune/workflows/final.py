"""Final training of an exported config: ``lcl-tune train best.yaml --final [--seeds ...]``.

For each seed: train the exact config, evaluate the test split once, save the fine-tuned model as a
transformers folder (``seed<k>/model``: loads with ``AutoModelForSequenceClassification`` and
``pipeline``), write the test split's predictions, and log a final MLflow run that points back at
the run the config was exported from.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from lcl_tune.schema.trial import TrialConfig
from lcl_tune.util import atomic_write, log, write_json


MODEL_DIR = "model"
PREDICTIONS_FILE = "test_predictions.csv"
TRIAL_CONFIG = "lcl_tune.yaml"


def save_model(trainer: Any, folder: Path) -> Path:
    """A transformers model folder: ``config.json`` (with ``id2label``/``label2id``), the weights and
    the tokenizer side by side, so ``AutoModelForSequenceClassification.from_pretrained(folder)``,
    ``pipeline("text-classification", model=folder)`` and ``lcl-tune predict folder`` all load it;
    plus ``lcl_tune.yaml``, the trial config it was trained with. The tokenizer's ``model_max_length``
    is the training's ``model.max_length``, so ``truncation=True`` cuts texts where training did."""
    from lcl_tune.core.model import load_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    trainer.model.hf.save_pretrained(folder)
    tokenizer = load_tokenizer(trainer.cfg.model.name, trainer.cfg.model.tokenizer)
    tokenizer.model_max_length = trainer.cfg.model.max_length
    tokenizer.save_pretrained(folder)
    (folder / TRIAL_CONFIG).write_text(trainer.cfg.to_yaml())
    return folder


def write_test_predictions(trainer: Any, test: Any, path: Path) -> Path | None:
    """Each test row's text, gold label, predicted label and its probability, from the project's
    own evaluation: what the saved model must reproduce, and the rows to read for error analysis.
    ``test``: the raw test split (``RawSplit``) the trainer's data was tokenised from."""
    import pandas as pd

    if test is None or trainer.data.test is None:
        return None
    probs = torch.softmax(trainer.predict("test"), dim=-1)
    best = probs.max(dim=-1)
    names = trainer.data.label_names
    table = pd.DataFrame({"text": test.texts, "label": [names[i] for i in test.labels],
                          "predicted": [names[i] for i in best.indices.tolist()],
                          "probability": best.values.numpy()})
    return atomic_write(path, lambda tmp: table.to_csv(tmp, index=False))


def train_final(cfg: TrialConfig, out: Path, seeds: list[int] | None = None,
                provenance: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Train ``cfg`` once per seed (default: its own); returns one summary per seed."""
    from lcl_tune.core.data import load_raw
    from lcl_tune.core.engine import Trainer, prepare_trial_data

    raw = load_raw(cfg.data)  # read once: tokenised for training, its test texts for the predictions
    data, w_data = prepare_trial_data(cfg, raw=raw)
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
        save_model(trainer, folder / MODEL_DIR)
        write_test_predictions(trainer, raw.test, folder / PREDICTIONS_FILE)
        summary["model_dir"] = str(folder / MODEL_DIR)
        summary["mlflow"] = log_final_run(run_cfg, summary, folder, provenance)
        write_json(folder / "metrics.json", summary)
        summaries.append(summary)
        release(trainer)
        del trainer
    return summaries


def release(trainer: Any) -> None:
    """Drop a finished seed's model, weighting network and optimiser, and give their GPU memory
    back, before the next seed's are built: otherwise both seeds' weights, gradients and optimiser
    state are held at once, and the next seed may not fit where a study's trial did."""
    import gc

    import torch

    for name in ("model", "weighting", "optimizer", "scheduler"):
        setattr(trainer, name, None)
    gc.collect()
    torch.cuda.empty_cache()  # a no-op where CUDA was never initialised


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
