"""GPT-OSS (20B, 120B and tiny presets), native PyTorch."""

from .config import ConfigError, GptOssConfig, RopeScaling
from .model import GptOssForCausalLM, GptOssModel, ModelOptions

__all__ = ["ConfigError", "GptOssConfig", "RopeScaling", "GptOssForCausalLM", "GptOssModel", "ModelOptions"]
