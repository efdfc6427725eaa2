"""Per-GPU memory plan of a run, printed at startup, and the refusal when it cannot fit.

Estimates, in bytes per rank:
  weights      dense weights (replicated) + this rank's 1/EP of the experts; fp32 master weights for
               full training, the training dtype (bf16) for a frozen LoRA base; with
               model.expert_weights=mxfp4 the experts' matrices at their packed size, 4.25 bits a weight
               (FP4 values and one 8-bit scale per 32), never sharded (frozen buffers), biases in bf16
  gradients    one per trainable weight, in its dtype
  optimizer    AdamW: two fp32 moments per trainable weight (+ an fp32 master copy when the weight
               itself is not fp32)
  activations  what the backward keeps per micro-batch (see `activation_bytes_per_token`), for this
               rank's 1/parallel.cp of each row, plus the keys/values gathered from the CP group; with
               model.moe_chunk_tokens the routed copies through the experts for one chunk only
  loss         the chunked cross-entropy's fp32 logits and probabilities for one chunk
  host         (not GPU memory) the checkpointed layers' inputs under model.activation_offload

`parallel.shard` (FSDP2, engine.parallel.fsdp) divides what it shards by the number of ranks holding
copies: the dense weights' share by the world size, the experts' by the expert-DP size (world / EP):
  none       nothing sharded (the fp32 masters of optim.master_weights sit in the optimizer)
  optimizer  gradients (fp32) and AdamW state (+ the fp32 weights themselves, the masters) sharded; a whole
             compute-dtype copy of this rank's weights is gathered per step and kept through the backward
  full       weights too; only two decoder blocks are gathered at a time (one computing, one prefetched)
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from engine.errors import PlanError
from engine.models.gpt_oss.config import GptOssConfig

GiB = 2**30
MXFP4_BYTES = 17 / 32  # bytes per MXFP4 weight: 16 bytes of FP4 codes + 1 scale byte per 32 values


@dataclass
class MemoryPlan:
    weights: float
    gradients: float
    optimizer: float
    activations: float
    loss: float
    host: float = 0.0  # pinned host memory, not counted in the GPU total
    packed: float = 0.0  # the MXFP4 experts' share of `weights` (model.expert_weights=mxfp4)

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.loss

    def rows(self) -> list[tuple[str, float]]:
        return [
            ("weights", self.weights),
            *([("  of which MXFP4 experts", self.packed)] if self.packed else []),
            ("gradients", self.gradients),
            ("optimizer state", self.optimizer),
            ("activations / micro-batch", self.activations),
            ("loss chunk", self.loss),
            ("total", self.total),
        ] + ([("host: offloaded inputs", self.host)] if self.host else [])

    def format(self) -> str:
        return "\n".join(f"  {name:<28}{value / GiB:9.2f} GiB" for name, value in self.rows())


def lora_param_count(cfg: GptOssConfig, rank: int, targets: list[str], ep: int, shared_experts: bool) -> int:
    """LoRA parameters on one rank: A [in, r] + B [r, out] per adapted matrix."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    dims = {
        "q_proj": (h, cfg.q_width),
        "k_proj": (h, cfg.kv_width),
        "v_proj": (h, cfg.kv_width),
        "o_proj": (cfg.q_width, h),
    }
    per_layer = sum(rank * (a + b) for name, (a, b) in dims.items() if name in targets)
    experts = 1 if shared_experts else cfg.num_local_experts // ep
    if "gate_up_proj" in targets:
        per_layer += experts * rank * (h + 2 * i)
    if "down_proj" in targets:
        per_layer += experts * rank * (i + h)
    return per_layer * cfg.num_hidden_layers


def routed_bytes_per_token(cfg: GptOssConfig, act_bytes: int = 2) -> float:
    """Per token and layer, what the k routed copies through the expert MLP keep: x, h [2I], act [I], y."""
    h, i, k = cfg.hidden_size, cfg.intermediate_size, cfg.num_experts_per_tok
    return k * (h + 2 * i + i + h) * act_bytes


