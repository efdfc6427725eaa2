"""Start N worker processes the way torchrun does (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT in
the environment), on CPU with gloo, and collect each rank's exit code, output, exit time and result.

Each rank runs `python -m tests.distributed.worker SCENARIO OUT_DIR ARGS_JSON` and saves its result
to OUT_DIR/rank{r}.pt. Nothing can hang: past `deadline_s` every rank still running is killed and
reported with returncode None.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class RankResult:
    rank: int
    returncode: int | None  # None: killed at the launcher's timeout
    seconds: float  # from launch to exit (or to the kill)
    stdout: str
    stderr: str
    result: dict | None  # what the worker saved; None when it saved nothing


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(scenario: str, world_size: int, deadline_s: float = 120.0, **args) -> list[RankResult]:
    out_dir = Path(tempfile.mkdtemp(prefix=f"ep_{scenario}_"))
    port = _free_port()
    procs, logs = [], []
    start = time.monotonic()
    for rank in range(world_size):
        env = dict(
            os.environ,
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            RANK=str(rank),
            WORLD_SIZE=str(world_size),
            LOCAL_RANK=str(rank),
            LOCAL_WORLD_SIZE=str(world_size),
            PYTHONPATH=str(ROOT),
            CUDA_VISIBLE_DEVICES="",  # CPU + gloo even on a GPU machine
            OMP_NUM_THREADS="1",
        )  # many ranks share few cores
        out, err = open(out_dir / f"rank{rank}.out", "w+"), open(out_dir / f"rank{rank}.err", "w+")
        logs.append((out, err))
        cmd = [sys.executable, "-m", "tests.distributed.worker", scenario, str(out_dir), json.dumps(args)]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err))

    ended: dict[int, float] = {}
    while len(ended) < world_size and time.monotonic() - start < deadline_s:
        for rank, p in enumerate(procs):
            if rank not in ended and p.poll() is not None:
                ended[rank] = time.monotonic() - start
        time.sleep(0.05)
    results, killed = [], set()
    for rank, p in enumerate(procs):
        if rank not in ended:
            killed.add(rank)
            p.kill()
            p.wait()
            ended[rank] = time.monotonic() - start
        out, err = logs[rank]
        out.seek(0)
        err.seek(0)
        path = out_dir / f"rank{rank}.pt"
        saved = torch.load(path, weights_only=False) if path.exists() else None
        code = None if rank in killed else p.returncode
        results.append(RankResult(rank, code, ended[rank], out.read(), err.read(), saved))
        out.close()
        err.close()
    shutil.rmtree(out_dir, ignore_errors=True)
    return results


def describe(results: list[RankResult]) -> str:
    """Every rank's exit code and the tail of its stderr, for assertion messages."""
    return "\n".join(
        f"--- rank {r.rank}: rc={r.returncode} after {r.seconds:.1f}s\n{r.stderr[-2000:]}" for r in results
    )


def results_or_fail(results: list[RankResult]) -> list[dict]:
    """The ranks' saved results, failing with every rank's stderr when any rank did not succeed."""
    if any(r.returncode != 0 or r.result is None for r in results):
        raise AssertionError("a rank failed:\n" + describe(results))
    return [r.result for r in results]
