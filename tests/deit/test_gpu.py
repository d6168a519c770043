"""DeiT track on CUDA (marker ``gpu``; ``pytest -m gpu``): the release recipe's fp16 step with its GradScaler and
clipping, the fast path's compiled bf16 channels_last step without host synchronisation, pinned-memory loading, and
the trainer under a one-rank NCCL process group (DDP, the all-reduced stop vote)."""

from __future__ import annotations

import math

import pytest
import torch

from deit.benchmark import build_train_step
from deit.config import load_config
from deit.datasets import build_loaders
from deit.engine import Trainer
from projector_kd.engine.distributed import DistEnv

pytestmark = pytest.mark.gpu
SMALL = dict(
    model="demo",
    batch_size=8,
    img_size=32,
    teacher="resnet10t",
    num_classes=10,
    embed_dim=32,
    depth=2,
    num_heads=2,
    stem_channels=8,
)


def _batch(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(8, 3, 32, 32, generator=generator).to(device), torch.arange(8).to(device)


def test_release_fp16_step_with_grad_scaler_clips_the_scaled_gradients(gpu_device):
    torch.manual_seed(0)
    step, trainer = build_train_step("release", device=gpu_device, **SMALL)
    if gpu_device.type == "cuda":
        assert trainer.autocast_dtype == torch.float16 and trainer.scaler is not None
    assert trainer.clip_scaled_grads and not trainer.fast
    images, labels = _batch(gpu_device)
    before = [p.detach().clone() for p in trainer.student.parameters()]
    for index in range(6):
        trainer.global_step = index
        values = step(images.clone(), labels)
        assert torch.isfinite(values["loss"])
    assert any(not torch.equal(a, p) for a, p in zip(before, trainer.student.parameters()))
    assert all(torch.isfinite(p).all() for p in trainer.student.parameters())


def test_fast_step_is_compiled_bf16_channels_last_and_never_synchronises(gpu_device, sync_debug_errors):
    torch.manual_seed(0)
    step, trainer = build_train_step("fast", device=gpu_device, **SMALL)
    assert trainer.optimizer.param_groups[0]["fused"] and trainer.scaler is None
    if gpu_device.type == "cuda":
        assert trainer.autocast_dtype == torch.bfloat16 and trainer.channels_last
        assert torch.backends.cudnn.benchmark
        assert all(
            p.is_contiguous(memory_format=torch.channels_last)
            for p in trainer.student.conv_embed.parameters()
            if p.dim() == 4
        )
    images, labels = _batch(gpu_device)
    for index in range(3):  # warm-up: compilation, cuDNN autotuning, the monitor's pinned buffers
        trainer.global_step = index
        step(images.clone(), labels)
    with sync_debug_errors(gpu_device):
        for index in range(3, 7):
            trainer.global_step = index
            step(images.clone(), labels)
    trainer.finish_pending()
    assert trainer.objective.compiled is not None and trainer.teacher_forward.compiled is not None  # no fallback
    assert trainer.epoch_sums["steps"] == 7 and all(
        torch.isfinite(torch.tensor(v)) for v in trainer.last_record.terms.values()
    )


def test_pinned_memory_loader_feeds_non_blocking_copies(gpu_device, tiny_config, image_folder):
    cfg = load_config("demo", str(tiny_config), {"data.path": str(image_folder), "data.num_workers": 2})
    loader, _ = build_loaders(cfg, 0, 1, pin_memory=gpu_device.type == "cuda")
    loader.sampler.set_epoch(0)
    batches = 0
    for images, labels in loader:
        if gpu_device.type == "cuda":
            assert images.is_pinned() and labels.is_pinned()
        moved = images.to(gpu_device, non_blocking=True)
        moved_labels = labels.to(gpu_device, non_blocking=True)
        if gpu_device.type == "cuda":
            torch.cuda.synchronize(gpu_device)
        assert torch.equal(moved.cpu(), images) and torch.equal(moved_labels.cpu(), labels)
        batches += 1
    assert batches == len(loader) > 1


class _OneRankDistributed(DistEnv):
    """One process that still takes the distributed code paths (DDP wrapping, the all-reduced stop vote)."""

    @property
    def distributed(self) -> bool:
        return True


class _StopNow:
    requested = True
    signal_name = "test"


def test_one_rank_nccl_ddp_trainer_steps_and_agrees_to_stop(gpu_device, one_rank_group):
    with one_rank_group(gpu_device):
        torch.manual_seed(0)
        _, single = build_train_step("release", device=gpu_device, **SMALL)
        env = _OneRankDistributed(rank=0, world_size=1, local_rank=gpu_device.index or 0, device=gpu_device)
        trainer = Trainer(single.cfg, env, single.student, single.teacher.teacher, steps_per_epoch=1000)
        assert trainer.ddp is not None and trainer.monitor.distributed
        images, labels = _batch(gpu_device)
        trainer.global_step = 0
        trainer.train_step(images.clone(), labels)
        assert not trainer._stop_agreed()
        trainer.stop = _StopNow()
        trainer.global_step = 1
        trainer.train_step(images.clone(), labels)
        assert not trainer._stop_agreed()  # the summed vote travels with the step's record, read at the next step
        trainer.global_step = 2
        trainer.train_step(images.clone(), labels)
        assert trainer._stop_agreed()
        assert trainer.epoch_sums["steps"] == 2 and math.isfinite(trainer.last_record.terms["loss"])