def activation_bytes(
    cfg: GptOssConfig,
    tokens: int,
    seq_len: int,
    eager_attention: bool,
    checkpointing: bool,
    act_bytes: int = 2,
    offload: bool = False,
    moe_chunk: int = 0,
) -> float:
    """Activation bytes of `tokens` tokens. Without `moe_chunk` that is tokens x the per-token figure;
    with it, each MoE layer keeps only its chunks' inputs and recomputes one chunk of routed copies at
    a time in the backward: the routed term is paid once, for moe_chunk tokens (when there are more
    tokens than that; else the layer runs unchunked)."""
    per_token = activation_bytes_per_token(cfg, seq_len, eager_attention, checkpointing, act_bytes, offload)
    if not moe_chunk or tokens <= moe_chunk:
        return tokens * per_token
    routed = routed_bytes_per_token(cfg, act_bytes)
    per_token -= routed if checkpointing else cfg.num_hidden_layers * routed
    return tokens * per_token + moe_chunk * routed


def activation_bytes_per_token(
    cfg: GptOssConfig,
    seq_len: int,
    eager_attention: bool,
    checkpointing: bool,
    act_bytes: int = 2,
    offload: bool = False,
) -> float:
    """Bytes the backward keeps per token: per layer, the saved inputs/outputs of each matmul and
    elementwise op (attention projections, rotary q/k, attention output and log-sum-exp, the k routed
    copies of the token through the expert MLP, norms and residuals). With activation checkpointing
    only each layer's input is kept, plus one layer's worth during its recompute; offloaded, the inputs
    wait in host memory and the GPU holds two of them (the layer's own and the next one, prefetched).
    Only the eager attention has a term in seq_len: every other backend is linear in T."""
    h = cfg.hidden_size
    attn = h + cfg.q_width + 2 * cfg.kv_width + cfg.q_width + cfg.q_width + h  # norm out, q, k, v, out, o_in, res
    moe = h + h  # norm out, residual; + the routed copies
    per_layer = (
        (attn + moe) * act_bytes
        + routed_bytes_per_token(cfg, act_bytes)
        + 4 * cfg.num_attention_heads
        + 4 * cfg.num_local_experts
    )
    if eager_attention:  # the reference attention materialises fp32 probabilities [heads, T, T]
        per_layer += 4 * cfg.num_attention_heads * seq_len
    layers = cfg.num_hidden_layers
    if checkpointing:
        return (2 if offload else layers) * h * act_bytes + per_layer
    return layers * per_layer


