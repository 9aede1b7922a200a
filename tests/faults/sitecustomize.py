"""Fault injection for end-to-end tests, kept out of the production code.

A test that runs a study with ``PYTHONPATH=tests/faults`` and ``LCL_TUNE_FAIL_WHEN`` set makes every
Python process of it (the driver and Ray's trial workers, which inherit the environment) import
this file at start-up. Once :mod:`lcl_tune.core.engine` is imported, ``Trainer.run`` is wrapped so
that matching trials fail:

* ``key=value``: trials whose config has that value raise before training, on every attempt;
* ``key=value@N``: they raise once, at evaluation period N of a first attempt (an attempt that
  restored a checkpoint passes);
* a ``:oom`` suffix raises CUDA's out-of-memory error instead of a RuntimeError.

Several rules are separated by ``;``. Keys are the dotted trial-config keys.

``LCL_TUNE_PERIOD_S=S`` (alone or with the rules) makes every evaluation period last at least S
seconds, as a real trial's would: long enough studies for outage tests, on a tiny model.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys

FAIL_ENV = "LCL_TUNE_FAIL_WHEN"
PERIOD_ENV = "LCL_TUNE_PERIOD_S"
TARGET = "lcl_tune.core.engine"


def _rules() -> list[tuple[str, str, int | None, bool]]:
    rules = []
    for rule in filter(None, os.environ.get(FAIL_ENV, "").split(";")):
        rule, _, kind = rule.partition(":")
        condition, _, at = rule.partition("@")
        key, _, value = condition.partition("=")
        rules.append((key, value, int(at) if at else None, kind == "oom"))
    return rules


def _maybe_fail(flat: dict, period: int, resumed: bool) -> None:
    import torch

    for key, value, at, oom in _rules():
        if key not in flat or str(flat[key]) != value:
            continue
        if (at is None and period == 0) or (at is not None and at == period and not resumed):
            where = f" at period {at}" if at is not None else ""
            message = f"injected failure for {key}={value}{where} ({FAIL_ENV})"
            raise torch.cuda.OutOfMemoryError(message) if oom else RuntimeError(message)


def _patch(engine) -> None:
    trainer = engine.Trainer
    run, restore = trainer.run, trainer.restore

    def restore_and_mark(self, *args, **kwargs):
        self._fault_resumed = True
        return restore(self, *args, **kwargs)

    def failing_run(self, *args, **kwargs):
        import time

        flat, resumed = self.cfg.flat(), getattr(self, "_fault_resumed", False)
        period_s = float(os.environ.get(PERIOD_ENV) or 0)
        _maybe_fail(flat, 0, resumed)
        start = time.monotonic()
        for report in run(self, *args, **kwargs):
            time.sleep(max(0.0, period_s - (time.monotonic() - start)))
            _maybe_fail(flat, report["period"], resumed)
            yield report
            start = time.monotonic()

    trainer.restore, trainer.run = restore_and_mark, failing_run


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Finds the engine module with the normal machinery, then patches it right after it runs."""

    def find_spec(self, name, path, target=None):
        if name != TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return None
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            _patch(module)

        spec.loader.exec_module = exec_and_patch
        return spec


if os.environ.get(FAIL_ENV) or os.environ.get(PERIOD_ENV):
    sys.meta_path.insert(0, _PatchOnImport())
