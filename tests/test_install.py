"""What ``pip install <repo>`` gives a user, checked apart from the checkout.

Proves: (1) a non-editable install (a wheel built from the package sources alone: setup.cfg, pyproject.toml, README.md,
projector_kd/, deit/, imagenet/, configs/deit/) holds everything both tracks need at run time, the DeiT recipes
included; (2) every distribution that installed code imports is declared in ``install_requires`` and nothing else is;
(3) a tiny training run of each track, started from a folder outside the checkout with only the installed copy on the
path, trains, evaluates and writes its metrics. Dependencies come from the running environment (``--no-deps``), so the
check needs no network and takes seconds; (2) is what stands in for installing them from the index.
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tracks
from resnet_recipe import tiny_recipe

pytestmark = pytest.mark.install
REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("projector_kd", "deit", "imagenet")
SOURCES = ("setup.cfg", "pyproject.toml", "README.md", *PACKAGES, "configs/deit")
# distributions imported through another package's module rather than by their own name
INDIRECT = {"torch.utils.tensorboard": "tensorboard"}
# namespace packages shared by many distributions: the module path names the distribution (an optional extra here)
NAMESPACED = {"nvidia.dali": "nvidia-dali-cuda130"}


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The project installed (non-editable, no dependencies) into a fresh folder; returns that folder."""
    root = tmp_path_factory.mktemp("install")
    source = root / "source"
    for item in SOURCES:
        origin = REPO / item
        if origin.is_dir():
            shutil.copytree(origin, source / item, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            (source / item).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(origin, source / item)
    target = root / "site"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--quiet",
            "--target",
            str(target),
            str(source),
        ],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return target


@pytest.fixture
def outside(installed, tmp_path, child_env) -> tuple[dict[str, str], Path]:
    """(environment, working folder) for a child process that sees the installed copy and not the checkout."""
    env = {**child_env, "PYTHONPATH": str(installed)}
    work = tmp_path / "elsewhere"
    work.mkdir()
    return env, work


def _imported_distributions(site: Path) -> set[str]:
    """Canonical names of the distributions that the installed packages import (anywhere in their code)."""
    modules: set[str] = set()
    for package in PACKAGES:
        for path in (site / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    modules.update(alias.name for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    modules.add(node.module)
    owners = importlib.metadata.packages_distributions()
    needed = set()
    for module in modules:
        top = module.split(".")[0]
        if top in sys.stdlib_module_names or top in PACKAGES:
            continue
        namespaced = [d for prefix, d in NAMESPACED.items() if module == prefix or module.startswith(prefix + ".")]
        if namespaced:
            needed.update(namespaced)
            continue
        assert top in owners, f"the installed code imports {top!r}, which no installed distribution provides"
        needed.update(_canonical(d) for d in owners[top])
        needed.update(_canonical(d) for prefix, d in INDIRECT.items() if module.startswith(prefix))
    return needed


def test_install_requires_declares_exactly_what_the_code_imports(installed):
    metadata = next(installed.glob("projector_kd-*.dist-info")) / "METADATA"
    declared = {
        _canonical(re.split(r"[\s<>=!~;\[]", line.split(":", 1)[1].strip())[0])
        for line in metadata.read_text().splitlines()
        if line.startswith("Requires-Dist:")
    }
    imported = _imported_distributions(installed)
    assert {"torch", "timm", "torchdistill", "pillow", "pyyaml", "tensorboard", "scikit-learn"} <= imported
    assert imported == declared
    assert sorted(p.name for p in (installed / "deit" / "recipes").glob("*.yaml")) == [
        "demo.yaml",
        "small.yaml",
        "tiny.yaml",
    ]


def test_installed_copy_runs_both_tracks_from_outside_the_checkout(installed, outside, tmp_path, run_python):
    env, work = outside
    probe = run_python(
        "-c",
        "import deit, deit.config, imagenet, projector_kd, sys; print(deit.__file__); "
        "print(deit.config.CONFIG_DIR); print(imagenet.__file__); print(projector_kd.__file__); "
        "print(chr(0).join(sys.path))",
        cwd=work,
        env=env,
        timeout=120,
    )
    assert probe.returncode == 0, probe.stderr[-2000:]
    deit_file, recipes, imagenet_file, package_file, path = probe.stdout.splitlines()
    for location in (deit_file, recipes, imagenet_file, package_file):
        assert Path(location).is_relative_to(installed), location
    assert REPO.resolve() not in {Path(entry or work).resolve() for entry in path.split("\0")}, path

    data = tracks.write_deit_images(tmp_path / "deit-data")
    teacher = tracks.save_deit_teacher(tmp_path / "teacher.pth")
    overlay = tracks.write_deit_config(tmp_path / "tiny.yaml")
    run = work / "deit-run"
    result = run_python(
        "-m",
        "deit.main",
        "--model",
        "demo",
        "--train_student",
        "--config",
        overlay,
        "--data-path",
        data,
        "--output",
        run,
        "--teacher-ckpt",
        teacher,
        "--device",
        "cpu",
        "--epochs",
        "1",
        cwd=work,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["epochs"] == 1 and len(metrics["val_top1_per_epoch"]) == 1
    assert metrics["params"]["projector"] == 16 * 512 + 512  # Linear(16, resnet10t's 512)
    assert (run / "checkpoint.pth").is_file() and list((run / "tensorboard").iterdir())

    resnet_data = tracks.write_resnet_images(tmp_path / "resnet-data")
    resnet_teacher = tracks.save_resnet_teacher(tmp_path / "wrn_teacher.pth")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(tiny_recipe(work / "resnet-run" / "best.pth", teacher_ckpt=resnet_teacher, data_root=resnet_data))
    result = run_python(
        "-m", "imagenet.image_classification", "--config", recipe, "--device", "cpu", cwd=work, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((work / "resnet-run" / "metrics.json").read_text())
    assert len(metrics["val_top1_per_epoch"]) == 1 and 0 <= metrics["top1"] <= 100
    assert metrics["student"] == "wide_resnet"
