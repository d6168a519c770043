"""The embedded demo: both tracks end to end on scikit-learn's digits, through the real entry points, with a report.

Stages: write the digits as an ImageFolder; train the teacher (ImageNet track, no teacher); then for each track and seed
train the student without distillation, with logit KD only, and with projector KD. Each stage is a subprocess of the
track's real entry point with a config from ``configs/demo/``; its output folder holds the log, checkpoints and
``metrics.json``. A stage whose ``metrics.json`` exists is reused (``--fresh`` starts over). The report
(``report.md``, ``curves.png``, ``summary.json``) is written to the output folder and the table printed.

Every stage runs with the portable CPU kernels (:mod:`projector_kd.engine.portable`: one thread, fixed kernels), so
the table repeats itself bit for bit on the AMD EPYC machines checked, whatever the number of cores or ``--jobs``
(an Intel Xeon gave the same teacher and other figures for half the students, by up to about a point);
``--native-kernels`` (or a CPU without AVX2 and FMA) runs with this CPU's own kernels instead: faster, and figures that
depend on the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from projector_kd.engine.cli import run_cli  # noqa: E402
from projector_kd.engine.data import write_digits_imagefolder  # noqa: E402
from projector_kd.engine.errors import UserError  # noqa: E402
from projector_kd.engine.portable import (  # noqa: E402
    PORTABLE_CONDITION,
    cpu_model,
    portable_environment,
    supports_portable_kernels,
)

METHOD_LABELS = {"baseline": "no distillation", "kd": "logit KD only", "projector": "projector KD (ours)"}
CONFIGS = ROOT / "configs" / "demo"
IMAGE_SIZE = 32
TRAIN_PER_CLASS = 20
HOLDOUT_PER_CLASS = 30
PORTABLE_LAUNCHER = ["-m", "projector_kd.engine.portable"]
METRICS = "metrics.json"
COMMAND_STAMP = "demo_command.json"


@dataclass
class Stage:
    """One run of a track's entry point."""

    track: str
    method: str
    seed: int | None
    command: list[str]
    output: Path

    @property
    def title(self) -> str:
        seed = "" if self.seed is None else f", seed {self.seed}"
        return f"{self.track}: {METHOD_LABELS.get(self.method, self.method)}{seed}"

    @property
    def metrics_file(self) -> Path:
        return self.output / METRICS


def resnet_stage(
    method: str, seed: int | None, data: Path, out: Path, teacher_ckpt: Path, opts: Sequence[str] = ()
) -> Stage:
    name = "teacher" if method == "teacher" else f"{method}_seed{seed}"
    output = out / "resnet" / name
    command = [
        sys.executable,
        str(ROOT / "imagenet" / "image_classification.py"),
        "--config",
        str(CONFIGS / f"resnet_{method}.yaml"),
        "--data-root",
        str(data),
        "--output_dir",
        str(output),
    ]
    command += ["--seed", str(0 if seed is None else seed)]
    if method not in ("teacher", "baseline"):
        command += ["--teacher_ckpt", str(teacher_ckpt)]
    if opts:
        command += ["--opts", *opts]
    track = "ResNet track" if method != "teacher" else "teacher"
    return Stage(track, method if method != "teacher" else "teacher (ResNet18)", seed, command, output)


def deit_stage(method: str, seed: int, data: Path, out: Path, teacher_ckpt: Path, opts: Sequence[str] = ()) -> Stage:
    output = out / "deit" / f"{method}_seed{seed}"
    command = [
        sys.executable,
        str(ROOT / "deit" / "main.py"),
        "--model",
        "demo",
        "--train_student",
        "--config",
        str(CONFIGS / f"deit_{method}.yaml"),
        "--data-path",
        str(data),
        "--output",
        str(output),
        "--teacher-ckpt",
        str(teacher_ckpt),
        "--opts",
        "seed",
        str(seed),
        *opts,
    ]
    return Stage("DeiT track", method, seed, command, output)


