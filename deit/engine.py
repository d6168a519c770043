"""The DeiT track's training step and evaluation, as a :class:`projector_kd.engine.loop.Track`: the loss is
:mod:`deit.losses`, the optimizer and schedule :mod:`deit.optim`; epochs, checkpoints and resume are the shared
:class:`~projector_kd.engine.loop.TrainingLoop`'s. Evaluation predicts with the mean of both heads' logits; counts are
summed over ranks.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from projector_kd import ProjectorDistillLoss
from projector_kd.engine.distributed import DistEnv
from projector_kd.engine.errors import NonFiniteLossError, UserError
from projector_kd.engine.evaluation import evaluate_classifier
from projector_kd.engine.fast import CompiledOrEager, CompileFallbackNotice, autocast_context
from projector_kd.engine.loop import TOTAL, Position, StepValues, Track, step_label
from projector_kd.engine.steps import non_finite_flag, skips_on_device, step_unless

from .checkpoint import CHECKPOINT_FORMAT, load_resume_state, upgrade_checkpoint
from .config import precision, scaled_lrs
from .datasets import build_mixup
from .losses import DistillationObjective, TeacherOutputs
from .models import place_student
from .optim import build_optimizer, build_scheduler


def evaluate_student(student: nn.Module, loader: Any, cfg: dict, env: DistEnv) -> dict[str, float]:
    """``top1``/``top5`` (%), mean CE ``loss`` and ``num_images`` of the mean of both heads over the whole val set,
    summed over ranks, in the recipe's precision (:func:`projector_kd.engine.evaluation.evaluate_classifier`)."""
    autocast_dtype, channels_last = precision(cfg, env.device)
    student = place_student(student, cfg, env.device)
    kwargs = dict(autocast_dtype=autocast_dtype, channels_last=channels_last, with_loss=True)
    return evaluate_classifier(student, loader, env.device, env.rank, **kwargs)


