"""YaRN rotary embedding of GPT-OSS (NeoX half-split rotation), computed in fp32.

Nothing is stored in buffers: the inverse frequencies are recomputed from the config on each call
(a few dozen floats), so a model built on the meta device needs no special re-initialisation.
"""

from __future__ import annotations

import math

import torch

from engine.models.gpt_oss.config import GptOssConfig, yarn_attention_factor


def _correction_dim(num_rotations: float, dim: int, base: float, max_pos: int) -> float:
    # The rotary dimension whose wavelength completes `num_rotations` turns over `max_pos` tokens.
    return (dim * math.log(max_pos / (num_rotations * 2 * math.pi))) / (2 * math.log(base))


def inv_freq(cfg: GptOssConfig, device: torch.device | None = None) -> torch.Tensor:
    """Inverse frequencies [head_dim/2] in fp32: YaRN blend of interpolated and extrapolated."""
    dim, base = cfg.head_dim, cfg.rope_theta
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim)
    extrapolated = 1.0 / pos_freqs
    rs = cfg.rope_scaling
    if rs is None or rs.factor <= 1:
        return extrapolated
    interpolated = 1.0 / (rs.factor * pos_freqs)
    low = _correction_dim(rs.beta_fast, dim, base, rs.original_max_position_embeddings)
    high = _correction_dim(rs.beta_slow, dim, base, rs.original_max_position_embeddings)
    if rs.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
    extrapolation_weight = 1 - ramp  # 1 for high-frequency dims (kept), 0 for low-frequency (interpolated)
    return interpolated * (1 - extrapolation_weight) + extrapolated * extrapolation_weight


def cos_sin(cfg: GptOssConfig, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, T, head_dim/2] in fp32 for integer positions [B, T], YaRN-scaled."""
    freqs = position_ids[..., None].float() * inv_freq(cfg, position_ids.device)  # [B, T, D/2]
    scale = yarn_attention_factor(cfg)
    return freqs.cos() * scale, freqs.sin() * scale


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, T, heads, D] by cos/sin [B, T, D/2] (half-split pairs (i, i + D/2)), in fp32."""
    x1, x2 = x.float().chunk(2, dim=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
