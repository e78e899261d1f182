"""Whole-model decode benchmark: ``python -m bitfx.bench models [LIST]``.

For each model (transformers architectures built from configs, random bf16 weights, eval
mode, ``torch.no_grad()``) and each method, measured in the same run:

* ``bf16-inductor``: the dense model, ``torch.compile(model, mode=...)`` (Inductor);
* ``bitfx``: the dense model compiled with the backend as it is, ``torch.compile(model,
  backend="bitfx", mode=...)``: every linear but the head ternary, weights packed once when
  the graph is compiled (:mod:`bitfx.passes.prepack`), so a step reads 2-bit weights;
* ``bitfx-quantized`` (only with ``--methods``): the model converted once with
  ``bitfx.quantize(model, prompt)`` (the float weights released), then compiled with the backend.

Models (:mod:`bitfx.bench.model_shapes`): ``llama-1b`` (Llama-3.2-1B shape), ``llama-8b``
(Llama-3-8B shape), ``bitnet-2b4t`` (transformers' BitNet architecture at the BitNet b1.58 2B4T
shape), and a tiny config of each for ``--quick`` and CPU runs. Which linears bitfx converts is bitfx's own decision (the one
``bitfx.explain`` reports, made by ``bitfx.quantize``); the table counts the layers it
converted. The output head stays dense (``skip_output_head``).

What is measured, per model and method:

1. Decode step ms. A transformers ``StaticCache`` is prefilled eagerly with a 16-token prompt;
   then one single-token forward at a fixed position (the cache is rewound to it before every
   call, so every call is the same step and a CUDA graph replays) is compiled with
   ``mode="reduce-overhead"`` (CUDA graphs) and, separately, with the default mode (no CUDA
   graphs) (:mod:`bitfx.bench.decode`). Each call is timed with CUDA events after a synchronize,
   so the time includes the host's launch overhead; 3 warm-up calls, the median of ``--reps``
   calls; and ``--reps`` calls back to back between two events, as a decode loop runs. The logits must be
   finite; their relative difference from bf16 is reported as information only (the ternary
   model is a different model).
2. Kernels and GPU time per step: one default-mode step under ``torch.profiler`` (CPU + CUDA):
   the number of CUDA kernels (memcpy/memset counted apart) and the sum of their durations.
   Host time per step is the wall clock of the default-mode call up to a synchronize (median);
   host us per op is that time divided by the number of kernels. One replay of the CUDA graph
   is profiled too (printed and kept in ``results.json``): its kernels, the span from the first
   kernel's start to the last one's end, and the part of it no kernel ran (launch latencies and
   gaps between dependent kernels; :func:`bitfx.bench.profiling.timeline`).
3. Bytes read per token: every parameter once (a tied weight once), dense bytes for dense
   tensors; a converted linear reads its packed codes (``N * Kq`` bytes, ``Kq = ceil(K/4)``
   rounded up to 16) and 4 bytes of scale per output row; the input embedding reads one row
   (``hidden * 2`` bytes); the head reads its whole matrix (the embedding's when tied). The KV
   cache and activations are not counted. Floor time = bytes / the GPU's device-to-device copy
   bandwidth, measured at the start of the run (1 GiB copies); share of floor = floor time /
   decode time (CUDA graphs; default mode where CUDA graphs were not run). With ``--profile
   TOP``, the TOP kernels of each profiled step by GPU time are kept too.
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
import gc
import os
import sys
import time
import traceback
from typing import Any, Callable, Optional

import torch

from bitfx.bench import report
from bitfx.config import LAUNCH_MODES, BitfxConfig
from bitfx.bench.decode import (CACHE_LEN, PROMPT_LEN, Decode, forget_generate_state, measure_eager_generate,
                                measure_generate,
                                profile_decode, time_decode)
from bitfx.bench.model_shapes import build_model, make_config

BANDWIDTH = 3.0e12
"""Bytes/s of the floor time where it is not measured (a CPU run): the H100's device-to-device
copy bandwidth (BENCHMARKS.md). On a GPU the run measures its own (:func:`copy_bandwidth`)."""
BASELINE = "bf16-inductor"
METHODS = ("bf16-inductor", "bitfx")
ALL_METHODS = ("bf16-inductor", "bitfx", "bitfx-quantized")  # the order they run in: quantize comes last
MODELS = ("llama-1b", "llama-8b", "bitnet-2b4t")  # of bitfx.bench.model_shapes.MODELS



# ------------------------------------------------------------------ what a step reads


def count_linears(model: torch.nn.Module) -> tuple[int, int]:
    """``(converted, total)``: bitfx ternary linears, and all linear layers (the head included,
    dense or int8)."""
    from bitfx.modules import BitfxLinear, Int8Linear

    converted = sum(isinstance(m, BitfxLinear) for m in model.modules())
    others = sum(isinstance(m, (torch.nn.Linear, Int8Linear)) for m in model.modules())
    return converted, converted + others


def bytes_per_token(model: torch.nn.Module, packed: tuple = (), int8: tuple = ()) -> int:
    """Bytes of weights one decode step reads (see the module docstring, item 3).

    Works on a dense model (every linear dense; ``packed``: names of the ``nn.Linear`` layers
    the backend reads packed, as it packs them once; ``int8``: those it reads as an int8 head)
    and on one converted by ``bitfx.quantize`` (its ``BitfxLinear`` layers read their packed
    codes and fp32 scales, an ``Int8Linear`` head its int8 codes and scales)."""
    from bitfx.layout import packed_k
    from bitfx.modules import BitfxLinear, Int8Linear

    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    total = 0
    counted: set[int] = set()
    for names, row_bytes in ((packed, packed_k), (int8, lambda K: K)):
        for name in names:
            m = model.get_submodule(name)
            N, K = m.weight.shape
            total += N * row_bytes(K) + 4 * N
            counted.add(id(m.weight))
    for m in model.modules():
        if isinstance(m, (BitfxLinear, Int8Linear)):
            for name, b in m.named_buffers(recurse=False):  # codes, scales, bias (not the format tag)
                if name != "ternary_format":
                    total += b.numel() * b.element_size()
            counted.update(id(b) for b in m.buffers(recurse=False))
    for p in model.parameters():  # each tensor once: a tied weight is one parameter
        if id(p) in counted or p is emb:
            continue
        total += p.numel() * p.element_size()
    total += emb.shape[1] * emb.element_size()  # the embedding: one row per token
    head_weight = head._parameters.get("weight") if isinstance(head, torch.nn.Module) else None
    if head_weight is emb and id(emb) not in counted:  # tied and read dense: the head reads the whole matrix
        total += emb.numel() * emb.element_size()
    return total


# ------------------------------------------------------------------ one model


def _free(cuda: bool) -> None:
    gc.collect()
    torch._dynamo.reset()
    if cuda:
        torch.cuda.empty_cache()


def _compile(model: torch.nn.Module, method: str, mode: Optional[str], launch: str = "auto", head: str = "dense",
             extra: Optional[dict] = None):
    """``model`` compiled for ``method``: bf16 Inductor, or the bitfx backend with ``launch``,
    ``head`` and the ``extra`` options (``--option``: the backend's or Inductor's)."""
    if method == BASELINE:
        return torch.compile(model, mode=mode)
    defaults = BitfxConfig()
    options = {k: v for k, v in (("launch", launch), ("head", head)) if v != getattr(defaults, k)}
    options.update(extra or {})
    if not options:  # the defaults: nothing to pass but the mode
        return torch.compile(model, backend="bitfx", mode=mode)
    # torch.compile takes a mode or options, never both: the mode's Inductor settings join the options
    if mode is not None:
        from torch._inductor import list_mode_options

        options = {**list_mode_options(mode), **options}
    return torch.compile(model, backend="bitfx", options=options)


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


def _keep_top(row: dict, key: str, p: dict) -> None:
    """A profiled step's top kernels (``--profile``), kept in ``row[key]`` and printed."""
    if p.get("top"):
        row[key] = p["top"]
        for k in p["top"]:
            _say(row, f"  {k['us']:8.1f} us {k['calls']:4d}x  {k['name']}")


