"""The training loop of both tracks: epochs of steps, values read a step later, checkpoints, exact resume, stop.

A track (:class:`Track`: the DeiT objective with AdamW, or a torchdistill box) says how a batch becomes loss terms and
how an update is applied; :class:`TrainingLoop` does the rest, once for both. One step on a loader batch::

    step = track.forward(batch, position)     # loss terms, their sum 'loss' and found_inf, on the device
    if not track.skips_on_device:             # the release recipes' optimizers: one host read per step
        raise now if step.found_inf           # NonFiniteLossError naming the step and the term
    account(the previous step's record)       # the values of step k reach the host at step k + 1
    track.apply_update(step.found_inf)        # a fused optimizer skips a bad update on the device
    queue this step's record                  # terms, found_inf and the ranks' stop vote (StepMonitor)

so a bad step's update is never applied, and on the fast path nothing is read to the host inside a step. An epoch
trains from the sampler's start batch, writes ``checkpoint.pth`` (so a failure or kill during validation loses no
training), validates (every ``eval_freq`` epochs and the last), lets the track end the epoch (the ResNet track's
epoch-wise schedule), and writes ``checkpoint.pth`` again, after the track's extra copies (best, per-epoch). A stop
request (SIGTERM/SIGINT, or another rank's vote) finishes the step, checkpoints and ends :meth:`TrainingLoop.fit` with
one ``stopped:`` line; an unreadable image or a dead loader worker first checkpoints at the failed batch.

Checkpoint (``torch.load(weights_only=True)``-loadable): the track's part (:meth:`Track.state_dict`: ``model`` = the
student alone, ``projector``, ``optimizer``, ``lr_scheduler``, ...) and the run's: ``format`` (the track's
``checkpoint_format``), ``epoch`` and ``step_in_epoch`` (where training continues; ``step_in_epoch`` equal to
``steps_per_epoch``: trained, not yet validated), ``global_step``, ``steps_per_epoch``, ``world_size``,
``best_top1``, ``history`` (``epoch``/``train_loss`` per trained epoch, ``val_epoch``/``val_top1``/``val_top5`` per
validated one), ``epoch_sums`` (the open epoch's summed terms), ``wall_time_s`` (every process that trained the run)
and ``rng`` (every rank's generator states at the save, restored just before the next step).
"""

from __future__ import annotations

import abc
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import atomic_save, capture_rng_state, restore_rng_state
from .data import checkpoint_on_data_error, worker_failures_plainly
from .distributed import all_gather, barrier
from .errors import NonFiniteLossError, UserError
from .runs import progress
from .sampling import training_sampler
from .signals import stop_cause
from .steps import StepMonitor, StepRecord

logger = logging.getLogger(__name__)
LAST_CHECKPOINT = "checkpoint.pth"
TOTAL = "loss"


class TrainingStopped(Exception):
    """A stop request ended training after its resumable checkpoint was written; ``str`` is the line for the user."""


@dataclass(frozen=True)
class StepValues:
    """One step's loss terms on the device: ``values[i]`` is term ``names[i]``, the last being their sum
    (:data:`TOTAL`); ``found_inf`` (0-dim float32) is 1.0 when the update must not be applied."""

    names: list[str]
    values: torch.Tensor
    found_inf: torch.Tensor


