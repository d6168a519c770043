"""What docs/scaling.md states about learning-rate scaling and gradient accumulation, checked on the real code."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.data import TensorDataset
from torchdistill.core.distillation import get_distillation_box
from torchvision.models import resnet18

from deit.config import load_config, scaled_lrs
from imagenet.benchmark import projector_box_config
from imagenet.config import check_recipe, find_recipe, load_recipe
from projector_kd.engine.config import apply_overrides
from projector_kd.engine.errors import UserError

RECIPE = "configs/ilsvrc2012/ours/res3418.yaml"


@pytest.mark.parametrize(
    "per_gpu, world_size, lr, warmup_lr, min_lr",
    [
        (256, 1, 2.5e-4, 2.5e-7, 2.5e-6),
        (256, 8, 2e-3, 2e-6, 2e-5),
        (256, 16, 4e-3, 4e-6, 4e-5),
        (128, 2, 2.5e-4, 2.5e-7, 2.5e-6),
    ],
)
def test_deit_learning_rates_follow_the_global_batch(per_gpu, world_size, lr, warmup_lr, min_lr):
    cfg = load_config("tiny", flags={"data.batch_size": per_gpu})
    assert scaled_lrs(cfg, world_size) == pytest.approx({"lr": lr, "warmup_lr": warmup_lr, "min_lr": min_lr}, rel=1e-12)


def test_resnet_recipe_batch_and_lr_and_accumulation_key():
    recipe = load_recipe(find_recipe(RECIPE))
    assert recipe["train"]["train_data_loader"]["kwargs"]["batch_size"] == 256
    assert recipe["train"]["optimizer"]["kwargs"]["lr"] == 0.1
    assert recipe["train"]["optimizer"]["grad_accum_step"] == 1
    halved = apply_overrides(recipe, ["train.train_data_loader.kwargs.batch_size", "32"])
    assert halved["train"]["train_data_loader"]["kwargs"]["batch_size"] == 32
    accumulating = apply_overrides(recipe, ["train.optimizer.grad_accum_step", "2"])
    assert accumulating["train"]["optimizer"]["grad_accum_step"] == 2
    check_recipe(accumulating, RECIPE)  # the override the docs give is accepted
    with pytest.raises(UserError, match="grad_accum_step"):
        check_recipe(apply_overrides(recipe, ["train.optimizer.grad_accum_step", "0"]), RECIPE)


def test_torchdistill_accumulation_equals_averaging_micro_batch_gradients():
    """grad_accum_step 2 over micro-batches A, B == one SGD step on (grad_A + grad_B) / 2, which is what DDP over two
    GPUs computes (each GPU normalising with its own batch), projector included."""
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        teacher = resnet18(num_classes=5).eval()
        student = resnet18(num_classes=5)
        generator = torch.Generator().manual_seed(0)
        batches = [
            (torch.randn(4, 3, 32, 32, generator=generator), torch.randint(0, 5, (4,), generator=generator))
            for _ in range(2)
        ]
        config = projector_box_config(512, 512)
        accumulating = copy.deepcopy(config)
        accumulating["optimizer"]["grad_accum_step"] = 2
        boxes = []
        for train_config in (accumulating, config):
            box = get_distillation_box(
                copy.deepcopy(teacher),
                copy.deepcopy(student),
                {"train": TensorDataset(*batches[0])},
                train_config,
                torch.device("cpu"),
                None,
                False,
                1,
            )
            box.pre_epoch_process(epoch=0)
            boxes.append(box)
        acc_box, manual_box = boxes
        manual_box.student_model.load_state_dict(acc_box.student_model.state_dict())
        start = copy.deepcopy(acc_box.student_model.state_dict())

        acc_box.post_forward_process(loss=acc_box.forward_process(*batches[0]))
        for key, value in acc_box.student_model.named_parameters():
            assert torch.equal(value, start[key]), key  # no step after the first micro-batch
        acc_box.post_forward_process(loss=acc_box.forward_process(*batches[1]))

        params = [p for group in manual_box.optimizer.param_groups for p in group["params"]]
        grads = []
        for images, labels in batches:
            manual_box.optimizer.zero_grad()
            manual_box.forward_process(images, labels).backward()
            grads.append([p.grad.clone() for p in params])
        for param, grad_a, grad_b in zip(params, *grads):
            param.grad = (grad_a + grad_b) / 2
        manual_box.optimizer.step()

        moved = 0
        for (name, acc_param), manual_param in zip(
            acc_box.student_model.named_parameters(), manual_box.student_model.parameters()
        ):
            torch.testing.assert_close(acc_param, manual_param, rtol=1e-12, atol=1e-14, msg=name)
            moved += not torch.equal(acc_param, start[name])
        assert moved > 0
        embed = acc_box.student_model.distill_loss.embed.weight
        assert not torch.equal(embed, start["feature_loss.embed.weight"])
    finally:
        torch.set_default_dtype(torch.float32)
