"""Tests for lib/memory.py: the peak memory of a process tree is the largest SUM over the processes alive at once
(what `bpe.py train` prints and bench/bench_bpe_memory.py compares with Hugging Face tokenizers)."""
import multiprocessing
import resource
import sys
import time

import numpy as np
import pytest

from lib.memory import TreePeak, tree_resident_bytes

MB = 10**6
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc (Linux only)")


def hold(nbytes: int, ready, release) -> None:
    """A worker that keeps nbytes resident until told to stop."""
    block = np.ones(nbytes // 8)  # touched, so resident
    ready.release()
    release.wait(30)
    del block


def test_workers_alive_at_once_are_summed():
    """Two workers holding 150 MB each at the same time: the tree's peak counts both (>= 300 MB more than this
    process alone), where ru_maxrss, one process's peak, sees 150 MB."""
    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Semaphore(0), ctx.Event()
    base = tree_resident_bytes(multiprocessing.current_process().pid)
    with TreePeak() as peak:
        workers = [ctx.Process(target=hold, args=(150 * MB, ready, release)) for _ in range(2)]
        for w in workers:
            w.start()
        for _ in workers:
            ready.acquire()
        time.sleep(0.3)  # several samples while both hold their blocks
        release.set()
        for w in workers:
            w.join()
    assert peak.bytes >= base + 300 * MB
    assert resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 < base + 300 * MB


def test_a_finished_peak_of_this_process_is_the_floor():
    """A peak shorter than the sampling period is not missed: ru_maxrss is the floor."""
    with TreePeak() as peak:
        np.ones(50 * MB // 8).sum()
    assert peak.bytes >= resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
