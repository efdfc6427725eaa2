"""Optimizer and learning-rate schedule.

AdamW with fp32 state, fused on CUDA. Biases, norms, sinks and embeddings get no weight decay
(decaying them hurts and buys nothing).

Sharding the optimizer state over the data-parallel ranks is FSDP2's job (parallel.shard=optimizer
or full, engine.parallel.fsdp): the optimizer then sees each rank's shards as DTensors and updates
only those.
"""

from __future__ import annotations

import logging
import math

import torch

from engine.errors import import_failure

log = logging.getLogger(__name__)


def _no_decay(name: str, p: torch.Tensor) -> bool:
    return (
        p.ndim < 2
        or name.endswith("bias")
        or name.endswith("_bias")
        or name.endswith("sinks")
        or "norm" in name
        or "embed_tokens" in name
    )


def param_groups(model: torch.nn.Module, weight_decay: float, keep=lambda name: True) -> list[dict]:
    """[decay group, no-decay group] of the trainable weights that `keep(name)` selects; both groups
    always exist (possibly empty) so every rank's optimizer and schedule have the same shape."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad and keep(name):
            (no_decay if _no_decay(name, p) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _adamw(groups: list[dict], cfg, on_cuda: bool) -> torch.optim.Optimizer:
    """optim.impl: torch (AdamW, fused kernel on CUDA), apex (FusedAdam), auto (apex when it is
    importable on CUDA, else torch)."""
    if cfg.impl in ("apex", "auto") and on_cuda:
        try:
            from apex.optimizers import FusedAdam
        except ImportError as e:
            problem = import_failure("apex", e)
            if cfg.impl == "apex":
                raise ImportError(
                    f"optim.impl=apex but {problem}; install NVIDIA apex with its CUDA "
                    "extensions or use optim.impl=torch (fused AdamW)"
                ) from None
            if not problem.endswith("not installed"):  # auto: an installed apex that fails is worth a line
                log.warning("optim.impl=auto: %s; using torch AdamW (fused)", problem)
        else:
            return FusedAdam(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, adam_w_mode=True)
    if cfg.impl == "apex" and not on_cuda:
        raise ValueError("optim.impl=apex needs CUDA; on CPU use optim.impl=torch or auto")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=on_cuda or None)


def _make(groups: list[dict], cfg, on_cuda: bool) -> torch.optim.Optimizer:
    if cfg.master_weights and any(p.dtype != torch.float32 for g in groups for p in g["params"]):
        return MasterWeightAdamW(groups, cfg, on_cuda)
    return _adamw(groups, cfg, on_cuda)


def build_optimizer(model: torch.nn.Module, cfg, mesh=None) -> torch.optim.Optimizer:
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("no trainable parameters: check peft.method / peft.target_modules")
    on_cuda = next(model.parameters()).is_cuda
    return _make(param_groups(model, cfg.weight_decay), cfg, on_cuda)


class _Wrapper(torch.optim.Optimizer):
    """An optimizer around an inner one, sharing its groups and state so that learning-rate
    schedulers and checkpoints see them."""

    def _wrap(self, inner: torch.optim.Optimizer) -> None:
        self.inner = inner
        self._share()
        self.defaults = inner.defaults
        self._optimizer_step_pre_hooks, self._optimizer_step_post_hooks = {}, {}

    def _share(self) -> None:
        # load_state_dict gives the inner optimizer NEW group dicts: share them again, or the
        # scheduler would set the learning rate on groups nobody reads any more.
        self.param_groups = self.inner.param_groups
        self.state = self.inner.state

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state_dict):
        self.inner.load_state_dict(state_dict)
        self._share()


class MasterWeightAdamW(_Wrapper):
    """AdamW on fp32 master copies of bf16 weights (optim.master_weights=true): the update is computed
    in fp32 and rounded once into the weight the model computes with, so small updates are not lost
    to bf16 rounding, while the model itself holds 2 bytes per weight instead of 4."""

    def __init__(self, groups: list[dict], cfg, on_cuda: bool):
        self.pairs: list[tuple[torch.Tensor, torch.Tensor]] = []  # (model weight, its fp32 master)
        master_groups = []
        for g in groups:
            masters = [p.detach().float().clone() for p in g["params"]]
            self.pairs.extend(zip(g["params"], masters))
            master_groups.append({**g, "params": masters})
        self._wrap(_adamw(master_groups, cfg, on_cuda))

    @torch.no_grad()
    def step(self, closure=None):
        for p, m in self.pairs:
            m.grad = None if p.grad is None else p.grad.float()
        self.inner.step()
        for p, m in self.pairs:
            p.copy_(m)
            m.grad = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p, _ in self.pairs:
            p.grad = None

    def state_dict(self):
        # The masters are part of the state: resuming from the bf16 weights alone would lose them.
        return {"inner": self.inner.state_dict(), "masters": [m.detach().clone() for _, m in self.pairs]}

    def load_state_dict(self, state_dict):
        self.inner.load_state_dict(state_dict["inner"])
        self._share()
        with torch.no_grad():
            for (_, m), saved in zip(self.pairs, state_dict["masters"]):
                m.copy_(saved)


def lr_lambda(cfg, max_steps: int):
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


def build_scheduler(opt: torch.optim.Optimizer, cfg, max_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, max_steps))


def schedule_settings(cfg, max_steps: int) -> dict:
    """The keys that shape the learning rate and the AdamW update, as plain numbers (kept in checkpoints
    to say at resume what changed)."""
    return {
        "optim.lr": cfg.lr,
        "optim.min_lr_ratio": cfg.min_lr_ratio,
        "optim.warmup_steps": cfg.warmup_steps,
        "optim.schedule": cfg.schedule,
        "trainer.max_steps": max_steps,
        "optim.betas": list(cfg.betas),
        "optim.eps": cfg.eps,
        "optim.weight_decay": cfg.weight_decay,
    }


def fresh_hyperparameters(opt: torch.optim.Optimizer) -> list[dict]:
    """Each param group's settings as the current config made them: take this before loading a
    checkpoint's optimizer state, which brings back the old ones."""
    return [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]


def replan_after_resume(opt: torch.optim.Optimizer, sched, fresh: list[dict], lr: float) -> float:
    """Resume policy: the CURRENT config's schedule and AdamW settings apply from the resumed step on,
    as if the run had been planned with them from the start (a longer trainer.max_steps stretches the
    cosine; a new optim.lr scales it). The moments, the step count and the data order come from the
    checkpoint. With unchanged keys this reproduces the loaded values exactly. Returns the next lr."""
    step = sched.last_epoch
    sched.base_lrs = [lr] * len(opt.param_groups)
    for group, settings, fn in zip(opt.param_groups, fresh, sched.lr_lambdas):
        group.update(settings)
        group["initial_lr"] = lr
        group["lr"] = lr * fn(step)
    sched._last_lr = [g["lr"] for g in opt.param_groups]
    return sched._last_lr[0]
