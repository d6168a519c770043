"""The ResNet track (docs/method.md) end to end through the real entry point: teacher training, projector
distillation from that teacher, -test_only / -student_only on the written checkpoints, 2 gloo ranks under torchrun,
and the release command run from inside imagenet/ with its relative config path."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torchvision import transforms
from torchvision.datasets import ImageFolder
from torchvision.models import resnet18

from projector_kd.engine.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[2]


def _metrics(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _load(model: torch.nn.Module, path: Path) -> torch.nn.Module:
    model.load_state_dict(load_checkpoint(path)["model"], strict=True)
    return model


def test_teacher_training_then_projector_distillation_then_test_only(
    make_recipe, run_entry, cli, tmp_path, tiny_data, tiny_models, accuracy_of
):
    # 1. teacher alone (no models.teacher_model), 2 epochs, through the script
    teacher_dir = tmp_path / "teacher"
    extra_log = tmp_path / "logs" / "output.txt"
    teacher = run_entry(
        "--config", make_recipe("teacher", method="teacher", epochs=2), "--seed", "0", "--log", extra_log
    )
    assert teacher.returncode == 0, teacher.stderr
    teacher_metrics = _metrics(teacher_dir)
    assert teacher.stdout.strip().splitlines()[-1] == (
        f"top1 {teacher_metrics['top1']:.2f} top5 {teacher_metrics['top5']:.2f} "
        f"(metrics: {teacher_dir / 'metrics.json'})"
    )
    teacher_net = _load(tiny_models(2), teacher_dir / "best.pth")
    assert (teacher_metrics["top1"], teacher_metrics["top5"]) == accuracy_of(teacher_net, tiny_data / "val")
    assert len(teacher_metrics["val_top1_per_epoch"]) == 2
    assert teacher_metrics["best_val_top1"] == max(teacher_metrics["val_top1_per_epoch"])
    assert teacher_metrics["student_params"] == sum(p.numel() for p in teacher_net.parameters())
    assert "teacher_top1" not in teacher_metrics
    last = load_checkpoint(teacher_dir / "checkpoint.pth")
    assert (last["epoch"], last["step_in_epoch"], last["global_step"]) == (2, 0, 6)
    assert "projector" not in last
    assert "top-1" in (teacher_dir / "log.txt").read_text() and "top-1" in extra_log.read_text()
    assert len(list((teacher_dir / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert (teacher_dir / "config.yaml").is_file()

    # 2. projector distillation from that teacher (--teacher_ckpt), through the script
    teacher_digest = _digest(teacher_dir / "best.pth")
    student_dir = tmp_path / "projector"
    student = run_entry(
        "--config",
        make_recipe("projector", method="projector", epochs=2),
        "--seed",
        "0",
        "--teacher_ckpt",
        teacher_dir / "best.pth",
    )
    assert student.returncode == 0, student.stderr
    metrics = _metrics(student_dir)
    # the same teacher checkpoint on the same val set: the teacher's numbers are reproduced
    assert (metrics["teacher_top1"], metrics["teacher_top5"]) == (teacher_metrics["top1"], teacher_metrics["top5"])
    assert metrics["teacher_params"] == teacher_metrics["student_params"]
    student_net = _load(tiny_models(1), student_dir / "best.pth")
    assert (metrics["top1"], metrics["top5"]) == accuracy_of(student_net, tiny_data / "val")
    state = load_checkpoint(student_dir / "checkpoint.pth")
    assert state["projector"]["embed.weight"].shape == (128, 64)
    assert state["projector"]["bn_t.num_batches_tracked"].item() == 6
    # the projector (weight and bias) is trained by the student's optimizer
    assert len(state["optimizer"]["param_groups"][0]["params"]) == len(list(student_net.parameters())) + 2
    assert _digest(teacher_dir / "best.pth") == teacher_digest  # the teacher file is read, never written

    # 3. -test_only on the written checkpoint (in this process, through run_cli)
    test_only = ("--config", tmp_path / "projector.yaml", "-test_only", "--teacher_ckpt", teacher_dir / "best.pth")
    status, out, err = cli(*test_only, "--output_dir", student_dir)
    assert status == 0, err
    tested = _metrics(student_dir / "test_only")
    assert (tested["top1"], tested["top5"]) == (metrics["top1"], metrics["top5"])
    assert (tested["teacher_top1"], tested["teacher_top5"]) == (metrics["teacher_top1"], metrics["teacher_top5"])
    assert f"top1 {metrics['top1']:.2f} top5 {metrics['top5']:.2f}" in out

    # 4. -student_only: the teacher is not evaluated
    status, _, err = cli(*test_only, "-student_only", "--output_dir", student_dir)
    assert status == 0, err
    tested = _metrics(student_dir / "test_only")
    assert "teacher_top1" not in tested and (tested["top1"], tested["top5"]) == (metrics["top1"], metrics["top5"])


def test_torchrun_two_gloo_ranks_train_and_evaluate(
    make_recipe, run_entry_on_two_ranks, teacher_ckpt, tmp_path, tiny_data, tiny_models, accuracy_of
):
    recipe = make_recipe("ddp", method="projector", teacher_ckpt=teacher_ckpt, epochs=1, batch_size=4, lr=0.02)
    result = run_entry_on_two_ranks("--config", recipe, "--world_size", "2", "-adjust_lr", "--seed", "0")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_dir = tmp_path / "ddp"
    metrics = _metrics(run_dir)
    assert metrics["world_size"] == 2
    # the reduced accuracy equals a single-process evaluation of the same checkpoint on the same 21 images; 21 is
    # odd, so a sampler that pads the shards (counting one image twice) would give k/22 instead of k/21
    student_net = _load(tiny_models(1), run_dir / "best.pth")
    assert (metrics["top1"], metrics["top5"]) == accuracy_of(student_net, tiny_data / "val")
    assert 0 < metrics["top1"] < 100, "need a non-trivial accuracy for the padding check"
    assert (metrics["teacher_top1"], metrics["teacher_top5"]) == accuracy_of(tiny_models(2), tiny_data / "val")
    state = load_checkpoint(run_dir / "checkpoint.pth")
    assert state["optimizer"]["param_groups"][0]["initial_lr"] == 0.04  # -adjust_lr: 0.02 x 2 processes
    assert state["global_step"] == 3  # 30 images / (2 ranks x 4) = 3 steps per rank (drop_last)
    assert len(state["rng"]) == 2
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])
    # only rank 0 writes: one log with one final line, one event file, no stray temporaries
    assert (run_dir / "log.txt").read_text().count("[student wide_resnet] top-1") == 1
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert sorted(p.name for p in run_dir.iterdir()) == [
        ".lock",
        "best.pth",
        "checkpoint.pth",
        "config.yaml",
        "log.txt",
        "metrics.json",
        "tensorboard",
    ]
    assert result.stdout.count("top1 ") == 1


def test_release_command_from_inside_imagenet_folder(run_release_command, tmp_path, tiny_data):
    """`cd imagenet; python image_classification.py --config configs/ilsvrc2012/ours/res3418.yaml --log ...` finds the
    recipe from the repository root and evaluates a ResNet18 checkpoint with the release's 224 px val transform."""
    out = tmp_path / "out"
    out.mkdir()
    torch.manual_seed(0)
    model = resnet18(num_classes=3)
    torch.save({"model": model.state_dict()}, out / "ilsvrc2012-resnet18_from_resnet34.pt")
    result = run_release_command(
        tiny_data,
        out,
        tmp_path / "log/output.txt",
        "-test_only",
        "-student_only",
        "--opts",
        "models.teacher_model.kwargs.weights",
        "null",
        "models.teacher_model.kwargs.num_classes",
        "3",
        "models.student_model.kwargs.num_classes",
        "3",
    )
    assert result.returncode == 0, result.stderr
    metrics = _metrics(out / "test_only")
    val = ImageFolder(
        str(tiny_data / "val"),
        transform=transforms.Compose(
            [
                transforms.Resize(256),
                transforms.CenterCrop(224),
                transforms.ToTensor(),
                transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
            ]
        ),
    )
    images = torch.stack([image for image, _ in val])
    labels = torch.tensor(val.targets)
    with torch.no_grad():
        top = model.eval()(images).topk(3, dim=1).indices  # top-5 of 3 classes: all of them
    assert metrics["top1"] == 100.0 * top[:, 0].eq(labels).sum().item() / len(labels)
    assert metrics["top5"] == 100.0 * top.eq(labels[:, None]).any(dim=1).sum().item() / len(labels)
    assert "top-1" in (tmp_path / "log/output.txt").read_text()
    assert not (REPO / "imagenet" / "resource").exists() and not (REPO / "imagenet" / "log").exists()
