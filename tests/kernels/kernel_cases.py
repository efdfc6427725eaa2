"""Shared cases and checks for the kernel tests: group shapes, random inputs, tolerances, spies."""

import pytest
import torch

# Rows per expert. Sizes are chosen to not be multiples of any block size (16, 32, 64).
GROUP_CASES = {
    "uneven_with_empty": [5, 0, 17, 1, 30, 0],
    "one_row_groups": [1, 1, 0, 1, 1],
    "all_in_one_expert": [0, 0, 45, 0],
    "empty_ends": [0, 23, 0, 0, 9, 0],
}
# Tiny tiles so these tiny shapes still span many m-tiles, n-blocks and k-steps.
SMALL_BLOCKS = dict(block_m=16, block_n=16, block_k=16, block_m_dw=16)

_skip_without_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 kernels need a GPU: "
                                       "the Triton interpreter cannot compute in bf16")


def needs_cuda(test):
    """A GPU-specific kernel test: marked `gpu` (the GPU suite selects them with `-m gpu`), skipped without one."""
    return pytest.mark.gpu(_skip_without_gpu(test))



def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def counts_of(sizes, dtype=torch.int32):
    return torch.tensor(sizes, dtype=dtype, device=device())


def randn(*shape, scale=1.0, dtype=torch.float32, grad=True):
    t = (torch.randn(*shape, dtype=torch.float32, device=device()) * scale).to(dtype)
    return t.requires_grad_(grad)


def gather_for(num_rows, num_tokens, top_k=2):
    """A routing-like gather index: each token appears top_k times, in a shuffled order."""
    idx = torch.arange(num_tokens, device=device()).repeat(top_k)[:num_rows]
    return idx[torch.randperm(idx.numel(), device=device())]


def as_f64(tensors):
    """Float64 leaf copies of the inputs (None stays None), for the reference to run on."""
    return [None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in tensors]


def assert_close(actual, expected, dtype, name=""):
    """Tolerance by dtype, relative to the reference's own scale.

    fp32 (interpreter or GPU, K <= 64): |err| <= 1e-4 * (|ref| + max|ref|).
    fp16: 5e-3 (fp16 output rounding of values of order max|ref|).
    bf16 (GPU only): 2e-2, a few bf16 roundings.
    """
    tol = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}[dtype]
    expected = expected.detach().double().cpu()
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual.detach().double().cpu(), expected, rtol=tol, atol=tol * max(scale, 1e-6),
                               msg=lambda m: f"{name}: {m}")


def check_grads(outputs, inputs, ref_outputs, ref_inputs, dtype):
    """Backprop one random cotangent through both and compare every gradient that exists."""
    names = [n for n, t in inputs.items() if t is not None and t.requires_grad]
    cot = torch.randn_like(outputs)
    got = torch.autograd.grad(outputs, [inputs[n] for n in names], cot)
    want = torch.autograd.grad(ref_outputs, [ref_inputs[n] for n in names], cot.double())
    for name, g, w in zip(names, got, want):
        assert g.dtype == inputs[name].dtype, f"grad of {name} has dtype {g.dtype}"
        assert_close(g, w, dtype, f"d{name}")


class LaunchSpy:
    """Stands in for a @triton.jit kernel object and records the keyword flags of each launch."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.launches = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(kwargs)
            return self.kernel[grid](*args, **kwargs)

        return launch
