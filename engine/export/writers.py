"""The exports of a trained model: `peft` (the adapters), `merged` (the adapters folded into the base) and
`hf` (the whole model), and `export(checkpoint, out)`, which rebuilds the model a format needs."""

from __future__ import annotations

from pathlib import Path

import torch

from engine.checkpoint.dcp import state as ckpt
from engine.errors import ExportError
from engine.export.files import export_target
from engine.export.rebuild import checked_config, load_adapters_only, load_trained_model

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def side_files_source(cfg) -> Path | None:
    """The folder whose tokenizer files (and chat template, generation config) the run used: the
    model checkpoint when it has a tokenizer, else data.tokenizer's folder, else the shipped one."""
    from engine.training.build import resolve_tokenizer_path

    tok = resolve_tokenizer_path(cfg)
    if tok is None:
        from engine.data.config import default_tokenizer_path

        return default_tokenizer_path().parent
    tok = Path(tok)
    return tok.parent if tok.is_file() else tok


def run_dtype(meta: dict) -> str:
    """The dtype a run's weights were computed in (bf16 | fp32), from its checkpoint's meta.json."""
    if meta.get("compute_dtype") in ("bfloat16", "float32"):
        return {"bfloat16": "bf16", "float32": "fp32"}[meta["compute_dtype"]]
    return "fp32" if meta["config"]["model"]["dtype"] == "float32" else "bf16"


def write_export(
    cfg, model, out: str | Path, fmt: str, *, dtype: str = "bf16", attention_only: bool = False, overwrite: bool = False
) -> Path:
    """Write `model` (trained under `cfg`) as `fmt`: peft | merged | hf. hf and merged exports carry
    the tokenizer files and chat template the run used, so the folder loads on its own."""
    with export_target(out, needs_bytes=_export_bytes(model, fmt, dtype)):
        return _write(cfg, model, out, fmt, dtype=dtype, attention_only=attention_only, overwrite=overwrite)


def _export_bytes(model, fmt: str, dtype: str) -> int:
    """About what an export occupies on disk (said when the disk is full)."""
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    if fmt == "peft":
        return sum(p.numel() * p.element_size() for p in lora)
    packed = sum(b.numel() * 2 for n, b in model.named_buffers() if n.endswith("_blocks"))  # 2 values a byte
    return (sum(p.numel() for p in model.parameters()) + packed - sum(p.numel() for p in lora)) * DTYPES[dtype].itemsize


def _write(cfg, model, out, fmt: str, *, dtype: str, attention_only: bool, overwrite: bool) -> Path:
    if fmt == "peft":
        from engine.peft.peft_format import export_peft

        return export_peft(
            model,
            out,
            base_model_name_or_path=cfg.model.path or "random-init",
            attention_only=attention_only,
            overwrite=overwrite,
        )
    source = side_files_source(cfg)
    if fmt == "merged":
        from engine.peft.peft_format import export_merged

        return export_merged(model, out, dtype=DTYPES[dtype], source_dir=source, overwrite=overwrite)
    from engine.checkpoint.hf import save_hf

    save_hf(model, out, dtype=DTYPES[dtype], source_dir=source, overwrite=overwrite)
    return Path(out)


def export(
    path: str | Path,
    out: str | Path,
    fmt: str | None = None,
    *,
    dtype: str | None = None,
    attention_only: bool = False,
    overwrite: bool = False,
) -> Path:
    """Export checkpoint `path` to `out`; hf / merged in `dtype` (default: the run's own dtype)."""
    path = Path(path)
    if not ckpt.is_complete(path):
        raise FileNotFoundError(
            f"{path}: not a complete training checkpoint (no meta.json); pass a checkpoints/step_XXXXXXX directory"
        )
    meta = ckpt.read_meta(path)
    lora = checked_config(path, verify=False).peft.method == "lora"  # verified when its tensors are read
    fmt = fmt or ("peft" if lora else "hf")
    if fmt in ("peft", "merged") and not lora:
        raise ExportError(f"--format {fmt} needs a LoRA run; this checkpoint is full fine-tuning: use --format hf")
    if fmt == "hf" and lora:
        raise ExportError(
            "--format hf writes a fully fine-tuned model; this checkpoint is a LoRA run: use --format "
            "merged (the adapters folded into the base, as an HF checkpoint) or --format peft (the adapter)"
        )
    dtype = dtype or run_dtype(meta)
    # A PEFT adapter needs the adapters alone; hf / merged need the whole model, rebuilt on the CPU
    # in the export dtype.
    cfg, model = load_adapters_only(path) if fmt == "peft" else load_trained_model(path, DTYPES[dtype])
    return write_export(cfg, model, out, fmt, dtype=dtype, attention_only=attention_only, overwrite=overwrite)
