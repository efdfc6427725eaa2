"""Resume policy for changed schedule keys: the current config's schedule and AdamW settings apply
from the resumed step on; with unchanged keys a resume is exact."""

import math

import torch

from engine.config.sections import OptimConfig
from engine.training.optim import build_optimizer, build_scheduler, fresh_hyperparameters, replan_after_resume


def _setup(cfg: OptimConfig, max_steps: int):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt = build_optimizer(model, cfg)
    return model, opt, build_scheduler(opt, cfg, max_steps)


def _steps(model, opt, sched, n: int, start: int = 0) -> list[float]:
    lrs = []
    for i in range(start, start + n):
        x = torch.randn(3, 4, generator=torch.Generator().manual_seed(i))
        model(x).square().sum().backward()
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
        opt.zero_grad()
    return lrs


def _resume(cfg: OptimConfig, max_steps: int, model_state, opt_state, sched_state):
    model, opt, sched = _setup(cfg, max_steps)
    model.load_state_dict(model_state)
    fresh = fresh_hyperparameters(opt)
    opt.load_state_dict(opt_state)
    sched.load_state_dict(sched_state)
    next_lr = replan_after_resume(opt, sched, fresh, cfg.lr)
    return model, opt, sched, next_lr


def _cosine(lr, warmup, min_ratio, max_steps, step):  # an independent float64 statement of the schedule
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def test_unchanged_keys_resume_exactly():
    cfg = OptimConfig(lr=1e-2, warmup_steps=2, min_lr_ratio=0.1, weight_decay=0.1)
    model, opt, sched = _setup(cfg, 8)
    straight = _steps(model, opt, sched, 8)
    final = {k: v.clone() for k, v in model.state_dict().items()}

    model, opt, sched = _setup(cfg, 8)
    first = _steps(model, opt, sched, 4)
    saved = ({k: v.clone() for k, v in model.state_dict().items()}, opt.state_dict(), sched.state_dict())
    model, opt, sched, next_lr = _resume(cfg, 8, *saved)
    assert next_lr == straight[4]
    assert first + _steps(model, opt, sched, 4, start=4) == straight  # bit for bit
    assert all(torch.equal(final[k], v) for k, v in model.state_dict().items())


def test_changed_keys_replan_the_schedule_from_the_current_step():
    old = OptimConfig(lr=3e-4, warmup_steps=2, min_lr_ratio=0.1, weight_decay=0.1)
    model, opt, sched = _setup(old, 20)
    _steps(model, opt, sched, 10)
    saved = ({k: v.clone() for k, v in model.state_dict().items()}, opt.state_dict(), sched.state_dict())

    new = OptimConfig(lr=3e-5, warmup_steps=2, min_lr_ratio=0.2, weight_decay=0.05, betas=(0.8, 0.95))
    model, opt, sched, next_lr = _resume(new, 22, *saved)
    lrs = _steps(model, opt, sched, 12, start=10)
    expected = [_cosine(3e-5, 2, 0.2, 22, s) for s in range(10, 22)]
    assert next_lr == lrs[0]
    torch.testing.assert_close(
        torch.tensor(lrs, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=0
    )
    assert all(b >= a for a, b in zip(lrs[1:], lrs))  # still decaying: the cosine does not rise again
    decay, no_decay = opt.param_groups
    assert decay["betas"] == (0.8, 0.95) and decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert sched.base_lrs == [3e-5, 3e-5]
    assert opt.state_dict()["state"]  # the AdamW moments came from the checkpoint
