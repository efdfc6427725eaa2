"""The GPU suite's summary on what a cut-short run leaves: partial JSONs of every benchmark (written
by the benchmarks' own writers, as after their first measurements), missing ones, an unreadable one
and an unexpected layout. It shows what was measured, names what is missing, and never crashes."""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

import common  # noqa: E402
import suite_summary  # noqa: E402

EVERY_SECTION = list(suite_summary.SECTIONS)


def _args(mode="full"):
    return argparse.Namespace(mode=mode, device=torch.device("cpu"))


@pytest.fixture
def partial_run(tmp_path, monkeypatch):
    """A folder as a suite run cut short leaves it: each benchmark stopped after its first figures."""
    monkeypatch.setenv("OUT", str(tmp_path))
    import bench_grouped_gemm

    gemm = bench_grouped_gemm._LiveResults(tmp_path / "grouped_gemm_full.json", {"benchmark": "grouped_gemm"})
    gemm.checks.append(
        dict(
            op="gemm gate_up 2880x5760",
            routing="uniform",
            method="triton_tma",
            max_rel_err=0.5,
            error="result off by 5.00e-01 of max |ref|: not timed",
        )
    )
    for method, tflops in (("triton", 600.0), ("dense", 700.0), ("grouped_mm", 400.0)):
        gemm.append(
            dict(op="gemm gate_up 2880x5760", routing="uniform", passes="fwd", method=method, ms=1.0, tflops=tflops)
        )
    for method, tflops in (("triton", 600.0), ("triton_mxfp4", 450.0)):
        gemm.append(
            dict(op="mxfp4 gate_up 2880x5760", routing="uniform", passes="fwd", method=method, ms=1.0, tflops=tflops)
        )
    moe = common.LiveRows("moe_layer", _args())
    moe += [
        dict(routing="random", impl="hf eager", fwd_ms=10.0, fwd_bwd_ms=30.0),
        dict(routing="random", impl="hf grouped_mm", fwd_ms=5.0, fwd_bwd_ms=15.0),
        dict(
            routing="random",
            impl="ours loop",
            check_max_err=1e-3,
            fwd_ms=4.0,
            fwd_bwd_ms=12.0,
            x_hf_eager_fwd_bwd=2.5,
            x_hf_best_fwd_bwd=1.25,
            experts_share_fwd_bwd=0.8,
        ),
    ]
    planned = [
        [4096, layer, backend]
        for layer in ("sliding_attention", "full_attention")
        for backend in ("eager", "triton", "blockwise", "flex")
    ]
    attn = common.LiveRows("attention", _args(), planned=planned)
    attn += [
        dict(seq=4096, layer="sliding_attention", backend="eager", fwd_with_grad=True, fwd_ms=1.0, fwd_bwd_ms=3.0),
        dict(
            seq=4096,
            layer="sliding_attention",
            backend="triton",
            fwd_with_grad=True,
            max_err_out=0.5,
            check_error="off by 5.00e-01 of the first backend's largest value: not timed",
        ),
    ]
    planned_long = [[seq, "sliding_attention", b] for seq in (32768, 131072) for b in ("triton", "flex")]
    long_attn = common.LiveRows("attention", _args("long"), planned=planned_long)
    long_attn.append(
        dict(
            seq=32768,
            layer="sliding_attention",
            backend="triton",
            fwd_with_grad=True,
            fwd_ms=2.0,
            fwd_bwd_ms=7.0,
            fwd_bwd_peak_gib=3.5,
        )
    )
    common.write_json(
        "long_context",
        _args(),
        {
            "seqs": [32768, 65536, 131072],
            "partial": True,
            "results": [{"seq": 32768, "step_s": 9.0, "tokens_per_s": 3641.0, "peak_gib": 41.2, "mfu": 0.3}],
        },
    )
    memory = common.LiveRows("memory", _args())
    memory += [
        dict(layer="moe", impl="ours triton", tokens=4096, saved_bytes_per_token=13000.0),
        dict(layer="moe", impl="hf eager", tokens=4096, saved_bytes_per_token=42000.0),
    ]
    common.write_json(
        "train_step_lora",
        _args(),
        {
            "partial": True,
            "lora": {
                "layers": 4,
                "seq": 4096,
                "rows": [{"impl": "ours", "tokens_per_s": 9000.0, "mfu": 0.2, "peak_gib": 30.0}],
            },
        },
    )
    common.write_json("train_step_20b_lora_memory", _args(), {"lora_20b": {"error": "OutOfMemoryError: CUDA out"}})
    (tmp_path / "data_full.json").write_text('{"benchmark": "data", "results": {"pack": {"tok')  # cut mid-write
    return tmp_path


