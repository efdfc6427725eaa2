"""Our GPT-OSS against transformers' GptOssForCausalLM on tiny fp32 configs: logits, loss, every gradient."""

import pytest
import torch

from tests.hf_reference import hf_config, hf_model, to_ours

# fp32 end to end; both sides sum in different orders (grouped vs per-expert), so allow a few ulps
# of accumulated difference relative to the values' size.
TOL = dict(rtol=1e-5, atol=1e-5)

CONFIGS = {
    # GQA 2 groups, top-2 of 4 experts, window 4 < seq 12, batch 2
    "gqa2_top2": dict(cfg=dict(), batch=2, seq=12, dead=None),
    # multi-query (1 kv head), top-1 of 8 experts with one expert never routed to, window 3, batch 3
    "mqa_top1_dead": dict(
        cfg=dict(
            num_attention_heads=4, num_key_value_heads=1, num_local_experts=8, num_experts_per_tok=1, sliding_window=3
        ),
        batch=3,
        seq=10,
        dead=5,
    ),
    # 6 heads / 3 kv, top-3 of 6, three layers, window 5, odd sizes
    "h6_top3_3layers": dict(
        cfg=dict(
            num_attention_heads=6,
            num_key_value_heads=3,
            head_dim=6,
            hidden_size=36,
            num_local_experts=6,
            num_experts_per_tok=3,
            intermediate_size=20,
            num_hidden_layers=3,
            sliding_window=5,
        ),
        batch=2,
        seq=16,
        dead=2,
    ),
}

BACKENDS = [
    ("loop", "eager"),
    ("grouped_mm", "eager"),
    ("triton", "eager"),  # triton: interpreter on CPU
    ("loop", "blockwise"),
    ("loop", "triton"),
]


def _inputs(cfg, batch, seq, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g)
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    labels[0, :3] = -100  # some masked targets
    return ids, labels


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("experts_backend,attn_backend", BACKENDS)
def test_logits_loss_grads_match_transformers(name, experts_backend, attn_backend):
    spec = CONFIGS[name]
    hf = hf_model(hf_config(**spec["cfg"]), dead_expert=spec["dead"])
    ours = to_ours(hf, experts_backend=experts_backend, attn_backend=attn_backend)
    ids, labels = _inputs(hf.config, spec["batch"], spec["seq"])

    hf_labels = torch.full_like(labels, -100)  # HF shifts internally: its labels[t + 1] is our labels[t]
    hf_labels[:, 1:] = labels[:, :-1]
    hf_out = hf(input_ids=ids, labels=hf_labels)
    logits = ours(ids)
    torch.testing.assert_close(logits, hf_out.logits, **TOL)

    loss = ours(ids, labels=labels)
    torch.testing.assert_close(loss, hf_out.loss, **TOL)
    loss.backward()
    hf_out.loss.backward()
    hf_params = dict(hf.named_parameters())
    for pname, p in ours.named_parameters():
        ref = hf_params[pname].grad
        assert p.grad is not None, pname
        torch.testing.assert_close(p.grad, ref if ref is not None else torch.zeros_like(p), **TOL, msg=pname)

    if spec["dead"] is not None:  # the dead expert really received nothing, in every layer
        for block in ours.moe_blocks():
            assert block.last_expert_counts[spec["dead"]] == 0


@pytest.mark.parametrize("name", list(CONFIGS))
def test_flex_attention_forward_matches_transformers(name):
    # FlexAttention has no backward on CPU in PyTorch; its gradient is checked on GPU.
    spec = CONFIGS[name]
    hf = hf_model(hf_config(**spec["cfg"]), dead_expert=spec["dead"])
    ours = to_ours(hf, attn_backend="flex")
    ids, _ = _inputs(hf.config, spec["batch"], spec["seq"])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(input_ids=ids).logits, **TOL)
