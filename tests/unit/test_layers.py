"""The layering of aigis/ stays one-directional: leaves, pure logic, I/O, daemon; the CLI is apart.

Imports are read with ast (nothing is imported), so a forbidden edge fails here by name.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[2] / "aigis"

LEAVES = {
    "aigis._errors", "aigis._version", "aigis._states", "aigis._redact", "aigis._settings",
    "aigis._quote", "aigis._metrics",
}  # fmt: skip
# They run on remote hosts: the standard library only.
LEAVES |= {"aigis._remote.syncer", "aigis._remote.hostside"}
PURE = {
    "aigis._config", "aigis._manifest", "aigis._namespace", "aigis._reload",
    "aigis._supervise.units",
    "aigis._supervise.base", "aigis._supervise.policy", "aigis._supervise.unitstate",
    "aigis._rpc.wire", "aigis._status", "aigis._launch",
    "aigis._remote.hosts", "aigis._remote.plan", "aigis._rpc.handshake", "aigis._rpc.admission",
    "aigis._page", "aigis._exposition", "aigis._top",
}  # fmt: skip
TOP = {"aigis._daemon", "aigis._ctl", "aigis._control", "aigis.__main__"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, top_level_only: bool = False) -> set[str]:
    """aigis modules imported by ``path`` (``from aigis import x`` counts as aigis.x)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("aigis"):
            if node.module == "aigis":
                found |= {f"aigis.{alias.name}" for alias in node.names}
            else:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("aigis")}
    return found


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


@pytest.mark.parametrize("name", sorted(LEAVES))
def test_leaves_import_nothing_of_ours(name):
    assert imports(MODULES[name]) == set()


@pytest.mark.parametrize("name", sorted(PURE))
def test_pure_logic_imports_only_leaves_and_pure_logic(name):
    allowed = (
        LEAVES | PURE | {"aigis._supervise", "aigis._rpc", "aigis._remote"}
    )  # package __init__ on the path
    assert imports(MODULES[name]) - allowed == set()


@pytest.mark.parametrize("name", sorted(set(MODULES) - TOP))
def test_nothing_below_the_top_imports_the_daemon_or_the_cli(name):
    assert imports(MODULES[name]) & TOP == set()


def test_the_cli_starts_without_importing_the_daemon_side():
    assert imports(MODULES["aigis._ctl"], top_level_only=True) == {
        "aigis._version",
        "aigis._settings",
    }
    assert imports(MODULES["aigis._ctl"]) & {"aigis._daemon", "aigis._loader"} == set()
