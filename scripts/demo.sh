#!/usr/bin/env bash
# The embedded demo (no ImageNet, no network): sets up .venv when needed, then runs both tracks on the digits data.
# Options: --output DIR (default outputs/demo), --seeds 0 1, --tracks resnet deit, --methods baseline kd projector,
# --fresh, --holdout, --resnet-opts / --deit-opts KEY VALUE ..., --native-kernels (this CPU's own kernels: faster,
# figures that depend on the CPU; by default every run uses the portable ones). See scripts/demo.py --help.
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
exec python scripts/demo.py "$@"
