#!/usr/bin/env bash
# The prepared GPU run of scripts/benchmark.py: full sizes, both tracks side by side in one process.
#
#   bash scripts/benchmark_gpu.sh [extra scripts/benchmark.py arguments, e.g. --only resnet]
#
# Writes benchmark.json, benchmark.log and environment.txt to $OUT when set (the device tool's output folder), else
# to output/benchmark/. Copy the figures, with the card's name from environment.txt, into docs/benchmarks.md.
#
# Needs a CUDA GPU with torch, torchvision and timm importable. torchdistill (missing from this workplace's GPU
# image) and any other missing package travel as wheels in .whl/, installed here into a private folder first.
# Prepare them once, where pip reaches PyPI, from the repository root:
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl torchdistill==1.1.5
# then run this script on the GPU machine carrying .whl (device tool: carry [".whl"], timeout_s 600). Most of the
# run is torch.compile warming up (Inductor compiles each graph once; parity reuses the cached graphs).
set -euo pipefail

die() {
  echo "error: $*" >&2
  exit 2
}

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT_DIR="${OUT:-$ROOT/output/benchmark}"
mkdir -p "$OUT_DIR"
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

SITE=/tmp/benchmark-site
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    || die "installing the wheels in .whl/ failed (see above); download them again with the command atop this file"
  export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi

"$PYTHON" - <<'PY' >"$OUT_DIR/environment.txt" 2>&1 \
  || die "$(tail -n 1 "$OUT_DIR/environment.txt"): the GPU benchmark needs CUDA, torch, torchvision, timm, torchdistill"
import importlib, platform, sys
print('python', platform.python_version(), sys.executable)
for name in ('torch', 'torchvision', 'timm', 'torchdistill', 'PIL', 'numpy'):
    try:
        module = importlib.import_module(name)
    except ImportError as error:
        sys.exit(f'{name} MISSING ({error})')
    print(name, getattr(module, '__version__', '?'), getattr(module, '__file__', ''))
import torch
if not torch.cuda.is_available():
    sys.exit('CUDA not available')
print('gpu', torch.cuda.get_device_name(0), 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())
PY
(nvidia-smi || true) >>"$OUT_DIR/environment.txt" 2>&1
cat "$OUT_DIR/environment.txt"

set -o pipefail
PYTHONUNBUFFERED=1 "$PYTHON" scripts/benchmark.py --json "$OUT_DIR/benchmark.json" "$@" 2>&1 \
  | tee "$OUT_DIR/benchmark.log"
