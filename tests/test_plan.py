"""Tests of iunet_nb/engine/plan.py: the network as one ordered list of invertible operations."""

from __future__ import annotations

import dataclasses
import pathlib
import re

import pytest
import torch

from iunet_nb import engine as eng
from iunet_nb import iUNet
from iunet_nb.arch.layout import compute_layout, count_parameters
from iunet_nb.engine.plan import (
    CONCAT, COUPLING, DECODER, DOWNSAMPLE, ENCODER, MIXING, OP_KINDS, SPLIT, UPSAMPLE, Op, Plan,
    build_plan, check_channel_mixing_freq, coupling_halves, coupling_parameters,
)
from iunet_nb.measure.predict import MODES, predict_step_memory
from iunet_nb.nn.coupling import AdditiveCoupling, create_standard_module
from iunet_nb.nn.mixing import OrthogonalChannelMixing
from iunet_nb.nn.resampling import InvertibleDownsampling, InvertibleUpsampling

PLAN_PATH = pathlib.Path(__file__).resolve().parents[1] / "iunet_nb" / "engine" / "plan.py"

#: The README's 2D model and a 3D model with an anisotropic last stride.
MODEL_2D = dict(channels=(64, 128, 256, 384), architecture=(2, 2, 2, 2), dim=2)
MODEL_3D = dict(channels=(7, 15, 35, 91), architecture=(2, 3, 1, 3), dim=3,
                resampling_stride=[2, 2, (1, 2, 2)])


def plan_of(config: dict, channel_mixing_freq: int = -1) -> Plan:
    layout = compute_layout(config["channels"], config["architecture"], config["dim"],
                            config.get("resampling_stride", 2))
    return build_plan(layout, channel_mixing_freq)


