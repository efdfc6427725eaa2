"""One rank of a distributed test: `python -m tests.distributed.worker SCENARIO OUT_DIR ARGS_JSON`.

Started by tests.distributed.launcher with torchrun's environment variables, so the mesh is built by
the same `Mesh.from_env` the trainer uses. Saves its result to OUT_DIR/rank{RANK}.pt; any exception
ends the process with a traceback and exit code 1, as it would under torchrun.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch
import torch.distributed as dist

from engine.moe.alltoall import AllToAllDispatcher, global_expert_load
from engine.moe.dispatch import LocalDispatcher
from engine.moe.experts import GroupedExperts, shard_experts
from engine.moe.layer import MoEBlock
from engine.parallel import LayoutError, Mesh, clip_grad_norm, global_grad_norm, global_token_count, sync_gradients
from engine.parallel.parallelize import apply_expert_parallel
from tests.distributed.cases import GLOBAL_BATCH, expert_parallel_model, global_batch
from tests.distributed.layout import expert_range, micro_batches_for, rank_slice


def _model(case: str, mesh: Mesh):
    model = expert_parallel_model(case, mesh.ep, mesh.ep_rank)
    apply_expert_parallel(model, mesh)
    return model


def run_case(case: str, mesh: Mesh) -> dict:
    """Forward, loss, backward and gradient sync on this rank's slice of the global batch."""
    model = _model(case, mesh)
    ids, labels = global_batch(model.config.vocab_size)
    mine = rank_slice(GLOBAL_BATCH, mesh.rank, mesh.world_size)
    ids, labels = ids[mine], labels[mine]
    with torch.no_grad():
        logits = model(ids)
    n = global_token_count((labels != -100).sum(), mesh)
    loss = model(ids, labels=labels, loss_normalizer=n)
    loss.backward()
    sync_gradients(model, mesh)
    norm = global_grad_norm(model, mesh)
    total = loss.detach().clone()
    dist.all_reduce(total)
    params = dict(model.named_parameters())
    return {
        "logits": logits,
        "loss": total,
        "norm": norm,
        "grads": {name: p.grad for name, p in params.items() if p.requires_grad},
        "frozen_with_grad": [name for name, p in params.items() if not p.requires_grad and p.grad is not None],
        "counts": [b.last_expert_counts for b in model.moe_blocks()],
        "load": global_expert_load(model, mesh),
    }


