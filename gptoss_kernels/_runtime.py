"""Where the Triton kernels may run, how their outputs are allocated, and block-size overrides.

Shared by every kernel family in this package; imports nothing but torch.
"""

import contextlib
import functools
import os

import torch

# triton.jit decides when a kernel is *defined* whether it is compiled or interpreted, so what
# counts is the variable's value when this package was imported, not its value at call time.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

_poison = False
_forced_blocks: dict[str, int] = {}


@functools.cache
def clamp_grad_at_bounds() -> bool:
    """Whether torch.clamp passes the gradient at exactly its bounds: PyTorch 2.13 and earlier do
    (closed range), 2.14 does not (open range). The fused SwiGLU backward follows the installed torch,
    so its gradients equal the torch model's (and transformers') even on +-limit exactly. Decided on
    first use (never at import), under enable_grad so a caller's no_grad cannot break the probe."""
    with torch.enable_grad():
        x = torch.tensor([-1.0, 1.0], requires_grad=True)
        x.clamp(min=-1.0, max=1.0).sum().backward()
    return bool((x.grad == 1.0).all())


def check_tensors(*tensors):
    """Raise if the tensors cannot be handed to a Triton kernel here (wrong device or mixed)."""
    present = [t for t in tensors if t is not None]
    device = present[0].device
    for t in present:
        if t.device != device:
            raise ValueError(f"all tensors must be on one device, got {device} and {t.device}")
    if device.type == "cpu" and not INTERPRETED:
        raise RuntimeError(
            "the Triton expert kernels got CPU tensors but Triton is not in interpreter mode: "
            "use a torch backend (gptoss_kernels.reference) on CPU, or set TRITON_INTERPRET=1 before "
            "importing the kernels package"
        )
    if device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"the Triton expert kernels run on CUDA (or CPU when interpreted), not {device}")


def empty(shape, dtype, device) -> torch.Tensor:
    """An output buffer the kernel must fully overwrite; NaN-filled under `poison_outputs()`."""
    if _poison:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


@contextlib.contextmanager
def poison_outputs(enabled: bool = True):
    """Fill fresh kernel outputs with NaN so a tile the kernel forgets to write fails the tests."""
    global _poison
    previous, _poison = _poison, enabled
    try:
        yield
    finally:
        _poison = previous


@contextlib.contextmanager
def force_blocks(**sizes: int):
    """Override the heuristic block sizes (keys: block_m, block_n, block_k, block_m_dw).

    Tests use it to get many tiles out of tiny shapes; benchmarks use it to sweep configs.
    """
    allowed = {"block_m", "block_n", "block_k", "block_m_dw"}
    unknown = set(sizes) - allowed
    if unknown:
        raise ValueError(f"unknown block sizes {sorted(unknown)}; allowed: {sorted(allowed)}")
    for name, value in sizes.items():
        if value < 16 or value & (value - 1):
            raise ValueError(f"{name}={value}: block sizes must be powers of two >= 16")
    previous = dict(_forced_blocks)
    _forced_blocks.update(sizes)
    try:
        yield
    finally:
        _forced_blocks.clear()
        _forced_blocks.update(previous)


def block(name: str, default: int) -> int:
    """The block size to use: a `force_blocks` override, else the heuristic's `default`."""
    return _forced_blocks.get(name, default)


def forced_any(*names: str) -> bool:
    """Whether `force_blocks` overrides any of these block sizes."""
    return any(name in _forced_blocks for name in names)


def next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()
