"""The scheduler core is pure logic: it imports no I/O, framework or clock module.

This is what lets the same core run live and inside the simulator with a virtual clock. Relative
imports are resolved: the core may import itself and the contract's pure modules only (never the
rest of the scheduler, which holds the live service's I/O).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from test_import_rules import imported_modules, module_name

SCHEDULER = Path(__file__).resolve().parents[1] / "services/scheduler/ecoserve_scheduler"
CORE = SCHEDULER / "core"
# The contract modules the core may use: plain dataclasses, no protobuf, grpc or I/O.
PURE_CONTRACT = {
    "ecoserve_common",
    "ecoserve_common.plan",
    "ecoserve_common.sampling",
    "ecoserve_common.buckets",
}
FORBIDDEN = {
    "torch",
    "zmq",
    "grpc",
    "sqlalchemy",
    "onnxruntime",
    "transformers",
    "numpy",  # frameworks
    "time",
    "datetime",
    "asyncio",
    "socket",
    "threading",
    "subprocess",
    "os",
    "random",  # I/O, clock
}
CORE_FILES = sorted(CORE.rglob("*.py"))


def imported_roots(tree: ast.AST) -> set[str]:
    roots: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "__import__":
            roots.add("__import__")
    return roots


def test_core_files_found():
    assert len(CORE_FILES) >= 8, f"core moved? found {CORE_FILES}"


@pytest.mark.parametrize("path", CORE_FILES, ids=lambda p: str(p.relative_to(CORE)))
def test_core_imports_nothing_impure(path: Path):
    bad = imported_roots(ast.parse(path.read_text())) & (FORBIDDEN | {"__import__"})
    assert not bad, f"{path.name} imports {sorted(bad)}: the core must stay pure"


@pytest.mark.parametrize("path", CORE_FILES, ids=lambda p: str(p.relative_to(CORE)))
def test_core_imports_only_itself_and_pure_contract_modules(path: Path):
    mods = imported_modules(path, module_name(path, "ecoserve_scheduler", SCHEDULER))
    ours = {m for m in mods if m.startswith("ecoserve")}
    bad = {m for m in ours if not m.startswith("ecoserve_scheduler.core")} - PURE_CONTRACT
    assert not bad, f"{path.name} imports {sorted(bad)}: the core must stay pure"


def test_rule_catches_a_violation():
    assert "time" in imported_roots(ast.parse("import time\nfrom torch import nn"))
    assert "torch" in imported_roots(ast.parse("from torch.nn import Linear"))
