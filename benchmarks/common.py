"""What every benchmark script shares: the --cpu / full-GPU mode switch, the environment header,
timing, peak memory, random weights made on the device, JSON output and the printed table.

Each script imports this first: it puts the repository root on sys.path, so the scripts run as
`python benchmarks/bench_x.py` and import `engine.models`, `engine.moe`, `engine.peft` and
`gptoss_kernels` directly (never `engine.train`, which needs Hydra: the GPU machine has none).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import zlib
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

GIB = 2**30


def parse_args(parser: argparse.ArgumentParser, argv=None, *, needs_cuda: bool = True) -> argparse.Namespace:
    """Add --cpu, parse, and refuse the full mode without a GPU (its shapes would take hours on CPU)."""
    parser.add_argument("--cpu", action="store_true", help="small shapes on CPU: a smoke run of seconds")
    args = parser.parse_args(argv)
    if not args.cpu and needs_cuda and not torch.cuda.is_available():
        sys.exit(f"{parser.prog}: the full mode measures GPT-OSS-20B shapes on a CUDA GPU and none is visible "
                 f"(torch {torch.__version__}); run it with --cpu for the small CPU mode")
    args.mode = "cpu" if args.cpu else "full"
    if args.cpu:
        # CPU runs share a few cores with other work: one intra-op thread measured 10x steadier
        # than two fighting over two busy cores (CPU figures are only a proxy anyway).
        torch.set_num_threads(1)
    args.device = torch.device("cuda" if not args.cpu and torch.cuda.is_available() else "cpu")
    return args


def _version(package: str) -> str | None:
    """The installed version, from the package's metadata (one that fails to import still has one; only
    an absent package is None)."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores visible)"
    except OSError:
        pass
    return f"{platform.processor() or 'cpu'} ({os.cpu_count()} cores visible)"


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None  # the GPU machine gets a copy of the tree, maybe without .git


def environment(device: torch.device) -> dict:
    """Which machine and software a figure came from (written into every JSON)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return {"device": name, "torch": torch.__version__, "triton": _version("triton"),
            "transformers": _version("transformers"), "peft": _version("peft"), "python": platform.python_version(),
            "commit": _git_commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device: torch.device, *, warmup: int = 2, iters: int = 5) -> float:
    """Median milliseconds per call of fn after `warmup` calls (compilation, autotuning, caches).

    On GPU each call is bracketed by CUDA events, so only device time between them counts and the
    host may run ahead; on CPU it is wall time."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    if device.type == "cuda":
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_memory_gib(fn, device: torch.device) -> dict | None:
    """Run fn once; its peak allocated memory (GiB) and the part above what was allocated before it.
    None on CPU (no allocator statistics there)."""
    if device.type != "cuda":
        fn()
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    peak = torch.cuda.max_memory_allocated(device)
    return {"peak_gib": peak / GIB, "above_start_gib": (peak - before) / GIB}


def free_memory(device: torch.device) -> None:
    """Return what the last measurement left behind, so the next one starts from the same floor."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def attempt(fn):
    """(result, None) or (None, "Type: message"): one failing measurement (an implementation the
    installed transformers lacks, an OOM) is recorded in the JSON and the others go on."""
    try:
        return fn(), None
    except Exception as err:  # noqa: BLE001 - whatever it is, it goes into the report
        error = f"{type(err).__name__}: {err}"[:400]
    # Past the except block the traceback is gone, and with it the frames holding the failed
    # attempt's model and activations: only now can their memory be given back.
    free_memory(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    return None, error


@torch.no_grad()
def random_init_(module: torch.nn.Module, seed: int, std: float = 0.02) -> None:
    """Random weights drawn on the parameters' own device in their own dtype (the CPU init of
    `init_weights` would take minutes at 20B). Each parameter's generator is seeded from its name,
    so two models with the same parameter names (ours and transformers') get identical weights.
    Norms are 1, biases 0 except the router's (its bias steers routing; see bench_moe_layer)."""
    for name, p in module.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        elif name.endswith("bias") and "router" not in name:
            p.zero_()
        else:
            gen = torch.Generator(device=p.device)
            gen.manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            p.normal_(0.0, std, generator=gen)


def ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num and den else None


def out_dir() -> Path:
    path = Path(os.environ.get("OUT") or ROOT / "benchmarks" / "results")
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_json(name: str, args: argparse.Namespace, payload: dict, quiet: bool = False) -> Path:
    """$OUT/<name>_<mode>.json (else benchmarks/results/): the environment header plus payload."""
    report = {"benchmark": name, "mode": args.mode, **environment(args.device), **payload}
    path = out_dir() / f"{name}_{args.mode}.json"
    tmp = path.with_suffix(".json.part")
    tmp.write_text(json.dumps(report, indent=1, default=str))
    tmp.replace(path)  # atomic: a step killed mid-write leaves the previous complete JSON
    if not quiet:
        print(f"wrote {path}")
    return path


class LiveRows(list):
    """A benchmark's result rows that rewrite its JSON (marked partial) after every append, so a step
    killed by its time limit still leaves every figure it measured; the final write_json replaces it."""

    def __init__(self, name: str, args: argparse.Namespace, **extra):
        super().__init__()
        self._name, self._args, self._extra = name, args, extra  # extra: written beside the rows

    def append(self, row) -> None:
        super().append(row)
        self._flush()

    def extend(self, rows) -> None:
        super().extend(rows)
        self._flush()

    def __iadd__(self, rows):
        self.extend(rows)
        return self

    def _flush(self) -> None:
        write_json(self._name, self._args, {"partial": True, **self._extra, "results": list(self)}, quiet=True)


def _cell(value, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, fmt) if fmt else str(value)


def print_table(rows: list[dict], columns: list[tuple[str, str, str]], title: str | None = None) -> None:
    """columns: (key, header, format spec); a missing or None value prints as '-'."""
    cells = [[_cell(r.get(key), fmt) for key, _, fmt in columns] for r in rows]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, (_, h, _) in enumerate(columns)]
    if title:
        print(f"\n{title}")

    def line(values):  # text columns (no format spec) left-aligned, numbers right-aligned
        return "  ".join(v.ljust(w) if not fmt else v.rjust(w) for v, w, (_, _, fmt) in zip(values, widths, columns))

    print(line([h for _, h, _ in columns]).rstrip())
    for c in cells:
        print(line(c).rstrip())
