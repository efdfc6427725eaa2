"""Every benchmark script's --cpu mode runs and writes a sane JSON, and the GPU suite's plumbing in its
--cpu dry mode returns few files, and complete.

The GPU suite (benchmarks/gpu_suite.sh) runs the same scripts in full mode where CI cannot; this
keeps their shared code paths, the JSON layout the suite's summary reads, and the CPU memory proxy
working. The scripts run as subprocesses, all at once: each uses one thread in --cpu mode, so on
two cores the set takes about as long as its two slowest scripts. The two that the suite's --cpu mode
runs (bench_grouped_gemm, bench_moe_layer) run inside it, once: their JSONs and logs are read from
what the suite returns. Not run: ep_bytes.py at its default size (a minute of gloo processes; a small
run is below) and bench_load_memory.py (writes a 2 GB checkpoint).
"""

import json
import math
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

# The benchmark scripts run as processes (minutes on 2 cores).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks"
HEADER = ("benchmark", "mode", "device", "torch", "triton", "date")

# script -> (the JSON it writes, dotted paths of figures that must be finite and > 0; "*" = every list item)
SCRIPTS = {
    "bench_grouped_gemm.py": ("grouped_gemm_cpu.json", ["results.*.ms"]),
    "bench_moe_layer.py": (
        "moe_layer_cpu.json",
        [
            "results.*.fwd_ms",
            "results.*.fwd_bwd_ms",
            "summary.random.x_hf_eager_fwd_bwd",
            "summary.random.x_hf_best_fwd_bwd",
            "summary.skewed.experts_share_fwd_bwd",
        ],
    ),
    "bench_attention.py": ("attention_cpu.json", ["results.*.fwd_ms", "results.0.fwd_bwd_ms", "results.2.fwd_bwd_ms"]),
    "bench_memory.py": (
        "memory_cpu.json",
        [
            "results.*.saved_bytes_per_token",
            "summary.moe.ratio_vs_hf_eager",
            "summary.moe.ratio_vs_hf_grouped_mm",
            "summary.attn_full.ratio_vs_hf_eager",
        ],
    ),
    "bench_train_step.py": (
        "train_step_cpu.json",
        [
            "lora.rows.*.tokens_per_s",
            "sft.rows.*.tokens_per_s",
            "lora.rows.*.loss",
            "lora.x_hf_best",
            "sft.x_hf_best",
            "lora.rows.0.trainable_params",
        ],
    ),
    "bench_data.py": (
        "data_cpu.json",
        [
            "results.encode.tokens_per_s",
            "results.pack.tokens_per_s",
            "results.prepare.tokens_per_s",
            "results.startup.first_batch_s",
            "results.pack.packing_efficiency",
            "results.unpacked.rows_per_s",
            "results.harmony_agentic_sample.tokens_per_s",
            "results.packing.rows.*.packing_efficiency",
            "results.packing.rows.*.pack_s",
            "results.packing.window_sweep.*.packing_efficiency",
        ],
    ),
    "bench_generate.py": (
        "generate_cpu.json",
        ["results.*.cache_tokens_per_s", "results.*.no_cache_tokens_per_s", "results.*.hf_tokens_per_s"],
    ),
}


