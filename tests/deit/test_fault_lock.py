"""One run per output folder: a second run on a folder in use is refused naming the holder; a lock left by a killed
run does not block the rerun."""

from __future__ import annotations

import socket

import pytest
import torch

from deit.main import main
from projector_kd.engine.errors import OutputError


def test_folder_in_use_is_refused_and_free_again_once_the_holder_is_killed(tmp_path, train_argv, hold_output_dir):
    output = tmp_path / "run"
    holder = hold_output_dir(output)
    with pytest.raises(OutputError) as error:
        main(train_argv(output, "--epochs", "1"))
    assert str(error.value).startswith(
        f"output folder {output} is in use by another run (pid {holder.pid} on {socket.gethostname()}, since "
    )
    assert not (output / "config.yaml").exists()

    holder.kill()
    holder.wait()
    assert main(train_argv(output, "--epochs", "1")) == 0
    assert torch.load(output / "checkpoint.pth", weights_only=True)["epoch"] == 1
    assert main(train_argv(output, "--epochs", "1")) == 0  # the finished run released the folder
