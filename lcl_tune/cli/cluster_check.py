"""Offline check of a Ray cluster-launcher config before ``ray up``: no cloud, no credentials.

    python -m lcl_tune.cli.cluster_check cluster.yaml [--pyproject PATH] [--local-files]

prints ``cluster.yaml: valid`` or one line per problem, ``<file>: <key>: <problem>. Fix: <fix>``, and
exits 1. First Ray's own checks, those ``ray up`` makes before it creates a node provider, listing
every schema error (Ray raises the first). Then the project's invariants, which Ray does not check:
every command list set (Ray's defaults install a nightly Ray); lcl-tune and ray on every node at the
versions of pyproject.toml and its lock file requirements/lock.txt (other pins agreeing with the lock);
``LCL_TUNE_STORAGE`` object storage and
``LCL_TUNE_TRACKING_URI`` the head's ``mlflow server`` (on all interfaces and the URI's port); a CPU
head, and GPU workers declaring ``resources: {GPU: n}`` (no instance catalogue to go stale);
``min_workers <= max_workers`` (Ray silently takes the smaller) and a GPU type with ``min_workers >=
1`` (``lcl-tune tune`` refuses a cluster without GPUs); the autoscaler started; studies, configs and
the wheel mounted (``--local-files``: their sources there); provider keys Ray knows. Ray and
jsonschema are imported by the checks that use them, so importing this module stays light.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import os
import posixpath
import shlex
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Iterator, NamedTuple
from urllib.parse import urlsplit

import yaml
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename
from packaging.version import InvalidVersion, Version

from lcl_tune.schema.trial import AliasBomb, bounded_load
from lcl_tune.util import did_you_mean, log

try:
    import tomllib
except ImportError:  # Python 3.10: the installed metadata gives the pins instead
    tomllib = None

COMMAND_LISTS = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
                 "head_start_ray_commands", "worker_start_ray_commands")  # all set: Ray fills a missing one
TYPE_LISTS = ("initialization_commands", "worker_setup_commands")  # a node type's own replace the global ones
HEAD_LISTS = ("head_setup_commands", "head_start_ray_commands")  # the lists run on the head only
PROJECT, STORAGE, TRACKING = "lcl-tune", "LCL_TUNE_STORAGE", "LCL_TUNE_TRACKING_URI"
EXTRA_PROVIDER_KEYS = frozenset("""aws_credentials use_external_head_ip external_head_ip key_pair key_name
    security_group_id security_group_rule vpc_id subnet cidr_block launch_multiple env_vars image head_node_id
    head_resources project_name coordinator_address cluster_unique_id unique_id gcs_address ray_head_ip ray_head_port
    shared_volume_dir list_of_node_ips cleanup_interval vsphere_config msi msi_name msi_resource_group nsg subnet_mask
    access_key access_key_secret v_switch_id zone_id spark_job_server_port head_node_type _config_cache_path""".split())
"""Provider keys that Ray's providers read and its schema does not list (Ray 2.60)."""
NAME_OPTIONS = {"-r", "--requirement", "-c", "--constraint", "--no-binary", "--only-binary", "-P", "--upgrade-package"}
"""pip / uv options whose value is a file or package name, not a requirement; the values of other
options (URLs, paths, numbers) never read as a requirement this check compares."""
Problem = tuple[str, str, str]  # (dotted key, problem, fix)


