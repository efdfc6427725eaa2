"""A training checkpoint back into a model, in one process, whatever layout wrote it: the base from the
run's `model.path` (or the same seeded random init), then the trained weights from the
torch.distributed.checkpoint folder (expert tensors are stored as the whole model's; nothing in it is
unpickled with code). Used by the exports and by engine.inference.loading."""

from __future__ import annotations

from pathlib import Path

import torch

from engine.checkpoint.dcp import fields
from engine.checkpoint.dcp import state as ckpt
from engine.config.load import config_of_checkpoint
from engine.errors import ConfigError


def checked_config(path: Path, verify: bool = True):
    """The TrainConfig a checkpoint recorded, after meta.json's fields are checked and (unless its
    checkpoint.verify is off) the metadata and tensor files are checked against their sha256."""
    meta = fields.check_meta(path, ckpt.read_meta(path), resume=False)
    try:
        cfg = config_of_checkpoint(meta["config"])
    except (ConfigError, AttributeError, TypeError) as e:  # a section that is not a mapping, too
        raise ckpt.CheckpointCorruptError(
            path / "meta.json", f"field 'config' is not a valid config ({e}); the checkpoint is corrupt"
        ) from None
    if verify and cfg.checkpoint.verify:
        fields.verify_files(path, meta)
    return cfg


def gather_trained_weights(path: Path) -> dict[str, torch.Tensor]:
    """The whole model's trained weights from a checkpoint written at any layout, read in this one
    process (DCP assembles each expert tensor from the chunks the ranks wrote)."""
    shapes = ckpt.tensor_shapes(path)
    full = {key: torch.empty(size, dtype=dtype) for key, (size, dtype) in shapes.items() if key.startswith("model.")}
    if not full:
        raise ckpt.CheckpointCorruptError(path, "holds no trained weights; the checkpoint is corrupt")
    ckpt.load_tensors(path, full, alone=True)
    return {key[len("model.") :]: t for key, t in full.items()}


def load_trained_model(path: str | Path, dtype: torch.dtype = torch.float32):
    """(config, model): the model of a checkpoint rebuilt on the CPU with its trained weights (a LoRA
    run's adapters applied to its base). `path` is a checkpoints/step_XXXXXXX directory."""
    path = Path(path)
    from engine.parallel import Mesh
    from engine.training.build import build_model
    from engine.training.checkpointer import check_base
    from engine.training.runtime import Runtime

    cfg = checked_config(path)
    check_base(path, ckpt.read_meta(path), cfg)  # a LoRA run's adapters go over the base they were trained on
    rt = Runtime(Mesh.single("cpu"), param_dtype=dtype, compute_dtype=dtype)
    model = build_model(cfg, rt)
    trained = gather_trained_weights(path)
    params = dict(model.named_parameters())
    unknown = sorted(set(trained) - set(params))
    if unknown:
        raise ValueError(f"{path}: trained weights {unknown[:5]} do not exist in the rebuilt model")
    with torch.no_grad():
        for name, tensor in trained.items():
            if params[name].shape != tensor.shape:
                raise ValueError(
                    f"{path}: {name} has shape {tuple(tensor.shape)}, the model expects {tuple(params[name].shape)}"
                )
            params[name].copy_(tensor)
    return cfg, model


def load_adapters_only(path: Path):
    """The model of a LoRA checkpoint with only its adapters materialised (the base stays on the meta
    device): all a PEFT export needs, without reading or holding the base weights."""
    from engine.models.gpt_oss import GptOssForCausalLM
    from engine.peft import apply_lora
    from engine.training.build import arch_of_run, lora_config

    cfg = checked_config(path)
    with torch.device("meta"):
        model = GptOssForCausalLM(arch_of_run(cfg))
    apply_lora(model, lora_config(cfg), seed=cfg.trainer.seed)
    trained = gather_trained_weights(path)
    model.load_state_dict(trained, strict=False, assign=True)
    still_meta = [n for n, p in model.named_parameters() if "lora" in n and p.is_meta]
    if still_meta:
        raise ValueError(f"{path}: the checkpoint lacks the adapters {still_meta[:5]}")
    return cfg, model
