"""Builders for tiny `transformers` GPT-OSS reference models used across the tests."""

from __future__ import annotations

import torch


def hf_config(**kw):
    from transformers import GptOssConfig as HFConfig

    base = dict(
        vocab_size=128,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_local_experts=4,
        num_experts_per_tok=2,
        intermediate_size=24,
        sliding_window=4,
        max_position_embeddings=512,
        pad_token_id=None,
        eos_token_id=None,
        bos_token_id=None,
    )
    base.update(kw)
    cfg = HFConfig(**base)
    cfg.rope_parameters["original_max_position_embeddings"] = 64  # YaRN ramp active at tiny sizes
    return cfg


def hf_model(cfg, seed: int = 0, dead_expert: int | None = None):
    """A random fp32 HF model in reference (eager) mode. `dead_expert` gets a router bias so low that
    no token is ever routed to it."""
    from transformers import GptOssForCausalLM as HFModel

    torch.manual_seed(seed)
    model = HFModel._from_config(cfg, attn_implementation="eager", torch_dtype=torch.float32)
    model.config._experts_implementation = "eager"
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_bias") or name.endswith(".bias") or name.endswith("sinks"):
                p.normal_(0.0, 0.5)  # non-zero biases and sinks so every term is exercised
            elif "experts" in name:
                p.normal_(0.0, 0.2)
        if dead_expert is not None:
            for layer in model.model.layers:
                layer.mlp.router.bias[dead_expert] = -1e4
    return model.eval()


def to_ours(hf, **options):
    from engine.models.gpt_oss import GptOssConfig, GptOssForCausalLM

    cfg = GptOssConfig.from_hf_dict(hf.config.to_dict())
    model = GptOssForCausalLM(cfg, **options)
    missing, unexpected = model.load_state_dict(hf.state_dict(), strict=True)
    assert not missing and not unexpected
    return model.eval()
