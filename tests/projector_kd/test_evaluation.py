"""The shared top-1/top-5 evaluation: exact counts, the loss, no image counted twice, the model's mode kept."""

import math

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from projector_kd.engine.evaluation import evaluate_classifier


class FixedLogits(nn.Module):
    """Returns the logits stored for each image id (the image tensor's first entry)."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("logits", logits)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits[images[:, 0].long()]


def dataset() -> tuple[TensorDataset, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 6, generator=generator)
    targets = torch.tensor([0, 1, 2, 3, 4, 5, 0])
    targets[0] = logits[0].argmax()  # one sure top-1 hit
    images = torch.arange(7, dtype=torch.float32)[:, None]
    return TensorDataset(images, targets), logits


def test_counts_top1_top5_and_the_mean_cross_entropy():
    data, logits = dataset()
    model = FixedLogits(logits).train()
    result = evaluate_classifier(model, DataLoader(data, batch_size=3), torch.device("cpu"), with_loss=True)
    targets = data.tensors[1]
    top1 = 100 * (logits.argmax(1) == targets).sum().item() / 7
    top5 = 100 * (logits.topk(5, 1).indices == targets[:, None]).any(1).sum().item() / 7
    assert math.isclose(result["top1"], top1) and math.isclose(result["top5"], top5)
    assert math.isclose(result["loss"], nn.functional.cross_entropy(logits, targets).item(), rel_tol=1e-6)
    assert result["num_images"] == 7 and result["top1"] >= 100 / 7
    assert model.training  # back in its previous mode


def test_a_padded_distributed_shard_counts_each_image_once():
    data, logits = dataset()
    model = FixedLogits(logits)
    last_rank = DataLoader(data, batch_size=2, sampler=DistributedSampler(data, num_replicas=4, rank=3, shuffle=False))
    result = evaluate_classifier(model, last_rank, torch.device("cpu"), rank=3, with_loss=True)
    assert result["num_images"] == 1  # image 3 only; the DistributedSampler would repeat image 0
    assert set(result) == {"top1", "top5", "loss", "num_images"}
    assert set(evaluate_classifier(model, last_rank, torch.device("cpu"))) == {"top1", "top5"}
