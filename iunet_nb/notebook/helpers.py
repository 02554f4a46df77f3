"""Small utilities every notebook uses: seeding, device choice, timing, JSON results.

Nothing here builds a model; it only keeps the notebooks short and their
results machine-readable (the notebook tests read the JSON that
:func:`save_results` writes).
"""
from __future__ import annotations

import json
import math
import random
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from iunet_nb.measure.bench import step_times

__all__ = ["seed_everything", "resolve_device", "to_jsonable", "save_results", "load_results",
           "median_seconds"]


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python's, NumPy's and torch's global generators with ``seed``.

    Returns a fresh CPU :class:`torch.Generator` seeded with ``seed`` as well,
    for code that prefers an explicit generator.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``'auto'`` -> ``cuda`` if available, else ``cpu``; anything else is passed to ``torch.device``."""
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {str(dev)!r} requested but CUDA is not available; use DEVICE='auto'")
    return dev


def to_jsonable(obj: Any) -> Any:
    """Convert ``obj`` into plain JSON types.

    Tensors and NumPy arrays become (nested) lists, scalars become Python
    numbers, tuples become lists, dict keys become strings, and non-finite
    floats become ``None`` (strict JSON has no NaN or infinity).
    """
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return to_jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (Path, torch.device, torch.dtype)):
        return str(obj)
    raise TypeError(f"cannot convert {type(obj).__name__} to JSON")


def save_results(path: str | Path | None, results: dict) -> Path | None:
    """Write ``results`` as JSON to ``path`` (parents created); do nothing if ``path`` is None.

    Returns the path written, or None.
    """
    if path is None:
        return None
    if not isinstance(results, dict):
        raise TypeError(f"results must be a dict, got {type(results).__name__}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(to_jsonable(results), indent=2, sort_keys=True, allow_nan=False)
    path.write_text(text + "\n")
    return path


def load_results(path: str | Path) -> dict:
    """Read a JSON file written by :func:`save_results`."""
    return json.loads(Path(path).read_text())


def median_seconds(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time in seconds of ``fn()`` over ``repeats`` calls after ``warmup`` calls.

    CUDA work is synchronised around each call so the time covers the kernels.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class quiet_native_stderr:
    """Context manager that silences output written *by native code* to file descriptor 2.

    torch's profiler (used by :func:`iunet_nb.measure.meter.measure_step` on CPU)
    prints ``profiler_start`` / ``profiler_stop`` trace lines from C++ straight
    to fd 2, which Jupyter shows as red stderr output in every measuring cell.
    Python-level warnings and exceptions are unaffected inside a Jupyter kernel
    (they go through ``sys.stderr``, which is not fd 2 there).
    """

    def __enter__(self) -> "quiet_native_stderr":
        import os
        import sys

        try:
            sys.stderr.flush()
        except Exception:  # pragma: no cover - exotic stderr objects
            pass
        self._saved = os.dup(2)
        self._null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(self._null, 2)
        return self

    def __exit__(self, *exc: Any) -> None:
        import os

        os.dup2(self._saved, 2)
        os.close(self._saved)
        os.close(self._null)


__all__.append("quiet_native_stderr")


class _DisplayLine:
    """A file-like object for tqdm that shows its latest line in one updatable Jupyter display.

    tqdm writes ``'\\r' + line`` on every refresh.  Instead of a widget (whose
    saved ``text/plain`` copy stays at "0%" in a notebook executed by papermill,
    because no browser ever renders it), the line goes into an IPython display
    with a ``display_id``; nbclient applies ``update_display_data`` messages to
    the saved output, so the executed notebook keeps the *final* state.
    """

    def __init__(self) -> None:
        from IPython.display import display

        self._handle = display({"text/plain": ""}, raw=True, display_id=True)

    def write(self, text: str) -> None:
        line = text.replace("\n", "\r").split("\r")
        line = [part for part in line if part.strip()]
        if line:
            self._handle.update({"text/plain": line[-1].rstrip()}, raw=True)

    def flush(self) -> None:
        pass


def in_jupyter_kernel() -> bool:
    """True inside an IPython kernel (Jupyter, papermill), False in a script or a plain terminal."""
    try:
        from IPython import get_ipython
    except ImportError:  # IPython comes with the optional notebook dependencies
        return False
    shell = get_ipython()
    return shell is not None and shell.__class__.__name__ == "ZMQInteractiveShell"


def progress(iterable: Any = None, desc: str = "", total: int | None = None, enable: bool = True,
             **kwargs: Any):
    """A tqdm progress bar that also leaves a correct final state in executed notebooks.

    In a Jupyter kernel the bar is a single text line updated in place through a
    display handle (see :class:`_DisplayLine`), so a notebook executed with
    papermill saves "100%| 150/150 ..." instead of a widget stuck at "0%";
    elsewhere it is an ordinary ``tqdm`` bar on stderr.  ``enable=False``
    returns a disabled bar (iteration only).  Extra keyword arguments go to
    ``tqdm`` (``unit``, ``postfix``, ...).
    """
    from tqdm import tqdm

    if not enable:
        return tqdm(iterable, desc=desc, total=total, disable=True, **kwargs)
    if in_jupyter_kernel():
        kwargs.setdefault("mininterval", 0.5)
        return tqdm(iterable, desc=desc, total=total, file=_DisplayLine(), ncols=100, ascii=False, **kwargs)
    return tqdm(iterable, desc=desc, total=total, **kwargs)


__all__ += ["progress", "in_jupyter_kernel"]


#: The one definition of "training memory" used by every notebook, the benchmark and the README.
MEMORY_DEFINITION = (
    "training memory = parameters + input + the peak rise of allocated memory during one training step "
    "(forward, loss, backward); the peak contains the new parameter gradients, the activations that are "
    "stored (conventional) or rebuilt (memory-efficient), and temporaries. The optimiser's state is not counted."
)


def memory_parts(measurement: Any) -> dict[str, int]:
    """Split a :class:`iunet_nb.measure.meter.StepMeasurement` into the four parts of :data:`MEMORY_DEFINITION`.

    Returns bytes for ``parameters``, ``input``, ``gradients`` and ``activations``
    (activations and temporaries = step peak - gradients); they add up to
    ``measurement.total_bytes``.
    """
    return {"parameters": int(measurement.param_bytes), "input": int(measurement.input_bytes),
            "gradients": int(measurement.grad_bytes), "activations": int(measurement.activation_bytes)}


__all__ += ["MEMORY_DEFINITION", "memory_parts"]


def measurement_cells(*row_lists: Any) -> dict[tuple[str, int, int], dict]:
    """Merge rows of table1 CSVs (:func:`iunet_nb.measure.bench.read_results`) into one cell per configuration.

    Returns ``{(mode, size, delta): row}`` over the rows with ``status == 'ok'`` and without an
    optimizer step; a row in a later list replaces one of an earlier list (pass the files in
    the order they were measured, so the newest measurement wins).  ``row['times']`` is the
    list of all timed steps in seconds (from ``seconds_all``), for showing their spread.
    """
    cells: dict[tuple[str, int, int], dict] = {}
    for rows in row_lists:
        for r in rows:
            if r.get("status") != "ok" or (r.get("optimizer") or "none") != "none":
                continue
            c = dict(r)
            c["times"] = step_times(r)
            cells[(str(r["mode"]), int(r["size"]), int(r["delta"]))] = c
    return cells


__all__ += ["measurement_cells"]
