"""Training entry point.

    python engine/train.py recipe=tiny_sft [key=value ...]
    torchrun --nproc_per_node 4 engine/train.py recipe=gptoss20b_lora [key=value ...]

Hydra composes conf/config.yaml + recipes/NAME.yaml + the command-line overrides; the result is
checked against the typed schema (engine/config.py) before anything heavy starts.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if __name__ == "__main__":
    # `python engine/train.py` puts engine/ itself on sys.path, where engine/peft would shadow the real
    # `peft` package (and engine/data any `data`); put the repository there instead. Only as the entry
    # script: importing engine.train changes nothing.
    _HERE = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))

import hydra  # noqa: E402
from hydra.core.config_store import ConfigStore  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from engine.config import build_config  # noqa: E402
from engine.errors import ConfigError, EngineError, StorageError, check_writable, storage_error  # noqa: E402

RECIPES = REPO / "recipes"


def register_recipes() -> list[str]:
    """Each recipes/NAME.yaml becomes option NAME of group `recipe`, merged at the top level."""
    cs = ConfigStore.instance()
    names = []
    for path in sorted(RECIPES.glob("*.yaml")):
        cs.store(group="recipe", name=path.stem, node=OmegaConf.load(path), package="_global_")
        names.append(path.stem)
    return names


def usage() -> str:
    """`--help`: how to run, the recipes, and every key of the schema with its meaning, type, default and
    allowed values (engine.schema.describe reads them from the dataclasses the config is checked against)."""
    from engine.config import TrainConfig
    from engine.schema import describe

    head = [__doc__.strip(), "", f"Recipes (recipe=NAME, recipes/NAME.yaml): {', '.join(register_recipes())}", "",
            "Keys (KEY=VALUE on the command line, over the recipe's values, over these defaults):"]
    return "\n".join(head + describe(TrainConfig)) + "\n"


def setup_logging(output_dir: str | None = None) -> None:
    """Rank 0 logs to the console; every rank also logs everything to OUTPUT/logs/rank{r}.log, and
    the other ranks put only warnings and errors on the console."""
    rank = int(os.environ.get("RANK", "0"))
    fmt = logging.Formatter(f"[%(asctime)s rank{rank}] %(message)s", "%H:%M:%S")
    console = logging.StreamHandler(sys.stdout if rank == 0 else sys.stderr)
    console.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    handlers: list[logging.Handler] = [console]
    if output_dir:
        logs = Path(output_dir) / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(logs / f"rank{rank}.log"))
    root = logging.getLogger("engine")
    # Hydra's logging setup (dictConfig) disables every logger that existed before it ran, which
    # includes the module loggers of engine.* imported above; they log through `root` again.
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if name.startswith("engine.") and isinstance(logger, logging.Logger):
            logger.disabled = False
    for h in handlers:
        h.setFormatter(fmt)
    root.handlers[:] = handlers
    root.setLevel(logging.INFO)
    root.propagate = False
    root.disabled = False  # Hydra's logging config disables loggers that existed before it ran


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that are the user's to fix: ours, plus the builtins a bad path or permission raises."""
    from engine.checkpoint.errors import CheckpointError, CheckpointExistsError

    return EngineError, CheckpointError, CheckpointExistsError, FileNotFoundError, PermissionError


def fail(e: BaseException, every_rank: bool = True) -> None:
    """One line on stderr, exit code 2: what went wrong and what to do, no traceback. An error the
    ranks of a node meet identically (`every_rank=False`: the config, the output folder) is printed
    by the node's first rank alone."""
    rank = os.environ.get("RANK", "0")
    if every_rank or os.environ.get("LOCAL_RANK", "0") == "0":
        message = " ".join(str(e).split())  # one line, whatever the message's own line breaks
        print(f"error (rank {rank}): {type(e).__name__}: {message}", file=sys.stderr)
    sys.exit(2)


def _unknown_key(key: str) -> ConfigError:
    """A misspelt command-line key, with the nearest valid one under the same section."""
    import dataclasses
    import difflib
    from typing import get_type_hints

    from engine.config import TrainConfig

    cls, parts = TrainConfig, key.lstrip("+~").split(".")
    for i, part in enumerate(parts):
        names = sorted(f.name for f in dataclasses.fields(cls))
        hint = get_type_hints(cls).get(part)
        if part in names and dataclasses.is_dataclass(hint) and i < len(parts) - 1:
            cls = hint
            continue
        section = ".".join(parts[:i])
        where = f"{section}." if section else ""
        close = difflib.get_close_matches(part, names, n=1)
        hint_text = f"did you mean {where + close[0]!r}? " if close else ""
        return ConfigError(f"unknown config key {key!r}; {hint_text}valid keys under "
                           f"{section or 'the top level'}: {names}")
    return ConfigError(f"cannot override {key!r}")


def preflight(overrides: list[str]) -> None:
    """Compose and validate the config, and check the output folder, before Hydra's own run: a
    misspelt key, an unknown recipe, a bad value or an unwritable folder is one line and exit code
    2, not a Hydra traceback. Hydra's own flags (--help, --cfg, -m ...) are left to Hydra."""
    if any(a.startswith("-") for a in overrides):
        return
    import re

    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    recipes = register_recipes()
    for arg in overrides:
        name = re.fullmatch(r"\+?recipe=(.*)", arg)
        if name and name.group(1) not in recipes:
            fail(ConfigError(f"recipe={name.group(1)!r} is not a recipe; choose one of {recipes} (recipes/NAME.yaml)"),
                 every_rank=False)
    try:
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
            dcfg = compose("config", overrides=overrides)
        cfg = build_config(OmegaConf.to_container(dcfg, resolve=True), quiet=True)  # main() says what it adjusts
        check_writable(cfg.trainer.output_dir)
    except (HydraException, OmegaConfBaseException) as e:
        bad = re.search(r"Could not override '([^']+)'", str(e))
        fail(_unknown_key(bad.group(1)) if bad else ConfigError(str(e)), every_rank=False)
    except EngineError as e:  # the config and the output folder: the same on every rank of a node
        fail(e, every_rank=False)
    except _user_errors() as e:
        fail(e)


@hydra.main(config_path=str(REPO / "conf"), config_name="config", version_base=None)
def main(dcfg: DictConfig) -> None:
    setup_logging()
    # Errors a user causes (config, layout, data, resume, checkpoint, memory plan, a full disk) end
    # with our one-line message and exit code 2 on every rank; anything else is a bug and keeps its
    # traceback.
    try:
        cfg = build_config(OmegaConf.to_container(dcfg, resolve=True))
        check_writable(cfg.trainer.output_dir)
        setup_logging(cfg.trainer.output_dir)
        from engine.trainer import run

        run(cfg)
    except _user_errors() as e:
        fail(e)
    except Exception as e:  # noqa: BLE001 (a full disk or a permission problem, however reported; else re-raised)
        err = storage_error(e, dcfg.trainer.output_dir)
        if not isinstance(err, StorageError):
            raise
        fail(err)


if __name__ == "__main__":
    if {"-h", "--help"} & set(sys.argv[1:]):  # Hydra's own help stays at --hydra-help
        print(usage(), end="")
        sys.exit(0)
    register_recipes()  # before Hydra composes `recipe=NAME`
    preflight(sys.argv[1:])
    main()
