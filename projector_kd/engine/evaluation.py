"""Top-1/top-5 evaluation of a classifier over a (sharded) loader, summed over ranks; both tracks use it."""

from __future__ import annotations

from typing import Any

import torch
from timm.utils import accuracy
from torch import nn

from projector_kd.engine.data import raise_worker_errors_plainly, worker_failures_plainly
from projector_kd.engine.distributed import all_reduce_sum
from projector_kd.engine.fast import autocast_context
from projector_kd.engine.runs import progress
from projector_kd.engine.sampling import unpadded_eval_loader


@torch.inference_mode()
def evaluate_classifier(
    model: nn.Module,
    loader: Any,
    device: torch.device,
    rank: int = 0,
    *,
    autocast_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    with_loss: bool = False,
    desc: str = "eval",
) -> dict[str, float]:
    """``top1``/``top5`` = 100 * (images whose label is the first / among the first five logits, by timm's
    ``accuracy``) / images, over
    every rank's shard (a ``DistributedSampler`` is replaced by unpadded shards, so no image counts twice).

    ``with_loss`` adds ``loss`` (mean cross-entropy of the float32 logits) and ``num_images``. The batches are
    ``(images, targets, ...)``; ``autocast_dtype``/``channels_last`` set the precision and memory format of the
    forward. ``model`` is in eval mode during the pass and back in its previous mode afterwards."""
    was_training = model.training
    model.eval()
    loader = unpadded_eval_loader(loader)
    autocast = autocast_context(device.type, autocast_dtype)
    criterion = nn.CrossEntropyLoss(reduction="sum")
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    during = f"evaluating ({desc})"
    try:
        with worker_failures_plainly(during):  # a worker may also die while the model runs
            for batch in progress(raise_worker_errors_plainly(loader, during), rank=rank, desc=desc, total=len(loader)):
                images = batch[0].to(device, non_blocking=True)
                targets = batch[1].to(device, non_blocking=True)
                if channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                with autocast:
                    logits = model(images).float()
                # timm's top-k accuracy (%) of the batch, back to image counts (exact integers)
                correct = torch.stack(accuracy(logits, targets, topk=(1, 5))).double() * targets.numel() / 100
                loss = criterion(logits, targets) if with_loss else torch.zeros((), device=device)
                count = torch.tensor(targets.numel(), device=device)
                sums += torch.cat([correct.round(), torch.stack([loss, count]).double()])
        all_reduce_sum(sums)
    finally:
        model.train(was_training)
    correct1, correct5, loss_sum, total = sums.tolist()
    images = max(total, 1.0)
    result = {"top1": 100.0 * correct1 / images, "top5": 100.0 * correct5 / images}
    if with_loss:
        result.update(loss=loss_sum / images, num_images=int(total))
    return result
