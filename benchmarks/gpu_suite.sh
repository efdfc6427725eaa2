#!/usr/bin/env bash
# Every GPU check and benchmark of the project in one call, on one H100/H200. Run from anywhere:
#     OUT=/some/dir bash benchmarks/gpu_suite.sh          # GPU, full shapes
#     OUT=/some/dir bash benchmarks/gpu_suite.sh --cpu    # CPU dry run of the plumbing (CI)
# What comes back is two files in $OUT (default benchmarks/results/): suite.tar.gz (every log and
# JSON, repacked after each step, so a suite killed from outside still returns what it measured) and
# summary.txt (the table against the targets, also printed last). Logs are unbuffered. Step limits
# are shares of one budget (SUITE_BUDGET_S, default 450 s), each capped by the time still left, so
# the whole suite ends inside it; a failing or timed-out step is reported and the others still run.
# The first step runs the kernel tests, which compile the Triton kernels the benchmarks then time.
# Needs no Hydra except for the trainer tests. The Python is ${PYTHON:-python3}.
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=full
[ "${1:-}" = "--cpu" ] && MODE=cpu
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
# The grouped GEMMs' autotuner (on by default on CUDA) compiles and times a few tile configs per
# bucket on first use: only bench_grouped_gemm runs it (autotuned vs heuristic rows side by side), so
# the other steps keep their budgets and time the deterministic default. Its choices come back in
# the tarball (kernel_cache/gemm_configs.json).
export GPTOSS_KERNEL_AUTOTUNE=0
export OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
WORK="$(mktemp -d)"  # logs and JSONs; packed into $OUT/suite.tar.gz after every step
export GPTOSS_KERNEL_CACHE_DIR="$WORK/kernel_cache"
BUDGET="${SUITE_BUDGET_S:-450}"
START=$SECONDS
failed=()

pack() { tar -czf "$OUT/suite.tar.gz.part" -C "$WORK" . && mv "$OUT/suite.tar.gz.part" "$OUT/suite.tar.gz"; }

step() {  # step NAME SHARE COMMAND...: run COMMAND with SHARE % of the budget (at most what is left)
    local name=$1 share=$2
    shift 2
    local left=$((BUDGET - (SECONDS - START) - 15))  # 15 s kept for the summary and packing
    local limit=$((BUDGET * share / 100))
    [ "$limit" -gt "$left" ] && limit=$left
    if [ "$limit" -le 5 ]; then
        echo "!!! $name skipped: the budget is spent"
        failed+=("$name (no time left)")
        return
    fi
    echo "=== $name (limit ${limit}s): $*"
    local t0=$SECONDS
    OUT="$WORK" timeout --kill-after=5 "$limit" "$@" >"$WORK/$name.log" 2>&1
    local rc=$?
    tail -n 15 "$WORK/$name.log"
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        echo "!!! $name TIMED OUT after ${limit}s"
        failed+=("$name (timeout)")
    elif [ "$rc" -ne 0 ]; then
        echo "!!! $name FAILED (exit $rc)"
        failed+=("$name (exit $rc)")
    fi
    echo "=== $name took $((SECONDS - t0))s"
    pack
}

{
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
} >"$WORK/device.log" 2>&1
cat "$WORK/device.log"

if [ "$MODE" = cpu ]; then
    # The plumbing only: two fast benchmarks in their --cpu mode, then the summary of what they wrote.
    step bench_grouped_gemm 40 "$PY" benchmarks/bench_grouped_gemm.py --cpu
    step bench_moe_layer 50 "$PY" benchmarks/bench_moe_layer.py --cpu
else
    # Compile first, check first: kernel tests (fp32/fp16, bf16 at >= 128 rows per expert, LoRA fused).
    step kernel_tests 14 "$PY" -m pytest tests/kernels -q -rs -x
    # The CUDA paths CPU tests cannot reach (compiled flex gradients, bf16 backends, the trainer on a GPU).
    step gpu_tests 16 "$PY" -m pytest tests/gpu -q -rs
    # Also autotunes the grouped GEMMs (a few candidates per bucket, compiled and timed once) and times
    # the heuristic config, the persistent grid and TMA weight loads beside it (forward).
    GPTOSS_KERNEL_AUTOTUNE=1 step bench_grouped_gemm 12 "$PY" benchmarks/bench_grouped_gemm.py
    step bench_moe_layer 10 "$PY" benchmarks/bench_moe_layer.py
    step bench_attention 7 "$PY" benchmarks/bench_attention.py
    step train_step_lora 15 "$PY" benchmarks/bench_train_step.py --step lora --budget-s 25
    step train_step_20b_memory 10 "$PY" benchmarks/bench_train_step.py --full-20b-lora-memory
    step bench_memory 6 "$PY" benchmarks/bench_memory.py
    step train_step_sft 8 "$PY" benchmarks/bench_train_step.py --step sft --budget-s 10
    step bench_data 2 "$PY" benchmarks/bench_data.py
    # Long context, only with LONG=1 (give it SUITE_BUDGET_S=700): flex vs our triton flash attention
    # at 32K and 128K tokens, and the gpt-oss-20b LoRA step as recipe gptoss20b_lora_128k runs it
    # (24 layers, checkpointing, inputs offloaded to the host) at 32K / 64K / 128K tokens.
    if [ "${LONG:-0}" = 1 ]; then
        step bench_attention_long 13 "$PY" benchmarks/bench_attention.py --long
        step long_context_20b 21 "$PY" benchmarks/bench_long_context.py --offload
    fi
fi

"$PY" benchmarks/common.py "$WORK" --mode "$MODE" >"$WORK/summary.txt" 2>&1
cp "$WORK/summary.txt" "$OUT/summary.txt"
pack
rm -rf "$WORK"
echo "suite took $((SECONDS - START))s of a ${BUDGET}s budget; files in $OUT: suite.tar.gz summary.txt"
if [ ${#failed[@]} -gt 0 ]; then
    printf '!!! failed: %s\n' "${failed[@]}"
fi
cat "$OUT/summary.txt"
[ ${#failed[@]} -eq 0 ]