def small_model(config: dict, **kwargs) -> iUNet:
    """The model of ``config`` at a quarter of its channels (fast to build), channels kept >= 4."""
    small = dict(config, channels=tuple(max(4, c // 4) for c in config["channels"]))
    return iUNet(**small, verbose=0, **kwargs)


# ------------------------------------------------------------------------------ order
def test_order_of_the_2d_model():
    names = [op.name for op in plan_of(MODEL_2D)]
    encoder = [f"L{i}.{n}" for i in range(3)
               for n in ("coupling0", "coupling1", "mix", "split", "down")]
    bottom = ["L3.coupling0", "L3.coupling1", "R3.coupling0", "R3.coupling1"]
    decoder = [f"R{i}.{n}" for i in (2, 1, 0)
               for n in ("up", "concat", "mix", "coupling0", "coupling1")]
    assert names == encoder + bottom + decoder


def test_encoder_then_decoder_and_queries():
    plan = plan_of(MODEL_3D)
    n_enc = len(plan.encoder_ops)
    assert plan.ops[:n_enc] == plan.encoder_ops and plan.ops[n_enc:] == plan.decoder_ops
    assert all(op.side == ENCODER for op in plan.encoder_ops)
    assert all(op.side == DECODER for op in plan.decoder_ops)
    assert [op.level for op in plan.encoder_ops] == sorted(op.level for op in plan.encoder_ops)
    assert [op.level for op in plan.decoder_ops] == sorted((op.level for op in plan.decoder_ops),
                                                           reverse=True)
    assert len(plan) == len(list(plan)) == sum(plan.count(kind) for kind in OP_KINDS)
    for level in range(plan.num_levels):
        assert plan.level_ops(level) == tuple(op for op in plan if op.level == level)
        for side in (ENCODER, DECODER):
            mods = plan.module_ops(level, side)
            assert [op.slot for op in mods] == list(range(len(mods)))
    assert plan.dim == 3 and plan.num_levels == 4


@pytest.mark.parametrize("config", [MODEL_2D, MODEL_3D], ids=["2d", "3d"])
@pytest.mark.parametrize("freq", [-1, 0, 1, 2])
def test_counts_per_kind(config, freq):
    plan = plan_of(config, freq)
    blocks = config["architecture"]
    levels = len(blocks)
    assert plan.count(COUPLING) == 2 * sum(blocks)
    for kind in (SPLIT, DOWNSAMPLE, UPSAMPLE, CONCAT):
        assert plan.count(kind) == levels - 1
    want_mixing = {-1: 2 * (levels - 1), 0: 0}.get(freq, sum(2 * (b // max(freq, 1)) for b in blocks))
    assert plan.count(MIXING) == want_mixing
    assert plan.channel_mixing_freq == freq


@pytest.mark.parametrize("freq", [-1, 1, 2, 3])
def test_mixing_positions(freq):
    plan = plan_of(dict(channels=(4, 8, 16), architecture=(2, 3, 1), dim=2), freq)
    for level in range(3):
        ops = plan.level_ops(level)
        enc = [op.kind for op in ops if op.side == ENCODER]
        dec = [op.kind for op in ops if op.side == DECODER]
        if freq == -1:
            if level < 2:  # before the split and after the concatenation
                assert enc[-3:] == [MIXING, SPLIT, DOWNSAMPLE]
                assert dec[:3] == [UPSAMPLE, CONCAT, MIXING]
            assert enc.count(MIXING) + dec.count(MIXING) == (2 if level < 2 else 0)
            continue
        for side in (enc, dec):
            couplings = 0
            for kind in side:
                if kind == COUPLING:
                    couplings += 1
                elif kind == MIXING:  # right after every freq-th coupling
                    assert couplings % freq == 0 and couplings > 0
            assert side.count(MIXING) == couplings // freq


# ------------------------------------------------------------------------------ channels and strides
def test_channels_and_strides_of_the_3d_model():
    plan = plan_of(MODEL_3D)
    strides = [(2, 2, 2), (2, 2, 2), (1, 2, 2)]
    assert [(op.kept, op.sent) for op in plan.of_kind(SPLIT)] == [(5, 2), (12, 4), (9, 23)]
    assert [op.out_channels for op in plan.of_kind(SPLIT)] == [2, 4, 23]
    downs = plan.of_kind(DOWNSAMPLE)
    assert [(op.level, op.channels, op.out_channels, op.stride) for op in downs] == [
        (0, 2, 16, strides[0]), (1, 4, 32, strides[1]), (2, 23, 92, strides[2])]
    assert [op.multiplier for op in downs] == [8, 8, 4]
    ups = plan.of_kind(UPSAMPLE)
    assert [(op.level, op.channels, op.out_channels, op.stride) for op in ups] == [
        (2, 92, 23, strides[2]), (1, 32, 4, strides[1]), (0, 16, 2, strides[0])]
    assert [(op.level, op.channels, op.kept) for op in plan.of_kind(CONCAT)] == [
        (2, 32, 9), (1, 16, 12), (0, 7, 5)]
    for op in plan.of_kind(COUPLING) + plan.of_kind(MIXING):
        assert op.channels == op.out_channels == (7, 16, 32, 92)[op.level]
        assert op.stride is None
    assert plan.code_channels == (5, 12, 9, 92)


def test_coupling_indices():
    plan = plan_of(MODEL_3D)
    for level, blocks in enumerate(MODEL_3D["architecture"]):
        couplings = [op for op in plan.level_ops(level) if op.kind == COUPLING]
        assert [(op.side, op.index) for op in couplings] == (
            [(ENCODER, j) for j in range(blocks)] + [(DECODER, j) for j in range(blocks)])
        assert [op.chain_index for op in couplings] == list(range(2 * blocks))


def test_ops_are_frozen_hashable_data():
    plan = plan_of(MODEL_2D)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.ops[0].channels = 3
    assert len(set(plan.ops)) == len(plan.ops)
    assert isinstance(plan.ops[0], Op)
    source = PLAN_PATH.read_text()
    assert not re.search(r"^\s*(import|from)\s+torch\b", source, re.M)


@pytest.mark.parametrize("bad", [-2, 1.5, True, "1", None])
def test_invalid_channel_mixing_freq(bad):
    with pytest.raises(ValueError, match="channel_mixing_freq"):
        check_channel_mixing_freq(bad)
    with pytest.raises(ValueError, match="channel_mixing_freq"):
        build_plan(compute_layout((4, 8), (1, 1), 2), bad)


# ------------------------------------------------------------------------------ the model
@pytest.mark.parametrize("config", [MODEL_2D, MODEL_3D], ids=["2d", "3d"])
@pytest.mark.parametrize("freq", [-1, 0, 1, 2])
def test_modules_correspond_one_to_one(config, freq):
    model = small_model(config, channel_mixing_freq=freq)
    plan = model.plan
    assert model.channel_mixing_freq == freq and plan.layout is model._layout
    modules = [model.module_of(op) for op in plan if op.has_module]
    registered = [m for side in (model.encoder_modules, model.decoder_modules)
                  for level in side for m in level]
    registered += list(model.downsampling_layers) + list(model.upsampling_layers)
    assert len(modules) == len(registered)
    assert {id(m) for m in modules} == {id(m) for m in registered}
    kinds = {COUPLING: AdditiveCoupling, MIXING: OrthogonalChannelMixing,
             DOWNSAMPLE: InvertibleDownsampling, UPSAMPLE: InvertibleUpsampling}
    for op in plan:
        module = model.module_of(op)
        if not op.has_module:
            assert module is None
            continue
        assert isinstance(module, kinds[op.kind])
        if op.kind in (COUPLING, MIXING):
            assert module.channels == op.channels
        else:
            assert (module.in_channels, module.out_channels, module.stride) == (
                op.channels, op.out_channels, op.stride)


def test_steps_follow_the_plan():
    model = small_model(MODEL_2D)
    steps = model._steps()
    assert len(steps) == len(model.plan)
    kinds = {COUPLING: eng.CouplingStep, MIXING: eng.KernelStep, DOWNSAMPLE: eng.KernelStep,
             UPSAMPLE: eng.KernelStep, SPLIT: eng.SplitStep, CONCAT: eng.ConcatStep}
    for op, step in zip(model.plan, steps):
        assert isinstance(step, kinds[op.kind])
        if op.kind in (SPLIT, CONCAT):
            assert step.kept == op.kept


def test_codes_have_the_plan_channels():
    model = small_model(MODEL_3D)
    x = torch.randn(1, model.channels[0], 4, 8, 8)
    with torch.no_grad():
        codes = model.encode(x)
    assert tuple(c.shape[1] for c in codes) == model.plan.code_channels


def test_model_keeps_its_arguments():
    fn = create_standard_module
    model = iUNet(channels=(4, 8), architecture=(2, 1), dim=2, create_module_fn=fn,
                  module_kwargs=dict(depth=2), resampling_method="exp", resampling_init="random",
                  channel_mixing_freq=2, channel_mixing_method="householder", check_blocks=False,
                  verbose=0)
    assert model.create_module_fn is fn and model.module_kwargs == dict(depth=2)
    assert (model.resampling_method, model.resampling_init) == ("exp", "random")
    assert (model.channel_mixing_freq, model.channel_mixing_method) == (2, "householder")
    assert model.channel_mixing_kwargs == dict(init="identity")
    assert model.check_blocks is False and model.in_channels == 4


# ------------------------------------------------------------------------------ parameters
@pytest.mark.parametrize("channels, blocks, dim, depth", [
    (5, 3, 1, 1), (6, 2, 2, 2), (7, 1, 3, 3), (4, 2, 2, 1),
])
def test_coupling_parameters_match_the_standard_module(channels, blocks, dim, depth):
    for chain_index in range(2):
        module = create_standard_module(channels, dim=dim, depth=depth, module_index=chain_index)
        assert sum(p.numel() for p in module.parameters()) == coupling_parameters(
            channels, chain_index, dim, depth)
        assert module.split == coupling_halves(channels, chain_index)[0]


CONFIGS = [
    dict(channels=(5, 8), architecture=(3, 1), dim=1),
    dict(channels=(3, 4), architecture=(2, 1), dim=1, channel_mixing_freq=0),
    dict(channels=(7, 15, 35), architecture=(1, 3, 2), dim=3, resampling_stride=[2, (1, 2, 2)],
         module_kwargs=dict(depth=2)),
    dict(channels=(6, 12, 24), architecture=(3, 2, 1), dim=2, channel_mixing_freq=2,
         learnable_resampling=False),
    dict(channels=(9, 16), architecture=(1, 3), dim=2, channel_mixing_freq=1,
         learnable_channel_mixing=False),
    dict(channels=(4, 6, 10), architecture=(4, 4, 4), dim=1, channel_mixing_freq=3,
         resampling_kwargs=dict(shared=True)),
]


@pytest.mark.parametrize("config", CONFIGS)
def test_count_parameters_equals_the_built_model(config):
    model = iUNet(**config, verbose=0)
    counts = count_parameters(
        model._layout, depth=config.get("module_kwargs", {}).get("depth", 1),
        learnable_resampling=model.learnable_resampling,
        learnable_channel_mixing=model.learnable_channel_mixing,
        channel_mixing_freq=model.channel_mixing_freq,
        resampling_shared=config.get("resampling_kwargs", {}).get("shared", False))
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert [lv["total"] for lv in counts["levels"]] == [
        lv["parameters"] for lv in model.layout()["levels"]]


@pytest.mark.parametrize("config", CONFIGS[:5])
@pytest.mark.parametrize("mode", MODES)
def test_predictor_and_model_agree(config, mode):
    model = iUNet(**config, verbose=0)
    shape = (2, model.channels[0]) + (16,) * model.dim
    from_model = predict_step_memory(model, shape, mode=mode)
    from_layout = predict_step_memory(
        model._layout, shape, mode=mode, depth=config.get("module_kwargs", {}).get("depth", 1),
        learnable_resampling=model.learnable_resampling,
        channel_mixing_freq=model.channel_mixing_freq)
    if mode.startswith("unet"):
        assert from_model.parameters == from_layout.parameters
    else:
        assert from_model.parameters == 4 * sum(p.numel() for p in model.parameters())
        if model.learnable_channel_mixing:
            assert from_model.parameters == from_layout.parameters
    if model.learnable_channel_mixing:
        assert from_model.activations == from_layout.activations
