"""`python engine/train.py --help` documents every key of the base config with its meaning, type, default
and allowed values, read from the schema the config is checked against: each listed choice is accepted
and anything else refused, each listed integer bound is where the check starts refusing."""

import copy
import functools
import re
import subprocess
import sys

import pytest

from engine.config.load import build_config
from engine.errors import ConfigError
from tests.unit.test_recipes import _compose


@pytest.fixture(scope="module")
def help_text():
    from engine.train import REPO

    proc = subprocess.run(
        [sys.executable, "engine/train.py", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _leaves(values: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in values.items():
        if isinstance(value, dict) and key != "overrides":
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def _yaml_text(value) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def _entries(text: str) -> dict[str, tuple[str, str, str | None, str]]:
    """key -> (type, default, allowed, meaning) as --help prints them."""
    found = re.findall(r"^  (\S+)  \((.+?), default (.*?)(?:; allowed: (.*))?\)\n {6}(.*)$", text, re.MULTILINE)
    return {key: (typ, default, allowed or None, meaning) for key, typ, default, allowed, meaning in found}


def test_help_lists_every_key_of_the_base_config_with_its_default_and_meaning(help_text):
    entries = _entries(help_text)
    base = _leaves({k: v for k, v in _compose().items() if k != "hydra"})
    assert set(base) <= set(entries), sorted(set(base) - set(entries))
    for key, value in base.items():
        typ, default, _, meaning = entries[key]
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        assert (float(default) == value) if numeric else default == _yaml_text(value), (key, default, value)
        assert typ and len(meaning.split()) >= 3, (key, meaning)
    assert "tiny_sft" in help_text and "recipe=NAME" in help_text


@functools.cache
def _tiny_sft(method: str) -> dict:
    return _compose("recipe=tiny_sft", f"peft.method={method}")


def _with(key: str, value) -> dict:
    values = copy.deepcopy(_tiny_sft("lora" if key.startswith("peft.") else "none"))  # peft.* is checked for LoRA
    section, name = key.split(".")
    values[section][name] = value
    if key == "data.global_batch_size":  # tiny_sft's micro-batches of 2 would not divide a batch of 1
        values["data"]["micro_batch_size"] = 1
    if key == "model.expert_weights":  # packed experts are frozen, read from a checkpoint
        values = copy.deepcopy(_tiny_sft("lora"))
        values["model"].update(expert_weights=value, path="openai/gpt-oss-20b")
    return values


def test_listed_choices_are_exactly_what_validation_accepts(help_text):
    choice_keys = {k: e[2].split(" | ") for k, e in _entries(help_text).items() if e[2] and " | " in e[2]}
    assert {"model.experts_backend", "data.loss_mask", "peft.init", "parallel.shard"} <= set(choice_keys)
    for key, allowed in choice_keys.items():
        if allowed == ["true", "false"]:
            continue
        for value in allowed:
            build_config(_with(key, value))
        with pytest.raises(ConfigError, match=re.escape(key)):
            build_config(_with(key, "surely-not-" + allowed[0]))


def test_listed_integer_bounds_are_where_validation_starts_refusing(help_text):
    bounded = {k: e[2] for k, e in _entries(help_text).items() if e[0] == "int" and e[2] and "integer" in e[2]}
    assert {"trainer.max_steps", "data.max_seq_len", "peft.rank", "checkpoint.keep"} <= set(bounded)
    for key, text in bounded.items():
        low = 1 if text == "a positive integer" else int(re.fullmatch(r"an integer >= (\d+)", text).group(1))
        build_config(_with(key, low))
        with pytest.raises(ConfigError, match=re.escape(key)):
            build_config(_with(key, low - 1))
