"""A training step's checks without host synchronisation: skip a bad update on the device, read its values later.

Each step puts its loss terms, a ``found_inf`` flag (1.0 when a term or the gradient norm is NaN/inf) and, in a
distributed run, the ranks' stop vote into one device vector. :class:`StepMonitor` copies that vector to (pinned)
host memory with a non-blocking copy and a CUDA event, and hands it back one step later, after the next step's
forward/backward has been queued, so the host never waits for the GPU to drain.

A bad step is never applied: a *fused* optimizer (``fused=True`` AdamW/Adam/SGD) reads ``optimizer.found_inf``, the
attribute :class:`torch.amp.GradScaler` uses to talk to it, and skips the whole update on the device — weights,
moments and (Adam) step counter (``torch/optim/adam.py`` ``_fused_adam``). When step k's record says it was bad, the
caller raises before applying step k+1, so no update was applied at step k or after it. Non-fused optimizers (the
release recipes' foreach/for-loop kernels) take no ``found_inf`` (their step functions assert it is None), and
``GradScaler.step`` itself reads ``found_inf`` to the host (``.item()``) for them: there :func:`skips_on_device` is
false and the caller checks the step's values on the host before applying it, one host read per step.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .distributed import wait_for


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step()`` honours ``optimizer.found_inf`` (every param group runs the fused kernels)."""
    return all(group.get("fused") for group in optimizer.param_groups)


def non_finite_flag(*tensors: torch.Tensor) -> torch.Tensor:
    """``found_inf`` for the optimizer: a 0-dim float32 tensor (as GradScaler makes it; the fused Adam step subtracts
    it from each step counter), 1.0 when any entry of ``tensors`` is NaN/inf."""
    return torch.stack([~torch.isfinite(t.detach()).all() for t in tensors]).any().float()


def step_unless(optimizer: torch.optim.Optimizer, found_inf: torch.Tensor) -> None:
    """``optimizer.step()`` that applies nothing where ``found_inf`` is 1, decided on the device (fused only)."""
    optimizer.found_inf = found_inf
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf


@dataclass(frozen=True)
class StepRecord:
    """One step's values on the host: ``terms`` by name, whether it was bad, whether any rank asked to stop."""

    step: Any
    terms: dict[str, float]
    bad: bool
    stop: bool


class StepMonitor:
    """Per-step device values copied to the host without waiting; each is read once its copy has landed.

    ``push(step, names, values, found_inf, stop_requested)`` queues step ``step``'s record; ``pop()`` returns the
    oldest queued record (waiting only for its own copy, not for later work); ``drain()`` returns all of them. In a
    distributed run the stop vote is summed over ranks by an asynchronous all-reduce that the record's copy waits for
    on the device, so every rank reads the same decision one step later; alone, the vote is the local flag.
    :meth:`stop_agreed` is the one rule both tracks stop by.
    """

    def __init__(self, device: torch.device, distributed: bool = False) -> None:
        self.device = device
        self.distributed = distributed
        self.cuda = device.type == "cuda"
        self.pending: deque = deque()
        self.host_buffers: list[torch.Tensor] = []  # where records land; the only tensors :meth:`pop` reads
        self._next_buffer = 0
        self.stop_voted = False  # a record read so far carried a stop vote

    def _host_buffer(self, length: int) -> torch.Tensor:
        """One of two reusable host buffers (pinned on CUDA): a record is read before the next-but-one is copied."""
        if not self.host_buffers or self.host_buffers[0].numel() != length:
            self.host_buffers = [torch.empty(length, dtype=torch.float64, pin_memory=self.cuda) for _ in range(2)]
        buffer = self.host_buffers[self._next_buffer]
        self._next_buffer = 1 - self._next_buffer
        return buffer

    def push(
        self, step: Any, names: Sequence[str], values: torch.Tensor, found_inf: torch.Tensor, stop_requested: bool
    ) -> None:
        """Queue step ``step``: ``values`` (1-D, one per name) and ``found_inf`` (one element) are device tensors."""
        parts = [values.detach().double().reshape(-1), found_inf.detach().double().reshape(-1)]
        if self.distributed:
            vote = torch.full((1,), float(stop_requested), dtype=torch.float64, device=self._vote_device())
            work = dist.all_reduce(vote, op=dist.ReduceOp.SUM, async_op=True)
            if vote.device.type == "cuda":
                work.wait()  # NCCL: a stream wait, not a host one
            else:
                wait_for(work, "the stop vote of a training step")
            parts.append(vote.to(self.device, non_blocking=True))
        if len(self.pending) >= 2:  # both host buffers hold unread records: read the oldest before reusing its buffer
            raise RuntimeError("StepMonitor: pop() the queued records before pushing more than two")
        vector = torch.cat(parts)
        host = self._host_buffer(vector.numel())
        host.copy_(vector, non_blocking=True)
        event = None
        if self.cuda:
            event = torch.cuda.Event()
            event.record()
        self.pending.append((step, list(names), host, event, None if self.distributed else stop_requested))

    def _vote_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    def pop(self) -> StepRecord | None:
        """The oldest queued record (None when none is queued), once its copy has reached the host."""
        if not self.pending:
            return None
        step, names, host, event, local_stop = self.pending.popleft()
        if event is not None:
            event.synchronize()  # waits for this record's copy only; the GPU keeps running the queued work
        values = host.tolist()
        stop = local_stop if local_stop is not None else values[len(names) + 1] > 0
        self.stop_voted = self.stop_voted or stop
        return StepRecord(step=step, terms=dict(zip(names, values)), bad=values[len(names)] > 0, stop=stop)

    def stop_agreed(self, requested: bool) -> bool:
        """Stop after this step? Alone: when ``requested`` (this step's poll of the stop flag), at once. Distributed:
        once a record read so far carries any rank's vote (up to a step late) — every rank reads the same sum, so
        all ranks stop after the same step."""
        return self.stop_voted if self.distributed else requested

    def drain(self) -> list[StepRecord]:
        """Every queued record, oldest first (waits for the device: for checkpoints, epoch ends and log lines)."""
        records = []
        while self.pending:
            records.append(self.pop())
        return records
