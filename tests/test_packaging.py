"""Every package folder is listed in pyproject.toml, and the library never imports Prefect."""

import ast
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_is_listed():
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapped = {v: k for k, v in tool["package-dir"].items()}
    found = set()
    for init in ROOT.glob("**/__init__.py"):
        rel = init.parent.relative_to(ROOT)
        if rel.parts[0] in {"tests", "build"} or any(p.startswith(".") for p in rel.parts):
            continue
        head = mapped.get(rel.parts[0], rel.parts[0])
        found.add(".".join((head, *rel.parts[1:])))
    assert found == set(tool["packages"])


def test_library_has_no_prefect_imports():
    """The library never imports Prefect; the command line is the application above it (`midpo run` runs the flow)."""
    for path in (ROOT / "midpo").rglob("*.py"):
        if path == ROOT / "midpo" / "cli.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.split(".")[0] in {"prefect", "midpo_tasks", "midpo_flows"} for n in names), path
