"""Learnable invertible (orthogonal) down- and upsampling for 1D, 2D and 3D data.

Downsampling by a stride ``(s_1, ..., s_d)`` cuts every channel into
non-overlapping blocks of ``s = s_1 * ... * s_d`` pixels and applies an
orthogonal ``s x s`` matrix to each block, turning ``C`` fine channels into
``C * s`` coarse channels: a grouped convolution with kernel size = stride =
``(s_1, ..., s_d)`` and an orthogonal kernel.  Because the matrix is
orthogonal, the inverse (upsampling) is the transposed convolution with the
same kernel.  Both are computed as a block reordering plus one batched matrix
product (no im2col buffers, which the CPU convolution allocates here); the
memory-efficient engine uses :meth:`InvertibleDownsampling.backward_parts`,
which rebuilds the input and computes all gradients without storing anything.

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
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from iunet_nb.common import dense_strides, follows, per_sample_view
from iunet_nb.nn.orthogonal import OrthogonalBaseMixin, reorthogonalize_

__all__ = [
    "INITS",
    "INIT_ALIASES",
    "dct_matrix",
    "haar_matrix",
    "InvertibleDownsampling",
    "InvertibleUpsampling",
]

#: Valid names of the ``init`` argument (besides a user-given orthogonal matrix).
INITS: tuple[str, ...] = ("haar", "pixel_shuffle", "random")

#: Other accepted names: ``'squeeze'`` (the reference package's name) is pixel shuffle.
INIT_ALIASES: dict[str, str] = {"squeeze": "pixel_shuffle"}

#: Largest ``max |M^T M - I|`` accepted for a user-given init matrix (it is then
#: polished to float64 precision), loose enough for float32-rounded matrices.
INIT_ORTHOGONALITY_TOL: float = 1e-5



# --------------------------------------------------------------------------- helpers
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


def dct_matrix(n: int) -> Tensor:
    """Orthonormal DCT-II matrix of size ``n``, in float64, shape ``(n, n)``.

    ``D[k, j] = c_k cos(pi k (2 j + 1) / (2 n))`` with ``c_0 = 1 / sqrt(n)`` and
    ``c_k = sqrt(2 / n)`` otherwise: row 0 is the (scaled) mean, row ``k`` the
    cosine of frequency ``k / 2`` cycles per block; every row ``k >= 1`` sums to zero.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    k = torch.arange(n, dtype=torch.float64).unsqueeze(1)
    j = torch.arange(n, dtype=torch.float64).unsqueeze(0)
    D = torch.cos(math.pi * k * (2 * j + 1) / (2 * n)) * math.sqrt(2.0 / n)
    D[0] = 1.0 / math.sqrt(n)
    return D


def _haar_1d(s: int) -> Tensor:
    """The 1D factor of :func:`haar_matrix` for one stride entry ``s``."""
    if s == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    if s == 2:
        # The DCT-II of size 2 is the Haar matrix; the closed form keeps the
        # classic values bit for bit.
        return torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64) / math.sqrt(2.0)
    return dct_matrix(s)


def haar_matrix(stride: int | Sequence[int], dim: int | None = None) -> Tensor:
    """Orthogonal Haar-type matrix for a stride block, in float64 (``init='haar'``).

    The Kronecker product over the spatial dims of one orthonormal basis of
    ``R^{s_i}`` per stride entry ``s_i``:

    * ``s_i = 1``: ``[[1]]``;
    * ``s_i = 2``: the Haar matrix ``[[1, 1], [1, -1]] / sqrt(2)``;
    * ``s_i >= 3``: the orthonormal DCT-II basis (:func:`dct_matrix`), which is
      the generalisation of the 2-point Haar matrix used here: for ``s = 2`` the
      DCT-II *is* the Haar matrix, its first row is the local mean
      (``1 / sqrt(s)`` each) and every other row is a zero-sum detail filter,
      ordered from low to high frequency.  (It is not the multi-level Haar
      wavelet for ``s = 4, 8, ...``; pass such a matrix as ``init`` if wanted.)

    Rows are the filters (row 0 is the average of the whole block, scaled by
    ``sqrt(s)``), columns the row-major block offsets.

    Args:
        stride: int or tuple of ints >= 1.
        dim: number of spatial dims (default: ``len(stride)``, or 1 for an int).

    Returns:
        Tensor of shape ``(s, s)``, ``s = prod(stride)``.
    """
    if dim is None:
        dim = 1 if isinstance(stride, int) else len(stride)
    stride = normalize_stride(stride, dim)
    out = torch.ones(1, 1, dtype=torch.float64)
    for s in stride:
        out = torch.kron(out, _haar_1d(s))
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


