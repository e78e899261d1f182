"""Whole-model decode benchmark: ``python -m bitfx.bench_models`` (or ``python -m bitfx.bench --models``).

For each model (transformers architectures built from configs, random bf16 weights, eval
mode, ``torch.no_grad()``) and each method, measured in the same run:

* ``bf16-inductor``: the dense model, ``torch.compile(model, mode=...)`` (Inductor);
* ``bitfx``: the dense model compiled with the backend as it is, ``torch.compile(model,
  backend="bitfx", mode=...)``: every linear but the head ternary, weights packed once when
  the graph is compiled (:mod:`bitfx.prepack`), so a step reads 2-bit weights;
* ``bitfx-quantized`` (only with ``--methods``): the model converted once with
  ``bitfx.quantize(model, prompt)`` (the float weights released), then compiled with the backend.

Models: ``llama-1b`` (Llama-3.2-1B shape), ``llama-8b`` (Llama-3-8B shape), ``bitnet-2b4t``
(transformers' BitNet architecture at the BitNet b1.58 2B4T shape), and a tiny config of each
for ``--quick`` and CPU runs. Which linears bitfx converts is bitfx's own decision (the one
``bitfx.explain`` reports, made by ``bitfx.quantize``); the table counts the layers it
converted. The output head stays dense (``skip_output_head``).

What is measured, per model and method:

1. Decode step ms. A transformers ``StaticCache`` is prefilled eagerly with a 16-token prompt;
   then one single-token forward at a fixed position (the cache is rewound to it before every
   call, so every call is the same step and a CUDA graph replays) is compiled with
   ``mode="reduce-overhead"`` (CUDA graphs) and, separately, with the default mode (no CUDA
   graphs). Each call is timed with CUDA events after a synchronize, so the time includes the
   host's launch overhead; 3 warm-up calls, the median of ``--reps`` calls. The logits must be
   finite; their relative difference from bf16 is reported as information only (the ternary
   model is a different model).
2. Kernels and GPU time per step: one default-mode step under ``torch.profiler`` (CPU + CUDA):
   the number of CUDA kernels (memcpy/memset counted apart) and the sum of their durations.
   Host time per step is the wall clock of the default-mode call up to a synchronize (median);
   host us per op is that time divided by the number of kernels.
3. Bytes read per token: every parameter once (a tied weight once), dense bytes for dense
   tensors; a converted linear reads its packed codes (``N * Kq`` bytes, ``Kq = ceil(K/4)``
   rounded up to 16) and 4 bytes of scale per output row; the input embedding reads one row
   (``hidden * 2`` bytes); the head reads its whole matrix (the embedding's when tied). The KV
   cache and activations are not counted. Floor time = bytes / 3.0 TB/s (the H100's measured
   copy bandwidth); share of floor = floor time / decode time (CUDA graphs; default mode where
   CUDA graphs were not run).
4. ``generate()`` tokens/s: greedy ``model.generate(..., cache_implementation="static",
   compile_config=CompileConfig(backend=..., mode="reduce-overhead"))`` with
   ``min_new_tokens = max_new_tokens`` so that every call makes the same number of tokens;
   the first call compiles, a later one is timed (whole call, prefill included).

Any stage that fails is recorded as an error string in the results and the run goes on.
Output: one line per measurement as it goes, then a Markdown table; ``results.json`` and
``table.md`` (a header line with the device, the versions and the command, then the table)
are written to ``--out`` (default ``bench_out/models``).

``--device cpu`` (hidden; for checking the script without a GPU) runs the tiny configs end to
end on CPU: default mode only, no kernel counts.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import inspect
import json
import os
import statistics
import sys
import time
import traceback
from typing import Any, Callable, Optional

import torch

BANDWIDTH = 3.0e12  # bytes/s: measured device-to-device copy bandwidth of the H100
PROMPT_LEN = 16
CACHE_LEN = 128  # slots of the decode benchmark's static cache (every step writes slot PROMPT_LEN)
BASELINE = "bf16-inductor"
METHODS = ("bf16-inductor", "bitfx")
ALL_METHODS = ("bf16-inductor", "bitfx", "bitfx-quantized")  # the order they run in: quantize comes last

# name -> (architecture, config fields). Only fields present in transformers' LlamaConfig and
# BitNetConfig from 5.17 on; rope theta is set separately (its field was renamed across versions).
MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-1b": ("llama", dict(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
        rms_norm_eps=1e-5, max_position_embeddings=131072, rope_theta=500000.0,
    )),
    "llama-8b": ("llama", dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False,
        rms_norm_eps=1e-5, max_position_embeddings=8192, rope_theta=500000.0,
    )),
    "bitnet-2b4t": ("bitnet", dict(
        vocab_size=128256, hidden_size=2560, intermediate_size=6912, num_hidden_layers=30,
        num_attention_heads=20, num_key_value_heads=5, hidden_act="relu2", tie_word_embeddings=True,
        rms_norm_eps=1e-5, max_position_embeddings=4096, rope_theta=500000.0,
    )),
}

# The same architectures at a size that compiles and runs in seconds on CPU.
TINY: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-1b": ("llama", dict(
        vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, tie_word_embeddings=True,
        rms_norm_eps=1e-5, max_position_embeddings=1024, rope_theta=500000.0,
    )),
    "llama-8b": ("llama", dict(
        vocab_size=1024, hidden_size=256, intermediate_size=768, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, head_dim=64, tie_word_embeddings=False,
        rms_norm_eps=1e-5, max_position_embeddings=1024, rope_theta=500000.0,
    )),
    "bitnet-2b4t": ("bitnet", dict(
        vocab_size=1024, hidden_size=256, intermediate_size=640, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, hidden_act="relu2", tie_word_embeddings=True,
        rms_norm_eps=1e-5, max_position_embeddings=1024, rope_theta=500000.0,
        bos_token_id=1, eos_token_id=2,  # inside the tiny vocabulary (BitNet's defaults are Llama-3's ids)
    )),
}


# ------------------------------------------------------------------ models


def _set_rope_theta(config, theta: float) -> None:
    """Set the rotary base on a config of either generation of the field: transformers 5.x keeps
    it in ``rope_parameters`` (a dict), older configs in ``rope_theta``. The decode speed does
    not depend on it; it is set so that the configs are the published ones."""
    rp = getattr(config, "rope_parameters", None)
    if isinstance(rp, dict):
        config.rope_parameters = {**rp, "rope_theta": theta}
    else:
        config.rope_theta = theta


def make_config(name: str, tiny: bool = False):
    """The transformers config of ``name`` (a key of :data:`MODELS`), or of its tiny twin."""
    from transformers import BitNetConfig, LlamaConfig

    table = TINY if tiny else MODELS
    if name not in table:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    arch, fields = table[name]
    fields = dict(fields)
    theta = fields.pop("rope_theta")
    config = (LlamaConfig if arch == "llama" else BitNetConfig)(**fields)
    _set_rope_theta(config, theta)
    return config


def model_class(config):
    from transformers import BitNetForCausalLM, LlamaForCausalLM

    return BitNetForCausalLM if config.model_type == "bitnet" else LlamaForCausalLM


def build_model(config, device: str, dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    """Random-weight model of ``config`` on ``device`` in ``dtype``, eval mode, no gradients.
    Parameters are allocated directly on the device and in ``dtype`` (the 8B model never
    exists in fp32)."""
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = model_class(config)(config)
    finally:
        torch.set_default_dtype(previous)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def count_linears(model: torch.nn.Module) -> tuple[int, int]:
    """``(converted, total)``: bitfx ternary linears, and all linear layers (the head included)."""
    from bitfx.modules import BitfxLinear

    converted = sum(isinstance(m, BitfxLinear) for m in model.modules())
    dense = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    return converted, converted + dense


def bytes_per_token(model: torch.nn.Module, packed: tuple = ()) -> int:
    """Bytes of weights one decode step reads (see the module docstring, item 3).

    Works on a dense model (every linear dense; ``packed``: names of the ``nn.Linear`` layers
    the backend reads packed, as it packs them once) and on one converted by
    ``bitfx.quantize`` (its ``BitfxLinear`` layers read their packed codes and fp32 scales)."""
    from bitfx.kernels.layout import packed_k
    from bitfx.modules import BitfxLinear

    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    total = 0
    counted: set[int] = set()
    for name in packed:
        m = model.get_submodule(name)
        N, K = m.weight.shape
        total += N * packed_k(K) + 4 * N
        counted.add(id(m.weight))
    for m in model.modules():
        if isinstance(m, BitfxLinear):
            rows, row_bytes = m.packed.shape  # rows = N (times terms), row_bytes = Kq
            total += rows * row_bytes + 4 * rows
            if m.bias is not None:
                total += m.bias.numel() * m.bias.element_size()
            counted.update(id(b) for b in m.buffers(recurse=False))
    for p in model.parameters():  # each tensor once: a tied weight is one parameter
        if id(p) in counted or p is emb:
            continue
        total += p.numel() * p.element_size()
    total += emb.shape[1] * emb.element_size()  # the embedding: one row per token
    if head is not None and head.weight is emb:  # tied: the head reads the whole matrix
        total += emb.numel() * emb.element_size()
    return total


# ------------------------------------------------------------------ decode step


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


def _sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def time_decode(dec: Decode, fn: Callable, *, cuda: bool, graphs: bool, reps: int, warmup: int = 3) -> dict:
    """Median ms per decode call (CUDA events; wall clock on CPU) and median host wall us per
    call up to a synchronize; the logits of the last call (a float CPU copy), the seconds the
    first call took (the compile), the graphs Dynamo compiled for it, and whether anything
    compiled during the timed calls (it should not)."""
    count0, skips0 = _compile_count(), _counter("inductor", "cudagraph_skips")
    t0 = time.perf_counter()
    for i in range(max(warmup, 1)):
        dec.prepare(graphs)
        dec.run(fn)
        _sync(cuda)
        if i == 0:
            first_s = time.perf_counter() - t0
    graphs_compiled = _compile_count() - count0
    count1 = _compile_count()
    dev_ms, wall_us = [], []
    logits = None
    for _ in range(reps):
        dec.prepare(graphs)
        _sync(cuda)
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        w0 = time.perf_counter()
        logits = dec.run(fn)
        if cuda:
            end.record()
        _sync(cuda)
        w1 = time.perf_counter()
        dev_ms.append(start.elapsed_time(end) if cuda else (w1 - w0) * 1e3)
        wall_us.append((w1 - w0) * 1e6)
    # Back to back: ``reps`` steps between two events with no synchronize in between, as a
    # decode loop runs; the host prepares step i+1 while the GPU runs step i, so this is the
    # step time the GPU sets whenever the host keeps ahead of it.
    piped_ms = None
    if cuda:
        _sync(cuda)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            dec.prepare(graphs)
            logits = dec.run(fn)
        end.record()
        _sync(cuda)
        piped_ms = start.elapsed_time(end) / reps
    return {
        "ms": piped_ms if piped_ms is not None else statistics.median(dev_ms),
        "synced_ms": statistics.median(dev_ms),
        "host_us": statistics.median(wall_us),
        "logits": logits[0, -1].float().cpu().clone(),
        "first_call_s": first_s,
        "graphs_compiled": graphs_compiled,  # more than 1: graph breaks
        "recompiled_while_timed": _compile_count() != count1,  # then the times include compiling
        "cudagraph_skips": _counter("inductor", "cudagraph_skips") - skips0,  # graphs Inductor ran without CUDA graphs
    }


def _is_kernel_event(e) -> bool:
    """A profiler event that ran on the GPU, not a user annotation (``record_function`` ranges,
    which Inductor's compiled graphs open, also appear on the GPU timeline and span kernels)."""
    if str(getattr(e, "device_type", "")).rsplit(".", 1)[-1] != "CUDA":
        return False
    if getattr(e, "is_user_annotation", False) or "annotation" in str(getattr(e, "activity_type", "")).lower():
        return False
    return True


def profile_decode(dec: Decode, fn: Callable, cuda: bool = True) -> dict:
    """One (already warm) default-mode decode step under ``torch.profiler``: CUDA kernels
    (memcpy/memset apart) and the sum of their durations. On CPU (a check of this code path)
    there are no kernels; the number of CPU op events is returned for information."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    dec.prepare(False)
    _sync(cuda)
    with profile(activities=activities) as prof:
        dec.run(fn)
        _sync(cuda)
    events = prof.events()
    kernels, memops, gpu_us = 0, 0, 0.0
    for e in events:
        if not _is_kernel_event(e):
            continue
        name = e.name.lower()
        if "memcpy" in name or "memset" in name:
            memops += 1
            continue
        kernels += 1
        gpu_us += e.time_range.end - e.time_range.start  # microseconds
    return {"kernels": kernels, "memops": memops, "gpu_us": gpu_us, "events": len(events)}


# ------------------------------------------------------------------ generate


def _counter(group: str, key: str) -> int:
    """One of torch's compile counters (0 where this torch has no such counter)."""
    try:
        from torch._dynamo.utils import counters

        return int(counters[group][key])
    except Exception:  # noqa: BLE001  (a torch without the counter: no information)
        return 0


def _compile_count() -> int:
    """Graphs Dynamo has compiled so far in this process (to see whether a call compiled)."""
    return _counter("stats", "unique_graphs")


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
    before, skips = _compile_count(), _counter("inductor", "cudagraph_skips")
    t0 = time.perf_counter()
    model.generate(prompt, **kw)
    _sync(cuda)
    first_s = time.perf_counter() - t0
    compiled = _compile_count() - before
    skips = _counter("inductor", "cudagraph_skips") - skips
    out: dict[str, Any] = {"first_call_s": first_s, "graphs_compiled": compiled}
    if compiled == 0:
        out["note"] = "generate compiled no graph on its first call (was the automatic compile triggered?)"
    elif cuda and skips:
        out["note"] = f"Inductor skipped CUDA graphs for {skips} of generate's graph(s)"
    for attempt in range(3):
        before = _compile_count()
        _sync(cuda)
        t0 = time.perf_counter()
        ids = model.generate(prompt, **kw)
        _sync(cuda)
        seconds = time.perf_counter() - t0
        if _compile_count() == before:
            break
        out["note"] = (out.get("note", "") + f"; timed call {attempt + 1} compiled again, timed another").lstrip("; ")
    new = ids.shape[1] - prompt.shape[1]
    out.update(tok_s=new / seconds, new_tokens=new, seconds=seconds)
    return out


def _forget_generate_state(model: torch.nn.Module) -> None:
    """Drop what generate keeps on the model between calls (its compiled forward and cache)."""
    for attr in ("_compiled_call", "_last_compile_config", "_cache"):
        if attr in model.__dict__:
            try:
                delattr(model, attr)
            except AttributeError:
                pass


# ------------------------------------------------------------------ one model


def _free(cuda: bool) -> None:
    gc.collect()
    torch._dynamo.reset()
    if cuda:
        torch.cuda.empty_cache()


def _compile(model: torch.nn.Module, method: str, mode: Optional[str]):
    if method == BASELINE:
        return torch.compile(model, mode=mode)
    return torch.compile(model, backend="bitfx", mode=mode)


def _error(row: dict, stage: str, exc: BaseException) -> None:
    msg = f"{type(exc).__name__}: {exc}"
    row["errors"][stage] = msg[:1000]
    print(f"  ERROR {row['model']} {row['method']} {stage}: {msg[:300]}", flush=True)
    print("  " + "".join(traceback.format_exception(exc)[-3:]).replace("\n", "\n  "), flush=True)


def _say(row: dict, what: str) -> None:
    print(f"{row['model']:>18} {row['method']:>14}  {what}", flush=True)


def _check_timing(row: dict, stage: str, r: dict) -> None:
    """Note what makes a decode time suspect: a compile during the timed calls, graph breaks,
    CUDA graphs that Inductor declined to use."""
    new = []
    if r["recompiled_while_timed"]:
        new.append(f"{stage}: Dynamo compiled during the timed calls (the median may include compiling)")
    if r["graphs_compiled"] > 1:
        new.append(f"{stage}: {r['graphs_compiled']} graphs (graph breaks)")
    if stage == "decode_graphs" and r["cudagraph_skips"]:
        new.append(f"{stage}: Inductor skipped CUDA graphs for {r['cudagraph_skips']} graph(s) "
                   f"(TORCH_LOGS=perf_hints says why); this time is not a CUDA-graph time")
    row.setdefault("notes", []).extend(new)
    for n in new:
        _say(row, "NOTE: " + n)


def _in_time(args, row: dict, stage: str) -> bool:
    """Whether a stage may start: past ``--time-limit`` seconds of the run, stages are skipped
    (and noted) so that the run ends with its results written instead of being cut off."""
    limit = getattr(args, "time_limit", 0)
    if not limit or time.time() - args.t_start < limit:
        return True
    row.setdefault("notes", []).append(f"{stage}: skipped, past --time-limit {limit:.0f} s")
    _say(row, f"NOTE: {stage} skipped (past --time-limit {limit:.0f} s)")
    return False


def measure_method(model: torch.nn.Module, method: str, args, cuda: bool, dtype: torch.dtype,
                   label: str, converted: Optional[int] = None,
                   generate: bool = True) -> tuple[dict, Optional[torch.Tensor]]:
    """Every measurement of one (model, method), the model already in the method's form:
    the table row, and the decode logits (float, CPU) for the comparison with bf16.
    ``converted``: the names of the linears the backend converts, for a dense model compiled
    with it (``bitfx``: it reads them packed)."""
    row: dict[str, Any] = {"model": label, "method": method, "errors": {}}
    conv, total = count_linears(model)
    conv = conv if converted is None else len(converted)
    row.update(linears_converted=conv, linears_total=total)
    nbytes = bytes_per_token(model, converted or ())
    floor_ms = nbytes / BANDWIDTH * 1e3
    row.update(bytes_per_token=nbytes, floor_ms=floor_ms)
    _say(row, f"linears converted {conv}/{total}; {nbytes / 1e6:.1f} MB read/token; floor {floor_ms:.3f} ms")
    logits = None

    dec = None
    try:
        dec = Decode(model, args.device, dtype)
    except Exception as e:  # noqa: BLE001  (recorded; the other stages still run)
        _error(row, "prefill", e)

    if dec is not None and cuda and not args.no_graphs and _in_time(args, row, "decode_graphs"):
        try:
            _free(cuda)
            fn = _compile(model, method, "reduce-overhead")
            r = time_decode(dec, fn, cuda=True, graphs=True, reps=args.reps)
            row.update(decode_ms_graphs=r["ms"], decode_ms_graphs_synced=r["synced_ms"],
                       compile_s_graphs=r["first_call_s"], graphs_graphs=r["graphs_compiled"])
            logits = r["logits"]
            _say(row, f"decode (CUDA graphs) {r['ms']:.3f} ms back to back, {r['synced_ms']:.3f} ms synced  [first call {r['first_call_s']:.1f} s, "
                      f"{r['graphs_compiled']} graph(s)]")
            _check_timing(row, "decode_graphs", r)
        except Exception as e:  # noqa: BLE001
            _error(row, "decode_graphs", e)
        fn = None
        _free(cuda)

    if dec is not None and not args.no_default_mode and _in_time(args, row, "decode_default"):
        try:
            _free(cuda)
            fn = _compile(model, method, None)
            r = time_decode(dec, fn, cuda=cuda, graphs=False, reps=args.reps_default)
            row.update(decode_ms_default=r["ms"], decode_ms_default_synced=r["synced_ms"], host_us_per_step=r["host_us"], compile_s_default=r["first_call_s"],
                       graphs_default=r["graphs_compiled"])
            if logits is None:
                logits = r["logits"]
            _say(row, f"decode (default mode) {r['ms']:.3f} ms; host {r['host_us']:.0f} us/step  "
                      f"[first call {r['first_call_s']:.1f} s, {r['graphs_compiled']} graph(s)]")
            _check_timing(row, "decode_default", r)
        except Exception as e:  # noqa: BLE001
            _error(row, "decode_default", e)
            fn = None
        if fn is not None:
            try:
                p = profile_decode(dec, fn, cuda)
                if not cuda:
                    _say(row, f"profiled one step on CPU: {p['events']} profiler events (no kernel counts on CPU)")
                else:
                    row.update(kernels_per_step=p["kernels"], memops_per_step=p["memops"], gpu_us_per_step=p["gpu_us"])
                    if p["kernels"]:
                        row["host_us_per_op"] = row["host_us_per_step"] / p["kernels"]
                    _say(row, f"{p['kernels']} kernels/step (+{p['memops']} memcpy/memset), GPU {p['gpu_us']:.0f} "
                              f"us/step, host {row.get('host_us_per_op', float('nan')):.2f} us/op")
            except Exception as e:  # noqa: BLE001
                _error(row, "profile", e)
        fn = None
        _free(cuda)

    measured = row.get("decode_ms_graphs") or row.get("decode_ms_default")
    if measured:
        row["share_of_floor"] = floor_ms / measured
    if logits is not None:
        row["logits_finite"] = bool(torch.isfinite(logits).all())
        if not row["logits_finite"]:
            row["errors"]["logits"] = "non-finite logits"
        _say(row, f"logits finite: {row['logits_finite']}")

    prompt = dec.prompt if dec is not None else None
    dec = None
    _free(cuda)
    if prompt is not None and generate and not args.no_generate and _in_time(args, row, "generate"):
        try:
            backend = "inductor" if method == BASELINE else "bitfx"
            g = measure_generate(model, prompt, backend, cuda=cuda, new_tokens=args.new_tokens)
            row.update(generate_tok_s=g["tok_s"], generate_new_tokens=g["new_tokens"],
                       compile_s_generate=g["first_call_s"])
            if "note" in g:
                row.setdefault("notes", []).append("generate: " + g["note"])
            _say(row, f"generate {g['tok_s']:.1f} tok/s ({g['new_tokens']} tokens in {g['seconds']:.3f} s)  "
                      f"[first call {g['first_call_s']:.1f} s, {g['graphs_compiled']} graphs]"
                 + (f"  NOTE: {g['note']}" if "note" in g else ""))
        except Exception as e:  # noqa: BLE001
            _error(row, "generate", e)
        _forget_generate_state(model)
        _free(cuda)
    return row, logits


def measure_model(name: str, args, cuda: bool) -> list[dict]:
    """All methods on one model: the dense methods first, then ``bitfx.quantize`` and bitfx."""
    import bitfx

    dtype = torch.bfloat16
    label = f"{name}-tiny" if args.quick else name
    t0 = time.time()
    config = make_config(name, tiny=args.quick)
    model = build_model(config, args.device, dtype)
    rows, logits = [], {}
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (1, PROMPT_LEN), generator=g).to(args.device)  # to trace with
    with torch.no_grad():
        for method in [m for m in ALL_METHODS if m in args.methods]:
            converted = None
            if method == "bitfx":
                try:  # what the backend converts in this dense model (for the table and the bytes)
                    converted = bitfx.explain(model, ids, use_cache=False).converted
                except Exception as e:  # noqa: BLE001
                    print(f"  bitfx.explain failed ({type(e).__name__}: {e}); linears converted not counted", flush=True)
            if method == "bitfx-quantized":
                try:
                    q0 = time.time()
                    bitfx.quantize(model, ids, use_cache=False)
                    print(f"{label:>18} {'bitfx':>14}  bitfx.quantize: {len(model.bitfx_report.converted)} linears "
                          f"in {time.time() - q0:.1f} s", flush=True)
                except Exception as e:  # noqa: BLE001
                    row = {"model": label, "method": method, "errors": {}}
                    _error(row, "quantize", e)
                    rows.append(row)
                    continue
                _free(cuda)
            row, out = measure_method(model, method, args, cuda, dtype, label, converted,
                                      generate=name in getattr(args, "generate_models", MODELS))
            rows.append(row)
            logits[method] = out
    base = logits.get(BASELINE)
    for row in rows:
        got = logits.get(row["method"])
        if row["method"] != BASELINE and base is not None and got is not None:
            row["logits_rel_diff_vs_bf16"] = float((got - base).norm() / base.norm().clamp_min(1e-30))
            _say(row, f"logits relative difference vs bf16 (information only): {row['logits_rel_diff_vs_bf16']:.3f}")
    elapsed = time.time() - t0
    for row in rows:
        row["model_elapsed_s"] = elapsed
    print(f"{label}: done in {elapsed:.1f} s", flush=True)
    del model
    _free(cuda)
    return rows


