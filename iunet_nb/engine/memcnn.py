"""Import the reference library ``memcnn`` (1.5.2) without its side effects.

``memcnn`` is only used as the *reference* implementation that the notebooks
compare against; nothing in :mod:`iunet_nb` needs it to work.  Importing it
plainly has two side effects that this module routes around:

1. ``memcnn/models/affine.py`` runs ``warnings.filterwarnings('ignore',
   category=UserWarning)`` at import time, which silences *every* UserWarning
   of the whole process from then on.  :func:`import_memcnn` imports inside
   :class:`warnings.catch_warnings`, so ``warnings.filters`` afterwards is the
   very list it was before (same object, same entries).

2. ``memcnn/models/revop.py`` decorates its autograd function with
   ``torch.cuda.amp.custom_fwd`` / ``custom_bwd``, which torch >= 2.4 marks as
   deprecated (a ``FutureWarning`` at decoration time, i.e. at import; an
   error under ``python -W error::FutureWarning``).  During the import we
   temporarily replace these two names by
   ``functools.partial(torch.amp.custom_fwd/custom_bwd, device_type='cuda')``
   -- exactly what the deprecated wrappers call themselves, so behaviour is
   unchanged -- and put the originals back afterwards.  No warning is
   silenced: the warnings are never emitted.

Runtime: ``InvertibleModuleWrapper(..., keep_input=False)`` frees its input
with ``tensor.storage().resize_(0)``.  Under torch 2.13 ``Tensor.storage()``
emits no FutureWarning or DeprecationWarning; it emits torch's "TypedStorage
is deprecated" warning, which is a plain *UserWarning*, and only once per
process (torch remembers it has warned).  memcnn's global UserWarning filter
used to hide it; since we no longer install that filter, a user of memcnn's
wrapper sees it once.  We leave it visible on purpose -- it is torch telling
the truth about memcnn's code, and silencing it would mean touching the
process-wide filters this module promises to leave alone.  (The forward also
frees the *caller's* tensor -- see notes on memcnn issues #38/#39/#70 -- so
pass it ``x * 1`` or ``x.clone()``, never a tensor you still need.)
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
    import torch
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
