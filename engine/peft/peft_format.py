"""LoRA exports: a PEFT adapter directory, and a merged HF checkpoint.

PEFT layout (what `peft.PeftModel.from_pretrained(transformers.GptOssForCausalLM, dir)` loads):
- attention: `target_modules`, `base_model.model.<module>.lora_A.weight` [r, in] / `lora_B.weight`
  [out, r], exactly our LoraLinear tensors.
- experts: `target_parameters` (`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`), which peft
  serves with `ParamWrapper`: for a parameter [E, in, out] it keeps one nn.Linear pair with
  lora_A.weight [E*r, in] (row e*r + j = column j of expert e's A) and lora_B.weight [out, r*E]
  (column j*E + e = row j of expert e's B), and adds scaling * A_e B_e to expert e's weight. That
  is our per-expert LoRA exactly, so the conversion is a reshuffle, no approximation; a shared
  adapter is written as E identical copies. When one module has both parameters targeted, peft
  nests its wrappers in the order the parameters are registered (gate_up_proj first, so innermost):
  gate_up's tensors are named `experts.base_layer.lora_*`, down's `experts.lora_*`.
  `_check_installed_peft` verifies names, shapes and the delta math against the peft installed here
  before anything is written. peft refuses lora_dropout != 0 on ParamWrapper, so an export with
  expert adapters records lora_dropout 0 (dropout is a training-time choice; inference ignores it).
"""

from __future__ import annotations

import functools
import importlib
import json
import math
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from engine.checkpoint.atomic_dir import atomic_directory
from engine.errors import import_failure
from engine.peft.adapters import ExpertLoRA, LoraLinear, adapter_modules, add_product
from engine.peft.lora import lora_state_dict

PEFT_PREFIX = "base_model.model."


