"""Every Hopper tile config the autotuner may pick (with its persistent-grid and TMA variants) against an
fp64 torch reference, and the autotuner's choice, caching and switches.

Under the interpreter warps and stages do nothing, so configs differing only in those are tested once;
sm90_aot.py --all-configs compiles each of them for Hopper (tests/kernels/test_sm90_compile.py).
"""

import dataclasses
import json

import pytest
import torch
from kernel_cases import assert_close, counts_of, gather_for, needs_cuda, randn

from gptoss_kernels import _runtime, gemm_configs, grouped_gemm
from gptoss_kernels.gemm_configs import SWIGLU_BWD, TileConfig
from gptoss_kernels.grouped_gemm import grouped_matmul, grouped_matmul_swiglu, grouped_matmul_swiglu_bwd
from gptoss_kernels.reference import grouped_linear_reference, swiglu_reference
from gptoss_kernels.tile_map import build_layout

ALPHA, LIMIT = 1.702, 7.0
K = 80  # a K tail for every BLOCK_K (64, 128): pointer loads mask it, TMA zero-fills it


def _interpreted_configs():
    """(block_m, 'fwd' | 'bwd', config) for every distinct tile shape of the table, times the variants."""
    seen, out = set(), []
    for (block_m, kind), table in sorted(gemm_configs._HOPPER.items()):
        for c in table:
            for persistent in (False, True):
                for tma in (False, True):
                    v = dataclasses.replace(c, num_warps=4, num_stages=3, persistent=persistent, tma=tma)
                    if (block_m, kind, v) not in seen:
                        seen.add((block_m, kind, v))
                        out.append(pytest.param(block_m, kind, v, id=f"bm{block_m}-{kind}-{v.name}"))
    return out


def _sizes(block_m):
    """Empty experts, a ragged tail, a one-row group and several full tiles of one expert."""
    return [block_m + 5, 0, 1, 2 * block_m + 3, 0]


def _ref_rows(x, sizes, w, gather_idx=None):
    return grouped_linear_reference(
        x.double().cpu(),
        torch.tensor(sizes),
        w.double().cpu(),
        gather_idx=None if gather_idx is None else gather_idx.cpu(),
    )


@pytest.mark.skipif(
    torch.cuda.is_available(),
    reason="fp32 interpreter check of every config; on a GPU "
    "test_bf16_gpu_candidates checks them in bf16 (fp32 tiles this large overflow shared memory)",
)
@pytest.mark.parametrize("block_m,kind,config", _interpreted_configs())
def test_config_matches_reference(block_m, kind, config):
    torch.manual_seed(0)
    sizes = _sizes(block_m)
    m, e = sum(sizes), len(sizes)
    layout = build_layout(counts_of(sizes), m, block_m)
    n = config.block_n + 24  # a second, partial n-block
    with gemm_configs.use_config(config):
        if kind == "fwd":
            # PLAIN with gather, bias and a low-rank term; the weight both plain and a transposed view
            # (the dx GEMM's layout, TMA mode 2).
            tokens = m // 2 + 1
            x, gather_idx = randn(tokens, K, grad=False), gather_for(m, tokens)
            w, b = randn(e, K, n, scale=K**-0.5, grad=False), randn(e, n, grad=False)
            z, low = randn(m, 4, grad=False), randn(e, 4, n, grad=False)
            y = grouped_matmul(x, layout, w, b, gather_idx=gather_idx, low_rank=(z, low))
            want = _ref_rows(x, sizes, w, gather_idx) + _ref_rows(z, sizes, low)
            want += torch.repeat_interleave(b.double().cpu(), torch.tensor(sizes), dim=0)
            assert_close(y, want, torch.float32, "plain")
            w_t = randn(e, n, K, scale=K**-0.5, grad=False).transpose(1, 2)  # [E, K, N], K contiguous
            x2 = randn(m, K, grad=False)
            assert_close(grouped_matmul(x2, layout, w_t), _ref_rows(x2, sizes, w_t), torch.float32, "transposed w")
            # SWIGLU with the pre-activation kept: N = 2I interleaved gate/up columns.
            x3 = randn(m, K, grad=False)
            w_gu = randn(e, K, n, scale=4 * K**-0.5, grad=False)
            act, pre = grouped_matmul_swiglu(x3, layout, w_gu, b, alpha=ALPHA, limit=LIMIT, keep_pre=True)
            h = _ref_rows(x3, sizes, w_gu) + torch.repeat_interleave(b.double().cpu(), torch.tensor(sizes), dim=0)
            assert_close(pre, h, torch.float32, "h")
            assert_close(act, swiglu_reference(h, ALPHA, LIMIT), torch.float32, "act")
        else:
            # SWIGLU_BWD as the expert MLP's backward runs it: dy [M, H] times a transposed w_d view.
            inter = n
            dy = randn(m, K, grad=False)
            w_d = randn(e, inter, K, scale=inter**-0.5, grad=False)
            pre = randn(m, 2 * inter, scale=4.0, grad=False)
            dh, act = grouped_matmul_swiglu_bwd(
                dy, layout, w_d.transpose(1, 2), pre, alpha=ALPHA, limit=LIMIT, want_act=True
            )
            d_act = _ref_rows(dy, sizes, w_d.transpose(1, 2))
            h = pre.detach().double().cpu().requires_grad_()
            act_ref = swiglu_reference(h, ALPHA, LIMIT)
            (dh_ref,) = torch.autograd.grad(act_ref, h, d_act)
            assert_close(dh, dh_ref, torch.float32, "dh")
            assert_close(act, act_ref, torch.float32, "act")


