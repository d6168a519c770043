"""Portable CPU kernels: a few training steps of a tiny demo-like student (conv stem, attention, layer norm, GELU,
AdamW, weights initialised by the run) computed with two different kernel choices — ATen's default build and oneDNN
capped at SSE4.1, as on an older CPU, against this CPU's own — differ bit for bit with the native kernels and agree
with the portable ones."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from projector_kd.engine import portable

REPO = Path(__file__).resolve().parents[2]

STUDENT = """
import hashlib, torch
from torch import nn
torch.manual_seed(0)
model = nn.Sequential(
    nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1),
    nn.Flatten(2),
)
attention = nn.TransformerEncoderLayer(32, 2, 64, dropout=0.0, activation="gelu", batch_first=True)
head = nn.Linear(32, 10)
parameters = [*model.parameters(), *attention.parameters(), *head.parameters()]
optimizer = torch.optim.AdamW(parameters, lr=1e-2)
images, labels = torch.randn(16, 3, 16, 16), torch.randint(0, 10, (16,))
losses = []
for _ in range(3):
    tokens = model(images).transpose(1, 2)
    loss = nn.functional.cross_entropy(head(attention(tokens).mean(1)), labels)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    losses.append(loss.item())
digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in parameters)).hexdigest()
print(digest, *map(repr, losses))
"""

KERNEL_VARIABLES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS")
THIS_CPU: dict[str, str] = {}
OLDER_CPU = {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"}


def train(script: Path, kernels: dict[str, str], portable_run: bool) -> str:
    """The student's final weights' digest and its losses, trained in a child process."""
    base = {key: value for key, value in os.environ.items() if key not in KERNEL_VARIABLES}
    env = {**base, **kernels, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, str(script)]
    if portable_run:
        env = portable.portable_environment(env)
        command = [sys.executable, "-m", "projector_kd.engine.portable", str(script)]
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip()


@pytest.mark.skipif(not portable.supports_portable_kernels(), reason=f"needs {portable.PORTABLE_CONDITION}")
def test_portable_kernels_give_the_same_bits_where_native_kernels_differ(tmp_path):
    script = tmp_path / "student.py"
    script.write_text(STUDENT)
    runs = [(THIS_CPU, False), (OLDER_CPU, False), (THIS_CPU, True), (OLDER_CPU, True)]
    with ThreadPoolExecutor(max_workers=len(runs)) as pool:
        native_here, native_older, portable_here, portable_older = pool.map(lambda run: train(script, *run), runs)
    assert native_here != native_older  # the kernel choice changes the run: what differs between machines
    assert portable_here == portable_older
    assert portable_here != native_here  # the portable run computes with other kernels than this CPU's own


def test_cpu_flags_and_the_condition(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx fma avx2\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    assert portable.cpu_flags(cpuinfo) == {"fpu", "sse2", "avx", "fma", "avx2"}
    assert portable.cpu_flags(tmp_path / "missing") == set()
    old = tmp_path / "old"
    old.write_text("flags\t\t: fpu sse2 sse4_1 avx\n")
    assert not portable.supports_portable_kernels(old)


def test_a_run_without_the_environment_or_on_another_cpu_is_refused_in_one_line(
    tmp_path, monkeypatch, run_main, one_error_line
):
    script = tmp_path / "run.py"
    script.write_text("print('ran')\n")
    for name in portable.PORTABLE_ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MKL_CBWR", "AUTO")
    monkeypatch.setattr(portable, "supports_portable_kernels", lambda: True)
    result = run_main(portable.main, [script])
    assert one_error_line(result) == (
        "error: portable CPU kernels need the environment set before Python starts; set ATEN_CPU_CAPABILITY=avx2 "
        "MKL_CBWR=COMPATIBLE MKL_DYNAMIC=FALSE OMP_DYNAMIC=FALSE OMP_NUM_THREADS=1 MKL_NUM_THREADS=1"
    )
    monkeypatch.setattr(portable, "supports_portable_kernels", lambda: False)
    assert one_error_line(run_main(portable.main, [script])).startswith(
        "error: portable CPU kernels need an x86-64 CPU with AVX2 and FMA under Linux; this machine is "
    )
    assert one_error_line(run_main(portable.main, [tmp_path / "missing.py"])) == (
        f"error: {tmp_path / 'missing.py'} is not a file: name the entry point to run, e.g. deit/main.py"
    )
    assert "ran" not in result.stdout
