"""``lcl-tune ui``: the MLflow UI of one study, on loopback, showing the study's local artifacts.

A study keeps its runs in ``<folder>/mlflow.db`` and their artifacts under ``<folder>/mlartifacts``
(see :mod:`lcl_tune.adapters.tracking`). This module starts ``mlflow server`` as a child process for that
store, waits until it answers, prints the URL of the study's runs table and, when blocking, stops
the server cleanly on Ctrl-C.

Choices, and why:

* the server binds **127.0.0.1** unless told otherwise: the UI can edit and delete runs and has
  no login, so exposing it is an explicit decision (``--host 0.0.0.0`` prints a warning);
* the child runs in its **own session**: Ctrl-C reaches this process only, which then stops the
  server gracefully (SIGTERM, forwarded by ``mlflow server`` to uvicorn) and kills the group if it
  does not stop in time, so no server outlives the command;
* telemetry and the background job runner are **off**: a UI for browsing needs neither, and the
  machines this runs on often have no internet access;
* one worker: a single person browses, and each uvicorn worker holds the whole app in memory.

Adapter module: imports MLflow (with an install hint when missing).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from lcl_tune.adapters import tracking as T
from lcl_tune.schema.trial import ConfigError

try:
    from mlflow.tracking import MlflowClient
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("lcl_tune.cli.ui needs MLflow: pip install 'mlflow==3.17.2'") from e

DEFAULT_HOST = "127.0.0.1"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
START_TIMEOUT_S = 120.0  # a cold `mlflow server` imports for ~10-20 s on a small machine
STOP_TIMEOUT_S = 15.0
LOG_NAME = "mlflow_ui.log"

# The child's environment: no telemetry (server or UI), no background job runner (its own process).
QUIET_ENV = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
}


class UIStartError(RuntimeError):
    """The server did not come up: the message ends with the tail of its log."""


# --------------------------------------------------------------------------------------------
# What to serve
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Store:
    """A backend store to browse. ``folder`` is the study folder of a local store (the server's
    working directory and the home of its artifacts); ``None`` for a database elsewhere.
    ``remote`` stores are already served by an MLflow server: nothing to start."""

    uri: str
    folder: Path | None = None
    remote: bool = False


def resolve_store(study_dir: str | os.PathLike | None, tracking_uri: str | None) -> Store:
    """Check the arguments before anything starts; every problem is a one-line ConfigError."""
    if (study_dir is None) == (tracking_uri is None):
        both = "both were given" if study_dir is not None else "neither was given"
        raise ConfigError("study_dir", f"give exactly one of a study folder or --tracking-uri ({both})",
                          "lcl-tune ui lcl_runs/<study>  or  lcl-tune ui --tracking-uri http://host:5000")
    if study_dir is not None:
        return _study_store(Path(study_dir))
    return _uri_store(str(tracking_uri))


def _study_store(folder: Path) -> Store:
    folder = folder.expanduser().resolve()
    if not (folder / "mlflow.db").is_file():
        raise ConfigError("study_dir", f"{folder} holds no mlflow.db (not a study folder, or its study has "
                          "not started yet)", "pass a folder made by `lcl-tune tune` (lcl_runs/<study>), or "
                          "--tracking-uri for a study tracked elsewhere")
    return Store(T.default_uri(folder), folder)


def _uri_store(uri: str) -> Store:
    if uri.startswith(("http://", "https://")):
        T.check_reachable(uri)
        return Store(uri.rstrip("/"), remote=True)
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):]).expanduser().resolve()
        if not db.is_file():
            raise ConfigError("--tracking-uri", f"no SQLite store at {db}",
                              "fix the path (sqlite:////abs/path/mlflow.db) or pass the study folder instead")
        return Store(f"sqlite:///{db}", db.parent)
    if uri.startswith("file://"):
        path = Path(uri[len("file://"):]).resolve()
        return Store(path.as_uri(), path)
    if "://" not in uri:
        raise ConfigError("--tracking-uri", f"{uri!r} is not a URI",
                          "pass a study folder as the positional argument, or a URI (sqlite:///..., http://...)")
    return Store(uri)  # another database (postgresql://, mysql://): mlflow server knows it


# --------------------------------------------------------------------------------------------
# The server process
# --------------------------------------------------------------------------------------------


def server_command(store: Store, host: str, port: int) -> list[str]:
    """``mlflow server`` for ``store``: one worker, artifacts kept inside the study folder."""
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store.uri,
           "--host", host, "--port", str(port), "--workers", "1"]
    if store.folder is not None:
        # Runs of a study have file:// artifact URIs, which the server reads directly. These two
        # flags keep everything else there too: experiments created from the UI, and proxied
        # (mlflow-artifacts:/) requests, which would otherwise land in ./mlartifacts of the cwd.
        artifacts = (store.folder / "mlartifacts").as_uri()
        cmd += ["--default-artifact-root", artifacts, "--artifacts-destination", artifacts]
    return cmd + security_flags(host, port)


def security_flags(host: str, port: int) -> list[str]:
    """MLflow 3 rejects requests whose Host header (DNS rebinding) or Origin (cross-site writes)
    is not local. On loopback its defaults are right; on another interface the browser uses the
    machine's own name, which must then be allowed, or every page load answers 403."""
    if host in LOOPBACK_HOSTS:
        return []
    from mlflow.server.security_utils import get_default_allowed_hosts

    names = _public_names(host)
    hosts = get_default_allowed_hosts() + [h for n in names for h in (n, f"{n}:{port}")]
    origins = [f"http://{n}:{port}" for n in names]
    return ["--allowed-hosts", ",".join(dict.fromkeys(hosts)), "--cors-allowed-origins", ",".join(origins)]


