"""Hugging Face / timm model folders: ``model.safetensors`` + ``config.json`` (timm's format) + a ``README.md`` card.

A folder written by :func:`write_model_folder` loads with ``timm.create_model('local-dir:FOLDER', pretrained=True)``
(once the architecture is registered with timm) and can be pushed to the Hugging Face Hub as is. Both tracks use it;
their own modules turn a training checkpoint into a timm model first (:mod:`deit.export`, :mod:`imagenet.export`).
"""

from __future__ import annotations

import glob
import json
import math
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import CheckpointError, current_umask
from .errors import UserError, cannot_write

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CARD_FILE = "README.md"
METRICS_FILE = "metrics.json"
PAPER = "Understanding the Role of the Projector in Knowledge Distillation (Roy Miles, Krystian Mikolajczyk, AAAI 2024)"
PAPER_URL = "https://arxiv.org/abs/2303.11098"
CITATION = """@inproceedings{miles2024understanding,
  title     = {Understanding the Role of the Projector in Knowledge Distillation},
  author    = {Miles, Roy and Mikolajczyk, Krystian},
  booktitle = {Proceedings of the AAAI Conference on Artificial Intelligence},
  year      = {2024},
  eprint    = {2303.11098},
  archivePrefix = {arXiv}
}"""


@dataclass
class EvalTransform:
    """How this project evaluates: resize the short side to ``floor(img_size / crop_pct)`` with ``interpolation``,
    center-crop ``img_size``, normalise with ``mean``/``std`` — timm's pretrained-config fields of the same names."""

    img_size: int = 224
    crop_pct: float = 0.875
    interpolation: str = "bilinear"
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)

    def pretrained_cfg(self) -> dict[str, Any]:
        """The timm ``pretrained_cfg`` entries (an overlay for ``timm.create_model``)."""
        return {
            "input_size": (3, self.img_size, self.img_size),
            "crop_pct": self.crop_pct,
            "interpolation": self.interpolation,
            "mean": tuple(self.mean),
            "std": tuple(self.std),
        }

    @property
    def resize(self) -> int:
        return int(math.floor(self.img_size / self.crop_pct))


@dataclass
class ModelCard:
    """What the README.md of an exported folder says about the model."""

    title: str
    architecture: str
    description: str
    transform: EvalTransform
    source: str
    teacher: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    recipe: dict[str, Any] = field(default_factory=dict)
    params: int = 0


def _follow_umask(folder: Path) -> None:
    """Give ``folder`` and the files in it the permissions a new folder and files get under the process umask
    (``tempfile.mkdtemp`` makes the folder private, and safetensors writes its files 0600)."""
    mask = current_umask()
    folder.chmod(0o777 & ~mask)
    for item in folder.iterdir():
        item.chmod((0o777 if item.is_dir() else 0o666) & ~mask)


@contextmanager
def staged_output_dir(path: str | Path, force: bool, source: str | Path) -> Iterator[Path]:
    """A fresh folder to write the export into, moved to ``path`` when the block succeeds (removed if it fails), with
    the permissions the umask gives.

    An existing non-empty ``path`` is replaced only with ``force``, and never when it holds ``source``. The staging
    folder is ``.<name>.<random>.tmp`` beside ``path``; those left by an export that was killed are removed first (one
    export per output folder). An ``OSError`` on the way (a file in the way, a name too long, a full disk) is an
    :class:`OutputError` naming ``path``; the folder there is then untouched.
    """
    path, source = Path(path), Path(source)
    try:
        if path.exists() and not path.is_dir():
            raise UserError(f"output {path} exists and is not a folder; choose a folder path")
        if path.is_dir() and any(path.iterdir()):
            if not force:
                raise UserError(
                    f"output folder {path} is not empty; choose a new folder or pass --force to replace its contents"
                )
            if source.resolve().is_relative_to(path.resolve()):
                raise UserError(f"output folder {path} holds the source {source}; choose another output folder")
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale)
            else:
                stale.unlink()
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except OSError as error:
        raise cannot_write(path, error, "nothing was written") from None
    try:
        yield staging
        _follow_umask(staging)
        if path.exists():
            shutil.rmtree(path)
        staging.rename(path)
    except OSError as error:
        raise cannot_write(path, error) from None
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def write_model_folder(
    model: nn.Module,
    folder: Path,
    card: ModelCard,
    model_args: dict[str, Any],
    extra_weights: dict[str, dict[str, torch.Tensor]] | None = None,
) -> list[Path]:
    """Write ``model`` (a timm model in eval mode, with ``pretrained_cfg`` set to the evaluation transform) as
    ``model.safetensors`` + ``config.json`` with timm's own :func:`timm.models.save_for_hf`, then the model card and
    each ``extra_weights`` file (name -> state dict, saved as safetensors). ``model_args``: the arguments that
    rebuild the architecture (what ``timm.create_model`` was given), recorded in config.json for ``local-dir:`` /
    ``hf-hub:`` loading. Returns the files written."""
    import safetensors.torch
    from timm.models import save_for_hf

    save_for_hf(model, str(folder), model_args=model_args, safe_serialization=True)
    (folder / CARD_FILE).write_text(render_model_card(card), encoding="utf-8")
    written = [folder / WEIGHTS_FILE, folder / CONFIG_FILE, folder / CARD_FILE]
    for name, state in (extra_weights or {}).items():
        safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, str(folder / name))
        written.append(folder / name)
    return written


