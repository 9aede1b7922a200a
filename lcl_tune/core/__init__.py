"""The training core: losses, weighting networks, model, data, the engine, metrics and the memory
estimate.

Depends on torch, transformers, datasets and pyarrow (and on :mod:`lcl_tune.schema`), never on
Ray, Optuna, MLflow or the layers above: one fine-tuning runs without any of them.
"""
