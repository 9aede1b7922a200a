"""Offline check of a Ray cluster-launcher config (``cluster.yaml``) before ``ray up``.

    python -m lcl_tune.cli.cluster_check cluster.yaml [--pyproject PATH] [--local-files]

prints ``cluster.yaml: valid`` or one line per problem, ``<file>: <key>: <problem>. Fix: <fix>``,
and exits 1. No cloud is contacted and no credentials are needed. Two stages:

1. **Ray's own checks**, the ones ``ray up`` (``ray.autoscaler._private.commands``:
   ``create_or_update_cluster`` -> ``_bootstrap_config``) makes before it creates a node provider:
   the provider type must be one Ray knows (``providers._NODE_PROVIDERS``, looked up, never
   imported: importing the AWS provider needs boto3), then ``util.prepare_config`` (merges the
   provider's defaults, merges setup commands, checks Docker, fills per-type min/max workers) and
   ``util.validate_config`` (the JSON schema ``ray/autoscaler/ray-schema.json``, which has
   ``additionalProperties: false`` at the top level and inside each node type, so a typo'd key
   there is rejected; ``head_node_type`` must be one of ``available_node_types``; the sum of
   ``min_workers`` must not exceed ``max_workers``). When the schema fails, every schema error is
   listed (Ray raises only the first), with the nearest valid key for an unknown one. Skipped on
   purpose: ``fillout_available_node_types_resources`` and ``bootstrap_config`` (EC2 / IAM / GCE
   API calls).
2. **The project's invariants**, which Ray does not check:
   every command list set explicitly (Ray fills a missing one from its defaults, which install a
   nightly Ray); every node installs ``lcl-tune`` and ``ray`` pinned to one version, the ones of
   ``pyproject.toml`` (other packages pinned there, such as torch, must match when pinned);
   ``LCL_TUNE_STORAGE`` (exported by a command) is a URI such as ``s3://``;
   ``LCL_TUNE_TRACKING_URI`` is an ``http(s)://`` server that the head starts (``mlflow server``
   bound to all interfaces, on the URI's port); the head is a CPU node; each GPU worker type
   declares its GPUs (matching the instance type when it is a known one); ``min_workers <=
   max_workers`` per type (Ray silently takes the smaller); one GPU type keeps ``min_workers >= 1``
   (``lcl-tune tune`` refuses a cluster without GPUs); the Ray start commands start a head with
   the autoscaler and join workers to ``$RAY_HEAD_IP``; ``search_spaces/`` and ``configs/`` mounted
   side by side, and a wheel that is installed is mounted; ``provider`` keys known to Ray (its
   schema lets any key through there). ``--local-files`` also checks that file_mounts' local
   sources exist (as ``ray up`` will need, from the current directory).

Light module: PyYAML only at import; Ray (and jsonschema) are imported inside the functions that
use them.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import difflib
import json
import logging
import os
import posixpath
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import urlsplit

import yaml

COMMAND_LISTS = (
    "initialization_commands",
    "setup_commands",
    "head_setup_commands",
    "worker_setup_commands",
    "head_start_ray_commands",
    "worker_start_ray_commands",
)
"""Top-level command lists: each must be set, since Ray fills a missing one from its defaults."""

NODE_TYPE_COMMAND_LISTS = ("initialization_commands", "worker_setup_commands")
"""Per-node-type overrides: each replaces the global list for that type (not appended to it)."""

PROJECT = "lcl-tune"
STORAGE_VAR = "LCL_TUNE_STORAGE"
TRACKING_VAR = "LCL_TUNE_TRACKING_URI"
MLFLOW_DEFAULT_PORT = 5000

# Provider keys that Ray's providers read but its schema does not list (Ray 2.60; the schema lets
# any provider key through, so a typo there would only surface in the cloud).
EXTRA_PROVIDER_KEYS = frozenset({
    "aws_credentials", "use_external_head_ip", "external_head_ip", "key_pair", "key_name",
    "security_group_id", "security_group_rule", "vpc_id", "subnet", "cidr_block", "launch_multiple",
    "env_vars", "image", "head_node_id", "head_resources", "project_name", "coordinator_address",
    "cluster_unique_id", "unique_id", "gcs_address", "ray_head_ip", "ray_head_port",
    "shared_volume_dir", "list_of_node_ips", "cleanup_interval", "vsphere_config", "msi",
    "msi_name", "msi_resource_group", "nsg", "subnet_mask", "access_key", "access_key_secret",
    "v_switch_id", "zone_id", "spark_job_server_port", "head_node_type", "_config_cache_path",
})

# AWS GPU instance families (p2..p6, g3..g6 and variants such as g4dn, g5g, g6e, gr6).
AWS_GPU_FAMILY = re.compile(r"^(p[2-9][a-z]*|g[3-9][a-z]*|gr6[a-z]*)\.", re.I)
# vCPUs and GPUs of common AWS GPU instance types, to catch resources that do not match them.
AWS_GPU_INSTANCES = {
    "g4dn.xlarge": (4, 1), "g4dn.2xlarge": (8, 1), "g4dn.4xlarge": (16, 1), "g4dn.8xlarge": (32, 1),
    "g4dn.12xlarge": (48, 4), "g4dn.16xlarge": (64, 1),
    "g5.xlarge": (4, 1), "g5.2xlarge": (8, 1), "g5.4xlarge": (16, 1), "g5.8xlarge": (32, 1),
    "g5.12xlarge": (48, 4), "g5.16xlarge": (64, 1), "g5.24xlarge": (96, 4), "g5.48xlarge": (192, 8),
    "g6.xlarge": (4, 1), "g6.2xlarge": (8, 1), "g6.4xlarge": (16, 1), "g6.8xlarge": (32, 1),
    "g6.12xlarge": (48, 4), "g6.16xlarge": (64, 1), "g6.24xlarge": (96, 4), "g6.48xlarge": (192, 8),
    "p3.2xlarge": (8, 1), "p3.8xlarge": (32, 4), "p3.16xlarge": (64, 8),
    "p4d.24xlarge": (96, 8), "p5.48xlarge": (192, 8),
}
GCP_GPU_MACHINE = re.compile(r"^(a2|a3|a4|g2|g4)-", re.I)
LOOPBACK = {"localhost", "127.0.0.1", "0.0.0.0", "::1", "[::1]"}
NON_STORAGE_SCHEMES = {"file", "http", "https", "local"}

# pip / uv options that take a value (the value is not a requirement).
_PIP_VALUE_OPTIONS = {
    "-r", "--requirement", "-c", "--constraint", "-i", "--index-url", "--extra-index-url",
    "-f", "--find-links", "--python", "-p", "-t", "--target", "--prefix", "--root", "--platform",
    "--python-version", "--implementation", "--abi", "--upgrade-strategy", "--src", "--no-binary",
    "--only-binary", "--trusted-host", "--cache-dir", "--progress-bar", "--index-strategy",
    "--torch-backend", "--extra", "--group", "--config-settings", "-C", "--override",
    "--exclude-newer", "--resolution", "--prerelease", "--keyring-provider", "--index",
    "--default-index", "--log", "--retries", "--timeout", "--proxy", "--cert", "--client-cert",
    "--global-option", "--install-option", "--report",
}
_SHELL_OPERATORS = set(";&|()<>")


def _problem(source: str, key: str, problem: str, fix: str) -> str:
    line = f"{source}: {key}: {problem}. Fix: {fix}"
    return " ".join(line.split())  # one line, whatever the parts hold


def _norm(name: str) -> str:
    """PEP 503 name: lcl_tune, LCL.Tune -> lcl-tune."""
    return re.sub(r"[-_.]+", "-", name).lower()


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------


def validate_cluster_config(path: str | os.PathLike, *, pyproject: str | os.PathLike | None = None,
                            local_files: bool = False) -> list[str]:
    """Problems of the cluster-launcher config at ``path`` (empty: valid), one line each naming the
    key and the fix: Ray's pre-provider checks of ``ray up``, then the project's invariants.

    ``pyproject``: the project's ``pyproject.toml`` (default: next to the config or above it, else
    the source tree of this package, else the installed distribution's metadata).
    ``local_files``: also check that file_mounts' local sources exist (relative to the current
    directory, as ``ray up`` reads them)."""
    path = Path(path)
    source = path.name
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return [_problem(source, "(file)", f"{path} does not exist", "pass the path of cluster.yaml")]
    except yaml.YAMLError as e:
        return [_problem(source, "(file)", f"not valid YAML ({e})", "fix the YAML syntax at the position shown")]
    if not isinstance(config, dict):
        return [_problem(source, "(file)", f"the top level is a {type(config).__name__}, not a mapping",
                         "write a Ray cluster-launcher config: cluster_name, provider, available_node_types, ...")]
    pins = project_pins(pyproject, path)
    return ray_problems(config, source) + project_problems(config, source, pins, local_files=local_files)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lcl_tune.cli.cluster_check",
        description="Check a Ray cluster-launcher config offline: Ray's own validation (what `ray up` "
                    "checks before contacting a cloud) plus lcl-tune's invariants.")
    parser.add_argument("config", nargs="?", default="cluster.yaml", help="cluster config (default cluster.yaml)")
    parser.add_argument("--pyproject", help="the project's pyproject.toml (default: found next to the config)")
    parser.add_argument("--local-files", action="store_true",
                        help="also check that file_mounts' local sources exist (e.g. the built wheel)")
    args = parser.parse_args(argv)
    problems = validate_cluster_config(args.config, pyproject=args.pyproject, local_files=args.local_files)
    if problems:
        for line in problems:
            print(line)
        print(f"{args.config}: {len(problems)} problem{'s' if len(problems) != 1 else ''}", file=sys.stderr)
        return 1
    print(f"{args.config}: valid")
    return 0


# --------------------------------------------------------------------------------------------
# Stage 1: Ray's own validation (no provider, no cloud)
# --------------------------------------------------------------------------------------------


def ray_problems(config: dict[str, Any], source: str = "cluster.yaml") -> list[str]:
    """What ``ray up`` rejects before it creates a node provider (see the module docstring)."""
    import jsonschema
    from ray.autoscaler._private.providers import _NODE_PROVIDERS
    from ray.autoscaler._private.util import prepare_config, validate_config

    provider = config.get("provider")
    if not isinstance(provider, dict) or not provider.get("type"):
        return _schema_problems(config, source) or [
            _problem(source, "provider.type", "missing: `ray up` reads it first",
                     "set provider: {type: aws, region: us-west-2}")]
    if provider["type"] not in _NODE_PROVIDERS:  # create_or_update_cluster's first check
        known = sorted(k for k, v in _NODE_PROVIDERS.items() if v is not None)
        return [_problem(source, "provider.type", f"unknown provider type {provider['type']!r}",
                         f"use one of {', '.join(known)}{_did_you_mean(str(provider['type']), known)}")]
    try:
        with _quiet("ray.autoscaler"):  # its INFO lines ("setting max workers for ...") are not problems
            prepared = prepare_config(copy.deepcopy(config))
    except Exception as e:  # it assumes the basic shape; the schema says what is wrong with it
        return _schema_problems(config, source) or [
            _problem(source, "(config)", f"Ray's prepare_config failed: {type(e).__name__}: {e}",
                     "compare the config with Ray's example for this provider")]
    try:
        validate_config(prepared)
    except jsonschema.ValidationError as e:
        return _schema_problems(prepared, source) or [_problem(source, _dotted(e.absolute_path), e.message,
                                                               "see ray/autoscaler/ray-schema.json")]
    except (ValueError, RuntimeError) as e:
        return [_ray_semantic_problem(str(e), config, source)]
    return []


@contextlib.contextmanager
def _quiet(logger_name: str):
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def _ray_schema() -> dict[str, Any]:
    import ray.autoscaler

    path = os.path.join(os.path.dirname(ray.autoscaler.__file__), "ray-schema.json")  # as validate_config
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _schema_problems(config: dict[str, Any], source: str) -> list[str]:
    """Every error of Ray's schema (validate_config stops at the first), typos with a suggestion."""
    import jsonschema

    schema = _ray_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    problems = []
    for err in sorted(validator.iter_errors(config), key=lambda e: [str(p) for p in e.absolute_path]):
        where = list(err.absolute_path)
        if err.validator == "additionalProperties" and isinstance(err.instance, dict):
            allowed = sorted(err.schema.get("properties", {}))
            for key in sorted(set(err.instance) - set(allowed)):
                level = _dotted(where) if where else "the top level"
                close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
                problems.append(_problem(
                    source, _dotted(where + [key]), f"unknown key (Ray's schema allows no other keys at {level})",
                    (f"did you mean {close[0]!r}? rename it" if close else "remove it")
                    + f" (allowed here: {', '.join(allowed)})"))
        elif err.validator == "required":
            missing = re.findall(r"'([^']+)' is a required property", err.message)
            key = _dotted(where + missing[:1]) if missing else _dotted(where)
            problems.append(_problem(source, key, "missing (Ray's schema requires it)",
                                     _describe(schema, where + missing[:1]) or "add it"))
        else:
            problems.append(_problem(source, _dotted(where) or "(top level)", err.message,
                                     _describe(schema, where) or "see ray/autoscaler/ray-schema.json"))
    return problems


