"""iunet_nb.engine -- memory-efficient backpropagation through invertible steps."""

from iunet_nb.engine.fused import (  # noqa: F401
    DOUBLE_BACKWARD_MESSAGE,
    ConcatStep,
    CouplingStep,
    FusedInvertibleFunction,
    InvertibleModuleStep,
    KernelStep,
    SplitStep,
    Step,
    apply_fused,
    run_forward,
    storage_alias,
)
