"""Portable CPU kernels: a float32 CPU run with every kernel choice PyTorch lets one fix, fixed, across x86-64 CPUs.

PyTorch picks its CPU kernels by the processor it runs on, and each choice rounds differently:

- ATen's vectorised kernels (elementwise ops, reductions, softmax, normalisation, attention, and the random fills that
  initialise weights) dispatch by instruction set (``default``/``avx2``/``avx512``); ``ATEN_CPU_CAPABILITY=avx2``
  runs the AVX2 build on every CPU that has AVX2 and FMA, AVX-512 ones included.
- MKL's BLAS (every matrix product, and the convolutions below) and its vector math, which ATen calls for some
  unary functions (``erfinv``: the truncated normal that initialises weights), dispatch by instruction set and vendor;
  ``MKL_CBWR=COMPATIBLE`` is its one code branch documented to give the same results on Intel and non-Intel CPUs
  (conditional numerical reproducibility, with a fixed number of threads and ``MKL_DYNAMIC=FALSE``).
- oneDNN (convolutions) and NNPACK (convolutions of batches of 16 or more) choose kernels and their blocking by
  instruction set and cache sizes and have no such mode: both are switched off, so convolutions run as ATen's
  im2col + MKL matrix products.
- One thread: ATen's parallel reductions and MKL's blocking depend on the thread count.

Checked: the demo's runs give the same bits on AMD EPYC machines; an Intel Xeon (AVX-512) gives the same teacher and
other bits for some students (docs/demo.md, Figures across machines).

``python -m projector_kd.engine.portable SCRIPT ARGS...`` runs an entry point so, under the environment of
:func:`portable_environment` (which must reach the process before it starts: the libraries read it once, at load).
"""

from __future__ import annotations

import os
import platform
import runpy
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from .cli import run_cli
from .errors import UserError

PORTABLE_ENVIRONMENT = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_CBWR": "COMPATIBLE",
    "MKL_DYNAMIC": "FALSE",
    "OMP_DYNAMIC": "FALSE",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}
REQUIRED_CPU_FLAGS = ("avx2", "fma")
PORTABLE_CONDITION = "an x86-64 CPU with AVX2 and FMA under Linux"


def _cpuinfo_field(field: str, cpuinfo: str | os.PathLike) -> str | None:
    """The value of ``field`` for the first processor listed in ``cpuinfo`` (Linux); None when absent or unreadable."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == field:
            return value.strip()
    return None


def cpu_flags(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> set[str]:
    """The instruction-set flags of the first processor listed in ``cpuinfo`` (Linux); empty when unreadable."""
    return set((_cpuinfo_field("flags", cpuinfo) or "").split())


def cpu_model(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> str:
    """The CPU's model name (``cpuinfo``'s, else the platform's)."""
    return _cpuinfo_field("model name", cpuinfo) or platform.processor() or platform.machine() or "unknown CPU"


def supports_portable_kernels(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> bool:
    """True on an x86-64 Linux machine whose CPU has AVX2 and FMA: where the portable kernels run."""
    machine = platform.machine().lower()
    return machine in ("x86_64", "amd64") and set(REQUIRED_CPU_FLAGS) <= cpu_flags(cpuinfo)


def portable_environment(base: Mapping[str, str]) -> dict[str, str]:
    """``base`` with :data:`PORTABLE_ENVIRONMENT` over it: the environment of a portable run's process."""
    return {**base, **PORTABLE_ENVIRONMENT}


def use_portable_kernels() -> None:
    """In this process: oneDNN and NNPACK off, one thread. Raises :class:`UserError` when the process did not start
    with :data:`PORTABLE_ENVIRONMENT` or its CPU cannot run the AVX2 kernels."""
    import torch

    if not supports_portable_kernels():
        raise UserError(f"portable CPU kernels need {PORTABLE_CONDITION}; this machine is {platform.machine()}")
    wrong = {
        name: os.environ.get(name) for name, value in PORTABLE_ENVIRONMENT.items() if os.environ.get(name) != value
    }
    if wrong:
        raise UserError(
            "portable CPU kernels need the environment set before Python starts; set "
            + " ".join(f"{name}={PORTABLE_ENVIRONMENT[name]}" for name in wrong)
        )
    if torch.backends.cpu.get_cpu_capability() != "AVX2":
        raise UserError(
            f"ATen runs its {torch.backends.cpu.get_cpu_capability()} kernels despite ATEN_CPU_CAPABILITY=avx2"
        )
    torch.backends.mkldnn.enabled = False
    torch.backends.nnpack.set_flags(False)
    torch.set_num_threads(1)


def main(argv: Sequence[str] | None = None) -> int:
    """``SCRIPT ARGS...``: run ``SCRIPT`` as ``python SCRIPT ARGS...`` would, with the portable kernels."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        raise UserError("usage: python -m projector_kd.engine.portable SCRIPT [ARGS...]")
    script = Path(argv[0]).resolve()
    if not script.is_file():
        raise UserError(f"{argv[0]} is not a file: name the entry point to run, e.g. deit/main.py")
    use_portable_kernels()
    sys.argv = [str(script), *argv[1:]]
    sys.path[0] = str(script.parent)
    runpy.run_path(str(script), run_name="__main__")
    return 0


if __name__ == "__main__":
    run_cli(main)
