"""Blockwise attention (own backward) against the eager reference: values and every gradient, sinks included."""

import pytest
import torch

from engine.models.gpt_oss.attention import dense_mask, eager_attention
from engine.models.gpt_oss.blockwise_attention import blockwise_attention

TOL = dict(rtol=1e-5, atol=1e-5)


def _inputs(b, h, kv, t, d, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, t, d, generator=g, dtype=dtype)
    k = torch.randn(b, kv, t, d, generator=g, dtype=dtype)
    v = torch.randn(b, kv, t, d, generator=g, dtype=dtype)
    sinks = torch.randn(h, generator=g, dtype=dtype)
    return [x.requires_grad_() for x in (q, k, v, sinks)]


def _docs(b, t, seed=0):
    """Packed rows: each row cut into a few documents of random lengths."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(b):
        cuts = torch.zeros(t, dtype=torch.long)
        cuts[torch.randint(1, t, (3,), generator=g)] = 1
        rows.append(cuts.cumsum(0))
    return torch.stack(rows)


def _run(fn, inputs, grad_out):
    out = fn(*inputs)
    grads = torch.autograd.grad(out, inputs, grad_out)
    return out, grads


CASES = {
    "full_gqa2": dict(b=2, h=4, kv=2, t=37, d=8, window=None, docs=False),
    "sliding_gqa2": dict(b=2, h=4, kv=2, t=37, d=8, window=5, docs=False),
    "mqa_sliding_docs": dict(b=2, h=3, kv=1, t=41, d=6, window=7, docs=True),
    "full_docs_mha": dict(b=1, h=2, kv=2, t=33, d=4, window=None, docs=True),
    "window_longer_than_seq": dict(b=1, h=2, kv=1, t=9, d=4, window=16, docs=False),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("blocks", [(4, 8), (16, 4), (256, 512)])
def test_blockwise_equals_eager(name, blocks):
    c = CASES[name]
    inputs = _inputs(c["b"], c["h"], c["kv"], c["t"], c["d"])
    doc_ids = _docs(c["b"], c["t"]) if c["docs"] else None
    scale = c["d"] ** -0.5
    mask = dense_mask(c["b"], c["t"], c["window"], doc_ids, "cpu")
    grad_out = torch.randn(c["b"], c["h"], c["t"], c["d"], generator=torch.Generator().manual_seed(9))
    ref, ref_grads = _run(lambda q, k, v, s: eager_attention(q, k, v, s, mask, scale), inputs, grad_out)
    out, grads = _run(
        lambda q, k, v, s: blockwise_attention(q, k, v, s, c["window"], doc_ids, scale, *blocks), inputs, grad_out
    )
    torch.testing.assert_close(out, ref, **TOL)
    for name_, g, r in zip("q k v sinks".split(), grads, ref_grads):
        torch.testing.assert_close(g, r, **TOL, msg=name_)


def test_blockwise_float64_against_explicit_softmax():
    # An independent float64 statement of the attention: softmax over [scores, sink], sink column dropped.
    b, h, kv, t, d, w = 1, 4, 2, 19, 8, 6
    q, k, v, sinks = [x.detach().double().requires_grad_() for x in _inputs(b, h, kv, t, d, seed=3)]
    out = blockwise_attention(q, k, v, sinks, w, None, d**-0.5, 4, 4)
    ref = torch.empty_like(out)
    for hh in range(h):
        kk, vv = k[0, hh // (h // kv)], v[0, hh // (h // kv)]
        for i in range(t):
            keys = [j for j in range(t) if j <= i and i - j < w]
            logits = torch.cat([q[0, hh, i] @ kk[keys].T * d**-0.5, sinks[hh : hh + 1]])
            ref[0, hh, i] = torch.softmax(logits, 0)[:-1] @ vv[keys]
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    gq, gs = torch.autograd.grad(out.square().sum(), (q, sinks))
    rq, rs = torch.autograd.grad(ref.square().sum(), (q, sinks))
    torch.testing.assert_close(gq, rq, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gs, rs, rtol=1e-10, atol=1e-12)


def test_blockwise_keeps_no_square_tensor():
    # What autograd keeps between forward and backward: q, k, v, sinks, out and the lse, nothing [T, T].
    b, h, kv, t, d = 1, 2, 1, 300, 4
    q, k, v, sinks = _inputs(b, h, kv, t, d)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x.numel()) or x, lambda x: x):
        out = blockwise_attention(q, k, v, sinks, None, None, d**-0.5, 64, 64)
    assert max(saved) <= b * h * t * d, saved
    assert out.grad_fn is not None


def test_gqa_heads_must_divide():
    q, k, v, sinks = _inputs(1, 3, 2, 4, 4)
    with pytest.raises(ValueError, match="not a multiple"):
        blockwise_attention(q, k, v, sinks, None, None, 0.5)


@pytest.mark.parametrize("window,docs", [(None, True), (5, False)])
def test_query_slices_at_an_offset_equal_rows_of_the_full_attention(window, docs):
    # Two query slices (as a context-parallel rank holds them) against all keys: the rows of the full
    # attention, and the gradients of k, v, sinks summed over the slices equal the full ones.
    b, h, kv, t, d = 2, 4, 2, 32, 8
    q, k, v, sinks = _inputs(b, h, kv, t, d, seed=4)
    doc_ids = _docs(b, t, seed=2) if docs else None
    grad = torch.randn(b, h, t, d, generator=torch.Generator().manual_seed(6))
    mask = dense_mask(b, t, window, doc_ids, "cpu")
    ref, ref_grads = _run(lambda q, k, v, s: eager_attention(q, k, v, s, mask, d**-0.5), [q, k, v, sinks], grad)
    slices = [(0, 8), (24, 32), (8, 24)]
    outs = [
        blockwise_attention(q[:, :, a:e], k, v, sinks, window, doc_ids, d**-0.5, 4, 8, q_offset=a) for a, e in slices
    ]
    grads = torch.autograd.grad(outs, [q, k, v, sinks], [grad[:, :, a:e] for a, e in slices])
    for (a, e), out in zip(slices, outs):
        torch.testing.assert_close(out, ref[:, :, a:e], **TOL)
    for name_, g, r in zip("q k v sinks".split(), grads, ref_grads):
        torch.testing.assert_close(g, r, **TOL, msg=name_)
    with pytest.raises(ValueError, match="outside the 32 keys"):
        blockwise_attention(q[:, :, :8], k, v, sinks, window, doc_ids, 0.5, q_offset=30)