def test_persistent_grid_loops_over_tiles(monkeypatch):
    # Fewer programs than tiles (each loops), and exactly the real tiles are visited: the poisoned
    # output would keep a NaN for any tile skipped, and padding tiles must not be touched.
    monkeypatch.setattr(grouped_gemm, "INTERPRETER_PROGRAMS", 2)
    sizes = [0, 40, 0, 17, 1, 0, 33]
    m = sum(sizes)
    layout = build_layout(counts_of(sizes), m, 16)
    assert layout.max_tiles > layout.num_tiles.item() > 2
    x, w = randn(m, K, grad=False), randn(len(sizes), K, 40, grad=False)
    with gemm_configs.use_config(TileConfig(16, 32, 4, 3, persistent=True)):
        y = grouped_matmul(x, layout, w)
    assert_close(y, _ref_rows(x, sizes, w), torch.float32, "y")


def test_candidates_cover_every_bucket():
    for block_m in (16, 32, 64, 128):
        for epilogue in (0, 1, SWIGLU_BWD):
            cands = gemm_configs.candidates(block_m, 5760, 2880, torch.bfloat16, epilogue)
            assert cands[0] == gemm_configs.heuristic(block_m, 5760, 2880, torch.bfloat16, epilogue)
            assert 2 <= len(cands) == len(set(cands)) <= 5
            assert not any(c.persistent or c.tma for c in cands), "variants are opt-in"
    # A LoRA-sized N shrinks every candidate's tile; fp32 (tests) has just the default.
    assert {c.block_n for c in gemm_configs.candidates(128, 16, 2880, torch.bfloat16, 0)} == {16}
    assert len(gemm_configs.candidates(128, 5760, 2880, torch.float32, 0)) == 1


