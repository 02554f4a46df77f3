"""Learnable invertible (orthogonal) down- and upsampling for 1D, 2D and 3D data.

Downsampling by a stride ``(s_1, ..., s_d)`` cuts every channel into
non-overlapping blocks of ``s = s_1 * ... * s_d`` pixels and applies an
orthogonal ``s x s`` matrix to each block, turning ``C`` fine channels into
``C * s`` coarse channels. Because the matrix is orthogonal, the inverse
(upsampling) is the transposed convolution with the same weight.

Channel ordering: for fine channel ``c`` and block offset ``k`` (the row-major
index of the position inside the stride block)::

    y[:, c * s + r] = sum_k Q[c, r, k] * x_block[:, c, k]

so with the identity kernel (``init='pixel_shuffle'``) 2D downsampling equals
``torch.nn.functional.pixel_unshuffle``.

The kernel is ``Q = base @ orthogonal_matrix(weight, method)`` where ``base`` is a
fixed buffer holding the initialisation and ``weight`` a zero-initialised
parameter, so every parametrisation method starts exactly at the init.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .orthogonal import METHODS, OrthogonalBaseMixin, orthogonal_matrix

__all__ = [
    "INITS",
    "haar_matrix",
    "InvertibleDownsampling",
    "InvertibleUpsampling",
]

#: Valid values of the ``init`` argument.
INITS: tuple[str, ...] = ("haar", "pixel_shuffle", "random")

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


# --------------------------------------------------------------------------- helpers
def _check_dim(dim: int) -> None:
    if isinstance(dim, bool) or not isinstance(dim, int) or dim not in (1, 2, 3):
        raise ValueError(f"dim must be 1, 2 or 3 (number of spatial dims), got {dim!r}")


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(
            f"unknown method {method!r}; valid methods are {', '.join(repr(m) for m in METHODS)}"
        )


def normalize_stride(stride: int | Sequence[int], dim: int) -> tuple[int, ...]:
    """Return ``stride`` as a tuple of ``dim`` positive ints.

    Raises:
        ValueError: wrong number of entries, an entry that is not an int, or < 1.
    """
    if isinstance(stride, int) and not isinstance(stride, bool):
        stride = (stride,) * dim
    elif isinstance(stride, Sequence) and not isinstance(stride, str):
        stride = tuple(stride)
        if len(stride) != dim:
            raise ValueError(
                f"stride {stride!r} has {len(stride)} entries but dim={dim}; "
                f"pass an int or a tuple of {dim} ints"
            )
    else:
        raise ValueError(f"stride must be an int or a tuple of {dim} ints, got {stride!r}")
    for s in stride:
        if isinstance(s, bool) or not isinstance(s, int):
            raise ValueError(f"stride entries must be ints, got {stride!r}")
        if s < 1:
            raise ValueError(f"stride entries must be >= 1, got {stride!r}")
    return stride


def check_input(x: Tensor, dim: int, channels: int, name: str = "input") -> None:
    """Check that ``x`` has shape ``(N, channels, *spatial)`` with ``dim`` spatial dims.

    Raises:
        ValueError: with the expected and the actual shape.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != dim + 2:
        raise ValueError(
            f"expected a (N, C, *spatial) {name} tensor with dim={dim} spatial dims "
            f"(rank {dim + 2}), got shape {tuple(x.shape)}"
        )
    if x.shape[1] != channels:
        raise ValueError(
            f"expected {channels} channels in {name} of shape {tuple(x.shape)}, got {x.shape[1]}"
        )


def haar_matrix(stride: int | Sequence[int], dim: int | None = None) -> Tensor:
    """Orthogonal Haar matrix for a stride block, in float64.

    The Kronecker product over spatial dims of the 1D Haar matrix
    ``[[1, 1], [1, -1]] / sqrt(2)`` (stride 2) or ``[[1]]`` (stride 1). Rows are the
    Haar filters (row 0 is the average), columns the row-major block offsets.

    Args:
        stride: int or tuple of ints; each entry 1 or 2.
        dim: number of spatial dims (default: ``len(stride)``, or 1 for an int).

    Returns:
        Tensor of shape ``(s, s)``, ``s = prod(stride)``.

    Raises:
        ValueError: a stride entry other than 1 or 2.
    """
    if dim is None:
        dim = 1 if isinstance(stride, int) else len(stride)
    stride = normalize_stride(stride, dim)
    if any(s > 2 for s in stride):
        raise ValueError(
            f"init='haar' needs strides of 1 or 2 in every dim, got stride {stride}; "
            "use init='pixel_shuffle' or init='random' for larger strides"
        )
    h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64) / math.sqrt(2.0)
    h1 = torch.ones(1, 1, dtype=torch.float64)
    out = h1
    for s in stride:
        out = torch.kron(out, h2 if s == 2 else h1)
    return out


