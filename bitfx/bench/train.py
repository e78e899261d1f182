"""Whole-model quantization-aware training benchmark: ``python -m bitfx.bench train``.

A transformers Llama with random initialization and bf16 parameters takes training steps
(``loss = model(ids, labels=ids).loss``, ``loss.backward()``, fused AdamW ``step()``,
``zero_grad``), compiled two ways in the same run:

* ``bf16-inductor``: ``torch.compile(model)``;
* ``bitfx``: ``torch.compile(model, backend="bitfx")``: every linear but the head ternary,
  trained with the straight-through estimator (``BitfxConfig(linears=...)`` via ``--linears``);
* ``bitfx-fp8``: the same with the FP8 backward (``BitfxConfig(backward="fp8")``).

A bitfx method may name who launches its kernels, ``bitfx@inductor`` or ``bitfx-fp8@op``
(``BitfxConfig.launch``; ``--launch`` for the methods that do not), so that both launches are
measured against the same run's bf16.

Shapes (:mod:`bitfx.bench.model_shapes`): ``llama-1b`` (hidden 2048, 16 layers, 4 x 2048
tokens a step) and ``llama-350m`` (hidden 1024, 12 layers, tied embeddings, 8 x 2048 tokens);
``--quick`` uses their tiny twins. Measured per (model, method): the median step time over
``--steps`` steps after 3 warm-up steps (the first compiles), with CUDA events around each step
(:func:`bitfx.bench.timing.timed`; the wall clock on the CPU); tokens/s; the peak memory
allocated during the timed steps; the loss of the first and last step (information: the two
methods train different models); the host's milliseconds in the forward call, the backward and
the optimizer, each step begun on an idle GPU (:func:`host_ms`: where they add up to near the
step time, the host sets the pace); with ``--host-profile TOP``, the Python functions that
host time goes to (:func:`host_profile`).

Sharded: launched with ``torchrun --nproc-per-node N -m bitfx.bench train --fsdp``, each
decoder layer and then the root are wrapped with torch's FSDP2 ``fully_shard`` before compiling;
the batch is per GPU, so 1 and 2 processes at the same ``--batch`` measure scaling at a fixed
per-GPU batch. Rank 0 prints and writes.

Prints one line per measurement, then a Markdown table; writes ``results.json`` and
``table.md`` to ``--out`` (default ``bench_out/train``). ``--device cpu`` (for checking the
script without a GPU) runs the tiny shapes in fp32 for two steps.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any, Optional

import torch

from bitfx.bench import report
from bitfx.bench.model_shapes import make_config
from bitfx.bench.profiling import compile_phases, host_profile, profile, top_kernels
from bitfx.bench.timing import sync, timed
from bitfx.config import LAUNCH_MODES, BitfxConfig

BATCH = {"llama-1b": (4, 2048), "llama-350m": (8, 2048)}  # (sequences per step, tokens per sequence)
TINY_BATCH = (2, 32)
METHODS = ("bf16-inductor", "bitfx", "bitfx-fp8")


def batch_of(name: str, quick: bool, batch: Optional[int]) -> tuple[int, int]:
    b, s = TINY_BATCH if quick else BATCH[name]
    return batch or b, s


def method_parts(method: str, launch: str = "auto") -> tuple[str, Optional[str]]:
    """``(method, launch)`` of a ``--methods`` entry (``bitfx@inductor``: the bitfx method with
    that ``BitfxConfig.launch``; a bitfx method without one: ``launch``; bf16: ``None``).
    ValueError for a method or launch mode not known."""
    base, at, own = method.partition("@")
    if base not in METHODS:
        raise ValueError(f"unknown method {method!r}: one of {', '.join(METHODS)}, a bitfx one optionally "
                         f"with @launch ({', '.join(LAUNCH_MODES)})")
    if base == "bf16-inductor":
        if at:
            raise ValueError(f"method {method!r}: only the bitfx methods take a launch mode")
        return base, None
    if at and own not in LAUNCH_MODES:
        raise ValueError(f"method {method!r}: launch mode {own!r} is not one of {', '.join(LAUNCH_MODES)}")
    return base, own if at else launch


def _compile(model: torch.nn.Module, method: str, linears: str, launch: str = "auto"):
    base, launch = method_parts(method, launch)
    if base in ("bitfx", "bitfx-fp8"):
        backward = "fp8" if base == "bitfx-fp8" else "exact"
        return torch.compile(model, backend="bitfx", options={"linears": linears, "backward": backward,
                                                               "launch": launch})
    return torch.compile(model)


def measure(name: str, method: str, args, device: str, dtype: torch.dtype, rank: int = 0,
            world: int = 1) -> dict:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    config = make_config(name, tiny=args.quick)
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype).train()
    if args.fsdp:
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    cuda = device.startswith("cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
    compiled = _compile(model, method, args.linears, getattr(args, "launch", BitfxConfig().launch))
    batch, seq = batch_of(name, args.quick, args.batch)
    g = torch.Generator().manual_seed(1 + rank)
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=g).to(device)

    marks = [0.0, 0.0, 0.0, 0.0]

    def step() -> float:
        marks[0] = time.perf_counter()
        loss = compiled(input_ids=ids, labels=ids).loss
        marks[1] = time.perf_counter()
        loss.backward()
        marks[2] = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        marks[3] = time.perf_counter()
        return loss.detach()

    t0 = time.perf_counter()
    with compile_phases() as phases:
        first = step()
        sync(cuda)
    compile_s = time.perf_counter() - t0
    for _ in range(2):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, last = [], first
    for _ in range(args.steps):
        last, ms, _ = timed(step, cuda=cuda)
        times.append(ms)
    ms = statistics.median(times)
    host = host_ms(step, marks, cuda, args.steps)
    top = profile_step(step, cuda, args.profile) if args.profile else None
    host_top = host_profile(step, cuda, args.steps, args.host_profile) if args.host_profile else None
    row: dict[str, Any] = {
        "model": name + ("-tiny" if args.quick else ""), "method": method, "world": world,
        "tokens_per_step": batch * seq * world, "step_ms": ms, "tokens_per_s": batch * seq * world / ms * 1e3,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "first_loss": float(first), "last_loss": float(last), "compile_s": compile_s, "host_ms": host,
        "compile_phases": {k: round(v, 3) for k, v in phases.seconds.items()},
    }
    if top is not None:
        row["profile"] = top
    if host_top is not None:
        row["host_profile"] = host_top
    compiled = model = opt = None  # free them before the next method
    torch._dynamo.reset()
    if cuda:
        torch.cuda.empty_cache()
    return row


def host_ms(step, marks: list, cuda: bool, steps: int) -> dict:
    """The host's milliseconds in each phase of a step (``forward``: the compiled call up to the
    loss; ``backward``; ``optimizer``: AdamW's step and ``zero_grad``; ``all``), medians over
    ``steps`` steps, each started on an idle GPU (a synchronize before it, none inside it): the
    time until each call returns, which is what the GPU waits on where the host is the slower.
    Where the GPU is the slower the launch queue fills and a call waits on it, so at large shapes
    these are upper bounds of the host's own work."""
    phases: dict = {"forward": [], "backward": [], "optimizer": [], "all": []}
    for _ in range(max(steps, 1)):
        sync(cuda)
        step()
        f, b, o, e = marks
        for name, dt in zip(phases, (b - f, o - b, e - o, e - f)):
            phases[name].append(dt * 1e3)
    sync(cuda)
    return {name: statistics.median(v) for name, v in phases.items()}


