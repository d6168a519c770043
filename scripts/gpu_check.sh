#!/usr/bin/env bash
# The prepared GPU check: the CUDA tests (pytest -m gpu: every test marked gpu), then scripts/benchmark.py for both
# tracks side by side in one process (20 timed steps per case after 5 warm-up steps), each phase under its own time
# limit, then a summary. About 7 minutes on one H200 (CUDA tests 75 s; benchmark about 340 s, most of it
# torch.compile), at most 9.
#
#   bash scripts/gpu_check.sh [extra scripts/benchmark.py arguments, e.g. --only resnet or --steps 30]
#
# Writes environment.txt, gpu_tests.log, benchmark.json, benchmark.log and summary.txt to $OUT when set (a remote
# run's output folder), else to output/gpu_check/. Copy the figures, with the card's name from environment.txt, into
# docs/benchmarks.md. Limits (seconds) can be changed with GPU_TESTS_LIMIT and BENCHMARK_LIMIT.
#
# Needs a CUDA GPU with torch, torchvision and timm importable. torchdistill and any other missing package travel as
# wheels in .whl/, installed here into a private folder first. Prepare them once, where pip reaches PyPI, from the
# repository root:
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl torchdistill==1.1.5
# and, for the DALI test and the DALI benchmark rows (optional: without DALI they say so), the packages pinned in
# requirements-dali.txt the same way (add --python-version/--platform for the GPU machine if it differs from this one);
# then run this script on the GPU machine with .whl/ next to it. Most of the time is torch.compile warming up
# (Inductor compiles each graph once; parity reuses the cached graphs).
set -euo pipefail

die() {
  echo "error: $*" >&2
  exit 2
}

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT_DIR="${OUT:-$ROOT/output/gpu_check}"
mkdir -p "$OUT_DIR"
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
GPU_TESTS_LIMIT="${GPU_TESTS_LIMIT:-120}"
BENCHMARK_LIMIT="${BENCHMARK_LIMIT:-420}"

SITE=/tmp/gpu-check-site
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    || die "installing the wheels in .whl/ failed (see above); download them again with the command atop this file"
  export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi

"$PYTHON" - <<'PY' >"$OUT_DIR/environment.txt" 2>&1 \
  || die "$(tail -n 1 "$OUT_DIR/environment.txt"): the GPU check needs CUDA, torch, torchvision, timm, torchdistill"
import importlib, platform, sys
print('python', platform.python_version(), sys.executable)
for name in ('torch', 'torchvision', 'timm', 'torchdistill', 'PIL', 'numpy', 'pytest', 'nvidia.dali'):
    try:
        module = importlib.import_module(name)
    except ImportError as error:
        if name == 'nvidia.dali':  # optional: without it the DALI test skips and the DALI rows say so
            print(name, 'not installed')
            continue
        sys.exit(f'{name} MISSING ({error})')
    print(name, getattr(module, '__version__', '?'), getattr(module, '__file__', ''))
import torch
if not torch.cuda.is_available():
    sys.exit('CUDA not available')
print('gpu', torch.cuda.get_device_name(0), 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())
PY
(nvidia-smi || true) >>"$OUT_DIR/environment.txt" 2>&1
cat "$OUT_DIR/environment.txt"

# each phase: its own limit, its log in $OUT_DIR, its exit status kept for the summary
started=$SECONDS
echo "[gpu tests] pytest -m gpu (limit ${GPU_TESTS_LIMIT}s)"
set +e
PYTHONUNBUFFERED=1 timeout --kill-after=10 "$GPU_TESTS_LIMIT" "$PYTHON" -m pytest -m gpu -p no:cacheprovider -q -rs \
  tests 2>&1 | tee "$OUT_DIR/gpu_tests.log"
tests_status=${PIPESTATUS[0]}
tests_seconds=$((SECONDS - started))
started=$SECONDS
echo "[benchmark] scripts/benchmark.py --steps 20 --warmup 5 $* (limit ${BENCHMARK_LIMIT}s)"
PYTHONUNBUFFERED=1 timeout --kill-after=10 "$BENCHMARK_LIMIT" "$PYTHON" scripts/benchmark.py \
  --json "$OUT_DIR/benchmark.json" --steps 20 --warmup 5 "$@" 2>&1 | tee "$OUT_DIR/benchmark.log"
benchmark_status=${PIPESTATUS[0]}
benchmark_seconds=$((SECONDS - started))
set -e

verdict() {  # exit status -> word
  case "$1" in
    0) echo "passed" ;;
    124 | 137) echo "TIMED OUT" ;;
    *) echo "FAILED (exit $1)" ;;
  esac
}
{
  echo "gpu check on $(grep '^gpu ' "$OUT_DIR/environment.txt" | cut -c5-)"
  echo "gpu tests: $(verdict "$tests_status") in ${tests_seconds}s — $(grep -E '[0-9]+ (passed|failed|skipped|error)' \
    "$OUT_DIR/gpu_tests.log" | tail -n 1)"
  echo "benchmark: $(verdict "$benchmark_status") in ${benchmark_seconds}s (exit 1 = a parity check failed)"
  if [ -f "$OUT_DIR/benchmark.json" ]; then
    "$PYTHON" - "$OUT_DIR/benchmark.json" <<'PY'
import json, sys
report = json.load(open(sys.argv[1]))
if not report.get('complete'):
    print('  benchmark.json is partial: the run ended before every track finished')
for row in report['rows']:
    ratio = f" = {row['vs_release']:.2f}x release" if row.get('vs_release') else ''
    host = f" (host {row['host_ms']:.1f} ms)" if row.get('host_ms') is not None else ''
    print(f"  {row['track']:7} {row['case']:8} {row['img_per_s']:9.0f} img/s {row['step_ms_mean']:7.1f} ms{host}{ratio}")
for track, result in (report.get('parity') or {}).items():
    print(f"  parity {track}: {'ok' if result['ok'] else 'FAILED'}")
PY
  fi
} | tee "$OUT_DIR/summary.txt"
[ "$tests_status" -eq 0 ] && [ "$benchmark_status" -eq 0 ]
