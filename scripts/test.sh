#!/usr/bin/env bash
# The test command: sets up .venv when needed, then runs the whole CPU test suite. Extra arguments go to pytest.
# Tests marked gpu (CUDA) are deselected by default; `-m gpu` runs only them (scripts/gpu_check.sh does, on a GPU).
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
set +e
python -m pytest "$@"
status=$?
if [ "$status" -eq 5 ]; then
  echo "error: pytest collected no tests" >&2
  exit 1
fi
exit "$status"
