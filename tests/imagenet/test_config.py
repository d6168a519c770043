"""The release recipe's values (docs/method.md), recipe checks that catch what torchdistill would swallow, CLI data
errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from imagenet import config as recipes
from imagenet.image_classification import get_argparser
from projector_kd.engine.config import apply_overrides
from projector_kd.engine.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
RELEASE = ROOT / "configs/ilsvrc2012/ours/res3418.yaml"
DEMO_BASE = ROOT / "configs/demo/resnet_base.yaml"
DEMOS = sorted(p for p in (ROOT / "configs/demo").glob("resnet_*.yaml") if p != DEMO_BASE)


def release() -> dict:
    return recipes.load_recipe(RELEASE)


def test_release_recipe_values_match_the_release_code():
    recipe = release()
    recipes.check_recipe(recipe, "res3418.yaml")
    plain = recipes.resolve({k: v for k, v in recipe.items() if k not in ("datasets", "_data_root")})
    assert plain["models"]["teacher_model"] == {
        "key": "resnet34",
        "kwargs": {"num_classes": 1000, "weights": "IMAGENET1K_V1"},
    }
    assert plain["models"]["student_model"]["key"] == "resnet18"
    assert plain["models"]["student_model"]["kwargs"]["weights"] is None
    train = plain["train"]
    assert train["num_epochs"] == 100
    assert train["train_data_loader"]["kwargs"]["batch_size"] == 256
    assert train["optimizer"] == {
        "key": "SGD",
        "kwargs": {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4},
        "grad_accum_step": 1,
    }
    assert train["scheduler"]["key"] == "MultiStepLR"
    assert train["scheduler"]["kwargs"] == {"milestones": [30, 60, 90], "gamma": 0.1}
    assert train["teacher"]["requires_grad"] is False
    wrapper = train["student"]["auxiliary_model_wrapper"]
    assert wrapper["key"] == "ProjectorKDModelWrapper"
    assert wrapper["kwargs"] == {
        "input_module": {"path": "model.layer4", "io": "output"},
        "student_dim": 512,
        "teacher_dim": 512,
        "distance": "log_diff",
        "exponent": 4.0,
        "eps": 1e-4,
        "projector": "linear",
    }
    terms = train["criterion"]["kwargs"]["sub_terms"]
    assert terms["ce"]["weight"] == 1.0 and terms["ce"]["criterion"]["key"] == "CrossEntropyLoss"
    assert terms["projector_kd"]["weight"] == 1.0
    assert terms["projector_kd"]["criterion"] == {
        "key": "ProjectorKDLoss",
        "kwargs": {
            "teacher_feature": {"path": "layer4", "io": "output"},
            "feature_weight": 2.0,
            "kd_weight": 1.0,
            "temperature": 1.0,
        },
    }
    assert recipe["runtime"]["fast"] is False


def test_release_transforms_match_the_release_code(tmp_path):
    recipe = release()
    recipes.set_data_root(recipe, str(tmp_path))
    transforms = {}
    for dataset_id in ("ilsvrc2012/train", "ilsvrc2012/val"):
        kwargs = recipe["datasets"][dataset_id]["init"]["kwargs"]
        assert recipes.resolve(kwargs["root"]) == str(tmp_path / dataset_id.split("/")[1])
        transforms[dataset_id] = recipes.resolve(kwargs["transform"])
    train_ops = transforms["ilsvrc2012/train"].transforms
    assert type(train_ops[0]).__name__ == "RandomResizedCrop" and list(train_ops[0].size) == [224, 224]
    assert type(train_ops[1]).__name__ == "RandomHorizontalFlip" and train_ops[1].p == 0.5
    val_ops = transforms["ilsvrc2012/val"].transforms
    assert type(val_ops[0]).__name__ == "Resize" and val_ops[0].size == 256
    assert type(val_ops[1]).__name__ == "CenterCrop" and list(val_ops[1].size) == [224, 224]
    for ops in (train_ops, val_ops):
        assert ops[-1].mean == [0.485, 0.456, 0.406] and ops[-1].std == [0.229, 0.224, 0.225]


def test_release_recipe_loads_with_torchdistill(tmp_path, monkeypatch):
    from torchdistill.common.yaml_util import load_yaml_file

    for split in ("train", "val"):
        (tmp_path / split / "n01").mkdir(parents=True)
        (tmp_path / split / "n01" / "a.png").write_bytes(b"")
    monkeypatch.setenv("IMAGENET_ROOT", str(tmp_path))
    config = load_yaml_file(str(RELEASE))
    assert config["datasets"]["ilsvrc2012/train"].root == str(tmp_path / "train")
    assert config["train"]["optimizer"]["kwargs"]["lr"] == 0.1


@pytest.mark.parametrize("path", DEMOS, ids=lambda p: p.name)
def test_demo_recipes_pass_the_checks(path):
    recipes.check_recipe(recipes.load_recipe(path), path.name)


@pytest.mark.parametrize(
    "opts, message",
    [
        (["train.optimizer.kwargs.lr", "-0.1"], "lr = -0.1 is out of range"),
        (["train.train_data_loader.kwargs.batch_size", "0"], "batch_size = 0 is out of range"),
        (["train.train_data_loader.kwargs.batch_size", "1"], "at least 2 images per batch"),
        (["train.num_epochs", "0"], "train.num_epochs = 0 is out of range"),
        (["train.scheduler.kwargs.milestones", "[60, 30]"], "milestones = [60, 30] must be increasing"),
        (["runtime.fast", "yes-please"], "runtime: fast must be bool"),
        (["train.criterion.kwargs.sub_terms.projector_kd.weight", ".nan"], "projector_kd.weight = nan is not a number"),
    ],
)
def test_bad_values_are_named(opts, message):
    recipe = apply_overrides(release(), opts)
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        recipes.check_recipe(recipe, "res3418.yaml")


def _with_typo(edit) -> dict:
    recipe = release()
    edit(recipe)
    return recipe


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda r: r["train"].__setitem__("num_epoch", 3),
            r"unknown key train.num_epoch \(did you mean train.num_epochs",
        ),
        (
            lambda r: r["train"]["optimizer"]["kwargs"].__setitem__("momentun", 0.9),
            r"train.optimizer.kwargs.momentun is not an argument of SGD \(did you mean train.optimizer.kwargs.momentum",
        ),
        (
            lambda r: r["train"]["student"]["auxiliary_model_wrapper"]["kwargs"].__setitem__("exponnent", 4.0),
            r"exponnent is not an argument of ProjectorKDModelWrapper",
        ),
        (
            lambda r: r["train"]["criterion"]["kwargs"]["sub_terms"]["projector_kd"]["criterion"]["kwargs"].__setitem__(
                "feature_wieght", 2.0
            ),
            r"feature_wieght is not an argument of ProjectorKDLoss",
        ),
        (
            lambda r: r["train"]["student"]["auxiliary_model_wrapper"].__setitem__("key", "ProjectorKDModelWraper"),
            r"'ProjectorKDModelWraper' is not registered in torchdistill \(did you mean 'ProjectorKDModelWrapper'",
        ),
        (lambda r: r["train"]["teacher"].__setitem__("forward_hooks", {}), r"unknown key train.teacher.forward_hooks"),
        (
            lambda r: r["datasets"]["ilsvrc2012/val"]["init"]["kwargs"].__setitem__("on_bad_imag", "skip"),
            r"on_bad_imag is not an argument of CheckedImageFolder",
        ),
        (lambda r: r["train"]["teacher"].__setitem__("src_ckpt", "x.pth"), r"unsafe unpickling"),
        (
            lambda r: r["train"]["val_data_loader"].__setitem__("dataset_id", "ilsvrc2012/vall"),
            r"is not one of the datasets",
        ),
    ],
)
def test_key_typos_torchdistill_would_swallow_are_caught(edit, message):
    with pytest.raises(UserError, match=message):
        recipes.check_recipe(_with_typo(edit), "res3418.yaml")


def test_release_command_without_imagenet_names_the_expected_folders(tmp_path, run_release_command):
    missing = tmp_path / "no-imagenet"
    result = run_release_command(missing, tmp_path / "out", tmp_path / "log/output.txt", timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: dataset folder {missing} does not exist")
    assert f"{missing}/train/<class>/<image>" in lines[0] and f"{missing}/val/<class>/<image>" in lines[0]


def test_cli_config_typo_fails_before_any_work(tmp_path, run_entry):
    result = run_entry(
        "--config", RELEASE, "--output_dir", tmp_path / "out", "--opts", "train.optimizer.kwargs.lr", "-1", timeout=120
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {RELEASE}: train.optimizer.kwargs: lr = -1 is out of range (must be > 0)"
    ]
    assert not (tmp_path / "out").exists()


def test_demo_students_differ_only_in_the_loss():
    """The demo compares methods: every student recipe trains the same model, data, schedule and optimizer."""
    shared = []
    for method in ("baseline", "kd", "projector"):
        recipe = recipes.load_recipe(ROOT / "configs/demo" / f"resnet_{method}.yaml")
        plain = recipes.resolve({k: v for k, v in recipe.items() if k not in ("datasets", "_data_root")})
        train = {k: v for k, v in plain["train"].items() if k not in ("criterion", "teacher", "student", "model")}
        student = {k: v for k, v in plain["models"]["student_model"].items() if k != "dst_ckpt"}
        shared.append((train, student, sorted(recipe["datasets"])))
    assert shared[0] == shared[1] == shared[2]
    assert shared[0][0]["num_epochs"] == 30 and shared[0][0]["scheduler"]["kwargs"]["milestones"] == [22]


def test_demo_teacher_differs_from_the_students_base_only_where_it_says():
    """The demo teacher overlay changes the model, its length, batch and schedule, and nothing else."""
    teacher = recipes.to_plain(recipes.load_recipe(ROOT / "configs/demo/resnet_teacher.yaml"))
    baseline = recipes.to_plain(recipes.load_recipe(ROOT / "configs/demo/resnet_baseline.yaml"))
    assert teacher["models"]["student_model"]["key"] == "resnet18"
    assert (
        teacher["train"]["num_epochs"],
        teacher["train"]["train_data_loader"]["kwargs"]["batch_size"],
        teacher["train"]["scheduler"]["kwargs"]["milestones"],
    ) == (15, 64, [11])
    for recipe in (teacher, baseline):
        recipe["models"]["student_model"].pop("key")
        recipe["models"]["student_model"].pop("dst_ckpt")
        for key in ("num_epochs", "train_data_loader", "scheduler"):
            recipe["train"].pop(key)
    assert teacher == baseline


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_base_recipe_is_merged_under_the_overlay(tmp_path):
    """`_base_`: plain mappings merge key by key, scalars, lists and tagged nodes replace; aliases stay shared."""
    _write(
        tmp_path / "base.yaml",
        """
