"""`lcl-tune train` end to end: the pretrained MiniLM on a real 2,000-row sample (minutes)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_minilm_on_tweeteval_beats_the_majority_class(tmp_path, shared_datasets, minilm_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "lcl_tune.cli", "--data-root", str(shared_datasets), "train",
         str(REPO / "configs" / "tweeteval_minilm.yaml"), "--out", str(out),
         "--set", f"data.cache_dir={tmp_path / 'cache'}", "--set", "train.eval_every=32"],
        capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "samples/s" in proc.stderr and "eval step 32" in proc.stderr  # progress output
    metrics = json.loads((out / "metrics.json").read_text())
    final = metrics["final"]
    assert final["samples"] == 2000 and final["epoch"] == 1.0
    assert metrics["label_names"] == ["anger", "joy", "optimism", "sadness"]
    assert final["dev/accuracy"] > metrics["majority_dev_accuracy"] + 0.10, final
    reports = [json.loads(line) for line in (out / "reports.jsonl").read_text().splitlines()]
    assert [r["step"] for r in reports] == [32, 63]
    assert "weighting:\n  name: self" in (out / "config.yaml").read_text()
