"""Records -> validated, rendered, tokenized documents, with file:line in every error.

`DocumentEncoder` validates and renders one record (`render_record`, or `render_line` for a raw
JSONL line) and applies `overlong` (`fit`), keeping counts in `DataStats`; prepare.py runs it over
every record once, in worker processes. `JsonlFile` gives random access to a JSONL file's lines
(byte offsets, no parsing), for previewing records.
"""

import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engine.data.config import DataConfig
from engine.data.harmony import Segment, render_segments
from engine.data.records import RecordError, parse_record
from engine.data.tokenizer import HarmonyTokenizer
from engine.errors import DataError  # noqa: F401  (re-exported: a bad record, `file:line: ...`)

log = logging.getLogger(__name__)

# Skipped records reported one by one before the counts take over.
_REPORTED_SKIPS = 5


@dataclass(frozen=True)
class Document:
    """One tokenized record: `trained[i]` says whether token i carries loss (is a target)."""

    input_ids: np.ndarray  # [L] int64
    trained: np.ndarray  # [L] bool

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_targets(self) -> int:
        # Token 0 is never predicted (nothing precedes it inside its document).
        return int(self.trained[1:].sum())


@dataclass
class DataStats:
    """What one pass over the data kept and dropped, for the logs."""

    documents: int = 0
    tokens: int = 0
    target_tokens: int = 0
    skipped_invalid: int = 0
    dropped_overlong: int = 0
    truncated: int = 0
    skip_reasons: list[str] = field(default_factory=list)

    def summary(self) -> str:
        text = (
            f"{self.documents} documents ({self.tokens} tokens, {self.target_tokens} trained), "
            f"skipped {self.skipped_invalid} invalid, dropped {self.dropped_overlong} over-long, "
            f"truncated {self.truncated}"
        )
        if self.skip_reasons:
            text += "; first skipped: " + " | ".join(self.skip_reasons)
        return text


def unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """json's object_pairs_hook: an object that gives a key twice is an error, not its last value."""
    record = dict(pairs)
    if len(record) != len(pairs):
        seen: set[str] = set()
        key = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise DataError(f"duplicate key {key!r} in one JSON object (a parser would keep only its last value); "
                        "keep one")
    return record


_DECODER = json.JSONDecoder(object_pairs_hook=unique_keys)


def decode_json_line(raw: bytes) -> object:
    """One JSONL line -> the decoded record; DataError saying what is wrong with the bytes. The line is
    parsed without its line ending, so an error at its end is at the column Python's parser names for the
    line alone (not "column 1" of the line after it). Strict UTF-8 (a leading BOM allowed): an encoded
    surrogate half is refused here, an escaped one (`\\ud800`) where the text is checked (tools.check_text)."""
    try:
        return _DECODER.decode(raw.rstrip(b"\r\n").decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise DataError(f"not valid UTF-8 ({exc.reason} at byte {exc.start})") from exc
    except json.JSONDecodeError as exc:
        raise DataError(f"invalid JSON: {exc.msg} (column {exc.colno})") from exc
    except RecursionError:
        raise DataError(f"JSON nested too deeply to read (Python's limit is about {sys.getrecursionlimit()} "
                        "levels); no record needs that depth") from None


class JsonlFile:
    """Random access to the non-blank lines of a JSONL file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"{self.path}: data file not found")
        offsets, line_numbers = [], []
        offset = 0
        with self.path.open("rb") as f:
            for number, line in enumerate(f, start=1):
                if line.strip():
                    offsets.append(offset)
                    line_numbers.append(number)
                offset += len(line)
        if not offsets:
            raise DataError(f"{self.path}: no records (the file is empty)")
        self._offsets = np.asarray(offsets, dtype=np.int64)
        self._line_numbers = np.asarray(line_numbers, dtype=np.int64)

    def __len__(self) -> int:
        return len(self._offsets)

    def read(self, indices: Sequence[int]) -> list[tuple[int, bytes]]:
        """(line number, raw line) of each record index, in the given order."""
        out = []
        with self.path.open("rb") as f:
            for i in indices:
                f.seek(int(self._offsets[i]))
                out.append((int(self._line_numbers[i]), f.readline()))
        return out


class DocumentEncoder:
    """Raw lines -> Documents under the configured render options and error policies."""

    def __init__(self, cfg: DataConfig, tokenizer: HarmonyTokenizer) -> None:
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.stats = DataStats()

    def encode(self, path: Path, lines: Sequence[tuple[int, bytes]]) -> list[Document | None]:
        """One Document per line, or None where the line was skipped or dropped."""
        segments, positions = [], []
        for k, (line_number, raw) in enumerate(lines):
            try:
                segments.append(self.render_line(raw))
                positions.append(k)
            except (DataError, RecordError) as exc:
                error = DataError(f"{path}:{line_number}: {exc}")
                if self.cfg.on_error == "raise":
                    raise error from exc
                self._skip(error)
        out: list[Document | None] = [None] * len(lines)
        for k, (ids, trained) in zip(positions, self.tokenizer.encode_segments_batch(segments)):
            out[k] = self.fit(Document(ids, trained))
        return out

    def render_line(self, raw: bytes) -> list[Segment]:
        """Decode, validate and render one raw JSONL line; raise DataError or RecordError."""
        return self.render_record(decode_json_line(raw))

    def render_record(self, record: object) -> list[Segment]:
        """Validate and render one decoded record; raise DataError or RecordError."""
        try:
            conversation = parse_record(record)
            for i, message in enumerate(conversation.messages):
                for key in ("content", "thinking"):
                    special = self.tokenizer.find_special(getattr(message, key) or "")
                    if special is not None:
                        raise DataError(
                            f"messages[{i}].{key} contains the special token {special!r}, which the tokenizer "
                            "reads as harmony structure, never as text; remove it"
                        )
            return render_segments(
                conversation,
                loss_mask=self.cfg.loss_mask,
                reasoning_effort=self.cfg.reasoning_effort,
                current_date=self.cfg.current_date,
            )
        except RecursionError:  # a record decoded from a table or a .json file can be deeper than Python reads
            raise RecordError(f"the record is nested too deeply to read (Python's limit is about "
                              f"{sys.getrecursionlimit()} levels)") from None

    def fit(self, doc: Document) -> Document | None:
        """Apply data.overlong to one document (None: dropped), counting it in the stats."""
        limit = self.cfg.max_seq_len
        if len(doc) > limit:
            cut = Document(doc.input_ids[:limit], doc.trained[:limit])
            # A truncation that cuts every trained token would leave a row that teaches nothing.
            if self.cfg.overlong == "drop" or cut.num_targets == 0:
                self.stats.dropped_overlong += 1
                return None
            self.stats.truncated += 1
            doc = cut
        self.stats.documents += 1
        self.stats.tokens += len(doc)
        self.stats.target_tokens += doc.num_targets
        return doc

    def _skip(self, error: DataError) -> None:
        self.stats.skipped_invalid += 1
        # Later epochs meet the same bad records again: count them, but report each once.
        if len(self.stats.skip_reasons) < _REPORTED_SKIPS and str(error) not in self.stats.skip_reasons:
            self.stats.skip_reasons.append(str(error))
            log.warning("skipping invalid record (data.on_error=skip): %s", error)
