"""What the README and the docs show a user works: every YAML block in them validates, as the user
would paste it into a file next to the shipped ones (``search_spaces/``)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from lcl_tune.cli.main import main

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
FENCE = re.compile(r"^( *)```ya?ml[^\n]*\n(.*?)^\1```", re.M | re.S)


def yaml_blocks() -> list[tuple[str, str]]:
    """``(page:line, text)`` of every fenced YAML block of the README and the docs."""
    blocks = []
    for page in PAGES:
        text = page.read_text()
        for m in FENCE.finditer(text):
            indent = len(m.group(1))
            body = "\n".join(line[indent:] for line in m.group(2).splitlines())
            blocks.append((f"{page.relative_to(REPO)}:{text.count(chr(10), 0, m.start()) + 1}", body))
    return blocks


BLOCKS = yaml_blocks()


def test_the_readme_shows_a_study_file():
    assert any(where.startswith("README.md:") and "space:" in body for where, body in BLOCKS)


def _validate_trial_study_or_ablation(where: str, body: str, tmp_path: Path, capsys) -> None:
    """``lcl-tune validate`` on the block, saved where the shipped study files live."""
    (tmp_path / "configs").symlink_to(REPO / "configs")  # relative `base:` paths as in search_spaces/
    (tmp_path / "search_spaces").mkdir()
    path = tmp_path / "search_spaces" / "block.yaml"
    path.write_text(body)
    code = main(["validate", str(path)])
    out = capsys.readouterr()
    assert code == 0, f"{where}: {out.err.strip()}"
    assert f"{path}: valid " in out.out


def _validate_cluster_fragment(where: str, tree: dict, tmp_path: Path) -> None:
    """Keys of ``cluster.yaml`` to replace (the docs' other clouds): the result passes the cluster check."""
    from lcl_tune.cli.cluster_check import validate_cluster_config

    merged = yaml.safe_load((REPO / "cluster.yaml").read_text())
    merged.update(tree)
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(merged, sort_keys=False))
    assert validate_cluster_config(path, pyproject=REPO / "pyproject.toml") == [], where


@pytest.mark.parametrize("where, body", BLOCKS, ids=[w for w, _ in BLOCKS])
def test_every_yaml_block_of_the_docs_validates(where, body, tmp_path, capsys):
    """Study, ablation and trial files go through ``lcl-tune validate``; cluster fragments through the
    cluster check; Kubernetes manifests must parse and name their kind (tests/test_cluster_config.py
    checks their content). A block of any other kind fails, so a new kind gets a check."""
    docs = list(yaml.safe_load_all(body))
    assert docs and all(isinstance(d, dict) for d in docs), f"{where}: not a mapping"
    tree = docs[0]
    if len(docs) > 1 or "apiVersion" in tree:
        assert all({"apiVersion", "kind", "metadata"} <= set(d) for d in docs), f"{where}: a manifest without its kind"
    elif "provider" in tree or "available_node_types" in tree:
        _validate_cluster_fragment(where, tree, tmp_path)
    elif {"space", "arms", "model", "data", "loss"} & set(tree):
        _validate_trial_study_or_ablation(where, body, tmp_path, capsys)
    else:
        pytest.fail(f"{where}: a YAML block of an unknown kind; teach this test to check it")
