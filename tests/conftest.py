import os
import sys

import pytest
import torch

# The ~300 Python processes the tests start each import the engine: with PYTHONDONTWRITEBYTECODE in the
# environment every one of them compiled its sources again (~0.25 s a process). Bytecode is cached here.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
sys.dont_write_bytecode = False

# The Triton interpreter must be chosen before triton is first imported; without a GPU the Triton
# kernels run on CPU tensors through it (fp32/fp16 only: it cannot do bf16 arithmetic).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Under pytest-xdist each worker (and every process its tests start) computes on one thread: two workers on
# two cores then share the machine instead of oversubscribing it (OpenMP threads spin while they wait).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_collection_modifyitems(config, items):
    """`gpu`: tests that need a CUDA GPU, the set benchmarks/gpu_suite.sh runs (`-m gpu`): every test
    under tests/gpu/ and, under tests/kernels/, every test with a `gpu` word in its name
    (test_bf16_gpu_...), besides those marked by hand. Without a GPU they skip, as their own skipif says.

    Under pytest-xdist (`-n 2`, the README's test command; pytest.ini's `--dist loadfile` keeps each file on
    one worker, so a module's fixtures are built once) the files of the longest tests start first (those
    with a time limit of their own above pytest.ini's, then the other slow ones), so they overlap the many
    short ones instead of finishing last.
    """
    tests = config.rootpath / "tests"
    for item in items:
        words = getattr(item, "originalname", item.name).split("_")
        if tests / "gpu" in item.path.parents or ("gpu" in words and tests / "kernels" in item.path.parents):
            item.add_marker(pytest.mark.gpu)
    if hasattr(config, "workerinput"):  # a pytest-xdist worker
        items.sort(key=_longest_first)


def _longest_first(item) -> tuple:
    limit = item.get_closest_marker("timeout")
    return (-(limit.args[0] if limit and limit.args else 0), item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session")
def shared_runs(tmp_path_factory):
    """Training runs shared by every test that asks for the same launcher and overrides (tests/train_runs.py)."""
    from tests.train_runs import SharedRuns, session_root

    return SharedRuns(session_root(tmp_path_factory))


# A one-process tiny_sft run with validation and samples every 2 steps: read by the end-to-end tests of
# what a user does after training (tests/e2e/test_after_training.py) and the reference of the FSDP2
# validation test (tests/distributed/test_torchrun_recipes.py); trained once per session.
SAMPLED = [
    "recipe=tiny_sft",
    "trainer.max_steps=4",
    "optim.warmup_steps=1",
    "trainer.log_every=1",
    "trainer.val_every=2",
    "trainer.sample_every=2",
    "trainer.sample_max_new_tokens=6",
    "trainer.progress=false",
    "parallel.timeout_s=120",
]
SAMPLE_PROMPTS = ("What is 2 + 2?", "Name a colour.")


@pytest.fixture(scope="session")
def sampled_overrides(tmp_path_factory) -> list[str]:
    """SAMPLED with its prompts file (SAMPLE_PROMPTS), at one path for every worker (the runs' key)."""
    from tests.train_runs import once, session_root

    def write(folder):
        (folder / "prompts.txt").write_text("".join(f"{q}\n" for q in SAMPLE_PROMPTS))
        return folder / "prompts.txt"

    return [*SAMPLED, f"trainer.sample_prompts={once(session_root(tmp_path_factory), 'prompts', write)}"]
