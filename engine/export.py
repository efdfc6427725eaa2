"""Export a training checkpoint.

    python -m engine.export CHECKPOINT_DIR --out DIR [--format peft|hf|merged] [--attention-only]

- `peft`   (LoRA runs; the default for them): adapter_config.json + adapter_model.safetensors that
           `peft.PeftModel.from_pretrained` loads onto transformers' GptOssForCausalLM.
- `hf`     (full fine-tuning; the default for it): an HF checkpoint (config.json + safetensors + the
           tokenizer files), in the run's dtype unless --dtype says otherwise.
- `merged` (LoRA runs): the base with the adapters folded in, as an HF checkpoint.

The checkpoint's meta.json holds the run's config, so the model is rebuilt exactly as trained: the
base from `model.path` (or the same seeded random init), then the trained weights from every rank's
file, read from the torch.distributed.checkpoint folder whatever layout wrote it (expert tensors
are stored as the whole model's; nothing in it is unpickled with code).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .checkpoint import state as ckpt
from .config import build_config
from .errors import EngineError, ExportError
from .export_files import export_target

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _meta(path: Path) -> dict:
    return ckpt.read_meta(path)


def gather_trained_weights(path: Path) -> dict[str, torch.Tensor]:
    """The whole model's trained weights from a checkpoint written at any layout, read in this one
    process (DCP assembles each expert tensor from the chunks the ranks wrote)."""
    shapes = ckpt.tensor_shapes(path)
    full = {key: torch.empty(size, dtype=dtype) for key, (size, dtype) in shapes.items() if key.startswith("model.")}
    if not full:
        raise ckpt.CheckpointCorruptError(path, "holds no trained weights; the checkpoint is corrupt")
    ckpt.load_tensors(path, full, alone=True)
    return {key[len("model."):]: t for key, t in full.items()}


def load_trained_model(path: str | Path, dtype: torch.dtype = torch.float32):
    """(config, model): the model of a checkpoint rebuilt on the CPU with its trained weights (a LoRA
    run's adapters applied to its base). `path` is a checkpoints/step_XXXXXXX directory."""
    path = Path(path)
    from .build import Runtime, build_model
    from .parallel import Mesh

    cfg = build_config(_meta(path)["config"])
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

    cfg = build_config(_meta(path)["config"])
    with torch.device("meta"):
        model = GptOssForCausalLM(arch_of_run(cfg))
    apply_lora(model, lora_config(cfg), seed=cfg.trainer.seed)
    trained = gather_trained_weights(path)
    model.load_state_dict(trained, strict=False, assign=True)
    still_meta = [n for n, p in model.named_parameters() if "lora" in n and p.is_meta]
    if still_meta:
        raise ValueError(f"{path}: the checkpoint lacks the adapters {still_meta[:5]}")
    return cfg, model


def side_files_source(cfg) -> Path | None:
    """The folder whose tokenizer files (and chat template, generation config) the run used: the
    model checkpoint when it has a tokenizer, else data.tokenizer's folder, else the shipped one."""
    from .build import resolve_tokenizer_path

    tok = resolve_tokenizer_path(cfg)
    if tok is None:
        return Path(__file__).resolve().parent / "data" / "assets" / "tokenizer"
    tok = Path(tok)
    return tok.parent if tok.is_file() else tok


def run_dtype(meta: dict) -> str:
    """The dtype a run's weights were computed in (bf16 | fp32), from its checkpoint's meta.json."""
    if meta.get("compute_dtype") in ("bfloat16", "float32"):
        return {"bfloat16": "bf16", "float32": "fp32"}[meta["compute_dtype"]]
    return "fp32" if meta["config"]["model"]["dtype"] == "float32" else "bf16"


def write_export(cfg, model, out: str | Path, fmt: str, *, dtype: str = "bf16", attention_only: bool = False,
                 overwrite: bool = False) -> Path:
    """Write `model` (trained under `cfg`) as `fmt`: peft | merged | hf. hf and merged exports carry
    the tokenizer files and chat template the run used, so the folder loads on its own."""
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
    source = side_files_source(cfg)
    if fmt == "merged":
        from .peft.peft_export import export_merged

        return export_merged(model, out, dtype=DTYPES[dtype], source_dir=source, overwrite=overwrite)
    from .checkpoint.hf import save_hf

    save_hf(model, out, dtype=DTYPES[dtype], source_dir=source, overwrite=overwrite)
    return Path(out)


def export(path: str | Path, out: str | Path, fmt: str | None = None, *, dtype: str | None = None,
           attention_only: bool = False, overwrite: bool = False) -> Path:
    """Export checkpoint `path` to `out`; hf / merged in `dtype` (default: the run's own dtype)."""
    path = Path(path)
    if not ckpt.is_complete(path):
        raise FileNotFoundError(f"{path}: not a complete training checkpoint (no meta.json); "
                                "pass a checkpoints/step_XXXXXXX directory")
    meta = _meta(path)
    lora = build_config(meta["config"]).peft.method == "lora"
    fmt = fmt or ("peft" if lora else "hf")
    if fmt in ("peft", "merged") and not lora:
        raise ExportError(f"--format {fmt} needs a LoRA run; this checkpoint is full fine-tuning: use --format hf")
    if fmt == "hf" and lora:
        raise ExportError("--format hf writes a fully fine-tuned model; this checkpoint is a LoRA run: use --format "
                          "merged (the adapters folded into the base, as an HF checkpoint) or --format peft (the adapter)")
    dtype = dtype or run_dtype(meta)
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
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="dtype of hf/merged exports (default: the dtype the run trained in)")
    p.add_argument("--attention-only", action="store_true",
                   help="peft format without the expert adapters (for servers that take none)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    args = p.parse_args(argv)
    from .checkpoint.errors import CheckpointExistsError

    try:
        out = export(args.checkpoint, args.out, args.format, dtype=args.dtype, attention_only=args.attention_only,
                     overwrite=args.overwrite)
    except CheckpointExistsError:
        print(f"export error: {args.out} already exists; pass another --out, or --overwrite to replace it",
              file=sys.stderr)
        return 2
    except (FileNotFoundError, FileExistsError, PermissionError, ValueError, EngineError) as e:
        print(f"export error: {e}", file=sys.stderr)
        return 2
    fmt = args.format or ("peft" if (out / "adapter_config.json").is_file() else "hf")
    said = "" if fmt == "peft" else (f" in {args.dtype}" if args.dtype else
                                     f" in {run_dtype(_meta(Path(args.checkpoint)))}"
                                     " (the run's dtype; --dtype to choose)")
    print(f"exported {args.checkpoint} -> {out} ({fmt}{said})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
