"""Check the Colab path as Colab runs it: the setup cell, then the first cells of two chapters.

1. A fresh virtual environment holding what Colab preinstalls: torch 2.13.0 (installed first,
   the CPU wheel on this machine's disk), torchvision, numpy, pandas, matplotlib, seaborn, tqdm
   and Jupyter (ipykernel, nbclient, nbformat), at the versions of requirements.lock.
2. A local "remote": a clone of this checkout, tagged ``v<fishr_lite version>`` at HEAD unless
   the tag exists, so that the setup cell's pinned ref resolves offline.
3. Per chapter, an empty working directory (Colab's /content) and a kernel of the fresh
   environment with a stand-in ``google.colab`` imported and ``FISHR_REPO`` pointing at the
   remote. The chapter's setup cell and first code cells run there, then a probe cell.
4. Checks: no error; the clone exists at the pinned ref; fishr_lite (in the kernel and in a
   subprocess) comes from the clone, not from this checkout, and finds data/ there; the setup
   cell printed the no-GPU hint and ``profile: quick, device: cpu``; the other cells printed
   what the chapter stores. Then the setup cell runs again in a new kernel in the first
   directory (a restarted runtime: the clone is reused).

Usage: ``python tests/check_colab_path.py [--keep]`` from the repository root (``--keep`` leaves
the temporary directory in place). Needs git and PyPI. Exits 1 with a message on failure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TORCHVISION = "torchvision==0.28.0"  # the release built for torch 2.13.0, as on Colab
COLAB_PREINSTALLED = [TORCHVISION, "numpy", "pandas", "matplotlib", "seaborn", "tqdm",
                      "ipykernel", "nbclient", "nbformat"]
# chapter -> how many of its code cells to run (the setup cell is the first)
CHAPTERS = {"book/06_colored_mnist_data.ipynb": 2, "book/05_fishr.ipynb": 3}
GPU_HINT = "Runtime > Change runtime type > GPU"
KERNEL = "fishr-colab-check"
PROBE = """\
import json, os, subprocess, sys
import fishr_lite
from fishr_lite import data, results
from fishr_lite.experiments import reporting
child = subprocess.run([sys.executable, "-c", "import fishr_lite; print(fishr_lite.__file__)"],
                       cwd="/", capture_output=True, text=True, check=True).stdout.strip()
print("PROBE", json.dumps({
    "prefix": sys.prefix, "cwd": os.getcwd(), "fishr_lite": fishr_lite.__file__,
    "fishr_lite_in_subprocess": child, "mnist": str(data.default_mnist_root()),
    "results": str(results.default_root()), "published": str(reporting.PUBLISHED_TABLE2)}))
