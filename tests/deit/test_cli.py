"""The command line as users type it: from the repo root or from inside deit/, train and evaluate, clear errors."""

from __future__ import annotations

import json

import torch
from yacs.config import CfgNode

from deit.config import load_config
from deit.main import get_args_parser
from deit.models import build_student


def test_train_from_inside_deit_then_evaluate_a_release_layout_checkpoint(
    tmp_path, train_argv, run_python, repo, tiny_config, image_folder
):
    output = tmp_path / "run"
    argv = [a if a != "--train_student" else "--train-student" for a in train_argv(output, "--epochs", "1")]
    result = run_python("main.py", *argv, cwd=repo / "deit")
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((output / "metrics.json").read_text())
    assert set(metrics) >= {"top1", "top5", "val_top1_per_epoch", "wall_time_s", "student", "student_params", "params"}
    assert metrics["params"]["projector"] == 16 * 512 + 512
    assert list((output / "tensorboard").iterdir())
    trained = torch.load(output / "checkpoint.pth", weights_only=True)["model"]
    release = tmp_path / "ckpt_epoch_299.pth"
    torch.save(
        {
            "model": trained,
            "optimizer": {},
            "lr_scheduler": {},
            "max_accuracy": 50.0,
            "epoch": 299,
            "config": CfgNode({"MODEL": CfgNode({"TYPE": "deit"})}),
        },
        release,
    )
    result = run_python(
        "deit/main.py",
        "--model",
        "demo",
        "--config",
        tiny_config,
        "--ckpt",
        release,
        "--data-root",  # the ResNet track's spelling works here too
        image_folder,
        "--device",
        "cpu",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"{release} on 12 val images: top-1 {metrics['top1']:.2f} top-5 {metrics['top5']:.2f}" in result.stdout


def test_evaluation_errors_are_one_line(tmp_path, run_python, repo, cli):
    result = run_python(repo / "deit" / "main.py", "--model", "tiny", "--device", "cpu", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith(
        f"error: no checkpoint to evaluate: looked for {repo}/ckpts/deit_tiny/"
        f"ckpt_epoch_299.pth and {repo}/ckpts/ckpt_epoch_299.pth"
    )
    cfg = load_config("tiny")
    ckpt = tmp_path / "tiny.pth"
    torch.save({"model": build_student(cfg, 3024)[0].state_dict()}, ckpt)
    status, err = cli(
        ["--model", "tiny", "--ckpt", str(ckpt), "--data-path", str(tmp_path / "imagenet"), "--device", "cpu"]
    )
    assert status == 2 and err.count("\n") == 1
    assert f"error: dataset folder {tmp_path / 'imagenet'} does not exist — expected {tmp_path}/imagenet/val" in err
    status, err = cli(["--model", "base"])
    assert status == 2 and "error: unknown model 'base'" in err


def test_throughput_mode(run_python):
    result = run_python("deit/main.py", "--model", "demo", "--throughput", "--batch-size", "8", "--device", "cpu")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "throughput:" in result.stdout and "img/s at batch 8, 32 px on cpu" in result.stdout


def test_both_tracks_spellings_of_the_data_and_output_flags():
    parser = get_args_parser()
    for data, output in (("--data-path", "--output"), ("--data-root", "--output_dir"), ("--data_root", "--output-dir")):
        args = parser.parse_args([data, "/data", output, "runs/a"])
        assert (args.data_path, args.output) == ("/data", "runs/a")
    usage = " ".join(parser.format_help().split())
    assert "--data-path DATA_PATH, --data-root DATA_PATH" in usage
    assert "--output OUTPUT, --output_dir OUTPUT" in usage