def _decode_stage(row: dict, stage: str, model: torch.nn.Module, method: str, dec: Decode, *, cuda: bool,
                  graphs: bool, reps: int, launch: str = "auto", head: str = "dense", extra: Optional[dict] = None) -> tuple[Optional[dict], Optional[Callable]]:
    """Compile ``model`` for ``method`` (``mode="reduce-overhead"`` with ``graphs``, else the
    default mode) and time its decode step: the timing and the compiled model, or ``(None,
    None)`` after an error (recorded in ``row`` under ``stage``)."""
    try:
        _free(cuda)
        fn = _compile(model, method, "reduce-overhead" if graphs else None, launch, head, extra)
        return time_decode(dec, fn, cuda=cuda, graphs=graphs, reps=reps), fn
    except Exception as e:  # noqa: BLE001  (recorded; the other stages still run)
        _error(row, stage, e)
        return None, None


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
    head = model.get_output_embeddings()
    int8 = tuple(n for n, m in model.named_modules() if m is head and isinstance(m, torch.nn.Linear)) \
        if converted is not None and getattr(args, "head", "dense") == "int8" else ()
    nbytes = bytes_per_token(model, converted or (), int8)
    floor_ms = nbytes / getattr(args, "bandwidth", BANDWIDTH) * 1e3
    row.update(bytes_per_token=nbytes, floor_ms=floor_ms)
    _say(row, f"linears converted {conv}/{total}; {nbytes / 1e6:.1f} MB read/token; floor {floor_ms:.3f} ms")
    logits = None

    dec = None
    try:
        dec = Decode(model, args.device, dtype)
    except Exception as e:  # noqa: BLE001  (recorded; the other stages still run)
        _error(row, "prefill", e)

    if dec is not None and cuda and not args.no_graphs and _in_time(args, row, "decode_graphs"):
        r, fn = _decode_stage(row, "decode_graphs", model, method, dec, cuda=True, graphs=True, reps=args.reps,
                              launch=args.launch, head=args.head, extra=args.option)
        if r is not None:
            row.update(decode_ms_graphs=r["ms"], decode_ms_graphs_synced=r["synced_ms"],
                       compile_s_graphs=r["first_call_s"], graphs_graphs=r["graphs_compiled"])
            logits = r["logits"]
            _say(row, f"decode (CUDA graphs) {r['ms']:.3f} ms back to back, {r['synced_ms']:.3f} ms synced  [first call {r['first_call_s']:.1f} s, "
                      f"{r['graphs_compiled']} graph(s)]")
            _check_timing(row, "decode_graphs", r)
        if fn is not None and cuda:
            try:  # one replay under the profiler: its kernels and how much of its span they fill
                p = profile_decode(dec, fn, cuda, top=getattr(args, "profile", 0), graphs=True)
                row.update(graph_kernels_per_step=p["kernels"], graph_gpu_us_per_step=p["gpu_us"],
                           graph_span_us=p["span_us"], graph_busy_us=p["busy_us"])
                share = p["idle_us"] / p["span_us"] if p["span_us"] else float("nan")
                _say(row, f"CUDA graph replay: {p['kernels']} kernels, span {p['span_us']:.0f} us, busy "
                          f"{p['busy_us']:.0f} us, idle {p['idle_us']:.0f} us ({share:.0%} of the span)")
                _keep_top(row, "graph_top_kernels", p)
            except Exception as e:  # noqa: BLE001
                _error(row, "profile_graphs", e)
        fn = None
        _free(cuda)

    if dec is not None and not args.no_default_mode and _in_time(args, row, "decode_default"):
        r, fn = _decode_stage(row, "decode_default", model, method, dec, cuda=cuda, graphs=False,
                              reps=args.reps_default, launch=args.launch, head=args.head, extra=args.option)
        if r is not None:
            row.update(decode_ms_default=r["ms"], decode_ms_default_synced=r["synced_ms"], host_us_per_step=r["host_us"], compile_s_default=r["first_call_s"],
                       graphs_default=r["graphs_compiled"])
            if logits is None:
                logits = r["logits"]
            _say(row, f"decode (default mode) {r['ms']:.3f} ms; host {r['host_us']:.0f} us/step  "
                      f"[first call {r['first_call_s']:.1f} s, {r['graphs_compiled']} graph(s)]")
            _check_timing(row, "decode_default", r)
        if fn is not None:
            try:
                p = profile_decode(dec, fn, cuda, top=getattr(args, "profile", 0))
                if not cuda:
                    _say(row, f"profiled one step on CPU: {p['events']} profiler events (no kernel counts on CPU)")
                else:
                    row.update(kernels_per_step=p["kernels"], memops_per_step=p["memops"], gpu_us_per_step=p["gpu_us"],
                               span_us_default=p["span_us"], busy_us_default=p["busy_us"])
                    if p["kernels"]:
                        row["host_us_per_op"] = row["host_us_per_step"] / p["kernels"]
                    _say(row, f"{p['kernels']} kernels/step (+{p['memops']} memcpy/memset), GPU {p['gpu_us']:.0f} "
                              f"us/step, host {row.get('host_us_per_op', float('nan')):.2f} us/op")
                    _keep_top(row, "top_kernels", p)
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
        forget_generate_state(model)
        _free(cuda)
    if (prompt is not None and generate and not args.no_generate and method != "bitfx"
            and _in_time(args, row, "generate_eager")):
        # Eager: the dense model, or the model bitfx.quantize converted (the backend alone
        # changes nothing without a compile).
        try:
            g = measure_eager_generate(model, prompt, cuda=cuda, new_tokens=args.new_tokens)
            row.update(eager_generate_tok_s=g["tok_s"])
            _say(row, f"eager generate {g['tok_s']:.1f} tok/s ({g['new_tokens']} tokens in {g['seconds']:.3f} s)")
        except Exception as e:  # noqa: BLE001
            _error(row, "generate_eager", e)
        forget_generate_state(model)
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
                    bitfx.quantize(model, ids, use_cache=False, config=bitfx.BitfxConfig(head=args.head))
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


