"""iunet_nb.engine -- memory-efficient backpropagation through invertible steps.

Files: :mod:`~iunet_nb.engine.contract` (the step contract and the numbered
tensor-ownership notes), :mod:`~iunet_nb.engine.parts` (activations as channel
parts), :mod:`~iunet_nb.engine.steps` (one step class per kind of operation),
:mod:`~iunet_nb.engine.coupling_backward` (the fused recompute-and-backward of
the standard coupling), :mod:`~iunet_nb.nn.tiled` (slab-wise convolutions),
:mod:`~iunet_nb.engine.fused` (the autograd function over a chain of steps),
:mod:`~iunet_nb.engine.checks` (the step conformance checker),
:mod:`~iunet_nb.engine.memcnn` (the memcnn backend: memcnn's wrappers walked along the plan) and
:mod:`~iunet_nb.engine.optim_in_backward` (optimizer steps inside the backward).

Writing a step (a subclass of :class:`Step`)
--------------------------------------------
An implementer MUST

* define ``forward(state, tensors, record)``: replace ``state.cur`` (and the
  skip stack, for splits and concatenations) by the step's output, without
  recording a graph;
* define ``backward(state, grad_state, tensors, record)``: from the output and
  its gradient, rebuild the input in ``state`` and its gradient in
  ``grad_state``, and return one gradient (or None) per entry of ``tensors``;
* follow the ownership notes of :mod:`iunet_nb.engine.contract`: never write
  into a part that is not owned (the caller's input never is; its output and
  incoming gradient only in the opt-in consuming mode, note 9).

An implementer CAN

* override ``tensors()`` to receive gradients for parameters (none by default);
* overwrite or drop owned parts, and empty the lists it is handed, to save memory;
* store RNG states in ``record`` during the forward and replay them in the backward;
* return its results in any split into channel parts.

:func:`~iunet_nb.engine.checks.check_step` runs a step forward and backward in
float64 and compares it with autograd.
"""

from iunet_nb.engine.checks import check_step  # noqa: F401
from iunet_nb.engine.contract import (  # noqa: F401
    ConvLeakyReLUGroupNorm,
    DeclaredCouplingFunction,
    OrthogonalKernelModule,
    Step,
)
from iunet_nb.engine.fused import (  # noqa: F401
    CONSUMED_MESSAGE,
    DOUBLE_BACKWARD_MESSAGE,
    EARLY_GRADIENTS,
    ConsumedTensor,
    FusedInvertibleFunction,
    add_output_view,
    apply_fused,
    run_forward,
)
from iunet_nb.engine.parts import Part, State, storage_alias  # noqa: F401
from iunet_nb.engine.steps import (  # noqa: F401
    ConcatStep,
    CouplingStep,
    InvertibleModuleStep,
    KernelStep,
    RecomputeContext,
    RecordedStep,
    SplitStep,
)
from iunet_nb.engine.compile import compile_steps  # noqa: F401
