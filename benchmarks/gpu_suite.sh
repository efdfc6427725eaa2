#!/usr/bin/env bash
# Every GPU check and benchmark of the project, on one H100/H200, inside one 600 s command. Run from anywhere:
#     OUT=/some/dir bash benchmarks/gpu_suite.sh           # GPU: the checks and benchmarks (~550 s)
#     OUT=/some/dir LONG=1 bash benchmarks/gpu_suite.sh    # GPU: long context alone, its own command (~550 s)
#     OUT=/some/dir bash benchmarks/gpu_suite.sh --cpu     # CPU dry run of the plumbing (CI)
# What comes back is two files in $OUT (default benchmarks/results/): suite.tar.gz (every log and
# JSON, repacked after each step, so a suite killed from outside still returns what it measured) and
# summary.txt (the steps' outcomes and the figures against the targets, also printed last). Logs are
# unbuffered. Step limits are shares of one budget (SUITE_BUDGET_S, default 550 s: a 600 s command
# with room to pack), each capped by the time still left, so the whole suite ends inside it; a
# failing or timed-out step is reported and the others still run. The first step runs the GPU kernel
# tests, which compile the Triton kernels the benchmarks then time. What the image lacks (Hydra for
# the trainer tests) is installed from the carried wheels folder (${WHEELS:-.whl}, made by
# benchmarks/gpu_wheels.sh) when an import is missing. The Python is ${PYTHON:-python3}.
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=full
[ "${1:-}" = "--cpu" ] && MODE=cpu
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
# The grouped GEMMs' autotuner compiles and times a few tile configs per bucket on first use: only
# bench_grouped_gemm runs it (autotuned vs heuristic rows side by side), so the other steps keep
# their budgets and time the deterministic default. Its choices come back in the tarball
# (kernel_cache/gemm_configs.json).
export GPTOSS_KERNEL_AUTOTUNE=0
export OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
WORK="$(mktemp -d)"  # logs and JSONs; packed into $OUT/suite.tar.gz after every step
SCRATCH="$(mktemp -d)"  # not packed: Triton's cache (counted per step) and installed wheels
export GPTOSS_KERNEL_CACHE_DIR="$WORK/kernel_cache"
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$SCRATCH/triton}"
BUDGET="${SUITE_BUDGET_S:-550}"
START=$SECONDS
failed=()
sections=()

pack() { tar -czf "$OUT/suite.tar.gz.part" -C "$WORK" . && mv "$OUT/suite.tar.gz.part" "$OUT/suite.tar.gz"; }
kernels_built() { find "$TRITON_CACHE_DIR" -name '*.cubin' 2>/dev/null | wc -l; }

step() {  # step NAME SHARE COMMAND...: run COMMAND with SHARE % of the budget (at most what is left)
    local name=$1 share=$2
    shift 2
    local left=$((BUDGET - (SECONDS - START) - 15))  # 15 s kept for the summary and packing
    local limit=$((BUDGET * share / 100))
    [ "$limit" -gt "$left" ] && limit=$left
    if [ "$limit" -le 5 ]; then
        echo "!!! $name skipped: the budget is spent"
        failed+=("$name (no time left)")
        printf '%s\t0\t0\tskipped: no time left\t\n' "$name" >>"$WORK/steps.tsv"
        return
    fi
    echo "=== $name (limit ${limit}s): $*"
    local t0=$SECONDS built0 outcome=ok
    built0=$(kernels_built)
    OUT="$WORK" timeout --kill-after=5 "$limit" "$@" >"$WORK/$name.log" 2>&1
    local rc=$?
    tail -n 15 "$WORK/$name.log"
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        outcome="TIMED OUT"
        failed+=("$name (timeout)")
    elif [ "$rc" -ne 0 ]; then
        outcome="FAILED (exit $rc)"
        failed+=("$name (exit $rc)")
    fi
    [ "$outcome" = ok ] || echo "!!! $name $outcome after $((SECONDS - t0))s"
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$limit" "$((SECONDS - t0))" "$outcome" \
        "$(($(kernels_built) - built0))" >>"$WORK/steps.tsv"
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
    sections=(grouped_gemm moe_layer)
elif [ "${LONG:-0}" = 1 ]; then
    # Long context, its own command: flex vs our triton flash attention at 32K and 128K tokens (triton
    # first), then the gpt-oss-20b LoRA step as recipe gptoss20b_lora_128k runs it (24 layers,
    # checkpointing, inputs offloaded to the host) at 32K / 64K / 128K tokens.
    step bench_attention_long 40 "$PY" benchmarks/bench_attention.py --long
    step long_context_20b 55 "$PY" benchmarks/bench_long_context.py --offload
    sections=(attention_long long_context)
else
    . benchmarks/install_wheels.sh
    install_wheels "${WHEELS:-.whl}" "$SCRATCH/site" hydra omegaconf antlr4 >"$WORK/install.log" 2>&1
    cat "$WORK/install.log"
    # Compile first, check first: the kernel tests that need a GPU (bf16 tiles, every Hopper tile
    # candidate, persistent grid and TMA on hardware, the real autotuner); the interpreter covers the rest in CI.
    step kernel_tests 10 "$PY" -m pytest tests/kernels -m gpu -q -rs -p no:cacheprovider
    # The CUDA paths CPU tests cannot reach (compiled flex gradients, bf16 backends, the trainer on a GPU).
    step gpu_tests 17 "$PY" -m pytest tests/gpu -q -rs -p no:cacheprovider
    # Also autotunes the grouped GEMMs (a few candidates per bucket, compiled and timed once) and times
    # the heuristic config, the persistent grid and TMA weight loads beside it (forward).
    GPTOSS_KERNEL_AUTOTUNE=1 step bench_grouped_gemm 11 "$PY" benchmarks/bench_grouped_gemm.py
    step bench_moe_layer 8 "$PY" benchmarks/bench_moe_layer.py
    step bench_attention 7 "$PY" benchmarks/bench_attention.py
    step train_step_lora 16 "$PY" benchmarks/bench_train_step.py --step lora --budget-s 25
    step train_step_20b_memory 10 "$PY" benchmarks/bench_train_step.py --full-20b-lora-memory
    step bench_memory 6 "$PY" benchmarks/bench_memory.py
    step train_step_sft 9 "$PY" benchmarks/bench_train_step.py --step sft --budget-s 10
    sections=(grouped_gemm moe_layer attention train_step_lora train_step_20b_lora_memory memory train_step_sft)
fi

"$PY" benchmarks/suite_summary.py "$WORK" --mode "$MODE" --sections "$(IFS=,; echo "${sections[*]}")" \
    >"$WORK/summary.txt" 2>&1
cp "$WORK/summary.txt" "$OUT/summary.txt"
pack
rm -rf "$WORK" "$SCRATCH"
echo "suite took $((SECONDS - START))s of a ${BUDGET}s budget; files in $OUT: suite.tar.gz summary.txt"
if [ ${#failed[@]} -gt 0 ]; then
    printf '!!! failed: %s\n' "${failed[@]}"
fi
cat "$OUT/summary.txt"
[ ${#failed[@]} -eq 0 ]
