"""Distributed mechanics on CUDA (marker ``gpu``; ``pytest -m gpu``): a one-rank NCCL process group, a DDP step with a
fused optimizer skipping on ``found_inf``, and the step monitor's stop vote reduced asynchronously."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from projector_kd.engine.steps import StepMonitor, non_finite_flag, step_unless

pytestmark = pytest.mark.gpu


def test_one_rank_nccl_ddp_step_and_stop_vote(gpu_device, one_rank_group):
    cuda = gpu_device.type == "cuda"
    with one_rank_group(gpu_device):
        torch.manual_seed(0)
        model = nn.parallel.DistributedDataParallel(
            nn.Linear(8, 4).to(gpu_device), device_ids=[gpu_device.index] if cuda else None
        )
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
        loss = model(torch.randn(16, 8, device=gpu_device)).square().mean()
        loss.backward()
        before = [p.detach().clone() for p in model.parameters()]
        step_unless(optimizer, non_finite_flag(torch.full((1,), float("nan"), device=gpu_device)))
        assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))  # skipped on the device
        step_unless(optimizer, non_finite_flag(loss))
        assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
        monitor = StepMonitor(gpu_device, distributed=True)
        monitor.push(0, ["loss"], loss.detach().reshape(1), non_finite_flag(loss), False)
        monitor.push(1, ["loss"], loss.detach().reshape(1), non_finite_flag(loss), True)
        first, second = monitor.drain()
        assert (first.stop, second.stop, first.bad) == (False, True, False)
        assert first.terms["loss"] == pytest.approx(loss.item(), rel=1e-6)
