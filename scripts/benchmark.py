#!/usr/bin/env python
"""Side-by-side speed of both tracks in one process: the release recipe against this project's fast path.

For each track, on the same synthetic batch: one training step of (a) the release recipe (DeiT: fp16 autocast +
GradScaler, eager; ResNet: torchdistill's own ``SRDLoss`` box, fp32) and (b) the fast path (bf16 autocast,
channels_last, torch.compile, fused optimizer), plus teacher inference alone (the floor of any design that runs the
teacher every step). Reported per row: img/s = batch / mean step time, step ms (mean and median), peak memory, model
FLOPs per image (``torch.utils.flop_counter.FlopCounterMode`` on one eager step: forward + backward), and

    MFU = FLOPs per image * img/s / measured bf16 matmul peak      (peak: timed square bf16 matmuls on the same device)

A parity check runs both recipes on one batch with the same weights and compares the loss and the student's gradients.
The rows are one table (:data:`CASES`), each timed by :func:`time_row` with its track's builder (``deit.benchmark``,
``imagenet.benchmark``); the parity check is ``projector_kd.engine.parity.check_parity`` of the track's ``parity_pair``.
The data section, per track, times on the same files — synthetic ImageNet-size JPEGs and scikit-learn's two real
photos — decoding alone (the default loader's ``load_rgb``), the recipe's training transform after it (DeiT: timm
``create_transform`` with the recipe's RandAugment and random erasing, through ``deit.datasets.build_transform``;
ResNet: the recipe's own dataset) and the fast CPU loader's transform (``projector_kd.engine.fast_data``: the crop
window decoded at the DCT scale it needs, uint8 out), each in img/s per core (CPU seconds of this process, one thread);
then both loaders' ceilings with N workers, and end to end each loader feeding the fast step (DeiT here; ResNet: the
torchvision, fast CPU and DALI loaders, ``--loader dali``, with the same worker count), so the bottleneck is visible.
``--data-only`` times just the data section (no models: transforms per core and loader ceilings) on any machine.

GPU timings use CUDA events after warm-up steps (which also absorb torch.compile). ``--tiny`` runs small models on
small images so CI can smoke-test the script on a CPU; CPU figures are not performance claims.

    python scripts/benchmark.py --json benchmark.json                 # full sizes (GPU)
    python scripts/benchmark.py --tiny --no-compile --json out.json   # CPU smoke test
    python scripts/benchmark.py --data-only --workers 2 --json data.json  # data section alone, ImageNet sizes
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import importlib.metadata
import math
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from projector_kd.engine.cli import run_cli
from projector_kd.engine.errors import UserError
from projector_kd.engine.parity import check_parity, synthetic_batch
from projector_kd.engine.runs import write_json

TRACKS = ("deit", "resnet")
RESNET_RECIPE = "configs/ilsvrc2012/ours/res3418.yaml"
CLAIM_NOTE = "CPU run: these figures exercise the script; they are not performance claims (run it on a GPU)."


@dataclass(frozen=True)
class Sizes:
    """Models, image size and batch of one benchmark configuration."""

    batch_size: int
    deit_img_size: int
    resnet_img_size: int
    num_classes: int
    deit_model: str
    deit_overrides: dict
    deit_teacher: str
    resnet_teacher: str
    resnet_student: str
    matmul_size: int
    jpeg_sizes: tuple[tuple[int, int], ...]
    unique_jpegs: int
    transform_images: int
    loader_batches: int


FULL = Sizes(
    batch_size=256,
    deit_img_size=224,
    resnet_img_size=224,
    num_classes=1000,
    deit_model="tiny",
    deit_overrides={},
    deit_teacher="regnety_160",
    resnet_teacher="resnet34",
    resnet_student="resnet18",
    matmul_size=8192,
    jpeg_sizes=((500, 375), (500, 333), (375, 500), (500, 500), (640, 480), (800, 600)),
    unique_jpegs=64,
    transform_images=300,
    loader_batches=8,
)
TINY = Sizes(
    batch_size=8,
    deit_img_size=16,
    resnet_img_size=32,
    num_classes=10,
    deit_model="tiny",
    deit_overrides={"embed_dim": 48, "depth": 2, "num_heads": 2, "patch_size": 4},
    deit_teacher="regnety_002",
    resnet_teacher="resnet34",
    resnet_student="resnet18",
    matmul_size=512,
    jpeg_sizes=((80, 60), (60, 80), (96, 72)),
    unique_jpegs=8,
    transform_images=32,
    loader_batches=2,
)


@dataclass
class Row:
    """One timed case."""

    track: str
    case: str
    description: str
    batch_size: int
    step_ms_mean: float
    step_ms_median: float
    img_per_s: float
    peak_memory_mib: float | None
    gflops_per_img: float | None
    mfu: float | None = None
    vs_release: float | None = None
    host_ms: float | None = None
    extra: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------------ timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_memory(device: torch.device) -> None:
    """Free cached blocks and start a new peak-memory window."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mib(device: torch.device) -> float | None:
    """Peak allocated memory since the last :func:`reset_memory` (CUDA only; None on the CPU)."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


def time_steps(step: Callable[[], Any], steps: int, warmup: int, device: torch.device) -> list[float]:
    """Run ``warmup`` untimed calls, then ``steps`` timed ones; returns each step's milliseconds (CUDA events on GPU,
    ``perf_counter`` on CPU)."""
    for _ in range(warmup):
        step()
    synchronize(device)
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
        for start, end in events:
            start.record()
            step()
            end.record()
        synchronize(device)
        return [start.elapsed_time(end) for start, end in events]
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        step()
        times.append((time.perf_counter() - started) * 1e3)
    return times


def host_issue_ms(step: Callable[[], Any], device: torch.device, steps: int = 5) -> float | None:
    """Median milliseconds the host takes to issue one step (Python, autograd and kernel launches) with the GPU idle
    when the step starts, so that no full launch queue holds the host back. Far below the step's GPU time: the GPU
    bounds the step, and capturing it in a CUDA graph could not make it faster. CUDA only (None on the CPU, where
    issuing is computing)."""
    if device.type != "cuda":
        return None
    times = []
    for _ in range(steps):
        synchronize(device)
        started = time.perf_counter()
        step()
        times.append((time.perf_counter() - started) * 1e3)
    synchronize(device)
    return statistics.median(times)


def count_flops(fn: Callable[[], Any]) -> int:
    """Matmul/conv FLOPs of one eager call of ``fn`` (forward and, when ``fn`` runs it, backward)."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def matmul_peak_flops(device: torch.device, size: int, repeats: int = 10) -> float:
    """Measured bf16 matmul throughput (FLOP/s) of ``size`` x ``size`` x ``size`` products on ``device``."""
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16, generator=generator)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16, generator=generator)
    times = time_steps(lambda: a @ b, steps=repeats, warmup=3, device=device)
    return 2 * size**3 / (statistics.mean(times) / 1e3)