def _public_names(host: str) -> list[str]:
    """Names a browser may use to reach a server bound to ``host``."""
    names = [socket.gethostname(), socket.getfqdn()]
    if host not in ("0.0.0.0", "::", ""):
        names.insert(0, host)
    return list(dict.fromkeys(n for n in names if n))


def _socket(host: str) -> socket.socket:
    return socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)


def free_port(host: str = DEFAULT_HOST) -> int:
    with _socket(host) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def check_port(host: str, port: int) -> None:
    """Fail before starting when the port is taken: otherwise ``/health`` could be answered by
    whatever already listens there, and the printed URL would show another store."""
    with _socket(host) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        try:
            s.bind((host, port))
        except OSError as e:
            raise ConfigError("--port", f"cannot listen on {host}:{port} ({e.strerror})",
                              "pick another port (--port 5001) or stop what uses it") from None


def _local_host(host: str) -> str:
    """Where this machine reaches a server bound to ``host``."""
    return DEFAULT_HOST if host in ("0.0.0.0", "", "localhost") else ("[::1]" if host in ("::", "::1") else host)


# --------------------------------------------------------------------------------------------
# The handle
# --------------------------------------------------------------------------------------------


@dataclass
class UIServer:
    """A running UI. ``url``: its root; ``runs_url``: the study's runs table (``None`` when the
    store holds no experiment yet); ``process``: the ``mlflow server`` child (``None`` for a
    remote store, which is only pointed at). Use as a context manager, or call :meth:`stop`."""

    url: str
    runs_url: str | None
    process: subprocess.Popen | None = None
    log_path: Path | None = None
    command: list[str] = field(default_factory=list)

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM the server (it forwards it to uvicorn and waits for it); kill the whole process
        group if it is not done in ``timeout`` seconds. Idempotent."""
        proc = self.process
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout)
        except (subprocess.TimeoutExpired, KeyboardInterrupt):  # too slow, or a second Ctrl-C
            os.killpg(proc.pid, signal.SIGKILL)  # the leader is alive, so the group id is still ours
            proc.wait(5)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def __enter__(self) -> "UIServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_ui(study_dir: str | os.PathLike | None = None, tracking_uri: str | None = None,
             host: str = DEFAULT_HOST, port: int = 5000, timeout: float = START_TIMEOUT_S) -> UIServer:
    """Start the UI for a study folder (or a tracking URI) and return once it answers.
    ``port=0`` picks a free port. Raises ConfigError for bad input, UIStartError when the server
    does not come up (it is stopped then)."""
    return _start(resolve_store(study_dir, tracking_uri), host, port, timeout)


def _start(store: Store, host: str, port: int, timeout: float = START_TIMEOUT_S) -> UIServer:
    if store.remote:  # already served: only point at it
        return UIServer(store.uri, _runs_url(store.uri, None))
    port = port or free_port(host)
    check_port(host, port)
    server = _launch(store, host, port)
    try:
        _wait_healthy(server, timeout)
        server.runs_url = _runs_url(server.url, store.folder)
    except BaseException:  # Ctrl-C while waiting included: never leave a server behind
        server.stop()
        raise
    return server


def _launch(store: Store, host: str, port: int) -> UIServer:
    cmd = server_command(store, host, port)
    log_path = _log_path(store)
    with open(log_path, "wb") as log:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(cmd, cwd=store.folder, env={**os.environ, **QUIET_ENV}, stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return UIServer(f"http://{_local_host(host)}:{port}", None, proc, log_path, cmd)


def _log_path(store: Store) -> Path:
    """The server's log next to the store it serves (overwritten at each start), else a temp file."""
    if store.folder is not None and os.access(store.folder, os.W_OK):
        return store.folder / LOG_NAME
    fd, name = tempfile.mkstemp(prefix="lcl-tune-ui-", suffix=".log")
    os.close(fd)
    return Path(name)


