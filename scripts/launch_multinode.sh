#!/usr/bin/env bash
# Multi-node (or single-node) launch of either track through torchrun with c10d rendezvous.
#
#   scripts/launch_multinode.sh TRACK [launcher options] [--] [track arguments]
#
# TRACK: deit (deit/main.py) | imagenet, alias resnet (imagenet/image_classification.py). Everything after the
# launcher options (or after --) goes to the track unchanged. Run the same command on every node.
#
# Launcher options (each falls back to an environment variable, then a default):
#   --nnodes N             NNODES          number of nodes (default 1)
#   --node-rank R          NODE_RANK       0 on the node that hosts the rendezvous store (default 0). With c10d the
#                                          global ranks are assigned at rendezvous; R only decides the host.
#   --nproc-per-node G     NPROC_PER_NODE  processes per node (default: the GPUs nvidia-smi lists, else 1)
#   --rdzv-endpoint H:P    RDZV_ENDPOINT   host:port of node 0, reachable from every node (default localhost:29500;
#                                          required when N > 1)
#   --rdzv-id ID           RDZV_ID         job id shared by all nodes (default projector-kd-TRACK)
#   --dry-run                              print the torchrun command instead of running it
#
# Examples (2 nodes x 8 GPUs; node 0 is reachable as node0.cluster):
#   node 0: scripts/launch_multinode.sh deit --nnodes 2 --node-rank 0 --rdzv-endpoint node0.cluster:29500 \
#             -- --model tiny --train_student --data-path /data/imagenet
#   node 1: the same with --node-rank 1
#   ResNet: scripts/launch_multinode.sh imagenet --nnodes 2 --node-rank R --rdzv-endpoint node0.cluster:29500 \
#             -- --config configs/ilsvrc2012/ours/res3418.yaml --log log/output.txt --world_size 16 -adjust_lr
# Learning-rate scaling per recipe: docs/scaling.md.
set -euo pipefail

die() {
  echo "error: $*" >&2
  exit 2
}

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
[ $# -ge 1 ] || die "name a track: scripts/launch_multinode.sh deit|imagenet [options] [--] [track arguments]"
TRACK="$1"
shift
case "$TRACK" in
  deit) ENTRY="$ROOT/deit/main.py" ;;
  imagenet | resnet) TRACK=imagenet; ENTRY="$ROOT/imagenet/image_classification.py" ;;
  *) die "unknown track '$TRACK'; use deit or imagenet" ;;
esac

NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
NPROC_PER_NODE="${NPROC_PER_NODE:-}"
RDZV_ENDPOINT="${RDZV_ENDPOINT:-}"
RDZV_ID="${RDZV_ID:-projector-kd-$TRACK}"
DRY_RUN=0

need_value() {
  if [ $# -lt 2 ] || [ -z "$2" ]; then die "$1 needs a value"; fi
}

while [ $# -gt 0 ]; do
  case "$1" in
    --nnodes) need_value "$@"; NNODES="$2"; shift 2 ;;
    --node-rank) need_value "$@"; NODE_RANK="$2"; shift 2 ;;
    --nproc-per-node) need_value "$@"; NPROC_PER_NODE="$2"; shift 2 ;;
    --rdzv-endpoint) need_value "$@"; RDZV_ENDPOINT="$2"; shift 2 ;;
    --rdzv-id) need_value "$@"; RDZV_ID="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --) shift; break ;;
    *) break ;;
  esac
done

is_count() {
  [[ "$1" =~ ^[0-9]+$ ]] && [ "$1" -ge "$2" ]
}

is_count "$NNODES" 1 || die "--nnodes (NNODES) must be an integer >= 1, got '$NNODES'"
if ! is_count "$NODE_RANK" 0 || [ "$NODE_RANK" -ge "$NNODES" ]; then
  die "--node-rank (NODE_RANK) must be an integer in [0, $((NNODES - 1))], got '$NODE_RANK'"
fi
if [ -z "$NPROC_PER_NODE" ]; then
  NPROC_PER_NODE=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU ' || true)
  [ "$NPROC_PER_NODE" -ge 1 ] || NPROC_PER_NODE=1
fi
is_count "$NPROC_PER_NODE" 1 || die "--nproc-per-node (NPROC_PER_NODE) must be an integer >= 1, got '$NPROC_PER_NODE'"
if [ -z "$RDZV_ENDPOINT" ]; then
  [ "$NNODES" -eq 1 ] || die "--rdzv-endpoint HOST:PORT (RDZV_ENDPOINT) is required with $NNODES nodes: node 0's \
address, reachable from every node"
  RDZV_ENDPOINT="localhost:29500"
fi
[[ "$RDZV_ENDPOINT" =~ ^[^:]+:[0-9]+$ ]] || die "--rdzv-endpoint must be HOST:PORT, got '$RDZV_ENDPOINT'"

if [ "$NODE_RANK" -eq 0 ]; then IS_HOST=true; else IS_HOST=false; fi
PYTHON="${PYTHON:-python}"
[ -x "$ROOT/.venv/bin/python" ] && [ "$PYTHON" = python ] && PYTHON="$ROOT/.venv/bin/python"

CMD=("$PYTHON" -m torch.distributed.run
  --nnodes "$NNODES" --nproc-per-node "$NPROC_PER_NODE"
  --rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "$RDZV_ID" --rdzv-conf "is_host=$IS_HOST"
  "$ENTRY" "$@")

if [ "$DRY_RUN" -eq 1 ]; then
  printf '%q ' "${CMD[@]}"
  echo
  exit 0
fi
exec "${CMD[@]}"
