"""Differentiable parametrisations of special orthogonal matrices.

Every learnable invertible operator in :mod:`iunet_nb` (the orthogonal down- and
upsampling of :mod:`iunet_nb.nn.resampling`, the channel mixing of
:mod:`iunet_nb.nn.mixing`) is built from an unconstrained square matrix ``W`` that is
mapped onto the special orthogonal group SO(n) by :func:`orthogonal_matrix`.

All parametrisations first form the skew-symmetric matrix ``A = W - W^T`` and map
``W = 0`` to the identity, so a zero-initialised parameter leaves a fixed base
matrix unchanged. Gradients are plain torch autograd through ``torch.linalg``
primitives (no hand-written backward passes).

Precision: if ``W`` is float16/bfloat16, or autocast is active, the matrix is
computed in float32 with autocast disabled and a float32 tensor is returned;
orthogonality of a half-precision matrix would be poor (errors ~1e-3) and the
linear algebra kernels are not implemented for half types on every device.
"""

from __future__ import annotations

import torch
from torch import nn
from torch import Tensor

from iunet_nb.common import check_dim
from iunet_nb.nn.interfaces import OrthogonalKernelModule

__all__ = [
    "METHODS",
    "skew_symmetric",
    "orthogonal_matrix",
    "orthogonality_error",
    "reorthogonalize_",
    "check_method",
    "OrthogonalBaseMixin",
]

#: Valid values of the ``method`` argument of :func:`orthogonal_matrix`.
METHODS: tuple[str, ...] = ("exp", "cayley", "householder")

_HALF_DTYPES = (torch.float16, torch.bfloat16)


def check_method(method: str) -> None:
    """Raise ``ValueError`` unless ``method`` is one of :data:`METHODS`."""
    if method not in METHODS:
        raise ValueError(
            f"unknown orthogonal parametrisation method {method!r}; "
            f"valid methods are {', '.join(repr(m) for m in METHODS)}"
        )


def _check_square(W: Tensor) -> None:
    if W.dim() < 2 or W.shape[-1] != W.shape[-2]:
        raise ValueError(
            f"expected a batch of square matrices of shape (..., n, n), got shape {tuple(W.shape)}"
        )


def skew_symmetric(W: Tensor) -> Tensor:
    """Return the skew-symmetric part ``W - W^T`` (not halved).

    Args:
        W: tensor of shape ``(..., n, n)``.

    Returns:
        Tensor of shape ``(..., n, n)`` with ``A^T = -A``.
    """
    _check_square(W)
    return W - W.mT


def _householder(A: Tensor) -> Tensor:
    """Special orthogonal matrix from a product of ``n`` Householder reflections.

    The Householder vectors are the columns of the strictly lower triangle of
    ``A`` in LAPACK form (implicit unit diagonal): ``v_i = e_i + A[i+1:, i]``. Each
    factor is the true reflection ``H_i = I - tau_i v_i v_i^T`` with
    ``tau_i = 2 / ||v_i||^2``. A product of ``n`` reflections has determinant
    ``(-1)^n`` and equals ``-I`` at ``A = 0``, so the product is multiplied by
    ``-1``: ``det(-P) = (-1)^n det(P) = +1`` for every ``n`` and ``A = 0`` maps to
    ``I``. (The last vector is always ``e_n``, a fixed reflection; the resulting
    map still reaches all of SO(n) up to a measure-zero set.)

    Args:
        A: skew-symmetric tensor of shape ``(..., n, n)``.

    Returns:
        Tensor of shape ``(..., n, n)``.
    """
    V = A.tril(-1)
    tau = 2.0 / (1.0 + V.square().sum(dim=-2))  # (..., n)
    return -torch.linalg.householder_product(V, tau)


def orthogonal_matrix(W: Tensor, method: str = "cayley") -> Tensor:
    """Map an unconstrained square matrix to a special orthogonal matrix.

    With ``A = W - W^T``:

    * ``'exp'``: ``Q = expm(A)`` (``torch.linalg.matrix_exp``); surjective onto SO(n).
    * ``'cayley'``: ``Q = (I - A)^{-1} (I + A)`` via ``torch.linalg.solve``
      (``I - A`` is always invertible for skew ``A``); reaches SO(n) except
      matrices with eigenvalue ``-1``.
    * ``'householder'``: ``Q = -H_1 H_2 ... H_n`` with Householder vectors from the
      strictly lower triangle of ``A`` (see :func:`_householder`).

    All three give ``Q = I`` at ``W = 0`` and ``det Q = +1``.

    Args:
        W: tensor of shape ``(..., n, n)``.
        method: one of :data:`METHODS`.

    Returns:
        Tensor of shape ``(..., n, n)``, dtype of ``W`` unless ``W`` is
        float16/bfloat16 or autocast is active, in which case float32 (float64
        inputs stay float64).

    Raises:
        ValueError: unknown ``method`` or non-square ``W``.
    """
    check_method(method)
    _check_square(W)
    if W.dtype in _HALF_DTYPES or (
        torch.is_autocast_enabled(W.device.type) and W.dtype != torch.float64
    ):
        W = W.float()
    with torch.autocast(device_type=W.device.type, enabled=False):
        A = skew_symmetric(W)
        if method == "exp":
            return torch.linalg.matrix_exp(A)
        if method == "cayley":
            eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
            return torch.linalg.solve(eye - A, eye + A)
        return _householder(A)


