"""Predict the memory of one training step without running it.

``predict_step_memory(model_or_layout, input_shape, dtype, mode)`` returns a
:class:`MemoryPrediction` with the same decomposition as the meter
:func:`iunet_nb.measure.meter.measure_step`:

* ``parameters`` -- bytes of the weights (resident before the step);
* ``gradients``  -- bytes of the weight gradients (one per parameter);
* ``activations`` -- what the meter calls ``peak - gradients``: everything
  else that is alive when the step's allocator total peaks;
* ``peak_step = gradients + activations`` (the meter's ``peak_bytes``);
* ``total = parameters + input + peak_step`` (the meter's ``total_bytes``).

Nothing is allocated: the prediction works on a :class:`iunet_nb.arch.layout.Layout`
(an :class:`iunet_nb.iUNet` is reduced to its layout) with plain integer
arithmetic, so the notebook widgets can call it for configurations that would
not fit in memory.

How it works (first principles, a few calibrated constants)
-----------------------------------------------------------
The body of the network is the model's plan (:mod:`iunet_nb.engine.plan`):
its couplings, channel mixings and down/upsamplings (splits and concats only
slice); for the U-Net baseline the same plan read as residual blocks, strided
and transposed convolutions and 1x1 fusions.
Let ``t_i`` be the bytes of one full activation at level ``i`` (``c_i`` channels
at that level's resolution; with channels doubling and 2x2 strides
``t_i = T / 2**i`` with ``T`` the bytes of the input tensor).  The backward
pass is then *simulated* step by step in reverse order: the gradients of the
steps already back-propagated accumulate, the tensors each step saved for the
backward are released after it, and the live total at each step is

conventional / U-Net (plain autograd)
    ``grads_so_far + saved_still_alive + output + dY + tau * t_step + kappa * W_step``

    where the saved tensors are counted per layer type exactly as autograd
    keeps them: a coupling ``(u, v) -> (v, u + f(v))`` keeps its input storage
    (``t``; the convolution saves a view of it) plus, per block of ``f``, the
    convolution output and the LeakyReLU output (GroupNorm saves its input);
    a residual block of the U-Net keeps its input, the convolution and the
    LeakyReLU output (3 ``t``); a strided/transposed convolution keeps its
    input; the 1x1 fusion keeps the concatenation (2 ``t``).  With
    per-level checkpointing only each level's input is kept, and the level is
    recomputed (its saved tensors come back) when the backward reaches it.

memory-efficient engines (fused, memcnn)
    ``grads_so_far + rho * T + skips(level) + gamma * t_step + kappa * W_step``

    ``skips(level)``: the skip activations of the finer levels and their
    gradients (exact sizes); ``rho * T``: full-resolution tensors held for the
    whole backward (the body's output, which the engine must leave intact, and
    for memcnn its incoming gradient; the fused engine reuses a gradient no one
    else can reach); ``gamma * t_step``: the working set of one step
    (current activation, its gradient, the recomputed coupling output,
    temporaries), in units of the step's level tensor.

``W_step`` is the largest convolution weight of the step: oneDNN allocates
weight-sized temporaries (reordered weights, weight-gradient buffers) inside
convolutions, which dominate at small inputs, where the peak is reached at
the coarse levels with the big weights.  The peak is the maximum over the
simulated steps.

For the iUNet's couplings the number of ``f``-output-sized tensors saved per
block is the constant ``sigma`` (2 with plain ``nn`` layers: convolution and
LeakyReLU outputs; fewer when the coupling function saves less itself).

The constants ``tau``, ``kappa``, ``sigma`` (plain autograd) and ``rho``, ``gamma``,
``kappa`` (each memory-efficient engine) are fitted to the meter by
``benchmarks/calibrate_predictor.py`` (on the Table 1 grid, see there); they
live in :data:`CONSTANTS` below, which that script rewrites with ``--write``.
The engine constants must be re-calibrated whenever the engines change.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

from iunet_nb.arch.layout import Layout, compute_layout
from iunet_nb.engine.plan import (
    CONCAT, COUPLING, DECODER, DOWNSAMPLE, ENCODER, MIXING, UPSAMPLE, Op, Plan, build_plan,
    check_channel_mixing_freq, coupling_halves,
)
from iunet_nb.common import GiB, format_bytes

__all__ = [
    "MODES",
    "CONSTANTS",
    "MemoryPrediction",
    "predict_step_memory",
    "max_batch_size",
    "layout_of",
    "dtype_size",
]

MODES = ("conventional", "fused", "memcnn", "unet", "unet_checkpoint")

# --- calibrated constants (rewritten by benchmarks/calibrate_predictor.py --write) ---
# BEGIN CONSTANTS
CONSTANTS: dict[str, dict[str, float]] = {
    "conventional": {"tau": 5.5, "kappa": 2.25, "sigma": 1},
    "fused": {"rho": 1.25, "gamma": 2, "kappa": 2.25},
    "memcnn": {"rho": 2.5, "gamma": 6, "kappa": 2.25},
    "unet": {"tau": 6, "kappa": 1.75, "sigma": 0},
    "unet_checkpoint": {"tau": 2, "kappa": 0, "sigma": 0},
}
CALIBRATION = 'fitted 2026-11-29 by benchmarks/calibrate_predictor.py on sizes [64, 128, 256, 512], deltas [5, 20]; worst |error| fused 2.3%'
# END CONSTANTS

_DTYPE_SIZES = {
    "float32": 4, "float": 4, "float64": 8, "double": 8, "float16": 2, "half": 2,
    "bfloat16": 2,
}


def dtype_size(dtype: Any) -> int:
    """Bytes per element of ``dtype`` ('float32', torch.float16, ...)."""
    name = str(dtype).replace("torch.", "")
    if name not in _DTYPE_SIZES:
        raise ValueError(
            f"dtype={dtype!r} is not a floating-point type the predictor knows; use one of "
            f"{sorted(set(_DTYPE_SIZES))}"
        )
    return _DTYPE_SIZES[name]


def _is_int(v: Any) -> bool:
    """An integer (Python, NumPy), not a bool or a float."""
    return not isinstance(v, bool) and hasattr(type(v), "__index__")


def _check_shape(input_shape: Any, dim: int) -> list[int]:
    """``input_shape`` as a list of ints, or a ``ValueError`` naming it."""
    try:
        shape = list(input_shape)
    except TypeError:
        raise ValueError(
            f"input_shape must be a sequence (N, C, *spatial), got {input_shape!r}"
        ) from None
    if len(shape) != dim + 2:
        raise ValueError(
            f"input_shape must be (N, C, *spatial) with {dim} spatial dimensions, "
            f"got {tuple(shape)}"
        )
    if not all(_is_int(v) for v in shape):
        raise ValueError(f"input_shape must hold integers, got {tuple(shape)}")
    shape = [int(v) for v in shape]
    if shape[0] < 0:
        raise ValueError(f"input_shape: batch size N must be >= 0, got {shape[0]}")
    if min(shape[1:]) < 1:
        raise ValueError(
            f"input_shape: channels and spatial sizes must be >= 1, got {tuple(shape)}"
        )
    return shape


def _check_options(depth: Any, channel_mixing_freq: Any) -> None:
    if not _is_int(depth) or int(depth) < 1:
        raise ValueError(f"depth must be an integer >= 1, got {depth!r}")
    check_channel_mixing_freq(channel_mixing_freq)


def _fmt_bytes(n: float) -> str:
    return format_bytes(n, gib_digits=3)


@dataclass
class MemoryPrediction:
    """Predicted memory of one training step (all fields in bytes except ``mode``).

    ``peak_step = gradients + activations``; ``total = parameters + input +
    peak_step`` (same definitions as :class:`iunet_nb.measure.meter.StepMeasurement`).
    ``details`` holds the per-level tensor sizes, the constants used and the
    step at which the peak is reached.
    """

    mode: str
    parameters: int
    gradients: int
    activations: int
    input: int
    tensor: int
    details: dict = field(default_factory=dict, repr=False)

    @property
    def peak_step(self) -> int:
        return self.gradients + self.activations

    @property
    def total(self) -> int:
        return self.parameters + self.input + self.peak_step

    @property
    def bytes(self) -> int:
        """Same as :attr:`total`."""
        return self.total

    @property
    def total_gib(self) -> float:
        return self.total / GiB

    @property
    def overhead_tensors(self) -> float:
        """Activations in units of one full-resolution input tensor."""
        return self.activations / self.tensor if self.tensor else float("nan")

    def __str__(self) -> str:
        return (
            f"{self.mode}: total {_fmt_bytes(self.total)} = parameters {_fmt_bytes(self.parameters)}"
            f" + input {_fmt_bytes(self.input)} + step peak {_fmt_bytes(self.peak_step)}"
            f" (gradients {_fmt_bytes(self.gradients)} + activations {_fmt_bytes(self.activations)}"
            f" = {self.overhead_tensors:.1f} input tensors)"
        )


# ---------------------------------------------------------------------------- layout
def layout_of(model_or_layout: Any) -> tuple[Layout, dict]:
    """The layout of an iUNet (or the layout itself) and the model options it implies.

    For an :class:`iunet_nb.iUNet` the options are its ``plan``, ``depth``,
    ``learnable_resampling``, ``learnable_channel_mixing`` and ``param_bytes``.
    """
    if isinstance(model_or_layout, Layout):
        return model_or_layout, {}
    plan = getattr(model_or_layout, "plan", None)
    if isinstance(plan, Plan):
        m = model_or_layout
        depth = m.module_kwargs.get("depth", m.module_kwargs.get("block_depth", 1))
        opts = dict(plan=plan, depth=depth or 1, learnable_resampling=m.learnable_resampling,
                    learnable_channel_mixing=m.learnable_channel_mixing,
                    param_bytes=sum(p.numel() * p.element_size() for p in m.parameters()))
        return plan.layout, opts
    channels = getattr(model_or_layout, "channels", None)
    arch = getattr(model_or_layout, "architecture", None)
    if channels is not None and arch is not None:  # e.g. iunet_nb.arch.baselines.UNet
        return compute_layout(list(channels), list(arch), getattr(model_or_layout, "dim", 2)), {}
    raise TypeError(
        f"model_or_layout must be an iunet_nb.iUNet or an iunet_nb.arch.layout.Layout, got "
        f"{type(model_or_layout).__name__}"
    )


@dataclass
class _Op:
    """One step of the body for the simulation (sizes in bytes)."""

    name: str
    level: int
    t: int                 # bytes of a full activation at this level
    params: int            # parameter bytes (= gradient bytes)
    weight: int            # largest convolution weight (for the oneDNN temporaries)
    saved: int = 0         # plain autograd: bytes released after this op's backward
    group: int = -1        # checkpoint segment id (-1: none)
    saved_var: int = 0     # plain autograd: further saved bytes per unit of the constant sigma
    out: int = 0           # bytes of the op's output


def _level_tensors(layout: Layout, spatial: Sequence[int], n: int, esize: int) -> list[int]:
    elems = n
    for s in spatial:
        elems *= s
    out = []
    for i, lv in enumerate(layout.levels):
        out.append(lv.channels * elems * esize)
        if i < layout.num_levels - 1:
            elems //= lv.multiplier
    return out


def _coupling_op(op: Op, dim: int, depth: int, t: int, params: int, esize: int) -> _Op:
    """A standard coupling: it saves its input storage (``t``) and the GroupNorm outputs fed
    to deeper convolutions, plus ``sigma`` f-output-sized tensors per block (plain ``nn``
    layers: convolution and LeakyReLU output, sigma = 2)."""
    a, b = coupling_halves(op.channels, op.chain_index)
    k = 3**dim
    weight = max(k * b * a, k * a * a if depth > 1 else 0) * esize
    saved = 1.0 + (depth - 1) * a / op.channels
    per_sigma = depth * a / op.channels
    return _Op(op.name, op.level, t, params, weight, saved=int(saved * t), out=t,
               saved_var=int(per_sigma * t))


def _iunet_ops(plan: Plan, t: list[int], esize: int, depth: int, learnable_resampling: bool,
               learnable_channel_mixing: bool = True) -> list[_Op]:
    """The plan's operations that compute (splits and concats only slice), ``t[i]`` the bytes of
    a full activation at level ``i``."""
    ops: list[_Op] = []
    for op in plan.ops:
        i = op.level
        params = plan.op_parameters(op, depth, learnable_resampling, learnable_channel_mixing) * esize
        c = plan.layout.levels[i].channels
        if op.kind == COUPLING:
            ops.append(_coupling_op(op, plan.dim, depth, t[i], params, esize))
        elif op.kind == MIXING:
            ops.append(_Op(op.name, i, t[i], params, 0, saved=t[i], out=t[i]))
        elif op.kind == DOWNSAMPLE:
            # the downsampling convolution saves a contiguous copy of the sent channels
            ops.append(_Op(op.name, i, t[i], params, 0, saved=t[i] * op.sent // c, out=t[i + 1]))
        elif op.kind == UPSAMPLE:
            # upsampling keeps its input (the coarse level's output); the concat keeps nothing
            ops.append(_Op(op.name, i, t[i], params, 0, saved=t[i + 1], out=t[i] * op.sent // c))
    return ops


def _unet_ops(plan: Plan, t: list[int], esize: int, checkpoint: bool) -> list[_Op]:
    """Ops of :class:`iunet_nb.arch.baselines.UNet` with the plan's channels and blocks.

    The plan read as a U-Net: each coupling is a residual block (the bottom level
    has one sequence, so its decoder couplings have no counterpart), a downsampling
    a strided convolution, an upsampling a transposed convolution and a concat the
    1x1 fusion; with ``checkpoint`` each side of each level is one segment.
    """
    k = 3**plan.dim
    ch = plan.layout.channels
    last = plan.num_levels - 1
    ops: list[_Op] = []
    for op in plan.ops:
        i = op.level
        if op.kind == COUPLING and not (op.side == DECODER and i == last):
            side = "D" if op.side == ENCODER else "U"
            group = (i if op.side == ENCODER else plan.num_levels + i) if checkpoint else -1
            w = k * ch[i] * ch[i] * esize
            # input + conv output + LeakyReLU output
            ops.append(_Op(f"{side}{i}.block{op.index}", i, t[i], w + 2 * ch[i] * esize, w,
                           saved=3 * t[i], group=group, out=t[i]))
        elif op.kind == DOWNSAMPLE:
            w = ch[i] * ch[i + 1] * op.multiplier * esize
            # the strided convolution keeps its input (the skip, also used by the concatenation)
            ops.append(_Op(f"D{i}.down", i, t[i], w, w, saved=t[i], out=t[i + 1]))
        elif op.kind == UPSAMPLE:
            w = ch[i] * ch[i + 1] * op.multiplier * esize
            ops.append(_Op(f"U{i}.up", i, t[i], w, w, saved=t[i + 1], out=t[i]))
        elif op.kind == CONCAT:
            wf = 2 * ch[i] * ch[i] * esize
            ops.append(_Op(f"U{i}.fuse", i, t[i], wf, wf, saved=2 * t[i], out=t[i]))
    return ops


def _body_ops(mode: str, layout: Layout, opts: dict, t: list[int], esize: int, depth: int,
              learnable_resampling: bool, channel_mixing_freq: int) -> list[_Op]:
    """The simulated ops of ``mode``: the model's own plan when a model was given."""
    plan = opts["plan"] if "plan" in opts else build_plan(layout, channel_mixing_freq)
    if mode in ("unet", "unet_checkpoint"):
        return _unet_ops(plan, t, esize, checkpoint=mode == "unet_checkpoint")
    return _iunet_ops(plan, t, esize, opts.get("depth", depth),
                      opts.get("learnable_resampling", learnable_resampling),
                      opts.get("learnable_channel_mixing", True))


