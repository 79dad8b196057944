"""lib/memory.py: the peak memory of a process tree (a process and every worker it starts), sampled from /proc.

`bpe.py train` reports it, and bench/bench_bpe_memory.py measures ours and Hugging Face tokenizers with it. Why not
getrusage: its ru_maxrss is the peak of ONE process (RUSAGE_CHILDREN: of the largest finished child), so a main
process at 2 GB with four workers at 1 GB each reports 2 GB, while the machine needed 6 GB at once. What a user's
laptop must hold is the largest SUM over the processes alive at the same moment; a thread that reads every process's
resident size a few dozen times a second finds it. note: the sum of resident sizes counts a page that a forked worker
still shares with its parent (copy-on-write) once per process, so it can overstate, never understate, the memory in
use; a 50 ms sampling period can miss a peak shorter than that, so the result is also never below ru_maxrss.
Linux only (/proc); elsewhere it falls back to ru_maxrss.

    with TreePeak() as peak:      # this process and its descendants
        work()
    print(peak.bytes)
"""
import os
import resource
import threading
from pathlib import Path

PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
SAMPLE_SECONDS = 0.05


def children(pid: int) -> list[int]:
    """The pids of pid's children (every thread's list: a child belongs to the thread that forked it)."""
    kids = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            kids += [int(k) for k in (task / "children").read_text().split()]
    except OSError:  # the process or thread has just ended
        pass
    return kids


def resident_bytes(pid: int) -> int:
    """The resident memory of one process (0 if it has ended): /proc/PID/statm's second field, in pages."""
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_BYTES
    except (OSError, IndexError, ValueError):
        return 0


def tree_resident_bytes(root: int) -> int:
    """The resident memory of root and all its descendants, summed."""
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        total += resident_bytes(pid)
        stack += children(pid)
    return total


class TreePeak:
    """A background thread that keeps the largest tree_resident_bytes(pid) seen while the `with` block runs
    (pid: default this process). .bytes is the peak, at least ru_maxrss of this process and of its finished children
    when the tree is this process's own."""

    def __init__(self, pid: int | None = None):
        self.pid = os.getpid() if pid is None else pid
        self.bytes = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while True:
            self.bytes = max(self.bytes, tree_resident_bytes(self.pid))
            if self._done.wait(SAMPLE_SECONDS):
                return

    def __enter__(self) -> "TreePeak":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()
        if self.pid == os.getpid():  # a peak between two samples: ru_maxrss is the floor (Linux reports KiB)
            self.bytes = max(self.bytes, *(resource.getrusage(who).ru_maxrss * 1024
                                           for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)))
