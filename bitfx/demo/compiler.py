"""``python -m bitfx compiler``: the compiler at work on a built-in Llama-style model.

1. ``bitfx.explain`` lists the RMSNorm -> Linear sites it finds (and what it passes over);
2. ``torch.compile(model, backend="bitfx")`` rewrites them into the fused ``bitfx`` ops;
3. the compiled output is checked against the eager reference: the same model with the same
   layers converted by ``bitfx.quantize`` and run without compilation;
4. the compiled model is timed against the uncompiled (dense) model.

Exit status 0 when the outputs agree, 1 otherwise. On a GPU the sites run the Triton kernels;
on the CPU the ops run their plain-torch reference implementation (correct, not fast).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import torch

import bitfx
from bitfx.bench.timing import wall_median_s
from bitfx.demo.args import default_device, device as device_arg, positive_int
from bitfx.demo.example import ExampleConfig, ExampleLlama

# Compiled vs eager reference (relative L2 of the logits): the fused norm rounds differently
# from the eager one, so an int8 code may move by one where a value sits on a rounding
# boundary, and Inductor rounds the rest of the model differently from eager. In fp32 that
# stays far under 1e-3; in bf16/fp16 Inductor alone moves the dense model's logits by about
# 1e-2 (its own error is printed as the floor), so the bound is that floor times 3, at least 3e-2.
_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 3e-2, torch.float16: 3e-2}


def _time(fn, ids, gpu: bool, reps: int) -> float:
    """Median wall-clock seconds per call (synchronized) after one warm-up call."""
    return wall_median_s(lambda: fn(ids), reps, warmup=1, cuda=gpu)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bitfx compiler", description=__doc__.split("\n")[0])
    p.add_argument("--device", type=device_arg, default=default_device(), help="cpu, cuda or cuda:N "
                   "(default: cuda when torch finds a GPU)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: bfloat16 on a GPU, float32 on the CPU")
    p.add_argument("--layers", type=positive_int, default=2)
    p.add_argument("--dim", type=positive_int, default=None, help="default: 4096 on a GPU, 512 on the CPU")
    p.add_argument("--hidden", type=positive_int, default=None, help="default: 11008 on a GPU, 1408 on the CPU")
    p.add_argument("--batch", type=positive_int, default=2)
    p.add_argument("--seq", type=positive_int, default=64)
    p.add_argument("--reps", type=positive_int, default=5)
    p.add_argument("--profile", action="store_true", help="print the profiler's op table of one compiled call")
    args = p.parse_args(argv)
    device = args.device
    gpu = device.type == "cuda"
    args.dim = args.dim or (4096 if gpu else 512)
    args.hidden = args.hidden or (11008 if gpu else 1408)
    heads = ExampleConfig().heads
    if args.dim % heads:
        p.error(f"--dim {args.dim}: must be a multiple of the model's {heads} attention heads")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))

    torch.manual_seed(0)
    cfg = ExampleConfig(dim=args.dim, hidden=args.hidden, layers=args.layers)
    model = ExampleLlama(cfg).to(device=device, dtype=dtype).eval()
    ids = torch.randint(0, cfg.vocab, (args.batch, args.seq), device=device)
    print(f"bitfx {bitfx.__version__}: a {args.layers}-layer Llama-style model (dim {args.dim}, MLP {args.hidden}), "
          f"{dtype} on {device}, input {args.batch}x{args.seq} tokens")

    print("\n-- bitfx.explain(model, ids)")
    print(bitfx.explain(model, ids))

    with torch.no_grad():
        dense = model(ids)
        reference = bitfx.quantize(copy.deepcopy(model), ids)
        want = reference(ids)
        compiled = torch.compile(model, backend="bitfx")
        t0 = time.perf_counter()
        got = compiled(ids)
        compile_s = time.perf_counter() - t0
        t_dense = _time(model, ids, gpu, args.reps)
        t_bitfx = _time(compiled, ids, gpu, args.reps)
        # Deployment: the converted model (packed weights, nothing to quantize per call), compiled.
        deployed = torch.compile(reference, backend="bitfx")
        err_deployed = _rel(deployed(ids), want)
        t_deployed = _time(deployed, ids, gpu, args.reps)
        inductor_err = _rel(torch.compile(model)(ids), dense)  # the floor: Inductor alone, dense model
        t_graphs = None
        if gpu:  # CUDA graphs take the per-op launch overhead away (what a decode loop would use)
            graphed = torch.compile(reference, backend="bitfx", mode="reduce-overhead")
            for _ in range(3):
                graphed(ids)
            t_graphs = _time(graphed, ids, gpu, args.reps)
            dense_graphed = torch.compile(model, mode="reduce-overhead")
            for _ in range(3):
                dense_graphed(ids)
            t_dense_graphs = _time(dense_graphed, ids, gpu, args.reps)
        if args.profile:
            with torch.profiler.profile() as prof:
                deployed(ids)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))

    err = _rel(got, want)
    tol = max(_TOLERANCE[dtype], 3 * inductor_err)
    same_token = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
    q_err = _rel(want, dense)
    q_token = (want.argmax(-1) == dense.argmax(-1)).float().mean().item()
    print("\n-- torch.compile(model, backend='bitfx')")
    print(f"compile + first call: {compile_s:.1f} s")
    print(f"compiled vs eager reference (bitfx.quantize, same sites): relative error {err:.2e}, "
          f"same next token {100 * same_token:.1f}%   [bound {tol:.0e}]")
    print(f"bitfx.quantize(model), compiled with the backend, vs the same eagerly: relative error {err_deployed:.2e}")
    print(f"(floor: the dense model under plain Inductor vs eager: relative error {inductor_err:.2e})")
    print(f"ternary vs the dense model (the quantization itself; random weights, so only informational): "
          f"relative error {q_err:.2e}, same next token {100 * q_token:.1f}%")
    print(reference.bitfx_report)
    print(f"speed per call: uncompiled dense {1e3 * t_dense:.2f} ms; compiled bitfx {1e3 * t_bitfx:.2f} ms "
          f"({t_dense / t_bitfx:.2f}x); quantized + compiled {1e3 * t_deployed:.2f} ms ({t_dense / t_deployed:.2f}x)")
    if t_graphs is not None:
        print(f"with CUDA graphs (mode='reduce-overhead'): dense under Inductor {1e3 * t_dense_graphs:.2f} ms; "
              f"quantized + bitfx {1e3 * t_graphs:.2f} ms ({t_dense_graphs / t_graphs:.2f}x)")
    if not gpu:
        print("  (on the CPU the bitfx ops run their plain-torch reference, not kernels: a check, not a speed-up)")
    ok = err <= tol and err_deployed <= tol
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
