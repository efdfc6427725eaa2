"""Tile configs of the grouped GEMM with an MXFP4 weight (gemm_configs.py has the dense ones and the autotuner).

The weight tile is dequantized in registers (mxfp4_tile.py) and stored to shared memory for wgmma, so an
MXFP4 config differs from a dense one: the tile's group dimension (BLOCK_K forward, BLOCK_N for dX) holds
whole 32-groups; the pipeline stages carry the packed bytes (a quarter of the bf16 tile, plus scales) and one
more buffer holds the dequantized tile; registers hold the dequantized values besides the accumulator. The
persistent and TMA variants are not offered (the packed bytes go through pointer loads; TMA would need its
own descriptors for blocks and scales), until the GPU suite has timed the plain ones.
"""

import dataclasses

import torch

from gptoss_kernels import gemm_configs
from gptoss_kernels.gemm_configs import PLAIN, SWIGLU_BWD, TileConfig
from gptoss_kernels.mxfp4 import GROUP

FWD, DX = 1, 2  # the orientations: w[e] = dequant^T (K = inputs), or its transposed view (N = inputs)

# Hopper (bf16/fp16) candidates after the heuristic default, per (BLOCK_M, epilogue kind), each compiled for
# sm_90 without spills by sm90_aot.py --all-configs. Left out: 256-wide tiles (232-254 registers at 128 rows,
# one CTA per SM, so no CTA covers another's dequantization) and 128-deep K tiles below 64 rows (the 32-row
# SwiGLU forward spilled). Below 64 rows (mma.sync) only the default runs.
_HOPPER = {
    (128, "fwd"): (TileConfig(128, 64, 8, 3), TileConfig(128, 64, 8, 4), TileConfig(128, 128, 8, 3)),
    (128, "bwd"): (TileConfig(64, 64, 8, 4), TileConfig(64, 128, 8, 3)),
    (64, "fwd"): (TileConfig(128, 64, 4, 4), TileConfig(64, 128, 4, 3)),
    (64, "bwd"): (TileConfig(64, 64, 8, 4), TileConfig(64, 128, 4, 3)),
}


def fit(c: TileConfig, mx: int) -> TileConfig:
    """Whole 32-groups in the tile's group dimension (forced block sizes below 32 are raised to 32); the plain
    kernel with pointer loads."""
    if mx == FWD:
        c = dataclasses.replace(c, block_k=max(GROUP, c.block_k))
    else:
        c = dataclasses.replace(c, block_n=max(GROUP, c.block_n))
    return dataclasses.replace(c, persistent=False, tma=False)


def heuristic(block_m: int, n: int, k: int, dtype: torch.dtype, epilogue: int, mx: int) -> TileConfig:
    """The dense heuristic's tile, fitted (see fit)."""
    return fit(gemm_configs.heuristic(block_m, n, k, dtype, epilogue), mx)


def candidates(block_m: int, n: int, k: int, dtype: torch.dtype, epilogue: int, mx: int) -> list[TileConfig]:
    """The configs worth timing for this bucket, the heuristic default first; fp32 (tests) gets only it."""
    memo_key = (block_m, n, k, dtype, epilogue, mx)
    if memo_key in _memo:
        return _memo[memo_key]
    out = [heuristic(block_m, n, k, dtype, epilogue, mx)]
    if dtype.itemsize == 2:
        for c in _HOPPER.get((block_m, "bwd" if epilogue == SWIGLU_BWD else "fwd"), ()):
            c = fit(gemm_configs._fit(c, n, k), mx)
            if c not in out:
                out.append(c)
    _memo[memo_key] = out
    return out


_memo: dict[tuple, list[TileConfig]] = {}


def epilogue_subtiles(block_m: int, c: TileConfig, epilogue: int) -> int:
    """As gemm_configs.epilogue_subtiles, but the plain epilogue of a 128-wide tile runs in two column halves:
    whole, it is the kernel's register peak with the dequantization's registers still allocated (155 -> 128
    registers per thread for the 128x128 forward at 8 warps, sm_90 with Triton 3.8: two CTAs per SM)."""
    if epilogue == PLAIN and c.block_n >= 128:
        return max(2, gemm_configs.epilogue_subtiles(block_m, c, epilogue))
    return gemm_configs.epilogue_subtiles(block_m, c, epilogue)


def shared_bytes(block_m: int, c: TileConfig, itemsize: int = 2) -> int:
    """Shared memory of one CTA, as Triton lays it out: the A tiles in every stage, the packed codes in all
    but one, and one dequantized weight tile for wgmma."""
    a = c.num_stages * block_m * c.block_k * itemsize
    codes = (c.num_stages - 1) * c.block_n * c.block_k // 2
    return a + codes + c.block_k * c.block_n * itemsize


def designed_ctas_per_sm(block_m: int, c: TileConfig, epilogue: int, itemsize: int = 2) -> int:
    """Two CTAs per SM where two fit by shared memory and the accumulator leaves room (as for dense tiles):
    the wgmma of each K step waits for that step's dequantized tile, so one CTA's dequantization overlaps the
    other's products only across CTAs. One otherwise."""
    acc_regs = block_m * c.block_n // (32 * c.num_warps)
    budget = 32 if epilogue == SWIGLU_BWD else 64
    fits = 2 * (shared_bytes(block_m, c, itemsize) + 1024) <= gemm_configs.SM90_SHARED
    return 2 if fits and acc_regs <= budget else 1
