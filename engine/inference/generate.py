"""Text generation with a KV cache: greedy or sampled, batched with left padding.

    out = generate(model, input_ids, max_new_tokens=64, attention_mask=mask, stop_token_ids=[200002])

Returns the prompt followed by the new tokens, [B, T + n], as `transformers`' `generate` does; a
row that stopped is filled with `pad_token_id` after its stop token, and the loop ends early once
every row has stopped. The prompt is read in one forward (`prefill`), then one token per step
against the cache (engine.models.gpt_oss.kv_cache). LoRA adapters take part whether applied or
merged: decoding calls the model's own modules.

Under expert parallelism every rank of the expert group calls `generate` (its own prompts, any batch
size, the same max_new_tokens) and must run the same number of forwards, each one an all-to-all: the
ranks agree on stopping, and a rank whose rows are done keeps stepping (adding padding) until all are.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from engine.models.gpt_oss.kv_cache import KVCache, cached_forward
from engine.parallel.comm import any_rank
from engine.parallel.fsdp import gathered, is_sharded


def _check_args(input_ids, max_new_tokens, temperature, top_p, top_k) -> None:
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(
            f"input_ids must be [batch, tokens] with at least one token, got shape {tuple(input_ids.shape)}"
        )
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0 (use do_sample=False for greedy decoding)")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} must be in (0, 1]")
    if top_k < 0:
        raise ValueError(f"top_k={top_k} must be >= 0 (0 = no top-k filter)")


def sample_next(
    logits: torch.Tensor,
    *,
    do_sample: bool,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The next token [B] from last-position logits [B, V]: argmax, or a draw after temperature,
    top-k and top-p (nucleus: the smallest set of tokens whose probability reaches top_p) filters."""
    if not do_sample:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens ranked before it already reach top_p (the first always stays).
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def _expert_group(model):
    """The ranks that must run every step together, or None when the model is all local: all of them
    under FSDP2 (each block's weights are gathered from every rank), else the expert all-to-all's group."""
    if is_sharded(model) and dist.is_initialized():
        return dist.group.WORLD
    return getattr(model.moe_blocks()[0].dispatcher, "group", None) if hasattr(model, "moe_blocks") else None


def _group_done(done: bool, group, device: torch.device) -> bool:
    """Stop only when every rank of the expert group is done: a rank that stopped alone would leave
    the others waiting in their next all-to-all."""
    return not any_rank(not done, group, device)


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    stop_token_ids: Sequence[int] | None = None,
    seed: int | None = None,
    attention_mask: torch.Tensor | None = None,
    pad_token_id: int | None = None,
    use_cache: bool = True,
    on_token: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Continue `input_ids` [B, T] (left-padded where `attention_mask` [B, T] is 0) by up to
    `max_new_tokens` tokens -> LongTensor [B, T + n]. `on_token(tokens [B])` sees each new column
    as it is produced (for streaming). `use_cache=False` recomputes the whole sequence every step
    (the reference the cache is measured against)."""
    _check_args(input_ids, max_new_tokens, temperature, top_p, top_k)
    device = model.lm_head.weight.device
    ids = input_ids.to(device)
    b, t = ids.shape
    valid = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.to(device).bool()
    if valid.shape != ids.shape:
        raise ValueError(f"attention_mask shape {tuple(valid.shape)} != input_ids shape {tuple(ids.shape)}")
    stops = torch.tensor(sorted(set(stop_token_ids or [])), dtype=torch.long, device=device)
    pad = pad_token_id if pad_token_id is not None else (int(stops[0]) if stops.numel() else 0)
    generator = None
    if do_sample and seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        with gathered(model):  # under FSDP2: the root's embedding and head, for the whole generation
            step_logits = _cached(model, b, t + max_new_tokens) if use_cache else _recompute(model, ids, valid)
            finished = torch.zeros(b, dtype=torch.bool, device=device)
            group = _expert_group(model)
            out, new, new_valid = [ids], ids, valid
            for _ in range(max_new_tokens):
                logits = step_logits(new, new_valid)  # [B, V]
                token = sample_next(
                    logits, do_sample=do_sample, temperature=temperature, top_p=top_p, top_k=top_k, generator=generator
                )
                token = torch.where(finished, torch.full_like(token, pad), token)
                out.append(token[:, None])
                if on_token is not None:
                    on_token(token)
                if stops.numel():
                    finished |= torch.isin(token, stops)
                new, new_valid = token[:, None], torch.ones(b, 1, dtype=torch.bool, device=device)
                if _group_done(bool(stops.numel()) and bool(finished.all()), group, device):
                    break
            return torch.cat(out, dim=1)
    finally:
        model.train(was_training)


def _cached(model, batch: int, capacity: int):
    """A step function over a KV cache: the first call reads the prompt, each later one a new token."""
    cache = KVCache(model, batch, capacity)
    return lambda new, new_valid: cached_forward(model, new, cache, new_valid, last_only=True)[:, -1]


def _recompute(model, ids: torch.Tensor, valid: torch.Tensor):
    """A step function without a cache: the model's full forward over everything so far, every step.
    Left padding becomes a document of its own (doc_ids), so real tokens never see it."""
    state = {"ids": ids, "valid": valid, "first": True}

    def step(new: torch.Tensor, new_valid: torch.Tensor) -> torch.Tensor:
        if not state["first"]:
            state["ids"] = torch.cat([state["ids"], new], dim=1)
            state["valid"] = torch.cat([state["valid"], new_valid], dim=1)
        state["first"] = False
        v = state["valid"].long()
        positions = (v.cumsum(1) - 1).clamp(min=0)
        h = model.hidden_states(state["ids"], positions, doc_ids=v)
        return model.lm_head(h[:, -1])

    return step


def left_pad(sequences: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists of different lengths -> (input_ids [B, T], attention_mask [B, T]), padded on the left."""
    if not sequences or any(len(s) == 0 for s in sequences):
        raise ValueError("left_pad needs at least one sequence and no empty sequence")
    t = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), t), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), t), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, t - len(s) :] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, t - len(s) :] = 1
    return ids, mask


__all__ = ["generate", "sample_next", "left_pad"]
