"""The user-facing edge: the ``lcl-tune`` command (:mod:`lcl_tune.cli.main`), the MLflow UI
wrapper (:mod:`lcl_tune.cli.ui`) and the offline cluster check (:mod:`lcl_tune.cli.cluster_check`).

``python -m lcl_tune.cli`` is ``lcl-tune``.
"""
