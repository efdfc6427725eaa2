"""Training runs through engine/train.py, one process or torchrun, each run once per test session.

A run is its launcher and its overrides: two tests that ask for the same (nproc, overrides) read the
same output folder, so a one-process reference or a run several tests inspect is trained once, also when
pytest-xdist spreads the tests over workers (`once`: the first worker to ask trains under a file lock,
the others wait for it and read the same folder).
Tests must treat a shared run's folder as read-only (copy what they change). A run that fails is
remembered: every test that asks for it fails with the same output.

Every command runs in its own process group; on a timeout (the command's own, or pytest-timeout's
interrupt) the whole group is killed, torchrun's workers included, and the failure names the command.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

REPO = Path(__file__).resolve().parents[1]
TRAIN = str(REPO / "engine" / "train.py")


@dataclass(frozen=True)
class Run:
    out: Path  # the run's trainer.output_dir (read-only for the tests that share it)
    records: list  # metrics.jsonl, one dict per logged step
    stdout: str
    stderr: str


def command(nproc: int, *overrides: str) -> list[str]:
    """`python engine/train.py ...` for one process, `torchrun --standalone` for more."""
    if nproc == 1:
        return [sys.executable, TRAIN, *overrides]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        TRAIN,
        *overrides,
    ]


def run_command(cmd: list[str], timeout: float, env: dict | None = None, cwd: Path = REPO):
    """subprocess.run(capture_output=True, text=True) in a process group of its own, killed whole when
    the command times out or the test is interrupted; a timeout fails with the command and its output."""
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        out, err = proc.communicate()
        raise AssertionError(
            f"timed out after {timeout:.0f} s: {' '.join(map(str, cmd))}\n"
            f"--- stdout\n{out[-2000:]}\n--- stderr\n{err[-3000:]}"
        ) from None
    except BaseException:
        _kill_group(proc)
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def train(out: Path, nproc: int, *overrides: str, timeout: float = 600) -> Run:
    """One run into `out`, failing with its command and output when it does not succeed."""
    cmd = command(nproc, *overrides, f"trainer.output_dir={out}")
    proc = run_command(cmd, timeout)
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        )
    metrics = out / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    return Run(out, records, proc.stdout, proc.stderr)


def session_root(tmp_path_factory) -> Path:
    """A folder every pytest-xdist worker of this test run shares (the run's base folder without xdist). A
    worker's base folder is RUN/popen-gwN; a pytest a test starts has a base folder of its own."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if base.name.startswith("popen-gw") else base


def once(root: Path, name: str, build: Callable[[Path], T]) -> T:
    """build(folder) once per test run, whichever worker asks first; the others wait on a file lock and get
    the same (pickled) result. An AssertionError from build is remembered and raised to every asker."""
    result = root / f"{name}.pickle"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not result.exists():
            folder = root / name
            shutil.rmtree(folder, ignore_errors=True)  # a worker killed half-way left it
            folder.mkdir(parents=True)
            try:
                found = build(folder)
            except AssertionError as e:
                found = AssertionError(str(e))
            tmp = result.with_suffix(".tmp")
            tmp.write_bytes(pickle.dumps(found))
            tmp.replace(result)
    found = pickle.loads(result.read_bytes())
    if isinstance(found, AssertionError):
        raise found
    return found


class SharedRuns:
    """The session's runs, keyed by (nproc, overrides); each trained the first time any worker asks for it."""

    def __init__(self, root: Path):
        self.root = root

    def get(self, nproc: int, *overrides: str, timeout: float = 600) -> Run:
        name = "run_" + hashlib.sha1(json.dumps([nproc, overrides]).encode()).hexdigest()[:12]
        try:
            return once(self.root, name, lambda out: train(out, nproc, *overrides, timeout=timeout))
        except AssertionError as e:
            raise AssertionError(f"shared run failed (once, for every test that reads it): {e}") from None
