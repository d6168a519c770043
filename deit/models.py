"""Conv-stem DeiT students (Co-advise layout) and timm teachers.

Student token layout: ``[cls, conv, patch_1 .. patch_N]`` + learned position embedding, where the conv token is the
mean of the patch embeddings. ``head`` reads token 0, ``head_conv`` (the distillation head) reads token 1; in eval
mode the prediction is the mean of both heads' logits. The student holds no projector: :func:`build_student` builds
the :class:`projector_kd.ProjectorDistillLoss` beside it (the training objective holds both, see
:mod:`deit.engine`); the release's checkpoints keep it inside the student's keys as ``distillation_loss.*``, which
:mod:`deit.checkpoint` maps.
"""

from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import trunc_normal_
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models._builder import resolve_pretrained_cfg
from timm.models._features import feature_take_indices
from timm.models.vision_transformer import Block
from torch import nn
from torch.utils.checkpoint import checkpoint

from projector_kd import ProjectorDistillLoss
from projector_kd.engine.errors import UserError
from projector_kd.engine.fast import enable_fast_cuda_backends

from .config import precision

STUDENT_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "demo": dict(
        embed_dim=64,
        depth=4,
        num_heads=2,
        drop_path_rate=0.0,
        stem_channels=32,
        stem_stride=2,
        patch_size=2,
        img_size=32,
    ),
}
TIMM_NAMES = {"tiny": "deit_conv_tiny", "small": "deit_conv_small", "demo": "deit_conv_demo"}
INIT_SCHEMES = ("release", "deit")


