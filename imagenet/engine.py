"""The ResNet track's training step: a torchdistill box as a :class:`projector_kd.engine.loop.Track`.

One step is the box's own: ``forward_process`` (teacher and student forward, the recipe's criterion) on the batch,
then ``post_forward_process`` (backward, every ``grad_accum_step`` micro-batches the optimizer step, the step-wise
schedule); the epoch-wise schedule steps in ``post_epoch_process``. The epochs, checkpoints and resume are the shared
:class:`~projector_kd.engine.loop.TrainingLoop`'s.

Checkpoint (format :data:`CHECKPOINT_FORMAT`; the run's fields are the loop's): ``model`` (the student network's state
dict — the torchdistill format ``-test_only`` reads), ``projector`` (the ProjectorDistillLoss state, when the student
is wrapped), ``optimizer``, ``lr_scheduler`` and, inside a gradient-accumulation window, ``accumulated_grads`` (the
optimizer's parameters' gradients so far, in its order). The earlier layout (no ``format``; ``best_value``, a list
``history``, ``rng`` and ``rng_per_rank``) is read by :meth:`BoxTrack.upgrade_checkpoint`.
"""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from imagenet.box import (
    TermRecorder,
    optimized_parameters,
    projector_of,
    restore_accumulated_grads,
    student_of,
    unwrap,
    window_open,
)
from projector_kd.engine.checkpoint import load_state_exactly
from projector_kd.engine.errors import NonFiniteLossError, UserError
from projector_kd.engine.evaluation import evaluate_classifier
from projector_kd.engine.fast import autocast_context
from projector_kd.engine.loop import Position, StepValues, Track, step_label
from projector_kd.engine.runs import counted
from projector_kd.engine.sampling import training_sampler
from projector_kd.engine.steps import non_finite_flag, skips_on_device

logger = logging.getLogger(__name__)
CHECKPOINT_FORMAT = "projector_kd.resnet/2"
SCHEDULER_BEFORE_OPTIMIZER = r"Detected call of `lr_scheduler.step\(\)` before `optimizer.step\(\)`"


