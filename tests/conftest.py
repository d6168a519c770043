"""Fixtures for the whole suite."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """Single-threaded torch: deterministic and fast when other processes share the two cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
