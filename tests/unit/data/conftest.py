"""Shared fixtures of the data-pipeline tests: the shipped tokenizer and a JSONL writer."""

import json
from pathlib import Path

import pytest

from engine.data.tokenizer import HarmonyTokenizer, load_tokenizer


@pytest.fixture(scope="session")
def tokenizer() -> HarmonyTokenizer:
    return load_tokenizer()


@pytest.fixture
def write_jsonl(tmp_path: Path):
    """write_jsonl(lines, name) -> path; dict lines are JSON-encoded, str lines written as is."""

    def write(lines: list, name: str = "data.jsonl") -> Path:
        path = tmp_path / name
        with path.open("w", encoding="utf-8") as f:
            for line in lines:
                f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
        return path

    return write
