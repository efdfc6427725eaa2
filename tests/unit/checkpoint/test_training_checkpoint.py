"""Training checkpoints (torch.distributed.checkpoint) in one process: no code runs from any of their
files, a corrupt newest checkpoint is named and skipped, interrupted saves leave nothing behind, async
and sync saves write the same checkpoint, and resume is bit-exact."""

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from engine.checkpoint.dcp import state as ckpt
from engine.checkpoint.errors import CheckpointError
from engine.config.load import build_config
from engine.train import REPO, register_recipes

register_recipes()
TINY = [
    "recipe=tiny_sft",
    "data.source=synthetic",
    "data.max_seq_len=32",
    "data.global_batch_size=4",
    "data.micro_batch_size=2",
    "trainer.val_every=0",
    "trainer.log_every=1",
    "trainer.progress=false",
    "optim.warmup_steps=2",
]


def _cfg(out, *overrides):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        values = OmegaConf.to_container(compose("config", overrides=[*TINY, *overrides]), resolve=True)
    values["trainer"]["output_dir"] = str(out)
    return build_config(values)


def _train(out, *overrides) -> dict:
    from engine.training.trainer import run

    return run(_cfg(out, *overrides))


def _losses(out) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (Path(out) / "metrics.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """4 steps, checkpoints after 2 and 4."""
    out = tmp_path_factory.mktemp("straight")
    _train(out, "trainer.max_steps=4", "checkpoint.every=2", "checkpoint.keep=5")
    return out


class _Payload:
    """Unpickling this creates `marker`: proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _crafted(path: Path, marker: Path, form: str = "torch") -> None:
    """A file that runs `touch marker` when loaded by an unrestricted reader: `torch.save` form (what
    torch.load(weights_only=False) runs) or raw `pickle` form (what pickle.load runs)."""
    with open(path, "wb") as f:
        if form == "pickle":
            pickle.dump({"step": _Payload(marker)}, f)
        else:
            torch.save({"step": _Payload(marker)}, f)


@pytest.mark.parametrize("form", ["torch", "pickle"])
def test_the_crafted_pickle_is_live(tmp_path, form):
    # Control: an ordinary loader does run it, so the tests below would notice if ours did.
    marker = tmp_path / "ran"
    _crafted(tmp_path / "evil", marker, form)
    with open(tmp_path / "evil", "rb") as f:
        torch.load(f, weights_only=False) if form == "torch" else pickle.load(f)
    assert marker.exists()


def _checkpoint_files(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


@pytest.mark.parametrize("name", [".metadata", "__0_0.distcp", "meta.json", "rank00000.json"])
@pytest.mark.parametrize("form", ["torch", "pickle"])
def test_crafted_pickle_in_any_file_runs_nothing(straight, tmp_path, name, form):
    src = ckpt.step_dir(straight, 2)
    assert name in _checkpoint_files(src)
    bad = shutil.copytree(src, tmp_path / "ckpt" / "step_0000002")
    marker = tmp_path / "code_ran"
    _crafted(bad / name, marker, form)
    from engine.export import export

    if name.startswith("rank"):  # the export needs no per-rank state and does not open it
        export(bad, tmp_path / "export", "hf", dtype="fp32")
    else:
        with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
            export(bad, tmp_path / "export", "hf", dtype="fp32")
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        _train(tmp_path / "run", "trainer.max_steps=4", f"trainer.resume={bad}")
    assert not marker.exists()


def test_every_file_the_engine_reads_is_covered(straight):
    assert _checkpoint_files(ckpt.step_dir(straight, 2)) == [".metadata", "__0_0.distcp", "meta.json", "rank00000.json"]


def test_resume_is_bit_exact_and_leaves_no_debris(straight, tmp_path):
    out = tmp_path / "resumed"
    shutil.copytree(ckpt.step_dir(straight, 2), ckpt.step_dir(out, 2))
    debris = [ckpt.checkpoints_root(out) / ".tmp_step_0000004", ckpt.checkpoints_root(out) / ".old_step_0000002"]
    for d in debris:
        d.mkdir()
        (d / "__0_0.distcp").write_bytes(b"half")
    _train(out, "trainer.max_steps=4", "checkpoint.every=2", "checkpoint.keep=5")
    assert not any(d.exists() for d in debris)
    a, b = _losses(straight), _losses(out)
    assert sorted(b) == [3, 4] and all(a[s] == b[s] for s in b), (a, b)
    from engine.export import gather_trained_weights

    wa, wb = (gather_trained_weights(ckpt.step_dir(d, 4)) for d in (straight, out))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("how", ["truncated", "garbage", "meta"])
def test_corrupt_newest_checkpoint_is_named_and_auto_falls_back(straight, tmp_path, how, caplog):
    out = tmp_path / "run"
    for step in (2, 4):
        shutil.copytree(ckpt.step_dir(straight, step), ckpt.step_dir(out, step))
    newest = ckpt.step_dir(out, 4)
    victim = newest / ("meta.json" if how == "meta" else "__0_0.distcp")
    if how == "truncated":
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    else:
        victim.write_bytes(b"\x00garbage" * 100)
    # An explicit path fails with the file's name ...
    with pytest.raises(CheckpointError, match=victim.name.replace(".", r"\.")):
        _train(tmp_path / "other", "trainer.max_steps=6", f"trainer.resume={newest}")
    # ... auto says so and continues from step 2, as the straight run did.
    with caplog.at_level("WARNING", logger="engine"):
        _train(out, "trainer.max_steps=4", "checkpoint.every=2", "checkpoint.keep=5")
    assert any(victim.name in r.getMessage() and "step_0000002" in r.getMessage() for r in caplog.records)
    a, b = _losses(straight), _losses(out)
    assert sorted(b) == [3, 4] and all(a[s] == b[s] for s in b)


def _edit_json(file: Path, edit) -> None:
    value = json.loads(file.read_text())
    edit(value)
    file.write_text(json.dumps(value))


def _flip_weight_byte(path: Path) -> None:
    from engine.checkpoint.dcp.safe_reader import read_metadata_file

    md = read_metadata_file(path / ".metadata")
    info = next(v for k, v in md.storage_data.items() if k.fqn.startswith("model.") and v.length > 4096)
    data = bytearray((path / info.relative_path).read_bytes())
    data[info.offset + info.length // 2] ^= 0x40  # a weight's value: the zip around it stays readable
    (path / info.relative_path).write_bytes(bytes(data))


DAMAGE = {
    "step_eight": (
        "meta.json",
        "field 'step'",
        lambda p: _edit_json(p / "meta.json", lambda m: m.update(step="eight")),
    ),
    "data_cursor": (
        "rank00000.json",
        "field 'data.row'",
        lambda p: _edit_json(p / "rank00000.json", lambda r: r["data"].update(row="3")),
    ),
    "flipped_weight": ("__0_0.distcp", "sha256", _flip_weight_byte),
}


@pytest.mark.parametrize("how", list(DAMAGE))
def test_a_damaged_field_or_weight_is_named_and_auto_falls_back(straight, tmp_path, how, caplog):
    out = tmp_path / "run"
    for step in (2, 4):
        shutil.copytree(ckpt.step_dir(straight, step), ckpt.step_dir(out, step))
    name, says, damage = DAMAGE[how]
    newest = ckpt.step_dir(out, 4)
    damage(newest)
    half = ckpt.step_dir(out, 6)  # a step folder without meta.json: named when skipped
    half.mkdir()
    with pytest.raises(CheckpointError) as info:
        _train(tmp_path / "other", "trainer.max_steps=6", f"trainer.resume={newest}")
    assert str(info.value).startswith(str(newest / name)) and says in str(info.value)
    if name != "rank00000.json":  # the export reads meta.json and the tensors, never the per-rank JSON
        from engine.export import export

        with pytest.raises(CheckpointError) as info:
            export(newest, tmp_path / "export", "hf", dtype="fp32")
        assert str(info.value).startswith(str(newest / name)) and says in str(info.value)
    # auto names the file and continues from step 2 (to step 6: a damaged weight's checkpoint at the last
    # step would look finished, as telling it from a sound one means reading all of it)
    with caplog.at_level("WARNING", logger="engine"):
        _train(out, "trainer.max_steps=6", "checkpoint.every=2", "checkpoint.keep=5")
    said = [r.getMessage() for r in caplog.records]
    assert any(f"{newest / name}: " in m and says in m and "step_0000002" in m for m in said), said
    assert any(f"skipping {half}: it has no meta.json" in m for m in said), said
    a, b = _losses(straight), _losses(out)
    assert sorted(b) == [3, 4, 5, 6] and a[3] == b[3]  # step 3 from step 2's state, bit for bit


def test_async_and_sync_saves_write_the_same_checkpoint(straight, tmp_path):
    out = tmp_path / "async"
    _train(out, "trainer.max_steps=4", "checkpoint.every=2", "checkpoint.keep=5", "checkpoint.async=true")
    assert _losses(out) == _losses(straight)
    for step in (2, 4):
        a, b = ckpt.step_dir(straight, step), ckpt.step_dir(out, step)
        assert ckpt.tensor_shapes(a) == ckpt.tensor_shapes(b)
        ta = {k: torch.empty(s, dtype=d) for k, (s, d) in ckpt.tensor_shapes(a).items()}
        tb = {k: torch.empty(s, dtype=d) for k, (s, d) in ckpt.tensor_shapes(b).items()}
        ckpt.load_tensors(a, ta, alone=True)
        ckpt.load_tensors(b, tb, alone=True)
        assert all(torch.equal(ta[k], tb[k]) for k in ta)
        assert (a / "rank00000.json").read_text() == (b / "rank00000.json").read_text()


def test_metadata_reader_refuses_foreign_globals(tmp_path):
    from engine.checkpoint.dcp.safe_reader import CheckpointCorruptError, read_metadata_file

    marker = tmp_path / "ran"
    (tmp_path / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(CheckpointCorruptError, match=r"\.metadata.*posix\.system|\.metadata.*os\.system"):
        read_metadata_file(tmp_path / ".metadata")
    assert not marker.exists()
