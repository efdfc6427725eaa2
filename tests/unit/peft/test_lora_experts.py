"""Expert LoRA (grouped products on grouped rows) against a plain per-expert torch reference in float64."""

import pytest
import torch
from torch import nn

from engine.moe.experts import GroupedExperts
from engine.peft import LoraConfig, apply_lora
from engine.peft.adapters import adapter_modules
from tests.unit.peft.helpers import randomize_adapters

E, H, I, R, ALPHA = 5, 12, 8, 4, 8.0  # sizes keep torch._grouped_mm's 16-byte alignment in fp32
COUNTS = [3, 0, 5, 1, 0]  # uneven groups, empty experts in the middle and at the end
TOKENS = 6  # with gather_idx: 9 rows read from 6 tokens (some twice, one never)


def _reference(x, counts, p, f, scaling, gather_idx=None, alpha=1.702, limit=7.0):
    """Per expert, nothing shared with the code under test: y = mlp_e(x) with W + scaling A_e B_e."""
    rows = x[gather_idx] if gather_idx is not None else x
    out, start = [], 0
    for e, n in enumerate(counts):
        xe = rows[start : start + n]
        a_gu, b_gu = (
            (f["gate_up_A"], f["gate_up_B"]) if f["gate_up_A"].dim() == 2 else (f["gate_up_A"][e], f["gate_up_B"][e])
        )
        a_d, b_d = (f["down_A"], f["down_B"]) if f["down_A"].dim() == 2 else (f["down_A"][e], f["down_B"][e])
        h = xe @ p["gate_up_proj"][e] + p["gate_up_proj_bias"][e] + scaling * (xe @ a_gu) @ b_gu
        gate, up = h[:, 0::2].clamp(max=limit), h[:, 1::2].clamp(-limit, limit)
        act = gate * torch.sigmoid(alpha * gate) * (up + 1)
        out.append(act @ p["down_proj"][e] + p["down_proj_bias"][e] + scaling * (act @ a_d) @ b_d)
        start += n
    return torch.cat(out)


def _experts(backend, shared, dtype, dropout=0.0):
    torch.manual_seed(0)
    holder = nn.Module()  # apply_lora needs a parent: a shared adapter is registered beside the experts
    holder.experts = GroupedExperts(E, H, I, alpha=1.702, limit=7.0, backend=backend)
    with torch.no_grad():
        for p in holder.experts.parameters():
            p.normal_(0, 0.5)
    holder.to(dtype)
    apply_lora(
        holder,
        LoraConfig(
            rank=R,
            alpha=ALPHA,
            dropout=dropout,
            share_expert_adapters=shared,
            target_modules=["gate_up_proj", "down_proj"],
        ),
    )
    randomize_adapters(holder)
    return holder.eval()


def _check(backend, shared, gather, dtype, tol, dropout=0.0):
    holder = _experts(backend, shared, dtype, dropout)
    experts = holder.experts
    ((_, lora, _),) = adapter_modules(holder)
    counts = torch.tensor(COUNTS)
    gen = torch.Generator().manual_seed(1)
    m = sum(COUNTS)
    gather_idx = torch.tensor([0, 2, 2, 5, 1, 4, 0, 3, 5]) if gather else None
    x64 = torch.randn(TOKENS if gather else m, H, generator=gen, dtype=torch.float64)
    dy = torch.randn(m, H, generator=gen, dtype=torch.float64)

    x = x64.to(dtype).clone().requires_grad_(True)
    y = experts(x, counts, gather_idx=gather_idx)
    (y * dy.to(dtype)).sum().backward()

    base64 = {n: p.detach().double() for n, p in experts.named_parameters(recurse=False)}
    f64 = {n: p.detach().double().requires_grad_(True) for n, p in lora.named_parameters()}
    xr = x64.clone().requires_grad_(True)
    y_ref = _reference(xr, COUNTS, base64, f64, lora.scaling, gather_idx)
    (y_ref * dy).sum().backward()

    torch.testing.assert_close(y.double(), y_ref, **tol)
    torch.testing.assert_close(x.grad.double(), xr.grad, **tol)
    for n, p in lora.named_parameters():
        torch.testing.assert_close(p.grad.double(), f64[n].grad, **tol, msg=n)
        if not shared and n.endswith("_A"):  # an empty expert gets no adapter gradient
            assert p.grad[1].abs().max() == 0 and p.grad[4].abs().max() == 0
    assert all(p.grad is None for p in experts.parameters(recurse=False))  # the frozen base


# loop runs in float64 itself: differences are float64 rounding only.
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("gather", [False, True])
def test_loop_backend_matches_reference_float64(shared, gather):
    _check("loop", shared, gather, torch.float64, dict(rtol=1e-10, atol=1e-10))


# torch._grouped_mm on CPU takes fp32 at most: fp32 against the float64 reference, a few fp32 ulps
# of values of size ~10 summed over 12 terms.
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("gather", [False, True])
def test_grouped_mm_backend_matches_reference(shared, gather):
    _check("grouped_mm", shared, gather, torch.float32, dict(rtol=1e-5, atol=1e-4))


def test_dropout_is_inactive_in_eval():
    _check("loop", False, True, torch.float64, dict(rtol=1e-10, atol=1e-10), dropout=0.5)


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("gather", [False, True])
def test_triton_backend_matches_reference(shared, gather):
    # The adapters run fused into the expert GEMMs (gptoss_kernels.moe_lora), under the interpreter in fp32.
    pytest.importorskip("triton", reason="the triton backend needs triton (CPU: its interpreter, fp32)")
    _check("triton", shared, gather, torch.float32, dict(rtol=1e-5, atol=1e-4))


def test_dropout_trains_a_different_adapter_input_each_step():
    holder = _experts("loop", False, torch.float64, dropout=0.5).train()
    x = torch.randn(sum(COUNTS), H, dtype=torch.float64)
    counts = torch.tensor(COUNTS)
    torch.manual_seed(0)
    y1 = holder.experts(x, counts)
    y2 = holder.experts(x, counts)
    assert not torch.equal(y1, y2)  # dropout masks are drawn anew
    with torch.no_grad():
        holder.eval()
        torch.testing.assert_close(holder.experts(x, counts), holder.experts(x, counts), rtol=0, atol=0)
