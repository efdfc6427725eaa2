"""Every user error through engine/train.py, as a user meets it: exit code 2, one short line on
stderr naming the key or file, no traceback, within seconds."""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from engine.train import REPO
from tests.train_runs import run_command

SMALL = [
    "data.max_seq_len=128",
    "data.global_batch_size=2",
    "data.micro_batch_size=2",
    "trainer.val_every=0",
    "optim.warmup_steps=0",
    "trainer.log_every=1",
]

# Runs engine/train.py with the trainer's gradient norm made non-finite from step BAD_FROM on (1-based)
# through step BAD_TO: the NaN guard's input, without waiting for a real divergence.
NAN_INJECTOR = """
import runpy, sys
import engine.training.step as trainer
train_py, bad_from, bad_to = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
real, calls = trainer.clip_grad_norm, [0]
def clip(model, mesh, max_norm):
    calls[0] += 1
    norm = real(model, mesh, max_norm)
    return norm * float("nan") if bad_from <= calls[0] <= bad_to else norm
trainer.clip_grad_norm = clip
sys.argv = [train_py] + sys.argv[4:]
runpy.run_path(train_py, run_name="__main__")
"""


def _run(*overrides, env=None, nan_steps=None, timeout=300):
    if nan_steps:  # `python -c` puts "-c" in argv[0]: train.py goes there for runpy and Hydra
        cmd = [
            sys.executable,
            "-c",
            NAN_INJECTOR,
            str(REPO / "engine" / "train.py"),
            str(nan_steps[0]),
            str(nan_steps[1]),
            *overrides,
        ]
    else:
        cmd = [sys.executable, str(REPO / "engine" / "train.py"), *overrides]
    t0 = time.perf_counter()
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, env={**os.environ, **(env or {})}
    )
    return proc, time.perf_counter() - t0


def _one_line_error(proc, *named):
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr and "HYDRA_FULL_ERROR" not in proc.stderr, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error (rank 0): "), proc.stderr
    for text in named:
        assert text in lines[0], (text, lines[0])
    return lines[0]


CONFIG_ERRORS = [
    (["optim.grad_clip=-1"], ["ConfigError", "optim.grad_clip=-1.0"]),
    (["optim.grad_clip=0"], ["optim.grad_clip=0.0"]),
    (["optim.min_lr_ratio=-3"], ["optim.min_lr_ratio=-3.0"]),
    (["optim.betas=[2,0.5]"], ["optim.betas[0]=2"]),
    (["optim.lr=nan"], ["optim.lr=nan"]),
    (["trainer.log_every=0"], ["trainer.log_every=0"]),
    (["optim.warmup_steps=-1"], ["optim.warmup_steps=-1"]),
    (["trainer.max_stepz=3"], ["unknown config key 'trainer.max_stepz'", "did you mean 'trainer.max_steps'"]),
    (["optimm.lr=1"], ["unknown config key 'optimm.lr'", "'optim'"]),
    (["+trainer.max_stepz=3"], ["trainer.max_stepz", "trainer.max_steps"]),
    (["trainer.max_steps=many"], ["trainer.max_steps='many'"]),
    (["optim.betas=0.9"], ["ConfigError", "optim.betas=0.9 must be a list [float, float]"]),
    (["~trainer"], ["ConfigError", "'~trainer' deletes the required group 'trainer'"]),
]


