"""Preemption and a killed export, through engine/train.py as a scheduler meets it.

A SIGTERM sent once a step line has appeared (never after a fixed wait) stops the run at the next step
boundary with a checkpoint there and exit code 75; rerunning the same command continues it bit for bit
(the whole metrics.jsonl and the final weights equal the uninterrupted run's, one process and EP2
under torchrun). A run killed while writing its final export finishes that export on the rerun.

The uninterrupted references are the shared synthetic runs of tests/distributed/test_torchrun_recipes.py
(tests/train_runs.py), trained once per session.
"""

import json
import os
import signal
import subprocess
import sys
import threading

import pytest
import torch
from safetensors.torch import load_file

from engine.export import gather_trained_weights
from engine.train import REPO
from engine.training.preempt import PREEMPTED_EXIT_CODE
from tests.distributed.test_torchrun_recipes import _overrides
from tests.train_runs import TRAIN, command, train

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _until_then(cmd, out, marker: str, sig: signal.Signals, timeout: float = 400):
    """Run `cmd` (its own process group), send `sig` to it once a stdout line contains `marker`, and wait
    for its end: (returncode, stdout, stderr). The whole group is killed past `timeout`."""
    err_file = out.parent / f"{out.name}.stderr"
    with open(err_file, "w") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True)
    timer = threading.Timer(timeout, lambda: os.killpg(proc.pid, signal.SIGKILL))
    timer.start()
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if marker in line:
                proc.send_signal(sig)
                break
        lines.append(proc.stdout.read())
        proc.wait()
    finally:
        timer.cancel()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert any(marker in line for line in lines), f"{marker!r} never appeared:\n{''.join(lines)[-3000:]}"
    return proc.returncode, "".join(lines), err_file.read_text()


def _losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def _preempted_step(stdout: str) -> int:
    said = [line for line in stdout.splitlines() if "preempted (SIGTERM)" in line]
    assert len(said) == 1, stdout[-3000:]
    assert f"exit code {PREEMPTED_EXIT_CODE}" in said[0] and "rerun the same command" in said[0], said
    return int(said[0].split("stopped after step ")[1].split(",")[0])


def _check_preempted_then_resumed(straight, out, nproc, overrides, stdout):
    step = _preempted_step(stdout)
    assert 1 <= step < 6, stdout[-3000:]  # the signal came after step 1's line, long before step 6
    names = [p.name for p in (out / "checkpoints").iterdir()]
    assert f"step_{step:07d}" in names and not (out / "hf").exists(), names
    resumed = train(out, nproc, *overrides)  # the same command again
    assert f"resumed from {out / 'checkpoints' / f'step_{step:07d}'} at step {step}" in resumed.stdout
    assert _losses(out) == _losses(straight.out)  # every step's loss, bit for bit
    a = gather_trained_weights(straight.out / "checkpoints" / "step_0000006")
    b = gather_trained_weights(out / "checkpoints" / "step_0000006")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (out / "hf" / "config.json").is_file()


def test_sigterm_saves_at_the_step_boundary_and_the_rerun_resumes_bit_exact(shared_runs, tmp_path):
    # One process, checkpoints every step written in the background: the save in flight is completed
    # and is the preemption checkpoint.
    overrides = [*_overrides("tiny_sft", 1), "checkpoint.every=1", "checkpoint.async=true"]
    out = tmp_path / "run"
    rc, stdout, stderr = _until_then(
        command(1, *overrides, f"trainer.output_dir={out}"), out, "step 1/6", signal.SIGTERM
    )
    assert rc == PREEMPTED_EXIT_CODE, stdout[-2000:] + stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    straight = shared_runs.get(1, *_overrides("tiny_sft", 1))
    _check_preempted_then_resumed(straight, out, 1, [*overrides, f"trainer.output_dir={out}"], stdout)


def test_sigterm_to_torchrun_at_ep2_saves_and_the_rerun_resumes_bit_exact(shared_runs, tmp_path):
    # The scheduler signals torchrun, which forwards SIGTERM to both ranks; both stop after the same step.
    overrides = _overrides("tiny_sft", 2)
    out = tmp_path / "run"
    rc, stdout, stderr = _until_then(
        command(2, *overrides, f"trainer.output_dir={out}"), out, "step 1/6", signal.SIGTERM
    )
    # torchrun itself ends with its own SignalException traceback (exit code 1) after the ranks'
    # exit code 75; our one line is on rank 0's stdout before it.
    assert rc == 1, stdout[-2000:]
    assert "SignalException" in stderr, stderr[-3000:]
    straight = shared_runs.get(2, *overrides)
    _check_preempted_then_resumed(straight, out, 2, [*overrides, f"trainer.output_dir={out}"], stdout)


