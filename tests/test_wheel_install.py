"""`pip install` of the library alone (a wheel, no repository beside it) works as researchers use it.

Builds the wheel, installs it into a fresh folder and runs, from an empty working directory:
every module's import, the README's training-loop example, and the data and results paths
of an installed copy (no shipped data: a clear MNIST error, then MNIST from $FISHR_MNIST_DIR).
"""

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from test_api_page import modules as api_page_modules

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True).returncode != 0,
    reason="pip is not available in this interpreter",
)]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    wheels, target = tmp_path_factory.mktemp("wheels"), tmp_path_factory.mktemp("site")
    source = tmp_path_factory.mktemp("source")  # a clean copy: no stale build/ in the checkout
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "fishr_lite", source / "fishr_lite",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", wheels, source], check=True)
    (wheel,) = wheels.glob("fishr_lite-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", target, wheel], check=True)
    return wheel, target


def run_installed(target: Path, code: str, cwd: Path, **env: str) -> str:
    """Run ``code`` with the installed copy first on the path (torch etc. from this venv)."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("FISHR_")}
    environment.update(PYTHONPATH=str(target), FISHR_PROFILE="quick", **env)
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=environment,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_wheel_holds_every_module_and_nothing_else(installed):
    wheel, _ = installed
    names = zipfile.ZipFile(wheel).namelist()
    sources = {str(p.relative_to(ROOT)) for p in (ROOT / "fishr_lite").rglob("*.py")}
    packaged = {n for n in names if n.endswith(".py")}
    assert packaged == sources
    assert "fishr_lite/py.typed" in names  # PEP 561: type checkers read the hints
    assert not [n for n in names if n.startswith(("data/", "tests/", "book/"))]


def test_every_module_imports_from_the_installed_copy(installed, tmp_path):
    _, target = installed
    modules = api_page_modules()  # every module of fishr_lite, as the API page test lists them
    code = ("import importlib, fishr_lite\n"
            f"assert fishr_lite.__file__.startswith({str(target)!r}), fishr_lite.__file__\n"
            f"for m in {modules!r}:\n    importlib.import_module(m)\nprint('ok')")
    assert run_installed(target, code, tmp_path).strip() == "ok"


def test_readme_example_runs_on_the_installed_copy(installed, tmp_path):
    _, target = installed
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- fishr-example-start -->")[1].split("<!-- fishr-example-end -->")[0]
    code = re.search(r"```python\n(.*?)```", block, re.S).group(1)
    run_installed(target, code + "\nassert torch.isfinite(loss)\n", tmp_path)


def test_installed_copy_finds_data_and_results_outside_the_repository(installed, tmp_path):
    _, target = installed
    code = """
from fishr_lite import data, results
from fishr_lite.data import MNISTFileError
root = data.default_mnist_root()
assert root == __import__("pathlib").Path(r"{cache}") / "fishr_lite" / "MNIST", root
try:
    data.load_mnist()
except MNISTFileError as error:
    message = str(error)
else:
    raise AssertionError("no MNIST should be found")
assert "ships no data" in message and "download=True" in message and "FISHR_MNIST_DIR" in message
assert "git checkout" not in message
assert results.default_root() == __import__("pathlib").Path.cwd() / "data" / "results"
print("ok")
""".format(cache=tmp_path / "cache")
    assert run_installed(target, code, tmp_path, XDG_CACHE_HOME=str(tmp_path / "cache")).strip() == "ok"
    code = "from fishr_lite.data import load_mnist; print(load_mnist()['train_images'].shape)"
    shape = run_installed(target, code, tmp_path, FISHR_MNIST_DIR=str(ROOT / "data" / "MNIST"))
    assert shape.strip() == "(60000, 28, 28)"
