"""Fixtures for the whole suite."""
from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator

import pytest
import torch

HOST_READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__")


@pytest.fixture(autouse=True)
def _one_thread():
    """Single-threaded torch: deterministic and fast when other processes share the two cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


class HostRead(AssertionError):
    """A tensor's value was read to the host inside a :func:`no_host_reads` region."""


@contextlib.contextmanager
def _no_host_reads(allowed: Callable[[torch.Tensor], bool] = lambda tensor: False) -> Iterator[None]:
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def guarded(name: str, original: Callable) -> Callable:
        def read(self, *args, **kwargs):
            if allowed(self):
                return original(self, *args, **kwargs)
            raise HostRead(f"Tensor.{name} read a {tuple(self.shape)} {self.dtype} tensor to the host")
        return read

    for name, original in originals.items():
        setattr(torch.Tensor, name, guarded(name, original))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


@pytest.fixture
def no_host_reads() -> Callable:
    """``with no_host_reads(allowed):`` makes every read of a tensor's value to the host (what costs a GPU
    synchronisation: ``item``, ``tolist``, ``numpy``, ``cpu``, ``bool()``, ``float()``, ``int()``, ``index()``) raise
    :class:`HostRead`, except on tensors ``allowed(tensor)`` accepts — the host buffers a step monitor reads on purpose
    (``allowed = lambda t: any(t is b for b in monitor.host_buffers)``). Reads inside kernels (boolean masks,
    ``nonzero``) are invisible here: the GPU tests run the steps under ``torch.cuda.set_sync_debug_mode("error")``."""
    return _no_host_reads


@pytest.fixture
def gpu_device() -> torch.device:
    """The CUDA device for tests marked ``gpu``; they skip where CUDA is absent. ``PROJECTOR_KD_GPU_TESTS_ON_CPU=1``
    runs their bodies on the CPU instead (a dry run of the mechanics, without the CUDA-only assertions)."""
    if torch.cuda.is_available():
        return torch.device("cuda", 0)
    if os.environ.get("PROJECTOR_KD_GPU_TESTS_ON_CPU") == "1":
        return torch.device("cpu")
    pytest.skip("needs a CUDA GPU (none is visible here)")


@pytest.fixture
def sync_debug_errors() -> Callable:
    """``with sync_debug_errors(device):`` makes any CUDA call that synchronises the host raise (no-op on the CPU)."""
    @contextlib.contextmanager
    def errors(device: torch.device) -> Iterator[None]:
        if device.type != "cuda":
            yield
            return
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    return errors
