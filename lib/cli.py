"""cli.py: what every script shares at its edges, so a user sees one kind of error and no torn files anywhere.

Every CLI of the project (bpe.py, model.py, optim.py, accounting.py, train.py, sample.py, experiments/run.py)
reports a problem as one line on stderr, `PROG: error: what is wrong and what to do`, never a traceback, and exits
with one of two codes:
  2  bad input: a flag, a file or its contents, something the user can fix (argparse's own code for usage errors);
  1  the environment: a full disk, a failed download, a run that diverged; not the input's fault.
Every file is written through `atomic_file` (below): all or nothing, no debris, a WriteFault (exit 1) naming the
file and the cause, such as "no space left on device: 13.21 MB needed, 8.29 MB free". An optional package (safetensors,
wandb) is imported through `optional_import`, so a missing one is the same kind of line, saying how to install it.
This file sits below bpe.py, the lowest layer of the stack, so every layer can use it without importing the
tokenizer (or anything else: it needs only the standard library).
"""
import argparse
import contextlib
import errno
import importlib
import os
import re
import shutil
from pathlib import Path

EXIT_BAD_INPUT = 2
EXIT_ENVIRONMENT = 1


class BadInputError(ValueError):
    """A problem with the user's input (flags, data, a checkpoint): the CLI prints its one line and exits with 2.

    A ValueError, so library callers that catch ValueError for bad arguments keep working."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit code 2) naming the problem and --help; argparse's
    default also prints the whole usage block first."""

    def error(self, message):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see --help)\n")


