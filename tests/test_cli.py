"""Tests for cli.py: the one-line usage error (exit 2) and atomic_file, the one way files are written (all or
nothing; the temporary file removed on any failure; a fault of the file is a WriteFault naming file and cause, an
error of the code producing the bytes passes through unchanged; a write that will not fit is refused up front).

    python -m pytest tests/test_cli.py      # these tests (all fast)
    python -m pytest -m slow                # the slow end-to-end checks of the whole suite
"""
import errno
import shutil

import pytest

from lib import cli


def test_one_line_parser_error_is_one_line_exit_2(capsys):
    parser = cli.OneLineParser(prog="x.py")
    parser.add_argument("--n", type=int)
    with pytest.raises(SystemExit) as e:
        parser.parse_args(["--n", "many"])
    err = capsys.readouterr().err
    assert e.value.code == cli.EXIT_BAD_INPUT == 2
    assert err.count("\n") == 1 and err.startswith("x.py: error: argument --n: invalid int value") and "--help" in err


def test_atomic_file_writes_all_or_nothing(tmp_path):
    path = tmp_path / "f.bin"
    with cli.atomic_file(path) as f:
        f.write(b"new")
    assert path.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


def test_a_failing_file_is_a_write_fault_and_leaves_the_old_file(tmp_path, fail_writes):
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")
    fail_writes(errno.EIO, after_bytes=2)
    with pytest.raises(cli.WriteFault, match=r"cannot write .*f\.bin: input/output error") as e:
        with cli.atomic_file(path) as f:
            f.write(b"new bytes")
    assert isinstance(e.value, OSError) and isinstance(e.value, cli.EnvironmentFault)
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


def test_an_error_of_the_producer_passes_through_unchanged(tmp_path):
    path = tmp_path / "f.bin"
    with pytest.raises(FileNotFoundError, match="input.txt"):  # e.g. the input it was encoding vanished
        with cli.atomic_file(path) as f:
            f.write(b"half")
            raise FileNotFoundError("input.txt")
    assert list(tmp_path.iterdir()) == []


def test_a_write_that_will_not_fit_is_refused_before_a_byte(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 3_100_000, 3_100_000))
    with pytest.raises(cli.WriteFault, match=r"f\.bin: no space left on device: 12\.68 MB needed, 3\.10 MB free"):
        with cli.atomic_file(tmp_path / "f.bin", needed=12_681_877):
            raise AssertionError("the body must not run")
    assert list(tmp_path.iterdir()) == []


def test_human_bytes():
    assert [cli.human_bytes(n) for n in (999, 1000, 12_681_877, 2.5e12)] == ["999 B", "1.00 kB", "12.68 MB", "2.50 TB"]
