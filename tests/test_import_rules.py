"""The layout's import rules, read from the code (absolute and relative imports alike):

- the contract (`ecoserve_common`) imports no service;
- each service and the SDK import only the contract and themselves;
- only the stack (`ecoserve_stack`), the integration layer, imports several services.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = {
    "ecoserve_common": REPO / "services/common/ecoserve_common",
    "ecoserve_scheduler": REPO / "services/scheduler/ecoserve_scheduler",
    "ecoserve_worker": REPO / "services/worker/ecoserve_worker",
    "ecoserve_predictor": REPO / "services/predictor/ecoserve_predictor",
    "ecoserve_client": REPO / "sdk/ecoserve_client",
}
ALLOWED = {name: {name, "ecoserve_common"} for name in PACKAGES}
ALLOWED["ecoserve_common"] = {"ecoserve_common"}


def module_name(path: Path, package: str, root: Path) -> str:
    parts = [package, *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, module: str) -> set[str]:
    """Full names of every module `path` imports; relative imports resolved against `module`."""
    is_pkg = path.name == "__init__.py"
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                names.add(node.module or "")
                continue
            base = module.split(".")
            base = base if is_pkg else base[:-1]
            up = node.level - 1
            if up > len(base) - 1:
                names.add("<above the top package>")
                continue
            base = base[: len(base) - up] if up else base
            names.add(".".join(base + ([node.module] if node.module else [])))
    return names


def files():
    for package, root in PACKAGES.items():
        for path in sorted(root.rglob("*.py")):
            yield pytest.param(package, root, path, id=str(path.relative_to(REPO)))


@pytest.mark.parametrize(("package", "root", "path"), list(files()))
def test_a_service_imports_only_the_contract_and_itself(package, root, path):
    imported = imported_modules(path, module_name(path, package, root))
    roots = {m.split(".")[0] for m in imported}
    bad = {r for r in roots if r.startswith("ecoserve") or r.startswith("<")} - ALLOWED[package]
    assert not bad, f"{path.relative_to(REPO)} imports {sorted(bad)}"


def test_relative_imports_are_resolved():
    root = PACKAGES["ecoserve_scheduler"]
    path = root / "core/policies/base.py"
    got = imported_modules(path, module_name(path, "ecoserve_scheduler", root))
    assert any(m.startswith("ecoserve_scheduler.core.") for m in got), got


def test_rule_catches_a_violation(tmp_path):
    pkg = tmp_path / "ecoserve_worker"
    (pkg / "sub").mkdir(parents=True)
    bad = pkg / "sub/x.py"
    bad.write_text("from ecoserve_scheduler.core import plan\nfrom ... import y\n")
    got = imported_modules(bad, module_name(bad, "ecoserve_worker", pkg))
    assert "ecoserve_scheduler.core" in got and "<above the top package>" in got
