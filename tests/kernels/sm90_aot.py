"""Compile every kernel launch of the GPT-OSS-20B expert path for Hopper (sm_90), with no GPU.

Run as a script, without TRITON_INTERPRET (the kernels must be real @triton.jit functions):
    python tests/kernels/sm90_aot.py                # the configs the launchers use by default
    python tests/kernels/sm90_aot.py --all-configs  # every autotune candidate of every grouped-GEMM
                                                    # launch, with its persistent-grid and TMA variants
The public ops run on `meta` tensors at real shapes (bf16, 16k tokens x top-4 over 32 experts,
H = I = 2880, plus a LoRA-sized grouped_linear); each kernel object is swapped for a recorder,
so what gets compiled is exactly what the launchers would launch, specialized the way Triton's
JIT specializes (ints equal to 1 become constants, 16-divisible ints and pointers get hints).
Each compiled kernel must fit Hopper's shared memory, use wgmma if it does matrix products (the
grouped GEMM's 16- and 32-row tiles excepted: wgmma needs 64 rows), and spill no registers.
Prints one line per kernel, FAIL lines for violations, and exits non-zero if there was any.
"""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET"
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import triton  # noqa: E402
from triton._C.libtriton import native_specialize_impl  # noqa: E402
from triton.backends.compiler import BaseBackend, GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: E402

from gptoss_kernels import _runtime, gemm_configs, grouped_dw, grouped_gemm, scatter_combine, tile_map  # noqa: E402
from gptoss_kernels.grouped_linear import grouped_linear  # noqa: E402
from gptoss_kernels.moe_experts import expert_mlp  # noqa: E402

HOPPER_SMEM = 227 * 1024  # opt-in shared memory per block on H100/H200
OPTIONS = ("num_warps", "num_stages")
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


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


def main() -> int:
    seen, failures = set(), 0
    for kernel, args, kwargs in record_launches(all_configs="--all-configs" in sys.argv[1:]):
        src, options = to_source(kernel, args, kwargs)
        key = (kernel.fn.__name__, str(src.signature), str(sorted(src.constants.items())), str(options))
        if key in seen:
            continue
        seen.add(key)
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(compiled.asm["cubin"])
            f.flush()
            usage = subprocess.run(
                [str(CUOBJDUMP), "-res-usage", f.name], capture_output=True, text=True, check=True
            ).stdout
        regs_line = next(line.strip() for line in usage.splitlines() if "REG:" in line)
        stack = int(regs_line.split("STACK:")[1].split()[0])
        shared = compiled.metadata.shared
        uses_dot = "tl.dot" in kernel.src or "_gemm_tile(" in kernel.src  # the GEMMs' dot is in that helper
        # wgmma needs 64 rows per warpgroup: the grouped GEMM's 16- and 32-row tiles use mma.sync.
        if "_gemm_tile(" in kernel.src and kwargs["BLOCK_M"] < 64:
            uses_dot = False
        wgmma = "wgmma" in compiled.asm["ptx"]
        flags = {k: v for k, v in kwargs.items() if k.isupper() and k != "DOT_PRECISION"}
        tma = any(isinstance(a, TensorDescriptor) for a in args)
        print(
            f"{kernel.fn.__name__:21s} smem={shared:6d} stack={stack} wgmma={wgmma!s:5s} {options} {flags}"
            + (f" tma={'cp.async.bulk.tensor' in compiled.asm['ptx']}" if tma else "")
        )
        problems = [
            msg
            for bad, msg in (
                (shared > HOPPER_SMEM, "shared memory over Hopper's limit"),
                (stack > 0, "register spills"),
                (uses_dot and not wgmma, "no wgmma"),
                (tma and "cp.async.bulk.tensor" not in compiled.asm["ptx"], "no TMA load"),
            )
            if bad
        ]
        if problems:
            print(f"FAIL {kernel.fn.__name__}: {', '.join(problems)}")
            failures += 1
    print(f"{len(seen)} kernel variants compiled for sm_90, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