@pytest.fixture
def tuner(monkeypatch, tmp_path):
    """The autotuner as on a GPU, with fake timings: candidate i takes times[i] ms."""
    monkeypatch.setenv("GPTOSS_KERNEL_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(gemm_configs, "_can_tune", lambda device: True)
    monkeypatch.setattr(gemm_configs, "_device_tag", lambda device: "Fake GPU|triton x")
    monkeypatch.setitem(gemm_configs._state, "autotune", True)
    gemm_configs.reset()
    calls = []

    def fake_measure(launch, config):
        launch(config)  # the real launch, so every candidate also really runs
        calls.append(config.name)
        return {0: 3.0, 1: 1.0}.get(len(calls) - 1, 2.0)

    monkeypatch.setattr(gemm_configs, "measure", fake_measure)
    yield calls
    gemm_configs.reset()


def _fp16_problem():
    torch.manual_seed(0)
    sizes = [70, 0, 3, 57]
    x, w = randn(sum(sizes), K, dtype=torch.float16, grad=False), randn(4, K, 48, dtype=torch.float16, grad=False)
    layout = build_layout(counts_of(sizes), sum(sizes), 64)
    return x, w, layout, _ref_rows(x, sizes, w)


def test_autotune_picks_the_fastest_and_caches_it(tuner, tmp_path):
    x, w, layout, want = _fp16_problem()
    cands = gemm_configs.candidates(64, 48, K, torch.float16, 0)
    y = grouped_matmul(x, layout, w)  # tunes: every candidate runs once, the 2nd is "fastest"
    assert tuner == [c.name for c in cands]
    assert_close(y, want, torch.float16, "y after tuning")
    assert list(gemm_configs.used().values()) == [cands[1].name]
    grouped_matmul(x, layout, w)  # settled in this process: no more timing
    assert len(tuner) == len(cands)
    with gemm_configs.settings(autotune=False):  # off means the default, whatever was tuned
        grouped_matmul(x, layout, w)
    assert list(gemm_configs.used().values()) == [cands[0].name]
    saved = json.loads((tmp_path / "gemm_configs.json").read_text())
    assert list(saved["Fake GPU|triton x"].values()) == [cands[1].name]
    gemm_configs.reset()  # a new process: the file answers, nothing is timed
    assert_close(grouped_matmul(x, layout, w), want, torch.float16, "y from the cache")
    assert len(tuner) == len(cands) and list(gemm_configs.used().values()) == [cands[1].name]


def test_autotune_off_forced_and_unreadable_cache(tuner, tmp_path, monkeypatch):
    x, w, layout, want = _fp16_problem()
    default = gemm_configs.candidates(64, 48, K, torch.float16, 0)[0]
    gemm_configs.set_autotune(False)
    try:
        assert_close(grouped_matmul(x, layout, w), want, torch.float16, "y")
    finally:
        gemm_configs.set_autotune(True)
    assert tuner == [] and list(gemm_configs.used().values()) == [default.name]
    with _runtime.force_blocks(block_n=16):  # the tests' small tiles win over tuning
        grouped_matmul(x, layout, w)
    assert tuner == [] and list(gemm_configs.used().values())[0].startswith("n16")
    (tmp_path / "gemm_configs.json").write_text("{not json")
    grouped_matmul(x, layout, w)  # an unreadable cache means tuning again, then a good file
    assert len(tuner) > 1
    assert json.loads((tmp_path / "gemm_configs.json").read_text())


def test_no_disk_cache_when_disabled(tuner, tmp_path, monkeypatch):
    monkeypatch.setenv("GPTOSS_KERNEL_CACHE_DIR", "")
    x, w, layout, want = _fp16_problem()
    assert_close(grouped_matmul(x, layout, w), want, torch.float16, "y")
    assert gemm_configs.cache_path() is None and list(tmp_path.iterdir()) == []


@needs_cuda
@pytest.mark.parametrize("epilogue", [0, 1, SWIGLU_BWD])
def test_bf16_gpu_candidates(epilogue):
    # On a GPU: every Hopper candidate of the 128-row bucket in bf16 (wgmma), the plain and SwiGLU
    # epilogues and the SwiGLU backward, plus the persistent and TMA variants of the default (those
    # with the weight both plain and transposed: TMA's two descriptor layouts).
    torch.manual_seed(0)
    sizes = [130, 0, 257, 128, 200]
    m, e, k, n = sum(sizes), len(sizes), 256, 512
    layout = build_layout(counts_of(sizes), m, 128)
    x = randn(m, k, dtype=torch.bfloat16, grad=False)
    w = randn(e, k, n, scale=k**-0.5, dtype=torch.bfloat16, grad=False)
    h = _ref_rows(x.float(), sizes, w.float())
    if epilogue == SWIGLU_BWD:
        pre = randn(m, 2 * n, scale=4.0, dtype=torch.bfloat16, grad=False)
        leaf = pre.double().cpu().requires_grad_()
        (dh_ref,) = torch.autograd.grad(swiglu_reference(leaf, ALPHA, LIMIT), leaf, h)
    cands = gemm_configs.candidates(128, n, k, torch.bfloat16, epilogue)
    variants = [
        v
        for v in (dataclasses.replace(cands[0], persistent=True), dataclasses.replace(cands[0], tma=True))
        if gemm_configs._sm90_safe(128, epilogue, v)
    ]
    w_t = w.transpose(1, 2).contiguous().transpose(1, 2)  # K contiguous, as the dX GEMMs' weights
    for c in cands + variants:  # the transposed weight only for the variants: compiles cost suite time
        for name, weight in (("w", w), ("w^T", w_t))[: 2 if c.persistent or c.tma else 1]:
            with gemm_configs.use_config(c):
                if epilogue == 0:
                    assert_close(grouped_matmul(x, layout, weight), h, torch.bfloat16, f"{c.name} {name}")
                elif epilogue == 1:
                    act, _ = grouped_matmul_swiglu(x, layout, weight, None, alpha=ALPHA, limit=LIMIT)
                    assert_close(act, swiglu_reference(h, ALPHA, LIMIT), torch.bfloat16, f"{c.name} {name}")
                else:  # weight is w_d^T, [E, H, I]; the saved pre-activation is [M, 2I]
                    dh, _ = grouped_matmul_swiglu_bwd(x, layout, weight, pre, alpha=ALPHA, limit=LIMIT, want_act=False)
                    assert_close(dh, dh_ref, torch.bfloat16, f"{c.name} {name}")


@needs_cuda
def test_bf16_gpu_real_autotune(monkeypatch, tmp_path):
    # The real timing path (CUDA events): every candidate runs, one is kept, the result is right.
    monkeypatch.setenv("GPTOSS_KERNEL_CACHE_DIR", str(tmp_path))
    monkeypatch.setitem(gemm_configs._state, "autotune", True)
    gemm_configs.reset()
    try:
        torch.manual_seed(0)
        sizes = [300, 0, 129, 257]
        m, k, n = sum(sizes), 256, 384
        layout = build_layout(counts_of(sizes), m, 128)
        x = randn(m, k, dtype=torch.bfloat16, grad=False)
        w = randn(len(sizes), k, n, scale=k**-0.5, dtype=torch.bfloat16, grad=False)
        assert_close(grouped_matmul(x, layout, w), _ref_rows(x.float(), sizes, w.float()), torch.bfloat16, "y")
        (entry,) = gemm_configs.tuned_log
        assert len(entry["ms"]) > 1 and all(ms > 0 for ms in entry["ms"].values())
        assert json.loads((tmp_path / "gemm_configs.json").read_text())
    finally:
        gemm_configs.reset()
