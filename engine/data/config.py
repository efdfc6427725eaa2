"""Typed configuration of the data pipeline.

The Hydra config mirrors these field names under `data.`; `validate()` runs once at start-up so a
typo in a recipe fails before any data is read, with a message naming the key and the choices.
"""

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LOSS_MASKS = ("assistant", "final_only", "last_turn")
ON_ERROR = ("raise", "skip")
OVERLONG = ("drop", "truncate")
# data.pack: best_fit (true means it too), next_fit, or false (one document per row).
PACKINGS = ("best_fit", "next_fit")
REASONING_EFFORTS = ("low", "medium", "high")

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(:[\w.-]+)?$")

ASSETS_DIR = Path(__file__).resolve().parent / "assets"


def default_tokenizer_path() -> Path:
    """The small byte-level BPE tokenizer shipped for the tiny models (vocab 1024)."""
    return ASSETS_DIR / "tokenizer" / "tokenizer.json"


def default_sample_paths() -> tuple[Path, Path]:
    """(train, val) JSONL files of the shipped sample chat data."""
    return ASSETS_DIR / "sample_chat.jsonl", ASSETS_DIR / "sample_chat_val.jsonl"


@dataclass
class DataConfig:
    """Everything that decides which tokens the model sees and which carry loss.

    Paths left as None fall back to the shipped assets: `train_path=None` trains on the sample
    chat data and then `val_path=None` validates on the sample validation file; with a user
    `train_path`, `val_path=None` means no validation. `tokenizer=None` is the shipped tokenizer;
    a model directory or a tokenizer.json path selects another one.
    """

    # A .jsonl/.json/.parquet file, a save_to_disk folder, a Hub id owner/name[:split], a list of
    # these, or a folder made by `python -m engine.data.prepare` (used as it is). Typed Any
    # because OmegaConf cannot hold a union of a string and a list; validate() checks them.
    train_path: Any = None
    val_path: Any = None
    tokenizer: str | None = None
    max_seq_len: int = 4096
    # Rows (sequences of max_seq_len tokens) per optimizer step, fixed whatever the world size.
    global_batch_size: int = 8
    micro_batch_size: int = 1
    # best_fit | next_fit | false (one document per row); true means best_fit. Typed Any because
    # OmegaConf cannot hold a union of a string and a bool; validate() checks it.
    pack: Any = "best_fit"
    # Documents of the epoch's order packed together by best_fit (a window); its rows are shuffled.
    pack_window: int = 4096
    loss_mask: str = "assistant"
    on_error: str = "raise"
    overlong: str = "drop"
    # Used for records without their own `reasoning_effort`.
    reasoning_effort: str = "medium"
    # "YYYY-MM-DD" adds a `Current date:` line to every system message; None leaves it out.
    current_date: str | None = None
    shuffle: bool = True
    # Batches prepared ahead by a background thread; 0 prepares them in the calling thread.
    prefetch: int = 4
    # Seed of the data order; None uses the trainer's seed.
    seed: int | None = None
    # Where the trainer keeps the prepared stores (train/, val/); None = OUTPUT_DIR/data.
    prepared_dir: str | None = None
    # Processes that render and tokenize; 0 = one per core (at most 8).
    prepare_workers: int = 0

    def validate(self, world_size: int | None = None) -> "DataConfig":
        """Raise ValueError naming the first bad key; with `world_size`, check the batch split."""
        _choice("loss_mask", self.loss_mask, LOSS_MASKS)
        _choice("on_error", self.on_error, ON_ERROR)
        _choice("overlong", self.overlong, OVERLONG)
        _choice("reasoning_effort", self.reasoning_effort, REASONING_EFFORTS)
        _at_least("max_seq_len", self.max_seq_len, 2)
        _at_least("global_batch_size", self.global_batch_size, 1)
        _at_least("micro_batch_size", self.micro_batch_size, 1)
        _at_least("prefetch", self.prefetch, 0)
        _at_least("prepare_workers", self.prepare_workers, 0)
        _at_least("pack_window", self.pack_window, 1)
        if not isinstance(self.pack, bool) and self.pack not in PACKINGS:
            raise ValueError(f"data.pack = {self.pack!r} must be true or false, or one of: {', '.join(PACKINGS)} "
                             "(true packs best_fit; false puts one document per row)")
        if not isinstance(self.shuffle, bool):
            raise ValueError(f"data.shuffle = {self.shuffle!r} must be true or false")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"data.seed = {self.seed!r} must be an integer or null")
        if self.current_date is not None and not re.fullmatch(r"\d{4}-\d{2}-\d{2}", str(self.current_date)):
            raise ValueError(f"data.current_date = {self.current_date!r} must look like YYYY-MM-DD or be null")
        if self.tokenizer is not None and not Path(self.tokenizer).exists():
            raise ValueError(f"data.tokenizer = {self.tokenizer!r} does not exist")
        for key in ("train_path", "val_path"):
            value = getattr(self, key)
            for item in [] if value is None else [value] if isinstance(value, str) else value:
                if not isinstance(item, str) or not (Path(item).exists() or is_hub_id(item)):
                    raise ValueError(f"data.{key} = {item!r} does not exist (and is not a Hub id owner/name[:split])")
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(
                f"data.global_batch_size = {self.global_batch_size} must be a multiple of "
                f"data.micro_batch_size = {self.micro_batch_size}"
            )
        if world_size is not None:
            self.grad_accum_steps(world_size)
        return self

    @property
    def packing(self) -> str:
        """The packing in effect: best_fit, next_fit or none."""
        return packing_mode(self.pack)

    def grad_accum_steps(self, world_size: int) -> int:
        """Micro-batches per rank per optimizer step, so that every step sees global_batch_size rows."""
        rows_per_round = self.micro_batch_size * world_size
        if self.global_batch_size % rows_per_round:
            raise ValueError(
                f"data.global_batch_size = {self.global_batch_size} must be a multiple of "
                f"data.micro_batch_size * world_size = {self.micro_batch_size} * {world_size}"
            )
        return self.global_batch_size // rows_per_round

    def resolved_train_path(self) -> str | list[str]:
        return self.train_path if self.train_path is not None else str(default_sample_paths()[0])

    def resolved_val_path(self) -> str | list[str] | None:
        if self.val_path is not None:
            return self.val_path
        return str(default_sample_paths()[1]) if self.train_path is None else None


def packing_mode(pack: object) -> str:
    """data.pack -> best_fit, next_fit or none (false); each of these names maps to itself."""
    if isinstance(pack, bool):
        return "best_fit" if pack else "none"
    if pack not in (*PACKINGS, "none"):
        raise ValueError(f"data.pack = {pack!r} must be true or false, or one of: {', '.join(PACKINGS)}")
    return pack


def is_hub_id(spec: str) -> bool:
    """`owner/name` or `owner/name:split` that is not a local path."""
    return bool(_HUB_ID.match(spec)) and not Path(spec).exists()


def _choice(key: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"data.{key} = {value!r} is not allowed; choose one of: {', '.join(allowed)}")


def _at_least(key: str, value: object, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"data.{key} = {value!r} must be an integer >= {low}")
