"""The GPU suite's branches for a GPU, planned with a stub `python` (every step's command succeeds at once):
each step listed, each missing JSON named. Its --cpu dry mode runs for real in test_bench_smoke.py, beside
the benchmarks' own --cpu runs it shares two of."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


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
