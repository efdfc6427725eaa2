"""expert_mlp (fused SwiGLU grouped GEMMs + fused backward) against the per-expert torch loop in fp64."""

import pytest
import torch
from kernel_cases import (
    GROUP_CASES,
    SMALL_BLOCKS,
    LaunchSpy,
    as_f64,
    assert_close,
    check_grads,
    counts_of,
    device,
    gather_for,
    needs_cuda,
    randn,
)

from gptoss_kernels import _runtime, grouped_dw
from gptoss_kernels.moe_experts import expert_mlp
from gptoss_kernels.reference import expert_mlp_reference

H, I = 32, 24  # hidden, expert width: w_gu is [E, 32, 48], w_d is [E, 24, 32]
ALPHA, LIMIT = 1.702, 7.0
NAMES = ("x", "w_gu", "b_gu", "w_d", "b_d")


def _inputs(sizes, dtype, gather, trainable=NAMES):
    """Random inputs by name, and the gather index (None unless `gather`)."""
    m, e = sum(sizes), len(sizes)
    num_tokens = (m + 1) // 2
    # fp32/fp16: a wide gate/up spread, so a good share of pre-activations lands beyond the +-7
    # clamps. bf16 (spacing 1/32 near 7) would flip some of them across a clamp relative to the
    # fp64 reference and make the comparison noisy, so it stays inside; the clamps are tested in fp32.
    spread = 4 if dtype != torch.bfloat16 else 1
    scales = (1.0, spread * H**-0.5, 1.0, I**-0.5, 1.0)
    shapes = ((num_tokens if gather else m, H), (e, H, 2 * I), (e, 2 * I), (e, I, H), (e, H))
    inputs = {n: randn(*s, scale=c, dtype=dtype, grad=n in trainable) for n, s, c in zip(NAMES, shapes, scales)}
    return inputs, gather_for(m, num_tokens, top_k=2) if gather else None


def _call(fn, inputs, counts, gather_idx):
    return fn(
        inputs["x"],
        counts,
        inputs["w_gu"],
        inputs["b_gu"],
        inputs["w_d"],
        inputs["b_d"],
        alpha=ALPHA,
        limit=LIMIT,
        gather_idx=gather_idx,
    )


def _run(sizes, *, dtype=torch.float32, gather=False, biases=True):
    torch.manual_seed(0)
    inputs, gather_idx = _inputs(sizes, dtype, gather)
    if not biases:
        inputs["b_gu"] = inputs["b_d"] = None
    counts = counts_of(sizes)
    y = _call(expert_mlp, inputs, counts, gather_idx)
    ref_inputs = dict(zip(inputs, as_f64(inputs.values())))
    y_ref = _call(expert_mlp_reference, ref_inputs, counts.cpu(), None if gather_idx is None else gather_idx.cpu())
    assert y.shape == (sum(sizes), H) and y.dtype == dtype
    assert_close(y, y_ref, dtype, "y")
    check_grads(y, inputs, y_ref, ref_inputs, dtype)


@pytest.mark.parametrize("case", sorted(GROUP_CASES))
@pytest.mark.parametrize("gather", [False, True])
def test_matches_reference(case, gather):
    with _runtime.force_blocks(**SMALL_BLOCKS):
        _run(GROUP_CASES[case], gather=gather)


def test_no_biases():
    with _runtime.force_blocks(**SMALL_BLOCKS):
        _run(GROUP_CASES["uneven_with_empty"], biases=False)


def test_default_blocks():
    # The heuristic's own tiles (BLOCK_M 64, BLOCK_N 64 for 2I = 48) on ~200 rows.
    _run([70, 0, 3, 57, 71], gather=True)


def test_fp16():
    with _runtime.force_blocks(**SMALL_BLOCKS):
        _run(GROUP_CASES["uneven_with_empty"], dtype=torch.float16, gather=True)


@needs_cuda
@pytest.mark.parametrize("case", sorted(GROUP_CASES))
@pytest.mark.parametrize("gather", [False, True])
def test_bf16_gpu(case, gather):
    _run(GROUP_CASES[case], dtype=torch.bfloat16, gather=gather)


PRODUCTION_SIZES = [130, 0, 257, 128, 200]  # >= 128 rows per expert: 128-row tiles, as training at 20B shapes


@needs_cuda
@pytest.mark.parametrize("gather", [False, True])
def test_bf16_gpu_production_tiles(gather):
    # The 128-row tiles (wgmma on Hopper) that training uses, forward and backward, against fp64.
    from gptoss_kernels.tile_map import choose_block_m

    assert choose_block_m(sum(PRODUCTION_SIZES), len(PRODUCTION_SIZES)) == 128
    _run(PRODUCTION_SIZES, dtype=torch.bfloat16, gather=gather)


def test_no_rows_at_all():
    # Every expert empty: an empty output, and exact-zero gradients (every buffer still written).
    inputs, _ = _inputs([0, 0, 0], torch.float32, False)
    inputs["x"] = randn(5, H)  # 5 tokens, none routed anywhere
    y = _call(expert_mlp, inputs, counts_of([0, 0, 0]), torch.zeros(0, dtype=torch.long, device=device()))
    assert y.shape == (0, H)
    y.sum().backward()
    for name, t in inputs.items():
        assert torch.all(t.grad == 0), f"d{name} must be exactly zero"


