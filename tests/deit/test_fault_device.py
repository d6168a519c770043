"""A device named in a DeiT config uses the names --device accepts (--device itself, for both tracks:
tests/projector_kd/both_tracks/test_devices.py)."""

from __future__ import annotations


def test_device_in_a_config_file_uses_the_same_names(cli, tmp_path, train_argv):
    argv = [a for a in train_argv(tmp_path / "run") if a not in ("--device", "cpu")] + ["--opts", "device", "gpu"]
    status, err = cli(argv)
    assert status == 2
    assert err == "error: config: device = 'gpu' is out of range (must be cpu, cuda or cuda:N)\n"
