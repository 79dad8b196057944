"""Root conftest: makes the top-level scripts importable as modules (`import bpe`, `from model import ...`)
and offers fixtures for the optional data beside the project (../shared), which a fresh clone does not have."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

SHARED = Path(os.environ.get("CS336_SHARED", ROOT.parent / "shared"))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """../shared (or $CS336_SHARED); tests that need it skip when it is missing."""
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} not present (optional shared data)")
    return SHARED


@pytest.fixture(scope="session")
def gpt2_files(shared_dir) -> tuple[Path, Path]:
    """OpenAI's GPT-2 vocab.json / merges.txt from ../shared/fixtures, or skip."""
    vocab, merges = shared_dir / "fixtures" / "gpt2_vocab.json", shared_dir / "fixtures" / "gpt2_merges.txt"
    if not (vocab.is_file() and merges.is_file()):
        pytest.skip("GPT-2 tokenizer fixtures not present in ../shared/fixtures")
    return vocab, merges
