"""Compile every kernel launch of the GPT-OSS-20B expert path for Hopper (sm_90), with no GPU.

Run as a script, without TRITON_INTERPRET (the kernels must be real @triton.jit functions):
    python tests/kernels/sm90_aot.py                # the configs the launchers use by default
    python tests/kernels/sm90_aot.py --all-configs  # every autotune candidate of every grouped-GEMM
                                                    # launch, with its persistent-grid and TMA variants
The public ops run on `meta` tensors at real shapes (bf16, 16k tokens x top-4 over 32 experts,
H = I = 2880, plus a LoRA-sized grouped_linear); each kernel object is swapped for a recorder,
so what gets compiled is exactly what the launchers would launch (the expert MLP with dense weights, and
with the checkpoint's MXFP4 weights, with and without LoRA), specialized the way Triton's
JIT specializes (ints equal to 1 become constants, 16-divisible ints and pointers get hints).
Each compiled kernel must fit Hopper's shared memory, use wgmma if it does matrix products (the
grouped GEMM's 16- and 32-row tiles excepted: wgmma needs 64 rows), spill no registers, and keep
the occupancy it is designed for (gemm_configs.designed_ctas_per_sm: registers per thread and shared
memory for that many CTAs per SM). The grouped GEMM's epilogue loads no bf16 element by itself (at
most one bias element), the SwiGLU backward reads its h tile in 16-byte vectors, and the persistent
variant's tile and K loops are flattened into one pipelined loop. A grouped GEMM with an MXFP4 weight
keeps the occupancy mxfp4_configs designs for it and copies its packed codes in 16-byte pieces. Prints one
line per kernel, FAIL lines for violations, and exits non-zero if there was any.
"""

import os
import sys
from pathlib import Path

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET"
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
from sm90_facts import Facts, basic_problems, compile_sm90, occupancy_problems  # noqa: E402
from triton._C.libtriton import native_specialize_impl  # noqa: E402
from triton.backends.compiler import BaseBackend  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: E402

from gptoss_kernels import (  # noqa: E402
    _runtime,
    gemm_configs,
    grouped_dw,
    grouped_gemm,
    mxfp4_configs,
    mxfp4_tile,
    scatter_combine,
    tile_map,
)
from gptoss_kernels.gemm_configs import SM90_SHARED, SWIGLU_BWD, TileConfig  # noqa: E402
from gptoss_kernels.grouped_linear import grouped_linear  # noqa: E402
from gptoss_kernels.moe_experts import expert_mlp  # noqa: E402
from gptoss_kernels.moe_lora import expert_mlp_lora  # noqa: E402
from gptoss_kernels.mxfp4 import Mxfp4Weight  # noqa: E402

OPTIONS = ("num_warps", "num_stages")
# CTAs per SM the other kernels are designed for: the memory-bound ones want many warps in flight.
OTHER_OCCUPANCY = {"_tile_map_kernel": 1, "_segment_sum_kernel": 4, "_combine_bwd_kernel": 4, "_dequantize_kernel": 4}


class Recorder:
    """Stands in for a kernel object: records launches instead of running them."""

    def __init__(self, kernel, launches):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.kernel, args, kwargs))


