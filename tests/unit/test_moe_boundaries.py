"""The MoE block's boundaries: backend objects, dispatcher metadata, expert parallelism applied from
outside, and expert weight casts not kept for the backward."""

import dataclasses
import gc
import inspect
import weakref
from types import SimpleNamespace

import pytest
import torch

from engine.models.gpt_oss import GptOssConfig, GptOssForCausalLM, ModelOptions
from engine.moe import experts as experts_mod
from engine.moe.alltoall import AllToAllDispatcher
from engine.moe.backends import LoopBackend, experts_backend
from engine.moe.dispatch import permute
from engine.moe.experts import GroupedExperts
from engine.moe.layer import MoEBlock
from engine.parallel.parallelize import apply_expert_parallel


def test_no_parallel_fields_in_the_model():
    assert not {"ep_size", "ep_rank"} & {f.name for f in dataclasses.fields(ModelOptions)}
    assert not {"ep_size", "ep_rank"} & set(inspect.signature(MoEBlock).parameters)


def test_backend_choice_is_an_object_and_bad_names_are_refused():
    assert experts_backend("auto").for_device(torch.device("cpu")).name == "loop"
    assert experts_backend("grouped_mm").name == "grouped_mm"
    with pytest.raises(ValueError, match=r"model.experts_backend='fast' is not one of"):
        experts_backend("fast")


def test_token_rows_from_the_permutation_equal_a_sort():
    # combine reads each token's rows off the permutation's inverse instead of sorting again
    gen = torch.Generator().manual_seed(0)
    indices = torch.stack([torch.randperm(8, generator=gen)[:3] for _ in range(11)])  # [N=11, k=3]
    perm = permute(indices, 8)
    rows, starts = perm.token_rows()
    for t in range(11):
        mine = rows[starts[t] : starts[t + 1]]
        assert torch.equal(perm.token_of_row[mine], torch.full((3,), t))
        assert sorted(mine.tolist()) == torch.nonzero(perm.token_of_row == t).flatten().tolist()


def test_expert_parallel_is_applied_from_outside_on_meta():
    cfg = GptOssConfig.tiny(num_hidden_layers=2)
    with torch.device("meta"):
        model = GptOssForCausalLM(cfg)
    mesh = SimpleNamespace(ep=2, ep_rank=1, ep_group=None)
    assert apply_expert_parallel(model, SimpleNamespace(ep=1, ep_rank=0, ep_group=None)) == 0
    assert apply_expert_parallel(model, mesh) == 2
    e = cfg.num_local_experts // 2
    for block in model.moe_blocks():
        assert isinstance(block.dispatcher, AllToAllDispatcher)
        assert (block.experts.expert_offset, block.experts.num_experts) == (e, e)
        assert block.experts.gate_up_proj.shape[0] == e and block.experts.gate_up_proj.is_meta
    assert apply_expert_parallel(model, mesh) == 2  # the slice already held is kept
    with pytest.raises(ValueError, match="already a slice"):
        apply_expert_parallel(model, SimpleNamespace(ep=4, ep_rank=0, ep_group=None))


def _experts():
    torch.manual_seed(0)
    ex = GroupedExperts(3, 16, 8, alpha=1.702, limit=7.0, backend=LoopBackend())
    with torch.no_grad():
        for p in ex.parameters():
            p.normal_(0, 0.3)
    return ex


def test_autocast_casts_are_not_kept_for_the_backward(monkeypatch):
    counts = torch.tensor([3, 0, 4])
    x = torch.randn(7, 16)
    cot = torch.randn(7, 16)

    def grads(ex):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = ex(x, counts)
        gc.collect()
        alive = [r for r in casts if r() is not None]
        torch.autograd.backward(y.float(), cot)
        return [p.grad.clone() for p in ex.parameters()], alive

    casts = []
    original = experts_mod.compute_weights

    def spy(module, x):
        x, weights = original(module, x)
        casts.extend(weakref.ref(w) for w in weights)
        return x, weights

    monkeypatch.setattr(experts_mod, "compute_weights", spy)
    got, alive = grads(_experts())
    assert len(casts) == 4 and not alive, "a bf16 copy of an expert weight outlived the forward"
    casts.clear()
    keep = lambda module, weights: torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)  # noqa: E731
    monkeypatch.setattr(experts_mod, "recast_in_backward", keep)
    want, alive = grads(_experts())
    assert alive  # without the recast, autograd keeps the copies: the check above can fail
    for g, w in zip(got, want):
        assert g.dtype == torch.float32 and torch.equal(g, w)
