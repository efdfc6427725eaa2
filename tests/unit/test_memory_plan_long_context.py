"""The memory plan at 128K tokens: sequence terms linear in T, offload moving the layer inputs to the
host, the 128K recipes fitting an 80 GB GPU only with offload (and refused without it)."""

import pytest

from engine.config.load import build_config
from engine.errors import PlanError
from engine.models.gpt_oss import GptOssConfig
from engine.training.memory_plan import activation_bytes_per_token, check_fits, plan_for_run
from tests.unit.test_recipes import _compose

GB80 = 80e9  # an H100 80GB reports about 85e9 bytes; the plan is checked against the nominal 80e9


@pytest.mark.parametrize("checkpointing,offload", [(False, False), (True, False), (True, True)])
def test_activation_bytes_per_token_do_not_depend_on_length_except_eager(checkpointing, offload):
    cfg = GptOssConfig.gpt_oss_20b()
    short = activation_bytes_per_token(cfg, 4096, False, checkpointing, 2, offload)
    assert activation_bytes_per_token(cfg, 131072, False, checkpointing, 2, offload) == short
    assert activation_bytes_per_token(cfg, 131072, True, checkpointing, 2, offload) > 20 * short


@pytest.mark.parametrize(
    "recipe,arch,world",
    [("gptoss20b_lora_128k", GptOssConfig.gpt_oss_20b, 1), ("gptoss120b_lora_128k", GptOssConfig.gpt_oss_120b, 8)],
)
def test_128k_recipes_fit_80gb_with_offload_and_are_refused_without(recipe, arch, world):
    cfg = build_config(_compose(f"recipe={recipe}"))
    assert cfg.data.max_seq_len == 131072 and cfg.model.activation_offload and cfg.model.activation_checkpointing
    a = arch()
    plan = plan_for_run(cfg, a, "cuda", world)
    check_fits(plan, GB80, enabled=True)
    # the layer inputs, [T, H] bf16 per layer, wait on the host instead of the GPU
    assert plan.host == 131072 * a.hidden_size * 2 * a.num_hidden_layers
    kept = plan_for_run(build_config(_compose(f"recipe={recipe}", "model.activation_offload=false")), a, "cuda", world)
    assert kept.host == 0 and kept.total - plan.total == pytest.approx(plan.host * (1 - 2 / a.num_hidden_layers))
    with pytest.raises(PlanError, match="activation_offload=true"):
        check_fits(kept, GB80, enabled=True)
