"""How many Triton kernels each step of benchmarks/gpu_suite.sh compiles, counted on CPU.

    TRITON_INTERPRET=0 python tests/benchmarks/suite_compiles.py     # prints one JSON object

`kernel_tests` runs the suite's own selection (`pytest tests/kernels -m gpu`) under the recorder
plugin (compile_recorder.py). The benchmark steps are replayed: the kernel-launching calls of each
benchmark (the ops, backends and variants it runs; its shape constants imported from the script
itself) run on `meta` tensors with the kernels recorded. Routing does not change a compile key (the
counts are device data), so one routing stands for both. The training steps run the model in bf16
throughout: the trainer's fp32 adapters and masters reach the kernels cast to bf16 under autocast,
so the kernels see the same types. Compiled FlexAttention (Inductor) is not a Triton JIT launch:
`flex_graphs` counts the graphs a step compiles (forward and backward per mask), by what it runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks"), str(ROOT / "tests" / "benchmarks")]
assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run with TRITON_INTERPRET unset or 0"

import compile_recorder  # noqa: E402
import torch  # noqa: E402

BF16 = torch.bfloat16


def _meta_autocast() -> None:
    """Autocast has no meta device: treat it as off there (the model then runs its stored dtype)."""
    real_autocast, real_enabled = torch.autocast, torch.is_autocast_enabled

    class MetaAutocast(real_autocast):
        def __init__(self, device_type, *args, **kwargs):
            super().__init__("cpu" if device_type == "meta" else device_type, *args, **kwargs)

    torch.autocast = MetaAutocast
    torch.is_autocast_enabled = lambda *args: False if args and args[0] == "meta" else real_enabled(*args)


def meta(*shape, dtype=BF16, grad=True):
    return torch.empty(*shape, dtype=dtype, device="meta", requires_grad=grad)


def fwd_bwd(y):
    y.backward(torch.empty_like(y))


def grouped_gemm_step() -> int:
    import bench_grouped_gemm as b

    from gptoss_kernels import gemm_configs
    from gptoss_kernels.grouped_linear import grouped_linear
    from gptoss_kernels.moe_experts import expert_mlp
    from gptoss_kernels.mxfp4 import Mxfp4Weight
    from gptoss_kernels.scatter_combine import scatter_combine

    c = b.FULL
    t, e, h, i = c["tokens"], c["experts"], c["hidden"], c["width"]
    m = t * c["top_k"]
    counts = torch.empty(e, dtype=torch.int32, device="meta")
    gather_idx = torch.empty(m, dtype=torch.int64, device="meta")
    with gemm_configs.settings(autotune=True):  # the suite runs this step with autotuning on
        for k, n in ((h, 2 * i), (i, h)):
            x, w = meta(m, k), meta(e, k, n)
            for variant in (dict(), dict(autotune=False)):  # `triton` and `triton_heuristic`, fwd and fwd+bwd
                with gemm_configs.settings(**variant):
                    fwd_bwd(grouped_linear(x, counts, w))
            for variant in (dict(persistent=True), dict(tma=True)):  # forward only
                with gemm_configs.settings(autotune=False, **variant):
                    grouped_linear(x, counts, w)
        for frozen in (False, True):
            x = meta(t, h)
            weights = [meta(*s, grad=not frozen) for s in ((e, h, 2 * i), (e, 2 * i), (e, i, h), (e, h))]
            fwd_bwd(expert_mlp(x, counts, *weights, gather_idx=gather_idx))
        for n_in, n_out in ((h, 2 * i), (i, h)):  # the MXFP4 rows and their bf16 twins: forward and dX
            packed = Mxfp4Weight(
                meta(e, n_out, n_in // 32, 16, dtype=torch.uint8, grad=False),
                meta(e, n_out, n_in // 32, dtype=torch.uint8, grad=False),
            )
            w = meta(e, n_in, n_out, grad=False)
            for a, weight in (
                (meta(m, n_in), packed),
                (meta(m, n_in), w),
                (meta(m, n_out), packed.transpose(1, 2)),
                (meta(m, n_out), w.transpose(1, 2)),
            ):
                grouped_linear(a.detach(), counts, weight)
        y = meta(m, h)
        fwd_bwd(scatter_combine(y, gather_idx, meta(m, dtype=torch.float32), t))
    return 0


def moe_layer_step() -> int:
    import bench_moe_layer as b

    from engine.moe.layer import MoEBlock

    c = b.FULL
    with torch.device("meta"):
        block = MoEBlock(
            c["hidden"], c["width"], c["experts"], c["top_k"], alpha=1.702, limit=7.0, experts_backend="triton"
        ).to(BF16)
    x = meta(1, c["tokens"], c["hidden"])
    fwd_bwd(block(x))  # the layer; the experts call alone and the other phases run the same kernels
    return 0


def _attention_kernels(seqs, windows=(None, 128)) -> None:
    from gptoss_kernels.flash_attention import flash_attention

    for t in seqs:
        for window in windows:
            q = meta(1, t, 64, 64).transpose(1, 2)
            k, v = (meta(1, t, 8, 64).transpose(1, 2) for _ in range(2))
            fwd_bwd(flash_attention(q, k, v, meta(64), window=window, doc_ids=None))


def attention_step() -> int:
    import bench_attention as b

    _attention_kernels(b.FULL["seqs"])
    return 2 * len(b.FULL["seqs"]) * 2  # flex: per layer type a forward and a backward graph


def attention_long_step() -> int:
    import bench_attention as b

    _attention_kernels(b.LONG["seqs"])
    return 2 * len(b.LONG["seqs"]) * 2


def _model_step(layers: int, lora: bool, checkpointing: bool = False, seq: int = 4096) -> None:
    from engine.models.gpt_oss import GptOssConfig, GptOssForCausalLM, ModelOptions
    from engine.parallel.parallelize import apply_activation_checkpointing
    from engine.peft import LoraConfig, apply_lora

    cfg = GptOssConfig.gpt_oss_20b(num_hidden_layers=layers)
    with torch.device("meta"):
        model = GptOssForCausalLM(cfg, ModelOptions(experts_backend="triton", attn_backend="eager")).to(BF16)
        if lora:
            apply_lora(model, LoraConfig(rank=32, alpha=32.0))
    apply_activation_checkpointing(model, checkpointing)
    ids = torch.empty(1, seq, dtype=torch.int64, device="meta")
    fwd_bwd(model.train().hidden_states(ids))  # the loss (torch ops, a host sync) launches no kernel of ours


def train_step_lora() -> int:
    import bench_train_step as b

    _model_step(b.FULL["layers"]["lora"], lora=True)
    return 4 + 4  # ours (flex, sliding and full, forward and backward) and transformers' flex_attention


def train_step_sft() -> int:
    import bench_train_step as b

    _model_step(b.FULL["layers"]["sft"], lora=False)
    return 4 + 4


def train_step_20b_memory() -> int:
    _model_step(24, lora=True, checkpointing=True)
    return 4


def memory_step() -> int:
    from engine.moe.layer import MoEBlock
    from engine.peft import LoraConfig, apply_lora

    with torch.device("meta"):
        plain = MoEBlock(2880, 2880, 32, 4, alpha=1.702, limit=7.0, experts_backend="triton").to(BF16)
        adapted = MoEBlock(2880, 2880, 32, 4, alpha=1.702, limit=7.0, experts_backend="triton").to(BF16)
        apply_lora(adapted, LoraConfig(rank=16, alpha=32.0, target_modules=["gate_up_proj", "down_proj"]))
    plain(meta(1, 4096, 2880))  # forward only: the bytes kept for a backward
    adapted(meta(1, 4096, 2880))
    return 4  # ours flex, sliding and full, forward and backward (its compile call runs both)


def long_context_step() -> int:
    import bench_long_context as b

    for seq in [4096] + b.GPU_SEQS:  # the warm-up step, then each length (triton attention)
        _model_step(24, lora=True, checkpointing=True, seq=seq)
    _attention_kernels([4096] + b.GPU_SEQS)
    return 0


REPLAYS = {
    "bench_grouped_gemm": grouped_gemm_step,
    "bench_moe_layer": moe_layer_step,
    "bench_attention": attention_step,
    "train_step_lora": train_step_lora,
    "train_step_20b_memory": train_step_20b_memory,
    "bench_memory": memory_step,
    "train_step_sft": train_step_sft,
    "bench_attention_long": attention_long_step,
    "long_context_20b": long_context_step,
}


def kernel_tests(tmp: Path) -> dict:
    """The suite's kernel step itself, its GPU tests run on CPU under the recorder plugin."""
    out = tmp / "kernel_tests.json"
    env = {**os.environ, "TRITON_INTERPRET": "0", "GPTOSS_RECORD_COMPILES": str(out)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "tests/kernels",
            "-m",
            "gpu",
            "-q",
            "-p",
            "tests.benchmarks.compile_recorder",
            "-p",
            "no:cacheprovider",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if not out.exists():
        raise RuntimeError(f"the recorded kernel tests wrote nothing:\n{proc.stdout[-3000:]}{proc.stderr[-2000:]}")
    return {**json.loads(out.read_text()), "flex_graphs": 0}


def main() -> None:
    import tempfile

    _meta_autocast()
    launches = compile_recorder.install()
    report = {}
    for step, replay in REPLAYS.items():
        launches.clear()
        flex = replay()
        keys = compile_recorder.compile_keys(launches)
        report[step] = {
            "compiles": len(keys),
            "launches": len(launches),
            "flex_graphs": flex,
            "kernels": compile_recorder.per_kernel(keys),
        }
    with tempfile.TemporaryDirectory() as tmp:
        report["kernel_tests"] = kernel_tests(Path(tmp))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
