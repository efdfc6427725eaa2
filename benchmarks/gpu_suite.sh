#!/usr/bin/env bash
# Every GPU check and benchmark of the project in one call (keep it well under 8 minutes on one
# H100/H200). Run from anywhere:
#     OUT=/some/dir bash benchmarks/gpu_suite.sh
# Each step writes its log (and its JSON, if it makes one) into $OUT, default benchmarks/results/.
# To add a benchmark, add one `step` line at the end; a failing step does not stop the others.
set -uo pipefail
cd "$(dirname "$0")/.."
export OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
status=0

step() {  # step NAME COMMAND...: run COMMAND, keep its output in $OUT/NAME.log, note failures
    local name=$1
    shift
    echo "=== $name: $*"
    if ! "$@" 2>&1 | tee "$OUT/$name.log"; then
        echo "!!! $name FAILED"
        status=1
    fi
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

# Kernel correctness on the GPU: fp32 and fp16 cases plus the bf16 ones the interpreter can't run.
step kernel_tests python -m pytest tests/kernels -q -rs
# Grouped GEMM / expert MLP / combine timings at GPT-OSS-20B shapes -> $OUT/grouped_gemm_full.json
step bench_grouped_gemm python benchmarks/bench_grouped_gemm.py

exit $status
