"""servers/ sits at the bottom of the dependency graph: it imports the standard library only."""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

from servers_testing import REPO, run_python

PACKAGE = REPO / "servers"
FORBIDDEN = {"daemon", "structlog", "psutil"}


def imported_modules(path: Path) -> set[str]:
    """Top-level names of the absolute imports in a source file (relative ones are skipped)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.partition(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            assert node.module is not None
            names.add(node.module.partition(".")[0])
    return names


def test_every_module_imports_only_the_stdlib() -> None:
    sources = sorted(PACKAGE.glob("*.py"))
    assert {p.name for p in sources} >= {"__init__.py", "base.py", "stream.py", "datagram.py"}
    for path in sources:
        imports = imported_modules(path)
        assert not imports & FORBIDDEN, f"{path.name} imports {imports & FORBIDDEN}"
        outside = imports - set(sys.stdlib_module_names)
        assert not outside, f"{path.name} imports beyond the standard library: {outside}"


def test_the_import_checker_sees_imports() -> None:
    # Guards the test above against passing vacuously.
    assert {"socket", "selectors"} <= imported_modules(PACKAGE / "base.py") | imported_modules(
        PACKAGE / "stream.py"
    )


def test_importing_servers_loads_no_daemon_dependency() -> None:
    script = (
        "import json, pkgutil, sys, importlib, servers\n"
        "for m in pkgutil.iter_modules(servers.__path__):\n"
        "    importlib.import_module('servers.' + m.name)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.partition('.')[0] in "
        f"{sorted(FORBIDDEN)!r})))\n"
    )
    proc = run_python(["-c", script], timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []
