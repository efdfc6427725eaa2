"""Kernel tests run on a GPU when there is one, else on CPU under the Triton interpreter."""

import os

import torch

# Must happen before the kernels package (and its @triton.jit) is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from gptoss_kernels import _runtime, gemm_configs  # noqa: E402


@pytest.fixture(autouse=True)
def heuristic_tile_configs():
    """Tests run the deterministic default configs (no timing, no cache file); test_gemm_configs.py
    forces every candidate itself and turns the autotuner on where it tests it."""
    with gemm_configs.settings(autotune=False):
        yield


@pytest.fixture(autouse=True)
def poisoned_outputs():
    """Every kernel output starts as NaN, so a tile the kernel forgets to write fails the test."""
    with _runtime.poison_outputs():
        yield
