"""Checkpoint import/export: HF safetensors (BF16/FP32 and MXFP4) in, HF safetensors out."""

from engine.checkpoint.errors import CheckpointError, CheckpointExistsError, CheckpointNotFoundError
from engine.checkpoint.hf import load_hf, save_hf, write_hf

__all__ = ["CheckpointError", "CheckpointExistsError", "CheckpointNotFoundError", "load_hf", "save_hf", "write_hf"]
