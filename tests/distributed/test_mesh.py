"""The mesh: layout checks (on every rank, before any collective), failure of a dead or stalled rank
within the configured timeout, the single-process fallback, and the batch layout helpers."""

import functools
import re

import pytest
import torch

from engine.parallel import LayoutError, Mesh, check_layout, global_grad_norm, global_token_count, sync_gradients
from tests.distributed.launcher import describe, launch
from tests.distributed.layout import expert_range, micro_batches_for, rank_slice

BAD_LAYOUTS = [
    (3, 1, 6, "parallel.ep=3 does not divide the world size 4"),
    (4, 1, 6, "parallel.ep=4 does not divide the number of experts (6)"),
    (2, 2, 8, "parallel.tp=2 with parallel.ep=2: tensor parallelism must be 1"),
]


@functools.cache
def _bad_layouts_launch():
    """One launch of 4 ranks in which every rank tries each bad layout in turn (tests/distributed/worker.py)."""
    return launch(
        "layouts", 4, deadline_s=60, layouts=[dict(ep=ep, tp=tp, num_experts=n) for ep, tp, n, _ in BAD_LAYOUTS]
    )


@pytest.mark.slow
@pytest.mark.parametrize("ep,tp,num_experts,message", BAD_LAYOUTS)
def test_bad_layout_fails_on_every_rank(ep, tp, num_experts, message):
    results = _bad_layouts_launch()
    refused = re.compile(r"^LayoutError: .*" + re.escape(message), re.MULTILINE)
    for r in results:
        assert r.returncode not in (0, None), describe(results)
        assert refused.search(r.stderr), describe(results)


@pytest.mark.slow
def test_dead_rank_fails_the_others_within_timeout():
    timeout_s = 20
    results = launch("dead_rank", 2, deadline_s=timeout_s + 40, timeout_s=timeout_s)
    dead, survivor = results[1], results[0]
    assert dead.returncode == 3, describe(results)
    assert survivor.returncode not in (0, None), describe(results)
    assert survivor.seconds < timeout_s + 15, describe(results)  # + process start-up
    assert "Error" in survivor.stderr, describe(results)


@pytest.mark.slow
def test_stalled_rank_fails_the_others_at_the_timeout():
    """A rank that is alive but never joins a collective: the others raise when the timeout expires."""
    results = launch("stalled_rank", 2, deadline_s=60, timeout_s=4, stall_s=12)
    survivor, stalled = results
    assert survivor.returncode not in (0, None), describe(results)
    assert survivor.seconds < stalled.seconds, describe(results)  # it did not wait for the stalled rank
    assert "Timed out" in survivor.stderr or "timeout" in survivor.stderr.lower(), describe(results)


def test_check_layout_messages():
    check_layout(8, 8, num_experts=32)
    check_layout(4, 2, num_experts=32)
    with pytest.raises(LayoutError, match=r"choose parallel.ep in \[1, 2, 4\]"):
        check_layout(4, 3, num_experts=32)
    with pytest.raises(LayoutError, match="tensor parallelism is not implemented"):
        check_layout(4, 1, tp=2)
    with pytest.raises(LayoutError, match="pipeline parallelism is not implemented"):
        check_layout(4, 1, pp=2)
    with pytest.raises(LayoutError, match="positive integer"):
        check_layout(4, 0)


def test_single_process_mesh(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    mesh = Mesh.from_env(ep=1, num_experts=8)
    assert (mesh.world_size, mesh.rank, mesh.ep, mesh.ep_rank, mesh.edp_size) == (1, 0, 1, 0, 1)
    with pytest.raises(LayoutError, match="torchrun --nproc_per_node"):
        Mesh.from_env(ep=2, num_experts=8)
    # Collectives are no-ops; the norm is the plain norm of the trainable gradients.
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    model[1].weight.requires_grad_(False)
    model(torch.ones(4, 3)).sum().backward()
    before = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    sync_gradients(model, mesh)
    assert all(torch.equal(a, p.grad) for a, p in zip(before, [p for p in model.parameters() if p.grad is not None]))
    expected = torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in before]))
    torch.testing.assert_close(global_grad_norm(model, mesh), expected)
    assert int(global_token_count(17, mesh)) == 17


def test_mesh_grid_coordinates():
    mesh = Mesh(world_size=8, rank=5, ep=4, device=torch.device("cpu"))
    assert (mesh.ep_rank, mesh.edp_rank, mesh.edp_size, mesh.world_size) == (1, 1, 2, 8)
    assert expert_range(mesh, 32) == range(8, 16)


def test_micro_batches_and_rank_slices():
    assert micro_batches_for(32, 2, 4) == 4
    assert micro_batches_for(8, 8, 1) == 1
    with pytest.raises(
        ValueError,
        match=r"not divisible by data.micro_batch_size=3 x world size 4 = 12; "
        r"choose data.micro_batch_size in \[1, 2, 4, 8\]",
    ):
        micro_batches_for(32, 3, 4)
    with pytest.raises(ValueError, match="multiple of the world size 8"):
        micro_batches_for(12, 1, 8)
    slices = [rank_slice(32, r, 4) for r in range(4)]
    assert [(s.start, s.stop) for s in slices] == [(0, 8), (8, 16), (16, 24), (24, 32)]
    with pytest.raises(ValueError, match="multiple of the world size"):
        rank_slice(10, 0, 4)