def orthogonality_error(Q: Tensor) -> float:
    """Maximum absolute entry of ``Q^T Q - I`` over all matrices in the batch.

    The product is evaluated in float64 so the result measures how orthogonal the
    stored matrix is, not the rounding of the check itself.

    Args:
        Q: tensor of shape ``(..., n, n)``.

    Returns:
        The max-abs error as a Python float.
    """
    _check_square(Q)
    Q64 = Q.detach().to(torch.float64)
    eye = torch.eye(Q.shape[-1], dtype=torch.float64, device=Q.device)
    return (Q64.mT @ Q64 - eye).abs().max().item()


@torch.no_grad()
def reorthogonalize_(Q: Tensor, steps: int = 2) -> Tensor:
    """Polish nearly orthogonal matrices ``(..., n, n)`` in place (Newton-Schulz polar steps).

    ``Q <- Q (3 I - Q^T Q) / 2`` converges quadratically to the nearest
    orthogonal matrix; two steps take a float32-rounded matrix (error ~1e-7)
    to float64 precision (~1e-15).
    """
    if not Q.is_floating_point() or Q.shape[-1] == 0:
        return Q
    eye = torch.eye(Q.shape[-1], dtype=Q.dtype, device=Q.device)
    for _ in range(steps):
        Q.copy_(Q @ (3 * eye - Q.mT @ Q) / 2)
    return Q


class OrthogonalBaseMixin(OrthogonalKernelModule):
    """The kernel ``base @ orthogonal_matrix(weight, method)`` of an orthogonal module.

    Used by the channel mixing and the invertible resampling, which set the
    buffer ``base`` (the initial kernel, ``(..., n, n)``), the parameter
    ``weight`` (same shape, zeros at init; None if not learnable) and
    ``method``.

    Keeps ``base`` orthogonal across dtype changes: ``model.double()`` would
    otherwise turn a float32-rounded matrix into a float64 one that is
    orthogonal only to ~1e-7; after every ``_apply`` (which ``.to()``,
    ``.double()`` and ``.float()`` use) the buffer is polished in its new dtype.
    """

    base: Tensor
    weight: Tensor | None
    method: str

    def kernel(self) -> Tensor:
        """The orthogonal kernel ``base @ orthogonal_matrix(weight, method)``, shape of ``base``.

        The buffer ``base`` itself if not learnable.  Float32 if the parameter is
        half precision or autocast is active (see :func:`orthogonal_matrix`).
        """
        if self.weight is None:
            return self.base
        Q = orthogonal_matrix(self.weight, self.method)
        with torch.autocast(device_type=Q.device.type, enabled=False):
            return self.base.to(Q.dtype) @ Q

    @staticmethod
    def _check_arguments(channels: int, channels_name: str, dim: int, method: str) -> None:
        """Raise ``ValueError`` unless ``channels`` is a positive int, ``dim`` 1-3 and ``method`` known."""
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise ValueError(f"{channels_name} must be a positive int, got {channels!r}")
        check_dim(dim)
        check_method(method)

    def _init_kernel(self, base: Tensor, learnable: bool, device: torch.device | str | None,
                     dtype: torch.dtype | None) -> None:
        """Register ``base`` (rounded once to ``dtype``) and, if ``learnable``, a zero ``weight``."""
        dtype = dtype if dtype is not None else torch.get_default_dtype()
        self.learnable = bool(learnable)
        self.register_buffer("base", base.to(device=device, dtype=dtype))  # type: ignore[attr-defined]
        weight = nn.Parameter(torch.zeros_like(self.base)) if self.learnable else None
        self.register_parameter("weight", weight)  # type: ignore[attr-defined]

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        out = super()._apply(fn, recurse)  # type: ignore[misc]
        base = getattr(self, "base", None)
        if isinstance(base, Tensor) and base.dtype in (torch.float32, torch.float64):
            reorthogonalize_(base)
        return out
