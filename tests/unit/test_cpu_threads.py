"""CPU runs take OMP_NUM_THREADS at its word, else share the usable cores among torchrun's local processes."""

import os

import pytest
import torch

from engine.training.runtime import set_cpu_threads


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def test_omp_num_threads_is_kept(monkeypatch, restore_threads):
    # More threads than cores beside other busy processes spin-wait for each other: the run crawls.
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert set_cpu_threads() == 3 and torch.get_num_threads() == 3


@pytest.mark.parametrize("value", [None, "", "0", "two"])
def test_without_a_usable_omp_num_threads_the_cores_are_shared(monkeypatch, restore_threads, value):
    if value is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", value)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert set_cpu_threads() == _cores() == torch.get_num_threads()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(2 * _cores()))
    assert set_cpu_threads() == 1 == torch.get_num_threads()
