"""Context parallelism on gloo: CP 2 and CP 4 equal one process at 1e-5 in loss and every gradient,
packed rows (documents, restarting positions) and both sliding and full layers included."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _run(world: int, tmp: Path) -> dict:
    out, store = tmp / f"cp{world}.pt", tmp / f"store{world}"
    env = dict(os.environ, PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-m", "tests.distributed.cp_worker", str(r), str(world), str(store),
                               str(out)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for r in range(world)]
    try:
        logs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)[-4000:]
    return torch.load(out)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return _run(1, tmp_path_factory.mktemp("cp1"))


@pytest.mark.parametrize("cp", [2, 4])
def test_context_parallel_equals_one_process(reference, cp, tmp_path):
    got = _run(cp, tmp_path)
    torch.testing.assert_close(got["loss"], reference["loss"], rtol=1e-5, atol=1e-5)
    for name, ref in reference["grads"].items():
        torch.testing.assert_close(got["grads"][name], ref, rtol=1e-5, atol=1e-5, msg=name)


def test_sequence_must_split_into_equal_chunks():
    from engine.parallel.context_parallel import ContextParallel

    cp = ContextParallel.__new__(ContextParallel)
    cp.size, cp.rank, cp.group = 4, 1, None
    assert cp.chunks(16) == [(2, 4), (12, 14)]
    with pytest.raises(ValueError, match="multiple of 8"):
        cp.chunks(20)
