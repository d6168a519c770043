"""Fixtures for the tests of ``scripts/``: the benchmark script imported as a module, the export script run in this
process."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCHMARK = ROOT / "scripts" / "benchmark.py"
EXPORT = ROOT / "scripts" / "export.py"


def load_script(path: Path, name: str) -> ModuleType:
    """Import a script file as module ``name`` (registered in ``sys.modules`` so its dataclasses resolve)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def bench() -> ModuleType:
    return load_script(BENCHMARK, "benchmark_script")


@pytest.fixture
def export_cli(run_main):
    """``scripts/export.py``'s ``main`` in this process through ``run_cli`` (what it runs) -> CompletedProcess."""
    script = load_script(EXPORT, "export_script")
    return lambda *args: run_main(script.main, args)