def launch(stage: Stage, threads: int, portable: bool) -> tuple[list[str], dict[str, str]]:
    """The command and environment ``stage`` runs with: through :mod:`projector_kd.engine.portable` with its
    environment (one thread) when ``portable``, else as is with ``threads`` CPU threads."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    if not portable:
        return stage.command, env
    return [stage.command[0], *PORTABLE_LAUNCHER, *stage.command[1:]], portable_environment(env)


def run_stage(stage: Stage, index: int, total: int, threads: int, portable: bool) -> dict:
    """Run one stage (or reuse its finished output, if it ran with the same command) and return its metrics: with the
    portable CPU kernels when ``portable``, else with this CPU's own and ``threads`` threads."""
    prefix = f"[{index}/{total}] {stage.title}"
    stamp = stage.output / COMMAND_STAMP
    command, env = launch(stage, threads, portable)
    arguments = command[1:]  # without the interpreter, so a moved .venv still reuses
    if stage.metrics_file.is_file():
        if not stamp.is_file() or json.loads(stamp.read_text()) != arguments:
            raise UserError(
                f"{stage.output} holds a finished run with other settings than this call's; "
                f"rerun with --fresh, or pick another --output"
            )
        metrics = json.loads(stage.metrics_file.read_text())
        print(f"{prefix}: reused ({stage.output}) top-1 {metrics['top1']:.2f}", flush=True)
        return metrics
    stage.output.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(arguments))
    console = stage.output / "console.txt"
    print(f"{prefix} ...", flush=True)
    start = time.time()
    with open(console, "w") as log:
        status = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    if status != 0 or not stage.metrics_file.is_file():
        tail = console.read_text().strip().splitlines()[-15:]
        print("\n".join("    " + line for line in tail), file=sys.stderr)
        raise UserError(
            f"demo stage '{stage.title}' failed (exit {status}); full output in {console}; command: {' '.join(command)}"
        )
    metrics = json.loads(stage.metrics_file.read_text())
    print(f"{prefix}: top-1 {metrics['top1']:.2f} in {time.time() - start:.0f}s", flush=True)
    return metrics


def run_all(teacher: Stage, students: list[Stage], jobs: int, threads: int, portable: bool) -> list[tuple[Stage, dict]]:
    """Run the teacher and the students ``jobs`` at a time (:func:`run_stage` with ``threads`` and ``portable``).
    Students without distillation start beside the teacher; the others wait for it. Within each group the slower
    DeiT-track runs go first, so that the workers finish together. Returns (stage, metrics) pairs: the teacher, then
    ``students`` in order. The first failure cancels the stages not yet started."""
    total = len(students) + 1
    # baselines before distilled students, DeiT before ResNet within each (sorted is stable: seeds stay in order)
    order = sorted(
        range(len(students)), key=lambda i: (students[i].method != "baseline", students[i].track != "DeiT track")
    )
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        teacher_future = pool.submit(run_stage, teacher, 1, total, threads, portable)

        def run_student(i: int) -> dict:
            if students[i].method != "baseline":
                teacher_future.result()
            return run_stage(students[i], i + 2, total, threads, portable)

        futures = {i: pool.submit(run_student, i) for i in order}
        try:
            return [(teacher, teacher_future.result())] + [
                (stage, futures[i].result()) for i, stage in enumerate(students)
            ]
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def summarise(results: list[tuple[Stage, dict]]) -> list[dict]:
    """Group runs by (track, method): mean and std of top-1 over seeds, params, mean wall time, per-epoch curves."""
    rows: dict[tuple[str, str], dict] = {}
    for stage, metrics in results:
        row = rows.setdefault(
            (stage.track, stage.method),
            {
                "track": stage.track,
                "method": stage.method,
                "model": metrics["student"],
                "params": metrics["student_params"],
                "top1": [],
                "wall_time_s": [],
                "curves": [],
            },
        )
        row["top1"].append(float(metrics["top1"]))
        row["wall_time_s"].append(float(metrics["wall_time_s"]))
        row["curves"].append([float(v) for v in metrics["val_top1_per_epoch"]])
    for row in rows.values():
        row["top1_mean"] = statistics.fmean(row["top1"])
        row["top1_std"] = statistics.stdev(row["top1"]) if len(row["top1"]) > 1 else 0.0
        row["last_mean"] = statistics.fmean(curve[-1] for curve in row["curves"])
    return list(rows.values())


