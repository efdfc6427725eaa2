"""MXFP4 weights: the torch dequantization against transformers and the loader bit for bit, the in-kernel
dequantization (the helper the grouped GEMM calls) against it on every code and scale byte, the GEMM itself
reading the values back, grouped_linear on MXFP4 weights, and the Mxfp4Weight checks."""

import pytest
import torch
from kernel_cases import assert_close, counts_of, device, gather_for, needs_cuda, randn

from gptoss_kernels import _runtime, grouped_gemm, grouped_gemm_mainloop, mxfp4_tile
from gptoss_kernels.grouped_linear import grouped_linear
from gptoss_kernels.mxfp4 import Mxfp4Weight
from gptoss_kernels.reference import dequantize_mxfp4, grouped_linear_reference

BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def every_code_under_every_scale(scales=range(256)):
    """[1, len(scales), 512] as (out, in): row i holds all 256 bytes (so both nibbles take every code at
    every position parity) under scale byte scales[i], in each of its 16 groups."""
    n = len(scales)
    blocks = torch.arange(256, dtype=torch.uint8).repeat(n, 1).view(1, n, 16, 16)
    scale = torch.tensor(list(scales), dtype=torch.uint8)[:, None].repeat(1, 16).view(1, n, 16)
    return blocks.to(device()), scale.to(device())


def bits(t):
    return t.contiguous().view(BITS[t.dtype]).cpu()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_reference_matches_transformers_and_the_loader_bitwise(dtype):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from engine.checkpoint.hf.mxfp4 import dequantize_mxfp4 as loader_dequantize

    blocks, scales = (t.cpu() for t in every_code_under_every_scale())
    ours = dequantize_mxfp4(blocks, scales, dtype)  # [1, 256, 512] (out, in)
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=dtype).transpose(1, 2)  # back to (out, in)
    assert ours.shape == (1, 256, 512) and ours.dtype == dtype
    assert torch.equal(bits(ours), bits(theirs))  # signs of zero, infinities and subnormals included
    assert torch.equal(bits(ours), bits(loader_dequantize(blocks, scales, dtype)))
    assert not ours.isnan().any() and ours.isinf().any()  # scale 255 (E8M0's NaN) gives inf, 2**127 or 0


def test_reference_follows_the_format_by_hand():
    # byte 0xF1: low nibble 1 (+0.5) is element 0, high nibble 15 (-6) element 1; scale 130 = 2**3.
    blocks = torch.full((1, 16), 0xF1, dtype=torch.uint8)
    out = dequantize_mxfp4(blocks, torch.tensor([130], dtype=torch.uint8), torch.float32)
    assert out.shape == (32,) and out[:4].tolist() == [4.0, -48.0, 4.0, -48.0]
    tiny = dequantize_mxfp4(
        torch.full((1, 16), 0x11, dtype=torch.uint8), torch.tensor([0], dtype=torch.uint8), torch.float32
    )
    assert tiny[0].item() == 2.0**-128  # 0.5 * 2**-127: an fp32 subnormal, kept


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the infinities, on purpose
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("transposed", [False, True])
def test_in_kernel_dequant_every_code_and_scale(dtype, transposed):
    # The kernel reads the weight back through mxfp4_scales + mxfp4_tile, the helpers of the GEMM's K loop, in
    # the forward orientation (the tile transposed, as tl.dot gets it) and the dX one. 48-row tiles of 256
    # rows: a masked row tail. (bf16: test_in_kernel_dequant_bf16_gpu; the interpreter rounds bf16 subnormals
    # wrongly.)
    blocks, scales = every_code_under_every_scale()
    w = Mxfp4Weight(blocks, scales)
    w = w.transpose(1, 2) if transposed else w
    got = mxfp4_tile.dequantize(w, dtype, rows=64, cols=128)
    want = dequantize_mxfp4(blocks.cpu(), scales.cpu(), dtype)  # [1, out, in]
    assert torch.equal(bits(got if transposed else got.transpose(1, 2)), bits(want))


@needs_cuda
@pytest.mark.parametrize("transposed", [False, True])
def test_in_kernel_dequant_bf16_gpu(transposed):
    blocks, scales = every_code_under_every_scale()
    w = Mxfp4Weight(blocks, scales)
    got = mxfp4_tile.dequantize(w.transpose(1, 2) if transposed else w, torch.bfloat16)
    want = dequantize_mxfp4(blocks.cpu(), scales.cpu(), torch.bfloat16)
    assert torch.equal(bits(got if transposed else got.transpose(1, 2)), bits(want))


def test_the_gemm_calls_those_helpers():
    names = grouped_gemm_mainloop.mainloop.fn.__code__.co_names
    assert "mxfp4_tile" in names and "mxfp4_scales" in names
    assert grouped_gemm.mainloop is grouped_gemm_mainloop.mainloop
    assert grouped_gemm_mainloop.mxfp4_tile is mxfp4_tile.mxfp4_tile
    assert grouped_gemm_mainloop.mxfp4_scales is mxfp4_tile.mxfp4_scales


