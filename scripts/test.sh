#!/usr/bin/env bash
# The test command: sets up .venv when needed, then runs the whole CPU test suite on $PYTEST_WORKERS worker processes
# (pytest-xdist; default 2, 0 runs it in this process). Extra arguments go to pytest.
# Tests marked gpu (CUDA) are deselected by default; `-m gpu` runs only them (scripts/gpu_check.sh does, on a GPU).
# First the tree's one formatter and linter (ruff, configured in pyproject.toml): a finding fails the command.
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
ruff format --check --quiet . || { echo "error: files need formatting: run 'ruff format .' (see above)" >&2; exit 1; }
ruff check --quiet . || { echo "error: ruff check found problems (see above); 'ruff check --fix .' fixes many" >&2; exit 1; }
set +e
workers="${PYTEST_WORKERS:-2}"
if [ "$workers" = "0" ]; then
  python -m pytest "$@"
else
  python -m pytest -n "$workers" "$@"
fi
status=$?
if [ "$status" -eq 5 ]; then
  echo "error: pytest collected no tests" >&2
  exit 1
fi
exit "$status"
