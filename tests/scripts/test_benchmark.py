"""``scripts/benchmark.py``: the CPU smoke run (``--tiny``, a few tens of seconds) and the measuring pieces it is built
from."""

from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn
from torchvision.models import resnet18, resnet34

from projector_kd.engine.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
SMOKE_SECONDS = 240  # about 40 s on an idle 2-core machine; generous for a loaded one


def forward_flops(model: nn.Module, image_size: int) -> int:
    """Multiply-add FLOPs (2 per MAC) of the convolutions and linear layers of one forward of one image, from layer
    shapes alone (an independent count to check FlopCounterMode's numbers against)."""
    total = 0

    def conv_hook(module: nn.Conv2d, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        kernel = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
        total += 2 * kernel * output[0].numel()

    def linear_hook(module: nn.Linear, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        total += 2 * module.in_features * module.out_features

    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            module.register_forward_hook(conv_hook)
        elif isinstance(module, nn.Linear):
            module.register_forward_hook(linear_hook)
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, image_size, image_size))
    return total


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path_factory.mktemp("benchmark") / "tiny.json"
    process = subprocess.run(
        [sys.executable, "scripts/benchmark.py", "--tiny", "--no-compile", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=SMOKE_SECONDS,
    )
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
    return process, json.loads(out.read_text())


def test_smoke_run_reports_every_case_and_says_cpu_figures_are_no_claims(bench, smoke):
    process, report = smoke
    assert bench.CLAIM_NOTE in process.stdout and report["note"] == bench.CLAIM_NOTE and report["claims"] is False
    assert report["environment"]["torch_compile"] is False and report["environment"]["versions"]["torch"]
    cases = [(row["track"], row["case"]) for row in report["rows"]]
    assert cases == [(t, c) for t in ("deit", "resnet") for c in ("release", "fast", "teacher")]
    peak = report["matmul_peak_tflops"] * 1e12
    assert peak > 0
    by_case = {(row["track"], row["case"]): row for row in report["rows"]}
    for row in report["rows"]:
        assert row["batch_size"] == 8 and row["peak_memory_mib"] is None  # no CUDA: no peak-memory figure
        assert row["host_ms"] is None  # on the CPU issuing a step is computing it
        assert row["img_per_s"] == pytest.approx(8 / (row["step_ms_mean"] / 1e3), rel=1e-12)
        assert row["mfu"] == pytest.approx(row["gflops_per_img"] * 1e9 * row["img_per_s"] / peak, rel=1e-12)
        if row["case"] != "release":
            release = by_case[(row["track"], "release")]
            assert row["vs_release"] == pytest.approx(row["img_per_s"] / release["img_per_s"], rel=1e-12)
        else:
            assert row["vs_release"] is None
    assert report["settings"]["steps"] == 2 and report["settings"]["warmup"] == 1 and report["complete"] is True


def test_smoke_run_counts_model_flops_exactly(bench, smoke):
    """ResNet rows at 32 px: the teacher floor is one ResNet34 forward; a training step is the teacher forward plus
    ResNet18 forward and backward (2x forward, less the first conv's unneeded input gradient) plus the projector."""
    _, report = smoke
    rows = {(row["track"], row["case"]): row for row in report["rows"]}
    size = bench.TINY.resnet_img_size
    teacher = forward_flops(resnet34(num_classes=10), size)
    student = forward_flops(resnet18(num_classes=10), size)
    first_conv = 2 * 7 * 7 * 3 * 64 * (size // 2) ** 2
    projector = 2 * 512 * 512
    assert rows[("resnet", "teacher")]["gflops_per_img"] * 1e9 == pytest.approx(teacher, rel=1e-9)
    step = teacher + 3 * student - first_conv + 3 * projector
    assert rows[("resnet", "release")]["gflops_per_img"] * 1e9 == pytest.approx(step, rel=1e-9)
    assert rows[("resnet", "fast")]["gflops_per_img"] == rows[("resnet", "release")]["gflops_per_img"]


def test_smoke_run_parity_and_data_sections(smoke):
    process, report = smoke
    assert set(report["parity"]) == {"deit", "resnet"}
    for track, result in report["parity"].items():
        assert result["ok"] and result["math"]["ok"] and result["precision"]["ok"], (track, result)
        assert f"parity {track}: ok" in process.stdout
    assert report["parity"]["deit"]["fast_dtype"] == "float32"
    assert report["parity"]["resnet"]["fast_dtype"] == "bfloat16"
    for track in ("deit", "resnet"):
        data = report["data"][track]
        rates = data["transform"]
        for key in ("decode", "recipe", "fast"):
            assert rates[f"{key}_img_per_s_per_core"] > 0
        assert rates["fast_vs_recipe"] == pytest.approx(
            rates["fast_img_per_s_per_core"] / rates["recipe_img_per_s_per_core"]
        )
        assert rates["images"] == 30 and rates["files"]["photos"] == ["china.jpg", "flower.jpg"]
        assert [entry["workers"] for entry in data["loader"]] == [2]
        assert data["loader"][0]["recipe_img_per_s"] > 0 and data["loader"][0]["fast_img_per_s"] > 0
        assert f"data {track}: loader ceiling with 2 workers: recipe " in process.stdout
        assert f"fast CPU loader {rates['fast_img_per_s_per_core']:.1f}" in process.stdout
    end_to_end = report["data"]["deit"]["end_to_end"]
    assert end_to_end["workers"] == 2 and end_to_end["recipe_img_per_s"] > 0 and end_to_end["fast_img_per_s"] > 0
    assert "end_to_end" not in report["data"]["resnet"]
    assert set(report["seconds_per_phase"]) == {
        f"{track}{phase}" for track in ("deit", "resnet") for phase in ("", "_data", "_parity")
    }


def test_data_only_times_the_data_section_alone_and_its_per_core_rates(bench, tmp_path):
    """``--data-only``: no models, no parity; per track the three per-core rates and both loaders' ceilings."""
    out = tmp_path / "data.json"
    process = subprocess.run(
        [sys.executable, "scripts/benchmark.py", "--tiny", "--data-only", "--only", "resnet", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=SMOKE_SECONDS,
    )
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["rows"] == [] and report["parity"] == {} and report["matmul_peak_tflops"] is None
    assert set(report["data"]) == {"resnet"} and report["settings"]["data_only"] is True
    rates = report["data"]["resnet"]["transform"]
    assert {"decode_img_per_s_per_core", "recipe_img_per_s_per_core", "fast_img_per_s_per_core"} <= set(rates)
    assert "end_to_end_loaders" not in report["data"]["resnet"] and "bf16 matmul peak" not in process.stdout
    assert "data resnet: ResNet (RandomResizedCrop + flip) train transform per core" in process.stdout


def test_per_core_rates_count_this_process_cpu_time_with_the_cases_interleaved(bench, monkeypatch):
    clock, calls = iter(range(1000)), []
    monkeypatch.setattr(bench.time, "process_time", lambda: float(next(clock)))
    rates = bench.time_per_core(
        {"a": lambda path: calls.append(("a", path)), "b": lambda path: calls.append(("b", path))}, ["x", "y"], 6
    )
    assert rates == {"a": 6 / 3, "b": 6 / 3}  # each round of 2 images reads the clock twice: 1 s per round
    timed = [case for case, _ in calls[4:]]  # after 2 warm-up calls per case
    assert timed == ["a", "a", "b", "b"] * 3
    assert [path for _, path in calls[4:6]] == ["x", "y"]


def test_without_dali_the_dali_row_says_so_and_the_rest_runs(bench, monkeypatch):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    timed = []
    monkeypatch.setattr(
        bench, "time_loader", lambda loader, batches, device, step, workers: timed.append((loader, workers)) or 50.0
    )
    args = bench.parse_args(["--tiny", "--no-compile"])
    result = bench.bench_resnet_loaders(bench.TINY, args, torch.device("cpu"), 25.0)
    assert (
        len(timed) == 2
        and [workers for _, workers in timed] == [2, 2]
        and result["rows"]
        == [
            {
                "loader": "torchvision",
                "decoding": "PIL, 2 worker processes",
                "img_per_s": 50.0,
                "vs_step_only": 2.0,
                "note": None,
            },
            {
                "loader": "fast",
                "decoding": "PIL crop window, 2 worker processes",
                "img_per_s": 50.0,
                "vs_step_only": 2.0,
                "note": None,
            },
            {"loader": "dali", "decoding": None, "img_per_s": None, "vs_step_only": None, "note": "DALI not installed"},
        ]
    )
    assert bench.format_resnet_loaders(result).splitlines()[2] == (
        "end-to-end resnet: dali loader (-) feeding the fast step: DALI not installed"
    )


def test_row_table_is_release_fast_teacher_per_track_with_each_module_builders(bench):
    """One row per track and case, each built by a builder of its track's module, compared to the release row."""
    assert [(c.track, c.case) for c in bench.CASES] == [
        (t, c) for t in bench.TRACKS for c in ("release", "fast", "teacher")
    ]
    for case in bench.CASES:
        module = importlib.import_module(bench.TRACK_MODULES[case.track])
        assert callable(getattr(module, case.builder)) and callable(module.parity_pair)
        assert case.compared_to == (None if case.case == "release" else "release")
        assert "{" not in case.description.format(s=bench.FULL)


def test_time_steps_warms_up_then_times_each_step(bench):
    calls = []
    times = bench.time_steps(lambda: calls.append(1), steps=4, warmup=3, device=torch.device("cpu"))
    assert len(calls) == 7 and len(times) == 4 and all(t >= 0 for t in times)


def test_host_issue_time_is_the_median_of_steps_started_on_an_idle_device(bench, monkeypatch):
    """On CUDA each measured step starts after a synchronisation and is timed on the host alone (no sync after it)."""
    events, clock = [], iter(range(100))
    monkeypatch.setattr(bench, "synchronize", lambda device: events.append("sync"))
    monkeypatch.setattr(bench.time, "perf_counter", lambda: next(clock) / 1e3 * 2)  # every reading 2 ms later

    def step() -> None:
        events.append("step")
        for _ in range(len(events) % 3):  # steps of 2, 4 or 6 ms of host time
            next(clock)

    host_ms = bench.host_issue_ms(step, torch.device("cuda"), steps=5)
    assert events == ["sync", "step"] * 5 + ["sync"]
    assert host_ms == pytest.approx(4.0)  # median of 6, 4, 2, 6, 4 ms
    assert bench.host_issue_ms(step, torch.device("cpu")) is None


def test_count_flops_forward_and_backward_of_a_linear_layer(bench):
    layer = nn.Linear(4, 3, bias=False)
    x = torch.randn(2, 4, requires_grad=True)
    assert bench.count_flops(lambda: layer(x)) == 2 * 2 * 4 * 3
    # backward: input gradient and weight gradient, each as many FLOPs as the forward
    assert bench.count_flops(lambda: layer(x).sum().backward()) == 3 * 2 * 2 * 4 * 3


def test_matmul_peak_is_a_positive_rate(bench):
    peak = bench.matmul_peak_flops(torch.device("cpu"), size=64, repeats=2)
    assert math.isfinite(peak) and peak > 0


def test_synthetic_jpeg_imagefolder(bench, tmp_path):
    sizes = bench.TINY
    unique = bench.write_jpeg_imagefolder(tmp_path, sizes, batches=3, batch_size=8)
    assert len(unique) == sizes.unique_jpegs
    train = sorted((tmp_path / "train").rglob("*.jpg"))
    assert len(train) == 10 * math.ceil(3 * 8 / 10) and len(list((tmp_path / "val").rglob("*.jpg"))) == 10
    assert {p.stat().st_ino for p in train} <= {p.stat().st_ino for p in unique}  # hard links, no copies
    for index, path in enumerate(unique):
        with Image.open(path) as image:
            assert image.format == "JPEG" and image.mode == "RGB"
            assert image.size == sizes.jpeg_sizes[index % len(sizes.jpeg_sizes)]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--tiny", "--batch-size", "3"], "--batch-size must be even and >= 2"),
        (["--tiny", "--steps", "0"], "--steps must be >= 1"),
        (["--tiny", "--json", "/nonexistent-folder/out.json"], "folder /nonexistent-folder does not exist"),
    ],
)
def test_bad_arguments_are_user_errors(bench, argv, message):
    with pytest.raises(UserError, match=message):
        bench.main(argv)


def test_bad_argument_is_one_line_and_exit_code_2():
    process = subprocess.run(
        [sys.executable, "scripts/benchmark.py", "--tiny", "--batch-size", "5"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert process.returncode == 2
    assert process.stderr.strip().splitlines() == [
        "error: --batch-size must be even and >= 2 (batch whitening and mixup), got 5"
    ]


def test_gpu_script_without_cuda_stops_with_one_line(tmp_path):
    """scripts/gpu_check.sh checks its environment first and names what is missing (here: CUDA)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "OUT")}
    env.update(OUT=str(tmp_path), CUDA_VISIBLE_DEVICES="")
    process = subprocess.run(
        ["bash", "scripts/gpu_check.sh"], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env
    )
    assert process.returncode == 2
    assert process.stderr.strip().splitlines()[-1] == (
        "error: CUDA not available: the GPU check needs CUDA, torch, torchvision, timm, torchdistill"
    )
    environment = (tmp_path / "environment.txt").read_text()
    assert f"torch {torch.__version__}" in environment and not (tmp_path / "benchmark.json").exists()
    assert "\nnvidia.dali 2.4.0 " in environment  # the optional loader's version is on record too
    assert not (tmp_path / "gpu_tests.log").exists()
