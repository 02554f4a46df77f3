"""Shared test set-up: one CPU thread (reproducible timings and memory), a seed fixture,
hypothesis profiles, and the ``cuda`` marker's skip where CUDA is not available."""

import pytest
import torch

torch.set_num_threads(1)

#: why ``cuda``-marked tests are skipped on this machine (None: they run)
CUDA_SKIP_REASON = None if torch.cuda.is_available() else (
    f"needs CUDA: torch.cuda.is_available() is False (torch {torch.__version__}, CUDA build "
    f"{torch.version.cuda or 'none'}); run `pytest -m cuda` or `bash benchmarks/gpu_check.sh` "
    "on a machine with a GPU and a CUDA build of torch")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip every test marked ``cuda`` when CUDA is not available, with :data:`CUDA_SKIP_REASON`."""
    if CUDA_SKIP_REASON is None:
        return
    skip = pytest.mark.skip(reason=CUDA_SKIP_REASON)
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture
def rng_seed():
    """Seed torch's global generator with 0 and return the seed."""
    torch.manual_seed(0)
    return 0


# Hypothesis profiles for the property tests (tests/test_properties.py):
# ``ci`` is the default (derandomized, sized to run in a few minutes);
# ``pytest --hypothesis-profile=thorough`` runs 10x as many random examples;
# ``--hypothesis-profile=small`` (20 examples) is a quick check, e.g. after an engine change.
from hypothesis import HealthCheck, settings  # noqa: E402

_SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
settings.register_profile("ci", max_examples=200, derandomize=True, deadline=None, print_blob=True,
                          suppress_health_check=_SLOW_OK)
settings.register_profile("thorough", max_examples=2000, deadline=None, print_blob=True,
                          suppress_health_check=_SLOW_OK)
settings.register_profile("small", max_examples=20, derandomize=True, deadline=None, print_blob=True,
                          suppress_health_check=_SLOW_OK)
settings.load_profile("ci")
