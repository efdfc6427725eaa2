"""Artefacts the end-to-end tests share: the README's commands run once per session on a fresh copy,
whose tiny runs (outputs/tiny_sft, outputs/tiny_lora, ...) the tests that only read them inspect."""

import pytest


@pytest.fixture(scope="session")
def readme_run(tmp_path_factory):
    from tests.e2e.test_readme_commands import run_readme
    from tests.train_runs import once, session_root

    return once(session_root(tmp_path_factory), "readme", lambda folder: run_readme(folder / "repo"))


@pytest.fixture(scope="session")
def tiny_sft_run(readme_run):
    """outputs/tiny_sft of the README's `python engine/train.py recipe=tiny_sft` (60 steps). Read-only."""
    command = "python engine/train.py recipe=tiny_sft"
    assert readme_run.succeeded(command), f"the README's `{command}` did not succeed:\n{readme_run.failure}"
    return readme_run.repo / "outputs" / "tiny_sft"
