"""Every schema key is checked at start: a bad value is a ConfigError naming the key and the value."""

import math

import pytest

from engine.config import build_config
from engine.errors import ConfigError, EngineError
from tests.unit.test_recipes import _compose

BAD = [  # (override, text the message must hold)
    ("optim.grad_clip=-1", "optim.grad_clip=-1.0"),  # would flip the gradient
    ("optim.grad_clip=0", "optim.grad_clip=0.0"),  # would zero every update
    ("optim.grad_clip=nan", "optim.grad_clip=nan"),
    ("optim.min_lr_ratio=-3", "optim.min_lr_ratio=-3.0"),  # a negative lr
    ("optim.min_lr_ratio=1.5", "optim.min_lr_ratio=1.5"),
    ("optim.betas=[2,0.5]", "optim.betas[0]=2"),
    ("optim.betas=[0.9,1.0]", "optim.betas[1]=1.0"),
    ("optim.betas=[0.9]", "optim.betas=[0.9]"),
    ("optim.lr=nan", "optim.lr=nan"),
    ("optim.lr=inf", "optim.lr=inf"),
    ("optim.lr=0", "optim.lr=0.0"),
    ("optim.eps=0", "optim.eps=0.0"),
    ("optim.weight_decay=-0.1", "optim.weight_decay=-0.1"),
    ("optim.warmup_steps=-1", "optim.warmup_steps=-1"),
    ("trainer.log_every=0", "trainer.log_every=0"),  # was a ZeroDivisionError after step 1
    ("trainer.val_every=-1", "trainer.val_every=-1"),
    ("trainer.max_bad_steps=-1", "trainer.max_bad_steps=-1"),
    ("trainer.max_steps=0", "trainer.max_steps=0"),
    ("trainer.output_dir=''", "trainer.output_dir=''"),
    ("trainer.output_dir=null", "trainer.output_dir=null"),
    ("checkpoint.every=-2", "checkpoint.every=-2"),
    ("checkpoint.keep=0", "checkpoint.keep=0"),
    ("parallel.timeout_s=0", "parallel.timeout_s=0"),
    ("model.ce_chunk_size=0", "model.ce_chunk_size=0"),
    ("model.activation_checkpointing=[1,-2]", "model.activation_checkpointing=[1, -2]"),
    ("model.activation_checkpointing=sometimes", "model.activation_checkpointing='sometimes'"),
]


@pytest.mark.parametrize("override,named", BAD, ids=[b[0] for b in BAD])
def test_bad_value_is_refused_naming_key_and_value(override, named):
    with pytest.raises(ConfigError) as info:
        build_config(_compose("recipe=tiny_sft", override))
    message = str(info.value)
    assert named in message, message
    assert "\n" not in message
    assert isinstance(info.value, EngineError) and isinstance(info.value, ValueError)


@pytest.mark.parametrize("override", ["optim.grad_clip=inf", "optim.warmup_steps=60", "optim.warmup_steps=0",
                                      "optim.min_lr_ratio=0", "optim.min_lr_ratio=1", "optim.betas=[0,0.999]",
                                      "model.activation_checkpointing=[0,1]", "checkpoint.every=0"])
def test_edge_values_that_are_fine_pass(override):
    build_config(_compose("recipe=tiny_sft", override))


def test_a_warmup_longer_than_the_run_is_cut_to_fit_with_one_warning(caplog):
    # A smoke run of a recipe (tiny_sft warms up for 5 steps) shorter than its warmup.
    with caplog.at_level("WARNING", logger="engine"):
        cfg = build_config(_compose("recipe=tiny_sft", "trainer.max_steps=2"))
    assert cfg.optim.warmup_steps == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
    assert "optim.warmup_steps=5" in warnings[0] and "trainer.max_steps=2" in warnings[0]
    with caplog.at_level("WARNING", logger="engine"):
        caplog.clear()
        assert build_config(_compose("recipe=tiny_sft", "trainer.max_steps=5")).optim.warmup_steps == 5
    assert not caplog.records  # a warmup that fits is left as it is, silently


def test_misspelt_key_suggests_the_right_one():
    values = _compose("recipe=tiny_sft")
    values["trainer"]["max_stepz"] = 3
    with pytest.raises(ConfigError, match=r"trainer\.max_stepz.*did you mean 'trainer\.max_steps'"):
        build_config(values)


def test_every_recipe_passes_the_ranges():
    from engine.train import register_recipes

    for name in register_recipes():
        cfg = build_config(_compose(f"recipe={name}"))
        assert math.isfinite(cfg.optim.lr) and cfg.optim.warmup_steps <= cfg.trainer.max_steps
