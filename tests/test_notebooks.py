"""Execute every notebook in ``notebooks/`` (smoke parameters) and check its recorded results.

Each notebook ``notebooks/<stem>.ipynb`` is run with papermill in a fresh
``python3`` kernel (the venv's own ipykernel spec) with
``parameters={'SMOKE': True, 'RESULTS_JSON': <tmp>/<stem>.json}`` and working
directory ``notebooks/``.  The JSON it writes is handed to
``tests/nbchecks/<stem>.py:check(results)``, which asserts on the numbers
(a notebook without such a module fails).
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = REPO / "notebooks"
CHECK_DIR = Path(__file__).resolve().parent / "nbchecks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))


def _load_check(stem: str):
    path = CHECK_DIR / f"{stem}.py"
    if not path.exists():
        pytest.fail(f"notebook {stem}.ipynb has no check module: create tests/nbchecks/{stem}.py "
                    "with check(results) asserting on the JSON results the notebook writes")
    spec = importlib.util.spec_from_file_location(f"nbchecks_{stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, "check", None)):
        pytest.fail(f"tests/nbchecks/{stem}.py defines no check(results) function")
    return module


def test_notebooks_are_found():
    assert NOTEBOOKS, f"no notebooks found in {NOTEBOOK_DIR}"


def test_python3_kernel_is_this_interpreter():
    """papermill's kernel_name='python3' must start this venv's Python, not another one."""
    from jupyter_client.manager import KernelManager

    km = KernelManager(kernel_name="python3")
    cmd = km.format_kernel_cmd()
    assert Path(cmd[0]).resolve() == Path(sys.executable).resolve(), (
        f"kernel 'python3' (spec in {km.kernel_spec.resource_dir}) would run {cmd[0]}, not {sys.executable}"
    )


@pytest.mark.notebooks
@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[nb.stem for nb in NOTEBOOKS])
def test_notebook_runs_and_checks(notebook: Path, tmp_path: Path):
    papermill = pytest.importorskip("papermill")
    check = _load_check(notebook.stem)  # fail early if the check module is missing
    results_path = tmp_path / f"{notebook.stem}.json"
    papermill.execute_notebook(
        str(notebook),
        str(tmp_path / notebook.name),
        parameters={"SMOKE": True, "RESULTS_JSON": str(results_path)},
        kernel_name="python3",
        cwd=str(NOTEBOOK_DIR),
        progress_bar=False,
    )
    assert results_path.exists(), f"{notebook.name} did not write RESULTS_JSON ({results_path})"
    results = json.loads(results_path.read_text())
    check.check(results)
