"""``lcl-tune ui``: bad input fails before anything starts, the server binds loopback only and stops
on Ctrl-C, a child run's artifacts load, a real browser shows the parent run with its nested trial
runs, a storage root shows every study as an experiment, and a legacy study folder with its own
store still opens.

The study is written with :mod:`lcl_tune.adapters.tracking` directly (no Ray, no training): seconds, not
minutes. Every server a test starts is stopped in a ``finally`` or fixture teardown.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import queue
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from lcl_tune.adapters import tracking as T
from lcl_tune.cli.main import main as cli_main
from lcl_tune.schema.trial import ConfigError, TrialConfig
from lcl_tune.cli.ui import FIX, UIServer, UIStartError, resolve_store, serve, server_command, start_ui

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]
TRIALS = [(0.1, "separate"), (0.3, "ema"), (0.5, "uniform"), (0.2, "self")]  # (loss.temperature, weighting.name)
LABELS = ["negative", "neutral", "positive"]


# --------------------------------------------------------------------------------------------
# A small study, written without Ray
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FakeStudy:
    folder: Path
    target: T.TrackingTarget
    parent_name: str
    child_names: list[str]
    child_run_ids: list[str]


def make_study(folder: Path, name: str = "ui-demo", trials: list[tuple[float, str]] = TRIALS) -> FakeStudy:
    """Experiment + parent run + one finished child run per trial, with reports and artifacts,
    exactly as a real study logs them."""
    folder.mkdir(parents=True, exist_ok=True)
    target = T.start_study(name, folder)
    names, run_ids = [], []
    for i, (tau, weighting) in enumerate(trials):
        cfg = TrialConfig()
        cfg.loss.temperature, cfg.weighting.name = tau, weighting
        trial_id = f"trial_{i:05d}"
        run = T.TrialRun(target, trial_id, cfg.flat())
        for step in (10, 20):
            f1 = round(0.35 + 0.1 * i + step / 100, 3)
            run.log_report({"dev/accuracy": round(f1 + 0.04, 3), "dev/weighted_f1": f1, "train/loss": 1.5 - step / 40},
                           step)
        details = {"label_names": LABELS, "dev/confusion": [[8, 2, 0], [1, 6, 3], [0, 2, 9]],
                   "dev/per_class_f1": {"negative": 0.84, "neutral": 0.63, "positive": 0.82}}
        run.log_details(details, cfg.to_yaml())
        assert run.close(timeout=60)  # as the trainable does at its end: its spool is sent
        T.close_trial(target, trial_id, "completed" if i % 2 == 0 else "stopped early",
                      cost=T.trial_cost(12.0 + i, 1.0, 0.0), step=20, details=details)
        names.append(T.run_name(cfg.flat()))
        run_ids.append(run.run_id)
    assert T.close_driver_sender(target.spool_dir, timeout=60)  # as the end of a study does
    best = round(0.35 + 0.1 * (len(trials) - 1) + 0.2, 3)
    T.finish_study(target, summary_metrics={"best/dev/weighted_f1": best, "trials/completed": len(trials)},
                   tags={"lcl_tune.trials": str(len(trials))}, artifacts=[])
    return FakeStudy(folder, target, name, names, run_ids)


def start_ui_on_a_free_port(*args, attempts: int = 5, **kwargs) -> UIServer:
    """``start_ui(..., port=0)``: the OS gives a free port, which start_ui releases for mlflow to bind; if
    something else took it meanwhile (mlflow: "address already in use"), again, on another port."""
    for _ in range(attempts - 1):
        try:
            return start_ui(*args, port=0, **kwargs)
        except UIStartError as e:
            if "address already in use" not in str(e):
                raise
    return start_ui(*args, port=0, **kwargs)


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> FakeStudy:
    return make_study(tmp_path_factory.mktemp("ui") / "ui-demo")


@pytest.fixture(scope="module")
def ui(study) -> UIServer:
    server = start_ui_on_a_free_port(study.folder)
    try:
        yield server
    finally:
        server.stop()
    assert not server.running


# --------------------------------------------------------------------------------------------
# Bad input, ports, flags: no server
# --------------------------------------------------------------------------------------------


def _one_line_error(call) -> str:
    with pytest.raises(ConfigError) as e:
        call()
    msg = str(e.value)
    assert "\n" not in msg and "Fix:" in msg, msg
    return msg


def test_serve_rejects_bad_input_before_starting_anything(tmp_path, study, capsys):
    empty = tmp_path.resolve()
    msg = _one_line_error(lambda: serve(study_dir=str(tmp_path), tracking_uri=None))
    assert msg.startswith(f"study_dir: neither {empty} nor its parent holds an mlflow.db. Fix: pass a storage root")
    msg = _one_line_error(lambda: serve(study_dir=str(study.folder) + "x", tracking_uri=None))  # a typo
    assert msg == f"study_dir: {study.folder.resolve()}x does not exist. Fix: did you mean {study.folder.name}?"
    msg = _one_line_error(lambda: serve(study_dir=None, tracking_uri=str(study.folder)))
    assert msg.startswith(f"--tracking-uri: {str(study.folder)!r} is not a URI. Fix: ")
    msg = _one_line_error(lambda: serve(study_dir=str(study.folder), tracking_uri=study.target.uri))
    assert msg.startswith("study_dir: give exactly one of a folder or --tracking-uri (both were given). Fix: ")
    msg = _one_line_error(lambda: serve(study_dir=None, tracking_uri=None))
    assert msg.startswith("study_dir: give exactly one of a folder or --tracking-uri (neither was given). Fix: ")
    msg = _one_line_error(lambda: serve(study_dir=None, tracking_uri=f"sqlite:///{tmp_path}/missing.db"))
    assert msg == (f"--tracking-uri: no SQLite store at {empty / 'missing.db'}. "
                   "Fix: fix the path (sqlite:////abs/mlflow.db)")
    assert capsys.readouterr().err == ""  # nothing was started, so nothing was announced

    # the CLI prints the error on one line and exits 2
    assert cli_main(["ui", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: study_dir: neither {empty} nor its parent holds an mlflow.db. Fix: {FIX}\n"


def test_port_in_use_is_a_config_error(study):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        msg = _one_line_error(lambda: start_ui(study.folder, port=port, timeout=5))
    assert msg.startswith("--port: ") and str(port) in msg


def test_exposing_the_ui_warns_that_it_has_no_authentication(study, capsys):
    """The warning comes before anything starts. The port is taken (bound, never listening: nothing is
    reachable), so no server is ever started on 0.0.0.0."""
    def warnings_for(host: str) -> list[str]:
        with socket.socket() as busy:
            busy.bind((host, 0))
            port = busy.getsockname()[1]
            msg = _one_line_error(lambda: serve(str(study.folder), None, host=host, port=port))
        assert msg.startswith("--port: ") and str(port) in msg
        return [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]

    (warning,) = warnings_for("0.0.0.0")
    assert warning == ("warning: --host 0.0.0.0 exposes the MLflow UI, which has no authentication: anyone who "
                       "reaches its port can read, edit and delete runs")
    assert warnings_for("127.0.0.1") == []


def test_server_flags_keep_artifacts_in_the_store_and_allow_the_real_host_name_when_exposed(study):
    root = study.folder.parent  # the storage root: its shared store holds the study
    uri, folder, asked = resolve_store(str(study.folder), None)
    assert (uri, folder, asked) == (T.default_uri(root), root, study.folder)
    local = server_command(uri, folder, "127.0.0.1", 5000)
    artifacts = (root / "mlartifacts").as_uri()
    assert local[local.index("--backend-store-uri") + 1] == f"sqlite:///{root / 'mlflow.db'}"
    assert local[local.index("--host") + 1] == "127.0.0.1" and local[local.index("--workers") + 1] == "1"
    assert local[local.index("--default-artifact-root") + 1] == artifacts
    assert local[local.index("--artifacts-destination") + 1] == artifacts
    assert "--allowed-hosts" not in local  # MLflow's defaults already allow loopback

    assert resolve_store(None, uri) == (uri, root, None)  # --tracking-uri sqlite:///... serves the same store
    exposed = server_command(uri, folder, "0.0.0.0", 5000)
    hosts = exposed[exposed.index("--allowed-hosts") + 1].split(",")
    origins = exposed[exposed.index("--cors-allowed-origins") + 1].split(",")
    name = socket.gethostname()
    assert {name, f"{name}:5000", "localhost", "127.0.0.1:*"} <= set(hosts)
    assert f"http://{name}:5000" in origins


# --------------------------------------------------------------------------------------------
# The CLI: loopback only, Ctrl-C stops the server
# --------------------------------------------------------------------------------------------


def _listeners(port: int) -> set[str]:
    """Addresses listening on TCP ``port`` (from /proc/net/tcp and tcp6; state 0A = LISTEN)."""
    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        if not Path(table).exists():
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:
                raw = bytes.fromhex(addr)
                if width == 8:
                    found.add(socket.inet_ntop(socket.AF_INET, raw[::-1]))
                else:  # four little-endian 32-bit words
                    words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
                    found.add(socket.inet_ntop(socket.AF_INET6, words))
    return found


def _read_lines(stream, into: queue.Queue) -> None:
    for line in stream:
        into.put(line)
    into.put(None)


def _wait_until(condition, timeout: float, what: str) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not so after {timeout:.0f} s"
        time.sleep(0.1)


@dataclass
class CliUI:
    """A running ``lcl-tune ui``: its process, port, the stdout lines up to "Press Ctrl-C", and its
    stderr, read all along by ``stderr_reader`` (a full pipe would block the child's shutdown)."""
    proc: subprocess.Popen
    port: int
    out: list[str]
    errors: list[str]
    stderr_reader: threading.Thread


PORT_TAKEN = ("--port: cannot listen on", "address already in use")  # lcl-tune's check, or mlflow's own bind


def _start_cli_ui(folder: Path, attempts: int = 5) -> CliUI:
    """``lcl-tune ui FOLDER --port P``, P a port the OS gave as free, up to its "Press Ctrl-C" line. The
    port is free when chosen but not held (the CLI must bind it itself): when something else took it
    first, the CLI says so and exits, and it is started again on another port."""
    for _ in range(attempts):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        # started the way a shell without job control starts a background job: with SIGINT ignored
        proc = subprocess.Popen([sys.executable, "-m", "lcl_tune.cli", "ui", str(folder), "--port", str(port)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=_read_lines, args=(proc.stdout, lines), daemon=True).start()
        errors: list[str] = []
        stderr_reader = threading.Thread(target=lambda: errors.extend(proc.stderr), daemon=True)
        stderr_reader.start()
        out, deadline = [], time.monotonic() + 120
        try:
            while not any("Ctrl-C" in line for line in out):
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
                if line is None:
                    break
                out.append(line)
            else:
                return CliUI(proc, port, out, errors, stderr_reader)
        except queue.Empty:
            proc.kill()
            proc.wait(timeout=30)
            _kill_servers_on(port)  # the server the CLI may have started, in its own session
            pytest.fail(f"lcl-tune ui printed no 'Press Ctrl-C' line in 120 s:\n{''.join(out)}{''.join(errors)}")
        finally:
            if proc.poll() is None and not any("Ctrl-C" in line for line in out):
                proc.kill()
        proc.wait(timeout=30)
        stderr_reader.join(timeout=30)
        _kill_servers_on(port)
        if not any(taken in "".join(errors) for taken in PORT_TAKEN):
            pytest.fail(f"lcl-tune ui exited early ({proc.returncode}):\n{''.join(out)}{''.join(errors)}")
    pytest.fail(f"{attempts} ports in a row were taken before lcl-tune ui could bind them")


def _kill_servers_on(port: int) -> None:
    """Last resort if the CLI could not stop its own server: kill, by pid, the processes whose
    command line serves this (test-chosen, otherwise unused) port."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if b"--port" in args and str(port).encode() in args and any(b"mlflow" in a for a in args):
            try:
                os.kill(int(cmdline.parent.name), signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_cli_ui_binds_loopback_prints_the_runs_url_and_stops_on_ctrl_c(study):
    ui = _start_cli_ui(study.folder)
    proc, port = ui.proc, ui.port
    try:
        root = study.folder.parent  # the storage root, whose store holds the study
        assert ui.out == [f"MLflow UI for {study.folder}\n",
                          f"  runs  http://127.0.0.1:{port}/#/experiments/{study.target.experiment_id}/runs\n",
                          f"  home  http://127.0.0.1:{port}/\n",
                          f"  log   {root / 'mlflow_ui.log'}\n",
                          "Press Ctrl-C to stop the server.\n"], "".join(ui.out)

        assert _listeners(port) == {"127.0.0.1"}  # loopback only, no 0.0.0.0 and no IPv6 wildcard
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as resp:
            assert resp.status == 200

        proc.send_signal(signal.SIGINT)  # what Ctrl-C does: it stops the UI even though it started ignored
        assert proc.wait(timeout=90) == 0  # graceful stop, or a kill after ui.STOP_TIMEOUT_S
        ui.stderr_reader.join(timeout=30)  # the pipe closes with the process: every line is in
        assert not ui.stderr_reader.is_alive(), "lcl-tune ui's stderr stayed open after it exited"
        assert "stopping the MLflow UI ...\n" in ui.errors, "".join(ui.errors)[-2000:]
        _wait_until(lambda: _listeners(port) == set(), 30, f"nothing listens on port {port} any more")
    finally:
        if proc.poll() is None:
            proc.terminate()  # serve() treats SIGTERM like Ctrl-C and stops its server
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        _kill_servers_on(port)


# --------------------------------------------------------------------------------------------
# The running UI
# --------------------------------------------------------------------------------------------


def _get(url: str) -> tuple[int, str, bytes]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.status, resp.headers.get("Content-Type", ""), resp.read()


def test_ui_serves_the_study_runs_url_and_a_child_runs_artifacts(ui, study):
    assert ui.url.startswith("http://127.0.0.1:")
    assert ui.runs_url == f"{ui.url}/#/experiments/{study.target.experiment_id}/runs"
    run_id = study.child_run_ids[0]
    status, _, body = _get(f"{ui.url}/ajax-api/2.0/mlflow/artifacts/list?run_uuid={run_id}")
    listing = json.loads(body)
    assert status == 200 and listing["root_uri"].startswith((study.folder.parent / "mlartifacts").as_uri())
    assert {f["path"] for f in listing["files"]} >= {"config.yaml", "confusion_matrix.png", "confusion_matrix.json",
                                                     "per_class_f1.csv"}
    status, kind, png = _get(f"{ui.url}/get-artifact?path=confusion_matrix.png&run_uuid={run_id}")
    assert status == 200 and kind == "image/png" and png.startswith(b"\x89PNG")
    status, _, csv = _get(f"{ui.url}/get-artifact?path=per_class_f1.csv&run_uuid={run_id}")
    assert csv.decode().splitlines()[0] == "class,f1,support"
    status, _, telemetry = _get(f"{ui.url}/ajax-api/3.0/mlflow/ui-telemetry")
    assert json.loads(telemetry)["disable_ui_telemetry"] is True  # the browser is told not to phone home


def test_serve_points_at_a_running_server_without_starting_one(ui, study, capsys):
    assert serve(study_dir=None, tracking_uri=ui.url) == 0  # prints its URLs and returns: nothing to wait for
    assert capsys.readouterr().out == f"MLflow UI for {ui.url}\n  runs  {ui.runs_url}\n  home  {ui.url}/\n"
    handle = start_ui(tracking_uri=ui.url)
    assert isinstance(handle, UIServer) and handle.process is None
    assert handle.runs_url == ui.runs_url  # the study's experiment, found through the server
    handle.stop()  # nothing to stop: must not touch the server it points at
    assert ui.running


# --------------------------------------------------------------------------------------------
# A real browser
# --------------------------------------------------------------------------------------------


class Chromium:
    """Headless Chromium driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``:
    NUL-separated JSON on fds 3 and 4; stdlib only). Unlike ``--dump-dom`` with a virtual-time
    budget, it waits for the single-page app's data to arrive and can click like a user: the
    parent run's children are collapsed until its expander is clicked."""

    def __init__(self, binary: str, width: int = 1400, height: int = 900):
        self.profile = tempfile.TemporaryDirectory(prefix="lcl-chromium-")
        cmd_r, cmd_w = os.pipe()
        res_r, res_w = os.pipe()
        child_in, child_out = (fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (cmd_r, res_w))
        os.close(cmd_r), os.close(res_w)

        def onto_fds_3_and_4() -> None:  # runs in the child, before exec; dup2 leaves 3 and 4 inheritable
            os.dup2(child_in, 3)
            os.dup2(child_out, 4)

        self.proc = subprocess.Popen(
            [binary, *CHROMIUM_FLAGS, "--remote-debugging-pipe", f"--user-data-dir={self.profile.name}",
             f"--window-size={width},{height}", "about:blank"],
            preexec_fn=onto_fds_3_and_4, close_fds=False, start_new_session=True,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(child_in), os.close(child_out)
        self.out, self.inp = cmd_w, res_r
        self.buffer, self.next_id, self.session = b"", 0, None
        self.requests: list[str] = []  # every URL the page requested
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call("Network.enable")
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)

    def call(self, method: str, timeout: float = 30.0, **params) -> dict:
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params}
        if self.session and not method.startswith(("Target.", "Browser.")):
            message["sessionId"] = self.session
        os.write(self.out, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._message(deadline)
            if reply.get("method") == "Network.requestWillBeSent":
                self.requests.append(reply["params"]["request"]["url"])
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def _message(self, deadline: float) -> dict:
        while b"\0" not in self.buffer:
            if not select.select([self.inp], [], [], max(0.0, deadline - time.monotonic()))[0]:
                raise TimeoutError("chromium did not answer in time")
            chunk = os.read(self.inp, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium exited")
            self.buffer += chunk
        message, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(message)

    def js(self, expression: str):
        reply = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in reply:  # a typo in a test's expression fails at once, not as a timeout
            raise RuntimeError(f"{expression}: {reply['exceptionDetails'].get('exception', {}).get('description')}")
        return reply["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30.0, what: str = ""):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.2)
        raise TimeoutError(f"page never showed {what or expression}; it shows: {self.js('document.body.innerText')!r}")

    def screenshot(self, path: Path) -> None:
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=5)
        except (OSError, RuntimeError, TimeoutError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the leader is alive: the group is still ours
            self.proc.wait(5)
        os.close(self.out), os.close(self.inp)
        self.profile.cleanup()


RUN_LINKS = "[...document.querySelectorAll('a[href*=\"/runs/\"]')].map(a => a.innerText.trim()).filter(Boolean)"
EXPANDER = "document.querySelector('button[data-component-id*=\"runnamecellrenderer\"]')"
SIDEBAR_TOGGLE = "document.querySelector('[aria-label=\"Toggle sidebar\"]')"
ASSISTANT_CLOSE = "document.querySelector('[data-component-id=\"mlflow.assistant.chat_panel.close\"]')"
# True once the table's column headers have kept their places and widths for three polls in a row
SETTLED = ("(() => { const h = [...document.querySelectorAll('[role=\"columnheader\"]')].map(e => {"
           " const r = e.getBoundingClientRect(); return [Math.round(r.left), Math.round(r.width)] });"
           " const s = JSON.stringify([document.body.scrollWidth, h]); const last = window.__lclLayout;"
           " window.__lclLayout = {s, n: last && last.s === s ? last.n + 1 : 0};"
           " return h.length > 0 && window.__lclLayout.n >= 2 })()")
# Columns of a study's runs table, {column id: width}: the study metric (on the parent), the trial
# metrics, the searched parameters and the trial outcome.
STUDY_COLUMNS = {"metrics.`best/dev/weighted_f1`": 145, "metrics.`dev/weighted_f1`": 120, "metrics.`dev/accuracy`": 105,
                 "params.`loss.temperature`": 125, "params.`weighting.name`": 120, "params.`loss.lam`": 75,
                 "tags.`lcl_tune.status`": 120}


def seed_view(browser: Chromium, runs_url: str, columns: dict[str, int]) -> None:
    """Choose the table's columns the way the UI remembers them: its per-experiment state in
    localStorage (MLflow 3.17's key; with another version this is silently ignored and the
    default columns show). The assistant side panel is marked as already seen, so it stays shut."""
    base, experiment_id = runs_url.split("/#/")[0], runs_url.split("/experiments/")[1].split("/")[0]
    browser.call("Page.navigate", url=f"{base}/health")  # any page of the origin owns its localStorage
    browser.wait_for("document.readyState === 'complete'", 30)
    order = ["0", "attributes.`Run Name`", "runDateAndNestInfo", "duration", *columns]
    state = {"selectedColumns": list(columns), "columnOrder": order,
             "columnWidths": {"attributes.`Run Name`": 235, **columns}}
    items = {f'MLflowLocalStorage-1.1-ExperimentPage-["{experiment_id}"]-ReactComponentState': json.dumps(state),
             "mlflow.assistant.panelOpen_v1": "false", "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": "true"}
    browser.js(";".join(f"localStorage.setItem({json.dumps(k)}, {json.dumps(v)})" for k, v in items.items()))


def capture_runs_page(chromium: str, runs_url: str, parent_name: str, child_names: list[str], png: Path,
                      columns: dict[str, int] = STUDY_COLUMNS) -> dict:
    """Open the runs table, expand the study's parent run, shut the side panels, and screenshot it. Returns the run links seen before and after expanding, and every URL
    the page requested."""
    browser = Chromium(chromium)
    try:
        seed_view(browser, runs_url, columns)
        browser.requests.clear()
        browser.call("Page.navigate", url=runs_url)
        browser.wait_for(f"{EXPANDER} !== null && {RUN_LINKS}.includes({json.dumps(parent_name)})", 60,
                         f"the parent run {parent_name!r} with an expander")
        collapsed = browser.js(RUN_LINKS)
        browser.js(f"{EXPANDER}.click()")
        expanded = browser.wait_for(
            f"(() => {{ const l = {RUN_LINKS}; return {json.dumps(child_names)}.every(n => l.includes(n)) && l }})()",
            30, f"the child runs {child_names}")
        browser.wait_for(f"(() => {{ const b = {ASSISTANT_CLOSE}; if (b) b.click(); return b === null }})()", 10,
                         "the assistant panel closed")
        browser.js(f"{SIDEBAR_TOGGLE}?.click()")  # the navigation sidebar's width goes to the table
        try:  # the screenshot is for the record (no check reads it): taken once the table settled, or anyway
            browser.wait_for(SETTLED, 15, "the table's columns settled")
        except TimeoutError:
            pass
        browser.screenshot(png)
        return {"collapsed": collapsed, "expanded": expanded, "requests": list(browser.requests)}
    finally:
        browser.close()


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", head[16:24])


@pytest.mark.slow
def test_browser_shows_the_parent_run_with_its_nested_trial_runs(ui, study, chromium):
    png = study.folder / "mlflow_runs.png"
    seen = capture_runs_page(chromium, ui.runs_url, study.parent_name, study.child_names, png)

    # nested: the children are hidden under the collapsed parent, and listed after it once expanded
    assert study.parent_name in seen["collapsed"]
    assert not set(study.child_names) & set(seen["collapsed"]), seen["collapsed"]
    links = seen["expanded"]
    assert set(study.child_names) <= set(links)
    assert all(links.index(study.parent_name) < links.index(name) for name in study.child_names), links

    # every request stayed on this machine: no telemetry, fonts or CDNs on the internet
    off_machine = [u for u in seen["requests"] if not u.startswith((ui.url, "data:", "blob:", "about:"))]
    assert off_machine == [], off_machine

    assert png.stat().st_size > 10_000
    assert _png_size(png) == (1400, 900)


# --------------------------------------------------------------------------------------------
# A storage root: one store, one experiment per study; a legacy study folder with its own store
# --------------------------------------------------------------------------------------------


# {href: text} of the links to experiments (the experiments list links each by its name)
EXPERIMENT_LINKS = ("Object.fromEntries([...document.querySelectorAll('a[href*=\"/experiments/\"]')]"
                    ".map(a => [a.getAttribute('href'), a.innerText.trim()]))")


@pytest.mark.slow
def test_a_storage_root_shows_every_study_as_an_experiment_in_the_browser(tmp_path, chromium):
    root = tmp_path / "lcl_runs"
    studies = [make_study(root / name, name, trials=TRIALS[:2]) for name in ("quickstart-a", "quickstart-b")]
    a, b = studies
    assert a.target.uri == b.target.uri == T.default_uri(root) and a.target.experiment_id != b.target.experiment_id

    with start_ui_on_a_free_port(root) as ui:
        assert (root / "mlflow_ui.log").is_file()  # the server's log, next to the store
        assert ui.runs_url == f"{ui.url}/#/experiments"  # a root: the experiments list
        browser = Chromium(chromium)
        try:
            browser.call("Page.navigate", url=ui.runs_url)
            want = json.dumps({f"#/experiments/{s.target.experiment_id}": s.parent_name for s in studies})
            browser.wait_for(f"(() => {{ const l = {EXPERIMENT_LINKS}; return Object.entries({want}).every("
                             "([href, name]) => l[href] === name) })()", 60, f"a link to each study's experiment {want}")
            off_machine = [u for u in browser.requests if not u.startswith((ui.url, "data:", "blob:", "about:"))]
            assert off_machine == [], off_machine
        finally:
            browser.close()
    assert not ui.running

    # one study folder of the root: the same store, and that study's runs table
    with start_ui_on_a_free_port(root / "quickstart-a") as ui:
        assert ui.runs_url == f"{ui.url}/#/experiments/{a.target.experiment_id}/runs"
        browser = Chromium(chromium)
        try:
            seed_view(browser, ui.runs_url, STUDY_COLUMNS)
            browser.call("Page.navigate", url=ui.runs_url)
            parent = json.dumps(a.parent_name)
            seen = browser.wait_for(f"(() => {{ const l = {RUN_LINKS}; return l.includes({parent}) && l }})()", 60,
                                    f"the parent run {a.parent_name!r}")
            assert b.parent_name not in seen, seen  # the other study is another experiment
        finally:
            browser.close()


def test_a_legacy_study_folder_with_its_own_store_still_opens(tmp_path):
    """A study folder from before stores were shared keeps its runs in its own mlflow.db; it opens on
    that store even when its storage root has a shared store of its own."""
    legacy = tmp_path / "old-study"
    legacy.mkdir()
    T.start_study("old-study", legacy, uri=T.default_uri(legacy))  # the store inside the study folder
    old = make_study(legacy, "old-study", trials=TRIALS[:1])  # found again: more runs in the same store
    assert old.target.uri == T.default_uri(legacy)
    make_study(tmp_path / "new-study", "new-study", trials=TRIALS[:1])  # the root's shared store
    assert (tmp_path / "mlflow.db").is_file()

    with start_ui_on_a_free_port(legacy) as ui:
        assert ui.runs_url == f"{ui.url}/#/experiments/{old.target.experiment_id}/runs"
        names = {e.name for e in MlflowClient(ui.url).search_experiments()}
        assert names == {"Default", "old-study"}, names  # its own store, not the root's
        _, _, body = _get(f"{ui.url}/ajax-api/2.0/mlflow/artifacts/list?run_uuid={old.child_run_ids[0]}")
        listing = json.loads(body)
        assert listing["root_uri"].startswith((legacy / "mlartifacts").as_uri())
        assert "per_class_f1.csv" in {f["path"] for f in listing["files"]}
        assert (legacy / "mlflow_ui.log").is_file()