def validate_cluster_config(path: str | os.PathLike, *, pyproject: str | os.PathLike | None = None,
                            local_files: bool = False) -> list[str]:
    """Problems of the config at ``path`` (empty: valid), each a line naming the key and the fix.
    ``pyproject``: see project_pins; ``local_files``: also check file_mounts' local sources."""
    path, problems = Path(path), []
    try:
        config = bounded_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        config, problems = None, [("(file)", f"{path} does not exist", "pass the path of cluster.yaml")]
    except AliasBomb as e:
        config, problems = None, [(f"line {e.problem_mark.line + 1}", e.problem, e.fix)]
    except yaml.YAMLError as e:
        config, problems = None, [("(file)", f"not valid YAML ({e})", "fix the YAML syntax at the position shown")]
    if isinstance(config, dict):
        problems = list(Check(config, project_pins(pyproject, path), local_files).problems())
    elif not problems:
        problems = [("(file)", f"the top level is a {type(config).__name__}, not a mapping",
                     "write a Ray cluster-launcher config: cluster_name, provider, available_node_types, ...")]
    return list(dict.fromkeys(" ".join(f"{path.name}: {k}: {p}. Fix: {f}".split()) for k, p, f in problems))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lcl_tune.cli.cluster_check",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("config", nargs="?", default="cluster.yaml", help="cluster config (default cluster.yaml)")
    parser.add_argument("--pyproject", help="the project's pyproject.toml (default: found next to the config)")
    parser.add_argument("--local-files", action="store_true", help="also check that file_mounts' local sources exist")
    args = parser.parse_args(argv)
    problems = validate_cluster_config(args.config, pyproject=args.pyproject, local_files=args.local_files)
    print("\n".join(problems) if problems else f"{args.config}: valid")
    if problems:
        print(f"{args.config}: {len(problems)} problem{'s' * (len(problems) != 1)}", file=sys.stderr)
    return 1 if problems else 0


LOCK = Path("requirements") / "lock.txt"  # beside pyproject.toml: the exact versions of the reference set-up


class Pins(NamedTuple):
    """The project's version and exact pins (normalised names), and where they were read."""
    version: str | None
    pins: dict[str, str]
    origin: str


def project_pins(pyproject: str | os.PathLike | None = None, config_path: str | os.PathLike | None = None) -> Pins:
    """:func:`find_pins`, saying when it has no version of ray to hold the nodes to."""
    pins = find_pins(pyproject, config_path)
    if pins.version is not None and "ray" not in pins.pins:  # (no version at all is said where it is found)
        why = f"no {LOCK} beside pyproject.toml" if tomllib else "reading pyproject.toml needs Python >= 3.11"
        log.warning("%s pins no ray version (%s): ray's version on the nodes is not compared; run the check "
                    "from a checkout of the project with Python >= 3.11", pins.origin, why)
    return pins


def find_pins(pyproject: str | os.PathLike | None = None, config_path: str | os.PathLike | None = None) -> Pins:
    """The versions the nodes must install: from ``pyproject``, else the project's pyproject.toml next
    to the config or above it, else this source tree's, else the installed metadata (a wheel install).
    pyproject.toml declares ranges; the exact versions are those of its lock file (``LOCK`` beside it),
    where one exists, and any ``==`` pin of pyproject.toml itself."""
    folders = [*Path(config_path).resolve().parents] if config_path else []
    for candidate in [Path(pyproject)] if pyproject else [d / "pyproject.toml" for d in
                                                          folders + [*Path(__file__).resolve().parents]]:
        toml = tomllib.loads(candidate.read_text("utf-8")) if tomllib and candidate.is_file() else {}
        project = toml.get("project", {})
        if canonicalize_name(str(project.get("name", ""))) == PROJECT:
            lock = candidate.parent / LOCK
            locked = read_lock(lock) if lock.is_file() else {}
            return Pins(project.get("version"), locked | _pins_of(project.get("dependencies", [])),
                        str(lock) if locked else str(candidate))
    try:
        version = metadata.version(PROJECT)
    except metadata.PackageNotFoundError:
        log.warning("no pyproject.toml of %s and no installed %s: versions are not compared", PROJECT, PROJECT)
        return Pins(None, {}, "nothing (no pyproject.toml found)")
    return Pins(version, _pins_of(metadata.requires(PROJECT) or []), f"{PROJECT} {version} (installed metadata)")


