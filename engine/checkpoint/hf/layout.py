"""A GPT-OSS checkpoint directory seen in our tensor layout (= the HF BF16 names and shapes).

`HFCheckpoint` reads config.json, tells the BF16/FP32 layout from MXFP4, checks every tensor's name,
shape and dtype against the config before any data is read (a wrong checkpoint fails in seconds, not
after an hour of loading), then fills destination tensors row range by row range: a few experts, or
a few thousand embedding rows, at a time, so the extra memory is a chunk, never a whole tensor.

MXFP4 expert weights are stored (out, in): `gate_up_proj_blocks` [E, 2I, H/32, 16] dequantizes to
[E, 2I, H] and is transposed to our [E, H, 2I]; `down_proj_blocks` [E, H, I/32, 16] -> [E, H, I] ->
[E, I, H]. down_proj is square in the published models, so only the transposition makes it right.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from engine.checkpoint.errors import CheckpointError
from engine.checkpoint.hf.mxfp4 import GROUP, check_mxfp4_shapes, dequantize_mxfp4
from engine.checkpoint.hf.safetensors_io import SafetensorsIndex
from engine.models.gpt_oss import GptOssConfig, GptOssForCausalLM, ModelOptions
from engine.parallel.placement import placement

QUANTIZED_SUFFIXES = (".mlp.experts.gate_up_proj", ".mlp.experts.down_proj")  # MXFP4 in published checkpoints
# Tensors some exports carry that no GPT-OSS weight depends on (rope tables are recomputed from config).
HARMLESS_EXTRAS = re.compile(r"rotary_emb\.inv_freq$")
FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
CHUNK_BYTES = 128 * 2**20  # budget of one read, counted at 4 bytes per value (the fp32 dequantization)


def full_shapes(config: GptOssConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of the whole (single-rank) model, by HF name, taken from the model itself on meta."""
    with torch.device("meta"):
        model = GptOssForCausalLM(config, ModelOptions())
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def expert_tensor_names(config: GptOssConfig) -> set[str]:
    """The HF names of the expert tensors (one row per expert along dim 0), read from the model's tags
    (engine.parallel.placement) on the meta device."""
    with torch.device("meta"):
        model = GptOssForCausalLM(config, ModelOptions())
    return {name for name, expert in placement(model).items() if expert}


def _quant_method(config_file: Path) -> str | None:
    qc = json.loads(config_file.read_text()).get("quantization_config")
    if not qc:
        return None
    method = qc.get("quant_method") if isinstance(qc, dict) else qc
    if method != "mxfp4":
        raise CheckpointError(
            config_file,
            f"quantization_config.quant_method={method!r} is not supported; this engine reads "
            "BF16/FP16/FP32 checkpoints and MXFP4 ('mxfp4', the published gpt-oss format). Dequantize it to "
            "BF16 first (e.g. with transformers) and point at that copy",
        )
    return method


