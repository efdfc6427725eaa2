"""Typed configuration of the data pipeline.

The Hydra config mirrors these field names under `data.`; `validate()` runs once at start-up so a
typo in a recipe fails before any data is read, with a message naming the key and the choices.
"""

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.schema import Range, bounds, choices, setting

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

    # Typed Any because OmegaConf cannot hold a union of a string and a list; validate() checks them.
    train_path: Any = setting(None, help="a .jsonl/.json/.parquet file, a save_to_disk folder, a Hub id "
                              "owner/name[:split], a list of these, or a prepared folder; null = the shipped sample")
    val_path: Any = setting(None, help="the same kinds as train_path; null = the shipped sample's validation file "
                            "when train_path is null, else no validation")
    tokenizer: str | None = setting(None, help="a model folder or tokenizer.json; null = the model checkpoint's, "
                                    "else the shipped one")
    max_seq_len: int = setting(4096, range=Range(2), help="tokens per row")
    global_batch_size: int = setting(8, range=Range(1), help="rows per optimizer step, whatever the world size")
    micro_batch_size: int = setting(1, range=Range(1), help="rows per forward on one rank")
    # Typed Any because OmegaConf cannot hold a union of a string and a bool; validate() checks it.
    pack: Any = setting("best_fit", help="best_fit | next_fit | false: documents packed into full rows, best fit "
                        "decreasing within each window of pack_window documents (true means best_fit), in the "
                        "epoch's order, or one document per row; attention never crosses documents")
    pack_window: int = setting(4096, range=Range(1), help="documents of the epoch's order that best_fit packs "
                               "together (a window); the window's rows are shuffled")
    loss_mask: str = setting("assistant", choices=LOSS_MASKS, help="which tokens train: every assistant message, "
                             "final answers only, or the assistant messages after the last user message")
    on_error: str = setting("raise", choices=ON_ERROR, help="a bad record stops the run (raise) or is counted, "
                            "reported and left out (skip)")
    overlong: str = setting("drop", choices=OVERLONG, help="a record longer than max_seq_len is dropped or cut")
    reasoning_effort: str = setting("medium", choices=REASONING_EFFORTS, help="for records without their own")
    current_date: str | None = setting(None, help="YYYY-MM-DD adds a `Current date:` line to every system "
                                       "message; null leaves it out")
    shuffle: bool = setting(True, help="permute the documents each epoch")
    prefetch: int = setting(4, range=Range(0), help="batches prepared ahead by a background thread (0: in the "
                            "calling thread)")
    seed: int | None = setting(None, help="seed of the data order; null = trainer.seed")
    prepared_dir: str | None = setting(None, help="where the prepared stores go (train/, val/); null = "
                                       "OUTPUT_DIR/data")
    prepare_workers: int = setting(0, range=Range(0), help="processes that render and tokenize; 0 = one per core "
                                   "(at most 8)")

    def validate(self, world_size: int | None = None) -> "DataConfig":
        """Raise ValueError naming the first bad key; with `world_size`, check the batch split."""
        for key in ("loss_mask", "on_error", "overlong", "reasoning_effort"):
            _choice(key, getattr(self, key), choices(DataConfig, key))
        for key in ("max_seq_len", "global_batch_size", "micro_batch_size", "prefetch", "prepare_workers",
                    "pack_window"):
            _at_least(key, getattr(self, key), int(bounds(DataConfig, key).low))
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
