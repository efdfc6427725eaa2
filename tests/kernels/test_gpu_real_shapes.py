"""bf16 on a GPU at GPT-OSS-20B's expert shapes (H = I = 2880, 2I = 5760) with BLOCK_K = 128, so every
masked tail runs in bf16 with wgmma: K = 2880 = 22 x 128 + 64 (all GEMMs but dX, K = 5760 = 45 x 128), and
N = 2880 with 128-wide tiles = 22 x 128 + 64 (the down projection, dX, and the SwiGLU backward below).
The other kernel tests use K <= 256 and N <= 512, where no tail is this shape.

Cheap in compiles: one expert-MLP forward and backward (8 kernels) and one SwiGLU-backward tile (1 kernel).
Against the float64 references, computed on the GPU. Skipped without a GPU (marked `gpu`).
"""

import torch
from kernel_cases import as_f64, assert_close, check_grads, counts_of, gather_for, needs_cuda, randn

from gptoss_kernels import _runtime, gemm_configs
from gptoss_kernels.gemm_configs import TileConfig
from gptoss_kernels.grouped_gemm import grouped_matmul_swiglu_bwd
from gptoss_kernels.moe_experts import expert_mlp
from gptoss_kernels.reference import expert_mlp_reference, grouped_linear_reference, swiglu_reference
from gptoss_kernels.tile_map import build_layout, choose_block_m

H = I = 2880
SIZES = [300, 0, 129, 200]  # > 96 rows per expert: 128-row tiles; ragged row tails and an empty expert
ALPHA, LIMIT = 1.702, 7.0


@needs_cuda
def test_expert_mlp_at_gpt_oss_shapes_with_k_tails():
    torch.manual_seed(0)
    m, e = sum(SIZES), len(SIZES)
    assert choose_block_m(m, e) == 128
    tokens = (m + 1) // 2
    names = ("x", "w_gu", "b_gu", "w_d", "b_d")
    shapes = ((tokens, H), (e, H, 2 * I), (e, 2 * I), (e, I, H), (e, H))
    scales = (1.0, H**-0.5, 1.0, I**-0.5, 1.0)  # pre-activations of order 1: inside the clamps (bf16)
    inputs = {n: randn(*s, scale=c, dtype=torch.bfloat16) for n, s, c in zip(names, shapes, scales)}
    gather_idx = gather_for(m, tokens, top_k=2)
    counts = counts_of(SIZES)
    gemm_configs.reset()  # so used() below lists this test's launches only
    with _runtime.force_blocks(block_k=128):  # the heuristic tiles with 128-deep K steps
        y = expert_mlp(inputs["x"], counts, inputs["w_gu"], inputs["b_gu"], inputs["w_d"], inputs["b_d"],
                       alpha=ALPHA, limit=LIMIT, gather_idx=gather_idx)
        ref_inputs = dict(zip(inputs, as_f64(inputs.values())))
        y_ref = expert_mlp_reference(ref_inputs["x"], counts.cpu(), ref_inputs["w_gu"], ref_inputs["b_gu"],
                                     ref_inputs["w_d"], ref_inputs["b_d"], alpha=ALPHA, limit=LIMIT,
                                     gather_idx=gather_idx)
        assert_close(y, y_ref, torch.bfloat16, "y")
        check_grads(y, inputs, y_ref, ref_inputs, torch.bfloat16)
    used = gemm_configs.used()
    assert used and all("k128" in name for name in used.values()), used


@needs_cuda
def test_swiglu_backward_tile_with_n_and_k_tails():
    # A 128-wide SwiGLU-backward tile over I = 2880 columns ends in a 64-column tail; K = H = 2880 in a
    # 64-deep tail of its 128-deep steps.
    torch.manual_seed(0)
    m = sum(SIZES)
    layout = build_layout(counts_of(SIZES), m, 128)
    dy = randn(m, H, dtype=torch.bfloat16, grad=False)
    w_d = randn(len(SIZES), I, H, scale=I**-0.5, dtype=torch.bfloat16, grad=False)
    pre = randn(m, 2 * I, dtype=torch.bfloat16, grad=False)
    with gemm_configs.use_config(TileConfig(128, 128, 8, 3)):
        dh, act = grouped_matmul_swiglu_bwd(dy, layout, w_d.transpose(1, 2), pre, alpha=ALPHA, limit=LIMIT,
                                            want_act=True)
    d_act = grouped_linear_reference(dy.double(), torch.tensor(SIZES), w_d.transpose(1, 2).double())
    h = pre.double().requires_grad_()
    act_ref = swiglu_reference(h, ALPHA, LIMIT)
    (dh_ref,) = torch.autograd.grad(act_ref, h, d_act)
    assert_close(dh, dh_ref, torch.bfloat16, "dh")
    assert_close(act, act_ref, torch.bfloat16, "act")
