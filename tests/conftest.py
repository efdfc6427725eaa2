import os

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
