"""scatter_combine (weighted sum of expert rows back into token order) against index_add in fp64."""

import pytest
import torch
from kernel_cases import as_f64, assert_close, check_grads, device, needs_cuda, randn

from gptoss_kernels import _runtime
from gptoss_kernels.reference import scatter_combine_reference
from gptoss_kernels.scatter_combine import scatter_combine

H = 1100  # more than one 1024-wide column block, not a multiple of 256


def _token_idx(num_tokens, top_k, dropped=()):
    """Each token top_k times in shuffled order, minus the tokens in `dropped` (they get no rows)."""
    idx = torch.arange(num_tokens).repeat(top_k)
    idx = idx[~torch.isin(idx, torch.tensor(dropped, dtype=torch.long))]
    return idx[torch.randperm(idx.numel())].to(device())


def _run(num_tokens, top_k, *, dtype=torch.float32, dropped=(), weights_grad=True):
    torch.manual_seed(0)
    token_idx = _token_idx(num_tokens, top_k, dropped)
    m = token_idx.numel()
    inputs = dict(y=randn(m, H, dtype=dtype), w=torch.rand(m, device=device()).to(dtype).requires_grad_(weights_grad))
    out = scatter_combine(inputs["y"], token_idx, inputs["w"], num_tokens)
    ref_inputs = dict(zip(inputs, as_f64(inputs.values())))
    out_ref = scatter_combine_reference(ref_inputs["y"], token_idx.cpu(), ref_inputs["w"], num_tokens)
    assert out.shape == (num_tokens, H) and out.dtype == dtype
    assert_close(out, out_ref, dtype, "out")
    for t in dropped:
        assert torch.all(out[t] == 0), "a token with no rows must come back as exact zeros"
    check_grads(out, inputs, out_ref, ref_inputs, dtype)


@pytest.mark.parametrize("top_k", [1, 4])
def test_matches_reference(top_k):
    _run(37, top_k, dropped=(0, 5, 36))


def test_frozen_weights():
    _run(20, 2, weights_grad=False)


def test_int32_token_idx_and_fp16():
    torch.manual_seed(0)
    token_idx = _token_idx(9, 3).int()
    y, w = randn(27, H, dtype=torch.float16, grad=False), torch.rand(27, device=device()).half()
    out = scatter_combine(y, token_idx, w, 9)
    assert_close(out, scatter_combine_reference(y.double(), token_idx.cpu(), w.double(), 9), torch.float16, "out")


def test_deterministic():
    torch.manual_seed(0)
    token_idx = _token_idx(50, 4)
    y, w = randn(200, H, grad=False), torch.rand(200, device=device())
    assert torch.equal(scatter_combine(y, token_idx, w, 50), scatter_combine(y, token_idx, w, 50))


@needs_cuda
@pytest.mark.parametrize("top_k", [1, 4])
def test_bf16_gpu(top_k):
    _run(1000, top_k, dtype=torch.bfloat16, dropped=(0, 999))


def test_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setattr(_runtime, "INTERPRETED", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        scatter_combine(torch.randn(2, H), torch.tensor([0, 1]), torch.ones(2), 2)


def test_bad_arguments_raise():
    y = torch.randn(4, H, device=device())
    with pytest.raises(ValueError, match="token_idx and weights"):
        scatter_combine(y, torch.zeros(3, dtype=torch.long, device=device()), torch.ones(4, device=device()), 2)
    with pytest.raises(ValueError, match="integer"):
        scatter_combine(y, torch.zeros(4, device=device()), torch.ones(4, device=device()), 2)