def _describe(schema: dict[str, Any], path: list[Any]) -> str:
    """The schema's description of the key at ``path``, as a fix hint."""
    node: Any = schema
    for part in path:
        if not isinstance(node, dict):
            return ""
        props = node.get("properties", {})
        if part in props:
            node = props[part]
        elif node.get("patternProperties"):
            node = next(iter(node["patternProperties"].values()))
        else:
            return ""
        if isinstance(node, dict) and "$ref" in node:
            ref = node["$ref"].lstrip("#/").split("/")
            target: Any = schema
            for r in ref:
                target = target.get(r, {})
            node = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
    desc = node.get("description", "") if isinstance(node, dict) else ""
    return f"Ray's schema: {desc.rstrip('.')}" if desc else ""


def _ray_semantic_problem(message: str, config: dict[str, Any], source: str) -> str:
    message = message.strip().rstrip(".")
    types = config.get("available_node_types")
    names = sorted(types) if isinstance(types, dict) else []
    if "head_node_type" in message and "must be one of" in message:
        head = config.get("head_node_type")
        return _problem(source, "head_node_type", f"{head!r}: {message} (Ray's validate_config)",
                        f"set head_node_type to one of {', '.join(names)}{_did_you_mean(str(head), names)}")
    if "head_node_type" in message:
        return _problem(source, "head_node_type", f"{message} (Ray's validate_config)",
                        f"add head_node_type: one of {', '.join(names)}")
    if "min_workers" in message and "max_workers" in message:
        total = sum(t.get("min_workers", 0) for t in types.values() if isinstance(t, dict)) if names else "?"
        return _problem(source, "max_workers", f"{message} (Ray's validate_config; sum of min_workers = {total}, "
                        f"max_workers = {config.get('max_workers', 'the default')})",
                        "raise max_workers to at least the sum of the types' min_workers, or lower a min_workers")
    return _problem(source, "(config)", f"{message} (Ray's validate_config)", "see the message")