@dataclass
class Position:
    """Where training stands: ``epoch``, the steps of it done (``step_in_epoch``) and the steps done in all."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0


def step_label(position: Position, steps_per_epoch: int) -> str:
    """The step about to run at ``position``, for messages: ``epoch E step S/N (global step G)``, counted from 1."""
    p = position
    return f"epoch {p.epoch} step {p.step_in_epoch + 1}/{steps_per_epoch} (global step {p.global_step + 1})"


def _history() -> dict[str, list]:
    return {"epoch": [], "train_loss": [], "val_epoch": [], "val_top1": [], "val_top5": []}


class Track(abc.ABC):
    """What a training track gives the loop. Subclasses set ``label`` (log lines), ``checkpoint_format``,
    ``train_loader`` (over a :class:`~projector_kd.engine.sampling.ResumableSampler`), ``steps_per_epoch``,
    ``epochs``, ``eval_freq``, ``log_freq``, ``device`` and ``skips_on_device`` (whether :meth:`apply_update` leaves
    the weights untouched on the device when ``found_inf`` is 1)."""

    label: str
    checkpoint_format: str
    train_loader: Any
    steps_per_epoch: int
    epochs: int
    device: torch.device
    eval_freq: int = 1
    log_freq: int = 100
    skips_on_device: bool = False

    @abc.abstractmethod
    def start_epoch(self, epoch: int) -> None:
        """Before the epoch's first step (train mode, the teacher in eval mode)."""

    @abc.abstractmethod
    def forward(self, batch: Any, position: Position) -> StepValues:
        """The loss terms of one loader batch, everything of the step that comes before the optimizer's update."""

    @abc.abstractmethod
    def apply_update(self, found_inf: torch.Tensor) -> None:
        """Apply the update of the step :meth:`forward` computed (skipped on the device where ``found_inf`` is 1 when
        :attr:`skips_on_device`)."""

    @abc.abstractmethod
    def end_epoch(self) -> None:
        """After the epoch's validation (and before its checkpoint)."""

    @abc.abstractmethod
    def validate(self, epoch: int) -> dict[str, float]:
        """``top1`` and ``top5`` (%) of the student on the validation set, over every rank."""

    @abc.abstractmethod
    def learning_rate(self) -> float:
        """The learning rate of the optimizer's first parameter group now."""

    @abc.abstractmethod
    def student(self) -> nn.Module:
        """The student network (no DDP or compile wrapper): what a checkpoint's ``model`` holds."""

    @abc.abstractmethod
    def state_dict(self, position: Position) -> dict[str, Any]:
        """The track's part of a checkpoint at ``position``."""

    @abc.abstractmethod
    def load_state_dict(self, state: dict[str, Any], path: Path, position: Position) -> None:
        """Restore :meth:`state_dict`'s part from the checkpoint ``path`` (one line naming the file on a mismatch)."""

    def upgrade_checkpoint(self, state: Any, path: Path) -> Any:
        """A checkpoint of an earlier layout of this track in today's (unchanged when it is today's)."""
        return state

    def checkpoint_copies(self, epoch: int, improved: bool) -> list[Path]:
        """Files that also receive the checkpoint written after ``epoch``'s validation (``improved``: its top-1 beat
        the best so far)."""
        return []

    def batch_images(self, batch: Any) -> int:
        """Images in a loader batch (for the img/s of the log lines)."""
        return len(batch[0])


def non_finite_terms(terms: dict[str, float]) -> list[str]:
    """The terms of a record that are NaN/inf: outer terms first, then inner ones (``term.part``); the total only
    when no term is."""
    bad = [name for name, value in terms.items() if not math.isfinite(value)]
    named = [name for name in bad if "." not in name and name != TOTAL] + [name for name in bad if "." in name]
    return named or [name for name in bad if name == TOTAL]


def describe_terms(terms: dict[str, float]) -> str:
    """``ce = 1.2; projector_kd = nan (projector_kd.feature = 0.3, projector_kd.kd = nan)``: a record's terms, each
    term's inner ones (``term.part``, listed right after it) in brackets, the total left out."""
    groups: list[tuple[str, str, list[str]]] = []
    for name, value in terms.items():
        if name == TOTAL:
            continue
        text = f"{name} = {value:.4g}"
        if "." in name and groups and groups[-1][0] == name.split(".", 1)[0]:
            groups[-1][2].append(text)
        else:
            groups.append((name, text, []))
    described = "; ".join(text + (f" ({', '.join(inner)})" if inner else "") for _, text, inner in groups)
    return described or "no per-term values recorded"


