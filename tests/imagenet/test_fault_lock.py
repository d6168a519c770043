"""One run per output folder: a second run on a folder in use is refused naming the holder; a lock left by a killed
run does not block the rerun."""

from __future__ import annotations

import socket

from projector_kd.engine.checkpoint import load_checkpoint


def test_folder_in_use_is_refused_and_free_again_once_the_holder_is_killed(make_recipe, cli, tmp_path, hold_output_dir):
    recipe = make_recipe("run", method="baseline")
    holder = hold_output_dir(tmp_path / "run")
    status, _, err = cli("--config", recipe)
    assert status == 2
    assert (
        err.startswith(
            f"error: output folder {tmp_path / 'run'} is in use by another run (pid {holder.pid} on "
            f"{socket.gethostname()}, since "
        )
        and err.count("\n") == 1
    )
    assert err.endswith(") — wait for it to end, or choose another output folder\n")
    assert not (tmp_path / "run" / "config.yaml").exists()

    holder.kill()
    holder.wait()
    status, _, err = cli("--config", recipe)
    assert status == 0, err
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pth")["epoch"] == 1
