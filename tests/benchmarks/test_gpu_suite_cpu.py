"""The GPU suite's plumbing, in its --cpu dry mode: what comes back is few files, and complete."""

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

# The suite script runs two benchmarks as processes.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]


def test_cpu_mode_returns_two_files_with_every_log_and_json(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "SUITE_BUDGET_S": "500"}
    p = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), "--cpu"],
        cwd=ROOT,
        env=env,
        text=True,
        capture_output=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    assert sorted(f.name for f in tmp_path.iterdir()) == ["suite.tar.gz", "summary.txt"]  # <= 8 files back
    with tarfile.open(tmp_path / "suite.tar.gz") as tar:
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
    summary = (tmp_path / "summary.txt").read_text().strip()
    assert summary and p.stdout.rstrip().endswith(summary.splitlines()[-1])  # the table comes last
    steps = [line.split() for line in summary.split("\n\nsummary")[0].splitlines()[2:]]
    assert [(s[0], s[3]) for s in steps] == [("bench_grouped_gemm", "ok"), ("bench_moe_layer", "ok")], summary
    assert "moe_layer" in summary and " missing" not in summary and "partial" not in summary, summary


def _stub_python(tmp_path):
    """A `python` for the GPU branches' plumbing: the summary runs for real, every step's command
    (and the import check before installing wheels) succeeds at once without writing a JSON."""
    stub = tmp_path / "python"
    stub.write_text(
        f'#!/usr/bin/env bash\ncase "$1" in benchmarks/suite_summary.py) exec "{sys.executable}" "$@";; '
        f'esac\necho "stub: $*"\n'
    )
    stub.chmod(0o755)
    return stub


def test_gpu_branches_plan_every_step_and_name_each_missing_json(tmp_path):
    expected = {
        "": [
            "kernel_tests",
            "gpu_tests",
            "bench_grouped_gemm",
            "bench_moe_layer",
            "bench_attention",
            "train_step_lora",
            "train_step_20b_memory",
            "bench_memory",
            "train_step_sft",
        ],
        "1": ["bench_attention_long", "long_context_20b"],
    }
    for long, steps in expected.items():
        out = tmp_path / f"long{long}"
        env = {**os.environ, "OUT": str(out), "PYTHON": str(_stub_python(tmp_path)), "LONG": long}
        p = subprocess.run(
            ["bash", str(ROOT / "benchmarks" / "gpu_suite.sh")],
            cwd=ROOT,
            env=env,
            text=True,
            capture_output=True,
            timeout=300,
        )
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
        summary = (out / "summary.txt").read_text()
        listed = [line.split()[0] for line in summary.split("\n\nsummary")[0].strip().splitlines()[2:]]
        assert listed == steps, summary
        missing = [line for line in summary.splitlines() if line.rstrip().endswith("missing")]
        assert missing and all(" no " in line for line in missing), summary  # each planned JSON named
        assert "Traceback" not in summary
