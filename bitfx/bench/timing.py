"""The timers every benchmark uses: CUDA-graph replays, CUDA events, the wall clock.

* :func:`time_graph`: the calls captured once in a CUDA graph (over rotating weight copies, see
  :func:`copies_for`), the graph replayed; the median seconds per call. For kernels that take
  microseconds, where launch overhead and a warm L2 would otherwise decide the figure.
* :func:`timed`: one call between two CUDA events (the wall clock on the CPU), with the host's
  wall time up to the end of its work beside it; :func:`median_s` takes the median of many.
* :func:`wall_median_s`: the median wall clock of calls each started and ended by a
  synchronize (host time included).
* :func:`back_to_back_ms`: many calls between two events with no synchronize between them, as a
  loop runs (the host prepares a call while the GPU runs the previous one).
* :func:`host_s`: host seconds per call of back-to-back calls (the host sets the pace).
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Any, Callable, Optional

import torch

L2_BYTES = 50 * 2**20
"""The L2 cache the rotating copies must overflow (the H100's 50 MB)."""


def sync(cuda: bool) -> None:
    """Wait for the GPU (nothing to wait for on the CPU)."""
    if cuda:
        torch.cuda.synchronize()


def copies_for(weight_bytes: int) -> int:
    """Rotating copies so that the weights stream from HBM: at least 4x L2 in all, 2..64 copies."""
    return max(2, min(64, math.ceil(4 * L2_BYTES / max(weight_bytes, 1))))


def time_graph(fns: list[Callable], reps: int = 30) -> float:
    """Median seconds per call of ``fns`` (one callable per rotating copy), replayed in a CUDA graph.

    Two warm-up rounds on a side stream, one capture of all of ``fns``, three untimed replays,
    then ``reps`` replays each between two CUDA events."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            for f in fns:
                f()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for f in fns:
            f()
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    times = [timed(graph.replay, cuda=True)[1] / 1e3 / len(fns) for _ in range(reps)]
    del graph
    return statistics.median(times)


def timed(fn: Callable[[], Any], *, cuda: bool) -> tuple[Any, float, float]:
    """One call: ``(result, ms, wall_s)``. ``ms``: between two CUDA events around the call on a
    GPU (the wall clock on the CPU); ``wall_s``: the host's wall clock from the call until its
    work has finished (a synchronize)."""
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    w0 = time.perf_counter()
    out = fn()
    if cuda:
        end.record()
    sync(cuda)
    wall_s = time.perf_counter() - w0
    return out, (start.elapsed_time(end) if cuda else wall_s * 1e3), wall_s


def median_s(fn: Callable[[], Any], reps: int = 20, warmup: int = 3, *, cuda: bool = True) -> float:
    """Median seconds of ``reps`` calls timed by :func:`timed` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    sync(cuda)
    return statistics.median(timed(fn, cuda=cuda)[1] for _ in range(reps)) / 1e3


def wall_median_s(fn: Callable[[], Any], reps: int, warmup: int = 1, *, cuda: bool) -> float:
    """Median wall-clock seconds of ``reps`` calls, each started and ended by a synchronize,
    after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        sync(cuda)
        times.append(timed(fn, cuda=cuda)[2])
    return statistics.median(times)


def back_to_back_ms(fn: Callable[[], Any], reps: int, prepare: Optional[Callable[[], Any]] = None) -> tuple[Any, float]:
    """``(last result, ms per call)`` of ``reps`` calls between two CUDA events with no
    synchronize between them (``prepare`` runs before each call, inside the timed span)."""
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    out = None
    start.record()
    for _ in range(reps):
        if prepare is not None:
            prepare()
        out = fn()
    end.record()
    torch.cuda.synchronize()
    return out, start.elapsed_time(end) / reps


def host_s(fn: Callable[[], Any], calls: int = 2000, warmup: int = 50) -> float:
    """Host seconds per call of ``calls`` back-to-back calls with no synchronize between them
    (the GPU is waited for before and after, outside the timed span)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    dt = (time.perf_counter() - t) / calls
    torch.cuda.synchronize()
    return dt


def copy_bandwidth(nbytes: int = 2**30, reps: int = 10) -> float:
    """Bytes/s of this GPU's device-to-device copy (each copy reads and writes ``nbytes``): the
    bandwidth a bytes floor is measured against, taken on the device the benchmark runs on."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(2):
        dst.copy_(src)
    torch.cuda.synchronize()
    ms = statistics.median(timed(lambda: dst.copy_(src), cuda=True)[1] for _ in range(reps))
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / (ms / 1e3)
