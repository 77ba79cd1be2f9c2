"""Shared fixtures for the method tests (one torch thread is set suite-wide in tests/conftest.py)."""
import pytest
import torch

from atelier.core.models import ModelRegistry


@pytest.fixture(scope="module")
def model():
    return ModelRegistry().load_sd("toy")


@pytest.fixture(scope="module")
def image():
    torch.manual_seed(0)
    return torch.rand(1, 3, 64, 64) * 2 - 1
