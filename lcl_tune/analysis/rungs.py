"""Does ASHA's first cut decide on signal or on noise? How well a trial's metric at each period
predicts its result at full length, measured on the study itself.

ASHA stops a trial at a rung when its metric there ranks low. That is only sound when the ranking
at the rung is close to the ranking at the end. Over the trials that ran to full length, the
Spearman rank correlation between their metric at period ``p`` and at the final period says how
close. Those trials are ASHA's survivors, so the range of their values is narrowed, and the
correlation understates what the rung sees over all trials. With fewer than :data:`MIN_TRIALS`
such trials, nothing is reported.

Pure: plain numbers in, plain numbers out (the study runner reads the curves from the Optuna
journal; ``lcl-tune status`` reads the file written here).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable, Mapping

MIN_TRIALS = 5  # below this, a rank correlation is noise itself
LOW = 0.5  # a first rung whose correlation is below this decides on noise
FILE = "rung_correlation.json"
NOTE = ("over the trials that ran to full length: ASHA's survivors, whose narrowed range understates the "
        "correlation over all trials")


def ranks(values: list[float]) -> list[float]:
    """1-based ranks, ties sharing their mean rank."""
    order = sorted(range(len(values)), key=values.__getitem__)
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in order[i:j + 1]:
            out[k] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(xs: list[float], ys: list[float]) -> float | None:
    """Spearman's ρ (Pearson's r of the ranks); None when either side does not vary."""
    if len(xs) != len(ys) or len(xs) < 2:
        return None
    rx, ry = ranks(xs), ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx, syy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return None if sxx == 0 or syy == 0 else sxy / math.sqrt(sxx * syy)


def asha_rungs(grace_period: int, reduction_factor: float, max_t: int) -> list[int]:
    """The periods at which ASHA compares trials: grace, grace·factor, … below ``max_t``."""
    rungs, t = [], float(grace_period)
    while t < max_t:
        rungs.append(int(round(t)))
        t *= reduction_factor
    return rungs


def rung_correlation(curves: Mapping[str, Mapping[int, float]], final_period: int, periods: Iterable[int],
                     rungs: Iterable[int] = (), min_trials: int = MIN_TRIALS) -> list[dict[str, Any]]:
    """For each of ``periods`` before ``final_period``: ``{period, rung, n, spearman}`` over the trials
    whose curve (period -> metric) holds both that period and ``final_period``; ``spearman`` is None
    below ``min_trials`` trials (or when the values do not vary)."""
    rungs = set(rungs)
    full = [c for c in curves.values() if final_period in c]
    out = []
    for p in sorted(set(periods)):
        if p >= final_period:
            continue
        pairs = [(c[p], c[final_period]) for c in full if p in c]
        rho = spearman([a for a, _ in pairs], [b for _, b in pairs]) if len(pairs) >= min_trials else None
        out.append({"period": p, "rung": p in rungs, "n": len(pairs), "spearman": rho})
    return out


def advice(rows: list[dict[str, Any]], grace_period: int) -> str | None:
    """The fix, when ASHA's first rung decides on noise (its correlation below :data:`LOW`)."""
    first = next((r for r in rows if r["rung"]), None)
    if first is None or first["spearman"] is None or first["spearman"] >= LOW:
        return None
    return (f"ASHA's first cut (period {first['period']}) ranks trials almost at random here: Spearman "
            f"{first['spearman']:.2f} with the final result over {first['n']} trials; raise "
            f"scheduler.grace_period (now {grace_period}) to the first period whose correlation is at least {LOW}")


def lines(doc: Mapping[str, Any]) -> list[str]:
    """The summary's and ``lcl-tune status``'s lines for a :func:`document`."""
    shown = [r for r in doc["periods"] if r["spearman"] is not None]
    if not shown:
        return [f"rung correlation: fewer than {doc['min_trials']} trials ran to full length (period "
                f"{doc['final_period']}); not measured"]
    cells = ", ".join(f"period {r['period']}{'*' if r['rung'] else ''} {r['spearman']:.2f} (n={r['n']})" for r in shown)
    out = [f"rung correlation with period {doc['final_period']} (Spearman, * ASHA's rungs): {cells}; {NOTE}"]
    return out + ([doc["advice"]] if doc.get("advice") else [])


def document(curves: Mapping[str, Mapping[int, float]], final_period: int, rungs: list[int], grace_period: int,
             metric: str, min_trials: int = MIN_TRIALS) -> dict[str, Any]:
    """What is written to :data:`FILE`: every period's figure, the rungs, the note, the advice."""
    periods = {p for c in curves.values() for p in c}
    rows = rung_correlation(curves, final_period, periods, rungs, min_trials)
    return {"metric": metric, "final_period": final_period, "rungs": rungs, "min_trials": min_trials,
            "trials_at_full_length": sum(final_period in c for c in curves.values()), "periods": rows,
            "note": NOTE, "advice": advice(rows, grace_period)}


def write(folder: Path, doc: Mapping[str, Any]) -> Path:
    from lcl_tune.util import write_json

    path = Path(folder) / FILE
    write_json(path, dict(doc), indent=1)
    return path


def read(folder: Path) -> dict[str, Any] | None:
    path = Path(folder) / FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
