#!/usr/bin/env bash
# One node, every local GPU, NCCL (chosen automatically when CUDA is available).
#   bash launch/train_gpu.sh [TP] [extra dist_ortho.train arguments...]
# TP defaults to the number of GPUs (data parallelism is not implemented yet, so TP = world).
set -euo pipefail
gpus=$(python -c "import torch; print(torch.cuda.device_count())")
tp=${1:-$gpus}; shift || true
exec torchrun --standalone --nproc-per-node "$gpus" -m dist_ortho.train --tp "$tp" \
  --layers 8 --hidden 1024 --heads 16 --groups 4 --ffn 4096 --seq-len 1024 --batch-size 16 --steps 2000 \
  --optimizer muon --compare adamw --out "${OUT:-runs/gpu}" "$@"
