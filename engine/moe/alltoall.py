"""Expert parallelism: the all-to-all dispatcher.

The experts of every MoE layer are split over the `ep` ranks of an expert-parallel group (rank j
owns global experts [j*E_local, (j+1)*E_local)); the router and everything else is replicated.
Each rank routes its own tokens, sends every (token, expert) row to the rank owning that expert,
runs its experts on the rows it received from the whole group, and sends the outputs back.

Phases of one layer (the `phase:` comments below mark them in the code):
  route              weights, indices [N, k] from the (replicated) router, global expert ids
  permute            order the N*k rows by global expert, hence by destination rank; counts [E]
  exchange counts    all-to-all of the per-expert counts: recv_counts [ep, E_local], rows from each
                     source rank for each local expert; then THE device-to-host sync of the layer,
                     since all_to_all_single needs host split sizes
  exchange tokens    all-to-all of the rows [N*k, H] -> [R, H], R = rows received from the group
  regroup            received rows are ordered (source rank, local expert); the experts want
                     (local expert, source rank): a stable sort by local expert, fused into the
                     experts' gather
  experts            grouped expert MLP, un-weighted outputs [R, H]
  un-regroup         back to (source rank, local expert) order
  exchange back      the reverse all-to-all: each row returns to its token's rank, in permute order
  combine            routing-weighted sum of each token's k rows, in fp32 (as the local dispatcher)

Every exchange is differentiable (engine.parallel.comm.all_to_all), so the backward runs the same
exchanges in reverse: the gradient of an expert's input goes back to the token's rank, and each
expert's weight gradient sums contributions from the tokens of the whole EP group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from engine.moe.dispatch import Dispatched, Permutation, combine_rows, permute
from engine.parallel.comm import all_to_all


@dataclass
class ExchangePlan:
    """Where the rows of one layer go and come from. Built in the forward; the exchanges keep its split
    sizes for their backward, so the backward needs no further host sync."""

    perm: Permutation  # this rank's (token, slot) rows grouped by global expert = by destination rank
    send_splits: list[int]  # [ep] rows sent to each rank of the group (own rank included)
    recv_splits: list[int]  # [ep] rows received from each rank
    regroup: torch.Tensor  # [R] received-row index for each row in local-expert order
    local_counts: torch.Tensor  # [E_local] rows per local expert, from the whole EP group


class AllToAllDispatcher:
    """Drop-in for `LocalDispatcher` when the experts are spread over the ranks of `group`."""

    def __init__(self, group: dist.ProcessGroup, ep_size: int, ep_rank: int, num_experts: int):
        if num_experts % ep_size:
            raise ValueError(f"parallel.ep={ep_size} must divide the number of experts ({num_experts})")
        self.group, self.ep_size, self.ep_rank = group, ep_size, ep_rank
        self.num_experts, self.local_experts = num_experts, num_experts // ep_size
        # Bytes this rank sent to other ranks in the last forward (host ints, free to read): what the
        # links carried; rows for this rank's own experts are copied, not sent.
        self.last_traffic = {"dispatch_bytes_out": 0, "combine_bytes_out": 0}

    def plan(self, indices: torch.Tensor) -> ExchangePlan:
        """indices [N, k] global expert ids -> the exchange plan (one host sync)."""
        # phase: permute by destination (grouping by global expert also groups by owner rank)
        perm = permute(indices, self.num_experts)
        # phase: exchange counts; equal splits of E_local: chunk j of counts [E] is rank j's experts
        recv_counts = torch.empty_like(perm.counts)  # [ep * E_local], (source rank, local expert)
        dist.all_to_all_single(recv_counts, perm.counts, group=self.group)
        # The one device-to-host sync of the layer: the split sizes must be host ints. Both count
        # vectors come over in one copy.
        host = torch.cat([perm.counts, recv_counts]).tolist()
        send_counts, recv_host = host[: self.num_experts], host[self.num_experts :]
        el = self.local_experts
        send_splits = [sum(send_counts[j * el : (j + 1) * el]) for j in range(self.ep_size)]
        recv_splits = [sum(recv_host[j * el : (j + 1) * el]) for j in range(self.ep_size)]
        received = sum(recv_splits)
        # phase: regroup (plan only); local expert of each received row, then a stable sort by it
        device = indices.device
        expert_of_row = torch.repeat_interleave(
            torch.arange(self.ep_size * el, device=device) % el, recv_counts, output_size=received
        )  # [R]; output_size known on the host, so no second sync
        regroup = torch.argsort(expert_of_row, stable=True)
        local_counts = recv_counts.view(self.ep_size, el).sum(0)
        return ExchangePlan(perm, send_splits, recv_splits, regroup, local_counts)

    def exchange(self, rows: torch.Tensor, plan: ExchangePlan) -> torch.Tensor:
        """phase: exchange tokens. rows [N*k, H] in permute order -> received rows [R, H] in
        (source rank, local expert) order."""
        return all_to_all(rows, plan.recv_splits, plan.send_splits, self.group)

    def undispatch(self, y: torch.Tensor, plan: ExchangePlan) -> torch.Tensor:
        """phases: un-regroup + exchange back. y [R, H] in local-expert order -> [N*k, H] in permute
        order on the token's own rank."""
        y_src = torch.index_copy(torch.empty_like(y), 0, plan.regroup, y)  # regroup is a permutation
        return all_to_all(y_src, plan.send_splits, plan.recv_splits, self.group)

    def dispatch(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> Dispatched:
        """x [N, H], weights/indices [N, k] (global expert ids) -> the rows this rank's experts run
        [R, H], in (source rank, local expert) order, read through the regroup index (fused into the
        experts' gather); counts [E_local] summed over the EP group."""
        plan = self.plan(indices)
        rows = x[plan.perm.token_of_row]  # [N*k, H]
        if torch.is_autocast_enabled(x.device.type):
            # The experts compute in the autocast dtype anyway (fp32 master weights, bf16 compute):
            # casting before the exchange instead of after sends half the bytes, same values.
            rows = rows.to(torch.get_autocast_dtype(x.device.type))
        received = self.exchange(rows, plan)  # [R, H]
        self.last_traffic = {"dispatch_bytes_out": self._bytes_out(plan.send_splits, rows), "combine_bytes_out": 0}
        w = weights.reshape(-1)[plan.perm.order]  # [N*k]
        return Dispatched(received, plan.local_counts, plan.regroup, plan.perm, w, x.shape[0], plan)

    def combine(self, y: torch.Tensor, d: Dispatched, backend) -> torch.Tensor:
        """y [R, H] expert outputs in local-expert order -> out [N, H] on the tokens' own rank."""
        back = self.undispatch(y, d.plan)  # [N*k, H], permute order
        self.last_traffic["combine_bytes_out"] = self._bytes_out(d.plan.recv_splits, y)
        return combine_rows(back, d, backend)

    def _bytes_out(self, splits: list[int], rows: torch.Tensor) -> int:
        """Bytes sent to other ranks: rows for this rank's own experts are copied, not sent."""
        return (sum(splits) - splits[self.ep_rank]) * rows.shape[1] * rows.element_size()


def global_expert_load(model, mesh) -> torch.Tensor:
    """Tokens routed to each expert of each layer in the last forward, over the whole global batch:
    int64 [layers, num_experts], identical on every rank (for load metrics; one small all-reduce).

    A rank's `last_expert_counts` cover its own experts for the tokens of its EP group: placed at the
    experts' global offsets, they are disjoint within an EP group and add up across expert-DP."""
    blocks = model.moe_blocks()
    load = torch.zeros(len(blocks), blocks[0].router.num_experts, dtype=torch.int64, device=mesh.device)
    for layer, block in enumerate(blocks):
        if block.last_expert_counts is None:
            raise RuntimeError("global_expert_load needs a forward pass first")
        offset = block.experts.expert_offset
        load[layer, offset : offset + block.experts.num_experts] = block.last_expert_counts
    if mesh.distributed:
        dist.all_reduce(load, op=dist.ReduceOp.SUM, group=mesh.dp_group)
    return load