class TrainingLoop:
    """Trains a :class:`Track` on one rank of ``world_size``, writing checkpoints into ``output_dir`` (rank 0; None:
    nothing is written) and TensorBoard scalars through ``writer``. ``clock`` (``time.perf_counter()`` when this
    process started on the run) makes ``wall_time_s`` count the set-up too."""

    def __init__(
        self,
        track: Track,
        output_dir: Path | None,
        rank: int = 0,
        world_size: int = 1,
        writer: Any = None,
        clock: float | None = None,
    ) -> None:
        if track.steps_per_epoch <= 0:
            raise UserError(f"{track.label}: the training loader gives no batch per epoch — lower the batch size")
        self.track = track
        self.output_dir = output_dir
        self.rank = rank
        self.world_size = world_size
        self.distributed = world_size > 1
        self.writer = writer
        self.monitor = StepMonitor(track.device, self.distributed)
        self.position = Position()
        self.best_top1 = 0.0
        self.history = _history()
        self.epoch_sums: dict[str, float] = {}
        self.last_record: StepRecord | None = None
        self.wall_time_before = 0.0
        self.clock = time.perf_counter() if clock is None else clock
        self.stop: Any = None
        self._stop_asked = False
        self._resume_rng: dict | None = None

    # -- one step ---------------------------------------------------------------------------------------------------
    def where(self) -> str:
        """The step about to run (:func:`step_label`)."""
        return step_label(self.position, self.track.steps_per_epoch)

    def train_step(self, batch: Any) -> StepValues:
        """One optimisation step on a loader batch (see the module docstring); returns its device values."""
        where = self.where()
        step = self.track.forward(batch, self.position)
        if not self.track.skips_on_device and bool(step.found_inf):  # this optimizer cannot skip on the device
            self._account(StepRecord(where, dict(zip(step.names, step.values.tolist())), True, False))
        self._account(self.monitor.pop())  # the previous step, read now that this one is queued
        self.track.apply_update(step.found_inf)
        self._stop_asked = bool(self.stop is not None and self.stop.requested)  # polled once per step
        self.monitor.push(where, step.names, step.values, step.found_inf, self._stop_asked)
        self.position.step_in_epoch += 1
        self.position.global_step += 1
        return step

    def _account(self, record: StepRecord | None) -> None:
        """Add a step whose values reached the host to the epoch's sums; NonFiniteLossError if it was bad."""
        if record is None:
            return
        if record.bad:
            bad = non_finite_terms(record.terms)
            what = f"term(s) {', '.join(bad)} went non-finite" if bad else "the gradient norm went non-finite"
            raise NonFiniteLossError(
                f"non-finite loss at {record.step}: {what} [{describe_terms(record.terms)}]; this step's update was "
                f"not applied and {self._kept()}; lower the learning rate (or turn off fp16 mixed precision) or "
                f"check the data"
            )
        for name, value in record.terms.items():
            self.epoch_sums[name] = self.epoch_sums.get(name, 0.0) + value
        self.epoch_sums["steps"] = self.epoch_sums.get("steps", 0) + 1
        self.last_record = record

    def finish_pending(self) -> None:
        """Wait for and account every step still in flight (before a checkpoint, a log line, an epoch's end)."""
        for record in self.monitor.drain():
            self._account(record)

    def _kept(self) -> str:
        last = self.output_dir / LAST_CHECKPOINT if self.output_dir is not None else None
        if last is not None and last.is_file():
            return f"nothing was written for it — the last good checkpoint {last} is intact"
        return "nothing was written for it (no checkpoint yet)"

    # -- epochs -----------------------------------------------------------------------------------------------------
    def fit(self, stop: Any = None) -> bool:
        """Train from :attr:`position` to the last epoch; True when done, False when a stop request (``stop``: an
        object with ``requested``, e.g. :class:`~projector_kd.engine.signals.GracefulStop`) ended training after
        its resumable checkpoint was written (rank 0 has printed the run's one ``stopped:`` line)."""
        self.stop = stop
        if self.position.epoch >= self.track.epochs:
            logger.info("all %d epochs were trained before this run: nothing left to train", self.track.epochs)
        try:
            while self.position.epoch < self.track.epochs:
                self._epoch()
        except TrainingStopped as stopped:
            logger.warning("%s", stopped)
            if self.rank == 0:  # one line for the whole run
                print(f"stopped: {stopped}", file=sys.stderr, flush=True)
            return False
        return True

    def _epoch(self) -> None:
        track, epoch = self.track, self.position.epoch
        started = time.perf_counter()
        trained_before = self.position.step_in_epoch >= track.steps_per_epoch
        if not trained_before:
            with worker_failures_plainly("training"):  # a worker may die while a step runs, not only in a fetch
                self._train_epoch()
        validate = (epoch + 1) % track.eval_freq == 0 or epoch == track.epochs - 1
        if trained_before:
            self._restore_resume_rng()
        if validate and not trained_before:  # the epoch's training is kept before validation can fail or be killed
            self.save()
        elif validate:
            logger.info("epoch %d was trained before the resume: validating it", epoch)
        sums = dict(self.epoch_sums)
        steps = sums.pop("steps", 0) or 1
        self.history["epoch"].append(epoch)
        self.history["train_loss"].append(sums.get(TOTAL, math.nan) / steps)
        improved = False
        if validate:
            stats = track.validate(epoch)
            improved = stats["top1"] > self.best_top1
            self.best_top1 = max(self.best_top1, stats["top1"])
            for key, value in (("val_epoch", epoch), ("val_top1", stats["top1"]), ("val_top5", stats["top5"])):
                self.history[key].append(value)
            logger.info(
                "epoch %d: val top-1 %.2f top-5 %.2f (best %.2f), %.1fs",
                epoch,
                stats["top1"],
                stats["top5"],
                self.best_top1,
                time.perf_counter() - started,
            )
            if self.writer is not None:
                self.writer.add_scalar("val/top1", stats["top1"], epoch)
                self.writer.add_scalar("val/top5", stats["top5"], epoch)
        track.end_epoch()
        self.position = Position(epoch + 1, 0, self.position.global_step)
        self.epoch_sums = {}
        self.save(track.checkpoint_copies(epoch, improved))

    def _train_epoch(self) -> None:
        """The epoch's steps from ``position.step_in_epoch``: the sampler starts at that batch, so a resumed epoch
        reads none of the batches already trained."""
        track, position = self.track, self.position
        if position.step_in_epoch == 0:
            self.epoch_sums = {}
        track.start_epoch(position.epoch)
        training_sampler(track.train_loader).set_epoch(position.epoch, position.step_in_epoch)
        batches = iter(track.train_loader)
        self._restore_resume_rng()
        images, started = 0, time.perf_counter()
        remaining = track.steps_per_epoch - position.step_in_epoch
        for batch in progress(
            checkpoint_on_data_error(batches, self._save_at_failure),
            rank=self.rank,
            desc=f"epoch {position.epoch}",
            total=remaining,
        ):
            index = position.step_in_epoch
            self.train_step(batch)
            images += track.batch_images(batch) * self.world_size
            if index % track.log_freq == 0 or index == track.steps_per_epoch - 1:
                self._log_step(images / (time.perf_counter() - started))
            if self.monitor.stop_agreed(self._stop_asked):
                self.save()
                raise TrainingStopped(
                    f"stopped by {stop_cause(self.stop, self.distributed)} at epoch {position.epoch} step "
                    f"{position.step_in_epoch}; resumable checkpoint {self.output_dir / LAST_CHECKPOINT} — rerun "
                    f"the same command to continue"
                )
        self.finish_pending()

    def _restore_resume_rng(self) -> None:
        """After a resume, before the next step or validation: the generators exactly as they were at the save."""
        if self._resume_rng is not None:
            restore_rng_state(self._resume_rng)
            self._resume_rng = None

    def _log_step(self, images_per_s: float) -> None:
        self.finish_pending()
        terms = self.last_record.terms
        lr = self.track.learning_rate()
        logger.info(
            "train epoch %d step %d/%d lr %.4g %s (%.0f img/s)",
            self.position.epoch,
            self.position.step_in_epoch,
            self.track.steps_per_epoch,
            lr,
            " ".join(f"{name} {value:.4f}" for name, value in terms.items()),
            images_per_s,
        )
        if self.writer is not None:
            for name, value in terms.items():
                self.writer.add_scalar(f"train/{name}", value, self.position.global_step)
            self.writer.add_scalar("train/lr", lr, self.position.global_step)

    def _save_at_failure(self) -> str | None:
        """A resumable checkpoint before a training batch that failed to load (not under DDP: the other ranks are
        mid-step); names it, or None when there is nothing to save."""
        if self.distributed or self.output_dir is None or self.position.global_step == 0:
            return None
        self.save()
        p = self.position
        return f"{self.output_dir / LAST_CHECKPOINT} (epoch {p.epoch}, step {p.step_in_epoch})"

    # -- checkpoints ------------------------------------------------------------------------------------------------
    def elapsed(self) -> float:
        """Wall-clock seconds of the run so far, over all the processes that trained it (resumes included)."""
        return self.wall_time_before + time.perf_counter() - self.clock

    def _every_rank_rng(self) -> list[dict]:
        return all_gather(capture_rng_state(), "gathering every rank's random state for a checkpoint")

    def state_dict(self) -> dict[str, Any]:
        """The whole checkpoint at :attr:`position` (see the module docstring)."""
        p = self.position
        return {
            **self.track.state_dict(p),
            "format": self.track.checkpoint_format,
            "epoch": p.epoch,
            "step_in_epoch": p.step_in_epoch,
            "global_step": p.global_step,
            "steps_per_epoch": self.track.steps_per_epoch,
            "world_size": self.world_size,
            "best_top1": self.best_top1,
            "history": self.history,
            "epoch_sums": self.epoch_sums,
            "wall_time_s": self.elapsed(),
            "rng": self._every_rank_rng(),
        }

    def save(self, copies: list[Path] | tuple[Path, ...] = ()) -> None:
        """Write the checkpoint atomically to each of ``copies`` and then to ``checkpoint.pth`` (rank 0; every rank
        waits for it). Weights that are not finite are refused, so a good checkpoint is never replaced by a broken
        one."""
        self.finish_pending()
        state = self.state_dict()
        if self.rank == 0 and self.output_dir is not None:
            last = self.output_dir / LAST_CHECKPOINT
            broken = [
                name
                for name, tensor in state["model"].items()
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())
            ]
            if broken:
                raise NonFiniteLossError(
                    f"weights became non-finite ({', '.join(broken[:4])}); not writing a checkpoint over {last}"
                )
            for path in [*copies, last]:
                atomic_save(state, path)
            p = self.position
            names = ", ".join(path.name for path in [*copies, last])
            logger.info("saved %s (epoch %d, step %d)", names, p.epoch, p.step_in_epoch)
        barrier("waiting for rank 0 to write a checkpoint")

    def load(self, state: Any, path: Path) -> None:
        """Continue from the checkpoint ``state`` read from ``path`` (written by :meth:`save`, or an earlier layout
        the track upgrades). One line naming the file when it belongs to another track or run."""
        track = self.track
        state = track.upgrade_checkpoint(state, path)
        found = state.get("format") if isinstance(state, dict) else None
        if found != track.checkpoint_format:
            raise UserError(
                f"{path} is not a resumable checkpoint of the {track.label} (format {found!r}, expected "
                f"{track.checkpoint_format!r}) — resume from this track's checkpoint.pth, or use a new output folder"
            )
        position = Position(int(state["epoch"]), int(state["step_in_epoch"]), int(state["global_step"]))
        if position.epoch > track.epochs:
            raise UserError(
                f"{path} has trained {position.epoch} epochs, more than this run's {track.epochs} — raise the "
                f"number of epochs to continue it, or evaluate its weights"
            )
        track.load_state_dict(state, path, position)
        self.position = position
        self.best_top1 = float(state["best_top1"])
        self.history = {**_history(), **state["history"]}
        self.epoch_sums = dict(state["epoch_sums"])
        self.wall_time_before = float(state["wall_time_s"])
        rng = state["rng"]
        if len(rng) != self.world_size:
            logger.warning(
                "%s was written by a run with %d processes, this run has %d: every rank resumes rank 0's random "
                "streams (training continues, but not bit for bit)",
                path,
                len(rng),
                self.world_size,
            )
        self._resume_rng = rng[self.rank] if len(rng) == self.world_size else rng[0]
        logger.info("resuming from %s at epoch %d step %d", path, position.epoch, position.step_in_epoch)
