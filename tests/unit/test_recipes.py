"""Every recipe composes through Hydra and validates against the typed schema."""

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from engine.config.load import build_config
from engine.models.gpt_oss.config import ConfigError
from engine.train import REPO, register_recipes

RECIPES = register_recipes()


def _compose(*overrides):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        return OmegaConf.to_container(compose("config", overrides=list(overrides)), resolve=True)


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_composes_and_validates(name):
    cfg = build_config(_compose(f"recipe={name}"))
    assert cfg.recipe == name


def test_command_line_wins_over_recipe():
    cfg = build_config(_compose("recipe=tiny_sft", "optim.lr=0.5", "trainer.max_steps=7"))
    assert cfg.optim.lr == 0.5 and cfg.trainer.max_steps == 7


def test_unknown_key_is_named():
    values = _compose("recipe=tiny_sft")
    values["optim"]["learning_rate"] = 1.0
    with pytest.raises(ConfigError, match=r"optim\.learning_rate"):
        build_config(values)


def test_bad_choice_lists_allowed_values():
    with pytest.raises(ConfigError, match=r"model\.experts_backend='fast'.*'grouped_mm'"):
        build_config(_compose("recipe=tiny_sft", "model.experts_backend=fast"))


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match=r"trainer\.max_steps='many'"):
        build_config(_compose("recipe=tiny_sft", "trainer.max_steps=many"))
