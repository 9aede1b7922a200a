"""Adapters: the only code that imports Ray, Optuna and MLflow.

The trainable wraps :class:`lcl_tune.core.engine.Trainer` for Ray Tune; the study and ablation
runners schedule trials; tracking writes the MLflow layout.
"""
