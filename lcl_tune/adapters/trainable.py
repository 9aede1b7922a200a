"""The Ray Tune trainable: one trial = one :class:`~lcl_tune.core.engine.Trainer` run.

It lives in the package (not in a script or a test) so Ray workers can import it. Per evaluation
period it reports every scalar metric plus the best-so-far value of the study metric (what Optuna
must see: OptunaSearch takes a trial's *last* reported value) and a checkpoint holding weights,
optimiser and counters only (``torch.load(weights_only=True)``: never pickled code). On a retry or
a restored study the trial continues from its last checkpoint.

Fault injection for the end-to-end tests lives with the tests (``tests/faults/sitecustomize.py``),
not here.
"""

from __future__ import annotations

import errno
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
from ray import tune

from lcl_tune.core.failures import oom_is_a_resource_problem
from lcl_tune.schema.study import Study

STATE_FILE = "state.pt"
DETAILS_FILE = "details.json"
TRIAL_CONFIG_FILE = "trial_config.yaml"
SEND_AT_END_S = 10.0  # how long a finished trial waits for its spooled tracking records to be sent


def lcl_trainable(params: dict[str, Any], study: Study, data: Any = None, w_data: Any = None,
                  tracking: Any = None) -> None:
    """Function trainable. ``params``: the sampled dotted keys; ``study``: the validated study;
    ``data``/``w_data``: tokenised splits prepared once on the driver and shared through the
    object store (``tune.with_parameters``), so no trial tokenises; ``tracking``: the study's
    :class:`~lcl_tune.adapters.tracking.TrackingTarget`, or for an ablation a mapping arm -> target of the
    arm's run (None: no MLflow).

    ``study`` is a :class:`~lcl_tune.schema.study.Study` or an :class:`~lcl_tune.schema.ablation.Ablation`:
    anything with ``trial_config(params)``, ``run_labels(params)``, ``name`` and ``cpu``."""
    cfg = study.trial_config(params)
    with oom_is_a_resource_problem(study.gpu, cfg.train.batch_size):
        _run_trial(params, study, cfg, data, w_data, tracking)


def trial_device(device: str, gpus: float) -> str:
    """``auto`` is the CPU for a trial that reserved no GPU. Ray sets ``CUDA_VISIBLE_DEVICES`` only
    for trials that reserved one: on a GPU node such a trial sees every GPU, and ``auto`` would put
    it on GPU 0 (a CPU ablation, with no concurrency cap, one CUDA context per CPU on one card)."""
    return "cpu" if device == "auto" and gpus <= 0 else device


def complete_log_streams() -> None:
    """Ray's ``log_to_file`` swaps ``sys.stdout``/``sys.stderr`` for a ``Tee`` that has no
    ``isatty()``; a library that asks (transformers' loading report does, whenever a pretrained
    encoder gets a new classification head) would crash the trial. A Tee is not a terminal."""
    for stream in (sys.stdout, sys.stderr):
        if stream is not None and not hasattr(stream, "isatty"):
            stream.isatty = lambda: False