def render_host_profile(results: dict) -> str:
    """Each (model, method, GPUs) that has a host profile: its functions by own time per step."""
    out = []
    for r in results.get("rows", []):
        entries = r.get("host_profile")
        if not entries:
            continue
        out += [f"{r['model']} / {r['method']} / {r['world']} GPU(s):", "",
                "| function | calls / step | own ms / step | cumulative ms / step |", "|---|---|---|---|"]
        out += [f"| `{e['function']}` | {e['calls']:.0f} | {e['own_ms']:.2f} | {e['cumulative_ms']:.2f} |"
                for e in entries]
        out.append("")
    return "\n".join(out).rstrip()


def profile_step(step, cuda: bool, top: int) -> dict:
    """One more (warm) step under ``torch.profiler``: the number of GPU kernels, their summed
    time, and the ``top`` kernel names by total time (CPU ops on a CPU run, a check of the path)."""
    return top_kernels(profile(step, cuda), cuda, top)


def render_profile(results: dict) -> str:
    """The profile of each (model, method, GPUs) that has one: kernels and GPU time per step,
    then its top entries."""
    out = []
    for r in results.get("rows", []):
        p = r.get("profile")
        if not p:
            continue
        out += [f"{r['model']} / {r['method']} / {r['world']} GPU(s): {p['kernels']} kernels, "
                f"{p['us'] / 1e3:.1f} ms summed", "", "| kernel | calls | ms | share |", "|---|---|---|---|"]
        for e in p["top"]:
            out.append(f"| `{e['name']}` | {e['calls']} | {e['us'] / 1e3:.2f} | {e['us'] / max(p['us'], 1e-9):.1%} |")
        out += ["", "host (CPU) ops by self time:", "", "| op | calls | self ms |", "|---|---|---|"]
        for e in p.get("host_top", []):
            out.append(f"| `{e['name']}` | {e['calls']} | {e['us'] / 1e3:.2f} |")
        out.append("")
    return "\n".join(out)