class ConvStem(nn.Module):
    """Conv7x7/s + BN + ReLU, 2 x [Conv3x3 + BN + ReLU], then a (patch_size x patch_size, stride patch_size) projection.

    ``conv`` indices 0, 1, 3, 4, 6, 7 hold the convs and BNs (the release's key names). At 224 px with the default
    strides (2, 8) the output grid is 14 x 14.
    """

    def __init__(
        self, embed_dim: int, stem_channels: int = 64, stem_stride: int = 2, patch_size: int = 8, in_chans: int = 3
    ) -> None:
        super().__init__()
        c = stem_channels
        self.conv = nn.Sequential(
            nn.Conv2d(in_chans, c, 7, stride=stem_stride, padding=3, bias=False),
            nn.BatchNorm2d(c),
            nn.ReLU(True),
            nn.Conv2d(c, c, 3, padding=1, bias=False),
            nn.BatchNorm2d(c),
            nn.ReLU(True),
            nn.Conv2d(c, c, 3, padding=1, bias=False),
            nn.BatchNorm2d(c),
            nn.ReLU(True),
        )
        self.proj = nn.Conv2d(c, embed_dim, patch_size, stride=patch_size)
        self.reduction = stem_stride * patch_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, H*W/reduction^2, D) patch tokens."""
        return self.proj(self.conv(x)).flatten(2).transpose(1, 2)


class ConvStemDeiT(nn.Module):
    """DeiT with a conv stem, a conv (distillation) token and two heads.

    Train mode ``forward`` returns ``(cls_logits, dist_logits)``; eval mode returns their mean. As a timm model:
    ``forward_features`` gives the normed tokens (B, 2 + N, D), ``forward_head(pre_logits=True)`` the mean of the
    cls and conv tokens (B, D) (what ``reset_classifier(0)`` makes ``forward`` return), ``forward_intermediates``
    the blocks' outputs; ``img_size`` may be an int or a square (h, w).
    """

    def __init__(
        self,
        img_size: int = 224,
        num_classes: int = 1000,
        embed_dim: int = 192,
        depth: int = 12,
        num_heads: int = 3,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
        stem_channels: int = 64,
        stem_stride: int = 2,
        patch_size: int = 8,
        init: str = "release",
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        if init not in (*INIT_SCHEMES, "skip"):
            raise UserError(f"model.init={init!r} is not one of {', '.join(INIT_SCHEMES)}")
        img_size = _square_size(img_size)
        if img_size % (stem_stride * patch_size):
            raise UserError(
                f"model.img_size={img_size} is not divisible by stem_stride*patch_size="
                f"{stem_stride * patch_size}; pick an img_size that is a multiple of it"
            )
        if embed_dim % num_heads:
            raise UserError(f"model.embed_dim={embed_dim} is not divisible by model.num_heads={num_heads}")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.embed_dim = self.num_features = self.head_hidden_size = embed_dim
        self.num_prefix_tokens = 2
        self.grad_checkpointing = False
        self.conv_embed = ConvStem(embed_dim, stem_channels, stem_stride, patch_size, in_chans)
        self.num_patches = (img_size // self.conv_embed.reduction) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + 2, embed_dim))
        rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.Sequential(
            *[
                Block(embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, drop_path=r, norm_layer=norm_layer)
                for r in rates
            ]
        )
        self.feature_info = [
            dict(module=f"blocks.{i}", num_chs=embed_dim, reduction=self.conv_embed.reduction) for i in range(depth)
        ]
        self.norm = norm_layer(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.head_conv = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        if init != "skip":  # "skip" (as timm's weight_init): PyTorch's defaults, the caller initialises
            init_weights(self, init)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameter names exempt from weight decay besides 1-D tensors and biases."""
        return {"pos_embed", "cls_token"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """timm's layer groups (layer-wise lr decay): the stem and tokens, then one group per block."""
        return dict(stem=r"^cls_token|pos_embed|conv_embed", blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the blocks' activations in the backward pass instead of storing them."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> tuple[nn.Module, nn.Module]:
        """The two heads: ``head`` (cls token) and ``head_conv`` (conv token)."""
        return self.head, self.head_conv

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """New heads for ``num_classes`` (0: none, ``forward`` then returns the pre-logits); same device and dtype.

        Only the token pooling exists (``global_pool`` None, '' or 'token').
        """
        if global_pool not in (None, "", "token"):
            raise ValueError(f"global_pool={global_pool!r}: the conv-stem DeiT reads the cls and conv tokens")
        factory = dict(device=self.pos_embed.device, dtype=self.pos_embed.dtype)
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes, **factory) if num_classes > 0 else nn.Identity()
        self.head_conv = nn.Linear(self.embed_dim, num_classes, **factory) if num_classes > 0 else nn.Identity()
        self.head.train(self.training)
        self.head_conv.train(self.training)

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> [cls, conv, patches] + position embedding, before the blocks."""
        patches = self.conv_embed(x)
        conv_token = patches.mean(dim=1, keepdim=True)
        x = torch.cat([self.cls_token.expand(patches.shape[0], -1, -1), conv_token, patches], dim=1)
        return x + self.pos_embed

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> normed token sequence (B, 2 + N, D): [cls, conv, patches]."""
        x = self._tokens(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return self.norm(x)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        return_prefix_tokens: bool = False,
    ) -> Any:
        """``forward_features`` that also returns the outputs of the blocks selected by ``indices``.

        ``indices``: the last n blocks (int), the listed blocks (negative counts from the end), or all (None).
        Intermediates are the patch tokens as (B, D, H, W) (``output_fmt='NCHW'``) or (B, N, D) (``'NLC'``), with the
        final norm when ``norm``; ``return_prefix_tokens`` pairs each with its (B, 2, D) cls and conv tokens.
        Returns ``(final normed tokens, intermediates)``, or only the intermediates when ``intermediates_only``.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt={output_fmt!r}: use NCHW or NLC")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        batch, _, height, width = x.shape
        x = self._tokens(x)
        blocks = self.blocks if torch.jit.is_scripting() or not stop_early else self.blocks[: max_index + 1]
        intermediates = []
        for i, block in enumerate(blocks):
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
            if i in take_indices:
                intermediates.append(self.norm(x) if norm else x)
        prefix = [y[:, : self.num_prefix_tokens] for y in intermediates]
        intermediates = [y[:, self.num_prefix_tokens :] for y in intermediates]
        if output_fmt == "NCHW":
            grid = (height // self.conv_embed.reduction, width // self.conv_embed.reduction)
            intermediates = [
                y.reshape(batch, grid[0], grid[1], -1).permute(0, 3, 1, 2).contiguous() for y in intermediates
            ]
        if return_prefix_tokens:
            intermediates = list(zip(intermediates, prefix))
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the blocks after the last one ``indices`` selects (and the final norm / the heads); returns the
        kept indices."""
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[: max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0)
        return take_indices

    def forward_heads(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token sequence -> (cls-head logits, distillation-head logits)."""
        return self.head(tokens[:, 0]), self.head_conv(tokens[:, 1])

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Token sequence -> eval logits (mean of both heads; both in train mode), or with ``pre_logits`` the mean
        of the cls and conv tokens (B, D)."""
        if pre_logits:
            return (x[:, 0] + x[:, 1]) / 2
        cls_logits, dist_logits = self.forward_heads(x)
        if self.training and not torch.jit.is_scripting():
            return cls_logits, dist_logits
        return (cls_logits + dist_logits) / 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _square_size(img_size: int | tuple[int, int] | list[int]) -> int:
    """``img_size`` as one int: an int, or a square (h, w) as timm's factory passes it."""
    if isinstance(img_size, int):
        return img_size
    height, width = img_size
    if height != width:
        raise UserError(f"model.img_size={tuple(img_size)}: the conv-stem DeiT takes square images")
    return int(height)


EVAL_INTERPOLATION = "bilinear"


def _cfg(**overrides: Any) -> dict[str, Any]:
    """timm pretrained config: this project's evaluation transform (resize to img_size / crop_pct, bilinear, center
    crop, ImageNet mean/std) and the layer names timm adapts (first conv, the two heads)."""
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "crop_pct": 0.875,
        "interpolation": EVAL_INTERPOLATION,
        "fixed_input_size": True,
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "conv_embed.conv.0",
        "classifier": ("head", "head_conv"),
        "license": "mit",
        **overrides,
    }


default_cfgs = generate_default_cfgs(
    {
        "deit_conv_tiny": _cfg(),
        "deit_conv_small": _cfg(),
        "deit_conv_demo": _cfg(input_size=(3, 32, 32), crop_pct=1.0),
    }
)


def init_weights(model: ConvStemDeiT, scheme: str = "release") -> None:
    """Initialise a student's weights (the projector, built beside the student, keeps PyTorch's defaults).

    Both schemes: pos_embed and every Linear weight ``trunc_normal_(std=0.02)`` (timm's, cut at +-2 absolute, so in
    effect N(0, 0.02^2)), Linear biases 0, norms 1/0. ``release`` (the release's code): cls_token N(0, 1e-6) and every
    Conv2d of the stem (three stem convs and the patch projection) ``kaiming_normal_`` with its defaults, std
    sqrt(2 / fan_in); the projection's bias keeps PyTorch's default. ``deit`` (the DeiT recipe, timm 0.3/0.4 ViT):
    cls_token ``trunc_normal_(std=0.02)``, convs PyTorch's default (kaiming_uniform_, a = sqrt(5)).
    """
    trunc_normal_(model.pos_embed, std=0.02)
    if scheme == "release":
        nn.init.normal_(model.cls_token, std=1e-6)
        for module in model.conv_embed.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight)
    else:
        trunc_normal_(model.cls_token, std=0.02)
    for module in model.modules():
        if isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)