class HFCheckpoint:
    """A checked GPT-OSS checkpoint directory: `config`, `quantization` (None | 'mxfp4'), `shapes`."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.config_file = self.directory / "config.json"
        self.config = GptOssConfig.from_hf_dir(self.directory)  # ConfigError naming config.json if not GPT-OSS
        self.quantization = _quant_method(self.config_file)
        self.tensors = SafetensorsIndex(self.directory)
        self.shapes = full_shapes(self.config)
        self._check()

    def is_quantized(self, name: str) -> bool:
        return self.quantization == "mxfp4" and name.endswith(QUANTIZED_SUFFIXES)

    # ------------------------------------------------------------------ validation
    def _stored(self, name: str) -> dict[str, tuple[tuple[int, ...], str]]:
        """The stored tensors behind our tensor `name`: stored name -> (shape, 'float' | 'uint8')."""
        shape = self.shapes[name]
        if not self.is_quantized(name):
            return {name: (shape, "float")}
        experts, fan_in, fan_out = shape
        if fan_in % GROUP:
            raise CheckpointError(
                self.config_file,
                f"{name} has {fan_in} inputs per row, not a multiple of "
                f"{GROUP}, so it cannot be stored as MXFP4; the config does not fit this format",
            )
        groups = (experts, fan_out, fan_in // GROUP)
        return {f"{name}_blocks": (groups + (GROUP // 2,), "uint8"), f"{name}_scales": (groups, "uint8")}

    def _check(self) -> None:
        infos = self.tensors.infos
        expected = {}
        for name in self.shapes:
            expected.update(self._stored(name))
        missing = [n for n in expected if n not in infos]
        if missing:
            more = f" (and {len(missing) - 1} more, e.g. {missing[1:4]})" if len(missing) > 1 else ""
            why = "the checkpoint is incomplete or not a GPT-OSS model of this config.json"
            if missing[0].endswith("_blocks") and missing[0].removesuffix("_blocks") in infos:
                why = (
                    "config.json says mxfp4 but the expert weights are stored unquantized; remove its "
                    "quantization_config"
                )
            raise CheckpointError(self.tensors.where(missing[0]), f"is missing{more}; {why}", missing[0])
        for stored, (shape, kind) in expected.items():
            info = infos[stored]
            if kind == "uint8" and info.dtype != torch.uint8:
                raise CheckpointError(info.file, f"has dtype {info.dtype}; MXFP4 blocks and scales are uint8", stored)
            if kind == "float" and info.dtype not in FLOAT_DTYPES:
                raise CheckpointError(
                    info.file,
                    f"has dtype {info.dtype}; expected a floating-point tensor "
                    "(BF16, F16 or F32) or, for expert weights, quantization_config mxfp4",
                    stored,
                )
            if info.shape != shape:
                raise CheckpointError(
                    info.file,
                    f"has shape {list(info.shape)}, expected {list(shape)} from "
                    f"{self.config_file}{self._mxfp4_hint(stored)}",
                    stored,
                )
        extras = sorted(n for n in infos if n not in expected and not HARMLESS_EXTRAS.search(n))
        if extras:
            more = f" and {len(extras) - 1} more: {extras[1:6]}" if len(extras) > 1 else ""
            raise CheckpointError(
                infos[extras[0]].file,
                f"is not part of a GPT-OSS model{more}; is this "
                "checkpoint from another architecture, or quantized without a quantization_config?",
                extras[0],
            )

    def _mxfp4_hint(self, stored: str) -> str:
        if not stored.endswith("_scales"):
            return ""
        blocks = self.tensors.infos[stored.removesuffix("_scales") + "_blocks"].shape
        problem = check_mxfp4_shapes(blocks, self.tensors.infos[stored].shape)
        return f" (MXFP4: {problem})" if problem else ""

    # ------------------------------------------------------------------ reading
    def nbytes(self, name: str, dtype: torch.dtype) -> int:
        return torch.Size(self.shapes[name]).numel() * dtype.itemsize

    def read_into(self, name: str, out: torch.Tensor, rows: tuple[int, int] | None = None) -> None:
        """Fill `out` (any device and float dtype) with rows [r0, r1) of our tensor `name` (all rows
        by default), a bounded chunk at a time."""
        r0, r1 = rows if rows is not None else (0, self.shapes[name][0])
        assert tuple(out.shape) == (r1 - r0,) + self.shapes[name][1:], (name, tuple(out.shape), rows)
        row_values = max(1, out[0].numel())
        step = max(1, CHUNK_BYTES // (4 * row_values))
        for c0 in range(r0, r1, step):
            c1 = min(c0 + step, r1)
            out[c0 - r0 : c1 - r0].copy_(self._read_rows(name, c0, c1, out))

    def _read_rows(self, name: str, c0: int, c1: int, like: torch.Tensor) -> torch.Tensor:
        if not self.is_quantized(name):
            return self.tensors.read(name, (c0, c1))  # copy_ into `out` converts dtype and device
        # Dequantize on the destination device: uint8 is 4x smaller to move than the values, and a GPU
        # decodes far faster than the host.
        blocks = self.tensors.read(f"{name}_blocks", (c0, c1)).to(like.device)
        scales = self.tensors.read(f"{name}_scales", (c0, c1)).to(like.device)
        return dequantize_mxfp4(blocks, scales, like.dtype).transpose(-1, -2)  # (out, in) -> our (in, out)

    def read_packed_into(self, stored: str, out: torch.Tensor, rows: tuple[int, int] | None = None) -> None:
        """Fill the uint8 `out` with expert rows [r0, r1) of the stored MXFP4 tensor `stored` (`..._blocks` or
        `..._scales`) as they are, a bounded chunk at a time."""
        info = self.tensors.infos[stored]
        r0, r1 = rows if rows is not None else (0, info.shape[0])
        assert tuple(out.shape) == (r1 - r0,) + tuple(info.shape[1:]), (stored, tuple(out.shape), rows)
        step = max(1, CHUNK_BYTES // max(1, out[0].numel()))
        for c0 in range(r0, r1, step):
            c1 = min(c0 + step, r1)
            out[c0 - r0 : c1 - r0].copy_(self.tensors.read(stored, (c0, c1)))

    def read(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """Our whole tensor `name` in `dtype`, on CPU."""
        out = torch.empty(self.shapes[name], dtype=dtype)
        self.read_into(name, out)
        return out
