"""Generation's prefill goes through the training attention backend (memory linear in the prompt),
and computes what the eager cached path computes; the decode steps stay on the cache."""

import pytest
import torch

import engine.models.gpt_oss.attention as attention
import engine.models.gpt_oss.kv_cache as kv_cache
from engine.generate import generate, left_pad
from engine.models.gpt_oss.kv_cache import KVCache, cached_forward
from tests.hf_reference import hf_config, hf_model, to_ours

TOL = dict(rtol=1e-5, atol=1e-5)


def _prompts(vocab, lengths, seed=5):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def _prefill_then_steps(model, ids, valid, steps):
    """Prompt logits [B, T, V] and the logits of each following one-token step."""
    cache = KVCache(model, ids.shape[0], ids.shape[1] + steps.shape[1])
    with torch.no_grad():
        first = cached_forward(model, ids, cache, valid)
        later = [cached_forward(model, steps[:, i:i + 1], cache) for i in range(steps.shape[1])]
    return first, torch.cat(later, dim=1)


@pytest.mark.parametrize("backend", ["blockwise", "flex", "triton"])
def test_prefill_through_the_backend_equals_the_eager_prefill(backend):
    # Left padding, prompts longer than the window (4), three layers (sliding, full, sliding).
    model = to_ours(hf_model(hf_config(num_hidden_layers=3)))
    ids, mask = left_pad(_prompts(128, [23, 9, 17]), pad_token_id=0)
    valid = mask.bool()
    steps = torch.tensor(_prompts(128, [5, 5, 5], seed=6))
    model.options.attn_backend = "eager"
    ref_first, ref_later = _prefill_then_steps(model, ids, valid, steps)
    model.options.attn_backend = backend
    calls = []
    real = attention.GptOssAttention.attend

    def spy(self, q, k, v, ctx):
        calls.append((ctx.backend, q.shape[2]))
        return real(self, q, k, v, ctx)

    attention.GptOssAttention.attend = spy
    try:
        first, later = _prefill_then_steps(model, ids, valid, steps)
    finally:
        attention.GptOssAttention.attend = real
    assert calls == [(backend, ids.shape[1])] * 3  # every layer's prefill, and nothing else
    torch.testing.assert_close(first[valid], ref_first[valid], **TOL)  # pad positions see nothing in eager
    torch.testing.assert_close(later, ref_later, **TOL)  # the cache holds the same keys and values


def test_long_prompt_prefill_never_builds_prompt_by_prompt_scores(monkeypatch):
    t = 2048
    hf = hf_model(hf_config(max_position_embeddings=4 * t))
    model = to_ours(hf)
    ids, mask = left_pad(_prompts(128, [t, t - 300]), pad_token_id=0)
    model.options.attn_backend = "eager"
    ref = generate(model, ids, 4, attention_mask=mask)
    model.options.attn_backend = "auto"  # blockwise on CPU, as training
    score_shapes = []
    eager = kv_cache.eager_attention

    def recording(q, k, v, sinks, mask, scale):
        score_shapes.append((q.shape[2], k.shape[2]))
        return eager(q, k, v, sinks, mask, scale)

    monkeypatch.setattr(kv_cache, "eager_attention", recording)
    monkeypatch.setattr(attention, "eager_attention", recording)
    got = generate(model, ids, 4, attention_mask=mask)
    assert torch.equal(got, ref)
    # Only the 3 decode steps (the 4th token needs no forward) score against the cache: one query each.
    assert score_shapes and {q for q, _ in score_shapes} == {1}, score_shapes
    assert max(k for _, k in score_shapes) <= t + 4
