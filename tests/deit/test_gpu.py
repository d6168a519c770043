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
from deit.engine import DeiTTrack
from projector_kd.engine.distributed import DistEnv
from projector_kd.engine.loop import TrainingLoop
from projector_kd.engine.steps import StepMonitor

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
    loop = build_train_step("release", device=gpu_device, **SMALL)
    track = loop.track
    if gpu_device.type == "cuda":
        assert track.autocast_dtype == torch.float16 and track.scaler is not None
    assert track.clip_scaled_grads and not track.fast
    images, labels = _batch(gpu_device)
    before = [p.detach().clone() for p in track.trained.parameters()]
    for _ in range(6):
        step = loop.train_step((images.clone(), labels))
        assert torch.isfinite(step.values).all()
    assert any(not torch.equal(a, p) for a, p in zip(before, track.trained.parameters()))
    assert all(torch.isfinite(p).all() for p in track.trained.parameters())


def test_fast_step_is_compiled_bf16_channels_last_and_never_synchronises(gpu_device, sync_debug_errors):
    torch.manual_seed(0)
    loop = build_train_step("fast", device=gpu_device, **SMALL)
    track = loop.track
    assert track.optimizer.param_groups[0]["fused"] and track.scaler is None
    if gpu_device.type == "cuda":
        assert track.autocast_dtype == torch.bfloat16 and track.channels_last
        assert torch.backends.cudnn.benchmark
        assert all(
            p.is_contiguous(memory_format=torch.channels_last)
            for p in track.student_module.conv_embed.parameters()
            if p.dim() == 4
        )
    images, labels = _batch(gpu_device)
    for _ in range(3):  # warm-up: compilation, cuDNN autotuning, the monitor's pinned buffers
        loop.train_step((images.clone(), labels))
    with sync_debug_errors(gpu_device):
        for _ in range(3, 7):
            loop.train_step((images.clone(), labels))
    loop.finish_pending()
    assert track.objective.compiled is not None and track.teacher_forward.compiled is not None  # no fallback
    assert loop.epoch_sums["steps"] == 7 and all(
        torch.isfinite(torch.tensor(v)) for v in loop.last_record.terms.values()
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
        single = build_train_step("release", device=gpu_device, **SMALL).track
        env = _OneRankDistributed(rank=0, world_size=1, local_rank=gpu_device.index or 0, device=gpu_device)
        track = DeiTTrack(
            single.cfg,
            env,
            single.student_module,
            single.projector_loss,
            single.teacher.teacher,
            None,
            None,
            None,
            1000,
        )
        loop = TrainingLoop(track, None)
        loop.monitor = StepMonitor(gpu_device, distributed=True)  # the all-reduced vote of a multi-rank run
        assert track.ddp is not None
        images, labels = _batch(gpu_device)
        loop.train_step((images.clone(), labels))
        assert not loop.monitor.stop_agreed(loop._stop_asked)
        loop.stop = _StopNow()
        loop.train_step((images.clone(), labels))
        assert not loop.monitor.stop_agreed(loop._stop_asked)  # the summed vote travels with the step's record
        loop.train_step((images.clone(), labels))
        assert loop.monitor.stop_agreed(loop._stop_asked)
        assert loop.epoch_sums["steps"] == 2 and math.isfinite(loop.last_record.terms["loss"])
