"""Tile configs of the grouped GEMM: a small Hopper candidate set per shape bucket, and its autotuner.

BLOCK_M is not tuned here: it comes from the tile map (rows per expert, tile_map.choose_block_m),
which every GEMM of one MoE layer shares. A bucket is (epilogue, BLOCK_M, kernel flags, dtype, and
the power-of-two buckets of M, N and K); each bucket has 1-5 candidates for the other knobs
(BLOCK_N, BLOCK_K, GROUP_M, warps, stages, persistent grid), the first being the heuristic default.

With autotuning on (GPTOSS_KERNEL_AUTOTUNE=1 or set_autotune(True); off by default until the GPU
suite has timed it, so runs are deterministic), on CUDA the first launch in a bucket times every candidate on the real arguments (every epilogue
only writes its outputs, so running it again is harmless) and keeps the fastest: in this process
and, unless disabled, in a JSON file keyed by GPU name and Triton version
(~/.cache/gptoss-engine/gemm_configs.json, or $GPTOSS_KERNEL_CACHE_DIR). Under the interpreter, while
a CUDA graph is captured, with `force_blocks` / `use_config`, or with autotuning off (the default)
the heuristic config is used: deterministic, no timing.
The persistent grid (GPTOSS_KERNEL_PERSISTENT=1) and TMA weight loads (GPTOSS_KERNEL_TMA=1), or
set_variants(...), add their variants to the candidates and the default: opt-in, because they are
checked in the interpreter and compiled for sm_90 but not yet timed on a GPU.
Every candidate is tested in tests/kernels/test_gemm_configs.py and compiled by tests/kernels/sm90_aot.py,
which holds each to the occupancy it is designed for (designed_ctas_per_sm: two CTAs per SM where the
pipelines fit and the accumulator leaves room, one for persistent grids and wide tiles).
"""

import contextlib
import dataclasses
import json
import os
import statistics
from pathlib import Path
from typing import Callable

import torch

from gptoss_kernels import _runtime

PLAIN, SWIGLU, SWIGLU_BWD = 0, 1, 2  # the epilogues of grouped_gemm (re-exported there)


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """The launch knobs of one grouped-GEMM kernel, apart from BLOCK_M (the layout's)."""

    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    group_m: int = 8  # m-tiles that sweep the n-blocks together, so their weight tiles stay in L2
    persistent: bool = False  # one program per SM looping over tiles, instead of one per tile
    tma: bool = False  # weight tiles through a TMA descriptor where strides allow (else pointer loads)

    @property
    def name(self) -> str:
        return (f"n{self.block_n}k{self.block_k}w{self.num_warps}s{self.num_stages}g{self.group_m}"
                + ("-persistent" if self.persistent else "") + ("-tma" if self.tma else ""))


# Hopper (bf16/fp16) candidates per (BLOCK_M, epilogue kind), after the heuristic default. The SwiGLU
# backward epilogue holds gate, up and d(act) tiles at once, so its tiles are narrower. Shared memory
# per stage is (BLOCK_M + BLOCK_N) * BLOCK_K * 2 bytes: all fit 227 KiB; the few that spill registers
# in some epilogue or variant are dropped by _sm90_safe (found by sm90_aot.py --all-configs).
_HOPPER = {
    (128, "fwd"): (TileConfig(128, 64, 8, 3), TileConfig(128, 64, 8, 4), TileConfig(256, 64, 8, 3),
                   TileConfig(256, 64, 8, 4), TileConfig(128, 64, 8, 4, group_m=16)),
    (128, "bwd"): (TileConfig(64, 64, 8, 4), TileConfig(64, 64, 8, 3), TileConfig(64, 128, 8, 3),
                   TileConfig(128, 64, 8, 3)),
    (64, "fwd"): (TileConfig(128, 64, 4, 4), TileConfig(128, 64, 4, 3), TileConfig(256, 64, 8, 3),
                  TileConfig(64, 64, 4, 4)),
    (64, "bwd"): (TileConfig(64, 64, 8, 4), TileConfig(64, 64, 4, 3), TileConfig(64, 128, 8, 3)),
    (32, "fwd"): (TileConfig(128, 64, 4, 4), TileConfig(64, 128, 4, 4), TileConfig(256, 64, 4, 3)),
    (32, "bwd"): (TileConfig(64, 64, 4, 4), TileConfig(64, 128, 4, 3)),
    (16, "fwd"): (TileConfig(128, 64, 4, 4), TileConfig(64, 128, 4, 4), TileConfig(256, 64, 4, 3)),
    (16, "bwd"): (TileConfig(64, 64, 4, 4), TileConfig(64, 128, 4, 3)),
}

