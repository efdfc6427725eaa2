"""What a run would meet only later is refused before step 1, in one line: a folder it will write that
cannot be written (checkpoints/, the export folder), a config value of the wrong shape, a deleted
config group, and a memory plan larger than the machine."""

from pathlib import Path

import pytest

from engine.config.compose import compose_config
from engine.errors import ConfigError, PlanError, StorageError
from engine.training.folders import check_run_folders

TINY = ["recipe=tiny_sft", "data.source=synthetic", "data.max_seq_len=32", "data.global_batch_size=2"]


def _cfg(out, *overrides):
    return compose_config([*TINY, f"trainer.output_dir={out}", "trainer.max_steps=2", *overrides])


def test_a_checkpoints_file_is_refused_before_step_1(tmp_path):
    from engine.training.trainer import run

    (tmp_path / "checkpoints").write_text("not a folder")
    with pytest.raises(StorageError) as info:
        run(_cfg(tmp_path))
    assert "checkpoints/ folder" in str(info.value) and "is a file" in str(info.value)
    assert not (tmp_path / "metrics.jsonl").exists()  # not one step was trained


def test_an_unwritable_checkpoints_folder_is_refused(tmp_path, monkeypatch):
    real = Path.write_bytes

    def write_bytes(self, data):  # the folder's permissions refuse new files (root ignores chmod)
        if self.parent.name == "checkpoints":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    with pytest.raises(StorageError) as info:
        check_run_folders(_cfg(tmp_path), tmp_path)
    text = str(info.value)
    assert "checkpoints/ folder" in text and "not writable" in text and "Permission denied" in text


@pytest.mark.parametrize("peft,export", [("none", "hf"), ("lora", "adapter")])
def test_an_export_folder_that_is_a_file_is_refused(tmp_path, peft, export):
    (tmp_path / export).write_text("x")
    with pytest.raises(StorageError, match=f"export folder {export}/.*is a file"):
        check_run_folders(_cfg(tmp_path, f"peft.method={peft}"), tmp_path)


def test_sound_folders_pass_and_no_export_folder_is_made(tmp_path):
    check_run_folders(_cfg(tmp_path), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints"]


WRONG_SHAPES = [
    ("optim.betas=0.9", "optim.betas=0.9 must be a list [float, float], not a float"),
    ("model.overrides=abc", "model.overrides='abc' must be a mapping, not a str"),
    ("~optim", "'~optim' deletes the required group 'optim'"),
    ("~trainer", "'~trainer' deletes the required group 'trainer'"),
]


@pytest.mark.parametrize("override,says", WRONG_SHAPES, ids=[w[0] for w in WRONG_SHAPES])
def test_config_of_the_wrong_shape_is_one_line(override, says):
    with pytest.raises(ConfigError) as info:
        compose_config(["recipe=tiny_sft", override])
    assert says in str(info.value) and "\n" not in str(info.value)


def test_a_plan_larger_than_the_machine_is_refused_before_any_allocation(tmp_path, monkeypatch):
    from engine.training import trainer

    def no_model(*args, **kwargs):
        raise AssertionError("the model was built")

    monkeypatch.setattr(trainer, "build_model", no_model)
    with pytest.raises(PlanError) as info:
        trainer.run(_cfg(tmp_path, "data.max_seq_len=10000000000"))
    text = str(info.value)
    assert "per process exceeds 95% of this machine's" in text and "data.max_seq_len" in text and "\n" not in text