_root: &root !import_call {key: os.getenv, init: {args: [DATA, /data]}}
datasets:
  train: {root: !pathjoin [*root, train], size: 10}
train:
  optimizer: {key: SGD, kwargs: {lr: 0.1, momentum: 0.9}}
  milestones: [30, 60]
  sampler: &sampler {key: seq}
test:
  sampler: *sampler
""",
    )
    (tmp_path / "sub").mkdir()
    overlay = _write(
        tmp_path / "sub" / "over.yaml",
        """
_base_: ../base.yaml
datasets:
  train: {root: !pathjoin [/elsewhere, train]}
train:
  optimizer: {kwargs: {lr: 0.05}}
  milestones: [10]
""",
    )
    recipe = recipes.load_recipe(overlay)
    assert "_base_" not in recipe
    assert recipe["train"]["optimizer"] == {"key": "SGD", "kwargs": {"lr": 0.05, "momentum": 0.9}}
    assert recipe["train"]["milestones"] == [10]
    assert recipe["datasets"]["train"]["size"] == 10
    assert recipes.resolve(recipe["datasets"]["train"]["root"]) == "/elsewhere/train"
    assert recipe["train"]["sampler"] is recipe["test"]["sampler"]
    assert recipes.load_recipe(tmp_path / "base.yaml")["train"]["optimizer"]["kwargs"]["lr"] == 0.1


def test_base_recipe_errors_name_the_file(tmp_path):
    missing = _write(tmp_path / "missing.yaml", "_base_: nowhere.yaml\n")
    with pytest.raises(UserError, match=r"missing\.yaml: _base_ file not found: .*nowhere\.yaml"):
        recipes.load_recipe(missing)
    _write(tmp_path / "a.yaml", "_base_: b.yaml\n")
    _write(tmp_path / "b.yaml", "_base_: a.yaml\n")
    with pytest.raises(UserError, match="cycle"):
        recipes.load_recipe(tmp_path / "a.yaml")
    with pytest.raises(UserError, match="_base_ must name a recipe file"):
        recipes.load_recipe(_write(tmp_path / "bad.yaml", "_base_: [x]\n"))


def _reads_keys(config, other):
    value = config["a"] + config.get("b", 1) + config.pop("c", 0)
    if "d" in config or "e" not in config:
        config.setdefault("f", {})
    return value + other["not_config"] + config[len(other)]


def test_keys_read_finds_every_literal_key_of_the_named_mapping():
    assert recipes.keys_read(_reads_keys, "config") == {"a", "b", "c", "d", "e", "f"}
    assert recipes.keys_read(_reads_keys, "other") == {"not_config"}


def test_recipe_keys_come_from_the_installed_torchdistill(monkeypatch):
    """The accepted keys are read from torchdistill's source: a key a new torchdistill reads is accepted without any
    change here, and a reader that no longer reads its section fails loudly instead of going stale."""
    keys = recipes.torchdistill_keys()
    assert {"module_wise_configs", "grad_accum_step", "max_grad_norm"} <= keys["optimizer"]
    assert keys["scheduler"] == {"key", "kwargs", "scheduling_step"}
    assert {"requires_supp", "dataset_id", "sampler"} <= keys["data_loader"]
    recipe = release()
    recipe["train"]["optimizer"]["newer_option"] = 1
    with pytest.raises(UserError, match=r"unknown key train\.optimizer\.newer_option .*silently ignore"):
        recipes.check_recipe(recipe, "res3418.yaml")

    from torchdistill.core.distillation import DistillationBox
    from torchdistill.datasets import util as data_util

    def setup(self, train_config):
        optim_config = train_config.get("optimizer", dict())
        return optim_config.get("newer_option"), train_config.get("teacher"), train_config.get("student")

    def build_data_loader(dataset, loader_config, distributed):
        return loader_config["kwargs"]

    recipes.torchdistill_keys.cache_clear()
    monkeypatch.setattr(DistillationBox, "setup", setup)
    try:
        recipes.check_recipe(recipe, "res3418.yaml")
        monkeypatch.setattr(data_util, "build_data_loader", build_data_loader)
        recipes.torchdistill_keys.cache_clear()
        with pytest.raises(RuntimeError, match="no longer reads the recipe's sampler section"):
            recipes.torchdistill_keys()
    finally:
        monkeypatch.undo()
        recipes.torchdistill_keys.cache_clear()


def test_both_tracks_spellings_of_the_data_and_output_flags():
    parser = get_argparser()
    for data, output in (("--data-root", "--output_dir"), ("--data-path", "--output"), ("--data_path", "--run-dir")):
        args = parser.parse_args(["--config", "r.yaml", data, "/data", output, "runs/a"])
        assert (args.data_root, args.output_dir) == ("/data", "runs/a")
    usage = " ".join(parser.format_help().split())
    assert "--data-root DATA_ROOT, --data_root DATA_ROOT, --data-path DATA_ROOT" in usage
    assert "--output_dir OUTPUT_DIR, --output-dir OUTPUT_DIR, --output OUTPUT_DIR" in usage