_state = {"autotune": os.environ.get("GPTOSS_KERNEL_AUTOTUNE", "0") == "1",
          "persistent": os.environ.get("GPTOSS_KERNEL_PERSISTENT", "0") == "1",
          "tma": os.environ.get("GPTOSS_KERNEL_TMA", "0") == "1"}
_forced: list[TileConfig] = []
_chosen: dict[str, TileConfig] = {}  # bucket key -> the config autotuning settled on
_used: dict[str, str] = {}  # bucket key -> name of the config its last launch used
_disk: dict | None = None  # the JSON cache file's content, read once
tuned_log: list[dict] = []  # one entry per autotuned bucket: key, times per candidate, choice


def set_autotune(enabled: bool) -> None:
    """Turn autotuning on CUDA on or off for this process (off: the deterministic default config)."""
    _state["autotune"] = bool(enabled)


def set_variants(*, persistent: bool | None = None, tma: bool | None = None) -> None:
    """Add (or drop) the persistent-grid and TMA-weight variants of every candidate; the default config
    then uses them too. Both are opt-in until timed on a GPU. (They are part of the bucket key, so
    choices made with other settings stay valid.)"""
    for name, value in (("persistent", persistent), ("tma", tma)):
        if value is not None:
            _state[name] = bool(value)


@contextlib.contextmanager
def settings(*, autotune: bool | None = None, persistent: bool | None = None, tma: bool | None = None):
    """set_autotune / set_variants for the duration of a block (benchmarks compare them side by side)."""
    previous = dict(_state)
    if autotune is not None:
        set_autotune(autotune)
    set_variants(persistent=persistent, tma=tma)
    try:
        yield
    finally:
        _state.update(previous)


@contextlib.contextmanager
def use_config(config: TileConfig):
    """Launch every grouped GEMM in this block with `config` (tests, benchmarks); no autotuning."""
    _forced.append(config)
    try:
        yield
    finally:
        _forced.pop()


def _fit(c: TileConfig, n: int, k: int) -> TileConfig:
    """Shrink a candidate's N and K tiles to a small problem (e.g. a LoRA rank of 16)."""
    return dataclasses.replace(c, block_n=min(c.block_n, max(16, _runtime.next_pow2(n))),
                               block_k=min(c.block_k, max(16, _runtime.next_pow2(k))))


def heuristic(block_m: int, n: int, k: int, dtype: torch.dtype, epilogue: int) -> TileConfig:
    """The default config (deterministic; what runs without autotuning)."""
    wide = 128 if epilogue != SWIGLU_BWD else 64  # the bwd epilogue also holds gate and up tiles
    block_n = min(wide, max(16, _runtime.next_pow2(n)))
    # fp32 tiles take twice the shared memory per stage; they only run in tests.
    block_k = min(64 if dtype.itemsize == 2 else 32, max(16, _runtime.next_pow2(k)))
    big = block_m * block_n >= 128 * 128
    # The bwd epilogue holds h, gate, up and d(act) tiles at once: at 8 warps (in 32-column slices) it
    # stays under 128 registers per thread, so two CTAs share an SM (designed_ctas_per_sm).
    heavy = epilogue == SWIGLU_BWD and block_m >= 64
    config = TileConfig(block_n, block_k, 8 if big or heavy else 4, 3 if big else 4,
                        persistent=_state["persistent"], tma=_state["tma"])
    return _sm90_safe(block_m, epilogue, config) or dataclasses.replace(config, persistent=False)


