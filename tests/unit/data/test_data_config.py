"""DataConfig validation: errors name the key, the bad value and the allowed values."""

import pytest
from omegaconf import OmegaConf

from engine.data.config import DataConfig, default_sample_paths


@pytest.mark.parametrize(
    "override, message",
    [
        ({"loss_mask": "all"},
         "data.loss_mask = 'all' is not allowed; choose one of: assistant, final_only, last_turn"),
        ({"on_error": "ignore"}, "data.on_error = 'ignore' is not allowed; choose one of: raise, skip"),
        ({"overlong": "split"}, "data.overlong = 'split' is not allowed; choose one of: drop, truncate"),
        ({"reasoning_effort": "max"}, "data.reasoning_effort = 'max' is not allowed; choose one of: low, medium, high"),
        ({"max_seq_len": 0}, "data.max_seq_len = 0 must be an integer >= 2"),
        ({"micro_batch_size": 0}, "data.micro_batch_size = 0 must be an integer >= 1"),
        ({"prefetch": -1}, "data.prefetch = -1 must be an integer >= 0"),
        ({"pack": "yes"}, "data.pack = 'yes' must be true or false"),
        ({"pack": "first_fit"}, "data.pack = 'first_fit' must be true or false, or one of: best_fit, next_fit"),
        ({"pack_window": 0}, "data.pack_window = 0 must be an integer >= 1"),
        ({"current_date": "June 1"}, "data.current_date = 'June 1' must look like YYYY-MM-DD"),
        ({"train_path": "/no/such.jsonl"}, "data.train_path = '/no/such.jsonl' does not exist"),
        ({"global_batch_size": 6, "micro_batch_size": 4},
         "data.global_batch_size = 6 must be a multiple of data.micro_batch_size = 4"),
    ],
)
def test_bad_values_are_named(override, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        DataConfig(**override).validate()


def test_pack_choices():
    assert [DataConfig(pack=p).validate().packing for p in ("best_fit", "next_fit", True, False)] == [
        "best_fit", "next_fit", "best_fit", "none"]
    assert DataConfig().packing == "best_fit" and DataConfig().pack_window == 4096


def test_batch_split_over_ranks():
    cfg = DataConfig(global_batch_size=16, micro_batch_size=2).validate(world_size=4)
    assert cfg.grad_accum_steps(4) == 2
    with pytest.raises(ValueError, match=r"micro_batch_size \* world_size = 2 \* 3"):
        cfg.validate(world_size=3)


def test_default_paths_are_the_shipped_sample():
    train, val = default_sample_paths()
    cfg = DataConfig().validate()
    assert cfg.resolved_train_path() == str(train) and cfg.resolved_val_path() == str(val)
    user = DataConfig(train_path=str(train))
    assert user.resolved_val_path() is None


def test_hydra_structured_config_round_trip():
    # The Hydra config mirrors DataConfig under `data.`; OmegaConf must accept its types.
    conf = OmegaConf.merge(OmegaConf.structured(DataConfig), {"max_seq_len": 512, "loss_mask": "last_turn"})
    cfg = OmegaConf.to_object(conf)
    assert isinstance(cfg, DataConfig) and cfg.validate().max_seq_len == 512
    for pack in ("next_fit", False):  # data.pack holds a name or a bool
        assert OmegaConf.to_object(OmegaConf.merge(conf, {"pack": pack})).validate().pack == pack
