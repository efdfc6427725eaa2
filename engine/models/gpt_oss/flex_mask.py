"""FlexAttention block masks built at block granularity: memory O((T / 128)^2), never T x T.

`create_block_mask` called outside torch.compile evaluates the mask function on every (query, key)
pair, a [B, T, T] tensor (10 GiB for one 32K row). Here the block structure comes straight from
the mask's three rules, applied to whole 128 x 128 tiles:

- causal: a key tile holds a visible key when its first key is at or before the query tile's last
  query, and every key is visible when its last key is at or before the tile's first query;
- sliding window (w keys, the query's own included): some pair is close enough when
  (first query - last key) < w, every pair when (last query - first key) < w;
- documents: per tile the smallest and largest document id. Tiles whose id ranges do not overlap
  share no document; both tiles holding one and the same id are the same document throughout.
  Exact for ids that never decrease along a row (packed documents, left padding); for any other
  ids the overlap test only keeps more tiles, which the mask function then decides key by key.

A tile is skipped (no visible pair), full (every pair visible: no mask function there), or partial
(the mask function `mask_mod` decides each pair); a tile reaching past T is never full, as in
`create_block_mask` (the kernels bound-check it with the mask function). The result is `BlockMask.from_kv_blocks` over
those tiles with the exact `mask_mod`, so flex computes exactly `attention.dense_mask`.
"""

from __future__ import annotations

import torch

BLOCK = 128  # FlexAttention's default tile: the kernels' sparsity granularity


def mask_mod_for(window: int | None, doc_ids: torch.Tensor | None):
    """The per-pair rule: key ki <= query qi, within the window, same document."""

    def mask_mod(bi, h, qi, ki):
        keep = ki <= qi
        if window is not None:
            keep = keep & (qi - ki < window)
        if doc_ids is not None:
            keep = keep & (doc_ids[bi, qi] == doc_ids[bi, ki])
        return keep

    return mask_mod


def _tile_ranges(doc_ids: torch.Tensor, n: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row and tile the smallest and largest document id: ([B, n], [B, n]); the last tile's
    padding repeats the row's last id, which changes neither."""
    b, t = doc_ids.shape
    padded = torch.cat([doc_ids, doc_ids[:, -1:].expand(b, n * block - t)], dim=1).view(b, n, block)
    return padded.amin(-1), padded.amax(-1)


def tile_classes(t: int, window: int | None, doc_ids: torch.Tensor | None, device,
                 block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """(partial, full): bool [B | 1, n, n] over (query tile, key tile), n = ceil(t / block), disjoint."""
    n = -(-t // block)
    tile = torch.arange(n, device=device)
    first = tile * block
    last = torch.clamp(first + block, max=t) - 1
    q_first, q_last = first[:, None], last[:, None]
    k_first, k_last = first[None, :], last[None, :]
    some = k_first <= q_last
    every = k_last <= q_first
    if window is not None:
        some = some & (q_first - k_last < window)
        every = every & (q_last - k_first < window)
    if t % block:  # a tile holding padding is never full: the kernels check its bounds with the mask
        every = every & (tile < n - 1)[:, None] & (tile < n - 1)[None, :]
    some, every = some[None], every[None]  # [1, n, n]
    if doc_ids is not None:
        lo, hi = _tile_ranges(doc_ids.to(device), n, block)
        some = some & (lo[:, :, None] <= hi[:, None, :]) & (lo[:, None, :] <= hi[:, :, None])  # [B, n, n]
        one = lo == hi
        every = every & (one[:, :, None] & one[:, None, :] & (lo[:, :, None] == lo[:, None, :]))
    return some & ~every, every


def _ordered(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bool [B, n, n] -> (count [B, 1, n], indices [B, 1, n, n]): per query tile how many key tiles
    are set and which, in increasing order first (the rest of each row is unread padding)."""
    count = tiles.sum(-1, dtype=torch.int32)
    order = torch.argsort(tiles.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return count[:, None], order[:, None]


def flex_block_mask(b: int, t: int, window: int | None, doc_ids: torch.Tensor | None, device,
                    block: int = BLOCK):
    """A FlexAttention BlockMask equal to `attention.dense_mask(b, t, window, doc_ids)`, batch 1
    (broadcast) without documents, else `b`; one head (broadcast). No compile, any device."""
    from torch.nn.attention.flex_attention import BlockMask

    partial, full = tile_classes(t, window, doc_ids, device, block)
    kv_num, kv_idx = _ordered(partial)
    full_num, full_idx = _ordered(full)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block,
                                    mask_mod=mask_mod_for(window, doc_ids), seq_lengths=(t, t))


__all__ = ["flex_block_mask", "tile_classes", "mask_mod_for", "BLOCK"]