# The steps of `gpu_suite.sh --cpu`, by script.
SUITE_STEPS = {"bench_grouped_gemm.py": "bench_grouped_gemm", "bench_moe_layer.py": "bench_moe_layer"}


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    """`gpu_suite.sh --cpu`, started (its steps run one after the other): {"proc", "out"}; `runs` adds its
    "stdout" and "stderr" once it has finished."""
    out = tmp_path_factory.mktemp("suite_out")
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "SUITE_BUDGET_S": "500"}
    cmd = ["bash", str(BENCH / "gpu_suite.sh"), "--cpu"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return {"proc": proc, "out": out}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, suite):
    """{script: (exit code, output)}, with every JSON in the returned folder: the scripts the suite runs
    are read from its tarball (exit code 0 where its steps.tsv says ok)."""
    out = tmp_path_factory.mktemp("bench_out")
    env = {**os.environ, "OUT": str(out)}
    procs = {
        s: subprocess.Popen(
            [sys.executable, str(BENCH / s), "--cpu"],
            cwd=ROOT,
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for s in SCRIPTS
        if s not in SUITE_STEPS
    }
    results = {s: (p.wait(timeout=300), p.stdout.read()) for s, p in procs.items()}
    suite["stdout"], suite["stderr"] = suite["proc"].communicate(timeout=600)
    tarball, unpacked = suite["out"] / "suite.tar.gz", tmp_path_factory.mktemp("suite_unpacked")
    assert tarball.is_file(), f"gpu_suite.sh --cpu returned no tarball:\n{suite['stdout'][-3000:]}\n{suite['stderr']}"
    with tarfile.open(tarball) as tar:
        tar.extractall(unpacked, filter="data")
    steps = {row.split("\t")[0]: row.split("\t")[3] for row in (unpacked / "steps.tsv").read_text().splitlines()}
    for script, step in SUITE_STEPS.items():
        name = SCRIPTS[script][0]
        if (unpacked / name).is_file():
            (out / name).write_bytes((unpacked / name).read_bytes())
        log = (unpacked / f"{step}.log").read_text() if (unpacked / f"{step}.log").is_file() else ""
        said = f"(gpu_suite.sh --cpu step {step}: {steps.get(step)})\n{log}"
        results[script] = (0 if steps.get(step) == "ok" else 1, said)
    return out, results


def _figures(report, path: str):
    """Values at a dotted path ("*" fans out over a list)."""
    nodes = [report]
    for key in path.split("."):
        if key == "*":
            nodes = [item for n in nodes for item in n]
        else:
            nodes = [n[int(key)] if isinstance(n, list) else n[key] for n in nodes]
    return nodes


def _numbers(node):
    if isinstance(node, dict):
        for v in node.values():
            yield from _numbers(v)
    elif isinstance(node, list):
        for v in node:
            yield from _numbers(v)
    elif isinstance(node, float):
        yield node


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_cpu_mode_writes_sane_json(runs, script):
    out, results = runs
    code, output = results[script]
    assert code == 0, f"{script} --cpu failed:\n{output[-3000:]}"
    name, paths = SCRIPTS[script]
    report = json.loads((out / name).read_text())
    assert report["mode"] == "cpu"
    assert all(report.get(k) for k in HEADER), {k: report.get(k) for k in HEADER}
    assert all(math.isfinite(x) for x in _numbers(report)), "a NaN or infinity in the JSON"
    errors = (
        [r for r in _figures(report, "results") if isinstance(r, dict) and "error" in r]
        if "results" in report
        else [r for k in ("lora", "sft") for r in report[k]["rows"] if "error" in r]
    )
    assert not errors, errors
    for path in paths:
        values = _figures(report, path)
        assert values and all(isinstance(v, (int, float)) and v > 0 for v in values), (path, values)


def test_suite_summary_reads_every_json(runs):
    out, _ = runs
    sys.path.insert(0, str(BENCH))
    import suite_summary

    rows = suite_summary.suite_summary(out, mode="cpu")
    incomplete = [r for r in rows if r["status"] in ("missing", "partial", "FAILED")]
    assert not incomplete, incomplete
    assert {r["benchmark"] for r in rows} == {"grouped_gemm", "moe_layer", "attention", "memory", "train_step", "data"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal a machine without a GPU gives")
def test_full_mode_refuses_without_gpu():
    scripts = ["bench_moe_layer.py", "bench_attention.py", "bench_memory.py", "bench_train_step.py"]
    procs = [
        subprocess.Popen(
            [sys.executable, str(BENCH / s)], cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        for s in scripts
    ]
    for script, p in zip(scripts, procs):
        code, output = p.wait(timeout=120), p.stdout.read()
        assert code != 0 and "--cpu" in output and "GPU" in output, (script, output[-500:])


def test_experts_share_is_a_share(runs):
    out, _ = runs
    report = json.loads((out / "moe_layer_cpu.json").read_text())
    shares = [r[k] for r in report["results"] for k in ("experts_share_fwd", "experts_share_fwd_bwd") if k in r]
    assert shares and all(0 < s <= 1 for s in shares), shares


def test_ep_bytes_small_run():
    # Two gloo ranks, a few tokens: the measured exchange runs through the real dispatcher's phases.
    p = subprocess.run(
        [sys.executable, str(BENCH / "ep_bytes.py"), "--ep", "2", "--tokens", "8"],
        cwd=ROOT,
        text=True,
        capture_output=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    row = [line for line in p.stdout.splitlines() if line.startswith("| 2 |")][-1]
    dispatch, combine = (int(cell.strip().rstrip(" B").replace(",", "")) for cell in row.split("|")[2:4])
    assert dispatch > 0 and dispatch == combine, row  # what goes out comes back, byte for byte


def test_results_are_checked_before_timing(runs):
    out, _ = runs
    gemm = json.loads((out / "grouped_gemm_cpu.json").read_text())
    assert gemm["checks"] and all("error" not in c and c["max_rel_err"] <= 1e-4 for c in gemm["checks"])
    assert "partial" not in gemm  # the last write is the complete one
    layer = json.loads((out / "moe_layer_cpu.json").read_text())
    ours = [r for r in layer["results"] if r["impl"].startswith("ours")]
    assert ours and all(r["check_max_err"] <= 1e-4 for r in ours)


def test_gpu_suite_cpu_mode_returns_two_files_with_every_log_and_json(runs, suite):
    out, stdout = suite["out"], suite["stdout"]
    assert suite["proc"].returncode == 0, stdout[-3000:] + suite["stderr"][-2000:]
    assert sorted(f.name for f in out.iterdir()) == ["suite.tar.gz", "summary.txt"]  # <= 8 files back
    with tarfile.open(out / "suite.tar.gz") as tar:
        names = {Path(n).name for n in tar.getnames()}
    assert {
        "device.log",
        "bench_grouped_gemm.log",
        "bench_moe_layer.log",
        "grouped_gemm_cpu.json",
        "moe_layer_cpu.json",
        "summary.txt",
        "steps.tsv",
    } <= names, names
    summary = (out / "summary.txt").read_text().strip()
    assert summary and stdout.rstrip().endswith(summary.splitlines()[-1])  # the table comes last
    steps = [line.split() for line in summary.split("\n\nsummary")[0].splitlines()[2:]]
    assert [(s[0], s[3]) for s in steps] == [("bench_grouped_gemm", "ok"), ("bench_moe_layer", "ok")], summary
    assert "moe_layer" in summary and " missing" not in summary and "partial" not in summary, summary