def _by_section(rows):
    out = {}
    for r in rows:
        out.setdefault(r["benchmark"], []).append(r)
    return out


def _has(rows, status, *words):
    return any(r["status"] == status and all(w in r["figure"] for w in words) for r in rows)


def test_partial_jsons_show_what_was_measured_and_name_the_rest(partial_run):
    assert json.loads((partial_run / "moe_layer_full.json").read_text())["partial"] is True
    s = _by_section(suite_summary.suite_summary(partial_run, "full", EVERY_SECTION))
    gemm = s["grouped_gemm"]
    assert _has(gemm, "partial", "grouped_gemm_full.json")
    ratio = next(r for r in gemm if "triton / dense" in r["figure"])
    assert ratio["value"] == format(600 / 700, ".0%") and ratio["status"] == "ok"
    assert _has(gemm, "ok", "triton x grouped_mm")  # 600 / 400 = 1.5 >= 1.3
    assert _has(gemm, "FAILED", "check", "triton_tma")
    for part in (
        "gemm down",
        "expert_mlp",
        "scatter_combine",
        "gemm gate_up skewed",
        "mxfp4 down",
        "mxfp4 gate_up 2880x5760 dX",
    ):
        assert _has(gemm, "missing", part), part
    share = next(r for r in gemm if "mxfp4 gate_up 2880x5760 fwd: triton_mxfp4 / triton bf16" in r["figure"])
    assert share["value"] == format(450 / 600, ".0%")
    moe = s["moe_layer"]
    assert _has(moe, "MISS", "random (loop): fwd+bwd x hf eager")  # 2.5 < 4
    assert _has(moe, "ok", "expert GEMM share")
    for part in ("skewed routing", "random ours grouped_mm", "random ours triton"):
        assert _has(moe, "missing", part), part
    attn = s["attention"]
    assert any("sliding_attention eager fwd+bwd" in r["figure"] and r["value"] == "3.00" for r in attn)
    assert _has(attn, "FAILED", "triton check_error")
    assert _has(attn, "missing", "full_attention flex") and _has(attn, "missing", "sliding_attention blockwise")
    assert _has(s["attention_long"], "missing", "131072 sliding_attention flex")
    longc = s["long_context"]
    assert _has(longc, "ok", "32768 tokens: peak GiB") and _has(longc, "missing", "131072 tokens")
    memory = s["memory"]
    assert _has(memory, "ok", "moe saved B/token") and _has(memory, "missing", "attn_full")
    steps = s["train_step"]
    assert any(r["figure"] == "lora 4 layers: tokens/s" and r["value"] == "9,000" for r in steps)
    assert _has(steps, "missing", "lora 4 layers: transformers")
    assert _has(steps, "missing", "no train_step_sft_full.json")
    assert _has(steps, "FAILED", "gpt-oss-20b LoRA step", "OutOfMemoryError")
    assert _has(s["data"], "FAILED", "data_full.json unreadable")


def test_missing_jsons_are_named_for_every_planned_section(tmp_path):
    rows = suite_summary.suite_summary(tmp_path, "full", EVERY_SECTION)
    named = {r["figure"].split()[1].rstrip(":") for r in rows if r["status"] == "missing"}
    assert named == {suite_summary.SECTIONS[n][0].format(mode="full") for n in EVERY_SECTION}
    assert suite_summary.suite_summary(tmp_path, "full") == []  # nothing planned, nothing on disk


def test_an_unexpected_layout_is_one_line_not_a_crash(tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path))
    common.write_json("moe_layer", _args(), {"results": {"not": "a list"}}, quiet=True)
    rows = suite_summary.suite_summary(tmp_path, "full", ["moe_layer", "nonsense"])
    assert _has(rows, "FAILED", "moe_layer_full.json: could not read")
    assert _has(rows, "FAILED", "unknown section")


def test_command_line_prints_steps_then_summary(partial_run):
    (partial_run / "steps.tsv").write_text("kernel_tests\t55\t40\tok\t61\nbench_attention\t38\t38\tTIMED OUT\t6\n")
    p = subprocess.run(
        [
            sys.executable,
            str(BENCH / "suite_summary.py"),
            str(partial_run),
            "--mode",
            "full",
            "--sections",
            ",".join(EVERY_SECTION),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0 and "Traceback" not in p.stdout + p.stderr, p.stderr[-2000:]
    assert p.stdout.index("TIMED OUT") < p.stdout.index("summary") < p.stdout.index("not measured: expert_mlp")
