"""pyproject.toml (ranges), requirements.lock (exact versions) and environment.yml name one set."""

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pyproject_requirements() -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = project["dependencies"] + project["optional-dependencies"]["book"]
    return {_canonical(Requirement(r).name): Requirement(r) for r in reqs}


def lock_versions() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[_canonical(name)] = version
    return pins


def environment_versions() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "environment.yml").read_text().splitlines():
        match = re.match(r"\s*-\s*([A-Za-z0-9_.\-]+)==(\S+)\s*$", line)
        if match:
            pins[_canonical(match.group(1))] = match.group(2)
    return pins


def test_lock_pins_every_declared_dependency_within_its_range():
    locked = lock_versions()
    for name, req in pyproject_requirements().items():
        assert name in locked, f"{name} is in pyproject.toml but not pinned in requirements.lock"
        assert req.specifier.contains(Version(locked[name]), prereleases=True), (
            f"requirements.lock pins {name}=={locked[name]}, outside pyproject's {req.specifier}")


def test_lock_pins_torch_2_13():
    assert lock_versions()["torch"] == "2.13.0"


def test_environment_yml_names_the_same_set_at_the_locked_versions():
    env, locked = environment_versions(), lock_versions()
    assert set(env) == set(pyproject_requirements()), "environment.yml and pyproject.toml differ"
    for name, version in env.items():
        assert locked[name] == version, f"environment.yml pins {name}=={version}, lock has {locked[name]}"


def test_lock_has_no_torchvision():
    # PyPI's torchvision does not import beside the CPU torch 2.13.0 build; it stays optional.
    assert "torchvision" not in lock_versions()
