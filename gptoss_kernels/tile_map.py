"""The tile list of a grouped GEMM, built on the device from per-expert row counts.

Rows are sorted by expert: expert e owns rows offsets[e]:offsets[e+1]. A grouped GEMM cuts each
expert's rows into BLOCK_M-row tiles, so a tile never mixes experts. Building the list on the
device means no host sync to learn the counts: the GEMM grid is sized by an upper bound on the
number of tiles, and the padding tiles past the real count (tile_expert == -1) exit at once.
"""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from gptoss_kernels import _runtime

_CHUNK = 128  # tiles resolved per step of the tile-map kernel


@dataclass(frozen=True)
class GroupLayout:
    """Where each expert's rows are, cut into tiles of `block_m` rows."""

    offsets: torch.Tensor  # [E+1] int32: expert e owns rows offsets[e]:offsets[e+1]
    tile_expert: torch.Tensor  # [max_tiles] int32: a tile's expert, -1 for padding tiles
    tile_row: torch.Tensor  # [max_tiles] int32: a tile's first row
    num_tiles: torch.Tensor  # [1] int32: the real (non-padding) tile count, for persistent grids
    num_rows: int
    block_m: int

    @property
    def num_experts(self) -> int:
        return self.offsets.numel() - 1

    @property
    def max_tiles(self) -> int:
        return self.tile_expert.numel()


def choose_block_m(num_rows: int, num_experts: int) -> int:
    """Rows per tile from the mean rows per expert: small groups waste less of a small tile."""
    per_expert = num_rows / max(num_experts, 1)
    if per_expert <= 16:
        default = 16
    elif per_expert <= 32:
        default = 32
    elif per_expert <= 96:
        default = 64
    else:
        default = 128
    return _runtime.block("block_m", default)


@triton.jit
def _tile_map_kernel(
    counts_ptr,
    offsets_ptr,
    tile_expert_ptr,
    tile_row_ptr,
    num_tiles_ptr,
    num_experts,
    num_rows,
    max_tiles,
    BLOCK_M: tl.constexpr,
    BLOCK_E: tl.constexpr,
    CHUNK: tl.constexpr,
):
    experts = tl.arange(0, BLOCK_E)
    counts = tl.load(counts_ptr + experts, mask=experts < num_experts, other=0).to(tl.int32)
    counts = tl.maximum(counts, 0)
    # Clamping to num_rows keeps every later load in bounds even if sum(counts) != num_rows.
    total = tl.cumsum(counts, 0)  # [BLOCK_E]
    row_start = tl.minimum(total - counts, num_rows)
    row_end = tl.minimum(total, num_rows)
    tiles = tl.cdiv(row_end - row_start, BLOCK_M)
    tile_end = tl.cumsum(tiles, 0)  # [BLOCK_E] one past each expert's last tile
    tile_start = tile_end - tiles

    tl.store(offsets_ptr + 1 + experts, row_end, mask=experts < num_experts)
    tl.store(offsets_ptr + experts, 0, mask=experts == 0)
    tl.store(num_tiles_ptr, tl.sum(tiles, 0))

    for c0 in range(0, max_tiles, CHUNK):
        t = c0 + tl.arange(0, CHUNK)  # [CHUNK] tile ids
        # A tile's expert is the number of experts whose tiles all end at or before it; padded
        # experts (e >= num_experts) own no tiles, so they only count for padding tiles.
        expert = tl.sum((tile_end[None, :] <= t[:, None]).to(tl.int32), axis=1)  # [CHUNK]
        pick = experts[None, :] == expert[:, None]  # [CHUNK, BLOCK_E] one-hot of the expert
        first_row = tl.sum(tl.where(pick, row_start[None, :], 0), axis=1)
        first_tile = tl.sum(tl.where(pick, tile_start[None, :], 0), axis=1)
        row = first_row + (t - first_tile) * BLOCK_M
        valid = expert < num_experts
        in_range = t < max_tiles
        tl.store(tile_expert_ptr + t, tl.where(valid, expert, -1), mask=in_range)
        tl.store(tile_row_ptr + t, tl.where(valid, row, 0), mask=in_range)


def build_layout(counts: torch.Tensor, num_rows: int, block_m: int) -> GroupLayout:
    """Tile `num_rows` expert-sorted rows, with `counts` [E] rows per expert, into `block_m` tiles.

    Nothing here reads `counts` on the host. sum(counts) must equal num_rows; it is not checked
    (that would need a host sync), but a larger sum cannot make a kernel read out of bounds.
    """
    if counts.dim() != 1 or counts.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"counts must be a 1-D int32/int64 tensor, got {counts.dtype} {tuple(counts.shape)}")
    if num_rows >= 2**31:
        raise ValueError(f"{num_rows} rows: at most 2**31 - 1 rows are supported")
    num_experts = counts.numel()
    if num_experts == 0:
        raise ValueError("counts is empty: there must be at least one expert")
    device = counts.device
    # sum_e ceil(c_e / B) < num_rows / B + E, and no tile is empty, so this bounds the tile count.
    max_tiles = min(triton.cdiv(num_rows, block_m) + num_experts, num_rows)
    offsets = torch.empty(num_experts + 1, dtype=torch.int32, device=device)
    tile_expert = torch.empty(max_tiles, dtype=torch.int32, device=device)
    tile_row = torch.empty(max_tiles, dtype=torch.int32, device=device)
    num_tiles = torch.empty(1, dtype=torch.int32, device=device)
    _tile_map_kernel[(1,)](
        counts,
        offsets,
        tile_expert,
        tile_row,
        num_tiles,
        num_experts,
        num_rows,
        max_tiles,
        BLOCK_M=block_m,
        BLOCK_E=max(_runtime.next_pow2(num_experts), 16),
        CHUNK=_CHUNK,
    )
    return GroupLayout(offsets, tile_expert, tile_row, num_tiles, num_rows, block_m)
