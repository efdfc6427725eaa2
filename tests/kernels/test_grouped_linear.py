"""grouped_linear (the plain grouped GEMM and its backward) against the per-expert torch loop in fp64."""

import pytest
import torch
from kernel_cases import (GROUP_CASES, SMALL_BLOCKS, LaunchSpy, as_f64, assert_close, check_grads,
                          counts_of, device, gather_for, needs_cuda, randn)

from gptoss_kernels import _runtime, grouped_dw
from gptoss_kernels.grouped_gemm import grouped_matmul
from gptoss_kernels.grouped_linear import grouped_linear
from gptoss_kernels.reference import grouped_linear_reference
from gptoss_kernels.tile_map import build_layout

K, N = 40, 48  # neither a multiple of the 16-wide test tiles' counts nor of 32/64


def _run(sizes, *, dtype=torch.float32, bias=True, gather=False, n=N, counts_dtype=torch.int32, k=K):
    torch.manual_seed(0)
    m = sum(sizes)
    num_tokens = (m + 1) // 2
    x = randn(num_tokens if gather else m, k, dtype=dtype)
    inputs = dict(x=x, w=randn(len(sizes), k, n, scale=k**-0.5, dtype=dtype),
                  b=randn(len(sizes), n, dtype=dtype) if bias else None)
    gather_idx = gather_for(m, num_tokens) if gather else None
    counts = counts_of(sizes, counts_dtype)
    y = grouped_linear(inputs["x"], counts, inputs["w"], inputs["b"], gather_idx=gather_idx)
    ref_inputs = dict(zip(inputs, as_f64(inputs.values())))
    y_ref = grouped_linear_reference(ref_inputs["x"], counts.cpu(), ref_inputs["w"], ref_inputs["b"],
                                     gather_idx=None if gather_idx is None else gather_idx.cpu())
    assert y.shape == (m, n) and y.dtype == dtype
    assert_close(y, y_ref, dtype, "y")
    check_grads(y, inputs, y_ref, ref_inputs, dtype)


@pytest.mark.parametrize("case", sorted(GROUP_CASES))
@pytest.mark.parametrize("gather", [False, True])
def test_matches_reference(case, gather):
    with _runtime.force_blocks(**SMALL_BLOCKS):
        _run(GROUP_CASES[case], gather=gather)


def test_no_bias_int64_counts():
    with _runtime.force_blocks(**SMALL_BLOCKS):
        _run(GROUP_CASES["uneven_with_empty"], bias=False, counts_dtype=torch.int64)


def test_lora_sized_output():
    # LoRA adapters use N = rank, narrower than any tile.
    with _runtime.force_blocks(**SMALL_BLOCKS):
        _run(GROUP_CASES["uneven_with_empty"], n=4, gather=True)


def test_default_blocks():
    # The heuristic's own tiles (BLOCK_M 64 here) on ~200 rows.
    _run([70, 0, 3, 57, 71], gather=True)


def test_small_k_weight_gradient_is_computed_transposed(monkeypatch):
    # K = a LoRA rank (the B adapter's dW is [rank, N]): the dW kernel computes dW^T = dy^T @ x so the
    # product's wide side comes first (Hopper's wgmma needs 64 rows); values as always.
    spy = LaunchSpy(grouped_dw._grouped_dw_kernel)
    monkeypatch.setattr(grouped_dw, "_grouped_dw_kernel", spy)
    _run([70, 0, 3, 57, 71], k=4, gather=True)
    assert [launch["SWAP_AB"] for launch in spy.launches] == [True]


def test_fp16():
    with _runtime.force_blocks(**SMALL_BLOCKS):
        _run(GROUP_CASES["uneven_with_empty"], dtype=torch.float16, gather=True)


@needs_cuda
@pytest.mark.parametrize("case", sorted(GROUP_CASES))
@pytest.mark.parametrize("gather", [False, True])
def test_bf16_gpu(case, gather):
    _run(GROUP_CASES[case], dtype=torch.bfloat16, gather=gather)


@needs_cuda
@pytest.mark.parametrize("gather", [False, True])
def test_bf16_gpu_production_tiles(gather):
    # >= 128 rows per expert: the 128-row tiles training runs (wgmma on Hopper), with the backward.
    _run([130, 0, 257, 128, 200], dtype=torch.bfloat16, gather=gather)


@pytest.mark.parametrize("bias_trainable", [False, True])
def test_frozen_weight_computes_no_dw(monkeypatch, bias_trainable):
    spy = LaunchSpy(grouped_dw._grouped_dw_kernel)
    monkeypatch.setattr(grouped_dw, "_grouped_dw_kernel", spy)
    sizes = GROUP_CASES["uneven_with_empty"]
    x = randn(sum(sizes), K)
    w = randn(len(sizes), K, N, grad=False)
    b = randn(len(sizes), N, grad=bias_trainable)
    grouped_linear(x, counts_of(sizes), w, b).sum().backward()
    assert w.grad is None and x.grad is not None
    assert all(not launch["COMPUTE_DW"] for launch in spy.launches)
    assert len(spy.launches) == int(bias_trainable)  # bias-only mode, or nothing at all
    if bias_trainable:
        assert_close(b.grad, torch.tensor([[s] * N for s in sizes], dtype=torch.float64), torch.float32, "db")


def test_unwritten_tile_is_caught():
    # Guards the poison fixture itself: drop one real tile and the NaN it leaves must show.
    sizes = GROUP_CASES["uneven_with_empty"]
    x, w = randn(sum(sizes), K, grad=False), randn(len(sizes), K, N, grad=False)
    layout = build_layout(counts_of(sizes), sum(sizes), 16)
    layout.tile_expert[1] = -1
    y = grouped_matmul(x, layout, w)
    assert torch.isnan(y).any()


def test_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setattr(_runtime, "INTERPRETED", False)
    x = torch.randn(4, K)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        grouped_linear(x, torch.tensor([4]), torch.randn(1, K, N))


def test_bad_arguments_raise():
    dev = device()
    x, counts = torch.randn(6, K, device=dev), counts_of([2, 4])
    with pytest.raises(ValueError, match="w must be"):
        grouped_linear(x, counts, torch.randn(3, K, N, device=dev))
    with pytest.raises(ValueError, match="dtype"):
        grouped_linear(x, counts, torch.randn(2, K, N, device=dev, dtype=torch.float16))
    with pytest.raises(ValueError, match="bias"):
        grouped_linear(x, counts, torch.randn(2, K, N, device=dev), torch.randn(2, N + 1, device=dev))
    with pytest.raises(ValueError, match="gather_idx"):
        grouped_linear(x, counts, torch.randn(2, K, N, device=dev), gather_idx=torch.zeros(6, device=dev))
