"""GPT-OSS experts: one 3-D tensor per projection (experts first), computed by one backend object.

Weights use the HF layout, (in, out) per expert, so `x_e @ gate_up_proj[e]` is the projection:
    gate_up_proj [E, H, 2I] (gate/up columns interleaved), gate_up_proj_bias [E, 2I]
    down_proj    [E, I, H],                                  down_proj_bias    [E, H]
The module holds experts [expert_offset, expert_offset + num_experts) of the full model: all of them
as built; `shard_experts` (applied from outside, by the expert-parallel setup) keeps one rank's slice.
The math lives in the backend (engine.moe.backends); LoRA wraps this module (engine.peft.lora).

With `expert_weights="mxfp4"` the two projections are frozen and kept as the MXFP4 checkpoints store them:
uint8 buffers `gate_up_proj_blocks` [E, 2I, H/32, 16], `gate_up_proj_scales` [E, 2I, H/32] (and the same for
down_proj, [E, H, I/32, ...]), non-persistent (a training checkpoint never holds them; they are read again
from the model's checkpoint). `module.gate_up_proj` is then an `Mxfp4Weight` over those buffers, standing for
the dense [E, H, 2I] weight; every backend computes with it. The biases stay parameters in the compute dtype.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from engine.config.choices import EXPERT_WEIGHTS
from engine.moe.backends import ExpertsBackend, experts_backend
from gptoss_kernels.mxfp4 import BYTES_PER_GROUP, GROUP, Mxfp4Weight

EXPERT_PARAMS = ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")
MATRICES = ("gate_up_proj", "down_proj")  # the projections' weights (MXFP4 in the published checkpoints)


def packed_buffer_names(name: str) -> tuple[str, str]:
    return f"{name}_blocks", f"{name}_scales"


class Mxfp4Access:
    """`gate_up_proj` / `down_proj` as an Mxfp4Weight over the module's packed buffers (built on each access,
    so that it always sees the buffers as `.to()` or loading left them)."""

    def __getattr__(self, name: str):
        if name in MATRICES:
            buffers = self.__dict__.get("_buffers", {})
            blocks, scales = packed_buffer_names(name)
            if blocks in buffers:
                return Mxfp4Weight(buffers[blocks], buffers[scales])
        return super().__getattr__(name)

    @property
    def packed(self) -> bool:
        """True when the projections are MXFP4 buffers (frozen), False for dense parameters."""
        return packed_buffer_names("gate_up_proj")[0] in self._buffers


def register_packed(module: nn.Module, name: str, num_experts: int, fan_in: int, fan_out: int) -> None:
    """Empty uint8 buffers (on the current default device) for projection `name`, (out, in) as stored."""
    if fan_in % GROUP:
        raise ValueError(f"model.expert_weights=mxfp4: {name} has {fan_in} inputs, not a multiple of {GROUP}")
    blocks, scales = packed_buffer_names(name)
    groups = (num_experts, fan_out, fan_in // GROUP)
    module.register_buffer(blocks, torch.empty(*groups, BYTES_PER_GROUP, dtype=torch.uint8), persistent=False)
    module.register_buffer(scales, torch.empty(*groups, dtype=torch.uint8), persistent=False)


def expert_tensor_names_of(module: nn.Module) -> tuple[str, ...]:
    """The names of the tensors (parameters or packed buffers) holding a module's experts along dim 0."""
    if not getattr(module, "packed", False):
        return EXPERT_PARAMS
    packed = tuple(n for m in MATRICES for n in packed_buffer_names(m))
    return packed + ("gate_up_proj_bias", "down_proj_bias")


