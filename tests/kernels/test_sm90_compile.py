"""Every kernel of the expert path (dense and MXFP4 weights) compiles for Hopper with wgmma, no spills, shared
memory that fits, the occupancy it is designed for, vectorised epilogue loads and (persistent) one flattened
pipelined loop.

Runs on machines without a GPU (Triton compiles for a named target; its wheel ships ptxas), so a
kernel change that would spill or stop using wgmma on an H100 shows up in CPU-only CI. Written for the
Triton of this venv (3.8) and of the GPU image (3.6): sm90_facts.py reads only the compiled text.
"""

import collections
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

SCRIPT = Path(__file__).with_name("sm90_aot.py")


def _run_script(*args, timeout):
    libtriton = pytest.importorskip("triton._C.libtriton", reason="needs a Triton build with the CUDA backend")
    if not hasattr(libtriton, "native_specialize_impl"):
        pytest.skip("sm90_aot.py mirrors the argument specialization of Triton versions with native_specialize_impl")
    import triton

    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump").exists():
        pytest.skip("this Triton wheel ships no cuobjdump to read register spills with")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernels run for real instead")
def test_kernels_compile_for_sm90():
    out = _run_script(timeout=300)
    # The SwiGLU backward reads h in 16-byte vectors and fits two CTAs per SM (checked per kernel by the
    # script; here, that the launch it checks is really among those compiled).
    assert "'EPILOGUE': 2" in out and "HAS_LOW_RANK': True" in out, out
    # The MXFP4 weights' GEMMs, both orientations (forward, dX), each epilogue, with and without LoRA.
    mxfp4 = [line for line in out.splitlines() if "'W_MXFP4': 1" in line or "'W_MXFP4': 2" in line]
    assert {("'EPILOGUE': 0" in line, "'EPILOGUE': 1" in line, "'W_MXFP4': 2" in line) for line in mxfp4} == {
        (True, False, False),
        (False, True, False),
        (False, False, True),
        (True, False, True),
    }, out
    assert sum("'HAS_LOW_RANK': True" in line for line in mxfp4) == 4 and len(mxfp4) == 8, out


@pytest.mark.slow  # every candidate of every bucket, MXFP4 ones included: about 2.5 minutes on 2 cores
@pytest.mark.timeout(900)
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernels run for real instead")
def test_every_autotune_candidate_compiles_for_sm90():
    # Every tile config the autotuner may time, persistent and TMA variants included (~260 compiles,
    # several minutes cold): none may spill, overflow shared memory, lose wgmma, miss its designed
    # occupancy, load bf16 scalars in the epilogue, leave the persistent loop unflattened, or (TMA)
    # lose the bulk copy.
    _run_script("--all-configs", timeout=1800)


# The rules themselves, on small hand-written compiler output (no compile needed).

_TTGIR_FLAT = """\
    %0 = scf.for %i = %c0 to %n step %c1 iter_args(%a = %z) -> (tensor<128x64xf32, #mma>) : i32 {
      %1 = ttg.async_copy_global_to_local %p, %buf : tensor<128x64x!tt.ptr<bf16>> -> <128x64xbf16>
      %2 = ttng.warp_group_dot %x, %y, %a : !ttg.memdesc<128x64xbf16> * !ttg.memdesc<64x64xbf16>
      scf.if %last {
        tt.store %q, %v : tensor<128x64x!tt.ptr<bf16>>
      }
      scf.yield %2 : tensor<128x64xf32, #mma>
    }
"""
_TTGIR_NESTED = """\
    scf.for %t = %c0 to %tiles step %c1  : i32 {
      %0 = scf.for %i = %c0 to %n step %c1 iter_args(%a = %z) -> (tensor<128x64xf32, #mma>) : i32 {
        %1 = ttg.async_copy_global_to_local %p, %buf : tensor<128x64x!tt.ptr<bf16>> -> <128x64xbf16>
        %2 = ttng.warp_group_dot %x, %y, %a : !ttg.memdesc<128x64xbf16> * !ttg.memdesc<64x64xbf16>
        scf.yield %2 : tensor<128x64xf32, #mma>
      }
      tt.store %q, %0 : tensor<128x64x!tt.ptr<bf16>>
    }
"""


def test_fused_loop_rule_tells_a_flattened_loop_from_a_nested_one():
    sm90_facts = pytest.importorskip("sm90_facts")
    assert sm90_facts.has_fused_loop(_TTGIR_FLAT)
    assert not sm90_facts.has_fused_loop(_TTGIR_NESTED)


def test_load_widths_are_read_from_ptx():
    sm90_facts = pytest.importorskip("sm90_facts")
    ptx = """
    @%p1 ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];
    @%p2 ld.global.b16 { %rs1 }, [ %rd2 + 0 ];
    @%p3 ld.global.L1::evict_last.b16 { %rs2 }, [ %rd3 + 0 ];
    ld.global.b32 { %r5 }, [ %rd4 + 0 ];
    @%p4 st.global.v4.b32 [ %rd5 + 0 ], { %r1, %r2, %r3, %r4 };
    """
    loads = dict(collections.Counter(sm90_facts._LOADS.findall(ptx)))
    facts = sm90_facts.Facts("k", 100, 0, 0, True, False, loads, {}, False, 8)
    assert loads == {".v4.b32": 1, ".b16": 2, ".b32": 1}
    assert facts.bytes16_scalar_loads() == 2 and facts.vector_loads() == 1
    assert dict(collections.Counter(sm90_facts._STORES.findall(ptx))) == {".v4.b32": 1}


def test_occupancy_rule():
    sm90_facts = pytest.importorskip("sm90_facts")
    facts = sm90_facts.Facts("k", 129, 0, 98304, True, False, {}, {}, False, 8)
    assert sm90_facts.occupancy_problems(facts, 1) == []
    assert "129 registers > 128" in sm90_facts.occupancy_problems(facts, 2)[0]
    facts.registers, facts.shared = 128, 120 * 1024
    assert "shared memory" in sm90_facts.occupancy_problems(facts, 2)[0]
