"""Whole-model quantization-aware training benchmark: ``python -m bitfx.bench_train``.

A transformers Llama with random initialization and bf16 parameters takes training steps
(``loss = model(ids, labels=ids).loss``, ``loss.backward()``, fused AdamW ``step()``,
``zero_grad``), compiled two ways in the same run:

* ``bf16-inductor``: ``torch.compile(model)``;
* ``bitfx``: ``torch.compile(model, backend="bitfx")``: every linear but the head ternary,
  trained with the straight-through estimator (``BitfxConfig(linears=...)`` via ``--linears``);
* ``bitfx-fp8``: the same with the FP8 backward (``BitfxConfig(backward="fp8")``).

Shapes: ``llama-1b`` (hidden 2048, 16 layers, 4 x 2048 tokens a step) and ``llama-350m``
(hidden 1024, 12 layers, tied embeddings, 8 x 2048 tokens); ``--quick`` uses tiny ones.
Measured per (model, method): the median step time over ``--steps`` steps after 3 warm-up
steps (the first compiles), with CUDA events around each step; tokens/s; the peak memory
allocated during the timed steps; the loss of the first and last step (information: the two
methods train different models).

Sharded: launched with ``torchrun --nproc-per-node N python -m bitfx.bench_train --fsdp``, each
decoder layer and then the root are wrapped with torch's FSDP2 ``fully_shard`` before compiling;
the batch is per GPU, so 1 and 2 processes at the same ``--batch`` measure scaling at a fixed
per-GPU batch. Rank 0 prints and writes.

Prints one line per measurement, then a Markdown table; writes ``results.json`` and
``table.md`` to ``--out`` (default ``bench_out/train``). ``--device cpu`` (for checking the
script without a GPU) runs the tiny shapes in fp32 for two steps.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any, Optional

import torch

SHAPES = {
    # name: (hidden, intermediate, layers, heads, kv heads, tied, batch, seq)
    "llama-1b": (2048, 8192, 16, 32, 8, True, 4, 2048),
    "llama-350m": (1024, 4096, 12, 16, 4, True, 8, 2048),
}
TINY = (64, 128, 2, 4, 2, True, 2, 32)
VOCAB, TINY_VOCAB = 128256, 256
METHODS = ("bf16-inductor", "bitfx", "bitfx-fp8")


def make_config(name: str, quick: bool = False):
    from transformers import LlamaConfig

    hidden, inter, layers, heads, kv, tied, _, _ = TINY if quick else SHAPES[name]
    return LlamaConfig(vocab_size=TINY_VOCAB if quick else VOCAB, hidden_size=hidden, intermediate_size=inter,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                       tie_word_embeddings=tied, rms_norm_eps=1e-5, max_position_embeddings=4096)


def batch_of(name: str, quick: bool, batch: Optional[int]) -> tuple[int, int]:
    _, _, _, _, _, _, b, s = TINY if quick else SHAPES[name]
    return batch or b, s


def _compile(model: torch.nn.Module, method: str, linears: str):
    if method in ("bitfx", "bitfx-fp8"):
        backward = "fp8" if method == "bitfx-fp8" else "exact"
        return torch.compile(model, backend="bitfx", options={"linears": linears, "backward": backward})
    return torch.compile(model)


def measure(name: str, method: str, args, device: str, dtype: torch.dtype, rank: int = 0,
            world: int = 1) -> dict:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    config = make_config(name, args.quick)
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype).train()
    if args.fsdp:
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    cuda = device.startswith("cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
    compiled = _compile(model, method, args.linears)
    batch, seq = batch_of(name, args.quick, args.batch)
    g = torch.Generator().manual_seed(1 + rank)
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=g).to(device)

    def step() -> float:
        loss = compiled(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    t0 = time.perf_counter()
    first = step()
    if cuda:
        torch.cuda.synchronize()
    compile_s = time.perf_counter() - t0
    for _ in range(2):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, last = [], first
    for _ in range(args.steps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            last = step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            w = time.perf_counter()
            last = step()
            times.append((time.perf_counter() - w) * 1e3)
    ms = statistics.median(times)
    top = profile_step(step, cuda, args.profile) if args.profile else None
    row: dict[str, Any] = {
        "model": name + ("-tiny" if args.quick else ""), "method": method, "world": world,
        "tokens_per_step": batch * seq * world, "step_ms": ms, "tokens_per_s": batch * seq * world / ms * 1e3,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "first_loss": float(first), "last_loss": float(last), "compile_s": compile_s,
    }
    if top is not None:
        row["profile"] = top
    compiled = model = opt = None  # free them before the next method
    torch._dynamo.reset()
    if cuda:
        torch.cuda.empty_cache()
    return row


def profile_step(step, cuda: bool, top: int) -> dict:
    """One more (warm) step under ``torch.profiler``: the number of GPU kernels, their summed
    time, and the ``top`` kernel names by total time (CPU ops on a CPU run, a check of the path)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        step()
        if cuda:
            torch.cuda.synchronize()
    from bitfx.bench_models import _is_kernel_event

    totals: dict[str, list] = {}
    for e in prof.events():
        if cuda and not _is_kernel_event(e):  # GPU kernels (annotations apart); all CPU ops on a CPU run
            continue
        t = totals.setdefault(e.name, [0, 0.0])
        t[0] += 1
        t[1] += e.time_range.end - e.time_range.start  # microseconds
    ranked = sorted(totals.items(), key=lambda kv: -kv[1][1])
    host = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    return {"kernels": sum(c for c, _ in totals.values()), "us": sum(u for _, u in totals.values()),
            "top": [{"name": k[:120], "calls": c, "us": u} for k, (c, u) in ranked[:top]],
            "host_top": [{"name": e.key[:120], "calls": e.count, "us": e.self_cpu_time_total} for e in host[:top]]}


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
              "torch.cuda.max_memory_allocated during them (ratio = bitfx / bf16, lower is less memory)."]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="llama-350m,llama-1b")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--linears", default="all", help="BitfxConfig.linears for the bitfx method")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=None, help="sequences per step (per GPU with --fsdp)")
    p.add_argument("--quick", action="store_true", help="tiny shapes")
    p.add_argument("--profile", type=int, default=0, metavar="TOP",
                   help="profile one more step per (model, method) and keep its TOP kernels")
    p.add_argument("--fsdp", action="store_true", help="FSDP2 fully_shard per layer (launch with torchrun)")
    p.add_argument("--out", default=os.path.join("bench_out", "train"))
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    rank, world = 0, 1
    if args.device == "cpu":
        args.quick, args.steps = True, min(args.steps, 2)
    elif not torch.cuda.is_available():
        sys.exit("bitfx.bench_train needs a CUDA GPU (or --device cpu for a tiny smoke run)")
    if args.fsdp:
        import torch.distributed as dist

        dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        if args.device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    device = f"cuda:{torch.cuda.current_device()}" if args.device == "cuda" else "cpu"
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    import bitfx  # noqa: F401  (registers the backend's ops)
    import transformers

    header = (f"device: {torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'} x {world}; "
              f"torch {torch.__version__}; transformers {transformers.__version__}; command: python -m "
              f"bitfx.bench_train {' '.join(argv if argv is not None else sys.argv[1:])}")
    results: dict[str, Any] = {"header": header, "rows": []}
    if rank == 0:
        print(header, flush=True)
    for name in [m for m in args.models.split(",") if m]:
        for method in [m for m in args.methods.split(",") if m]:
            row = measure(name, method, args, device, dtype, rank, world)
            results["rows"].append(row)
            if rank == 0:
                print(row, flush=True)
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        table = render(results)
        prof = render_profile(results)
        if prof:
            table += "\n\nProfile of one step (GPU kernels by total time):\n\n" + prof
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
        with open(os.path.join(args.out, "table.md"), "w") as f:
            f.write(table + "\n")
        print("\n" + table, flush=True)
    if args.fsdp:
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
