"""tests/train_runs.py `once`: what several pytest-xdist workers share is built by one of them."""

import multiprocessing
from pathlib import Path

import pytest

from tests.train_runs import once


def _build(folder: Path) -> str:
    with open(folder.parent / "builds.log", "a") as f:
        f.write(f"{folder.name}\n")
    (folder / "made").write_text("x")
    return str(folder / "made")


def _ask(root: str, start, queue) -> None:
    start.wait()  # both ask at the same moment
    queue.put(once(Path(root), "thing", _build))


def test_two_processes_asking_at_once_build_it_once(tmp_path):
    ctx = multiprocessing.get_context("fork")
    queue, start = ctx.Queue(), ctx.Barrier(2)
    procs = [ctx.Process(target=_ask, args=(str(tmp_path), start, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    got = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert got[0] == got[1] == str(tmp_path / "thing" / "made")
    assert (tmp_path / "builds.log").read_text() == "thing\n"
    assert once(tmp_path, "thing", _build) == got[0]  # a later asker reads it too


def test_a_failed_build_is_remembered_for_every_asker(tmp_path):
    calls = []

    def fail(folder):
        calls.append(folder)
        raise AssertionError("the run failed: exit 2")

    for _ in range(2):
        with pytest.raises(AssertionError, match="the run failed: exit 2"):
            once(tmp_path, "broken", fail)
    assert len(calls) == 1
