"""The flow task: log-determinants against autograd Jacobians, inverses, bits/dim, the FrEIA baseline."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.autograd.functional import jacobian

from iunet_nb.apps import flow as FL
from iunet_nb.apps import get_task


def _perturb(module: torch.nn.Module, scale: float = 0.1, seed: int = 0) -> None:
    """Move every parameter away from its (identity) initialisation."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad and p.is_floating_point():
                p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _jacobian_logdet(fn, x: torch.Tensor) -> float:
    """``log |det d fn(x) / dx|`` for one sample, from the full autograd Jacobian."""
    shape = x.shape
    J = jacobian(lambda t: fn(t.reshape(shape)).reshape(-1), x.reshape(-1))
    sign, logabs = torch.linalg.slogdet(J)
    assert sign != 0
    return float(logabs)


def _tiny_iunet_flow() -> FL.IUNetFlow:
    torch.manual_seed(0)
    # conventional autograd: the Jacobian needs repeated backward passes through one graph
    flow = FL.IUNetFlow(blocks=1, hidden=4, disable_custom_gradient=True).double()
    _perturb(flow)
    return flow


def test_iunet_flow_logdet_equals_autograd_jacobian():
    flow = _tiny_iunet_flow()
    x = 0.1 + 0.8 * torch.rand(1, 1, 8, 8, dtype=torch.float64)
    z, logdet = flow(x)
    assert z.shape == (1, 4, 4, 4) and logdet.shape == (1,)
    assert abs(logdet.item()) > 1  # non-trivial
    assert logdet.item() == pytest.approx(_jacobian_logdet(lambda t: flow(t)[0], x), abs=1e-8)


def test_iunet_inside_the_flow_is_volume_preserving():
    flow = _tiny_iunet_flow()
    body = flow.layers[3]
    assert isinstance(body, FL.VolumePreserving)
    v = torch.randn(1, 4, 4, 4, dtype=torch.float64)
    # float32-rounded orthogonal kernels cast to float64: |det| = 1 to ~1e-6
    assert _jacobian_logdet(lambda t: body(t)[0], v) == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("layer", [
    FL.LogitTransform(0.05), FL.ActNorm(4), FL.AffineCoupling(4, hidden=6), FL.AffineCoupling(5, hidden=6),
])
def test_each_layer_logdet_and_inverse(layer):
    layer = layer.double()
    _perturb(layer, 0.3)
    c = 1 if isinstance(layer, FL.LogitTransform) else (5 if getattr(layer, "split", 0) == 3 else 4)
    x = 0.1 + 0.8 * torch.rand(1, c, 3, 3, dtype=torch.float64)
    y, ld = layer(x)
    assert ld.shape == (1,)
    assert ld.item() == pytest.approx(_jacobian_logdet(lambda t: layer(t)[0], x), abs=1e-8)
    assert torch.allclose(layer.inverse(y), x, atol=1e-12)


def test_freia_baseline_logdet_and_inverse():
    np.random.seed(0)
    torch.manual_seed(0)
    flow = FL.build_freia_realnvp(blocks=2, hidden=4).double()
    _perturb(flow)
    x = 0.1 + 0.8 * torch.rand(1, 1, 8, 8, dtype=torch.float64)
    z, ld = flow(x)
    assert ld.item() == pytest.approx(_jacobian_logdet(lambda t: flow(t)[0], x), abs=1e-8)
    assert torch.allclose(flow.inverse(z), x, atol=1e-10)


