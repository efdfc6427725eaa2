"""Context parallelism on gloo: CP 2 and CP 4 equal one process at 1e-5 in loss and every gradient,
packed rows (documents, restarting positions) and both sliding and full layers included.

48-token rows: chunks of 12 (CP 2) and 6 (CP 4). With window 6 the sliding layer exchanges only the
5-key halo before each chunk (at CP 4 the halo is nearly the whole previous chunk, which also sits
on another rank); with window 16 the CP 4 chunks are shorter than the halo and it gathers every key."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _run(world: int, tmp: Path, window: int = 6) -> dict:
    out, store = tmp / f"cp{world}_{window}.pt", tmp / f"store{world}_{window}"
    env = dict(os.environ, PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.distributed.cp_worker",
                str(r),
                str(world),
                str(store),
                str(out),
                str(window),
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(world)
    ]
    try:
        logs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)[-4000:]
    return torch.load(out)


_REFERENCES: dict = {}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    def get(window: int) -> dict:
        if window not in _REFERENCES:
            _REFERENCES[window] = _run(1, tmp_path_factory.mktemp(f"cp1_{window}"), window)
        return _REFERENCES[window]

    return get


@pytest.mark.parametrize("cp,window,exchange", [(2, 6, "halo"), (4, 6, "halo"), (4, 16, "full")])
def test_context_parallel_equals_one_process(reference, cp, window, exchange, tmp_path):
    got, ref = _run(cp, tmp_path, window), reference(window)
    assert got["exchange"] == exchange
    torch.testing.assert_close(got["loss"], ref["loss"], rtol=1e-5, atol=1e-5)
    for name, expected in ref["grads"].items():
        torch.testing.assert_close(got["grads"][name], expected, rtol=1e-5, atol=1e-5, msg=name)


def test_sequence_must_split_into_equal_chunks():
    from engine.parallel.context_parallel import ContextParallel

    cp = ContextParallel.__new__(ContextParallel)
    cp.size, cp.rank, cp.group = 4, 1, None
    assert cp.chunks(16) == [(2, 4), (12, 14)]
    with pytest.raises(ValueError, match="multiple of 8"):
        cp.chunks(20)
