"""Optimizer pieces against plain torch references."""

import torch

from engine.config.sections import OptimConfig
from engine.training.optim import MasterWeightAdamW, build_scheduler, lr_lambda


def test_master_weights_equal_fp32_adamw_rounded_each_step():
    # bf16 weights with fp32 masters == AdamW on fp32 weights, whose value the bf16 weight mirrors.
    g = torch.Generator().manual_seed(0)
    ref = [torch.nn.Parameter(torch.randn(5, 7, generator=g)), torch.nn.Parameter(torch.randn(7, generator=g))]
    ours = [torch.nn.Parameter(p.detach().bfloat16()) for p in ref]
    with torch.no_grad():
        for r, o in zip(ref, ours):
            r.copy_(o.float())  # start from the same (bf16-representable) values
    cfg = OptimConfig(lr=1e-2, weight_decay=0.1)
    opt_ref = torch.optim.AdamW([{"params": ref, "weight_decay": 0.1}], lr=1e-2, betas=cfg.betas, eps=cfg.eps)
    opt = MasterWeightAdamW([{"params": ours, "weight_decay": 0.1}], cfg, on_cuda=False)
    for _ in range(5):
        grads = [torch.randn(p.shape, generator=g) for p in ref]
        for r, o, gr in zip(ref, ours, grads):
            o.grad = gr.bfloat16()
            r.grad = o.grad.float()
        opt.step()
        opt_ref.step()
        opt.zero_grad()
        for r, o in zip(ref, ours):
            assert torch.equal(o, r.detach().bfloat16())
    masters = [m for _, m in opt.pairs]
    assert all(torch.equal(m, r.detach()) for m, r in zip(masters, ref))

    # The masters travel with the state: a fresh optimizer resumes them exactly, and a scheduler
    # attached to it still drives the learning rate the inner optimizer uses.
    again = MasterWeightAdamW([{"params": ours, "weight_decay": 0.1}], cfg, on_cuda=False)
    sched = build_scheduler(again, OptimConfig(lr=1e-2, warmup_steps=0, schedule="cosine"), max_steps=4)
    again.load_state_dict(opt.state_dict())
    assert all(torch.equal(m, r.detach()) for (_, m), r in zip(again.pairs, ref))
    sched.step()
    assert again.inner.param_groups[0]["lr"] == sched.get_last_lr()[0] < 1e-2


def test_scheduler_drives_the_master_optimizer_lr():
    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))
    cfg = OptimConfig(lr=1.0, warmup_steps=4, schedule="constant")
    opt = MasterWeightAdamW([{"params": [p], "weight_decay": 0.0}], cfg, on_cuda=False)
    sched = build_scheduler(opt, cfg, max_steps=10)
    lrs = []
    for _ in range(5):
        lrs.append(opt.inner.param_groups[0]["lr"])
        p.grad = torch.ones_like(p)
        opt.step()
        sched.step()
    assert lrs == [lr_lambda(cfg, 10)(s) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
