"""The package's shape (README "Layout"), checked from its source: what a newcomer relies on when reading it.

The layers themselves (which package may import which, no cycles) are import-linter contracts in
pyproject.toml, run by .ci/run; these are the rules import-linter cannot express.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "gateway"
MAX_LINES = 500


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_no_module_imports_another_modules_private_names() -> None:
    """Nor do the tests and benchmarks: what they need of a module is its public interface."""
    root = PACKAGE.parent
    sources = _modules() + sorted((root / "tests").glob("*.py")) + sorted((root / "bench").glob("*.py"))
    offenders = []
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module != "__future__":
                offenders += [f"{path.relative_to(root)}:{node.lineno}: {node.module}.{alias.name}"
                              for alias in node.names if alias.name.startswith("_") and alias.name != "__version__"]
    assert not offenders, "private names imported across modules:\n" + "\n".join(offenders)


def test_the_backends_internals_are_all_named_in_the_import_contract() -> None:
    """pyproject.toml forbids the web and proxy layers every backends module but the public ones; a new
    backends module must be added there (or made public on purpose), not slip through."""
    public = {"__init__", "base", "dcv_access", "desktop_users"}
    contracts = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    (contract,) = [c for c in contracts if c["type"] == "forbidden" and "gateway.web" in c["source_modules"]]
    internal = {f"gateway.backends.{p.stem}" for p in (PACKAGE / "backends").glob("*.py") if p.stem not in public}
    assert set(contract["forbidden_modules"]) == internal


def test_no_module_is_longer_than_a_reader_can_hold() -> None:
    long = [f"{path.relative_to(PACKAGE.parent)}: {n} lines" for path in _modules()
            if (n := len(path.read_text().splitlines())) > MAX_LINES]
    assert not long, f"modules over {MAX_LINES} lines:\n" + "\n".join(long)


def test_every_layer_says_what_it_may_import() -> None:
    undocumented = [p.parent.name for p in PACKAGE.glob("*/__init__.py")
                    if "import" not in (ast.get_docstring(ast.parse(p.read_text())) or "")]
    assert not undocumented, f"layer packages without a docstring saying what they may import: {undocumented}"
