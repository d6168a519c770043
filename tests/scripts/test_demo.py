"""The demo orchestrator: both tracks' metrics.json (one schema) read alike, mean ± std over seeds, report and plot
written with margins judged against the seed spread, finished runs reused, stages run with the portable CPU kernels,
a failing stage named in one line."""

import importlib.util
import json
import statistics
import sys
from pathlib import Path

import pytest

from projector_kd.engine import portable
from projector_kd.engine.errors import UserError

REPO = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("demo", REPO / "scripts" / "demo.py")
demo = importlib.util.module_from_spec(spec)
sys.modules["demo"] = demo  # dataclasses resolve their module while the script is being executed
spec.loader.exec_module(demo)


def resnet_metrics(top1, curve):  # the ImageNet track's metrics.json keys
    return {
        "top1": top1,
        "top5": 100.0,
        "val_top1_per_epoch": curve,
        "student": "resnet20",
        "student_params": 272474,
        "wall_time_s": 30.0,
    }


def deit_metrics(top1, curve):  # the DeiT track's metrics.json keys
    return {
        "top1": top1,
        "top5": 100.0,
        "val_top1_per_epoch": curve,
        "student": "demo",
        "student_params": 237236,
        "params": {"student": 237236, "projector": 33280, "total": 270516},
        "wall_time_s": 40.0,
    }


def finished_stage(tmp_path, track, method, seed, metrics, portable_run=True):
    stage = demo.Stage(
        track, method, seed, [sys.executable, "-c", "raise SystemExit(1)"], tmp_path / f"{track}-{method}-{seed}"
    )
    stage.output.mkdir(parents=True)
    stage.metrics_file.write_text(json.dumps(metrics))
    command, _ = demo.launch(stage, threads=1, portable=portable_run)
    (stage.output / demo.COMMAND_STAMP).write_text(json.dumps(command[1:]))
    return stage


def test_summary_report_and_plot_from_both_tracks(tmp_path):
    results = []
    for seed, (a, b) in enumerate([(90.0, 92.0), (94.0, 93.0), (86.0, 97.0)]):
        for method, value in (("baseline", a), ("projector", b)):
            curve = [50.0, value] if method == "projector" else [value, value - 3.0]  # best epoch: last / first
            stage = finished_stage(tmp_path, "ResNet track", method, seed, resnet_metrics(value, curve))
            results.append(
                (stage, demo.run_stage(stage, 1, 1, threads=1, portable=True))
            )  # reused: the command would fail
        stage = finished_stage(tmp_path, "DeiT track", "baseline", seed, deit_metrics(a, [40.0, 60.0, a]))
        results.append((stage, demo.run_stage(stage, 1, 1, threads=1, portable=True)))
    rows = demo.summarise(results)
    by_key = {(row["track"], row["method"]): row for row in rows}
    projector = by_key[("ResNet track", "projector")]
    assert projector["top1_mean"] == pytest.approx(94.0)
    assert projector["top1_std"] == pytest.approx(statistics.stdev([92.0, 93.0, 97.0]))
    assert projector["params"] == 272474 and projector["model"] == "resnet20"
    deit = by_key[("DeiT track", "baseline")]
    assert deit["params"] == 237236 and deit["curves"][0] == [40.0, 60.0, 90.0]

    summary = demo.write_report(rows, tmp_path, [0, 1, 2], 50, wall_time=12.0, cpu="AMD EPYC", scored_images=359)
    demo.plot_curves(rows, tmp_path / "curves.png")
    report = (tmp_path / "report.md").read_text()
    assert "| ResNet track | resnet20 | projector KD (ours) | 94.00 ± 2.65 | 94.00 | 3 | 0.27M | 30s |" in report
    assert "| ResNet track | resnet20 | no distillation | 90.00 ± 4.00 | 87.00 | 3 | 0.27M | 30s |" in report
    assert (
        "- ResNet track: no measurable difference at this scale: projector KD +4.00 top-1 points against no "
        "distillation, within the seed spread of 4.00 (mean over 3 seeds)." in summary
    )
    assert (
        "The seed spread is the larger standard deviation over seeds of the two rows compared; one of the 359 scored "
        "images is 0.28 points; a margin within the spread is not a conclusion: another seed can reverse it." in report
    )
    assert (
        "CPU kernels: portable (ATen's AVX2 build, MKL's COMPATIBLE branch, oneDNN and NNPACK off, one thread per "
        "run): with this repository's pinned packages these figures repeat bit for bit on the AMD EPYC machines "
        "checked, each an x86-64 CPU with AVX2 and FMA under Linux; an Intel Xeon gave the same teacher but other "
        "figures for half the students, by up to about a point; measured on AMD EPYC." in report
    )
    assert "students on 50 of its images per class" in report and "less 30 held-out images per class" in report
    assert "The runs took 300s of wall time in all (2 at a time)" in report
    assert "Runs are scored on the val split" in report
    assert "best epoch's checkpoint on the ResNet track" in report and "last epoch's on the DeiT track" in report
    assert "logit KD alone" not in summary  # no logit-KD rows in this set
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "summary.json").read_text())["seeds"] == [0, 1, 2]