def random_special_orthogonal(
    batch: int, n: int, generator: torch.Generator | None = None
) -> Tensor:
    """``batch`` random special orthogonal ``n x n`` matrices (float64), shape ``(batch, n, n)``.

    QR of a Gaussian matrix with the signs of ``diag(R)`` moved into ``Q`` (Haar
    distributed on O(n)); the first column is negated where ``det = -1``.
    """
    G = torch.randn(batch, n, n, dtype=torch.float64, generator=generator)
    Q, R = torch.linalg.qr(G)
    signs = torch.sign(torch.diagonal(R, dim1=-2, dim2=-1))
    signs[signs == 0] = 1.0
    Q = Q * signs.unsqueeze(-2)
    flip = torch.linalg.det(Q) < 0
    Q[flip, :, 0] = -Q[flip, :, 0]
    return Q


def _init_matrix(init: str, stride: tuple[int, ...], batch: int) -> Tensor:
    """Initial kernel of shape ``(batch, s, s)`` in float64."""
    s = math.prod(stride)
    if init == "haar":
        return haar_matrix(stride).expand(batch, s, s).clone()
    if init == "pixel_shuffle":
        return torch.eye(s, dtype=torch.float64).expand(batch, s, s).clone()
    if init == "random":
        return random_special_orthogonal(batch, s)
    raise ValueError(f"unknown init {init!r}; valid inits are {', '.join(repr(i) for i in INITS)}")