def render_sites(results: dict) -> str:
    """The site table of the run (as :func:`bitfx.bench.sites.site_table` renders it), or ''."""
    if not results.get("sites"):
        return ""
    from bitfx.bench.sites import site_table

    return site_table(results["sites"])


def render(results: dict) -> str:
    """The Markdown table of ``results`` (the dict written to ``results.json``). The "vs bf16"
    columns compare each row to the same model's ``bf16-inductor`` row: decode columns as
    speed-up (bf16 ms / ms), generate as throughput ratio (tok/s / bf16 tok/s)."""
    head = ["model", "method", "linears converted", "decode ms (CUDA graphs)", "vs bf16", "synced ms", "vs bf16",
            "decode ms (default mode)", "vs bf16", "kernels/step", "GPU µs/step", "host µs/op", "MB read/token", "floor ms", "share of floor",
            "generate tok/s", "vs bf16", "eager generate tok/s", "vs bf16"]
    lines = []
    if results.get("header"):
        lines += [results["header"], ""]
    lines += report.md_head(head)
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
            report.fmt(g, ".3f"), report.times(b.get("decode_ms_graphs"), g),
            report.fmt(r.get("decode_ms_graphs_synced"), ".3f"),
            report.times(b.get("decode_ms_graphs_synced"), r.get("decode_ms_graphs_synced")),
            report.fmt(d, ".3f"), report.times(b.get("decode_ms_default"), d),
            report.fmt(r.get("kernels_per_step"), "d"), report.fmt(r.get("gpu_us_per_step"), ".0f"),
            report.fmt(r.get("host_us_per_op"), ".2f"),
            "—" if nbytes is None else f"{nbytes / 1e6:.1f}", report.fmt(r.get("floor_ms"), ".3f"),
            "—" if share is None else f"{100 * share:.0f}%",
            report.fmt(t, ".1f"), report.times(t, b.get("generate_tok_s")),
            report.fmt(r.get("eager_generate_tok_s"), ".1f"),
            report.times(r.get("eager_generate_tok_s"), b.get("eager_generate_tok_s")),
        ]
        lines.append(report.md_row(cells))
    lines += [
        "",
        f"Decode: one token at position {PROMPT_LEN} of a static cache (the cache rewound before each step); ms per "
        "step over consecutive steps with no synchronize between them (CUDA events around all of them: the "
        "host prepares the next step while the GPU runs one, as in a decode loop); synced ms: the median of "
        "single steps each started after a synchronize (host time before the first kernel included). Kernels and GPU µs: one default-mode step under torch.profiler (memcpy/memset not "
        "counted). Host µs/op: default-mode wall time per step / kernels per step. MB read/token: weights only "
        f"(packed 2-bit + fp32 row scales for converted linears). Floor: MB / "
        f"{results.get('settings', {}).get('bandwidth', BANDWIDTH) / 1e12:.2f} TB/s (the GPU's copy bandwidth, measured at the start of the run; on a CPU run the H100's); share of "
        "floor against the CUDA-graph decode time (default mode where absent). generate: greedy, static cache, "
        f"compiled by generate with mode={results.get('settings', {}).get('generate_mode', 'reduce-overhead')}, "
        "whole call timed (prefill included). Eager generate: greedy, the default cache, no compile (generate's "
        "automatic compile off): the dense bf16 model, or the model after bitfx.quantize.",
    ]
    errors = [(r["model"], r["method"], k, v) for r in rows for k, v in r.get("errors", {}).items()]
    if errors:
        lines += ["", "Errors:"] + [f"- {m} {meth} {stage}: {msg}" for m, meth, stage, msg in errors]
    notes = [(r["model"], r["method"], n) for r in rows for n in r.get("notes", [])]
    if notes:
        lines += ["", "Notes:"] + [f"- {m} {meth} {n}" for m, meth, n in notes]
    return "\n".join(lines)


