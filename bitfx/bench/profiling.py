"""Profiler and compile-counter helpers of the benchmarks: one call under ``torch.profiler``,
its GPU kernels told apart from annotations, counted and ranked; calls under ``cProfile``, their
host time by Python function; Dynamo's graph counters."""

from __future__ import annotations

import os
import time
from typing import Any, Callable

from bitfx.bench.timing import sync


def counter(group: str, key: str) -> int:
    """One of torch's compile counters (0 where this torch has no such counter)."""
    try:
        from torch._dynamo.utils import counters

        return int(counters[group][key])
    except Exception:  # noqa: BLE001  (a torch without the counter: no information)
        return 0


def compile_count() -> int:
    """Graphs Dynamo has compiled so far in this process (to see whether a call compiled)."""
    return counter("stats", "unique_graphs")


def is_kernel_event(e) -> bool:
    """A profiler event that ran on the GPU, not a user annotation (``record_function`` ranges,
    which Inductor's compiled graphs open, also appear on the GPU timeline and span kernels)."""
    if str(getattr(e, "device_type", "")).rsplit(".", 1)[-1] != "CUDA":
        return False
    if getattr(e, "is_user_annotation", False) or "annotation" in str(getattr(e, "activity_type", "")).lower():
        return False
    return True


def host_profile(fn: Callable[[], Any], cuda: bool, runs: int, top: int) -> list:
    """``runs`` calls of ``fn`` under Python's ``cProfile``, each begun on an idle GPU: the ``top``
    functions by their own host time, per call (calls, own ms, cumulative ms). Where the host
    sets the pace, which Python (the dispatcher's callbacks, an op's implementation, a
    launcher) the time is spent in; the profiler's own cost inflates every entry."""
    import cProfile
    import pstats

    prof, n = cProfile.Profile(), max(runs, 1)
    for _ in range(n):
        sync(cuda)
        prof.enable()
        fn()
        prof.disable()
    sync(cuda)
    entries = sorted(pstats.Stats(prof).stats.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
    return [{"function": _where(*where), "calls": nc / n, "own_ms": tt * 1e3 / n, "cumulative_ms": ct * 1e3 / n}
            for where, (_, nc, tt, ct, _) in entries]


def _where(path: str, line: int, name: str) -> str:
    """``folder/file.py:line(name)`` of a profiled function (built-ins: their name)."""
    if path == "~" or not line:
        return name
    return f"{os.path.basename(os.path.dirname(path))}/{os.path.basename(path)}:{line}({name})"


def profile(fn: Callable[[], Any], cuda: bool):
    """One call of ``fn`` (then a synchronize) under ``torch.profiler`` (CPU, and CUDA on a GPU)."""
    from torch.profiler import ProfilerActivity, profile as _profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with _profile(activities=activities) as prof:
        fn()
        sync(cuda)
    return prof


def kernel_summary(prof) -> dict:
    """CUDA kernels of a profile (memcpy/memset counted apart) and the sum of their durations
    (µs); ``events``: all events, for information on a CPU run (which has no kernels)."""
    events = prof.events()
    kernels, memops, gpu_us = 0, 0, 0.0
    for e in events:
        if not is_kernel_event(e):
            continue
        if _is_memop(e.name):
            memops += 1
            continue
        kernels += 1
        gpu_us += e.time_range.end - e.time_range.start  # microseconds
    return {"kernels": kernels, "memops": memops, "gpu_us": gpu_us, "events": len(events)}


def _is_memop(name: str) -> bool:
    name = name.lower()
    return "memcpy" in name or "memset" in name


def timeline(prof) -> dict:
    """The GPU timeline of a profile's kernels (memcpy/memset apart): ``span_us`` from the first
    kernel's start to the last one's end; ``busy_us`` the time some kernel ran (the union of their
    intervals: kernels that overlap, as those launched with PDL do, count once); ``idle_us`` the
    rest of the span, the time no kernel ran between the first and the last: launch latencies
    and the gaps between dependent kernels. A step whose idle share is large is bound by its
    chain of launches, not by the work of its kernels."""
    intervals = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                       if is_kernel_event(e) and not _is_memop(e.name))
    if not intervals:
        return {"span_us": 0.0, "busy_us": 0.0, "idle_us": 0.0}
    busy, (start, end) = 0.0, intervals[0]
    last = end
    for s, e in intervals[1:]:
        if s > end:  # a gap: close the run of overlapping kernels
            busy += end - start
            start, end = s, e
        else:
            end = max(end, e)
        last = max(last, e)
    busy += end - start
    span = last - intervals[0][0]
    return {"span_us": float(span), "busy_us": float(busy), "idle_us": float(span - busy)}


