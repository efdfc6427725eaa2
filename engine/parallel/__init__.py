"""Data and expert parallelism: the process mesh, gradient sync and the batch layout.

The expert-parallel dispatcher itself lives with the MoE code: engine.moe.alltoall
(`apply_expert_parallel(model, mesh)`).
"""

from .batching import micro_batches_for, rank_slice
from .grad_sync import clip_grad_norm, global_grad_norm, global_token_count, is_expert_param, sync_gradients
from .mesh import LayoutError, Mesh, check_layout

__all__ = ["Mesh", "LayoutError", "check_layout", "sync_gradients", "global_grad_norm", "clip_grad_norm",
           "global_token_count", "is_expert_param", "micro_batches_for", "rank_slice"]
