"""Step metrics: throughput, MFU, memory, expert load, and the metrics.jsonl writer.

MFU counts model FLOPs per token as follows (no recomputation counted):
  full training: 6 x active matmul params + attention term
  LoRA:          4 x frozen active params + 6 x LoRA params a token goes through (attention
                 adapters and its top-k experts' adapters) + attention term
  attention term per layer: 12 x q_width x keys attended (about T/2 on full layers, min(window, T/2)
  on sliding ones; the 12 = 2 matmuls x (2 fwd + 4 bwd)).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from .errors import import_failure
from .models.gpt_oss.config import GptOssConfig

# Dense bf16 peak of the GPUs we quote MFU against (vendor figures, FLOP/s).
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "B200": 2250e12}


def active_lora_params(cfg: GptOssConfig, rank: int, targets: list[str], shared_experts: bool) -> float:
    """LoRA parameters one token goes through: every attention adapter, and the adapters of its
    top-k experts only (a shared expert adapter is applied once per routed copy, k times)."""
    from .memory_plan import lora_param_count

    attention = lora_param_count(cfg, rank, [t for t in targets if t.endswith(("q_proj", "k_proj", "v_proj",
                                                                                "o_proj"))], 1, shared_experts)
    experts = lora_param_count(cfg, rank, targets, 1, shared_experts) - attention
    per_copy = experts if shared_experts else experts / cfg.num_local_experts
    return attention + cfg.num_experts_per_tok * per_copy


def flops_per_token(cfg: GptOssConfig, seq_len: int, lora_params: float = 0) -> float:
    """`lora_params`: the LoRA parameters a token goes through (`active_lora_params`), 0 for full training."""
    active = cfg.param_counts()["active"]
    attn = 0.0
    for kind in cfg.layer_types:
        keys = seq_len / 2 if kind == "full_attention" else min(cfg.sliding_window, seq_len / 2)
        attn += 12 * cfg.q_width * keys
    if lora_params:
        return 4 * active + 6 * lora_params + attn
    return 6 * active + attn


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def expert_load(model, mesh) -> dict[str, list[float]]:
    """Per layer, over the whole global batch's last micro-batch: the most tokens any expert got, and
    that over the mean (1.0 = perfectly balanced)."""
    from .moe.alltoall import global_expert_load

    if model.moe_blocks()[0].last_expert_counts is None:
        return {}
    load = global_expert_load(model, mesh).float()  # [layers, experts]
    top = load.max(dim=1).values
    return {"expert_max_tokens": top.tolist(),
            "expert_max_over_mean": (top / load.mean(dim=1).clamp(min=1e-9)).tolist()}


def peak_memory_gb(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return None


def strict_json(value):
    """`value` with every non-finite float as None: metrics.jsonl is strict JSON (null, never NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the records of steps <= `step` (the step a run resumes from, 0 for a fresh start), so
    replayed steps are not logged twice; a torn last line of a killed run goes too. Atomic."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(json.dumps(strict_json(record), allow_nan=False) + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


class MetricsWriter:
    """Appends one JSON object per logged step to output_dir/metrics.jsonl (rank 0 only), and the
    scalars to TensorBoard (output_dir/tensorboard) when asked for. A run starting at `start_step`
    (a resume) first drops the records of later steps."""

    def __init__(self, output_dir: str | Path, enabled: bool, tensorboard: bool = False, start_step: int = 0):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self.tb = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            truncate_metrics(self.path, start_step)
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ImportError(f"trainer.tensorboard=true needs the tensorboard package, but "
                                  f"{import_failure('tensorboard', e)} (pip install tensorboard); metrics.jsonl is "
                                  "written either way") from e
            self.tb = SummaryWriter(str(Path(output_dir) / "tensorboard"),
                                    purge_step=start_step + 1 if start_step else None)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(strict_json(record), allow_nan=False) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.tb.add_scalar(key, value, record["step"])
            self.tb.flush()
