#!/usr/bin/env bash
# Every GPU check and benchmark of the project in one call, on one H100/H200. Run from anywhere:
#     OUT=/some/dir bash benchmarks/gpu_suite.sh
# Each step writes its log (and its JSON, if it makes one) into $OUT, default benchmarks/results/,
# and ends with a summary table of the JSONs against the targets (benchmarks/README.md).
# Each step has its own time limit (seconds, below), so a hang costs that step only; the limits
# add up to 8 min 10 s, startup included (LONG=1 adds the long-context steps: 12 min 10 s). A failing
# or timed-out step is reported and the others still run; the exit status is 1 if any step failed. To add a benchmark, add one `step` line.
# Needs no Hydra: the benchmarks import engine.models / engine.moe / engine.peft / kernels directly.
set -uo pipefail
cd "$(dirname "$0")/.."
export OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
failed=()

step() {  # step NAME SECONDS COMMAND...: run COMMAND under a time limit, log in $OUT/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s): $*"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        echo "!!! $name TIMED OUT after ${limit}s"
        failed+=("$name (timeout)")
    elif [ "$rc" -ne 0 ]; then
        echo "!!! $name FAILED (exit $rc)"
        failed+=("$name (exit $rc)")
    fi
    echo "=== $name took $((SECONDS - start))s"
}

# The trainer test needs Hydra; a machine without it can be given wheels in $WHEELS (default .whl/).
WHEELS="${WHEELS:-.whl}"
if ! python -c "import hydra" 2>/dev/null && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    python -m pip install -q --no-index --no-deps --target /tmp/suite-site "$WHEELS"/*.whl \
        && export PYTHONPATH="/tmp/suite-site${PYTHONPATH:+:$PYTHONPATH}"
fi

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

# Kernel correctness on the GPU: fp32 and fp16 cases plus the bf16 ones the interpreter can't run.
step kernel_tests 50 python -m pytest tests/kernels -q -rs
# The CUDA paths CPU tests cannot reach (compiled flex gradients, bf16 backends, the trainer on a GPU)
step gpu_tests 110 python -m pytest tests/gpu -q -rs
# Grouped GEMM / expert MLP / combine timings at GPT-OSS-20B shapes -> grouped_gemm_full.json
step bench_grouped_gemm 40 python benchmarks/bench_grouped_gemm.py
# MoE layer vs transformers' GptOssMLP, random and skewed routing -> moe_layer_full.json
step bench_moe_layer 45 python benchmarks/bench_moe_layer.py
# Attention backends (eager, flex, blockwise, triton) at seq 4096, sliding and full layers ->
# attention_full.json. Before the training steps: its FlexAttention compilations land in the
# inductor cache they then reuse.
step bench_attention 45 python benchmarks/bench_attention.py
# LoRA step (4 layers) vs transformers + peft, 30 s for its implementations -> train_step_lora_full.json
step train_step_lora 70 python benchmarks/bench_train_step.py --step lora --budget-s 25
# gpt-oss-20b LoRA, all 24 layers, seq 4096, checkpointing: peak memory -> train_step_20b_lora_memory_full.json
step train_step_20b_memory 55 python benchmarks/bench_train_step.py --full-20b-lora-memory
# Bytes saved for backward per token, MoE and attention layers, vs transformers -> memory_full.json
step bench_memory 30 python benchmarks/bench_memory.py
# Full SFT step (2 layers, fp32 master weights) vs transformers -> train_step_sft_full.json
step train_step_sft 35 python benchmarks/bench_train_step.py --step sft --budget-s 10
# Host-side data pipeline at seq 4096 (CPU work; the host must keep up) -> data_full.json
step bench_data 10 python benchmarks/bench_data.py
# Long context, only with LONG=1 (adds up to 4 min): flex vs our triton flash attention at 32K and
# 128K tokens -> attention_long.json; the gpt-oss-20b LoRA step as recipe gptoss20b_lora_128k runs
# it (24 layers, checkpointing, inputs offloaded to the host) with our triton attention at 32K /
# 64K / 128K tokens: peak memory, tokens/s, MFU -> long_context_full.json
if [ "${LONG:-0}" = 1 ]; then
    step bench_attention_long 90 python benchmarks/bench_attention.py --long
    step long_context_20b 150 python benchmarks/bench_long_context.py --offload
fi

python benchmarks/common.py "$OUT" --mode full
if [ ${#failed[@]} -gt 0 ]; then
    printf '!!! failed: %s\n' "${failed[@]}"
    exit 1
fi
echo "all steps passed"
