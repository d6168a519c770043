"""--device accepts cpu, cuda and cuda:N that exist, and refuses anything else in one line before any work."""

from __future__ import annotations

import pytest
import torch


@pytest.mark.parametrize("name", ["gpu", "cuda0", "CUDA", "cpu:0", "mps", ""])
def test_unknown_device_is_refused_in_one_line(cli, tmp_path, train_argv, name):
    argv = train_argv(tmp_path / "run") + ["--device", name]
    status, err = cli(argv)
    assert status == 2
    assert err == f"error: --device {name!r} is not a device: use cpu, cuda or cuda:N\n"
    assert not (tmp_path / "run").exists()


def test_cuda_without_cuda_is_refused(cli, tmp_path, train_argv, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    status, err = cli(train_argv(tmp_path / "run") + ["--device", "cuda:0"])
    assert status == 2
    assert err == "error: --device cuda:0 requested but CUDA is not available here; use --device cpu\n"


def test_cuda_index_past_the_visible_gpus_is_refused(cli, tmp_path, train_argv, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    status, err = cli(train_argv(tmp_path / "run") + ["--device", "cuda:2"])
    assert status == 2
    assert err == "error: --device cuda:2: only 2 CUDA devices are visible (cuda:0 to cuda:1)\n"


def test_device_in_a_config_file_uses_the_same_names(cli, tmp_path, train_argv):
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text("device: gpu\n")
    argv = [a for a in train_argv(tmp_path / "run") if a not in ("--device", "cpu")] + ["--opts", "device", "gpu"]
    status, err = cli(argv)
    assert status == 2
    assert err == "error: config: device = 'gpu' is out of range (must be cpu, cuda or cuda:N)\n"


GPU_OUT_OF_MEMORY = (
    "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which 1.06 GiB is free."
)


def test_out_of_gpu_memory_in_a_step_is_one_line_with_what_to_lower(cli, tmp_path, train_argv, monkeypatch):
    from deit.engine import DeiTTrack

    state = {"steps": 0}
    real_forward = DeiTTrack.forward

    def forward(self, batch, position):
        state["steps"] += 1
        if state["steps"] == 12:  # epoch 1, after epoch 0's checkpoints
            raise torch.cuda.OutOfMemoryError(GPU_OUT_OF_MEMORY)
        return real_forward(self, batch, position)

    monkeypatch.setattr(DeiTTrack, "forward", forward)
    status, err = cli(train_argv(tmp_path / "run"))
    assert status == 2
    assert err == (
        "error: out of GPU memory (an allocation of 2.00 GiB failed) — lower --batch-size and raise --accum-iter by "
        "the same factor (the global batch and the learning rate stay), or add --fast (bf16 activations); the "
        "checkpoints already written are intact\n"
    )
    assert torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=True)["epoch"] == 1
