#!/usr/bin/env bash
# The embedded default: 2 processes, TP=2, gloo on CPU; Muon (with AdamW for embeddings and norms) and
# an AdamW baseline on the Python standard library's source. Writes runs/demo/{loss.png,*/log.jsonl}.
# Extra arguments go to python -m dist_ortho.train (see --help), e.g. --steps 300 --muon-tp-mode gram.
# DP x TP: NPROC=4 TP=2 bash launch/train_cpu.sh (DP = NPROC / TP).
set -euo pipefail
exec torchrun --standalone --nproc-per-node "${NPROC:-2}" -m dist_ortho.train \
  --tp "${TP:-${NPROC:-2}}" --optimizer muon --compare adamw --out "${OUT:-runs/demo}" "$@"
