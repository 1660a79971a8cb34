"""gateway/core stays sans-IO: no I/O libraries, no clock, no global randomness."""

from __future__ import annotations

import ast
from pathlib import Path

CORE = Path(__file__).resolve().parent.parent / "gateway" / "core"
FORBIDDEN_MODULES = {"asyncio", "aiocoap", "sqlite3", "redis", "socket", "time", "random", "threading", "datetime"}


def test_core_imports_no_io_clock_or_randomness() -> None:
    offenders = []
    for path in sorted(CORE.glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in FORBIDDEN_MODULES]
    assert offenders == []
    assert len(list(CORE.glob("*.py"))) >= 5