def _pins_of(requirements: Iterable[str]) -> dict[str, str]:
    """``name -> version`` of the exact pins among ``requirements``, leaving out those of extras."""
    reqs = [Requirement(r) for r in requirements]
    return {canonicalize_name(r.name): v for r in reqs if (v := _exact(r)) and "extra" not in str(r.marker or "")}


def read_lock(path: Path) -> dict[str, str]:
    """``name -> version`` of a pip constraints / lock file (``name==X`` lines; comments ignored)."""
    lines = (line.split("#", 1)[0].strip() for line in path.read_text("utf-8").splitlines())
    return _pins_of(line for line in lines if line and not line.startswith("-"))


def _exact(req: Requirement) -> str | None:
    """The one version ``req`` pins (``==X``); None for a range, a wildcard or no version at all."""
    spec = next(iter(req.specifier)) if len(req.specifier) == 1 else None
    return _version(spec.version) if spec and spec.operator in ("==", "===") and "*" not in spec.version else None


def _version(text: str) -> str | None:
    """``text`` as a normalised PEP 440 version (``v0.1.0`` -> ``0.1.0``); None when it is none."""
    with contextlib.suppress(InvalidVersion):
        return str(Version(text))
    return None


class Install(NamedTuple):
    """A requirement a ``pip install`` names: normalised name, exact version (None: unpinned), the
    key of its command (``setup_commands[3]``), and the wheel file or URL it installs."""
    package: str
    version: str | None
    where: str
    path: str | None = None


def parse_installs(command: str, where: str) -> list[Install]:
    """What the ``pip install`` / ``python -m pip install`` / ``uv pip install`` of a shell line install:
    wheels (name and version from the file name), ``name==X``, ``name @ git+URL@vX.Y`` (the tag)."""
    installs = []
    for args in _invocations(command, "pip", "install"):
        for before, arg in zip(["install", *args], args):
            if arg.startswith("-") or before in NAME_OPTIONS:  # -e's value is read as a requirement
                continue
            with contextlib.suppress(InvalidRequirement, InvalidWheelFilename):  # a path, a URL without a name
                if arg.endswith(".whl"):  # a wheel file or URL, maybe as name @ URL
                    name, version, *_ = parse_wheel_filename(posixpath.basename(arg))
                    installs.append(Install(name, str(version), where, arg))
                else:
                    req = Requirement(arg)
                    version = _version(req.url.rpartition("@")[2]) if req.url else _exact(req)
                    installs.append(Install(canonicalize_name(req.name), version, where))
    return installs


def _invocations(command: str, program: str, sub: str) -> list[list[str]]:
    """The arguments of each ``program sub`` (``pip install``, ``ray start``) in a shell line, split as
    the shell does, whatever precedes it in its simple command (a path, ``python -m``, ``uv``,
    ``nohup``; ``pip3.11`` is ``pip``). Unbalanced quotes end the line."""
    lexer, words = shlex.shlex(command, posix=True, punctuation_chars=True), [[]]
    lexer.whitespace_split = True
    with contextlib.suppress(ValueError):
        for word in lexer:
            if set(word) <= set(lexer.punctuation_chars):  # ;, &&, |, (, > end a simple command
                words.append([])
            else:
                words[-1].append(word)
    return [ws[i + 1:] for ws in words for i in range(1, len(ws))
            if ws[i] == sub and posixpath.basename(ws[i - 1]).rstrip("0123456789.") == program]


def _option(args: list[str], *names: str) -> str | None:
    """The value of the first of ``names`` among ``args`` (``--port 5000`` or ``--port=5000``)."""
    for arg, after in zip(args, [*args[1:], None]):
        if (parts := arg.partition("="))[0] in names:
            return parts[2] if parts[1] else after
    return None


def _get(holder: dict[str, Any], key: str, kind: type = dict) -> Any:
    """``holder[key]`` if it is a ``kind`` (mapping or list), else an empty one: Ray's schema reports types."""
    return holder[key] if isinstance(holder.get(key), kind) else kind()