def epilogue_subtiles(block_m: int, c: TileConfig, epilogue: int) -> int:
    """How many column slices the epilogue walks one after the other (1, 2 or 4): fewer live registers.

    The SwiGLU epilogues hold several fp32 tiles besides the accumulator (gate, up, their gradients, the
    activation), so they go by 32-column slices (up to 4; 16-column ones for the backward from 64 rows up,
    which also holds the h slice: at 128x64 and 8 warps, 80 registers per thread instead of 95 in
    32-column slices and 255 with spills unsliced, sm_90 compile with Triton 3.8; fewer rows keep
    32 columns, so each thread still reads h in 16-byte pieces); the plain one only splits 256-wide tiles."""
    if epilogue == PLAIN:
        return 2 if c.block_n >= 256 else 1
    width = 16 if epilogue == SWIGLU_BWD and block_m >= 64 else 32
    return max(1, min(4, c.block_n // width))


SM90_REGISTERS = 64 * 1024  # 32-bit registers per SM (H100, H200)
SM90_SHARED = 228 * 1024  # shared memory per SM; each resident CTA also takes 1 KiB of it


def designed_ctas_per_sm(block_m: int, c: TileConfig, epilogue: int, itemsize: int = 2) -> int:
    """The occupancy a config is designed for (the sm_90 compile test holds each kernel to it).

    Persistent grids launch one program per SM: 1. Otherwise 2 where two CTAs' pipelines fit the SM's
    shared memory and the fp32 accumulator leaves room in 128 registers per thread at 8 warps (at most
    64 accumulator registers per thread; 32 for the SwiGLU backward, whose epilogue also holds the
    h tile): while one CTA runs its epilogue, the other keeps the tensor cores busy."""
    if c.persistent:
        return 1
    smem = c.num_stages * (block_m + c.block_n) * c.block_k * itemsize
    acc_regs = block_m * c.block_n // (32 * c.num_warps)
    budget = 32 if epilogue == SWIGLU_BWD else 64
    return 2 if 2 * (smem + 1024) <= SM90_SHARED and acc_regs <= budget else 1


def register_ceiling(ctas: int, num_warps: int) -> int:
    """Registers per thread that still let `ctas` CTAs of `num_warps` warps share an SM (allocated in
    steps of 8 per thread, at most 255)."""
    return min(255, SM90_REGISTERS // (ctas * num_warps * 32) // 8 * 8)


def _sm90_safe(block_m: int, epilogue: int, c: TileConfig) -> TileConfig | None:
    """`c`, or None where sm90_aot.py --all-configs found register spills: the persistent SwiGLU forward
    with 128 x 256 tiles (its 128 accumulator registers per thread, plus the next tile's loads in flight
    during the epilogue, pass 255)."""
    if c.persistent and block_m >= 128 and epilogue == SWIGLU and c.block_n > 128:
        return None
    return c


def candidates(block_m: int, n: int, k: int, dtype: torch.dtype, epilogue: int) -> list[TileConfig]:
    """The configs worth timing for this bucket, the heuristic default first; fp32 (tests) gets only it."""
    memo_key = (block_m, n, k, dtype, epilogue, _state["persistent"], _state["tma"])
    if memo_key not in _candidates_memo:  # launches are hot: build each list once
        _candidates_memo[memo_key] = _candidates(block_m, n, k, dtype, epilogue)
    return _candidates_memo[memo_key]


_candidates_memo: dict[tuple, list[TileConfig]] = {}


def _candidates(block_m, n, k, dtype, epilogue) -> list[TileConfig]:
    out = [heuristic(block_m, n, k, dtype, epilogue)]
    if dtype.itemsize != 2:
        return out
    table = _HOPPER.get((block_m, "bwd" if epilogue == SWIGLU_BWD else "fwd"), ())
    for name in ("persistent", "tma"):  # the variant first: the default uses it too
        if _state[name]:
            table = tuple(dataclasses.replace(c, **{name: True}) for c in table) + table
    for c in table:
        c = _sm90_safe(block_m, epilogue, _fit(c, n, k))
        if c is not None and c not in out:
            out.append(c)
    return out


def bucket_key(block_m: int, m: int, n: int, k: int, dtype: torch.dtype, epilogue: int, flags: str) -> str:
    """Problems in one bucket share a config: M, N, K are rounded up to powers of two."""
    p2 = _runtime.next_pow2
    variants = f"p{int(_state['persistent'])}t{int(_state['tma'])}"
    return f"e{epilogue}|bm{block_m}|m{p2(m)}|n{p2(n)}|k{p2(k)}|{str(dtype).removeprefix('torch.')}|{flags}|{variants}"


def _forced_blocks_config(default: TileConfig) -> TileConfig:
    return dataclasses.replace(default, block_n=_runtime.block("block_n", default.block_n),
                               block_k=_runtime.block("block_k", default.block_k))


def choose(key: str, cands: list[TileConfig], device: torch.device,
           launch: Callable[[TileConfig], None]) -> TileConfig:
    """The config for this launch: forced, cached, autotuned (CUDA) or the default, in that order."""
    config = _choose(key, cands, device, launch)
    _used[key] = config.name
    return config


def _choose(key, cands, device, launch) -> TileConfig:
    if _forced:
        return _forced[-1]
    if _runtime.forced_any("block_n", "block_k"):
        return _forced_blocks_config(cands[0])
    if not _state["autotune"] or len(cands) == 1:
        return cands[0]  # the deterministic default, even where a tuned choice exists
    if key in _chosen:
        return _chosen[key]  # (also while a CUDA graph is captured)
    if not _can_tune(device):
        return cands[0]  # not remembered: on a GPU, a later launch may still tune this bucket
    by_name = {c.name: c for c in cands}
    cached = _read_disk().get(_device_tag(device), {}).get(key)
    if cached in by_name:
        _chosen[key] = by_name[cached]
        return _chosen[key]
    times = {c.name: measure(launch, c) for c in cands}
    best = min(cands, key=lambda c: times[c.name])
    _chosen[key] = best
    tuned_log.append(dict(key=key, ms=times, chosen=best.name))
    _write_disk(_device_tag(device), key, best.name)
    return best


def _can_tune(device: torch.device) -> bool:
    """Timing needs a GPU, and must not run while a CUDA graph is being captured."""
    return device.type == "cuda" and not torch.cuda.is_current_stream_capturing()


def measure(launch: Callable[[TileConfig], None], config: TileConfig, reps: int = 5) -> float:
    """Median ms of `reps` launches after one warm-up (which also compiles); CUDA events, no L2 flush
    (a flush buffer could push a nearly full GPU out of memory mid-training)."""
    launch(config)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        launch(config)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _device_tag(device: torch.device) -> str:
    import triton

    return f"{torch.cuda.get_device_name(device)}|triton {triton.__version__}"


def cache_path() -> Path | None:
    """The JSON cache file, or None when GPTOSS_KERNEL_CACHE_DIR is set to an empty string."""
    folder = os.environ.get("GPTOSS_KERNEL_CACHE_DIR", str(Path.home() / ".cache" / "gptoss-engine"))
    return Path(folder) / "gemm_configs.json" if folder else None


def _read_disk() -> dict:
    global _disk
    if _disk is None:
        path = cache_path()
        try:
            _disk = json.loads(path.read_text()) if path is not None and path.exists() else {}
        except (OSError, ValueError):
            _disk = {}  # an unreadable cache is only a lost speed-up: tune again, then rewrite it
        if not isinstance(_disk, dict) or not all(isinstance(v, dict) for v in _disk.values()):
            _disk = {}
    return _disk


def _write_disk(tag: str, key: str, name: str) -> None:
    """Merge one choice into the file (re-read first: other processes may have added theirs)."""
    global _disk
    path = cache_path()
    _read_disk().setdefault(tag, {})[key] = name
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            current = json.loads(path.read_text())
            if not isinstance(current.get(tag, {}), dict):
                raise ValueError(tag)
        except (OSError, ValueError, AttributeError):
            current = {}  # missing or unreadable: start it again
        current.setdefault(tag, {})[key] = name
        tmp = path.with_suffix(f".{os.getpid()}.part")
        tmp.write_text(json.dumps(current, indent=1, sort_keys=True))
        tmp.replace(path)
        _disk = current
    except (OSError, ValueError):
        pass  # a read-only home: the in-process choice still holds


def reset() -> None:
    """Forget every choice made in this process and the cache file's content read so far (tests)."""
    global _disk
    _chosen.clear()
    _used.clear()
    tuned_log.clear()
    _disk = None


def used() -> dict[str, str]:
    """Bucket key -> the config name its last launch used (benchmarks report it)."""
    return dict(_used)
