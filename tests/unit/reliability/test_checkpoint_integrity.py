"""A checkpoint's bytes are checked: a full disk inside torch's zip writer is the one-line StorageError,
every written file's sha256 is recorded in meta.json (sync and async saves) and checked before the
checkpoint is read, and a step folder without meta.json is named, never silently skipped."""

import contextlib
import errno
import hashlib
import json
import os
import shutil

import pytest
import torch
import torch.distributed.checkpoint.filesystem as dcp_filesystem

from engine.checkpoint.dcp import fields
from engine.checkpoint.dcp import state as ckpt
from engine.checkpoint.dcp.safe_reader import CheckpointCorruptError, read_metadata_file
from engine.errors import StorageError

TENSORS = {"w": torch.arange(4096.0).reshape(64, 64), "b": torch.ones(5)}


def _save(out, step, **kw):
    result = ckpt.save_checkpoint(out, step, dict(TENSORS), {"rank": 0}, {"world_size": 1}, **kw)
    return result.wait() if isinstance(result, ckpt.PendingSave) else result


def _files(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


class _FullDisk:
    """A data file on a device that fills up after `room` bytes: the write raises ENOSPC, as the OS does."""

    def __init__(self, raw, room: int):
        self.raw, self.room = raw, room

    def write(self, data):
        n = memoryview(data).nbytes
        if n > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= n
        return self.raw.write(data)

    def __getattr__(self, name):
        return getattr(self.raw, name)


def _fill_up_inside_the_tensor_write(monkeypatch, room=1000):
    real = dcp_filesystem.FileSystem.create_stream

    @contextlib.contextmanager
    def create_stream(self, path, mode):
        with real(self, path, mode) as raw:
            yield _FullDisk(raw, room) if str(path).endswith(".distcp") else raw

    monkeypatch.setattr(dcp_filesystem.FileSystem, "create_stream", create_stream)


def test_torch_zip_writer_loses_the_errno_of_a_full_disk(tmp_path, monkeypatch):
    # Control: what torch.save itself raises when the stream fills up inside the tensor's bytes.
    with open(tmp_path / "f", "wb") as raw, pytest.raises(RuntimeError, match="unexpected pos") as info:
        torch.save(TENSORS["w"], _FullDisk(raw, 1000))
    assert "No space left" not in str(info.value)


@pytest.mark.parametrize(
    "asynchronous,checksums", [(False, True), (True, True), (False, False)], ids=["sync", "async", "unhashed"]
)
def test_full_disk_inside_the_tensor_write_is_one_line(tmp_path, monkeypatch, asynchronous, checksums):
    first = _save(tmp_path, 1)
    before = _files(tmp_path)
    _fill_up_inside_the_tensor_write(monkeypatch)
    with pytest.raises(StorageError) as info:
        _save(tmp_path, 2, asynchronous=asynchronous, checksums=checksums)
    text = str(info.value)
    assert text.startswith("no space left on the device mounted at") and "\n" not in text
    assert ".tmp_step_0000002" in text and "the unfinished checkpoint was removed" in text
    assert _files(tmp_path) == before
    monkeypatch.undo()
    loaded = {k: torch.zeros_like(v) for k, v in TENSORS.items()}
    ckpt.load_tensors(first, loaded)
    assert all(torch.equal(loaded[k], v) for k, v in TENSORS.items())


def test_full_disk_free_space_is_measured_before_the_cleanup(tmp_path, monkeypatch):
    _fill_up_inside_the_tensor_write(monkeypatch)
    tmp = ckpt.checkpoints_root(tmp_path) / ".tmp_step_0000001"
    real_usage = shutil.disk_usage

    def disk_usage(p):  # the disk is full while the unfinished save is there, roomy once it is removed
        return real_usage(p)._replace(free=0 if tmp.exists() else 5 * 2**30)

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)
    with pytest.raises(StorageError, match=r"\(needs about [\d.]+ KiB, 0 B free\)"):
        _save(tmp_path, 1)
    assert not tmp.exists()


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_checksums_of_every_written_file_are_in_meta_json(tmp_path, asynchronous):
    path = _save(tmp_path, 3, asynchronous=asynchronous)
    recorded = json.loads((path / "meta.json").read_text())["checksums"]
    on_disk = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in path.iterdir() if p.name != "meta.json"}
    assert recorded == on_disk and set(recorded) == {".metadata", "__0_0.distcp", "rank00000.json"}
    fields.verify_files(path, json.loads((path / "meta.json").read_text()))  # a sound checkpoint passes


def test_checksums_off_records_none_and_verifying_says_so(tmp_path, caplog):
    path = _save(tmp_path, 1, checksums=False)
    meta = json.loads((path / "meta.json").read_text())
    assert "checksums" not in meta
    with caplog.at_level("WARNING", logger="engine"):
        fields.verify_files(path, meta)
    assert any("records no checksums" in r.getMessage() for r in caplog.records)


def _flip_a_byte_inside(path, tensor: str) -> str:
    """Flip one byte in the middle of `tensor`'s stored bytes; returns the data file's name."""
    md = read_metadata_file(path / ".metadata")
    info = next(v for k, v in md.storage_data.items() if k.fqn == tensor)
    data = bytearray((path / info.relative_path).read_bytes())
    data[info.offset + info.length - 2048] ^= 0x40  # inside the 16 KiB of w's values, before the zip's tail
    (path / info.relative_path).write_bytes(bytes(data))
    return info.relative_path


def test_flipped_bytes_in_a_weight_are_refused_naming_the_file(tmp_path):
    path = _save(tmp_path, 1)
    name = _flip_a_byte_inside(path, "w")
    loaded = {k: torch.zeros_like(v) for k, v in TENSORS.items()}
    ckpt.load_tensors(path, loaded)  # control: torch's reader loads the changed weight without a word
    assert not torch.equal(loaded["w"], TENSORS["w"])
    with pytest.raises(CheckpointCorruptError) as info:
        fields.verify_files(path, json.loads((path / "meta.json").read_text()))
    text = str(info.value)
    assert text.startswith(str(path / name)) and "sha256" in text and "\n" not in text


def test_a_step_folder_without_meta_json_is_listed_as_incomplete(tmp_path):
    _save(tmp_path, 1)
    half = ckpt.step_dir(tmp_path, 2)
    half.mkdir()
    (half / "__0_0.distcp").write_bytes(b"x")
    assert ckpt.incomplete_checkpoints(tmp_path) == [half]
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path)] == ["step_0000001"]
