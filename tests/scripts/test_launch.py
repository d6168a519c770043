"""``scripts/launch_multinode.sh`` and ``scripts/slurm_train.sbatch``: the torchrun command they build, their errors,
and a real two-"node" c10d rendezvous on localhost (the workers run the track's ``--help``, so no data is needed)."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAUNCH = ROOT / "scripts" / "launch_multinode.sh"
SLURM = ROOT / "scripts" / "slurm_train.sbatch"
CLEAN_ENV = {
    k: v
    for k, v in os.environ.items()
    if k not in ("NNODES", "NODE_RANK", "NPROC_PER_NODE", "RDZV_ENDPOINT", "RDZV_ID") and not k.startswith("SLURM_")
}


def run(args: list[str], env: dict | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(LAUNCH), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**CLEAN_ENV, **(env or {})},
    )


def option(tokens: list[str], name: str) -> str:
    return tokens[tokens.index(name) + 1]


def test_dry_run_builds_the_c10d_torchrun_command_and_passes_arguments_through():
    result = run(
        [
            "imagenet",
            "--nnodes",
            "2",
            "--node-rank",
            "1",
            "--nproc-per-node",
            "8",
            "--rdzv-endpoint",
            "node0.cluster:29400",
            "--dry-run",
            "--",
            "--config",
            "configs/ilsvrc2012/ours/res3418.yaml",
            "--world_size",
            "16",
            "-adjust_lr",
        ]
    )
    assert result.returncode == 0, result.stderr
    tokens = shlex.split(result.stdout)
    assert tokens[1:3] == ["-m", "torch.distributed.run"]
    assert option(tokens, "--nnodes") == "2" and option(tokens, "--nproc-per-node") == "8"
    assert option(tokens, "--rdzv-backend") == "c10d"
    assert option(tokens, "--rdzv-endpoint") == "node0.cluster:29400"
    assert option(tokens, "--rdzv-id") == "projector-kd-imagenet"
    assert option(tokens, "--rdzv-conf") == "is_host=false"  # only node 0 hosts the rendezvous store
    entry = tokens.index(str(ROOT / "imagenet" / "image_classification.py"))
    assert tokens[entry + 1 :] == [
        "--config",
        "configs/ilsvrc2012/ours/res3418.yaml",
        "--world_size",
        "16",
        "-adjust_lr",
    ]


def test_environment_fallbacks_and_resnet_alias():
    result = run(
        ["resnet", "--dry-run", "--data-root", "/data"],
        env={"NNODES": "3", "NODE_RANK": "0", "NPROC_PER_NODE": "4", "RDZV_ENDPOINT": "head:1234", "RDZV_ID": "job7"},
    )
    assert result.returncode == 0, result.stderr
    tokens = shlex.split(result.stdout)
    assert option(tokens, "--nnodes") == "3" and option(tokens, "--nproc-per-node") == "4"
    assert option(tokens, "--rdzv-endpoint") == "head:1234" and option(tokens, "--rdzv-id") == "job7"
    assert option(tokens, "--rdzv-conf") == "is_host=true"
    assert tokens[-3:] == [str(ROOT / "imagenet" / "image_classification.py"), "--data-root", "/data"]


def test_single_node_defaults():
    tokens = shlex.split(run(["deit", "--dry-run"]).stdout)
    assert option(tokens, "--nnodes") == "1" and option(tokens, "--rdzv-endpoint") == "localhost:29500"
    assert int(option(tokens, "--nproc-per-node")) >= 1 and tokens[-1] == str(ROOT / "deit" / "main.py")


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "error: name a track: scripts/launch_multinode.sh deit|imagenet [options] [--] [track arguments]"),
        (["mnist"], "error: unknown track 'mnist'; use deit or imagenet"),
        (
            ["deit", "--nnodes", "2"],
            "error: --rdzv-endpoint HOST:PORT (RDZV_ENDPOINT) is required with 2 nodes: node 0's "
            "address, reachable from every node",
        ),
        (
            ["deit", "--nnodes", "2", "--node-rank", "2", "--rdzv-endpoint", "h:1"],
            "error: --node-rank (NODE_RANK) must be an integer in [0, 1], got '2'",
        ),
        (["deit", "--nnodes", "zero"], "error: --nnodes (NNODES) must be an integer >= 1, got 'zero'"),
        (
            ["deit", "--nproc-per-node", "0"],
            "error: --nproc-per-node (NPROC_PER_NODE) must be an integer >= 1, got '0'",
        ),
        (["deit", "--rdzv-endpoint", "nohostport"], "error: --rdzv-endpoint must be HOST:PORT, got 'nohostport'"),
        (["deit", "--nnodes"], "error: --nnodes needs a value"),
    ],
)
def test_launcher_errors_are_one_line(args, message):
    result = run(args)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [message]


def test_two_nodes_rendezvous_on_localhost(free_port):
    """Two launcher processes, node ranks 0 and 1, meet at one c10d endpoint and start one worker each."""
    endpoint = f"127.0.0.1:{free_port}"
    common = ["deit", "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-endpoint", endpoint, "--rdzv-id", "test"]
    env = {**CLEAN_ENV, "OMP_NUM_THREADS": "1"}
    nodes = [
        subprocess.Popen(
            ["bash", str(LAUNCH), *common[:3], "--node-rank", str(rank), *common[3:], "--", "--help"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=120) for node in nodes]
    for node, (stdout, stderr) in zip(nodes, outputs):
        assert node.returncode == 0, stderr[-2000:]
        assert "--train_student" in stdout  # each node's worker ran deit/main.py --help


def test_slurm_example_runs_one_launcher_per_node(tmp_path: Path, free_port: int):
    """sbatch's script with stand-ins for scontrol/srun: srun starts the command once per node with SLURM_NODEID."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(
        '#!/usr/bin/env bash\n[ "$1 $2" = "show hostnames" ] && printf "127.0.0.1\\nother-node\\n"\n'
    )
    (bin_dir / "srun").write_text(
        '#!/usr/bin/env bash\n[ "$1" = "--kill-on-bad-exit=1" ] && shift\npids=()\n'
        'for ((node = 0; node < SLURM_NNODES; node++)); do SLURM_NODEID=$node "$@" & pids+=($!); done\n'
        'status=0\nfor pid in "${pids[@]}"; do wait "$pid" || status=1; done\nexit $status\n'
    )
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = {
        **CLEAN_ENV,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_SUBMIT_DIR": str(ROOT),
        "SLURM_JOB_NODELIST": "node[0-1]",
        "SLURM_NNODES": "2",
        "SLURM_JOB_ID": "4242",
        "RDZV_PORT": str(free_port),
        "NPROC_PER_NODE": "1",
        "OMP_NUM_THREADS": "1",
    }
    result = subprocess.run(
        ["bash", str(SLURM), "imagenet", "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"job 4242: 2 node(s), rendezvous at 127.0.0.1:{env['RDZV_PORT']}, track imagenet" in result.stdout
    assert result.stdout.count("usage: image_classification.py") == 2  # each node's worker printed --help


def test_slurm_example_outside_a_job_is_one_line_error(tmp_path: Path):
    result = subprocess.run(
        ["bash", str(SLURM), "deit"], cwd=tmp_path, capture_output=True, text=True, timeout=30, env=CLEAN_ENV
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "error: not inside a SLURM job: submit this file with sbatch from the repository root"
    ]
