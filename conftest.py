"""Root conftest: makes the top-level scripts importable as modules (`import bpe`, `from model import ...`),
offers fixtures for the optional data beside the project (../shared), which a fresh clone does not have, and the
fault-injection tools: FailingFile, `fail_writes` (writes that fail with ENOSPC/EIO part-way) and `tmpfs` (a real
small disk, root on Linux only)."""
import dataclasses
import os
import subprocess
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
    """A file being written whose writes fail with OSError(err) once `limit` bytes have gone through; the bytes up to
    the limit still reach the file, as on a disk that fills up in the middle of a write."""

    def __init__(self, file, limit: int, err: int):
        self.file, self.limit, self.err, self.written = file, limit, err, 0

    def write(self, data):
        room = max(self.limit - self.written, 0)
        if len(data) > room:
            self.file.write(data[:room])
            self.written = self.limit
            raise OSError(self.err, os.strerror(self.err))
        self.written += len(data)
        return self.file.write(data)

    def __getattr__(self, name):  # seek, flush, fileno, ...: the real file's
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
    from lib import cli
    broken = []

    def install(err: int, after_bytes: int = 0, name_contains: str = ""):
        real_write, real_append = cli.open_for_write, cli.open_for_append

        def failing(real_open):
            def open_file(path):
                if name_contains not in Path(path).name:
                    return real_open(path)
                broken.append(Path(path))
                return FailingFile(real_open(path), after_bytes, err)
            return open_file

        monkeypatch.setattr(cli, "open_for_write", failing(real_write))
        monkeypatch.setattr(cli, "open_for_append", failing(real_append))
        return broken

    return install


@pytest.fixture
def tmpfs(tmp_path):
    """mount(size) -> a directory on a fresh tmpfs of that size ("2m"); unmounted afterwards. Root on Linux only:
    skips where mounting is not allowed (most containers, every other OS)."""
    mounted = []

    def mount(size: str) -> Path:
        if sys.platform != "linux" or os.geteuid() != 0:
            pytest.skip("a real tmpfs needs root on Linux")
        d = tmp_path / f"tmpfs{len(mounted)}"
        d.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)], capture_output=True,
                           text=True)
        if r.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
        mounted.append(d)
        return d

    yield mount
    for d in mounted:
        subprocess.run(["umount", str(d)], check=True)



# A model small enough that a training step takes milliseconds, for train.py tests (--peak-flops 0: no MFU probe).
TINY_RUN = ["--vocab-size", "32", "--context-length", "16", "--d-model", "32", "--num-layers", "2", "--num-heads", "2",
            "--d-ff", "64", "--batch-size", "8", "--warmup-iters", "2", "--lr", "3e-3", "--min-lr", "3e-4",
            "--peak-flops", "0", "--eval-iters", "2", "--log-interval", "2"]


@pytest.fixture
def counting_data(tmp_path):
    """A train.py data directory, train.npy / valid.npy: ids counting up mod 32 in steps of 1 or 2 (learnable, so
    the loss curve moves)."""
    import numpy as np
    rng = np.random.default_rng(0)
    d = tmp_path / "data"
    d.mkdir()
    for name, n in (("train.npy", 20_000), ("valid.npy", 2_000)):
        np.save(d / name, (np.cumsum(rng.integers(1, 3, size=n)) % 32).astype(np.uint16))
    return d


def run_losses(run_dir) -> list[tuple]:
    """(step, train loss or None, val loss or None) of every row of a run's log.jsonl."""
    from lib.runs import read_log
    return [(r["step"], r.get("loss"), r.get("val_loss")) for r in read_log(Path(run_dir) / "log.jsonl")]


# ---------------------------------------------------------------------------------------------------------------
# The bad-input tables (tests/test_bad_input_*.py): one row = a command, what it is given, the exit code, the exact
# one-line message, and the files that must not exist or must be unchanged afterwards. The CLI runs in-process
# (its main(argv)), so a row costs milliseconds, not a Python start-up; nothing in a row depends on timing.
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class BadInput:
    """One row. `argv` and `message` may hold {d} (the row's scratch directory). `message` is the whole stderr line,
    word for word; <*> stands for a part that legitimately varies (an OS message, a JSON parser's position).
    `setup(d)` builds the bad input; `absent` are paths (under d) that must not exist afterwards; `unchanged` are
    paths whose bytes (or, for a directory, whose listing and bytes) must be the same afterwards."""
    id: str
    argv: list
    code: int
    message: str
    setup: object = None
    absent: tuple = ()
    unchanged: tuple = ()


def run_cli(main, argv, capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of a CLI's main(argv), run in-process; SystemExit and a returned code alike."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return (0 if code is None else code), out.out, out.err


def message_matches(line: str, pattern: str) -> bool:
    """Whole-line match, with <*> matching any text (possibly none)."""
    import re
    return re.fullmatch(".*".join(re.escape(p) for p in pattern.split("<*>")), line) is not None


def snapshot(path: Path):
    """Bytes of a file, or {relative name: bytes} of a directory tree, or None if absent: to compare before/after."""
    if path.is_dir():
        return {str(p.relative_to(path)): (p.read_bytes() if p.is_file() else None) for p in sorted(path.rglob("*"))}
    return path.read_bytes() if path.exists() else None


def check_bad_input(row: BadInput, main, d: Path, capsys) -> None:
    """Run one row in scratch directory d and assert everything it promises."""
    if row.setup is not None:
        row.setup(d)
    before = {p: snapshot(d / p.format(d=d)) for p in row.unchanged}
    code, _, err = run_cli(main, [a.format(d=d) if isinstance(a, str) else a for a in row.argv], capsys)
    expected = row.message.format(d=d)
    assert "Traceback" not in err, err
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1 and message_matches(lines[0], expected), f"\n got: {err!r}\nwant: {expected!r}"
    assert code == row.code, f"exit code {code}, want {row.code}: {err}"
    for p in row.absent:
        assert not (d / p.format(d=d)).exists(), f"{p} exists after the failed command"
    for p, old in before.items():
        assert snapshot(d / p.format(d=d)) == old, f"{p} changed"


@pytest.fixture(scope="session")
def quick_demo(tmp_path_factory) -> Path:
    """`train.py demo --quick` once per session: DIR/data (train/valid .txt and .npy, the 300-token tokenizer) and
    DIR/run (config.json, log.jsonl, last.pt, best.pt). Treat it as read-only: copy what a test changes
    (`copy_demo`)."""
    from lib import demo
    out = tmp_path_factory.mktemp("quick_demo")
    demo.demo(out, quick=True)
    return out


@pytest.fixture
def copy_demo(quick_demo, tmp_path):
    """A private copy of the quick demo under tmp_path/name (default tmp_path/demo), for tests that change it."""
    import shutil

    def copy(name: str = "demo") -> Path:
        return Path(shutil.copytree(quick_demo, tmp_path / name))
    return copy
