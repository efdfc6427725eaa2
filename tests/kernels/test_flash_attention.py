"""Triton flash attention (sinks, window, documents, GQA) against the float64 dense reference, fwd + bwd."""

import pytest
import torch

from gptoss_kernels.flash_attention import _backward, _forward, doc_bounds, flash_attention
from gptoss_kernels.flash_attention_reference import allowed_pairs, attention_reference

# fp32 kernel vs the fp64 reference: a few fp32 ulps of the values' size
TOL = dict(rtol=1e-5, atol=1e-5)


def _docs(b, t, seed, recurring=False):
    """Packed documents (ids 0, 1, 2, ... along each row), or with `recurring` ids that come back
    after another document (the mask still joins equal ids, wherever they are)."""
    g = torch.Generator().manual_seed(seed)
    cuts = torch.zeros(b, t, dtype=torch.long)
    for row in cuts:
        row[torch.randint(1, t, (3,), generator=g)] = 1
    ids = cuts.cumsum(1)
    return ids % 2 if recurring else ids


def _inputs(b, h, kv, t, d, seed=0, layout="bhtd"):
    g = torch.Generator().manual_seed(seed)
    if layout == "bthd":  # the model's layout: projections [B, T, heads, D] transposed to [B, heads, T, D]
        q = torch.randn(b, t, h, d, generator=g).transpose(1, 2)
        k, v = (torch.randn(b, t, kv, d, generator=g).transpose(1, 2) for _ in range(2))
    else:
        q = torch.randn(b, h, t, d, generator=g)
        k, v = (torch.randn(b, kv, t, d, generator=g) for _ in range(2))
    sinks = torch.randn(h, generator=g)
    return q, k, v, sinks


CASES = {
    "full_gqa4": dict(b=1, h=4, kv=1, t=45, d=16, window=None, docs=False),
    "sliding_gqa2": dict(b=2, h=4, kv=2, t=70, d=16, window=20, docs=False),
    "sliding_docs_d6": dict(b=2, h=2, kv=1, t=53, d=6, window=9, docs=True),
    "full_docs_mha_d32": dict(b=1, h=2, kv=2, t=40, d=32, window=None, docs=True),
    "window_over_seq": dict(b=1, h=2, kv=1, t=20, d=8, window=64, docs=False),
    "recurring_docs_gqa2": dict(b=2, h=4, kv=2, t=60, d=16, window=None, docs="recurring"),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("layout", ["bhtd", "bthd"])
def test_flash_attention_matches_float64_reference(name, layout):
    c = CASES[name]
    q, k, v, sinks = _inputs(c["b"], c["h"], c["kv"], c["t"], c["d"], layout=layout)
    doc_ids = _docs(c["b"], c["t"], seed=1, recurring=c["docs"] == "recurring") if c["docs"] else None
    grad = torch.randn(c["b"], c["h"], c["t"], c["d"], generator=torch.Generator().manual_seed(5))

    ours = [x.clone().requires_grad_() for x in (q, k, v, sinks)]
    out = flash_attention(*ours, window=c["window"], doc_ids=doc_ids, block_m=16, block_n=16)
    grads = torch.autograd.grad(out, ours, grad)

    ref_in = [x.double().requires_grad_() for x in (q, k, v, sinks)]
    ref, ref_lse = attention_reference(*ref_in, window=c["window"], doc_ids=doc_ids)
    ref_grads = torch.autograd.grad(ref, ref_in, grad.double())

    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref.float(), **TOL)
    bounds = doc_bounds(doc_ids) if doc_ids is not None else None
    _, lse = _forward(q.contiguous(), k.contiguous(), v.contiguous(), sinks, bounds, c["window"], c["d"] ** -0.5,
                      16, 16)
    torch.testing.assert_close(lse, ref_lse.float(), **TOL)
    for what, g, r in zip(("dq", "dk", "dv", "dsinks"), grads, ref_grads):
        torch.testing.assert_close(g, r.float(), **TOL, msg=what)


def test_doc_bounds_are_each_ids_first_and_last_position():
    doc_ids = torch.tensor([[0, 0, 1, 1, 1, 2], [5, 3, 5, 5, 3, 7]])
    first, last = doc_bounds(doc_ids)
    for row, ids in enumerate(doc_ids.tolist()):
        want_first = [ids.index(x) for x in ids]
        want_last = [len(ids) - 1 - ids[::-1].index(x) for x in ids]
        assert first[row].tolist() == want_first and last[row].tolist() == want_last
    assert first.dtype == last.dtype == torch.int32


def _needed_blocks(t, window, doc_ids, bm, bn):
    """From the dense mask alone: per (query block, key block), whether any pair is allowed, and whether
    the causal/window rules (documents aside) allow every pair: [QB, KB] bools each, for batch row 0."""
    allowed = allowed_pairs(t, window, doc_ids, "cpu")[0, 0]  # [T, T]
    geometric = allowed_pairs(t, window, None, "cpu")[0, 0]
    qb, kb = t // bm, t // bn
    any_pair = allowed.reshape(qb, bm, kb, bn).any(dim=(1, 3))
    all_geometric = geometric.reshape(qb, bm, kb, bn).all(dim=(1, 3))
    return any_pair, all_geometric


