"""Grouped GEMM over expert-sorted rows: y_e = a_e @ W[e] (+ b[e]) for every expert e.

One kernel, three epilogues:
- PLAIN:      out = acc + bias.
- SWIGLU:     acc + bias is the pre-activation h with interleaved gate/up columns; the tile holds
              matching gate and up columns, so the clamped SwiGLU runs in registers and the kernel
              writes the activation (half as wide) and, for the backward, optionally h itself.
- SWIGLU_BWD: acc is d(activation); the epilogue reads the saved h tile, writes dh with gate and
              up interleaved again, and optionally the recomputed activation (for the down-proj dW).
A rows can be gathered through an index (row r of the sorted order reads a[gather_idx[r]]), so
the permuted copy of the token tensor is never written. A low-rank term can join the accumulator
before any epilogue: acc += z_r @ L[e] with z [M, R] (R small, e.g. a LoRA rank; computed once per
row by the caller) and L [E, R, N], so an adapted projection costs no extra [M, N] buffer.
The weight may be MXFP4 (an Mxfp4Weight: uint8 blocks and scales as the checkpoint stores them): its tiles are
dequantized in registers inside the K loop (mxfp4_tile.py) and fed to the same tl.dot, in the forward
orientation (w[e] = dequant^T, K = inputs, a 32-group inside each BLOCK_K) or the dX one (a transposed view:
K = outputs, N = inputs, a 32-group inside each BLOCK_N).
The K loop (pointer, TMA and MXFP4 weight tiles) is in grouped_gemm_mainloop.py, the epilogues in
grouped_gemm_epilogue.py; the torch references in reference.py.
"""

import torch
import triton
import triton.language as tl

from gptoss_kernels import _runtime, gemm_configs, mxfp4_configs
from gptoss_kernels.gemm_configs import PLAIN, SWIGLU, SWIGLU_BWD  # noqa: F401  (the epilogues)
from gptoss_kernels.grouped_gemm_epilogue import tile_epilogue
from gptoss_kernels.grouped_gemm_mainloop import mainloop, tile_coords, tile_rows
from gptoss_kernels.mxfp4 import Mxfp4Weight
from gptoss_kernels.mxfp4_tile import mxfp4_strides

try:  # host-side TMA descriptors (Triton >= 3.4); without them the weight uses pointer loads
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover
    TensorDescriptor = None


