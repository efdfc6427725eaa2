"""The NaN guard never lets a state reached through skipped steps push a good checkpoint out, and
says so; a resume truncates metrics.jsonl to its step and re-plans a changed schedule, saying so."""

import math
import shutil

import pytest

from tests.e2e.test_user_errors import SMALL, _run, _strict_records

# Each test trains through engine/train.py.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def skipped_once(tmp_path_factory):
    """6 steps, a checkpoint every 2, step 3's gradient non-finite (skipped). Read-only."""
    out = tmp_path_factory.mktemp("nan") / "run"
    proc, _ = _run(
        "recipe=tiny_sft",
        *SMALL,
        "trainer.max_steps=6",
        "checkpoint.every=2",
        "checkpoint.keep=2",
        f"trainer.output_dir={out}",
        nan_steps=(3, 3),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_checkpoint_after_a_skipped_step_is_withheld_and_said(skipped_once):
    out, proc = skipped_once
    # step 4's interval held the skipped step 3: not saved, so it cannot prune step 2 (keep=2)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000002", "step_0000006"]
    assert "step 3: non-finite loss/gradient" in proc.stdout
    assert "step 4: checkpoint not saved: 1 step(s) since the last checkpoint step were skipped" in proc.stdout
    assert "final checkpoint" not in proc.stdout  # steps 5-6 were clean: the final one is a good one
    records = _strict_records(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6] and records[2]["grad_norm"] is None
    assert (out / "hf" / "config.json").is_file()


def test_final_checkpoint_after_skipped_steps_keeps_the_last_good_one(tmp_path):
    out = tmp_path / "run"
    proc, _ = _run(
        "recipe=tiny_sft",
        *SMALL,
        "trainer.max_steps=4",
        "checkpoint.every=2",
        "checkpoint.keep=1",
        f"trainer.output_dir={out}",
        nan_steps=(4, 4),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # keep=1 would have pruned step 2; the final state follows a skipped step, so step 2 stays too
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000002", "step_0000004"]
    assert "follows 1 skipped non-finite step(s); the last checkpoint without any is" in proc.stdout
    assert str(out / "checkpoints" / "step_0000002") in proc.stdout


def _cosine(lr, min_ratio, max_steps, step):  # warmup 0; an independent statement of the schedule
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, step / max_steps))))


def test_resume_truncates_metrics_and_replans_a_changed_schedule(skipped_once, tmp_path):
    first, _ = skipped_once
    out = tmp_path / "run"
    shutil.copytree(first / "checkpoints" / "step_0000002", out / "checkpoints" / "step_0000002")
    shutil.copy(first / "metrics.jsonl", out / "metrics.jsonl")  # steps 1-6 of the first run
    proc, _ = _run("recipe=tiny_sft", *SMALL, "trainer.max_steps=8", "optim.lr=1e-3", f"trainer.output_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (
        "resume: optim.lr 0.003 -> 0.001, trainer.max_steps 6 -> 8 changed since the checkpoint; the schedule "
        "is re-planned with the current values from step 3 on"
    ) in proc.stdout
    records = _strict_records(out / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 9))  # replayed steps 3-6 logged once
    assert records[:2] == _strict_records(first / "metrics.jsonl")[:2]
    for r in records[2:]:  # tiny_sft: min_lr_ratio 0.1; SMALL: no warmup
        assert r["lr"] == pytest.approx(_cosine(1e-3, 0.1, 8, r["step"] - 1), rel=1e-12), r
    lrs = [r["lr"] for r in records[2:]]
    assert lrs == sorted(lrs, reverse=True)  # decays from the resumed step; it does not rise again