@pytest.mark.parametrize("window,docs", [(None, False), (32, False), (None, True), (40, True)])
def test_blocks_outside_the_mask_are_skipped(window, docs):
    # Evidence of skipping, independent of timing: each program counts the key (query) blocks it visits,
    # split into those it masks and those it does not. Every visited block must hold an allowed pair,
    # every needed block is visited, and the causal/window mask runs exactly where some pair needs it.
    t, bs = 128, 16
    q, k, v, sinks = _inputs(1, 2, 1, t, 16, seed=4)
    doc_ids = (torch.arange(t) // 20)[None] if docs else None  # packed documents of 20 tokens
    bounds = doc_bounds(doc_ids) if doc_ids is not None else None
    visits = {}
    o, lse = _forward(q, k, v, sinks, bounds, window, 0.25, bs, bs, visits=visits)
    _backward(q, k, v, o, lse, sinks, bounds, window, 0.25, torch.randn_like(o), bs, bs, visits=visits)
    needed, full = _needed_blocks(t, window, doc_ids, bs, bs)
    want_unmasked = (needed & full).sum(1)
    want_masked = (needed & ~full).sum(1)
    for name, per_block in (("fwd", 1), ("dq", 1), ("dkdv", 2)):  # dK/dV loops over the 2 query heads
        counts = visits[name][0] if name == "dkdv" else visits[name][1]  # kv head 0 / query head 1
        if name == "dkdv":
            want = ((needed & ~full).sum(0) * per_block, (needed & full).sum(0) * per_block)
        else:
            want = (want_masked, want_unmasked)
        assert counts[:, 0].tolist() == want[0].tolist(), f"{name}: masked blocks"
        assert counts[:, 1].tolist() == want[1].tolist(), f"{name}: unmasked blocks"
    if docs:  # packed 20-token documents: a few blocks per row, not the whole causal triangle
        assert visits["fwd"][0].sum() < 0.4 * (t // bs) * (t // bs + 1) / 2


def test_int64_row_offsets(monkeypatch):
    # The loops switch to int64 row offsets where T x a row stride can pass 2**31 (sequences too long to
    # build here): lower the threshold so a small case takes that path, values and gradients as always.
    from gptoss_kernels import flash_attention as fa

    monkeypatch.setattr(fa, "INT32_OFFSETS", 1)
    assert fa._common(*_inputs(1, 2, 1, 8, 16)[:3], None, None, False)["ROWS64"]
    c = CASES["sliding_docs_d6"]
    q, k, v, sinks = _inputs(c["b"], c["h"], c["kv"], c["t"], c["d"], layout="bthd")
    doc_ids = _docs(c["b"], c["t"], seed=1)
    ours = [x.clone().requires_grad_() for x in (q, k, v, sinks)]
    out = flash_attention(*ours, window=c["window"], doc_ids=doc_ids, block_m=16, block_n=16)
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, ours, grad)
    ref_in = [x.double().requires_grad_() for x in (q, k, v, sinks)]
    ref, _ = attention_reference(*ref_in, window=c["window"], doc_ids=doc_ids)
    torch.testing.assert_close(out, ref.float(), **TOL)
    for what, g, r in zip(("dq", "dk", "dv", "dsinks"), grads, torch.autograd.grad(ref, ref_in, grad.double())):
        torch.testing.assert_close(g, r.float(), **TOL, msg=what)


def test_default_blocks_and_fp16_forward():
    # Default tile sizes (one 64-key tile here) and fp16 storage with fp32 accumulation.
    q, k, v, sinks = _inputs(1, 4, 2, 50, 16, seed=2)
    out = flash_attention(q.half(), k.half(), v.half(), sinks, window=8)
    ref, _ = attention_reference(q.double(), k.double(), v.double(), sinks.double(), window=8)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-3, atol=2e-3)


def test_a_key_outside_the_window_changes_nothing():
    # Independent of any reference: moving a key just outside the window leaves the query's output
    # bit-identical; moving the oldest key inside it does not.
    t, w, i = 40, 8, 30
    q, k, v, sinks = _inputs(1, 2, 1, t, 16, seed=3)
    base = flash_attention(q, k, v, sinks, window=w, block_m=16, block_n=16)[:, :, i]
    for j, changes in ((i - w, False), (i - w + 1, True)):
        k2 = k.clone()
        k2[:, :, j] += 1.0
        out = flash_attention(q, k2, v, sinks, window=w, block_m=16, block_n=16)[:, :, i]
        assert torch.equal(out, base) != changes, j


@pytest.mark.parametrize("kwargs,match", [
    (dict(window=0), "window=0"),
    (dict(block_m=24), "power of two"),
    (dict(doc_ids=torch.zeros(1, 3, dtype=torch.long)), "doc_ids must be"),
])
def test_bad_arguments_are_named(kwargs, match):
    q, k, v, sinks = _inputs(1, 2, 1, 8, 16)
    with pytest.raises(ValueError, match=match):
        flash_attention(q, k, v, sinks, **kwargs)


def test_kv_heads_must_divide_query_heads():
    q, k, v, sinks = _inputs(1, 3, 2, 8, 16)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        flash_attention(q, k, v, sinks)
