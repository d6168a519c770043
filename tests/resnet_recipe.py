"""The ResNet track's tiny torchdistill recipes, written like the demo ones: WRN-10-1 student, WRN-10-2 teacher,
16 px, 3 classes."""

from __future__ import annotations

from pathlib import Path

NUM_CLASSES = 3


def _model(key_width: int, num_classes: int, indent: str, dropout: float = 0.0) -> str:
    return (
        f"{indent}key: 'wide_resnet'\n{indent}kwargs:\n{indent}  depth: 10\n{indent}  k: {key_width}\n"
        f"{indent}  dropout_p: {dropout}\n{indent}  num_classes: {num_classes}\n{indent}  pretrained: false\n"
        f"{indent}  progress: false\n"
    )


_FLIP = """\
                - !import_call
                  key: 'torchvision.transforms.RandomHorizontalFlip'
                  init:
                    kwargs:
                      p: 0.5
"""
_TO_TENSOR = """\
                - !import_call
                  key: 'torchvision.transforms.ToTensor'
                  init:
"""
_NORMALIZE = """\
                - &normalize !import_call
                  key: 'torchvision.transforms.Normalize'
                  init:
                    kwargs:
                      mean: [0.5, 0.5, 0.5]
                      std: [0.5, 0.5, 0.5]
"""


def _compose(*transforms: str) -> str:
    """A dataset's ``transform:`` entry: torchvision's Compose of ``transforms`` (YAML list items)."""
    return (
        "        transform: !import_call\n          key: 'torchvision.transforms.Compose'\n          init:\n"
        "            kwargs:\n              transforms:\n" + "".join(transforms)
    )


