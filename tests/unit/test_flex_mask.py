"""FlexAttention block masks built tile by tile: equal to the dense mask, to torch's own builder, and
small at 32K / 128K tokens."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask

from engine.models.gpt_oss.attention import dense_mask, eager_attention, flex_attention_with_sinks
from engine.models.gpt_oss.flex_mask import flex_block_mask

ROOT = Path(__file__).resolve().parents[2]


def _docs(kind, b, t, seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind is None:
        return None
    if kind == "packed":  # ids that never decrease: packed documents, left padding
        return torch.cumsum((torch.rand(b, t, generator=g) < 0.04).long(), 1)
    return torch.randint(0, 3, (b, t), generator=g)  # ids recurring anywhere: the tile test is only an upper bound


def _tiles(num, idx, n):
    """(count [B, 1, n], indices [B, 1, n, n]) -> bool [B, n, n] of the tiles listed."""
    out = torch.zeros(num.shape[0], n, n, dtype=torch.bool)
    for b in range(num.shape[0]):
        for r in range(n):
            out[b, r, idx[b, 0, r, :num[b, 0, r]].long()] = True
    return out


def _pairs(mask, t, block):
    """Every (query, key) pair the block mask lets through: full tiles, and the mask function on partial ones."""
    n = -(-t // block)
    partial = _tiles(mask.kv_num_blocks, mask.kv_indices, n)
    full = _tiles(mask.full_kv_num_blocks, mask.full_kv_indices, n)
    assert not (partial & full).any()
    tile = torch.arange(t) // block
    rows = torch.arange(partial.shape[0])[:, None, None]
    qi, ki = torch.arange(t)[None, :, None], torch.arange(t)[None, None, :]
    by_mod = mask.mask_mod(rows, 0, qi, ki)
    return full[:, tile][:, :, tile] | (partial[:, tile][:, :, tile] & by_mod)


@pytest.mark.parametrize("t", [100, 256, 300])
@pytest.mark.parametrize("window", [None, 7, 40])
@pytest.mark.parametrize("docs", [None, "packed", "recurring"])
def test_block_mask_lets_through_exactly_the_dense_mask(t, window, docs):
    b, block = 2, 16
    doc_ids = _docs(docs, b, t)
    mask = flex_block_mask(b, t, window, doc_ids, "cpu", block=block)
    dense = dense_mask(b, t, window, doc_ids, "cpu")[:, 0].expand(b, t, t)
    assert torch.equal(_pairs(mask, t, block).expand(b, t, t), dense)
    if docs != "recurring":  # exact tiles: the same BlockMask as create_block_mask evaluating every pair
        ref = create_block_mask(mask.mask_mod, b if doc_ids is not None else None, None, t, t, device="cpu",
                                BLOCK_SIZE=block)
        for key in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "q_num_blocks",
                    "q_indices", "full_q_num_blocks", "full_q_indices"):
            assert torch.equal(getattr(mask, key), getattr(ref, key)), key
        assert torch.equal(mask.to_dense(), ref.to_dense())


@pytest.mark.parametrize("window,docs", [(None, None), (48, "packed"), (None, "recurring")])
def test_flex_with_the_block_mask_equals_eager(window, docs):
    b, h, kv, t, d = 2, 4, 2, 300, 16
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(b, n, t, d, generator=g) for n in (h, kv, kv))
    sinks = torch.randn(h, generator=g)
    doc_ids = _docs(docs, b, t, seed=3)
    with torch.no_grad():  # CPU FlexAttention has no backward
        out = flex_attention_with_sinks(q, k, v, sinks, flex_block_mask(b, t, window, doc_ids, "cpu"), d**-0.5)
    ref = eager_attention(q, k, v, sinks, dense_mask(b, t, window, doc_ids, "cpu"), d**-0.5)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_block_masks_at_32k_and_128k_tokens_stay_small():
    # Peak RSS of a fresh process over its level after a warm-up build: a T x T bool mask alone
    # would be 1 GiB at 32K and 16 GiB at 128K (torch's uncompiled builder keeps several).
    script = textwrap.dedent("""
        import json, resource, time, torch
        from engine.models.gpt_oss.flex_mask import flex_block_mask
        torch.set_num_threads(1)
        rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB (Linux: KiB)
        flex_block_mask(2, 1000, 128, torch.zeros(2, 1000, dtype=torch.long), "cpu")
        base, out = rss(), []
        for t in (32768, 131072):
            docs = torch.cumsum((torch.rand(2, t, generator=torch.Generator().manual_seed(0)) < 1e-3).long(), 1)
            for window in (128, None):
                start = time.perf_counter()
                mask = flex_block_mask(2, t, window, docs, "cpu")
                out.append(dict(t=t, window=window, s=time.perf_counter() - start, mib=rss() - base,
                                tiles=int(mask.kv_num_blocks.sum() + mask.full_kv_num_blocks.sum()),
                                shape=list(mask.kv_indices.shape)))
                del mask
        print(json.dumps(out))
    """)
    p = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = json.loads(p.stdout.strip().splitlines()[-1])
    for r in rows:
        n = r["t"] // 128
        assert r["shape"] == [2, 1, n, n]
        assert r["mib"] < 512, rows
        if r["window"] == 128:  # a sliding layer visits the diagonal tile and the one before it
            assert r["tiles"] <= 2 * 2 * n, rows
