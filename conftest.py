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


class FailingFile:
    """A file being written whose writes fail with OSError(errno) once `limit` bytes have gone through: a disk that
    fills up (ENOSPC) or fails (EIO) in the middle of a write."""

    def __init__(self, file, limit: int, err: int):
        self.file, self.limit, self.err, self.written = file, limit, err, 0

    def write(self, data):
        if self.written + len(data) > self.limit:
            raise OSError(self.err, os.strerror(self.err))
        self.written += len(data)
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


@pytest.fixture
def fail_writes(monkeypatch):
    """fail_writes(err, after_bytes, name_contains=""): from now on, files written through cli.atomic_file (and logs
    appended through cli.open_for_append) whose name contains `name_contains` fail with OSError(err) after
    `after_bytes` bytes. Returns the list of paths it broke."""
    import cli
    broken = []

    def install(err: int, after_bytes: int = 0, name_contains: str = ""):
        real_write, real_append = cli.open_for_write, cli.open_for_append

        def open_for_write(path):
            if name_contains not in Path(path).name:
                return real_write(path)
            broken.append(Path(path))
            return FailingFile(open(path, "wb"), after_bytes, err)

        def open_for_append(path):
            if name_contains not in Path(path).name:
                return real_append(path)
            broken.append(Path(path))
            return FailingFile(open(path, "a"), after_bytes, err)

        monkeypatch.setattr(cli, "open_for_write", open_for_write)
        monkeypatch.setattr(cli, "open_for_append", open_for_append)
        return broken

    return install
