"""Hugging Face GPT-OSS checkpoints: `load_hf(path) -> model`, `save_hf(model, out_dir)`, `write_hf(config,
tensors, out_dir)` (weights.py); the checked directory layout and MXFP4 (layout.py, mxfp4.py); safetensors
shards (safetensors_io.py); hub ids (hub.py)."""

from engine.checkpoint.hf.weights import load_hf, save_hf, write_hf

__all__ = ["load_hf", "save_hf", "write_hf"]
