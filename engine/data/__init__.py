"""Data pipeline: records (JSONL, JSON, Parquet, datasets) -> validated, rendered, tokenized once into a
memory-mapped store (prepare.py, store.py) -> one global packed order (sampler.py) -> each rank's batches.

The batch contract is documented in engine/data/packing.py; the rendering choices in
engine/data/harmony.py.
"""

from engine.data.config import DataConfig, default_sample_paths, default_tokenizer_path
from engine.data.dataset import DataError, DataStats, Document, DocumentEncoder, JsonlFile
from engine.data.harmony import HARMONY_SPECIAL_TOKENS, Segment, render, render_segments, system_content
from engine.data.loader import TrainLoader, ValLoader, build_train_loader, build_val_loader, open_store
from engine.data.packing import IGNORE_INDEX, collate, pack_order, row_starts
from engine.data.records import Conversation, Message, RecordError, parse_record
from engine.data.sampler import Cursor, GlobalOrder
from engine.data.store import StoreWriter, TokenStore
from engine.data.tokenizer import HarmonyTokenizer, TokenizerError, load_tokenizer

__all__ = [
    "HARMONY_SPECIAL_TOKENS",
    "IGNORE_INDEX",
    "Conversation",
    "Cursor",
    "DataConfig",
    "DataError",
    "DataStats",
    "Document",
    "DocumentEncoder",
    "HarmonyTokenizer",
    "JsonlFile",
    "Message",
    "RecordError",
    "Segment",
    "StoreWriter",
    "GlobalOrder",
    "TokenStore",
    "TokenizerError",
    "TrainLoader",
    "ValLoader",
    "build_train_loader",
    "build_val_loader",
    "collate",
    "default_sample_paths",
    "default_tokenizer_path",
    "load_tokenizer",
    "open_store",
    "pack_order",
    "parse_record",
    "render",
    "row_starts",
    "render_segments",
    "system_content",
]