def test_fused_engine_gives_the_same_loss_gradients_as_autograd():
    torch.manual_seed(1)
    fused = FL.IUNetFlow(blocks=1, hidden=4).double()
    _perturb(fused)
    plain = FL.IUNetFlow(blocks=1, hidden=4, disable_custom_gradient=True).double()
    plain.load_state_dict(fused.state_dict())
    x = FL.dequantize(torch.randint(0, 17, (3, 1, 8, 8)).double())
    grads = []
    for flow in (fused, plain):
        flow.zero_grad()
        FL.flow_loss(flow, x).backward()
        grads.append([p.grad.clone() for p in flow.parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-10)
    z, _ = fused(x)
    assert torch.allclose(fused.inverse(z), x, atol=1e-10)


def test_bits_per_dim_hand_computed():
    z = torch.zeros(2, 1, 1, 1)
    ld = torch.tensor([0.0, math.log(2)])
    bpd = FL.bits_per_dim(z, ld)
    base = 0.5 * math.log2(2 * math.pi) + math.log2(17)
    assert bpd[0].item() == pytest.approx(base)
    assert bpd[1].item() == pytest.approx(base - 1)  # doubling the density saves one bit


def test_dequantize_stays_in_its_bin():
    v = torch.arange(17.0).repeat(50)
    x = FL.dequantize(v, torch.Generator().manual_seed(0))
    assert torch.equal(torch.floor(x * 17), v)


def test_digits_split_is_disjoint_and_deterministic():
    train, val = FL.split_digits(0)
    assert train.shape[1:] == (1, 8, 8) and train.shape[0] + val.shape[0] == 1797
    assert float(train.max()) == 16 and float(train.min()) == 0
    train2, val2 = FL.split_digits(0)
    assert torch.equal(val, val2)
    with pytest.raises(ValueError, match="val_fraction"):
        FL.split_digits(0, 1.5)


def test_samples_have_the_data_shape():
    flow = FL.IUNetFlow(blocks=1, hidden=4)
    s = flow.sample(5, temperature=0.7, generator=torch.Generator().manual_seed(0))
    assert s.shape == (5, 1, 8, 8) and 0 <= float(s.min()) and float(s.max()) <= 1


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="alpha"):
        FL.LogitTransform(0.5)
    with pytest.raises(ValueError, match="channels"):
        FL.IUNetFlow(channels=(2, 8))
    with pytest.raises(ValueError, match="blocks"):
        FL.IUNetFlow(blocks=0)


@pytest.mark.slow
def test_task_trains_through_the_loop():
    from iunet_nb.train import train

    assert get_task("flow") is FL.TASK
    run = train("flow", epochs=1, batch_size=128, lr=1e-2, progress=False, blocks=1, hidden=8)
    assert run.history[-1]["bpd"] < math.log2(17)
    run = train("flow", epochs=1, batch_size=256, progress=False, arch="realnvp", blocks=2, hidden=8)
    assert math.isfinite(run.history[-1]["bpd"])


# ----------------------------------------------------------------------------- memorisation
def test_nearest_neighbours_finds_a_planted_duplicate_at_distance_zero():
    train, test = FL.split_digits(0)
    g = torch.Generator().manual_seed(0)
    samples = torch.rand(5, 1, 8, 8, generator=g)  # noise: far from every digit
    planted = 123
    samples[2] = (train[planted] + 0.5) / FL.LEVELS  # a sample that copies training digit 123
    nb = FL.memorisation_check(samples, train, test)
    assert nb.sample_distance.shape == (5,) and nb.sample_index.shape == (5,)
    assert nb.nearest.shape == (5, 1, 8, 8) and nb.test_distance.shape == (test.shape[0],)
    assert int(nb.sample_index[2]) == planted or torch.equal(train[nb.sample_index[2]], train[planted])
    assert float(nb.sample_distance[2]) < 1e-5
    assert torch.equal(nb.nearest[2], train[planted])
    # the others are the noise's distances, well above the held-out digits' typical one
    others = torch.cat([nb.sample_distance[:2], nb.sample_distance[3:]])
    assert float(others.min()) > float(nb.test_distance.median()) > 0
    s = nb.summary()
    assert s["sample_min"] < 1e-5 and s["closer_than_any_test"] == pytest.approx(0.2)


def test_nearest_neighbours_exact_and_brute_force():
    g = torch.Generator().manual_seed(1)
    refs = torch.randint(0, 17, (50, 1, 8, 8), generator=g).float()
    queries = torch.cat([refs[[7, 31]], torch.randint(0, 17, (3, 1, 8, 8), generator=g).float()])
    d, i = FL.nearest_neighbours(queries, refs, chunk=2)
    assert d.dtype == torch.float64 and d[:2].tolist() == [0.0, 0.0] and i[:2].tolist() == [7, 31]
    brute = torch.cdist(queries.flatten(1).double(), refs.flatten(1).double(),
                        compute_mode="donot_use_mm_for_euclid_dist")
    assert torch.allclose(d, brute.min(1).values) and torch.equal(i, brute.argmin(1))


def test_memorisation_check_errors_name_the_argument():
    train, test = FL.split_digits(0)
    with pytest.raises(ValueError, match="samples must lie in"):
        FL.memorisation_check(train[:3], train, test)  # levels, not flow outputs
    with pytest.raises(ValueError, match="test must be"):
        FL.memorisation_check(torch.rand(2, 1, 8, 8), train, test[:, :, :4])
    with pytest.raises(ValueError, match="same image shape"):
        FL.nearest_neighbours(torch.rand(2, 64), torch.rand(3, 63))