def _expert_to_peft(a: torch.Tensor, b: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Our A [E, in, r], B [E, r, out] (or shared [in, r], [r, out]) -> peft lora_A [E*r, in], lora_B [out, r*E]."""
    if a.dim() == 2:
        a, b = a.expand(num_experts, *a.shape), b.expand(num_experts, *b.shape)
    e, fan_in, r = a.shape
    lora_a = a.transpose(1, 2).reshape(e * r, fan_in)  # row e*r + j
    lora_b = b.permute(2, 1, 0).reshape(b.shape[2], r * e)  # column j*E + e
    return lora_a, lora_b


def _expert_names(module: str, projs: tuple[str, ...]) -> dict[str, str]:
    """Module-path prefix of each projection's peft tensors (see the module docstring on nesting)."""
    if len(projs) == 1:
        return {projs[0]: module}
    return {"gate_up_proj": f"{module}.base_layer", "down_proj": module}


def _short_or_full(full: list[str], short: str, layers: int) -> list[str]:
    # The short form adapts every layer; list full names only when some layers have no adapter.
    return [short] if len(full) == layers else full


def peft_tensors(model: nn.Module, *, attention_only: bool = False) -> tuple[dict, dict]:
    """(tensors in peft's names, adapter_config fields target_modules / target_parameters)."""
    tensors: dict[str, torch.Tensor] = {}
    attn: dict[str, list[str]] = {}
    expert: dict[str, list[str]] = {}
    total_experts = model.config.num_local_experts
    for name, adapter, base in adapter_modules(model):
        if isinstance(adapter, LoraLinear):
            tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = adapter.lora_A.detach()
            tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = adapter.lora_B.detach()
            attn.setdefault(name.rpartition(".")[2], []).append(name)
            continue
        if attention_only:
            continue
        if not adapter.shared and base.num_experts != total_experts:
            raise ValueError(
                f"{name} holds experts [{base.expert_offset}, {base.expert_offset + base.num_experts}) "
                f"of {total_experts} (expert parallelism): gather every expert's adapter into a full "
                "model before exporting, e.g. with `python -m engine.export CHECKPOINT --format peft`"
            )
        _check_installed_peft(adapter.projections)
        for proj, prefix in _expert_names(name, adapter.projections).items():
            a, b = adapter.factors(proj)
            lora_a, lora_b = _expert_to_peft(a.detach(), b.detach(), total_experts)
            tensors[f"{PEFT_PREFIX}{prefix}.lora_A.weight"] = lora_a
            tensors[f"{PEFT_PREFIX}{prefix}.lora_B.weight"] = lora_b
            expert.setdefault(proj, []).append(f"{name}.{proj}")
    layers = model.config.num_hidden_layers
    targets = {"target_modules": sorted(t for k, v in attn.items() for t in _short_or_full(v, k, layers))}
    if expert:
        targets["target_parameters"] = sorted(
            t for k, v in expert.items() for t in _short_or_full(v, f"mlp.experts.{k}", layers)
        )
    return tensors, targets


def export_peft(
    model: nn.Module,
    out_dir: str | Path,
    *,
    base_model_name_or_path: str,
    attention_only: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write `adapter_config.json` + `adapter_model.safetensors` for peft / LoRA-serving stacks, into
    `out_dir` complete or not at all (a non-empty `out_dir` is an error unless `overwrite`).

    `attention_only=True` is for servers that take no expert adapters: it writes only q/k/v/o
    adapters and warns that the expert adapters (part of what was trained) are dropped; use
    export_merged for an exact model instead."""
    adapters = list(adapter_modules(model))
    if not adapters:
        raise RuntimeError("this model has no LoRA adapters; nothing to export")
    cfg = adapters[0][1].cfg
    dropped = sum(isinstance(a, ExpertLoRA) for _, a, _ in adapters) if attention_only else 0
    if dropped:
        warnings.warn(
            f"export_peft(attention_only=True): the expert adapters of {dropped} layers are DROPPED; "
            "the exported adapter is not the trained model. Use export_merged for an exact export.",
            stacklevel=2,
        )
    _warn_single_expert_projection(adapters, attention_only)
    tensors, targets = peft_tensors(model, attention_only=attention_only)
    if not tensors:
        raise ValueError("attention_only=True but no attention projection has an adapter; nothing to export")
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": cfg.rank,
        "lora_alpha": int(cfg.alpha) if float(cfg.alpha).is_integer() else cfg.alpha,
        "lora_dropout": 0.0 if "target_parameters" in targets else cfg.dropout,
        "use_rslora": cfg.use_rslora,
        **targets,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }
    with atomic_directory(out_dir, overwrite) as partial:
        save_file(
            {k: v.to("cpu").contiguous() for k, v in tensors.items()},
            str(partial / "adapter_model.safetensors"),
            metadata={"format": "pt"},
        )
        (partial / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return Path(out_dir)


def _warn_single_expert_projection(adapters: list, attention_only: bool) -> None:
    """Servers that read gpt-oss expert LoRA by position (vLLM: `experts.base_layer.lora_*` is gate_up and
    `experts.lora_*` is down) cannot tell a lone projection's tensors apart: peft names either one
    `experts.lora_*`."""
    if attention_only:
        return
    lone = {a.projections for _, a, _ in adapters if isinstance(a, ExpertLoRA) and len(a.projections) == 1}
    if lone == {("gate_up_proj",)} or len(lone) > 1:
        warnings.warn(
            "export_peft: the experts have a gate_up_proj adapter without a down_proj one; peft names it "
            "`experts.lora_*`, which servers reading the gpt-oss MoE LoRA layout by position (vLLM) take for "
            "down_proj: adapt both (peft.target_modules) or export --format merged for those servers",
            stacklevel=3,
        )


def merged_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The base model's tensors (HF names) with every adapter folded in, one at a time; `model` is not
    modified. An expert-parallel export wraps this with a gather of the expert tensors."""
    adapter_names = set(lora_state_dict(model))
    folds: dict[str, tuple] = {}  # weight name -> (adapter, projection or None)
    for name, adapter, _ in adapter_modules(model):
        if adapter.merged:
            continue  # already inside the base weights
        if isinstance(adapter, LoraLinear):
            folds[f"{name}.weight"] = (adapter, None)
        else:
            folds.update({f"{name}.{proj}": (adapter, proj) for proj in adapter.projections})
    for name, tensor in model.state_dict().items():
        if name in adapter_names:
            continue
        if name in folds:
            adapter, proj = folds[name]
            tensor = tensor.clone()
            if proj is None:
                add_product(tensor, adapter.lora_B, adapter.lora_A, adapter.scaling)
            else:
                a, b = adapter.factors(proj)
                for e in range(tensor.shape[0]):
                    add_product(
                        tensor[e], a if adapter.shared else a[e], b if adapter.shared else b[e], adapter.scaling
                    )
        yield name, tensor
    yield from _packed_merged(model, folds)


def _packed_merged(model: nn.Module, folds: dict) -> Iterator[tuple[str, torch.Tensor]]:
    """The MXFP4 experts (model.expert_weights=mxfp4) as dense [E, in, out] tensors in the biases' dtype, one
    projection of one layer at a time (dequantized one expert at a time, as transformers does), adapters
    folded in: host memory for these is one such tensor."""
    from engine.checkpoint.hf.mxfp4 import dequantize_mxfp4

    for prefix, module in model.named_modules():
        if not getattr(module, "packed", False):
            continue
        for proj in ("gate_up_proj", "down_proj"):
            w = getattr(module, proj)  # Mxfp4Weight standing for [E, in, out]
            dtype = getattr(module, f"{proj}_bias").dtype
            tensor = torch.empty(tuple(w.shape), dtype=dtype)
            adapter, _ = folds.get(f"{prefix}.{proj}", (None, None))
            for e in range(w.num_experts):
                tensor[e] = dequantize_mxfp4(w.blocks[e], w.scales[e], dtype).t().cpu()  # (out, in) -> (in, out)
                if adapter is not None:
                    a, b = adapter.factors(proj)
                    add_product(
                        tensor[e], a if adapter.shared else a[e], b if adapter.shared else b[e], adapter.scaling
                    )
            yield f"{prefix}.{proj}", tensor
            del tensor


def export_merged(model: nn.Module, out_dir: str | Path, **save_hf_kwargs) -> Path:
    """An HF checkpoint with the adapters folded in, which transformers loads without peft (through
    engine.checkpoint.hf.save_hf; its keyword arguments pass through). `model` is left unchanged. The tensors
    are streamed one by one; MXFP4 experts (model.expert_weights=mxfp4) are written dense, one projection of
    one layer dequantized at a time (host memory: the largest such tensor plus the shard being written)."""
    from engine.checkpoint.hf import save_hf

    if "state_dict" in save_hf_kwargs:
        raise TypeError("export_merged builds the state dict itself; wrap merged_tensors(model) and call save_hf")
    return save_hf(model, out_dir, state_dict=merged_tensors(model), **save_hf_kwargs)


@functools.lru_cache(maxsize=None)
def _check_installed_peft(projs: tuple[str, ...]) -> None:
    """Load a converted random adapter into the installed peft on a tiny GPT-OSS and compare names,
    shapes and every expert's weight delta with ours; raise if they differ (the layout is peft's
    internal choice and could change between versions)."""
    for package in ("transformers", "peft"):
        try:
            importlib.import_module(package)
        except ImportError as e:
            warnings.warn(
                f"{import_failure(package, e)}, so the expert adapter layout could not be checked "
                "against the peft that will load it (tests check it against peft 0.21)",
                stacklevel=3,
            )
            return
    import peft
    import transformers
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    e, h, i, r, alpha = 3, 4, 3, 2, 3.0
    hf_cfg = transformers.GptOssConfig(
        vocab_size=8,
        hidden_size=h,
        num_hidden_layers=1,
        num_attention_heads=1,
        num_key_value_heads=1,
        head_dim=4,
        num_local_experts=e,
        num_experts_per_tok=1,
        intermediate_size=i,
        pad_token_id=None,
        eos_token_id=None,
        bos_token_id=None,
    )
    hf = transformers.GptOssForCausalLM(hf_cfg)
    with warnings.catch_warnings():  # peft calls transformers APIs that warn about their own renames
        warnings.simplefilter("ignore", FutureWarning)
        pm = peft.get_peft_model(
            hf,
            peft.LoraConfig(
                r=r, lora_alpha=alpha, target_modules=[], target_parameters=[f"mlp.experts.{p}" for p in projs]
            ),
        )
    gen = torch.Generator().manual_seed(0)
    shapes = {"gate_up_proj": (h, 2 * i), "down_proj": (i, h)}
    ours, factors = {}, {}
    for proj, prefix in _expert_names("model.layers.0.mlp.experts", projs).items():
        fan_in, fan_out = shapes[proj]
        a, b = torch.randn(e, fan_in, r, generator=gen), torch.randn(e, r, fan_out, generator=gen)
        factors[proj] = (a, b)
        ours[f"{PEFT_PREFIX}{prefix}.lora_A.weight"], ours[f"{PEFT_PREFIX}{prefix}.lora_B.weight"] = _expert_to_peft(
            a, b, e
        )
    theirs = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(pm).items()}
    mismatch = theirs != {k: tuple(v.shape) for k, v in ours.items()}
    if not mismatch:
        set_peft_model_state_dict(pm, ours)
        for module in pm.modules():
            if type(module).__name__ == "ParamWrapper" and module.parameter_name in factors:
                a, b = factors[module.parameter_name]
                want = torch.bmm(a, b) * (alpha / r)  # [E, in, out]
                mismatch |= not torch.allclose(module.get_delta_weight("default"), want, atol=1e-5)
    if mismatch:
        raise RuntimeError(
            f"the installed peft {peft.__version__} stores GPT-OSS expert LoRA differently from what "
            f"this exporter writes (expected keys/shapes {theirs}); refusing to export expert adapters. "
            "Use attention_only=True or export_merged, or pin peft 0.21."
        )


def _targets_param(module: str, proj: str, targets: list[str]) -> bool:
    full = f"{module}.{proj}"
    return any(full == t or full.endswith("." + t) for t in targets)


def read_adapter_config(adapter_dir: str | Path) -> tuple[Path, dict, Path]:
    """(adapter_config.json, its contents, adapter_model.safetensors) of a PEFT LoRA folder; a missing file or
    another peft_type is an error naming the file."""
    adapter_dir = Path(adapter_dir)
    cfg_file, weights_file = adapter_dir / "adapter_config.json", adapter_dir / "adapter_model.safetensors"
    for f in (cfg_file, weights_file):
        if not f.is_file():
            raise FileNotFoundError(f"{f}: missing; --adapter takes a PEFT adapter folder")
    cfg = json.loads(cfg_file.read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{cfg_file}: peft_type={cfg.get('peft_type')!r}; only LORA adapters can be loaded")
    return cfg_file, cfg, weights_file


@torch.no_grad()
def fold_peft_adapter(model: torch.nn.Module, adapter_dir: str | Path) -> int:
    """Add scaling * B A of every adapter in a PEFT folder to the model's weights; returns how many
    weights changed. Attention adapters are plain LoRA; expert adapters are peft's ParamWrapper
    layout (lora_A [E*r, in], lora_B [out, r*E])."""
    from safetensors.torch import load_file

    _, cfg, weights_file = read_adapter_config(adapter_dir)
    r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    tensors = load_file(str(weights_file))
    params = dict(model.named_parameters())
    targets = list(cfg.get("target_parameters") or [])
    e_total = model.config.num_local_experts
    done = 0
    for key in sorted(k for k in tensors if k.endswith(".lora_A.weight")):
        module = key[len(PEFT_PREFIX) : -len(".lora_A.weight")]
        a, b = tensors[key].float(), tensors[key.replace(".lora_A.", ".lora_B.")].float()
        if f"{module}.weight" in params:  # a linear layer: W [out, in] += s * B [out, r] A [r, in]
            w = params[f"{module}.weight"]
            w.add_((scaling * b @ a).to(w.dtype))
        else:
            experts = module.removesuffix(".base_layer")
            chosen = [p for p in ("gate_up_proj", "down_proj") if _targets_param(experts, p, targets)]
            proj = "gate_up_proj" if module.endswith(".base_layer") or chosen == ["gate_up_proj"] else "down_proj"
            name = f"{experts}.{proj}"
            if name not in params or not chosen:
                raise ValueError(f"{weights_file}: adapter {key} matches no weight of this model")
            w = params[name]  # [E, in, out]
            a_e = a.view(e_total, r, -1).transpose(1, 2)  # [E, in, r]
            b_e = b.view(b.shape[0], r, e_total).permute(2, 1, 0)  # [E, r, out]
            if a_e.shape[1] != w.shape[1] or b_e.shape[2] != w.shape[2]:
                raise ValueError(
                    f"{weights_file}: {key} has shapes {tuple(a.shape)}/{tuple(b.shape)}, which do "
                    f"not fit {name} {tuple(w.shape)}"
                )
            w.add_((scaling * a_e @ b_e).to(w.dtype))
        done += 1
    if done == 0:
        raise ValueError(f"{weights_file}: no lora_A/lora_B tensors found")
    return done
