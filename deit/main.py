"""DeiT track entry point: train a conv-stem DeiT with projector KD, or evaluate a checkpoint.

    python deit/main.py --model tiny --train_student [--config FILE] [--data-path DIR] [--output DIR] [--opts K V ...]
    python deit/main.py --model tiny                 # evaluate ckpts/deit_tiny/ckpt_epoch_299.pth (or --ckpt PATH)
    torchrun --nproc_per_node=N deit/main.py --model tiny --train_student ...

Exit status: 0 done, 2 a user error (one line on stderr), 3 stopped by SIGTERM/SIGINT after writing a resumable
checkpoint (run the same command again to continue).
"""

from __future__ import annotations

import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]  # deit/datasets.py must not shadow `datasets`
if str(_HERE.parent) not in sys.path:
    sys.path.insert(0, str(_HERE.parent))

import argparse  # noqa: E402
import logging  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from timm.utils import random_seed  # noqa: E402

from deit.checkpoint import load_student_checkpoint  # noqa: E402
from deit.config import load_config, rename_old_keys  # noqa: E402
from deit.datasets import build_loaders, check_data  # noqa: E402
from deit.engine import DeiTTrack, evaluate_student  # noqa: E402
from deit.models import build_student, create_teacher  # noqa: E402
from projector_kd.engine.checkpoint import checkpoint_in, latest_checkpoint, load_checkpoint  # noqa: E402
from projector_kd.engine.cli import run_cli  # noqa: E402
from projector_kd.engine.config import add_overrides_argument, config_facts  # noqa: E402
from projector_kd.engine.data import dataset_facts  # noqa: E402
from projector_kd.engine.distributed import (  # noqa: E402
    DistEnv,
    check_ranks_agree,
    cleanup,
    init_distributed,
    parse_device,
    run_on_main,
)
from projector_kd.engine.errors import UserError, out_of_memory  # noqa: E402
from projector_kd.engine.loop import TrainingLoop  # noqa: E402
from projector_kd.engine.models import count_parameters  # noqa: E402
from projector_kd.engine.runs import (  # noqa: E402
    begin_run,
    close_logging,
    prepare_output_dir,
    release_output_dirs,
    run_folder,
    setup_logging,
    startup_line,
    tensorboard_writer,
    write_json,
)
from projector_kd.engine.signals import EXIT_STATUS_STOPPED, GracefulStop  # noqa: E402

REPO_ROOT = _HERE.parent
RESUME_FILE = "checkpoint.pth"
OUT_OF_MEMORY_HINT = (
    "lower --batch-size and raise --accum-iter by the same factor (the global batch and the learning rate stay), or "
    "add --fast (bf16 activations); the checkpoints already written are intact"
)
logger = logging.getLogger("deit")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("deit/main.py", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny", help="student preset: tiny | small | demo (default tiny)")
    parser.add_argument(
        "--train_student", "--train-student", action="store_true", help="train (default: evaluate a checkpoint)"
    )
    parser.add_argument("--eval", action="store_true", help="evaluate only (the default without --train_student)")
    parser.add_argument("--config", help="YAML merged over configs/deit/<model>.yaml")
    parser.add_argument(
        "--data-path",
        "--data-root",
        "--data_path",
        "--data_root",
        dest="data_path",
        help="ImageFolder root holding train/ and val/ (data.path)",
    )
    parser.add_argument(
        "--output",
        "--output_dir",
        "--output-dir",
        dest="output",
        help="run folder: logs, TensorBoard, checkpoints, metrics.json (output)",
    )
    parser.add_argument("--batch-size", type=int, help="per-process batch size (data.batch_size)")
    parser.add_argument("--epochs", type=int, help="train.epochs")
    parser.add_argument(
        "--accum-iter",
        type=int,
        help="micro-batches per optimizer step (train.accum_iter): global batch = batch size x "
        "accum-iter x GPUs, so fewer GPUs can keep the recipe's global batch",
    )
    parser.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        default=None,
        metavar="CKPT",
        help="continue a run even if its config changed; with a path, resume from that checkpoint (a run folder: "
        "its checkpoint.pth; auto-resume from <output>/checkpoint.pth happens anyway when the config matches)",
    )
    parser.add_argument(
        "--ckpt",
        help="checkpoint to evaluate (release or project layout), or an exported folder / "
        ".safetensors file (scripts/export.py)",
    )
    parser.add_argument("--teacher-ckpt", help='teacher weights: {"model": state_dict} or a raw state dict')
    parser.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="allow full (unsafe) unpickling of --ckpt / --resume files you trust",
    )
    parser.add_argument("--throughput", action="store_true", help="measure student inference img/s and exit")
    parser.add_argument(
        "--fast",
        action="store_true",
        default=None,
        help="fast path: bf16, channels_last, torch.compile, fused AdamW, fast CPU loader (fast: true)",
    )
    parser.add_argument(
        "--loader",
        choices=("torchvision", "dali"),
        help="data loader (data.loader; default torchvision): dali decodes and augments on the GPU with NVIDIA DALI "
        "(pip install '.[dali]'), see docs/dali.md",
    )
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    add_overrides_argument(parser, "train.base_lr 1e-3 data.num_workers 4")
    return parser


