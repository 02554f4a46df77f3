"""The step contract: what the engine needs from a step, and from the modules inside steps.

The engine (:mod:`iunet_nb.engine.fused`) runs a chain of :class:`Step` s on a
:class:`~iunet_nb.engine.parts.State` of channel parts.  The forward pass
keeps nothing but the chain's output; the backward pass walks the steps in
reverse and asks each one to rebuild its input from its output *and* to turn
the gradient of its output into the gradient of its input.

Two module interfaces let the engine type against what a module inside a
step declares, instead of probing it:

* :class:`OrthogonalKernelModule` -- an orthogonal linear map given by a
  kernel (channel mixing, invertible down-/upsampling), run by ``KernelStep``;
* :class:`DeclaredCouplingFunction` -- a coupling function ``f`` that says
  whether it is one conv -> LeakyReLU -> GroupNorm block
  (:class:`ConvLeakyReLUGroupNorm`), whose recompute-and-backward the engine
  computes with its own fused kernel (:mod:`iunet_nb.engine.coupling_backward`).

Tensor ownership (the code cites these notes by number)
--------------------------------------------------------
1. **The caller's tensors are read-only.**  The chain's input ``x``, the output
   ``y`` saved for the backward and the incoming gradient ``dy`` enter a state
   as parts with ``owned=False``.  Nothing writes into them or frees them, and
   the chain's output is never the caller's input (a non-owned output is copied).
   The exceptions are an incoming gradient or an output no one else can reach
   (notes 10 and 12) and the opt-in consuming mode of note 9.
2. **Owned parts.**  A part with ``owned=True`` was allocated during this
   forward or backward pass and nothing outside the state refers to it: the
   step that receives it MAY overwrite it in place or drop it (freeing it).
3. **Copy before writing.**  A step that must write into a part that is not
   owned works on a copy (``owned_copy``, or the new tensor ``full`` makes of
   several parts).
4. **Parts do not overlap.**  The parts of a state and of its gradient state
   cover disjoint elements.  Views made by ``narrow`` keep the owned flag of the
   part they come from, so an in-place write to one part never changes another.
5. **Autograd inside a step.**  A tensor handed to autograd during a
   recomputation whose memory is written in place later (the coupling's ``v``,
   whose buffer may also hold ``u``) is given as a ``storage_alias``: autograd's
   version check then sees only the writes to that alias.
6. **Skip parts are compacted.**  A part pushed on the skip stack in the backward
   is copied if it is a view into a larger buffer (``compact``), so the rest of
   that buffer can be freed while the coarser levels run.
7. **Steps take over the lists.**  ``Step.backward`` receives ``state.cur`` and
   ``grad_state.cur`` and replaces them: it MAY empty them early to free their
   buffers, and MUST leave the rebuilt input in ``state.cur`` and its gradient
   in ``grad_state.cur`` (as parts of any split).
8. **Records live with the graph.**  What a step stores in its ``record`` during
   the forward (RNG states) is kept until autograd frees the graph, so a second
   backward (``retain_graph=True``) replays the same forward.
9. **The consuming mode** (``consume_output=True``, opt-in).  The backward takes
   over the memory of the output ``y`` and of the incoming gradient ``dy``: they
   enter the states as owned parts, so the first steps rebuild the activations
   and their gradients in that memory instead of allocating, and each buffer is
   listed in ``State.consumed``, freed (``release_unreferenced``) as soon as no
   part refers to it -- a concatenation's backward copies the rest out of it so
   that it can go at once (``move_out_of_consumed``).  ``y`` is taken only if no
   tensor outside the engine but the output itself (and the views its caller
   registered) shares its memory, ``dy`` only if nothing else refers to it; the
   output is then switched to a class on which every use raises, and a second
   backward raises (:mod:`iunet_nb.engine.fused` has the rules).
10. **An unreachable incoming gradient is the engine's.**  In both modes, ``dy``
   enters the gradient state as an owned part (and is listed in
   ``State.consumed``) when it is dense, the whole of its memory, in the
   output's dtype, and nothing but autograd's call to the backward refers to
   it (no caller's tensor, no hook of the output, no other node's input): no
   one can read it after the backward, so rebuilding the gradients in its
   memory changes nothing anyone can see, and saves one input-sized tensor.
11. **The room a split leaves is reused.**  A split keeps the first channels of a
   buffer on the skip stack and sends the others on; once the next step has
   turned those into a new tensor, their channels in the buffer are free.  If the
   buffer is owned and no other part lives in it, a kernel step may write its
   output there (``room_after``), and the matching concatenation puts the
   current channels there instead of concatenating (``reunite``), so a level's
   buffer is never held half dead and its output needs no final copy.  A skip
   part is compacted (note 6) only when the skip holds at most half of its
   buffer; otherwise the copy would cost more than the memory it frees.  A kernel
   step's input that is such a slice (``held_region``) is free once the step's
   output exists, and the output moves there (``relocate``); in the backward the
   rebuilt input moves there as soon as it is complete (``place_x``), before
   anything of its gradient is allocated, so the two are never new at once.
12. **An unreachable output is the engine's.**  By default too, ``y`` enters the
   state as an owned part (listed in ``State.consumed``) when it is dense and the
   whole of its memory, the graph is not kept (``retain_graph`` is False: this
   backward runs once), and nothing but the engine holds that memory: the
   returned output and the views registered for it are gone, and no other node
   saved it (a node that ran before this one has freed what it saved; one that
   is not run keeps it, and the output stays the caller's).  This is the case
   when the body is followed by a layer (a convolution, a head) and the caller
   keeps only that layer's output.  No one can read ``y`` after the backward, so
   nothing changes that anyone can see, and one input-sized tensor is saved.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Sequence

from torch import Tensor

from iunet_nb.engine.parts import State
from iunet_nb.nn.interfaces import ConvLeakyReLUGroupNorm, DeclaredCouplingFunction, OrthogonalKernelModule

__all__ = [
    "Step", "OrthogonalKernelModule", "DeclaredCouplingFunction", "ConvLeakyReLUGroupNorm",
]


class Step(ABC):
    """One invertible step of a chain run by the engine.

    Implementers MUST define :meth:`forward` and :meth:`backward`; they CAN
    override :meth:`tensors` (no gradient-receiving tensors by default).
    """

    def tensors(self) -> list[Tensor]:
        """The tensors the step's gradients are taken for (e.g. its module's parameters).

        The engine passes exactly these, in this order, to :meth:`forward` and
        :meth:`backward`, and hands back one gradient per tensor.
        """
        return []

    @abstractmethod
    def forward(self, state: State, tensors: Sequence[Tensor], record: dict[str, Any]) -> None:
        """Replace ``state`` (this step's input) by this step's output, without a graph.

        ``record``: a dict the step MAY fill with what its backward needs to
        replay the forward exactly (RNG states; ownership note 8).
        """

    @abstractmethod
    def backward(self, state: State, grad_state: State, tensors: Sequence[Tensor],
                 record: dict[str, Any]) -> list[Tensor | None]:
        """Rebuild the input from the output and its gradient from the output's gradient.

        On entry ``state`` holds this step's output and ``grad_state`` the
        gradient of the loss with respect to it; on return they hold the step's
        input and the gradient with respect to that input (ownership note 7).

        Returns:
            one gradient per entry of ``tensors`` (``None`` where
            ``requires_grad`` is False or the tensor was not used).
        """