# ------------------------------------------------------------------------- modules
class _InvertibleResampling(OrthogonalBaseMixin, nn.Module):
    """Shared machinery of :class:`InvertibleDownsampling` / :class:`InvertibleUpsampling`.

    Holds the orthogonal kernel of shape ``(C, s, s)`` (``(1, s, s)`` if ``shared``),
    ``C`` = number of *fine* channels, ``s = prod(stride)``.
    """

    def __init__(
        self,
        fine_channels: int,
        stride: int | Sequence[int],
        dim: int,
        method: str,
        init: str,
        learnable: bool,
        shared: bool,
        device: torch.device | str | None,
        dtype: torch.dtype | None,
    ) -> None:
        super().__init__()
        _check_dim(dim)
        _check_method(method)
        if init not in INITS:
            raise ValueError(
                f"unknown init {init!r}; valid inits are {', '.join(repr(i) for i in INITS)}"
            )
        self.dim = dim
        self.stride = normalize_stride(stride, dim)
        self.block_size = math.prod(self.stride)
        self.fine_channels = fine_channels
        self.coarse_channels = fine_channels * self.block_size
        self.method = method
        self.init = init
        self.learnable = bool(learnable)
        self.shared = bool(shared)
        s = self.block_size
        n = 1 if shared else fine_channels
        dtype = dtype if dtype is not None else torch.get_default_dtype()
        # Built in float64, then rounded once to ``dtype`` (see class docstrings).
        base = _init_matrix(init, self.stride, n).to(device=device, dtype=dtype)
        self.register_buffer("base", base)
        if self.learnable:
            self.weight = nn.Parameter(torch.zeros(n, s, s, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)

    def extra_repr(self) -> str:
        return (
            f"stride={self.stride}, dim={self.dim}, method={self.method!r}, "
            f"init={self.init!r}, learnable={self.learnable}, shared={self.shared}"
        )

    def kernel(self) -> Tensor:
        """The orthogonal kernel ``base @ orthogonal_matrix(weight, method)``.

        Returns:
            Tensor of shape ``(C, s, s)`` (``(1, s, s)`` if ``shared``); the buffer
            ``base`` itself if not learnable. Float32 if the parameter is half
            precision or autocast is active (see :func:`orthogonal_matrix`).
        """
        if self.weight is None:
            return self.base
        Q = orthogonal_matrix(self.weight, self.method)
        with torch.autocast(device_type=Q.device.type, enabled=False):
            return self.base.to(Q.dtype) @ Q

    def _conv_weight(self, kernel: Tensor | None, dtype: torch.dtype) -> Tensor:
        """Convolution weight of shape ``(C * s, 1, *stride)`` from a kernel."""
        if kernel is None:
            kernel = self.kernel()
        s, C = self.block_size, self.fine_channels
        if kernel.dim() != 3 or kernel.shape[-2:] != (s, s) or kernel.shape[0] not in (1, C):
            raise ValueError(
                f"kernel must have shape ({C}, {s}, {s}) or (1, {s}, {s}), "
                f"got {tuple(kernel.shape)}"
            )
        # Under autocast the kernel is float32; the conv runs in the input's dtype.
        kernel = kernel.to(dtype).expand(C, s, s)
        return kernel.reshape(C * s, 1, *self.stride)

    def _down(self, x: Tensor, kernel: Tensor | None) -> Tensor:
        """Fine ``(N, C, *S)`` -> coarse ``(N, C*s, *S/stride)``."""
        check_input(x, self.dim, self.fine_channels)
        for i, (size, st) in enumerate(zip(x.shape[2:], self.stride)):
            if size % st != 0:
                raise ValueError(
                    f"spatial dim {i} of input shape {tuple(x.shape)} has size {size}, "
                    f"which is not divisible by the stride {st} in that dim; pad the input "
                    f"to a multiple of {st} there (iunet_nb.iUNet pads automatically)"
                )
        w = self._conv_weight(kernel, x.dtype)
        return _CONV[self.dim](x, w, stride=self.stride, groups=self.fine_channels)

    def _up(self, y: Tensor, kernel: Tensor | None) -> Tensor:
        """Coarse ``(N, C*s, *S)`` -> fine ``(N, C, *S*stride)``."""
        check_input(y, self.dim, self.coarse_channels)
        w = self._conv_weight(kernel, y.dtype)
        return _CONV_T[self.dim](y, w, stride=self.stride, groups=self.fine_channels)


class InvertibleDownsampling(_InvertibleResampling):
    """Learnable orthogonal downsampling ``(N, C, *S) -> (N, C*s, *S/stride)``.

    Args:
        in_channels: ``C``, the number of (fine) input channels.
        stride: int or tuple of ``dim`` ints >= 1 (anisotropic strides allowed).
        dim: number of spatial dims, 1, 2 or 3.
        method: orthogonal parametrisation, one of ``'exp'``, ``'cayley'``, ``'householder'``.
        init: ``'haar'`` (strides 1/2 only), ``'pixel_shuffle'`` (identity, i.e.
            pixel unshuffle) or ``'random'`` (random special orthogonal per channel).
        learnable: if False, the kernel is the fixed buffer ``base``.
        shared: one kernel ``(1, s, s)`` for all channels instead of ``(C, s, s)``.
        device, dtype: factory arguments as in ``torch.nn`` layers. The init is
            computed in float64 and rounded to ``dtype`` once; build float64 models
            with ``dtype=torch.float64`` (``.double()`` on a float32 module keeps the
            float32-rounded base, orthogonal only to ~1e-7).

    Attributes:
        base: buffer ``(C or 1, s, s)`` with the initial kernel.
        weight: parameter ``(C or 1, s, s)``, zeros at init (None if not learnable).
        out_channels: ``C * s``.
    """

    def __init__(
        self,
        in_channels: int,
        stride: int | Sequence[int] = 2,
        dim: int = 2,
        method: str = "cayley",
        init: str = "haar",
        learnable: bool = True,
        shared: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
        super().__init__(in_channels, stride, dim, method, init, learnable, shared, device, dtype)
        self.in_channels = self.fine_channels
        self.out_channels = self.coarse_channels

    def forward(self, x: Tensor, kernel: Tensor | None = None) -> Tensor:
        """Downsample ``x`` of shape ``(N, C, *S)`` to ``(N, C*s, *S/stride)``.

        Args:
            x: input; every spatial size must be divisible by its stride.
            kernel: precomputed :meth:`kernel` to use as is; if None, computed once here.
        """
        return self._down(x, kernel)

    def inverse(self, y: Tensor, kernel: Tensor | None = None) -> Tensor:
        """Exact inverse: ``(N, C*s, *S) -> (N, C, *S*stride)`` (transposed conv)."""
        return self._up(y, kernel)


class InvertibleUpsampling(_InvertibleResampling):
    """Learnable orthogonal upsampling ``(N, C_in, *S) -> (N, C_in/s, *S*stride)``.

    The inverse of :class:`InvertibleDownsampling` with the same kernel: forward is
    the transposed convolution, :meth:`inverse` the strided convolution.

    Args:
        in_channels: number of coarse input channels; must be divisible by
            ``s = prod(stride)``. ``out_channels = in_channels // s`` is the number of
            fine channels ``C`` (the kernel has shape ``(C or 1, s, s)``).
        stride, dim, method, init, learnable, shared, device, dtype: as in
            :class:`InvertibleDownsampling`.
    """

    def __init__(
        self,
        in_channels: int,
        stride: int | Sequence[int] = 2,
        dim: int = 2,
        method: str = "cayley",
        init: str = "haar",
        learnable: bool = True,
        shared: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
        _check_dim(dim)
        s = math.prod(normalize_stride(stride, dim))
        if in_channels % s != 0:
            raise ValueError(
                f"InvertibleUpsampling: in_channels={in_channels} is not divisible by "
                f"prod(stride)={s}; use a multiple of {s}"
            )
        super().__init__(in_channels // s, stride, dim, method, init, learnable, shared, device, dtype)
        self.in_channels = self.coarse_channels
        self.out_channels = self.fine_channels

    def forward(self, y: Tensor, kernel: Tensor | None = None) -> Tensor:
        """Upsample ``y`` of shape ``(N, C*s, *S)`` to ``(N, C, *S*stride)``.

        Args:
            y: input with ``in_channels`` channels.
            kernel: precomputed :meth:`kernel` to use as is; if None, computed once here.
        """
        return self._up(y, kernel)

    def inverse(self, x: Tensor, kernel: Tensor | None = None) -> Tensor:
        """Exact inverse: ``(N, C, *S) -> (N, C*s, *S/stride)`` (strided conv)."""
        return self._down(x, kernel)
