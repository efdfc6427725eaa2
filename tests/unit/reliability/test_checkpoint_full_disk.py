"""A training checkpoint that cannot be written (full disk) ends in one line naming the device and the
folder, leaves no unfinished folder behind, and keeps the earlier checkpoints loadable."""

import errno
import os

import pytest
import torch
import torch.distributed.checkpoint.filesystem as dcp_filesystem

from engine.checkpoint.dcp import state
from engine.errors import StorageError

TENSORS = {"w": torch.arange(12.0).reshape(3, 4), "b": torch.ones(5)}


def _save(out, step, **kw):
    result = state.save_checkpoint(out, step, dict(TENSORS), {"rank": 0}, {"world_size": 1}, **kw)
    return result.wait() if isinstance(result, state.PendingSave) else result


def _files(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _break_writes(monkeypatch, error):
    def write_item(*args, **kwargs):
        raise error  # the data file is open (created, empty) when the writer fails

    monkeypatch.setattr(dcp_filesystem, "_write_item", write_item)


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_full_disk_is_one_line_removes_the_unfinished_save_and_keeps_the_last(tmp_path, monkeypatch, asynchronous):
    first = _save(tmp_path, 1)
    before = _files(tmp_path)
    _break_writes(monkeypatch, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    with pytest.raises(StorageError) as info:
        _save(tmp_path, 2, asynchronous=asynchronous)
    text = str(info.value)
    assert text.startswith("no space left on the device mounted at") and "\n" not in text
    assert ".tmp_step_0000002" in text and "needs about" in text
    assert "the unfinished checkpoint was removed and the earlier ones are kept" in text
    assert _files(tmp_path) == before  # no .tmp_* folder, no partial file; step 1 untouched
    monkeypatch.undo()
    loaded = {k: torch.zeros_like(v) for k, v in TENSORS.items()}
    state.load_tensors(first, loaded)
    for name, tensor in TENSORS.items():
        assert torch.equal(loaded[name], tensor)


def test_other_write_errors_keep_their_traceback_and_leave_no_debris(tmp_path, monkeypatch):
    _save(tmp_path, 1)
    before = _files(tmp_path)
    _break_writes(monkeypatch, RuntimeError("a bug in a writer"))
    with pytest.raises(BaseException) as info:  # DCP's CheckpointException derives from BaseException
        _save(tmp_path, 2)
    assert not isinstance(info.value, StorageError) and "a bug in a writer" in str(info.value)
    assert _files(tmp_path) == before
