"""Training step, epoch loop and evaluation of the DeiT track.

One training step (docs/method.md), with y the mixup/cutmix soft targets and x the mixed images seen by both networks::

    loss = SoftTargetCE(head(x), y)                                      'ce'
         + kd_weight      * KL(softmax(teacher(x)) || softmax(head_conv(x)))   'kd'    (method kd, projector)
         + feature_weight * L_log_corr(mean patch token -> Linear -> BN, BN(pooled teacher features))
                                                                             'proj'  (projector)

With ``method: none`` there is no teacher and ``head_conv`` is trained on the labels like ``head`` ('ce_dist').
Evaluation predicts with the mean of both heads' logits; counts are summed over ranks.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.scheduler import CosineLRScheduler
from torch import nn

from projector_kd import kd_loss, pool_features
from projector_kd.engine.checkpoint import atomic_save, capture_rng_state, restore_rng_state
from projector_kd.engine.data import checkpoint_on_data_error
from projector_kd.engine.distributed import DistEnv, barrier
from projector_kd.engine.errors import NonFiniteLossError, UserError
from projector_kd.engine.evaluation import evaluate_classifier
from projector_kd.engine.fast import CompiledOrEager, CompileFallbackNotice, autocast_context, enable_fast_cuda_backends
from projector_kd.engine.runs import progress
from projector_kd.engine.steps import StepMonitor, StepRecord, non_finite_flag, skips_on_device, step_unless

from .config import scaled_lrs
from .datasets import build_mixup

logger = logging.getLogger(__name__)
CHECKPOINT_FORMAT = "projector_kd.deit/1"


class TeacherOutputs(nn.Module):
    """Frozen timm classifier -> (pooled features (B, C), logits) from one ``forward_features`` pass."""

    def __init__(self, teacher: nn.Module) -> None:
        super().__init__()
        self.teacher = teacher

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.teacher.forward_features(images)
        return pool_features(features), self.teacher.forward_head(features)


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class DistillationObjective(nn.Module):
    """Student forward and the loss terms in one module, so DDP and ``torch.compile`` see a single graph.

    ``forward(images, targets, teacher_features, teacher_logits)`` returns ``{term name: scalar}`` (see module doc).
    """

    def __init__(
        self,
        student: nn.Module,
        method: str,
        soft_targets: bool,
        smoothing: float,
        kd_weight: float = 1.0,
        feature_weight: float = 1.0,
        kd_temperature: float = 1.0,
    ) -> None:
        super().__init__()
        if method == "projector" and student.distillation_loss is None:
            raise UserError("distillation.method = projector needs a student built with a projector (teacher_dim)")
        self.student = student
        self.method = method
        if soft_targets:
            self.criterion = SoftTargetCrossEntropy()
        elif smoothing > 0:
            self.criterion = LabelSmoothingCrossEntropy(smoothing)
        else:
            self.criterion = nn.CrossEntropyLoss()
        self.kd_weight = kd_weight
        self.feature_weight = feature_weight
        self.kd_temperature = kd_temperature

    def forward(
        self,
        images: torch.Tensor,
        targets: torch.Tensor,
        teacher_features: torch.Tensor | None = None,
        teacher_logits: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        tokens = self.student.forward_features(images)
        cls_logits, dist_logits = self.student.forward_heads(tokens)
        cls_logits, dist_logits = _at_least_fp32(cls_logits), _at_least_fp32(dist_logits)
        terms = {"ce": self.criterion(cls_logits, targets)}
        if self.method == "none":
            terms["ce_dist"] = self.criterion(dist_logits, targets)
            return terms
        terms["kd"] = self.kd_weight * kd_loss(dist_logits, _at_least_fp32(teacher_logits), self.kd_temperature)
        if self.method == "projector":
            terms["proj"] = self.feature_weight * self.student.distillation_loss(tokens[:, 2:], teacher_features)
        return terms


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups: decay for >= 2-D weights; none for 1-D params, biases and ``model.no_weight_decay()``."""
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name.endswith(".bias") or name in skip else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def precision(cfg: dict, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype, channels_last) of the recipe on ``device``: on CUDA bf16 + channels_last on the fast path,
    fp16 when ``train.amp``; float32 and the default layout otherwise."""
    cuda = device.type == "cuda"
    fast = cfg["fast"]
    autocast_dtype = (torch.bfloat16 if fast else torch.float16) if cuda and (fast or cfg["train"]["amp"]) else None
    return autocast_dtype, fast and cuda


def place_student(student: nn.Module, cfg: dict, device: torch.device) -> nn.Module:
    """``student`` on ``device``, its conv stem channels_last where :func:`precision` says so (the fast path also
    turns on the fast CUDA backends)."""
    if cfg["fast"]:
        enable_fast_cuda_backends(device)
    student = student.to(device)
    if precision(cfg, device)[1]:
        student.conv_embed.to(memory_format=torch.channels_last)
    return student


def evaluate_student(student: nn.Module, loader: Any, cfg: dict, env: DistEnv) -> dict[str, float]:
    """``top1``/``top5`` (%), mean CE ``loss`` and ``num_images`` of the mean of both heads over the whole val set,
    summed over ranks, in the recipe's precision (:func:`projector_kd.engine.evaluation.evaluate_classifier`)."""
    autocast_dtype, channels_last = precision(cfg, env.device)
    return evaluate_classifier(
        place_student(student, cfg, env.device),
        loader,
        env.device,
        env.rank,
        autocast_dtype=autocast_dtype,
        channels_last=channels_last,
        with_loss=True,
    )