def _user_matrix(init: Tensor | np.ndarray, stride: tuple[int, ...], batch: int) -> Tensor:
    """A user-given orthogonal init matrix as a ``(batch, s, s)`` float64 tensor.

    Accepts ``(s, s)`` (one matrix for every channel) or ``(batch, s, s)`` /
    ``(1, s, s)``; checks that it is real, finite and orthogonal within
    :data:`INIT_ORTHOGONALITY_TOL`, then polishes it to float64 precision.
    """
    s = math.prod(stride)
    M = torch.from_numpy(np.asarray(init)) if isinstance(init, np.ndarray) else init.detach()
    if M.is_complex() or M.dtype == torch.bool:
        raise ValueError(f"init: a user-given matrix must be real, got dtype {M.dtype}")
    M = M.to(device="cpu", dtype=torch.float64)
    if M.dim() == 2:
        M = M.unsqueeze(0)
    if M.dim() != 3 or M.shape[-2:] != (s, s) or M.shape[0] not in (1, batch):
        per_channel = f" or ({batch}, {s}, {s}) (one per channel)" if batch > 1 else ""
        raise ValueError(
            f"init: a user-given matrix for stride {stride} must have shape ({s}, {s}){per_channel}, "
            f"s = prod(stride) = {s}; got shape {tuple(init.shape)}"
        )
    if not torch.isfinite(M).all():
        raise ValueError("init: the user-given matrix contains NaN or infinite entries")
    eye = torch.eye(s, dtype=torch.float64)
    err = (M.mT @ M - eye).abs().max().item()
    if err > INIT_ORTHOGONALITY_TOL:
        raise ValueError(
            f"init: the user-given matrix is not orthogonal: max |M^T M - I| = {err:.3g} > "
            f"{INIT_ORTHOGONALITY_TOL:g}; rows must be orthonormal filters (e.g. from "
            "torch.linalg.qr or iunet_nb.nn.resampling.haar_matrix)"
        )
    return reorthogonalize_(M.expand(batch, s, s).clone())


def _init_matrix(init: str | Tensor | np.ndarray, stride: tuple[int, ...], batch: int) -> Tensor:
    """Initial kernel of shape ``(batch, s, s)`` in float64 (see :class:`InvertibleDownsampling`)."""
    if isinstance(init, (Tensor, np.ndarray)):
        return _user_matrix(init, stride, batch)
    s = math.prod(stride)
    name = _init_name(init)
    if name == "haar":
        return haar_matrix(stride).expand(batch, s, s).clone()
    if name == "pixel_shuffle":
        return torch.eye(s, dtype=torch.float64).expand(batch, s, s).clone()
    return random_special_orthogonal(batch, s)


def _init_name(init: Any) -> str:
    """The canonical name of a string init (aliases resolved), or ``'matrix'``."""
    if isinstance(init, (Tensor, np.ndarray)):
        return "matrix"
    if isinstance(init, str) and init in INIT_ALIASES:
        return INIT_ALIASES[init]
    if isinstance(init, str) and init in INITS:
        return init
    valid = ", ".join(repr(i) for i in INITS + tuple(INIT_ALIASES))
    raise ValueError(
        f"unknown init {init!r}; valid inits are {valid}, or an orthogonal (s, s) matrix "
        "(torch.Tensor or numpy.ndarray, s = prod(stride))"
    )