def _features_autograd(ops: list[_Op], T: int, checkpoint: bool,
                       extra_saved: int = 0) -> tuple[list[float], list[tuple[float, ...]], list[str]]:
    """Reverse walk of plain autograd: per op ``live = base + tau*t + kappa*W + sigma*V``.

    Returns ``(base, coefficients (t, W, V), names)``; ``base`` counts the gradients
    so far, the saved tensors still alive, the output ``y`` and the incoming gradient;
    ``V`` the coupling-internal saved tensors still alive (per unit of sigma).
    """
    groups: dict[int, list[_Op]] = {}
    for op in ops:
        if op.group >= 0:
            groups.setdefault(op.group, []).append(op)
    if checkpoint:
        # each checkpointed segment keeps only its input storage during the forward
        saved_alive = sum(g[0].t for g in groups.values()) + sum(op.saved for op in ops if op.group < 0)
    else:
        saved_alive = sum(op.saved for op in ops)
    var_alive = sum(op.saved_var for op in ops if not checkpoint or op.group < 0)
    # the first op's input is the caller's tensor (not part of the step) unless padding copied it
    saved_alive += extra_saved - T
    grads = 0
    out = T  # the model output y is held by the caller during the backward
    dy = T
    base, coef, names = [], [], []
    for op in reversed(ops):
        members = groups.get(op.group, []) if checkpoint else []
        if members and op is members[-1]:
            # the backward reaches the segment: it is recomputed with its saved tensors and output
            saved_alive += sum(o.saved for o in members) - members[0].t
            var_alive += sum(o.saved_var for o in members)
        grads += op.params
        base.append(grads + saved_alive + out + dy)
        coef.append((op.t, op.weight, var_alive))
        names.append(op.name)
        saved_alive -= op.saved
        var_alive -= op.saved_var
        dy = op.t
    return base, coef, names