class Trainer:
    """Everything one rank needs to train and evaluate: student, teacher, optimizer, schedule, precision.

    ``fast=True`` (the fast path): bf16 autocast on CUDA, channels_last for the conv stem and teacher, torch.compile
    of teacher and objective (eager fallback with a message), cuDNN autotuning and TF32, fused AdamW, and no host
    synchronisation inside a step (see :meth:`train_step`); otherwise the release recipe: fp16 autocast + GradScaler
    on CUDA when ``train.amp``, eager, foreach AdamW. On CPU both paths compute in float32.
    """

    def __init__(
        self,
        cfg: dict,
        env: DistEnv,
        student: nn.Module,
        teacher: nn.Module | None,
        steps_per_epoch: int,
        output_dir: Path | None = None,
        writer: Any = None,
    ) -> None:
        self.cfg = cfg
        self.env = env
        self.device = env.device
        self.fast = cfg["fast"]
        self.output_dir = output_dir
        self.writer = writer
        self.steps_per_epoch = steps_per_epoch
        self.accum_iter = cfg["train"]["accum_iter"]
        self.method = cfg["distillation"]["method"]
        cuda = self.device.type == "cuda"
        self.student = place_student(student, cfg, self.device)
        self.autocast_dtype, self.channels_last = precision(cfg, self.device)
        self.teacher = None
        if self.method != "none":
            if teacher is None:
                raise UserError(f"distillation.method = {self.method} needs a teacher (teacher.name, --teacher-ckpt)")
            teacher = teacher.to(self.device).eval()
            if self.channels_last:
                teacher.to(memory_format=torch.channels_last)
            self.teacher = TeacherOutputs(teacher)
        self.mixup = build_mixup(cfg)
        objective = DistillationObjective(
            self.student,
            self.method,
            soft_targets=self.mixup is not None,
            smoothing=cfg["aug"]["smoothing"],
            kd_weight=cfg["distillation"]["kd_weight"],
            feature_weight=cfg["distillation"]["feature_weight"],
            kd_temperature=cfg["distillation"]["kd_temperature"],
        ).to(self.device)
        if self.fast and self.student.distillation_loss is not None:
            self.student.distillation_loss.check_inputs = False
        self.ddp: nn.parallel.DistributedDataParallel | None = None
        if env.distributed:
            objective = self.ddp = nn.parallel.DistributedDataParallel(
                objective, device_ids=[self.device.index] if cuda else None
            )
        self.objective: Callable = objective
        self.teacher_forward: Callable | None = self.teacher
        if self.fast:
            notice = CompileFallbackNotice()
            self.objective = CompiledOrEager(objective, "student objective", notice)
            if self.teacher is not None:
                self.teacher_forward = CompiledOrEager(self.teacher, "teacher", notice)
        self.lrs = scaled_lrs(cfg, env.world_size)
        train = cfg["train"]
        self.optimizer = torch.optim.AdamW(
            param_groups(self.student, train["weight_decay"]),
            lr=self.lrs["lr"],
            betas=tuple(train["betas"]),
            eps=train["opt_eps"],
            **({"fused": True} if self.fast else {}),
        )
        self.scheduler = CosineLRScheduler(
            self.optimizer,
            t_initial=train["epochs"] * steps_per_epoch,
            lr_min=self.lrs["min_lr"],
            warmup_lr_init=self.lrs["warmup_lr"],
            warmup_t=int(train["warmup_epochs"] * steps_per_epoch),
            cycle_limit=1,
            t_in_epochs=False,
        )
        self.scaler = torch.amp.GradScaler("cuda") if self.autocast_dtype == torch.float16 else None
        self.clip_scaled_grads = train["clip_scaled_grads"]
        self.lr_after_step = train["lr_after_step"]
        self.monitor = StepMonitor(self.device, env.distributed)
        self.last_record: StepRecord | None = None
        self.stop: Any = None
        self.stop_asked = False
        self.global_step = 0
        self.max_accuracy = 0.0
        self.wall_time = 0.0  # seconds spent by the processes before this one (from the checkpoint resumed)
        self.clock = time.perf_counter()  # when this process started on the run
        self.epoch_sums: dict[str, float] = {}
        self.history: dict[str, list] = {"epoch": [], "val_top1": [], "val_top5": [], "train_loss": []}

    # -- one step -------------------------------------------------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast_context(self.device.type, self.autocast_dtype)

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
        with self.autocast():
            teacher_features = teacher_logits = None
            if self.teacher_forward is not None:
                teacher_features, teacher_logits = self.teacher_forward(images)
            try:
                return self.objective(images, targets, teacher_features, teacher_logits)
            except ValueError as err:
                raise NonFiniteLossError(
                    f"training stopped at {self._where(self.global_step)}: loss term 'proj' "
                    f"rejected its input: {err}; no checkpoint written"
                ) from None

    def _where(self, step: int) -> str:
        return f"step {step} (epoch {step // self.steps_per_epoch}, batch {step % self.steps_per_epoch})"

    def train_step(self, images: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """One optimisation step at ``self.global_step``; returns the loss terms (mean over micro-batches) and their
        sum ``'loss'`` as 0-dim device tensors.

        With ``train.accum_iter = k`` the loader batch is split into k micro-batches of ``data.batch_size``, each
        handled as one GPU's batch would be (mixup, batch whitening), and the gradient of ``sum(loss_i) / k`` is taken:
        the recipe's global batch on k times fewer GPUs. Gradients are clipped to norm ``train.clip_grad``; under the
        fp16 GradScaler, ``train.clip_scaled_grads`` clips the still-scaled gradients as the release does (otherwise
        unscaled ones). ``train.lr_after_step`` updates the schedule after the step (step k runs with lr(k - 1)).

        A NaN/inf loss term or gradient norm raises NonFiniteLossError naming the step and term, and that step's
        update is never applied (the GradScaler's own overflow skips are not errors). The fast path's fused AdamW
        skips such an update on the device and the error is raised one call later, before that call's update; no
        value is read to the host inside the step (loss terms come back through ``self.monitor``, each read at the
        next step). The release path's optimizer cannot skip on the device, so it checks at once (one host read per
        micro-batch, one for the gradient norm without a GradScaler; the GradScaler reads its own flag)."""
        if not self.lr_after_step:
            self.scheduler.step_update(self.global_step)
        self.optimizer.zero_grad(set_to_none=True)
        deferred = skips_on_device(self.optimizer) and self.scaler is None
        micro_batches = list(zip(images.chunk(self.accum_iter), targets.chunk(self.accum_iter)))
        names: list[str] = []
        means: torch.Tensor | None = None
        for index, (micro_images, micro_targets) in enumerate(micro_batches):
            last = index == len(micro_batches) - 1
            # under DDP, gradients are all-reduced once per step: on the last micro-batch's forward and backward
            sync = self.ddp.no_sync() if self.ddp is not None and not last else contextlib.nullcontext()
            with sync:
                micro_images, micro_targets = self.prepare_batch(micro_images, micro_targets)
                terms = self.compute_terms(micro_images, micro_targets)
                names = list(terms)
                values = torch.stack([t.detach().float() for t in terms.values()])
                if not deferred:  # checked before backward, as the release's loop does
                    self._raise_if_bad(StepRecord(self.global_step, dict(zip(names, values.tolist())), False, False))
                loss = sum(terms.values()) / len(micro_batches)
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            means = values / len(micro_batches) if means is None else means + values / len(micro_batches)
        assert means is not None
        clip = self.cfg["train"]["clip_grad"]
        parameters = list(self.student.parameters())
        if self.scaler is not None:
            found_inf = torch.zeros((), device=self.device)  # the GradScaler's own found_inf decides
            if clip:
                if not self.clip_scaled_grads:
                    self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(parameters, clip)
        else:
            norm = nn.utils.clip_grad_norm_(parameters, clip if clip else math.inf)
            found_inf = non_finite_flag(means, norm)
            if not deferred and found_inf.item():  # this optimizer cannot skip on the device: check now
                self._raise_if_bad(StepRecord(self.global_step, dict(zip(names, means.tolist())), True, False))
        self._finish(self.monitor.pop())  # the previous step, read now that this one is queued
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        elif deferred:
            step_unless(self.optimizer, found_inf)
        else:
            self.optimizer.step()
        if self.lr_after_step:
            self.scheduler.step_update(self.global_step)
        self.stop_asked = bool(self.stop is not None and self.stop.requested)  # polled once per step
        self.monitor.push(
            self.global_step, [*names, "loss"], torch.cat([means, means.sum().reshape(1)]), found_inf, self.stop_asked
        )
        self.global_step += 1
        result = dict(zip(names, means.unbind()))
        result["loss"] = means.sum()
        return result

    def _raise_if_bad(self, record: StepRecord) -> None:
        """NonFiniteLossError naming the step and the first non-finite term (or the gradient norm)."""
        bad = [name for name, value in record.terms.items() if not math.isfinite(value)]
        listed = ", ".join(f"{k}={v:.4g}" for k, v in record.terms.items() if k != "loss")
        if bad:
            raise NonFiniteLossError(
                f"non-finite loss at {self._where(record.step)}: term {bad[0]!r} = {record.terms[bad[0]]} ({listed}); "
                f"stopped without applying this step's update or writing a checkpoint — resume from the last good "
                f"one with a lower lr or train.amp off"
            )
        if record.bad:
            raise NonFiniteLossError(
                f"non-finite gradient norm at {self._where(record.step)} (loss terms {listed}); "
                f"stopped without applying this step's update or writing a checkpoint"
            )

    def _finish(self, record: StepRecord | None) -> None:
        """Account a step whose values reached the host: raise if it was bad, else add it to the epoch sums."""
        if record is None:
            return
        self._raise_if_bad(record)
        for key, value in record.terms.items():
            self.epoch_sums[key] = self.epoch_sums.get(key, 0.0) + value
        self.epoch_sums["steps"] = self.epoch_sums.get("steps", 0) + 1
        self.last_record = record

    def finish_pending(self) -> None:
        """Wait for and account every step still in flight (before a checkpoint, a log line, an epoch's end)."""
        for record in self.monitor.drain():
            self._finish(record)

    # -- loops --------------------------------------------------------------------------------------------------
    def _stop_agreed(self) -> bool:
        """Stop now? :meth:`projector_kd.engine.steps.StepMonitor.stop_agreed` for this step's poll."""
        return self.monitor.stop_agreed(self.stop_asked)

    def train_epoch(self, loader: Any, epoch: int, start_batch: int = 0, stop: Any = None) -> dict[str, float] | None:
        """Train batches ``start_batch..`` of ``epoch``. Returns mean loss terms, or None when ``stop.requested``
        became true: then a resumable checkpoint at the next batch has been written."""
        self.student.train()
        self.stop = stop
        loader.sampler.set_epoch(epoch, start_batch)
        if start_batch == 0:
            self.epoch_sums = {}
        count = 0
        started = time.perf_counter()
        log_freq = self.cfg["train"]["log_freq"]
        position = {"next_batch": start_batch}

        def save_here() -> str | None:
            """A resumable checkpoint before batch ``next_batch`` (not under DDP: the other ranks are mid-step)."""
            if (
                self.env.distributed
                or self.output_dir is None
                or epoch * self.steps_per_epoch + position["next_batch"] == 0
            ):
                return None
            self.save(epoch, position["next_batch"], ["checkpoint.pth"])
            return f"{self.output_dir / 'checkpoint.pth'} (epoch {epoch}, batch {position['next_batch']})"

        batches = progress(
            checkpoint_on_data_error(loader, save_here), rank=self.env.rank, desc=f"epoch {epoch}", total=len(loader)
        )
        for batch, (images, targets) in enumerate(batches, start=start_batch):
            self.global_step = epoch * self.steps_per_epoch + batch
            self.train_step(images, targets)
            count += 1
            if batch % log_freq == 0 or batch == self.steps_per_epoch - 1:
                self.finish_pending()
                values = self.last_record.terms
                rate = count * images.shape[0] * self.env.world_size / (time.perf_counter() - started)
                logger.info(
                    "train epoch %d step %d/%d lr %.3g %s (%.0f img/s)",
                    epoch,
                    batch + 1,
                    self.steps_per_epoch,
                    self.optimizer.param_groups[0]["lr"],
                    " ".join(f"{k} {v:.4f}" for k, v in values.items()),
                    rate,
                )
                if self.writer is not None:
                    for key, value in values.items():
                        self.writer.add_scalar(f"train/{key}", value, self.global_step)
                    self.writer.add_scalar("train/lr", self.optimizer.param_groups[0]["lr"], self.global_step)
            position["next_batch"] = batch + 1
            if self._stop_agreed():
                self.save(epoch, batch + 1, ["checkpoint.pth"])
                return None
        self.finish_pending()
        totals = dict(self.epoch_sums)
        steps = totals.pop("steps", 1)
        return {key: value / steps for key, value in totals.items()}

    # -- checkpoints ----------------------------------------------------------------------------------------------
    def _gather_rng(self) -> list[dict]:
        state = capture_rng_state()
        if not self.env.distributed:
            return [state]
        states: list[Any] = [None] * self.env.world_size
        dist.all_gather_object(states, state)
        return states

    def elapsed(self) -> float:
        """Wall-clock seconds of the run so far, over all the processes that trained it (resumes included)."""
        return self.wall_time + time.perf_counter() - self.clock

    def state_dict(self, epoch: int, next_batch: int) -> dict[str, Any]:
        """Everything needed to continue exactly at batch ``next_batch`` of ``epoch``."""
        return {
            "format": CHECKPOINT_FORMAT,
            "model": self.student.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "epoch": epoch,
            "next_batch": next_batch,
            "global_step": epoch * self.steps_per_epoch + next_batch,
            "steps_per_epoch": self.steps_per_epoch,
            "world_size": self.env.world_size,
            "max_accuracy": self.max_accuracy,
            "wall_time_s": self.elapsed(),
            "epoch_sums": self.epoch_sums,
            "history": self.history,
            "rng": self._gather_rng(),
            "config": self.cfg,
        }

    def save(self, epoch: int, next_batch: int, names: list[str]) -> None:
        """Write the resumable state atomically to ``output_dir/<name>`` for each name (rank 0 only). Refuses to
        write weights that are not finite, so a good checkpoint is never replaced by a broken one."""
        self.finish_pending()
        state = self.state_dict(epoch, next_batch)
        if self.env.is_main and self.output_dir is not None:
            broken = [
                n
                for n, p in self.student.state_dict().items()
                if p.is_floating_point() and not bool(torch.isfinite(p).all())
            ]
            if broken:
                raise NonFiniteLossError(
                    f"weights became non-finite ({', '.join(broken[:4])}); not writing a "
                    f"checkpoint over {self.output_dir / names[0]}"
                )
            for name in names:
                atomic_save(state, self.output_dir / name)
            logger.info("saved %s (epoch %d, next batch %d)", ", ".join(names), epoch, next_batch)
        barrier()

    def load_state_dict(self, state: dict[str, Any], path: Path) -> tuple[int, int]:
        """Restore a checkpoint written by :meth:`state_dict`; returns ``(epoch, next_batch)`` to resume at."""
        if state.get("format") != CHECKPOINT_FORMAT:
            raise UserError(
                f"{path} is not a resumable checkpoint of this project (no {CHECKPOINT_FORMAT!r} "
                "format tag); to start from released weights use --ckpt with --eval, or a new --output"
            )
        if state["steps_per_epoch"] != self.steps_per_epoch:
            raise UserError(
                f"{path} was written with {state['steps_per_epoch']} steps per epoch, this run has "
                f"{self.steps_per_epoch} (batch size, world size or dataset changed); resume with the "
                "same data.batch_size and number of processes, or use a new --output"
            )
        try:
            self.student.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as err:
            raise UserError(
                f"{path} does not match this run's model/optimizer "
                f"({str(err).splitlines()[0]}); use the same config or a new --output"
            ) from None
        self.scheduler.load_state_dict(state["lr_scheduler"])
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.max_accuracy = state["max_accuracy"]
        self.wall_time = state["wall_time_s"]
        self.epoch_sums = state["epoch_sums"]
        self.history = state["history"]
        rng = state["rng"]
        if len(rng) == self.env.world_size:
            restore_rng_state(rng[self.env.rank])
        else:
            logger.warning(
                "%s holds RNG states for %d ranks, this run has %d: RNG not restored (resume is not bit-exact)",
                path,
                len(rng),
                self.env.world_size,
            )
        self.global_step = state["global_step"]
        return state["epoch"], state["next_batch"]
