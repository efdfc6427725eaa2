"""expert_mlp_lora (LoRA accumulated inside the fused expert GEMMs) against the torch reference in fp64."""

import pytest
import torch
from kernel_cases import (
    GROUP_CASES,
    SMALL_BLOCKS,
    LaunchSpy,
    as_f64,
    assert_close,
    check_grads,
    counts_of,
    gather_for,
    needs_cuda,
    randn,
)

from gptoss_kernels import _runtime, grouped_gemm
from gptoss_kernels.moe_lora import expert_mlp_lora
from gptoss_kernels.reference import expert_mlp_lora_reference

H, I, R = 32, 24, 4  # w_gu [E, 32, 48], w_d [E, 24, 32]; adapters of rank 4 (padded to 16 in the kernel)
SCALING = 2.0
BASE = ("x", "w_gu", "b_gu", "w_d", "b_d")
ADAPTERS = ("a_gu", "bb_gu", "a_d", "bb_d")


def _inputs(sizes, dtype, gather, shared=False, trainable=BASE + ADAPTERS, adapted=("gate_up", "down")):
    m, e = sum(sizes), len(sizes)
    tokens = (m + 1) // 2
    lead = () if shared else (e,)
    shapes = {
        "x": (tokens if gather else m, H),
        "w_gu": (e, H, 2 * I),
        "b_gu": (e, 2 * I),
        "w_d": (e, I, H),
        "b_d": (e, H),
        "a_gu": (*lead, H, R),
        "bb_gu": (*lead, R, 2 * I),
        "a_d": (*lead, I, R),
        "bb_d": (*lead, R, H),
    }
    # A wide gate/up spread so that some pre-activations land beyond the +-7 clamps (fp32 only).
    scales = {
        "x": 1.0,
        "w_gu": 4 * H**-0.5,
        "b_gu": 1.0,
        "w_d": I**-0.5,
        "b_d": 1.0,
        "a_gu": H**-0.5,
        "bb_gu": 0.5,
        "a_d": I**-0.5,
        "bb_d": 0.5,
    }
    inputs = {n: randn(*s, scale=scales[n], dtype=dtype, grad=n in trainable) for n, s in shapes.items()}
    for proj, names in (("gate_up", ("a_gu", "bb_gu")), ("down", ("a_d", "bb_d"))):
        if proj not in adapted:
            for n in names:
                inputs[n] = None
    return inputs, gather_for(m, tokens, top_k=2) if gather else None


def _pairs(inputs, expand_to=None):
    def pair(a, b):
        if a is None:
            return None
        if expand_to is not None and a.dim() == 2:
            return a.expand(expand_to, *a.shape), b.expand(expand_to, *b.shape)
        return a, b

    return pair(inputs["a_gu"], inputs["bb_gu"]), pair(inputs["a_d"], inputs["bb_d"])


def _run(sizes, *, dtype=torch.float32, gather=False, shared=False, **kw):
    torch.manual_seed(0)
    inputs, gather_idx = _inputs(sizes, dtype, gather, shared, **kw)
    counts = counts_of(sizes)
    base = [inputs[n] for n in BASE]
    y = expert_mlp_lora(base[0], counts, *base[1:], *_pairs(inputs, len(sizes)), SCALING, gather_idx=gather_idx)
    ref = dict(zip(inputs, as_f64(inputs.values())))
    y_ref = expert_mlp_lora_reference(
        ref["x"],
        counts.cpu(),
        *[ref[n] for n in BASE[1:]],
        *_pairs(ref),
        SCALING,
        gather_idx=None if gather_idx is None else gather_idx.cpu(),
    )
    assert y.shape == (sum(sizes), H) and y.dtype == dtype
    assert_close(y, y_ref, dtype, "y")
    check_grads(y, inputs, y_ref, ref, dtype)


@pytest.mark.parametrize("case", ["uneven_with_empty", "empty_ends"])
@pytest.mark.parametrize("gather", [False, True])
def test_matches_reference(case, gather):
    with _runtime.force_blocks(**SMALL_BLOCKS):
        _run(GROUP_CASES[case], gather=gather)


def test_shared_adapter_as_expanded_views():
    with _runtime.force_blocks(**SMALL_BLOCKS):
        _run(GROUP_CASES["uneven_with_empty"], gather=True, shared=True)


@pytest.mark.parametrize("adapted", [("gate_up",), ("down",)])
def test_one_projection_adapted(adapted):
    with _runtime.force_blocks(**SMALL_BLOCKS):
        _run(GROUP_CASES["one_row_groups"], gather=True, adapted=adapted)


def test_frozen_base_as_in_lora_training(monkeypatch):
    # LoRA training: base frozen, adapters and x train. The adapter term rides in the main GEMMs:
    # the forward is 2 adapter GEMMs (N = r) + 2 adapted base GEMMs, no separate [M, 2I] / [M, H] product.
    spy = LaunchSpy(grouped_gemm._grouped_gemm_kernel)
    monkeypatch.setattr(grouped_gemm, "_grouped_gemm_kernel", spy)
    with _runtime.force_blocks(**SMALL_BLOCKS):
        _run(GROUP_CASES["uneven_with_empty"], gather=True, trainable=("x",) + ADAPTERS)
    forward = spy.launches[:4]
    assert [launch["HAS_LOW_RANK"] for launch in forward] == [False, True, False, True]


def test_fp16():
    with _runtime.force_blocks(**SMALL_BLOCKS):
        _run(GROUP_CASES["uneven_with_empty"], dtype=torch.float16, gather=True)


@needs_cuda
@pytest.mark.parametrize("gather", [False, True])
def test_bf16_gpu_production_tiles(gather):
    # >= 128 rows per expert: the 128-row tiles (wgmma on Hopper) that training uses.
    _run([130, 0, 257, 128], dtype=torch.bfloat16, gather=gather)


def test_bad_adapter_shape_raises():
    inputs, _ = _inputs([2, 3], torch.float32, False)
    counts = counts_of([2, 3])
    base = [inputs[n] for n in BASE]
    bad = (inputs["a_gu"][:, :-1], inputs["bb_gu"])
    with pytest.raises(ValueError, match="gate_up A must be"):
        expert_mlp_lora(base[0], counts, *base[1:], bad, None, SCALING)