def tiny_recipe(
    dst_ckpt: Path,
    *,
    method: str = "projector",
    teacher_ckpt: Path | str | None = None,
    data_root: Path | str = "tiny-data",
    epochs: int = 1,
    batch_size: int = 8,
    num_workers: int = 0,
    lr: float = 0.05,
    on_bad_image: str = "fail",
    student_width: int = 1,
    teacher_width: int = 2,
    num_classes: int = NUM_CLASSES,
    milestones: tuple[int, ...] = (1,),
    log_freq: int = 1,
    student_dropout: float = 0.0,
    drop_last: bool = True,
    batch_sampler: bool = False,
    sampler_seed: int | None = None,
    eval_workers: int = 0,
) -> str:
    """A torchdistill recipe in the demo configs' layout. ``method``: 'teacher' (the teacher network trained alone),
    'baseline' (the student alone) or 'projector' (CE + 2 * log_diff(Linear(64, 64 * teacher_width)) + KD).
    ``student_dropout`` > 0 makes the student's forward pass draw random numbers too. The train loader batches with
    ``batch_size`` and ``drop_last`` in its kwargs, or in a ``batch_sampler: BatchSampler``; it samples with a
    ``RandomSampler``, or with ``sampler_seed`` a one-process ``DistributedSampler`` with that seed. The validation
    and test loaders read with ``eval_workers`` worker processes."""
    transform_train = _compose(_FLIP, _TO_TENSOR, _NORMALIZE)
    transform_val = _compose(_TO_TENSOR, "                - *normalize\n")
    text = f"""\
dependencies:
  - name: 'imagenet.registry'

_data_root: &data_root !import_call
  key: 'os.getenv'
  init:
    args: ['TINY_DATA_ROOT', '{data_root}']

datasets:
  &train_id tiny/train: !import_call
    key: 'projector_kd.engine.data.CheckedImageFolder'
    init:
      kwargs:
        root: !pathjoin [*data_root, 'train']
        on_bad_image: '{on_bad_image}'
{transform_train}  &val_id tiny/val: !import_call
    key: 'projector_kd.engine.data.CheckedImageFolder'
    init:
      kwargs:
        root: !pathjoin [*data_root, 'val']
        on_bad_image: '{on_bad_image}'
{transform_val}
models:
"""
    if method == "projector":
        text += "  teacher_model:\n" + _model(teacher_width, num_classes, "    ")
        if teacher_ckpt is not None:
            text += f"    src_ckpt: '{teacher_ckpt}'\n"
    width = teacher_width if method == "teacher" else student_width
    text += "  student_model:\n" + _model(width, num_classes, "    ", student_dropout) + f"    dst_ckpt: '{dst_ckpt}'\n"
    if sampler_seed is None:
        train_sampler = "        key: 'torch.utils.data.RandomSampler'\n      kwargs:\n"
    else:
        train_sampler = (
            "        key: 'torch.utils.data.DistributedSampler'\n      kwargs:\n"
            f"        num_replicas: 1\n        rank: 0\n        seed: {sampler_seed}\n"
        )
    drop = str(drop_last).lower()
    if batch_sampler:
        train_batching = (
            f"    batch_sampler:\n      key: 'BatchSampler'\n      kwargs:\n        batch_size: {batch_size}\n"
            f"        drop_last: {drop}\n    kwargs:\n      num_workers: {num_workers}\n"
        )
    else:
        train_batching = (
            f"    kwargs:\n      batch_size: {batch_size}\n      num_workers: {num_workers}\n      drop_last: {drop}\n"
        )
    text += f"""
train:
  log_freq: {log_freq}
  num_epochs: {epochs}
  train_data_loader:
    dataset_id: *train_id
    sampler:
      class_or_func: !import_get
{train_sampler}{train_batching}  val_data_loader:
    dataset_id: *val_id
    sampler: &val_sampler
      class_or_func: !import_get
        key: 'torch.utils.data.SequentialSampler'
      kwargs:
    kwargs:
      batch_size: 8
      num_workers: {eval_workers}
"""
    if method == "projector":
        text += f"""\
  teacher:
    forward_proc: 'forward_batch_only'
    forward_hook:
      output: ['layer3']
    requires_grad: false
  student:
    forward_proc: 'forward_batch_only'
    auxiliary_model_wrapper:
      key: 'ProjectorKDModelWrapper'
      kwargs:
        input_module:
          path: 'model.layer3'
          io: 'output'
        student_dim: {64 * student_width}
        teacher_dim: {64 * teacher_width}
        distance: 'log_diff'
        exponent: 4.0
        eps: 1.0e-4
        projector: 'linear'
    forward_hook:
      output: ['model.layer3']
    requires_grad: true
"""
    else:
        text += """\
  model:
    forward_proc: 'forward_batch_only'
    requires_grad: true
"""
    text += f"""\
  optimizer:
    key: 'SGD'
    kwargs:
      lr: {lr}
      momentum: 0.9
      weight_decay: 5.0e-4
    grad_accum_step: 1
  scheduler:
    key: 'MultiStepLR'
    kwargs:
      milestones: {list(milestones)}
      gamma: 0.1
  criterion:
    key: 'WeightedSumLoss'
    kwargs:
      sub_terms:
        ce:
          criterion:
            key: 'CrossEntropyLoss'
            kwargs:
              reduction: 'mean'
          criterion_wrapper:
            key: 'SimpleLossWrapper'
            kwargs:
              input:
                is_from_teacher: false
                module_path: '.'
                io: 'output'
              target:
                uses_label: true
          weight: 1.0
"""
    if method == "projector":
        text += """\
        projector_kd:
          criterion:
            key: 'ProjectorKDLoss'
            kwargs:
              teacher_feature:
                path: 'layer3'
                io: 'output'
              feature_weight: 2.0
              kd_weight: 1.0
              temperature: 1.0
          weight: 1.0
"""
    text += f"""
test:
  test_data_loader:
    dataset_id: *val_id
    sampler: *val_sampler
    kwargs:
      batch_size: 8
      num_workers: {eval_workers}

runtime:
  fast: false
"""
    return text