def render(results: dict) -> str:
    """The Markdown table of a run (``results`` as written to results.json); ratios against the
    same model's ``bf16-inductor`` row of the same world size."""
    lines = [results.get("header", ""), ""] if results.get("header") else []
    lines += ["| model | method | GPUs | tokens/step | step ms | vs bf16 | tokens/s | peak GiB | vs bf16 | loss first → last |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    rows = results.get("rows", [])
    base = {(r["model"], r["world"]): r for r in rows if r["method"] == "bf16-inductor"}
    for r in rows:
        b = base.get((r["model"], r["world"]), {})
        speed = f"{b['step_ms'] / r['step_ms']:.2f}x" if b else "—"
        mem = (f"{r['peak_gib'] / b['peak_gib']:.2f}x" if b and r.get("peak_gib") and b.get("peak_gib") else "—")
        peak = "—" if r.get("peak_gib") is None else f"{r['peak_gib']:.1f}"
        lines.append(f"| {r['model']} | {r['method']} | {r['world']} | {r['tokens_per_step']} | {r['step_ms']:.1f} | "
                     f"{speed} | {r['tokens_per_s']:.0f} | {peak} | {mem} | "
                     f"{r['first_loss']:.3f} → {r['last_loss']:.3f} |")
    lines += ["", "step ms: median over the timed steps (speed-up = bf16 ms / ms); peak GiB: "
              "torch.cuda.max_memory_allocated during them (ratio = bitfx / bf16, lower is less memory).",
              "", render_compile(rows), "", render_host(rows)]
    return "\n".join(lines)


def render_host(rows: list) -> str:
    """The host's milliseconds per phase of a step (:func:`host_ms`) against the step's: where
    ``all`` comes near the step time, the step waits on the host, not the GPU."""
    lines = ["| model | method | GPUs | step ms | host ms: forward | backward | optimizer | all | host / step |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        h = r.get("host_ms")
        if not h:
            continue
        lines.append(f"| {r['model']} | {r['method']} | {r['world']} | {r['step_ms']:.1f} | {h['forward']:.1f} | "
                     f"{h['backward']:.1f} | {h['optimizer']:.1f} | {h['all']:.1f} | "
                     f"{h['all'] / r['step_ms']:.2f} |")
    return "\n".join(lines)


def render_compile(rows: list) -> str:
    """The first step's seconds per row: in all, against the same model's bf16 row, and where
    they went (:class:`bitfx.bench.profiling.compile_phases`; "rest": the step less the
    compiles and the tile measurements: the kernels' JIT compiles and the step itself)."""
    names = ("forward", "backward", "aot_trace", "codegen", "compile_file", "async_wait", "tuned_tile")
    lines = ["| model | method | GPUs | first step s | vs bf16 | " + " | ".join(names) + " | rest |",
             "|---|---|---|---|---|" + "---|" * (len(names) + 1)]
    base = {(r["model"], r["world"]): r for r in rows if r["method"] == "bf16-inductor"}
    for r in rows:
        if r.get("compile_s") is None:
            continue
        b = base.get((r["model"], r["world"]))
        ph = r.get("compile_phases", {})
        ratio = f"{r['compile_s'] / b['compile_s']:.2f}x" if b and b.get("compile_s") else "—"
        rest = r["compile_s"] - ph.get("compile", 0.0) - ph.get("tuned_tile", 0.0)
        cells = " | ".join("—" if n not in ph else f"{ph[n]:.1f}" for n in names)
        lines.append(f"| {r['model']} | {r['method']} | {r['world']} | {r['compile_s']:.1f} | {ratio} | {cells} | "
                     f"{rest:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = report.parser("train", __doc__)
    p.add_argument("--models", default="llama-350m,llama-1b")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--linears", default="all", help="BitfxConfig.linears for the bitfx method")
    p.add_argument("--launch", default=BitfxConfig().launch, choices=list(LAUNCH_MODES),
                   help="BitfxConfig.launch for the bitfx methods: who launches the training op's kernels "
                        f"(default {BitfxConfig().launch})")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=None, help="sequences per step (per GPU with --fsdp)")
    p.add_argument("--quick", action="store_true", help="tiny shapes")
    p.add_argument("--profile", type=int, default=0, metavar="TOP",
                   help="profile one more step per (model, method) and keep its TOP kernels")
    p.add_argument("--host-profile", type=int, default=0, metavar="TOP",
                   help="profile --steps more steps with cProfile and keep the TOP functions by own host time")
    p.add_argument("--fsdp", action="store_true", help="FSDP2 fully_shard per layer (launch with torchrun)")
    p.add_argument("--out", default=os.path.join("bench_out", "train"))
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    try:
        for method in methods:
            method_parts(method)
    except ValueError as e:
        p.error(str(e))
    rank, world = 0, 1
    if args.device == "cpu":
        args.quick, args.steps = True, min(args.steps, 2)
    report.need_cuda("train", args.device, smoke=True)
    if args.fsdp:
        import torch.distributed as dist

        dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        if args.device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    device = f"cuda:{torch.cuda.current_device()}" if args.device == "cuda" else "cpu"
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    import bitfx  # noqa: F401  (registers the backend's ops)

    header = report.header(f"{report.device_name(args.device == 'cuda')} x {world}",
                           {"torch": torch.__version__, "transformers": report.version("transformers")},
                           report.command("train", argv))
    results: dict[str, Any] = {"header": header, "rows": []}
    if rank == 0:
        print(header, flush=True)
    for name in [m for m in args.models.split(",") if m]:
        for method in methods:
            row = measure(name, method, args, device, dtype, rank, world)
            results["rows"].append(row)
            if rank == 0:
                print(row, flush=True)
    if rank == 0:
        table = render(results)
        prof = render_profile(results)
        if prof:
            table += "\n\nProfile of one step (GPU kernels by total time):\n\n" + prof
        host_prof = render_host_profile(results)
        if host_prof:
            table += "\n\nHost profile (cProfile, functions by own time per step):\n\n" + host_prof
        report.write_results(args.out, results, table)
        print("\n" + table, flush=True)
    if args.fsdp:
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
