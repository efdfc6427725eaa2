"""MXFP4 scale byte 255 (2**128, past fp32's range): dequantized exactly as transformers does."""

import pytest
import torch
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from engine.checkpoint.hf.mxfp4 import dequantize_mxfp4

INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_every_byte_under_every_scale_matches_transformers_bitwise(dtype):
    # [E=1, rows=256*16, G=1, 16 bytes]: each scale byte 0..255 on 16 rows that hold all 256 block bytes.
    blocks = torch.arange(256, dtype=torch.uint8).view(16, 16).repeat(256, 1, 1).view(1, 4096, 1, 16)
    scales = torch.arange(256).repeat_interleave(16).to(torch.uint8).view(1, 4096, 1)
    ref = convert_moe_packed_tensors(blocks, scales, dtype=dtype).transpose(1, 2)  # [1, 4096, 32]
    ours = dequantize_mxfp4(blocks, scales, dtype)
    assert torch.equal(ours.view(INT_VIEW[dtype]), ref.view(INT_VIEW[dtype]))  # bit for bit, signs of zero too
    top = ours[0, 255 * 16 :]
    assert not top.isnan().any()  # where a plain 0 * 2**128 would give NaN
    assert top.isinf().any() and (top == 0).any()


def test_scale_255_values_by_hand():
    # low nibble code 1 (0.5), high nibble code 2 (1.0): 0.5 * 2**128 = 2**127, 1.0 * 2**128 = inf; code 0 stays 0.
    blocks = torch.tensor([[[0x21] + [0] * 15]], dtype=torch.uint8)
    out = dequantize_mxfp4(blocks, torch.tensor([[255]], dtype=torch.uint8), torch.float32)[0]  # [32]
    assert out[0].item() == 2.0**127 and out[1].item() == float("inf") and (out[2:] == 0).all()