def compute_weights(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """(x, the four expert weights) in the compute dtype: under autocast, which does not reach grouped
    GEMMs, both are cast by hand (fp32 master weights, bf16 compute); otherwise unchanged. Run the
    experts inside `recast_in_backward(weights)` so that the casts are not kept for the backward."""
    weights = tuple(getattr(module, n) for n in EXPERT_PARAMS)
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        return x.to(dtype), tuple(w if isinstance(w, Mxfp4Weight) else w.to(dtype) for w in weights)
    return x, weights


@contextlib.contextmanager
def recast_in_backward(module: nn.Module, casts: tuple[torch.Tensor, ...]):
    """Keep the module's own (fp32) parameters for the backward instead of their per-forward casts
    `casts` (or views of them), and cast again when the backward needs one: full SFT under autocast
    would otherwise hold a bf16 copy of every layer's expert weights from its forward to its backward
    (~1.6 GB a layer at GPT-OSS-20B shapes). Costs one cast per weight in the backward."""
    sources = {}
    for name, cast in zip(EXPERT_PARAMS, casts):
        param = getattr(module, name)
        if isinstance(cast, Mxfp4Weight):
            continue  # packed bytes: autograd keeps them as they are
        if cast is not param:
            sources[cast.untyped_storage().data_ptr()] = (param, cast.dtype)
    if not sources:
        yield
        return

    def pack(t: torch.Tensor):
        hit = sources.get(t.untyped_storage().data_ptr()) if t.device.type != "meta" else None
        if hit is None:
            return t
        return hit + (t.size(), t.stride(), t.storage_offset())

    def unpack(packed):
        if isinstance(packed, torch.Tensor):
            return packed
        param, dtype, size, stride, offset = packed
        return param.detach().to(dtype).as_strided(size, stride, offset)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


class GroupedExperts(Mxfp4Access, nn.Module):
    holds_experts = True  # its parameters are split over the expert-parallel ranks (engine.parallel.placement)

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        *,
        alpha: float,
        limit: float,
        backend: str | ExpertsBackend = "auto",
        expert_weights: str = "dense",
    ):
        super().__init__()
        if expert_weights not in EXPERT_WEIGHTS:
            raise ValueError(f"model.expert_weights={expert_weights!r} is not one of {EXPERT_WEIGHTS}")
        # The full model's experts, and which of them this module holds (all, until sharded).
        self.total_experts, self.num_experts, self.expert_offset = num_experts, num_experts, 0
        self.alpha, self.limit = alpha, limit
        self.backend = experts_backend(backend)
        if expert_weights == "mxfp4":
            register_packed(self, "gate_up_proj", num_experts, hidden_size, 2 * intermediate_size)
            register_packed(self, "down_proj", num_experts, intermediate_size, hidden_size)
        else:
            self.gate_up_proj = nn.Parameter(torch.empty(num_experts, hidden_size, 2 * intermediate_size))
            self.down_proj = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))
        self.gate_up_proj_bias = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size))
        self.down_proj_bias = nn.Parameter(torch.empty(num_experts, hidden_size))

    def forward(self, x: torch.Tensor, counts: torch.Tensor, gather_idx: torch.Tensor | None = None) -> torch.Tensor:
        """Rows grouped by local expert (counts [E_local]) -> expert outputs [M, H], not yet routing-weighted.

        With `gather_idx` [M], x is the token tensor [T, H] and row r of the grouped order is x[gather_idx[r]]."""
        x, weights = compute_weights(self, x)
        with recast_in_backward(self, weights):
            return self.backend.mlp(x, counts, *weights, alpha=self.alpha, limit=self.limit, gather_idx=gather_idx)

    def extra_repr(self) -> str:
        e, h, i2 = self.gate_up_proj.shape
        weights = ", mxfp4" if self.packed else ""
        return (
            f"experts={e} (offset {self.expert_offset}), hidden={h}, intermediate={i2 // 2}, "
            f"backend={self.backend}{weights}"
        )


def shard_experts(experts: nn.Module, ep_size: int, ep_rank: int) -> None:
    """Keep only expert-parallel rank `ep_rank`'s slice of a module that holds all experts (any device,
    meta included: nothing is allocated then). A module already holding exactly that slice is left alone."""
    total = experts.total_experts
    if ep_size < 1 or total % ep_size:
        raise ValueError(f"parallel.ep={ep_size} must divide the number of experts ({total})")
    if not 0 <= ep_rank < ep_size:
        raise ValueError(f"ep_rank={ep_rank} must be in [0, ep_size={ep_size})")
    local = total // ep_size
    start = ep_rank * local
    if (experts.expert_offset, experts.num_experts) == (start, local):
        return
    if experts.num_experts != total:
        raise ValueError(
            f"these experts are already a slice [{experts.expert_offset}, "
            f"{experts.expert_offset + experts.num_experts}); shard a module holding all experts"
        )
    for name in expert_tensor_names_of(experts):
        p = getattr(experts, name)
        piece = p.detach()[start : start + local]
        if not piece.is_meta:
            piece = piece.clone()  # its own storage, so the other ranks' rows are freed
        if name in experts._buffers:
            experts._buffers[name] = piece
        else:
            setattr(experts, name, nn.Parameter(piece, requires_grad=p.requires_grad))
    experts.num_experts, experts.expert_offset = local, start


def shard_model_experts(model: nn.Module, ep_size: int, ep_rank: int) -> int:
    """shard_experts on every experts module of `model`; returns how many there were."""
    found = [m for m in model.modules() if isinstance(m, GroupedExperts)]
    for experts in found:
        shard_experts(experts, ep_size, ep_rank)
    return len(found)