def _run_trial(params: dict[str, Any], study: Any, cfg: Any, data: Any, w_data: Any, tracking: Any) -> None:
    entered = time.time()
    complete_log_streams()
    from lcl_tune.core.engine import Trainer

    context = tune.get_context()
    run = None
    if tracking is not None:  # first, so a trial that fails to start still shows its params
        from lcl_tune.adapters.tracking import TrialRun

        name, tags = study.run_labels(params)
        target = tracking[tags["lcl_tune.arm"]] if isinstance(tracking, dict) else tracking
        run = TrialRun(target, context.get_trial_id(), cfg.flat(), tags, name=name)
    threads = max(1, int(study.cpu)) if cfg.train.device in ("auto", "cpu") else None
    if threads and not cfg.train.threads:
        cfg.train.threads = threads  # a trial uses the CPUs it reserved, no more (trials share nodes)
    trainer = Trainer(cfg, data=data, w_data=w_data, progress=False, device=trial_device(cfg.train.device, study.gpu))
    config_yaml = cfg.to_yaml()
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        restore_checkpoint(trainer, checkpoint)
    start = time.time()
    node_id = ray.get_runtime_context().get_node_id()
    for report in trainer.run():
        metrics = {k: v for k, v in report.items() if isinstance(v, (int, float, bool))}
        details = {**report.pop("details"), "trial_config": cfg.to_dict(), "data_fingerprint": trainer.data.fingerprint,
                   "metrics": dict(metrics)}  # this period's values: export picks the best period's checkpoint
        metrics["time/trial_wall_s"] = time.time() - start
        if run is not None:  # before tune.report: a trial that ASHA stops never returns from it
            run.log_report(metrics, step=report["step"])
            run.log_details(details, config_yaml)
        metrics["trial_id"] = context.get_trial_id()
        if run is not None and run.run_id:  # the driver closes this run by its id, without a search of the store
            metrics["mlflow_run_id"] = run.run_id
        metrics["node_id"] = node_id  # where Ray placed the trial (multi-node studies)
        metrics["time/entered_unix"] = entered  # with Tune's start time: the trial start latency
        metrics["time/reported_unix"] = time.time()  # Ray's own ``timestamp`` is in whole seconds
        metrics["data/shared"] = int(data is not None)  # tokenised once on the driver, not in this trial
        metrics["details_json"] = json.dumps(details)  # for the driver: the ablation's cell records, the trial's figure
        with tempfile.TemporaryDirectory() as folder:
            save_checkpoint(trainer, Path(folder) / STATE_FILE, context.get_trial_id())
            (Path(folder) / DETAILS_FILE).write_text(json.dumps(details))
            (Path(folder) / TRIAL_CONFIG_FILE).write_text(config_yaml)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))
    if run is not None:  # what is still spooled after this stays in spool/ for the driver or lcl-tune sync
        run.close(timeout=SEND_AT_END_S)


def checkpoint_candidates(latest: Path) -> list[Path]:
    """The state files to try on a restore, newest first: Ray's latest checkpoint, then the older
    ones it kept beside it (``checkpoint.keep`` >= 2), so a damaged latest one falls back to the
    previous good one, and a missing one (deleted by hand: the keeper never deletes one that a
    saved state names, :mod:`lcl_tune.adapters.keeper`) to the newest older one."""
    older = sorted((p for p in latest.parent.glob("checkpoint_*") if p.is_dir() and p.name < latest.name), reverse=True)
    return [latest / STATE_FILE] * latest.is_dir() + [p / STATE_FILE for p in older]


def restore_checkpoint(trainer: Any, checkpoint: tune.Checkpoint) -> Path | None:
    """Restore the newest readable checkpoint of this trial (see :func:`checkpoint_candidates`).
    On a local or shared filesystem the older ones are read in place; on remote storage only the
    latest is fetched."""
    from lcl_tune.core.engine import restore_first_good

    local = Path(checkpoint.path)
    if checkpoint.filesystem.type_name == "local":
        return restore_first_good(trainer, checkpoint_candidates(local))
    with checkpoint.as_directory() as folder:
        return restore_first_good(trainer, [Path(folder) / STATE_FILE])


def save_checkpoint(trainer: Any, path: Path, trial_id: str) -> None:
    """Save, naming a full disk for what it is. The write is atomic, so the checkpoints already
    kept are untouched; the trial fails and its retry resumes from the last of them."""
    try:
        trainer.save(path)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise OSError(e.errno, f"disk full while writing the checkpoint of trial {trial_id} ({path.parent}): "
                          "the previous checkpoints are intact; free space, then rerun with --resume") from e
        raise


def result_details(result: dict[str, Any]) -> dict[str, Any]:
    """The details (confusion matrix, per-class F1, config) a trial put in a Ray result."""
    return json.loads(result.get("details_json") or "{}")
