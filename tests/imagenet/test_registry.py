"""The registered ProjectorKD wrapper + loss inside torchdistill's own DistillationBox, against torchdistill's SRD box.

Modes compared (docs/method.md, docs/faithfulness.md): the teacher *network* is in eval mode in both boxes (frozen,
running BN statistics), the student network is in training mode (set by torchdistill's pre-epoch step), and the
whitening runs on batch statistics on both sides. In the SRD box that means the teacher ``SRDModelWrapper`` itself is
put in training mode (so its ``norm_layer`` whitens with batch statistics) while its inner teacher network is put back
in eval mode; in this project's box the teacher network is simply in eval mode and the whitening lives in the student
wrapper.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.data import TensorDataset
from torchdistill.core.distillation import get_distillation_box
from torchvision.models import resnet18

import imagenet.registry  # noqa: F401  (registers ProjectorKDModelWrapper, ProjectorKDLoss, LogitKDLoss)
from imagenet.benchmark import projector_box_config, srd_box_config

NUM_CLASSES = 5
DIM = 512


def tiny_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(6, 3, 32, 32, generator=generator), torch.randint(0, NUM_CLASSES, (6,), generator=generator)


def make_models(dtype: torch.dtype = torch.float64) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    teacher = resnet18(num_classes=NUM_CLASSES).to(dtype)
    student = resnet18(num_classes=NUM_CLASSES).to(dtype)
    teacher.eval()
    return teacher, student


def build_box(config: dict, teacher: torch.nn.Module, student: torch.nn.Module):
    dataset = TensorDataset(*tiny_batch())
    box = get_distillation_box(teacher, student, {"train": dataset}, config, torch.device("cpu"), None, False, 1)
    box.pre_epoch_process(epoch=0)
    return box


def build_pair():
    teacher, student = make_models()
    srd_box = build_box(srd_box_config(DIM, DIM), teacher, student)
    teacher2, student2 = copy.deepcopy(teacher), copy.deepcopy(student)
    ours = build_box(projector_box_config(DIM, DIM), teacher2, student2)
    ours.student_model.distill_loss.embed.load_state_dict(srd_box.student_model.linear.state_dict())
    # teacher network in eval mode in both boxes; SRD's teacher-side whitening needs its wrapper in train mode
    srd_box.teacher_model.train()
    srd_box.teacher_model.model.eval()
    return srd_box, ours


def test_registered_loss_equals_torchdistill_srd_box():
    torch.set_default_dtype(torch.float64)
    try:
        srd_box, ours = build_pair()
        for seed in range(2):
            images, labels = tiny_batch(seed)
            srd_loss = srd_box.forward_process(images.double(), labels)
            our_loss = ours.forward_process(images.double(), labels)
            assert torch.isfinite(our_loss)
            torch.testing.assert_close(our_loss, srd_loss, rtol=1e-10, atol=1e-10)
            srd_box.post_forward_process(loss=srd_loss)
            ours.post_forward_process(loss=our_loss)
            # same gradients -> same SGD step: student weights and projector stay identical after the step
            for (name, ours_p), (_, srd_p) in zip(
                ours.student_model.student.named_parameters(), srd_box.student_model.model.named_parameters()
            ):
                torch.testing.assert_close(ours_p, srd_p, rtol=1e-9, atol=1e-12, msg=name)
            torch.testing.assert_close(
                ours.student_model.distill_loss.embed.weight, srd_box.student_model.linear.weight, rtol=1e-9, atol=1e-12
            )
        # the whitening running statistics evolve the same way on both sides
        torch.testing.assert_close(
            ours.student_model.distill_loss.bn_t.running_var, srd_box.teacher_model.norm_layer.running_var
        )
        torch.testing.assert_close(
            ours.student_model.distill_loss.bn_s.running_mean, srd_box.student_model.norm_layer.running_mean
        )
    finally:
        torch.set_default_dtype(torch.float32)


def test_loss_differs_from_srd_only_by_name():
    srd_terms = srd_box_config(DIM, DIM)["criterion"]["kwargs"]["sub_terms"]
    our_terms = projector_box_config(DIM, DIM)["criterion"]["kwargs"]["sub_terms"]
    assert srd_terms["srd"]["criterion"]["key"] == "SRDLoss"
    assert our_terms["projector_kd"]["criterion"]["key"] == "ProjectorKDLoss"
    assert srd_terms["ce"] == our_terms["ce"]
    assert srd_terms["srd"]["weight"] == our_terms["projector_kd"]["weight"]


def test_projector_is_trained_and_teacher_is_untouched():
    teacher, student = make_models(torch.float32)
    box = build_box(projector_box_config(DIM, DIM), teacher, student)
    optimised = {id(p) for group in box.optimizer.param_groups for p in group["params"]}
    embed = box.student_model.distill_loss.embed
    assert {id(embed.weight), id(embed.bias)} <= optimised
    assert not any(id(p) in optimised for p in teacher.parameters())
    teacher_before = copy.deepcopy(teacher.state_dict())
    embed_before = embed.weight.detach().clone()
    images, labels = tiny_batch()
    loss = box.forward_process(images, labels)
    box.post_forward_process(loss=loss)
    assert not torch.equal(embed.weight, embed_before)
    assert not teacher.training
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, teacher_before[key]), key  # weights and BN running stats / counters
    assert box.student_model.distill_loss.bn_t.num_batches_tracked.item() == 1


def test_loss_rejects_unwrapped_student():
    config = projector_box_config(DIM, DIM)
    del config["student"]["auxiliary_model_wrapper"]
    config["student"]["forward_hook"] = {"output": ["layer4"]}
    teacher, student = make_models(torch.float32)
    box = build_box(config, teacher, student)
    with pytest.raises(KeyError, match="ProjectorKDModelWrapper"):
        box.forward_process(*tiny_batch())
