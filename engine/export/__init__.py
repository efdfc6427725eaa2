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

from engine.export.rebuild import gather_trained_weights, load_adapters_only, load_trained_model
from engine.export.writers import DTYPES, export, run_dtype, write_export

__all__ = [
    "DTYPES",
    "export",
    "gather_trained_weights",
    "load_adapters_only",
    "load_trained_model",
    "run_dtype",
    "write_export",
]
