"""The fully invertible U-Net (iUNet).

``iUNet(channels=(64, 128, 256, 384), architecture=(2, 2, 2, 2), dim=2)`` builds
an iUNet whose level ``i`` has ``channels[i]`` channels and ``architecture[i]``
coupling layers on each side.  At each non-bottom level the channels are split
into a skip part (kept) and a part that an invertible, orthogonal downsampling
sends one level down; on the way up an invertible upsampling and a channel
concatenation undo this.  The whole network is a bijection from
``(N, channels[0], *spatial)`` to itself, so training can rebuild activations
instead of storing them (see :mod:`iunet_nb.engine.fused`).

The older ``iUNet(in_channels=64, slice_mode='double', ...)`` form of the
reference package is accepted too: ``channels`` is then derived level by level
(the next level's target is twice, ``'double'``, or the same, ``'constant'``,
number of channels, rounded to the nearest achievable), see
:func:`iunet_nb.arch.layout.channels_from_slice_mode`.

The network's structure is its plan (:mod:`iunet_nb.engine.plan`): one ordered
list of couplings, mixings, splits, resamplings and concatenations that the
construction, the forward and inverse passes, ``encode``/``decode`` and both
memory-efficient engines walk.
"""
from __future__ import annotations

import contextlib
import numbers
import warnings
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from iunet_nb import engine as eng
from iunet_nb import torch_internals as internals
from iunet_nb.arch.layout import Layout, channels_from_slice_mode, compute_layout
from iunet_nb.engine.plan import (
    CONCAT, COUPLING, DECODER, DOWNSAMPLE, ENCODER, MIXING, SPLIT, UPSAMPLE, Op, Plan, build_plan,
)
from iunet_nb.common import check_dim
from iunet_nb.engine.compile import compile_steps
from iunet_nb.engine.memcnn import apply_memcnn
from iunet_nb.nn.checks import check_invertible, probe_input, require_inverse_method
from iunet_nb.nn.coupling import create_standard_module
from iunet_nb.nn.mixing import OrthogonalChannelMixing
from iunet_nb.nn.resampling import InvertibleDownsampling, InvertibleUpsampling

__all__ = ["iUNet", "ME_BACKENDS", "PADDING_MODES"]

ME_BACKENDS = ("fused", "memcnn")
PADDING_MODES = ("constant", "reflect", "replicate", "circular")

_DIM_NAMES = {1: "(N, C, L)", 2: "(N, C, H, W)", 3: "(N, C, D, H, W)"}


class _SplitChannels(nn.Module):
    """``x -> (x[:, :kept], x[:, kept:])`` as copies (memcnn frees its inputs)."""

    def __init__(self, kept: int) -> None:
        super().__init__()
        self.kept = kept

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x[:, : self.kept].clone(), x[:, self.kept :].clone()

    def inverse(self, kept: Tensor, sent: Tensor) -> Tensor:
        return torch.cat([kept, sent], dim=1)


class _ConcatChannels(nn.Module):
    """Inverse of :class:`_SplitChannels`."""

    def __init__(self, kept: int) -> None:
        super().__init__()
        self.kept = kept

    def forward(self, kept: Tensor, sent: Tensor) -> Tensor:
        return torch.cat([kept, sent], dim=1)

    def inverse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x[:, : self.kept].clone(), x[:, self.kept :].clone()


def _empty_batch_output(x: Tensor, params: Any) -> Tensor:
    """The body's output for an empty batch ``(0, C, *S)``: an empty tensor of the same shape,
    connected to every parameter so that ``backward`` gives zero gradients (not ``None``)."""
    zero = sum((p.reshape(-1)[:0].sum() for p in params if p.requires_grad), x.new_zeros(()))
    return x + zero.to(x.dtype) if torch.is_grad_enabled() else x.clone()


def _check_bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {name}={value!r}")
    return value


#: More coupling layers per level than this is almost certainly a typo (and would take
#: hours to build); raise it here if you really need deeper levels.
MAX_BLOCKS_PER_LEVEL = 1024


def _check_architecture(architecture: Any) -> tuple:
    if isinstance(architecture, (int, str)) or not hasattr(architecture, "__iter__"):
        raise TypeError(
            "architecture must be a sequence with the number of coupling layers of each level, "
            f"e.g. (2, 2, 2, 2) for four levels; got architecture={architecture!r}"
        )
    architecture = tuple(architecture)
    for i, blocks in enumerate(architecture):
        if isinstance(blocks, int) and not isinstance(blocks, bool) and blocks > MAX_BLOCKS_PER_LEVEL:
            raise ValueError(
                f"architecture[{i}]={blocks} coupling layers is more than iunet_nb allows per level "
                f"({MAX_BLOCKS_PER_LEVEL}); the paper uses 2-30. Use a smaller number."
            )
    return architecture


