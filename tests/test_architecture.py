"""Data flows one way (DESIGN.md): lower layers never import upper ones."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "fishr_lite"

# module (or subpackage) -> the fishr_lite modules it may import (besides itself)
ALLOWED = {
    "grads": set(),
    "blocked": set(),
    "switches": set(),
    "compiled_variance": {"grads", "blocked", "switches"},
    "head_variance": {"grads", "blocked", "compiled_variance"},
    "fused_head": {"grads", "blocked", "compiled_variance", "head_variance", "switches"},
    "penalty": {"grads", "head_variance", "fused_head", "blocked"},
    "training": {"grads", "penalty"},
    "objectives": {"grads", "penalty", "training", "blocked"},
    "diagnostics": {"grads", "penalty"},
    "data": set(),
    "toy": set(),
    "gradient_agreement": set(),
    "profiles": set(),
    "plotting": set(),
    "cpu_memory": set(),
    "linear_relu": {"switches"},
    "results": {"__init__", "cpu_memory", "compiled_variance"},  # provenance: version, settings
    "experiments": {"data", "objectives", "profiles", "results", "grads", "penalty", "training", "cpu_memory",
                    "linear_relu", "plotting", "diagnostics", "__init__"},
    "domainbed": {"data", "grads", "penalty", "training", "objectives", "profiles", "results",
                  "plotting", "__init__"},
}


def fishr_imports(path: Path) -> set[str]:
    """Top-level fishr_lite modules imported by ``path``."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "fishr_lite":
                found.add(parts[1] if len(parts) > 1 else "__init__")
    return found


def layer_of(path: Path) -> str:
    relative = path.relative_to(PACKAGE)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


SOURCES = [p for p in sorted(PACKAGE.rglob("*.py")) if p.parent != PACKAGE or p.stem != "__init__"]


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_follow_the_layers(path):
    layer = layer_of(path)
    assert layer in ALLOWED, f"{layer} is a new module: add it to ALLOWED with its allowed imports"
    # names imported from fishr_lite itself may be submodules (``from fishr_lite import data``)
    imported = {name for name in fishr_imports(path) if name in ALLOWED or name == "__init__"}
    forbidden = imported - ALLOWED[layer] - {layer}
    assert not forbidden, f"{path.name} ({layer}) imports {sorted(forbidden)}: upper layers"


def test_modules_stay_short():
    long = {str(p.relative_to(PACKAGE)): n for p in SOURCES
            if (n := len(p.read_text().splitlines())) > 450}
    assert not long, f"modules past ~400 lines are two ideas, split them: {long}"
