#!/usr/bin/env bash
# Orthogonalize a sharded matrix at TP=2 on CPU (gloo) in every mode; prints agreement and time.
set -euo pipefail
exec torchrun --standalone --nproc-per-node "${NPROC:-2}" -m dist_ortho.demo "$@"