def _check_verbose(verbose: Any) -> int:
    if not isinstance(verbose, int):  # True/False are ints: verbose=True means 1
        raise TypeError(f"verbose must be an int (0: silent, 1: report adjusted channels), got {verbose!r}")
    return int(verbose)


def _check_padding_value(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"padding_value must be a number (the fill value of 'constant' padding), got {value!r}")
    return float(value)


def _check_kwargs(value: Any, name: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise TypeError(f"{name} must be a dict of keyword arguments or None, got {type(value).__name__}")
    return dict(value)


def _channels_and_architecture(channels: Any, architecture: Any, dim: Any, in_channels: Any,
                               slice_mode: Any, resampling_stride: Any) -> tuple[Any, tuple]:
    """The requested channels per level (derived from ``in_channels`` in the older API) and
    the checked architecture; raises for missing or contradicting arguments."""
    if architecture is None:
        raise TypeError("iUNet() missing required argument 'architecture' (coupling layers per level)")
    if dim is None:
        raise TypeError("iUNet() missing required argument 'dim' (1, 2 or 3 spatial dimensions)")
    check_dim(dim)
    architecture = _check_architecture(architecture)
    if isinstance(channels, int) and not isinstance(channels, bool) and in_channels is None:
        channels, in_channels = None, channels  # iUNet(32, ...): the older positional in_channels
    if channels is None and in_channels is None:
        raise TypeError("iUNet() needs channels=(c0, c1, ...) (or the older in_channels=c0 with slice_mode)")
    if channels is not None and in_channels is not None:
        raise TypeError(
            "give either channels=(...) or the older in_channels= (with slice_mode), not both"
        )
    if channels is None:
        return channels_from_slice_mode(
            in_channels, architecture, dim, resampling_stride,
            "double" if slice_mode is None else slice_mode,
        ), architecture
    if slice_mode is not None:
        warnings.warn(
            f"slice_mode={slice_mode!r} has no effect when channels= is given: it only derives the "
            "channels per level from in_channels= (older API). Remove slice_mode or use in_channels=.",
            UserWarning,
            stacklevel=3,
        )
    return channels, architecture


def _check_choices(me_backend: Any, padding_mode: Any, create_module_fn: Any) -> None:
    if me_backend not in ME_BACKENDS:
        raise ValueError(f"me_backend must be one of {ME_BACKENDS}, got me_backend={me_backend!r}")
    if padding_mode is not None and padding_mode not in PADDING_MODES:
        raise ValueError(
            f"padding_mode must be one of {PADDING_MODES} or None, got padding_mode={padding_mode!r}"
        )
    if not callable(create_module_fn):
        raise TypeError(f"create_module_fn must be callable, got {type(create_module_fn).__name__}")


def _check_consume_output(consume_output: Any, me_backend: str) -> None:
    _check_bool(consume_output, "consume_output")
    if consume_output and me_backend != "fused":
        raise ValueError(
            f"consume_output=True needs me_backend='fused' (got me_backend={me_backend!r}): only the "
            "fused engine can take over the output's memory in its backward"
        )


def _creation_key(op: Op) -> tuple[int, int, bool]:
    """Sort key of a level's operations in the order their modules are created.

    The order fixes which random numbers each initialisation draws, so that a
    seed gives the same weights for the same arguments: along the level's chain
    of couplings, the encoder's and the decoder's ``j``-th couplings together
    (position ``2j + 1``), a mixing in the gap before the coupling that follows
    it (position ``2 * couplings_before``), the encoder's module before the
    decoder's; then the downsampling and the upsampling.
    """
    if op.kind in (DOWNSAMPLE, UPSAMPLE):
        return (1, 0, op.kind == UPSAMPLE)
    return (0, 2 * op.couplings_before + (op.kind == COUPLING), op.side == DECODER)


class _ModuleFactory:
    """Creates the module of an operation of the plan with the model's options."""

    def __init__(self, model: "iUNet") -> None:
        self.model = model
        self.checked: set = set()  # (class, channels, split) of the blocks already checked

    def coupling(self, op: Op) -> nn.Module:
        m = self.model
        coords = dict(dim=m.dim, LR=op.side, branch="encoder" if op.side == ENCODER else "decoder",
                      level=op.level, module_index=op.index, architecture=m.architecture)
        try:
            module = m.create_module_fn(op.channels, **coords, **m.module_kwargs)
        except TypeError as err:
            raise TypeError(f"create_module_fn / module_kwargs: {err}") from None
        require_inverse_method(module, "create_module_fn")
        kind = (type(module), op.channels, getattr(module, "split", None))
        if m.check_blocks and kind not in self.checked:
            check_invertible(module, probe_input(op.channels, m.dim),
                             where=f"create_module_fn (level {op.level}, side {op.side}, "
                                   f"module_index {op.index})")
            self.checked.add(kind)
        return module

    def mixing(self, op: Op) -> nn.Module:
        m = self.model
        try:
            return OrthogonalChannelMixing(op.channels, dim=m.dim, method=m.channel_mixing_method,
                                           learnable=m.learnable_channel_mixing,
                                           **m.channel_mixing_kwargs)
        except TypeError as err:
            raise TypeError(f"channel_mixing_kwargs: {err}") from None

    def resampling(self, op: Op) -> nn.Module:
        m = self.model
        cls = InvertibleDownsampling if op.kind == DOWNSAMPLE else InvertibleUpsampling
        try:
            return cls(op.channels, stride=op.stride, dim=m.dim, method=m.resampling_method,
                       init=m.resampling_init, learnable=m.learnable_resampling,
                       **m.resampling_kwargs)
        except TypeError as err:
            raise TypeError(f"resampling_kwargs: {err}") from None


class iUNet(nn.Module):
    """Fully invertible U-Net for 1D, 2D and 3D data.

    Input and output: ``(N, channels[0], *spatial)`` with ``dim`` spatial
    dimensions.  Spatial sizes that are not multiples of
    :attr:`downsampling_factors` are padded automatically (and the padding is
    removed from the output when ``revert_input_padding``).

    The model keeps every argument as an attribute of the same name
    (``channels``, ``architecture`` and ``resampling_stride`` as built), its
    layout's plan as :attr:`plan` (:class:`iunet_nb.engine.plan.Plan`) and the
    module of each operation of the plan, found with :meth:`module_of`.

    Args:
        channels: channels per level, e.g. ``(64, 128, 256, 384)``.  If they
            cannot be built exactly, the closest achievable channels are used
            (reported with ``verbose >= 1``).
        architecture: coupling layers per side, per level.
        dim: number of spatial dimensions (1, 2 or 3).
        create_module_fn: ``fn(channels, **coordinates, **module_kwargs)``
            returning an invertible module (``forward`` and ``inverse``);
            coordinates are ``dim``, ``LR`` ('L' or 'R'), ``branch`` ('encoder'
            or 'decoder'), ``level``, ``module_index`` (``0 .. architecture[level] - 1``
            on each side, as the reference documents) and ``architecture``.
        module_kwargs: extra keyword arguments of ``create_module_fn``
            (for the standard module: ``depth``, alias ``block_depth``).
        learnable_resampling, resampling_stride, resampling_method,
        resampling_init, resampling_kwargs: the invertible up/downsampling
            (see :class:`iunet_nb.nn.resampling.InvertibleDownsampling`).  The
            stride is an int, a per-dimension tuple, or a list with one of
            those per downsampling, e.g. ``[2, 2, (1, 2, 2)]``.
        learnable_channel_mixing, channel_mixing_freq, channel_mixing_method,
        channel_mixing_kwargs: orthogonal 1x1 channel mixing.  ``-1``: one per
            side at each non-bottom level; ``k > 0``: after every ``k``-th
            coupling on each side; ``0``: none.
        padding_mode: ``'constant'``, ``'reflect'``, ``'replicate'``,
            ``'circular'`` or ``None`` (no automatic padding: sizes must fit).
        padding_value: fill value for ``'constant'`` padding.
        revert_input_padding: crop the output back to the input size.
        disable_custom_gradient: plain autograd (conventional backprop).
        verbose: ``>= 1`` prints the closest-achievable message.
        me_backend: ``'fused'`` (default) or ``'memcnn'``.
        preserve_rng_state: replay the forward's random state when the
            backward recomputes a coupling (needed for dropout).
        check_blocks: run :func:`iunet_nb.nn.checks.check_invertible` on one block
            of each distinct kind (class, channels, split) from ``create_module_fn``
            at construction, so that a block whose ``inverse`` is wrong or whose
            shapes do not fit is a clear error before training.  ``False`` skips it.
        consume_output: opt-in memory saving of the fused engine: the backward
            reuses the memory of the output and of its incoming gradient for its
            own activations (about two input-sized tensors less at the peak).
            After ``loss.backward()`` the output is gone: every use of it (and
            of the crop this model returns) raises, as does a second backward
            (``retain_graph=True``).  Use the output before the backward, or keep
            a ``.clone()``.  Safe by construction: an output that other tensors
            share (a view or ``.detach()`` taken before the backward), or a
            gradient that something else may read (passed explicitly with
            ``y.backward(g)``, the expanded gradient of ``y.sum()``, a hook on
            the output) is left intact and simply not reused.  No effect
            without a graph (``torch.no_grad()``, frozen model), with
            ``disable_custom_gradient=True`` or in :meth:`inverse`; with
            ``me_backend='memcnn'`` it is an error.  The rules in full:
            :mod:`iunet_nb.engine.fused`.  The mode also puts memory before
            time in the forward: couplings whose half-activation has at least
            :data:`~iunet_nb.engine.steps.SLAB_MIN_BYTES` (the finest level of a
            large input) compute ``f`` slab by slab there too, which costs one
            more convolution each but no activation-sized temporary -- in 3D,
            where the forward holds the caller's input besides its own, that
            was the step's peak.
        in_channels, slice_mode: the older API (instead of ``channels``).
    """

    def __init__(
        self,
        channels: Sequence[int] | None = None,
        architecture: Sequence[int] | None = None,
        dim: int | None = None,
        create_module_fn: Callable[..., nn.Module] = create_standard_module,
        module_kwargs: dict | None = None,
        learnable_resampling: bool = True,
        resampling_stride: Any = 2,
        resampling_method: str = "cayley",
        resampling_init: str = "haar",
        resampling_kwargs: dict | None = None,
        learnable_channel_mixing: bool = True,
        channel_mixing_freq: int = -1,
        channel_mixing_method: str = "cayley",
        channel_mixing_kwargs: dict | None = None,
        padding_mode: str | None = "constant",
        padding_value: float = 0.0,
        revert_input_padding: bool = True,
        disable_custom_gradient: bool = False,
        verbose: int = 1,
        *,
        in_channels: int | None = None,
        slice_mode: str | None = None,
        me_backend: str = "fused",
        preserve_rng_state: bool = True,
        check_blocks: bool = True,
        consume_output: bool = False,
    ) -> None:
        super().__init__()
        channels, architecture = _channels_and_architecture(
            channels, architecture, dim, in_channels, slice_mode, resampling_stride)
        _check_choices(me_backend, padding_mode, create_module_fn)
        _check_consume_output(consume_output, me_backend)
        self._layout: Layout = compute_layout(channels, architecture, dim, resampling_stride)
        self.plan: Plan = build_plan(self._layout, channel_mixing_freq)
        self._set_layout_attributes(self._layout)
        # Every constructor argument, checked (channels, architecture and strides as built above).
        self.in_channels = self.channels[0]
        self.slice_mode = slice_mode
        self.create_module_fn = create_module_fn
        self.module_kwargs = _check_kwargs(module_kwargs, "module_kwargs")
        self.learnable_resampling = _check_bool(learnable_resampling, "learnable_resampling")
        self.resampling_method = resampling_method
        self.resampling_init = resampling_init
        self.resampling_kwargs = _check_kwargs(resampling_kwargs, "resampling_kwargs")
        self.learnable_channel_mixing = _check_bool(learnable_channel_mixing, "learnable_channel_mixing")
        self.channel_mixing_freq = self.plan.channel_mixing_freq
        self.channel_mixing_method = channel_mixing_method
        # Identity-initialised mixing (as in the reference), so that with zero-initialised
        # couplings the whole iUNet starts as the identity map; init='random' can be asked for.
        self.channel_mixing_kwargs = {"init": "identity",
                                      **_check_kwargs(channel_mixing_kwargs, "channel_mixing_kwargs")}
        self.padding_mode = padding_mode
        self.padding_value = _check_padding_value(padding_value)
        self.revert_input_padding = _check_bool(revert_input_padding, "revert_input_padding")
        self.disable_custom_gradient = _check_bool(disable_custom_gradient, "disable_custom_gradient")
        self.verbose = _check_verbose(verbose)
        self.me_backend = me_backend
        self.preserve_rng_state = _check_bool(preserve_rng_state, "preserve_rng_state")
        self.check_blocks = _check_bool(check_blocks, "check_blocks")
        self.consume_output = consume_output
        if self.verbose >= 1 and self._layout.adjusted:
            print(self._layout.adjustment_message())
        self._create_modules()
        # memcnn's wrapper of each module (a plain dict: the wrappers hold the same modules).
        self._memcnn_wrappers: dict[tuple[int, bool], nn.Module] = {}
        # split/concat modules of the memcnn engine (not registered: they have no state).
        self._channel_modules: dict[Op, nn.Module] = {}
        # State dicts saved from the reference package's iUNet load too (converted while loading).
        self.register_load_state_dict_pre_hook(_reference_checkpoint_hook)
        # ... and its state dicts record its structure, so a converted model's load back strictly.
        self.register_state_dict_post_hook(_record_structure_hook)

    def _set_layout_attributes(self, layout: Layout) -> None:
        self.dim = layout.dim
        self.architecture = layout.architecture
        self.channels = layout.channels
        self.num_levels = len(self.channels)
        self.resampling_stride = layout.strides
        self.channel_multipliers = layout.channel_multipliers
        self.downsampling_factors = layout.downsampling_factors
        self.skipped_channels = list(layout.kept)
        self.channels_before_downsampling = list(layout.sent)

    def _create_modules(self) -> None:
        """One module per operation of the plan that has one, level by level.

        ``encoder_modules[i]`` / ``decoder_modules[i]`` hold the couplings and
        mixings of level ``i`` of each side in forward order (the ops' ``slot``);
        ``downsampling_layers[i]`` and ``upsampling_layers[i]`` its resamplings.
        Each upsampling starts as the exact inverse of its downsampling, so that
        with zero-initialised couplings the whole iUNet starts as the identity.
        """
        factory = _ModuleFactory(self)
        self.encoder_modules = nn.ModuleList(nn.ModuleList() for _ in range(self.num_levels))
        self.decoder_modules = nn.ModuleList(nn.ModuleList() for _ in range(self.num_levels))
        self.downsampling_layers = nn.ModuleList()
        self.upsampling_layers = nn.ModuleList()
        for level in range(self.num_levels):
            for op in sorted(self.plan.level_ops(level), key=_creation_key):
                if op.kind in (COUPLING, MIXING):
                    sides = self.encoder_modules if op.side == ENCODER else self.decoder_modules
                    make = factory.coupling if op.kind == COUPLING else factory.mixing
                    sides[op.level].append(make(op))
                elif op.kind == DOWNSAMPLE:
                    self.downsampling_layers.append(factory.resampling(op))
                elif op.kind == UPSAMPLE:
                    up = factory.resampling(op)
                    up.load_state_dict(self.downsampling_layers[op.level].state_dict())
                    self.upsampling_layers.append(up)

    def module_of(self, op: Op) -> nn.Module | None:
        """The registered module of ``op`` (``None`` for splits and concats, which only slice)."""
        if op.kind == DOWNSAMPLE:
            return self.downsampling_layers[op.level]
        if op.kind == UPSAMPLE:
            return self.upsampling_layers[op.level]
        if op.kind in (COUPLING, MIXING):
            sides = self.encoder_modules if op.side == ENCODER else self.decoder_modules
            return sides[op.level][op.slot]
        return None

    # ------------------------------------------------------------------ layout
    def print_layout(self) -> None:
        """Print the channel layout as in the reference package's README."""
        print(self._layout.text())

    def layout(self) -> dict[str, Any]:
        """The layout as data: levels, blocks, kept/sent channels, strides, parameter counts."""
        levels = []
        for i, lv in enumerate(self._layout.levels):
            mods = [self.module_of(op) for op in self.plan.level_ops(i) if op.has_module]
            n_params = sum(p.numel() for m in mods for p in m.parameters())
            levels.append(dict(level=i, channels=lv.channels, blocks=lv.blocks, kept=lv.kept,
                               sent=lv.sent, stride=lv.stride, multiplier=lv.multiplier,
                               parameters=n_params))
        return dict(dim=self.dim, channels=self.channels, requested=self._layout.requested,
                    architecture=self.architecture, strides=self.resampling_stride,
                    downsampling_factors=self.downsampling_factors, levels=levels,
                    parameters=sum(p.numel() for p in self.parameters()),
                    adjustment_message=self._layout.adjustment_message(),
                    text=self._layout.text())

    # ------------------------------------------------------------------ checks and padding
    def _check_input(self, x: Tensor, name: str = "x") -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != self.dim + 2:
            raise ValueError(
                f"this iUNet has dim={self.dim}, so {name} must be {_DIM_NAMES[self.dim]} "
                f"({self.dim + 2} dimensions), got shape {tuple(x.shape)}"
            )
        if x.shape[1] != self.channels[0]:
            raise ValueError(
                f"{name} has {x.shape[1]} channels but this iUNet expects channels[0]={self.channels[0]}; "
                f"got shape {tuple(x.shape)}"
            )
        self._check_dtype(x, name)

    def _check_dtype(self, x: Tensor, name: str) -> None:
        weight = next(iter(self.parameters()), None)
        if not x.is_floating_point():
            want = "float32" if weight is None else str(weight.dtype).replace("torch.", "")
            raise TypeError(
                f"{name} has dtype {str(x.dtype).replace('torch.', '')}, but an iUNet needs a floating-point "
                f"input with the dtype of its parameters ({want}): convert it, e.g. {name}.to(torch.{want})"
            )
        if weight is None or x.dtype == weight.dtype or torch.is_autocast_enabled(x.device.type):
            return
        got, want = (str(t).replace("torch.", "") for t in (x.dtype, weight.dtype))
        raise TypeError(
            f"{name} has dtype {got} but this iUNet's parameters are {want}: convert the input "
            f"({name}.to(torch.{want})) or the model (model.to(torch.{got})), or run under torch.autocast"
        )

    def get_padding(self, x: Tensor) -> tuple[list[int], list[int]]:
        """Padded spatial shape and the padding (``F.pad`` order) needed for ``x``.

        Returns ``(padded_shape, padding)``; ``padding`` is all zeros when the
        spatial size already fits the total downsampling factor.
        """
        spatial = list(x.shape[2:])
        padded, padding = [], []
        for size, factor in zip(spatial, self.downsampling_factors):
            target = -(-size // factor) * factor
            padded.append(target)
            total = target - size
            padding.append((total // 2, total - total // 2))
        flat: list[int] = []
        for left, right in reversed(padding):  # F.pad wants the last dimension first
            flat += [left, right]
        return padded, flat

    def _pad(self, x: Tensor) -> tuple[Tensor, list[int]]:
        padded, padding = self.get_padding(x)
        if not any(padding):
            return x, padding
        if self.padding_mode is None:
            raise ValueError(
                f"spatial size {tuple(x.shape[2:])} is not a multiple of the downsampling factors "
                f"{self.downsampling_factors} and padding_mode=None; pad the input to {tuple(padded)} "
                "or set padding_mode='constant'/'reflect'/'replicate'/'circular'"
            )
        if self.padding_mode == "reflect":
            for d, (size, (left, right)) in enumerate(zip(x.shape[2:], _pairs(padding))):
                if max(left, right) >= size:
                    raise ValueError(
                        f"padding_mode='reflect' cannot pad spatial dimension {d} of size {size} by "
                        f"{max(left, right)} (reflect padding must be smaller than the size); use "
                        "padding_mode='replicate' or 'constant', or a larger input"
                    )
        if self.padding_mode == "constant":
            return F.pad(x, padding, mode="constant", value=self.padding_value), padding
        return F.pad(x, padding, mode=self.padding_mode), padding

    @staticmethod
    def _crop(x: Tensor, padding: list[int]) -> Tensor:
        index = [slice(None), slice(None)]
        for left, right in _pairs(padding):
            index.append(slice(left, x.shape[len(index)] - right))
        return x[tuple(index)]

    # ------------------------------------------------------------------ engines
    def _steps(self) -> list[eng.Step]:
        """The fused engine's steps, one per operation of the plan (chosen at every call:
        a module replaced or hooked since the last one gets the step it now needs)."""
        return compile_steps(self.plan, self.module_of, self.preserve_rng_state, self.consume_output)

    def _channel_module(self, op: Op) -> nn.Module:
        """The split or concat module of ``op`` for the memcnn engine (created once)."""
        if op not in self._channel_modules:
            cls = _SplitChannels if op.kind == SPLIT else _ConcatChannels
            self._channel_modules[op] = cls(op.kept)
        return self._channel_modules[op]

    def _memcnn_body(self, x: Tensor) -> Tensor:
        modules = [self.module_of(op) if op.has_module else self._channel_module(op)
                   for op in self.plan.ops]
        return apply_memcnn(self.plan, modules, x, self.preserve_rng_state, self._memcnn_wrappers)

    # ------------------------------------------------------------------ forward
    def _body(self, x: Tensor) -> Tensor:
        needs_graph = torch.is_grad_enabled() and (
            x.requires_grad or any(p.requires_grad for p in self.parameters())
        )
        if x.shape[0] == 0:
            return _empty_batch_output(x, self.parameters())
        if self.disable_custom_gradient or not needs_graph:
            return self._plain_body(x)
        return self._memory_efficient_body(x)

    @internals.run_eagerly
    def _memory_efficient_body(self, x: Tensor) -> Tensor:
        """The body run by an engine.  Compilers (``torch.compile``) compile around it: the
        engine's autograd function, its ownership checks and its in-place kernels run eagerly,
        and the layers before and after it are compiled as usual."""
        _refuse_tracers(self.me_backend)
        if self.me_backend == "memcnn":
            return self._memcnn_body_autocast(x)
        return eng.apply_fused(self._steps(), x, consume_output=self.consume_output)

    def _memcnn_body_autocast(self, x: Tensor) -> Tensor:
        """The memcnn body; under autocast it runs in the parameters' dtype, as the fused engine.

        An exact inverse needs it (a coupling undone in bfloat16 loses its input), and memcnn's
        convolutions would otherwise see a bfloat16 input with float32 weights.  The output
        has the autocast dtype, as the layers of a conventional network would give.
        """
        device_type = x.device.type
        if not torch.is_autocast_enabled(device_type):
            return self._memcnn_body(x)
        body_dtype = next((p.dtype for p in self.parameters() if p.is_floating_point()), x.dtype)
        with torch.autocast(device_type, enabled=False):
            y = self._memcnn_body(x.to(body_dtype))
        return y.to(torch.get_autocast_dtype(device_type))

    def __prepare_scriptable__(self) -> "iUNet":
        """``torch.jit.script`` calls this first: an iUNet cannot be scripted, say why and what works."""
        raise RuntimeError(
            "torch.jit.script cannot compile an iUNet (its layers use Python features TorchScript "
            "lacks). For export, trace it: torch.jit.trace(model.eval(), x) under torch.no_grad(); "
            "to train faster, use torch.compile(model)."
        )

    def _plain_body(self, x: Tensor) -> Tensor:
        return self._decode(self._encode(x))

    def _plain_body_inverse(self, y: Tensor) -> Tensor:
        return self.encoder_inverse(self.decoder_inverse(y))

    def forward(self, x: Tensor) -> Tensor:
        """``(N, channels[0], *spatial) -> (N, channels[0], *spatial)`` (padded if not reverted)."""
        self._check_input(x)
        x_padded, padding = self._pad(x)
        y = self._body(x_padded)
        if self.revert_input_padding and any(padding):
            y_full = y
            y = self._crop(y_full, padding)
            if self.consume_output:  # the crop shares the output's memory
                eng.add_output_view(y_full, y)
            # Keep the full output reachable so that inverse(forward(x)) stays exact
            # even though the returned tensor is cropped.
            y._iunet_full_output = (y_full, y._version, padding)
        elif any(padding):
            # The output keeps the padded size; remember the padding so that
            # inverse(forward(x)) returns x at its own size.
            y._iunet_input_padding = (y._version, padding)
        return y

    def inverse(self, y: Tensor) -> Tensor:
        """Inverse of :meth:`forward`.

        Exact for the outputs of :meth:`forward` themselves.  For a cropped tensor
        that is not one (``revert_input_padding=True`` with a padded size, e.g.
        after ``.detach()``, ``.clone()`` or an in-place change), the cropped-off
        border is unknown: it is padded with ``padding_mode`` first, and the
        result is only approximate -- the error is largest at the border but,
        through the receptive field, reaches the interior too.  Use
        ``revert_input_padding=False`` when exact inverses of stored outputs matter.
        With ``revert_input_padding=False`` the output keeps the padded size; the
        inverse of an output of :meth:`forward` is cropped back to the input's
        size, that of any other padded-size tensor is returned at the padded size.
        """
        self._check_input(y, "y")
        if y.shape[0] == 0:
            return y.clone()
        full_info = getattr(y, "_iunet_full_output", None)
        pad_info = getattr(y, "_iunet_input_padding", None)
        if full_info is not None and full_info[1] == y._version:
            y_full, _, padding = full_info
        elif pad_info is not None and pad_info[0] == y._version:
            y_full, padding = y, pad_info[1]
        else:
            y_full, padding = self._pad(y)
            if any(padding) and not self.revert_input_padding:
                raise ValueError(
                    f"y has spatial size {tuple(y.shape[2:])}, which is not a multiple of "
                    f"{self.downsampling_factors}; with revert_input_padding=False, forward() returns "
                    "padded outputs, so pass such an output to inverse()"
                )
        with torch.no_grad() if not torch.is_grad_enabled() else contextlib.nullcontext():
            x = self._plain_body_inverse(y_full)
        if any(padding):
            x = self._crop(x, padding)
        return x

    # ------------------------------------------------------------------ encoder / decoder
    def encode(self, x: Tensor, use_padding: bool = True) -> tuple[Tensor, ...]:
        """Down branch: returns ``(skip_0, ..., skip_{L-2}, bottom)``.

        With ``use_padding`` the input is padded as in :meth:`forward`.
        """
        self._check_input(x)
        if use_padding:
            x, _ = self._pad(x)
        return self._encode(x)

    def _encode(self, x: Tensor) -> tuple[Tensor, ...]:
        codes: list[Tensor] = []
        for op in self.plan.encoder_ops:
            if op.kind == SPLIT:
                codes.append(x[:, : op.kept])
                x = x[:, op.kept :]
            else:
                x = self.module_of(op)(x)
        codes.append(x)
        return tuple(codes)

    def encoder_inverse(self, codes: Sequence[Tensor]) -> Tensor:
        """Inverse of :meth:`encode` (without padding removal)."""
        codes = list(codes)
        self._check_codes(codes)
        x = codes[-1]
        for op in reversed(self.plan.encoder_ops):
            if op.kind == SPLIT:
                x = torch.cat([codes[op.level], x], dim=1)
            else:
                x = self.module_of(op).inverse(x)
        return x

    def decode(self, *codes: Tensor) -> Tensor:
        """Up branch: ``decode(*encode(x)) == forward`` body (on the padded size).

        Accepts the codes as separate arguments or as one sequence.
        """
        if len(codes) == 1 and isinstance(codes[0], (list, tuple)):
            codes = tuple(codes[0])
        codes_l = list(codes)
        self._check_codes(codes_l)
        return self._decode(codes_l)

    def _decode(self, codes_l: Sequence[Tensor]) -> Tensor:
        x = codes_l[-1]
        for op in self.plan.decoder_ops:
            if op.kind == CONCAT:
                x = torch.cat([codes_l[op.level], x], dim=1)
            else:
                x = self.module_of(op)(x)
        return x

    def decoder_inverse(self, y: Tensor) -> tuple[Tensor, ...]:
        """Inverse of :meth:`decode`: the codes that decode to ``y``."""
        codes: list[Tensor] = []
        for op in reversed(self.plan.decoder_ops):
            if op.kind == CONCAT:
                codes.append(y[:, : op.kept])
                y = y[:, op.kept :]
            else:
                y = self.module_of(op).inverse(y)
        codes.append(y)
        return tuple(codes)

    def _check_codes(self, codes: list[Tensor]) -> None:
        if len(codes) != self.num_levels:
            raise ValueError(
                f"expected {self.num_levels} codes (one skip per non-bottom level plus the bottom), "
                f"got {len(codes)}"
            )
        for i, (c, want) in enumerate(zip(codes, self.plan.code_channels)):
            if not isinstance(c, Tensor):
                raise TypeError(f"code {i} must be a tensor, got {type(c).__name__}")
            if c.dim() != self.dim + 2 or c.shape[1] != want:
                raise ValueError(f"code {i} must have {want} channels and {self.dim + 2} dims, "
                                 f"got shape {tuple(c.shape)}")
        self._check_code_sizes(codes)

    def _check_code_sizes(self, codes: list[Tensor]) -> None:
        """Each code's batch and spatial size must follow from code 0's and the strides."""
        size = list(codes[0].shape[2:])
        for i, c in enumerate(codes):
            if i > 0:
                stride = self.resampling_stride[i - 1]
                if any(s % k for s, k in zip(size, stride)):
                    raise ValueError(
                        f"code 0 has spatial size {tuple(codes[0].shape[2:])}, which the strides "
                        f"{self.resampling_stride} do not divide down to level {i}; use a size that is "
                        f"a multiple of {self.downsampling_factors} (encode() pads to one)")
                size = [s // k for s, k in zip(size, stride)]
            if c.shape[0] != codes[0].shape[0] or list(c.shape[2:]) != size:
                raise ValueError(
                    f"code {i} has shape {tuple(c.shape)}; with code 0 of shape {tuple(codes[0].shape)} "
                    f"and strides {self.resampling_stride} it must be "
                    f"{(codes[0].shape[0], c.shape[1], *size)} (batch {codes[0].shape[0]}, spatial size "
                    f"{tuple(size)}): pass the codes of one encode() call, in its order")


def _reference_checkpoint_hook(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict,
                               *args: Any) -> None:
    """Convert a state dict saved from ``iunets.iUNet`` or restore a recorded structure
    (see :mod:`iunet_nb.compat.checkpoints`)."""
    from iunet_nb.compat.checkpoints import convert_iunet

    convert_iunet(module, state_dict, prefix, local_metadata)


def _record_structure_hook(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """Record the decoder mixing placement and GroupNorm eps in ``state_dict._metadata``."""
    from iunet_nb.compat.checkpoints import iunet_state_dict_hook

    iunet_state_dict_hook(module, state_dict, prefix, local_metadata)


#: The error for tracers that cannot record the engines' autograd functions.
TRACING_MESSAGE = (
    "torch.jit.trace/torch.jit.script cannot record the memory-efficient engine (an autograd "
    "function with its own backward). For a traced or scripted model (inference, export), trace it "
    "in eval mode under torch.no_grad(), or set model.disable_custom_gradient = True first: the "
    "iUNet then runs as plain layers. To speed up training, use torch.compile(model), which "
    "compiles around the engine."
)


def _refuse_tracers(me_backend: str) -> None:
    """Raise :data:`TRACING_MESSAGE` under ``torch.jit`` tracing or scripting."""
    if torch.jit.is_tracing() or torch.jit.is_scripting():
        raise RuntimeError(f"me_backend={me_backend!r}: {TRACING_MESSAGE}")


def _pairs(padding: list[int]) -> list[tuple[int, int]]:
    """``F.pad`` order (last dim first) back to per-dimension (left, right) pairs, first dim first."""
    pairs = [(padding[k], padding[k + 1]) for k in range(0, len(padding), 2)]
    return list(reversed(pairs))

