import os

import pytest
import torch

# The Triton interpreter must be chosen before triton is first imported; without a GPU the Triton
# kernels run on CPU tensors through it (fp32/fp16 only: it cannot do bf16 arithmetic).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def shared_runs(tmp_path_factory):
    """Training runs shared by every test that asks for the same launcher and overrides (tests/train_runs.py)."""
    from tests.train_runs import SharedRuns

    return SharedRuns(tmp_path_factory.mktemp("shared_runs"))
