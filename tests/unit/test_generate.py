"""Generation with the KV cache: against transformers' greedy `generate`, against our full forward, with
left padding, with LoRA (applied and merged), and the sampling filters."""

import pytest
import torch

from engine.inference.generate import generate, left_pad, sample_next
from engine.models.gpt_oss.kv_cache import KVCache, cached_forward
from tests.hf_reference import hf_config, hf_model, to_ours

TOL = dict(rtol=1e-5, atol=1e-5)

# Both windows are far shorter than prompt + generation, so the ring wraps many times.
CONFIGS = {
    "gqa2_w4": dict(),  # 2 layers (sliding, full), window 4, 4 heads / 2 kv, top-2 of 4
    "mqa_w3_3layers": dict(
        num_attention_heads=6,
        num_key_value_heads=1,
        head_dim=6,
        hidden_size=36,
        num_local_experts=6,
        num_experts_per_tok=3,
        intermediate_size=20,
        num_hidden_layers=3,
        sliding_window=3,
        vocab_size=96,
    ),
}


def _prompts(vocab, lengths, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def _hf_generate(hf, ids, mask, n):
    out = hf.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
    )
    return out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_tokens_equal_transformers(name):
    hf = hf_model(hf_config(**CONFIGS[name]))
    ours = to_ours(hf)
    ids = torch.tensor(_prompts(hf.config.vocab_size, [9, 9]))
    ref = _hf_generate(hf, ids, torch.ones_like(ids), 24)
    got = generate(ours, ids, 24)
    assert got.shape == (2, 9 + 24)
    assert torch.equal(got, ref), (got, ref)
    assert torch.equal(generate(ours, ids, 24, use_cache=False), ref)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_left_padded_batch_equals_each_row_alone_and_transformers(name):
    hf = hf_model(hf_config(**CONFIGS[name]))
    ours = to_ours(hf)
    prompts = _prompts(hf.config.vocab_size, [11, 4, 7])
    ids, mask = left_pad(prompts, pad_token_id=0)
    batch = generate(ours, ids, 16, attention_mask=mask)
    no_cache = generate(ours, ids, 16, attention_mask=mask, use_cache=False)
    assert torch.equal(batch, no_cache)
    for row, p in enumerate(prompts):
        alone = _hf_generate(hf, torch.tensor([p]), torch.ones(1, len(p), dtype=torch.long), 16)
        assert torch.equal(batch[row, -16:], alone[0, -16:]), row
        assert torch.equal(batch[row, ids.shape[1] - len(p) : ids.shape[1]], torch.tensor(p))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_cached_step_logits_equal_full_forward(name):
    ours = to_ours(hf_model(hf_config(**CONFIGS[name])))
    seq = torch.tensor(_prompts(ours.config.vocab_size, [20, 20]))
    with torch.no_grad():
        full = ours(seq)  # [B, T, V]
        cache = KVCache(ours, 2, 20)
        # a prefill longer than the window, a one-token step, then a chunk longer than the window
        # on a non-empty cache (it must attend to ring entries it overwrites), then single steps
        pieces = [
            cached_forward(ours, seq[:, :7], cache),
            cached_forward(ours, seq[:, 7:8], cache),
            cached_forward(ours, seq[:, 8:14], cache),
        ]
        pieces += [cached_forward(ours, seq[:, t : t + 1], cache) for t in range(14, 20)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, **TOL)


def test_cache_is_a_ring_on_sliding_layers():
    ours = to_ours(hf_model(hf_config()))
    cache = KVCache(ours, 1, 40)
    sizes = {lc.window: lc.k.shape[2] for lc in cache.layers}
    assert sizes == {4: 4, None: 40}
    with torch.no_grad():
        cached_forward(ours, torch.arange(10)[None], cache)
    ring = next(lc for lc in cache.layers if lc.window == 4)
    assert sorted(ring.slot.tolist()) == [6, 7, 8, 9]
    assert all(s % 4 == i for i, s in enumerate(ring.slot.tolist()))


def test_lora_applied_merged_and_uncached_agree():
    from engine.peft import apply_lora
    from engine.peft.config import LoraConfig
    from engine.peft.lora import adapter_modules, merge_lora

    ours = to_ours(hf_model(hf_config()))
    base_tokens = generate(ours, torch.tensor(_prompts(128, [8])), 12)
    apply_lora(ours, LoraConfig(rank=4, alpha=8), seed=0)
    with torch.no_grad():  # B starts at zero: give the adapters a real effect
        for p in ours.parameters():
            if p.requires_grad:
                p.normal_(0, 0.5)
    ids = torch.tensor(_prompts(128, [8]))
    applied = generate(ours, ids, 12)
    assert not torch.equal(applied, base_tokens), "the adapters changed nothing; the test would prove nothing"
    assert torch.equal(applied, generate(ours, ids, 12, use_cache=False))
    with torch.no_grad():
        ref_logits = ours(applied)
    merge_lora(ours)
    assert all(a.merged for _, a, _ in adapter_modules(ours))
    assert torch.equal(generate(ours, ids, 12), applied)
    with torch.no_grad():
        torch.testing.assert_close(ours(applied), ref_logits, **TOL)


def test_stop_tokens_pad_finished_rows_and_end_early():
    ours = to_ours(hf_model(hf_config()))
    ids = torch.tensor(_prompts(128, [6, 6]))
    free = generate(ours, ids, 10)
    stop = int(free[0, 8])  # row 0's third new token
    out = generate(ours, ids, 10, stop_token_ids=[stop], pad_token_id=127)
    first = (free[0, 6:] == stop).nonzero()[0, 0].item()
    assert torch.equal(out[0, : 6 + first + 1], free[0, : 6 + first + 1])
    assert (out[0, 6 + first + 1 :] == 127).all()
    row1_stops = (free[1, 6:] == stop).nonzero()
    if row1_stops.numel() == 0:  # row 1 never stops, so every step is taken
        assert out.shape[1] == 16 and torch.equal(out[1], free[1])


def test_sampling_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_next(logits, do_sample=True, top_p=0.7, generator=g) for _ in range(300)])
    assert set(draws.flatten().tolist()) == {0, 1}  # 0.5 < 0.7 <= 0.5 + 0.3: exactly two tokens stay
    draws = torch.stack([sample_next(logits, do_sample=True, top_k=3, generator=g) for _ in range(300)])
    assert set(draws.flatten().tolist()) == {0, 1, 2}
    assert sample_next(logits, do_sample=True, top_k=1, generator=g).item() == 0
    freq = (
        torch.bincount(
            torch.stack([sample_next(logits, do_sample=True, generator=g) for _ in range(4000)]).flatten(), minlength=4
        )
        / 4000
    )
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.03, rtol=0)


def test_seeded_sampling_is_reproducible():
    ours = to_ours(hf_model(hf_config()))
    ids = torch.tensor(_prompts(128, [5, 5]))
    a = generate(ours, ids, 10, do_sample=True, temperature=1.5, seed=7)
    b = generate(ours, ids, 10, do_sample=True, temperature=1.5, seed=7)
    c = generate(ours, ids, 10, do_sample=True, temperature=1.5, seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize(
    "kwargs,match", [(dict(temperature=0.0), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_k=-1), "top_k")]
)
def test_bad_arguments_say_which(kwargs, match):
    ours = to_ours(hf_model(hf_config()))
    with pytest.raises(ValueError, match=match):
        generate(ours, torch.zeros(1, 3, dtype=torch.long), 2, do_sample=True, **kwargs)
