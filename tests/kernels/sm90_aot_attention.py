"""Compile every flash-attention kernel launch at GPT-OSS-20B shapes for Hopper (sm_90), with no GPU.

Run as a script, without TRITON_INTERPRET:
    python tests/kernels/sm90_aot_attention.py
The public op runs forward and backward on `meta` tensors (bf16, 64 query heads / 8 kv heads x 64,
4096 tokens in the model's [B, T, heads, D] layout transposed), for full and sliding (128) layers,
with and without document ids; each kernel object is swapped for a recorder, and what the
launcher would launch is compiled, specialized as Triton's JIT does (see sm90_aot.py). Each
compiled kernel must fit Hopper's shared memory, use wgmma and spill no registers.
"""

import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import triton  # noqa: E402
from sm90_aot import CUOBJDUMP, HOPPER_SMEM, Recorder, to_source  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from gptoss_kernels import _runtime  # noqa: E402
from gptoss_kernels import flash_attention as fa  # noqa: E402

KERNELS = ("_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel")


def record_launches():
    launches = []
    for name in KERNELS:
        setattr(fa, name, Recorder(getattr(fa, name), launches))
    _runtime.check_tensors = lambda *tensors: None
    b, t, h, kv, d = 1, 4096, 64, 8, 64

    def meta(*shape):
        return torch.empty(*shape, dtype=torch.bfloat16, device="meta").transpose(1, 2).requires_grad_()

    for window in (None, 128):
        for doc_ids in (None, torch.empty(b, t, dtype=torch.int64, device="meta")):
            q, k, v = meta(b, t, h, d), meta(b, t, kv, d), meta(b, t, kv, d)
            sinks = torch.empty(h, dtype=torch.bfloat16, device="meta", requires_grad=True)
            out = fa.flash_attention(q, k, v, sinks, window=window, doc_ids=doc_ids)
            out.backward(torch.empty_like(out))
    return launches


def main() -> int:
    seen = set()
    for kernel, args, kwargs in record_launches():
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
        wgmma = "wgmma" in compiled.asm["ptx"]
        flags = {k: v for k, v in kwargs.items() if k.isupper() and k != "DOT_PRECISION"}
        print(
            f"{kernel.fn.__name__:17s} smem={shared:6d} {regs_line.split()[0]} stack={stack} wgmma={wgmma!s:5s} "
            f"{options} {flags}"
        )
        problems = [
            msg
            for bad, msg in (
                (shared > HOPPER_SMEM, "shared memory over Hopper's limit"),
                (stack > 0, "register spills"),
                (not wgmma, "no wgmma"),
            )
            if bad
        ]
        if problems:
            print(f"FAIL {kernel.fn.__name__}: {', '.join(problems)}")
            return 1
    print(f"{len(seen)} flash-attention kernel variants compiled for sm_90")
    return 0


if __name__ == "__main__":
    sys.exit(main())
