"""Optimizer and learning-rate schedule.

AdamW with fp32 state, fused on CUDA. Biases, norms, sinks and embeddings get no weight decay
(decaying them hurts and buys nothing).

`ShardedAdamW` (optim.shard_state=true) is ZeRO stage 1: every replicated weight's AdamW state
lives on one rank only. Gradients are already summed everywhere (engine.parallel.sync_gradients),
so each rank updates the weights it owns and broadcasts them to the others: same update, 1/N of
the dense optimizer memory. Expert weights are replicated only across their expert-data-parallel
group, so they are sharded over that group.
"""

from __future__ import annotations

import math

import torch

from .config import OptimConfig


def _no_decay(name: str, p: torch.Tensor) -> bool:
    return (p.ndim < 2 or name.endswith("bias") or name.endswith("_bias") or name.endswith("sinks")
            or "norm" in name or "embed_tokens" in name)


def param_groups(model: torch.nn.Module, weight_decay: float, keep=lambda name: True) -> list[dict]:
    """[decay group, no-decay group] of the trainable weights that `keep(name)` selects; both groups
    always exist (possibly empty) so every rank's optimizer and schedule have the same shape."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad and keep(name):
            (no_decay if _no_decay(name, p) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _adamw(groups: list[dict], cfg: OptimConfig, on_cuda: bool) -> torch.optim.Optimizer:
    """optim.impl: torch (AdamW, fused kernel on CUDA), apex (FusedAdam), auto (apex when it is
    importable on CUDA, else torch)."""
    if cfg.impl in ("apex", "auto") and on_cuda:
        try:
            from apex.optimizers import FusedAdam
        except ImportError:
            if cfg.impl == "apex":
                raise ImportError("optim.impl=apex but apex is not importable; install NVIDIA apex with its CUDA "
                                  "extensions or use optim.impl=torch (fused AdamW)") from None
        else:
            return FusedAdam(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, adam_w_mode=True)
    if cfg.impl == "apex" and not on_cuda:
        raise ValueError("optim.impl=apex needs CUDA; on CPU use optim.impl=torch or auto")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=on_cuda or None)


def _make(groups: list[dict], cfg: OptimConfig, on_cuda: bool) -> torch.optim.Optimizer:
    if cfg.master_weights and any(p.dtype != torch.float32 for g in groups for p in g["params"]):
        return MasterWeightAdamW(groups, cfg, on_cuda)
    return _adamw(groups, cfg, on_cuda)


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, mesh=None) -> torch.optim.Optimizer:
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("no trainable parameters: check peft.method / peft.target_modules")
    on_cuda = next(model.parameters()).is_cuda
    if cfg.shard_state and mesh is not None and mesh.distributed:
        return ShardedAdamW(model, cfg, mesh, on_cuda)
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

    def __init__(self, groups: list[dict], cfg: OptimConfig, on_cuda: bool):
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


def _owners(params: list[tuple[str, torch.Tensor]], n: int) -> dict[str, int]:
    """Deterministic size-balanced assignment of weights to n owners (largest first)."""
    load = [0] * n
    owner = {}
    for name, p in sorted(params, key=lambda item: (-item[1].numel(), item[0])):
        r = min(range(n), key=lambda i: (load[i], i))
        owner[name] = r
        load[r] += p.numel()
    return owner


class ShardedAdamW(_Wrapper):
    """AdamW whose state is split across the ranks that hold copies of the same weights."""

    def __init__(self, model: torch.nn.Module, cfg: OptimConfig, mesh, on_cuda: bool):
        import torch.distributed as dist

        from .parallel import is_expert_param

        self._dist = dist
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        dense = [(n, p) for n, p in named if not is_expert_param(n)]
        expert = [(n, p) for n, p in named if is_expert_param(n)]
        # (weight, owner's rank within its group, that group, the owner's global rank)
        self._plan: list[tuple[torch.Tensor, int, object, int]] = []
        mine: set[str] = set()
        for params, size, my_index, group, to_global in (
            (dense, mesh.world_size, mesh.rank, mesh.dp_group, lambda i: i),
            (expert, mesh.edp_size, mesh.edp_rank, mesh.edp_group, lambda i: i * mesh.ep + mesh.ep_rank),
        ):
            owner = _owners(params, size)
            for n, p in params:
                self._plan.append((p, owner[n], group, to_global(owner[n])))
                if owner[n] == my_index:
                    mine.add(n)
        self._wrap(_make(param_groups(model, cfg.weight_decay, keep=lambda n: n in mine), cfg, on_cuda))

    @torch.no_grad()
    def step(self, closure=None):
        self.inner.step()
        # Owners send their updated weights, bucketed per (group, owner) to keep collectives few.
        buckets: dict[tuple[int, int], list[torch.Tensor]] = {}
        groups = {}
        for p, _, group, src in self._plan:
            if group is None:  # a group of one rank: nothing to share
                continue
            buckets.setdefault((id(group), src), []).append(p)
            groups[id(group)] = group
        for (gid, src), params in buckets.items():
            flat = torch.cat([p.detach().reshape(-1) for p in params])
            self._dist.broadcast(flat, src=src, group=groups[gid])
            for p, part in zip(params, flat.split([p.numel() for p in params])):
                p.copy_(part.view_as(p))

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p, *_ in self._plan:
            p.grad = None if set_to_none else (p.grad.zero_() if p.grad is not None else None)


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


def schedule_settings(cfg: OptimConfig, max_steps: int) -> dict:
    """The keys that shape the learning rate and the AdamW update, as plain numbers (kept in checkpoints
    to say at resume what changed)."""
    return {"optim.lr": cfg.lr, "optim.min_lr_ratio": cfg.min_lr_ratio, "optim.warmup_steps": cfg.warmup_steps,
            "optim.schedule": cfg.schedule, "trainer.max_steps": max_steps, "optim.betas": list(cfg.betas),
            "optim.eps": cfg.eps, "optim.weight_decay": cfg.weight_decay}


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