# ------------------------------------------------------------------------- modules
class _InvertibleResampling(OrthogonalBaseMixin, nn.Module):
    """Shared machinery of :class:`InvertibleDownsampling` / :class:`InvertibleUpsampling`.

    Holds the orthogonal kernel of shape ``(C, s, s)`` (``(1, s, s)`` if ``shared``),
    ``C`` = number of *fine* channels, ``s = prod(stride)``.
    """

    def __init__(
        self,
        in_channels: int,
        stride: int | Sequence[int] = 2,
        dim: int = 2,
        method: str = "cayley",
        init: str | Tensor | np.ndarray = "haar",
        learnable: bool = True,
        shared: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self._check_arguments(in_channels, "in_channels", dim, method)
        self.dim = dim
        self.stride = normalize_stride(stride, dim)
        self.block_size = math.prod(self.stride)
        self.fine_channels = self._fine_channels(in_channels, self.block_size)
        self.coarse_channels = self.fine_channels * self.block_size
        fine_first = (self.fine_channels, self.coarse_channels)
        self.in_channels, self.out_channels = fine_first if self.input_is_fine else fine_first[::-1]
        self.method = method
        #: The init's canonical name: ``'haar'``, ``'pixel_shuffle'``, ``'random'`` or ``'matrix'``.
        self.init = _init_name(init)
        self.shared = bool(shared)
        n = 1 if shared else self.fine_channels
        # Built in float64, then rounded once to ``dtype`` (see class docstrings).
        self._init_kernel(_init_matrix(init, self.stride, n), learnable, device, dtype)

    #: True for the downsampling (its input is the fine tensor), False for the upsampling.
    input_is_fine: bool

    def forward(self, x: Tensor, kernel: Tensor | None = None) -> Tensor:
        """Down-: ``(N, C, *S) -> (N, C*s, *S/stride)``; upsampling: the reverse.

        Args:
            x: input with ``in_channels`` channels; for the downsampling every
                spatial size must be divisible by its stride.
            kernel: precomputed :meth:`kernel` to use as is; if None, computed once here.
        """
        return self._down(x, kernel) if self.input_is_fine else self._up(x, kernel)

    def inverse(self, y: Tensor, kernel: Tensor | None = None) -> Tensor:
        """The exact inverse of :meth:`forward` (the transposed block transform)."""
        return self._up(y, kernel) if self.input_is_fine else self._down(y, kernel)

    def backward_parts(self, y_parts: list[Tensor], dy_parts: list[Tensor], kernel: Tensor,
                       need_kernel_grad: bool, y_owned: list[bool], dy_owned: list[bool],
                       allow_split: bool, x_out: Tensor | None = None,
                       dx_out: Tensor | None = None,
                       place_x: Callable[[list[Tensor]], list[Tensor]] | None = None,
                       x_in_place: bool = False, dx_in_place: bool = False,
                       ) -> tuple[list[Tensor], list[Tensor], Tensor | None]:
        """Memory-efficient backward from the output ``y = forward(x)`` and ``dL/dy``, given as
        channel parts: returns ``(x parts, dL/dx parts, dL/dkernel)``; owned parts are reused.
        ``x_out``, ``dx_out``: where the downsampling's fine ``x`` and ``dL/dx`` are written
        when they have exactly their shapes (then as one part each); else not used.
        ``place_x``: called with ``x``'s parts once they are complete, before anything is
        allocated for ``dL/dx``; the parts it returns are used from then on.
        ``x_in_place``, ``dx_in_place``: ``y``'s (``dL/dy``'s) memory stays allocated anyway, so
        owned parts that lie in one run are turned into ``x`` (``dL/dx``) where they are.

        Downsampling: with ``allow_split`` the fine tensors come back as one part per
        coarse part, which lowers the peak (see :meth:`_reorder`); otherwise as one
        tensor each.  Upsampling: the coarse tensors come back as one part per fine
        part whatever ``allow_split`` says; every part is transformed in place after
        its reordering.
        """
        if self.input_is_fine:
            return self._down_backward_parts(y_parts, dy_parts, kernel, need_kernel_grad, y_owned,
                                             dy_owned, join=not allow_split, x_out=x_out,
                                             dx_out=dx_out, place_x=place_x, x_in_place=x_in_place,
                                             dx_in_place=dx_in_place)
        return self._up_backward_parts(y_parts, dy_parts, kernel, need_kernel_grad,
                                       y_owned if x_in_place else None,
                                       dy_owned if dx_in_place else None, place_x)

    def _fine_channels(self, in_channels: int, block_size: int) -> int:
        """The number of fine channels ``C`` of a module with ``in_channels`` inputs."""
        if self.input_is_fine:
            return in_channels
        if in_channels % block_size != 0:
            raise ValueError(
                f"{type(self).__name__}: in_channels={in_channels} is not divisible by "
                f"prod(stride)={block_size}; use a multiple of {block_size}"
            )
        return in_channels // block_size

    def extra_repr(self) -> str:
        return (
            f"stride={self.stride}, dim={self.dim}, method={self.method!r}, "
            f"init={self.init!r}, learnable={self.learnable}, shared={self.shared}"
        )

    def forward_parts(self, parts: list[Tensor], kernel: Tensor, owned: list[bool],
                      out: Tensor | None = None, in_place: bool = False) -> list[Tensor]:
        """``forward(cat(parts, dim=1), kernel)`` as one tensor, computed slab by slab.

        The input is read in slabs of whole blocks along the first spatial dim, so the
        only activation-sized allocation is the result (none if ``out`` is given): no
        concatenation of the parts and no whole-tensor block reordering.  ``kernel``:
        ``(C or 1, s, s)`` (:meth:`kernel`); ``out``: a tensor of the output's shape the
        result is written into (e.g. the room a skip connection left, see
        :class:`~iunet_nb.engine.steps.KernelStep`; not used unless it has exactly the
        output's shape and dtype), or None for a new one.  ``in_place``: the input's memory
        stays allocated anyway; owned parts that lie in one run are then turned into the
        output where they are (:meth:`_in_place`).  With grad
        mode on (a reference computation) it is ``forward`` of the joined parts.
        """
        if torch.is_grad_enabled():
            x = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
            return [self(x, kernel=kernel)]
        Q = self._resolve_kernel(kernel, parts[0].dtype)
        run = _dense_run(parts) if in_place and out is None and all(owned) else None
        if run is not None:  # the input's memory is ours: the output takes its place
            return [self._in_place(run, Q)]
        return [self._slabwise(parts, Q, out)]

    def _in_place(self, x: Tensor, Q: Tensor) -> Tensor:
        """The forward of ``x`` (dense per sample, ours to overwrite) written over ``x`` itself.

        Fine channel ``c`` and its ``s`` coarse channels hold the same elements of a sample
        (``c |S|`` to ``(c + 1) |S|``), so the map is done a few channels at a time through
        a temporary of :data:`_IN_PLACE_ELEMENTS` per sample: nothing activation-sized.
        """
        check_input(x, self.dim, self.in_channels)
        n, s, C = x.shape[0], self.block_size, self.fine_channels
        if self.input_is_fine:
            self._check_divisible(x.shape)
            coarse = [size // st for size, st in zip(x.shape[2:], self.stride)]
            y = per_sample_view(x, (n, C * s, *coarse))
            for c0, c1 in _channel_chunks(C, x[0, 0].numel()):
                Qk = Q if Q.shape[0] == 1 else Q[c0:c1]
                res = torch.matmul(Qk, to_blocks(x[:, c0:c1], self.stride))  # (N, k, s, L): new
                y[:, c0 * s:c1 * s].copy_(res.view(n, (c1 - c0) * s, *coarse))
            return y
        coarse = list(x.shape[2:])
        y = per_sample_view(x, (n, C, *(h * st for h, st in zip(coarse, self.stride))))
        for c0, c1 in _channel_chunks(C, s * x[0, 0].numel()):
            Qk = Q if Q.shape[0] == 1 else Q[c0:c1]
            res = torch.matmul(Qk.mT, x[:, c0 * s:c1 * s].reshape(n, c1 - c0, s, -1))  # new
            _write_from_blocks(res, self.stride, coarse, y[:, c0:c1])
        return y

    def _slabwise(self, parts: list[Tensor], Q: Tensor, out: Tensor | None) -> Tensor:
        """The forward of the joined ``parts`` into ``out`` (or a new tensor), slab by slab."""
        check_input(parts[0], self.dim, parts[0].shape[1])
        n, in_spatial = parts[0].shape[0], tuple(parts[0].shape[2:])
        channels = sum(p.shape[1] for p in parts)
        if channels != self.in_channels:
            raise ValueError(f"{type(self).__name__}: parts hold {channels} channels, "
                             f"expected {self.in_channels}")
        down, s, st0 = self.input_is_fine, self.block_size, self.stride[0]
        if down:
            self._check_divisible(parts[0].shape)
            out_spatial = tuple(size // st for size, st in zip(in_spatial, self.stride))
        else:
            out_spatial = tuple(size * st for size, st in zip(in_spatial, self.stride))
        out = _usable(out, (n, self.out_channels, *out_spatial), parts[0].dtype)
        if out is None:  # none given, or not the output's room
            out = parts[0].new_empty(n, self.out_channels, *out_spatial)
        coarse = out_spatial if down else in_spatial
        plane = n * self.fine_channels * s * math.prod(coarse[1:])  # elements per coarse plane
        step = max(1, _SLAB_ELEMENTS // max(plane, 1))
        groups = _fine_groups(parts, 1 if down else s)
        for a in range(0, coarse[0], step):
            b = min(coarse[0], a + step)
            for group, f0, fc in groups:
                Qk = Q if Q.shape[0] == 1 else Q[f0:f0 + fc]
                if down:
                    views = [p.narrow(2, a * st0, (b - a) * st0) for p in group]
                    slab = views[0] if len(views) == 1 else torch.cat(views, dim=1)
                    res = torch.matmul(Qk, to_blocks(slab, self.stride))
                    out.narrow(1, f0 * s, fc * s).narrow(2, a, b - a).copy_(
                        res.view(n, fc * s, b - a, *coarse[1:]))
                else:
                    views = [p.narrow(2, a, b - a) for p in group]
                    slab = views[0] if len(views) == 1 else torch.cat(views, dim=1)
                    res = torch.matmul(Qk.mT, slab.reshape(n, fc, s, -1))
                    _write_from_blocks(res, self.stride, (b - a, *coarse[1:]),
                                       out.narrow(1, f0, fc).narrow(2, a * st0, (b - a) * st0))
        return out

    def _resolve_kernel(self, kernel: Tensor | None, dtype: torch.dtype) -> Tensor:
        """The ``(C or 1, s, s)`` kernel in the data's dtype (computed once if not given)."""
        if kernel is None:
            kernel = self.kernel()
        s, C = self.block_size, self.fine_channels
        if kernel.dim() != 3 or kernel.shape[-2:] != (s, s) or kernel.shape[0] not in (1, C):
            raise ValueError(
                f"kernel must have shape ({C}, {s}, {s}) or (1, {s}, {s}), "
                f"got {tuple(kernel.shape)}"
            )
        # Under autocast the kernel is float32; the products run in the data's dtype.
        return kernel.to(dtype)

    def _down(self, x: Tensor, kernel: Tensor | None) -> Tensor:
        """Fine ``(N, C, *S)`` -> coarse ``(N, C*s, *S/stride)``."""
        check_input(x, self.dim, self.fine_channels)
        self._check_divisible(x.shape)
        Q = self._resolve_kernel(kernel, x.dtype)
        blocks = to_blocks(x, self.stride)  # (N, C, s, L): one copy
        y = torch.matmul(Q, blocks)  # (N, C, s, L): channel c*s + r
        coarse = [size // st for size, st in zip(x.shape[2:], self.stride)]
        return y.view(x.shape[0], self.coarse_channels, *coarse)

    def _check_divisible(self, shape: Sequence[int]) -> None:
        """Raise if a fine input of ``shape`` ``(N, C, *S)`` is not divisible by the stride."""
        for i, (size, st) in enumerate(zip(shape[2:], self.stride)):
            if size % st != 0:
                raise ValueError(
                    f"spatial dim {i} of input shape {tuple(shape)} has size {size}, "
                    f"which is not divisible by the stride {st} in that dim; pad the input "
                    f"to a multiple of {st} there (iunet_nb.iUNet pads automatically)"
                )

    def _up(self, y: Tensor, kernel: Tensor | None) -> Tensor:
        """Coarse ``(N, C*s, *S)`` -> fine ``(N, C, *S*stride)``."""
        check_input(y, self.dim, self.coarse_channels)
        Q = self._resolve_kernel(kernel, y.dtype)
        n, coarse = y.shape[0], y.shape[2:]
        blocks = torch.matmul(Q.mT, y.reshape(n, self.fine_channels, self.block_size, -1))
        return from_blocks(blocks, self.stride, coarse)


    def _down_backward_parts(self, ys: list[Tensor], dys: list[Tensor], Q: Tensor, need: bool,
                             y_owned: list[bool] | None, dy_owned: list[bool] | None, join: bool,
                             x_out: Tensor | None = None, dx_out: Tensor | None = None,
                             place_x: Callable[[list[Tensor]], list[Tensor]] | None = None,
                             x_in_place: bool = False, dx_in_place: bool = False,
                             ) -> tuple[list[Tensor], list[Tensor], Tensor | None]:
        """For ``y = down(x)`` (coarse parts): rebuild ``x`` and return ``(x, dL/dx, dL/dQ)``.

        Uses ``dL/dx = down^T(dy) = up(dy)`` (orthogonal) and
        ``dL/dQ = sum_n dy_b x_b^T`` per channel.

        Every part must hold whole blocks (a multiple of ``s`` channels); parts
        that may be overwritten are transformed in place before the block
        reordering, so each fine part costs one new tensor.
        """
        s = self.block_size
        if any(p.shape[1] % s for p in ys + dys):
            ys, dys = [torch.cat(ys, dim=1)], [torch.cat(dys, dim=1)]
            y_owned = dy_owned = None
        Qd = Q.to(ys[0].dtype).mT
        coarse = ys[0].shape[2:]
        # Coarse tensors that are ours and lie in one run of memory become the fine ones in
        # place (no fine tensor is allocated); others are transformed, then reordered.
        y_run = _owned_run(ys, y_owned) if x_in_place and x_out is None else None
        xbs = [_blocks_in_place(Qd, y_run, s)] if y_run is not None else _blockwise_matmul(Qd, ys, s, y_owned)
        dQ = _kernel_grad_parts(dys, xbs, s, Q) if need else None
        # The caller hands over its lists: emptying them frees the coarse buffers early.
        ys.clear()
        fine_shape = (xbs[0].shape[0], self.fine_channels, *(h * st for h, st in zip(coarse, self.stride)))
        if y_run is not None:
            xs = [_fine_in_place(xbs.pop(), self.stride, coarse)]
        else:
            xs = self._reorder(xbs, coarse, join, _usable(x_out, fine_shape, xbs[0].dtype))
        if place_x is not None:
            xs = place_x(xs)
        dy_run = _owned_run(dys, dy_owned) if dx_in_place and dx_out is None else None
        if dy_run is not None:
            dys.clear()
            return xs, [_fine_in_place(_blocks_in_place(Qd, dy_run, s), self.stride, coarse)], dQ
        dxbs = _blockwise_matmul(Qd, dys, s, dy_owned)
        dys.clear()
        dxs = self._reorder(dxbs, coarse, join, _usable(dx_out, fine_shape, dxbs[0].dtype))
        return xs, dxs, dQ

    def _reorder(self, blocks: list[Tensor], coarse: Sequence[int], join: bool,
                 out: Tensor | None = None) -> list[Tensor]:
        """Block tensors back to fine parts; consumes ``blocks``.

        ``out``: the fine tensor to write into (one part, no allocation).  ``join``: one
        new tensor (the coarse buffers live until it is complete).  Otherwise one fine
        part per coarse part, each coarse buffer released as soon as its part is done,
        which lowers the peak by half a fine tensor.
        """
        if join or out is not None:
            out = [_from_blocks_joined(blocks, self.stride, coarse, out)]
            blocks.clear()
            return out
        out = []
        while blocks:
            out.append(from_blocks(blocks.pop(0), self.stride, coarse))
        return out

    def _up_backward_parts(self, ys: list[Tensor], dys: list[Tensor], Q: Tensor, need: bool,
                           y_owned: list[bool] | None = None, dy_owned: list[bool] | None = None,
                           place_x: Callable[[list[Tensor]], list[Tensor]] | None = None,
                           ) -> tuple[list[Tensor], list[Tensor], Tensor | None]:
        """For ``y = up(x)`` (fine parts, any split): rebuild the coarse ``x``; return ``(x, dL/dx, dL/dQ)``.

        Fine tensors that are ours and lie in one run of memory are reordered into blocks
        and transformed in place; others one part at a time into new block tensors.
        """
        n, s = ys[0].shape[0], self.block_size
        coarse = [size // st for size, st in zip(ys[0].shape[2:], self.stride)]
        Qd = Q.to(ys[0].dtype)
        y_run, dy_run = _owned_run(ys, y_owned), _owned_run(dys, dy_owned)
        if y_run is not None and dy_run is not None:
            ys.clear()
            xc = _matmul_in_place(Qd, _blocks_of_fine_in_place(y_run, self.stride))
            if place_x is not None:
                xc = place_x([xc.view(n, xc.shape[1] * s, *coarse)])[0].view(xc.shape)
            dys.clear()
            dfb = _blocks_of_fine_in_place(dy_run, self.stride)
            dQ = _kernel_grad_parts([xc], [dfb], 1, Q) if need else None
            dx = _matmul_in_place(Qd, dfb)
            return ([xc.view(n, xc.shape[1] * s, *coarse)], [dx.view(n, dx.shape[1] * s, *coarse)], dQ)
        xcs, offset = [], 0
        while ys:  # reorder one part at a time, transform it in place, release the input part
            part = to_blocks(ys.pop(0), self.stride)
            xcs += _blockwise_matmul(Qd, [part], 1, [True], first_channel=offset)
            offset += part.shape[1]
            del part
        if place_x is not None:  # before the gradient's blocks exist: one fine tensor less at the peak
            placed = place_x([xc.view(n, xc.shape[1] * s, *coarse) for xc in xcs])
            xcs = [x.view(n, x.shape[1] // s, s, -1) for x in placed]
        dfbs = []
        while dys:
            dfbs.append(to_blocks(dys.pop(0), self.stride))
        dQ = _kernel_grad_parts(xcs, dfbs, 1, Q) if need else None
        xs = [xc.view(n, xc.shape[1] * s, *coarse) for xc in xcs]
        dxs = [d.view(n, d.shape[1] * s, *coarse) for d in _blockwise_matmul(Qd, dfbs, 1, [True] * len(dfbs))]
        return xs, dxs, dQ


_SLICE = 8192  # pixels per slice of an in-place block product


def _blockwise_matmul(M: Tensor, parts: list[Tensor], group: int,
                      owned: list[bool] | None, first_channel: int = 0) -> list[Tensor]:
    """Apply the per-channel matrices ``M`` (C or 1, s, s) to channel parts.

    ``group`` = channels per fine channel in ``parts`` (``s`` for coarse
    ``(N, C*s, *S)`` tensors, 1 for ``(N, C, s, L)`` block tensors).  Returns
    ``(N, C_part, s, L)`` block tensors; owned parts are overwritten.
    ``first_channel``: the fine channel at which ``parts[0]`` starts (the index
    into ``M`` when the parts are handed over one at a time).
    """
    out = []
    start = first_channel
    s = M.shape[-1]
    for k, p in enumerate(parts):
        c = p.shape[1] // group
        Mk = M if M.shape[0] == 1 else M[start:start + c]
        start += c
        b = p.reshape(p.shape[0], c, s, -1)
        if owned is not None and owned[k] and b.data_ptr() == p.data_ptr() and p.is_contiguous():
            for lo in range(0, b.shape[-1], _SLICE):
                part = b[..., lo:lo + _SLICE]
                part.copy_(torch.matmul(Mk, part))
            out.append(b)
        else:
            out.append(torch.matmul(Mk, b))
    return out


def _kernel_grad_parts(a_parts: list[Tensor], b_parts: list[Tensor], group: int, Q: Tensor) -> Tensor:
    """``sum_n a_b b_b^T`` per fine channel, parts concatenated over channels, in Q's dtype.

    ``b_parts`` are block tensors ``(N, c, s, L)``; ``a_parts`` hold the same fine
    channels (``group`` channels per fine channel) but may be cut at other
    channels: both lists are cut at the union of their boundaries (views only).
    """
    grads = []
    for a, b in _aligned_pieces(a_parts, group, b_parts, 1):
        c = b.shape[1]
        a4 = a.reshape(a.shape[0], c, b.shape[2], -1).to(b.dtype)
        grads.append(torch.matmul(a4, b.mT).sum(0))
    g = torch.cat(grads, dim=0)
    if Q.shape[0] == 1 and g.shape[0] != 1:
        g = g.sum(0, keepdim=True)
    return g.to(Q.dtype)


def _aligned_pieces(a_parts: list[Tensor], a_group: int, b_parts: list[Tensor], b_group: int
                    ) -> list[tuple[Tensor, Tensor]]:
    """Pairs of views covering the same fine channels of two differently cut part lists.

    A part of ``x_parts`` holds ``x.shape[1] // x_group`` fine channels; the
    pieces are cut at every boundary of either list (no copies).
    """
    def bounds(parts: list[Tensor], group: int) -> list[int]:
        out, total = [], 0
        for p in parts:
            total += p.shape[1] // group
            out.append(total)
        return out

    a_bounds, b_bounds = bounds(a_parts, a_group), bounds(b_parts, b_group)
    if a_bounds != b_bounds and a_bounds[-1] != b_bounds[-1]:
        raise ValueError(f"channel parts cover {a_bounds[-1]} and {b_bounds[-1]} channels")
    cuts = sorted(set(a_bounds) | set(b_bounds))

    def pieces(parts: list[Tensor], part_bounds: list[int], group: int) -> list[Tensor]:
        out, lo, k, part_lo = [], 0, 0, 0
        for hi in cuts:
            while part_bounds[k] <= lo:
                part_lo = part_bounds[k]
                k += 1
            p = parts[k]
            if lo == part_lo and hi == part_bounds[k]:
                out.append(p)
            else:
                out.append(p.narrow(1, (lo - part_lo) * group, (hi - lo) * group))
            lo = hi
        return out

    return list(zip(pieces(a_parts, a_bounds, a_group), pieces(b_parts, b_bounds, b_group)))


def to_blocks(x: Tensor, stride: tuple[int, ...]) -> Tensor:
    """``(N, C, *S)`` -> ``(N, C, s, L)``: the ``s = prod(stride)`` pixels of each block.

    Block offsets are numbered row-major over the stride dimensions, blocks
    row-major over the coarse grid (``L`` of them), as in ``pixel_unshuffle``.
    """
    n, c, spatial = x.shape[0], x.shape[1], x.shape[2:]
    dim = len(stride)
    split: list[int] = []
    for size, st in zip(spatial, stride):
        split += [size // st, st]
    v = x.reshape(n, c, *split)
    # (N, C, h0, s0, h1, s1, ...) -> (N, C, s0, s1, ..., h0, h1, ...)
    perm = [0, 1] + [3 + 2 * k for k in range(dim)] + [2 + 2 * k for k in range(dim)]
    return v.permute(*perm).reshape(n, c, math.prod(stride), -1)


#: Elements per sample of the temporary through which a resampling works in place
#: (:meth:`_InvertibleResampling._in_place`, :func:`_fine_in_place`, :func:`_blocks_of_fine_in_place`).
_IN_PLACE_ELEMENTS = 1 << 18


def _dense_run(parts: list[Tensor]) -> Tensor | None:
    """Channel parts ``(N, C_k, *S)`` as one tensor (a view) when each is dense per sample and
    they follow one another in one buffer; None otherwise."""
    first = parts[0]
    if (any(p.dtype != first.dtype or p.stride()[1:] != dense_strides(p.shape)[1:] for p in parts)
            or not all(follows(a, b) for a, b in zip(parts, parts[1:]))):
        return None
    return per_sample_view(first, (first.shape[0], sum(p.shape[1] for p in parts), *first.shape[2:]))


def _owned_run(parts: list[Tensor], owned: list[bool] | None) -> Tensor | None:
    """:func:`_dense_run` of parts that may all be overwritten, else None."""
    if not parts or owned is None or not all(owned):
        return None
    return _dense_run(parts)


def _channel_chunks(channels: int, per_channel: int) -> list[tuple[int, int]]:
    """Ranges of channels of about :data:`_IN_PLACE_ELEMENTS` elements per sample (at least one channel)."""
    k = max(1, _IN_PLACE_ELEMENTS // max(per_channel, 1))
    return [(c, min(channels, c + k)) for c in range(0, channels, k)]


def _matmul_in_place(M: Tensor, blocks: Tensor) -> Tensor:
    """``blocks`` ``(N, C, s, L)`` := ``M @ blocks`` per channel (``M``: ``(C or 1, s, s)``), slice by slice."""
    for lo in range(0, blocks.shape[-1], _SLICE):
        piece = blocks[..., lo:lo + _SLICE]
        piece.copy_(torch.matmul(M, piece))
    return blocks


def _blocks_in_place(M: Tensor, coarse: Tensor, group: int) -> Tensor:
    """A coarse ``(N, C*s, *S)`` tensor (dense per sample) transformed in place: ``(N, C, s, L)`` blocks."""
    n, c = coarse.shape[0], coarse.shape[1] // group
    return _matmul_in_place(M, per_sample_view(coarse, (n, c, group, coarse[0, 0].numel())))


def _private(t: Tensor, memory: Tensor) -> Tensor:
    """``t``, copied if it shares memory with ``memory`` (a reshape may return a view)."""
    return t.clone() if t.untyped_storage().data_ptr() == memory.untyped_storage().data_ptr() else t


def _fine_in_place(blocks: Tensor, stride: tuple[int, ...], coarse: Sequence[int]) -> Tensor:
    """:func:`from_blocks` of ``blocks`` ``(N, C, s, L)`` (dense per sample), written over ``blocks``.

    Channel ``c`` of either layout holds the same elements of a sample, so the reordering
    goes a few channels at a time through a temporary.
    """
    n, c = blocks.shape[0], blocks.shape[1]
    fine = per_sample_view(blocks, (n, c, *(h * st for h, st in zip(coarse, stride))))
    for c0, c1 in _channel_chunks(c, blocks[0, 0].numel()):
        fine[:, c0:c1].copy_(_private(from_blocks(blocks[:, c0:c1], stride, coarse), blocks))
    return fine


def _blocks_of_fine_in_place(fine: Tensor, stride: tuple[int, ...]) -> Tensor:
    """:func:`to_blocks` of ``fine`` ``(N, C, *S)`` (dense per sample), written over ``fine``."""
    n, c = fine.shape[0], fine.shape[1]
    s = math.prod(stride)
    blocks = per_sample_view(fine, (n, c, s, fine[0, 0].numel() // s))
    for c0, c1 in _channel_chunks(c, fine[0, 0].numel()):
        blocks[:, c0:c1].copy_(_private(to_blocks(fine[:, c0:c1], stride), fine))
    return blocks


#: Elements of input read at a time by the slab-wise forward (:meth:`_InvertibleResampling.forward_parts`).
_SLAB_ELEMENTS = 1 << 18


def _usable(out: Tensor | None, shape: Sequence[int], dtype: torch.dtype) -> Tensor | None:
    """``out`` if it has exactly ``shape`` and ``dtype`` (a room given to write into), else None."""
    if out is None or tuple(out.shape) != tuple(shape) or out.dtype != dtype:
        return None
    return out


def _fine_groups(parts: list[Tensor], group: int) -> list[tuple[list[Tensor], int, int]]:
    """``parts`` gathered into runs that hold whole fine channels: ``(run, first fine channel, count)``.

    ``group``: channels per fine channel in ``parts`` (``s`` for coarse tensors, 1 for fine).
    """
    out, run, first, held = [], [], 0, 0
    for p in parts:
        run.append(p)
        held += p.shape[1]
        if held % group == 0:
            out.append((run, first, held // group))
            first += held // group
            run, held = [], 0
    if run:
        raise ValueError(f"channel parts hold {sum(p.shape[1] for p in parts)} channels, "
                         f"not a multiple of {group}")
    return out


def _write_from_blocks(blocks: Tensor, stride: tuple[int, ...], coarse: Sequence[int], dst: Tensor) -> None:
    """:func:`from_blocks` of ``blocks`` ``(N, c, s, L)`` written into ``dst`` ``(N, c, *fine)``.

    ``dst`` may be a channel or first-dim slice of a larger tensor (its dims are only split).
    """
    n, c, dim = blocks.shape[0], blocks.shape[1], len(stride)
    perm = [0, 1]
    for k in range(dim):
        perm += [2 + dim + k, 2 + k]
    dst_shape = [n, c]
    for h, st in zip(coarse, stride):
        dst_shape += [h, st]
    dst.view(*dst_shape).copy_(blocks.reshape(n, c, *stride, *coarse).permute(*perm))


def _from_blocks_joined(parts: list[Tensor], stride: tuple[int, ...], coarse: Sequence[int],
                        out: Tensor | None = None) -> Tensor:
    """:func:`from_blocks` of channel parts, written into one ``(N, C, *S)`` tensor (``out`` or a new one)."""
    if len(parts) == 1 and out is None:
        return from_blocks(parts[0], stride, coarse)
    n = parts[0].shape[0]
    fine = [h * st for h, st in zip(coarse, stride)]
    if out is None:
        out = parts[0].new_empty(n, sum(p.shape[1] for p in parts), *fine)
    c0 = 0
    for p in parts:
        _write_from_blocks(p, stride, coarse, out.narrow(1, c0, p.shape[1]))
        c0 += p.shape[1]
    return out


def from_blocks(blocks: Tensor, stride: tuple[int, ...], coarse: Sequence[int]) -> Tensor:
    """Inverse of :func:`to_blocks`: ``(N, C, s, L)`` -> ``(N, C, *S)``."""
    n, c = blocks.shape[0], blocks.shape[1]
    dim = len(stride)
    v = blocks.reshape(n, c, *stride, *coarse)
    # (N, C, s0, s1, ..., h0, h1, ...) -> (N, C, h0, s0, h1, s1, ...)
    perm = [0, 1]
    for k in range(dim):
        perm += [2 + dim + k, 2 + k]
    fine = [h * st for h, st in zip(coarse, stride)]
    return v.permute(*perm).reshape(n, c, *fine)


class InvertibleDownsampling(_InvertibleResampling):
    """Learnable orthogonal downsampling ``(N, C, *S) -> (N, C*s, *S/stride)``.

    Args:
        in_channels: ``C``, the number of (fine) input channels.
        stride: int or tuple of ``dim`` ints >= 1 (anisotropic strides allowed).
        dim: number of spatial dims, 1, 2 or 3.
        method: orthogonal parametrisation, one of ``'exp'``, ``'cayley'``, ``'householder'``.
        init: ``'haar'`` (Haar for stride 2, its DCT-II generalisation for
            larger strides, see :func:`haar_matrix`), ``'pixel_shuffle'`` (alias
            ``'squeeze'``: identity, i.e. pixel unshuffle), ``'random'`` (random
            special orthogonal per channel), or a user-given orthogonal matrix
            (``torch.Tensor`` or ``numpy.ndarray``) of shape ``(s, s)`` or
            ``(C, s, s)`` whose row ``r`` is the filter of output channel
            ``c * s + r`` over the row-major block offsets (as :func:`haar_matrix`).
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

    input_is_fine = True


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

    input_is_fine = False
