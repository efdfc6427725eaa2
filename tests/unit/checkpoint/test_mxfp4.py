"""MXFP4: our dequantization against transformers' bit for bit, and MXFP4 checkpoints against transformers."""

import pytest
import torch
from safetensors.torch import load_file

from engine.checkpoint import load_hf
from engine.checkpoint.mxfp4 import FP4_VALUES, dequantize_mxfp4, quantize_mxfp4
from tests.unit.checkpoint.builders import load_transformers, logits, tiny_hf, token_ids, write_mxfp4_checkpoint

BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(BITS[t.dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_matches_transformers_bit_for_bit(dtype):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    g = torch.Generator().manual_seed(0)
    # [E=3, rows=255, G=4, 16]: every byte value (so every code in both nibbles) at every position, and
    # every E8M0 scale 0..254 (2**-127 .. 2**127) on some row. 255 is NaN in E8M0 and never written.
    blocks = torch.stack([torch.randperm(256, generator=g)[:255] for _ in range(3 * 4 * 16)], -1)
    blocks = blocks.reshape(255, 3, 4, 16).transpose(0, 1).to(torch.uint8).contiguous()
    scales = torch.arange(255).repeat(3, 4, 1).transpose(1, 2).to(torch.uint8).contiguous()
    assert torch.unique(blocks).numel() == 256 and torch.unique(scales).numel() == 255

    ours = dequantize_mxfp4(blocks, scales, dtype)  # [3, 255, 128] (out, in)
    ref = convert_moe_packed_tensors(blocks, scales, dtype=dtype)  # [3, 128, 255], already (in, out)
    assert ours.dtype == ref.dtype == dtype
    assert torch.equal(_bits(ours.transpose(1, 2)), _bits(ref))


def test_dequantize_follows_the_spec_on_one_byte():
    # byte 0xF1: low nibble 1 (+0.5) is element 0, high nibble 15 (-6) is element 1; scale 130 = 2**3.
    blocks = torch.full((1, 16), 0xF1, dtype=torch.uint8)
    out = dequantize_mxfp4(blocks, torch.tensor([130], dtype=torch.uint8), torch.float32)
    assert out[:4].tolist() == [4.0, -48.0, 4.0, -48.0] and out.shape == (32,)


def test_quantize_round_trips():
    w = torch.randn(6, 8, 64, generator=torch.Generator().manual_seed(0))
    w[0, 0, :32] = 0.0  # an all-zero group
    blocks, scales = quantize_mxfp4(w)
    assert blocks.shape == (6, 8, 2, 16) and scales.shape == (6, 8, 2)
    deq = dequantize_mxfp4(blocks, scales, torch.float32)
    # Nearest code: the error is at most half the widest gap between codes (2, between 4 and 6) times
    # the group scale, which keeps the group's largest value within 6.
    step = torch.ldexp(torch.ones(scales.shape), scales.int() - 127).repeat_interleave(32, dim=-1)
    assert torch.all((deq - w).abs() <= step + 1e-12)
    assert torch.equal(dequantize_mxfp4(*quantize_mxfp4(deq), torch.float32), deq)  # representable: exact
    assert set((deq / step).unique().tolist()) <= set(FP4_VALUES)  # every value is a code times its scale


@pytest.mark.parametrize("shape", [dict(hidden_size=32, intermediate_size=32),
                                   dict(hidden_size=64, intermediate_size=32)], ids=["square_down_proj", "wide"])
def test_mxfp4_checkpoint_matches_transformers(tmp_path, shape):
    from transformers import Mxfp4Config
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    hf = tiny_hf(seed=3, **shape)
    directory = write_mxfp4_checkpoint(hf, tmp_path / "mxfp4")
    ours = load_hf(directory, dtype=torch.float32, experts_backend="loop", attn_backend="eager")
    ids = token_ids()

    # 1. transformers reading the same files (its own MXFP4 loader, dequantizing on CPU).
    theirs = load_transformers(directory, quantization_config=Mxfp4Config(dequantize=True))
    # transformers 5.17 dequantizes the experts to bf16 whatever dtype is asked (5.25 keeps fp32); every value
    # (an FP4 code times a power of two) is exact in bf16, so in fp32 it is the same number.
    theirs = theirs.float()
    assert torch.equal(logits(ours, ids), logits(theirs, ids))

    # 2. transformers built from the weights its dequantizer gives for these blocks and scales.
    stored = load_file(directory / "model.safetensors")
    state = {k: v for k, v in stored.items() if not k.endswith(("_blocks", "_scales"))}
    for name in [k.removesuffix("_blocks") for k in stored if k.endswith("_blocks")]:
        state[name] = convert_moe_packed_tensors(stored[f"{name}_blocks"], stored[f"{name}_scales"],
                                                 dtype=torch.float32)
    hf.load_state_dict(state, strict=True)
    assert torch.equal(logits(ours, ids), logits(hf, ids))
    for name, tensor in ours.state_dict().items():
        assert torch.equal(tensor, state[name]), name


def test_square_down_proj_orientation(tmp_path):
    # down_proj [E, I, H] with I == H: a missing or extra transpose keeps the shape, so check values.
    hf = tiny_hf(seed=4, hidden_size=32, intermediate_size=32)
    original = hf.state_dict()["model.layers.0.mlp.experts.down_proj"]  # [E, in=I, out=H]
    ours = load_hf(write_mxfp4_checkpoint(hf, tmp_path / "mxfp4"), dtype=torch.float32)
    loaded = ours.state_dict()["model.layers.0.mlp.experts.down_proj"]
    err = (loaded - original).abs().mean() / original.abs().mean()
    err_transposed = (loaded.transpose(1, 2) - original).abs().mean() / original.abs().mean()
    assert err < 0.15 < 1.0 < err_transposed  # MXFP4 rounding error vs a scrambled matrix
