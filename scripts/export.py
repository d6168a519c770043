#!/usr/bin/env python
"""Export a student checkpoint of either track as a timm / Hugging Face folder.

    python scripts/export.py SRC OUT_DIR [--model tiny|small|demo] [--force] [--trust-checkpoint]

SRC: a DeiT-track checkpoint (``checkpoint.pth``, ``ckpt_epoch_N.pth`` or the release's DeiT-Ti/S file) or a
ResNet-track one (a run's ``checkpoint.pth`` or best checkpoint, or the release's ResNet18 file); the track is told
from the weights. A run folder stands for the checkpoint its metrics describe: the best checkpoint its metrics.json
names (ResNet track), else its ``checkpoint.pth`` (the DeiT track's last epoch, or a run still in progress).
OUT_DIR receives ``model.safetensors`` (the student only), ``config.json`` (timm's format, with the evaluation
transform) and ``README.md`` (model card); ResNet students also ``torchvision_state_dict.safetensors``.
Load it with ``timm.create_model('local-dir:OUT_DIR', pretrained=True)`` (``import deit`` first for DeiT students).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from projector_kd.engine.checkpoint import CheckpointError, load_checkpoint  # noqa: E402
from projector_kd.engine.cli import run_cli  # noqa: E402
from projector_kd.engine.errors import UserError  # noqa: E402
from projector_kd.engine.export import WEIGHTS_FILE, is_weights_export, run_checkpoint  # noqa: E402


def track_of(checkpoint: object, path: Path) -> str:
    """'deit' or 'resnet', from the student's parameter names."""
    import torch

    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} holds no model state dict (expected a dict of tensors or {{'model': ...}})")
    names = {str(k).removeprefix("module.") for k in state}
    if "conv_embed.proj.weight" in names:
        return "deit"
    if {"fc.weight", "layer1.0.conv1.weight"} <= names:
        return "resnet"
    raise CheckpointError(
        f"{path} holds neither a conv-stem DeiT nor a ResNet student (unknown layout; first keys: "
        f"{', '.join(sorted(names)[:4])})"
    )


def is_run_folder(path: Path) -> bool:
    """Whether ``path`` is a folder that is not an export (which holds ``model.safetensors``): a run folder."""
    return path.is_dir() and not (path / WEIGHTS_FILE).is_file()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "source",
        help="student checkpoint (.pth / .pt) of either track, or a run folder (its best checkpoint, else its "
        "checkpoint.pth)",
    )
    parser.add_argument("output", help="folder to write (must be empty or missing, unless --force)")
    parser.add_argument(
        "--model",
        help="DeiT preset (tiny | small | demo) for a checkpoint without a run config whose width matches no preset",
    )
    parser.add_argument("--force", action="store_true", help="replace the contents of a non-empty OUT_DIR")
    parser.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="allow full (unsafe) unpickling of SRC (only for files you trust)",
    )
    args = parser.parse_args(argv)
    source = Path(args.source)
    if source.exists() and is_weights_export(source) and not is_run_folder(source):
        raise UserError(
            f"{source} is already exported weights (a folder or .safetensors file); export the training "
            "checkpoint it came from, or copy the folder"
        )
    if source.is_dir():
        source = run_checkpoint(source)
    checkpoint = load_checkpoint(source, trusted=args.trust_checkpoint)
    track = track_of(checkpoint, source)
    if track == "deit":
        from deit.export import export_student

        output = export_student(source, args.output, preset=args.model, force=args.force, checkpoint=checkpoint)
    else:
        if args.model:
            raise UserError(f"--model {args.model} names a DeiT preset but {source} holds a ResNet student")
        from imagenet.export import export_student

        output = export_student(source, args.output, force=args.force, checkpoint=checkpoint)
    print(f"exported the {track} student of {source} to {output}", flush=True)
    return 0


if __name__ == "__main__":
    run_cli(main)
