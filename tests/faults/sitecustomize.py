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

``LCL_TUNE_TRACE_TOKENISE=FILE`` (alone or with the others) appends one line per event to FILE, from
every process: ``tokenise <pid> <rows>`` each time a split is tokenised
(:func:`lcl_tune.core.data.tokenize_split`), ``trainer <pid>`` each time a
:class:`~lcl_tune.core.engine.Trainer` is built (before it prepares any data of its own). Lines are
appended with one ``write`` each (``O_APPEND``), so the file holds the events in the order they happened.

``LCL_TUNE_SLOW_CLOSE_S=S`` makes every tracking ``close`` record (the driver's close of a trial's
run, with its confusion-matrix figure) take S seconds more to send, as against a busy store: a
command that returned without waiting for its senders would leave closes unsent.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys

FAIL_ENV = "LCL_TUNE_FAIL_WHEN"
PERIOD_ENV = "LCL_TUNE_PERIOD_S"
TRACE_ENV = "LCL_TUNE_TRACE_TOKENISE"
SLOW_CLOSE_ENV = "LCL_TUNE_SLOW_CLOSE_S"
ENGINE, DATA, TRACKING = "lcl_tune.core.engine", "lcl_tune.core.data", "lcl_tune.adapters.tracking"


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


def _trace(event: str, *details: object) -> None:
    fd = os.open(os.environ[TRACE_ENV], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (" ".join(map(str, (event, os.getpid(), *details))) + "\n").encode())
    finally:
        os.close(fd)


def _patch_trace_engine(engine) -> None:
    init = engine.Trainer.__init__

    def traced_init(self, *args, **kwargs):
        _trace("trainer")
        return init(self, *args, **kwargs)

    engine.Trainer.__init__ = traced_init


def _patch_trace_data(data) -> None:
    tokenize_split = data.tokenize_split

    def traced_tokenize_split(split, *args, **kwargs):
        _trace("tokenise", len(split))
        return tokenize_split(split, *args, **kwargs)

    data.tokenize_split = traced_tokenize_split


def _patch_slow_close(tracking) -> None:
    execute = tracking.execute

    def slow_execute(record, state):
        if record["op"] == "close":
            import time

            time.sleep(float(os.environ[SLOW_CLOSE_ENV]))
        return execute(record, state)

    tracking.execute = slow_execute


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
    """Finds a patched module with the normal machinery, then patches it right after it runs."""

    def __init__(self, patches: dict):
        self.patches = patches  # module name -> functions that patch it

    def find_spec(self, name, path, target=None):
        if name not in self.patches:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return None
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            for patch in self.patches[name]:
                patch(module)

        spec.loader.exec_module = exec_and_patch
        return spec


_patches: dict = {}
if os.environ.get(TRACE_ENV):
    _patches.setdefault(ENGINE, []).append(_patch_trace_engine)
    _patches.setdefault(DATA, []).append(_patch_trace_data)
if os.environ.get(SLOW_CLOSE_ENV):
    _patches.setdefault(TRACKING, []).append(_patch_slow_close)
if os.environ.get(FAIL_ENV) or os.environ.get(PERIOD_ENV):
    _patches.setdefault(ENGINE, []).append(_patch)
if _patches:
    sys.meta_path.insert(0, _PatchOnImport(_patches))
