"""The chunked loss under no_grad (no weight gradient work) and the per-token losses evaluation uses."""

import torch
from torch.utils.flop_counter import FlopCounterMode

from engine.models.gpt_oss.loss import linear_cross_entropy, token_cross_entropy


def _case(n=40, h=16, v=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::3] = -100
    return hidden, weight, labels


def test_no_grad_loss_runs_only_the_logits_gemm():
    hidden, weight, labels = _case()
    kept = int((labels != -100).sum())
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        loss = linear_cross_entropy(hidden, weight, labels, chunk_size=8)
    # logits only: 2 * rows * H * V; the fixed bug added 2 * rows * H * V more for the weight gradient
    # (and as much again for the hidden gradient) on every chunk
    assert counter.get_total_flops() == 2 * kept * 16 * 50
    ref = torch.nn.functional.cross_entropy(hidden @ weight.t(), labels, reduction="sum")
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-12, atol=1e-12)


def test_loss_with_grad_still_computes_both_gradients():
    hidden, weight, labels = _case()
    linear_cross_entropy(hidden, weight, labels, chunk_size=8).backward()
    h2, w2 = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    torch.nn.functional.cross_entropy(h2 @ w2.t(), labels, reduction="sum").backward()
    torch.testing.assert_close(hidden.grad, h2.grad)
    torch.testing.assert_close(weight.grad, w2.grad)


def test_token_cross_entropy_equals_unreduced_cross_entropy():
    hidden, weight, labels = _case()
    got = token_cross_entropy(hidden.view(4, 10, 16), weight, labels.view(4, 10), chunk_size=7)
    ref = torch.nn.functional.cross_entropy(hidden @ weight.t(), labels, reduction="none", ignore_index=-100)
    assert got.shape == (4, 10) and not got.requires_grad
    torch.testing.assert_close(got.flatten(), ref.detach(), rtol=1e-12, atol=1e-12)
