"""torchrun with 2 gloo ranks on the CPU trains and evaluates end to end; rank 0 alone writes."""

from __future__ import annotations

import json

import torch

from deit.main import main


def test_two_rank_training_and_evaluation(tmp_path, train_argv, eval_argv, run_torchrun):
    output = tmp_path / "run"
    result = run_torchrun("deit/main.py", *train_argv(output, "--epochs", "2"))
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and len(metrics["val_top1_per_epoch"]) == 2
    log = (output / "log.txt").read_text()
    assert "2 processes x batch 4 x 1 micro-batch (global batch 8), lr 0.002, 4 steps/epoch" in log  # lr x 8/4
    assert sorted(p.name for p in output.iterdir()) == [
        ".lock",
        "checkpoint.pth",
        "ckpt_epoch_0.pth",
        "ckpt_epoch_1.pth",
        "config.yaml",
        "log.txt",
        "metrics.json",
        "tensorboard",
    ]
    state = torch.load(output / "checkpoint.pth", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])
    # the 2-rank evaluation summed over ranks equals a single-process evaluation of the same weights
    evaluation = tmp_path / "eval"
    assert main(eval_argv(output / "checkpoint.pth", evaluation)) == 0
    single = json.loads((evaluation / "eval_metrics.json").read_text())
    assert single["num_images"] == 12
    assert (single["top1"], single["top5"]) == (metrics["top1"], metrics["top5"])


def test_two_ranks_with_gradient_accumulation(tmp_path, train_argv, run_torchrun):
    """--accum-iter 2 under DDP (gradients all-reduced on the last micro-batch only): 2 ranks x 4 x 2 = global
    batch 16, lr scaled by 16 / 4, 2 optimizer steps per epoch over 36 images."""
    output = tmp_path / "run"
    result = run_torchrun("deit/main.py", *train_argv(output, "--epochs", "1", "--accum-iter", "2"))
    assert result.returncode == 0, result.stderr[-3000:]
    log = (output / "log.txt").read_text()
    assert "2 processes x batch 4 x 2 micro-batches (global batch 16), lr 0.004, 2 steps/epoch" in log
    assert len(json.loads((output / "metrics.json").read_text())["val_top1_per_epoch"]) == 1
