"""Every field of a checkpoint's meta.json and per-rank JSON is checked before a resume or an export
reads it: a missing or mistyped field is a CheckpointCorruptError naming the file and the field (the
error under which `trainer.resume=auto` falls back to the previous checkpoint)."""

import copy
from dataclasses import asdict
from pathlib import Path

import pytest

from engine.checkpoint.dcp import fields
from engine.checkpoint.dcp.safe_reader import CheckpointCorruptError
from engine.config.sections import TrainConfig
from engine.training.checkpointer import rng_state

FOLDER = Path("/run/checkpoints/step_0000008")
META = {
    "format": "engine-dcp-1",
    "step": 8,
    "world_size": 2,
    "ep": 2,
    "shard": "none",
    "bad_steps": 0,
    "scheduler": {"base_lrs": [1e-4], "last_epoch": 8},
    "recipe": "tiny_sft",
    "config": asdict(TrainConfig()),
    "compute_dtype": "float32",
    "schedule": {"optim.lr": 1e-4},
    "checksums": {"__0_0.distcp": "0" * 64, ".metadata": "f" * 64},
}
RANK = {"rng": rng_state(), "data": {"epoch": 0, "row": 16, "store": "ab12", "seed": 7, "shuffle": True, "pack": False}}


def _without(d: dict, key: str) -> dict:
    d = copy.deepcopy(d)
    del d[key]
    return d


def _with(d: dict, key: str, value) -> dict:
    d = copy.deepcopy(d)
    target = d
    *path, last = key.split(".")
    for part in path:
        target = target[part]
    target[last] = value
    return d


def test_sound_json_passes():
    assert fields.check_meta(FOLDER, copy.deepcopy(META), resume=True) == META
    assert fields.check_rank_state(FOLDER / "rank00000.json", copy.deepcopy(RANK)) == RANK
    assert fields.check_rank_state(FOLDER / "rank00000.json", {**RANK, "data": None})  # no data cursor
    synthetic = {**RANK, "data": {"next_micro_batch": 4, "rows_consumed": 16}}
    assert fields.check_rank_state(FOLDER / "rank00000.json", synthetic)


BAD_META = [
    ("world_size", _without(META, "world_size"), "is missing"),
    ("config", _without(META, "config"), "is missing"),
    ("step", _with(META, "step", "eight"), "is 'eight', not an integer >= 0"),
    ("step", _with(META, "step", 7), "the folder is step_0000008"),
    ("ep", _with(META, "ep", "2"), "is '2', not an integer >= 1"),
    ("scheduler", _with(META, "scheduler", [1, 2]), "not a JSON object"),
    ("bad_steps", _with(META, "bad_steps", True), "not an integer >= 0"),
    ("checksums", _with(META, "checksums", {"__0_0.distcp": "abc"}), "sha256"),
]


@pytest.mark.parametrize("field,meta,says", BAD_META, ids=[f"{b[0]}-{b[2][:12]}" for b in BAD_META])
def test_a_bad_meta_field_is_named_with_its_file(field, meta, says):
    with pytest.raises(CheckpointCorruptError) as info:
        fields.check_meta(FOLDER, meta, resume=True)
    text = str(info.value)
    assert text.startswith(f"{FOLDER / 'meta.json'}: field {field!r}") and says in text and "\n" not in text


def test_an_export_needs_only_step_and_config():
    export_only = {k: META[k] for k in ("format", "step", "config")}
    fields.check_meta(FOLDER, export_only, resume=False)
    with pytest.raises(CheckpointCorruptError, match="field 'world_size' is missing"):
        fields.check_meta(FOLDER, export_only, resume=True)
    with pytest.raises(CheckpointCorruptError, match="field 'config' is missing"):
        fields.check_meta(FOLDER, _without(META, "config"), resume=False)


BAD_RANK = [
    ("rng", _without(RANK, "rng"), "is missing"),
    ("rng.torch", _with(RANK, "rng.torch", "x"), "is 'x'"),
    ("rng.python", _with(RANK, "rng.python", [3, "words", None]), "RNG state"),
    ("data", _with(RANK, "data", "abc"), "is 'abc', not a JSON object"),
    ("data.row", _with(RANK, "data.row", "16"), "is '16', not an integer >= 0"),
    ("data.epoch", _with(RANK, "data.epoch", -1), "is -1, not an integer >= 0"),
    ("data.seed", _with(RANK, "data.seed", [7]), "is [7]"),
    ("data.shuffle", _with(RANK, "data.shuffle", "yes"), "not true or false"),
    ("data.row", {**RANK, "data": {"epoch": 0}}, "is missing"),
]


@pytest.mark.parametrize("field,state,says", BAD_RANK, ids=[f"{b[0]}-{b[2][:8]}" for b in BAD_RANK])
def test_a_bad_rank_field_is_named_with_its_file(field, state, says):
    file = FOLDER / "rank00001.json"
    with pytest.raises(CheckpointCorruptError) as info:
        fields.check_rank_state(file, state)
    text = str(info.value)
    assert text.startswith(f"{file}: field {field!r}") and says in text and "\n" not in text


@pytest.mark.parametrize("config", [{"optim": 3}, {"optim": {"lr": "fast"}}], ids=["section", "value"])
def test_an_export_refuses_a_recorded_config_that_is_not_one(tmp_path, config):
    import torch

    from engine.checkpoint.dcp import state
    from engine.export.rebuild import checked_config

    path = state.save_checkpoint(tmp_path, 1, {"w": torch.ones(3)}, {}, {"config": config})
    with pytest.raises(CheckpointCorruptError, match=r"meta\.json: field 'config' is not a valid config"):
        checked_config(path)
