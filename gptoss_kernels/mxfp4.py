"""MXFP4 expert weights as the GPT-OSS checkpoints store them, handed to the grouped GEMMs without dequantizing.

One expert projection with `in` inputs and `out` outputs is stored per expert in (out, in) orientation:
    blocks uint8 [E, out, in/32, 16]   two FP4 (E2M1) codes per byte: low nibble = even input, high = odd
    scales uint8 [E, out, in/32]       E8M0: value = FP4[code] * 2**(scale - 127), one scale per 32 inputs
`Mxfp4Weight` wraps the pair and stands for the dense weight [E, in, out] it dequantizes to (the HF layout
the kernels take), so the expert ops accept it wherever they accept that dense weight. `.transpose(1, 2)`
gives the [E, out, in] view the dX products use, as for a dense weight; no data moves either way.

The weights are frozen: nothing here can carry a gradient (the kernels compute none for them). This module
imports only torch, so `gptoss_kernels.reference` can use it without Triton.
"""

from __future__ import annotations

import dataclasses

import torch

GROUP = 32  # inputs per E8M0 scale
BYTES_PER_GROUP = GROUP // 2  # two FP4 codes per byte
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


@dataclasses.dataclass(frozen=True, eq=False)  # (== would compare the tensors elementwise)
class Mxfp4Weight:
    """An MXFP4 expert weight: `blocks` uint8 [E, out, in/32, 16] and `scales` uint8 [E, out, in/32], exactly as
    the checkpoint stores `..._blocks` / `..._scales` (any strides). It stands for the dense [E, in, out] weight
    (`shape`); `transpose(1, 2)` flips it to [E, out, in] (`transposed`), as the dX GEMMs read it."""

    blocks: torch.Tensor
    scales: torch.Tensor
    transposed: bool = False

    def __post_init__(self):
        blocks, scales = self.blocks, self.scales
        if not isinstance(blocks, torch.Tensor) or not isinstance(scales, torch.Tensor):
            raise TypeError("Mxfp4Weight takes two tensors: blocks and scales")
        if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
            raise ValueError(f"MXFP4 blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
        if blocks.dim() != 4 or blocks.shape[-1] != BYTES_PER_GROUP:
            raise ValueError(
                f"MXFP4 blocks must be [experts, out, in/{GROUP}, {BYTES_PER_GROUP}], got shape {tuple(blocks.shape)}"
            )
        if tuple(scales.shape) != tuple(blocks.shape[:3]):
            raise ValueError(
                f"MXFP4 scales must be [experts, out, in/{GROUP}] = {tuple(blocks.shape[:3])} "
                f"(the blocks' shape without its last dimension), got {tuple(scales.shape)}"
            )
        if blocks.device != scales.device:
            raise ValueError(f"MXFP4 blocks and scales must be on one device, got {blocks.device} and {scales.device}")
        if blocks.shape[2] == 0 or blocks.shape[1] == 0:
            raise ValueError(f"MXFP4 weight with no inputs or no outputs: blocks shape {tuple(blocks.shape)}")

    @property
    def num_experts(self) -> int:
        return self.blocks.shape[0]

    @property
    def in_features(self) -> int:
        return self.blocks.shape[2] * GROUP

    @property
    def out_features(self) -> int:
        return self.blocks.shape[1]

    @property
    def shape(self) -> torch.Size:
        """The dense weight's shape: [E, in, out], or [E, out, in] when transposed."""
        e, n_in, n_out = self.num_experts, self.in_features, self.out_features
        return torch.Size((e, n_out, n_in) if self.transposed else (e, n_in, n_out))

    @property
    def device(self) -> torch.device:
        return self.blocks.device

    @property
    def requires_grad(self) -> bool:
        return False  # uint8 storage: frozen by construction

    def dim(self) -> int:
        return 3

    def transpose(self, dim0: int, dim1: int) -> "Mxfp4Weight":
        """The [E, out, in] view (or back): only dims 1 and 2 can swap."""
        if {dim0 % 3, dim1 % 3} != {1, 2}:
            raise ValueError(f"an MXFP4 weight only transposes its last two dimensions, not {dim0} and {dim1}")
        return dataclasses.replace(self, transposed=not self.transposed)

    def expert_slice(self, start: int, stop: int) -> "Mxfp4Weight":
        """Experts start..stop-1 (views, no copy): one rank's experts under expert parallelism."""
        return dataclasses.replace(self, blocks=self.blocks[start:stop], scales=self.scales[start:stop])

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.blocks, self.scales

    def packed_bytes(self) -> int:
        return self.blocks.numel() + self.scales.numel()


def is_mxfp4(w) -> bool:
    return isinstance(w, Mxfp4Weight)


def split(w) -> tuple:
    """A weight as two tensors (or None) for autograd's save_for_backward: (blocks, scales) or (w, None)."""
    return w.tensors() if isinstance(w, Mxfp4Weight) else (w, None)


def join(first, second, transposed: bool = False):
    """The weight `split` took apart."""
    return first if second is None else Mxfp4Weight(first, second, transposed)


def tensors_of(*weights) -> list:
    """The tensors behind dense weights (themselves) and MXFP4 ones (blocks, scales), for device checks."""
    return [t for w in weights for t in (w.tensors() if isinstance(w, Mxfp4Weight) else (w,))]