def plan_memory(
    cfg: GptOssConfig,
    *,
    ep: int,
    lora_rank: int | None,
    lora_targets: list[str] | None = None,
    shared_expert_adapters: bool = False,
    seq_len: int,
    micro_batch: int,
    eager_attention: bool,
    checkpointing: bool,
    ce_chunk: int = 512,
    train_bytes: int = 2,
    world_size: int | None = None,
    shard: str = "none",
    master_weights: bool = False,
    offload: bool = False,
    cp: int = 1,
    moe_chunk: int = 0,
    packed_experts: bool = False,
) -> MemoryPlan:
    counts = dict(cfg.param_counts())
    packed = 0.0  # this rank's MXFP4 expert bytes (model.expert_weights=mxfp4), outside every other term
    if packed_experts:
        h, i = cfg.hidden_size, cfg.intermediate_size
        matrices = cfg.num_hidden_layers * cfg.num_local_experts * (h * 2 * i + i * h)
        counts["experts"] -= matrices  # the biases stay in the training dtype
        counts["total"] -= matrices
        packed = matrices / ep * MXFP4_BYTES
    dense = counts["total"] - counts["experts"]
    local = dense + counts["experts"] // ep
    world = world_size or ep
    if world == 1:
        shard = "none"
    # This rank's share of its weights when sharded: dense over the world, experts over expert-DP.
    share = dense / world + counts["experts"] / ep / max(1, world // ep)
    # What FSDP gathers at a time under `full`: two decoder blocks (one computing, one prefetched).
    block = 2 * (dense - 2 * cfg.vocab_size * cfg.hidden_size + counts["experts"] / ep) / cfg.num_hidden_layers
    if lora_rank:
        lora = lora_param_count(cfg, lora_rank, lora_targets or [], ep, shared_expert_adapters)
        base = {"none": local, "optimizer": local + share, "full": share + block}[shard]
        weights = base * train_bytes + packed + lora * 4
        grads = lora * 4
        optim = lora * 8
    elif shard == "none":
        # fp32 weights with bf16 compute under autocast, or bf16 weights with fp32 masters
        # (4 bytes) beside the two fp32 moments in the optimizer
        weight_bytes, state_bytes = (train_bytes, 12) if master_weights else (4, 8)
        weights = local * weight_bytes
        grads = local * weight_bytes
        optim = local * state_bytes
    else:
        # The sharded fp32 weights are the masters; FSDP gathers them in the compute dtype.
        gathered = local if shard == "optimizer" else block
        weights = share * 4 + gathered * train_bytes
        grads = share * 4 + gathered * train_bytes  # sharded fp32 + the unsharded ones being reduced
        optim = share * 8
    tokens = seq_len * micro_batch // cp  # this rank's chunks of its rows under context parallelism
    offload = offload and checkpointing
    acts = activation_bytes(cfg, tokens, seq_len, eager_attention, checkpointing, train_bytes, offload, moe_chunk)
    if cp > 1:  # each attention layer gathers the whole rows' keys and values (kept for its backward)
        acts += 2 * cfg.kv_width * seq_len * micro_batch * train_bytes * (1 if checkpointing else cfg.num_hidden_layers)
    loss = 2 * min(ce_chunk, tokens) * cfg.vocab_size * 4 + tokens * cfg.hidden_size * 4
    host = tokens * cfg.num_hidden_layers * cfg.hidden_size * train_bytes if offload else 0.0
    return MemoryPlan(weights, grads, optim, acts, loss, host, packed)


def plan_for_run(cfg, arch: GptOssConfig, device_type: str, world_size: int) -> MemoryPlan:
    lora = cfg.peft.method == "lora"
    eager = cfg.model.attn_backend == "eager"  # auto is flex (CUDA) or blockwise (CPU): linear in T
    return plan_memory(
        arch,
        ep=cfg.parallel.ep,
        lora_rank=cfg.peft.rank if lora else None,
        lora_targets=list(cfg.peft.target_modules),
        shared_expert_adapters=cfg.peft.share_expert_adapters,
        seq_len=cfg.data.max_seq_len,
        micro_batch=cfg.data.micro_batch_size,
        eager_attention=eager,
        checkpointing=bool(cfg.model.activation_checkpointing),
        ce_chunk=cfg.model.ce_chunk_size,
        train_bytes=4 if cfg.model.dtype == "float32" or (cfg.model.dtype == "auto" and device_type != "cuda") else 2,
        world_size=world_size,
        shard=cfg.parallel.shard,
        master_weights=cfg.optim.master_weights,
        offload=cfg.model.activation_offload,
        cp=getattr(cfg.parallel, "cp", 1),
        moe_chunk=cfg.model.moe_chunk_tokens or 0,
        packed_experts=cfg.model.expert_weights == "mxfp4",
    )


def host_memory() -> int | None:
    """This machine's physical memory in bytes (what a CPU run's plan is checked against), None if unknown."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def check_fits(plan: MemoryPlan, capacity: float | None, enabled: bool, device: str = "GPU") -> None:
    """Refuse a run whose plan exceeds 95% of the GPU's memory (`device="CPU"`: of this machine's memory,
    per process), with what to change, before any weight or buffer is allocated."""
    if capacity is None or not enabled or plan.total <= 0.95 * capacity:
        return
    unit, whose = ("GPU", "this GPU's") if device == "GPU" else ("process", "this machine's")
    # The plan itself is in the log just above; the error stays one line.
    raise PlanError(
        f"memory plan {plan.total / GiB:.1f} GiB per {unit} exceeds 95% of {whose} {capacity / GiB:.1f} GiB; "
        "to fit: model.activation_checkpointing=true (and model.activation_offload=true), a smaller "
        "data.micro_batch_size or data.max_seq_len, parallel.shard=optimizer or full, a larger parallel.ep (more "
        "GPUs), or peft.method=lora (with model.expert_weights=mxfp4 on an MXFP4 checkpoint: packed frozen experts); "
        "trainer.memory_check=false starts anyway"
    )
