import os

import pytest
import torch

# The Triton interpreter must be chosen before triton is first imported; without a GPU the Triton
# kernels run on CPU tensors through it (fp32/fp16 only: it cannot do bf16 arithmetic).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    """`gpu`: tests that need a CUDA GPU, the set benchmarks/gpu_suite.sh runs (`-m gpu`): every test
    under tests/gpu/ and, under tests/kernels/, every test with a `gpu` word in its name
    (test_bf16_gpu_...), besides those marked by hand. Without a GPU they skip, as their own skipif says."""
    import pytest

    tests = config.rootpath / "tests"
    for item in items:
        words = getattr(item, "originalname", item.name).split("_")
        if tests / "gpu" in item.path.parents or ("gpu" in words and tests / "kernels" in item.path.parents):
            item.add_marker(pytest.mark.gpu)


@pytest.fixture(scope="session")
def shared_runs(tmp_path_factory):
    """Training runs shared by every test that asks for the same launcher and overrides (tests/train_runs.py)."""
    from tests.train_runs import SharedRuns

    return SharedRuns(tmp_path_factory.mktemp("shared_runs"))


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
    """SAMPLED with its prompts file (SAMPLE_PROMPTS)."""
    prompts = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    prompts.write_text("".join(f"{q}\n" for q in SAMPLE_PROMPTS))
    return [*SAMPLED, f"trainer.sample_prompts={prompts}"]
