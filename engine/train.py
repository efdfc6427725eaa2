"""Training entry point.

    python engine/train.py recipe=tiny_sft [key=value ...]
    torchrun --nproc_per_node 4 engine/train.py recipe=gptoss20b_lora [key=value ...]

Hydra composes conf/config.yaml + recipes/NAME.yaml + the command-line overrides; the result is
checked against the typed schema (engine/config/sections.py) before anything heavy starts.

Exit codes: 0 done; 2 a user error (one line on stderr); 75 preempted (a SIGTERM or SIGUSR1 stopped the
run at a step boundary with a checkpoint there: rerun the same command to resume; engine/training/preempt.py).
"""

from __future__ import annotations

import logging
import os
import sys
import time
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
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from engine.config.compose import compose_config, register_recipes, usage  # noqa: E402, F401
from engine.config.load import build_config  # noqa: E402
from engine.errors import EngineError, StorageError, check_writable, storage_error  # noqa: E402


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


SILENT_RANK_WAIT_S = 10  # the longest a rank that leaves an error to its node's first rank outlives it


def fail(e: BaseException, every_rank: bool = True) -> None:
    """One line on stderr, exit code 2: what went wrong and what to do, no traceback. An error the
    ranks of a node meet identically (`every_rank=False`: the config, the output folder) is printed
    by the node's first rank alone."""
    rank = os.environ.get("RANK", "0")
    if every_rank or os.environ.get("LOCAL_RANK", "0") == "0":
        message = " ".join(str(e).split())  # one line, whatever the message's own line breaks
        print(f"error (rank {rank}): {type(e).__name__}: {message}", file=sys.stderr, flush=True)
    else:
        # A silent rank that exited first would have torchrun stop the node's first rank, maybe before its
        # line is out: it waits instead, and torchrun ends it once that rank has said it and exited.
        time.sleep(SILENT_RANK_WAIT_S)
    sys.exit(2)


def preflight(overrides: list[str]) -> None:
    """Compose and validate the config, and check the output folder, before Hydra's own run: a
    misspelt key, an unknown recipe, a bad value or an unwritable folder is one line and exit code
    2, not a Hydra traceback. Hydra's own flags (--help, --cfg, -m ...) are left to Hydra."""
    if any(a.startswith("-") for a in overrides):
        return
    try:
        cfg = compose_config(overrides)  # main() says what validation adjusted
        check_writable(cfg.trainer.output_dir)
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
        from engine.training.preempt import PREEMPTED_EXIT_CODE, Preempted
        from engine.training.trainer import run  # the heavy imports, once the config is known to be good

        try:
            run(cfg)
        except Preempted:  # its checkpoint saved and said so: the scheduler may requeue the same command
            sys.exit(PREEMPTED_EXIT_CODE)
    except _user_errors() as e:
        fail(e)
    except Exception as e:  # noqa: BLE001 (a full disk or a permission problem, however reported; else re-raised)
        err = storage_error(e, dcfg.trainer.output_dir)
        if not isinstance(err, StorageError):
            raise
        fail(err)


if __name__ == "__main__":
    if {"-h", "--help"} & set(sys.argv[1:]):  # Hydra's own help stays at --hydra-help
        print(usage(__doc__), end="")
        sys.exit(0)
    register_recipes()  # before Hydra composes `recipe=NAME`
    preflight(sys.argv[1:])
    main()