# ------------------------------------------------------------------ table


def _num(x, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def _ratio(num, den) -> str:
    """``num / den`` as ``1.85x``; a dash when either is missing."""
    if not num or not den:
        return "—"
    return f"{num / den:.2f}x"


def render_sites(results: dict) -> str:
    """The site table of the run (as :func:`bitfx.bench.report` renders it), or ''."""
    if not results.get("sites"):
        return ""
    from bitfx import bench

    return bench.site_table(results["sites"])


def render(results: dict) -> str:
    """The Markdown table of ``results`` (the dict written to ``results.json``). The "vs bf16"
    columns compare each row to the same model's ``bf16-inductor`` row: decode columns as
    speed-up (bf16 ms / ms), generate as throughput ratio (tok/s / bf16 tok/s)."""
    head = ["model", "method", "linears converted", "decode ms (CUDA graphs)", "vs bf16", "synced ms", "vs bf16",
            "decode ms (default mode)", "vs bf16", "kernels/step", "GPU µs/step", "host µs/op", "MB read/token", "floor ms", "share of floor",
            "generate tok/s", "vs bf16"]
    lines = []
    if results.get("header"):
        lines += [results["header"], ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    rows = results.get("rows", [])
    base = {r["model"]: r for r in rows if r.get("method") == BASELINE}
    for r in rows:
        b = base.get(r["model"], {})
        g = r.get("decode_ms_graphs")
        d = r.get("decode_ms_default")
        t = r.get("generate_tok_s")
        conv = r.get("linears_converted")
        share = r.get("share_of_floor")
        nbytes = r.get("bytes_per_token")
        cells = [
            r["model"], r["method"],
            "—" if conv is None else f"{conv}/{r.get('linears_total')}",
            _num(g, ".3f"), _ratio(b.get("decode_ms_graphs"), g),
            _num(r.get("decode_ms_graphs_synced"), ".3f"),
            _ratio(b.get("decode_ms_graphs_synced"), r.get("decode_ms_graphs_synced")),
            _num(d, ".3f"), _ratio(b.get("decode_ms_default"), d),
            _num(r.get("kernels_per_step"), "d"), _num(r.get("gpu_us_per_step"), ".0f"),
            _num(r.get("host_us_per_op"), ".2f"),
            "—" if nbytes is None else f"{nbytes / 1e6:.1f}", _num(r.get("floor_ms"), ".3f"),
            "—" if share is None else f"{100 * share:.0f}%",
            _num(t, ".1f"), _ratio(t, b.get("generate_tok_s")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Decode: one token at position {PROMPT_LEN} of a static cache (the cache rewound before each step); ms per "
        "step over consecutive steps with no synchronize between them (CUDA events around all of them: the "
        "host prepares the next step while the GPU runs one, as in a decode loop); synced ms: the median of "
        "single steps each started after a synchronize (host time before the first kernel included). Kernels and GPU µs: one default-mode step under torch.profiler (memcpy/memset not "
        "counted). Host µs/op: default-mode wall time per step / kernels per step. MB read/token: weights only "
        f"(packed 2-bit + fp32 row scales for converted linears). Floor: MB / {BANDWIDTH / 1e12:.1f} TB/s; share of "
        "floor against the CUDA-graph decode time (default mode where absent). generate: greedy, static cache, "
        f"compiled by generate with mode={results.get('settings', {}).get('generate_mode', 'reduce-overhead')}, "
        "whole call timed (prefill included).",
    ]
    errors = [(r["model"], r["method"], k, v) for r in rows for k, v in r.get("errors", {}).items()]
    if errors:
        lines += ["", "Errors:"] + [f"- {m} {meth} {stage}: {msg}" for m, meth, stage, msg in errors]
    notes = [(r["model"], r["method"], n) for r in rows for n in r.get("notes", [])]
    if notes:
        lines += ["", "Notes:"] + [f"- {m} {meth} {n}" for m, meth, n in notes]
    return "\n".join(lines)


# ------------------------------------------------------------------ main


def _versions() -> dict:
    import transformers

    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = None
    return {"torch": torch.__version__, "triton": tv, "transformers": transformers.__version__,
            "python": sys.version.split()[0]}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("models_pos", nargs="?", default=None, help=argparse.SUPPRESS)  # `bench --models LIST`
    p.add_argument("--models", default=None, help=f"comma-separated, from {','.join(MODELS)} (default: all)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {','.join(ALL_METHODS)}")
    p.add_argument("--quick", action="store_true", help="tiny configs and few repetitions (a smoke run)")
    p.add_argument("--no-generate", action="store_true", help="skip generate() tokens/s")
    p.add_argument("--generate-models", default="llama-1b,llama-8b",
                   help="the models whose generate() tokens/s is measured ('all': every one; default "
                        "llama-1b,llama-8b, so that a default run of every model fits in 10 minutes)")
    p.add_argument("--no-default-mode", action="store_true",
                   help="skip the default-mode (no CUDA graphs) decode, and so the kernel counts")
    p.add_argument("--no-graphs", action="store_true", help="skip the CUDA-graph (reduce-overhead) decode")
    p.add_argument("--reps", type=int, default=None, help="timed decode calls under CUDA graphs (default 30; quick 5)")
    p.add_argument("--reps-default", type=int, default=None, help="timed default-mode decode calls (default 20; quick 3)")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens per generate() call (default 128; quick 8)")
    p.add_argument("--out", default=os.path.join("bench_out", "models"))
    p.add_argument("--time-limit", type=float, default=540.0,
                   help="seconds into the run after which no new stage starts (0: none; default 540)")
    p.add_argument("--no-sites", action="store_true",
                   help="leave out the site table (norm + ternary matmul per shape, as python -m bitfx.bench)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.t_start = time.time()
    names = args.models or args.models_pos or ",".join(MODELS)
    args.models = [n.strip() for n in names.split(",") if n.strip()]
    for n in args.models:
        if n not in MODELS:
            p.error(f"unknown model {n!r}; choose from {', '.join(MODELS)}")
    args.generate_models = (list(MODELS) if args.generate_models == "all" else
                            [n.strip() for n in args.generate_models.split(",") if n.strip()])
    for n in args.generate_models:
        if n not in MODELS:
            p.error(f"unknown model {n!r} in --generate-models; choose from {', '.join(MODELS)} or 'all'")
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in args.methods:
        if m not in ALL_METHODS:
            p.error(f"unknown method {m!r}; choose from {', '.join(ALL_METHODS)}")
    if args.device == "cpu":
        args.quick = True  # the full-size models are not for a CPU
        args.no_graphs = True  # CUDA graphs need CUDA
    args.reps = args.reps or (5 if args.quick else 30)
    args.reps_default = args.reps_default or (3 if args.quick else 20)
    args.new_tokens = args.new_tokens or (8 if args.quick else 128)
    return args


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        sys.exit("bitfx.bench_models needs a CUDA GPU (or --device cpu for a tiny smoke run)")
    import bitfx  # registers the bitfx ops

    os.makedirs(args.out, exist_ok=True)
    versions = {**_versions(), "bitfx": bitfx.__version__}
    device_name = torch.cuda.get_device_name() if cuda else "cpu"
    command = "python -m bitfx.bench_models" + ("" if not argv else " " + " ".join(argv))
    header = (f"device: {device_name}; torch {versions['torch']}; triton {versions['triton']}; "
              f"transformers {versions['transformers']}; command: {command}")
    print(header, flush=True)
    results: dict[str, Any] = {
        "header": header, "device": device_name, "versions": versions, "command": command,
        "settings": {"prompt_len": PROMPT_LEN, "cache_len": CACHE_LEN, "reps_graphs": args.reps,
                     "reps_default": args.reps_default, "new_tokens": args.new_tokens, "bandwidth": BANDWIDTH,
                     "quick": args.quick, "methods": args.methods,
                     "generate_mode": "reduce-overhead" if cuda else "default"},
        "configs": {}, "rows": [],
    }
    t0 = time.time()
    for name in args.models:
        if args.time_limit and time.time() - args.t_start >= args.time_limit:
            print(f"{name}: skipped, past --time-limit {args.time_limit:.0f} s", flush=True)
            results["rows"].append({"model": name, "method": "-", "errors": {},
                                    "notes": [f"skipped, past --time-limit {args.time_limit:.0f} s"]})
            continue
        config = make_config(name, tiny=args.quick)
        results["configs"][name] = {k: v for k, v in config.to_dict().items() if isinstance(v, (int, float, str, bool))}
        try:
            results["rows"] += measure_model(name, args, cuda)
        except Exception as e:  # noqa: BLE001  (a model that cannot even be built: record, go on)
            row = {"model": name, "method": "-", "errors": {}}
            _error(row, "model", e)
            results["rows"].append(row)
            _free(cuda)
        with open(os.path.join(args.out, "results.json"), "w") as f:  # after every model: a partial run keeps its rows
            json.dump(results, f, indent=1)
    if cuda and not args.no_sites:  # the site table of the same run (python -m bitfx.bench's first table)
        from bitfx import bench

        results["sites"] = []
        shapes = [(M, K, N) for K, N in bench.SHAPES for M in (1, 16)] + [(4096, 8192, 8192), (4096, 4096, 14336)]
        for M, K, N in (shapes[:2] if args.quick else shapes):
            r = bench.measure_site(M, K, N)
            results["sites"].append(r)
            print(r, flush=True)
    results["elapsed_s"] = time.time() - t0
    table = render(results)
    sites = render_sites(results)
    if sites:
        table += "\n\nSite table (RMSNorm + linear of shape [N, K] on M tokens, CUDA graphs, cold L2; as python -m bitfx.bench):\n\n" + sites
    print("\n" + table, flush=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table + "\n")
    print(f"\nwrote {args.out}/results.json and {args.out}/table.md in {results['elapsed_s']:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
