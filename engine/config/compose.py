"""Hydra's side of the config: the recipes, composing conf/config.yaml + recipes/NAME.yaml + command-line
overrides into a validated TrainConfig, the text of `--help`, and conf/config.yaml itself, which is
generated from the schema (engine.config.sections) and checked equal to it by the tests:

    python -m engine.config.compose > conf/config.yaml
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
import typing
from pathlib import Path

from engine.config.schema import describe
from engine.config.sections import TrainConfig
from engine.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
RECIPES = REPO / "recipes"

_YAML_HEAD = """\
# Generated from the schema (engine/config/sections.py) by `python -m engine.config.compose > conf/config.yaml`;
# a test keeps the two equal. A recipe (recipes/NAME.yaml, chosen with recipe=NAME) is merged over it, and
# command-line overrides (key=value) over both. `_self_` comes first so the recipe wins over the base.
defaults:
  - _self_
  - recipe: null
  - override hydra/job_logging: disabled
  - override hydra/hydra_logging: disabled
"""
_YAML_TAIL = """
# One output folder for every rank (not one per rank's clock), no change of working directory.
hydra:
  run:
    dir: ${trainer.output_dir}
  output_subdir: null
  job:
    chdir: false
"""


def register_recipes() -> list[str]:
    """Each recipes/NAME.yaml becomes option NAME of group `recipe`, merged at the top level."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    cs = ConfigStore.instance()
    names = []
    for path in sorted(RECIPES.glob("*.yaml")):
        cs.store(group="recipe", name=path.stem, node=OmegaConf.load(path), package="_global_")
        names.append(path.stem)
    return names


def usage(head: str) -> str:
    """`--help`: `head`, the recipes, and every key of the schema with its meaning, type, default and
    allowed values (read from the dataclasses the config is checked against)."""
    lines = [
        head.strip(),
        "",
        f"Recipes (recipe=NAME, recipes/NAME.yaml): {', '.join(register_recipes())}",
        "",
        "Keys (KEY=VALUE on the command line, over the recipe's values, over these defaults):",
    ]
    return "\n".join(lines + describe(TrainConfig)) + "\n"


def unknown_key(key: str) -> ConfigError:
    """A misspelt (or removed) command-line key, with the nearest valid one under the same section."""
    from engine.config.load import REMOVED_KEYS

    cls, parts = TrainConfig, key.lstrip("+~").split(".")
    if ".".join(parts) in REMOVED_KEYS:
        return ConfigError(f"{'.'.join(parts)} is no longer a config key: {REMOVED_KEYS['.'.join(parts)]}")
    for i, part in enumerate(parts):
        names = sorted(f.name for f in dataclasses.fields(cls))
        hint = typing.get_type_hints(cls).get(part)
        if part in names and dataclasses.is_dataclass(hint) and i < len(parts) - 1:
            cls = hint
            continue
        section = ".".join(parts[:i])
        where = f"{section}." if section else ""
        close = difflib.get_close_matches(part, names, n=1)
        hint_text = f"did you mean {where + close[0]!r}? " if close else ""
        return ConfigError(
            f"unknown config key {key!r}; {hint_text}valid keys under {section or 'the top level'}: {names}"
        )
    return ConfigError(f"cannot override {key!r}")


def refuse_group_deletion(overrides: list[str]) -> None:
    """`~optim` (or `~trainer`, any section) would drop the recipe's whole group and train on the
    schema's defaults, or break what refers to it: refused, naming what to do instead."""
    hints = typing.get_type_hints(TrainConfig)
    for arg in overrides:
        deleted = re.fullmatch(r"~([\w.]+)(=.*)?", arg)
        if deleted and dataclasses.is_dataclass(hints.get(deleted.group(1))):
            group = deleted.group(1)
            raise ConfigError(
                f"{arg!r} deletes the required group {group!r}: the run would train on the schema's defaults "
                f"instead of the recipe's; override its keys instead ({group}.KEY=VALUE)"
            )


def compose_config(overrides: list[str]) -> TrainConfig:
    """conf/config.yaml + the recipe + `overrides`, composed by Hydra and validated (quietly: the run says
    what it adjusted). Every problem is a ConfigError naming the key."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from engine.config.load import build_config

    recipes = register_recipes()
    refuse_group_deletion(overrides)
    for arg in overrides:
        name = re.fullmatch(r"\+?recipe=(.*)", arg)
        if name and name.group(1) not in recipes:
            raise ConfigError(f"recipe={name.group(1)!r} is not a recipe; choose one of {recipes} (recipes/NAME.yaml)")
    try:
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
            dcfg = compose("config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as e:
        bad = re.search(r"Could not override '([^']+)'", str(e))
        raise (unknown_key(bad.group(1)) if bad else ConfigError(str(e))) from None
    return build_config(OmegaConf.to_container(dcfg, resolve=True), quiet=True)


def _yaml_value(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_yaml_value(v)}" for k, v in value.items()) + "}"
    return value if re.fullmatch(r"[A-Za-z_][\w./-]*", value) else json.dumps(value)


def render_yaml() -> str:
    """conf/config.yaml: every section of the schema with its defaults, each key's meaning as its comment."""
    out = [_YAML_HEAD]
    for section in dataclasses.fields(TrainConfig):
        cls = typing.get_type_hints(TrainConfig)[section.name]
        if not dataclasses.is_dataclass(cls):
            continue  # `recipe` is set by recipe=NAME
        out.append(f"\n{section.name}:\n")
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            out.append(f"  {f.name.rstrip('_')}: {_yaml_value(default)}  # {f.metadata['help']}\n")
    return "".join(out) + _YAML_TAIL


if __name__ == "__main__":
    print(render_yaml(), end="")
