"""torch.distributed set-up from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)."""
from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from .errors import UserError


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: its global rank, the world size, its local rank and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise UserError(f"environment variable {name}={value!r} is not an integer (set by torchrun)") from None


DEVICE_NAMES = "cpu, cuda or cuda:N"
_DEVICE_PATTERN = re.compile(r"cpu|cuda(:[0-9]+)?")


def is_device_name(name: str) -> bool:
    """True for the device names both entry points accept: ``cpu``, ``cuda``, ``cuda:N``."""
    return bool(_DEVICE_PATTERN.fullmatch(name))


def parse_device(name: str | None) -> torch.device | None:
    """``--device``: ``cpu``, ``cuda`` or ``cuda:N`` as a ``torch.device``; None stays None (CUDA when available).

    Anything else, CUDA on a machine without it, or an index past the visible GPUs is a :class:`UserError`.
    """
    if name is None:
        return None
    if not is_device_name(name):
        raise UserError(f"--device {name!r} is not a device: use {DEVICE_NAMES}")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name} requested but CUDA is not available here; use --device cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise UserError(f"--device {name}: only {count} CUDA device(s) are visible (cuda:0 to cuda:{count - 1})")
    return device


def init_distributed(device: str | None = None) -> DistEnv:
    """Join the process group torchrun describes (NCCL on CUDA, gloo on CPU); a plain run gets world size 1.

    ``device``: see :func:`parse_device`. Under torchrun each process uses ``cuda:LOCAL_RANK``.
    """
    rank = _env_int("RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    requested = parse_device(device)
    wants_cuda = torch.cuda.is_available() if requested is None else requested.type == "cuda"
    if wants_cuda:
        requested_index = requested.index if requested is not None else None
        torch_device = torch.device("cuda", local_rank if world_size > 1 else (requested_index or 0))
        torch.cuda.set_device(torch_device)
    else:
        torch_device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if wants_cuda else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size,
                                device_id=torch_device if wants_cuda else None)
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=torch_device)


def is_main_process() -> bool:
    """True on global rank 0 (and in a plain, non-distributed run)."""
    return not dist.is_initialized() or dist.get_rank() == 0


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks in place (no-op without a process group); returns it."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier() -> None:
    """Wait for all ranks (no-op without a process group)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def cleanup() -> None:
    """Leave the process group if one was joined."""
    if dist.is_initialized():
        dist.destroy_process_group()


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed python, numpy and torch (all devices) with ``seed + rank``."""
    value = seed + rank
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)