class BoxTrack(Track):
    """A built torchdistill box trained by the shared loop: ``box.train_data_loader`` draws from a
    :class:`~projector_kd.engine.sampling.ResumableSampler`; ``best_path`` receives the checkpoint of each epoch
    whose validation top-1 is the best so far (the recipe's ``dst_ckpt``)."""

    label = "ResNet track"
    checkpoint_format = CHECKPOINT_FORMAT

    def __init__(
        self,
        box: Any,
        teacher: nn.Module | None,
        device: torch.device,
        rank: int,
        best_path: Path,
        log_freq: int = 100,
        autocast_dtype: torch.dtype | None = None,
        channels_last: bool = False,
        steps_per_epoch: int | None = None,
    ) -> None:
        """``steps_per_epoch``: the train loader's by default (a benchmark passes one without a loader)."""
        self.box, self.teacher, self.device, self.rank, self.best_path = box, teacher, device, rank, best_path
        self.autocast_dtype, self.channels_last, self.log_freq = autocast_dtype, channels_last, log_freq
        self.train_loader = box.train_data_loader
        self.epochs = box.num_epochs
        if steps_per_epoch is None:
            sampler = training_sampler(self.train_loader)
            sampler.set_epoch(0, 0)
            steps_per_epoch = len(self.train_loader)
            if steps_per_epoch == 0:
                raise UserError(
                    f"train.train_data_loader gives no training batch: {sampler.num_items} images over "
                    f"{counted(sampler.world_size, 'process', 'processes')} give {sampler.per_rank} per process, fewer "
                    f"than one batch of {sampler.batch_size} with drop_last — lower the batch size "
                    f"(train.train_data_loader.kwargs.batch_size) or add images"
                )
        self.steps_per_epoch = steps_per_epoch
        self.recorder = TermRecorder(box.criterion)
        self.skips_on_device = skips_on_device(box.optimizer)
        self.loss: torch.Tensor | None = None

    def forward(self, batch: Any, position: Position) -> StepValues:
        images, targets, supp_dict = batch
        images = images.to(self.device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        targets = targets.to(self.device, non_blocking=True)
        with autocast_context(self.device.type, self.autocast_dtype):
            try:
                self.loss = self.box.forward_process(images, targets, supp_dict)
            except ValueError as error:
                where = step_label(position, self.steps_per_epoch)
                if "batch size 1" in str(error):
                    raise UserError(
                        f"{where}: a training batch holds 1 image per process, but the whitening needs "
                        f"at least 2 — set drop_last: true in train.train_data_loader.kwargs"
                    ) from None
                if "non-finite" not in str(error):
                    raise
                raise NonFiniteLossError(
                    f"non-finite loss at {where}: the projector feature term got {error}; this step's update was not "
                    f"applied and nothing was written for it"
                ) from None
        names, values = self.recorder.snapshot(self.loss)
        return StepValues(names, values, non_finite_flag(values))

    def apply_update(self, found_inf: torch.Tensor) -> None:
        """torchdistill's post-forward process; a fused optimizer reads ``found_inf`` as it reads GradScaler's."""
        if not self.skips_on_device:
            self.box.post_forward_process(loss=self.loss)
            return
        self.box.optimizer.found_inf = found_inf
        try:
            self.box.post_forward_process(loss=self.loss)
        finally:
            del self.box.optimizer.found_inf

    def start_epoch(self, epoch: int) -> None:
        self.box.pre_epoch_process(epoch=epoch)
        if self.teacher is not None:
            self.teacher.eval()

    def end_epoch(self) -> None:
        """torchdistill's post-epoch process (the epoch-wise schedule). After a resume that only validates, the
        optimizer has not stepped in this process: PyTorch's warning about that order does not apply."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=SCHEDULER_BEFORE_OPTIMIZER, category=UserWarning)
            self.box.post_epoch_process()

    def validate(self, epoch: int) -> dict[str, float]:
        return evaluate_classifier(
            self.student(),
            self.box.val_data_loader,
            self.device,
            self.rank,
            channels_last=self.channels_last,
            desc=f"val {epoch}",
        )

    def learning_rate(self) -> float:
        return self.box.optimizer.param_groups[0]["lr"]

    def student(self) -> nn.Module:
        return unwrap(student_of(self.box))

    def state_dict(self, position: Position) -> dict[str, Any]:
        box = self.box
        state = {
            "model": self.student().state_dict(),
            "optimizer": box.optimizer.state_dict(),
            "lr_scheduler": box.lr_scheduler.state_dict() if box.lr_scheduler is not None else None,
        }
        projector = projector_of(box)
        if projector is not None:
            state["projector"] = projector.state_dict()
        if window_open(box, position.global_step):  # equal on every rank: DDP averages each micro-batch's gradients
            state["accumulated_grads"] = [param.grad for param in optimized_parameters(box)]
        return state

    def load_state_dict(self, state: dict[str, Any], path: Path, position: Position) -> None:
        """Restore :meth:`state_dict`'s part (also from a torchdistill checkpoint ``{'model', 'optimizer', ...}``)."""
        box = self.box
        missing = [key for key in ("model", "optimizer") if key not in state]
        if missing:
            raise UserError(
                f"checkpoint {path} is not a resumable training checkpoint (no {', '.join(missing)}) — "
                f"use another output folder"
            )
        load_state_exactly(self.student(), state["model"], path, "the student")
        projector = projector_of(box)
        if projector is not None:
            if state.get("projector") is None:
                raise UserError(
                    f"checkpoint {path} has no projector state but this config trains one — it was written "
                    f"by a run without projector distillation; use another output folder"
                )
            load_state_exactly(projector, state["projector"], path, "the projector")
        try:
            box.optimizer.load_state_dict(state["optimizer"])
            if box.lr_scheduler is not None and state.get("lr_scheduler") is not None:
                box.lr_scheduler.load_state_dict(state["lr_scheduler"])
        except (KeyError, ValueError) as error:
            raise UserError(
                f"checkpoint {path}: optimizer/scheduler state does not match this config ({error}) — "
                f"use another output folder"
            ) from None
        if position.step_in_epoch > 0 and "epoch_rng" in state:
            logger.warning(
                "checkpoint %s was written by an earlier version that replayed the epoch's batches: epoch %d continues "
                "at step %d with this version's sample order (training continues, but not bit for bit)",
                path,
                position.epoch,
                position.step_in_epoch,
            )
        restore_accumulated_grads(self.box, state, path, position.global_step)
        box.stage_grad_count = position.global_step  # torchdistill's step counter (accumulation, step-wise schedules)

    def upgrade_checkpoint(self, state: Any, path: Path) -> Any:
        """An earlier layout (no ``format``: ``best_value``, ``history`` a list of val top-1, ``rng`` with
        ``rng_per_rank`` in a distributed run) in today's."""
        if not isinstance(state, dict) or "format" in state or "step_in_epoch" not in state:
            return state
        per_rank = state.get("rng_per_rank")
        top1 = [float(v) for v in state.get("history", [])]
        return {
            **{k: v for k, v in state.items() if k not in ("best_value", "rng_per_rank")},
            "format": CHECKPOINT_FORMAT,
            "best_top1": float(state.get("best_value", 0.0)),
            "history": {
                "epoch": list(range(len(top1))),
                "train_loss": [math.nan] * len(top1),
                "val_epoch": list(range(len(top1))),
                "val_top1": top1,
                "val_top5": [math.nan] * len(top1),
            },
            "rng": [entry["rng"] for entry in per_rank] if per_rank else [state["rng"]],
            "epoch_sums": {},
            "steps_per_epoch": self.steps_per_epoch,
            "world_size": len(per_rank) if per_rank else 1,
        }

    def checkpoint_copies(self, epoch: int, improved: bool) -> list[Path]:
        """The best checkpoint (``dst_ckpt``) when ``epoch`` improved the best top-1, or when there is none yet."""
        return [self.best_path] if improved or not self.best_path.exists() else []
