"""Each GPU suite step's cold Triton compiles fit its time share at 0.6 s per compile (the upper end
measured for cold compiles on the GPU host), counted on CPU by suite_compiles.py. The shares and the
budget are read from benchmarks/gpu_suite.sh itself, both invocations (default and LONG=1)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SUITE = ROOT / "benchmarks" / "gpu_suite.sh"
SECONDS_PER_COMPILE = 0.6
# Steps whose kernels the CPU cannot count: tests/gpu runs CUDA tensors end to end (compiled flex,
# the trainer in a subprocess); its share is set from the first GPU run's steps.tsv.
NOT_COUNTED = {"gpu_tests"}


def suite_shares() -> tuple[int, dict]:
    text = SUITE.read_text()
    budget = int(re.search(r"SUITE_BUDGET_S:-(\d+)", text).group(1))
    gpu_part = text[text.index('elif [ "${LONG:-0}" = 1 ]') : text.index("\nfi\n")]
    shares = {m.group(1): int(m.group(2)) for m in re.finditer(r"step (\w+) (\d+) ", gpu_part)}
    return budget, shares


def test_shares_fit_one_command():
    budget, shares = suite_shares()
    assert budget <= 560  # one 600 s command, its start and the packing after it
    long_steps = {"bench_attention_long", "long_context_20b"}
    assert sum(v for k, v in shares.items() if k in long_steps) <= 100
    assert sum(v for k, v in shares.items() if k not in long_steps) <= 100


@pytest.mark.slow
@pytest.mark.timeout(900)  # every step's compiles, cold
def test_every_step_compiles_within_its_share():
    libtriton = pytest.importorskip("triton._C.libtriton", reason="needs a Triton build with the CUDA backend")
    if not hasattr(libtriton, "native_specialize_impl"):
        pytest.skip("the recorder mirrors the argument specialization of Triton versions with native_specialize_impl")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    p = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "benchmarks" / "suite_compiles.py")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    counts = json.loads(p.stdout.strip().splitlines()[-1])
    budget, shares = suite_shares()
    assert set(shares) - NOT_COUNTED == set(counts), "a suite step without a count (or a count without a step)"
    print(f"\n{'step':24s} {'share s':>8s} {'compiles':>8s} {'x 0.6 s':>8s} {'flex graphs':>11s}")
    for step, c in counts.items():
        share_s = budget * shares[step] / 100
        print(
            f"{step:24s} {share_s:8.0f} {c['compiles']:8d} {c['compiles'] * SECONDS_PER_COMPILE:8.1f} "
            f"{c['flex_graphs']:11d}"
        )
    for step, c in counts.items():
        assert c["compiles"] > 0, f"{step}: nothing recorded; the replay or the recorder is broken"
        assert c["compiles"] * SECONDS_PER_COMPILE <= budget * shares[step] / 100, (step, c)
    kernel_tests = counts["kernel_tests"]
    assert kernel_tests["tests"] > 0
    # A GPU test that stopped early under the recorder (an assertion on values it computed) compiled
    # less here than on a GPU: a few, not most.
    assert len(kernel_tests["stopped_early"]) <= kernel_tests["tests"] // 4, kernel_tests["stopped_early"]
