"""Export a training checkpoint.

    python -m engine.export CHECKPOINT_DIR --out DIR [--format peft|hf|merged] [--attention-only]

- `peft`   (LoRA runs; the default for them): adapter_config.json + adapter_model.safetensors that
           `peft.PeftModel.from_pretrained` loads onto transformers' GptOssForCausalLM.
- `hf`     (full fine-tuning; the default for it): a BF16 HF checkpoint (config.json + safetensors).
- `merged` (LoRA runs): the base with the adapters folded in, as an HF checkpoint.

The checkpoint's meta.json holds the run's config, so the model is rebuilt exactly as trained: the
base from `model.path` (or the same seeded random init), then the trained weights from every rank's
file, expert slices concatenated back in expert order.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .checkpoint import state as ckpt
from .config import build_config
from .errors import EngineError, ExportError
from .export_files import export_target

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def gather_trained_weights(path: Path, ep: int) -> dict[str, torch.Tensor]:
    """One full state of the trained weights from a (possibly expert-parallel) checkpoint. Ranks
    0..ep-1 form the first expert-parallel group: together they hold every expert once."""
    meta = json.loads((path / "meta.json").read_text())
    ranks = [ckpt.load_checkpoint(path, r, meta["world_size"])["model"] for r in range(min(ep, meta["world_size"]))]
    full = {}
    for name, tensor in ranks[0].items():
        if ".experts." in name and ep > 1:
            full[name] = torch.cat([r[name] for r in ranks], dim=0)
        else:
            full[name] = tensor
    return full


def load_trained_model(path: Path, dtype: torch.dtype):
    """Rebuild the model of a checkpoint on CPU with its trained weights."""
    from .build import Runtime, build_model
    from .parallel import Mesh

    meta = json.loads((path / "meta.json").read_text())
    cfg = build_config(meta["config"])
    rt = Runtime(Mesh.single("cpu"), param_dtype=dtype, compute_dtype=dtype)
    model = build_model(cfg, rt)
    trained = gather_trained_weights(path, cfg.parallel.ep)
    params = dict(model.named_parameters())
    unknown = sorted(set(trained) - set(params))
    if unknown:
        raise ValueError(f"{path}: trained weights {unknown[:5]} do not exist in the rebuilt model")
    with torch.no_grad():
        for name, tensor in trained.items():
            if params[name].shape != tensor.shape:
                raise ValueError(f"{path}: {name} has shape {tuple(tensor.shape)}, the model expects "
                                 f"{tuple(params[name].shape)}")
            params[name].copy_(tensor)
    return cfg, model


def load_adapters_only(path: Path):
    """The model of a LoRA checkpoint with only its adapters materialised (the base stays on the meta
    device): all a PEFT export needs, without reading or holding the base weights."""
    from .build import lora_config
    from .memory_plan import arch_of_run
    from .models.gpt_oss import GptOssForCausalLM
    from .peft import apply_lora

    cfg = build_config(json.loads((path / "meta.json").read_text())["config"])
    with torch.device("meta"):
        model = GptOssForCausalLM(arch_of_run(cfg))
    apply_lora(model, lora_config(cfg), seed=cfg.trainer.seed)
    trained = gather_trained_weights(path, cfg.parallel.ep)
    model.load_state_dict(trained, strict=False, assign=True)
    still_meta = [n for n, p in model.named_parameters() if "lora" in n and p.is_meta]
    if still_meta:
        raise ValueError(f"{path}: the checkpoint lacks the adapters {still_meta[:5]}")
    return cfg, model


def write_export(cfg, model, out: str | Path, fmt: str, *, dtype: str = "bf16", attention_only: bool = False,
                 overwrite: bool = False) -> Path:
    """Write `model` (trained under `cfg`) as `fmt`: peft | merged | hf."""
    with export_target(out, needs_bytes=_export_bytes(model, fmt, dtype)):
        return _write(cfg, model, out, fmt, dtype=dtype, attention_only=attention_only, overwrite=overwrite)


def _export_bytes(model, fmt: str, dtype: str) -> int:
    """About what an export occupies on disk (said when the disk is full)."""
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    if fmt == "peft":
        return sum(p.numel() * p.element_size() for p in lora)
    return (sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in lora)) * DTYPES[dtype].itemsize


def _write(cfg, model, out, fmt: str, *, dtype: str, attention_only: bool, overwrite: bool) -> Path:
    if fmt == "peft":
        from .peft.peft_export import export_peft

        return export_peft(model, out, base_model_name_or_path=cfg.model.path or "random-init",
                           attention_only=attention_only, overwrite=overwrite)
    source = cfg.model.path if cfg.model.path and Path(cfg.model.path).is_dir() else None
    if fmt == "merged":
        from .peft.peft_export import export_merged

        return export_merged(model, out, dtype=DTYPES[dtype], source_dir=source, overwrite=overwrite)
    from .checkpoint.hf import save_hf

    save_hf(model, out, dtype=DTYPES[dtype], source_dir=source, overwrite=overwrite)
    return Path(out)


def export(path: str | Path, out: str | Path, fmt: str | None = None, *, dtype: str = "bf16",
           attention_only: bool = False, overwrite: bool = False) -> Path:
    path = Path(path)
    if not ckpt.is_complete(path):
        raise FileNotFoundError(f"{path}: not a complete training checkpoint (no meta.json); "
                                "pass a checkpoints/step_XXXXXXX directory")
    lora = build_config(json.loads((path / "meta.json").read_text())["config"]).peft.method == "lora"
    fmt = fmt or ("peft" if lora else "hf")
    if fmt in ("peft", "merged") and not lora:
        raise ExportError(f"--format {fmt} needs a LoRA run; this checkpoint is full fine-tuning: use --format hf")
    # A PEFT adapter needs the adapters alone; hf / merged need the whole model, rebuilt on the CPU
    # in the export dtype.
    cfg, model = load_adapters_only(path) if fmt == "peft" else load_trained_model(path, DTYPES[dtype])
    return write_export(cfg, model, out, fmt, dtype=dtype, attention_only=attention_only, overwrite=overwrite)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m engine.export", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a checkpoints/step_XXXXXXX directory of a run")
    p.add_argument("--out", required=True, help="output directory (created atomically)")
    p.add_argument("--format", choices=["peft", "hf", "merged"], default=None,
                   help="default: peft for LoRA runs, hf for full fine-tuning")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="dtype of hf/merged exports")
    p.add_argument("--attention-only", action="store_true",
                   help="peft format without the expert adapters (for servers that take none)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    args = p.parse_args(argv)
    try:
        out = export(args.checkpoint, args.out, args.format, dtype=args.dtype, attention_only=args.attention_only,
                     overwrite=args.overwrite)
    except (FileNotFoundError, FileExistsError, PermissionError, ValueError, EngineError) as e:
        print(f"export error: {e}", file=sys.stderr)
        return 2
    print(f"exported {args.checkpoint} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