# ------------------------------------------------------------------ main


def _option(p, text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` of ``--option``: the value as a bool, an int, a float, or the string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        p.error(f"--option takes KEY=VALUE, got {text!r}")
    low = value.lower()
    if low in ("true", "false"):
        return key, low == "true"
    for kind in (int, float):
        try:
            return key, kind(value)
        except ValueError:
            pass
    return key, value


def parse_args(argv):
    p = report.parser("models", __doc__)
    p.add_argument("models_pos", nargs="?", default=None, help=argparse.SUPPRESS)  # `models LIST`
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
                   help="leave out the site table (norm + ternary matmul per shape, as python -m bitfx.bench sites)")
    p.add_argument("--launch", default=BitfxConfig().launch, choices=list(LAUNCH_MODES),
                   help="who launches bitfx's kernels in the compiled decode steps (BitfxConfig.launch; "
                        f"default {BitfxConfig().launch})")
    p.add_argument("--head", default="dense", choices=["dense", "int8"],
                   help="BitfxConfig.head for the bitfx methods: the output head dense (default) or int8 per row")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="one more option of the bitfx methods' torch.compile (the backend's, or an Inductor "
                        "setting such as static_launch_user_defined_triton_kernels=true); repeatable")
    p.add_argument("--profile", type=int, default=0, metavar="TOP",
                   help="keep the TOP kernels (by GPU time) of each profiled step (the CUDA graph's replay, the default-mode step)")
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
    args.option = dict(_option(p, o) for o in args.option)
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
    cuda = report.need_cuda("models", args.device, smoke=True)
    import bitfx  # registers the bitfx ops

    versions = {**report.versions("triton", "transformers"), "bitfx": bitfx.__version__}
    device_name = report.device_name(cuda)
    command = report.command("models", argv)
    header = report.header(device_name, {k: versions[k] for k in ("torch", "triton", "transformers")}, command)
    print(header, flush=True)
    results: dict[str, Any] = {
        "header": header, "device": device_name, "versions": versions, "command": command,
        "settings": {"prompt_len": PROMPT_LEN, "cache_len": CACHE_LEN, "reps_graphs": args.reps,
                     "reps_default": args.reps_default, "new_tokens": args.new_tokens, "bandwidth": BANDWIDTH,
                     "quick": args.quick, "methods": args.methods,
                     "generate_mode": "reduce-overhead" if cuda else "default"},
        "configs": {}, "rows": [],
    }
    args.bandwidth = BANDWIDTH
    if cuda:
        from bitfx.bench.timing import copy_bandwidth

        args.bandwidth = copy_bandwidth()
        print(f"device-to-device copy bandwidth {args.bandwidth / 1e12:.2f} TB/s (the floor's)", flush=True)
    results["settings"]["bandwidth"] = args.bandwidth
    os.makedirs(args.out, exist_ok=True)
    json_path = os.path.join(args.out, "results.json")
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
        report.write_json(json_path, results)  # after every model: a partial run keeps its rows
    if cuda and not args.no_sites:  # the site table of the same run (python -m bitfx.bench sites' first table)
        from bitfx.bench.sites import TABLE_SITES, measure_site

        results["sites"] = []
        for M, K, N in (TABLE_SITES[:2] if args.quick else TABLE_SITES):
            r = measure_site(M, K, N)
            results["sites"].append(r)
            print(r, flush=True)
    results["elapsed_s"] = time.time() - t0
    table = render(results)
    sites = render_sites(results)
    if sites:
        table += ("\n\nSite table (RMSNorm + linear of shape [N, K] on M tokens, CUDA graphs, cold L2; as "
                  "python -m bitfx.bench sites):\n\n" + sites)
    print("\n" + table, flush=True)
    report.write_results(args.out, results, table)
    print(f"\nwrote {args.out}/results.json and {args.out}/table.md in {results['elapsed_s']:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
