"""Every public function and method of fishr_lite has type hints (the package ships py.typed)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "fishr_lite"
UNHINTED_NAMES = {"self", "cls", "ctx"}


def unhinted(function: ast.FunctionDef, owner: str = "") -> list[str]:
    """``"owner.name: [parameters without hints, 'return']"`` or nothing."""
    if function.name.startswith("_") and function.name not in ("__init__", "__call__"):
        return []
    args = function.args
    params = [a for a in args.posonlyargs + args.args + args.kwonlyargs if a.arg not in UNHINTED_NAMES]
    params += [a for a in (args.vararg, args.kwarg) if a is not None]
    missing = [a.arg for a in params if a.annotation is None]
    if function.returns is None and function.name != "__init__":
        missing.append("return")
    return [f"{owner}{function.name}: {missing}"] if missing else []


def public_functions_without_hints(path: Path) -> list[str]:
    found = []
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            found += unhinted(node)
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    found += unhinted(item, f"{node.name}.")
    return [f"{path.relative_to(PACKAGE.parent)}: {entry}" for entry in found]


def test_every_public_function_has_type_hints():
    missing = [e for path in sorted(PACKAGE.rglob("*.py")) for e in public_functions_without_hints(path)]
    assert not missing, "add type hints:\n" + "\n".join(missing)


def test_the_check_finds_a_function_without_hints(tmp_path):
    module = tmp_path / "fishr_lite" / "example.py"
    module.parent.mkdir()
    module.write_text("def f(x, y: int) -> int:\n    return y\n\ndef _private(z):\n    return z\n")
    global PACKAGE
    saved, PACKAGE = PACKAGE, tmp_path / "fishr_lite"
    try:
        assert public_functions_without_hints(module) == ["fishr_lite/example.py: f: ['x']"]
    finally:
        PACKAGE = saved