def run_steps(mesh: Mesh, steps: int, lr: float, max_norm: float, micro_batch: int) -> dict:
    """AdamW steps with gradient accumulation over micro-batches, as the trainer will run them."""
    model = _model("uniform", mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    accum = micro_batches_for(GLOBAL_BATCH, micro_batch, mesh.world_size)
    losses, norms = [], []
    for step in range(steps):
        ids, labels = global_batch(model.config.vocab_size, step)
        mine = rank_slice(GLOBAL_BATCH, mesh.rank, mesh.world_size)
        ids, labels = ids[mine], labels[mine]
        n = global_token_count((labels != -100).sum(), mesh)  # the whole step's tokens, all ranks
        opt.zero_grad(set_to_none=True)
        total = torch.zeros(())
        for m in range(accum):
            mb = slice(m * micro_batch, (m + 1) * micro_batch)
            loss = model(ids[mb], labels=labels[mb], loss_normalizer=n)
            loss.backward()
            total += loss.detach()
        sync_gradients(model, mesh)
        norms.append(clip_grad_norm(model, mesh, max_norm))
        opt.step()
        dist.all_reduce(total)
        losses.append(total)
    return {
        "losses": torch.stack(losses),
        "norms": torch.stack(norms),
        "accum": accum,
        "params": {name: p.detach() for name, p in model.named_parameters()},
    }


def _routing(n_per_rank: list[int], num_experts: int, k: int, rank: int):
    """Every rank draws the routing of all ranks (same seed) and keeps its own: the expectations
    need the whole group's routing."""
    gen = torch.Generator().manual_seed(7)
    all_idx = [
        torch.stack([torch.randperm(num_experts, generator=gen)[:k] for _ in range(n)])
        if n
        else torch.zeros(0, k, dtype=torch.int64)
        for n in n_per_rank
    ]
    return all_idx[rank], all_idx


def round_trip(mesh: Mesh, hidden: int = 5, k: int = 2, num_experts: int = 8) -> dict:
    """dispatch then undispatch restores rows and gradients bit for bit; received rows arrive
    grouped by local expert with the right counts. Rank 1 has no tokens at all."""
    n_per_rank = [4 + 3 * r if r != 1 else 0 for r in range(mesh.ep)]
    indices, all_idx = _routing(n_per_rank, num_experts, k, mesh.ep_rank)
    disp = AllToAllDispatcher(mesh.ep_group, mesh.ep, mesh.ep_rank, num_experts)
    plan = disp.plan(indices)
    rows = torch.randn(indices.numel(), hidden)
    rows[:, 0] = indices.reshape(-1)[plan.perm.order].float()  # tag each row with its expert
    rows.requires_grad_(True)
    y = disp.exchange(rows, plan)[plan.regroup]  # what the experts see
    back = disp.undispatch(y, plan)
    g = torch.randn_like(back)
    (back * g).sum().backward()
    experts = expert_range(mesh, num_experts)
    expected_counts = torch.bincount(torch.cat(all_idx).reshape(-1), minlength=num_experts)[
        experts.start : experts.stop
    ]
    expected_tags = torch.repeat_interleave(torch.arange(experts.start, experts.stop), expected_counts).float()
    return {
        "values_exact": torch.equal(back.detach(), rows.detach()),
        "grads_exact": torch.equal(rows.grad, g),
        "counts_ok": torch.equal(plan.local_counts, expected_counts),
        "grouped_ok": torch.equal(y[:, 0].detach(), expected_tags),
    }


def dispatcher_vs_local(
    mesh: Mesh,
    n_per_rank: list[int],
    autocast: bool,
    hidden: int = 16,
    inter: int = 8,
    k: int = 2,
    num_experts: int = 8,
) -> dict:
    """The dispatcher with real experts against LocalDispatcher on the same tokens: max abs
    differences of the outputs, input gradients and expert gradients, and the bytes per row sent.
    `autocast`: fp32 tokens and weights under bf16 autocast, as the trainer's mixed precision."""
    indices, all_idx = _routing(n_per_rank, num_experts, k, mesh.ep_rank)
    gen = torch.Generator().manual_seed(3)
    x_all = torch.randn(sum(n_per_rank), hidden, generator=gen)
    w_all = torch.softmax(torch.randn(x_all.shape[0], k, generator=gen), -1)
    g_all = torch.randn(x_all.shape[0], hidden, generator=gen)
    full = GroupedExperts(num_experts, hidden, inter, alpha=1.702, limit=7.0, backend="loop")
    for p in full.parameters():
        p.data.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    local_count = num_experts // mesh.ep
    mine_e = slice(mesh.ep_rank * local_count, (mesh.ep_rank + 1) * local_count)
    mine = GroupedExperts(local_count, hidden, inter, alpha=1.702, limit=7.0, backend="loop")
    for p, q in zip(mine.parameters(), full.parameters()):
        p.data.copy_(q.data[mine_e])
    start = sum(n_per_rank[: mesh.ep_rank])
    rows = slice(start, start + n_per_rank[mesh.ep_rank])
    x_ref, x = x_all.clone().requires_grad_(True), x_all[rows].clone().requires_grad_(True)
    disp = AllToAllDispatcher(mesh.ep_group, mesh.ep, mesh.ep_rank, num_experts)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out_ref = _dispatch_experts_combine(LocalDispatcher(num_experts), x_ref, w_all, torch.cat(all_idx), full)
        out = _dispatch_experts_combine(disp, x, w_all[rows], indices, mine)
    (out_ref.float() * g_all).sum().backward()
    (out.float() * g_all[rows]).sum().backward()
    diffs = {"out": _max_diff(out, out_ref[rows]), "x_grad": _max_diff(x.grad, x_ref.grad[rows])}
    for (name, p), q in zip(mine.named_parameters(), full.parameters()):
        diffs[name] = _max_diff(p.grad, q.grad[mine_e])
    sent_rows = int((indices // local_count != mesh.ep_rank).sum())
    return {"diffs": diffs, "bytes_per_value": disp.last_traffic["dispatch_bytes_out"] / max(sent_rows, 1) / hidden}


def chunked_moe_vs_full(
    mesh: Mesh, chunk: int = 3, hidden: int = 16, inter: int = 8, k: int = 2, num_experts: int = 8
) -> dict:
    """model.moe_chunk_tokens under EP: ranks with 7, 11, ... tokens need 3, 4, ... chunks of 3; every
    rank runs the group's maximum (4 at EP 2). Outputs, input, router and expert gradients against
    one unchunked block with all experts on the whole EP group's tokens: max abs differences over
    max(1, the reference's largest magnitude) (fp32: the chunks' matmuls round differently)."""
    n_per_rank = [7 + 4 * r for r in range(mesh.ep)]
    gen = torch.Generator().manual_seed(5)
    x_all = torch.randn(sum(n_per_rank), hidden, generator=gen)
    g_all = torch.randn(x_all.shape, generator=gen)
    full = MoEBlock(hidden, inter, num_experts, k, alpha=1.702, limit=7.0, experts_backend="loop")
    for p in full.parameters():
        p.data.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    mine = MoEBlock(hidden, inter, num_experts, k, alpha=1.702, limit=7.0, experts_backend="loop", chunk_tokens=chunk)
    mine.load_state_dict(full.state_dict())
    shard_experts(mine.experts, mesh.ep, mesh.ep_rank)
    mine.dispatcher = AllToAllDispatcher(mesh.ep_group, mesh.ep, mesh.ep_rank, num_experts)
    start = sum(n_per_rank[: mesh.ep_rank])
    rows = slice(start, start + n_per_rank[mesh.ep_rank])
    x_ref, x = x_all.clone().requires_grad_(True), x_all[rows].clone().requires_grad_(True)
    out_ref, out = full(x_ref[None])[0], mine(x[None])[0]
    (out_ref * g_all).sum().backward()
    (out * g_all[rows]).sum().backward()
    local = num_experts // mesh.ep
    experts = slice(mesh.ep_rank * local, (mesh.ep_rank + 1) * local)

    def rel(a, b):
        return _max_diff(a, b) / max(1.0, float(b.abs().max()))

    diffs = {"out": rel(out, out_ref[rows]), "x_grad": rel(x.grad, x_ref.grad[rows])}
    for name, p in mine.router.named_parameters():  # replicated: the group's gradients summed
        grad = p.grad.clone()
        dist.all_reduce(grad, group=mesh.ep_group)
        diffs[f"router.{name}"] = rel(grad, dict(full.router.named_parameters())[name].grad)
    for name, p in mine.experts.named_parameters():
        diffs[f"experts.{name}"] = rel(p.grad, dict(full.experts.named_parameters())[name].grad[experts])
    return {"diffs": diffs, "chunks": mine.last_num_chunks, "unchunked_would_be": -(-n_per_rank[mesh.ep_rank] // chunk)}


def _dispatch_experts_combine(dispatcher, x, weights, indices, experts):
    """The MoE block's phases after the route, with the given dispatcher and experts."""
    d = dispatcher.dispatch(x, weights, indices)
    return dispatcher.combine(experts(d.x, d.counts, gather_idx=d.gather_idx), d, experts.backend)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach() - b).abs().max()) if b.numel() else 0.0


def parity(mesh: Mesh, spec: dict) -> dict:
    """Everything the parity tests compare for one layout (tests/distributed/test_expert_parallel.py)."""
    result = {"cases": {case: run_case(case, mesh) for case in spec["cases"]}}
    if spec.get("dispatcher_checks"):
        result["round_trip"] = round_trip(mesh)
        # only rank 0 has tokens: rank 1 sends nothing, some experts get nothing
        result["empty_rank"] = dispatcher_vs_local(mesh, [6 if r == 0 else 0 for r in range(mesh.ep)], False)
        result["autocast"] = dispatcher_vs_local(mesh, [5 + r for r in range(mesh.ep)], True)
        result["moe_chunks"] = chunked_moe_vs_full(mesh)
    if spec.get("steps"):
        result["steps"] = run_steps(mesh, **spec["steps"])
    result["mesh"] = {"ep_rank": mesh.ep_rank, "edp_rank": mesh.edp_rank, "ep": mesh.ep}
    return result


def main() -> None:
    scenario, out_dir, args = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    torch.set_num_threads(1)
    result: dict = {}
    if scenario == "layouts":
        # Every bad layout in turn: each must be refused before any collective (one the mesh accepted
        # would reach the barrier and print nothing). Each refusal goes to stderr on its own line; the
        # last one is raised, so the rank ends as under torchrun.
        refusal: Exception | None = None
        for layout in args["layouts"]:
            try:
                Mesh.from_env(ep=layout["ep"], tp=layout["tp"], num_experts=layout["num_experts"], timeout_s=20)
            except LayoutError as e:
                print(f"LayoutError: {e}", file=sys.stderr, flush=True)
                refusal = e
                continue
            dist.barrier()  # never reached for a bad layout: the mesh refuses it first
        if refusal is None:
            raise AssertionError("no layout was refused")
        raise refusal
    elif scenario == "dead_rank":
        mesh = Mesh.from_env(ep=2, num_experts=8, timeout_s=args["timeout_s"])
        if mesh.rank == 1:
            os._exit(3)  # dies without a word, as a rank killed by the OOM killer would
        _model("uniform", mesh)(global_batch(64)[0][:1])
    elif scenario == "stalled_rank":
        mesh = Mesh.from_env(ep=2, num_experts=8, timeout_s=args["timeout_s"])
        if mesh.rank == 1:
            time.sleep(args["stall_s"])  # alive but never joins the collective
            os._exit(0)
        _model("uniform", mesh)(global_batch(64)[0][:1])
    elif scenario == "parity":
        # Each layout of this world size in turn, in the same process group: the first mesh creates
        # it, the next ones build their EP / expert-DP groups inside it.
        meshes = []
        for name, spec in args["layouts"].items():
            mesh = Mesh.from_env(ep=spec["ep"], num_experts=8, timeout_s=60)
            meshes.append(mesh)
            result[name] = parity(mesh, spec)
        meshes[0].destroy()
    else:
        raise ValueError(f"unknown scenario {scenario!r}")
    torch.save(result, os.path.join(out_dir, f"rank{os.environ['RANK']}.pt"))


if __name__ == "__main__":
    main()
