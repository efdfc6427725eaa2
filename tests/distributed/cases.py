"""Models, batches and single-process references shared by the distributed workers and the tests.

Every rank builds the same full (EP = 1) model from a seed and keeps its slice of the experts, so
the single-process reference in the pytest process and the ranks start from identical weights.
"""

from __future__ import annotations

import torch

from engine.checkpoint.hf.mxfp4 import dequantize_mxfp4, quantize_mxfp4
from engine.models.gpt_oss import GptOssConfig, GptOssForCausalLM, ModelOptions
from engine.moe.experts import shard_model_experts
from engine.parallel.parallelize import apply_activation_checkpointing
from tests.distributed.layout import is_expert_param

GLOBAL_BATCH, SEQ = 8, 6  # 8 sequences: one per rank at world 8

# name -> what differs from the plain model. "hot" experts get a router bias so large that every
# token picks them: with (0, 1) all rows go to experts 0 and 1, which rank 0 owns whenever it holds
# two or more experts (ranks 0 and 1 at EP = 8): the other ranks receive nothing, most experts get
# no token, and most ranks send everything away.
CASES = {
    "uniform": {},
    "skewed": {"hot": (0, 1)},
    "one_expert": {"cfg": {"num_experts_per_tok": 1}, "hot": (0,)},  # literally every token on expert 0
    "skewed_grouped_mm": {"hot": (0, 1), "backend": "grouped_mm"},  # the backend without host syncs
    "frozen_dense": {"freeze_dense": True},  # LoRA-like: only experts train, dense grads are skipped
    "checkpointed": {"checkpointing": True},  # recompute re-runs the exchanges inside the backward
    # LoRA over experts each rank keeps packed as MXFP4 (model.expert_weights=mxfp4), against the single
    # process's LoRA over the same values as dense weights; intermediate 32: whole groups of 32 inputs.
    "mxfp4_lora": {"cfg": {"intermediate_size": 32}, "mxfp4": True},
}
MXFP4_LORA = dict(rank=4, alpha=8.0, target_modules=["q_proj", "v_proj", "gate_up_proj", "down_proj"])


def tiny_config(**overrides) -> GptOssConfig:
    base = dict(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_local_experts=8,
        num_experts_per_tok=2,
        intermediate_size=16,
        sliding_window=4,
    )
    base.update(overrides)
    return GptOssConfig.tiny(**base)


def full_model(case: str, seed: int = 0) -> GptOssForCausalLM:
    spec = CASES[case]
    cfg = tiny_config(**spec.get("cfg", {}))
    model = GptOssForCausalLM(cfg, ModelOptions(experts_backend=spec.get("backend", "loop"), attn_backend="eager"))
    model.init_weights(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():  # non-zero biases and sinks, so every term has a gradient
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
        for block in model.moe_blocks():
            for e in spec.get("hot", ()):
                block.router.bias[e] += 50.0
            if spec.get("mxfp4"):  # values MXFP4 holds exactly: the packed copy dequantizes to them
                for name in ("gate_up_proj", "down_proj"):
                    w = getattr(block.experts, name)
                    w.copy_(dequantize_mxfp4(*quantize_mxfp4(w.transpose(1, 2)), torch.float32).transpose(1, 2))
    _configure(model, spec)
    if spec.get("mxfp4"):
        _lora(model)
    return model


def _lora(model: GptOssForCausalLM) -> None:
    """The same adapters on every rank (seeded), B made non-zero so that A gets a gradient too."""
    from engine.peft import LoraConfig, apply_lora

    apply_lora(model, LoraConfig(**MXFP4_LORA), seed=3)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and name.endswith("B"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)  # a rank's own are replaced by the full model's


def _configure(model: GptOssForCausalLM, spec: dict) -> None:
    if spec.get("freeze_dense"):
        for name, p in model.named_parameters():
            p.requires_grad_(is_expert_param(name))
    if spec.get("checkpointing"):
        apply_activation_checkpointing(model, True)


def expert_parallel_model(case: str, ep: int, ep_rank: int, seed: int = 0) -> GptOssForCausalLM:
    """This rank's model: the full model's weights with only experts [ep_rank*E/ep, ...) kept."""
    full = full_model(case, seed)
    mxfp4 = CASES[case].get("mxfp4", False)
    opts = ModelOptions(
        experts_backend=full.options.experts_backend,
        attn_backend="eager",
        expert_weights="mxfp4" if mxfp4 else "dense",
    )
    model = GptOssForCausalLM(full.config, opts)
    shard_model_experts(model, ep, ep_rank)
    local = full.config.num_local_experts // ep
    state = {
        name: (t[ep_rank * local : (ep_rank + 1) * local] if is_expert_param(name) else t)
        for name, t in full.state_dict().items()
    }
    if mxfp4:
        _lora(model)
        _pack_experts(model, state)
    model.load_state_dict(state, strict=True)
    _configure(model, CASES[case])
    return model


@torch.no_grad()
def _pack_experts(model: GptOssForCausalLM, state: dict) -> None:
    """Fill the packed experts from (and take out of `state`) this rank's dense expert matrices."""
    for prefix, module in model.named_modules():
        if getattr(module, "packed", False):
            for name in ("gate_up_proj", "down_proj"):
                blocks, scales = quantize_mxfp4(state.pop(f"{prefix}.{name}").transpose(1, 2))
                module._buffers[f"{name}_blocks"].copy_(blocks)
                module._buffers[f"{name}_scales"].copy_(scales)


def global_batch(vocab: int, step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """ids, labels [GLOBAL_BATCH, SEQ]; about a quarter of the labels ignored (-100)."""
    gen = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(0, vocab, (GLOBAL_BATCH, SEQ), generator=gen)
    labels = torch.randint(0, vocab, (GLOBAL_BATCH, SEQ), generator=gen)
    labels[torch.rand(GLOBAL_BATCH, SEQ, generator=gen) < 0.25] = -100
    return ids, labels


def reference(case: str) -> dict:
    """The single-process run on the whole global batch: logits, loss, gradients, norm, expert load."""
    model = full_model(case)
    ids, labels = global_batch(model.config.vocab_size)
    with torch.no_grad():
        logits = model(ids)
    loss = model(ids, labels=labels)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads.values()]))
    counts = [b.last_expert_counts.clone() for b in model.moe_blocks()]
    return {"logits": logits, "loss": loss.detach(), "grads": grads, "norm": norm, "counts": counts}


def reference_steps(steps: int, lr: float, max_norm: float) -> dict:
    """AdamW steps on the whole global batch (one micro-batch per step), single process."""
    from torch.nn.utils import clip_grad_norm_

    model = full_model("uniform")
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses, norms = [], []
    for step in range(steps):
        ids, labels = global_batch(model.config.vocab_size, step)
        opt.zero_grad(set_to_none=True)
        loss = model(ids, labels=labels)
        loss.backward()
        norms.append(clip_grad_norm_(model.parameters(), max_norm))
        opt.step()
        losses.append(loss.detach())
    return {
        "losses": torch.stack(losses),
        "norms": torch.stack(norms),
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
    }