def read_metrics(checkpoint: Path) -> dict[str, Any]:
    """The run's ``metrics.json`` beside ``checkpoint`` (empty when there is none or it is unreadable)."""
    path = checkpoint.parent / METRICS_FILE
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return metrics if isinstance(metrics, dict) else {}


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) >= 0.01 or value == 0 else f"{value:.3g}"
    return str(value)


def render_model_card(card: ModelCard) -> str:
    """The README.md of an exported folder: Hub metadata (YAML front matter), what the model is, how it was trained
    and evaluated, how to load it, license and citation."""
    transform = card.transform
    lines = [
        "---",
        "license: mit",
        "library_name: timm",
        "pipeline_tag: image-classification",
        "tags:",
        "- image-classification",
        "- timm",
        "- knowledge-distillation",
        "---",
        "",
        f"# {card.title}",
        "",
        card.description,
        "",
        f"Trained with the method of *{PAPER}* ([arXiv:2303.11098]({PAPER_URL})).",
        "",
        "## Model details",
        "",
        f"- **Architecture (timm):** `{card.architecture}`",
    ]
    if card.params:
        lines.append(f"- **Parameters:** {card.params / 1e6:.2f}M (the projector used in training is not included)")
    if card.teacher:
        lines.append(f"- **Teacher:** {card.teacher}")
    lines += [
        f"- **Exported from:** `{card.source}`",
        f"- **Evaluation transform:** resize to {transform.resize} ({transform.interpolation}), center crop "
        f"{transform.img_size}, mean {list(transform.mean)}, std {list(transform.std)}",
        "",
    ]
    if card.metrics:
        lines += ["## Results", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {name} | {_format(value)} |" for name, value in card.metrics.items()]
        lines.append("")
    if card.recipe:
        lines += ["## Training recipe", ""]
        lines += [f"- **{name}:** {_format(value)}" for name, value in card.recipe.items()]
        lines.append("")
    needs_deit = card.architecture.startswith("deit_conv_")
    lines += ["## Usage", "", "```python", "import timm"] + (
        ["import deit  # registers the conv-stem DeiT with timm"] if needs_deit else []
    )
    lines += [
        "",
        "model = timm.create_model('local-dir:PATH/TO/THIS/FOLDER', pretrained=True).eval()",
        "# or timm.create_model('hf-hub:OWNER/NAME', pretrained=True) once pushed to the Hub",
        "transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))",
        "```",
        "",
    ]
    if needs_deit:
        lines += [
            "`deit` is this model's package in the reference implementation of the paper (install it with "
            "`pip install -e .` from its repository).",
            "",
        ]
    lines += ["## License", "", "MIT.", "", "## Citation", "", "```bibtex", CITATION, "```", ""]
    return "\n".join(lines)


RUN_CHECKPOINT = "checkpoint.pth"


def run_checkpoint(folder: Path) -> Path:
    """The checkpoint a run folder's results describe: the one its ``metrics.json`` names under ``checkpoint`` (the
    ResNet track's best checkpoint, looked for in ``folder`` first, then where it was recorded), else its
    ``checkpoint.pth`` (the DeiT track's last epoch, or a run not finished yet). UserError when there is neither."""
    recorded = read_metrics(folder / METRICS_FILE).get("checkpoint")
    if isinstance(recorded, str) and recorded:
        for candidate in (folder / Path(recorded).name, Path(recorded)):
            if candidate.is_file():
                return candidate
    if (folder / RUN_CHECKPOINT).is_file():
        return folder / RUN_CHECKPOINT
    raise UserError(
        f"{folder} is a folder without {RUN_CHECKPOINT} or a best checkpoint named in {METRICS_FILE} — pass a run "
        f"folder, or the checkpoint file itself"
    )


def is_weights_export(path: str | Path) -> bool:
    """Whether ``path`` names an exported folder or a ``.safetensors`` file (rather than a pickled checkpoint)."""
    path = Path(path)
    return path.is_dir() or path.suffix == ".safetensors"


def load_weights_file(path: str | Path, preferred: tuple[str, ...] = (WEIGHTS_FILE,)) -> dict[str, torch.Tensor]:
    """The state dict in a ``.safetensors`` file, or in an exported folder's first existing ``preferred`` file.

    Safetensors hold tensors only: nothing is unpickled. Missing or unreadable files raise CheckpointError naming them.
    """
    import safetensors.torch

    path = Path(path)
    if path.is_dir():
        found = [path / name for name in preferred if (path / name).is_file()]
        if not found:
            raise CheckpointError(
                f"exported folder {path} holds no {' or '.join(preferred)} — export it again with scripts/export.py"
            )
        path = found[0]
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path} — check the path")
    try:
        return safetensors.torch.load_file(str(path), device="cpu")
    except Exception as error:  # safetensors raises its own error types on damaged headers and data
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointError(f"weights file {path} is truncated or corrupt ({reason}) — export it again") from None