class DeiTTrack(Track):
    """Student, projector, teacher, AdamW, per-step cosine schedule and precision of one rank.

    ``fast`` (the fast path): bf16 autocast on CUDA, channels_last for the conv stem and teacher, torch.compile of
    teacher and objective (eager fallback with a message), cuDNN autotuning and TF32, fused AdamW, which skips a
    non-finite update on the device; otherwise the release recipe: fp16 autocast + GradScaler on CUDA when
    ``train.amp``, eager, foreach AdamW. On the CPU both compute in float32.
    """

    label = "DeiT track"
    checkpoint_format = CHECKPOINT_FORMAT

    def __init__(
        self,
        cfg: dict,
        env: DistEnv,
        student: nn.Module,
        projector_loss: ProjectorDistillLoss | None,
        teacher: nn.Module | None,
        train_loader: Any,
        val_loader: Any,
        output_dir: Path | None = None,
        steps_per_epoch: int | None = None,
    ) -> None:
        """``steps_per_epoch``: the train loader's by default (a benchmark passes one without a loader)."""
        train, method = cfg["train"], cfg["distillation"]["method"]
        self.cfg, self.env, self.device, self.fast = cfg, env, env.device, cfg["fast"]
        self.train_loader, self.val_loader, self.output_dir = train_loader, val_loader, output_dir
        self.steps_per_epoch = steps_per_epoch or train_loader.sampler.batches_per_epoch
        self.position = Position()
        self.epochs, self.eval_freq, self.log_freq = train["epochs"], train["eval_freq"], train["log_freq"]
        self.save_freq, self.accum_iter = train["save_freq"], train["accum_iter"]
        self.autocast_dtype, self.channels_last = precision(cfg, self.device)
        self.student_module = place_student(student, cfg, self.device)
        self.teacher: TeacherOutputs | None = None
        if method != "none":
            if teacher is None:
                raise UserError(f"distillation.method = {method} needs a teacher (teacher.name, --teacher-ckpt)")
            teacher = teacher.to(self.device).eval()
            if self.channels_last:
                teacher.to(memory_format=torch.channels_last)
            self.teacher = TeacherOutputs(teacher)
        self.mixup = build_mixup(cfg)
        self.trained = DistillationObjective.from_config(
            self.student_module, projector_loss, cfg, soft_targets=self.mixup is not None
        ).to(self.device)
        self.projector_loss = self.trained.projector_loss
        if self.fast and self.projector_loss is not None:
            self.projector_loss.check_inputs = False
        self.ddp: nn.parallel.DistributedDataParallel | None = None
        objective: nn.Module = self.trained
        if env.distributed:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            objective = self.ddp = nn.parallel.DistributedDataParallel(self.trained, device_ids=device_ids)
        self.objective: nn.Module = objective
        self.teacher_forward: Any = self.teacher
        if self.fast:
            notice = CompileFallbackNotice()
            self.objective = CompiledOrEager(objective, "student objective", notice)
            if self.teacher is not None:
                self.teacher_forward = CompiledOrEager(self.teacher, "teacher", notice)
        self.lrs = scaled_lrs(cfg, env.world_size)
        self.optimizer = build_optimizer(self.trained, cfg, self.lrs["lr"])
        self.scheduler = build_scheduler(self.optimizer, cfg, self.lrs, self.steps_per_epoch)
        self.scaler = torch.amp.GradScaler("cuda") if self.autocast_dtype == torch.float16 else None
        self.skips_on_device = skips_on_device(self.optimizer) and self.scaler is None
        self.clip_grad, self.clip_scaled_grads = train["clip_grad"], train["clip_scaled_grads"]
        self.lr_after_step = train["lr_after_step"]
        self.global_step = 0

    # -- one step ---------------------------------------------------------------------------------------------------
    def prepare_batch(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Move to the device (non-blocking), apply mixup/cutmix, channels_last on the fast path."""
        images = images.to(self.device, non_blocking=True)
        targets = targets.to(self.device, non_blocking=True)
        if self.mixup is not None:
            images, targets = self.mixup(images, targets)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, targets

    def compute_terms(self, images: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """Teacher (no grad) and student forward on a prepared batch -> loss terms."""
        with autocast_context(self.device.type, self.autocast_dtype):
            teacher_features = teacher_logits = None
            if self.teacher_forward is not None:
                teacher_features, teacher_logits = self.teacher_forward(images)
            try:
                return self.objective(images, targets, teacher_features, teacher_logits)
            except ValueError as err:
                where = step_label(self.position, self.steps_per_epoch)
                raise NonFiniteLossError(
                    f"non-finite loss at {where}: loss term 'proj' rejected its input: {err}; this step's update was "
                    "not applied and nothing was written for it"
                ) from None

    def forward(self, batch: Any, position: Position) -> StepValues:
        """Forward and backward of one loader batch (every micro-batch) and the gradient clipping.

        With ``train.accum_iter = k`` the loader batch is split into k micro-batches of ``data.batch_size``, each
        handled as one GPU's batch would be (mixup, batch whitening), and the gradient of ``sum(loss_i) / k`` is taken:
        the recipe's global batch on k times fewer GPUs. Gradients are clipped to norm ``train.clip_grad``; under the
        fp16 GradScaler, ``train.clip_scaled_grads`` clips the still-scaled gradients as the release does (otherwise
        unscaled ones). ``train.lr_after_step`` updates the schedule after the step (step k runs with lr(k - 1)).
        ``found_inf``: a loss term or (without a GradScaler, whose overflow skips are not errors) the gradient norm
        is NaN/inf."""
        self.position, self.global_step = position, position.global_step
        if not self.lr_after_step:
            self.scheduler.step_update(self.global_step)
        self.optimizer.zero_grad(set_to_none=True)
        images, targets = batch[0], batch[1]
        micro_batches = list(zip(images.chunk(self.accum_iter), targets.chunk(self.accum_iter)))
        names: list[str] = []
        means: torch.Tensor | None = None
        for index, (micro_images, micro_targets) in enumerate(micro_batches):
            last = index == len(micro_batches) - 1
            # under DDP, gradients are all-reduced once per step: on the last micro-batch's forward and backward
            sync = self.ddp.no_sync() if self.ddp is not None and not last else contextlib.nullcontext()
            with sync:
                terms = self.compute_terms(*self.prepare_batch(micro_images, micro_targets))
                names = list(terms)
                values = torch.stack([t.detach().float() for t in terms.values()]) / len(micro_batches)
                loss = sum(terms.values()) / len(micro_batches)
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            means = values if means is None else means + values
        assert means is not None
        parameters = list(self.trained.parameters())
        if self.scaler is not None:
            found_inf = non_finite_flag(means)
            if self.clip_grad:
                if not self.clip_scaled_grads:
                    self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(parameters, self.clip_grad)
        else:
            norm = nn.utils.clip_grad_norm_(parameters, self.clip_grad if self.clip_grad else math.inf)
            found_inf = non_finite_flag(means, norm)
        return StepValues([*names, TOTAL], torch.cat([means, means.sum().reshape(1)]), found_inf)

    def apply_update(self, found_inf: torch.Tensor) -> None:
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        elif self.skips_on_device:
            step_unless(self.optimizer, found_inf)
        else:
            self.optimizer.step()
        if self.lr_after_step:
            self.scheduler.step_update(self.global_step)

    # -- epochs, evaluation, checkpoints ----------------------------------------------------------------------------
    def start_epoch(self, epoch: int) -> None:
        self.trained.train()

    def end_epoch(self) -> None:
        """Nothing: the learning rate follows the step (:meth:`forward`)."""

    def validate(self, epoch: int) -> dict[str, float]:
        return evaluate_student(self.student_module, self.val_loader, self.cfg, self.env)

    def learning_rate(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def student(self) -> nn.Module:
        return self.student_module

    def state_dict(self, position: Position) -> dict[str, Any]:
        return {
            "model": self.student_module.state_dict(),
            "projector": self.projector_loss.state_dict() if self.projector_loss is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "config": self.cfg,
        }

    def load_state_dict(self, state: dict[str, Any], path: Path, position: Position) -> None:
        if state["steps_per_epoch"] != self.steps_per_epoch:
            raise UserError(
                f"{path} was written with {state['steps_per_epoch']} steps per epoch, this run has "
                f"{self.steps_per_epoch} (batch size, world size or dataset changed); resume with the "
                "same data.batch_size and number of processes, or use a new --output"
            )
        load_resume_state(self, state, path)
        self.global_step = position.global_step

    def upgrade_checkpoint(self, state: Any, path: Path) -> Any:
        return upgrade_checkpoint(state, path, self.cfg)

    def checkpoint_copies(self, epoch: int, improved: bool) -> list[Path]:
        """``ckpt_epoch_<epoch>.pth`` every ``train.save_freq`` epochs and after the last (the release's names)."""
        if self.output_dir is None or not ((epoch + 1) % self.save_freq == 0 or epoch == self.epochs - 1):
            return []
        return [self.output_dir / f"ckpt_epoch_{epoch}.pth"]