def test_failing_stage_names_itself_and_its_log(tmp_path):
    stage = demo.Stage(
        "ResNet track", "kd", 0, [sys.executable, "-c", "print('boom'); raise SystemExit(2)"], tmp_path / "kd"
    )
    with pytest.raises(
        UserError,
        match=r"demo stage 'ResNet track: logit KD only, seed 0' failed \(exit 2\); "
        r"full output in .*kd/console.txt",
    ):
        demo.run_stage(stage, 3, 19, threads=1, portable=False)
    assert "boom" in (tmp_path / "kd" / "console.txt").read_text()


def test_stage_commands_use_the_real_entry_points_and_demo_configs(tmp_path):
    teacher = demo.resnet_stage("teacher", None, tmp_path / "full", tmp_path, Path())
    assert teacher.command[1].endswith("imagenet/image_classification.py")
    assert "--teacher_ckpt" not in teacher.command and teacher.command[-2:] == ["--seed", "0"]
    student = demo.deit_stage("projector", 2, tmp_path / "small", tmp_path, tmp_path / "best.pth")
    assert student.command[1].endswith("deit/main.py")
    assert str(REPO / "configs" / "demo" / "deit_projector.yaml") in student.command
    assert student.command[-3:] == ["--opts", "seed", "2"]
    for method in ("teacher", "baseline", "kd", "projector"):
        assert (REPO / "configs" / "demo" / f"resnet_{method}.yaml").is_file()
    extra = ["train.num_epochs", "3"]
    resnet = demo.resnet_stage("kd", 1, tmp_path, tmp_path, tmp_path / "best.pth", extra)
    assert resnet.command[-3:] == ["--opts", *extra]
    assert demo.deit_stage("kd", 1, tmp_path, tmp_path, tmp_path / "best.pth", extra).command[-5:] == [
        "--opts",
        "seed",
        "1",
        *extra,
    ]


def test_a_finished_run_with_other_settings_is_not_reused(tmp_path):
    stage = finished_stage(tmp_path, "DeiT track", "kd", 0, deit_metrics(90.0, [90.0]))
    stage.command.append("--other-setting")
    with pytest.raises(
        UserError,
        match=r"kd-0 holds a finished run with other settings than this call's; "
        r"rerun with --fresh, or pick another --output",
    ):
        demo.run_stage(stage, 1, 1, threads=1, portable=True)


def test_holdout_report_says_what_it_scored_on(tmp_path):
    results = [
        (finished_stage(tmp_path, "DeiT track", method, 0, deit_metrics(value, [value])), None)
        for method, value in (("baseline", 90.0), ("kd", 91.0), ("projector", 92.5))
    ]
    rows = demo.summarise([(stage, json.loads(stage.metrics_file.read_text())) for stage, _ in results])
    summary = demo.write_report(
        rows, tmp_path, [0], 50, wall_time=1.0, holdout=True, overrides=["DeiT: distillation.feature_weight 0.5"]
    )
    report = (tmp_path / "report.md").read_text()
    assert "scored on the **30 held-out images per class**" in report
    assert "Overrides: `DeiT: distillation.feature_weight 0.5`." in report
    assert (
        "- DeiT track: projector KD +2.50 top-1 points against no distillation (mean over 1 seed; logit KD alone: "
        "+1.00); one seed measures no seed spread, so this margin is no conclusion." in summary
    )


def test_a_margin_beyond_the_seed_spread_is_reported_with_its_sign(tmp_path):
    results = [
        (stage, json.loads(stage.metrics_file.read_text()))
        for stage in (
            finished_stage(tmp_path, "ResNet track", method, seed, resnet_metrics(value, [value]))
            for method, values in (("baseline", (92.0, 92.5)), ("projector", (90.0, 91.0)))
            for seed, value in enumerate(values)
        )
    ]
    summary = demo.write_report(demo.summarise(results), tmp_path, [0, 1], 20, wall_time=1.0, portable=False)
    assert (
        "- ResNet track: projector KD below no distillation by -1.75 top-1 points, more than the seed spread of 0.71 "
        "(mean over 2 seeds)." in summary
    )
    assert (
        "CPU kernels: this machine's own (this CPU), so these figures hold on this machine only"
        in (tmp_path / "report.md").read_text()
    )
    assert json.loads((tmp_path / "summary.json").read_text())["kernels"] == "native"