def _build(preset: str, pretrained: bool = False, **kwargs: Any) -> ConvStemDeiT:
    variant = TIMM_NAMES[preset]
    pretrained_cfg = resolve_pretrained_cfg(
        variant, kwargs.pop("pretrained_cfg", None), kwargs.pop("pretrained_cfg_overlay", None)
    )
    if pretrained and not any(
        (pretrained_cfg.file, pretrained_cfg.url, pretrained_cfg.hf_hub_id, pretrained_cfg.state_dict)
    ):
        raise UserError(
            f"no downloadable weights for {variant}; export a checkpoint with scripts/export.py and load "
            f"it with timm.create_model('local-dir:FOLDER', pretrained=True), or load a checkpoint with "
            "deit.checkpoint.load_student_checkpoint"
        )
    for key in ("drop_rate", "attn_drop_rate"):
        if kwargs.pop(key, 0.0):
            raise UserError(f"{key} is not supported by the conv-stem DeiT (the recipe uses none)")
    device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
    params = {**STUDENT_PRESETS[preset], **{k: v for k, v in kwargs.items() if v is not None}}
    features = dict(out_indices=params.pop("out_indices", 3), feature_cls="getter")
    with torch.device(device) if device is not None else nullcontext():
        model = build_model_with_cfg(
            ConvStemDeiT, variant, pretrained, pretrained_cfg=pretrained_cfg.to_dict(), feature_cfg=features, **params
        )
    return model.to(dtype=dtype) if dtype is not None else model


@register_model
def deit_conv_tiny(pretrained: bool = False, **kwargs: Any) -> ConvStemDeiT:
    """Conv-stem DeiT-Ti (dim 192, 3 heads, depth 12)."""
    return _build("tiny", pretrained, **kwargs)


@register_model
def deit_conv_small(pretrained: bool = False, **kwargs: Any) -> ConvStemDeiT:
    """Conv-stem DeiT-S (dim 384, 6 heads, depth 12)."""
    return _build("small", pretrained, **kwargs)


