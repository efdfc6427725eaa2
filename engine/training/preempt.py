"""Preemption: a scheduler's SIGTERM (or SIGUSR1; `trainer.preempt_signals`) stops the run at the next step
boundary with a checkpoint there, so that rerunning the same command resumes exactly where it stopped.

The signal handler only notes the signal. After each step every rank reports whether it saw one (one small
all-reduce, so all ranks stop after the same step, whichever received the signal); the run then completes
any save in flight, saves the step's checkpoint (synchronously), rank 0 says so in one line, and every rank
exits with PREEMPTED_EXIT_CODE (75, sysexits' EX_TEMPFAIL: "try again"; a user error is 2).

`trainer.preempt_grace_s` bounds the time from the first signal to the end of that checkpoint: past it the
run stops at once without it (the previous checkpoint stays). A second signal stops it at once too. The
same signal arriving twice within `SAME_SIGNAL_S` counts once: a scheduler that signals every process and
torchrun, which forwards the signal it receives to its ranks, deliver it twice.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time

import torch
import torch.distributed as dist

from engine.errors import ConfigError

log = logging.getLogger(__name__)

PREEMPTED_EXIT_CODE = 75
SAME_SIGNAL_S = 1.0


class Preempted(Exception):
    """The run stopped at a step boundary after a preemption signal, its checkpoint saved: exit code 75."""


def _signal_numbers(names) -> list[signal.Signals]:
    if isinstance(names, str):
        raise ConfigError(f"trainer.preempt_signals={names!r} must be a list of signal names, e.g. [SIGTERM,SIGUSR1]")
    out = []
    for name in names:
        sig = getattr(signal.Signals, str(name).upper(), None)
        if sig is None or sig in (signal.SIGKILL, signal.SIGSTOP):
            raise ConfigError(
                f"trainer.preempt_signals: {name!r} is not a signal a run can catch; use names such as "
                "SIGTERM or SIGUSR1, or [] for none"
            )
        out.append(sig)
    return out


class PreemptWatch:
    """Notes preemption signals while installed (between `install` and `restore`); `agreed` is the step
    boundary's check, called by every rank after every step."""

    def __init__(self, cfg):
        self.signals = _signal_numbers(cfg.trainer.preempt_signals)
        self.grace_s = float(cfg.trainer.preempt_grace_s)
        self.received: signal.Signals | None = None
        self.since = 0.0
        self.checkpoints = f"{cfg.trainer.output_dir}/checkpoints"  # named when the grace runs out
        self._previous: dict = {}
        self._timer: threading.Timer | None = None

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def restore(self) -> None:
        """The signals' previous handlers back (a signal from now on acts as it did before the run)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _on_signal(self, signum, frame) -> None:
        now = time.monotonic()
        if self.received is None:
            self.received, self.since = signal.Signals(signum), now
            self._timer = threading.Timer(self.grace_s, self._grace_over)
            self._timer.daemon = True
            self._timer.start()
            return
        if signum == self.received and now - self.since < SAME_SIGNAL_S:
            return  # the same signal delivered twice (scheduler and torchrun)
        _stop_now(f"second signal {signal.Signals(signum).name}: stopped at once, without a checkpoint", signum)

    def _grace_over(self) -> None:
        _stop_now(
            f"the preemption checkpoint did not finish within trainer.preempt_grace_s={self.grace_s:g} s: "
            f"stopped without it; a rerun resumes from the newest complete checkpoint in {self.checkpoints}",
            self.received,
        )

    def agreed(self, rt) -> bool:
        """True on every rank when any rank received a preemption signal (a collective: every rank calls it)."""
        flag = self.received is not None
        if not rt.mesh.distributed:
            return flag
        t = torch.tensor([int(flag)], dtype=torch.int64, device=rt.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def done(self) -> None:
        """The preemption checkpoint is written: the grace timer stops."""
        if self._timer is not None:
            self._timer.cancel()

    def stopped(self, rt, step: int, path) -> Preempted:
        """The one line (rank 0), and the exception that ends the run with PREEMPTED_EXIT_CODE."""
        name = self.received.name if self.received is not None else "a preemption signal on another rank"
        line = (
            f"preempted ({name}): stopped after step {step}, checkpoint {path} saved; rerun the same command to "
            f"resume from it (exit code {PREEMPTED_EXIT_CODE})"
        )
        (log.warning if rt.is_main else log.info)(line)
        return Preempted(line)


def _stop_now(message: str, signum) -> None:
    rank = os.environ.get("RANK", "0")
    try:
        print(f"error (rank {rank}): {message}", file=sys.stderr, flush=True)
    finally:
        os._exit(128 + int(signum))
