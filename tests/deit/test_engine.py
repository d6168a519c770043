"""Training step semantics: the three loss terms against a float64 hand computation, learning, schedule, groups."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from timm.scheduler import CosineLRScheduler

from deit.config import load_config, scaled_lrs
from deit.datasets import build_loaders
from deit.engine import DeiTTrack, evaluate_student
from deit.losses import DistillationObjective
from deit.models import build_student, create_student, create_teacher
from projector_kd import ProjectorDistillLoss
from projector_kd.engine.distributed import DistEnv
from projector_kd.engine.errors import NonFiniteLossError
from projector_kd.engine.loop import Position, TrainingLoop

CPU = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def test_loss_terms_equal_a_float64_hand_computation():
    torch.manual_seed(0)
    student = create_student("demo", num_classes=5, img_size=16, embed_dim=16, depth=1, num_heads=2, stem_channels=4)
    projector = ProjectorDistillLoss(16, 12, distance="log_corr", eps=0.0)
    student, projector = student.double(), projector.double()
    objective = DistillationObjective(student, projector, "projector", soft_targets=True, smoothing=0.1)
    images = torch.randn(6, 3, 16, 16, dtype=torch.float64)
    targets = torch.softmax(torch.randn(6, 5, dtype=torch.float64), dim=1)
    teacher_features = torch.randn(6, 12, dtype=torch.float64)
    teacher_logits = torch.randn(6, 5, dtype=torch.float64)
    student.train()
    student.blocks[0].drop_path1 = student.blocks[0].drop_path2 = torch.nn.Identity()  # deterministic forward
    terms = objective(images, targets, teacher_features, teacher_logits)

    tokens = student.forward_features(images)
    cls_logits, dist_logits = student.head(tokens[:, 0]), student.head_conv(tokens[:, 1])
    ce = -(targets * torch.log_softmax(cls_logits, 1)).sum(1).mean()
    p_t = torch.softmax(teacher_logits, 1)
    kd = (p_t * (torch.log(p_t) - torch.log_softmax(dist_logits, 1))).sum() / 6
    z = tokens[:, 2:].mean(1) @ projector.embed.weight.T + projector.embed.bias
    s = (z - z.mean(0)) / z.var(0, unbiased=False).sqrt()  # eps = 0
    t = (teacher_features - teacher_features.mean(0)) / teacher_features.var(0, unbiased=False).sqrt()
    corr = (s * t).mean(0)
    proj = torch.log(((corr - 1).abs() ** 4).sum() + 1e-5)
    assert set(terms) == {"ce", "kd", "proj"}
    for name, reference in (("ce", ce), ("kd", kd), ("proj", proj)):
        assert terms[name].dtype == torch.float64
        torch.testing.assert_close(terms[name], reference, rtol=1e-12, atol=1e-12)


def test_method_none_trains_both_heads_on_labels_and_kd_has_no_projector_term():
    torch.manual_seed(0)
    student = create_student("demo", num_classes=4, img_size=16, embed_dim=16, depth=1, num_heads=2)
    images, labels = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    terms = DistillationObjective(student, None, "none", soft_targets=False, smoothing=0.0)(images, labels)
    cls_logits, dist_logits = student.forward_heads(student.forward_features(images))
    assert set(terms) == {"ce", "ce_dist"}
    kd_terms = DistillationObjective(student, None, "kd", soft_targets=False, smoothing=0.0)(
        images, labels, torch.randn(4, 8), torch.randn(4, 4)
    )
    assert set(kd_terms) == {"ce", "kd"}
    with pytest.raises(Exception, match="needs a projector"):
        DistillationObjective(student, None, "projector", soft_targets=False, smoothing=0.0)


NO_MIXING = ("aug.mixup", "0.0", "aug.cutmix", "0.0")
# no mixing, no stochastic depth, no warm-up: a step's update follows from the batch alone
PLAIN_STEPS = (*NO_MIXING, "model.drop_path", "0.0", "train.warmup_epochs", "0")


def _loop(tiny_config, image_folder, teacher_ckpt, *opts: str, output=None) -> tuple[TrainingLoop, object]:
    """The shared loop over the DeiT track of the tiny recipe (``loop.track``), writing into ``output``."""
    cfg = load_config(
        "demo", str(tiny_config), {"data.path": str(image_folder), "teacher.ckpt": str(teacher_ckpt)}, list(opts)
    )
    torch.manual_seed(0)
    teacher, _ = create_teacher(cfg["teacher"]["name"], cfg["model"]["num_classes"], teacher_ckpt)
    student, projector = build_student(cfg, teacher.num_features)
    train_loader, val_loader = build_loaders(cfg, 0, 1, pin_memory=False)
    track = DeiTTrack(cfg, CPU, student, projector, teacher, train_loader, val_loader, output_dir=output)
    return TrainingLoop(track, output), train_loader


def _terms(step) -> dict[str, float]:
    return dict(zip(step.names, step.values.tolist()))


def _at(loop: TrainingLoop, global_step: int) -> None:
    """Place ``loop`` before step ``global_step`` of the run (0-based)."""
    spe = loop.track.steps_per_epoch
    loop.position = Position(global_step // spe, global_step % spe, global_step)


def test_training_steps_reduce_the_loss(tiny_config, image_folder, teacher_ckpt):
    loop, loader = _loop(
        tiny_config, image_folder, teacher_ckpt, *PLAIN_STEPS, "train.epochs", "20", "train.base_lr", "3e-3"
    )
    loader.sampler.set_epoch(0)
    batch = next(iter(loader))
    losses = [_terms(loop.train_step(batch)) for _ in range(12)]
    assert losses[-1]["loss"] < losses[0]["loss"] - 1.0  # the log-scale projector term falls by > 1 nat
    assert losses[-1]["ce"] < losses[0]["ce"] and losses[-1]["proj"] < losses[0]["proj"]


def test_lr_is_scaled_by_global_batch_with_per_step_warmup_and_cosine(tiny_config, image_folder, teacher_ckpt):
    recipe = load_config("tiny")
    assert scaled_lrs(recipe, world_size=4) == pytest.approx(
        {"lr": 5e-4 * 1024 / 512, "warmup_lr": 5e-7 * 2, "min_lr": 5e-6 * 2}
    )
    track = _loop(tiny_config, image_folder, teacher_ckpt, "train.epochs", "4", "train.warmup_epochs", "1")[0].track
    steps = track.steps_per_epoch  # 9
    lrs = track.lrs
    seen = []
    for step in range(4 * steps):
        track.scheduler.step_update(step)
        seen.append(track.optimizer.param_groups[0]["lr"])
    assert seen[0] == pytest.approx(lrs["warmup_lr"])
    assert seen[steps // 2] == pytest.approx(lrs["warmup_lr"] + steps // 2 * (lrs["lr"] - lrs["warmup_lr"]) / steps)
    t = 4 * steps - 1
    cosine = 0.5 * (1 + math.cos(math.pi * t / (4 * steps)))
    assert seen[t] == pytest.approx(lrs["min_lr"] + (lrs["lr"] - lrs["min_lr"]) * cosine)
    assert all(a >= b for a, b in zip(seen[steps:], seen[steps + 1 :]))


def test_no_weight_decay_on_1d_params_biases_pos_embed_and_cls_token(tiny_config, image_folder, teacher_ckpt):
    track = _loop(tiny_config, image_folder, teacher_ckpt)[0].track
    names = {id(p): n for n, p in track.trained.named_parameters()}
    no_decay, decay = track.optimizer.param_groups
    decayed = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert {
        "student.pos_embed",
        "student.cls_token",
        "student.norm.weight",
        "student.head.bias",
        "projector_loss.embed.bias",
    }.isdisjoint(decayed)
    assert {
        "student.head.weight",
        "student.blocks.0.attn.qkv.weight",
        "projector_loss.embed.weight",
        "student.conv_embed.conv.0.weight",
    } <= decayed
    assert len(decay["params"]) + len(no_decay["params"]) == len(names)


@pytest.mark.parametrize("poison, term", [("logits", "kd"), ("features", "proj")])
def test_non_finite_term_stops_with_step_and_term_and_keeps_the_good_checkpoint(
    tmp_path, tiny_config, image_folder, teacher_ckpt, poison, term
):
    loop, loader = _loop(tiny_config, image_folder, teacher_ckpt, output=tmp_path)
    track = loop.track
    loop.save()
    good = (tmp_path / "checkpoint.pth").read_bytes()
    weights = {k: v.detach().clone() for k, v in track.trained.named_parameters()}
    teacher = track.teacher_forward

    def poisoned(images):
        features, logits = teacher(images)
        if poison == "logits":
            return features, torch.full_like(logits, float("nan"))
        return features.index_fill(0, torch.tensor([0]), float("inf")), logits

    track.teacher_forward = poisoned
    loader.sampler.set_epoch(0)
    batch = next(iter(loader))
    _at(loop, 7)
    with pytest.raises(NonFiniteLossError, match=rf"epoch 0 step 8/9 \(global step 8\): .*{term}"):
        loop.train_step(batch)
    assert all(torch.equal(weights[k], v) for k, v in track.trained.named_parameters())  # no update applied
    assert (tmp_path / "checkpoint.pth").read_bytes() == good
    with torch.no_grad():
        next(track.trained.parameters()).fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match="weights became non-finite"):
        loop.save()
    assert (tmp_path / "checkpoint.pth").read_bytes() == good


def test_gradient_accumulation_averages_micro_batch_gradients_and_scales_lr(tiny_config, image_folder, teacher_ckpt):
    """accum_iter = 2: one step on a loader batch of 2B = the mean of the two micro-batches' gradients (each whitened
    and normalised on its own, as on two GPUs), one AdamW step; the lr is scaled by the global batch 2B."""
    loop, loader = _loop(tiny_config, image_folder, teacher_ckpt, *PLAIN_STEPS, "train.accum_iter", "2")
    track, single = loop.track, _loop(tiny_config, image_folder, teacher_ckpt, *PLAIN_STEPS)[0].track
    assert track.lrs["lr"] == pytest.approx(2 * single.lrs["lr"])
    assert loader.batch_size == 2 * single.cfg["data"]["batch_size"]
    reference = copy.deepcopy(track.trained)
    loader.sampler.set_epoch(0)
    images, labels = next(iter(loader))
    values = _terms(loop.train_step((images, labels)))

    objective = DistillationObjective(
        reference.student, reference.projector_loss, "projector", soft_targets=False, smoothing=0.1
    )
    cfg = track.cfg["train"]
    skip = [f"student.{n}" for n in reference.student.no_weight_decay()]
    decay = [p for n, p in reference.named_parameters() if p.ndim > 1 and n not in skip]
    no_decay = [p for n, p in reference.named_parameters() if p.ndim <= 1 or n in skip]
    optimizer = torch.optim.AdamW(
        [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": cfg["weight_decay"]}],
        lr=track.optimizer.param_groups[0]["lr"],
        betas=tuple(cfg["betas"]),
        eps=cfg["opt_eps"],
    )
    expected_terms = {}
    for half_images, half_labels in zip(images.chunk(2), labels.chunk(2)):
        with torch.no_grad():
            features, logits = track.teacher(half_images)
        terms = objective(half_images, half_labels, features, logits)
        (sum(terms.values()) / 2).backward()
        for name, term in terms.items():
            expected_terms[name] = expected_terms.get(name, 0.0) + term.item() / 2
    torch.nn.utils.clip_grad_norm_(reference.parameters(), cfg["clip_grad"])
    optimizer.step()
    for name, term in expected_terms.items():
        assert values[name] == pytest.approx(term, rel=1e-6)
    for (name, ours), theirs in zip(track.trained.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6, msg=name)


def _fast_loop(monkeypatch, tiny_config, image_folder, teacher_ckpt, *opts: str):
    monkeypatch.setattr(torch, "compile", lambda module: module)  # compiling costs a minute on 2 CPU cores
    return _loop(tiny_config, image_folder, teacher_ckpt, "fast", "true", *NO_MIXING, *opts)


def test_fast_step_reads_no_device_value(monkeypatch, tiny_config, image_folder, teacher_ckpt, no_host_reads):
    loop, loader = _fast_loop(monkeypatch, tiny_config, image_folder, teacher_ckpt)
    assert loop.track.optimizer.param_groups[0]["fused"] and loop.track.skips_on_device
    loader.sampler.set_epoch(0)
    batch = next(iter(loader))
    with no_host_reads(lambda t: any(t is b for b in loop.monitor.host_buffers)):
        for _ in range(3):
            step = loop.train_step(batch)
    assert step.names == ["ce", "kd", "proj", "loss"] and step.values.shape == (4,)
    assert loop.epoch_sums["steps"] == 2 and len(loop.monitor.pending) == 1  # step 2 is still in flight
    loop.finish_pending()
    assert loop.epoch_sums["steps"] == 3
    assert loop.last_record.terms["loss"] == pytest.approx(step.values[-1].item())
    release, _ = _loop(tiny_config, image_folder, teacher_ckpt)
    with no_host_reads(), pytest.raises(AssertionError, match="read a"):  # the guard sees the release's check
        release.train_step(batch)


def test_fast_step_skips_a_non_finite_update_on_the_device_and_stops_at_the_next_step(
    monkeypatch, tiny_config, image_folder, teacher_ckpt
):
    loop, loader = _fast_loop(monkeypatch, tiny_config, image_folder, teacher_ckpt)
    track = loop.track
    loader.sampler.set_epoch(0)
    batch = next(iter(loader))
    teacher = track.teacher_forward
    for _ in range(2):
        loop.train_step(batch)
    weights = {k: v.detach().clone() for k, v in track.trained.named_parameters()}
    track.teacher_forward = lambda x: (teacher(x)[0], torch.full_like(teacher(x)[1], float("nan")))
    loop.train_step(batch)  # queued: the check reads it at the next step
    assert all(torch.equal(weights[k], v) for k, v in track.trained.named_parameters())  # skipped on the device
    track.teacher_forward = teacher
    with pytest.raises(
        NonFiniteLossError, match=r"non-finite loss at epoch 0 step 3/9 \(global step 3\): term\(s\) kd"
    ):
        loop.train_step(batch)
    assert all(torch.equal(weights[k], v) for k, v in track.trained.named_parameters())  # nor step 4 applied
    steps = {state["step"].item() for state in track.optimizer.state.values()}
    assert steps == {2.0}  # the optimizer counted the two good steps only


def test_release_clipping_of_scaled_gradients_matches_a_hand_computed_adamw_step(
    tiny_config, image_folder, teacher_ckpt
):
    """GradScaler (scale S) + clip_scaled_grads: clip_grad_norm_(S g, 15) then unscale, i.e. the step uses
    g' = g min(1, 15 / (S |g|)); false: unscale first, g' = g min(1, 15 / |g|). AdamW's first step by hand:
    p <- p (1 - lr wd) - lr g' / (|g'| + eps) (bias-corrected moments of one step)."""
    scale = 2.0**12
    deltas = {}
    for clip_scaled in (True, False):
        loop, loader = _loop(
            tiny_config, image_folder, teacher_ckpt, *PLAIN_STEPS, "train.clip_scaled_grads", str(clip_scaled).lower()
        )
        track = loop.track
        track.scaler = torch.amp.GradScaler("cpu", init_scale=scale)
        loader.sampler.set_epoch(0)
        images, labels = next(iter(loader))
        x, y = track.prepare_batch(images, labels)
        sum(track.compute_terms(x, y).values()).backward()
        named = dict(track.trained.named_parameters())
        grads = {n: p.grad.double() for n, p in named.items() if p.grad is not None}
        track.optimizer.zero_grad(set_to_none=True)
        norm = torch.sqrt(sum((g**2).sum() for g in grads.values()))
        clip = track.cfg["train"]["clip_grad"]
        factor = min(1.0, clip / (float(norm) * (scale if clip_scaled else 1.0) + 1e-6))
        before = {n: p.detach().double().clone() for n, p in named.items()}
        loop.train_step((images, labels))
        eps = track.cfg["train"]["opt_eps"]
        deltas[clip_scaled] = {}
        for group in track.optimizer.param_groups:
            for param in group["params"]:
                name = next(n for n, p in named.items() if p is param)
                if name not in grads:
                    continue
                g = grads[name] * factor
                expected = before[name] * (1 - group["lr"] * group["weight_decay"]) - group["lr"] * g / (g.abs() + eps)
                torch.testing.assert_close(param.detach().double(), expected, rtol=1e-5, atol=1e-7)
                deltas[clip_scaled][name] = param.detach().double() - before[name]
    assert any((deltas[True][n] - deltas[False][n]).abs().max() > 1e-6 for n in deltas[True])


@pytest.mark.parametrize("after", [True, False])
def test_lr_each_step_used_follows_the_schedule_after_or_before_the_step(
    tiny_config, image_folder, teacher_ckpt, after
):
    """lr_after_step (the release): step k runs with lr(k - 1), step 0 with the initial warm-up lr; otherwise lr(k)."""
    loop, loader = _loop(
        tiny_config,
        image_folder,
        teacher_ckpt,
        "train.epochs",
        "2",
        "train.warmup_epochs",
        "0.5",
        "train.lr_after_step",
        str(after).lower(),
    )
    track = loop.track
    used = []
    track.optimizer.register_step_pre_hook(lambda optimizer, args, kwargs: used.append(optimizer.param_groups[0]["lr"]))
    loader.sampler.set_epoch(0)
    batch = next(iter(loader))
    steps = 6
    for _ in range(steps):
        loop.train_step(batch)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=track.lrs["lr"])
    reference = CosineLRScheduler(
        optimizer,
        t_initial=2 * track.steps_per_epoch,
        lr_min=track.lrs["min_lr"],
        warmup_lr_init=track.lrs["warmup_lr"],
        warmup_t=int(0.5 * track.steps_per_epoch),
        cycle_limit=1,
        t_in_epochs=False,
    )
    schedule = [reference._get_lr(t)[0] for t in range(steps)]
    expected = [track.lrs["warmup_lr"], *schedule[:-1]] if after else schedule
    assert used == pytest.approx(expected, rel=1e-12)
    # warm-up then cosine: every lr(t) differs; lr(0) is the initial warm-up lr, so after the step it runs twice
    assert len(set(used)) == (steps - 1 if after else steps)


def test_evaluation_needs_only_the_model_and_a_loader(tiny_config, image_folder, teacher_ckpt):
    """The mean of both heads over the whole val set, as a hand computation; no optimizer or schedule is built."""
    cfg = load_config("demo", str(tiny_config), {"data.path": str(image_folder), "teacher.ckpt": str(teacher_ckpt)})
    torch.manual_seed(0)
    student = build_student(cfg, 16)[0].train()
    _, val_loader = build_loaders(cfg, 0, 1, pin_memory=False, train=False)
    stats = evaluate_student(student, val_loader, cfg, CPU)
    assert student.training
    student.eval()
    with torch.no_grad():
        pairs = [(student(images), labels) for images, labels in val_loader]
    logits, labels = torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
    assert stats["num_images"] == len(labels) == 12
    assert stats["top1"] == pytest.approx(100.0 * (logits.argmax(1) == labels).sum().item() / 12)
    assert stats["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item(), rel=1e-5)
