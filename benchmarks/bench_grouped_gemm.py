"""Grouped-GEMM expert kernels vs torch._grouped_mm vs a per-expert loop vs one dense matmul.

    python benchmarks/bench_grouped_gemm.py          # GPU, GPT-OSS-20B shapes (bf16)
    python benchmarks/bench_grouped_gemm.py --cpu    # seconds-long smoke run, Triton interpreter

Full mode: 16k tokens x top-4 over 32 experts (65536 expert rows), the two expert GEMMs
(K 2880 -> N 5760 gate/up, K 2880 -> N 2880 down), uniform and skewed routing (some experts hot,
some empty), forward and forward+backward; our GEMM as the library runs it (autotuned on a GPU),
with the heuristic config, and (forward only) its persistent-grid and TMA-weight variants; then
the whole expert MLP (fused gather + SwiGLU epilogue) against the same math composed from
torch._grouped_mm, with trainable and frozen
weights; then the two GEMMs with MXFP4 weights (the checkpoint's packed experts, dequantized in the K loop),
forward and dX, beside bf16 weights holding the same values (uniform routing); then scatter_combine against
index_add. Prints a table and the tile config each bucket
ran with (and the autotuner's timings), and writes every figure as JSON to $OUT (if set) or
benchmarks/results/ (`tile_configs` in the header).
"""

import argparse
import datetime
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
FULL = dict(tokens=16384, top_k=4, experts=32, hidden=2880, width=2880, dtype=torch.bfloat16)
SMALL = dict(tokens=48, top_k=2, experts=4, hidden=32, width=32, dtype=torch.float32)


def route(tokens, top_k, experts, skewed, device):
    """Expert choices per token -> (gather_idx [M] token of each sorted row, counts [E])."""
    if skewed:  # Zipf-like popularity; the last quarter of the experts are never picked
        popularity = 1.0 / torch.arange(1, experts + 1, dtype=torch.float32) ** 1.2
        popularity[experts - experts // 4 :] = 0
    else:
        popularity = torch.ones(experts)
    choice = torch.multinomial(popularity.expand(tokens, experts), top_k)  # [T, k] distinct experts
    order = torch.argsort(choice.flatten(), stable=True)
    counts = torch.bincount(choice.flatten(), minlength=experts)
    return (order // top_k).to(device), counts.to(device=device, dtype=torch.int32)


def timer(device):
    """ms per call: triton's do_bench (CUDA events, warm-up, median) on GPU, wall clock on CPU."""
    if device == "cuda":
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")

    def wall(fn):
        fn()  # warm-up: the interpreter rewrites each kernel once
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3

    return wall


def with_backward(fwd, inputs):
    """Forward then backward into every input that requires grad (no .grad accumulation)."""
    leaves = [t for t in inputs if t.requires_grad]

    def run():
        y = fwd()
        torch.autograd.grad(y, leaves, torch.ones_like(y))

    return run


def gemm_methods(kernels, x, counts, w, counts_host):
    """Same product x_e @ w[e], four ways. Dense: one [M, K] @ [K, N] matmul, the same FLOPs."""
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    splits = counts_host

    def loop():
        return torch.cat([xe @ w[e] for e, xe in enumerate(x.split(splits)) if splits[e]])

    w0 = w[0].detach().clone().requires_grad_(w.requires_grad)
    settings = kernels["gemm_settings"]

    def triton(**variant):  # the same op with the tile-config machinery set one way for the call
        def run():
            with settings(**variant):
                return kernels["grouped_linear"](x, counts, w)

        return run

    return {
        "triton": triton(),  # the library's setting: autotuned on a GPU with --autotune (the suite's)
        "triton_heuristic": triton(autotune=False),
        "triton_persistent": triton(autotune=False, persistent=True),  # the heuristic's tiles, persistent grid
        "triton_tma": triton(autotune=False, tma=True),  # the heuristic's tiles, weight tiles through TMA
        "grouped_mm": lambda: torch._grouped_mm(x, w, offs=offs),
        "loop": loop,
        "dense": lambda: x @ w0,
    }, w0


FWD_ONLY = {"triton_persistent", "triton_tma"}  # A/B rows of one variant: the forward is enough


CHECK_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}  # max |out - ref| / max |ref|, ref in fp32


def check_methods(results, methods: dict, reference, dtype, **key) -> set:
    """Compare each method's output with `reference()` (fp32) before anything is timed; one entry per
    method in the JSON's `checks`. Returns the methods that may be timed: a wrong result, or one that raised,
    is not timed (its check carries the error; the summary lists it as FAILED)."""
    with torch.no_grad():
        ref = reference().float()
        scale = ref.abs().max().clamp(min=1e-12)
        passed = set()
        for method, fn in methods.items():
            try:
                err = float((fn().float() - ref).abs().max() / scale)
                error = None if err <= CHECK_TOL[dtype] else f"result off by {err:.2e} of max |ref|: not timed"
            except Exception as exc:  # e.g. torch._grouped_mm missing on this build
                err, error = None, f"raised {type(exc).__name__}: {exc}"[:300]
            ok = error is None  # (NaN fails the tolerance too)
            results.checks.append(dict(key, method=method, max_rel_err=err, **({} if ok else {"error": error})))
            if not ok:
                print(f"!!! {key} {method}: {results.checks[-1]['error']}")
            if ok:
                passed.add(method)
    return passed


def run_gemms(kernels, cfg, device, bench, results):
    m = cfg["tokens"] * cfg["top_k"]
    for routing in ("uniform", "skewed"):
        _, counts = route(cfg["tokens"], cfg["top_k"], cfg["experts"], routing == "skewed", device)
        counts_host = counts.tolist()
        for name, k, n in (("gate_up", cfg["hidden"], 2 * cfg["width"]), ("down", cfg["width"], cfg["hidden"])):
            x = torch.randn(m, k, device=device, dtype=cfg["dtype"], requires_grad=True)
            w = (torch.randn(cfg["experts"], k, n, device=device) * k**-0.5).to(cfg["dtype"]).requires_grad_()
            methods, w0 = gemm_methods(kernels, x, counts, w, counts_host)
            op = f"gemm {name} {k}x{n}"
            grouped = {k_: v for k_, v in methods.items() if k_ != "dense"}  # dense: same FLOPs, not the same product
            ref = lambda: torch.cat([xe.float() @ w[e].float() for e, xe in enumerate(x.split(counts_host))])  # noqa: E731
            ok = check_methods(results, grouped, ref, cfg["dtype"], op=op, routing=routing) | {"dense"}
            for passes, flops in (("fwd", 2 * m * k * n), ("fwd+bwd", 6 * m * k * n)):
                for method, fwd in methods.items():
                    if method not in ok or (passes != "fwd" and method in FWD_ONLY):
                        continue
                    fn = fwd if passes == "fwd" else with_backward(fwd, [x, w0 if method == "dense" else w])
                    record(results, bench, fn, flops, op=op, routing=routing, passes=passes, method=method)


def run_expert_mlp(kernels, cfg, device, bench, results):
    t, e, h, i = cfg["tokens"], cfg["experts"], cfg["hidden"], cfg["width"]
    m = t * cfg["top_k"]
    swiglu = kernels["swiglu_reference"]
    for routing in ("uniform", "skewed"):
        gather_idx, counts = route(t, cfg["top_k"], e, routing == "skewed", device)
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
        for frozen in (False, True):

            def param(*shape, scale):
                p = (torch.randn(*shape, device=device) * scale).to(cfg["dtype"])
                return p.requires_grad_(not frozen)

            x = torch.randn(t, h, device=device, dtype=cfg["dtype"], requires_grad=True)
            w_gu, b_gu = param(e, h, 2 * i, scale=h**-0.5), param(e, 2 * i, scale=0.1)
            w_d, b_d = param(e, i, h, scale=i**-0.5), param(e, h, scale=0.1)
            rows = torch.repeat_interleave(torch.arange(e, device=device), counts, output_size=m)

            def composed():  # what the model would run without our kernels
                xs = x.index_select(0, gather_idx)
                act = swiglu(torch._grouped_mm(xs, w_gu, offs=offs) + b_gu[rows])
                return torch._grouped_mm(act, w_d, offs=offs) + b_d[rows]

            methods = {
                "triton": lambda: kernels["expert_mlp"](x, counts, w_gu, b_gu, w_d, b_d, gather_idx=gather_idx),
                "grouped_mm": composed,
            }
            inputs = [x, w_gu, b_gu, w_d, b_d]
            op = f"expert_mlp H{h} I{i}"

            def reference():  # the same composition in fp32
                xs = x.float().index_select(0, gather_idx)
                act = swiglu(torch._grouped_mm(xs, w_gu.float(), offs=offs) + b_gu.float()[rows])
                return torch._grouped_mm(act, w_d.float(), offs=offs) + b_d.float()[rows]

            ok = (
                check_methods(results, methods, reference, cfg["dtype"], op=op, routing=routing)
                if not frozen
                else set(methods)
            )  # the frozen variant's forward is the same computation, checked above
            fwd_flops = 6 * m * h * i
            grads = ("fwd+bwd frozen W", 2 * fwd_flops) if frozen else ("fwd+bwd", 3 * fwd_flops)
            for passes, flops in (("fwd", fwd_flops), grads):
                if frozen and passes == "fwd":
                    continue  # the forward does not depend on whether weights are frozen
                for method, fwd in methods.items():
                    if method not in ok:
                        continue
                    fn = fwd if passes == "fwd" else with_backward(fwd, inputs)
                    record(results, bench, fn, flops, op=op, routing=routing, passes=passes, method=method)


def mxfp4_weight(experts, n_out, n_in, device):
    """(blocks, scales) of a random MXFP4 weight, as a checkpoint stores it ((out, in), 32 inputs a group):
    every code, scales giving values of about 1/sqrt(n_in) (random codes have an rms of ~3.2)."""
    e = round(math.log2(n_in**-0.5 / 3.2)) + 127
    blocks = torch.randint(0, 256, (experts, n_out, n_in // 32, 16), dtype=torch.uint8, device=device)
    return blocks, torch.randint(e - 1, e + 1, (experts, n_out, n_in // 32), dtype=torch.uint8, device=device)


def run_mxfp4_gemms(kernels, cfg, device, bench, results):
    """x @ W (forward) and dy @ W^T (dX) with W in MXFP4, beside the same products on bf16 weights holding the
    same (dequantized) values; each checked against fp32 products of those values before timing."""
    m, e, deq = cfg["tokens"] * cfg["top_k"], cfg["experts"], kernels["dequantize_mxfp4"]
    _, counts = route(cfg["tokens"], cfg["top_k"], e, False, device)
    counts_host, offs = counts.tolist(), torch.cumsum(counts, 0, dtype=torch.int32)
    for name, n_in, n_out in (("gate_up", cfg["hidden"], 2 * cfg["width"]), ("down", cfg["width"], cfg["hidden"])):
        packed = kernels["Mxfp4Weight"](*mxfp4_weight(e, n_out, n_in, device))
        w = torch.stack([deq(packed.blocks[i], packed.scales[i], cfg["dtype"]).t() for i in range(e)])  # [E, in, out]
        for passes, a_width in (("fwd", n_in), ("dX", n_out)):
            if passes == "dX":  # the transposed orientation: K = outputs, N = inputs (the groups run along N)
                packed, w = packed.transpose(1, 2), w.transpose(1, 2)
            a = torch.randn(m, a_width, device=device, dtype=cfg["dtype"])
            methods = {
                "triton": lambda: kernels["grouped_linear"](a, counts, w),
                "triton_mxfp4": lambda: kernels["grouped_linear"](a, counts, packed),
                "grouped_mm": lambda: torch._grouped_mm(a, w, offs=offs),
            }
            ref = lambda: torch.cat([ae.float() @ w[i].float() for i, ae in enumerate(a.split(counts_host))])  # noqa: E731
            op = f"mxfp4 {name} {n_in}x{n_out}"  # the forward's K x N, for both passes
            ok = check_methods(results, methods, ref, cfg["dtype"], op=op, routing="uniform", passes=passes)
            for method in (m_ for m_ in methods if m_ in ok):
                record(
                    results,
                    bench,
                    methods[method],
                    2 * m * n_in * n_out,
                    op=op,
                    routing="uniform",
                    passes=passes,
                    method=method,
                )


def run_combine(kernels, cfg, device, bench, results):
    t, h = cfg["tokens"], cfg["hidden"]
    gather_idx, _ = route(t, cfg["top_k"], cfg["experts"], False, device)
    y = torch.randn(gather_idx.numel(), h, device=device, dtype=cfg["dtype"], requires_grad=True)
    w = torch.rand(gather_idx.numel(), device=device, requires_grad=True)
    methods = {
        "triton": lambda: kernels["scatter_combine"](y, gather_idx, w, t),
        "index_add": lambda: kernels["scatter_combine_reference"](y, gather_idx, w, t),
    }
    for passes in ("fwd", "fwd+bwd"):
        for method, fwd in methods.items():
            fn = fwd if passes == "fwd" else with_backward(fwd, [y, w])
            record(results, bench, fn, 0, op=f"scatter_combine H{h}", routing="uniform", passes=passes, method=method)


def record(results, bench, fn, flops, **key):
    try:
        ms = bench(fn)
        results.append(dict(key, ms=ms, tflops=flops / ms / 1e9 if flops else None))
    except Exception as err:  # e.g. torch._grouped_mm missing on this build: note it, go on
        results.append(dict(key, ms=None, tflops=None, error=f"{type(err).__name__}: {err}"[:300]))


def add_ratios(results):
    """ratio = our time-based speed over each other method's, per (op, routing, passes)."""
    by_key = {}
    for r in results:
        by_key.setdefault((r["op"], r["routing"], r["passes"]), {})[r["method"]] = r["ms"]
    for r in results:
        ours = by_key[(r["op"], r["routing"], r["passes"])].get("triton")
        r["speedup_of_triton"] = ours and r["ms"] and r["ms"] / ours


def print_table(results):
    print(f"{'op':28s} {'routing':8s} {'passes':17s} {'method':17s} {'ms':>9s} {'TFLOP/s':>8s} {'triton x':>8s}")
    for r in results:
        ms = f"{r['ms']:9.3f}" if r["ms"] else f"{'n/a':>9s}"
        tf = f"{r['tflops']:8.1f}" if r["tflops"] else f"{'':8s}"
        sp = f"{r['speedup_of_triton']:8.2f}" if r["speedup_of_triton"] else f"{'':8s}"
        print(
            f"{r['op']:28s} {r['routing']:8s} {r['passes']:17s} {r['method']:17s} {ms} {tf} {sp}"
            + (f"  {r['error']}" if "error" in r else "")
        )
    print("triton x = that method's time / triton's time (> 1: triton is faster)")


def print_configs(configs):
    """Which tile config each grouped-GEMM bucket ran with, and the autotuner's timings (ms) where it tuned."""
    print("tile configs (bucket: epilogue|BLOCK_M|M|N|K|dtype|gather,bias,low-rank,pre,act,mxfp4|persistent,tma):")
    for key, name in configs["used"].items():
        print(f"  {key}: {name}")
    for entry in configs["tuned"]:
        times = ", ".join(f"{n} {ms:.3f}" for n, ms in entry["ms"].items())
        print(f"  tuned {entry['key']}: {entry['chosen']} ({times})")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="tiny shapes on CPU under the Triton interpreter")
    parser.add_argument(
        "--autotune",
        action="store_true",
        help="the library's row autotunes the tile configs "
        "(gemm_configs.configure(autotune=True), the trainer's kernels.autotune=true)",
    )
    args = parser.parse_args(argv)
    if args.cpu:
        os.environ["TRITON_INTERPRET"] = "1"
    elif not torch.cuda.is_available():
        sys.exit("no GPU: run with --cpu for the interpreter smoke run")
    # Imported only now: TRITON_INTERPRET must be set before the kernels are defined.
    sys.path.insert(0, str(ROOT))
    import triton

    from gptoss_kernels import gemm_configs
    from gptoss_kernels.grouped_linear import grouped_linear
    from gptoss_kernels.moe_experts import expert_mlp
    from gptoss_kernels.mxfp4 import Mxfp4Weight
    from gptoss_kernels.reference import dequantize_mxfp4, scatter_combine_reference, swiglu_reference
    from gptoss_kernels.scatter_combine import scatter_combine

    gemm_configs.configure(autotune=args.autotune)
    kernels = dict(
        grouped_linear=grouped_linear,
        expert_mlp=expert_mlp,
        scatter_combine=scatter_combine,
        gemm_settings=gemm_configs.settings,
        Mxfp4Weight=Mxfp4Weight,
        dequantize_mxfp4=dequantize_mxfp4,
        scatter_combine_reference=scatter_combine_reference,
        swiglu_reference=swiglu_reference,
    )
    cfg, device = (SMALL, "cpu") if args.cpu else (FULL, "cuda")
    device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu (Triton interpreter)"
    header = dict(
        benchmark="grouped_gemm",
        mode="cpu" if args.cpu else "full",
        device=device_name,
        torch=torch.__version__,
        triton=triton.__version__,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        shapes={k: str(v) if k == "dtype" else v for k, v in cfg.items()},
    )
    out_dir = Path(os.environ.get("OUT") or ROOT / "benchmarks" / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"grouped_gemm_{header['mode']}.json"
    torch.manual_seed(0)
    bench, results = timer(device), _LiveResults(path, header)
    run_gemms(kernels, cfg, device, bench, results)
    run_expert_mlp(kernels, cfg, device, bench, results)
    run_mxfp4_gemms(kernels, cfg, device, bench, results)
    run_combine(kernels, cfg, device, bench, results)
    add_ratios(results)
    print_table(results)
    results.header["tile_configs"] = dict(
        used=gemm_configs.used(), tuned=gemm_configs.tuned_log, cache=str(gemm_configs.cache_path())
    )
    print_configs(results.header["tile_configs"])
    results.flush(partial=False)
    print(f"wrote {path}")


class _LiveResults(list):
    """Result rows that rewrite the JSON after every measurement (marked partial until the end), so a
    run killed by its time limit still leaves what it measured."""

    def __init__(self, path: Path, header: dict):
        super().__init__()
        self.path, self.header, self.checks = path, header, []

    def append(self, row) -> None:
        super().append(row)
        self.flush()

    def flush(self, partial: bool = True) -> None:
        report = dict(self.header, **({"partial": True} if partial else {}), checks=self.checks, results=list(self))
        tmp = self.path.with_suffix(".json.part")
        tmp.write_text(json.dumps(report, indent=1))
        tmp.replace(self.path)


if __name__ == "__main__":
    main()
