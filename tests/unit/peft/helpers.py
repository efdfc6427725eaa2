"""Shared builders for the LoRA tests: a tiny fp32 model pair (ours + transformers) and non-zero adapters."""

from __future__ import annotations

import torch

from engine.peft.lora import adapter_modules
from tests.hf_reference import hf_config, hf_model, to_ours


def tiny_pair(seed: int = 0, **options):
    """A tiny transformers GPT-OSS (hidden 32, 4 experts, intermediate 24, 2 layers; expert 3 never routed
    to) and our copy of it. Special token ids inside the tiny vocabulary: GptOssConfig.from_hf_dict turns
    None into the real model's ids, which a tiny exported config.json cannot carry."""
    hf = hf_model(hf_config(pad_token_id=0, bos_token_id=1, eos_token_id=2), seed=seed, dead_expert=3)
    return hf, to_ours(hf, **options)


def token_ids(batch: int = 2, seq: int = 10, vocab: int = 128, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def randomize_adapters(model, seed: int = 2, std: float = 0.3) -> None:
    """Give every B (zero after apply_lora) random values, so that the adapters change the output."""
    gen = torch.Generator().manual_seed(seed)
    for _, adapter, _ in adapter_modules(model):
        for name, p in adapter.named_parameters():
            if name.endswith("B"):
                p.copy_(torch.randn(p.shape, generator=gen) * std)
