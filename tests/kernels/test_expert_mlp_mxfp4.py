"""expert_mlp and expert_mlp_lora on MXFP4 expert weights (dequantized inside the GEMMs) against the dense path
on the dequantized weights: the fp64 torch reference, and the dense kernels themselves. Forward, dx, bias and
LoRA gradients; tile tails in both orientations, ragged and empty experts, gather."""

import math

import pytest
import torch
from kernel_cases import GROUP_CASES, LaunchSpy, as_f64, assert_close, counts_of, device, gather_for, needs_cuda, randn

from gptoss_kernels import _runtime, grouped_dw
from gptoss_kernels.moe_experts import expert_mlp
from gptoss_kernels.moe_lora import expert_mlp_lora
from gptoss_kernels.mxfp4 import Mxfp4Weight
from gptoss_kernels.reference import dequantize_mxfp4, expert_mlp_lora_reference, expert_mlp_reference

# H = I = 96 with 64-wide tiles: every GEMM has a 32-wide tail where its 32-groups run (forward K = 96 inputs,
# dX N = 96 inputs) and a masked tail on the other side (the down projection's N = 96, the SwiGLU backward's
# K = 96 outputs); 16-row tiles over ragged experts.
H = I = 96
R, SCALING = 4, 2.0
BLOCKS = dict(block_m=16, block_n=64, block_k=64, block_m_dw=16)


