"""The GPT-OSS transformer, natively in PyTorch.

Module and parameter names equal the HF checkpoint names (`model.layers.3.mlp.experts.down_proj`),
so import and export are a rename-free copy. Architecture only: no trainer, no parallel state.

    x = embed(ids)
    per layer:  x = x + attn(rmsnorm(x));  x = x + moe(rmsnorm(x))
    logits = lm_head(rmsnorm(x))          (untied)

Build on the meta device and materialise later:
    with torch.device("meta"): model = GptOssForCausalLM(cfg)
    model.to_empty(device="cuda"); model.init_weights()    # or load a checkpoint into it
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.utils.checkpoint as activation_ckpt
from torch import nn

from engine.models.gpt_oss.attention import AttentionContext, GptOssAttention, resolve_attn_backend
from engine.models.gpt_oss.config import GptOssConfig
from engine.models.gpt_oss.loss import IGNORE_INDEX, linear_cross_entropy
from engine.models.gpt_oss.offload import OffloadChain
from engine.models.gpt_oss.rope import cos_sin
from engine.moe.layer import MoEBlock
from engine.parallel import context_parallel


@dataclass
class ModelOptions:
    """Runtime choices that do not change the weights."""

    experts_backend: str = "auto"  # auto | loop | grouped_mm | triton
    attn_backend: str = "auto"  # auto (flex on CUDA, blockwise on CPU) | eager | flex | blockwise | triton
    ce_chunk_size: int = 512  # rows of fp32 logits alive at once in the loss
    activation_offload: bool = False  # checkpointed layers keep their input in host memory (offload.py)
    moe_chunk_tokens: int = 0  # the MoE layer runs at most this many tokens at a time (0: all at once)
    expert_weights: str = "dense"  # dense | mxfp4 (frozen experts kept packed as the checkpoint stores them)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * xf).to(x.dtype)


class GptOssDecoderLayer(nn.Module):
    def __init__(self, cfg: GptOssConfig, layer_idx: int, opts: ModelOptions):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = GptOssAttention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoEBlock(
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.num_local_experts,
            cfg.num_experts_per_tok,
            alpha=cfg.swiglu_alpha,
            limit=cfg.swiglu_limit,
            experts_backend=opts.experts_backend,
            chunk_tokens=opts.moe_chunk_tokens,
            expert_weights=opts.expert_weights,
        )
        self.activation_checkpointing = False  # set by engine.parallel.parallelize

    def _forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), ctx)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward(self, x: torch.Tensor, ctx: AttentionContext, offload: OffloadChain | None = None) -> torch.Tensor:
        if self.activation_checkpointing and torch.is_grad_enabled():
            if offload is not None:
                return offload.run(lambda h: self._forward(h, ctx), x, self)
            return activation_ckpt.checkpoint(self._forward, x, ctx, use_reentrant=False)
        return self._forward(x, ctx)


class GptOssModel(nn.Module):
    def __init__(self, cfg: GptOssConfig, opts: ModelOptions):
        super().__init__()
        weight = torch.empty(cfg.vocab_size, cfg.hidden_size)
        if not weight.is_meta:  # nn.Embedding's own init; on meta it would only import torch._dynamo (~0.7 s)
            nn.init.normal_(weight)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, _weight=weight)
        self.layers = nn.ModuleList(GptOssDecoderLayer(cfg, i, opts) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class GptOssForCausalLM(nn.Module):
    def __init__(self, config: GptOssConfig, options: ModelOptions | None = None, **option_overrides):
        super().__init__()
        self.config = config
        self.options = options or ModelOptions(**option_overrides)
        self.model = GptOssModel(config, self.options)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Random init as HF does: normal(0, initializer_range) for matrices, router and sinks; zero
        biases; unit norms. Expert rows are drawn per global expert index, so an expert-parallel
        rank gets exactly the rows of the single-rank model given the same seed."""
        std = self.config.initializer_range
        gen = torch.Generator(device="cpu")
        gen.manual_seed(0 if seed is None else seed)

        def normal_(p: torch.Tensor) -> None:
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).mul_(std))

        for name, p in self.named_parameters():
            owner = self.get_submodule(name.rpartition(".")[0])
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                p.fill_(1.0)
            elif getattr(owner, "holds_experts", False) and p.dim() == 3:  # [E, in, out] expert matrices
                self._init_expert_rows(p, gen, std, owner.expert_offset)
            elif name.endswith("_bias") or (name.endswith(".bias") and ".router." not in name):
                p.zero_()
            else:
                normal_(p)

    def _init_expert_rows(self, p: torch.Tensor, gen: torch.Generator, std: float, offset: int) -> None:
        # Draw all experts' rows in order, keep ours: identical weights whatever the EP layout.
        for e in range(self.config.num_local_experts):
            rows = torch.randn(p.shape[1:], generator=gen, dtype=torch.float32).mul_(std)
            if offset <= e < offset + p.shape[0]:
                p[e - offset].copy_(rows)

    def hidden_states(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None, doc_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Final normed hidden states [B, T, H]. position_ids [B, T] default to 0..T-1; doc_ids [B, T]
        (packed documents) restrict attention to tokens of the same document. Under context parallelism
        (`with cp:`, engine.parallel.context_parallel) the inputs are full rows and the result holds
        this rank's tokens only, [B, T/N, H], in `cp.local_index` order."""
        cp = context_parallel.active()
        b, t = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(t, device=input_ids.device).expand(b, t)
        if cp is not None:
            mine = cp.local_index(t, input_ids.device)
            input_ids, position_ids = input_ids[:, mine], position_ids[:, mine]
        x = self.model.embed_tokens(input_ids)
        cos, sin = cos_sin(self.config, position_ids)
        # Context parallelism runs the blockwise attention; `auto` picks it on every device then.
        backend = "blockwise" if cp is not None and self.options.attn_backend == "auto" else self.options.attn_backend
        ctx = AttentionContext(
            cos=cos,
            sin=sin,
            doc_ids=doc_ids,
            window=self.config.sliding_window,
            backend=resolve_attn_backend(backend, x.device),
            cp=cp,
        )
        offload = OffloadChain() if self.options.activation_offload else None
        for layer in self.model.layers:
            x = layer(x, ctx, offload)
        return self.model.norm(x)

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        loss_normalizer: float | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Without labels: logits [B, T, V]. With labels [B, T] (already shifted: labels[b, t] is the
        target at position t, IGNORE_INDEX = ignored): the summed token loss divided by `loss_normalizer`
        (default: the number of target tokens), computed in chunks without full logits. Under context
        parallelism, this rank's tokens only: their logits, or their share of the loss (summed over the group, the
        shares make the loss of the whole rows)."""
        h = self.hidden_states(input_ids, position_ids, doc_ids)
        cp = context_parallel.active()
        if cp is not None and labels is not None:
            if loss_normalizer is None:
                loss_normalizer = (labels != IGNORE_INDEX).sum().clamp(min=1)
            labels = labels[:, cp.local_index(labels.shape[1], labels.device)]
        if labels is None:
            return self.lm_head(h)
        loss_sum = linear_cross_entropy(h, self.lm_head.weight, labels, self.options.ce_chunk_size)
        if loss_normalizer is None:
            loss_normalizer = (labels != IGNORE_INDEX).sum().clamp(min=1)
        return loss_sum / loss_normalizer

    def moe_blocks(self) -> list[MoEBlock]:
        return [layer.mlp for layer in self.model.layers]

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)
