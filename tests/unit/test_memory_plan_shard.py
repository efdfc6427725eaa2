"""The memory plan of each `parallel.shard` mode, against counts taken from the real model, and the
SFT recipes' layouts within 80 GB GPUs."""

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from engine.config.load import build_config
from engine.models.gpt_oss import GptOssConfig, GptOssForCausalLM
from engine.train import REPO, register_recipes
from engine.training.memory_plan import GiB, plan_for_run, plan_memory
from tests.distributed.layout import is_expert_param

register_recipes()


def _counts(arch):
    """(dense, experts) parameter counts of the model as built on the meta device."""
    with torch.device("meta"):
        model = GptOssForCausalLM(arch)
    dense = sum(p.numel() for n, p in model.named_parameters() if not is_expert_param(n))
    experts = sum(p.numel() for n, p in model.named_parameters() if is_expert_param(n))
    return dense, experts


ARGS = dict(lora_rank=None, seq_len=64, micro_batch=1, eager_attention=False, checkpointing=True, train_bytes=2)


def test_optimizer_state_is_split_over_the_ranks_holding_copies():
    arch = GptOssConfig.tiny()
    dense, experts = _counts(arch)
    world, ep = 8, 2
    none = plan_memory(arch, ep=ep, world_size=world, shard="none", **ARGS)
    assert none.optimizer == (dense + experts / ep) * 8  # two fp32 moments of every local weight
    for shard in ("optimizer", "full"):
        plan = plan_memory(arch, ep=ep, world_size=world, shard=shard, **ARGS)
        # dense state over all 8 ranks, expert state over the 4 ranks of the expert-DP group
        assert plan.optimizer == pytest.approx((dense / world + experts / ep / (world // ep)) * 8)
    full = plan_memory(arch, ep=ep, world_size=world, shard="full", **ARGS)
    opt = plan_memory(arch, ep=ep, world_size=world, shard="optimizer", **ARGS)
    assert full.weights < opt.weights  # full frees the gathered weights between blocks
    assert (
        plan_memory(arch, ep=ep, world_size=1, shard="full", **ARGS).total
        == plan_memory(arch, ep=ep, world_size=1, shard="none", **ARGS).total
    )  # one rank: nothing to shard


def _recipe_plan(name, world, preset, *overrides):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        values = OmegaConf.to_container(compose("config", overrides=[f"recipe={name}", *overrides]), resolve=True)
    return plan_for_run(build_config(values), GptOssConfig.from_preset(preset), "cuda", world)


@pytest.mark.parametrize(
    "name,world,preset", [("gptoss120b_sft", 32, "gpt-oss-120b"), ("gptoss20b_sft", 8, "gpt-oss-20b")]
)
def test_sft_recipes_fit_80gb_gpus_only_with_their_sharding(name, world, preset):
    assert _recipe_plan(name, world, preset).total <= 0.95 * 80e9
    if name == "gptoss120b_sft":  # EP8 x 4 nodes needs the weights sharded too
        assert _recipe_plan(name, world, preset, "parallel.shard=none").total > 2 * 80 * GiB
        assert _recipe_plan(name, world, preset, "parallel.shard=optimizer").total > 80 * GiB
