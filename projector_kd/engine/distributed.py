"""torch.distributed set-up from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from .errors import UserError
from .runs import counted
from .signals import requested_stop

T = TypeVar("T")
TIMEOUT_VARIABLE = "PROJECTOR_KD_COLLECTIVE_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 1800.0  # PyTorch's own default for a process group
STOP_GRACE_S = 10.0  # after a stop signal, how long a rank still waits for the others (torchrun kills after 30 s)
_shared: dict[str, Any] = {}  # the process group's store, kept to tell the other ranks about a user error


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
            raise UserError(
                f"--device {name}: only {counted(count, 'CUDA device')} {'is' if count == 1 else 'are'} visible "
                f"(cuda:0 to cuda:{count - 1})"
            )
    return device


def collective_timeout() -> float:
    """Seconds a collective of a distributed run may wait for the other processes:
    ``$PROJECTOR_KD_COLLECTIVE_TIMEOUT_S`` or :data:`DEFAULT_TIMEOUT_S`."""
    value = os.environ.get(TIMEOUT_VARIABLE)
    if value is None:
        return DEFAULT_TIMEOUT_S
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < float("inf"):
        raise UserError(f"{TIMEOUT_VARIABLE}={value!r} is not a positive number of seconds")
    return seconds


def init_distributed(device: str | None = None) -> DistEnv:
    """Join the process group torchrun describes (NCCL on CUDA, gloo on CPU); a plain run gets world size 1.

    ``device``: see :func:`parse_device`. Under torchrun each process uses ``cuda:LOCAL_RANK``. Collectives time out
    after :func:`collective_timeout` seconds.
    """
    _shared.clear()
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
        timeout = timedelta(seconds=collective_timeout())
        # torchrun's env:// rendezvous, as init_process_group performs it, keeping the store to share user errors
        store, rank, world_size = next(dist.rendezvous("env://", rank=rank, world_size=world_size, timeout=timeout))
        store.set_timeout(timeout)
        dist.init_process_group(
            backend=backend,
            store=dist.PrefixStore("default_pg", store),
            rank=rank,
            world_size=world_size,
            timeout=timeout,
            device_id=torch_device if wants_cuda else None,
        )
        _shared["store"] = store
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=torch_device)


def is_main_process() -> bool:
    """True on global rank 0 (and in a plain, non-distributed run)."""
    return not dist.is_initialized() or dist.get_rank() == 0


def _distributed() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def wait_for(work: Any, what: str) -> None:
    """Wait for the asynchronous collective ``work`` (``what`` it is, for messages) while this process still reacts:
    a stop signal (:func:`projector_kd.engine.signals.requested_stop`) that is not followed by the other processes
    within :data:`STOP_GRACE_S` seconds, or no completion within :func:`collective_timeout`, ends the run in one line
    naming the rank and the collective (a blocking wait would sit in C++, where neither the signal nor a timeout
    message reaches Python)."""
    started = time.monotonic()
    deadline = started + collective_timeout()
    stop_seen: float | None = None
    pause = 1e-4
    while not work.is_completed():
        now = time.monotonic()
        stop = requested_stop()
        if stop is not None and stop_seen is None:
            stop_seen = now
        rank = dist.get_rank() if dist.is_initialized() else 0
        if stop_seen is not None and now - stop_seen > STOP_GRACE_S:
            raise UserError(
                f"stopped by {stop.signal_name} while rank {rank} waited {now - started:.0f} s for the other processes "
                f"({what}), which did not follow — no checkpoint was written at this point; rerun the same command "
                f"to continue from the last one"
            )
        if now > deadline:
            raise UserError(
                f"rank {rank} waited {now - started:.0f} s for the other processes ({what}) — one of them stopped, "
                f"hangs or runs another step (check every process's output); rerun the same command to continue from "
                f"the last checkpoint (${TIMEOUT_VARIABLE} sets the wait)"
            )
        time.sleep(pause)
        pause = min(2 * pause, 0.05)
    work.wait()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks in place (no-op without a process group); returns it."""
    if _distributed():
        wait_for(dist.all_reduce(tensor, op=dist.ReduceOp.SUM, async_op=True), "summing over the processes")
    return tensor


