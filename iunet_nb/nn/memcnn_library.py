"""Importing the reference library ``memcnn`` without its side effects.

A plain ``import memcnn`` runs ``warnings.filterwarnings('ignore', category=UserWarning)``,
which silences every ``UserWarning`` of the whole process, and its use of the deprecated
``torch.cuda.amp.custom_fwd/custom_bwd`` raises FutureWarnings.  :func:`import_memcnn`
imports it with both kept out.  It lives with the layers (which build memcnn's
couplings, :func:`iunet_nb.nn.coupling.create_memcnn_module`); the memcnn engine
(:mod:`iunet_nb.engine.memcnn`) imports it from here.
"""
from __future__ import annotations

import functools
import importlib
import sys
import threading
import warnings
from types import ModuleType

__all__ = ["import_memcnn"]

_lock = threading.Lock()
_memcnn: ModuleType | None = None


def _import_with_modern_amp_decorators() -> ModuleType:
    """Import ``memcnn`` with ``torch.cuda.amp.custom_fwd/bwd`` swapped out."""
    import torch.amp
    import torch.cuda.amp as cuda_amp

    replacements = {}
    if hasattr(torch.amp, "custom_fwd") and hasattr(torch.amp, "custom_bwd"):
        replacements = {
            "custom_fwd": functools.partial(torch.amp.custom_fwd, device_type="cuda"),
            "custom_bwd": functools.partial(torch.amp.custom_bwd, device_type="cuda"),
        }
    originals = {name: getattr(cuda_amp, name) for name in replacements}
    try:
        for name, replacement in replacements.items():
            setattr(cuda_amp, name, replacement)
        return importlib.import_module("memcnn")
    finally:
        for name, original in originals.items():
            setattr(cuda_amp, name, original)


def import_memcnn() -> ModuleType:
    """Return the ``memcnn`` module, imported without side effects.

    After the call ``warnings.filters`` is exactly what it was before, and the
    import raises no FutureWarning/DeprecationWarning (even with
    ``-W error::FutureWarning -W error::DeprecationWarning``).  Repeated calls
    return the cached module.  If ``memcnn`` was already imported by someone
    else, that module is returned as is (its import side effects, if any,
    have then already happened outside our control).

    Raises :class:`ImportError` with an install hint when memcnn is missing.
    """
    global _memcnn
    if _memcnn is not None:
        return _memcnn
    with _lock:
        if _memcnn is not None:
            return _memcnn
        already = sys.modules.get("memcnn")
        if already is not None:
            _memcnn = already
            return already
        try:
            # catch_warnings hands the import a copy of the filter list and
            # puts the original list object back on exit, undoing memcnn's
            # filterwarnings('ignore', category=UserWarning).
            with warnings.catch_warnings():
                module = _import_with_modern_amp_decorators()
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ImportError(
                "memcnn is not installed. Install it without its dependencies "
                "(they would pull torchvision and a CUDA build of torch): "
                "pip install --no-deps memcnn==1.5.2"
            ) from exc
        _memcnn = module
        return module
