import pytest

from tests.unit.checkpoint.builders import tiny_hf, write_side_files


@pytest.fixture(scope="session")
def hf_ref():
    """A tiny fp32 transformers GPT-OSS: hidden 32, 4 experts, intermediate 24, 2 layers. Read-only."""
    return tiny_hf()


@pytest.fixture(scope="session")
def hf_dir(hf_ref, tmp_path_factory):
    """`hf_ref` as written by transformers' save_pretrained (one fp32 file), with tokenizer files. Read-only:
    tests that damage a checkpoint copy it first."""
    path = tmp_path_factory.mktemp("hf") / "tiny"
    hf_ref.save_pretrained(path)
    write_side_files(path)
    return path
