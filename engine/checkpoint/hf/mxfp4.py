"""MXFP4, the format of the published GPT-OSS expert weights: FP4 (E2M1) values in groups of 32 that
share one E8M0 power-of-two scale.

Storage, for a weight whose last dimension has N = 32 * G values:
    blocks uint8 [..., G, 16]   two FP4 codes per byte, low nibble = even element, high nibble = odd
    scales uint8 [..., G]       value = FP4_VALUES[code] * 2 ** (scale - 127)

`dequantize_mxfp4` is the loader's path and matches transformers' `convert_moe_packed_tensors` bit
for bit, for every block and scale byte (both compute `fp4 * 2**e` exactly in fp32, which holds every
finite such product, and round once to the target dtype). `quantize_mxfp4` exists to build test checkpoints;
it rounds to the nearest code.
"""

from __future__ import annotations

import torch

FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
GROUP = 32  # values per scale
SCALE_BIAS = 127
_MAX_VALUE = 6.0  # the largest FP4 magnitude


def _byte_table(device: torch.device) -> torch.Tensor:
    """[256, 2] fp32: the (even, odd) values of every byte, so a whole block decodes in one gather."""
    values = torch.tensor(FP4_VALUES, dtype=torch.float32, device=device)
    byte = torch.arange(256, device=device)
    return torch.stack([values[byte & 0x0F], values[byte >> 4]], dim=-1)


def check_mxfp4_shapes(blocks: torch.Size | tuple, scales: torch.Size | tuple) -> str | None:
    """Why `blocks` and `scales` shapes do not form an MXFP4 tensor, or None when they do."""
    blocks, scales = tuple(blocks), tuple(scales)
    if len(blocks) < 2 or blocks[-1] != GROUP // 2:
        return f"blocks shape {list(blocks)} must end in {GROUP // 2} bytes per group of {GROUP} values"
    if blocks[:-1] != scales:
        return (
            f"scales shape {list(scales)} must equal the blocks shape without its last dimension, {list(blocks[:-1])}"
        )
    return None


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """blocks uint8 [..., G, 16] + scales uint8 [..., G] -> values [..., G * 32] in `dtype`.

    Runs on the tensors' device; it holds 6 bytes per value at its peak (fp32 values and the int32 byte
    index), so callers bound memory by passing a few experts at a time."""
    problem = check_mxfp4_shapes(blocks.shape, scales.shape)
    if problem:
        raise ValueError(f"dequantize_mxfp4: {problem}")
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"dequantize_mxfp4: blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    *prefix, g, _ = blocks.shape
    # One gather of (even, odd) pairs per byte: index_select on a flat index is ~3x faster than
    # advanced indexing or two nibble passes.
    values = _byte_table(blocks.device).index_select(0, blocks.reshape(-1).int())  # [n_bytes, 2] fp32
    values = values.view(*prefix, g, GROUP)
    # Byte 255 (E8M0's NaN) means 2**128, which overflows fp32: transformers' ldexp gives 0 for code 0,
    # 2**127 for 0.5 and inf above. Scaling by 2**127 and then by 2 gives exactly that (never 0 * inf).
    exponent = scales.int() - SCALE_BIAS  # [..., G]
    scale = torch.ldexp(torch.ones(scales.shape, device=scales.device), exponent.clamp(max=127))
    values.mul_(scale.unsqueeze(-1))  # exact: a 2-bit mantissa times a power of two fits fp32
    top = exponent == 128
    if top.any():
        values[top] *= 2
    return values.view(*prefix, g * GROUP).to(dtype)


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """values [..., N] (N a multiple of 32) -> (blocks uint8 [..., N/32, 16], scales uint8 [..., N/32]).

    Scale per group: the smallest power of two that brings max |w| within the largest code, 6 (the OCP
    MX choice, floor(log2(max)) - 2, would clip values up to 8 to 6); each value rounds to the nearest
    code, its sign kept (-0 included), so re-quantizing dequantized values reproduces them exactly."""
    *prefix, n = w.shape
    if n % GROUP:
        raise ValueError(f"quantize_mxfp4: last dimension {n} is not a multiple of {GROUP}")
    groups = w.detach().float().reshape(*prefix, n // GROUP, GROUP)
    amax = groups.abs().amax(dim=-1)  # [..., G]
    exponent = torch.where(amax > 0, torch.ceil(torch.log2(amax / _MAX_VALUE)), torch.full_like(amax, -SCALE_BIAS))
    exponent = exponent.clamp(-SCALE_BIAS, 254 - SCALE_BIAS)  # 255 is NaN in E8M0
    scaled = torch.ldexp(groups, -exponent.int().unsqueeze(-1))
    magnitudes = torch.tensor(FP4_VALUES[:8], device=w.device)
    code = (scaled.abs().unsqueeze(-1) - magnitudes).abs().argmin(dim=-1)  # [..., G, 32] in 0..7
    code = code + 8 * torch.signbit(scaled)  # sign bit
    code = code.to(torch.uint8)
    blocks = code[..., 0::2] | (code[..., 1::2] << 4)
    scales = (exponent + SCALE_BIAS).to(torch.uint8)
    return blocks.contiguous(), scales.contiguous()
