"""Every kernel of the expert path compiles for Hopper with wgmma, no spills and shared memory that fits.

Runs on machines without a GPU (Triton compiles for a named target; its wheel ships ptxas), so a
kernel change that would spill or stop using wgmma on an H100 shows up in CPU-only CI.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernels run for real instead")
def test_kernels_compile_for_sm90():
    _run_script(timeout=300)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernels run for real instead")
def test_every_autotune_candidate_compiles_for_sm90():
    # Every tile config the autotuner may time, persistent and TMA variants included (~150 compiles,
    # a few minutes): none may spill, overflow shared memory, lose wgmma, or (TMA) lose the bulk copy.
    _run_script("--all-configs", timeout=1200)
