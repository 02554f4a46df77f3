"""The README's "Architecture" section names every module of the package, and only those.

The section holds a tree of ``iunet_nb/`` in a fenced block; this test rebuilds the
paths from the tree's indentation, imports each module named there and checks that
no module of the package is missing from the tree.
"""

from __future__ import annotations

import importlib
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TREE_CHARS = "│├└─ \u00a0"


def architecture_tree(readme: str) -> list[str]:
    """The lines of the first fenced block after the ``## Architecture`` heading."""
    section = readme.split("\n## Architecture", 1)
    assert len(section) == 2, "README.md has no '## Architecture' section"
    block = re.search(r"```[a-z]*\n(.*?)```", section[1], re.S)
    assert block, "the Architecture section has no fenced block with the package tree"
    return [line for line in block.group(1).splitlines() if line.strip()]


def paths_in_tree(lines: list[str]) -> list[str]:
    """``['iunet_nb/', 'iunet_nb/nn/', 'iunet_nb/nn/coupling.py', ...]`` from tree lines (4 columns a level)."""
    stack: list[str] = []
    paths = []
    for line in lines:
        start = len(line) - len(line.lstrip(TREE_CHARS))
        name = line[start:].split()[0]
        depth = start // 4
        stack[depth:] = [name]
        paths.append("".join(stack))
    return paths


def modules_named() -> list[str]:
    paths = paths_in_tree(architecture_tree((ROOT / "README.md").read_text()))
    assert paths and paths[0] == "iunet_nb/", f"the tree must start at iunet_nb/, got {paths[:1]}"
    return [p for p in paths if p.endswith(".py")]


def test_tree_parser_reads_nesting() -> None:
    lines = ["iunet_nb/", "├── a.py   text", "├── nn/    text", "│   └── b.py", "└── c.py"]
    assert paths_in_tree(lines) == ["iunet_nb/", "iunet_nb/a.py", "iunet_nb/nn/", "iunet_nb/nn/b.py", "iunet_nb/c.py"]


@pytest.mark.parametrize("path", modules_named())
def test_every_module_named_imports(path: str) -> None:
    assert (ROOT / path).is_file(), f"README names {path}, which does not exist"
    name = path[:-3].replace("/", ".").removesuffix(".__init__")
    importlib.import_module(name)


def test_every_module_is_named() -> None:
    named = set(modules_named())
    present = {str(p.relative_to(ROOT)) for p in (ROOT / "iunet_nb").rglob("*.py")}
    missing = sorted(present - named)
    assert not missing, f"modules missing from README's Architecture tree: {missing}"
