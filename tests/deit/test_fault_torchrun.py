"""Under torchrun: an error on one rank ends every rank with that one line (exit 2 for each worker), not with a
backend traceback from the ranks that were waiting for it (a stop on one rank:
tests/projector_kd/both_tracks/test_torchrun.py)."""

from __future__ import annotations

import re
from pathlib import Path

from deit.config import load_config
from projector_kd.engine.data import CheckedImageFolder
from projector_kd.engine.sampling import ResumableSampler


def test_unreadable_image_on_one_rank_ends_both_ranks_with_one_line(
    tmp_path, train_argv, run_torchrun, data_copy, tiny_config
):
    data = data_copy
    # the first image of rank 1's second batch: rank 1 fails mid-epoch while rank 0 waits in the gradient all-reduce
    images = CheckedImageFolder(data / "train")
    sampler = ResumableSampler(len(images), 4, load_config("demo", str(tiny_config))["seed"], rank=1, world_size=2)
    bad = Path(images.samples[sampler.epoch_indices(0)[4]][0])
    bad.write_bytes(b"not an image")
    result = run_torchrun("deit/main.py", *train_argv(tmp_path / "run", "--epochs", "1", data=data))
    assert result.returncode == 1  # torchrun's own status for any failed worker
    errors = [line for line in result.stderr.splitlines() if "error: " in line and "ChildFailedError" not in line]
    assert len(errors) == 1, result.stderr[-3000:]
    assert re.search(rf"error: unreadable image {re.escape(str(bad))} \(UnidentifiedImageError", errors[0])
    assert "gloo" not in result.stderr and "[rank0]: Traceback" not in result.stderr
    assert "[rank1]: Traceback" not in result.stderr
    # each worker exits 2, unless torchrun's SIGTERM to the workers still running reaches it first
    codes = re.findall(r"exitcode  : (-?\d+)", result.stderr)
    assert len(codes) == 2 and "2" in codes and set(codes) <= {"2", "-15"}, result.stderr[-3000:]
