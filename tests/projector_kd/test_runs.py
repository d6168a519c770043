"""Run folders refuse another run's config; metrics JSON; logging to the run folder."""

import json
import logging

import pytest
import yaml

from projector_kd.engine.errors import UserError
from projector_kd.engine.runs import (
    close_logging,
    counted,
    prepare_output_dir,
    progress,
    record_config,
    release_held_logs,
    setup_logging,
    startup_line,
    write_json,
)


def _start(path, config: dict, **options) -> None:
    """What a run does with its folder: check and hold it, then (every check passed) record its config."""
    prepare_output_dir(path, config, **options)
    record_config(path, config)


def test_same_config_reuses_folder_different_config_refused(tmp_path):
    config = {"train": {"lr": 0.1, "epochs": 3}, "model": "resnet18"}
    _start(tmp_path / "run", config, resume=False)
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text()) == config
    _start(tmp_path / "run", config, resume=False)
    (tmp_path / "run" / "checkpoint.pth").write_bytes(b"saved")
    changed = {"train": {"lr": 0.2, "epochs": 3}, "model": "resnet34"}
    with pytest.raises(UserError, match=r"holds a different run \(config differs in: model, train.lr\).*--resume"):
        prepare_output_dir(tmp_path / "run", changed, resume=False)
    _start(tmp_path / "run", changed, resume=True)
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text()) == changed


def test_config_without_checkpoint_is_a_failed_start_not_another_run(tmp_path):
    _start(tmp_path / "run", {"lr": 0.1}, resume=False)
    _start(tmp_path / "run", {"lr": 0.2}, resume=False)
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text()) == {"lr": 0.2}


def test_a_recorded_config_with_old_key_names_is_upgraded_before_comparing(tmp_path):
    run = tmp_path / "run"
    _start(run, {"distillation": {"proj_weight": 1.0}}, resume=False)
    (run / "checkpoint.pth").write_bytes(b"saved")
    config = {"distillation": {"feature_weight": 1.0}}

    def upgrade(recorded):
        old = recorded["distillation"]
        return {"distillation": {"feature_weight": old.get("proj_weight", old.get("feature_weight"))}}

    with pytest.raises(UserError, match=r"differs in: distillation.feature_weight, distillation.proj_weight"):
        prepare_output_dir(run, config, resume=False)
    _start(run, config, resume=False, upgrade_recorded=upgrade)  # the same run, its key renamed
    assert yaml.safe_load((run / "config.yaml").read_text()) == config
    with pytest.raises(UserError, match=r"differs in: distillation.feature_weight\)"):
        prepare_output_dir(run, {"distillation": {"feature_weight": 2.0}}, resume=False, upgrade_recorded=upgrade)


def test_checking_a_folder_and_held_logs_change_nothing_in_it_until_the_run_begins(tmp_path, capsys):
    run = tmp_path / "run"
    _start(run, {"lr": 0.1}, resume=False)
    (run / "checkpoint.pth").write_bytes(b"saved")
    before = (run / "config.yaml").read_bytes()
    prepare_output_dir(run, {"lr": 0.2}, resume=True)  # a resume whose later checks may still refuse it
    logger = setup_logging(run, name="held", hold=True)
    logger.info("kept until the run begins")
    assert (run / "config.yaml").read_bytes() == before and not (run / "log.txt").exists()
    release_held_logs()
    logger.info("written at once")
    close_logging()
    lines = (run / "log.txt").read_text().splitlines()
    assert [line.split(": ", 1)[1] for line in lines] == ["kept until the run begins", "written at once"]
    assert "kept until the run begins" in capsys.readouterr().out  # the terminal sees every line at once


def test_write_json(tmp_path):
    write_json(tmp_path / "m" / "metrics.json", {"top1": 71.5, "curve": [1.0, 2.0]})
    assert json.loads((tmp_path / "m" / "metrics.json").read_text()) == {"curve": [1.0, 2.0], "top1": 71.5}


def test_logging_writes_file_on_rank0_only(tmp_path):
    logger = setup_logging(tmp_path / "a", rank=0, extra_log_file=tmp_path / "log" / "output.txt")
    logger.info("hello from rank 0")
    assert "hello from rank 0" in (tmp_path / "log" / "output.txt").read_text()
    setup_logging(tmp_path / "b", rank=1)
    logging.getLogger("projector_kd").warning("from rank 1")
    for handler in logging.getLogger().handlers:
        handler.flush()
    assert "hello from rank 0" in (tmp_path / "a" / "log.txt").read_text()
    assert not (tmp_path / "b").exists()
    close_logging()
    logging.getLogger("projector_kd").warning("after close")
    assert "after close" not in (tmp_path / "a" / "log.txt").read_text()


def test_progress_is_plain_when_not_a_tty():
    items = [1, 2, 3]
    assert progress(items) is items
    assert progress(items, rank=1) is items


def test_counted_takes_the_number_of_its_count():
    assert [counted(n, "process", "processes") for n in (0, 1, 2)] == ["0 processes", "1 process", "2 processes"]
    assert counted(1, "micro-batch", "micro-batches") == "1 micro-batch" and counted(3, "step") == "3 steps"


def test_startup_line_names_the_run_in_one_line():
    assert startup_line("ResNet track", "recipe r.yaml", 1, "cpu", False) == (
        "ResNet track: recipe r.yaml, 1 process, fast path off, device cpu"
    )
    line = startup_line(
        "DeiT track",
        "method projector",
        8,
        "cuda:0",
        True,
        batch_size=128,
        accum_iter=2,
        lr=0.0005,
        steps_per_epoch=625,
    )
    assert line == (
        "DeiT track: method projector, 8 processes x batch 128 x 2 micro-batches (global batch 2048), lr 0.0005, "
        "625 steps/epoch, fast path on, device cuda:0"
    )
    assert "1 process x batch 4 x 1 micro-batch (global batch 4)" in startup_line(
        "DeiT track", "method kd", 1, "cpu", False, batch_size=4
    )
