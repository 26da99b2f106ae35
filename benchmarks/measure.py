"""Timing and peak memory of one call, the way every figure of the benchmark is taken."""

from __future__ import annotations

import ctypes
import os
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Timing:
    median: float
    samples: int
    peak_mb: float
    result: Any = None


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _trim_heap() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@contextmanager
def peak_rss() -> Iterator[list[float]]:
    """Yields a list that holds, on exit, the peak RSS rise in MiB over the block."""
    _trim_heap()
    base = _rss_bytes()
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.002):
            peak[0] = max(peak[0], _rss_bytes())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out: list[float] = []
    try:
        yield out
    finally:
        done.set()
        sampler.join()
        peak[0] = max(peak[0], _rss_bytes())
        out.append((peak[0] - base) / 2**20)


def _finished(result: Any) -> Any:
    """`result`, once the GPU work queued for it is done (CUDA kernels run asynchronously; on the CPU a no-op)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return result


def measure(run: Callable[[], Any], repeats: int, slow: float) -> Timing:
    """Median seconds over `repeats` runs after a warm-up (memory measured during the warm-up); one run if slow."""
    with peak_rss() as peak:
        start = time.perf_counter()
        result = _finished(run())
        first = time.perf_counter() - start
    if first > slow:
        return Timing(first, 1, peak[0], result)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = _finished(run())
        times.append(time.perf_counter() - start)
    return Timing(statistics.median(times), repeats, peak[0], result)


def measure_alternating(runs: Sequence[Callable[[], Any]], repeats: int, slow: float) -> list[Timing]:
    """`measure` for several callables whose times are compared: their timed runs alternate, so load from
    other processes falls on each alike."""
    firsts = []
    for run in runs:
        with peak_rss() as peak:
            start = time.perf_counter()
            result = _finished(run())
            seconds = time.perf_counter() - start
        firsts.append(Timing(seconds, 1, peak[0], result))
    if max(first.median for first in firsts) > slow:
        return firsts
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(repeats):
        for run, samples in zip(runs, times, strict=True):
            start = time.perf_counter()
            _finished(run())
            samples.append(time.perf_counter() - start)
    return [Timing(statistics.median(samples), repeats, first.peak_mb, first.result) for first, samples in zip(firsts, times, strict=True)]