"""


class CheckFailed(Exception):
    """A check of the Colab path failed; the message says which."""


def sh(cmd: list[str], **kwargs) -> str:
    """Run a command; on failure raise CheckFailed with its output."""
    done = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if done.returncode != 0:
        raise CheckFailed(f"command failed ({done.returncode}): {' '.join(cmd)}\n"
                          f"{done.stdout[-3000:]}{done.stderr[-3000:]}")
    return done.stdout.strip()


def release_tag() -> str:
    version = re.search(r'^__version__ = "([^"]+)"',
                        (ROOT / "fishr_lite" / "__init__.py").read_text(), re.M)
    if not version:
        raise CheckFailed("fishr_lite/__init__.py has no __version__ line")
    return "v" + version.group(1)


def constraints(tmp: Path) -> Path:
    """requirements.lock plus torchvision: what pip may install, in the venv and in the kernel."""
    lock = (ROOT / "requirements.lock").read_text()
    path = tmp / "constraints.txt"
    extra = "" if re.search(r"^torchvision==", lock, re.M) else TORCHVISION + "\n"
    path.write_text(lock + "\n" + extra)
    return path


def fresh_venv(tmp: Path, pip_env: dict[str, str]) -> Path:
    """A new venv with Colab's preinstalled packages and a stand-in google.colab; its python."""
    venv = tmp / "venv"
    sh([sys.executable, "-m", "venv", str(venv)])
    python = venv / "bin" / "python"
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
           "--no-compile"]  # no .pyc for torch's thousands of modules: saves half a minute
    sh(pip + ["torch==2.13.0"], env=pip_env)  # first, as Colab ships it
    sh(pip + COLAB_PREINSTALLED, env=pip_env)
    purelib = Path(sh([str(python), "-c",
                       "import sysconfig; print(sysconfig.get_paths()['purelib'])"]))
    colab = purelib / "google" / "colab"  # no google/__init__.py: "google" stays a namespace
    colab.mkdir(parents=True)
    (colab / "__init__.py").write_text('"""Stand-in for Colab\'s google.colab."""\n')
    kernel = tmp / "jupyter" / "kernels" / KERNEL
    kernel.mkdir(parents=True)
    (kernel / "kernel.json").write_text(json.dumps({
        "argv": [str(python), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Colab check", "language": "python"}))
    return python


def local_remote(tmp: Path, tag: str) -> tuple[Path, str]:
    """Clone this checkout and tag its HEAD as the release unless the tag exists."""
    remote = tmp / "remote"
    sh(["git", "clone", "--quiet", str(ROOT), str(remote)])
    if subprocess.run(["git", "-C", str(remote), "rev-parse", "-q", "--verify", f"refs/tags/{tag}"],
                      capture_output=True).returncode != 0:
        sh(["git", "-C", str(remote), "tag", tag, "HEAD"])
    return remote, sh(["git", "-C", str(remote), "rev-parse", f"{tag}^{{commit}}"])


def execute(python: Path, cells: list[str], workdir: Path, env: dict[str, str], out: Path) -> None:
    """Run ``cells`` in a kernel of the fresh venv (nbclient from that venv too), cwd ``workdir``;
    the executed notebook is written to ``out`` even when a cell fails."""
    spec = {"cells": cells, "workdir": str(workdir), "out": str(out)}
    try:
        done = subprocess.run([str(python), __file__, "--execute", json.dumps(spec)], env=env,
                              capture_output=True, text=True, timeout=1200)
    except subprocess.TimeoutExpired:
        raise CheckFailed(f"executing cells in {workdir} took more than 20 minutes") from None
    if done.returncode != 0:
        raise CheckFailed(f"executing cells in {workdir} failed:\n{done.stdout[-4000:]}"
                          f"{done.stderr[-4000:]}")


def execute_in_this_process(spec: dict) -> int:
    """The part that runs under the fresh venv's python (``--execute``)."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(source) for source in spec["cells"]]
    client = NotebookClient(nb, kernel_name=KERNEL, timeout=900,
                            resources={"metadata": {"path": spec["workdir"]}})
    try:
        client.execute()
    except CellExecutionError as error:
        print(error)
        return 1
    finally:
        nbformat.write(nb, spec["out"])
    return 0


def text_outputs(cell: dict) -> str:
    """What a cell printed or returned as text (stream and text/plain), stderr left out."""
    parts = []
    for output in cell.get("outputs", []):
        if output["output_type"] == "stream" and output["name"] == "stdout":
            parts.append("".join(output["text"]))
        elif output["output_type"] in ("execute_result", "display_data"):
            if "text/html" not in output["data"] and "image/png" not in output["data"]:
                parts.append("".join(output["data"].get("text/plain", "")))
    return "".join(parts)


def inside(path: str, folder: Path) -> bool:
    return Path(path).resolve().is_relative_to(folder.resolve())


def check_chapter(chapter: str, n_code: int, python: Path, tmp: Path, env: dict[str, str],
                  commit: str) -> Path:
    """Run the chapter's first ``n_code`` code cells in a fresh /content; return that folder."""
    stored = [c for c in json.loads((ROOT / chapter).read_text())["cells"]
              if c["cell_type"] == "code"][:n_code]
    content = tmp / f"content-{Path(chapter).stem}"
    content.mkdir()
    out = tmp / f"{Path(chapter).stem}.executed.ipynb"
    sources = ["import google.colab  # Colab's kernel has it imported"]
    sources += ["".join(c["source"]) for c in stored] + [PROBE]
    execute(python, sources, content, env, out)
    ran = json.loads(out.read_text())["cells"]
    clone = content / "fishr-book"
    if not (clone / ".git").is_dir():
        raise CheckFailed(f"{chapter}: the setup cell left no clone at {clone}")
    head = sh(["git", "-C", str(clone), "rev-parse", "HEAD"])
    if head != commit:
        raise CheckFailed(f"{chapter}: the clone is at {head}, not at the pinned ref ({commit})")
    setup = text_outputs(ran[1])
    print(f"    setup cell printed: {setup.strip()!r}")
    if GPU_HINT not in setup:
        raise CheckFailed(f"{chapter}: the setup cell did not print the GPU hint ({GPU_HINT!r})")
    if "profile: quick, device: cpu" not in setup:
        raise CheckFailed(f"{chapter}: expected 'profile: quick, device: cpu', got {setup!r}")
    for index, (mine, theirs) in enumerate(zip(ran[2:-1], stored[1:]), start=2):
        if text_outputs(mine) != text_outputs(theirs):
            raise CheckFailed(f"{chapter}: code cell {index} printed\n{text_outputs(mine)}\n"
                              f"but the chapter stores\n{text_outputs(theirs)}")
    probe = json.loads(text_outputs(ran[-1]).split("PROBE", 1)[1])
    print(f"    fishr_lite from {probe['fishr_lite']}")
    expected = {"prefix": tmp / "venv", "cwd": content, "fishr_lite": clone,
                "fishr_lite_in_subprocess": clone, "mnist": clone / "data" / "MNIST",
                "results": clone / "data" / "results", "published": clone / "data" / "published"}
    for key, folder in expected.items():
        if not inside(probe[key], folder):
            raise CheckFailed(f"{chapter}: {key} is {probe[key]}, expected inside {folder}")
    if inside(probe["fishr_lite"], ROOT):
        raise CheckFailed(f"{chapter}: fishr_lite was imported from the checkout {ROOT}")
    for key in ("mnist", "published"):
        if not Path(probe[key]).exists():
            raise CheckFailed(f"{chapter}: {probe[key]} does not exist in the clone")
    return content


def check_chapter_rerun(chapter: str, python: Path, tmp: Path, env: dict[str, str],
                        content: Path) -> None:
    """A new kernel in a /content that holds the clone: no new clone, the same imports."""
    setup = "".join(json.loads((ROOT / chapter).read_text())["cells"][1]["source"])
    marker = content / "fishr-book" / ".git" / "colab-check-marker"
    marker.write_text("the clone must be reused, not replaced\n")
    out = tmp / "rerun.executed.ipynb"
    execute(python, ["import google.colab", setup, PROBE], content, env, out)
    ran = json.loads(out.read_text())["cells"]
    if not marker.exists():
        raise CheckFailed(f"{chapter}: rerunning the setup cell replaced the clone")
    probe = json.loads(text_outputs(ran[-1]).split("PROBE", 1)[1])
    for key in ("fishr_lite", "fishr_lite_in_subprocess"):
        if not inside(probe[key], content / "fishr-book"):
            raise CheckFailed(f"{chapter}: after a restart {key} is {probe[key]}")
    printed = text_outputs(ran[1])
    if "profile: quick, device: cpu" not in printed:
        raise CheckFailed(f"{chapter}: after a restart the setup cell printed {printed!r}")


def main(argv: list[str]) -> int:
    if argv and argv[0] == "--execute":
        return execute_in_this_process(json.loads(argv[1]))
    keep = "--keep" in argv
    tmp = Path(tempfile.mkdtemp(prefix="fishr-colab-"))
    timings: list[tuple[str, float]] = []

    def timed(label: str, step, *args):
        start = time.perf_counter()
        print(f"-- {label}", flush=True)
        value = step(*args)
        timings.append((label, time.perf_counter() - start))
        print(f"   done in {timings[-1][1]:.1f} s", flush=True)
        return value

    pip_env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    pip_env["PIP_CONSTRAINT"] = str(constraints(tmp))  # never another torch, locked versions
    failure = None
    try:
        tag = release_tag()
        python = timed("fresh venv with Colab's preinstalled packages", fresh_venv, tmp, pip_env)
        remote, commit = timed(f"local remote tagged {tag}", local_remote, tmp, tag)
        kernel_env = {k: v for k, v in pip_env.items() if not k.startswith("FISHR_")}
        kernel_env.update(FISHR_REPO=remote.as_uri(), JUPYTER_PATH=str(tmp / "jupyter"),
                          CUDA_VISIBLE_DEVICES="", PATH=f"{python.parent}:{os.environ['PATH']}")
        for number, (chapter, n_code) in enumerate(CHAPTERS.items()):
            content = timed(f"{chapter}: setup cell and {n_code - 1} more code cells",
                            check_chapter, chapter, n_code, python, tmp, kernel_env, commit)
            if number == 0:  # before the next chapter's editable install replaces this one
                timed(f"{chapter}: setup cell again after a runtime restart",
                      check_chapter_rerun, chapter, python, tmp, kernel_env, content)
    except (CheckFailed, OSError) as error:
        failure = error
    finally:
        if keep:
            print(f"files kept in {tmp}")
        else:
            timed("clean up", shutil.rmtree, tmp, True)
    print("\nstep                                                              time")
    for label, seconds in timings:
        print(f"{label:<64}{seconds:6.1f} s")
    print(f"{'total':<64}{sum(s for _, s in timings):6.1f} s")
    if failure is not None:
        print(f"\nColab path check FAILED: {failure}", file=sys.stderr)
        return 1
    print("Colab path check passed")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
