"""What a layer declares to the engine: the interfaces the engine types against.

The memory-efficient engine (:mod:`iunet_nb.engine`) runs the layers of this
sub-package without probing them: a layer says what it is by implementing one of
these interfaces.

* :class:`OrthogonalKernelModule` -- an orthogonal linear map given by a kernel
  (channel mixing, invertible down-/upsampling), computed on channel parts;
* :class:`DeclaredCouplingFunction` -- a coupling function ``f`` that says whether
  it is exactly one conv -> LeakyReLU -> GroupNorm block
  (:class:`ConvLeakyReLUGroupNorm`), which the engine then computes with its own
  fused kernel.

They live here, below the engine, so that layers depend on nothing above them
(the engine imports them; nothing here imports the engine).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable

from torch import Tensor

__all__ = ["OrthogonalKernelModule", "DeclaredCouplingFunction", "ConvLeakyReLUGroupNorm"]


class OrthogonalKernelModule(ABC):
    """A module ``y = K x`` with an orthogonal kernel ``K``, run on channel parts.

    Because ``K`` is orthogonal, the input is ``x = K^T y`` and its gradient is
    ``dL/dx = K^T dL/dy``; only the kernel's gradient needs both ``x`` and
    ``dL/dy``.  Implementers MUST define all three methods.
    """

    @abstractmethod
    def kernel(self) -> Tensor:
        """The kernel, differentiable with respect to the module's parameters."""

    @abstractmethod
    def forward_parts(self, parts: list[Tensor], kernel: Tensor, owned: list[bool],
                      out: Tensor | None = None, in_place: bool = False) -> list[Tensor]:
        """``y = K cat(parts, dim=1)`` as a list of channel parts.

        Parts whose ``owned`` flag is True MAY be overwritten (ownership note 2).
        ``out``: free memory (ownership note 11) the module MAY write ``y`` into when
        ``y`` has exactly its shape and dtype; the returned parts say where ``y`` is.
        ``in_place``: the input's memory stays allocated whatever the module does (it is
        all of its buffers, or a slice the skip stack holds), so the module MAY put ``y``
        there even where ``y`` is laid out differently; without it, a module SHOULD NOT
        leave ``y`` in a slice of a larger buffer, which would keep the rest alive.
        """

    @abstractmethod
    def backward_parts(self, y_parts: list[Tensor], dy_parts: list[Tensor], kernel: Tensor,
                       need_kernel_grad: bool, y_owned: list[bool], dy_owned: list[bool],
                       allow_split: bool, x_out: Tensor | None = None,
                       dx_out: Tensor | None = None,
                       place_x: Callable[[list[Tensor]], list[Tensor]] | None = None,
                       x_in_place: bool = False, dx_in_place: bool = False,
                       ) -> tuple[list[Tensor], list[Tensor], Tensor | None]:
        """From the output ``y`` and ``dL/dy`` (channel parts), return ``(x, dL/dx, dL/dK)``.

        ``x`` and ``dL/dx`` are returned as channel parts; owned input parts MAY
        be overwritten, and the lists ``y_parts``/``dy_parts`` MAY be emptied to
        free their buffers early (ownership note 7).  ``allow_split``: the module
        MAY return ``x`` and ``dL/dx`` in more parts than it otherwise would, when
        that lowers its peak memory.  ``dL/dK`` is None unless ``need_kernel_grad``.
        ``x_out``, ``dx_out``: free memory (ownership note 11) the module MAY write ``x``
        and ``dL/dx`` into when they have exactly its shape and dtype.
        ``place_x``: the module SHOULD call it with ``x``'s parts as soon as they are
        complete and before it allocates anything for ``dL/dx``, and use the parts it
        returns (the same values, possibly moved into memory ``y`` left: note 11).
        ``x_in_place``, ``dx_in_place``: as ``in_place`` of :meth:`forward_parts`, for
        ``y``'s memory and ``dL/dy``'s.
        """


@dataclass(frozen=True)
class ConvLeakyReLUGroupNorm:
    """The block ``f(v) = GroupNorm(1, c)(LeakyReLU(conv3(v, conv_weight)))``.

    ``conv3``: a 3^dim convolution with padding 1, stride 1 and no bias;
    ``conv_weight``: ``(c, c_in, 3, ..., 3)``; ``norm_weight``, ``norm_bias``:
    ``(c,)``, the GroupNorm's affine parameters.
    """

    conv_weight: Tensor
    negative_slope: float
    norm_weight: Tensor
    norm_bias: Tensor
    eps: float

    def tensors(self) -> list[Tensor]:
        """The gradient-receiving tensors, in the order the fused backward returns their gradients."""
        return [self.conv_weight, self.norm_weight, self.norm_bias]


class DeclaredCouplingFunction(ABC):
    """A coupling function ``f`` that tells the engine what it is.

    Implementers MUST define :meth:`fused_block`; they CAN set
    :attr:`output_not_needed_for_backward`.
    """

    #: True if ``f``'s last layer's backward does not read ``f``'s output
    #: (GroupNorm): the engine may then free ``f(v)`` before back-propagating.
    output_not_needed_for_backward: bool = False

    @abstractmethod
    def fused_block(self) -> ConvLeakyReLUGroupNorm | None:
        """``f`` as one conv -> LeakyReLU -> GroupNorm block, or None if it is not one.

        For such a block the engine recomputes ``f`` and back-propagates through
        it with its own fused kernel; otherwise with autograd.
        """