@triton.jit
def _grouped_gemm_kernel(
    a_ptr,
    gather_ptr,
    w_ptr,
    w_desc,
    s_ptr,
    bias_ptr,
    out_ptr,
    pre_ptr,
    act_ptr,
    z_ptr,
    l_ptr,
    offsets_ptr,
    tile_expert_ptr,
    tile_row_ptr,
    num_tiles_ptr,
    max_tiles,
    N,
    K,
    R,
    alpha,
    limit,
    stride_am,
    stride_ak,
    stride_we,
    stride_wk,
    stride_wn,
    stride_qe,
    stride_qo,
    stride_qg,
    stride_qb,
    stride_se,
    stride_so,
    stride_sg,
    stride_be,
    stride_bn,
    stride_om,
    stride_on,
    stride_pm,
    stride_pn,
    stride_actm,
    stride_actn,
    stride_zm,
    stride_zr,
    stride_le,
    stride_lr,
    stride_ln,
    EPILOGUE: tl.constexpr,
    HAS_GATHER: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_LOW_RANK: tl.constexpr,
    BLOCK_R: tl.constexpr,
    STORE_PRE: tl.constexpr,
    STORE_ACT: tl.constexpr,
    EVEN_K: tl.constexpr,
    W_TMA: tl.constexpr,
    W_MXFP4: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    CLAMP_CLOSED: tl.constexpr,
    SUBTILES: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """One program per (m-tile, n-block) of the upper-bound grid; padding tiles exit at once."""
    tile, pid_n = tile_coords(tl.program_id(0), max_tiles, N, BLOCK_N, GROUP_M)
    expert = tl.load(tile_expert_ptr + tile)
    if expert < 0:  # padding tile past the real tile count
        return
    rows, row_mask = tile_rows(tile_row_ptr, offsets_ptr, tile, expert, BLOCK_M)
    acc = mainloop(
        a_ptr,
        gather_ptr,
        w_ptr,
        w_desc,
        s_ptr,
        rows,
        row_mask,
        pid_n,
        expert,
        N,
        K,
        stride_am,
        stride_ak,
        stride_we,
        stride_wk,
        stride_wn,
        stride_qe,
        stride_qo,
        stride_qg,
        stride_qb,
        stride_se,
        stride_so,
        stride_sg,
        HAS_GATHER,
        EVEN_K,
        W_TMA,
        W_MXFP4,
        DOT_PRECISION,
        BLOCK_M,
        BLOCK_N,
        BLOCK_K,
    )
    tile_epilogue(
        acc,
        rows,
        row_mask,
        pid_n,
        expert,
        N,
        R,
        alpha,
        limit,
        bias_ptr,
        out_ptr,
        pre_ptr,
        act_ptr,
        z_ptr,
        l_ptr,
        stride_be,
        stride_bn,
        stride_om,
        stride_on,
        stride_pm,
        stride_pn,
        stride_actm,
        stride_actn,
        stride_zm,
        stride_zr,
        stride_le,
        stride_lr,
        stride_ln,
        EPILOGUE,
        HAS_BIAS,
        HAS_LOW_RANK,
        BLOCK_R,
        STORE_PRE,
        STORE_ACT,
        DOT_PRECISION,
        CLAMP_CLOSED,
        SUBTILES,
        BLOCK_M,
        BLOCK_N,
    )


@triton.jit
def _grouped_gemm_persistent_kernel(
    a_ptr,
    gather_ptr,
    w_ptr,
    w_desc,
    s_ptr,
    bias_ptr,
    out_ptr,
    pre_ptr,
    act_ptr,
    z_ptr,
    l_ptr,
    offsets_ptr,
    tile_expert_ptr,
    tile_row_ptr,
    num_tiles_ptr,
    max_tiles,
    N,
    K,
    R,
    alpha,
    limit,
    stride_am,
    stride_ak,
    stride_we,
    stride_wk,
    stride_wn,
    stride_qe,
    stride_qo,
    stride_qg,
    stride_qb,
    stride_se,
    stride_so,
    stride_sg,
    stride_be,
    stride_bn,
    stride_om,
    stride_on,
    stride_pm,
    stride_pn,
    stride_actm,
    stride_actn,
    stride_zm,
    stride_zr,
    stride_le,
    stride_lr,
    stride_ln,
    EPILOGUE: tl.constexpr,
    HAS_GATHER: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_LOW_RANK: tl.constexpr,
    BLOCK_R: tl.constexpr,
    STORE_PRE: tl.constexpr,
    STORE_ACT: tl.constexpr,
    EVEN_K: tl.constexpr,
    W_TMA: tl.constexpr,
    W_MXFP4: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    CLAMP_CLOSED: tl.constexpr,
    SUBTILES: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """A fixed grid (about one program per SM) striding over the real tiles only: the tile count is
    read on the device (tile map), so padding costs nothing and no host sync sizes the loop.

    The tile loop and the K loop are flattened into one software-pipelined loop (flatten=True), so
    the next tile's first loads are in flight while this tile's epilogue runs. The epilogue finds
    its tile through its own counter (`done`), not through values carried over from the loads."""
    num_tiles = tl.load(num_tiles_ptr)
    # The launcher sends K == 0 to the other kernel. Knowing K > 0 spares the flattened loop a second,
    # unflattened copy for an empty K loop (whose epilogue would be compiled too, with scalar loads).
    tl.assume(K > 0)
    total = num_tiles * tl.cdiv(N, BLOCK_N)
    step = tl.num_programs(0)
    done = tl.program_id(0) - step
    for pid in tl.range(tl.program_id(0), total, step, flatten=True):
        tile, pid_n = tile_coords(pid, num_tiles, N, BLOCK_N, GROUP_M)
        expert = tl.load(tile_expert_ptr + tile)
        rows, row_mask = tile_rows(tile_row_ptr, offsets_ptr, tile, expert, BLOCK_M)
        acc = mainloop(
            a_ptr,
            gather_ptr,
            w_ptr,
            w_desc,
            s_ptr,
            rows,
            row_mask,
            pid_n,
            expert,
            N,
            K,
            stride_am,
            stride_ak,
            stride_we,
            stride_wk,
            stride_wn,
            stride_qe,
            stride_qo,
            stride_qg,
            stride_qb,
            stride_se,
            stride_so,
            stride_sg,
            HAS_GATHER,
            EVEN_K,
            W_TMA,
            W_MXFP4,
            DOT_PRECISION,
            BLOCK_M,
            BLOCK_N,
            BLOCK_K,
        )
        done += step
        tile_c, pid_n_c = tile_coords(done, num_tiles, N, BLOCK_N, GROUP_M)
        expert_c = tl.load(tile_expert_ptr + tile_c)
        rows_c, row_mask_c = tile_rows(tile_row_ptr, offsets_ptr, tile_c, expert_c, BLOCK_M)
        tile_epilogue(
            acc,
            rows_c,
            row_mask_c,
            pid_n_c,
            expert_c,
            N,
            R,
            alpha,
            limit,
            bias_ptr,
            out_ptr,
            pre_ptr,
            act_ptr,
            z_ptr,
            l_ptr,
            stride_be,
            stride_bn,
            stride_om,
            stride_on,
            stride_pm,
            stride_pn,
            stride_actm,
            stride_actn,
            stride_zm,
            stride_zr,
            stride_le,
            stride_lr,
            stride_ln,
            EPILOGUE,
            HAS_BIAS,
            HAS_LOW_RANK,
            BLOCK_R,
            STORE_PRE,
            STORE_ACT,
            DOT_PRECISION,
            CLAMP_CLOSED,
            SUBTILES,
            BLOCK_M,
            BLOCK_N,
        )


_NUM_SMS: dict[int, int] = {}
INTERPRETER_PROGRAMS = 3  # the persistent grid under the interpreter: few, so each program loops


def _num_programs(device: torch.device) -> int:
    """The persistent grid: one program per SM (CUDA), a few under the interpreter."""
    if device.type != "cuda":
        return INTERPRETER_PROGRAMS
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _NUM_SMS:
        _NUM_SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _NUM_SMS[index]


def _weight_descriptor(w, cfg: gemm_configs.TileConfig):
    """(W_TMA mode, host TMA descriptor) for the weight operand, or (0, None) where TMA cannot load it:
    no config asks for it, the Triton build has no host descriptors, or strides/alignment do not allow it."""
    if not cfg.tma or TensorDescriptor is None:
        return 0, None
    e, k, n = w.shape
    item = w.element_size()
    if w.data_ptr() % 16 or w.stride(0) * item % 16:
        return 0, None
    if w.stride(2) == 1 and w.stride(1) * item % 16 == 0:
        return 1, TensorDescriptor(w, [e, k, n], [w.stride(0), w.stride(1), 1], [1, cfg.block_k, cfg.block_n])
    if w.stride(1) == 1 and w.stride(2) * item % 16 == 0:  # a transposed view of a contiguous [E, N, K]
        return 2, TensorDescriptor(
            w.transpose(1, 2), [e, n, k], [w.stride(0), w.stride(2), 1], [1, cfg.block_n, cfg.block_k]
        )
    return 0, None


def _launch(
    a, layout, w, bias, out, *, gather_idx=None, epilogue=PLAIN, pre=None, act=None, alpha=0.0, limit=0.0, low_rank=None
):
    """Run the kernel; `w` is [E, K, N] (any strides, e.g. a transposed view) or an Mxfp4Weight standing for
    one (forward, or its transposed dX view); `low_rank`: (z [M, R], L [E, R, N]) added to the product before
    the epilogue, or None. The tile config comes from gemm_configs (forced, cached, autotuned on CUDA, or the
    heuristic default)."""
    if layout.max_tiles == 0:  # no rows at all
        return
    z, low = low_rank if low_rank is not None else (out, None)
    r = low.shape[1] if low is not None else 0
    n, k = w.shape[2], w.shape[1]
    mx = (2 if w.transposed else 1) if isinstance(w, Mxfp4Weight) else 0
    flags = dict(
        EPILOGUE=epilogue,
        HAS_GATHER=gather_idx is not None,
        HAS_BIAS=bias is not None,
        HAS_LOW_RANK=low is not None,
        BLOCK_R=max(16, _runtime.next_pow2(r)),
        W_MXFP4=mx,
        STORE_PRE=epilogue == SWIGLU and pre is not None,
        STORE_ACT=epilogue == SWIGLU_BWD and act is not None,
        DOT_PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
        CLAMP_CLOSED=epilogue == SWIGLU_BWD and _runtime.clamp_grad_at_bounds(),
    )
    # Unused pointers get `out`; constexpr flags keep the kernel from touching them.
    args = [
        a,
        gather_idx if gather_idx is not None else out,
        w.blocks if mx else w,
        None,
        w.scales if mx else out,
        bias if bias is not None else out,
        out,
        pre if pre is not None else out,
        act if act is not None else out,
        z,
        low if low is not None else out,
        layout.offsets,
        layout.tile_expert,
        layout.tile_row,
        layout.num_tiles,
        layout.max_tiles,
        n,
        k,
        r,
        alpha,
        limit,
        a.stride(0),
        a.stride(1),
        *((0, 0, 0) if mx else w.stride()),
        *(mxfp4_strides(w) if mx else (0,) * 7),
        *(bias.stride() if bias is not None else (0, 0)),
        out.stride(0),
        out.stride(1),
        *(pre.stride() if pre is not None else (0, 0)),
        *(act.stride() if act is not None else (0, 0)),
        *(z.stride() if low is not None else (0, 0)),
        *(low.stride() if low is not None else (0, 0, 0)),
    ]

    def run(cfg: gemm_configs.TileConfig):
        if mx:  # a whole 32-group of inputs per tile along K (forward) or N (dX); no TMA for packed bytes
            cfg = mxfp4_configs.fit(cfg, mx)
        w_tma, args[3] = _weight_descriptor(w, cfg) if not mx else (0, None)
        meta = dict(
            flags,
            EVEN_K=k % cfg.block_k == 0,
            W_TMA=w_tma,
            BLOCK_M=layout.block_m,
            SUBTILES=(mxfp4_configs if mx else gemm_configs).epilogue_subtiles(layout.block_m, cfg, epilogue),
            BLOCK_N=cfg.block_n,
            BLOCK_K=cfg.block_k,
            GROUP_M=cfg.group_m,
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )
        tiles = layout.max_tiles * triton.cdiv(n, cfg.block_n)
        if cfg.persistent and k > 0:  # (the persistent kernel assumes K > 0)
            _grouped_gemm_persistent_kernel[(min(_num_programs(a.device), tiles),)](*args, **meta)
        else:
            _grouped_gemm_kernel[(tiles,)](*args, **meta)

    if mx:
        cands = mxfp4_configs.candidates(layout.block_m, n, k, a.dtype, epilogue, mx)
    else:
        cands = gemm_configs.candidates(layout.block_m, n, k, a.dtype, epilogue)
    flag_key = "".join(
        str(int(flags[f])) for f in ("HAS_GATHER", "HAS_BIAS", "HAS_LOW_RANK", "STORE_PRE", "STORE_ACT", "W_MXFP4")
    )
    key = gemm_configs.bucket_key(layout.block_m, layout.num_rows, n, k, a.dtype, epilogue, flag_key)
    run(gemm_configs.choose(key, cands, a.device, run))


def grouped_matmul(a, layout, w, bias=None, *, gather_idx=None, low_rank=None):
    """out[r] = a[src(r)] @ w[e(r)] + bias[e(r)] (+ z[r] @ L[e(r)]); a [M or T, K], w [E, K, N] (or an Mxfp4Weight
    standing for one) -> out [M, N]."""
    out = _runtime.empty((layout.num_rows, w.shape[2]), a.dtype, a.device)
    _launch(a, layout, w, bias, out, gather_idx=gather_idx, low_rank=low_rank)
    return out


def grouped_matmul_swiglu(a, layout, w, bias, *, alpha, limit, gather_idx=None, keep_pre=False, low_rank=None):
    """act = swiglu(a @ w[e] + bias[e]); w [E, K, 2I] -> act [M, I], and h [M, 2I] if keep_pre."""
    m, two_i = layout.num_rows, w.shape[2]
    act = _runtime.empty((m, two_i // 2), a.dtype, a.device)
    pre = _runtime.empty((m, two_i), a.dtype, a.device) if keep_pre else None
    _launch(
        a,
        layout,
        w,
        bias,
        act,
        gather_idx=gather_idx,
        epilogue=SWIGLU,
        pre=pre,
        alpha=alpha,
        limit=limit,
        low_rank=low_rank,
    )
    return act, pre


def grouped_matmul_swiglu_bwd(d_out, layout, w_t, pre, *, alpha, limit, want_act, low_rank=None):
    """dh = swiglu'(h) * (d_out @ w_t[e]); w_t [E, H, I] -> dh [M, 2I], and act [M, I] if want_act."""
    m, i = layout.num_rows, w_t.shape[2]
    dh = _runtime.empty((m, 2 * i), d_out.dtype, d_out.device)
    act = _runtime.empty((m, i), d_out.dtype, d_out.device) if want_act else None
    _launch(
        d_out, layout, w_t, None, dh, epilogue=SWIGLU_BWD, pre=pre, act=act, alpha=alpha, limit=limit, low_rank=low_rank
    )
    return dh, act
