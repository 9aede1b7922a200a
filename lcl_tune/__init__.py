"""lcl_tune: hyperparameter search and ablation studies for label-aware contrastive fine-tuning.

The subpackages are the layers; imports run down this list, never up:

* :mod:`lcl_tune.schema`    trial config, study and ablation YAML (no heavy imports: validation is instant)
* :mod:`lcl_tune.core`      losses, weighting networks, model, data, engine, metrics, memory estimate
  (torch / transformers / datasets / pyarrow; runs without Ray)
* :mod:`lcl_tune.analysis`  ablation statistics and plots (pure functions)
* :mod:`lcl_tune.adapters`  the only code importing Ray, Optuna and MLflow
* :mod:`lcl_tune.workflows` export of the best configuration, final training, prediction, comparison
* :mod:`lcl_tune.cli`       ``lcl-tune``, the MLflow UI wrapper, the offline cluster check

:mod:`lcl_tune.util` holds the few helpers every layer shares (atomic writes, "did you mean",
JSON-safe values, the package logger).
"""