def _features_me(ops: list[_Op], layout: Layout, t: list[int], T: int
                 ) -> tuple[list[float], list[tuple[float, ...]], list[str]]:
    """Reverse walk of a memory-efficient engine: ``live = base + rho*T + gamma*t + kappa*W``."""
    skips = [0] * layout.num_levels
    for j, lv in enumerate(layout.levels[:-1]):
        skips[j + 1] = skips[j] + 2 * t[j] * lv.kept // lv.channels  # activation + gradient
    grads = 0
    base, coef, names = [], [], []
    for op in reversed(ops):
        grads += op.params
        base.append(grads + skips[op.level])
        coef.append((T, op.t, op.weight))
        names.append(op.name)
    return base, coef, names


#: names of the constants per kind of model, in the order of the feature coefficients
CONSTANT_NAMES = {"autograd": ("tau", "kappa", "sigma"), "me": ("rho", "gamma", "kappa")}


def _kind(mode: str) -> str:
    return "me" if mode in ("fused", "memcnn") else "autograd"


def _peak(base: list[float], coef: list[tuple[float, ...]], names: list[str],
          consts: Sequence[float]) -> tuple[float, str]:
    best, where = -math.inf, "start"
    for b, c, n in zip(base, coef, names):
        v = b + sum(ci * ki for ci, ki in zip(c, consts))
        if v > best:
            best, where = v, n
    return best, where


