"""The Triton flash attention in bf16 on a GPU (the interpreter cannot run bf16): GPT-OSS-20B head
shapes against the float64 reference, values and every gradient, and the model's triton backend
against its eager one. Run by benchmarks/gpu_suite.sh; skipped (and said so) without a GPU."""

import pytest
import torch

from gptoss_kernels.flash_attention import flash_attention
from gptoss_kernels.flash_attention_reference import attention_reference
from tests.hf_reference import hf_config, hf_model, to_ours

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run by gpu_suite.sh)")]


@pytest.mark.parametrize("window,docs", [(None, False), (128, False), (128, True), (None, True)])
def test_bf16_kernel_matches_float64_reference(window, docs):
    b, h, kv, t, d = 2, 64, 8, 700, 64
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(b, t, h, d, generator=g, device="cuda").transpose(1, 2)
    k, v = (torch.randn(b, t, kv, d, generator=g, device="cuda").transpose(1, 2) for _ in range(2))
    sinks = torch.randn(h, generator=g, device="cuda")
    doc_ids = (torch.arange(t, device="cuda") // 230).expand(b, t).contiguous() if docs else None
    grad = torch.randn(b, h, t, d, generator=g, device="cuda")
    ours = [x.bfloat16().requires_grad_() for x in (q, k, v, sinks)]
    out = flash_attention(*ours, window=window, doc_ids=doc_ids)
    grads = torch.autograd.grad(out, ours, grad.bfloat16())
    ref_in = [x.bfloat16().double().requires_grad_() for x in (q, k, v, sinks)]
    ref, _ = attention_reference(*ref_in, window=window, doc_ids=doc_ids)
    ref_grads = torch.autograd.grad(ref, ref_in, grad.bfloat16().double())
    # bf16 storage of the output and gradients, fp32 accumulation: a few bf16 ulps relative to the scale
    torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=2e-2)
    for name, a, r in zip(("dq", "dk", "dv", "dsinks"), grads, ref_grads):
        scale = r.abs().max().item()
        torch.testing.assert_close(a.double(), r, rtol=3e-2, atol=3e-2 * scale, msg=name)


def test_model_triton_backend_matches_eager_fp32_with_gradients():
    hf = hf_model(hf_config(hidden_size=128, head_dim=64, num_attention_heads=4, num_key_value_heads=1,
                            sliding_window=16))
    ids = torch.randint(0, hf.config.vocab_size, (2, 200), generator=torch.Generator().manual_seed(0)).cuda()
    labels = ids.roll(-1, 1)
    models = {be: to_ours(hf, attn_backend=be, experts_backend="loop").cuda().train() for be in ("eager", "triton")}
    losses = {be: m(ids, labels=labels) for be, m in models.items()}
    for loss in losses.values():
        loss.backward()
    torch.testing.assert_close(losses["triton"], losses["eager"], rtol=1e-4, atol=1e-4)
    for (name, a), (_, b) in zip(models["triton"].named_parameters(), models["eager"].named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-3, atol=1e-4, msg=name)
