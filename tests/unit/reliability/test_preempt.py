"""The preemption handler's own rules, in a process of its own: a second signal and a grace period that
runs out stop the process at once with one line; the same signal delivered twice counts once."""

import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from engine.errors import ConfigError
from engine.train import REPO
from engine.training.preempt import PREEMPTED_EXIT_CODE, PreemptWatch

WATCHED = """
import os, signal, sys, time
from types import SimpleNamespace
from engine.training.preempt import PreemptWatch
trainer = SimpleNamespace(preempt_signals=["SIGTERM", "SIGUSR1"], preempt_grace_s=float(sys.argv[1]), output_dir="out")
watch = PreemptWatch(SimpleNamespace(trainer=trainer))
watch.install()
os.kill(os.getpid(), signal.SIGTERM)
os.kill(os.getpid(), signal.SIGTERM)  # the same signal again at once: torchrun forwarding the scheduler's
time.sleep(0.1)
print("noted", watch.received.name, flush=True)
if sys.argv[2] == "second":
    time.sleep(1.5)
    os.kill(os.getpid(), signal.SIGUSR1)
time.sleep(60)
print("not stopped", flush=True)
"""


def _watched(grace_s: float, then: str) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", WATCHED, str(grace_s), then], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    return proc, time.monotonic() - t0


def test_a_second_signal_stops_at_once_and_a_repeated_one_counts_once():
    proc, _ = _watched(60, "second")
    assert proc.stdout.splitlines() == ["noted SIGTERM"], proc.stdout + proc.stderr
    assert proc.returncode == 128 + signal.SIGUSR1
    lines = proc.stderr.strip().splitlines()
    assert lines == ["error (rank 0): second signal SIGUSR1: stopped at once, without a checkpoint"], proc.stderr


def test_the_grace_period_bounds_the_wait():
    proc, seconds = _watched(0.5, "wait")
    assert proc.returncode == 128 + signal.SIGTERM, proc.stdout + proc.stderr
    assert seconds < 30  # the script sleeps 60 s after the signal
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "trainer.preempt_grace_s=0.5 s" in lines[0] and "out/checkpoints" in lines[0], lines


def _cfg(signals, grace=25.0):
    return SimpleNamespace(trainer=SimpleNamespace(preempt_signals=signals, preempt_grace_s=grace, output_dir="o"))


def test_signals_are_named_and_restored():
    with pytest.raises(ConfigError, match="trainer.preempt_signals: 'SIGNOPE'"):
        PreemptWatch(_cfg(["SIGTERM", "SIGNOPE"]))
    with pytest.raises(ConfigError, match=r"trainer.preempt_signals='SIGTERM' must be a list"):
        PreemptWatch(_cfg("SIGTERM"))
    with pytest.raises(ConfigError, match="SIGKILL"):
        PreemptWatch(_cfg(["SIGKILL"]))
    before = signal.getsignal(signal.SIGUSR1)
    watch = PreemptWatch(_cfg(["sigusr1"]))
    watch.install()
    assert signal.getsignal(signal.SIGUSR1) == watch._on_signal
    watch.restore()
    assert signal.getsignal(signal.SIGUSR1) == before
    rt = SimpleNamespace(mesh=SimpleNamespace(distributed=False))
    assert watch.agreed(rt) is False
    assert PreemptWatch(_cfg([])).signals == []
    assert PREEMPTED_EXIT_CODE not in (0, 1, 2) and PREEMPTED_EXIT_CODE < 128  # not a user error, not a signal's