def barrier(what: str = "waiting for every process") -> None:
    """Wait for all ranks (no-op without a process group), reacting to stop signals and timing out in one line
    (:func:`wait_for`)."""
    if _distributed():
        wait_for(dist.barrier(async_op=True), what)


def all_gather(value: Any, what: str) -> list[Any]:
    """Every rank's ``value`` (picklable), in rank order; ``[value]`` without a process group. The ranks first meet at
    a :func:`barrier`, so the gathering itself never waits for a rank that is missing."""
    if not _distributed():
        return [value]
    barrier(what)
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def check_ranks_agree(facts: dict[str, Any], what: str) -> None:
    """In a distributed run, that every rank sees the same ``what`` (e.g. "config", "dataset"): ``facts`` (name ->
    value) are gathered from every rank; the first that differs from rank 0's is a UserError on every rank naming the
    rank, the fact and both values (a rank that trains other data or settings would hang the others later)."""
    gathered = all_gather(facts, f"comparing the {what} every process sees")
    for rank, other in enumerate(gathered[1:], start=1):
        for name in sorted(set(gathered[0]) | set(other)):
            mine, theirs = gathered[0].get(name), other.get(name)
            if mine != theirs:
                raise UserError(
                    f"rank {rank} sees another {what} than rank 0: {name} is {theirs} on rank {rank} but {mine} on "
                    f"rank 0 — every process must run the same command on the same data (check each node's copy of "
                    f"the dataset and the config)"
                )


def cleanup() -> None:
    """Leave the process group if one was joined."""
    if dist.is_initialized():
        dist.destroy_process_group()


def run_on_main(work: Callable[[], T]) -> T | None:
    """Run ``work`` on rank 0 while the other ranks wait; a :class:`UserError` it raises is raised on every rank, so
    the whole run ends with that one line (instead of the other ranks failing in their next collective). Returns
    ``work()``'s result on rank 0, None elsewhere."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return work()
    result, message = None, [None]
    if dist.get_rank() == 0:
        try:
            result = work()
        except UserError as error:
            message = [str(error)]
    barrier("waiting for rank 0 to prepare the run")
    dist.broadcast_object_list(message, src=0)
    if message[0] is not None:
        raise UserError(message[0])
    return result


def _error_key() -> str:
    return f"projector_kd/user_error/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"


def report_user_error(message: str) -> bool:
    """Whether this process prints the user error ``message``. In a distributed run the first rank to report an error
    prints it and shares it through the process group's store (other ranks then end quietly, see
    :func:`peer_reported_error`); before the process group exists every rank hits the same configuration error and
    rank 0 prints it."""
    store = _shared.get("store")
    if store is None:
        return os.environ.get("RANK", "0") in ("0", "") or os.environ.get("WORLD_SIZE", "1") in ("1", "")
    try:
        first = store.add(_error_key() + "/count", 1) == 1
        if first:
            store.set(_error_key(), message)
        return first
    except Exception:  # noqa: BLE001 - the store is gone with its host: print here
        return True


def _exit_quietly(signum: int, frame: Any) -> None:
    raise SystemExit(2)


def peer_reported_error(timeout_s: float = 10.0) -> str | None:
    """In a distributed run whose collective just failed: the user error another rank reported (waiting up to
    ``timeout_s`` for it to arrive), or None."""
    store = _shared.get("store")
    if store is None:
        return None
    if threading.current_thread() is threading.main_thread():
        # the launcher stops the remaining workers with SIGTERM once one has failed: end quietly with status 2 then
        signal.signal(signal.SIGTERM, _exit_quietly)
    try:
        store.wait([_error_key()], timedelta(seconds=timeout_s))
        return store.get(_error_key()).decode()
    except Exception:  # noqa: BLE001 - no report in time, or the store is gone
        return None