def _dotted(path: Iterable[Any]) -> str:
    return ".".join(str(p) for p in path)


def _did_you_mean(word: str, choices: Iterable[str], plain: bool = False) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    if not close:
        return ""
    return f"did you mean {close[0]!r}?" if plain else f" (did you mean {close[0]!r}?)"


# --------------------------------------------------------------------------------------------
# The project's pins (pyproject.toml)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pins:
    """The project's version and its ``==`` pins (normalised names), and where they were read."""

    version: str | None
    pins: dict[str, str]
    origin: str


def project_pins(pyproject: str | os.PathLike | None = None, config_path: str | os.PathLike | None = None) -> Pins:
    candidates: list[Path] = []
    if pyproject is not None:
        candidates.append(Path(pyproject))
    else:
        if config_path is not None:
            here = Path(config_path).resolve().parent
            candidates += [d / "pyproject.toml" for d in (here, *here.parents)]
        candidates.append(Path(__file__).resolve().parents[1] / "pyproject.toml")  # the source tree
    for candidate in candidates:
        pins = _read_pyproject(candidate)
        if pins is not None:
            return pins
    try:  # an installed (non-editable) lcl-tune: its metadata
        from importlib import metadata

        reqs = metadata.requires(PROJECT) or []
        return Pins(metadata.version(PROJECT), _pins_of(r for r in reqs if "extra ==" not in r),
                    f"{PROJECT} {metadata.version(PROJECT)} (installed metadata)")
    except Exception:
        return Pins(None, {}, "nothing (no pyproject.toml found)")