def format_table(rows: list[dict]) -> str:
    lines = [
        "| track | model | method | top-1 (mean ± std) | last epoch | seeds | params | wall time / run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        params = f"{row['params'] / 1e6:.2f}M" if row.get("params") else "-"
        lines.append(
            f"| {row['track']} | {row['model']} | {METHOD_LABELS.get(row['method'], row['method'])} | "
            f"{row['top1_mean']:.2f} ± {row['top1_std']:.2f} | {row['last_mean']:.2f} | {len(row['top1'])} | "
            f"{params} | "
            f"{statistics.fmean(row['wall_time_s']):.0f}s |"
        )
    return "\n".join(lines)


def plot_curves(rows: list[dict], path: Path) -> None:
    """Validation top-1 per epoch, one panel per track, one line per method (mean over seeds, band = min..max)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    tracks = [t for t in dict.fromkeys(row["track"] for row in rows) if t != "teacher"]
    figure, axes = plt.subplots(1, len(tracks), figsize=(6 * len(tracks), 4.2), squeeze=False)
    teacher = next((row for row in rows if row["track"] == "teacher"), None)
    for axis, track in zip(axes[0], tracks):
        for row in (r for r in rows if r["track"] == track):
            curves = np.array([c for c in row["curves"] if c])
            if curves.size == 0:
                continue
            epochs = np.arange(1, curves.shape[1] + 1)
            axis.plot(
                epochs,
                curves.mean(0),
                marker="o",
                ms=3,
                label=f"{METHOD_LABELS.get(row['method'], row['method'])} ({row['top1_mean']:.1f})",
            )
            axis.fill_between(epochs, curves.min(0), curves.max(0), alpha=0.2)
        if teacher is not None:
            axis.axhline(
                teacher["top1_mean"], color="grey", ls="--", lw=1, label=f"teacher ({teacher['top1_mean']:.1f})"
            )
        axis.set(title=track, xlabel="epoch", ylabel="val top-1 (%)")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
        axis.legend(loc="lower right", fontsize=8)
    figure.suptitle("Digits demo: validation top-1 per epoch (mean over seeds, band = min..max)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def seed_spread(*rows: dict) -> float:
    """The seed spread of a comparison: the largest standard deviation over seeds of the rows compared."""
    return max(row["top1_std"] for row in rows)


def comparison(track: str, by_method: dict[str, dict], seeds: int) -> str:
    """The report's line for projector KD against no distillation on ``track``: the margin, and whether it exceeds
    the seed spread; a margin within the spread (or with one seed, no spread at all) is no conclusion."""
    projector, baseline = by_method["projector"], by_method["baseline"]
    gain = projector["top1_mean"] - baseline["top1_mean"]
    versus_kd = ""
    if "kd" in by_method:
        versus_kd = f"; logit KD alone: {by_method['kd']['top1_mean'] - baseline['top1_mean']:+.2f}"
    over = f"mean over {seeds} seed{'s' if seeds != 1 else ''}"
    if seeds < 2:
        return (
            f"- {track}: projector KD {gain:+.2f} top-1 points against no distillation ({over}{versus_kd}); one seed "
            "measures no seed spread, so this margin is no conclusion."
        )
    spread = seed_spread(projector, baseline)
    if abs(gain) <= spread:
        return (
            f"- {track}: no measurable difference at this scale: projector KD {gain:+.2f} top-1 points against no "
            f"distillation, within the seed spread of {spread:.2f} ({over}{versus_kd})."
        )
    side = "above" if gain > 0 else "below"
    return (
        f"- {track}: projector KD {side} no distillation by {gain:+.2f} top-1 points, more than the seed spread of "
        f"{spread:.2f} ({over}{versus_kd})."
    )


def kernels_sentence(portable: bool, cpu: str) -> str:
    """What the report says of the CPU kernels the runs used, and so of where its figures hold."""
    if portable:
        return (
            f"CPU kernels: portable (ATen's AVX2 build, MKL's COMPATIBLE branch, oneDNN and NNPACK off, one thread per "
            f"run): with this repository's pinned packages these figures repeat bit for bit on the AMD EPYC machines "
            f"checked, each {PORTABLE_CONDITION}; an Intel Xeon gave the same teacher but other figures for half the "
            f"students, by up to about a point; measured on {cpu}."
        )
    return (
        f"CPU kernels: this machine's own ({cpu}), so these figures hold on this machine only: another CPU rounds "
        "differently and gives other figures (the demo's default, the portable kernels, repeats its figures on "
        f"the AMD EPYC machines checked, each {PORTABLE_CONDITION})."
    )


def write_report(
    rows: list[dict],
    out: Path,
    seeds: list[int],
    train_per_class: int,
    wall_time: float,
    holdout: bool = False,
    overrides: Sequence[str] = (),
    jobs: int = 2,
    portable: bool = True,
    cpu: str = "this CPU",
    scored_images: int | None = None,
) -> str:
    table = format_table(rows)
    runs_time = sum(sum(row["wall_time_s"]) for row in rows)
    verdicts = []
    for track in ("ResNet track", "DeiT track"):
        by_method = {row["method"]: row for row in rows if row["track"] == track}
        if "projector" in by_method and "baseline" in by_method:
            verdicts.append(comparison(track, by_method, len(seeds)))
    image_points = (
        f" one of the {scored_images} scored images is {100 / scored_images:.2f} points;" if scored_images else ""
    )
    if verdicts:
        verdicts.append(
            "\nThe seed spread is the larger standard deviation over seeds of the two rows compared;"
            f"{image_points} a margin within the spread is not a conclusion: another seed can reverse it."
        )
    report = "\n".join(
        [
            "# Digits demo report",
            "",
            f"scikit-learn's 8×8 handwritten digits (1,797 images, 10 classes) as a 32 px ImageFolder; teacher on the "
            f"training split less {HOLDOUT_PER_CLASS} held-out images per class, students on {train_per_class} of its "
            f"images per class; seeds {seeds}; {os.cpu_count()} CPU cores. "
            f"The runs took {runs_time:.0f}s of wall time in all ({jobs} at a time); this call took "
            f"{wall_time:.0f}s (finished runs are reused).",
            kernels_sentence(portable, cpu),
            "Runs are scored on the "
            + (
                f"**{HOLDOUT_PER_CLASS} held-out images per class** (`--holdout`: in no training "
                "split, the split the demo's settings were chosen on), not on val"
                if holdout
                else "val split"
            )
            + "; top-1 is the best epoch's checkpoint on the ResNet track (torchdistill's convention) and the last "
            "epoch's on the DeiT track (DeiT's), the last epoch's is beside it.",
            *([f"Overrides: `{'; '.join(overrides)}`."] if overrides else []),
            "",
            table,
            "",
            *verdicts,
            "",
            "![validation top-1 per epoch](curves.png)",
            "",
        ]
    )
    (out / "report.md").write_text(report)
    summary = {"rows": rows, "seeds": seeds, "wall_time_s": wall_time, "kernels": "portable" if portable else "native"}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return table + "\n" + "\n".join(verdicts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--output", type=Path, help="demo folder (default: outputs/demo, with --holdout outputs/demo_holdout)"
    )
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0, 1],
        help="student seeds (default: 0 1; each seed adds about 4 min on 2 cores)",
    )
    parser.add_argument("--tracks", nargs="+", choices=["resnet", "deit"], default=["resnet", "deit"])
    parser.add_argument("--fresh", action="store_true", help="delete the demo folder first and run every stage again")
    parser.add_argument(
        "--train-per-class",
        type=int,
        default=TRAIN_PER_CLASS,
        help="training images per class the students see (teacher: all 1,138) (default: %(default)s)",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=max(1, os.cpu_count() or 1),
        help="runs at a time (the teacher included), each with one thread, or cpu_count/jobs threads with "
        "--native-kernels (default: %(default)s)",
    )
    parser.add_argument(
        "--native-kernels",
        action="store_true",
        help="run with this CPU's own kernels and threads instead of the portable ones: about twice as fast, and "
        f"figures that depend on the CPU (the portable kernels repeat their figures on the AMD EPYC machines "
        f"checked, each {PORTABLE_CONDITION}, though not all on an Intel Xeon)",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=list(METHOD_LABELS),
        default=list(METHOD_LABELS),
        help="student methods to run (default: all three)",
    )
    parser.add_argument(
        "--holdout",
        action="store_true",
        help=f"score every run on the {HOLDOUT_PER_CLASS} held-out images per class (in no training "
        "split) instead of val: the split the demo's settings were chosen on; default output "
        "folder outputs/demo_holdout",
    )
    parser.add_argument(
        "--resnet-opts",
        nargs="+",
        default=[],
        metavar="KEY VALUE",
        help="extra --opts for the ResNet-track students, e.g. "
        "train.criterion.kwargs.sub_terms.projector_kd.criterion.kwargs.feature_weight 2.0",
    )
    parser.add_argument(
        "--deit-opts",
        nargs="+",
        default=[],
        metavar="KEY VALUE",
        help="extra --opts for the DeiT-track students, e.g. distillation.feature_weight 1.0",
    )
    args = parser.parse_args(argv)
    if args.output is None:
        args.output = ROOT / "outputs" / ("demo_holdout" if args.holdout else "demo")

    start = time.time()
    out = args.output.resolve()
    if args.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"[data] digits ImageFolders in {out / 'data'}", flush=True)
    suffix = "_holdout" if args.holdout else ""
    split = dict(
        image_size=IMAGE_SIZE, val_fraction=0.2, seed=0, holdout_per_class=HOLDOUT_PER_CLASS, holdout=args.holdout
    )
    full_data = write_digits_imagefolder(out / "data" / f"digits32{suffix}", **split)
    student_data = write_digits_imagefolder(
        out / "data" / f"digits32_{args.train_per_class}pc{suffix}", train_per_class=args.train_per_class, **split
    )

    teacher = resnet_stage("teacher", None, full_data, out, Path())
    teacher_ckpt = teacher.output / "best.pth"
    stages = [teacher]
    for track in args.tracks:
        for method in args.methods:
            for seed in args.seeds:
                build, opts = (resnet_stage, args.resnet_opts) if track == "resnet" else (deit_stage, args.deit_opts)
                stages.append(build(method, seed, student_data, out, teacher_ckpt, opts))

    cores = os.cpu_count() or 1
    jobs = max(1, min(args.jobs, cores))
    portable = not args.native_kernels and supports_portable_kernels()
    if not args.native_kernels and not portable:
        print(
            f"[kernels] the portable CPU kernels need {PORTABLE_CONDITION}: running with this machine's own, so the "
            "figures will not be the README's",
            flush=True,
        )
    results = run_all(teacher, stages[1:], jobs, threads=max(1, cores // jobs), portable=portable)
    rows = summarise(results)
    wall_time = time.time() - start
    plot_curves(rows, out / "curves.png")
    overrides = [
        f"{track}: {' '.join(opts)}" for track, opts in (("ResNet", args.resnet_opts), ("DeiT", args.deit_opts)) if opts
    ]
    scored = sum(1 for path in (student_data / "val").rglob("*.png"))
    summary = write_report(
        rows,
        out,
        args.seeds,
        args.train_per_class,
        wall_time,
        args.holdout,
        overrides,
        jobs,
        portable=portable,
        cpu=cpu_model(),
        scored_images=scored,
    )
    print("\n" + summary)
    print(f"\nreport: {out / 'report.md'}  plot: {out / 'curves.png'}  total wall time: {wall_time:.0f}s")
    return 0


if __name__ == "__main__":
    run_cli(main)
