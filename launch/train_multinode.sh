#!/usr/bin/env bash
# Several nodes with torchrun rendezvous. Run the same command on every node:
#   NNODES=2 NPROC=8 MASTER=node0.example:29500 JOB=dist-ortho bash launch/train_multinode.sh [args...]
# With NNODES=2 and NPROC=8 the world is 16 ranks; pass --tp 16 (TP = world until data parallelism lands).
set -euo pipefail
exec torchrun --nnodes "${NNODES:?}" --nproc-per-node "${NPROC:?}" \
  --rdzv-backend c10d --rdzv-endpoint "${MASTER:?}" --rdzv-id "${JOB:-dist-ortho}" \
  -m dist_ortho.train --optimizer muon --out "${OUT:-runs/multinode}" "$@"
