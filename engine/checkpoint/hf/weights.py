"""Hugging Face GPT-OSS checkpoints in and out: `load_hf(path) -> model`, `save_hf(model, out_dir)`.

Loading builds the model on the meta device, allocates only what this rank owns (its expert rows
under expert parallelism), then streams each tensor from the safetensors files a bounded chunk at a
time, dequantizing MXFP4 expert weights on the way. Peak host memory is therefore the model slice
being built plus one chunk, whatever the size of the files.

Every parameter, norm weights included, is loaded in the one `dtype` asked for. transformers keeps
the RMSNorm weights in fp32 (`_keep_in_fp32_modules`); ours compute the norm in fp32 anyway, so a
bf16 norm weight costs only its own rounding, and one dtype keeps optimizer and export simple. Load
with dtype=torch.float32 for fp32 everywhere.

Saving writes the HF BF16 layout (`save_pretrained`'s names, shards and index) into a hidden sibling
directory renamed into place at the end. Tensors come from a `state_dict` provider, by default the
model's own: an expert-parallel job passes one that gathers each expert tensor from all ranks.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from tqdm import tqdm

from engine.checkpoint.atomic_dir import atomic_directory
from engine.checkpoint.errors import CheckpointError
from engine.checkpoint.hf.hub import resolve_checkpoint
from engine.checkpoint.hf.layout import HFCheckpoint, expert_tensor_names, full_shapes
from engine.checkpoint.hf.safetensors_io import ShardWriter
from engine.models.gpt_oss import GptOssConfig, GptOssForCausalLM, ModelOptions
from engine.moe.experts import MATRICES, packed_buffer_names, shard_model_experts

DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
# Files an HF model directory carries besides its weights; copied as they are on export.
SIDE_FILES = (
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
    "chat_template*",
)


def _check_dtype(dtype: torch.dtype) -> None:
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"dtype={dtype}: choose one of {list(DTYPE_NAMES)}")


def _model_options(options: ModelOptions | None, overrides: dict) -> ModelOptions:
    known = [f.name for f in dataclasses.fields(ModelOptions)]
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise ValueError(f"unknown model option(s) {unknown}; known: {known}")
    return dataclasses.replace(options or ModelOptions(), **overrides)


def _expert_slice(
    config: GptOssConfig, expert_range: tuple[int, int] | None, ep_size: int, ep_rank: int
) -> tuple[int, int]:
    """(ep_size, ep_rank) of the expert slice to build, from either way of saying it."""
    n = config.num_local_experts
    if expert_range is not None:
        e0, e1 = expert_range
        width = e1 - e0
        if not 0 <= e0 < e1 <= n or n % width or e0 % width:
            raise ValueError(
                f"expert_range={tuple(expert_range)} must be one expert-parallel slice of the {n} "
                f"experts: [r*k, (r+1)*k) with k dividing {n}"
            )
        ep = (n // width, e0 // width)
        if ep_size != 1 and (ep_size, ep_rank) != ep:
            raise ValueError(
                f"expert_range={tuple(expert_range)} is ep_size={ep[0]}, ep_rank={ep[1]}, but "
                f"ep_size={ep_size}, ep_rank={ep_rank} were given too; give one or the other"
            )
        return ep
    return ep_size, ep_rank


def _rows(model: GptOssForCausalLM, name: str) -> tuple[int, int] | None:
    """The expert rows [e0, e1) this rank holds for an expert tensor; None (all rows) otherwise."""
    experts = model.get_submodule(name.rsplit(".", 1)[0])
    if not getattr(experts, "holds_experts", False):
        return None
    return experts.expert_offset, experts.expert_offset + experts.num_experts


@torch.no_grad()
def load_hf(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    options: ModelOptions | None = None,
    expert_range: tuple[int, int] | None = None,
    ep_size: int = 1,
    ep_rank: int = 0,
    progress: bool = False,
    **option_overrides,
) -> GptOssForCausalLM:
    """A GPT-OSS model with the weights of `path` (local directory or hub id; BF16/FP32 or MXFP4).

    `options` / `option_overrides` (e.g. `experts_backend="grouped_mm"`) choose the runtime;
    `ep_size=8, ep_rank=3` or `expert_range=(e0, e1)` say which expert-parallel slice to read and build
    (engine.moe.experts.shard_experts), so that a rank never holds the other ranks' experts.
    Raises CheckpointError / CheckpointNotFoundError (naming file and tensor) or ConfigError."""
    _check_dtype(dtype)
    ckpt = HFCheckpoint(resolve_checkpoint(path))
    opts = _model_options(options, option_overrides)
    ep = _expert_slice(ckpt.config, expert_range, ep_size, ep_rank)
    with torch.device("meta"):
        model = GptOssForCausalLM(ckpt.config, opts)
    shard_model_experts(model, *ep)
    return read_hf_weights(model, ckpt, dtype=dtype, device=device, progress=progress, label=Path(str(path)).name)


@torch.no_grad()
def read_hf_weights(
    model: GptOssForCausalLM,
    checkpoint: str | Path | HFCheckpoint,
    *,
    dtype: torch.dtype,
    device: str | torch.device = "cpu",
    progress: bool = False,
    label: str = "",
) -> GptOssForCausalLM:
    """Materialise `model`, built on the meta device (holding all experts or one expert-parallel slice),
    on `device` in `dtype`, and fill it from `checkpoint` (a directory, a hub id or an open HFCheckpoint)
    a bounded chunk at a time, reading only the expert rows it holds."""
    _check_dtype(dtype)
    ckpt = checkpoint if isinstance(checkpoint, HFCheckpoint) else HFCheckpoint(resolve_checkpoint(checkpoint))
    if model.config != ckpt.config:
        raise ValueError(f"{ckpt.config_file} describes another architecture than the model being built")
    packed = packed_buffers(model)
    if packed and ckpt.quantization != "mxfp4":
        raise CheckpointError(
            ckpt.config_file,
            "stores dense expert weights but model.expert_weights=mxfp4 keeps the checkpoint's MXFP4 blocks "
            "(nothing is re-quantized); point model.path at an MXFP4 checkpoint or set model.expert_weights=dense",
        )
    model.to(dtype=dtype).to_empty(device=device)  # uint8 buffers keep their dtype
    state = model.state_dict()  # detached views of the parameters: filling them fills the model
    packed = packed_buffers(model)  # the materialised buffers
    unfilled = [name for name, _ in model.named_buffers() if name not in state and name not in packed]
    assert not unfilled, f"buffers outside the state dict would stay uninitialised: {unfilled}"
    total = sum(t.numel() * t.element_size() for t in [*state.values(), *packed.values()])
    with tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        desc=f"loading {label or ckpt.directory.name}",
        disable=None if progress else True,
    ) as bar:  # None: silent when not a terminal
        for name, tensor in state.items():
            ckpt.read_into(name, tensor, _rows(model, name))
            bar.update(tensor.numel() * tensor.element_size())
        for name, tensor in packed.items():
            ckpt.read_packed_into(name, tensor, _rows(model, name))
            bar.update(tensor.numel())
    return model


def packed_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The MXFP4 blocks and scales buffers of `model` (model.expert_weights=mxfp4), by their checkpoint name."""
    out = {}
    for prefix, module in model.named_modules():
        if getattr(module, "packed", False):
            for name in (n for m in MATRICES for n in packed_buffer_names(m)):
                out[f"{prefix}.{name}"] = module._buffers[name]
    return out


