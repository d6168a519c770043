"""Released-layout and project checkpoints: exact, safe loading with named mismatches."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from yacs.config import CfgNode

from deit.checkpoint import load_student_checkpoint
from deit.models import create_student
from projector_kd import ProjectorDistillLoss
from projector_kd.engine.checkpoint import CheckpointError


def release_checkpoint(model: torch.nn.Module, teacher_dim: int | None = None) -> dict:
    """A checkpoint as the release wrote it: model (the projector to ``teacher_dim`` inside it as
    ``distillation_loss.*``), optimizer, lr_scheduler, max_accuracy, epoch, a yacs CfgNode."""
    config = CfgNode({"MODEL": CfgNode({"TYPE": "deit", "NAME": "deit_tiny"}), "TRAIN": CfgNode({"EPOCHS": 300})})
    state = dict(model.state_dict())
    if teacher_dim is not None:
        projector = ProjectorDistillLoss(model.embed_dim, teacher_dim, distance="log_corr", eps=0.0)
        _randomise_buffers(projector)
        state.update({f"distillation_loss.{k}": v for k, v in projector.state_dict().items()})
    return {
        "model": state,
        "optimizer": {"state": {}, "param_groups": []},
        "lr_scheduler": {"last_epoch": 299},
        "max_accuracy": 77.2,
        "epoch": 299,
        "config": config,
    }


RELEASE_KEYS_OUTSIDE_BLOCKS = [
    "cls_token",
    "pos_embed",
    "conv_embed.conv.0.weight",
    "conv_embed.conv.1.weight",
    "conv_embed.conv.1.bias",
    "conv_embed.conv.1.running_mean",
    "conv_embed.conv.1.running_var",
    "conv_embed.conv.1.num_batches_tracked",
    "conv_embed.conv.3.weight",
    "conv_embed.conv.4.weight",
    "conv_embed.conv.4.bias",
    "conv_embed.conv.4.running_mean",
    "conv_embed.conv.4.running_var",
    "conv_embed.conv.4.num_batches_tracked",
    "conv_embed.conv.6.weight",
    "conv_embed.conv.7.weight",
    "conv_embed.conv.7.bias",
    "conv_embed.conv.7.running_mean",
    "conv_embed.conv.7.running_var",
    "conv_embed.conv.7.num_batches_tracked",
    "conv_embed.proj.weight",
    "conv_embed.proj.bias",
    "norm.weight",
    "norm.bias",
    "head.weight",
    "head.bias",
    "head_conv.weight",
    "head_conv.bias",
    "distillation_loss.embed.weight",
    "distillation_loss.embed.bias",
    "distillation_loss.bn_s.running_mean",
    "distillation_loss.bn_s.running_var",
    "distillation_loss.bn_s.num_batches_tracked",
    "distillation_loss.bn_t.running_mean",
    "distillation_loss.bn_t.running_var",
    "distillation_loss.bn_t.num_batches_tracked",
]


def _randomise_buffers(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for buffer in model.buffers():
            if buffer.is_floating_point():
                buffer.copy_(torch.rand_like(buffer) + 0.5)


def test_release_layout_loads_exactly_and_reproduces_logits(tmp_path):
    torch.manual_seed(0)
    source = create_student("tiny")
    _randomise_buffers(source)
    checkpoint = release_checkpoint(source, teacher_dim=3024)
    assert [k for k in checkpoint["model"] if not k.startswith("blocks.")] == RELEASE_KEYS_OUTSIDE_BLOCKS
    path = tmp_path / "ckpt_epoch_299.pth"
    torch.save(checkpoint, path)
    torch.manual_seed(1)
    target = create_student("tiny")
    report = load_student_checkpoint(target, path)
    assert report.loaded == sorted(source.state_dict())
    assert report.projector_skipped == sorted(
        k.removeprefix("distillation_loss.") for k in RELEASE_KEYS_OUTSIDE_BLOCKS if k.startswith("distillation_loss.")
    )
    assert report.meta == {"epoch": 299, "best_top1": 77.2}
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(target.eval()(images), source.eval()(images), rtol=0, atol=0)


def test_key_mismatch_is_refused_with_the_names(tmp_path):
    source = create_student("demo", num_classes=10)
    state = release_checkpoint(source, teacher_dim=512)
    state["model"]["blocks.0.attn.qkv_extra.weight"] = state["model"].pop("blocks.0.attn.qkv.weight")
    path = tmp_path / "renamed.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as error:
        load_student_checkpoint(create_student("demo", num_classes=10), path)
    message = str(error.value)
    assert str(path) in message
    assert "missing: blocks.0.attn.qkv.weight" in message and "unexpected: blocks.0.attn.qkv_extra.weight" in message


def test_other_width_and_other_num_classes_are_named(tmp_path):
    torch.save({"model": create_student("demo", num_classes=10, embed_dim=32).state_dict()}, tmp_path / "w32.pth")
    with pytest.raises(
        CheckpointError,
        match=r"w32.pth does not match the model \(ConvStemDeiT\): shape mismatch: cls_token \(1, 1, 32\) vs model",
    ):
        load_student_checkpoint(create_student("demo", num_classes=10), tmp_path / "w32.pth")
    torch.save({"model": create_student("demo", num_classes=5).state_dict()}, tmp_path / "c5.pth")
    with pytest.raises(CheckpointError, match=r"c5.pth was trained for 5 classes but the model has 10"):
        load_student_checkpoint(create_student("demo", num_classes=10), tmp_path / "c5.pth")


@pytest.mark.parametrize("width", [256, None])
def test_any_projector_or_none_is_left_out_and_prediction_is_exact(tmp_path, width):
    """Evaluation never needs the projector: a release file with a projector of any width, or none, loads the
    student exactly."""
    torch.manual_seed(0)
    source = create_student("demo", num_classes=10)
    path = tmp_path / "release.pth"
    torch.save(release_checkpoint(source, teacher_dim=width), path)
    target = create_student("demo", num_classes=10)
    report = load_student_checkpoint(target, path)
    assert len(report.projector_skipped) == (8 if width else 0)
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(target.eval()(images), source.eval()(images), rtol=0, atol=0)


def test_corrupt_and_truncated_files_name_the_file(tmp_path):
    model = create_student("demo", num_classes=10)
    good = tmp_path / "good.pth"
    torch.save({"model": model.state_dict()}, good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    for path in (truncated, garbage, tmp_path / "missing.pth"):
        with pytest.raises(CheckpointError, match=str(path)):
            load_student_checkpoint(model, path)
    torch.save({"not_model": 1}, tmp_path / "odd.pth")
    with pytest.raises(CheckpointError, match="odd.pth holds no model state dict"):
        load_student_checkpoint(model, tmp_path / "odd.pth")


class _RunsCode:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_crafted_pickle_is_refused_by_default_and_runs_nothing(tmp_path, run_python, one_error_line):
    model = create_student("demo", num_classes=10)
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"model": model.state_dict(), "payload": _RunsCode(str(marker))}, evil)
    with pytest.raises(CheckpointError, match=r"evil.pth needs unsafe unpickling \(it pickles posix.system\)"):
        load_student_checkpoint(model, evil)
    assert not marker.exists()
    result = run_python(
        "deit/main.py", "--model", "demo", "--ckpt", evil, "--device", "cpu", "--data-path", tmp_path, timeout=120
    )
    assert one_error_line(result).startswith(f"error: checkpoint {evil}")
    assert not marker.exists()
    load_student_checkpoint(model, evil, trusted=True)  # the explicit opt-in really unpickles
    assert marker.exists()