def parse_bytes(text: str) -> float:
    """argparse type for a memory size (accounting.py's --gpu-mem): '80GB' -> 80e9, '80GiB' -> 80·2³⁰, '80' -> 80e9
    (GB)."""
    units = {"": 1e9, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
             "tib": 2**40}
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in units or float(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"bad memory size {text!r}; write e.g. 80GB or 80GiB")
    return float(m.group(1)) * units[m.group(2).lower()]


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (accounting.py's sizes), else argparse's one-line error."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


# ---------------------------------------------------------------------------------------------------------------
# Faults of the machine, and files written so that a fault never leaves a torn file or debris
# ---------------------------------------------------------------------------------------------------------------
# Every file the project writes (checkpoints, token-id .npy files, tokenizer files, config.json) goes through
# `atomic_file`: it is written to PATH.tmp beside the target, flushed to disk, then os.replace()d over the target,
# which is atomic (a reader, or a run resumed after a crash, sees the old file or the new one, never half of one).
# Any failure on the way removes PATH.tmp, so a full disk is not kept full by the debris of the write that failed.


class EnvironmentFault(RuntimeError):
    """Not the input's fault: a full disk, a failed write, a failed download. The CLI prints one line, exit 1."""


class WriteFault(EnvironmentFault, OSError):
    """A file could not be written; the message names the file, the cause, and (where known) the space needed.
    Also an OSError, so code that catches OSError around a write still catches it."""

    def __init__(self, path, cause: str):
        super().__init__(f"cannot write {path}: {cause}")
        self.path, self.cause = Path(path), cause


def human_bytes(n: float) -> str:
    """12_681_877 -> '12.68 MB': decimal units, as disks and GPU memory are sold (1 GB = 1e9 bytes)."""
    for scale, unit in ((1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def free_bytes(path) -> int:
    """Free space on the file system that holds `path` (or the nearest existing directory above it)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path if path.is_dir() else path.parent).free


def space_problem(path, needed: int | None) -> str | None:
    """'no space left on device: 13.21 MB needed, 8.29 MB free' when `needed` bytes will not fit beside `path`."""
    if needed is None:
        return None
    free = free_bytes(path)
    return f"no space left on device: {human_bytes(needed)} needed, {human_bytes(free)} free" if free < needed else None


def describe_fault(error: BaseException, path, needed: int | None = None) -> str:
    """One line for why a write failed. note: torch.save swallows the OSError of a short write and raises
    RuntimeError("... unexpected pos ..."), so a full disk is recognised by the free space left, not only by errno."""
    if isinstance(error, OSError):
        if error.errno == errno.ENOSPC:
            return space_problem(path, needed) or "no space left on device"
        return (error.strerror or str(error)).lower()  # e.g. "input/output error", "permission denied"
    return space_problem(path, needed) or error_summary(error)


def some_of(items: list, shown: int = 3) -> str:
    """The first few items and how many more, short enough for a one-line error: "a, b, c and 2 more"."""
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    return ", ".join(map(str, items[:shown])) + more


QUOTED_ERROR_CHARS = 160  # how much of a library's error message a one-line error quotes


def error_summary(error: BaseException) -> str:
    """'TypeName: the first line of its message', cut to QUOTED_ERROR_CHARS: a library's error quoted inside one of
    our one-line errors."""
    first_line = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {first_line[:QUOTED_ERROR_CHARS]}"


def open_for_write(path):
    """The one `open` of a file being written (a seam: the fault-injection tests replace it)."""
    return open(path, "wb")


def open_for_append(path):
    """The one `open` of a log being appended to (a seam like open_for_write); line-buffered text."""
    return open(path, "a", buffering=1)


@contextlib.contextmanager
def atomic_file(path, needed: int | None = None):
    """`with atomic_file(path) as f: f.write(...)`: binary file `path`, all or nothing (see the banner above).

    needed: the expected size in bytes, if known; the write is refused up front when it will not fit, and a
    failure is then explained with the space needed and free. A failure of the file itself (open, a write, flush,
    fsync, the rename) raises WriteFault (exit code 1 in a CLI); any other error of the `with` body (say, the
    producer of the bytes failing) propagates unchanged. Either way the temporary file is removed."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    recorder, in_body = None, False
    try:
        problem = space_problem(path, needed)
        if problem:
            raise WriteFault(path, problem)
        with open_for_write(tmp) as f:
            recorder, in_body = _RecordingFile(f), True
            yield recorder
            in_body = False
            recorder.sync()
        os.replace(tmp, path)
    except BaseException as e:  # an error, or a second Ctrl-C: leave no partial file behind
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        file_failed = recorder is not None and recorder.error is not None
        if isinstance(e, WriteFault) or not isinstance(e, (OSError, RuntimeError)) or (in_body and not file_failed):
            raise
        raise WriteFault(path, describe_fault(recorder.error if file_failed else e, path, needed)) from e


class _RecordingFile:
    """A file being written, remembering the OSError of a failed write, flush or fsync: torch.save swallows the
    error of a short write and raises a RuntimeError ("unexpected pos") instead, and the errno (ENOSPC, EIO) says
    more; it also tells a failure of the file apart from a failure of whatever produces the bytes."""

    def __init__(self, file):
        self.file, self.error = file, None

    def _recorded(self, operation, *args):
        try:
            return operation(*args)
        except OSError as e:
            self.error = e
            raise

    def write(self, data):
        return self._recorded(self.file.write, data)

    def flush(self):
        return self._recorded(self.file.flush)

    def sync(self):
        """Flush and fsync now: the data is on disk (or the fault shows) before anything is replaced."""
        self.flush()
        self._recorded(os.fsync, self.file.fileno())

    def __getattr__(self, name):  # fileno, tell, seek, ...: the real file's
        return getattr(self.file, name)


def atomic_write_text(path, text: str) -> None:
    """A small text file (JSON, merges), atomically, with atomic_file's cleanup and error."""
    data = text.encode("utf-8")
    with atomic_file(path, needed=len(data)) as f:
        f.write(data)


@contextlib.contextmanager
def output_dir(path):
    """`with output_dir(out): ...write files into out...`: creates directory `path` if it is absent (its parent must
    exist) and, if the body fails, removes it again when this call created it and it is still empty, so a failed
    command leaves no new empty directory behind. A directory that was there, and anything written into one, stay."""
    path = Path(path)
    created = not path.exists()
    path.mkdir(exist_ok=True)
    try:
        yield path
    except BaseException:
        if created:
            with contextlib.suppress(OSError):  # not empty (say, a download kept to resume): leave it
                path.rmdir()
        raise


def check_dir_target(path, flag: str, writes: str) -> None:
    """BadInputError when `path` (given as `flag`) is a file where the command writes a directory: say so before any
    work, instead of an "[Errno 17] File exists" after it."""
    if Path(path).exists() and not Path(path).is_dir():
        raise BadInputError(f"{flag} {path} is a file, but {writes} goes there; give a directory (new or existing)")


def check_file_target(path, flag: str, writes: str, example: str) -> None:
    """BadInputError when `path` (given as `flag`) is a directory where the command writes one file."""
    if Path(path).is_dir():
        raise BadInputError(f"{flag} {path} is a directory, but {writes} goes there; give a file path such as "
                            f"{Path(path) / example}")


# ---------------------------------------------------------------------------------------------------------------
# An OSError that reaches a CLI's main: whose fault it is, and one line that names the path and what to do
# ---------------------------------------------------------------------------------------------------------------
# errno -> (what is wrong with the path, what to do, exit code). A wrong path (missing, a file where a directory
# is expected, ...) is the user's to fix: exit 2. Permissions, a read-only or full disk and I/O errors are the
# machine's: exit 1, as for a failed write (WriteFault).
OS_ERRORS = {
    errno.ENOENT: ("does not exist", "check the path", EXIT_BAD_INPUT),
    errno.EISDIR: ("is a directory", "give a file path", EXIT_BAD_INPUT),
    errno.ENOTDIR: ("is not a directory (or a part of the path is a file)", "check the path", EXIT_BAD_INPUT),
    errno.EEXIST: ("already exists", "remove it or choose another path", EXIT_BAD_INPUT),
    errno.ENAMETOOLONG: ("is too long a name", "choose a shorter path", EXIT_BAD_INPUT),
    errno.EACCES: ("cannot be accessed: permission denied", "check its permissions (ls -l) or choose another path",
                   EXIT_ENVIRONMENT),
    errno.EPERM: ("cannot be accessed: operation not permitted", "check its permissions (ls -l) or choose another "
                  "path", EXIT_ENVIRONMENT),
    errno.EROFS: ("is on a read-only file system", "choose a path on a writable disk", EXIT_ENVIRONMENT),
    errno.ENOSPC: ("cannot be written: no space left on device", "free some space or choose another disk",
                   EXIT_ENVIRONMENT),
    errno.EDQUOT: ("cannot be written: disk quota exceeded", "free some space or choose another disk",
                   EXIT_ENVIRONMENT),
    errno.EIO: ("cannot be read or written: input/output error", "the disk may be failing: check it (dmesg) or use "
                "another", EXIT_ENVIRONMENT),
}


def describe_os_error(error: OSError, path=None) -> tuple[int, str]:
    """(exit code, one line) for an OSError at a CLI's edge, naming `path` (default: the error's own filename) and
    the fix, never a bare "[Errno N] ...". An OSError without an errno was raised by a check with a message of its
    own ("input file x does not exist", gzip's "Not a gzipped file"): a problem with the input, exit 2.
    describe_os_error(PermissionError(13, "Permission denied", "out")) ==
        (1, "out cannot be accessed: permission denied; check its permissions (ls -l) or choose another path")"""
    if error.errno is None:
        return EXIT_BAD_INPUT, str(error)
    path = path if path is not None else error.filename
    what, fix, code = OS_ERRORS.get(error.errno, ((error.strerror or str(error)).lower(), "", EXIT_ENVIRONMENT))
    line = f"{path} {what}" if path is not None else what
    return code, line + (f"; {fix}" if fix else "")


# ---------------------------------------------------------------------------------------------------------------
# Optional dependencies: imported only by the command that needs them
# ---------------------------------------------------------------------------------------------------------------


def optional_import(module: str, package: str, needed_for: str):
    """importlib.import_module(module), or a BadInputError (one line, exit 2) saying how to install `package`:
    optional_import("safetensors.torch", "safetensors", "writing model.safetensors")."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise BadInputError(f"{needed_for} needs the {package} package: pip install {package}") from None
