"""Checkpoint faults, each one line naming the file: a crafted pickle that would run code is refused unless trusted;
truncated files; checkpoints of another model, width or number of classes (as -test_only weights, as the teacher, and
as the run folder's resume checkpoint, which is then left untouched)."""

from __future__ import annotations

import os

import pytest
import torch

from projector_kd.engine.checkpoint import load_checkpoint


class _RunsCode:
    """Unpickling this calls ``os.mkdir(path)`` — a stand-in for arbitrary code."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


@pytest.fixture
def baseline(make_recipe, tmp_path):
    """A student-only recipe whose -test_only run reads ``tmp_path/baseline/best.pth``."""
    (tmp_path / "baseline").mkdir()
    return make_recipe("baseline", method="baseline"), tmp_path / "baseline" / "best.pth"


def test_crafted_pickle_is_refused_by_default_and_loads_when_trusted(baseline, tiny_models, cli, tmp_path, cli_error):
    recipe, best = baseline
    evidence = tmp_path / "code-ran"
    torch.save({"model": tiny_models(1).state_dict(), "payload": _RunsCode(str(evidence))}, best)
    line = cli_error("--config", recipe, "-test_only")
    assert line == (
        f"error: checkpoint {best} needs unsafe unpickling (it pickles posix.mkdir); refused. If "
        f"you trust this file, pass the trust flag (--trust-checkpoint) to load it with full "
        f"unpickling"
    )
    assert not evidence.exists()
    status, _, err = cli("--config", recipe, "-test_only", "--trust-checkpoint")
    assert status == 0, err
    assert evidence.is_dir()  # full unpickling, as explicitly asked


def test_truncated_checkpoint_is_named(baseline, tiny_models, cli_error):
    recipe, best = baseline
    torch.save({"model": tiny_models(1).state_dict()}, best)
    best.write_bytes(best.read_bytes()[: best.stat().st_size // 2])
    line = cli_error("--config", recipe, "-test_only")
    assert line.startswith(f"error: checkpoint {best} is truncated or corrupt (")
    assert line.endswith(") — re-download or re-create it")


@pytest.mark.parametrize(
    "depth, width, num_classes, problem",
    [
        (16, 1, 3, "unexpected: layer1.1.bn1.weight, layer1.1.bn1.bias, layer1.1.bn1.running_mean (+"),
        (10, 2, 3, "shape mismatch: layer1.0.conv1.weight (32, 16, 3, 3) vs model (16, 16, 3, 3)"),
        (10, 1, 5, "shape mismatch: fc.weight (5, 64) vs model (3, 64), fc.bias (5,) vs model (3,)"),
    ],
    ids=["other-model", "other-width", "other-num-classes"],
)
def test_checkpoint_of_another_network_is_named(baseline, cli_error, depth, width, num_classes, problem):
    from torchdistill.models.registry import get_model

    recipe, best = baseline
    other = get_model(
        "wide_resnet", depth=depth, k=width, dropout_p=0.0, num_classes=num_classes, pretrained=False, progress=False
    )
    torch.save({"model": other.state_dict()}, best)
    line = cli_error("--config", recipe, "-test_only")
    assert line.startswith(
        f"error: checkpoint {best} does not match models.student_model (wide_resnet) (WideResNet4Cifar): "
    )
    assert problem in line and line.endswith("— it was written for another model, width or num_classes")


def test_wrong_teacher_checkpoint_is_named_before_training(make_recipe, tiny_models, cli_error, tmp_path):
    torch.save({"model": tiny_models(1).state_dict()}, tmp_path / "student_as_teacher.pth")
    line = cli_error("--config", make_recipe("run"), "--teacher_ckpt", tmp_path / "student_as_teacher.pth")
    assert line.startswith(
        f"error: checkpoint {tmp_path / 'student_as_teacher.pth'} does not match "
        f"models.teacher_model (WideResNet4Cifar): shape mismatch: "
    )
    assert not (tmp_path / "run").exists()  # caught before the run folder is written


@pytest.mark.parametrize("damage", ["truncate", "other-width"])
def test_bad_resume_checkpoint_is_named_and_left_untouched(
    make_recipe, teacher_ckpt, tiny_models, cli_error, tmp_path, damage
):
    recipe = make_recipe("run", teacher_ckpt=teacher_ckpt)
    last = tmp_path / "run" / "checkpoint.pth"
    last.parent.mkdir()
    if damage == "truncate":
        torch.save({"model": tiny_models(1).state_dict(), "epoch": 0}, last)
        last.write_bytes(last.read_bytes()[:1000])
        expected = f"error: checkpoint {last} is truncated or corrupt ("
    else:
        # the earlier layout of this track (no format tag), which is read as today's
        state = {"model": tiny_models(2).state_dict(), "optimizer": {}, "epoch": 0, "step_in_epoch": 0, "rng": {}}
        torch.save({**state, "global_step": 0, "best_value": 0.0, "history": [], "wall_time_s": 1.0}, last)
        expected = f"error: checkpoint {last} does not match the student (WideResNet4Cifar): shape mismatch: "
    before = last.read_bytes()
    line = cli_error("--config", recipe)
    assert line.startswith(expected)
    assert last.read_bytes() == before


def test_written_checkpoints_load_safely(make_recipe, teacher_ckpt, cli, tmp_path):
    """What this track writes needs no unsafe unpickling (``torch.load(weights_only=True)``)."""
    status, _, err = cli("--config", make_recipe("run", teacher_ckpt=teacher_ckpt), "--seed", "0")
    assert status == 0, err
    for name in ("checkpoint.pth", "best.pth"):
        state = torch.load(tmp_path / "run" / name, weights_only=True)
        assert set(state) >= {"model", "projector", "optimizer", "lr_scheduler", "epoch", "rng", "best_top1"}
    assert load_checkpoint(tmp_path / "run" / "best.pth")["epoch"] == 1
