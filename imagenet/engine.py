"""Training and evaluation loops around a torchdistill box, with exact resume, graceful stop and non-finite checks.

Checkpoint layout (``torch.load(weights_only=True)``-loadable, written by
:func:`projector_kd.engine.checkpoint.atomic_save`): ``model`` (the student network's state dict — the torchdistill
format ``-test_only`` reads), ``projector`` (the ProjectorDistillLoss state, when the student is wrapped),
``optimizer``, ``lr_scheduler``, ``epoch`` and ``step_in_epoch`` (where training continues), ``best_value`` (best val
top-1), ``history`` (val top-1 per epoch), ``global_step``, ``wall_time_s`` (seconds trained so far, over resumes) and
``rng`` (generator states now); in a distributed run also ``rng_per_rank`` (every rank's ``rng``); inside a
gradient-accumulation window also ``accumulated_grads`` (the optimizer's parameters' gradients so far, in its order).
Rank 0 writes; all ranks wait. The training loader's :class:`projector_kd.engine.sampling.ResumableSampler` makes the
batches a pure function of (seed, epoch, position), so resuming at step k starts the sampler at batch k and reads
nothing it skips. A checkpoint is written when an epoch's training ends (``step_in_epoch`` = the epoch's length:
resuming from it validates that epoch first) and again after its validation.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from imagenet.registry import LogitKDLoss, ProjectorKDLoss, ProjectorKDModelWrapper
from projector_kd.engine.checkpoint import atomic_save, capture_rng_state, load_state_exactly, restore_rng_state
from projector_kd.engine.data import checkpoint_on_data_error, worker_failures_plainly
from projector_kd.engine.distributed import barrier
from projector_kd.engine.errors import NonFiniteLossError, UserError
from projector_kd.engine.evaluation import evaluate_classifier
from projector_kd.engine.fast import autocast_context
from projector_kd.engine.runs import progress
from projector_kd.engine.sampling import training_sampler
from projector_kd.engine.signals import stop_cause
from projector_kd.engine.steps import StepMonitor, StepRecord, non_finite_flag, skips_on_device

logger = logging.getLogger(__name__)
LAST_CHECKPOINT = "checkpoint.pth"


class TrainingStopped(Exception):
    """Raised after a graceful stop wrote its resumable checkpoint; ``str`` is the message for the user."""


@dataclass
class RunState:
    """What a checkpoint restores besides the modules: position, best accuracy, per-epoch history and the generator
    states at the save (``resume_rng``)."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    best_value: float = 0.0
    history: list[float] = field(default_factory=list)
    resume_rng: dict | None = None
    last_loss: float = math.nan
    wall_time_before: float = 0.0  # seconds spent by the processes that trained the run before this one
    clock: float = field(default_factory=time.perf_counter)  # when this process started on the run

    def elapsed(self) -> float:
        """Wall-clock seconds of the run so far, over all the processes that trained it (resumes included)."""
        return self.wall_time_before + time.perf_counter() - self.clock


def unwrap(module: nn.Module) -> nn.Module:
    """The network without DDP / DataParallel."""
    return module.module if isinstance(module, (DistributedDataParallel, nn.DataParallel)) else module


def student_of(box: Any) -> nn.Module:
    """The student (or trained model) held by a torchdistill box, before any wrapping."""
    return box.org_student_model if hasattr(box, "org_student_model") else box.org_model


def trained_module(box: Any) -> nn.Module:
    """The module torchdistill trains (the student wrapper, a DDP wrapper, or the student itself)."""
    return box.student_model if hasattr(box, "student_model") else box.model


def projector_of(box: Any) -> nn.Module | None:
    """The ProjectorDistillLoss of a wrapped student, or None."""
    module = trained_module(box)
    return module.distill_loss if isinstance(module, ProjectorKDModelWrapper) else None


def optimized_parameters(box: Any) -> list[nn.Parameter]:
    """The parameters the box's optimizer updates, in its order (student, then the projector when there is one)."""
    return [param for group in box.optimizer.param_groups for param in group["params"]]


def accumulation_steps(box: Any) -> int:
    """Micro-batches per optimizer step: torchdistill's ``grad_accum_step`` (1 without accumulation)."""
    return getattr(box, "grad_accum_step", None) or 1


