"""Fast path: same math as the release recipe (within bf16 tolerance), one compile fallback line, benchmark step
builder."""

from __future__ import annotations

import logging

import pytest
import torch

from deit.benchmark import build_train_step
from deit.config import load_config

SMALL = dict(
    model="demo",
    batch_size=8,
    img_size=16,
    device="cpu",
    teacher="resnet10t",
    num_classes=10,
    embed_dim=16,
    depth=2,
    num_heads=2,
    stem_channels=8,
)


def _terms_and_grads(trainer, images, labels):
    torch.manual_seed(0)
    prepared, targets = trainer.prepare_batch(images, labels)
    terms = trainer.compute_terms(prepared, targets)
    trainer.optimizer.zero_grad(set_to_none=True)
    sum(terms.values()).backward()
    named = trainer.trained.named_parameters()
    grads = {n: p.grad.detach().float().clone() for n, p in named if p.grad is not None}
    return {k: v.detach().float() for k, v in terms.items()}, grads


def test_fast_path_math_matches_the_release_recipe_within_bf16_tolerance(monkeypatch):
    """bf16 autocast + channels_last (what the fast path changes numerically) vs float32, same weights and batch.
    torch.compile is swapped for eager here (compiling costs a minute on 2 CPU cores)."""
    monkeypatch.setattr(torch, "compile", lambda module: module)
    torch.manual_seed(0)
    reference = build_train_step("release", **SMALL).track
    torch.manual_seed(0)
    fast = build_train_step("fast", **SMALL).track
    fast.trained.load_state_dict(reference.trained.state_dict())
    fast.teacher.load_state_dict(reference.teacher.state_dict())
    fast.autocast_dtype, fast.channels_last = torch.bfloat16, True
    fast.student_module.conv_embed.to(memory_format=torch.channels_last)
    fast.teacher.to(memory_format=torch.channels_last)
    for trainer in (reference, fast):  # deterministic forward: no stochastic depth
        for block in trainer.student_module.blocks:
            block.drop_path1 = block.drop_path2 = torch.nn.Identity()
    images, labels = torch.randn(8, 3, 16, 16), torch.arange(8)
    ref_terms, ref_grads = _terms_and_grads(reference, images, labels)
    fast_terms, fast_grads = _terms_and_grads(fast, images, labels)
    assert set(ref_terms) == set(fast_terms) == {"ce", "kd", "proj"}
    for name in ref_terms:
        torch.testing.assert_close(fast_terms[name], ref_terms[name], rtol=3e-2, atol=3e-2)
    for name, grad in ref_grads.items():
        if name == "projector_loss.embed.bias":  # batch whitening removes the mean: its true gradient is 0
            assert grad.abs().max() < 1e-6 and fast_grads[name].abs().max() < 1e-3
            continue
        cosine = torch.nn.functional.cosine_similarity(fast_grads[name].flatten(), grad.flatten(), dim=0)
        assert cosine > 0.98, (name, cosine.item())
    assert fast_grads.keys() == ref_grads.keys()


def test_compile_failure_runs_teacher_and_objective_eagerly_with_one_line(monkeypatch, caplog):
    def broken_compile(module):
        def fail(*args):
            raise RuntimeError("inductor backend unavailable\nlong details")

        return fail

    monkeypatch.setattr(torch, "compile", broken_compile)
    loop = build_train_step("fast", **SMALL)
    with caplog.at_level(logging.WARNING, logger="projector_kd.engine.fast"):
        step = loop.train_step((torch.rand(8, 3, 16, 16), torch.arange(8)))
    assert loop.track.objective.compiled is None and loop.track.teacher_forward.compiled is None
    assert torch.isfinite(step.values).all() and loop.position.global_step == 1
    assert [r.getMessage() for r in caplog.records if r.name == "projector_kd.engine.fast"] == [
        "fast path: torch.compile is unavailable here (RuntimeError: inductor backend unavailable); running the "
        "networks eagerly — the rest of the fast path stays on"
    ]


def test_fast_switch_defaults_off_and_sets_the_loader_and_optimizer(tmp_path):
    assert load_config("tiny")["fast"] is False
    assert load_config("tiny", flags={"fast": True})["fast"] is True
    loop = build_train_step("release", **SMALL)
    assert loop.track.autocast_dtype is None and loop.track.scaler is None  # CPU: float32 in both recipes
    step = loop.train_step((torch.randint(0, 255, (8, 3, 16, 16)).float() / 255, torch.randint(0, 10, (8,))))
    assert step.names == ["ce", "kd", "proj", "loss"] and loop.position.global_step == 1
    with pytest.raises(Exception, match="recipe must be 'release' or 'fast'"):
        build_train_step("turbo", **SMALL)