def _keyed(holder: dict[str, Any], key: str, prefix: str = "") -> list[tuple[str, str]]:
    """``(key[i], command)`` for the commands of ``holder[key]``: how the report names a command."""
    return [(f"{prefix}{key}[{i}]", cmd) for i, cmd in enumerate(_get(holder, key, list)) if isinstance(cmd, str)]


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def _hint(word: Any, choices: Iterable[str]) -> str:
    return f" (did you mean {close!r}?)" if (close := did_you_mean(str(word), choices)) else ""


def _ray_schema() -> dict[str, Any]:
    import ray.autoscaler  # the schema file validate_config reads

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text("utf-8"))


class Check:
    """One config's problems, a method per rule (Ray's checks first), on the facts read once here."""

    def __init__(self, config: dict[str, Any], pins: Pins, local_files: bool = False):
        self.config, self.pins, self.local_files = config, pins, local_files
        self.types = {str(n): t for n, t in _get(config, "available_node_types").items() if isinstance(t, dict)}
        self.head, self.provider = config.get("head_node_type"), _get(config, "provider")
        self.commands = [kc for key in COMMAND_LISTS for kc in _keyed(config, key)] + [
            kc for name, t in self.types.items() for key in TYPE_LISTS
            for kc in _keyed(t, key, f"available_node_types.{name}.")]
        self.installs = [i for key, cmd in self.commands for i in parse_installs(cmd, key)]

    def problems(self) -> Iterator[Problem]:
        for rule in (self.ray, self.command_lists, self.provider_keys, self.versions, self.settings,
                     self.node_types, self.start_commands, self.file_mounts):
            yield from rule()

    def ray(self) -> list[Problem]:
        """What ``ray up`` rejects before it creates a node provider: an unknown provider type (looked up,
        never imported: AWS's needs boto3), then ``prepare_config`` and ``validate_config``. The steps
        calling EC2 / GCE (``fillout_available_node_types_resources``, ``bootstrap_config``) are skipped."""
        from ray.autoscaler._private.providers import _NODE_PROVIDERS
        from ray.autoscaler._private.util import prepare_config, validate_config

        kind, known = self.provider.get("type"), sorted(k for k, v in _NODE_PROVIDERS.items() if v)
        if kind is not None and kind not in _NODE_PROVIDERS:  # create_or_update_cluster's first check
            return [("provider.type", f"unknown provider type {kind!r}", f"use one of {', '.join(known)}"
                     f"{_hint(kind, known)}")]
        ray_log, prepared = logging.getLogger("ray.autoscaler"), self.config
        level = ray_log.level
        ray_log.setLevel(logging.WARNING)  # its INFO lines ("setting max workers for ...") are not problems
        try:
            prepared = prepare_config(copy.deepcopy(self.config))  # provider defaults, Docker, per-type workers
            validate_config(prepared)  # the schema, then head_node_type and the sum of min_workers
        except Exception as e:  # the schema's errors, else those validate_config checks beyond it
            log.debug("Ray's checks of the cluster config raised", exc_info=True)
            return self.schema(prepared) or [self.ray_semantic(str(e).strip().rstrip("."))]
        finally:
            ray_log.setLevel(level)
        return []

    @staticmethod
    def schema(config: dict[str, Any]) -> list[Problem]:
        """Every error of Ray's schema (validate_config raises the first); for a typo, the nearest key."""
        import jsonschema

        schema, problems = _ray_schema(), []
        for err in sorted(jsonschema.validators.validator_for(schema)(schema).iter_errors(config),
                          key=lambda e: [*map(str, e.absolute_path)]):
            where = ".".join(map(str, err.absolute_path))
            if err.validator == "additionalProperties" and isinstance(err.instance, dict):
                allowed = sorted(err.schema.get("properties", {}))
                for key in sorted(set(err.instance) - set(allowed)):
                    close = did_you_mean(key, allowed)
                    problems.append((f"{where}.{key}".lstrip("."), "unknown key (Ray's schema allows no other keys "
                                     f"at {where or 'the top level'})", (f"did you mean {close!r}? rename it" if close
                                     else "remove it") + f" (allowed here: {', '.join(allowed)})"))
            elif err.validator == "required":
                key = next(k for k in err.validator_value if k not in err.instance)
                problems.append((f"{where}.{key}".lstrip("."), "missing (Ray's schema requires it)", "add it"))
            else:
                problems.append((where or "(top level)", err.message, "see ray/autoscaler/ray-schema.json"))
        return problems

    def ray_semantic(self, message: str) -> Problem:
        """validate_config's checks beyond the schema, with the key they are about and a concrete fix."""
        if "min_workers" in message:
            total = sum(_number(t.get("min_workers", 0)) for t in self.types.values())
            return ("max_workers", f"{message} (Ray's validate_config; sum of min_workers = {total:g}, max_workers "
                    f"= {self.config.get('max_workers', 'the default')})", "raise max_workers, or lower a min_workers")
        if "head_node_type" in message:
            return ("head_node_type", f"{self.head!r}: {message} (Ray's validate_config)", "set it to one of "
                    f"{', '.join(sorted(self.types)) or '(none defined)'}{_hint(self.head, self.types)}")
        return ("(config)", f"Ray rejects it: {message}", "compare the config with Ray's example for this provider")

    def command_lists(self) -> Iterator[Problem]:
        return ((key, "not set: Ray would fill it from its provider defaults, which install a nightly Ray wheel",
                 f"set {key} explicitly ({key}: [] when nothing is needed)") for key in COMMAND_LISTS
                if key not in self.config)

    def provider_keys(self) -> Iterator[Problem]:
        """Provider keys Ray knows (its schema takes any there, so a typo would only show in the cloud)."""
        known = set(_ray_schema()["properties"]["provider"]["properties"]) | EXTRA_PROVIDER_KEYS
        for key in sorted(set(self.provider) - known):
            close = did_you_mean(key, sorted(known))
            yield (f"provider.{key}", "not a provider key Ray knows (its schema accepts any key here, so the typo "
                   "would only show in the cloud)", f"did you mean {close!r}?" if close else "remove it")
        kind = self.provider.get("type")
        for key in {"aws": ("region",), "gcp": ("region", "availability_zone", "project_id")}.get(kind, ()):
            if not self.provider.get(key):
                yield (f"provider.{key}", f"missing: the {kind} provider needs it", f"set provider.{key}")

    def node_installs(self) -> dict[str, list[Install]]:
        """What each node installs, from the lists Ray runs there: on the head the global ones but the
        workers'; on a worker of type T, T's own initialization_commands and worker_setup_commands when
        set, else the global ones (T's worker_setup_commands *replace* setup_commands too)."""
        lists = {f"head ({self.head})": [k for k in COMMAND_LISTS if "worker" not in k]} | {
            name: [f"available_node_types.{name}.{k}" if k in t else k for k in TYPE_LISTS]
            + ([] if "worker_setup_commands" in t else ["setup_commands"])
            for name, t in self.types.items() if name != self.head}
        return {node: [i for i in self.installs if i.where.split("[")[0] in keys] for node, keys in lists.items()}

    def versions(self) -> Iterator[Problem]:
        """lcl-tune and ray on every node at the locked versions, other pins agreeing: nodes running
        different versions fail in ways no error message explains."""
        ours = {k: v for k, v in {PROJECT: self.pins.version, "ray": self.pins.pins.get("ray")}.items() if v}
        nodes = self.node_installs()
        origin = f"pyproject.toml ({self.pins.origin})" if self.pins.origin.endswith(".toml") else self.pins.origin
        for pkg, version, where, path in self.installs:
            if pkg in ours and not version:
                yield (where, f"installs {pkg} without pinning a version, so nodes may differ", f"pin it: \"{pkg}=="
                       f"{ours[pkg]}\"")
            elif (want := {**self.pins.pins, **ours}.get(pkg)) and version and Version(version) != Version(want):
                per_node = ", ".join(f"{node} {self.versions_of(got, pkg)}" for node, got in nodes.items())
                yield (where, f"installs {pkg} {version}, " + (f"not {want} as {origin} has it (per node: {per_node}); "
                       "every node must run the same pinned version" if pkg in ours else f"but {origin} pins "
                       f"{pkg}=={want}"), f"install {pkg}=={want}" + (" (rebuild the wheel with it)" if path else ""))
        for node, got in nodes.items() if all(key in self.config for key in COMMAND_LISTS) else ():
            for pkg in [p for p in ours if p not in {i.package for i in got}]:
                why = " (its own worker_setup_commands replace setup_commands for it)" \
                    if "worker_setup_commands" in self.types.get(node, {}) else ""
                yield ("setup_commands" if node.startswith("head (") else f"available_node_types.{node}",
                       f"no command installs {pkg} on {node}{why}", f"install \"{pkg}=={ours[pkg]}\" in setup_commands")

    @staticmethod
    def versions_of(installs: list[Install], pkg: str) -> str:
        """``0.1.0``, ``0.1.0/unpinned`` or ``none``: what one node would run of ``pkg``."""
        return "/".join(sorted({i.version or "unpinned" for i in installs if i.package == pkg})) or "none"

    def settings(self) -> Iterator[Problem]:
        """Object storage and the head's MLflow server as study settings, exported by a command (the
        cluster-launcher schema has no place for them): trials checkpoint and log from the workers."""
        found = {var: [(key, value, urlsplit(value)) for key, cmd in self.commands for word in cmd.split()
                       if word.lstrip("\"'").startswith(f"{var}=")  # also inside echo "export X=..."
                       for value in [word.partition("=")[2].strip("\"';&|")]] for var in (STORAGE, TRACKING)}
        for var, example in ((STORAGE, "s3://BUCKET/lcl_runs"), (TRACKING, "http://$HEAD_IP:5000")):
            if not found[var]:
                yield ("head_setup_commands", f"no command sets {var}; the cluster-launcher schema has no place for "
                       "project settings", f"add echo \"export {var}={example}\" >> ~/lcl_tune.env to this list")
        for key, value, url in found[STORAGE]:
            if not url.netloc or url.scheme in ("file", "http", "https", "local"):
                yield (key, f"{STORAGE}={value!r} is not an object-storage URI: trials write their checkpoints from "
                       "the worker nodes, so every node must reach it", "use s3://BUCKET/lcl_runs or gs://BUCKET/...")
        for key, value, url in found[TRACKING]:
            if url.scheme not in ("http", "https") or not url.netloc:
                yield (key, f"{TRACKING}={value!r} is not an http(s):// tracking server: trials log to MLflow from "
                       "the worker nodes, so a local store is not shared", "use the head's, http://$HEAD_IP:5000")
            elif url.hostname in ("localhost", "127.0.0.1", "0.0.0.0", "::1"):
                yield (key, f"{TRACKING}={value!r} names the loopback address: on a worker it is the worker itself",
                       "use the head's address, e.g. HEAD_IP=$(hostname -I | awk '{print $1}'), http://$HEAD_IP:5000")
        yield from self.mlflow_server([url for _, _, url in found[TRACKING] if url.scheme in ("http", "https")])

    def mlflow_server(self, tracking: list[Any]) -> Iterator[Problem]:
        """The head starts the server the tracking URI names, bound where workers reach it, on its port."""
        servers = [(key, args) for key, cmd in self.commands if key.split("[")[0] in HEAD_LISTS
                   for args in _invocations(cmd, "mlflow", "server")]
        if tracking and not servers:
            yield ("head_start_ray_commands", f"no command starts the MLflow server that {TRACKING} names",
                   "add mlflow server --backend-store-uri sqlite:////home/ubuntu/mlflow/mlflow.db --host 0.0.0.0")
        ports = set()
        for url in tracking:
            with contextlib.suppress(ValueError):  # a port such as $PORT: nothing to compare
                ports.add(url.port or {"http": 80, "https": 443}[url.scheme])
        for key, args in servers:
            if (host := _option(args, "--host", "-h")) not in ("0.0.0.0", "::", "$HEAD_IP", "${HEAD_IP}"):
                yield (key, f"mlflow server binds {host or '127.0.0.1 (its default)'}: the workers cannot reach it",
                       "add --host 0.0.0.0 (the security group admits only the cluster's nodes)")
            if ports and (port := _option(args, "--port", "-p") or "5000").isdigit() and int(port) not in ports:
                yield (key, f"mlflow server listens on port {port}, but {TRACKING} uses port "
                       f"{'/'.join(map(str, sorted(ports)))}", f"use the same port in both (e.g. --port {min(ports)})")

    def node_types(self) -> Iterator[Problem]:
        """A CPU head; GPU workers declaring their GPUs (no catalogue guesses them from the machine type);
        worker counts Ray will not silently change; a GPU node kept up (``lcl-tune tune`` checks for one)."""
        gpu_types = [n for n, t in self.types.items() if n != self.head
                     and (_number(_get(t, "resources").get("GPU")) > 0 or "gpu" in n.lower())]
        for name, t in self.types.items():
            key, resources, lo, hi = f"available_node_types.{name}", _get(t, "resources"), t.get("min_workers", 0), \
                t.get("max_workers")
            if isinstance(lo, int) and isinstance(hi, int) and lo > hi:
                yield (f"{key}.min_workers", f"min_workers {lo} > max_workers {hi} (Ray does not reject it: the "
                       f"autoscaler silently keeps at most {hi})", f"set min_workers <= max_workers (e.g. {hi})")
            if name == self.head and _number(resources.get("GPU")) > 0:
                yield (key, f"the head type {name!r} declares GPUs ({resources}): the head runs the driver, Ray's "
                       "services and MLflow; trials go to the GPU workers", "use a CPU machine and no GPU resources")
            if name in gpu_types and resources.get("GPU", 0) in (0, None):  # another type: the schema's to report
                yield (f"{key}.resources.GPU", f"GPU worker type {name!r} does not declare its GPUs (resources: "
                       f"{resources}): the autoscaler would never launch it for a trial asking for GPUs",
                       "declare as many as the machine has, e.g. resources: {\"CPU\": 8, \"GPU\": 1}")
        yield from self.image_lookup()
        if self.types and not gpu_types:
            yield ("available_node_types", "no GPU worker type (none declares resources: {GPU: n}): the project's GPU "
                   "studies would wait forever", "add one, e.g. gpu_worker: {resources: {\"CPU\": 8, \"GPU\": 1}, ...}")
        elif gpu_types and not any(_number(self.types[n].get("min_workers", 0)) >= 1 for n in gpu_types):
            yield (f"available_node_types.{gpu_types[0]}.min_workers", "every GPU worker type has min_workers: 0, so "
                   "a fresh cluster has no GPU and `lcl-tune tune` refuses a GPU study at once",
                   f"set min_workers: 1 for {gpu_types[0]}")

    def image_lookup(self) -> Iterator[Problem]:
        """Workers are launched by the head, with the head's role. An ImageId of ``resolve:ssm:...``
        makes EC2 read the SSM parameter with the caller's rights, and Ray's default head role
        (``ray-autoscaler-v1``, made by Ray's ``aws/config.py`` with EC2 and S3 policies only) may
        not call ``ssm:GetParameters``: every worker launch would be refused."""
        if self.provider.get("type") != "aws" or self.head not in self.types:
            return
        if _get(self.types[self.head], "node_config").get("IamInstanceProfile"):
            return  # a role of the user's own: docs/cluster.md's lcl-tune-head grants the lookup
        for name, t in self.types.items():
            image = str(_get(t, "node_config").get("ImageId") or "")
            if name != self.head and image.startswith("resolve:ssm:"):
                yield (f"available_node_types.{name}.node_config.ImageId", "resolved through SSM at launch, but "
                       "the head launches workers with Ray's default role ray-autoscaler-v1, which may not call "
                       "ssm:GetParameters: every worker launch would be refused",
                       f"give the head type {self.head!r} node_config.IamInstanceProfile: {{Name: lcl-tune-head}} "
                       "(docs/cluster.md grants it), or pin the image (ImageId: ami-...)")

    def start_commands(self) -> Iterator[Problem]:
        """The head starts Ray with the autoscaler, which launches the workers; they join at $RAY_HEAD_IP."""
        starts = {key: [args for _, cmd in _keyed(self.config, key) for args in _invocations(cmd, "ray", "start")]
                  for key in ("head_start_ray_commands", "worker_start_ray_commands") if key in self.config}
        heads = [args for args in starts.get("head_start_ray_commands", []) if "--head" in args]
        if "head_start_ray_commands" in starts and not heads:
            yield ("head_start_ray_commands", "no `ray start --head`: Ray would not run", "add ulimit -n 65536; "
                   "ray start --head --port=6379 --autoscaling-config=~/ray_bootstrap_config.yaml")
        elif heads and not any(_option(args, "--autoscaling-config") for args in heads):
            yield ("head_start_ray_commands", "`ray start --head` lacks --autoscaling-config: the head would never "
                   "launch a worker", "add --autoscaling-config=~/ray_bootstrap_config.yaml")
        if "worker_start_ray_commands" in starts and not any("RAY_HEAD_IP" in (_option(args, "--address") or "")
                                                             for args in starts["worker_start_ray_commands"]):
            yield ("worker_start_ray_commands", "no `ray start --address=$RAY_HEAD_IP:6379`: the workers would not "
                   "join the head", "add ulimit -n 65536; ray start --address=$RAY_HEAD_IP:6379")

    def file_mounts(self) -> Iterator[Problem]:
        """The studies and their configs on the nodes, installed wheels mounted, and (``local_files``)
        each local source where ``ray up`` reads it."""
        mounts, user = _get(self.config, "file_mounts"), str(_get(self.config, "auth").get("ssh_user") or "ubuntu")
        for folder in ("search_spaces", "configs"):
            if folder not in {posixpath.basename(posixpath.normpath(str(src))) for src in mounts.values()}:
                yield ("file_mounts", f"{folder}/ is not mounted: `lcl-tune tune search_spaces/...` on the head reads "
                       "the studies and their ../configs/ there", f"add \"/home/{user}/lcl_tune/{folder}\": ./{folder}")
        mounted = [self.remote(dst, user).rstrip("/") for dst in mounts]
        for inst in (i for i in self.installs if i.path and "://" not in i.path):
            if (target := self.remote(inst.path, user)).startswith("/") and not any(
                    target == m or target.startswith(f"{m}/") for m in mounted):
                yield (inst.where, f"installs {inst.path}, but no file_mounts entry puts it there",
                       f"mount it: \"{inst.path}\": ./dist/{posixpath.basename(inst.path)}")
        for dst, src in mounts.items() if self.local_files else ():
            if not Path(os.path.expanduser(str(src))).exists():
                yield (f"file_mounts.{dst}", f"the local source {src} does not exist (relative to {os.getcwd()}, "
                       "where ray up reads it)", "build it: python -m pip wheel --no-deps -w dist ."
                       if str(src).endswith(".whl") else "run ray up from the repository root, or fix the path")

    @staticmethod
    def remote(path: str, user: str) -> str:
        """A path on a node, made absolute (``~`` and ``$HOME`` are the SSH user's home) to compare mounts."""
        path = str(path).replace("${HOME}", "~").replace("$HOME", "~")
        return posixpath.normpath(f"/home/{user}{path[1:]}" if path == "~" or path.startswith("~/") else path)


if __name__ == "__main__":
    sys.exit(main())