def _features(mode: str, layout: Layout, ops: list[_Op], t: list[int], T: int, padded: bool):
    if _kind(mode) == "me":
        return _features_me(ops, layout, t, T)
    return _features_autograd(ops, T, checkpoint=mode == "unet_checkpoint",
                              extra_saved=T if (padded and mode == "conventional") else 0)


def prediction_features(model_or_layout: Any, input_shape: Sequence[int], dtype: Any = "float32",
                        mode: str = "fused", *, depth: int = 1, learnable_resampling: bool = True,
                        channel_mixing_freq: int = -1) -> dict:
    """The linear-max form of the prediction, for calibration.

    ``activations = max_k(base[k] + sum_j coef[k][j] * constant[j]) - parameter_bytes`` with the
    constants named ``CONSTANT_NAMES[kind]``.  Returns ``dict(base, coef, names, params, kind,
    input, tensor)``.
    """
    layout, opts = layout_of(model_or_layout)
    shape = [int(v) for v in input_shape]
    esize = dtype_size(dtype)
    spatial = _padded_spatial(layout, shape[2:])
    t = _level_tensors(layout, spatial, shape[0], esize)
    input_bytes = shape[0] * shape[1] * math.prod(shape[2:]) * esize
    ops = _body_ops(mode, layout, opts, t, esize, depth, learnable_resampling, channel_mixing_freq)
    base, coef, names = _features(mode, layout, ops, t, t[0], t[0] != input_bytes)
    return dict(base=base, coef=coef, names=names, params=sum(op.params for op in ops),
                kind=_kind(mode), input=input_bytes, tensor=t[0])


