"""ResNet track entry point: torchdistill 1.x recipes with this project's projector loss registered.

    python imagenet/image_classification.py --config configs/ilsvrc2012/ours/res3418.yaml --log log/output.txt
    torchrun --nproc_per_node=N imagenet/image_classification.py --config ... --world_size N [-adjust_lr]

A recipe without ``models.teacher_model`` trains the student alone (torchdistill's TrainingBox). The run folder
(``--output_dir``, default: the folder of ``models.student_model.dst_ckpt``) holds config.yaml, log.txt, TensorBoard
events, ``checkpoint.pth`` (resumable, every epoch), the best checkpoint (``dst_ckpt``) and metrics.json. A run folder
holding a checkpoint is resumed automatically and exactly. ``-test_only`` evaluates ``dst_ckpt`` (with
``--output_dir``: the file of that name in it, unless ``--opts`` names ``dst_ckpt``) and writes nothing beside the
weights: its log, config and metrics go to ``<output_dir>/test_only/`` only when ``--output_dir`` is given.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import this repository's packages, not the script's folder
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

import torch
from timm.utils import random_seed
from torch.nn.parallel import DistributedDataParallel
from torchdistill.common.main_util import import_dependencies
from torchdistill.core.distillation import get_distillation_box
from torchdistill.core.training import get_training_box
from torchdistill.datasets.util import build_data_loader
from torchdistill.models.wrapper import AuxiliaryModelWrapper

from imagenet import config as recipes
from imagenet.box import projector_of, student_of, unwrap
from imagenet.engine import BoxTrack
from imagenet.fast import apply_fast_path, channels_last_networks, wants_fast_loader
from imagenet.models import (
    build_model,
    load_weights,
    num_outputs,
    read_checkpoint,
)
from projector_kd.engine.checkpoint import load_checkpoint, load_state_exactly
from projector_kd.engine.cli import run_cli
from projector_kd.engine.config import add_overrides_argument, apply_overrides, config_facts
from projector_kd.engine.data import check_image_folder, check_last_batch, check_num_classes, dataset_facts
from projector_kd.engine.distributed import check_ranks_agree, cleanup, init_distributed, run_on_main
from projector_kd.engine.errors import UserError, out_of_memory
from projector_kd.engine.evaluation import evaluate_classifier
from projector_kd.engine.loop import LAST_CHECKPOINT, Position, TrainingLoop
from projector_kd.engine.models import count_parameters
from projector_kd.engine.runs import (
    begin_run,
    close_logging,
    counted,
    output_path,
    prepare_output_dir,
    release_output_dirs,
    run_folder,
    setup_logging,
    startup_line,
    tensorboard_writer,
    write_json,
)
from projector_kd.engine.sampling import resumable_loader
from projector_kd.engine.signals import EXIT_STATUS_STOPPED, GracefulStop

logger = logging.getLogger("imagenet")
OUT_OF_MEMORY_HINT = (
    "lower train.train_data_loader.kwargs.batch_size with --opts and raise train.optimizer.grad_accum_step by the "
    "same factor (the global batch stays), or add --fast (bf16 activations); the checkpoints already written are intact"
)


def get_argparser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Projector knowledge distillation, ResNet track (torchdistill)")
    parser.add_argument("--config", required=True, help="torchdistill YAML recipe (relative to here or the repo root)")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--log", help="extra log file path (the run folder always gets log.txt)")
    parser.add_argument("--start_epoch", default=0, type=int, help="first epoch when resuming from src_ckpt")
    parser.add_argument(
        "--seed",
        type=int,
        help="seed for python, numpy and torch (plus the rank), and for the training order unless the recipe's "
        "train sampler sets seed",
    )
    parser.add_argument(
        "-test_only",
        action="store_true",
        help="only evaluate the checkpoint at dst_ckpt (a checkpoint, exported folder or .safetensors)",
    )
    parser.add_argument("-student_only", action="store_true", help="do not evaluate the teacher")
    parser.add_argument("-log_config", action="store_true", help="log the recipe")
    parser.add_argument("--world_size", default=1, type=int, help="number of processes (torchrun sets it too)")
    parser.add_argument("--dist_url", default="env://", help="only env:// (torchrun) is supported")
    parser.add_argument("-adjust_lr", action="store_true", help="multiply the learning rate by the world size")
    parser.add_argument(
        "--data-root",
        "--data_root",
        "--data-path",
        "--data_path",
        dest="data_root",
        help="dataset folder holding train/ and val/ (replaces the recipe's os.getenv data root)",
    )
    parser.add_argument(
        "--output_dir",
        "--output-dir",
        "--output",
        "--run-dir",
        dest="output_dir",
        help="run folder (default: dst_ckpt's)",
    )
    parser.add_argument(
        "--teacher_ckpt",
        "--teacher-ckpt",
        dest="teacher_ckpt",
        help="teacher weights {'model': state_dict} (sets models.teacher_model.src_ckpt)",
    )
    parser.add_argument(
        "--fast", action="store_true", help="fast path: bf16, channels_last, compile, fused SGD, fast CPU loader"
    )
    parser.add_argument(
        "--loader",
        choices=recipes.LOADERS,
        help="data loader (sets runtime.loader; default torchvision): dali decodes and augments on the "
        "GPU with NVIDIA DALI (pip install '.[dali]'), see docs/dali.md",
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue in an output folder whose recorded config differs from this one"
    )
    parser.add_argument(
        "--trust_checkpoint",
        "--trust-checkpoint",
        dest="trust_checkpoint",
        action="store_true",
        help="allow full (unsafe) unpickling of the checkpoints this run loads",
    )
    add_overrides_argument(parser, "train.num_epochs 2 train.optimizer.kwargs.lr 0.05")
    return parser


def prepare_recipe(args: argparse.Namespace) -> tuple[dict, Path]:
    """Load the recipe, apply CLI overrides and check it — all before any data or model is touched."""
    path = recipes.find_recipe(args.config)
    recipe = recipes.load_recipe(path)
    import_dependencies(recipe.get("dependencies"))
    if args.opts:
        recipe = apply_overrides(recipe, args.opts, check_file=lambda raw: recipes.check_recipe(raw, str(path)))
    if args.data_root:
        recipes.set_data_root(recipe, args.data_root)
    if args.teacher_ckpt:
        if "teacher_model" not in recipe.get("models", {}):
            raise UserError(f"--teacher_ckpt given but {path} has no models.teacher_model")
        recipe["models"]["teacher_model"]["src_ckpt"] = args.teacher_ckpt
    if args.fast:
        recipe.setdefault("runtime", {})["fast"] = True
    if args.loader:
        recipe.setdefault("runtime", {})["loader"] = args.loader
    if args.dist_url != "env://":
        raise UserError(f"--dist_url {args.dist_url}: only env:// is supported — launch with torchrun")
    recipes.check_recipe(recipe, str(path))
    recipes.check_start_epoch(args.start_epoch, recipe, str(path), trains=not args.test_only)
    if recipe.get("runtime", {}).get("loader") == "dali":
        from projector_kd.engine.dali import require_dali

        require_dali()
    return recipe, path


def _loader_dataset_ids(recipe: dict, test_only: bool) -> list[str]:
    loaders = [recipe.get("test", {}).get("test_data_loader")]
    if not test_only:
        train_config = recipe["train"]
        loaders = [train_config.get("train_data_loader"), train_config.get("val_data_loader"), *loaders]
    return list(dict.fromkeys(loader["dataset_id"] for loader in loaders if loader))


def check_datasets(recipe: dict, ids: list[str], memo: dict) -> list[Path]:
    """Check each ImageFolder's train/val layout (missing folders, empty classes, differing classes): one clear line.
    Returns the split folders checked."""
    roots: dict[Path, list[str]] = {}
    policies: dict[Path, str] = {}
    for dataset_id in ids:
        node = recipe["datasets"][dataset_id]
        kwargs = node.get("init", {}).get("kwargs", {}) if isinstance(node, dict) else {}
        if kwargs.get("root") is not None:
            path = Path(str(recipes.resolve(kwargs["root"], memo))).expanduser()
            roots.setdefault(path.parent, []).append(path.name)
            if kwargs.get("on_bad_image", "fail") != "fail":
                policies[path.parent] = kwargs["on_bad_image"]
    lookups = [
        (node.get("init") or {}).get("args") for node in recipes.env_lookups(recipe) if "_overridden" not in node
    ]
    variables = [args[0] for args in lookups if args and isinstance(args[0], str)]
    how_to_set = "pass --data-root DIR" + (f" or set {' / '.join(dict.fromkeys(variables))}" if variables else "")
    for parent, splits in roots.items():
        check_image_folder(
            parent,
            splits=tuple(dict.fromkeys(splits)),
            how_to_set=how_to_set,
            on_bad_image=policies.get(parent, "fail"),
        )
    return [parent / split for parent, splits in roots.items() for split in dict.fromkeys(splits)]


def check_classes(split_dirs: list[Path], models: dict[str, torch.nn.Module | None]) -> None:
    """Every network predicts as many classes as each split has class folders (``models``: recipe key -> network)."""
    for key, model in models.items():
        outputs = num_outputs(model) if model is not None else None
        if outputs is None:
            continue
        for split_dir in split_dirs:
            check_num_classes(
                split_dir,
                outputs,
                f"models.{key} num_classes",
                f"set --opts models.{key}.kwargs.num_classes {{found}} (a teacher checkpoint must match "
                f"too) or point --data-root at the right folder",
            )


def build_datasets(recipe: dict, ids: list[str], memo: dict) -> dict:
    """The datasets the run uses (after :func:`check_datasets`)."""
    datasets = {}
    for dataset_id in ids:
        try:
            datasets[dataset_id] = recipes.resolve(recipe["datasets"][dataset_id], memo)
        except (FileNotFoundError, NotADirectoryError) as error:
            raise UserError(f"dataset {dataset_id}: {error} — check the data root (--data-root)") from None
    return datasets


def build_models(recipe: dict, args: argparse.Namespace, distributed: bool, device: torch.device):
    models_config = recipe["models"]
    student_key = "student_model" if "student_model" in models_config else "model"
    teacher_config = models_config.get("teacher_model")
    teacher = None
    if teacher_config is not None and not (args.test_only and args.student_only):  # no teacher to evaluate
        teacher = build_model(teacher_config, "teacher_model", distributed)
        if teacher_config.get("src_ckpt"):
            load_weights(teacher, teacher_config["src_ckpt"], "models.teacher_model", args.trust_checkpoint)
        teacher.to(device).eval()
    student = build_model(models_config[student_key], student_key, distributed).to(device)
    return teacher, student, models_config[student_key], teacher_config


def _ensure_ddp(box, device: torch.device, local_rank: int) -> None:
    """torchdistill wraps in DDP only on CUDA and only when asked; gloo runs and bare recipes need it too."""
    attribute = "student_model" if hasattr(box, "student_model") else "model"
    module = getattr(box, attribute)
    if isinstance(module, (DistributedDataParallel, AuxiliaryModelWrapper)):
        return
    setattr(box, attribute, DistributedDataParallel(module, device_ids=[local_rank] if device.type == "cuda" else None))


def training_data_seed(loader_config: dict, seed: int | None) -> int:
    """Seed of the training order and of each sample's random draws: the train loader's ``sampler.kwargs.seed``
    where the recipe gives one (torchdistill hands it to a ``DistributedSampler``), else ``--seed``, else 0."""
    recipe_seed = ((loader_config.get("sampler") or {}).get("kwargs") or {}).get("seed")
    if recipe_seed is not None:
        return recipe_seed
    return 0 if seed is None else seed


def swap_loader(loader, recipe: dict, device: torch.device, train: bool, name: str):
    """The torchdistill loader, or — with ``runtime.loader: dali`` — a DALI loader over the same files, sampler, batch
    size and transform (:mod:`imagenet.dali`)."""
    if recipe.get("runtime", {}).get("loader", "torchvision") != "dali":
        return loader
    from imagenet.dali import dali_loader

    return dali_loader(loader, device, train=train, name=name)


def main(argv: Sequence[str] | None = None) -> int:
    args = get_argparser().parse_args(argv)
    recipe, recipe_path = prepare_recipe(args)
    env = init_distributed(args.device)
    try:
        return run(args, recipe, recipe_path, env)
    except torch.cuda.OutOfMemoryError as error:
        raise out_of_memory(error, OUT_OF_MEMORY_HINT) from None
    finally:
        cleanup()
        close_logging()
        release_output_dirs()


def run(args: argparse.Namespace, recipe: dict, recipe_path: Path, env) -> int:
    started = time.perf_counter()
    if args.world_size != 1 and args.world_size != env.world_size:
        raise UserError(
            f"--world_size {args.world_size} but torchrun started {counted(env.world_size, 'process', 'processes')}"
        )
    models_config = recipe["models"]
    student_config = models_config.get("student_model", models_config.get("model"))
    if not student_config.get("dst_ckpt"):
        raise UserError(f"{recipe_path}: models.student_model.dst_ckpt is required (where the best checkpoint goes)")
    dst = Path(student_config["dst_ckpt"]).expanduser()
    if not (args.test_only and dst.exists()):  # weights to evaluate are read where they are; what a run writes is not
        dst = output_path(dst)  # put into the source tree (see projector_kd.engine.runs.output_path)
    log_file = output_path(args.log) if args.log else None
    student_key = "student_model" if "student_model" in models_config else "model"
    dst_named = f"models.{student_key}.dst_ckpt" in args.opts[::2]
    output_dir = run_folder(args.output_dir, "--output_dir") if args.output_dir is not None else dst.parent
    # --output_dir holds the run's best checkpoint under dst_ckpt's file name, unless --opts names dst_ckpt itself
    best_path = output_dir / dst.name if args.output_dir is not None and not dst_named else dst
    if args.test_only:
        if best_path != dst and not best_path.exists():
            raise UserError(
                f"no checkpoint to evaluate at {best_path} (--output_dir {args.output_dir} with the file "
                f"name of models.{student_key}.dst_ckpt) — pass the run folder that holds it, or name the "
                f"file with --opts models.{student_key}.dst_ckpt PATH"
            )
        # evaluating writes nothing beside the weights: a run folder only where --output_dir names one
        output_dir = output_dir / "test_only" if args.output_dir is not None else None
    run_config = {
        "recipe": recipes.to_plain(recipe),
        "seed": args.seed,
        "world_size": env.world_size,
        "adjust_lr": args.adjust_lr,
        "test_only": args.test_only,
    }
    check_ranks_agree(config_facts(run_config), "config")
    log = setup_logging(None, env.rank, name="imagenet", extra_log_file=log_file)
    if args.seed is not None:
        random_seed(args.seed, env.rank)
    # what can fail on the user's inputs (data layout, teacher weights) fails before the run folder is written
    memo: dict = {}
    dataset_ids = _loader_dataset_ids(recipe, args.test_only)
    split_dirs = check_datasets(recipe, dataset_ids, memo)
    teacher, student, student_config, teacher_config = build_models(recipe, args, env.distributed, env.device)
    check_classes(
        split_dirs,
        {"student_model" if "student_model" in models_config else "model": student, "teacher_model": teacher},
    )
    if output_dir is not None:  # a refused folder ends every rank with rank 0's line
        run_on_main(lambda: prepare_output_dir(output_dir, run_config, resume=args.resume or args.test_only))
    # the run folder's log.txt (and --log) are written once every check has passed (begin_run)
    log = setup_logging(output_dir, env.rank, name="imagenet", extra_log_file=log_file, hold=True)
    fast = bool(recipe.get("runtime", {}).get("fast", False))
    log.info(startup_line("ResNet track", f"recipe {recipe_path}", env.world_size, env.device, fast))
    if args.log_config:
        log.info("recipe: %s", run_config["recipe"])
    dataset_dict = build_datasets(recipe, dataset_ids, memo)
    check_ranks_agree(
        {fact: value for i in dataset_ids for fact, value in dataset_facts(f"dataset {i}", dataset_dict[i]).items()},
        "dataset",
    )
    log.info("student %s: %d parameters", student_config["key"], count_parameters(student)["student"])
    history: list[float] = []
    trained: TrainingLoop | None = None  # the training loop, which counts its wall time over resumes
    writer = None
    if not args.test_only:
        train_config = recipes.resolve(recipe["train"], memo)
        lr_factor = env.world_size if env.distributed and args.adjust_lr else 1
        device_ids = [env.local_rank] if env.device.type == "cuda" else None
        if fast:  # before torchdistill wraps them in DDP (see channels_last_networks)
            channels_last_networks(teacher, student)
        try:
            box = (
                get_training_box(
                    student, dataset_dict, train_config, env.device, device_ids, env.distributed, lr_factor
                )
                if teacher is None
                else get_distillation_box(
                    teacher, student, dataset_dict, train_config, env.device, device_ids, env.distributed, lr_factor
                )
            )
        except (KeyError, ValueError, TypeError) as error:
            raise UserError(f"{recipe_path}: torchdistill could not set up training: {error}") from None
        loader_config = train_config["train_data_loader"]
        loader = resumable_loader(
            box.train_data_loader, training_data_seed(loader_config, args.seed), env.rank, env.world_size
        )
        if projector_of(box) is not None and not loader.drop_last:
            check_last_batch(
                len(loader.dataset),
                len(loader.sampler),
                loader.batch_size,
                env.world_size,
                str(recipe_path),
                "train.train_data_loader" + (".batch_sampler" if loader_config.get("batch_sampler") else ""),
            )
        box.train_data_loader = loader
        if env.distributed:
            _ensure_ddp(box, env.device, env.local_rank)
        settings = apply_fast_path(box, teacher, env.device, fast_loader=wants_fast_loader(recipe)) if fast else None
        if settings is not None:
            log.info("fast path: %s", settings)
        box.train_data_loader = swap_loader(box.train_data_loader, recipe, env.device, True, "train.train_data_loader")
        box.val_data_loader = swap_loader(box.val_data_loader, recipe, env.device, False, "train.val_data_loader")
        track = BoxTrack(
            box,
            teacher,
            env.device,
            env.rank,
            best_path,
            log_freq=int(train_config.get("log_freq", 100)),
            autocast_dtype=settings.autocast_dtype if settings else None,
            channels_last=bool(settings),
        )
        loop = TrainingLoop(track, output_dir, env.rank, env.world_size, clock=started)
        last = output_dir / LAST_CHECKPOINT
        if last.is_file():
            loop.load(load_checkpoint(last, trusted=args.trust_checkpoint), last)
        else:
            if student_config.get("src_ckpt"):
                source = load_weights(
                    unwrap(student_of(box)), student_config["src_ckpt"], "models.student_model", args.trust_checkpoint
                )
                if "optimizer" in source:
                    track.load_state_dict(source, Path(student_config["src_ckpt"]), Position(args.start_epoch))
            loop.position = Position(args.start_epoch)
        begin_run(output_dir, run_config, env.rank)
        loop.writer = writer = tensorboard_writer(output_dir, env.rank)
        with GracefulStop() as stop:
            if not loop.fit(stop):
                return EXIT_STATUS_STOPPED
        history = loop.history["val_top1"]
        trained = loop
    checkpoint = read_checkpoint(best_path, trusted=args.trust_checkpoint)
    load_weights_from = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else checkpoint
    load_state_exactly(student, load_weights_from, best_path, f"models.student_model ({student_config['key']})")
    if args.test_only:
        begin_run(output_dir, run_config, env.rank)
    test_config = recipe.get("test", {}).get("test_data_loader")
    if test_config is None:
        raise UserError(f"{recipe_path}: test.test_data_loader is required for the final evaluation")
    test_loader = swap_loader(
        build_data_loader(dataset_dict[test_config["dataset_id"]], recipes.resolve(test_config, memo), env.distributed),
        recipe,
        env.device,
        False,
        "test.test_data_loader",
    )
    metrics: dict = {
        "val_top1_per_epoch": history,
        "best_val_top1": max(history) if history else None,
        "student_params": count_parameters(student)["student"],
        "student": student_config["key"],
        "checkpoint": str(best_path),
        "world_size": env.world_size,
        "seed": args.seed,
        "fast": fast,
    }
    if teacher is not None and not args.student_only:
        scores = evaluate_classifier(teacher, test_loader, env.device, env.rank, desc="teacher")
        metrics["teacher_top1"], metrics["teacher_top5"] = scores["top1"], scores["top5"]
        metrics["teacher_params"] = count_parameters(teacher)["total"]
        log.info(
            "[teacher %s] top-1 %.2f top-5 %.2f",
            teacher_config["key"],
            metrics["teacher_top1"],
            metrics["teacher_top5"],
        )
    scores = evaluate_classifier(student, test_loader, env.device, env.rank, desc="student")
    metrics["top1"], metrics["top5"] = scores["top1"], scores["top5"]
    log.info("[student %s] top-1 %.2f top-5 %.2f", student_config["key"], metrics["top1"], metrics["top5"])
    metrics["wall_time_s"] = trained.elapsed() if trained is not None else time.perf_counter() - started
    if env.is_main:
        if output_dir is not None:
            write_json(output_dir / "metrics.json", metrics)
        print(
            f"top1 {metrics['top1']:.2f} top5 {metrics['top5']:.2f}"
            + (f" (metrics: {output_dir / 'metrics.json'})" if output_dir is not None else ""),
            flush=True,
        )
    if writer is not None:
        writer.close()
    return 0


if __name__ == "__main__":
    run_cli(main)
