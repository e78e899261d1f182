"""A transformers model's decode step and ``generate()``, timed, across transformers versions.

:class:`Decode` is one model's next-token step at a fixed position of a ``StaticCache``
(prefilled eagerly, rewound before every call so that every call is the same step and a CUDA
graph replays); :func:`time_decode` times it, :func:`profile_decode` counts its kernels,
:func:`measure_generate` times greedy ``generate()`` with its own compile. The constructor and
forward signatures these need changed within transformers 5.x; the helpers here pass what
the installed version takes.
"""

from __future__ import annotations

import dataclasses
import inspect
import statistics
import time
from typing import Any, Callable, Optional

import torch

from bitfx.bench.profiling import compile_count, counter, kernel_summary, profile, timeline, top_kernels
from bitfx.bench.timing import back_to_back_ms, sync, timed

PROMPT_LEN = 16
CACHE_LEN = 128  # slots of the decode benchmark's static cache (every step writes slot PROMPT_LEN)


def make_static_cache(model: torch.nn.Module, max_cache_len: int, device, dtype):
    """A transformers ``StaticCache`` for batch 1, built with the arguments this version's
    constructor takes (5.x: ``config, max_cache_len`` and lazy allocation on first use; older:
    also ``max_batch_size, device, dtype``)."""
    from transformers import StaticCache

    params = inspect.signature(StaticCache.__init__).parameters
    kw: dict[str, Any] = {"config": model.config, "max_cache_len": max_cache_len}
    for key, value in (("max_batch_size", 1), ("batch_size", 1), ("device", device), ("dtype", dtype)):
        if key in params:
            kw[key] = value
    return StaticCache(**kw)


def forward_kwargs(model: torch.nn.Module, cache, positions: torch.Tensor) -> dict[str, Any]:
    """Keyword arguments of a cached forward at ``positions`` (1-D), in this version's names:
    the cache is ``cache=`` where the forward takes it (newer 5.x) else ``past_key_values=``;
    ``cache_position`` only where the forward still takes it. ``position_ids`` always."""
    params = inspect.signature(model.forward).parameters
    kw: dict[str, Any] = {"use_cache": True, "position_ids": positions[None]}
    kw["cache" if "cache" in params else "past_key_values"] = cache
    if "cache_position" in params:
        kw["cache_position"] = positions
    return kw


def rewind(cache, position: int) -> None:
    """Put the cache's write position back to ``position``. Versions whose static layers write
    at ``cumulative_length`` (a tensor advanced in place by each call) would otherwise move on
    with every timed call and run out of slots; versions that write at ``cache_position``
    have no such counter and need nothing."""
    for layer in getattr(cache, "layers", ()):
        n = getattr(layer, "cumulative_length", None)
        if isinstance(n, torch.Tensor):
            n.fill_(position)
        elif isinstance(n, int):
            layer.cumulative_length = position
        if isinstance(getattr(layer, "cumulative_length_int", None), int):  # a sliding-window layer's copy of it
            layer.cumulative_length_int = position


class Decode:
    """One model's decode step: a static cache prefilled eagerly with a random prompt, and the
    next token's inputs at the fixed position ``PROMPT_LEN``."""

    def __init__(self, model: torch.nn.Module, device: str, dtype: torch.dtype):
        g = torch.Generator().manual_seed(1)
        vocab = model.config.vocab_size
        self.prompt = torch.randint(0, vocab, (1, PROMPT_LEN), generator=g).to(device)
        self.cache = make_static_cache(model, CACHE_LEN, device, dtype)
        kw = forward_kwargs(model, self.cache, torch.arange(PROMPT_LEN, device=device))
        logits = model(input_ids=self.prompt, **kw).logits
        self.token = logits[:, -1].argmax(-1)[:, None].contiguous()  # [1, 1]
        self.kwargs = forward_kwargs(model, self.cache, torch.tensor([PROMPT_LEN], device=device))

    def prepare(self, graphs: bool) -> None:
        """Before each call, outside the timed region: rewind the cache; under CUDA graphs,
        tell the cudagraph trees that a new step begins (the previous outputs may be reused)."""
        rewind(self.cache, PROMPT_LEN)
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()

    def run(self, fn: Callable) -> torch.Tensor:
        return fn(input_ids=self.token, **self.kwargs).logits


def time_decode(dec: Decode, fn: Callable, *, cuda: bool, graphs: bool, reps: int, warmup: int = 3) -> dict:
    """Median ms per decode call (CUDA events; wall clock on CPU) and median host wall us per
    call up to a synchronize; the logits of the last call (a float CPU copy), the seconds the
    first call took (the compile), the graphs Dynamo compiled for it, and whether anything
    compiled during the timed calls (it should not)."""
    count0, skips0 = compile_count(), counter("inductor", "cudagraph_skips")
    t0 = time.perf_counter()
    for i in range(max(warmup, 1)):
        dec.prepare(graphs)
        dec.run(fn)
        sync(cuda)
        if i == 0:
            first_s = time.perf_counter() - t0
    graphs_compiled = compile_count() - count0
    count1 = compile_count()
    dev_ms, wall_us = [], []
    logits = None
    for _ in range(reps):
        dec.prepare(graphs)
        sync(cuda)
        logits, ms, wall_s = timed(lambda: dec.run(fn), cuda=cuda)
        dev_ms.append(ms)
        wall_us.append(wall_s * 1e6)
    # Back to back: ``reps`` steps between two events with no synchronize in between, as a
    # decode loop runs; the host prepares step i+1 while the GPU runs step i, so this is the
    # step time the GPU sets whenever the host keeps ahead of it.
    piped_ms = None
    if cuda:
        logits, piped_ms = back_to_back_ms(lambda: dec.run(fn), reps, prepare=lambda: dec.prepare(graphs))
    return {
        "ms": piped_ms if piped_ms is not None else statistics.median(dev_ms),
        "synced_ms": statistics.median(dev_ms),
        "host_us": statistics.median(wall_us),
        "logits": logits[0, -1].float().cpu().clone(),
        "first_call_s": first_s,
        "graphs_compiled": graphs_compiled,  # more than 1: graph breaks
        "recompiled_while_timed": compile_count() != count1,  # then the times include compiling
        "cudagraph_skips": counter("inductor", "cudagraph_skips") - skips0,  # graphs Inductor ran without CUDA graphs
    }


