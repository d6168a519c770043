"""The fast path computes the same loss and gradients as the reference recipe, for both tracks, and the parity check
fails where it should: a changed method, unsynchronised weights, gradients or losses outside their budgets.

Built with the tracks' own parity pairs (``deit.benchmark``, ``imagenet.benchmark``) and checked by
``projector_kd.engine.parity.check_parity`` as ``scripts/benchmark.py`` does, on the CPU with tiny models. With
autocast and compile off, both fast paths must match their reference to float32 tolerance. As they run: the DeiT fast
path is float32 on the CPU (so float32 tolerance again), the ResNet fast path autocasts to bf16 (so it may deviate only
about as much as bf16 rounding moves torchdistill's SRD box). torch.compile runs with the ``aot_eager`` backend: it
captures the same graphs (dynamo + AOT autograd) as Inductor but skips Inductor's C++ code generation, which takes
about 90 s per model on two cores.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch._dynamo.utils import counters

from deit import benchmark as deit_benchmark
from imagenet import benchmark as resnet_benchmark
from projector_kd.engine.parity import FP32_GRAD_RTOL, check_parity, judge_parity


@pytest.fixture
def aot_eager_compile(monkeypatch: pytest.MonkeyPatch):
    """``torch.compile`` with the aot_eager backend for the test; returns a function counting compiled graphs."""
    torch._dynamo.reset()
    counters.clear()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    yield lambda: counters["stats"]["unique_graphs"]
    torch._dynamo.reset()


@pytest.fixture
def no_compile():
    """torch.compile off (the fast path runs eager): enough to show that the check can fail."""
    torch._dynamo.reset()
    with torch._dynamo.config.patch(disable=True):
        yield


CPU = torch.device("cpu")
BATCH = 8
DEIT_TINY = dict(
    model="tiny", img_size=16, teacher="regnety_002", num_classes=10, embed_dim=48, depth=2, num_heads=2, patch_size=4
)
RESNET_TINY = dict(teacher_arch="resnet34", student_arch="resnet18", num_classes=10)
RESNET_IMAGE_SIZE = 32


def test_deit_fast_path_matches_release_recipe(aot_eager_compile):
    release, fast = deit_benchmark.parity_pair(CPU, batch_size=BATCH, **DEIT_TINY)
    result = check_parity(release, fast, BATCH, DEIT_TINY["img_size"], DEIT_TINY["num_classes"], CPU)
    assert aot_eager_compile() >= 2  # teacher and student objective were really compiled
    assert result["ok"], result
    assert result["fast_dtype"] == "float32"  # no autocast on the CPU in the DeiT track
    loss = result["loss_reference_fp32"]
    assert 0 < loss < 50 and torch.isfinite(torch.tensor(loss))
    for check in ("math", "precision"):
        assert result[check]["loss_abs_diff"] <= 1e-5 * abs(loss)
        assert result[check]["grad_rel_diff"] <= 1e-4
        assert result[check]["grad_cosine"] >= 1 - 1e-8


def test_resnet_fast_path_matches_torchdistill_srd_box(aot_eager_compile):
    reference_box, fast_box = resnet_benchmark.parity_pair(CPU, **RESNET_TINY)
    result = check_parity(reference_box, fast_box, BATCH, RESNET_IMAGE_SIZE, RESNET_TINY["num_classes"], CPU)
    assert aot_eager_compile() == 3  # teacher, student network and projector loss were really compiled
    assert result["ok"], result
    assert result["fast_dtype"] == "bfloat16"
    math_check, precision = result["math"], result["precision"]
    # autocast off: compile, channels_last, fused SGD and this project's box equal torchdistill's SRD box in float32
    assert math_check["loss_abs_diff"] <= 1e-5 * result["loss_reference_fp32"]
    assert math_check["grad_rel_diff"] <= 1e-3
    # bf16 really ran (the SRD box itself moves under bf16), and the fast path stays within twice that
    rounding = precision["reference_rounded"]["grad_rel_diff"]
    assert rounding > 1e-3
    assert precision["grad_rel_diff"] <= 2 * rounding + FP32_GRAD_RTOL


def test_parity_check_catches_a_changed_method(no_compile):
    """A fast path whose loss differs from the reference (soft-maximum exponent 2 instead of 4) fails both checks."""
    release, fast = deit_benchmark.parity_pair(CPU, batch_size=BATCH, **DEIT_TINY)
    fast.model.projector_loss.exponent = 2.0
    result = check_parity(release, fast, BATCH, DEIT_TINY["img_size"], DEIT_TINY["num_classes"], CPU)
    assert not result["ok"] and not result["math"]["ok"]
    assert result["math"]["loss_abs_diff"] > 100 * result["math"]["loss_tolerance"]


def test_parity_check_catches_unsynchronised_weights(no_compile):
    """Different projector weights in the fast box than in torchdistill's SRD box fail the check. (A pure rescaling of
    the projector would not: the whitening after it removes scale and bias.)"""
    reference_box, fast_box = resnet_benchmark.parity_pair(CPU, **RESNET_TINY)
    weight = fast_box.model.student_model.distill_loss.embed.weight
    with torch.no_grad():
        weight.add_(0.05 * weight.abs().mean() * torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)))
    result = check_parity(reference_box, fast_box, BATCH, RESNET_IMAGE_SIZE, RESNET_TINY["num_classes"], CPU)
    assert not result["math"]["ok"]
    assert result["math"]["grad_rel_diff"] > FP32_GRAD_RTOL


def _grads(values: list[float]) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor(values[:2]), "b": torch.tensor(values[2:])}


def test_judge_parity_budgets():
    reference = (10.0, _grads([1.0, 2.0, 3.0, 4.0]))
    exact = (10.0, _grads([1.0, 2.0, 3.0, 4.0]))
    # float32 fast path: equal passes; a 1% gradient change or a 1e-3 relative loss change fails
    assert judge_parity(reference, reference, exact, exact, None)["ok"]
    off_grad = (10.0, _grads([1.01, 2.02, 3.03, 4.04]))
    result = judge_parity(reference, reference, off_grad, off_grad, None)
    assert not result["ok"] and result["math"]["grad_rel_diff"] == pytest.approx(0.01, rel=1e-6)
    assert not judge_parity(reference, reference, (10.01, exact[1]), exact, None)["ok"]
    # bf16 fast path: rounding moves the reference by ||d|| / ||g|| = 0.02; the budget is 2 * 0.02 + 5e-3
    norm = torch.tensor([1.0, 2.0, 3.0, 4.0]).norm().item()

    def shifted(rel: float) -> dict[str, torch.Tensor]:
        """The reference gradients moved by ``rel * ||g||`` along the unit vector (1, -1, 1, -1) / 2."""
        return _grads([g + rel * norm * sign / 2 for g, sign in zip([1.0, 2.0, 3.0, 4.0], (1, -1, 1, -1))])

    rounded = (10.05, shifted(0.02))
    result = judge_parity(reference, rounded, (10.02, shifted(0.04)), exact, torch.bfloat16)
    assert result["ok"] and result["precision"]["grad_tolerance"] == pytest.approx(0.045, rel=1e-5)
    assert result["precision"]["loss_tolerance"] == pytest.approx(max(2 * 0.05, 10 * 2**-7) + 1e-5 + 1e-3)
    assert not judge_parity(reference, rounded, (10.02, shifted(0.05)), exact, torch.bfloat16)["ok"]
    assert not judge_parity(reference, rounded, (10.2, shifted(0.01)), exact, torch.bfloat16)["ok"]
