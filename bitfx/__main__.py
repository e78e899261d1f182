"""``python -m bitfx``: the compiler at work on a built-in Llama-style model.

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
import statistics
import sys
import time

import torch

import bitfx
from bitfx.example import ExampleConfig, ExampleLlama

# Compiled vs eager reference: the fused norm rounds differently from the eager one, so an
# int8 code may move by one where a value sits on a rounding boundary; the logits then agree
# to well under 1% (relative L2), in bf16 as in fp32.
_TOLERANCE = 1e-2


def _time(fn, ids, device, reps: int) -> float:
    """Median seconds per call after one warm-up call."""
    fn(ids)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn(ids)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bitfx", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: bfloat16 on a GPU, float32 on the CPU")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--hidden", type=int, default=1408)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args(argv)
    device = torch.device(args.device)
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
        t_dense = _time(model, ids, device, args.reps)
        t_bitfx = _time(compiled, ids, device, args.reps)
        # Deployment: the converted model (packed weights, nothing to quantize per call), compiled.
        deployed = torch.compile(reference, backend="bitfx")
        err_deployed = _rel(deployed(ids), want)
        t_deployed = _time(deployed, ids, device, args.reps)

    err = _rel(got, want)
    same_token = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
    q_err = _rel(want, dense)
    q_token = (want.argmax(-1) == dense.argmax(-1)).float().mean().item()
    print("\n-- torch.compile(model, backend='bitfx')")
    print(f"compile + first call: {compile_s:.1f} s")
    print(f"compiled vs eager reference (bitfx.quantize, same sites): relative error {err:.2e}, "
          f"same next token {100 * same_token:.1f}%   [tolerance {_TOLERANCE:.0e}]")
    print(f"bitfx.quantize(model), compiled with the backend, vs the same eagerly: relative error {err_deployed:.2e}")
    print(f"ternary vs the dense model (the quantization itself; random weights, so only informational): "
          f"relative error {q_err:.2e}, same next token {100 * q_token:.1f}%")
    print(reference.bitfx_report)
    print(f"speed per call: uncompiled dense {1e3 * t_dense:.2f} ms; compiled bitfx {1e3 * t_bitfx:.2f} ms "
          f"({t_dense / t_bitfx:.2f}x); quantized + compiled {1e3 * t_deployed:.2f} ms ({t_dense / t_deployed:.2f}x)")
    if device.type != "cuda":
        print("  (on the CPU the bitfx ops run their plain-torch reference, not kernels: a check, not a speed-up)")
    ok = err <= _TOLERANCE and err_deployed <= _TOLERANCE
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