@pytest.mark.parametrize("overrides,named", CONFIG_ERRORS, ids=[c[0][0] for c in CONFIG_ERRORS])
def test_bad_setting_is_one_line_and_exit_2(tmp_path, overrides, named):
    proc, seconds = _run("recipe=tiny_sft", f"trainer.output_dir={tmp_path / 'run'}", *overrides)
    _one_line_error(proc, *named)
    assert seconds < 60  # refused at start-up (about 3 s on a 2-core CPU), not after loading anything
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# engine/train.py as the entry script, reporting at exit whether torch was imported.
TORCH_AT_EXIT = """
import atexit, runpy, sys
atexit.register(lambda: print("torch imported:", "torch" in sys.modules, file=sys.stderr))
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("args", [("--help",), ("recipe=tiny_sft", "optim.grad_clip=-1")], ids=["help", "error"])
def test_help_and_a_config_error_import_no_torch(tmp_path, args):
    # A typo costs the time to read the config (about 1 s), not a torch import (about 2 s of CPU).
    cmd = [sys.executable, "-c", TORCH_AT_EXIT, str(REPO / "engine" / "train.py"), *args]
    proc = subprocess.run(
        [*cmd, f"trainer.output_dir={tmp_path}"], capture_output=True, text=True, timeout=60, cwd=REPO
    )
    assert proc.returncode == (0 if args == ("--help",) else 2), proc.stderr[-3000:]
    assert "torch imported: False" in proc.stderr, proc.stderr[-3000:]
    assert ("optim.grad_clip" in proc.stdout) if args == ("--help",) else ("optim.grad_clip=-1.0" in proc.stderr)


def test_unknown_recipe_is_one_line_listing_the_recipes(tmp_path):
    proc, _ = _run("recipe=no_such_recipe", f"trainer.output_dir={tmp_path}")
    _one_line_error(proc, "recipe='no_such_recipe'", "tiny_sft", "gptoss20b_lora")


def test_output_folder_that_cannot_be_written(tmp_path):
    # /sys refuses new entries to everyone, root included: the PermissionError of a real run.
    proc, _ = _run("recipe=tiny_sft", "trainer.output_dir=/sys/engine_test_run")
    _one_line_error(proc, "StorageError", "trainer.output_dir='/sys/engine_test_run'", "not writable")


def test_output_folder_that_is_a_file(tmp_path):
    (tmp_path / "taken").write_text("x")
    proc, _ = _run("recipe=tiny_sft", f"trainer.output_dir={tmp_path / 'taken'}")
    _one_line_error(proc, "is a file, not a folder")


@pytest.mark.slow
def test_what_would_fail_after_step_1_is_one_line_before_it(tmp_path):
    # A plan over this machine's memory (not a 149 GiB allocation's traceback), then a checkpoints/
    # folder that cannot be created (not a failed save after the training).
    proc, _ = _run("recipe=tiny_sft", *SMALL, f"trainer.output_dir={tmp_path / 'a'}", "data.max_seq_len=10000000000")
    _one_line_error(proc, "PlanError", "per process exceeds 95% of this machine's", "data.max_seq_len")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "checkpoints").write_text("x")
    proc, _ = _run("recipe=tiny_sft", *SMALL, f"trainer.output_dir={tmp_path / 'b'}", "trainer.max_steps=2")
    _one_line_error(proc, "StorageError", "its checkpoints/ folder", "is a file")
    assert not any((tmp_path / d / "metrics.jsonl").exists() for d in "ab")


def test_cuda_without_a_gpu(tmp_path):
    proc, _ = _run(
        "recipe=tiny_sft", f"trainer.output_dir={tmp_path}", "trainer.device=cuda", env={"CUDA_VISIBLE_DEVICES": ""}
    )
    _one_line_error(proc, "ConfigError", "trainer.device='cuda'", "trainer.device=cpu")


TRAINED = ["recipe=tiny_sft", *SMALL, "trainer.max_steps=2"]


@pytest.fixture(scope="module")
def trained(shared_runs):
    """A tiny_sft run of 2 steps: its output folder holds the step-2 checkpoint. Read-only (shared with
    tests/e2e/test_export_usable.py)."""
    return shared_runs.get(1, *TRAINED).out


def _copy_run(trained, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained / "checkpoints", out / "checkpoints")
    return out


@pytest.mark.slow
def test_resume_with_changed_data_is_one_line(trained, tmp_path):
    out = _copy_run(trained, tmp_path)
    sample = (REPO / "engine" / "data" / "assets" / "sample_chat.jsonl").read_text().splitlines()
    (tmp_path / "fewer.jsonl").write_text("\n".join(sample[: len(sample) // 2]) + "\n")
    proc, _ = _run(
        "recipe=tiny_sft",
        *SMALL,
        "trainer.max_steps=4",
        f"trainer.output_dir={out}",
        f"data.train_path={tmp_path / 'fewer.jsonl'}",
    )
    line = _one_line_error(proc, "ResumeError", "step_0000002", "same data", "trainer.resume=none")
    assert line.count("resume with") == 1 and "trainer.output_dir" in line, line  # each piece of advice once


@pytest.mark.slow
def test_resume_with_another_recipe_is_one_line(trained, tmp_path):
    out = _copy_run(trained, tmp_path)
    proc, _ = _run("recipe=tiny_lora", *SMALL, "trainer.max_steps=4", f"trainer.output_dir={out}")
    _one_line_error(proc, "ResumeError", "step_0000002", "lacks trained weights")


def _strict_records(path):
    def refuse(token):
        raise ValueError(token)

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_nan_guard_stop_is_one_line_and_names_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "run"
    proc, _ = _run(
        "recipe=tiny_sft",
        *SMALL,
        "trainer.max_steps=6",
        "checkpoint.every=2",
        "trainer.max_bad_steps=1",
        f"trainer.output_dir={out}",
        nan_steps=(3, 99),
    )
    line = _one_line_error(
        proc,
        "DivergenceError",
        "stopped at step 4",
        "trainer.max_bad_steps=1",
        str(out / "checkpoints" / "step_0000002"),
        "lower optim.lr",
    )
    assert "nothing was saved after them" in line
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000002"]  # no state after a skip
    records = _strict_records(out / "metrics.jsonl")  # strict JSON: null, never NaN
    # the stopping step raises before its record; its warning is in the log
    assert [r["step"] for r in records] == [1, 2, 3] and records[2]["grad_norm"] is None
    assert [r["skipped_steps"] for r in records] == [0, 0, 1]
    assert "step 4: non-finite loss/gradient" in proc.stdout


@pytest.mark.slow
def test_under_torchrun_a_config_error_is_said_once(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(REPO / "engine" / "train.py"),
        "recipe=tiny_sft",
        f"trainer.output_dir={tmp_path}",
        "optim.lr=nan",
    ]
    proc = run_command(cmd, timeout=300)  # its own process group: a hung rank is killed with torchrun
    ours = [x for x in proc.stderr.splitlines() if x.startswith("error (rank")]
    assert proc.returncode != 0 and "exitcode  : 2" in proc.stderr  # torchrun reports our exit code 2
    assert ours == [ours[0]] and "optim.lr=nan" in ours[0], proc.stderr  # one line, not one per rank


def test_a_rank_that_leaves_the_error_to_its_first_rank_outlives_it(tmp_path):
    # torchrun stops a node's other ranks at the first exit: a silent rank that exited first could stop
    # rank 0 before its line was out (the error said by nobody). It waits until torchrun ends it.
    def start(rank):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
        argv = [sys.executable, str(REPO / "engine" / "train.py"), "recipe=tiny_sft", f"trainer.output_dir={tmp_path}"]
        return subprocess.Popen(
            [*argv, "optim.lr=nan"], env=env, cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )

    silent, first = start(1), start(0)
    try:
        _, err = first.communicate(timeout=120)
        assert first.returncode == 2 and err.startswith("error (rank 0): ") and "optim.lr=nan" in err, err
        with pytest.raises(subprocess.TimeoutExpired):  # it has met the error by now, and waits on
            silent.wait(timeout=3)
    finally:
        silent.kill()
    assert silent.communicate()[1] == ""  # and said nothing itself
