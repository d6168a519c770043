"""ResNet track on CUDA (marker ``gpu``; ``pytest -m gpu``): the fast path's compiled bf16 channels_last step through
the engine (teacher, student network and projector loss compiled), with fused SGD, never synchronising the host."""

from __future__ import annotations

import pytest
import torch
from torchdistill.core.distillation import get_distillation_box
from torchvision.models.resnet import BasicBlock, ResNet

from imagenet.benchmark import projector_box_config
from imagenet.fast import apply_fast_path
from projector_kd.engine.fast import CompiledOrEager

pytestmark = pytest.mark.gpu


def test_fast_step_is_compiled_bf16_channels_last_and_never_synchronises(
    gpu_device, sync_debug_errors, engine_loop, tmp_path
):
    torch.manual_seed(0)  # ResNet-10s (one block per stage): the mechanics of ResNet18 <- ResNet34, compiled faster
    teacher = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10).to(gpu_device).eval()
    student = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10).to(gpu_device)
    box = get_distillation_box(teacher, student, {}, projector_box_config(512, 512), gpu_device, None, False, 1)
    box.pre_epoch_process(epoch=0)
    settings = apply_fast_path(box, teacher, gpu_device, compile_models=True)
    assert settings.fused_optimizer and settings.channels_last
    if gpu_device.type == "cuda":
        assert settings.autocast_dtype == torch.bfloat16 and torch.backends.cudnn.benchmark
    loop = engine_loop(box, teacher, gpu_device, tmp_path, settings.autocast_dtype)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(8, 3, 64, 64, generator=generator).to(gpu_device)
    labels = torch.randint(0, 10, (8,), generator=generator).to(gpu_device)
    for _ in range(3):  # warm-up: compilation, cuDNN autotuning, the monitor's pinned buffers
        loop.train_step((images, labels, None))
    with sync_debug_errors(gpu_device):
        for _ in range(4):
            loop.train_step((images, labels, None))
    loop.finish_pending()
    for wrapped in (box.student_model.model, box.student_model.feature_loss, box.teacher_model):
        assert isinstance(wrapped, CompiledOrEager) and wrapped.compiled is not None  # no eager fallback
    assert loop.position.global_step == 7 and torch.isfinite(torch.tensor(loop.last_record.terms["loss"]))
