#!/usr/bin/env bash
# The GPU check, for a lent GPU (one H200 with its preinstalled torch and triton, no network; megatron-core and
# TransformerEngine absent): at most ~10 minutes. Run from the repository root:
#
#     bash scripts/gpu_check.sh [OUT_DIR]       (default runs/gpu_check; the device tool's $OUT when set)
#
# 1. the gpu-marked tests (CUDA-graph capture of the step, the optimizer on CUDA against the per-matrix path);
# 2. the Triton SYRK kernel's correctness and speed against torch (scripts/bench_syrk.py);
# 3. the host benchmarks of the grouped step on CUDA, with and without CUDA-graph capture, and the Qwen3-30B-A3B
#    expert set at TP 1 (scripts/bench_host.py --device cuda);
# 4. the planner's profile fitted to this GPU (python -m dist_ortho.plan --calibrate --calibrate-device cuda);
# 5. Gram against plain Newton-Schulz in bf16 and fp16 on CUDA: error against float64, FLOPs, time
#    (scripts/bench_local_gram.py --half --device cuda; k = 1024, aspects 2, 4, 8);
# then one summary, summary.md, beside the JSON files. Each part has its own time limit; a failing part is
# reported in the summary and the others still run.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-runs/gpu_check}}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
status=()

part() {  # part NAME SECONDS COMMAND...: run with a time limit, log to $out/NAME.log, note the exit code
    local name=$1 seconds=$2
    shift 2
    echo "== $name (limit ${seconds}s)"
    timeout "$seconds" "$@" 2>&1 | tee "$out/$name.log"
    local rc=${PIPESTATUS[0]}
    status+=("$name: exit $rc")
}

"$py" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" \
    | tee "$out/env.txt"
part gpu_tests 120 "$py" -m pytest -q -p no:cacheprovider -m gpu -rs tests
part syrk 90 "$py" scripts/bench_syrk.py --json "$out/syrk.json"
part host 210 "$py" scripts/bench_host.py --device cuda --sections single host experts --repeats 5 --json "$out/host.json"
part calibrate 60 "$py" -m dist_ortho.plan --calibrate --calibrate-device cuda --out "$out/profile.json"
part gram_half 120 "$py" scripts/bench_local_gram.py --half --device cuda --half-k 1024 --aspects 2,4,8 \
    --sets quintic,polar_express,cans,deepseekv4 --repeats 10
{
    echo "# GPU check ($(cat "$out/env.txt"))"
    echo
    printf -- '- %s\n' "${status[@]}"
    for name in gpu_tests syrk host calibrate gram_half; do
        echo
        echo "## $name"
        echo
        grep -E '^\||passed|failed|skipped|host model|error|Error' "$out/$name.log" | tail -60
    done
} > "$out/summary.md"
cat "$out/summary.md"
