"""The student edition (``make student``, ``tools/student_edition.py``): every chapter with its
solution cells replaced by empty answer cells and its outputs stripped.

Two properties make it usable without executing it here (executing every chapter twice would
double CI's time): no solution code remains, and it runs with the answers left blank, proved
statically: no cell after a solution uses a name that only solution cells define (a cell that
runs in the full edition then finds every name it needs in the student edition too).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import symtable
from pathlib import Path

import pytest
from IPython.core.inputtransformer2 import TransformerManager

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("student_edition", ROOT / "tools" / "student_edition.py")
student_edition = importlib.util.module_from_spec(spec)
spec.loader.exec_module(student_edition)

CHAPTERS = student_edition.chapters()
TO_PYTHON = TransformerManager()


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def source(cell: dict) -> str:
    return "".join(cell["source"])


def python(cell: dict) -> str:
    """The cell as plain Python (IPython magics and shell escapes become calls)."""
    return TO_PYTHON.transform_cell(source(cell))


def bound_names(code: str) -> set[str]:
    """Names a cell binds at the top level of the kernel (assignments, imports, def, class,
    for and with targets, walrus, ``global`` inside functions)."""
    table = symtable.symtable(code, "<cell>", "exec")
    names = {s.get_name() for s in table.get_symbols() if s.is_assigned() or s.is_imported()}

    def declared_global(t):
        for child in t.get_children():
            names.update(s.get_name() for s in child.get_symbols()
                         if s.is_declared_global() and s.is_assigned())
            declared_global(child)

    declared_global(table)
    return names


def _expression_loads(node: ast.AST) -> set[str]:
    """Names an expression (or a statement's expressions) reads, less the names its own
    comprehensions and lambdas bind (a shadowed global is still counted: conservative)."""
    local = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.comprehension):
            local |= {n.id for n in ast.walk(sub.target) if isinstance(n, ast.Name)}
        elif isinstance(sub, ast.Lambda):
            local |= {a.arg for a in ast.walk(sub.args) if isinstance(a, ast.arg)}
    return {n.id for n in ast.walk(node)
            if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)} - local


def _target_names(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}


def needed_names(code: str) -> set[str]:
    """Global names a cell reads before it binds them, in execution order: top-level
    statements one after the other (a loop's iterable before its target, an assignment's value
    before its targets), then the globals its functions and classes read that the cell never
    binds (they may be called later)."""
    needed: set[str] = set()
    bound: set[str] = set()
    deferred: set[str] = set()

    def read(node):
        needed.update(_expression_loads(node) - bound)

    def visit(statements):
        for st in statements:
            if isinstance(st, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                for expr in st.decorator_list:
                    read(expr)
                if isinstance(st, ast.ClassDef):
                    for expr in st.bases + [k.value for k in st.keywords]:
                        read(expr)
                else:
                    for expr in st.args.defaults + [d for d in st.args.kw_defaults if d]:
                        read(expr)
                bound.add(st.name)
            elif isinstance(st, (ast.Assign, ast.AnnAssign)):
                if st.value is not None:
                    read(st.value)
                targets = st.targets if isinstance(st, ast.Assign) else [st.target]
                for target in targets:
                    read(target)  # the bases of subscripts and attributes
                    bound.update(_target_names(target))
            elif isinstance(st, ast.AugAssign):
                read(st.value)
                needed.update({n.id for n in ast.walk(st.target) if isinstance(n, ast.Name)} - bound)
                bound.update(_target_names(st.target))
            elif isinstance(st, (ast.For, ast.AsyncFor)):
                read(st.iter)
                bound.update(_target_names(st.target))
                visit(st.body)
                visit(st.orelse)
            elif isinstance(st, (ast.With, ast.AsyncWith)):
                for item in st.items:
                    read(item.context_expr)
                    if item.optional_vars is not None:
                        bound.update(_target_names(item.optional_vars))
                visit(st.body)
            elif isinstance(st, (ast.If, ast.While)):
                read(st.test)
                visit(st.body)
                visit(st.orelse)
            elif isinstance(st, ast.Try):
                visit(st.body)
                for handler in st.handlers:
                    if handler.type is not None:
                        read(handler.type)
                    if handler.name:
                        bound.add(handler.name)
                    visit(handler.body)
                visit(st.orelse)
                visit(st.finalbody)
            elif isinstance(st, (ast.Import, ast.ImportFrom)):
                bound.update((a.asname or a.name).split(".")[0] for a in st.names)
            elif isinstance(st, ast.Global):
                continue
            else:
                read(st)
                bound.update(n.target.id for n in ast.walk(st)
                             if isinstance(n, ast.NamedExpr) and isinstance(n.target, ast.Name))

    visit(ast.parse(code).body)

    def nested(table):
        for child in table.get_children():
            deferred.update(s.get_name() for s in child.get_symbols()
                            if s.is_referenced() and s.is_global())
            nested(child)

    nested(symtable.symtable(code, "<cell>", "exec"))
    return needed | (deferred - bound)


def solution_only_names(cells: list[dict]) -> set[str]:
    solution, other = set(), set()
    for cell in cells:
        if cell["cell_type"] == "code":
            (solution if student_edition.is_solution(cell) else other).update(bound_names(python(cell)))
    return solution - other


@pytest.fixture(scope="module")
def editions():
    return {path: (json.loads(path.read_text()),
                   student_edition.student_notebook(json.loads(path.read_text()), rel(path)))
            for path in CHAPTERS}


def test_there_are_chapters():
    assert CHAPTERS


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.name)
def test_no_solution_code_remains(path, editions):
    full, student = editions[path]
    solutions = [c for c in full["cells"] if student_edition.is_solution(c)]
    assert len(solutions) >= 3, f"{path.name}: expected its exercises' solution cells"
    kept = {source(c) for c in full["cells"] if not student_edition.is_solution(c)}
    answers = [c for c in student["cells"] if source(c) == student_edition.ANSWER]
    assert len(answers) == len(solutions), f"{path.name}: one answer cell per solution"
    assert len(student["cells"]) == len(full["cells"])
    for cell in student["cells"][1:]:
        assert source(cell) in kept or source(cell) == student_edition.ANSWER, (
            f"{path.name}: a cell of the student edition is not in the full edition: "
            f"{source(cell)[:80]!r}")
        assert not student_edition.is_solution(cell)
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, (
                f"{path.name}: the student edition keeps an output")
    # Line by line: no line that only a solution holds is left anywhere.
    other_lines = {line.strip() for text in kept for line in text.splitlines()}
    student_lines = {line.strip() for c in student["cells"] for line in source(c).splitlines()}
    for cell in solutions:
        for line in source(cell).splitlines():
            line = line.strip()
            if len(line) >= 12 and line not in other_lines:
                assert line not in student_lines, f"{path.name}: solution code remains: {line!r}"


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.name)
def test_runs_with_blank_answers(path, editions):
    """No cell after a solution needs a name that only solution cells bind."""
    full, _ = editions[path]
    only = solution_only_names(full["cells"])
    seen_solution = False
    for k, cell in enumerate(full["cells"]):
        if cell["cell_type"] != "code":
            continue
        if student_edition.is_solution(cell):
            seen_solution = True
            continue
        if seen_solution:
            missing = needed_names(python(cell)) & only
            assert not missing, (f"{path.name} cell {k} uses {sorted(missing)}, which only "
                                 "solution cells define: the student edition would fail there")


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.name)
def test_badges_point_at_each_edition(path, editions):
    full, student = editions[path]
    name = rel(path)
    main_url = student_edition.colab_url(name, student_edition.FULL_BRANCH)
    student_url = student_edition.colab_url(name, student_edition.STUDENT_BRANCH)
    first = source(student["cells"][0])
    assert f"({student_url})" in first and "Student edition" in first
    assert f"]({main_url})" in first  # the link back to the full edition
    assert main_url in source(full["cells"][0])


def test_the_course_guide_links_both_editions():
    guide = (ROOT / "book" / "course_guide.md").read_text()
    missing = [rel(path) for path in CHAPTERS
               for branch in (student_edition.FULL_BRANCH, student_edition.STUDENT_BRANCH)
               if student_edition.colab_url(rel(path), branch) not in guide]
    assert not missing, f"book/course_guide.md does not link these editions: {missing}"


def test_analysis_sees_what_a_solution_alone_defines():
    cells = [{"cell_type": "code", "metadata": {}, "source": [s]} for s in (
        "import numpy as np\nx = 1", "y = x + 1\ndef helper(a):\n    return a + z")]
    cells.append({"cell_type": "code", "metadata": {"tags": ["hide-cell"]},
                  "source": ["z = 2\nanswer = helper(3)\nfor row in range(3):\n    pass"]})
    assert solution_only_names(cells) == {"z", "answer", "row"}
    assert needed_names("print(answer, y)\nx = 3") == {"print", "answer", "y"}
    assert needed_names("def f(a):\n    b = a\n    return b + answer") == {"answer"}
    assert needed_names("total += 1") == {"total"}
    assert needed_names("x = x + 1") == {"x"}
    assert needed_names("for i in range(3):\n    print(i)") == {"range", "print"}
    assert "answer" in needed_names("[v + answer for v in range(3)]")
    assert needed_names(TO_PYTHON.transform_cell("%timeit answer\n")) >= {"get_ipython"}


def test_make_student_writes_every_chapter(tmp_path):
    written = student_edition.write(CHAPTERS[:1], tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in written] == [rel(CHAPTERS[0])]
    nb = json.loads(written[0].read_text())
    assert any(source(c) == student_edition.ANSWER for c in nb["cells"])
    assert re.search(r"^student:", (ROOT / "Makefile").read_text(), re.M), "make student"