def _wait_healthy(server: UIServer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not server.running:
            raise UIStartError(f"mlflow server exited with code {server.process.returncode}"
                               + _log_tail(server.log_path))
        if _answers(server.url + "/health"):
            return
        time.sleep(0.25)
    raise UIStartError(f"mlflow server did not answer {server.url}/health within {timeout:.0f} s"
                       + _log_tail(server.log_path))


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _log_tail(path: Path | None, lines: int = 20) -> str:
    if path is None or not path.is_file():
        return ""
    tail = path.read_text(errors="replace").splitlines()[-lines:]
    return f"; last lines of {path}:\n" + "\n".join(f"  {line}" for line in tail)


# --------------------------------------------------------------------------------------------
# The study's experiment
# --------------------------------------------------------------------------------------------


def _runs_url(base: str, folder: Path | None) -> str | None:
    experiment_id = find_experiment(MlflowClient(tracking_uri=base), folder)
    return T.runs_page_url(base, experiment_id) if experiment_id is not None else None


def find_experiment(client: MlflowClient, folder: Path | None) -> str | None:
    """The study's experiment: the one whose parent run is tagged with this study folder; else
    the only (or first) experiment other than MLflow's empty "Default"; ``None`` if there is none.
    Asked through the running server, so it works the same for local and remote stores."""
    experiments = [e for e in client.search_experiments() if e.name != "Default"]
    if len(experiments) <= 1 or folder is None:
        return experiments[0].experiment_id if experiments else None
    for exp in experiments:
        runs = client.search_runs([exp.experiment_id], f"tags.`{T.TAG_FOLDER}` LIKE '%{_quote(folder.name)}'",
                                  max_results=50)
        if any(_same_path(r.data.tags.get(T.TAG_FOLDER, ""), folder) for r in runs):
            return exp.experiment_id
    return experiments[0].experiment_id


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


def _same_path(text: str, folder: Path) -> bool:
    try:
        return bool(text) and Path(text).resolve() == folder
    except OSError:
        return False


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


def serve(study_dir: str | os.PathLike | None, tracking_uri: str | None, host: str = DEFAULT_HOST,
          port: int = 5000, open_browser: bool = False, block: bool = True) -> int | UIServer:
    """``lcl-tune ui``: start the UI, print its URLs, then block until Ctrl-C (returns the exit
    code: 0 after a clean stop, 1 when the server failed) or, with ``block=False``, return the
    running :class:`UIServer`, which the caller stops."""
    store = resolve_store(study_dir, tracking_uri)  # bad input fails before anything starts
    if host in ("0.0.0.0", "::", ""):
        print(f"warning: binding {host or '0.0.0.0'}:{port} exposes the MLflow UI (no login; it can "
              "delete runs) to every machine that reaches this one", file=sys.stderr, flush=True)
    if not store.remote:
        print(f"starting the MLflow UI on {host}:{port} ...", file=sys.stderr, flush=True)
    try:
        server = _start(store, host, port)
    except UIStartError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C while it starts: _start has already stopped the server
        print("interrupted", file=sys.stderr)
        return 130
    _announce(server, study_dir, tracking_uri)
    if open_browser:
        import webbrowser

        webbrowser.open(server.runs_url or server.url)
    if not block:
        return server
    return _block(server)


def _announce(server: UIServer, study_dir: object, tracking_uri: str | None) -> None:
    what = f"study folder {Path(str(study_dir)).resolve()}" if study_dir is not None else tracking_uri
    lines = [f"MLflow UI for {what}",
             f"  runs  {server.runs_url or '(no experiment in this store yet)'}",
             f"  home  {server.url}/"]
    if server.log_path is not None:
        lines.append(f"  log   {server.log_path}")
    if server.process is not None:
        lines.append("Press Ctrl-C to stop the server.")
    print("\n".join(lines), flush=True)


def _block(server: UIServer) -> int:
    """Wait for Ctrl-C (or SIGTERM), then stop the server; 1 if the server died on its own."""
    if server.process is None:
        return 0
    previous = _sigterm_as_interrupt()
    try:
        # A shell without job control starts background jobs with SIGINT ignored, and children
        # inherit that: restore Ctrl-C explicitly so it always stops the UI.
        signal.signal(signal.SIGINT, signal.default_int_handler)
    except ValueError:  # not the main thread
        pass
    try:
        code = server.process.wait()
        print(f"error: mlflow server exited with code {code}" + _log_tail(server.log_path), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("stopping the MLflow UI ...", file=sys.stderr, flush=True)
        return 0
    finally:
        server.stop()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _sigterm_as_interrupt() -> object | None:
    """`kill <pid>` should stop the server as Ctrl-C does (only the main thread may set handlers)."""
    def raise_interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    try:
        return signal.signal(signal.SIGTERM, raise_interrupt)
    except ValueError:
        return None
