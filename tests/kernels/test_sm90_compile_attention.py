"""Every flash-attention kernel launch compiles for Hopper with wgmma, no spills, shared memory that fits, the
occupancy it is designed for and 16-byte tile loads (under this venv's Triton and the GPU image's)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("sm90_aot_attention.py")


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernels run for real instead")
def test_flash_attention_compiles_for_sm90():
    libtriton = pytest.importorskip("triton._C.libtriton", reason="needs a Triton build with the CUDA backend")
    if not hasattr(libtriton, "native_specialize_impl"):
        pytest.skip("sm90_aot.py mirrors the argument specialization of Triton versions with native_specialize_impl")
    import triton

    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump").exists():
        pytest.skip("this Triton wheel ships no cuobjdump to read register spills with")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    result = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    # forward, dK/dV and dQ for {full, sliding} x {documents or not}, and the delta preprocess kernel
    assert "13 flash-attention kernel variants compiled for sm_90, 0 failed" in result.stdout, result.stdout
