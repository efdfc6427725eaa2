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

# Unexpected failures show their whole traceback (Hydra trims it otherwise); user errors are ours.
os.environ.setdefault("HYDRA_FULL_ERROR", "1")
REPO = Path(__file__).resolve().parents[1]
# `python engine/train.py` puts engine/ itself on sys.path, where engine/peft would shadow the real
# `peft` package (and engine/data any `data`); put the repository there instead.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import hydra  # noqa: E402
from hydra.core.config_store import ConfigStore  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from engine.config import build_config  # noqa: E402
from engine.models.gpt_oss.config import ConfigError  # noqa: E402

RECIPES = REPO / "recipes"


def register_recipes() -> list[str]:
    """Each recipes/NAME.yaml becomes option NAME of group `recipe`, merged at the top level."""
    cs = ConfigStore.instance()
    names = []
    for path in sorted(RECIPES.glob("*.yaml")):
        cs.store(group="recipe", name=path.stem, node=OmegaConf.load(path), package="_global_")
        names.append(path.stem)
    return names


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


register_recipes()


@hydra.main(config_path=str(REPO / "conf"), config_name="config", version_base=None)
def main(dcfg: DictConfig) -> None:
    setup_logging()
    from engine.checkpoint.errors import CheckpointError, CheckpointExistsError
    from engine.data.dataset import DataError
    from engine.data.records import RecordError
    from engine.data.tokenizer import TokenizerError
    from engine.parallel.mesh import LayoutError

    # Errors a user causes (config, layout, data, checkpoint, memory plan) end with our message and
    # exit code 2 on every rank; anything else is a bug and keeps its full traceback.
    user_errors = (ConfigError, LayoutError, DataError, RecordError, TokenizerError, CheckpointError,
                   CheckpointExistsError, FileNotFoundError, MemoryError)
    try:
        cfg = build_config(OmegaConf.to_container(dcfg, resolve=True))
        setup_logging(cfg.trainer.output_dir)
        from engine.trainer import run

        run(cfg)
    except user_errors as e:
        rank = os.environ.get("RANK", "0")
        print(f"error (rank {rank}): {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
