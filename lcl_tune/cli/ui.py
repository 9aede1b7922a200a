"""``lcl-tune ui``: MLflow's own server on the store of a storage root or study folder, or a tracking URI:
a child in its own session (Ctrl-C and SIGTERM reach this process, which stops it, killing its group if
slow), bound to 127.0.0.1 unless told otherwise (the UI has no login and can delete runs), one worker,
artifacts in the store's folder, no telemetry. A server at an http(s):// URI is only pointed at."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from lcl_tune.adapters import tracking as T
from lcl_tune.schema.trial import ConfigError
from lcl_tune.util import did_you_mean, log, redact

try:
    from mlflow.server.security_utils import get_default_allowed_hosts
    from mlflow.tracking import MlflowClient
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("lcl_tune.cli.ui needs MLflow: pip install 'mlflow>=3.10'") from e

DEFAULT_HOST, LOOPBACK_HOSTS = "127.0.0.1", ("127.0.0.1", "localhost", "::1")
START_TIMEOUT_S, STOP_TIMEOUT_S, LOG_NAME = 120.0, 15.0, "mlflow_ui.log"  # a cold server imports for 10-20 s
QUIET_ENV = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
FIX = "pass a storage root (lcl_runs), a study folder in it (lcl_runs/<study>), or --tracking-uri URI"


class UIStartError(RuntimeError):
    """The server did not come up: the message ends with the tail of its log."""


def resolve_store(study_dir: str | os.PathLike | None,
                  tracking_uri: str | None) -> tuple[str, Path | None, Path | None]:
    """(store URI, a local store's folder, the folder asked for); every problem is a one-line ConfigError."""
    if (study_dir is None) == (tracking_uri is None):
        both = "both were given" if study_dir is not None else "neither was given"
        raise ConfigError("study_dir", f"give exactly one of a folder or --tracking-uri ({both})", FIX)
    if study_dir is not None:
        if not (study := Path(study_dir).expanduser().resolve()).is_dir():
            near = did_you_mean(study.name, [p.name for p in study.parent.glob("*/")])
            raise ConfigError("study_dir", f"{study} does not exist", f"did you mean {near}?" if near else FIX)
        if (root := T.find_store(study)) is None:
            raise ConfigError("study_dir", f"neither {study} nor its parent holds an mlflow.db", FIX)
        return T.default_uri(root), root, study
    if tracking_uri.startswith(("http://", "https://")):
        T.check_reachable(tracking_uri)  # only pointed at: nothing to start
        return tracking_uri.rstrip("/"), None, None
    if tracking_uri.startswith("sqlite:///"):
        if not (db := Path(tracking_uri[len("sqlite:///"):]).expanduser().resolve()).is_file():
            raise ConfigError("--tracking-uri", f"no SQLite store at {db}", "fix the path (sqlite:////abs/mlflow.db)")
        return f"sqlite:///{db}", db.parent, None
    if "://" not in tracking_uri:
        raise ConfigError("--tracking-uri", f"{tracking_uri!r} is not a URI", f"{FIX} (sqlite:///..., http://...)")
    return tracking_uri, None, None  # another database (postgresql://, mysql://): mlflow server knows it


def server_command(uri: str, folder: Path | None, host: str, port: int) -> list[str]:
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", host, "--port", str(port),
           "--workers", "1"]
    if folder is not None:  # experiments made in the UI, proxied artifacts: not in ./mlartifacts of the cwd
        artifacts = (folder / T.ARTIFACTS_NAME).as_uri()
        cmd += ["--default-artifact-root", artifacts, "--artifacts-destination", artifacts]
    if host not in LOOPBACK_HOSTS:  # MLflow 3 answers 403 to a Host or Origin it does not know: allow our names
        names = ([] if host in ("0.0.0.0", "::", "") else [host]) + [socket.gethostname(), socket.getfqdn()]
        names = list(dict.fromkeys(filter(None, names)))
        hosts = get_default_allowed_hosts() + [h for n in names for h in (n, f"{n}:{port}")]
        cmd += ["--allowed-hosts", ",".join(dict.fromkeys(hosts)),
                "--cors-allowed-origins", ",".join(f"http://{n}:{port}" for n in names)]
    return cmd


@dataclass
class UIServer(contextlib.AbstractContextManager):
    """The UI at ``url``; ``process``: its ``mlflow server``, ``None`` for a server only pointed at."""

    url: str
    runs_url: str | None = None  # the study's runs table, or the experiments list
    process: subprocess.Popen | None = None
    log_path: Path | None = None
    running = property(lambda self: self.process is not None and self.process.poll() is None)

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        if self.running:
            self.process.terminate()  # mlflow server forwards it to uvicorn
            try:
                self.process.wait(timeout)
            except (subprocess.TimeoutExpired, KeyboardInterrupt):  # too slow, or a second Ctrl-C
                os.killpg(self.process.pid, signal.SIGKILL)  # the leader lives: the group id is still ours
                self.process.wait(5)

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, lines: int = 20) -> str:
        tail = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        return f"; last lines of {self.log_path}:\n" + "\n".join(f"  {line}" for line in tail)