def window_open(box: Any, global_step: int) -> bool:
    """Whether ``global_step`` micro-batches end inside a gradient-accumulation window: gradients are accumulated
    that the next optimizer step still needs."""
    return global_step % accumulation_steps(box) != 0


def training_state(box: Any, run: RunState, rng_per_rank: list | None = None) -> dict:
    """Everything exact resume needs, as tensors and plain values. ``rng_per_rank``: every rank's generator states
    now in a distributed run, so each rank resumes its own streams."""
    state = {
        "model": unwrap(student_of(box)).state_dict(),
        "optimizer": box.optimizer.state_dict(),
        "lr_scheduler": box.lr_scheduler.state_dict() if box.lr_scheduler is not None else None,
        "epoch": run.epoch,
        "step_in_epoch": run.step_in_epoch,
        "global_step": run.global_step,
        "best_value": run.best_value,
        "history": list(run.history),
        "rng": capture_rng_state(),
        "wall_time_s": run.elapsed(),
    }
    if rng_per_rank is not None:
        state["rng_per_rank"] = [{"rng": rng} for rng in rng_per_rank]
    projector = projector_of(box)
    if projector is not None:
        state["projector"] = projector.state_dict()
    if window_open(box, run.global_step):  # equal on every rank: DDP averages each micro-batch's gradients
        state["accumulated_grads"] = [param.grad for param in optimized_parameters(box)]
    return state


def restore_training_state(box: Any, state: dict, path: Path, rank: int = 0, world_size: int = 1) -> RunState:
    """Load :func:`training_state` output into ``box``; one clear line when the file belongs to another setup."""
    missing = [key for key in ("model", "optimizer", "epoch") if not isinstance(state, dict) or key not in state]
    if missing:
        raise UserError(
            f"checkpoint {path} is not a resumable training checkpoint (no {', '.join(missing)}) — "
            f"use another output folder"
        )
    load_state_exactly(unwrap(student_of(box)), state.get("model"), path, "the student")
    projector = projector_of(box)
    if projector is not None:
        if "projector" not in state:
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
    _restore_accumulated_grads(box, state, path)
    streams = {"rng": state.get("rng")}
    per_rank = state.get("rng_per_rank")
    if per_rank is not None and len(per_rank) == world_size:
        streams = per_rank[rank]
    elif world_size > 1:
        logger.warning(
            "checkpoint %s was written by a run with another number of processes: every rank resumes "
            "rank 0's random streams (training continues, but not bit for bit)",
            path,
        )
    run = RunState(
        epoch=int(state["epoch"]),
        step_in_epoch=int(state.get("step_in_epoch", 0)),
        global_step=int(state.get("global_step", 0)),
        best_value=float(state.get("best_value", 0.0)),
        history=[float(v) for v in state.get("history", [])],
        resume_rng=streams["rng"],
        wall_time_before=float(state.get("wall_time_s", 0.0)),
    )
    if run.step_in_epoch > 0 and "epoch_rng" in state:
        logger.warning(
            "checkpoint %s was written by an earlier version that replayed the epoch's batches: epoch %d continues "
            "at step %d with this version's sample order (training continues, but not bit for bit)",
            path,
            run.epoch,
            run.step_in_epoch,
        )
    box.stage_grad_count = run.global_step  # torchdistill's step counter (gradient accumulation, step-wise schedules)
    if run.global_step > 0:  # the optimizer stepped before the save: no "scheduler before optimizer" warning on resume
        box.optimizer._opt_called = True
    return run


def _restore_accumulated_grads(box: Any, state: dict, path: Path) -> None:
    """Put back the gradients a checkpoint written inside an accumulation window holds, so the window's optimizer
    step sums the same micro-batches as in an uninterrupted run."""
    grads = state.get("accumulated_grads")
    global_step = int(state.get("global_step", 0))
    if grads is None and not window_open(box, global_step):
        return
    if grads is None:
        logger.warning(
            "checkpoint %s ends inside an accumulation window (global step %d, grad_accum_step %s) but holds no "
            "accumulated gradients (an earlier version or another grad_accum_step wrote it): the window goes on "
            "without its earlier micro-batches (training continues, but not bit for bit)",
            path,
            global_step,
            accumulation_steps(box),
        )
        return
    if not window_open(box, global_step):
        logger.warning(
            "checkpoint %s holds the gradients of an open accumulation window, but global step %d closes one of this "
            "run's grad_accum_step %s: they are dropped (training continues, but not bit for bit)",
            path,
            global_step,
            accumulation_steps(box),
        )
        return
    params = optimized_parameters(box)
    if len(grads) != len(params) or any(g is not None and g.shape != p.shape for g, p in zip(grads, params)):
        raise UserError(
            f"checkpoint {path}: its accumulated gradients do not match this config's parameters — "
            f"use another output folder"
        )
    for param, grad in zip(params, grads):
        param.grad = None if grad is None else torch.empty_like(param).copy_(grad)