def record_launches(all_configs: bool = False):
    launches = []
    for module, name in (
        (tile_map, "_tile_map_kernel"),
        (mxfp4_tile, "_dequantize_kernel"),
        (grouped_gemm, "_grouped_gemm_kernel"),
        (grouped_gemm, "_grouped_gemm_persistent_kernel"),
        (grouped_dw, "_grouped_dw_kernel"),
        (scatter_combine, "_segment_sum_kernel"),
        (scatter_combine, "_combine_bwd_kernel"),
    ):
        setattr(module, name, Recorder(getattr(module, name), launches))
    _runtime.check_tensors = lambda *tensors: None  # meta tensors are fine for recording
    if all_configs:  # every candidate the autotuner could pick, persistent and TMA variants included
        gemm_configs.set_variants(persistent=True, tma=True)
        choose = gemm_configs.choose

        def record_every_candidate(key, cands, device, launch):
            for config in cands:
                launch(config)
            return choose(key, cands, device, launch)

        gemm_configs.choose = record_every_candidate

    def meta(*shape, dtype=torch.bfloat16, grad=True):
        return torch.empty(*shape, dtype=dtype, device="meta", requires_grad=grad)

    def mxfp4(num_experts, n_out, n_in):  # as the checkpoint stores a projection: (out, in), 32 inputs a group
        return Mxfp4Weight(
            meta(num_experts, n_out, n_in // 32, 16, dtype=torch.uint8, grad=False),
            meta(num_experts, n_out, n_in // 32, dtype=torch.uint8, grad=False),
        )

    tokens, top_k, experts, hidden, width = 16384, 4, 32, 2880, 2880
    m = tokens * top_k
    counts = torch.empty(experts, dtype=torch.int32, device="meta")
    gather_idx = torch.empty(m, dtype=torch.int64, device="meta")
    x = meta(tokens, hidden)
    y = expert_mlp(
        x,
        counts,
        meta(experts, hidden, 2 * width),
        meta(experts, 2 * width),
        meta(experts, width, hidden),
        meta(experts, hidden),
        gather_idx=gather_idx,
    )
    out = scatter_combine.scatter_combine(y, gather_idx, meta(m), tokens)
    out.backward(torch.empty_like(out))
    lora = grouped_linear(meta(m, hidden), counts, meta(experts, hidden, 16))  # LoRA A, rank 16
    lora.backward(torch.empty_like(lora))
    if not all_configs:  # LoRA on the experts: the low-rank term joins every GEMM of the path
        rank, frozen = 16, dict(grad=False)
        adapters = [
            (meta(experts, hidden, rank), meta(experts, rank, 2 * width)),
            (meta(experts, width, rank), meta(experts, rank, hidden)),
        ]
        y = expert_mlp_lora(
            meta(tokens, hidden),
            counts,
            meta(experts, hidden, 2 * width, **frozen),
            meta(experts, 2 * width, **frozen),
            meta(experts, width, hidden, **frozen),
            meta(experts, hidden, **frozen),
            *adapters,
            2.0,
            gather_idx=gather_idx,
        )
        y.backward(torch.empty_like(y))
        # The same on the checkpoint's MXFP4 experts (frozen; their biases train), with and without LoRA.
        y = expert_mlp_lora(
            meta(tokens, hidden),
            counts,
            mxfp4(experts, 2 * width, hidden),
            meta(experts, 2 * width),
            mxfp4(experts, hidden, width),
            meta(experts, hidden),
            *adapters,
            2.0,
            gather_idx=gather_idx,
        )
        y.backward(torch.empty_like(y))
    mxfp4_tile.dequantize(mxfp4(experts, hidden, width), torch.bfloat16)  # whole experts (the GEMM's helper)
    for few in (tokens,) + ((512, 256, 64) if all_configs else ()):  # all configs: every tile bucket
        idx = torch.empty(few * top_k, dtype=torch.int64, device="meta")
        y = expert_mlp(
            meta(few, hidden),
            counts,
            mxfp4(experts, 2 * width, hidden),
            meta(experts, 2 * width),
            mxfp4(experts, hidden, width),
            meta(experts, hidden),
            gather_idx=idx,
        )
        y.backward(torch.empty_like(y))
    if all_configs:  # fewer rows per expert: the 64-, 32- and 16-row tile buckets' candidates
        for few in (512, 256, 64):
            x = meta(few, hidden)
            idx = torch.empty(few * top_k, dtype=torch.int64, device="meta")
            y = expert_mlp(
                x,
                counts,
                meta(experts, hidden, 2 * width),
                meta(experts, 2 * width),
                meta(experts, width, hidden),
                meta(experts, hidden),
                gather_idx=idx,
            )
            y.backward(torch.empty_like(y))
    return launches


def to_source(kernel, args, kwargs):
    names = kernel.arg_names
    bound = dict(zip(names, args), **{k: v for k, v in kwargs.items() if k not in OPTIONS})
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(names):
        value = bound[name]
        if kernel.params[i].is_constexpr:
            signature[name], constexprs[name] = "constexpr", value
            continue
        kind, hint = native_specialize_impl(BaseBackend, value, False, True, True)
        signature[name] = kind
        if kind == "constexpr":
            constexprs[name] = value
        elif hint == "D":
            attrs[(i,)] = [["tt.divisibility", 16]]
    return ASTSource(kernel, signature, constexprs, attrs), {k: kwargs[k] for k in OPTIONS if k in kwargs}


def gemm_problems(kernel_name: str, facts: Facts, kwargs: dict, tma: bool) -> list[str]:
    """The grouped GEMM's rules: see the module docstring."""
    block_m, block_n, warps = kwargs["BLOCK_M"], kwargs["BLOCK_N"], kwargs["num_warps"]
    persistent = kernel_name == "_grouped_gemm_persistent_kernel"
    config = TileConfig(block_n, kwargs["BLOCK_K"], warps, kwargs["num_stages"], kwargs["GROUP_M"], persistent)
    mxfp4 = kwargs["W_MXFP4"]
    ctas = (mxfp4_configs if mxfp4 else gemm_configs).designed_ctas_per_sm(block_m, config, kwargs["EPILOGUE"])
    # wgmma needs 64 rows per warpgroup: the 16- and 32-row tiles use mma.sync.
    problems = basic_problems(facts, needs_wgmma=block_m >= 64) + occupancy_problems(facts, ctas)
    if facts.bytes16_scalar_loads() > 1:
        problems.append(f"{facts.bytes16_scalar_loads()} scalar bf16 global loads (an unvectorised epilogue)")
    if kwargs["EPILOGUE"] == SWIGLU_BWD:  # the h tile [BLOCK_M, 2 * BLOCK_N] in 16-byte pieces
        need = block_m * 2 * block_n * 2 // (16 * 32 * warps)
        if facts.vector_loads(".v4.b32") < need:
            problems.append(f"h tile read with {facts.vector_loads()} 16-byte loads per thread, expected {need}")
    if mxfp4:  # the packed codes (and A) go through cp.async, each thread's share of the codes in one piece
        codes_per_thread = block_n * kwargs["BLOCK_K"] // 2 // (32 * warps)
        if not facts.async_copies or min(facts.async_copies) < min(16, codes_per_thread):
            problems.append(
                f"global -> shared copies by bytes {facts.async_copies}: packed codes in pieces under "
                f"{min(16, codes_per_thread)} bytes"
            )
    if persistent and not facts.fused_loop:
        problems.append("the persistent tile loop and K loop are not flattened into one pipelined loop")
    if tma and not facts.tma:
        problems.append("no TMA load")
    return problems


def other_problems(kernel_name: str, facts: Facts, kwargs: dict) -> list[str]:
    if kernel_name == "_grouped_dw_kernel":  # 2 CTAs where their pipelines fit shared memory
        ctas = 2 if 2 * (facts.shared + 1024) <= SM90_SHARED else 1
        # (bias-only mode, for frozen weights with trained biases, has no product)
        return basic_problems(facts, needs_wgmma=kwargs["COMPUTE_DW"]) + occupancy_problems(facts, ctas)
    problems = basic_problems(facts, needs_wgmma=False) + occupancy_problems(facts, OTHER_OCCUPANCY[kernel_name])
    if kernel_name != "_tile_map_kernel" and not facts.vector_loads():
        problems.append("rows are not read in 16-byte vectors")
    return problems


def main() -> int:
    seen, failures = set(), 0
    for kernel, args, kwargs in record_launches(all_configs="--all-configs" in sys.argv[1:]):
        src, options = to_source(kernel, args, kwargs)
        name = kernel.fn.__name__
        key = (name, str(src.signature), str(sorted(src.constants.items())), str(options))
        if key in seen:
            continue
        seen.add(key)
        facts = compile_sm90(src, options, name)
        flags = {k: v for k, v in kwargs.items() if k.isupper() and k != "DOT_PRECISION"}
        if facts.async_copies:
            flags["cp.async"] = facts.async_copies
        tma = any(isinstance(a, TensorDescriptor) for a in args)
        print(f"{facts.line()} {options} {flags}" + (f" tma={facts.tma}" if tma else ""), flush=True)
        if name.startswith("_grouped_gemm"):
            problems = gemm_problems(name, facts, kwargs, tma)
        else:
            problems = other_problems(name, facts, kwargs)
        if problems:
            print(f"FAIL {name}: {', '.join(problems)}")
            failures += 1
    print(f"{len(seen)} kernel variants compiled for sm_90, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
