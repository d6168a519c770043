"""Under DDP both tracks train one projector: after a step on different batches, every rank holds the same projector
(docs/faithfulness.md, item 9). A bare projector outside DDP, as the release's ResNet code kept it, drifts apart."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

WORKER = """
import torch
import torch.distributed as dist
import timm
from torch import nn

from deit.config import load_config
from deit.engine import DeiTTrack
from deit.models import build_student
from imagenet.registry import ProjectorKDModelWrapper
from projector_kd import ProjectorDistillLoss
from projector_kd.engine.distributed import init_distributed
from projector_kd.engine.loop import Position

env = init_distributed("cpu")
assert env.world_size == 2


def spread(tensor):
    # largest difference of the tensor between the two ranks
    gathered = [torch.empty_like(tensor) for _ in range(2)]
    dist.all_gather(gathered, tensor.detach().contiguous())
    return (gathered[0] - gathered[1]).abs().max().item()


# ResNet track: the wrapper's projector (DDP) and a bare one outside DDP, the same initial weights on both ranks
torch.manual_seed(0)
wrapper = ProjectorKDModelWrapper({"path": ".", "io": "output"}, 8, 8, torch.device("cpu"), None, True,
                                  student_model=nn.Linear(8, 8))
torch.manual_seed(0)
bare = ProjectorDistillLoss(8, 8)
assert spread(wrapper.distill_loss.embed.weight) == 0 and spread(bare.embed.weight) == 0
for loss_module, params in ((wrapper.feature_loss, wrapper.distill_loss.parameters()), (bare, bare.parameters())):
    optimizer = torch.optim.SGD(list(params), lr=0.1)
    generator = torch.Generator().manual_seed(100 + env.rank)  # each rank its own batch
    loss_module(torch.randn(6, 8, generator=generator), torch.randn(6, 8, generator=generator)).backward()
    optimizer.step()
synced, drifted = spread(wrapper.distill_loss.embed.weight), spread(bare.embed.weight)
assert synced == 0, synced
assert drifted > 1e-3, drifted

# DeiT track: the projector sits beside the student in the DDP-wrapped objective
cfg = load_config("demo", opts=["model.num_classes", "3", "model.img_size", "16", "model.embed_dim", "16",
                                "model.depth", "1", "model.num_heads", "2", "model.stem_channels", "8",
                                "data.batch_size", "4", "aug.mixup", "0.0", "aug.cutmix", "0.0",
                                "teacher.name", "resnet10t", "device", "cpu"])
torch.manual_seed(0)
teacher = timm.create_model("resnet10t", num_classes=3).eval()
student, projector = build_student(cfg, teacher.num_features)
track = DeiTTrack(cfg, env, student, projector, teacher, None, None, steps_per_epoch=1)
before = projector.embed.weight.detach().clone()
generator = torch.Generator().manual_seed(200 + env.rank)
batch = torch.randn(4, 3, 16, 16, generator=generator), torch.randint(0, 3, (4,), generator=generator)
track.apply_update(track.forward(batch, Position()).found_inf)
after = projector.embed.weight
assert (after - before).abs().max().item() > 0
deit_spread = spread(after)
assert deit_spread == 0, deit_spread
if env.rank == 0:
    print(f"projector spread: resnet ddp {synced} bare {drifted:.3g}; deit ddp {deit_spread}")
dist.destroy_process_group()
"""


def test_projector_is_synchronised_across_ranks_in_both_tracks(tmp_path, run_torchrun, child_env):
    script = tmp_path / "projector_sync.py"
    script.write_text(WORKER)
    result = run_torchrun(script, cwd=tmp_path, env={**child_env, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "projector spread: resnet ddp 0.0 bare" in result.stdout and "deit ddp 0.0" in result.stdout
