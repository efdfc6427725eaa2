"""Exports: leftovers of killed exports removed, a full disk said plainly, normal file modes."""

import os
import stat
import subprocess
import sys

import pytest
import torch

from engine.errors import StorageError
from engine.export.files import export_target, normal_modes, remove_stale_partials


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def test_leftovers_of_dead_exports_are_removed_live_ones_kept(tmp_path):
    dead, live = _dead_pid(), subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = tmp_path / f".hf.partial-{dead}-0a1b2c3d"
        stale_old = tmp_path / f".hf.old-{dead}-0a1b2c3d"
        running = tmp_path / f".hf.partial-{live.pid}-0a1b2c3d"
        other = tmp_path / f".adapter.partial-{dead}-0a1b2c3d"  # another export's name: not ours to touch
        for p in (stale, stale_old, running, other):
            (p / "sub").mkdir(parents=True)
            (p / "sub" / "model.safetensors").write_bytes(b"x" * 100)
        removed = remove_stale_partials(tmp_path / "hf")
        assert sorted(removed) == sorted([stale, stale_old])
        assert not stale.exists() and not stale_old.exists() and running.exists() and other.exists()
    finally:
        live.kill()
        live.wait()


def test_exported_files_get_the_modes_of_any_user_file(tmp_path):
    from safetensors.torch import save_file

    out = tmp_path / "hf"
    out.mkdir()
    save_file({"w": torch.zeros(2)}, str(out / "model.safetensors"))
    assert stat.S_IMODE((out / "model.safetensors").stat().st_mode) == 0o600  # what safetensors gives
    mask = os.umask(0o022)
    try:
        normal_modes(out)
    finally:
        os.umask(mask)
    assert stat.S_IMODE((out / "model.safetensors").stat().st_mode) == 0o644
    assert stat.S_IMODE(out.stat().st_mode) == 0o755


def _tiny_lora_model():
    from engine.config.load import build_config
    from engine.parallel import Mesh
    from engine.training.build import build_model
    from engine.training.runtime import Runtime

    cfg = build_config({"model": {"preset": "tiny", "dtype": "float32"}, "peft": {"method": "lora", "rank": 2}})
    return cfg, build_model(cfg, Runtime(Mesh.single("cpu"), torch.float32, torch.float32))


def test_full_disk_during_an_export_is_one_line_and_leaves_no_partial(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    import engine.peft.peft_format
    from engine.export import write_export

    cfg, model = _tiny_lora_model()
    out = tmp_path / "adapter"
    write_export(cfg, model, out, "peft")  # a previous, complete export
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert stat.S_IMODE((out / "adapter_model.safetensors").stat().st_mode) == 0o666 & ~_umask()

    def full_disk(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\0" * 1000)  # a part written, then the disk is full
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(engine.peft.peft_format, "save_file", full_disk)
    with pytest.raises(StorageError) as info:
        write_export(cfg, model, out, "peft", overwrite=True)
    text = str(info.value)
    assert "no space left on the device mounted at" in text and f"while writing {out}" in text
    assert "needs about" in text and "the partial export was removed" in text and "\n" not in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no .adapter.partial-* left
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the previous export is intact


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_other_errors_pass_through_unchanged(tmp_path):
    with pytest.raises(KeyError):
        with export_target(tmp_path / "x"):
            raise KeyError("a bug stays a bug")