# -------------------------------------------------------------------------------------------------------- rows

TRACK_MODULES = {"deit": "deit.benchmark", "resnet": "imagenet.benchmark"}


@dataclass(frozen=True)
class Case:
    """One row of the table: the track's benchmark module's ``builder`` makes its step; ``compared_to``: the row of
    the same track whose img/s divides this one's (``vs_release``); ``description`` is formatted with the sizes as
    ``s``."""

    track: str
    case: str
    builder: str
    compared_to: str | None
    description: str


CASES = (
    Case(
        "deit",
        "release",
        "build_release",
        None,
        "DeiT-{s.deit_model} <- {s.deit_teacher}, release recipe (fp16 autocast + GradScaler on CUDA, eager, AdamW)",
    ),
    Case(
        "deit",
        "fast",
        "build_fast",
        "release",
        "same math, fast path (bf16 + channels_last + torch.compile + fused AdamW on CUDA)",
    ),
    Case("deit", "teacher", "build_teacher", "release", "{s.deit_teacher} inference alone, fast-path settings (floor)"),
    Case(
        "resnet",
        "release",
        "build_release",
        None,
        "{s.resnet_student} <- {s.resnet_teacher}, torchdistill SRDLoss + SRDModelWrapper box, fp32, eager, SGD",
    ),
    Case(
        "resnet",
        "fast",
        "build_fast",
        "release",
        "same math, ProjectorKD box on the fast path (bf16 + channels_last + torch.compile + fused SGD)",
    ),
    Case(
        "resnet",
        "teacher",
        "build_teacher",
        "release",
        "{s.resnet_teacher} inference alone, fast-path settings (floor)",
    ),
)


def track_models(track: str, sizes: Sizes, batch_size: int) -> dict[str, Any]:
    """The keyword arguments of the track's builders and ``parity_pair`` for ``sizes``."""
    if track == "deit":
        return dict(
            model=sizes.deit_model,
            batch_size=batch_size,
            img_size=sizes.deit_img_size,
            teacher=sizes.deit_teacher,
            num_classes=sizes.num_classes,
            **sizes.deit_overrides,
        )
    return dict(teacher_arch=sizes.resnet_teacher, student_arch=sizes.resnet_student, num_classes=sizes.num_classes)


def image_size(track: str, sizes: Sizes) -> int:
    """The track's image size in ``sizes``."""
    return sizes.deit_img_size if track == "deit" else sizes.resnet_img_size