def test_clamp_boundaries_match_torch_clamp():
    # One-hot rows make h exactly a row of w_gu, so pre-activations sit exactly on, inside and
    # beyond +-limit; the kernel's clamp gradients must agree with torch.clamp at each.
    values = torch.tensor([-8.0, -7.0, -6.5, 0.25, 6.5, 7.0, 7.5, 9.0])
    w_gu = torch.zeros(1, 16, 2 * 16)
    w_gu[0, :8, 0::2] = values[:, None].expand(8, 16)  # gate column j = values[row]
    w_gu[0, :8, 1::2] = values.roll(3)[:, None].expand(8, 16)  # up: a different mix per row
    w_gu[0, 8:] = torch.randn(8, 32)
    inputs = dict(x=torch.eye(16), w_gu=w_gu, b_gu=None, w_d=torch.randn(1, 16, 16) / 4, b_d=None)
    inputs = {n: None if t is None else t.to(device()).requires_grad_() for n, t in inputs.items()}
    counts = counts_of([16])
    y = _call(expert_mlp, inputs, counts, None)
    ref_inputs = dict(zip(inputs, as_f64(inputs.values())))
    y_ref = _call(expert_mlp_reference, ref_inputs, counts.cpu(), None)
    assert_close(y, y_ref, torch.float32, "y")
    check_grads(y, inputs, y_ref, ref_inputs, torch.float32)


def test_nan_propagates_through_the_clamp():
    # torch.clamp keeps NaN; a clamp built from min/max would turn it into +-limit and hide a
    # diverged pre-activation from the trainer's NaN guard. Row 0 of x carries a NaN; rows 1.. not.
    torch.manual_seed(0)
    sizes = [3, 2]
    inputs, _ = _inputs(sizes, torch.float32, False, trainable=())
    x = inputs["x"].detach().clone()
    x[0, 0] = float("nan")
    inputs["x"] = x
    counts = counts_of(sizes)
    with _runtime.force_blocks(**SMALL_BLOCKS):
        y = _call(expert_mlp, inputs, counts, None)
    y_ref = _call(expert_mlp_reference, inputs, counts.cpu(), None)
    assert torch.isnan(y_ref[0]).all() and torch.isnan(y[0]).all(), "a NaN input row must give a NaN output row"
    assert not torch.isnan(y[1:]).any()
    assert_close(y[1:], y_ref[1:], torch.float32, "y")


@pytest.mark.parametrize("gather", [False, True])
def test_frozen_weights_compute_no_dw(monkeypatch, gather):
    # LoRA-style: every expert weight and bias frozen; only x gets a gradient.
    spy = LaunchSpy(grouped_dw._grouped_dw_kernel)
    monkeypatch.setattr(grouped_dw, "_grouped_dw_kernel", spy)
    torch.manual_seed(0)
    sizes = GROUP_CASES["uneven_with_empty"]
    inputs, gather_idx = _inputs(sizes, torch.float32, gather, trainable=("x",))
    with _runtime.force_blocks(**SMALL_BLOCKS):
        y = _call(expert_mlp, inputs, counts_of(sizes), gather_idx)
        y.backward(torch.randn_like(y))
    assert spy.launches == [], "no weight-gradient kernel may run for frozen weights"
    assert inputs["x"].grad is not None
    assert all(inputs[n].grad is None for n in NAMES[1:])


def test_only_down_proj_frozen(monkeypatch):
    spy = LaunchSpy(grouped_dw._grouped_dw_kernel)
    monkeypatch.setattr(grouped_dw, "_grouped_dw_kernel", spy)
    torch.manual_seed(0)
    sizes = GROUP_CASES["one_row_groups"]
    inputs, _ = _inputs(sizes, torch.float32, False, trainable=("x", "w_gu", "b_gu"))
    with _runtime.force_blocks(**SMALL_BLOCKS):
        y = _call(expert_mlp, inputs, counts_of(sizes), None)
        ref_inputs = dict(zip(inputs, as_f64(inputs.values())))
        check_grads(
            y, inputs, _call(expert_mlp_reference, ref_inputs, counts_of(sizes).cpu(), None), ref_inputs, torch.float32
        )
    assert [launch["COMPUTE_DW"] for launch in spy.launches] == [True]  # w_gu's only


def test_no_grad_forward_matches():
    torch.manual_seed(0)
    sizes = GROUP_CASES["uneven_with_empty"]
    inputs, gather_idx = _inputs(sizes, torch.float32, True)
    with _runtime.force_blocks(**SMALL_BLOCKS):
        y = _call(expert_mlp, inputs, counts_of(sizes), gather_idx)
        with torch.no_grad():
            y_eval = _call(expert_mlp, inputs, counts_of(sizes), gather_idx)
    assert torch.equal(y.detach(), y_eval)


def test_bad_arguments_raise():
    inputs, _ = _inputs([2, 4], torch.float32, False)
    counts = counts_of([2, 4])
    with pytest.raises(ValueError, match="even number"):
        expert_mlp(inputs["x"], counts, inputs["w_gu"][..., :-1], None, inputs["w_d"], None)
    with pytest.raises(ValueError, match="w_d must be"):
        expert_mlp(inputs["x"], counts, inputs["w_gu"], None, inputs["w_d"][:, :-1], None)
    with pytest.raises(ValueError, match="bias of w_gu"):
        expert_mlp(inputs["x"], counts, inputs["w_gu"], inputs["b_d"], inputs["w_d"], None)
