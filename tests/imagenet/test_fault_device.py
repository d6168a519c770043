"""--device accepts cpu, cuda and cuda:N that exist, and refuses anything else in one line (the ResNet track used to
run on the CPU, silently, for --device gpu)."""

from __future__ import annotations

import pytest
import torch


@pytest.mark.parametrize("name", ["gpu", "cuda0", "CUDA", "cpu:0", "mps", ""])
def test_unknown_device_is_refused_in_one_line(make_recipe, cli, tmp_path, name):
    status, _, err = cli("--config", make_recipe("run", method="baseline"), "--device", name)
    assert status == 2
    assert err == f"error: --device {name!r} is not a device: use cpu, cuda or cuda:N\n"
    assert not (tmp_path / "run").exists()


def test_cuda_without_cuda_is_refused(make_recipe, cli, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    status, _, err = cli("--config", make_recipe("run", method="baseline"), "--device", "cuda")
    assert status == 2
    assert err == "error: --device cuda requested but CUDA is not available here; use --device cpu\n"


def test_cuda_index_past_the_visible_gpus_is_refused(make_recipe, cli, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    status, _, err = cli("--config", make_recipe("run", method="baseline"), "--device", "cuda:1")
    assert status == 2
    assert err == "error: --device cuda:1: only 1 CUDA device is visible (cuda:0 to cuda:0)\n"
    assert not (tmp_path / "run").exists()


def test_out_of_gpu_memory_in_a_step_is_one_line_with_what_to_lower(make_recipe, cli, tmp_path, monkeypatch):
    from imagenet.engine import BoxTrack

    real_forward = BoxTrack.forward

    def forward(self, batch, position):
        if position.global_step == 4:  # epoch 1, after epoch 0's checkpoints
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 512.00 MiB. GPU 0 has 1 GiB free.")
        return real_forward(self, batch, position)

    monkeypatch.setattr(BoxTrack, "forward", forward)
    status, _, err = cli("--config", make_recipe("run", method="baseline", epochs=2), "--seed", "0")
    assert status == 2
    assert err == (
        "error: out of GPU memory (an allocation of 512.00 MiB failed) — lower "
        "train.train_data_loader.kwargs.batch_size with --opts and raise train.optimizer.grad_accum_step by the same "
        "factor (the global batch stays), or add --fast (bf16 activations); the checkpoints already written are "
        "intact\n"
    )
    assert torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=True)["epoch"] == 1
