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
    p = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), "--cpu"], cwd=ROOT, env=env, text=True,
                       capture_output=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    assert sorted(f.name for f in tmp_path.iterdir()) == ["suite.tar.gz", "summary.txt"]  # <= 8 files back
    with tarfile.open(tmp_path / "suite.tar.gz") as tar:
        names = {Path(n).name for n in tar.getnames()}
    assert {"device.log", "bench_grouped_gemm.log", "bench_moe_layer.log", "grouped_gemm_cpu.json",
            "moe_layer_cpu.json", "summary.txt"} <= names, names
    summary = (tmp_path / "summary.txt").read_text().strip()
    assert summary and p.stdout.rstrip().endswith(summary.splitlines()[-1])  # the table comes last