KILLED_IN_EXPORT = """
import runpy, sys, time
from engine.checkpoint.hf import safetensors_io
from engine.peft import peft_format
def writing(*args, **kwargs):
    print("writing the export", flush=True)
    time.sleep(300)  # killed in here, inside the partial folder
safetensors_io.ShardWriter.finish = peft_format.save_file = writing  # the HF and the adapter export
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize(
    "recipe,export,weights",
    [("tiny_sft", "hf", "model.safetensors"), ("tiny_lora", "adapter", "adapter_model.safetensors")],
)
def test_a_run_killed_in_its_final_export_finishes_the_export_on_the_rerun(
    shared_runs, tmp_path, recipe, export, weights
):
    overrides = _overrides(recipe, 1)
    out = tmp_path / "run"
    cmd = [sys.executable, "-c", KILLED_IN_EXPORT, TRAIN, *overrides, f"trainer.output_dir={out}"]
    rc, stdout, _ = _until_then(cmd, out, "writing the export", signal.SIGKILL)
    assert rc == -signal.SIGKILL
    partials = [p.name for p in out.iterdir() if p.name.startswith(f".{export}.partial-")]
    assert len(partials) == 1 and not (out / export).exists(), sorted(p.name for p in out.iterdir())
    assert (out / "checkpoints" / "step_0000006" / "meta.json").is_file()

    again = train(out, 1, *overrides)  # the same command: no training, the export finished
    assert "resumed from" not in again.stdout and "step 1/6" not in again.stdout, again.stdout
    said = [line for line in again.stdout.splitlines() if "export" in line and "never completed" in line]
    assert len(said) == 1, again.stdout
    assert not [p for p in out.iterdir() if p.name.startswith(f".{export}.")], sorted(p.name for p in out.iterdir())
    straight = shared_runs.get(1, *overrides)
    a, b = (load_file(run / export / weights) for run in (straight.out, out))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    config = "config.json" if export == "hf" else "adapter_config.json"
    assert (out / export / config).read_text() == (straight.out / export / config).read_text()

    refused = subprocess.run(command(1, *overrides, f"trainer.output_dir={out}"), capture_output=True, text=True)
    assert refused.returncode == 2 and "finished run" in refused.stderr  # exported: finished for good


SIGNAL_IN_FINAL_SAVE = """
import runpy, sys, time
from engine.training import preempt
from engine.training.checkpointer import Checkpointer
watches, init, final = [], preempt.PreemptWatch.__init__, Checkpointer.final
def noted(self, cfg):
    init(self, cfg)
    watches.append(self)
def final_after_the_signal(self, bad_steps):
    print("final save", flush=True)
    while watches[0].received is None:  # the signal arrives during the final save
        time.sleep(0.01)
    return final(self, bad_steps)
preempt.PreemptWatch.__init__, Checkpointer.final = noted, final_after_the_signal
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_a_signal_during_the_final_save_keeps_it_and_the_rerun_exports(shared_runs, tmp_path):
    overrides = _overrides("tiny_sft", 1)
    out = tmp_path / "run"
    cmd = [sys.executable, "-c", SIGNAL_IN_FINAL_SAVE, TRAIN, *overrides, f"trainer.output_dir={out}"]
    rc, stdout, stderr = _until_then(cmd, out, "final save", signal.SIGTERM)
    assert rc == PREEMPTED_EXIT_CODE, stdout[-2000:] + stderr[-3000:]
    assert _preempted_step(stdout) == 6 and not (out / "hf").exists()
    again = train(out, 1, *overrides)
    assert "never completed" in again.stdout and "resumed from" not in again.stdout, again.stdout
    straight = shared_runs.get(1, *overrides)
    assert _losses(out) == _losses(straight.out)
    a, b = (load_file(run / "hf" / "model.safetensors") for run in (straight.out, out))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
