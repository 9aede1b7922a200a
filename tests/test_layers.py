"""The package's layers: imports run one way, and the schema stays light.

Three checks: every module of the package imports in this environment; every import statement in the package (module level and inside functions, found by
parsing the source) respects the layer order; and validating every shipped YAML through the schema
package, in a fresh interpreter, loads none of torch, Ray, MLflow or Optuna.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "lcl_tune"

# What each layer may import from the package (itself included); everything above it is off limits.
ALLOWED = {
    "util": set(),
    "schema": {"util", "schema"},
    "core": {"util", "schema", "core"},
    "analysis": {"util", "schema", "analysis"},
    "adapters": {"util", "schema", "core", "analysis", "adapters"},
    "workflows": {"util", "schema", "core", "analysis", "adapters", "workflows"},
    "cli": {"util", "schema", "core", "analysis", "adapters", "workflows", "cli"},
}
# Third-party packages a layer must never import.
FORBIDDEN = {
    "util": {"torch", "transformers", "datasets", "ray", "mlflow", "optuna"},
    "schema": {"torch", "transformers", "datasets", "ray", "mlflow", "optuna"},
    "core": {"ray", "mlflow", "optuna"},
    "analysis": {"ray", "mlflow", "optuna", "torch"},
}
HEAVY = ("torch", "ray", "mlflow", "optuna")


def layer_of(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def imported_modules(path: Path, package: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``path``, relative ones resolved against
    ``package`` (the dotted package the file is in)."""
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            module = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
            found.append((node.lineno, module))
            if module in ("lcl_tune", *(f"lcl_tune.{layer}" for layer in ALLOWED)):  # from lcl_tune import schema
                found += [(node.lineno, f"{module}.{a.name}") for a in node.names]
    return found


def violations(path: Path, layer: str, package: str) -> list[str]:
    problems = []
    for line, module in imported_modules(path, package):
        top, _, rest = module.partition(".")
        if top == "lcl_tune" and rest:
            target = rest.split(".")[0]
            if target not in ALLOWED[layer]:
                problems.append(f"line {line}: {layer} imports {module}")
        elif top in FORBIDDEN.get(layer, set()):
            problems.append(f"line {line}: {layer} imports {top}")
    return problems


MODULES = sorted(p for p in PACKAGE.rglob("*.py"))


def test_every_module_belongs_to_a_known_layer():
    layers = {layer_of(p) for p in MODULES} - {"__init__"}
    assert layers == set(ALLOWED), layers


@pytest.mark.parametrize("path", [p for p in MODULES if layer_of(p) != "__init__"],
                         ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_run_one_way(path):
    package = ".".join(("lcl_tune", *path.relative_to(PACKAGE).parent.parts))
    problems = violations(path, layer_of(path), package)
    assert not problems, f"{path.relative_to(REPO)}: " + "; ".join(problems)


def test_the_layer_check_sees_a_violation(tmp_path):
    """The walker is not vacuous: a core module importing an adapter or Ray inside a function,
    relatively or absolutely, is caught."""
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from lcl_tune.adapters import tracking\n    import ray\n"
                     "    from ..workflows import export\n    from .engine import Trainer\n")
    assert violations(probe, "core", "lcl_tune.core") == [
        "line 2: core imports lcl_tune.adapters", "line 2: core imports lcl_tune.adapters.tracking",
        "line 3: core imports ray", "line 4: core imports lcl_tune.workflows",
        "line 4: core imports lcl_tune.workflows.export"]


VALIDATE_ALL = """
import json, sys
from pathlib import Path
from lcl_tune.schema import trial, study, ablation

checked = []
for path in sorted(Path("configs").glob("*.yaml")) + sorted(Path("search_spaces").glob("*.yaml")):
    tree = trial.load_yaml(path)
    if ablation.is_ablation(tree):
        ablation.load_ablation(path)
    elif "space" in tree:
        study.load_study(path)
    else:
        trial.load(path)
    checked.append(str(path))
print(json.dumps({"checked": checked, "heavy": [m for m in %r if m in sys.modules]}))
""" % (HEAVY,)


def test_the_schema_validates_every_shipped_yaml_without_heavy_imports():
    out = subprocess.run([sys.executable, "-c", VALIDATE_ALL], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    shipped = len(list((REPO / "configs").glob("*.yaml"))) + len(list((REPO / "search_spaces").glob("*.yaml")))
    assert len(result["checked"]) == shipped >= 8
    assert result["heavy"] == [], f"validation imported {result['heavy']}"


def test_every_module_of_the_package_imports():
    """Every lcl_tune module, so every dependency and submodule they import, loads in this environment.
    A dependency set where one breaks at import (mlflow 3.5-3.8 under SQLAlchemy 2.1 did) fails here
    with the module's name, besides failing the test files that import it."""
    import importlib
    import pkgutil

    import lcl_tune

    failed = []
    for info in pkgutil.walk_packages(lcl_tune.__path__, "lcl_tune."):
        if info.name.endswith(".__main__"):  # runs the command line when imported
            continue
        try:
            importlib.import_module(info.name)
        except Exception as e:  # noqa: BLE001 - every failure is reported, with its module
            failed.append(f"{info.name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    assert not failed, "modules that do not import here:\n" + "\n".join(failed)