@register_model
def deit_conv_demo(pretrained: bool = False, **kwargs: Any) -> ConvStemDeiT:
    """A laptop-sized conv-stem DeiT for 32 px images (dim 64, 2 heads, depth 4, 32-channel stem, 8x8 tokens)."""
    return _build("demo", pretrained, **kwargs)


def create_student(name: str, num_classes: int = 1000, img_size: int | None = None, **kwargs: Any) -> ConvStemDeiT:
    """Build a conv-stem student: ``name`` is ``tiny``/``small``/``demo`` (or the timm names ``deit_conv_<name>``).

    ``img_size`` None: the preset's (224 for tiny/small, 32 for demo). ``kwargs`` override the preset
    (``embed_dim``, ``depth``, ``num_heads``, ``drop_path_rate``, ``stem_channels``, ``stem_stride``, ``patch_size``,
    ``init`` = ``release`` (default), ``deit`` (see :func:`init_weights`) or ``skip``, ...). Drop path defaults to 0,
    as the release.
    """
    timm_name = TIMM_NAMES.get(name, name)
    if timm_name not in TIMM_NAMES.values():
        raise UserError(f"unknown student model {name!r}; choose one of {sorted(STUDENT_PRESETS)}")
    return timm.create_model(timm_name, num_classes=num_classes, img_size=img_size, **kwargs)


def build_student(cfg: dict, teacher_dim: int | None) -> tuple[ConvStemDeiT, ProjectorDistillLoss | None]:
    """The student described by ``cfg['model']`` and its projector to ``teacher_dim`` (None: no projector), drawn
    from the random stream in the release's order — the student's layers, the projector, then the student's
    initialisation (:func:`init_weights`) — so a seed gives the same weights as the release's builder."""
    model, distill = cfg["model"], cfg["distillation"]
    student = create_student(
        model["name"],
        num_classes=model["num_classes"],
        img_size=model["img_size"],
        drop_path_rate=model["drop_path"],
        init="skip",
        **{k: model[k] for k in ("embed_dim", "depth", "num_heads", "stem_channels", "stem_stride", "patch_size")},
    )
    projector = None
    if teacher_dim:
        projector = ProjectorDistillLoss(
            student.embed_dim,
            teacher_dim,
            distance=distill["distance"],
            exponent=distill["exponent"],
            eps=distill["eps"],
            projector=distill["projector"],
        )
    init_weights(student, model["init"])
    return student, projector


def create_teacher(
    name: str, num_classes: int, ckpt: str | Path | None = None, hub_tag: str | None = None, trusted: bool = False
) -> tuple[nn.Module, str]:
    """Build a frozen timm classifier in eval mode and load its weights; returns ``(teacher, source description)``.

    Weights come from ``ckpt`` (a raw state dict or ``{'model': state_dict}``) when that file exists, else from timm's
    pretrained tag ``hub_tag`` when a hub is reachable; neither -> UserError naming the file to provide.
    """
    from projector_kd.engine.checkpoint import load_checkpoint, load_state_exactly

    try:
        teacher = timm.create_model(name, num_classes=num_classes, pretrained=False)
    except RuntimeError as err:
        raise UserError(f"unknown teacher model {name!r} (teacher.name): {err}") from None
    if ckpt is not None and Path(ckpt).is_file():
        state = load_checkpoint(ckpt, trusted=trusted)
        state = state.get("model", state)
        state = {k.removeprefix("module."): v for k, v in state.items()}
        load_state_exactly(teacher, state, ckpt, f"teacher {name}", hint="check teacher.name and model.num_classes")
        source = f"file {ckpt}"
    elif hub_tag:
        try:
            teacher = timm.create_model(hub_tag, num_classes=num_classes, pretrained=True)
        except Exception as err:  # noqa: BLE001 - any hub failure ends in the same instruction
            raise UserError(
                f"teacher weights not found at {ckpt} and the hub download of {hub_tag!r} failed "
                f"({type(err).__name__}); put the weights at {ckpt} or pass --teacher-ckpt"
            ) from None
        source = f"timm hub tag {hub_tag}"
    else:
        raise UserError(f"teacher weights not found at {ckpt}; train or download them there, or pass --teacher-ckpt")
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher, source


def place_student(student: nn.Module, cfg: dict, device: torch.device) -> nn.Module:
    """``student`` on ``device``, its conv stem channels_last where :func:`deit.config.precision` says so (the fast
    path also turns on the fast CUDA backends)."""
    if cfg["fast"]:
        enable_fast_cuda_backends(device)
    student = student.to(device)
    if precision(cfg, device)[1]:
        student.conv_embed.to(memory_format=torch.channels_last)
    return student