@pytest.mark.parametrize("transposed", [False, True])
def test_the_gemm_reads_every_code_back(transposed):
    # Identity rows times the weight give the dequantized weight itself, through the GEMM's K loop (fp32,
    # exact products): every code under every scale byte up to 252, equal as values (a sum has no -0). Above
    # 252 some values overflow to inf, and 0 * inf would put NaN in every sum; the test above covers those.
    blocks, scales = every_code_under_every_scale(range(253))
    w = Mxfp4Weight(blocks, scales)
    want = dequantize_mxfp4(blocks.cpu(), scales.cpu(), torch.float32)[0]  # [253 out, 512 in]
    if transposed:  # dX orientation: K = outputs (253, a tail of every K tile), N = inputs in 32-groups
        got = grouped_linear(torch.eye(253, device=device()), counts_of([253]), w.transpose(1, 2))  # [253, 512]
    else:  # forward: K = inputs in 32-groups, N = outputs (a tail of every N tile)
        got = grouped_linear(torch.eye(512, device=device()), counts_of([512]), w).t()  # [253, 512]
    assert torch.equal(got.cpu(), want) and (want != 0).sum() > 100000  # subnormals and the largest included


def _random_mxfp4(num_experts, n_out, n_in, low=121, high=125):
    """Random codes (every byte) and scales 2**-6 .. 2**-2: values of order 1/sqrt(n_in) for n_in ~ 100."""
    blocks = torch.randint(0, 256, (num_experts, n_out, n_in // 32, 16), dtype=torch.uint8, device=device())
    scales = torch.randint(low, high + 1, (num_experts, n_out, n_in // 32), dtype=torch.uint8, device=device())
    return Mxfp4Weight(blocks, scales)


@pytest.mark.parametrize("gather", [False, True])
def test_grouped_linear_on_mxfp4_weights(gather):
    # K = 96 inputs (a 32-wide K tail of the 64-deep tiles), N = 80 outputs (a tail of the 64-wide tiles);
    # the backward's dX reads the same weight transposed (groups along N: a 32-wide N tail).
    torch.manual_seed(0)
    sizes = [5, 0, 17, 1, 30, 0]
    m, tokens = sum(sizes), 30
    w = _random_mxfp4(len(sizes), 80, 96)
    x = randn(tokens if gather else m, 96)
    b = randn(len(sizes), 80)
    gather_idx = gather_for(m, tokens) if gather else None
    with _runtime.force_blocks(block_m=16, block_n=64, block_k=64, block_m_dw=16):
        y = grouped_linear(x, counts_of(sizes), w, b, gather_idx)
    xr, br = (t.detach().double().requires_grad_() for t in (x, b))
    y_ref = grouped_linear_reference(xr, torch.tensor(sizes), w, br, None if gather_idx is None else gather_idx.cpu())
    assert_close(y, y_ref, torch.float32, "y")
    cot = torch.randn_like(y)
    dx, db = torch.autograd.grad(y, (x, b), cot)
    dx_ref, db_ref = torch.autograd.grad(y_ref, (xr, br), cot.double().cpu())
    assert_close(dx, dx_ref, torch.float32, "dx")
    assert_close(db, db_ref, torch.float32, "db")


def test_mxfp4_weight_checks():
    blocks = torch.zeros(2, 8, 3, 16, dtype=torch.uint8)
    scales = torch.zeros(2, 8, 3, dtype=torch.uint8)
    w = Mxfp4Weight(blocks, scales)
    assert w.shape == (2, 96, 8) and w.transpose(1, 2).shape == (2, 8, 96) and not w.requires_grad
    assert not w.transpose(-1, -2).transpose(1, 2).transposed and w.expert_slice(1, 2).shape == (1, 96, 8)
    with pytest.raises(ValueError, match="uint8"):
        Mxfp4Weight(blocks.float(), scales)
    with pytest.raises(ValueError, match=r"in/32, 16\]"):
        Mxfp4Weight(blocks[..., :8], scales)
    with pytest.raises(ValueError, match="scales must be"):
        Mxfp4Weight(blocks, scales[:, :4])
    with pytest.raises(ValueError, match="last two dimensions"):
        w.transpose(0, 1)
    x = torch.zeros(4, 64)  # 64 inputs, but the weight has 96
    with pytest.raises(ValueError, match=r"stands for a \[2, 96, 8\] weight; it must be \[2 experts"):
        grouped_linear(x, torch.tensor([2, 2]), w)
    with pytest.raises(ValueError, match="bf16, fp16 or fp32"):
        grouped_linear(torch.zeros(4, 96, dtype=torch.float64), torch.tensor([2, 2]), w)
