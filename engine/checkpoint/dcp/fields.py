"""Every field of a checkpoint's JSON checked before anything is read from it: meta.json (resume and export)
and the per-rank JSON (resume). A field that is missing or of the wrong type is a CheckpointCorruptError
naming the file and the field, so that `trainer.resume=auto` falls back to the previous checkpoint instead
of failing deep inside the resume with a KeyError, or blaming the data for a damaged data cursor.

`read_for_resume` and `verify_files` verify the files' sha256 against meta.json's `checksums`
(engine.checkpoint.dcp.checksums) when `checkpoint.verify` is on.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from engine.checkpoint.dcp import checksums
from engine.checkpoint.dcp.safe_reader import METADATA_FILE, CheckpointCorruptError, read_metadata_file
from engine.checkpoint.dcp.state import STEP_PREFIX, rank_file, read_json, read_meta

log = logging.getLogger(__name__)
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _int(low: int):
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low, f"an integer >= {low}"


def _of(*types: type, text: str):
    return lambda v: isinstance(v, types) and not (isinstance(v, bool) and bool not in types), text


def _ints(v) -> bool:
    return isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


_STRING, _MAPPING = _of(str, text="a string"), _of(dict, text="a JSON object")
# meta.json: what an export needs, then what a resume needs besides.
_META_EXPORT = {"step": _int(0), "config": _MAPPING}
_META_RESUME = {
    "world_size": _int(1),
    "ep": _int(1),
    "bad_steps": _int(0),
    "scheduler": _MAPPING,
    "shard": _STRING,
}
_META_OPTIONAL = {
    "recipe": _of(str, type(None), text="a string or null"),
    "compute_dtype": _STRING,
    "schedule": _MAPPING,
    "checksums": (
        lambda v: isinstance(v, dict) and all(isinstance(k, str) and _SHA256.fullmatch(str(h)) for k, h in v.items()),
        "a JSON object of file name -> sha256 hex digest",
    ),
}
# The data cursor (engine.data loaders' state_dict): its position and what the order depends on.
_CURSOR = {
    "epoch": _int(0),
    "row": _int(0),
    "next_micro_batch": _int(0),
    "rows_consumed": _int(0),
    "seed": _int(-(2**63)),
    "max_seq_len": _int(1),
    "pack_window": _int(1),
    "shuffle": _of(bool, text="true or false"),
    "pack": _of(str, bool, text="a string or false"),
    "store": _STRING,
}
_RNG = {
    "python": lambda v: isinstance(v, list) and len(v) == 3 and _ints(v[1]) and (v[2] is None or _number(v[2])),
    "numpy": lambda v: isinstance(v, list) and len(v) == 5 and isinstance(v[0], str) and _ints(v[1]),
    "torch": _ints,
}


def _bad(file: Path, field: str, value, expected: str) -> CheckpointCorruptError:
    if value is _MISSING:
        what = "is missing"
    else:
        what = f"is {_short(value)}, not {expected}"
    return CheckpointCorruptError(file, f"field {field!r} {what}; the checkpoint is corrupt, use an earlier one")


_MISSING = object()


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check(file: Path, obj: dict, rules: dict, *, required: bool, prefix: str = "") -> None:
    for name, (ok, expected) in rules.items():
        value = obj.get(name, _MISSING)
        if value is _MISSING and not required:
            continue
        if value is _MISSING or not ok(value):
            raise _bad(file, prefix + name, value, expected)


def check_meta(path: Path, meta: dict, *, resume: bool) -> dict:
    """meta.json's fields (those a resume needs when `resume`, else those an export needs); its step must
    be the one in the folder's name. Returns `meta`."""
    file = path / "meta.json"
    _check(file, meta, _META_EXPORT, required=True)
    if resume:
        _check(file, meta, _META_RESUME, required=True)
    _check(file, meta, _META_OPTIONAL, required=False)
    named = re.fullmatch(re.escape(STEP_PREFIX) + r"(\d+)", path.name)
    if named and int(named.group(1)) != meta["step"]:
        raise CheckpointCorruptError(
            file,
            f"field 'step' is {meta['step']}, but the folder is {path.name} (step {int(named.group(1))}); "
            "the checkpoint was moved or edited, use an earlier one",
        )
    return meta


def check_rank_state(file: Path, state: dict) -> dict:
    """A per-rank JSON: its RNG states and its data cursor. Returns `state`."""
    rng = state.get("rng", _MISSING)
    if not isinstance(rng, dict):
        raise _bad(file, "rng", rng, "a JSON object of RNG states")
    rules = {k: (ok, "an RNG state as the engine writes it") for k, ok in _RNG.items()}
    _check(file, rng, rules, required=True, prefix="rng.")
    data = state.get("data", _MISSING)
    if data is None:
        return state
    if not isinstance(data, dict):
        raise _bad(file, "data", data, "a JSON object (the data loader's position) or null")
    _check(file, data, _CURSOR, required=False, prefix="data.")
    if not ({"epoch", "row"} <= data.keys() or "next_micro_batch" in data):
        raise _bad(file, "data.row", _MISSING, "")
    return state


def intact_step(path: Path) -> int:
    """The step of a checkpoint whose files are all there and whole, as far as can be told without reading
    its tensors: meta.json, rank 0's JSON, the metadata, and each data file as long as the metadata needs;
    CheckpointCorruptError naming the first that is not (what loading it would run into)."""
    meta = check_meta(path, read_meta(path), resume=True)
    check_rank_state(rank_file(path, 0), read_json(rank_file(path, 0)))
    needs: dict[str, int] = {}
    for info in (read_metadata_file(path / METADATA_FILE).storage_data or {}).values():
        needs[info.relative_path] = max(needs.get(info.relative_path, 0), info.offset + info.length)
    for name, end in sorted(needs.items()):
        size = (path / name).stat().st_size if (path / name).is_file() else 0
        if size < end:
            raise CheckpointCorruptError(
                path / name,
                f"holds {size} bytes where the checkpoint's metadata needs "
                f"{end}; the checkpoint is truncated, use an earlier one",
            )
    return meta["step"]


def data_files(path: Path) -> list[str]:
    """The checkpoint's metadata and the tensor data files it refers to."""
    storage = read_metadata_file(path / METADATA_FILE).storage_data or {}
    return [METADATA_FILE, *sorted({info.relative_path for info in storage.values()})]


def verify_files(path: Path, meta: dict, names: list[str] | None = None) -> None:
    """`names` (default: the metadata and every tensor data file) checked against meta.json's sha256."""
    if "checksums" not in meta:
        log.warning(
            "%s records no checksums (saved with checkpoint.verify=false, or by an earlier engine): its files "
            "are not verified",
            path,
        )
        return
    checksums.verify(path, meta["checksums"], data_files(path) if names is None else names)


def read_for_resume(path: Path, rank: int, world_size: int, verify: bool) -> tuple[dict, dict]:
    """(meta.json, this rank's JSON: its own when the checkpoint has as many ranks, else rank 0's), every
    field checked; with `verify`, this rank's share of the files checked against their sha256."""
    meta = check_meta(path, read_meta(path), resume=True)
    source = rank_file(path, rank if meta["world_size"] == world_size else 0)
    mine = check_rank_state(source, read_json(source))
    if verify:
        verify_files(path, meta, [*data_files(path)[rank::world_size], source.name])
    return meta, mine
