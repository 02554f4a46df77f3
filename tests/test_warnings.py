"""Importing the package (and memcnn through it) leaves the warnings machinery alone.

Every check runs in a fresh interpreter: warnings state and memcnn's import
side effects are process-wide, so they cannot be tested in the pytest process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STRICT = ["-W", "error::FutureWarning", "-W", "error::DeprecationWarning"]


def run_python(code: str, *options: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("PYTHONWARNINGS", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, *options, "-c", textwrap.dedent(code)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )


def check(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"


def test_import_leaves_warnings_filters_unchanged():
    # torch and numpy install a few narrow filters of their own when first
    # imported; they are dependencies' business, so import them beforehand and
    # demand that *our* imports change nothing at all.
    check(run_python(
        """
        import warnings
        import numpy, torch
        before = list(warnings.filters)
        filters_object = warnings.filters

        import iunet_nb
        from iunet_nb.engine.memcnn import import_memcnn
        memcnn = import_memcnn()
        assert import_memcnn() is memcnn, "not cached"
        assert memcnn.__version__ == "1.5.2", memcnn.__version__

        after = list(warnings.filters)
        assert after == before, [f for f in after if f not in before]
        assert warnings.filters is filters_object
        # the deprecated decorators are back in place for everyone else
        import torch.cuda.amp as cuda_amp
        assert not hasattr(cuda_amp.custom_fwd, "func"), cuda_amp.custom_fwd
        assert not hasattr(cuda_amp.custom_bwd, "func"), cuda_amp.custom_bwd
        """
    ))


def test_import_adds_no_blanket_filter():
    # Without pre-importing anything: whatever the imports add may only be
    # narrow filters (a message or module pattern), never a blanket "ignore".
    check(run_python(
        """
        import warnings
        before = list(warnings.filters)
        import iunet_nb
        from iunet_nb.engine.memcnn import import_memcnn
        import_memcnn()
        added = [f for f in warnings.filters if f not in before]
        blanket = [f for f in added if f[0] == "ignore" and f[1] is None and f[3] is None]
        assert not blanket, blanket
        """
    ))


def test_user_warnings_still_shown_after_import():
    result = run_python(
        """
        import warnings
        from iunet_nb.engine.memcnn import import_memcnn
        import_memcnn()
        warnings.warn("still-visible-marker", UserWarning)
        """
    )
    check(result)
    assert "still-visible-marker" in result.stderr


def test_memcnn_import_and_training_step_under_strict_warnings():
    check(run_python(
        """
        import torch
        from torch import nn
        from iunet_nb.engine.memcnn import import_memcnn

        memcnn = import_memcnn()
        torch.manual_seed(0)
        block = memcnn.InvertibleModuleWrapper(
            memcnn.AdditiveCoupling(nn.Conv2d(2, 2, 3, padding=1)), keep_input=False
        )
        x = torch.randn(2, 4, 8, 8, requires_grad=True)
        # memcnn frees its input's storage when keep_input=False: never hand it
        # the caller's own tensor.
        y = block(x * 1)
        y.square().sum().backward()
        assert x.grad is not None and x.grad.shape == x.shape
        assert torch.isfinite(x.grad).all()
        assert all(p.grad is not None for p in block.parameters())
        assert x.shape == (2, 4, 8, 8) and torch.isfinite(x).all()
        """,
        *STRICT,
    ))


SMOKE = ROOT / "tests" / "warnings_smoke.py"


@pytest.mark.skipif(not SMOKE.exists(), reason="tests/warnings_smoke.py not written yet")
def test_warnings_smoke_script():
    env = dict(os.environ)
    env.pop("PYTHONWARNINGS", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, *STRICT, str(SMOKE)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    check(result)
