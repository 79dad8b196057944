"""Checks lib/measure.py's hardware half: machine_line names the machine, and measure_matmul_flops is exact on a fake
clock and within 3x of a torch.mm timed here. (Its other half, measure_saved_activations, is the ground truth that
tests/test_accounting.py holds accounting.py's activation rows to.)

    python -m pytest tests/test_measure.py
"""
import itertools
import math
import os
import platform
import time

import pytest
import torch

from lib import measure


def test_machine_line_names_cpu_torch_and_python():
    line = measure.machine_line()
    for part in (f"{os.cpu_count()} cores", f"torch {torch.__version__} ({torch.get_num_threads()} threads)",
                 f"Python {platform.python_version()}"):
        assert part in line, part
    assert not line.startswith(",")  # some CPU name came first (/proc/cpuinfo's, or platform's fallback)


def test_measure_matmul_flops_arithmetic_on_a_fake_clock(monkeypatch):
    # torch.mm replaced by a call that takes a known time on a fake clock, so the result is exact: 2·n³ FLOPs over
    # the fastest call's time.
    n, clock = 64, [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])

    def peak(durations):
        durations = iter(durations)

        def fake_mm(a, b):
            assert a.shape == b.shape == (n, n)
            clock[0] += next(durations)

        monkeypatch.setattr(torch, "mm", fake_mm)
        return measure.measure_matmul_flops(n=n, seconds=0.05)

    # the best of the repeats, not their mean or the last one
    assert peak(itertools.cycle([3e-3, 1e-3, 2e-3])) == pytest.approx(2 * n**3 / 1e-3, rel=1e-9)
    # calls shorter than MIN_TIMED_S are timed in growing groups, each group's time divided back to one call's
    # (here the first, single calls are slower, so only the grouped ones give the best time)
    assert 5e-4 < measure.MIN_TIMED_S
    assert peak(itertools.chain([5e-4] * 4, itertools.repeat(2e-4))) == pytest.approx(2 * n**3 / 2e-4, rel=1e-9)


def test_measure_matmul_flops_agrees_with_a_directly_timed_mm():
    # The same product timed here, call by call, best of 50: the two must agree to within noise (a factor of 3 on a
    # shared machine). A slip in the FLOP count (n² for n³, ms for s) or in what is timed is far outside that.
    n = 256
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    fastest = math.inf
    for _ in range(50):
        t0 = time.perf_counter()
        torch.mm(a, b)
        fastest = min(fastest, time.perf_counter() - t0)
    direct = 2 * n * n * n / fastest
    peak = measure.measure_matmul_flops(n=n, seconds=0.2)
    assert direct / 3 < peak < 3 * direct, (peak, direct)
