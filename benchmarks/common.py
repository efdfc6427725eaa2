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

    def __init__(self, name: str, args: argparse.Namespace):
        super().__init__()
        self._name, self._args = name, args

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
        write_json(self._name, self._args, {"partial": True, "results": list(self)}, quiet=True)


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


# ---------------------------------------------------------------------------- the GPU suite's summary
def _load(directory: Path, name: str, mode: str) -> dict | None:
    path = directory / f"{name}_{mode}.json"
    return json.loads(path.read_text()) if path.exists() else None


def suite_summary(directory: Path, mode: str = "full") -> list[dict]:
    """The headline figure of each benchmark JSON in `directory`, with its target where it has one.
    A benchmark whose JSON is missing (failed or timed-out step) is listed as such."""
    rows: list[dict] = []

    def add(bench, figure, value, fmt="", target=None, ok=None):
        rows.append({"benchmark": bench, "figure": figure, "value": _cell(value, fmt), "target": target or "",
                     "status": "" if ok is None or value is None else ("ok" if ok(value) else "MISS")})

    def section(name, file=None):
        report = _load(directory, file or name, mode)
        if report is None:
            add(name, f"no {file or name}_{mode}.json (step failed or timed out?)", None)
        return report

    if r := section("grouped_gemm"):
        fwd = {}  # (op, routing) -> method -> TFLOP/s of the forward GEMM
        for x in r["results"]:
            if x["op"].startswith("gemm") and x["passes"] == "fwd" and x.get("tflops"):
                fwd.setdefault((x["op"], x["routing"]), {})[x["method"]] = x["tflops"]
        for (op, routing), t in fwd.items():
            if routing != "uniform" or "triton" not in t:
                continue
            ours = t["triton"]
            add("grouped_gemm", f"{op} fwd: triton / dense", ours / t["dense"] if "dense" in t else None, ".0%",
                ">= 85%", lambda v: v >= 0.85)
            add("grouped_gemm", f"{op} fwd: triton x grouped_mm", ours / t["grouped_mm"] if "grouped_mm" in t else None,
                ".2f", ">= 1.3", lambda v: v >= 1.3)
            for variant in ("heuristic", "persistent", "tma"):  # A/B rows: > 1 = faster than the default's
                other = t.get(f"triton_{variant}")
                add("grouped_gemm", f"{op} fwd: triton_{variant} x triton", other / ours if other else None, ".2f")
        for x in r["results"]:
            if x["op"].startswith("expert_mlp") and x["passes"] == "fwd+bwd" and x["method"] == "grouped_mm":
                add("grouped_gemm", f"expert MLP fwd+bwd {x['routing']}: triton x grouped_mm", x["speedup_of_triton"],
                    ".3g")
    if r := section("moe_layer"):
        for routing, e in r["summary"].items():
            label = f"{routing} ({e['best_backend']})"
            add("moe_layer", f"{label}: fwd+bwd x hf eager", e["x_hf_eager_fwd_bwd"], ".2f", ">= 4", lambda v: v >= 4)
            add("moe_layer", f"{label}: fwd+bwd x hf best", e["x_hf_best_fwd_bwd"], ".2f", ">= 4", lambda v: v >= 4)
            add("moe_layer", f"{label}: expert GEMM share", e["experts_share_fwd_bwd"], ".0%", ">= 75%",
                lambda v: v >= 0.75)
    if r := section("attention"):
        for x in r["results"]:
            peak = _cell(x.get("fwd_bwd_peak_gib"), ".2f")
            add("attention", f"{x['layer']} {x['backend']} fwd+bwd ms (peak GiB {peak})", x.get("fwd_bwd_ms"), ".2f")
    if (r := _load(directory, "attention", "long")) is not None:
        for x in r["results"]:
            peak = _cell(x.get("fwd_bwd_peak_gib"), ".2f")
            add("attention_long", f"{x['seq']} {x['layer']} {x['backend']} fwd+bwd ms (peak GiB {peak})",
                x.get("fwd_bwd_ms"), ".2f")
    if mode == "full" and (r := _load(directory, "long_context", mode)) is not None:  # LONG=1 steps only
        for x in r["results"]:
            add("long_context", f"20b LoRA {x['seq']} tokens: peak GiB (tokens/s {_cell(x.get('tokens_per_s'), ',.0f')})",
                x.get("peak_gib"), ".1f", "< 76 (80 GB GPU)", lambda v: v < 76)
    if r := section("memory"):
        for layer, e in r["summary"].items():
            for key in (k for k in e if k.startswith("ratio_vs_")):
                target, ok = ("<= 0.5", lambda v: v <= 0.5) if layer == "moe" else (None, None)
                add("memory", f"{layer} saved B/token, {e['ours']} / {key[9:]}", e[key], ".2f", target, ok)
    step_reports = [r for f in ("train_step", "train_step_lora", "train_step_sft") if (r := _load(directory, f, mode))]
    if not step_reports:
        add("train_step", f"no train_step*_{mode}.json (step failed or timed out?)", None)
    for r in step_reports:
        for kind in ("lora", "sft"):
            if kind not in r or not r[kind]["rows"][0].get("tokens_per_s"):
                continue
            e, ours = r[kind], r[kind]["rows"][0]
            label = f"{kind} {e['layers']} layers"
            add("train_step", f"{label}: tokens/s", ours["tokens_per_s"], ",.0f")
            lora = kind == "lora"  # the targets are set for LoRA; SFT figures are for reference
            add("train_step", f"{label}: ours x {e.get('hf_best', 'transformers')}", e.get("x_hf_best"), ".2f",
                *((">= 3", lambda v: v >= 3) if lora else ()))
            add("train_step", f"{label}: MFU", ours.get("mfu"), ".1%",
                *((">= 35%", lambda v: v >= 0.35) if lora else ()))
            add("train_step", f"{label}: peak GiB", ours.get("peak_gib"), ".1f")
    if mode == "full" and (r := section("train_step_20b_lora_memory")):
        e = r["lora_20b"]
        add("train_step", "gpt-oss-20b LoRA seq 4096 peak GB (steady)", e.get("peak_gb"), ".1f", "< 60",
            lambda v: v < 60)
        add("train_step", "gpt-oss-20b LoRA seq 4096 peak GB (first step)", e.get("warmup_peak_gb"), ".1f", "< 60",
            lambda v: v < 60)
    if r := section("data"):
        add("data", f"packed stream tokens/s (seq {r['max_seq_len']})", r["results"]["pack"]["tokens_per_s"], ",.0f")
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Print the summary table of the benchmark JSONs in a folder.")
    parser.add_argument("directory", type=Path)
    parser.add_argument("--mode", default="full", choices=("full", "cpu"))
    summary_args = parser.parse_args()
    print_table(suite_summary(summary_args.directory, summary_args.mode),
                [("benchmark", "benchmark", ""), ("figure", "figure", ""), ("value", "value", ""),
                 ("target", "target", ""), ("status", "status", "")], title="summary")
