"""pyproject.toml, environment.yml and the Makefile pin the same things."""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PIN = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([A-Za-z0-9.+!_-]+)\s*$")


def normalise(name: str) -> str:
    """PEP 503 name normalisation: case and runs of -_. do not matter."""
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_pin(spec: str) -> tuple[str, str]:
    m = PIN.match(spec)
    assert m, f"not an exact '==' pin: {spec!r}"
    return normalise(m.group(1)), m.group(2)


def pins(specs) -> dict[str, str]:
    out: dict[str, str] = {}
    for spec in specs:
        name, version = parse_pin(spec)
        assert name not in out, f"{name} pinned twice"
        out[name] = version
    return out


def load_pyproject() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as fh:
        return tomllib.load(fh)


def pyproject_pins() -> dict[str, str]:
    project = load_pyproject()["project"]
    specs = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        specs.extend(extra)
    return pins(specs)


def no_deps_pins() -> dict[str, str]:
    return pins(load_pyproject()["tool"]["iunet_nb"]["no_deps"])


def environment_yml() -> tuple[list[str], list[str]]:
    """Return (conda dependencies, pip-section entries) of environment.yml.

    A deliberately small parser for the one shape this file has: a top-level
    ``dependencies:`` list whose ``- pip:`` item holds a nested list.
    """
    conda, pip = [], []
    section = None
    pip_indent = None
    for raw in (ROOT / "environment.yml").read_text().splitlines():
        line = raw.split("#", 1)[0].rstrip()
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        if indent == 0:
            section = line.rstrip(":").strip() if line.endswith(":") else None
            pip_indent = None
            continue
        if section != "dependencies":
            continue
        item = line.strip()
        assert item.startswith("- "), f"unexpected line in dependencies: {raw!r}"
        item = item[2:].strip()
        if pip_indent is not None and indent > pip_indent:
            pip.append(item)
        elif item == "pip:":
            pip_indent = indent
        else:
            pip_indent = None
            conda.append(item)
    return conda, pip


def test_every_dependency_is_pinned_exactly():
    project = load_pyproject()["project"]
    for spec in project["dependencies"]:
        parse_pin(spec)
    for extra, specs in project["optional-dependencies"].items():
        for spec in specs:
            parse_pin(spec)
    assert no_deps_pins()["memcnn"] == "1.5.2"
    assert pyproject_pins()["torch"] == "2.13.0"


def test_reference_libraries_are_not_pip_dependencies():
    # memcnn / iunets would pull torchvision and a CUDA torch through pip.
    assert not set(no_deps_pins()) & set(pyproject_pins())


def test_environment_yml_matches_pyproject():
    conda, pip = environment_yml()
    assert "pip" in conda
    assert "python=3.11" in conda
    assert load_pyproject()["project"]["requires-python"] == ">=3.11"

    assert "-e ." in pip
    env = pins(entry for entry in pip if not entry.startswith("-"))
    assert env == pyproject_pins()


def test_environment_yml_tells_how_to_install_the_no_deps_pins():
    text = (ROOT / "environment.yml").read_text()
    lines = [line for line in text.splitlines() if "--no-deps" in line and "pip install" in line]
    assert lines, "environment.yml must say how to install memcnn (pip install --no-deps ...)"
    mentioned = pins(
        word for line in lines for word in line.split() if "==" in word
    )
    assert mentioned == no_deps_pins()


def makefile_install_lines() -> list[str]:
    text = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    return [line.strip() for line in text.splitlines() if re.search(r"\bpip\b.*\binstall\b", line, re.I)
            and not line.lstrip().startswith("#")]


def test_makefile_install_order_and_no_deps():
    lines = makefile_install_lines()
    torch_pin = f"torch=={pyproject_pins()['torch']}"

    def first(predicate, what):
        for index, line in enumerate(lines):
            if predicate(line):
                return index
        raise AssertionError(f"Makefile never {what}")

    torch_at = first(lambda l: torch_pin in l.split(), f"installs {torch_pin}")
    package_at = first(lambda l: re.search(r"install\s+-e\s+['\"]?\.", l), "installs the package (-e .)")
    assert torch_at < package_at, "torch must be installed before the package"

    for name, version in no_deps_pins().items():
        pin = f"{name}=={version}"
        at = first(lambda l, pin=pin: pin in l.split(), f"installs {pin}")
        assert "--no-deps" in lines[at].split(), f"{pin} must be installed with --no-deps"
        assert torch_at < at < package_at, f"{pin}: install after torch, before the package"

    # nowhere is memcnn installed with its dependencies
    for line in lines:
        if "memcnn" in line:
            assert "--no-deps" in line.split(), line


def test_installed_versions_match_pins():
    """The running interpreter has what the pins say (skip packages not installed)."""
    from importlib import metadata

    expected = {**pyproject_pins(), **no_deps_pins()}
    wrong = {}
    for name, version in expected.items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        if installed.split("+", 1)[0] != version:  # 2.13.0+cpu satisfies ==2.13.0
            wrong[name] = (version, installed)
    assert not wrong, f"pinned vs installed: {wrong}"
    assert sys.version_info >= (3, 11)
