"""Under torchrun, an error on one rank ends every rank with that one line (exit 2 for each worker), not with a
backend traceback from the ranks that were waiting for it."""

from __future__ import annotations

import re


def test_output_folder_refused_on_rank_0_ends_both_ranks_with_one_line(make_recipe, run_entry_on_two_ranks, tmp_path):
    (tmp_path / "run").write_text("notes")
    result = run_entry_on_two_ranks("--config", make_recipe("run", method="baseline"))
    assert result.returncode == 1  # torchrun's own status for any failed worker
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: output folder {tmp_path / 'run'} is a file — remove it or choose another output folder"]
    assert "gloo" not in result.stderr and "[rank1]: Traceback" not in result.stderr
    # each worker exits 2, unless torchrun's SIGTERM to the workers still running reaches it first
    codes = re.findall(r"exitcode  : (-?\d+)", result.stderr)
    assert len(codes) == 2 and "2" in codes and set(codes) <= {"2", "-15"}, result.stderr[-3000:]