def resolve_config(args: argparse.Namespace) -> dict:
    flags = {
        "data.path": args.data_path,
        "output": args.output,
        "data.batch_size": args.batch_size,
        "train.epochs": args.epochs,
        "train.accum_iter": args.accum_iter,
        "teacher.ckpt": args.teacher_ckpt,
        "fast": args.fast,
        "data.loader": args.loader,
        "device": args.device,
    }
    return load_config(args.model, args.config, flags, args.opts)


def find_file(path: str | Path) -> Path:
    """``path`` as given, or relative to the repository root when it is relative and missing (run from deit/)."""
    path = Path(path)
    if path.exists() or path.is_absolute():
        return path
    candidate = REPO_ROOT / path
    return candidate if candidate.exists() else path


def release_checkpoint(model: str) -> Path:
    """The released checkpoint for ``model``: ckpts/deit_<model>/ckpt_epoch_299.pth, then ckpts/ckpt_epoch_299.pth."""
    candidates = [Path("ckpts") / f"deit_{model}" / "ckpt_epoch_299.pth", Path("ckpts") / "ckpt_epoch_299.pth"]
    for candidate in candidates:
        if find_file(candidate).is_file():
            return find_file(candidate)
    raise UserError(
        f"no checkpoint to evaluate: looked for {' and '.join(str(REPO_ROOT / c) for c in candidates)}; "
        "download the released weights there (see ckpts/README.md) or pass --ckpt PATH"
    )


def log_parameters(student: torch.nn.Module, projector: torch.nn.Module | None = None) -> dict[str, int]:
    """Log and return the parameter counts of the student and the projector trained beside it."""
    counts = count_parameters(torch.nn.ModuleList([student, *([projector] if projector is not None else [])]))
    logger.info(
        "student parameters: %.2fM (+%.2fM projector, %.2fM total)",
        counts["student"] / 1e6,
        counts["projector"] / 1e6,
        counts["total"] / 1e6,
    )
    return counts


@torch.no_grad()
def throughput(student: torch.nn.Module, cfg: dict, device: torch.device) -> float:
    """Student inference img/s on random batches of ``data.batch_size`` (30 timed after 10 warm-up)."""
    student.eval().to(device)
    size = cfg["model"]["img_size"]
    images = torch.randn(cfg["data"]["batch_size"], 3, size, size, device=device)
    for _ in range(10):
        student(images)
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(30):
        student(images)
    if device.type == "cuda":
        torch.cuda.synchronize()
    rate = 30 * images.shape[0] / (time.perf_counter() - started)
    logger.info("throughput: %.1f img/s at batch %d, %d px on %s", rate, images.shape[0], size, device)
    return rate


def evaluate(cfg: dict, args: argparse.Namespace, env: DistEnv) -> int:
    setup_logging(args.output, env.rank, name="deit")
    student, _ = build_student(cfg, None)
    counts = log_parameters(student)
    if args.throughput:
        throughput(student, cfg, env.device)
        return 0
    path = find_file(args.ckpt) if args.ckpt else release_checkpoint(cfg["model"]["name"])
    report = load_student_checkpoint(student, path, trusted=args.trust_checkpoint)
    logger.info("loaded %d tensors from %s %s", len(report.loaded), path, report.meta or "")
    check_data(cfg, splits=("val",))
    _, val_loader = build_loaders(
        cfg, env.rank, env.world_size, pin_memory=env.device.type == "cuda", train=False, device=env.device
    )
    stats = evaluate_student(student, val_loader, cfg, env)
    logger.info(
        "%s on %d val images: top-1 %.2f top-5 %.2f loss %.4f",
        path,
        stats["num_images"],
        stats["top1"],
        stats["top5"],
        stats["loss"],
    )
    if args.output and env.is_main:
        write_json(
            Path(args.output) / "eval_metrics.json",
            {**stats, "checkpoint": str(path), "params": counts},
        )
    return 0