TOTAL = "(total)"


class TermRecorder:
    """Forward hooks on the box's loss terms, so a non-finite total can be traced to the term that caused it.

    :meth:`snapshot` stacks the step's values on the device (no host read); :meth:`describe` and
    :meth:`non_finite_terms` format a snapshot once it has reached the host."""

    def __init__(self, criterion: nn.Module) -> None:
        self.values: dict[str, torch.Tensor] = {}
        self.criterion = criterion
        self.handles = []
        for name, (module, _weight) in getattr(criterion, "term_dict", {}).items():
            self.handles.append(module.register_forward_hook(self._hook(name)))

    def _hook(self, name: str) -> Callable:
        def record(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            self.values[name] = output.detach()

        return record

    def snapshot(self, loss: torch.Tensor) -> tuple[list[str], torch.Tensor]:
        """Names and one device vector of this step's values: each term, its inner terms (``term.part``, from
        ``last_terms``), then the total (:data:`TOTAL`)."""
        names, values = [], []
        for name, value in self.values.items():
            names.append(name)
            values.append(value.float().reshape(()))
            for part, inner in self._inner(name).items():
                names.append(f"{name}.{part}")
                values.append(inner.detach().float().reshape(()))
        names.append(TOTAL)
        values.append(loss.detach().float().reshape(()))
        return names, torch.stack(values)

    def _inner(self, name: str) -> dict[str, torch.Tensor]:
        module = self.criterion.term_dict[name][0]
        return getattr(module, "last_terms", {}) if isinstance(module, (ProjectorKDLoss, LogitKDLoss)) else {}

    @staticmethod
    def describe(terms: dict[str, float]) -> str:
        """``ce = 1.2; projector_kd = nan (projector_kd.feature = 0.3, projector_kd.kd = nan)`` from a snapshot."""
        parts: list[str] = []
        inner: list[str] = []
        for name, value in terms.items():
            if name == TOTAL:
                continue
            if "." in name:
                inner.append(f"{name} = {value:.4g}")
                continue
            if inner:
                parts[-1] += f" ({', '.join(inner)})"
                inner = []
            parts.append(f"{name} = {value:.4g}")
        if inner:
            parts[-1] += f" ({', '.join(inner)})"
        return "; ".join(parts) if parts else "no per-term values recorded"

    @staticmethod
    def non_finite_terms(terms: dict[str, float]) -> list[str]:
        """The non-finite terms of a snapshot, outer terms first, then inner ones (``total`` when only the sum)."""
        names = [n for n, v in terms.items() if n != TOTAL and "." not in n and not math.isfinite(v)]
        names += [n for n, v in terms.items() if "." in n and not math.isfinite(v)]
        return names or ["total"]


@dataclass
class LoopContext:
    """The fixed inputs of a training run."""

    box: Any
    teacher: nn.Module | None
    device: torch.device
    output_dir: Path
    best_path: Path
    distributed: bool
    rank: int
    stop: Any
    writer: Any = None
    autocast_dtype: torch.dtype | None = None
    channels_last: bool = False
    log_freq: int = 100
    monitor: StepMonitor | None = None  # per-step values on their way to the host (set by train_one_epoch)


def _to_device(ctx: LoopContext, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    images = images.to(ctx.device, non_blocking=True)
    if ctx.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, targets.to(ctx.device, non_blocking=True)


def _autocast(ctx: LoopContext):
    return autocast_context(ctx.device.type, ctx.autocast_dtype)


def save_checkpoint(ctx: LoopContext, run: RunState, best: bool) -> None:
    """Rank 0 writes ``checkpoint.pth`` (and the best checkpoint when ``best``), atomically; every rank waits for it,
    so no rank reads a checkpoint that is still being written."""
    rng_per_rank = None
    if ctx.distributed:
        rng_per_rank = [None] * dist.get_world_size()
        dist.all_gather_object(rng_per_rank, capture_rng_state())
    if ctx.rank == 0:
        state = training_state(ctx.box, run, rng_per_rank)
        if best:
            atomic_save(state, ctx.best_path)
        atomic_save(state, ctx.output_dir / LAST_CHECKPOINT)
    barrier()


def _kept_checkpoint(ctx: LoopContext) -> str:
    last = ctx.output_dir / LAST_CHECKPOINT
    if last.is_file():
        return f"nothing was written for this step — the last good checkpoint {last} is intact"
    return "nothing was written for this step (no checkpoint yet)"


def _finish(ctx: LoopContext, run: RunState, record: StepRecord | None) -> None:
    """Account a step whose values reached the host: raise NonFiniteLossError if it was bad."""
    if record is None:
        return
    if record.bad:
        raise NonFiniteLossError(
            f"non-finite loss at {record.step}: term(s) "
            f"{', '.join(TermRecorder.non_finite_terms(record.terms))} went non-finite "
            f"[{TermRecorder.describe(record.terms)}]; {_kept_checkpoint(ctx)}; lower the learning "
            f"rate or check the data"
        )
    run.last_loss = record.terms[TOTAL]


def _finish_pending(ctx: LoopContext, run: RunState) -> None:
    """Wait for and account every step still in flight (before a checkpoint, a log line, an epoch's end)."""
    for record in ctx.monitor.drain():
        _finish(ctx, run, record)


def train_step(
    ctx: LoopContext,
    run: RunState,
    recorder: TermRecorder,
    images: torch.Tensor,
    targets: torch.Tensor,
    supp_dict: Any,
    total: int,
) -> bool:
    """One step of the box on a host batch; returns whether a stop was requested at this step (the caller stops by
    :meth:`projector_kd.engine.steps.StepMonitor.stop_agreed`: at once alone, up to a step late from the ranks' vote).

    A non-finite loss term stops training with NonFiniteLossError naming the step and the term(s); that update
    is never applied. With a fused optimizer (the fast path) the update is skipped on the device
    (``optimizer.found_inf``) and the error is raised at the next step, before its update: nothing is read to the host
    inside the step. A non-fused optimizer cannot skip on the device, so its step is checked at once (one host read)."""
    box = ctx.box
    images, targets = _to_device(ctx, images, targets)
    where = f"epoch {run.epoch} step {run.step_in_epoch + 1}/{total} (global step {run.global_step + 1})"
    with _autocast(ctx):
        try:
            loss = box.forward_process(images, targets, supp_dict)
        except ValueError as error:
            if "batch size 1" in str(error):
                raise UserError(
                    f"{where}: a training batch holds 1 image per process, but the whitening needs "
                    f"at least 2 — set drop_last: true in train.train_data_loader.kwargs"
                ) from None
            if "non-finite" not in str(error):
                raise
            raise NonFiniteLossError(
                f"non-finite loss at {where}: the projector feature term got {error}; {_kept_checkpoint(ctx)}"
            ) from None
    names, values = recorder.snapshot(loss)
    found_inf = non_finite_flag(values)
    requested = bool(ctx.stop.requested)  # polled once per step
    if skips_on_device(box.optimizer):
        _finish(ctx, run, ctx.monitor.pop())  # the previous step, read now that this one is queued
        box.optimizer.found_inf = found_inf
        try:
            box.post_forward_process(loss=loss)
        finally:
            del box.optimizer.found_inf
        ctx.monitor.push(where, names, values, found_inf, requested)
    else:
        ctx.monitor.push(where, names, values, found_inf, requested)
        _finish_pending(ctx, run)
        box.post_forward_process(loss=loss)
    run.step_in_epoch += 1
    run.global_step += 1
    return requested


def train_one_epoch(ctx: LoopContext, run: RunState, recorder: TermRecorder) -> None:
    """One epoch from ``run.step_in_epoch``: the loader's sampler starts at that batch, so resuming mid-epoch reads
    none of the batches already trained."""
    box = ctx.box
    if ctx.monitor is None:
        ctx.monitor = StepMonitor(ctx.device, ctx.distributed)
    box.pre_epoch_process(epoch=run.epoch)
    if ctx.teacher is not None:
        ctx.teacher.eval()
    training_sampler(box.train_data_loader).set_epoch(run.epoch, run.step_in_epoch)
    batches = iter(box.train_data_loader)
    resume_rng, run.resume_rng = run.resume_rng, None
    if resume_rng is not None:  # generators exactly as they were when the checkpoint was written
        restore_rng_state(resume_rng)
    total = run.step_in_epoch + len(box.train_data_loader)

    def save_here() -> str | None:
        """A resumable checkpoint before the failed batch (not under DDP: the other ranks are mid-step)."""
        if ctx.distributed or run.global_step == 0:
            return None
        _finish_pending(ctx, run)
        save_checkpoint(ctx, run, best=False)
        return f"{ctx.output_dir / LAST_CHECKPOINT} (epoch {run.epoch}, step {run.step_in_epoch})"

    for images, targets, supp_dict in progress(
        checkpoint_on_data_error(batches, save_here),
        rank=ctx.rank,
        total=total - run.step_in_epoch,
        desc=f"epoch {run.epoch}",
    ):
        requested = train_step(ctx, run, recorder, images, targets, supp_dict, total)
        if run.global_step % ctx.log_freq == 0:
            _finish_pending(ctx, run)
            if ctx.writer is not None:
                ctx.writer.add_scalar("train/loss", run.last_loss, run.global_step)
                ctx.writer.add_scalar("train/lr", box.optimizer.param_groups[0]["lr"], run.global_step)
            logger.info(
                "epoch %d step %d/%d loss %.4f lr %.4g",
                run.epoch,
                run.step_in_epoch,
                total,
                run.last_loss,
                box.optimizer.param_groups[0]["lr"],
            )
        if ctx.monitor.stop_agreed(requested):
            _finish_pending(ctx, run)
            save_checkpoint(ctx, run, best=False)
            raise TrainingStopped(
                f"stopped by {stop_cause(ctx.stop, ctx.distributed)} at epoch {run.epoch} step {run.step_in_epoch}; "
                f"resumable checkpoint {ctx.output_dir / LAST_CHECKPOINT} — rerun the same command to continue"
            )
    _finish_pending(ctx, run)


def train(ctx: LoopContext, run: RunState) -> RunState:
    """Epochs ``run.epoch`` .. ``num_epochs - 1``: train, checkpoint the trained epoch (so a failure or kill during
    validation does not lose it: the rerun validates it at once), validate, step the epoch scheduler, checkpoint."""
    box = ctx.box
    recorder = TermRecorder(box.criterion)
    student = unwrap(student_of(box))
    while run.epoch < box.num_epochs:
        trained_from = run.step_in_epoch
        with worker_failures_plainly("training"):  # a worker may die while a step runs, not only in a fetch
            train_one_epoch(ctx, run, recorder)
        if not all(math.isfinite(p.detach().float().sum().item()) for p in student.parameters()):
            raise NonFiniteLossError(f"non-finite student weights after epoch {run.epoch}; {_kept_checkpoint(ctx)}")
        if run.step_in_epoch > trained_from:  # the epoch's training is kept before validation can fail or be killed
            save_checkpoint(ctx, run, best=False)
        else:
            logger.info("epoch %d was trained before the resume: validating it", run.epoch)
        scores = evaluate_classifier(
            student, box.val_data_loader, ctx.device, ctx.rank, channels_last=ctx.channels_last, desc=f"val {run.epoch}"
        )
        top1, top5 = scores["top1"], scores["top5"]
        logger.info("epoch %d: val top-1 %.2f top-5 %.2f", run.epoch, top1, top5)
        if ctx.writer is not None:
            ctx.writer.add_scalar("val/top1", top1, run.epoch)
            ctx.writer.add_scalar("val/top5", top5, run.epoch)
        box.post_epoch_process()
        run.history.append(top1)
        is_best = top1 > run.best_value or not ctx.best_path.exists()
        run.best_value = max(run.best_value, top1)
        run.epoch += 1
        run.step_in_epoch = 0
        save_checkpoint(ctx, run, best=is_best)
    return run
