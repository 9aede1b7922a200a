"""DEHB's ask and tell over a pipe, for ``bench_search.py``'s replay.

DEHB (Awad, Mallik & Hutter 2021; automl's ``dehb`` package) is a model-based multi-fidelity
optimiser: differential evolution inside Hyperband's brackets. It is not a project dependency, so it
runs here, in the benchmark-only environment ``bench_search.py --setup-mf`` creates, and the
replay (in the project's environment) drives it one JSON line at a time:

    {"op": "init", "seed": 0, "params": [...], "min_fidelity": 1, "max_fidelity": 8, "eta": 2}
    {"op": "ask"}                         -> {"job": 0, "config": {...}, "fidelity": 2}
    {"op": "tell", "job": 0, "fitness": -0.61, "cost": 2}

Nothing here reads the table: the replay decides what a job scores.
"""

from __future__ import annotations

import json
import sys
import tempfile
from typing import Any


def config_space(params: list[dict], seed: int) -> Any:
    """The study's space for ConfigSpace. A conditional parameter is kept unconditional: the replay
    ignores its value where its condition does not hold, as the project's own space does."""
    import ConfigSpace as CS

    cs = CS.ConfigurationSpace(seed=seed)
    for p in params:
        if p["type"] == "categorical":
            cs.add(CS.Categorical(p["key"], p["values"]))
        elif p["type"] == "int":
            cs.add(CS.Integer(p["key"], (int(p["low"]), int(p["high"]))))
        else:
            cs.add(CS.Float(p["key"], (float(p["low"]), float(p["high"])), log=p["type"] == "loguniform"))
    return cs


def plain(value: Any) -> Any:
    """A ConfigSpace value as JSON: numpy scalars to Python ones."""
    return value.item() if hasattr(value, "item") else value


def main() -> None:
    out, sys.stdout = sys.stdout, sys.stderr  # DEHB's logger writes to stdout: keep the pipe clean
    from dehb import DEHB

    dehb, jobs, asked, folder = None, {}, 0, tempfile.mkdtemp(prefix="dehb-")
    for line in sys.stdin:
        msg = json.loads(line)
        if msg["op"] == "init":
            dehb = DEHB(cs=config_space(msg["params"], msg["seed"]), min_fidelity=msg["min_fidelity"],
                        max_fidelity=msg["max_fidelity"], eta=msg["eta"], n_workers=1, seed=msg["seed"],
                        output_path=folder, log_level="ERROR", save_freq=None)
            reply: dict[str, Any] = {"ok": True}
        elif msg["op"] == "ask":
            jobs[asked] = job = dehb.ask()
            reply = {"job": asked, "fidelity": int(round(float(job["fidelity"]))),
                     "config": {k: plain(v) for k, v in dict(job["config"]).items()}}
            asked += 1
        elif msg["op"] == "tell":
            dehb.tell(jobs.pop(msg["job"]), {"fitness": msg["fitness"], "cost": msg["cost"]})
            reply = {"ok": True}
        else:
            reply = {"error": f"unknown op {msg['op']!r}"}
        out.write(json.dumps(reply) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
