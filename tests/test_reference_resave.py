"""Re-saving a model that loaded an ``iunets`` 0.1 checkpoint.

Loading a reference checkpoint changes an ``iunet_nb.iUNet``'s structure (decoder
mixing placement, rebuilt couplings, GroupNorm ``eps = 1e-3``).  Its
``state_dict()`` records that structure in ``_metadata`` (``STRUCTURE_KEY``), so:

* it loads with ``strict=True`` into a fresh ``iunet_nb.iUNet`` of the same
  constructor arguments, also through ``torch.save`` / ``torch.load(weights_only=True)``,
  and into ``iunet_nb.networks.iUNet``; the outputs are bit for bit the same;
* without the record (a copied dict, an old checkpoint) the placement is read
  from the keys and a reference placement implies the reference's eps;
* this package's own checkpoints, with or without the record, load unchanged;
  into the reference-structured ``networks.iUNet`` they are a clear error.
"""
from __future__ import annotations

import io
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

iunets = pytest.importorskip("iunets", reason="the reference package iunets 0.1 is not installed")

import iunet_nb  # noqa: E402
from iunet_nb import networks  # noqa: E402
from iunet_nb.compat.checkpoints import STRUCTURE_KEY  # noqa: E402
from test_reference_gradients import configs  # noqa: E402

torch.set_num_threads(1)

CONFIGS = configs(max_blocks=3)  # the strategy of the gradient tests, with up to 3 blocks


def _reference_state(cfg: dict, seed: int) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = iunets.iUNet(**cfg, verbose=0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return ref.state_dict()


def _x(cfg: dict, seed: int) -> torch.Tensor:
    shape = (2, cfg["in_channels"], *([8 if cfg["dim"] < 3 else 4] * cfg["dim"]))
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _eps(model: torch.nn.Module) -> dict[str, float]:
    return {n: m.eps for n, m in model.named_modules() if isinstance(m, torch.nn.GroupNorm)}


def _through_a_file(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@settings(max_examples=25, deadline=None)
@given(cfg=CONFIGS, seed=st.integers(0, 2**16), file=st.booleans())
def test_a_converted_model_saves_and_loads_back_strictly(cfg, seed, file):
    converted = iunet_nb.iUNet(**cfg, verbose=0)
    converted.load_state_dict(_reference_state(cfg, seed), strict=True)
    state = converted.state_dict()
    if file:
        state = _through_a_file(state)
    x = _x(cfg, seed)
    with torch.no_grad():
        y = converted(x)
        for cls in (iunet_nb.iUNet, networks.iUNet):
            fresh = cls(**cfg, verbose=0)
            fresh.load_state_dict(state, strict=True)
            assert _eps(fresh) == _eps(converted), cls
            assert torch.equal(fresh(x), y), cls
            assert (fresh.inverse(y) - x).abs().max().item() <= 1e-4
            again = iunet_nb.iUNet(**cfg, verbose=0)  # and once more, from the re-saved model
            again.load_state_dict(fresh.state_dict(), strict=True)
            assert torch.equal(again(x), y), cls


def test_without_the_record_the_keys_show_the_reference_placement():
    cfg = dict(dim=2, in_channels=3, architecture=(2, 2), channel_mixing_freq=-1,
               module_kwargs={"block_depth": 2})
    converted = iunet_nb.iUNet(**cfg, verbose=0)
    converted.load_state_dict(_reference_state(cfg, 0), strict=True)
    bare = dict(converted.state_dict())  # a plain copy: no _metadata
    assert not hasattr(bare, "_metadata")
    fresh = iunet_nb.iUNet(**cfg, verbose=0)
    fresh.load_state_dict(bare, strict=True)
    assert fresh.mixing_placement == "reference" and set(_eps(fresh).values()) == {1e-3}
    x = _x(cfg, 0)
    with torch.no_grad():
        assert torch.equal(fresh(x), converted(x))


@settings(max_examples=15, deadline=None)
@given(cfg=CONFIGS, seed=st.integers(0, 2**16), record=st.booleans())
def test_own_checkpoints_load_unchanged(cfg, seed, record):
    cfg = {**cfg, "module_kwargs": {**cfg["module_kwargs"], "zero_init": False}}  # couplings that act
    torch.manual_seed(seed)
    own = iunet_nb.iUNet(**cfg, verbose=0)
    state = own.state_dict()
    if not record:  # a checkpoint written before the record existed
        del state._metadata[""][STRUCTURE_KEY]
    else:
        assert state._metadata[""][STRUCTURE_KEY]["mixing_placement"] == "mirrored"
    fresh = iunet_nb.iUNet(**cfg, verbose=0)
    fresh.load_state_dict(state, strict=True)
    assert getattr(fresh, "mixing_placement", "mirrored") == "mirrored" and _eps(fresh) == _eps(own)
    x = _x(cfg, seed)
    with torch.no_grad():
        assert torch.equal(fresh(x), own(x))


def test_own_mirrored_checkpoint_into_the_reference_structure_is_a_clear_error():
    cfg = dict(in_channels=4, architecture=(2, 2), dim=2, channel_mixing_freq=-1)
    own = iunet_nb.iUNet(**cfg, verbose=0).state_dict()
    with pytest.raises(ValueError, match=r"load it into an iunet_nb\.iUNet"):
        networks.iUNet(**cfg, verbose=0).load_state_dict(own)