def build_step(track: str, builder: str, sizes: Sizes, batch_size: int, device: torch.device) -> Callable[..., Any]:
    """``step(images, labels)`` of the track's benchmark module's ``builder`` with the models of ``sizes``."""
    module = importlib.import_module(TRACK_MODULES[track])
    return getattr(module, builder)(device, **track_models(track, sizes, batch_size))


def time_row(case: Case, sizes: Sizes, args: argparse.Namespace, device: torch.device, peak_flops: float) -> Row:
    """Build the case's step and time it on the track's synthetic batch: ``--warmup`` untimed steps (which absorb
    torch.compile), ``--steps`` timed ones (:func:`time_steps`), the host issue time (:func:`host_issue_ms`) and the
    peak memory since the build; then the model FLOPs of one step run eagerly (counted after the first call, where
    the compile-or-eager choice is made)."""
    reset_memory(device)
    step = build_step(case.track, case.builder, sizes, args.batch_size, device)
    images, labels = synthetic_batch(args.batch_size, image_size(case.track, sizes), sizes.num_classes, device)

    def run() -> Any:
        return step(images, labels)

    times = time_steps(run, args.steps, args.warmup, device)
    host_ms = host_issue_ms(run, device)
    memory = peak_memory_mib(device)
    with torch.compiler.set_stance("force_eager"):
        flops_per_img = count_flops(run) / args.batch_size
    mean_ms = statistics.mean(times)
    img_s = args.batch_size / (mean_ms / 1e3)
    return Row(
        track=case.track,
        case=case.case,
        description=case.description.format(s=sizes),
        batch_size=args.batch_size,
        step_ms_mean=mean_ms,
        step_ms_median=statistics.median(times),
        img_per_s=img_s,
        peak_memory_mib=memory,
        gflops_per_img=flops_per_img / 1e9 if flops_per_img else None,
        mfu=flops_per_img * img_s / peak_flops if flops_per_img else None,
        host_ms=host_ms,
        extra={"tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "tf32_cudnn": torch.backends.cudnn.allow_tf32}
        if device.type == "cuda"
        else {},
    )


def bench_rows(track: str, sizes: Sizes, args: argparse.Namespace, device: torch.device, peak: float) -> list[Row]:
    """The track's rows of :data:`CASES`, each timed by :func:`time_row` and compared to its ``compared_to`` row."""
    cases = [case for case in CASES if case.track == track]
    rows = [time_row(case, sizes, args, device, peak) for case in cases]
    by_case = {row.case: row for row in rows}
    for case, row in zip(cases, rows):
        if case.compared_to is not None:
            row.vs_release = row.img_per_s / by_case[case.compared_to].img_per_s
    return rows


# ------------------------------------------------------------------------------------------------------- data


def write_jpeg_imagefolder(
    root: Path, sizes: Sizes, batches: int, batch_size: int, num_classes: int = 10, seed: int = 0
) -> list[Path]:
    """An ImageFolder tree ``root/{train,val}/<class>/*.jpg`` of synthetic photo-like JPEGs (smooth colour fields plus
    grain, quality 90) in ImageNet-typical sizes. ``unique_jpegs`` files are written once and hard-linked so that the
    train split holds at least ``batches * batch_size`` images. Returns the unique files."""
    rng = np.random.default_rng(seed)
    unique = []
    source = root / "unique"
    source.mkdir(parents=True, exist_ok=True)
    for index in range(sizes.unique_jpegs):
        width, height = sizes.jpeg_sizes[index % len(sizes.jpeg_sizes)]
        field_ = rng.uniform(0, 255, size=(max(height // 32, 2), max(width // 32, 2), 3)).astype(np.uint8)
        smooth = np.asarray(Image.fromarray(field_).resize((width, height), Image.BICUBIC), dtype=np.float32)
        grain = rng.normal(0, 12, size=smooth.shape)
        path = source / f"{index:04d}.jpg"
        Image.fromarray(np.clip(smooth + grain, 0, 255).astype(np.uint8)).save(path, quality=90)
        unique.append(path)
    per_class = math.ceil(batches * batch_size / num_classes)
    for split, count in (("train", per_class), ("val", 1)):
        for label in range(num_classes):
            folder = root / split / f"class{label:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                link = folder / f"{index:05d}.jpg"
                if not link.exists():
                    os.link(unique[(label * count + index) % len(unique)], link)
    return unique


def sample_photos() -> list[Path]:
    """scikit-learn's two real photographs (640 x 427 JPEGs: china.jpg, flower.jpg)."""
    import sklearn.datasets

    folder = Path(sklearn.datasets.__file__).parent / "images"
    return [folder / "china.jpg", folder / "flower.jpg"]


def transform_files(synthetic: list[Path]) -> list[Path]:
    """The files the per-core transform rows decode: the synthetic ImageNet-size JPEGs and the two real photos, these
    repeated so that they make about a third of the list."""
    return synthetic + sample_photos() * max(len(synthetic) // 4, 1)


def deit_data_config(sizes: Sizes, root: Path, batch_size: int, workers: int, fast_loader: bool = True) -> dict:
    from deit.config import load_config

    return load_config(
        sizes.deit_model,
        flags={
            "data.path": str(root),
            "data.batch_size": batch_size,
            "data.num_workers": workers,
            "data.fast_loader": fast_loader,
            "fast": True,
            "model.img_size": sizes.deit_img_size,
            "model.num_classes": 10,
        },
    )


def resnet_train_dataset(root: Path) -> Any:
    """The ResNet recipe's training dataset (its own transform: RandomResizedCrop 224, flip, normalise) over ``root``,
    built by the track's recipe reader with ``--data-root root``."""
    from imagenet.config import find_recipe, load_recipe, resolve, set_data_root

    recipe = load_recipe(find_recipe(RESNET_RECIPE))
    set_data_root(recipe, str(root))
    return resolve(recipe["datasets"][recipe["train"]["train_data_loader"]["dataset_id"]])


def track_transform(track: str, sizes: Sizes, root: Path) -> Any:
    """The track's recipe training transform at the benchmark's image size (DeiT: ``deit.datasets.build_transform``;
    ResNet: the recipe's own dataset's)."""
    if track == "deit":
        from deit.datasets import build_transform

        return build_transform(True, deit_data_config(sizes, root, 2, 0))
    transform = resnet_train_dataset(root).transform
    transform.transforms[0].size = (sizes.resnet_img_size, sizes.resnet_img_size)
    return transform


TIMING_ROUNDS = 3


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """torch on one thread inside the block (the cores go to the case timed or to the loader workers)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def time_per_core(cases: dict[str, Callable[[str], Any]], files: list[Path], images: int) -> dict[str, float]:
    """img/s per core of each case (``case(path)``: read, decode, transform one file) on the same ``images`` files:
    images / CPU seconds of this process, torch on one thread, the cases interleaved over :data:`TIMING_ROUNDS`
    rounds so that a busy machine slows them alike."""
    seconds = dict.fromkeys(cases, 0.0)
    per_round = max(images // TIMING_ROUNDS, 1)
    with one_torch_thread():
        for case in cases.values():
            for path in files[:4]:
                case(str(path))
        for round_ in range(TIMING_ROUNDS):
            for name, case in cases.items():
                started = time.process_time()
                for index in range(round_ * per_round, (round_ + 1) * per_round):
                    case(str(files[index % len(files)]))
                seconds[name] += time.process_time() - started
    return {name: per_round * TIMING_ROUNDS / max(value, 1e-9) for name, value in seconds.items()}


def time_transforms(track: str, sizes: Sizes, root: Path, files: list[Path]) -> dict[str, Any]:
    """Per core on the same files: decoding alone (the default loader's ``load_rgb``: the ceiling of any CPU loader
    that decodes whole images), the recipe's training transform after it, and the fast CPU loader's transform
    (``projector_kd.engine.fast_data.FastTrainTransform``) — each as a loader worker runs it per image."""
    from projector_kd.engine.data import load_rgb
    from projector_kd.engine.fast_data import FastTrainTransform, read_encoded, recipe_stages

    recipe = track_transform(track, sizes, root)
    fast = FastTrainTransform(recipe_stages(recipe))
    rates = time_per_core(
        {
            "decode": load_rgb,
            "recipe": lambda path: recipe(load_rgb(path)),
            "fast": lambda path: fast(read_encoded(path)),
        },
        files,
        sizes.transform_images,
    )
    return {
        "decode_img_per_s_per_core": rates["decode"],
        "recipe_img_per_s_per_core": rates["recipe"],
        "fast_img_per_s_per_core": rates["fast"],
        "fast_vs_recipe": rates["fast"] / rates["recipe"],
        "images": TIMING_ROUNDS * max(sizes.transform_images // TIMING_ROUNDS, 1),
        "files": {"synthetic": sizes.unique_jpegs, "photos": [p.name for p in sample_photos()]},
    }


def loader_batches_needed(workers: int, batches: int) -> int:
    """Batches :func:`time_loader` reads with ``workers`` workers: one untimed round, then the timed ones."""
    return 2 * max(workers, 1) + max(batches, workers)


def time_loader(
    loader: Any,
    batches: int,
    device: torch.device,
    step: Callable[[torch.Tensor, torch.Tensor], Any] | None = None,
    workers: int | None = None,
) -> float:
    """img/s over ``max(batches, workers)`` batches of ``loader``, copied to ``device`` (non-blocking), after an untimed
    first round of ``2 * workers`` batches: worker start-up and the batches prefetched meanwhile (``prefetch_factor``
    2 per worker) would otherwise count as free. With ``step``, each batch also trains one step (end-to-end)."""
    workers = loader.num_workers if workers is None else workers  # DALI: its threads
    warmup = 2 * max(workers, 1)
    timed = max(batches, workers)
    count = 0
    started = 0.0
    for index, (images, labels, *_) in enumerate(loader):
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        if step is not None:
            step(images, labels)
        if index < warmup:
            if index == warmup - 1:
                synchronize(device)
                started = time.perf_counter()
            continue
        count += images.shape[0]
        if index == warmup + timed - 1:
            break
    synchronize(device)
    if count == 0:
        raise RuntimeError(f"the loader ended after {index + 1} batches, before any timed one")
    return count / (time.perf_counter() - started)


LOADERS = ("recipe", "fast")


def bench_data(
    track: str, sizes: Sizes, args: argparse.Namespace, device: torch.device, fast_img_s: float | None
) -> dict[str, Any]:
    """The track's data section on the same files: decoding alone, the recipe's and the fast CPU loader's training
    transform per core (:func:`time_transforms`); both loaders' ceilings with each worker count; and for DeiT, when
    the fast step's own rate ``fast_img_s`` is given, each loader feeding a fast step (end-to-end). The ResNet
    end-to-end rows are :func:`bench_resnet_loaders`."""
    with tempfile.TemporaryDirectory(prefix="benchmark-jpegs-") as tmp:
        root = Path(tmp)
        synthetic = write_jpeg_imagefolder(
            root, sizes, loader_batches_needed(max(args.workers), sizes.loader_batches) + 1, args.batch_size
        )
        entry: dict[str, Any] = {
            "transform": time_transforms(track, sizes, root, transform_files(synthetic)),
            "jpeg_sizes": [list(s) for s in sizes.jpeg_sizes],
        }

        def rates(workers: int, step: Callable[..., Any] | None = None) -> dict[str, float]:
            """img/s of each of :data:`LOADERS` with ``workers`` workers, each batch training ``step`` when given."""
            return {
                f"{kind}_img_per_s": time_loader(
                    data_loader(track, kind, sizes, root, args.batch_size, workers, device),
                    sizes.loader_batches,
                    device,
                    step=step,
                    workers=workers,
                )
                for kind in LOADERS
            }

        entry["loader"] = [{"workers": workers, **rates(workers)} for workers in args.workers]
        if track == "deit" and fast_img_s is not None:
            workers = max(args.workers)
            step = build_step("deit", "build_fast", sizes, args.batch_size, device)
            entry["end_to_end"] = {"workers": workers, "step_only_img_per_s": fast_img_s, **rates(workers, step)}
    return entry


def data_loader(
    track: str, kind: str, sizes: Sizes, root: Path, batch_size: int, workers: int, device: torch.device
) -> Any:
    """The track's training loader over ``root``: the recipe's (``kind`` 'recipe') or the fast CPU loader ('fast').
    DeiT: ``deit.datasets.build_loaders`` on the fast path (resumable seeded sampling, pinned memory on CUDA,
    persistent workers; ``data.fast_loader`` for 'fast'); ResNet: :func:`resnet_loader`."""
    if track == "resnet":
        return resnet_loader("torchvision" if kind == "recipe" else "fast", sizes, root, batch_size, workers, device)
    from deit.datasets import build_loaders

    config = deit_data_config(sizes, root, batch_size, workers, fast_loader=kind == "fast")
    loader, _ = build_loaders(config, rank=0, world_size=1, pin_memory=device.type == "cuda", device=device)
    loader.sampler.set_epoch(0)
    return loader


# ------------------------------------------------------------------------------------ ResNet loaders, end to end
#
# The ResNet track's loaders feeding its fast training step on the synthetic JPEGs: the recipe's torchvision loader
# (PIL decode + RandomResizedCrop + flip + normalise in N worker processes), the fast CPU loader (``--fast``: the crop
# window decoded at the DCT scale it needs, uint8 batches normalised on the device) and the DALI loader
# (``--loader dali``: nvJPEG decoding of the crop window and the same transform on the GPU; on a CPU, DALI's CPU
# pipeline), with N DALI threads. img/s over the batches after the first (worker / pipeline start-up), each batch
# also training one step; the main process runs torch on one thread meanwhile (the cores go to the loaders).


def resnet_loader(kind: str, sizes: Sizes, root: Path, batch_size: int, workers: int, device: torch.device) -> Any:
    """The ResNet recipe's training loader over ``root`` ('torchvision', 'fast': the fast CPU loader, or 'dali'), its
    crop at the benchmark's ResNet image size, yielding ``(images, labels)``."""
    from torch.utils.data import DataLoader, RandomSampler

    from projector_kd.engine.fast_data import fast_training_loader
    from projector_kd.engine.sampling import resumable_loader

    dataset = resnet_train_dataset(root)
    dataset.transform.transforms[0].size = (sizes.resnet_img_size, sizes.resnet_img_size)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=RandomSampler(dataset),
        num_workers=workers,
        pin_memory=device.type == "cuda",
        drop_last=True,
        persistent_workers=workers > 0,
    )
    if kind == "torchvision":
        return loader
    if kind == "fast":
        return fast_training_loader(resumable_loader(loader, seed=0), device, "benchmark")
    from imagenet.dali import DaliLoader

    dali_loader = DaliLoader(loader, device, train=True, name="benchmark", threads=workers)
    return ((images, labels) for images, labels, _ in dali_loader)


def dali_installed() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


RESNET_LOADERS = ("torchvision", "fast", "dali")


def bench_resnet_loaders(
    sizes: Sizes, args: argparse.Namespace, device: torch.device, step_only_img_s: float
) -> dict[str, Any]:
    """img/s of the torchvision, the fast CPU and the DALI loader each feeding the ResNet fast step, with the same
    worker / thread count (the largest of ``--workers``), torch on one thread in this process; the DALI row says
    'DALI not installed' where it is missing."""
    workers = max(args.workers)
    batches = 1 if args.tiny else 4 * sizes.loader_batches
    decoding = {
        "torchvision": f"PIL, {workers} worker processes",
        "fast": f"PIL crop window, {workers} worker processes",
        "dali": f"{'nvJPEG on the GPU' if device.type == 'cuda' else 'DALI CPU'}, {workers} threads",
    }
    rows = []
    with one_torch_thread(), tempfile.TemporaryDirectory(prefix="benchmark-loaders-") as tmp:
        step = build_step("resnet", "build_fast", sizes, args.batch_size, device)
        torch.manual_seed(0)
        root = Path(tmp)
        write_jpeg_imagefolder(root, sizes, loader_batches_needed(workers, batches) + 1, args.batch_size)
        for kind in RESNET_LOADERS:
            timed = kind != "dali" or dali_installed()
            loader = resnet_loader(kind, sizes, root, args.batch_size, workers, device) if timed else None
            img_s = time_loader(loader, batches, device, step=step, workers=workers) if timed else None
            rows.append(
                {
                    "loader": kind,
                    "decoding": decoding[kind] if timed else None,
                    "img_per_s": img_s,
                    "vs_step_only": img_s / step_only_img_s if timed else None,
                    "note": None if timed else "DALI not installed",
                }
            )
    del step
    reset_memory(device)
    return {"workers": workers, "batches": batches, "step_only_img_per_s": step_only_img_s, "rows": rows}


def format_resnet_loaders(result: dict[str, Any]) -> str:
    lines = []
    for row in result["rows"]:
        figure = (
            f"{row['img_per_s']:.1f} img/s ({100 * row['vs_step_only']:.0f}% of the fast step alone, "
            f"{result['step_only_img_per_s']:.1f})"
            if row["img_per_s"] is not None
            else row["note"]
        )
        lines.append(
            f"end-to-end resnet: {row['loader']} loader ({row['decoding'] or '-'}) feeding the fast step: {figure}"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------ parity


def run_parity(track: str, sizes: Sizes, batch_size: int, device: torch.device) -> dict[str, Any]:
    """The track's parity check (:func:`projector_kd.engine.parity.check_parity` of its ``parity_pair``) on one batch
    of the timed size, so that Inductor's cache serves the graphs compiled for timing."""
    module = importlib.import_module(TRACK_MODULES[track])
    reference, fast = module.parity_pair(device, **track_models(track, sizes, batch_size))
    return check_parity(reference, fast, batch_size, image_size(track, sizes), sizes.num_classes, device)


# ------------------------------------------------------------------------------------------------------ report


def environment(device: torch.device, compile_enabled: bool) -> dict[str, Any]:
    versions = {}
    for package in ("torch", "torchvision", "timm", "torchdistill", "pillow"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    cpu_name = platform.processor() or platform.machine()
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({cpu_name})",
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "cpu_cores": os.cpu_count(),
        "python": platform.python_version(),
        "versions": versions,
        "torch_compile": compile_enabled,
    }


def format_rows(rows: list[Row]) -> str:
    header = (
        f"{'track':<7} {'case':<8} {'img/s':>9} {'step ms':>9} {'median':>9} {'host ms':>8} {'peak MiB':>9} "
        f"{'GFLOP/img':>9} {'MFU':>6} {'vs rel.':>7}  description"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        peak = f"{r.peak_memory_mib:9.0f}" if r.peak_memory_mib is not None else f"{'n/a':>9}"
        host = f"{r.host_ms:8.2f}" if r.host_ms is not None else f"{'n/a':>8}"
        gflops = f"{r.gflops_per_img:9.2f}" if r.gflops_per_img is not None else f"{'n/a':>9}"
        mfu = f"{100 * r.mfu:5.1f}%" if r.mfu is not None else f"{'n/a':>6}"
        ratio = f"{r.vs_release:6.2f}x" if r.vs_release is not None else f"{'':>7}"
        lines.append(
            f"{r.track:<7} {r.case:<8} {r.img_per_s:9.1f} {r.step_ms_mean:9.2f} {r.step_ms_median:9.2f} {host} "
            f"{peak} {gflops} {mfu} {ratio}  {r.description}"
        )
    return "\n".join(lines)


def format_data(track: str, entry: dict[str, Any], cores: int | None, fast_img_s: float | None) -> str:
    name = {"deit": "DeiT (RandAugment etc.)", "resnet": "ResNet (RandomResizedCrop + flip)"}[track]
    rates = entry["transform"]
    lines = [
        f"data {track}: {name} train transform per core ({cores} cores here, one thread): decode only "
        f"{rates['decode_img_per_s_per_core']:.1f} img/s | recipe {rates['recipe_img_per_s_per_core']:.1f} | fast CPU "
        f"loader {rates['fast_img_per_s_per_core']:.1f} ({rates['fast_vs_recipe']:.2f}x the recipe)"
    ]
    for loader in entry["loader"]:
        figures = f"recipe {loader['recipe_img_per_s']:.1f} img/s, fast {loader['fast_img_per_s']:.1f} img/s"
        if fast_img_s is not None:
            bound = "loader-bound" if loader["fast_img_per_s"] < fast_img_s else "step-bound"
            figures += f" vs fast step {fast_img_s:.1f} img/s -> {bound} with the fast loader"
        lines.append(f"data {track}: loader ceiling with {loader['workers']} workers: {figures}")
    if entry.get("end_to_end"):
        e2e = entry["end_to_end"]
        lines.append(
            f"data {track}: end-to-end, each loader ({e2e['workers']} workers) feeding the fast step: recipe "
            f"{e2e['recipe_img_per_s']:.1f} img/s, fast {e2e['fast_img_per_s']:.1f} img/s"
        )
    return "\n".join(lines)


def format_parity(track: str, result: dict[str, Any]) -> str:
    math_, prec = result["math"], result["precision"]
    return (
        f"parity {track}: {'ok' if result['ok'] else 'FAILED'} | fp32 reference loss "
        f"{result['loss_reference_fp32']:.6g} | fast path, autocast off: loss diff {math_['loss_abs_diff']:.2g} "
        f"(tol {math_['loss_tolerance']:.2g}), grad rel diff {math_['grad_rel_diff']:.2g} "
        f"(tol {math_['grad_tolerance']:.2g}) | fast path as run ({result['fast_dtype']}): loss diff "
        f"{prec['loss_abs_diff']:.2g} (tol {prec['loss_tolerance']:.2g}), grad rel diff "
        f"{prec['grad_rel_diff']:.2g} (tol {prec['grad_tolerance']:.2g}, cosine {prec['grad_cosine']:.4f})"
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Release recipe vs fast path, both tracks, one process.")
    parser.add_argument("--tiny", action="store_true", help="small models and images (CPU smoke test; no claims)")
    parser.add_argument("--only", choices=TRACKS, help="benchmark one track (deit includes the data section)")
    parser.add_argument("--batch-size", type=int, help="images per step (default 256, --tiny 8)")
    parser.add_argument("--steps", type=int, help="timed steps per case (default 30, --tiny 2)")
    parser.add_argument(
        "--warmup", type=int, help="untimed steps before timing; they absorb torch.compile (default 10, --tiny 1)"
    )
    parser.add_argument(
        "--workers", type=int, nargs="+", help="loader worker counts to time (default 8 and cores-1, --tiny 2)"
    )
    parser.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda when available")
    parser.add_argument("--no-compile", action="store_true", help="disable torch.compile (the fast path runs eager)")
    parser.add_argument("--no-data", action="store_true", help="skip the transform / loader / end-to-end section")
    parser.add_argument(
        "--data-only",
        action="store_true",
        help="time only the data section (transforms per core, loader ceilings; no models), any machine",
    )
    parser.add_argument("--no-parity", action="store_true", help="skip the release-vs-fast parity check")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    sizes = TINY if args.tiny else FULL
    args.batch_size = sizes.batch_size if args.batch_size is None else args.batch_size
    args.steps = (2 if args.tiny else 30) if args.steps is None else args.steps
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 10)
    args.workers = args.workers or ([2] if args.tiny else sorted({8, max((os.cpu_count() or 2) - 1, 1)}))
    for name in ("batch_size", "steps"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.batch_size < 2 or args.batch_size % 2:
        raise UserError(f"--batch-size must be even and >= 2 (batch whitening and mixup), got {args.batch_size}")
    if args.warmup < 0 or any(w < 0 for w in args.workers):
        raise UserError("--warmup and --workers must be >= 0")
    if args.data_only and args.no_data:
        raise UserError("--data-only and --no-data exclude each other")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = TINY if args.tiny else FULL
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda requested but CUDA is not available; use --device cpu")
    if args.json is not None and not args.json.parent.is_dir():
        raise UserError(f"--json {args.json}: folder {args.json.parent} does not exist; create it or pick another path")
    if args.no_compile:
        torch.compiler.set_stance("force_eager")
    tracks = [args.only] if args.only else list(TRACKS)
    env = environment(device, not args.no_compile)
    claims = (device.type == "cuda" or args.data_only) and not args.tiny  # per-core data rates hold on any machine
    print(
        f"benchmark on {env['device']} | torch {env['versions']['torch']} | timm {env['versions']['timm']} | "
        f"torchdistill {env['versions']['torchdistill']} | batch {args.batch_size} | {args.steps} timed steps after "
        f"{args.warmup} warm-up | compile {'on' if env['torch_compile'] else 'off'}",
        flush=True,
    )
    if not claims:
        print(CLAIM_NOTE, flush=True)
    peak = None if args.data_only else matmul_peak_flops(device, sizes.matmul_size)
    if peak is not None:
        print(f"bf16 matmul peak ({sizes.matmul_size}^3): {peak / 1e12:.2f} TFLOP/s", flush=True)
    rows: list[Row] = []
    parity: dict[str, Any] = {}
    data: dict[str, Any] = {}
    seconds: dict[str, float] = {}

    def write_report(complete: bool) -> None:
        """The JSON report; written after each track too, so a run cut short keeps the tracks it finished."""
        write_json(
            args.json,
            {
                "environment": env,
                "claims": claims,
                "note": None if claims else CLAIM_NOTE,
                "complete": complete,
                "settings": {
                    "tiny": args.tiny,
                    "batch_size": args.batch_size,
                    "steps": args.steps,
                    "warmup": args.warmup,
                    "tracks": tracks,
                    "data_only": args.data_only,
                    "workers": args.workers,
                    "sizes": asdict(sizes),
                },
                "matmul_peak_tflops": None if peak is None else peak / 1e12,
                "rows": [asdict(r) for r in rows],
                "data": data or None,
                "parity": parity,
                "seconds_per_phase": seconds,
            },
        )

    @contextlib.contextmanager
    def phase(track: str, suffix: str, what: str) -> Iterator[None]:
        """Announce a phase of ``track``, record its seconds under ``track + suffix`` and free the device memory it
        held."""
        print(f"[{track}] {what} ...", flush=True)
        started = time.perf_counter()
        yield
        seconds[track + suffix] = time.perf_counter() - started
        reset_memory(device)

    for track in tracks:
        fast_img_s = None
        if not args.data_only:
            with phase(track, "", "timing release, fast, teacher"):
                track_rows = bench_rows(track, sizes, args, device, peak)
                rows += track_rows
                fast_img_s = next(row.img_per_s for row in track_rows if row.case == "fast")
                print(format_rows(track_rows), flush=True)
        if not args.no_data:
            with phase(
                track,
                "_data",
                f"data: train transforms per core, loader ceilings{', end-to-end' * (not args.data_only)}",
            ):
                data[track] = bench_data(track, sizes, args, device, fast_img_s)
                print(format_data(track, data[track], env["cpu_cores"], fast_img_s), flush=True)
                if track == "resnet" and not args.data_only:
                    loaders = data[track]["end_to_end_loaders"] = bench_resnet_loaders(sizes, args, device, fast_img_s)
                    print(format_resnet_loaders(loaders), flush=True)
        if not args.no_parity and not args.data_only:
            with phase(track, "_parity", "parity"):
                parity[track] = run_parity(track, sizes, args.batch_size, device)
            print(format_parity(track, parity[track]), flush=True)
        if args.json is not None:
            write_report(complete=False)
    print()
    if rows:
        print(format_rows(rows))
    for track, entry in data.items():
        fast_img_s = next((r.img_per_s for r in rows if (r.track, r.case) == (track, "fast")), None)
        print(format_data(track, entry, env["cpu_cores"], fast_img_s))
        if "end_to_end_loaders" in entry:
            print(format_resnet_loaders(entry["end_to_end_loaders"]))
    for track, result in parity.items():
        print(format_parity(track, result))
    print("seconds per phase: " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()))
    if not claims:
        print(CLAIM_NOTE)
    if args.json is not None:
        write_report(complete=True)
        print(f"wrote {args.json}")
    return 0 if all(result["ok"] for result in parity.values()) else 1


if __name__ == "__main__":
    run_cli(main)