def profile_decode(dec: Decode, fn: Callable, cuda: bool = True, top: int = 0, graphs: bool = False) -> dict:
    """One (already warm) decode step under ``torch.profiler``: CUDA kernels (memcpy/memset
    apart), the sum of their durations and their timeline (:func:`bitfx.bench.profiling.timeline`:
    span, busy and idle µs); with ``top``, also the ``top`` kernels by total GPU time
    (``"top"``). ``graphs``: ``fn`` was compiled for CUDA graphs, and the step profiled is a
    replay (the profiler records the kernels of a replayed graph one by one). On CPU (a check
    of this code path) there are no kernels; the number of CPU op events is returned for
    information."""
    dec.prepare(graphs)
    sync(cuda)
    prof = profile(lambda: dec.run(fn), cuda)
    out = {**kernel_summary(prof), **timeline(prof)}
    if top:
        out["top"] = top_kernels(prof, cuda, top)["top"]
    return out


def make_compile_config(backend: str, mode: Optional[str], cpu: bool):
    """transformers' ``CompileConfig`` for generate's automatic compile, with only the fields
    this version has. On CPU generate compiles only when ``_compile_all_devices`` is set (its
    ``_valid_auto_compile_criteria`` checks the device type)."""
    try:
        from transformers import CompileConfig
    except ImportError:
        from transformers.generation.configuration_utils import CompileConfig
    wanted = {"backend": backend, "mode": mode, "fullgraph": False}
    if dataclasses.is_dataclass(CompileConfig):
        names = {f.name for f in dataclasses.fields(CompileConfig)}
    else:
        names = set(inspect.signature(CompileConfig.__init__).parameters)
    cc = CompileConfig(**{k: v for k, v in wanted.items() if k in names})
    if cpu:
        cc._compile_all_devices = True
    return cc


def measure_generate(model: torch.nn.Module, prompt: torch.Tensor, backend: str, *, cuda: bool,
                     new_tokens: int) -> dict:
    """tokens/s of greedy ``generate`` with a static cache and generate's own compile: the
    first call compiles; then calls are timed until one compiles nothing new (at most 3)."""
    cc = make_compile_config(backend, "reduce-overhead" if cuda else "default", cpu=not cuda)
    kw = dict(
        attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
        do_sample=False, cache_implementation="static", compile_config=cc, pad_token_id=0,
    )
    before, skips = compile_count(), counter("inductor", "cudagraph_skips")
    t0 = time.perf_counter()
    model.generate(prompt, **kw)
    sync(cuda)
    first_s = time.perf_counter() - t0
    compiled = compile_count() - before
    skips = counter("inductor", "cudagraph_skips") - skips
    out: dict[str, Any] = {"first_call_s": first_s, "graphs_compiled": compiled}
    if compiled == 0:
        out["note"] = "generate compiled no graph on its first call (was the automatic compile triggered?)"
    elif cuda and skips:
        out["note"] = f"Inductor skipped CUDA graphs for {skips} of generate's graph(s)"
    for attempt in range(3):
        before = compile_count()
        sync(cuda)
        t0 = time.perf_counter()
        ids = model.generate(prompt, **kw)
        sync(cuda)
        seconds = time.perf_counter() - t0
        if compile_count() == before:
            break
        out["note"] = (out.get("note", "") + f"; timed call {attempt + 1} compiled again, timed another").lstrip("; ")
    new = ids.shape[1] - prompt.shape[1]
    out.update(tok_s=new / seconds, new_tokens=new, seconds=seconds)
    return out


def measure_eager_generate(model: torch.nn.Module, prompt: torch.Tensor, *, cuda: bool, new_tokens: int) -> dict:
    """tokens/s of greedy ``generate`` as a user runs it without compiling: the default cache,
    no compile config (and generate's automatic compile turned off); one warm-up call."""
    kw = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
              do_sample=False, pad_token_id=0, disable_compile=True)
    model.generate(prompt, **kw)
    sync(cuda)
    t0 = time.perf_counter()
    ids = model.generate(prompt, **kw)
    sync(cuda)
    seconds = time.perf_counter() - t0
    new = ids.shape[1] - prompt.shape[1]
    return {"tok_s": new / seconds, "new_tokens": new, "seconds": seconds}


def forget_generate_state(model: torch.nn.Module) -> None:
    """Drop what generate keeps on the model between calls (its compiled forward and cache)."""
    for attr in ("_compiled_call", "_last_compile_config", "_cache"):
        if attr in model.__dict__:
            try:
                delattr(model, attr)
            except AttributeError:
                pass
