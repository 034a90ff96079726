"""The import picture between the project's packages: serving never pulls in training code, and no product package
imports the test helpers (testkit)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGES = ("backbone", "prompts_store", "training", "service", "clients", "bench", "testkit")
# What each package may import among the project's packages (clients is the CLI: it starts training jobs and benches).
ALLOWED = {
    "backbone": set(),
    "prompts_store": set(),
    "training": {"backbone", "prompts_store"},
    "service": {"backbone", "prompts_store"},
    "clients": {"backbone", "prompts_store", "service", "training", "bench"},
    "bench": {"backbone", "prompts_store", "service", "training", "testkit"},
    "testkit": {"backbone", "prompts_store", "training"},
}


def project_imports(package: str) -> dict[str, list[str]]:
    """{imported project package: [file:line, ...]} for every absolute import in the package's modules."""
    found: dict[str, list[str]] = {}
    for path in sorted((REPO / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                modules = [node.module]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                if top in PACKAGES and top != package:
                    found.setdefault(top, []).append(f"{path.relative_to(REPO)}:{node.lineno}")
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_package_imports_only_the_layers_below_it(package):
    imports = project_imports(package)
    forbidden = {top: where for top, where in imports.items() if top not in ALLOWED[package]}
    assert not forbidden, f"{package} imports {forbidden}"


def test_the_rule_is_checked_against_real_imports():
    assert "backbone" in project_imports("service") and "training" not in project_imports("service")
