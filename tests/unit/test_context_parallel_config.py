"""parallel.cp and model.moe_chunk_tokens in the config, the layout check and the memory plan: each bad
value is refused in one line naming the key, and the plan divides a rank's activations by cp and
pays the MoE routed copies for one chunk only."""

import pytest
import torch

from engine.config.load import build_config
from engine.errors import ConfigError
from engine.models.gpt_oss import GptOssConfig
from engine.parallel import LayoutError, Mesh, check_layout
from engine.training.memory_plan import activation_bytes, activation_bytes_per_token, plan_for_run
from tests.unit.test_recipes import _compose


def test_check_layout_names_parallel_cp_and_its_choices():
    check_layout(4, 2, num_experts=8, cp=2)
    check_layout(4, 4, num_experts=8, cp=4)
    with pytest.raises(
        LayoutError,
        match=r"parallel.cp=3 does not divide the world size 4 .*choose parallel.cp "
        r"in \[1, 2, 4\]",
    ):
        check_layout(4, 1, cp=3)
    with pytest.raises(LayoutError, match="parallel.cp=0 must be a positive integer"):
        check_layout(4, 1, cp=0)


def test_mesh_cp_coordinates():
    mesh = Mesh(world_size=8, rank=5, ep=2, device=torch.device("cpu"), cp=2)
    # rank = data_rank * cp + cp_rank; EP and expert-DP as without CP
    assert (mesh.cp_rank, mesh.data_rank, mesh.data_size) == (1, 2, 4)
    assert (mesh.ep_rank, mesh.edp_rank, mesh.world_size) == (1, 2, 8)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            ["parallel.cp=2", "data.max_seq_len=250"],
            r"data.max_seq_len=250 must be a multiple of 2 x parallel.cp = 4 "
            r".*data.max_seq_len=248 or 252",
        ),
        (["parallel.cp=2", "model.attn_backend=flex"], "model.attn_backend='flex' has no context-parallel path"),
        (["parallel.cp=0"], "parallel.cp=0 must be a positive integer"),
        (["model.moe_chunk_tokens=-1"], "model.moe_chunk_tokens=-1 must be an integer >= 0"),
    ],
)
def test_bad_values_are_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        build_config(_compose("recipe=tiny_sft", *overrides))


def test_good_values_validate():
    cfg = build_config(_compose("recipe=tiny_sft", "parallel.cp=4", "model.moe_chunk_tokens=4096"))
    assert (cfg.parallel.cp, cfg.model.moe_chunk_tokens) == (4, 4096)
    assert build_config(_compose("recipe=tiny_sft")).model.moe_chunk_tokens is None


def test_plan_divides_activations_by_cp_and_adds_the_gathered_keys():
    arch = GptOssConfig.gpt_oss_120b()
    one = plan_for_run(build_config(_compose("recipe=gptoss120b_lora_128k")), arch, "cuda", 8)
    cp2 = plan_for_run(build_config(_compose("recipe=gptoss120b_lora_128k", "parallel.cp=2")), arch, "cuda", 8)
    gathered = 2 * arch.kv_width * 131072 * 2  # k and v of the whole row, bf16, one layer (checkpointing)
    assert cp2.activations == pytest.approx(one.activations / 2 + gathered)
    assert cp2.host == pytest.approx(one.host / 2) and cp2.weights == one.weights


@pytest.mark.parametrize("checkpointing", [False, True])
def test_moe_chunk_bounds_the_routed_term(checkpointing):
    arch = GptOssConfig.gpt_oss_20b()
    k, h, i = arch.num_experts_per_tok, arch.hidden_size, arch.intermediate_size
    routed = k * (h + 2 * i + i + h) * 2
    full = activation_bytes(arch, 131072, 131072, False, checkpointing)
    assert full == 131072 * activation_bytes_per_token(arch, 131072, False, checkpointing)
    chunked = activation_bytes(arch, 131072, 131072, False, checkpointing, moe_chunk=8192)
    layers = 1 if checkpointing else arch.num_hidden_layers
    assert full - chunked == pytest.approx(routed * (131072 * layers - 8192))
    assert activation_bytes(arch, 4096, 4096, False, checkpointing, moe_chunk=8192) == pytest.approx(
        activation_bytes(arch, 4096, 4096, False, checkpointing)
    )  # fewer tokens than a chunk: no change
