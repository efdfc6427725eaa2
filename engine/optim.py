"""Optimizer and learning-rate schedule.

AdamW with fp32 state; fused on CUDA, apex FusedAdam when importable and asked for. Biases,
norms, sinks and embeddings get no weight decay (decaying them hurts and buys nothing).
"""

from __future__ import annotations

import math

import torch

from .config import OptimConfig


def _no_decay(name: str, p: torch.Tensor) -> bool:
    return (p.ndim < 2 or name.endswith("bias") or name.endswith("_bias") or name.endswith("sinks")
            or "norm" in name or "embed_tokens" in name)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if _no_decay(name, p) else decay).append(p)
    groups = [g for g in ({"params": decay, "weight_decay": weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    if not groups:
        raise ValueError("no trainable parameters: check peft.method / peft.target_modules")
    return groups


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    on_cuda = next(model.parameters()).is_cuda
    kwargs = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    return torch.optim.AdamW(groups, fused=on_cuda or None, **kwargs)


def lr_lambda(cfg: OptimConfig, max_steps: int):
    """Multiplier of the base lr at optimizer step `step` (0-based): linear warmup, then cosine or flat."""

    def fn(step: int) -> float:
        if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        span = max(1, max_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return fn


def build_scheduler(opt: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, max_steps))