def save_hf(
    model: GptOssForCausalLM,
    out_dir: str | Path,
    *,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_size: int | str = "5GB",
    source_dir: str | Path | None = None,
    progress: bool = False,
    overwrite: bool = False,
    state_dict: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]] | None = None,
) -> Path:
    """Export `model` as an HF GPT-OSS checkpoint that `transformers` and `load_hf` read back.

    `source_dir`: the checkpoint the model came from; its tokenizer, chat template and generation config
    are copied. `state_dict`: (name, full tensor) pairs to write instead of `model.state_dict()`; needed
    when the model holds only some experts (expert parallelism), where it should gather every expert."""
    if state_dict is None:
        ep = model.config.num_local_experts // model.moe_blocks()[0].experts.num_experts
        if ep > 1:
            raise ValueError(
                f"this model holds {ep}-way expert-parallel slices only; pass "
                "state_dict= an iterator that gathers every expert tensor, or save from a full model"
            )
        state_dict = model.state_dict()
    tensors = state_dict.items() if isinstance(state_dict, Mapping) else state_dict
    return write_hf(
        model.config,
        tensors,
        out_dir,
        dtype=dtype,
        max_shard_size=max_shard_size,
        source_dir=source_dir,
        progress=progress,
        overwrite=overwrite,
    )


def write_hf(
    config: GptOssConfig,
    tensors: Iterable[tuple[str, torch.Tensor]],
    out_dir: str | Path,
    *,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_size: int | str = "5GB",
    source_dir: str | Path | None = None,
    progress: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write (name, tensor) pairs, which must be exactly the tensors of `config`'s model, as an HF checkpoint.

    Tensors are consumed one by one, so a streaming source (a converter, a gather) holds at most one
    shard's worth in memory."""
    _check_dtype(dtype)
    expected, experts = full_shapes(config), expert_tensor_names(config)
    total = sum(torch.Size(s).numel() for s in expected.values()) * dtype.itemsize
    out_dir = Path(out_dir)
    with atomic_directory(out_dir, overwrite) as partial:
        writer = ShardWriter(partial, max_shard_size)
        # disable=None: tqdm stays silent when the output is not a terminal
        with tqdm(
            total=total, unit="B", unit_scale=True, desc=f"writing {out_dir.name}", disable=None if progress else True
        ) as bar:
            for name, tensor in tensors:
                _check_export_tensor(name, tensor, expected, experts)
                writer.add(name, tensor.detach().to(device="cpu", dtype=dtype))
                bar.update(tensor.numel() * dtype.itemsize)
        missing = sorted(expected.keys() - writer.names)
        if missing:
            raise ValueError(
                f"export to {out_dir}: {len(missing)} tensors were never given, e.g. {missing[:3]}; nothing was written"
            )
        writer.finish()
        hf_config = config.to_hf_dict()
        hf_config["torch_dtype"] = hf_config["dtype"] = DTYPE_NAMES[dtype]  # older / newer transformers' key
        (partial / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        if source_dir is not None:
            _copy_side_files(resolve_checkpoint(source_dir), partial)
    return out_dir


def _check_export_tensor(
    name: str, tensor: torch.Tensor, expected: dict[str, tuple[int, ...]], experts: set[str]
) -> None:
    if name not in expected:
        raise ValueError(f"export: {name!r} is not a tensor of this GPT-OSS config; refusing to write it")
    if tuple(tensor.shape) != expected[name]:
        hint = "; gather every expert before saving" if name in experts else ""
        raise ValueError(
            f"export: {name!r} has shape {list(tensor.shape)}, the config gives {list(expected[name])}{hint}"
        )
    if not tensor.is_floating_point():
        raise ValueError(f"export: {name!r} has dtype {tensor.dtype}; expected floating-point weights")


def _copy_side_files(source: Path, dest: Path) -> None:
    for pattern in SIDE_FILES:
        for file in sorted(source.glob(pattern)):
            if file.is_file():
                shutil.copy2(file, dest / file.name)
