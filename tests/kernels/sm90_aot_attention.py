"""Compile every flash-attention kernel launch at GPT-OSS-20B shapes for Hopper (sm_90), with no GPU.

Run as a script, without TRITON_INTERPRET:
    python tests/kernels/sm90_aot_attention.py
The public op runs forward and backward on `meta` tensors (bf16, 64 query heads / 8 kv heads x 64,
4096 tokens in the model's [B, T, heads, D] layout transposed), for full and sliding (128) layers,
with and without document ids; each kernel object is swapped for a recorder, and what the
launcher would launch is compiled, specialized as Triton's JIT does (see sm90_aot.py). Each
compiled kernel must fit Hopper's shared memory, use wgmma (the delta preprocess kernel has no
product), spill no registers, keep the occupancy it is designed for (OCCUPANCY), and read its tiles in
16-byte vectors.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
from sm90_aot import Recorder, to_source  # noqa: E402
from sm90_facts import basic_problems, compile_sm90, occupancy_problems  # noqa: E402

from gptoss_kernels import _runtime  # noqa: E402
from gptoss_kernels import flash_attention as fa  # noqa: E402

KERNELS = ("_fwd_kernel", "_bwd_preprocess_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel")
# CTAs per SM each kernel is designed for (registers and shared memory must allow it).
OCCUPANCY = {"_fwd_kernel": 1, "_bwd_preprocess_kernel": 4, "_bwd_dkdv_kernel": 2, "_bwd_dq_kernel": 2}


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
    seen, failures = set(), 0
    for kernel, args, kwargs in record_launches():
        src, options = to_source(kernel, args, kwargs)
        name = kernel.fn.__name__
        key = (name, str(src.signature), str(sorted(src.constants.items())), str(options))
        if key in seen:
            continue
        seen.add(key)
        facts = compile_sm90(src, options, name)
        flags = {k: v for k, v in kwargs.items() if k.isupper() and k != "DOT_PRECISION"}
        print(f"{facts.line()} {options} {flags}", flush=True)
        problems = basic_problems(facts, needs_wgmma=name != "_bwd_preprocess_kernel")
        problems += occupancy_problems(facts, OCCUPANCY[name])
        if not facts.vector_loads():
            problems.append("tiles are not read in 16-byte vectors")
        if problems:
            print(f"FAIL {name}: {', '.join(problems)}")
            failures += 1
    print(f"{len(seen)} flash-attention kernel variants compiled for sm_90, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