def mxfp4_weight(num_experts, n_out, n_in, low, high):
    """Random codes (every byte value) with scales 2**(low-127) .. 2**(high-127), on the test device."""
    blocks = torch.randint(0, 256, (num_experts, n_out, n_in // 32, 16), dtype=torch.uint8, device=device())
    scales = torch.randint(low, high + 1, (num_experts, n_out, n_in // 32), dtype=torch.uint8, device=device())
    return Mxfp4Weight(blocks, scales)


def dense(w: Mxfp4Weight, dtype):
    """The dense [E, in, out] weight an Mxfp4Weight stands for (whole layer: tests only)."""
    return dequantize_mxfp4(w.blocks, w.scales, dtype).transpose(1, 2)


def _scales(spread, fan_in):
    """Scale bytes (two neighbours) that give weights of about spread / sqrt(fan_in): random codes have an
    rms of ~3.2."""
    e = round(math.log2(spread * fan_in**-0.5 / 3.2)) + 127
    return e - 1, e


def _inputs(sizes, dtype, gather, lora, hidden=H, width=I):
    """Trainable x, biases (and adapters); frozen MXFP4 weights. fp32: pre-activations spread wide, some past
    the +-7 clamps; 16-bit types stay inside them (rounding h would move some across a clamp relative to fp64)."""
    m, e = sum(sizes), len(sizes)
    tokens = (m + 1) // 2
    torch.manual_seed(0)
    t = dict(
        x=randn(tokens if gather else m, hidden, dtype=dtype),
        b_gu=randn(e, 2 * width, dtype=dtype),
        b_d=randn(e, hidden, dtype=dtype),
    )
    if lora:
        t.update(
            a_gu=randn(e, hidden, R, scale=hidden**-0.5, dtype=dtype),
            bb_gu=randn(e, R, 2 * width, scale=0.5, dtype=dtype),
            a_d=randn(e, width, R, scale=width**-0.5, dtype=dtype),
            bb_d=randn(e, R, hidden, scale=0.5, dtype=dtype),
        )
    w_gu = mxfp4_weight(e, 2 * width, hidden, *_scales(4 if dtype == torch.float32 else 1, hidden))
    w_d = mxfp4_weight(e, hidden, width, *_scales(1, width))
    return t, w_gu, w_d, gather_for(m, tokens) if gather else None


def _call(fn, t, counts, w_gu, w_d, gather_idx):
    if "a_gu" in t:
        return fn(
            t["x"],
            counts,
            w_gu,
            t["b_gu"],
            w_d,
            t["b_d"],
            (t["a_gu"], t["bb_gu"]),
            (t["a_d"], t["bb_d"]),
            SCALING,
            gather_idx=gather_idx,
        )
    return fn(t["x"], counts, w_gu, t["b_gu"], w_d, t["b_d"], gather_idx=gather_idx)


def _grads(y, t, cot):
    return dict(zip(t, torch.autograd.grad(y, list(t.values()), cot)))


def _run(sizes, *, gather, lora=False, dtype=torch.float32, against_dense_kernel=False, hidden=H, width=I):
    t, w_gu, w_d, gather_idx = _inputs(sizes, dtype, gather, lora, hidden, width)
    counts = counts_of(sizes)
    op, ref_op = (expert_mlp_lora, expert_mlp_lora_reference) if lora else (expert_mlp, expert_mlp_reference)
    y = _call(op, t, counts, w_gu, w_d, gather_idx)
    assert y.shape == (sum(sizes), hidden) and y.dtype == dtype
    # The dense path on the dequantized weights, in fp64 (the reference dequantizing expert by expert gives
    # the same, exactly).
    ref = dict(zip(t, as_f64(t.values())))
    cpu_idx = None if gather_idx is None else gather_idx.cpu()
    y_ref = _call(ref_op, ref, counts.cpu(), dense(w_gu, torch.float64), dense(w_d, torch.float64), cpu_idx)
    assert torch.equal(y_ref, _call(ref_op, ref, counts.cpu(), w_gu, w_d, cpu_idx))
    assert_close(y, y_ref, dtype, "y")
    cot = torch.randn_like(y)
    got, want = _grads(y, t, cot), _grads(y_ref, ref, cot.double().cpu())
    for name in t:
        assert got[name].dtype == dtype
        assert_close(got[name], want[name], dtype, f"d{name}")
    if against_dense_kernel:  # the dense kernels on the same values: the same sums, up to accumulation order
        y_dense = _call(op, t, counts, dense(w_gu, dtype), dense(w_d, dtype), gather_idx)
        assert_close(y, y_dense, dtype, "y vs the dense kernel")
        for name, g in _grads(y_dense, t, cot).items():
            assert_close(got[name], g, dtype, f"d{name} vs the dense kernel")


@pytest.mark.parametrize(
    "case,gather", [("uneven_with_empty", True), ("empty_ends", False), ("all_in_one_expert", True)]
)
def test_expert_mlp_mxfp4(case, gather):
    with _runtime.force_blocks(**BLOCKS):
        _run(GROUP_CASES[case], gather=gather)


@pytest.mark.parametrize("case,gather", [("uneven_with_empty", True), ("one_row_groups", False)])
def test_expert_mlp_lora_mxfp4(case, gather):
    with _runtime.force_blocks(**BLOCKS):
        _run(GROUP_CASES[case], gather=gather, lora=True)


def test_one_tile_group_per_step_against_the_dense_kernel():
    # 32-wide tiles on the group dimension (one scale group per tile and K step); the dense kernels on the
    # dequantized weights give the same results.
    with _runtime.force_blocks(block_m=16, block_n=32, block_k=32, block_m_dw=16):
        _run(GROUP_CASES["uneven_with_empty"], gather=True, lora=True, against_dense_kernel=True)


def test_default_blocks_fp16():
    # The heuristic's own tiles (BLOCK_M 64 for ~50 rows per expert) in fp16.
    _run([70, 0, 3, 57, 71], gather=True, dtype=torch.float16)


def test_mixed_weights_and_no_rows():
    # Only the down projection in MXFP4; then every expert empty: an empty output and exact-zero gradients.
    t, w_gu, w_d, _ = _inputs([2, 3], torch.float32, False, False)
    y = expert_mlp(t["x"], counts_of([2, 3]), dense(w_gu, torch.float32), t["b_gu"], w_d, t["b_d"])
    y_ref = expert_mlp_reference(
        t["x"].double(), torch.tensor([2, 3]), dense(w_gu, torch.float64), t["b_gu"].double(), w_d, t["b_d"].double()
    )
    assert_close(y, y_ref, torch.float32, "y")
    x = randn(5, H)
    y = expert_mlp(
        x,
        counts_of([0, 0]),
        w_gu,
        t["b_gu"],
        w_d,
        t["b_d"],
        gather_idx=torch.zeros(0, dtype=torch.long, device=device()),
    )
    assert y.shape == (0, H)
    y.sum().backward()
    assert torch.all(x.grad == 0) and torch.all(t["b_gu"].grad == 0) and torch.all(t["b_d"].grad == 0)


def test_frozen_mxfp4_weights_get_no_weight_gradient_work(monkeypatch):
    # Trainable biases: only bias-only reductions run (never a dW product); the adapters get their dW.
    spy = LaunchSpy(grouped_dw._grouped_dw_kernel)
    monkeypatch.setattr(grouped_dw, "_grouped_dw_kernel", spy)
    t, w_gu, w_d, gather_idx = _inputs([5, 0, 9], torch.float32, True, True)
    with _runtime.force_blocks(**BLOCKS):
        y = _call(expert_mlp_lora, t, counts_of([5, 0, 9]), w_gu, w_d, gather_idx)
        y.backward(torch.randn_like(y))
    bias_only = [launch for launch in spy.launches if not launch["COMPUTE_DW"]]
    assert len(bias_only) == 2 and len(spy.launches) == 6  # db_d, db_gu; dA and dB of both adapters


def test_reference_dequantizes_one_expert_at_a_time():
    # The torch reference (which the engine's torch backends reuse) never holds a layer's dense weights: each
    # dequantization is one expert's, and autograd keeps the packed bytes, not dense copies.
    t, w_gu, w_d, gather_idx = _inputs([5, 0, 9, 4], torch.float32, True, True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda s: saved.append((s.dtype, s.numel())) or s, lambda s: s):
        y = _call(expert_mlp_lora_reference, t, torch.tensor([5, 0, 9, 4]), w_gu, w_d, gather_idx)
    one_expert = 2 * I * H
    assert not [s for s in saved if s[0].is_floating_point and s[1] >= one_expert], saved
    y.sum().backward()
    assert t["x"].grad is not None and t["a_gu"].grad is not None


def test_weight_shape_errors_name_the_weight():
    t, w_gu, w_d, _ = _inputs([2, 3], torch.float32, False, False)
    with pytest.raises(ValueError, match="w_d"):
        expert_mlp(t["x"], counts_of([2, 3]), w_gu, t["b_gu"], w_gu, t["b_d"])  # gate_up's weight as down's
    with pytest.raises(ValueError, match="w_gu"):
        expert_mlp(t["x"][:, :64], counts_of([2, 3]), w_gu, t["b_gu"], w_d, t["b_d"])
    with pytest.raises(ValueError, match="w_d is a transposed MXFP4 view"):  # square: the shapes cannot tell
        expert_mlp(t["x"], counts_of([2, 3]), w_gu, t["b_gu"], w_d.transpose(1, 2), t["b_d"])


PRODUCTION_SIZES = [300, 0, 129, 200]  # 128-row tiles (wgmma), ragged tails, an empty expert


@needs_cuda
def test_bf16_gpu_mxfp4_at_gpt_oss_shapes():
    # H = I = 2880 (45 64-deep K steps; N = 2880 over 128-wide tiles: a 64-column tail), bf16 against fp64.
    _run(PRODUCTION_SIZES, gather=True, dtype=torch.bfloat16, hidden=2880, width=2880)