def _padded_spatial(layout: Layout, spatial: Sequence[int]) -> list[int]:
    factors = layout.downsampling_factors
    if len(spatial) != layout.dim:
        raise ValueError(
            f"input_shape must be (N, C, *spatial) with {layout.dim} spatial dimensions, got "
            f"{len(spatial)} spatial sizes"
        )
    return [-(-int(s) // f) * f for s, f in zip(spatial, factors)]


def predict_step_memory(
    model_or_layout: Any,
    input_shape: Sequence[int],
    dtype: Any = "float32",
    mode: str = "fused",
    *,
    depth: int = 1,
    learnable_resampling: bool = True,
    channel_mixing_freq: int = -1,
    constants: dict | None = None,
) -> MemoryPrediction:
    """Predict parameters, gradients, activations and totals of one training step.

    Args:
        model_or_layout: an :class:`iunet_nb.iUNet` (its plan and options override
            ``depth``/``learnable_resampling``/``channel_mixing_freq``) or a :class:`iunet_nb.arch.layout.Layout`.
            For ``mode='unet'``/``'unet_checkpoint'`` the layout's channels and
            architecture define the :class:`iunet_nb.arch.baselines.UNet`.
        input_shape: ``(N, C, *spatial)``; spatial sizes are padded up to the
            downsampling factors as the model does.
        dtype: element type of parameters and activations ('float32', ...).
        mode: one of :data:`MODES`.
        depth, learnable_resampling, channel_mixing_freq: the iUNet options
            (when a layout is given).
        constants: override :data:`CONSTANTS` for this mode (calibration).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got mode={mode!r}")
    _check_options(depth, channel_mixing_freq)
    if constants is not None and not isinstance(constants, dict):
        raise ValueError(f"constants must be a dict of {CONSTANT_NAMES[_kind(mode)]} or None, "
                         f"got {constants!r}")
    layout, opts = layout_of(model_or_layout)
    shape = _check_shape(input_shape, layout.dim)
    n, c = shape[0], shape[1]
    if c != layout.channels[0]:
        raise ValueError(f"input has {c} channels but the model expects {layout.channels[0]}")
    esize = dtype_size(dtype)
    spatial = _padded_spatial(layout, shape[2:])
    t = _level_tensors(layout, spatial, n, esize)
    T = t[0]
    input_bytes = n * c * math.prod(shape[2:]) * esize
    padded = T != input_bytes
    k = dict(CONSTANTS[mode])
    if constants:
        k.update(constants)
    ops = _body_ops(mode, layout, opts, t, esize, depth, learnable_resampling, channel_mixing_freq)
    params = sum(op.params for op in ops)
    if "param_bytes" in opts and mode not in ("unet", "unet_checkpoint"):
        params = opts["param_bytes"]
    feats = _features(mode, layout, ops, t, T, padded)
    if n == 0:
        act, where = 0, "empty batch"
    else:
        consts = [k[name] for name in CONSTANT_NAMES[_kind(mode)]]
        peak, where = _peak(*feats, consts)
        act = int(round(peak)) - sum(op.params for op in ops)
    return MemoryPrediction(
        mode=mode, parameters=params, gradients=params, activations=max(act, 0),
        input=input_bytes, tensor=T,
        details=dict(level_tensors=t, constants=k, peak_at=where, padded_spatial=spatial,
                     calibration=CALIBRATION),
    )


def max_batch_size(model_or_layout: Any, input_shape: Sequence[int], dtype: Any = "float32",
                   mode: str = "fused", budget_bytes: int = 0, **kwargs: Any) -> int:
    """Largest batch size whose predicted ``total`` fits in ``budget_bytes`` (0 if none).

    ``input_shape`` is ``(N, C, *spatial)``; its ``N`` is ignored.
    """
    if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, (int, float)) \
            or not math.isfinite(budget_bytes) or budget_bytes < 0:
        raise ValueError(f"budget_bytes must be a finite number >= 0, got {budget_bytes!r}")
    layout, _ = layout_of(model_or_layout)
    shape = _check_shape(input_shape, layout.dim)
    dtype_size(dtype)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got mode={mode!r}")

    def fits(b: int) -> bool:
        shape[0] = b
        return predict_step_memory(model_or_layout, shape, dtype, mode, **kwargs).total <= budget_bytes

    return largest_fitting(fits)


def largest_fitting(fits: Any) -> int:
    """Largest ``n >= 1`` with ``fits(n)`` for a monotone predicate (0 if ``fits(1)`` fails)."""
    if not fits(1):
        return 0
    lo, hi = 1, 2
    while fits(hi):
        lo, hi = hi, hi * 2
        if hi > 2**40:
            return lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo
