"""The GPU suite's summary: each benchmark's headline figures against the targets, from its JSON.

    python benchmarks/suite_summary.py DIR [--mode full|cpu] [--sections grouped_gemm,moe_layer,...]

Reads what the steps left in DIR, complete or cut short. A JSON marked `partial` (its step stopped
by a time limit: the benchmarks rewrite it after each measurement) shows what it measured and names
what it did not reach; a section whose JSON is missing or unreadable says so; a measurement that
failed its check or raised is listed as FAILED. `--sections` names what this run planned (the suite
passes its steps), so a planned section with nothing on disk is listed as missing; without it, the
sections of the mode that left a JSON. Never raises on a JSON: a layout a reader does not expect
becomes one line naming the error. `steps.tsv` (written by gpu_suite.sh: step, limit, seconds
taken, outcome) is printed first when present.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import _cell, print_table


class Rows(list):
    """The summary's lines: benchmark, figure, value, target, status."""

    def __init__(self, bench: str):
        super().__init__()
        self.bench = bench

    def add(self, figure, value=None, fmt="", target=None, ok=None, status=None):
        if status is None:
            status = "" if ok is None or value is None else ("ok" if ok(value) else "MISS")
        self.append(
            {
                "benchmark": self.bench,
                "figure": figure,
                "value": _cell(value, fmt),
                "target": target or "",
                "status": status,
            }
        )

    def missing(self, what: str):
        self.add(f"not measured: {what}", status="missing")

    def failed(self, what: str, error):
        self.add(f"{what}: {str(error)[:160]}", status="FAILED")


def _errors(rows: Rows, items, label) -> None:
    for x in items:
        for key in [k for k in x if k == "error" or k.endswith("_error")]:
            rows.failed(f"{label(x)} {key}", x[key])


def grouped_gemm(r: dict, rows: Rows, mode: str) -> None:
    results = r.get("results", [])
    for c in r.get("checks", []):
        if "error" in c:
            rows.failed(f"check {c.get('op')} {c.get('routing')} {c.get('method')}", c["error"])
    _errors(rows, results, lambda x: f"{x.get('op')} {x.get('routing')} {x.get('passes')} {x.get('method')}")
    fwd = {}  # (op, routing) -> method -> TFLOP/s of the forward GEMM
    for x in results:
        if x["op"].startswith("gemm") and x["passes"] == "fwd" and x.get("tflops"):
            fwd.setdefault((x["op"], x["routing"]), {})[x["method"]] = x["tflops"]
    for (op, routing), t in fwd.items():
        if routing != "uniform" or "triton" not in t:
            continue
        ours = t["triton"]
        rows.add(
            f"{op} fwd: triton / dense",
            ours / t["dense"] if "dense" in t else None,
            ".0%",
            ">= 85%",
            lambda v: v >= 0.85,
        )
        rows.add(
            f"{op} fwd: triton x grouped_mm",
            ours / t["grouped_mm"] if "grouped_mm" in t else None,
            ".2f",
            ">= 1.3",
            lambda v: v >= 1.3,
        )
        for variant in ("heuristic", "persistent", "tma"):  # A/B rows: > 1 = faster than the default's
            other = t.get(f"triton_{variant}")
            rows.add(f"{op} fwd: triton_{variant} x triton", other / ours if other else None, ".2f")
    for x in results:
        if x["op"].startswith("expert_mlp") and x["passes"] == "fwd+bwd" and x["method"] == "grouped_mm":
            rows.add(f"expert MLP fwd+bwd {x['routing']}: triton x grouped_mm", x.get("speedup_of_triton"), ".3g")
    _mxfp4_rows(results, rows)
    ops = {x["op"] for x in results}
    for part in ("gemm gate_up", "gemm down", "expert_mlp", "mxfp4 gate_up", "mxfp4 down", "scatter_combine"):
        if not any(op.startswith(part) for op in ops):
            rows.missing(part)
    for part in ("gemm gate_up", "gemm down", "expert_mlp"):
        for routing in ("uniform", "skewed"):
            if any(op.startswith(part) for op in ops) and not any(
                x["op"].startswith(part) and x["routing"] == routing for x in results
            ):
                rows.missing(f"{part} {routing}")


def _mxfp4_rows(results: list, rows: Rows) -> None:
    """The GEMMs on MXFP4 weights: TFLOP/s and the share of the same product on bf16 weights, forward and dX."""
    by_op = {}  # (op, passes) -> method -> TFLOP/s
    for x in results:
        if x["op"].startswith("mxfp4") and x.get("tflops"):
            by_op.setdefault((x["op"], x["passes"]), {})[x["method"]] = x["tflops"]
    for (op, passes), t in by_op.items():
        if "triton_mxfp4" in t:
            rows.add(f"{op} {passes}: triton_mxfp4 TFLOP/s", t["triton_mxfp4"], ".0f")
            rows.add(
                f"{op} {passes}: triton_mxfp4 / triton bf16",
                t["triton_mxfp4"] / t["triton"] if "triton" in t else None,
                ".0%",
            )
    for op in {op for op, _ in by_op}:
        for passes in ("fwd", "dX"):
            if (op, passes) not in by_op:
                rows.missing(f"{op} {passes}")


def moe_layer(r: dict, rows: Rows, mode: str) -> None:
    results = r.get("results", [])
    _errors(rows, results, lambda x: f"{x.get('routing')} {x.get('impl')}")
    backends = ["loop", "grouped_mm"] + ([] if mode == "cpu" else ["triton"])
    for routing in ("random", "skewed"):
        mine = [x for x in results if x.get("routing") == routing]
        ours = [x for x in mine if x["impl"].startswith("ours") and x.get("fwd_bwd_ms")]
        if not mine:
            rows.missing(f"{routing} routing")
            continue
        if ours:
            best = min(ours, key=lambda x: x["fwd_bwd_ms"])
            label = f"{routing} ({best['impl'].split()[1]})"
            rows.add(f"{label}: fwd+bwd x hf eager", best.get("x_hf_eager_fwd_bwd"), ".2f", ">= 4", lambda v: v >= 4)
            rows.add(f"{label}: fwd+bwd x hf best", best.get("x_hf_best_fwd_bwd"), ".2f", ">= 4", lambda v: v >= 4)
            rows.add(
                f"{label}: expert GEMM share", best.get("experts_share_fwd_bwd"), ".0%", ">= 75%", lambda v: v >= 0.75
            )
        done = {x["impl"].split()[1] for x in mine if x["impl"].startswith("ours")}
        for backend in backends:
            if backend not in done:
                rows.missing(f"{routing} ours {backend}")


def attention(r: dict, rows: Rows, mode: str) -> None:
    results = r.get("results", [])
    _errors(rows, results, lambda x: f"{x.get('seq')} {x.get('layer')} {x.get('backend')}")
    for x in (x for x in results if "error" not in x and "check_error" not in x):
        peak = _cell(x.get("fwd_bwd_peak_gib"), ".2f")
        figure = "fwd+bwd ms" if x.get("fwd_bwd_ms") or x.get("fwd_with_grad", True) else "fwd ms (no grad)"
        value = x.get("fwd_bwd_ms") if figure == "fwd+bwd ms" else x.get("fwd_ms")
        rows.add(f"{x['seq']} {x['layer']} {x['backend']} {figure} (peak GiB {peak})", value, ".2f")
    done = {(x.get("seq"), x.get("layer"), x.get("backend")) for x in results}
    for seq, layer, backend in r.get("planned", []):
        if (seq, layer, backend) not in done:
            rows.missing(f"{seq} {layer} {backend}")


def long_context(r: dict, rows: Rows, mode: str) -> None:
    results = r.get("results", [])
    _errors(rows, results, lambda x: f"20b LoRA {x.get('seq')} tokens")
    for x in results:
        if "error" not in x:
            rows.add(
                f"20b LoRA {x['seq']} tokens: peak GiB (tokens/s {_cell(x.get('tokens_per_s'), ',.0f')})",
                x.get("peak_gib"),
                ".1f",
                "< 76 (80 GB GPU)",
                lambda v: v < 76,
            )
    for seq in r.get("seqs", []):
        if seq not in {x.get("seq") for x in results}:
            rows.missing(f"20b LoRA {seq} tokens")


def memory(r: dict, rows: Rows, mode: str) -> None:
    results = r.get("results", [])
    _errors(rows, results, lambda x: f"{x.get('layer')} {x.get('impl')}")
    for layer in ("moe", "moe_lora", "attn_sliding", "attn_full"):
        group = [x for x in results if x.get("layer") == layer and x.get("saved_bytes_per_token")]
        ours = next((x for x in group if x["impl"].startswith("ours")), None)
        theirs = [x for x in group if not x["impl"].startswith("ours")]
        if ours is None or not theirs:
            rows.missing(f"{layer} {'ours' if ours is None else 'transformers'}")
            continue
        for x in theirs:
            target, ok = ("<= 0.5", lambda v: v <= 0.5) if layer == "moe" else (None, None)
            rows.add(
                f"{layer} saved B/token, {ours['impl']} / {x['impl']}",
                ours["saved_bytes_per_token"] / x["saved_bytes_per_token"],
                ".2f",
                target,
                ok,
            )


def train_step(r: dict, rows: Rows, mode: str, kinds=("lora", "sft")) -> None:
    for kind in kinds:
        entry = r.get(kind)
        if not entry:
            rows.missing(f"{kind} step")
            continue
        steps = entry.get("rows", [])
        _errors(rows, steps, lambda x: f"{kind} {x.get('impl')}")
        label = f"{kind} {entry.get('layers')} layers"
        ours = next((x for x in steps if x.get("impl") == "ours" and x.get("tokens_per_s")), None)
        hf = [x for x in steps if x.get("impl", "").startswith("hf") and x.get("tokens_per_s")]
        if ours is None:
            rows.missing(f"{label}: ours")
            continue
        lora = kind == "lora"  # the targets are set for LoRA; SFT figures are for reference
        rows.add(f"{label}: tokens/s", ours["tokens_per_s"], ",.0f")
        if hf:
            best = max(hf, key=lambda x: x["tokens_per_s"])
            rows.add(
                f"{label}: ours x {best['impl']}",
                ours["tokens_per_s"] / best["tokens_per_s"],
                ".2f",
                *((">= 3", lambda v: v >= 3) if lora else ()),
            )
        else:
            rows.missing(f"{label}: transformers")
        rows.add(f"{label}: MFU", ours.get("mfu"), ".1%", *((">= 35%", lambda v: v >= 0.35) if lora else ()))
        rows.add(f"{label}: peak GiB", ours.get("peak_gib"), ".1f")


def lora_20b_memory(r: dict, rows: Rows, mode: str) -> None:
    e = r.get("lora_20b")
    if not e:
        rows.missing("gpt-oss-20b LoRA step")
        return
    if "error" in e:
        rows.failed("gpt-oss-20b LoRA step", e["error"])
        return
    rows.add("gpt-oss-20b LoRA seq 4096 peak GB (steady)", e.get("peak_gb"), ".1f", "< 60", lambda v: v < 60)
    rows.add("gpt-oss-20b LoRA seq 4096 peak GB (first step)", e.get("warmup_peak_gb"), ".1f", "< 60", lambda v: v < 60)


def data(r: dict, rows: Rows, mode: str) -> None:
    pack = r.get("results", {}).get("pack")
    if pack is None:
        rows.missing("packed stream")
        return
    rows.add(f"packed stream tokens/s (seq {r.get('max_seq_len')})", pack.get("tokens_per_s"), ",.0f")


# name -> (JSON file, {mode} filled in; reader; benchmark label)
SECTIONS = {
    "grouped_gemm": ("grouped_gemm_{mode}.json", grouped_gemm, "grouped_gemm"),
    "moe_layer": ("moe_layer_{mode}.json", moe_layer, "moe_layer"),
    "attention": ("attention_{mode}.json", attention, "attention"),
    "attention_long": ("attention_long.json", attention, "attention_long"),
    "long_context": ("long_context_full.json", long_context, "long_context"),
    "memory": ("memory_{mode}.json", memory, "memory"),
    "train_step": ("train_step_{mode}.json", train_step, "train_step"),
    "train_step_lora": (
        "train_step_lora_{mode}.json",
        lambda r, rows, m: train_step(r, rows, m, ("lora",)),
        "train_step",
    ),
    "train_step_sft": ("train_step_sft_{mode}.json", lambda r, rows, m: train_step(r, rows, m, ("sft",)), "train_step"),
    "train_step_20b_lora_memory": ("train_step_20b_lora_memory_{mode}.json", lora_20b_memory, "train_step"),
    "data": ("data_{mode}.json", data, "data"),
}


def section_rows(directory: Path, name: str, mode: str) -> Rows:
    file, reader, bench = SECTIONS[name]
    file = file.format(mode=mode)
    rows = Rows(bench)
    path = directory / file
    if not path.exists():
        rows.add(
            f"no {file}: the step failed, ran out of time before its first figure, or did not run", status="missing"
        )
        return rows
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        rows.add(f"{file} unreadable: {type(err).__name__}: {str(err)[:120]}", status="FAILED")
        return rows
    if report.get("partial"):
        rows.add(
            f"{file} is partial: the step stopped before its end (time limit?); what it measured:", status="partial"
        )
    try:
        reader(report, rows, mode)
    except Exception as err:  # noqa: BLE001 - one unexpected layout must not cost the other sections
        rows.add(f"{file}: could not read ({type(err).__name__}: {str(err)[:120]})", status="FAILED")
    return rows


def suite_summary(directory: Path, mode: str = "full", sections: list[str] | None = None) -> list[dict]:
    """The summary's rows for the planned `sections` (default: every section that left a JSON)."""
    if sections is None:
        sections = [n for n, (f, _, _) in SECTIONS.items() if (directory / f.format(mode=mode)).exists()]
    unknown = [n for n in sections if n not in SECTIONS]
    rows = [r for name in sections if name in SECTIONS for r in section_rows(directory, name, mode)]
    rows += [
        {"benchmark": n, "figure": "unknown section", "value": "-", "target": "", "status": "FAILED"} for n in unknown
    ]
    return rows


def step_rows(directory: Path) -> list[dict]:
    """steps.tsv (name, limit s, seconds taken, outcome, new Triton cache entries) as table rows."""
    path = directory / "steps.tsv"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        cells = line.split("\t") + [""] * 5
        rows.append(dict(zip(("step", "limit_s", "took_s", "outcome", "compiles"), cells[:5])))
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Print the summary table of the benchmark JSONs in a folder.")
    parser.add_argument("directory", type=Path)
    parser.add_argument("--mode", default="full", choices=("full", "cpu"))
    parser.add_argument("--sections", default=None, help="comma list of the sections this run planned")
    args = parser.parse_args(argv)
    steps = step_rows(args.directory)
    if steps:
        print_table(
            steps,
            [
                ("step", "step", ""),
                ("limit_s", "limit s", ""),
                ("took_s", "took s", ""),
                ("outcome", "outcome", ""),
                ("compiles", "new Triton kernels", ""),
            ],
            title="steps",
        )
    sections = [s for s in args.sections.split(",") if s] if args.sections else None
    print_table(
        suite_summary(args.directory, args.mode, sections),
        [
            ("benchmark", "benchmark", ""),
            ("figure", "figure", ""),
            ("value", "value", ""),
            ("target", "target", ""),
            ("status", "status", ""),
        ],
        title="summary",
    )


if __name__ == "__main__":
    main()
