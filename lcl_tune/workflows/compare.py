"""``lcl-tune compare``: the best configuration and metric of several studies or ablations, side by side.

Each folder is read as ``lcl-tune export`` reads it (a study's best trial at its best period, an
ablation's best cell or arm by ``--select``), so what is compared is exactly what each would export.
Keys are the dotted trial-config keys; the table keeps those whose values differ, because the keys
all of them share say nothing about why one is ahead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lcl_tune.schema import trial as C
from lcl_tune.util import atomic_write
from lcl_tune.workflows.export import export


def compare(folders: list[str | Path], select: str = "best") -> dict[str, Any]:
    """``{"names", "rows": {label: [value per folder]}, "differing": [keys], "metric"}``."""
    docs = [export(f, select) for f in folders]
    names = _unique([f"{d['provenance']['name']} ({d['provenance']['source']})" for d in docs])
    flats = [C.from_dict({k: v for k, v in d.items() if k != "provenance"}, check_files=False).flat() for d in docs]
    keys = sorted(set().union(*flats))
    differing = [k for k in keys if len({repr(f.get(k)) for f in flats}) > 1 and not k.startswith("data.cache_dir")]
    metrics = [d["provenance"]["selection"]["metric"] for d in docs]
    rows: dict[str, list[Any]] = {
        "selected by": [f"{d['provenance']['selection']['rule']} {m}" for d, m in zip(docs, metrics)],
        "value": [d["provenance"]["selection"].get("value", d["provenance"]["selection"].get("mean")) for d in docs],
        **{k: [d["provenance"]["selection"]["final"].get(k) for d in docs] for k in ("dev/accuracy", "dev/weighted_f1")},
        **{k: [f.get(k) for f in flats] for k in differing},
    }
    return {"names": names, "rows": rows, "differing": differing, "metric": metrics[0] if len(set(metrics)) == 1 else None}


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n} #{seen[n]}")
    return out


def to_markdown(result: dict[str, Any]) -> str:
    import pandas as pd

    def cell(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    frame = pd.DataFrame({k: [cell(v) for v in vs] for k, vs in result["rows"].items()}, index=result["names"]).T
    frame.index.name = "key"
    differ = ", ".join(result["differing"]) or "none"
    return frame.to_markdown() + f"\n\nKeys that differ: {differ}\n"


def write_compare(result: dict[str, Any], out: str | Path) -> dict[str, Path]:
    """``compare.md`` and ``compare.png`` (the selected value and dev metrics of each, as bars)."""
    import pandas as pd

    from lcl_tune.analysis.plots import _plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    md = atomic_write(out / "compare.md", to_markdown(result))
    plt = _plt()
    frame = pd.DataFrame({k: result["rows"][k] for k in ("dev/accuracy", "dev/weighted_f1")}, index=result["names"])
    ax = frame.astype(float).plot.barh(figsize=(8, 1.2 + 0.6 * len(frame)))
    ax.set_xlabel("dev value of the selected configuration")
    ax.set_title("best configuration of each study / ablation")
    ax.figure.tight_layout()
    ax.figure.savefig(out / "compare.png", dpi=110)
    plt.close(ax.figure)
    return {"markdown": md, "plot": out / "compare.png"}
