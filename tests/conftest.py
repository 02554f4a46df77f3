"""Shared test set-up: one CPU thread (reproducible timings and memory), a seed fixture."""

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture
def rng_seed():
    """Seed torch's global generator with 0 and return the seed."""
    torch.manual_seed(0)
    return 0


# Hypothesis profiles for the property tests (tests/test_properties.py):
# ``ci`` is the default (derandomized, sized to run in a few minutes);
# ``pytest --hypothesis-profile=thorough`` runs 10x as many random examples.
from hypothesis import HealthCheck, settings  # noqa: E402

_SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
settings.register_profile("ci", max_examples=200, derandomize=True, deadline=None, print_blob=True,
                          suppress_health_check=_SLOW_OK)
settings.register_profile("thorough", max_examples=2000, deadline=None, print_blob=True,
                          suppress_health_check=_SLOW_OK)
settings.load_profile("ci")
