"""Key/value cache for incremental decoding: the forward of new tokens against the cached past.

Full-attention layers keep every key (a buffer grown to the generation's length); sliding-window
layers keep a ring of `window` slots, slot = position % window, because a query never sees a key
`window` or more positions back. Positions are slots of the (left-padded) batch: slot 0 is the
first column of `input_ids`; pad columns are keys no query may see (`key_valid`), and rotary
positions count only real tokens, so a left-padded row computes what it would alone.

The module walks the model's own submodules (norms, projections, experts, LoRA wrappers and the
expert-parallel dispatcher included), so whatever the training forward runs, decoding runs. The
prompt (the first forward, on an empty cache) goes through the attention backend the model trains
with (`model.options.attn_backend`: blockwise on CPU, flex on CUDA under `auto`), whose memory is
linear in the prompt's length, with left padding as a document of its own; the later steps, a few
queries against the cache, use attention.eager_attention over the cached keys. A test holds
`cached_forward` to the full forward at 1e-5.
"""

from __future__ import annotations

import torch

from .attention import AttentionContext, eager_attention, resolve_attn_backend
from ...parallel.fsdp import gathered
from .rope import apply_rotary, cos_sin


class LayerCache:
    """One layer's keys and values [B, KV, S, D] and the batch slot each of the S entries holds."""

    def __init__(self, batch: int, kv_heads: int, head_dim: int, capacity: int, window: int | None,
                 dtype: torch.dtype, device: torch.device):
        self.window = window
        size = min(capacity, window) if window is not None else capacity
        self.k = torch.zeros(batch, kv_heads, size, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.slot = torch.full((size,), -1, dtype=torch.long, device=device)  # -1: empty entry
        self.length = 0  # full layers: entries filled so far

    def attend_keys(self, k_new: torch.Tensor, v_new: torch.Tensor, slots: torch.Tensor):
        """Store the new keys [B, KV, T, D] at `slots` [T]; return (k, v, key_slot) to attend over."""
        if self.window is None:
            self.store(k_new, v_new, slots)
            return self.k[:, :, :self.length], self.v[:, :, :self.length], self.slot[:self.length]
        # Ring: attend over the ring's old entries plus all new ones (a chunk longer than the window
        # needs keys it is about to overwrite), then keep the newest `window` in the ring.
        k_all = torch.cat([self.k, k_new], dim=2)
        v_all = torch.cat([self.v, v_new], dim=2)
        slot_all = torch.cat([self.slot, slots])
        self.store(k_new, v_new, slots)
        return k_all, v_all, slot_all

    def store(self, k_new: torch.Tensor, v_new: torch.Tensor, slots: torch.Tensor) -> None:
        """Keep the new keys [B, KV, T, D] at `slots` [T]: appended (full layers), or the newest
        `window` of them in the ring (sliding layers)."""
        if self.window is None:
            end = self.length + slots.shape[0]
            if end > self.k.shape[2]:
                raise RuntimeError(f"KV cache full: capacity {self.k.shape[2]}, asked for {end} positions")
            self.k[:, :, self.length:end] = k_new
            self.v[:, :, self.length:end] = v_new
            self.slot[self.length:end] = slots
            self.length = end
            return
        keep = slots[-self.window:]
        ring = keep % self.window
        self.k[:, :, ring] = k_new[:, :, -self.window:]
        self.v[:, :, ring] = v_new[:, :, -self.window:]
        self.slot[ring] = keep


class KVCache:
    """The cache of every layer plus which batch slots hold real tokens (left padding)."""

    def __init__(self, model, batch: int, capacity: int, dtype: torch.dtype | None = None,
                 device: torch.device | None = None):
        cfg = model.config
        ref = model.lm_head.weight
        dtype, device = dtype or ref.dtype, device or ref.device
        self.capacity = capacity
        self.layers = [
            LayerCache(batch, cfg.num_key_value_heads, cfg.head_dim, capacity,
                       cfg.sliding_window if kind == "sliding_attention" else None, dtype, device)
            for kind in cfg.layer_types
        ]
        self.key_valid = torch.zeros(batch, capacity, dtype=torch.bool, device=device)  # [B, S]
        self.next_slot = 0
        self.next_position = torch.zeros(batch, dtype=torch.long, device=device)  # [B] rotary position

    def advance(self, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reserve slots for T new columns; valid [B, T] marks real tokens. Returns (slots [T],
        rotary positions [B, T]): each row counts only its real tokens."""
        b, t = valid.shape
        if self.next_slot + t > self.capacity:
            raise RuntimeError(f"KV cache full: capacity {self.capacity}, asked for {self.next_slot + t} positions")
        slots = torch.arange(self.next_slot, self.next_slot + t, device=valid.device)
        self.key_valid[:, slots] = valid
        counted = valid.long().cumsum(1)  # [B, T]
        positions = (self.next_position[:, None] + counted - 1).clamp(min=0)
        self.next_position = self.next_position + counted[:, -1]
        self.next_slot += t
        return slots, positions


def _mask(cache: KVCache, q_slots: torch.Tensor, k_slots: torch.Tensor, window: int | None) -> torch.Tensor:
    """Bool [B, 1, T, S]: query slot i sees key slot j when j <= i, (i - j < window), j is a real token."""
    i, j = q_slots[:, None], k_slots[None, :]
    allowed = (j >= 0) & (j <= i)
    if window is not None:
        allowed = allowed & (i - j < window)
    real = cache.key_valid[:, k_slots.clamp(min=0)]  # [B, S]
    return allowed[None, None] & real[:, None, None, :]


def _attention(attn, x: torch.Tensor, cos, sin, layer_cache: LayerCache, cache: KVCache,
               q_slots: torch.Tensor, prefill: AttentionContext | None) -> torch.Tensor:
    b, t, _ = x.shape
    q = apply_rotary(attn.q_proj(x).view(b, t, attn.num_heads, attn.head_dim), cos, sin)
    k = apply_rotary(attn.k_proj(x).view(b, t, attn.num_kv_heads, attn.head_dim), cos, sin)
    v = attn.v_proj(x).view(b, t, attn.num_kv_heads, attn.head_dim)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, D]
    if prefill is not None:  # the prompt on an empty cache: its own keys only, no [T, T] scores
        layer_cache.store(k, v, q_slots)
        out = attn.attend(q, k, v, prefill)
    else:
        k_all, v_all, k_slots = layer_cache.attend_keys(k, v, q_slots)
        mask = _mask(cache, q_slots, k_slots, layer_cache.window)
        out = eager_attention(q, k_all, v_all, attn.sinks, mask, attn.scale)
    return attn.o_proj(out.transpose(1, 2).reshape(b, t, attn.num_heads * attn.head_dim))


def _prefill_context(model, empty: bool, valid: torch.Tensor, cos, sin) -> AttentionContext | None:
    """The training attention over a prompt read into an empty cache (None: the eager cached path).
    Left padding is a document of its own (doc 0, real tokens doc 1), so real tokens never see it."""
    backend = resolve_attn_backend(model.options.attn_backend, valid.device)
    if not empty or valid.shape[1] == 1 or backend == "eager":
        return None
    doc_ids = None if bool(valid.all()) else valid.long()
    return AttentionContext(cos=cos, sin=sin, doc_ids=doc_ids, window=model.config.sliding_window, backend=backend)


def cached_forward(model, input_ids: torch.Tensor, cache: KVCache, valid: torch.Tensor | None = None,
                   last_only: bool = False) -> torch.Tensor:
    """Logits [B, T, V] (or [B, 1, V] with last_only) of T new tokens [B, T] after those in `cache`,
    which is updated. valid [B, T] marks real tokens (False = left padding)."""
    if valid is None:
        valid = torch.ones_like(input_ids, dtype=torch.bool)
    empty = cache.next_slot == 0
    q_slots, positions = cache.advance(valid)
    x = model.model.embed_tokens(input_ids)
    cos, sin = cos_sin(model.config, positions)
    prefill = _prefill_context(model, empty, valid, cos, sin)
    for layer, layer_cache in zip(model.model.layers, cache.layers):
        with gathered(layer):  # its submodules are called here, not the block: gather its weights (FSDP2)
            x = x + _attention(layer.self_attn, layer.input_layernorm(x), cos, sin, layer_cache, cache, q_slots,
                               prefill)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
    h = model.model.norm(x[:, -1:] if last_only else x)
    return model.lm_head(h)


__all__ = ["KVCache", "LayerCache", "cached_forward"]