def _read_pyproject(path: Path) -> Pins | None:
    if not path.is_file():
        return None
    text = path.read_text(encoding="utf-8")
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = None
    if tomllib is not None:
        project = tomllib.loads(text).get("project", {})
        name, version, deps = project.get("name"), project.get("version"), project.get("dependencies", [])
    else:
        name_m = re.search(r'^name\s*=\s*"([^"]+)"', text, re.M)
        version_m = re.search(r'^version\s*=\s*"([^"]+)"', text, re.M)
        deps_m = re.search(r"^dependencies\s*=\s*\[(.*?)\]", text, re.M | re.S)
        name = name_m.group(1) if name_m else None
        version = version_m.group(1) if version_m else None
        deps = re.findall(r'"([^"]+)"', deps_m.group(1)) if deps_m else []
    if name is None or _norm(name) != PROJECT:
        return None
    return Pins(version, _pins_of(deps), str(path))


def _pins_of(requirements: Iterable[str]) -> dict[str, str]:
    pins = {}
    for req in requirements:
        m = re.match(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*===?\s*([^\s;,]+)\s*(;.*)?$", req)
        if m:
            pins[_norm(m.group(1))] = m.group(3)
    return pins


# --------------------------------------------------------------------------------------------
# Stage 2: the project's invariants
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Install:
    """One requirement named by a ``pip install`` / ``uv pip install`` in a command."""

    package: str           # normalised name
    version: str | None    # the exact version it pins, None when it does not pin one
    where: str             # the command's key, e.g. setup_commands[3]
    path: str | None       # a local wheel it installs


def project_problems(config: dict[str, Any], source: str, pins: Pins, *, local_files: bool = False) -> list[str]:
    problems: list[str] = []
    problems += _command_list_problems(config, source)
    problems += _provider_problems(config, source)
    problems += _install_problems(config, source, pins)
    problems += _setting_problems(config, source)
    problems += _node_type_problems(config, source)
    problems += _start_command_problems(config, source)
    problems += _file_mount_problems(config, source, local_files)
    return list(dict.fromkeys(problems))  # one line per problem, in order


def _commands(config: dict[str, Any], key: str) -> list[str]:
    value = config.get(key)
    return [c for c in value if isinstance(c, str)] if isinstance(value, list) else []


def _node_types(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    types = config.get("available_node_types")
    if not isinstance(types, dict):
        return {}
    return {str(name): t for name, t in types.items() if isinstance(t, dict)}


def _all_commands(config: dict[str, Any]) -> list[tuple[str, str]]:
    """(key, command) for every command of the config: global lists, then per-type overrides."""
    out = [(f"{key}[{i}]", cmd) for key in COMMAND_LISTS for i, cmd in enumerate(_commands(config, key))]
    for name, t in _node_types(config).items():
        for key in NODE_TYPE_COMMAND_LISTS:
            out += [(f"available_node_types.{name}.{key}[{i}]", cmd) for i, cmd in enumerate(_commands(t, key))]
    return out


def _node_commands(config: dict[str, Any]) -> dict[str, list[tuple[str, str]]]:
    """The commands each node runs, as Ray composes them: the head runs the global
    initialization, setup, head setup and head start lists; a worker of type T runs T's
    initialization_commands (else the global ones), T's worker_setup_commands if set (which then
    *replace* setup_commands + worker_setup_commands) and worker_start_ray_commands."""
    def keyed(key: str, holder: dict[str, Any], prefix: str = "") -> list[tuple[str, str]]:
        return [(f"{prefix}{key}[{i}]", c) for i, c in enumerate(_commands(holder, key))]

    head = config.get("head_node_type")
    nodes = {f"head ({head})": keyed("initialization_commands", config) + keyed("setup_commands", config)
             + keyed("head_setup_commands", config) + keyed("head_start_ray_commands", config)}
    for name, t in _node_types(config).items():
        if name == head:
            continue
        prefix = f"available_node_types.{name}."
        init = keyed("initialization_commands", t, prefix) if "initialization_commands" in t \
            else keyed("initialization_commands", config)
        setup = keyed("worker_setup_commands", t, prefix) if "worker_setup_commands" in t \
            else keyed("setup_commands", config) + keyed("worker_setup_commands", config)
        nodes[name] = init + setup + keyed("worker_start_ray_commands", config)
    return nodes


def _command_list_problems(config: dict[str, Any], source: str) -> list[str]:
    problems = []
    for key in COMMAND_LISTS:
        if key not in config:
            problems.append(_problem(
                source, key, "not set: Ray fills a missing command list from its provider defaults "
                "(setup_commands there install a nightly Ray wheel, head_start_ray_commands its own start line)",
                f"set {key} explicitly ({key}: [] when nothing is needed)"))
        elif not isinstance(config[key], list) or not all(isinstance(c, str) for c in config[key]):
            problems.append(_problem(source, key, f"must be a list of shell commands (strings), got {config[key]!r}",
                                     f"write {key}: [\"command\", ...]"))
    return problems


def _provider_problems(config: dict[str, Any], source: str) -> list[str]:
    provider = config.get("provider")
    if not isinstance(provider, dict):
        return []  # Ray's stage reports it
    problems = []
    try:
        known = set(_ray_schema()["properties"]["provider"]["properties"]) | EXTRA_PROVIDER_KEYS
    except Exception:  # no Ray: only the schema-free checks below
        known = set()
    for key in sorted(provider):
        if known and key not in known:
            problems.append(_problem(
                source, f"provider.{key}", "not a provider key Ray knows (its schema accepts any key here, so "
                "the typo would only show in the cloud)", _did_you_mean(key, sorted(known), plain=True)
                or "remove it, or check the provider's documentation"))
    kind = provider.get("type")
    required = {"aws": ("region",), "gcp": ("region", "availability_zone", "project_id")}.get(kind, ())
    for key in required:
        if not provider.get(key):
            problems.append(_problem(source, f"provider.{key}", f"missing: the {kind} provider needs it",
                                     f"set provider.{key}"))
    return problems


# ---- installs ------------------------------------------------------------------------------


def parse_installs(command: str, where: str) -> list[Install]:
    """Requirements installed by the ``pip install`` / ``python -m pip install`` / ``uv pip
    install`` commands inside one shell command line."""
    try:
        lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        tokens = list(lexer)
    except ValueError:  # unbalanced quotes: not a command we can read
        return []
    segments: list[list[str]] = [[]]
    for tok in tokens:
        if tok and set(tok) <= _SHELL_OPERATORS:
            segments.append([])
        else:
            segments[-1].append(tok)
    installs = []
    for seg in segments:
        for i, tok in enumerate(seg):
            if tok != "install" or i == 0:
                continue
            if re.fullmatch(r"pip3?(\.\d+)?", posixpath.basename(seg[i - 1])):  # pip, pip3, .../bin/pip, uv pip
                installs += _requirements(seg[i + 1:], where)
                break
    return installs


def _requirements(args: list[str], where: str) -> list[Install]:
    out = []
    skip = False
    for arg in args:
        if skip:
            skip = False
            continue
        if arg.startswith("-"):
            if arg in ("-e", "--editable"):
                continue  # its value is a requirement or a path: read it like one
            skip = "=" not in arg and arg in _PIP_VALUE_OPTIONS
            continue
        req = _requirement(arg, where)
        if req is not None:
            out.append(req)
    return out


_WHEEL = re.compile(r"(?:^|/)([A-Za-z0-9][A-Za-z0-9._]*?)-(\d[^-/]*)(?:-\d[^-/]*)?-[^-/]+-[^-/]+-[^-/]+\.whl$")


def _requirement(arg: str, where: str) -> Install | None:
    wheel = _WHEEL.search(arg.split("#")[0])
    if wheel and "@" not in arg.split("/")[0]:
        return Install(_norm(wheel.group(1)), wheel.group(2), where, arg)
    egg = re.search(r"#egg=([A-Za-z0-9._-]+)", arg)
    if egg and "://" in arg:  # git+https://...@v0.1.0#egg=lcl-tune
        return Install(_norm(egg.group(1)), _git_tag_version(arg.split("#")[0]), where, None)
    m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*(.*)$", arg)
    if not m or "/" in m.group(1):
        return None  # a local path or URL without a name: nothing to check
    name, rest = _norm(m.group(1)), m.group(3).strip()
    if rest.startswith("@"):  # name @ URL
        url = rest[1:].strip()
        wheel = _WHEEL.search(url)
        return Install(name, wheel.group(2) if wheel else _git_tag_version(url), where, None)
    exact = re.fullmatch(r"===?\s*([A-Za-z0-9][A-Za-z0-9.+!_-]*)", rest.split(";")[0].strip())
    return Install(name, exact.group(1) if exact else None, where, None)


def _git_tag_version(url: str) -> str | None:
    tag = re.search(r"@v?(\d+(?:\.\d+)+[A-Za-z0-9.+-]*)$", url)
    return tag.group(1) if tag else None


def _install_problems(config: dict[str, Any], source: str, pins: Pins) -> list[str]:
    problems = []
    expected = {PROJECT: pins.version, "ray": pins.pins.get("ray")}
    origin = f"pyproject.toml ({pins.origin})" if pins.origin.endswith("pyproject.toml") else pins.origin
    installs = [i for key, cmd in _all_commands(config) for i in parse_installs(cmd, key)]

    # Pinned, and to the project's versions; without a pyproject, at least to one version.
    for pkg in (PROJECT, "ray"):
        mine = [i for i in installs if i.package == pkg]
        versions = sorted({i.version for i in mine if i.version})
        want = expected[pkg] or (versions[0] if len(versions) == 1 else None)
        for inst in mine:
            if inst.version is None:
                problems.append(_problem(
                    source, inst.where, f"installs {pkg} without pinning a version, so nodes may differ",
                    f"pin it: \"{pkg}=={want or 'X.Y.Z'}\""))
            elif want is None:
                problems.append(_problem(
                    source, inst.where, f"installs {pkg} {inst.version}, but the commands pin {pkg} to "
                    f"{' and '.join(versions)}: every node must run the same version", "pin one version everywhere"))
            elif inst.version != want:
                by_node = _versions_by_node(config, pkg)
                problems.append(_problem(
                    source, inst.where, f"installs {pkg} {inst.version}, not {want} as {origin} has it "
                    f"(per node: {by_node}); every node must run the same pinned version",
                    f"install {pkg}=={want}" + (" (rebuild the wheel with the same version)" if inst.path else "")))

    # Every node installs both (when a command list is missing, that is the problem reported).
    complete = all(key in config for key in COMMAND_LISTS)
    for node, cmds in _node_commands(config).items() if complete else ():
        mine = {i.package for key, cmd in cmds for i in parse_installs(cmd, key)}
        for pkg in (PROJECT, "ray"):
            if pkg not in mine:
                override = node in _node_types(config) and "worker_setup_commands" in _node_types(config)[node]
                why = (" (its own worker_setup_commands replace setup_commands for it)" if override else "")
                problems.append(_problem(
                    source, f"available_node_types.{node}" if not node.startswith("head (") else "setup_commands",
                    f"no command installs {pkg} on {node}{why}",
                    f"install \"{pkg}=={expected[pkg] or 'X.Y.Z'}\" in setup_commands (run on every node)"))

    # Other packages pinned in pyproject.toml: a pin here must agree.
    for inst in installs:
        want = pins.pins.get(inst.package)
        if inst.package not in (PROJECT, "ray") and want and inst.version and inst.version != want:
            problems.append(_problem(source, inst.where, f"installs {inst.package} {inst.version}, but {origin} "
                                     f"pins {inst.package}=={want}", f"install {inst.package}=={want}"))
    return problems


def _versions_by_node(config: dict[str, Any], pkg: str) -> str:
    parts = []
    for node, cmds in _node_commands(config).items():
        versions = sorted({i.version or "unpinned" for key, cmd in cmds for i in parse_installs(cmd, key)
                           if i.package == pkg})
        parts.append(f"{node} {'/'.join(versions) or 'none'}")
    return ", ".join(parts)


# ---- storage and tracking settings --------------------------------------------------------

_SETTING = re.compile(r"\b(LCL_TUNE_STORAGE|LCL_TUNE_TRACKING_URI)=(?:\"([^\"]*)\"|'([^']*)'|([^\s;&|\"'`]*))")


def settings(config: dict[str, Any]) -> dict[str, list[tuple[str, str]]]:
    """``LCL_TUNE_STORAGE`` / ``LCL_TUNE_TRACKING_URI`` values assigned in commands: name -> [(key, value)]."""
    found: dict[str, list[tuple[str, str]]] = {STORAGE_VAR: [], TRACKING_VAR: []}
    for key, cmd in _all_commands(config):
        for m in _SETTING.finditer(cmd):
            value = next(g for g in m.groups()[1:] if g is not None)
            found[m.group(1)].append((key, value))
    return found


def _setting_problems(config: dict[str, Any], source: str) -> list[str]:
    problems = []
    found = settings(config)
    examples = {STORAGE_VAR: "s3://BUCKET/lcl_runs", TRACKING_VAR: "http://$HEAD_IP:5000"}
    for var, values in found.items():
        if not values:
            problems.append(_problem(
                source, "head_setup_commands", f"no command sets {var}; the cluster-launcher schema has no place for "
                "project settings, so cluster.yaml exports them from a head command",
                f"add echo \"export {var}={examples[var]}\" >> ~/lcl_tune.env to head_setup_commands"))
        distinct = sorted({v for _, v in values})
        if len(distinct) > 1:
            problems.append(_problem(source, values[1][0], f"{var} is set to {' and '.join(map(repr, distinct))}: "
                                     "studies would use whichever ran last", f"set {var} once"))
    for key, value in found[STORAGE_VAR]:
        m = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://([^/\s]+)", value)
        if not m or m.group(1).lower() in NON_STORAGE_SCHEMES:
            problems.append(_problem(
                source, key, f"{STORAGE_VAR}={value!r} is not an object-storage URI: trials write their checkpoints "
                "from the worker nodes, so the storage must be one that every node reaches",
                "use s3://BUCKET/lcl_runs (AWS) or gs://BUCKET/lcl_runs (GCP)"))
    for key, value in found[TRACKING_VAR]:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            problems.append(_problem(
                source, key, f"{TRACKING_VAR}={value!r} is not an http(s):// tracking server: trials log to MLflow "
                "from the worker nodes, so a local store (a path, sqlite:///) is not shared",
                "use the head's MLflow server, http://$HEAD_IP:5000"))
        elif (parts.hostname or "").lower() in LOOPBACK:
            problems.append(_problem(
                source, key, f"{TRACKING_VAR}={value!r} names the loopback address: on a worker it is the worker "
                "itself", "use the head's private address, e.g. HEAD_IP=$(hostname -I | awk '{print $1}') and "
                "http://$HEAD_IP:5000"))
    problems += _mlflow_server_problems(config, source, found[TRACKING_VAR])
    return problems


_MLFLOW_SERVER = re.compile(r"\bmlflow\s+server\b")


def _mlflow_server_problems(config: dict[str, Any], source: str, tracking: list[tuple[str, str]]) -> list[str]:
    problems = []
    head_keys = {"head_setup_commands", "head_start_ray_commands"}
    servers = []
    for key, cmd in _all_commands(config):
        if not _MLFLOW_SERVER.search(cmd):
            continue
        if key.split("[")[0] in head_keys:
            servers.append((key, cmd))
        else:
            problems.append(_problem(source, key, "starts `mlflow server` on worker nodes too (this list runs there)",
                                     "start it in head_start_ray_commands only"))
    if not servers:
        if tracking:
            problems.append(_problem(
                source, "head_start_ray_commands", f"no command starts the MLflow server that {TRACKING_VAR} names",
                "add mlflow server --backend-store-uri sqlite:////home/ubuntu/mlflow/mlflow.db "
                "--artifacts-destination s3://BUCKET/mlflow-artifacts --host 0.0.0.0 --port 5000"))
        return problems
    ports = {port for _, v in tracking if (port := _port_or_none(v)) is not None}
    for key, cmd in servers:
        host = re.search(r"(?<!\S)(?:--host|-h)[=\s]+(\S+)", cmd)
        if host is None or host.group(1) not in ("0.0.0.0", "::", "$HEAD_IP", "${HEAD_IP}"):
            bound = host.group(1) if host else "127.0.0.1 (its default)"
            problems.append(_problem(source, key, f"mlflow server binds {bound}: the workers cannot reach it",
                                     "add --host 0.0.0.0 (the security group admits only the cluster's nodes)"))
        port_m = re.search(r"(?<!\S)(?:--port|-p)[=\s]+(\d+)", cmd)
        port = int(port_m.group(1)) if port_m else MLFLOW_DEFAULT_PORT
        if ports and port not in ports:
            problems.append(_problem(
                source, key, f"mlflow server listens on port {port}, but {TRACKING_VAR} uses port "
                f"{'/'.join(str(p) for p in sorted(ports))}", f"use the same port in both (e.g. --port {min(ports)})"))
    return problems


def _port_or_none(uri: str) -> int | None:
    """The port of an http(s) URI (80 / 443 when it names none); None for anything else."""
    try:
        parts = urlsplit(uri)
        if parts.scheme not in ("http", "https"):
            return None
        return parts.port or {"http": 80, "https": 443}[parts.scheme]
    except ValueError:
        return None


# ---- node types ----------------------------------------------------------------------------


def _has_gpu(node_type: dict[str, Any]) -> bool:
    """A GPU machine (AWS GPU family, GCP accelerators or GPU machine type) or GPU resources."""
    node_config = node_type.get("node_config") if isinstance(node_type.get("node_config"), dict) else {}
    resources = node_type.get("resources") if isinstance(node_type.get("resources"), dict) else {}
    return bool(AWS_GPU_FAMILY.match(str(node_config.get("InstanceType", "")))
                or node_config.get("guestAccelerators")
                or GCP_GPU_MACHINE.match(str(node_config.get("machineType", "")))
                or _number(resources.get("GPU")) > 0)


def _looks_gpu(name: str, node_type: dict[str, Any]) -> bool:
    """A GPU worker type: a GPU machine, GPU resources, or "gpu" in its name."""
    return _has_gpu(node_type) or "gpu" in name.lower()


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def _node_type_problems(config: dict[str, Any], source: str) -> list[str]:
    problems = []
    types = _node_types(config)
    head = config.get("head_node_type")
    is_aws = isinstance(config.get("provider"), dict) and config["provider"].get("type") == "aws"
    gpu_types = []
    for name, t in types.items():
        key = f"available_node_types.{name}"
        resources = t.get("resources") if isinstance(t.get("resources"), dict) else {}
        node_config = t.get("node_config") if isinstance(t.get("node_config"), dict) else {}
        instance = str(node_config.get("InstanceType", ""))
        if is_aws and node_config and not instance and "LaunchTemplate" not in node_config:
            problems.append(_problem(source, f"{key}.node_config.InstanceType", "missing",
                                     "set the EC2 instance type (e.g. g5.2xlarge)"))
        lo, hi = t.get("min_workers", 0), t.get("max_workers")
        if isinstance(lo, int) and lo < 0:
            problems.append(_problem(source, f"{key}.min_workers", f"is {lo}", "use 0 or more"))
        if isinstance(lo, int) and isinstance(hi, int) and lo > hi:
            problems.append(_problem(
                source, f"{key}.min_workers", f"min_workers {lo} > max_workers {hi} (Ray does not reject it: "
                f"the autoscaler silently keeps at most {hi})",
                f"set min_workers <= max_workers (e.g. min_workers: {hi})"))
        if name == head:
            if _has_gpu(t):
                problems.append(_problem(
                    source, key, f"the head type {name!r} is a GPU machine ({instance or 'GPU resources'}); the head "
                    "runs the driver, Ray's services and MLflow, and trials go to the GPU workers",
                    "use a CPU instance for the head (e.g. m5.2xlarge) and resources without GPU"))
            continue
        if not _looks_gpu(name, t):
            continue
        gpu_types.append(name)
        gpus = resources.get("GPU")
        if gpus is not None and (not isinstance(gpus, int) or isinstance(gpus, bool)):
            continue  # not an integer: Ray's schema reports it
        if gpus is None or gpus < 1:
            problems.append(_problem(
                source, f"{key}.resources.GPU", f"GPU worker type {name!r}{f' ({instance})' if instance else ''} does "
                f"not declare its GPUs (resources: {resources}): the autoscaler would never launch it for a "
                "trial asking for GPUs, and on AWS Ray would have to ask the EC2 API at `ray up`",
                "declare them, e.g. resources: {\"CPU\": 8, \"GPU\": 1}"
                + (f" ({instance} has {AWS_GPU_INSTANCES[instance][1]} GPU)" if instance in AWS_GPU_INSTANCES else "")))
        elif instance in AWS_GPU_INSTANCES and gpus != AWS_GPU_INSTANCES[instance][1]:
            problems.append(_problem(source, f"{key}.resources.GPU", f"declares {gpus} GPU but {instance} has "
                                     f"{AWS_GPU_INSTANCES[instance][1]}", f"set GPU: {AWS_GPU_INSTANCES[instance][1]}"))
        if instance in AWS_GPU_INSTANCES and _number(resources.get("CPU")) > AWS_GPU_INSTANCES[instance][0]:
            problems.append(_problem(source, f"{key}.resources.CPU", f"declares {resources['CPU']} CPU but {instance} "
                                     f"has {AWS_GPU_INSTANCES[instance][0]} vCPUs",
                                     f"set CPU: {AWS_GPU_INSTANCES[instance][0]} or less"))
        if is_aws and instance and not AWS_GPU_FAMILY.match(instance):
            problems.append(_problem(source, f"{key}.node_config.InstanceType", f"{instance} has no GPU, but type "
                                     f"{name!r} is a GPU worker type", "use a GPU instance type (e.g. g5.2xlarge)"))
    if types and not gpu_types:
        problems.append(_problem(source, "available_node_types", "no GPU worker type: the project's GPU studies "
                                 "(resources.gpu > 0) would wait forever",
                                 "add one, e.g. gpu_worker_a10g: {resources: {\"CPU\": 8, \"GPU\": 1}, "
                                 "node_config: {InstanceType: g5.2xlarge}, min_workers: 1, max_workers: 4}"))
    elif gpu_types and not any(isinstance(types[n].get("min_workers", 0), int) and types[n].get("min_workers", 0) >= 1
                               for n in gpu_types):
        problems.append(_problem(
            source, f"available_node_types.{gpu_types[0]}.min_workers",
            "every GPU worker type has min_workers: 0, so a fresh cluster has no GPU and `lcl-tune tune` refuses "
            "a GPU study at once (its resource check runs before any trial asks the autoscaler)",
            f"set min_workers: 1 for {gpu_types[0]}"))
    return problems


# ---- start commands ------------------------------------------------------------------------


def _start_command_problems(config: dict[str, Any], source: str) -> list[str]:
    problems = []
    if "head_start_ray_commands" in config:
        starts = [c for c in _commands(config, "head_start_ray_commands") if "ray start" in c]
        if not any("--head" in c for c in starts):
            problems.append(_problem(source, "head_start_ray_commands", "no `ray start --head`: Ray would not run",
                                     "add ulimit -n 65536; ray start --head --port=6379 --autoscaling-config="
                                     "~/ray_bootstrap_config.yaml --dashboard-host=0.0.0.0"))
        elif not any("autoscaling-config" in c for c in starts):
            problems.append(_problem(source, "head_start_ray_commands", "`ray start --head` lacks "
                                     "--autoscaling-config: the head would never launch a worker",
                                     "add --autoscaling-config=~/ray_bootstrap_config.yaml"))
    if "worker_start_ray_commands" in config:
        starts = [c for c in _commands(config, "worker_start_ray_commands") if "ray start" in c]
        if not any(re.search(r"--address[=\s]+\S*\$\{?RAY_HEAD_IP", c) for c in starts):
            problems.append(_problem(source, "worker_start_ray_commands", "no `ray start --address=$RAY_HEAD_IP:6379`: "
                                     "workers would not join the head",
                                     "add ulimit -n 65536; ray start --address=$RAY_HEAD_IP:6379"))
    return problems


# ---- file mounts ---------------------------------------------------------------------------


def _remote(path: str, user: str) -> str:
    path = str(path).replace("${HOME}", "~").replace("$HOME", "~")
    if path == "~" or path.startswith("~/"):
        path = f"/home/{user}" + path[1:]
    return posixpath.normpath(path)


def _file_mount_problems(config: dict[str, Any], source: str, local_files: bool) -> list[str]:
    problems = []
    mounts = config.get("file_mounts") if isinstance(config.get("file_mounts"), dict) else {}
    auth = config.get("auth") if isinstance(config.get("auth"), dict) else {}
    user = str(auth.get("ssh_user") or "ubuntu")
    remote_of: dict[str, str] = {}
    for remote, local in mounts.items():
        base = posixpath.basename(posixpath.normpath(str(local).rstrip("/")))
        if base in ("search_spaces", "configs"):
            remote_of.setdefault(base, _remote(str(remote), user))
    for folder in ("search_spaces", "configs"):
        if folder not in remote_of:
            problems.append(_problem(
                source, "file_mounts", f"{folder}/ is not mounted: `lcl-tune tune search_spaces/...` on the head "
                f"reads the studies and their ../configs/ there",
                f"add \"/home/{user}/lcl_tune/{folder}\": ./{folder}"))
    if len(remote_of) == 2 and posixpath.dirname(remote_of["search_spaces"]) != posixpath.dirname(remote_of["configs"]):
        problems.append(_problem(
            source, "file_mounts", f"search_spaces/ ({remote_of['search_spaces']}) and configs/ "
            f"({remote_of['configs']}) are not side by side: studies name their base as ../configs/...",
            "mount both under the same folder (e.g. /home/ubuntu/lcl_tune/)"))
    mounted = [_remote(str(r), user) for r in mounts]
    for key, cmd in _all_commands(config):
        for inst in parse_installs(cmd, key):
            if inst.path is None or "://" in inst.path:
                continue
            target = _remote(inst.path, user)
            covered = any(target == m or target.startswith(m.rstrip("/") + "/") for m in mounted)
            if target.startswith("/") and not covered:
                problems.append(_problem(source, key, f"installs {inst.path}, but no file_mounts entry puts it there",
                                         f"mount it: \"{inst.path}\": ./dist/{posixpath.basename(inst.path)}"))
    if local_files:
        for remote, local in mounts.items():
            if not Path(os.path.expanduser(str(local))).exists():
                hint = "build it: python -m pip wheel --no-deps -w dist ." if str(local).endswith(".whl") \
                    else "run ray up from the repository root, or fix the path"
                problems.append(_problem(source, f"file_mounts.{remote}", f"the local source {local} does not exist "
                                         f"(relative to {os.getcwd()}, where ray up reads it)", hint))
    return problems


if __name__ == "__main__":
    sys.exit(main())
