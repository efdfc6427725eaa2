"""A CPU training step's memory grows linearly with sequence length (the tiny model, 1K -> 16K tokens).

Each length runs in its own process (benchmarks/bench_long_context.py --child): after a warm-up step
the peak resident memory is reset, one full training step runs, and its memory is the new peak minus
the resident memory before it. Bytes per token at 16K may be at most 1.5x those at 1K; the eager
T x T attention measured 30x the memory for 8x the tokens (1K -> 8K) before the blockwise default.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

# Two training steps at 1K and 16K tokens, each in its own process.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_long_context.py"


def _step_memory(seq: int) -> dict:
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--child", str(seq), "--attn", "blockwise"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_step_memory_per_token_stays_flat_from_1k_to_16k():
    short, long = _step_memory(1024), _step_memory(16384)
    assert short["peak_reset"] and long["peak_reset"], "needs /proc/self/clear_refs to measure a step's own peak"
    assert short["step_mib"] > 1  # the step really allocated something measurable
    growth = long["bytes_per_token"] / short["bytes_per_token"]
    assert growth <= 1.5, f"bytes/token grew {growth:.2f}x from 1K to 16K tokens: {short} {long}"
