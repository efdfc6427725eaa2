"""Context parallelism on gloo: CP 2 and CP 4 equal one process at 1e-5 in loss and every gradient,
packed rows (documents, restarting positions) and both sliding and full layers included.

48-token rows: chunks of 12 (CP 2) and 6 (CP 4). With window 6 the sliding layer exchanges only the
5-key halo before each chunk (at CP 4 the halo is nearly the whole previous chunk, which also sits
on another rank); with window 16 the CP 4 chunks are shorter than the halo and it gathers every key.
One process group per CP size runs every window of that size; the reference runs in the test's process."""

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


WINDOWS = {2: [6], 4: [6, 16]}  # CP size -> the sliding windows its one process group runs


def _launch(world: int, tmp: Path) -> dict:
    out, store = tmp / f"cp{world}.pt", tmp / f"store{world}"
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
                *map(str, WINDOWS[world]),
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


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """launched(cp) -> {window: rank 0's result}: one process group per CP size, started on first use."""
    found: dict = {}

    def get(cp: int) -> dict:
        if cp not in found:
            found[cp] = _launch(cp, tmp_path_factory.mktemp(f"cp{cp}"))
        return found[cp]

    return get


@functools.cache
def reference(window: int) -> dict:
    from tests.distributed.cp_worker import run

    return run(window)


@pytest.mark.slow
@pytest.mark.parametrize("cp,window,exchange", [(2, 6, "halo"), (4, 6, "halo"), (4, 16, "full")])
def test_context_parallel_equals_one_process(launched, cp, window, exchange):
    got, ref = launched(cp)[window], reference(window)
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