def start_ui(study_dir: str | os.PathLike | None = None, tracking_uri: str | None = None,
             host: str = DEFAULT_HOST, port: int = 5000, timeout: float = START_TIMEOUT_S) -> UIServer:
    """The UI, once it answers (``port=0``: a free port); ConfigError for bad input, before anything starts."""
    uri, folder, study = resolve_store(study_dir, tracking_uri)
    if uri.startswith("http"):
        return UIServer(uri, _runs_url(uri, None))
    try:  # a taken port fails now, or /health could be answered by whatever listens there
        with socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            port = s.getsockname()[1]
    except OSError as e:
        raise ConfigError("--port", f"cannot listen on {host}:{port} ({e.strerror})",
                          "pick another port (--port 5001) or stop what uses it") from None
    cmd = server_command(uri, folder, host, port)
    with (open(folder / LOG_NAME, "wb") if folder and os.access(folder, os.W_OK) else
          tempfile.NamedTemporaryFile(prefix="lcl-tune-ui-", suffix=".log", delete=False)) as fh:
        log.debug("starting %s (log: %s)", " ".join(cmd), fh.name)
        proc = subprocess.Popen(cmd, cwd=folder, env={**os.environ, **QUIET_ENV}, stdin=subprocess.DEVNULL,
                                stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    local = {"0.0.0.0": DEFAULT_HOST, "": DEFAULT_HOST, "localhost": DEFAULT_HOST, "::": "::1"}.get(host, host)
    server = UIServer(f"http://{f'[{local}]' if ':' in local else local}:{port}", None, proc, Path(fh.name))
    deadline = time.monotonic() + timeout
    try:  # Ctrl-C while waiting included: never leave a server behind
        while True:
            with contextlib.suppress(ConfigError):
                T.check_reachable(server.url, timeout=2)
                break
            if not server.running or time.monotonic() > deadline:
                raise UIStartError((f"mlflow server did not answer {server.url}/health in {timeout:.0f} s"
                                    if server.running else f"mlflow server exited with code {proc.returncode}")
                                   + server.log_tail())
            time.sleep(0.25)
        server.runs_url = _runs_url(server.url, study)
    except BaseException:
        server.stop()
        raise
    return server


def _runs_url(base: str, study: Path | None) -> str:
    """The runs of ``study``'s experiment (its parent run's tag); with no study, of the only one; else the list."""
    client = MlflowClient(tracking_uri=base)
    experiments = [e.experiment_id for e in client.search_experiments() if e.name != "Default"]
    found = [e for e in experiments if study and T.find_runs(client, e, {T.TAG_FOLDER: str(study)})]
    if study is not None and not found and T.find_store(study) != study:  # a study folder, not a storage root
        log.warning("no run is tagged %s=%s: showing every experiment of the store", T.TAG_FOLDER, study)
    found = found or (experiments if study is None and len(experiments) == 1 else [])
    return T.runs_page_url(base, found[0]) if found else f"{base}/#/experiments"


def serve(study_dir: str | os.PathLike | None, tracking_uri: str | None, host: str = DEFAULT_HOST,
          port: int = 5000) -> int:
    """``lcl-tune ui``: start the UI, print its URLs, wait for Ctrl-C or SIGTERM; 0 after a clean stop."""
    uri, _, study = resolve_store(study_dir, tracking_uri)  # bad input fails before anything starts
    if not uri.startswith("http"):
        if host not in LOOPBACK_HOSTS:
            print(f"warning: --host {host} exposes the MLflow UI, which has no authentication: anyone who reaches "
                  "its port can read, edit and delete runs", file=sys.stderr, flush=True)
        log.info("starting the MLflow UI on %s:%s ...", host, port or "(a free port)")
    server, previous = None, {}
    with contextlib.suppress(ValueError):  # SIGTERM acts as Ctrl-C, which works even in a background job started
        # with SIGINT ignored (by a shell without job control); only the main thread may set handlers
        previous = {s: signal.signal(s, signal.default_int_handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        server = start_ui(study_dir, tracking_uri, host, port)
        print(redact(f"MLflow UI for {study or uri}\n  runs  {server.runs_url}\n  home  {server.url}/"), flush=True)
        if server.process is None:
            return 0  # a server that is only pointed at
        print(f"  log   {server.log_path}\nPress Ctrl-C to stop the server.", flush=True)
        print(f"error: mlflow server exited with code {server.process.wait()}{server.log_tail()}", file=sys.stderr)
        return 1
    except UIStartError as e:
        print(redact(f"error: {e}"), file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C while starting too (start_ui has stopped the server then)
        log.info("stopping the MLflow UI ...")
        return 0
    finally:
        if server is not None:
            server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
