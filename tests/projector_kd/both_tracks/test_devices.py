"""--device, through both entry points: cpu, cuda and cuda:N that exist are accepted, anything else is refused in one
line before any work (the ResNet track used to run on the CPU, silently, for --device gpu); running out of GPU memory
in a step is one line saying what to lower, and the checkpoints already written stay."""

from __future__ import annotations

import pytest
import torch

from projector_kd.engine.checkpoint import load_checkpoint


@pytest.mark.parametrize("name", ["gpu", "cuda0", "CUDA", "cpu:0", "mps", ""])
def test_unknown_device_is_refused_in_one_line(track, tmp_path, name):
    result = track.run([*track.argv(tmp_path / "run"), "--device", name])
    assert result.returncode == 2
    assert result.stderr == f"error: --device {name!r} is not a device: use cpu, cuda or cuda:N\n"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", ["cuda", "cuda:0"])
def test_cuda_without_cuda_is_refused(track, tmp_path, monkeypatch, name):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = track.run([*track.argv(tmp_path / "run"), "--device", name])
    assert result.returncode == 2
    assert result.stderr == f"error: --device {name} requested but CUDA is not available here; use --device cpu\n"


@pytest.mark.parametrize(
    "visible, name, message",
    [
        (1, "cuda:1", "only 1 CUDA device is visible (cuda:0 to cuda:0)"),
        (2, "cuda:2", "only 2 CUDA devices are visible (cuda:0 to cuda:1)"),
    ],
    ids=["one-visible", "two-visible"],
)
def test_cuda_index_past_the_visible_gpus_is_refused(track, tmp_path, monkeypatch, visible, name, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    result = track.run([*track.argv(tmp_path / "run"), "--device", name])
    assert result.returncode == 2
    assert result.stderr == f"error: --device {name}: {message}\n"
    assert not (tmp_path / "run").exists()


def test_out_of_gpu_memory_in_a_step_is_one_line_with_what_to_lower(track, tmp_path, monkeypatch):
    engine = track.engine()
    real_forward = engine.forward

    def forward(self, batch, position):
        if position.global_step == track.steps_per_epoch + 1:  # epoch 1, after epoch 0's checkpoints
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 512.00 MiB. GPU 0 has 1 GiB free.")
        return real_forward(self, batch, position)

    monkeypatch.setattr(engine, "forward", forward)
    result = track.run(track.argv(tmp_path / "run", epochs=2))
    assert result.returncode == 2
    assert result.stderr == (
        f"error: out of GPU memory (an allocation of 512.00 MiB failed) — {track.out_of_memory_advice}, or add --fast "
        f"(bf16 activations); the checkpoints already written are intact\n"
    )
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pth")["epoch"] == 1
