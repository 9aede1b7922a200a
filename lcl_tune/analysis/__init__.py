"""Analysis: the ablation statistics and the plots, pure functions of tables and numbers.

No Ray, Optuna or MLflow here; the adapters and workflows call these and put the results where
they belong.
"""