def train(cfg: dict, args: argparse.Namespace, env: DistEnv, stop: Any) -> int:
    """Train (or continue) the run in ``cfg['output']``; returns the exit status."""
    started = time.perf_counter()
    output = Path(cfg["output"])
    if cfg["distillation"]["method"] == "projector" and cfg["data"]["batch_size"] < 2:
        raise UserError(
            f"data.batch_size = {cfg['data']['batch_size']}: the projector's batch whitening needs at "
            "least 2 images per process in each (micro-)batch — set --batch-size 2 or more"
        )
    check_data(cfg, splits=("train", "val"))

    def prepare() -> None:
        prepare_output_dir(
            output,
            cfg,
            resume=args.resume is not None,
            upgrade_recorded=lambda recorded: rename_old_keys(recorded, "config.yaml", warn=False),
        )
        for stale in output.glob(".*.pth.*.tmp"):
            stale.unlink()

    run_on_main(prepare)  # a refused folder ends every rank with rank 0's line
    setup_logging(output, env.rank, name="deit", hold=True)  # log.txt is written once every check has passed
    random_seed(cfg["seed"], env.rank)
    train_loader, val_loader = build_loaders(
        cfg,
        env.rank,
        env.world_size,
        pin_memory=cfg["data"]["pin_memory"] and env.device.type == "cuda",
        device=env.device,
    )
    check_ranks_agree(
        {**dataset_facts("train", train_loader.dataset), **dataset_facts("val", val_loader.dataset)}, "dataset"
    )
    teacher = None
    if cfg["distillation"]["method"] != "none":
        tcfg = cfg["teacher"]
        teacher, source = create_teacher(
            tcfg["name"],
            cfg["model"]["num_classes"],
            find_file(tcfg["ckpt"]) if tcfg["ckpt"] else None,
            tcfg["hub_tag"],
            trusted=tcfg["trusted"],
        )
        logger.info("teacher %s loaded from %s", tcfg["name"], source)
    width = teacher.num_features if cfg["distillation"]["method"] == "projector" else None
    student, projector = build_student(cfg, width)
    counts = log_parameters(student, projector)
    track = DeiTTrack(cfg, env, student, projector, teacher, train_loader, val_loader, output_dir=output)
    loop = TrainingLoop(track, output, env.rank, env.world_size, clock=started)
    logger.info(
        startup_line(
            "DeiT track",
            f"method {cfg['distillation']['method']}",
            env.world_size,
            env.device,
            cfg["fast"],
            batch_size=cfg["data"]["batch_size"],
            accum_iter=cfg["train"]["accum_iter"],
            lr=track.lrs["lr"],
            steps_per_epoch=track.steps_per_epoch,
        )
    )
    explicit = args.resume not in (None, "auto")
    resume_path = (
        checkpoint_in(find_file(args.resume), RESUME_FILE) if explicit else latest_checkpoint(output, RESUME_FILE)
    )
    if resume_path is not None:
        loop.load(load_checkpoint(resume_path, trusted=args.trust_checkpoint), resume_path)
    begin_run(output, cfg, env.rank)
    loop.writer = writer = tensorboard_writer(output, env.rank)
    start_epoch, epochs = loop.position.epoch, cfg["train"]["epochs"]
    if not loop.fit(stop):
        return EXIT_STATUS_STOPPED
    final = evaluate_student(student, val_loader, cfg, env) if start_epoch >= epochs else None
    history = loop.history
    metrics = {
        "top1": final["top1"] if final else history["val_top1"][-1],
        "top5": final["top5"] if final else history["val_top5"][-1],
        "max_top1": loop.best_top1,
        "val_top1_per_epoch": history["val_top1"],
        "val_top5_per_epoch": history["val_top5"],
        "train_loss": history["train_loss"],
        "epochs": epochs,
        "method": cfg["distillation"]["method"],
        "student": cfg["model"]["name"],
        "student_params": counts["student"],
        "params": counts,
        "wall_time_s": loop.elapsed(),
        "world_size": env.world_size,
    }
    if env.is_main:
        write_json(output / "metrics.json", metrics)
        logger.info(
            "done: top-1 %.2f top-5 %.2f, %.1fs; metrics in %s",
            metrics["top1"],
            metrics["top5"],
            metrics["wall_time_s"],
            output / "metrics.json",
        )
    if writer is not None:
        writer.close()
    return 0


def main(argv: Sequence[str] | None = None, stop: Any = None) -> int:
    """Parse ``argv`` and run; ``stop`` (an object with ``.requested``) replaces the signal handler (tests)."""
    args = get_args_parser().parse_args(argv)
    parse_device(args.device)  # the flag's own error line, before it reaches the config
    cfg = resolve_config(args)
    cfg["output"] = str(run_folder(cfg["output"], "--output"))
    if args.output is not None:
        args.output = cfg["output"]
    env = init_distributed(cfg["device"])
    check_ranks_agree(config_facts(cfg), "config")
    try:
        if not args.train_student or args.eval or args.throughput:
            return evaluate(cfg, args, env)
        if stop is not None:
            return train(cfg, args, env, stop)
        with GracefulStop() as signals:
            return train(cfg, args, env, signals)
    except torch.cuda.OutOfMemoryError as error:
        raise out_of_memory(error, OUT_OF_MEMORY_HINT) from None
    finally:
        cleanup()
        close_logging()
        release_output_dirs()


if __name__ == "__main__":
    run_cli(main)