def top_kernels(prof, cuda: bool, top: int) -> dict:
    """The number of GPU kernels of a profile, their summed time (µs), the ``top`` kernel names
    by total time (CPU ops on a CPU run, a check of the path), and the ``top`` host ops by self
    CPU time."""
    totals: dict[str, list] = {}
    for e in prof.events():
        if cuda and not is_kernel_event(e):  # GPU kernels (annotations apart); all CPU ops on a CPU run
            continue
        t = totals.setdefault(e.name, [0, 0.0])
        t[0] += 1
        t[1] += e.time_range.end - e.time_range.start  # microseconds
    ranked = sorted(totals.items(), key=lambda kv: -kv[1][1])
    host = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    return {"kernels": sum(c for c, _ in totals.values()), "us": sum(u for _, u in totals.values()),
            "top": [{"name": k[:120], "calls": c, "us": u} for k, (c, u) in ranked[:top]],
            "host_top": [{"name": e.key[:120], "calls": e.count, "us": e.self_cpu_time_total} for e in host[:top]]}


# Dynamo's and Inductor's timed phases a first step's compile is read from (torch's
# ``compilation_time_metrics``; a phase this torch does not time is left out): the whole
# forward compile (Dynamo's trace, AOTAutograd, Inductor), the backward's compile (lazy, at the
# first backward), and inside them AOTAutograd's tracing, Inductor's code generation, its
# compiles of kernel sources and the wait for the parallel ones.
COMPILE_PHASES = {
    "forward": "_compile.compile_inner",
    "backward": "compile_fx.<locals>.bw_compiler",
    "aot_trace": "create_aot_dispatcher_function",
    "codegen": "GraphLowering.codegen",
    "compile_file": "compile_file",
    "async_wait": "async_compile.wait",
}


class compile_phases:
    """``with compile_phases() as phases: first_step()``: seconds per phase of
    :data:`COMPILE_PHASES` spent inside the block (``phases.seconds``), ``compile`` their
    forward + backward, and ``tuned_tile`` the seconds bitfx's ternary matmul spent measuring
    its tile for new shapes (:func:`bitfx.kernels.matmul_config._tuned_tile`; 0 where nothing
    was measured). The rest of a first step (its kernels' JIT compiles, the step itself) is its
    time less ``compile`` and ``tuned_tile``."""

    def __enter__(self):
        from torch._dynamo import utils

        self._metrics = getattr(utils, "compilation_time_metrics", {})
        self._before = {k: sum(v) for k, v in self._metrics.items()}
        self._tuned = [0.0]
        self._restore = None
        try:
            import bitfx.kernels.ternary_matmul as tm
        except ImportError:  # no Triton: nothing of bitfx's to tune
            tm = None
        if tm is not None:
            original = tm._tuned_tile

            def timed_tile(*a, **kw):
                t0 = time.perf_counter()
                try:
                    return original(*a, **kw)
                finally:
                    self._tuned[0] += time.perf_counter() - t0

            tm._tuned_tile = timed_tile
            self._restore = (tm, original)
        self.seconds: dict[str, float] = {}
        return self

    def __exit__(self, *exc):
        if self._restore is not None:
            module, original = self._restore
            module._tuned_tile = original
        for name, key in COMPILE_PHASES.items():
            if key in self._metrics:
                self.seconds[name] = sum(self._metrics[key]) - self._before.get(key, 0.0)
        self.seconds["compile"] = self.seconds.get("forward", 0.0) + self.seconds.get("backward", 0.0)
        self.seconds["tuned_tile"] = self._tuned[0]
        return False
