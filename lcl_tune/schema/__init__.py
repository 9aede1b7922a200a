"""The schema: the typed trial config and the study and ablation YAML files.

Imports PyYAML and the standard library only (never torch, Ray, Optuna or MLflow), so
``lcl-tune validate`` answers instantly and every problem is found before anything heavy loads.
"""