PROBE = """
import json, os, sys, torch
from pathlib import Path
seen = {
    "capability": torch.backends.cpu.get_cpu_capability(),
    "onednn": torch.backends.mkldnn.enabled,
    "threads": torch.get_num_threads(),
    "mkl_cbwr": os.environ.get("MKL_CBWR"),
    "argv": sys.argv[1:],
}
Path(sys.argv[1], "metrics.json").write_text(json.dumps({"top1": 1.0, **seen}))
"""


def test_stages_run_with_the_portable_kernels_unless_asked_not_to(tmp_path, monkeypatch):
    for name in ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "OMP_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    stage = demo.Stage("ResNet track", "kd", 0, [sys.executable, str(script), str(tmp_path), "x"], tmp_path)
    command, env = demo.launch(stage, threads=2, portable=False)
    assert command == stage.command and env["OMP_NUM_THREADS"] == "2"
    assert "MKL_CBWR" not in env and "ATEN_CPU_CAPABILITY" not in env
    if portable.supports_portable_kernels():
        assert demo.run_stage(stage, 1, 1, threads=2, portable=True) == {
            "top1": 1.0,
            "capability": "AVX2",
            "onednn": False,
            "threads": 1,
            "mkl_cbwr": "COMPATIBLE",
            "argv": [str(tmp_path), "x"],
        }
    else:
        (tmp_path / "metrics.json").write_text(json.dumps({"top1": 1.0}))
        portable_command, _ = demo.launch(stage, threads=2, portable=True)
        (tmp_path / demo.COMMAND_STAMP).write_text(json.dumps(portable_command[1:]))
    with pytest.raises(UserError, match="holds a finished run with other settings than this call's"):
        demo.run_stage(stage, 1, 1, threads=2, portable=False)  # a finished portable run is not reused as native


def test_baselines_run_beside_the_teacher_and_distilled_students_after_it(monkeypatch, tmp_path):
    import threading
    import time

    events, lock = [], threading.Lock()

    def fake_run_stage(stage, index, total, threads, portable):
        with lock:
            events.append(("start", stage.title, threads))
        time.sleep(0.3 if stage.method == "teacher" else 0.05)
        with lock:
            events.append(("end", stage.title, threads))
        return {"top1": float(index)}

    monkeypatch.setattr(demo, "run_stage", fake_run_stage)
    teacher = demo.Stage("teacher", "teacher", None, [], tmp_path / "teacher")
    students = [
        demo.Stage(track, method, seed, [], tmp_path / f"{track}{method}{seed}")
        for track in ("ResNet track", "DeiT track")
        for method in ("baseline", "kd", "projector")
        for seed in (0, 1)
    ]
    results = demo.run_all(teacher, students, jobs=2, threads=1, portable=True)
    assert [stage for stage, _ in results] == [teacher, *students]
    assert [metrics["top1"] for _, metrics in results] == [1.0, *range(2, 14)]
    order = [title for kind, title, _ in events if kind == "start"]
    teacher_end = events.index(("end", teacher.title, 1))
    starts = {title: position for position, (kind, title, _) in enumerate(events) if kind == "start"}
    assert order[1] == "DeiT track: no distillation, seed 0"  # beside the teacher, slower track first
    assert starts[order[1]] < teacher_end
    assert all(starts[s.title] > teacher_end for s in students if s.method != "baseline")
    assert all(threads == 1 for _, _, threads in events)


def test_a_failing_teacher_cancels_the_stages_not_started(monkeypatch, tmp_path):
    started = []

    def fake_run_stage(stage, index, total, threads, portable):
        started.append(stage.method)
        if stage.method == "teacher":
            raise UserError("teacher failed")
        return {"top1": 1.0}

    monkeypatch.setattr(demo, "run_stage", fake_run_stage)
    teacher = demo.Stage("teacher", "teacher", None, [], tmp_path / "teacher")
    students = [
        demo.Stage("DeiT track", method, seed, [], tmp_path / f"{method}{seed}")
        for method in ("baseline", "kd")
        for seed in range(20)
    ]
    with pytest.raises(UserError, match="teacher failed"):
        demo.run_all(teacher, students, jobs=1, threads=2, portable=True)
    assert started[0] == "teacher" and len(started) <= 2  # a free worker may take one stage before the cancel
    assert "kd" not in started  # distilled students never start without their teacher
