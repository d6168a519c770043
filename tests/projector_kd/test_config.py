"""Recipe loading, --opts overrides and schema validation: every bad value is named before any work starts."""

import argparse

import pytest

from projector_kd.engine.config import (
    add_overrides_argument,
    apply_overrides,
    check_finite,
    load_yaml,
    merge_configs,
    validate,
)
from projector_kd.engine.errors import UserError

SCHEMA = {
    "train.lr": (float, (lambda v: v > 0, "> 0")),
    "train.batch_size": (int, (lambda v: v >= 1, ">= 1")),
    "train.amp": (bool, None),
    "model.name": (str, (lambda v: v in ("tiny", "small"), "tiny or small")),
    "model.kwargs": (dict, None),
    "data.path": ((str, type(None)), None),
}
GOOD = {
    "train": {"lr": 5e-4, "batch_size": 256, "amp": True},
    "model": {"name": "tiny", "kwargs": {"x": 1}},
    "data": {"path": None},
}


def test_good_config_passes_and_int_counts_as_float():
    validate(GOOD, SCHEMA)
    validate(apply_overrides(GOOD, ["train.lr", "1"]), SCHEMA)


@pytest.mark.parametrize(
    "opts, message",
    [
        (["train.lr", "-0.1"], r"train.lr = -0.1 is out of range \(must be > 0\)"),
        (["train.batch_size", "0"], r"train.batch_size = 0 is out of range \(must be >= 1\)"),
        (["train.batch_size", "2.5"], r"train.batch_size must be int, got 2.5"),
        (["train.amp", "1"], r"train.amp must be bool, got 1"),
        (["train.lr", "true"], r"train.lr must be float, got True"),
        (["model.name", "huge"], r"model.name = 'huge' is out of range \(must be tiny or small\)"),
        (["data.path", "3"], r"data.path must be str or null"),
    ],
)
def test_bad_values_are_named(opts, message):
    with pytest.raises(UserError, match=message):
        validate(apply_overrides(GOOD, opts), SCHEMA, source="tiny.yaml")


def test_unknown_key_is_named_with_suggestion():
    bad = {**GOOD, "train": {**GOOD["train"], "learning_rate": 0.1}}
    with pytest.raises(UserError, match=r"tiny.yaml: unknown key 'train.learning_rate'"):
        validate(bad, SCHEMA, source="tiny.yaml")
    with pytest.raises(UserError, match=r"unknown key 'train.batchsize' \(did you mean 'train.batch_size'\?\)"):
        validate({**GOOD, "train": {"batchsize": 3}}, SCHEMA)


def test_overrides_parse_yaml_scalars_and_refuse_unknown_keys():
    cfg = apply_overrides(GOOD, ["train.lr", "1e-3", "model.kwargs", "{a: [1, 2]}", "model.name", "small"])
    assert cfg["train"]["lr"] == 1e-3 and cfg["model"]["kwargs"] == {"a": [1, 2]} and cfg["model"]["name"] == "small"
    assert GOOD["train"]["lr"] == 5e-4  # the input is not modified
    with pytest.raises(UserError, match=r"--opts key 'train.lrr' is not in the config \(did you mean train.lr\?\)"):
        apply_overrides(GOOD, ["train.lrr", "1"])
    with pytest.raises(UserError, match="odd number"):
        apply_overrides(GOOD, ["train.lr"])


def test_load_yaml_errors_name_the_file(tmp_path):
    with pytest.raises(UserError, match="config file not found: .*nope.yaml"):
        load_yaml(tmp_path / "nope.yaml")
    (tmp_path / "broken.yaml").write_text("train:\n  lr: [1, 2\n")
    with pytest.raises(UserError, match=r"broken.yaml is not valid YAML at line \d"):
        load_yaml(tmp_path / "broken.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(UserError, match="must hold a mapping"):
        load_yaml(tmp_path / "list.yaml")
    (tmp_path / "ok.yaml").write_text("train:\n  lr: 0.1\n  wd: 5e-2\n  big: 1E6\n  name: 1e-3x\n")
    assert load_yaml(tmp_path / "ok.yaml") == {"train": {"lr": 0.1, "wd": 0.05, "big": 1e6, "name": "1e-3x"}}


def test_merge_configs_merges_plain_mappings_and_keeps_inputs_and_aliases():
    shared = {"key": "seq"}
    base = {"train": {"lr": 0.1, "betas": [0.9, 0.999], "sampler": shared}, "test": {"sampler": shared}}
    overlay = {"train": {"lr": 0.05, "betas": [0.5]}, "extra": {"x": 1}}
    merged = merge_configs(base, overlay)
    assert merged == {
        "train": {"lr": 0.05, "betas": [0.5], "sampler": {"key": "seq"}},
        "test": {"sampler": {"key": "seq"}},
        "extra": {"x": 1},
    }
    assert merged["train"]["sampler"] is merged["test"]["sampler"] and merged["test"]["sampler"] is not shared
    assert base["train"]["lr"] == 0.1 and overlay == {"train": {"lr": 0.05, "betas": [0.5]}, "extra": {"x": 1}}
    merged["extra"]["x"] = 2
    assert overlay["extra"]["x"] == 1


def test_a_file_that_is_not_utf8_is_named_with_the_place_of_the_first_bad_byte(tmp_path):
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("train:\n  lr: 0.1  # réglé\n".encode("latin-1"))
    with pytest.raises(UserError) as error:
        load_yaml(latin1)
    assert str(error.value) == (
        f"config file {latin1} is not UTF-8 text (byte 0xe9 at line 2, column 15) — save it as UTF-8"
    )
    (tmp_path / "utf8.yaml").write_text("name: réglé\n", encoding="utf-8")
    assert load_yaml(tmp_path / "utf8.yaml") == {"name": "réglé"}


@pytest.mark.parametrize(
    "text, message",
    [
        ("train:\n  lr: .inf\n", "train.lr = inf is not a finite number"),
        ("train:\n  lr: 1.0e400\n", "train.lr = inf is not a finite number"),
        ("train:\n  lr: -.inf\n", "train.lr = -inf is not a finite number"),
        ("model:\n  kwargs: {scale: [1.0, .nan]}\n", r"model.kwargs.scale\[1\] = nan is not a number"),
    ],
)
def test_infinite_and_nan_numbers_are_refused_naming_the_key(tmp_path, text, message):
    (tmp_path / "a.yaml").write_text(text)
    with pytest.raises(UserError, match=f"^a.yaml: {message}"):
        validate(merge_configs(GOOD, load_yaml(tmp_path / "a.yaml")), SCHEMA, source="a.yaml")
    with pytest.raises(UserError, match=f"^a.yaml: {message}"):
        check_finite(load_yaml(tmp_path / "a.yaml"), "a.yaml")


def test_opts_given_several_times_all_count_in_order():
    parser = argparse.ArgumentParser()
    add_overrides_argument(parser, "train.lr 0.1")
    args = parser.parse_args(["--opts", "train.lr", "1", "--opts", "train.batch_size", "8", "train.lr", "2"])
    assert args.opts == ["train.lr", "1", "train.batch_size", "8", "train.lr", "2"]
    cfg = apply_overrides(GOOD, args.opts)
    assert (cfg["train"]["lr"], cfg["train"]["batch_size"]) == (2, 8)  # a key given twice: its last value
    assert parser.parse_args([]).opts == [] and parser.parse_args([]).opts is not args.opts
    with pytest.raises(UserError, match="^--opts takes KEY VALUE pairs; got an odd number of items: train.lr$"):
        parser.parse_args(["--opts", "train.lr", "--opts", "1"])
