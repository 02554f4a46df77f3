"""Shared test set-up: one CPU thread (reproducible timings and memory), a seed fixture."""

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture
def rng_seed():
    """Seed torch's global generator with 0 and return the seed."""
    torch.manual_seed(0)
    return 0
