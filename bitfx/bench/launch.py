"""Who launches bitfx's kernels in a default-mode decode step: ``python -m bitfx.bench launch``.

Outside CUDA graphs a decode step waits on the host, and a few percent of host time decide
whether bitfx beats bf16 at all; separate processes (or one process timing one method after
another) differ by more than that. So this compiles, in one process and for one model, the
bf16 baseline (Inductor) and each bitfx variant once (the backend alone, default mode), keeps
them all, and then times them in interleaved rounds: every round times every variant
(``--reps`` consecutive steps with no synchronize between them, as ``bench models`` does),
and the table gives each variant's median over the rounds, and its ratio to bf16's.

Variants (``--variants``): ``bf16`` (the baseline, always timed), ``auto`` (the default:
Inductor's code launches the kernels, through its static launcher), ``auto-no-static`` (the
same with ``static_launch_user_defined_triton_kernels=False``), ``op`` (each call through the
``bitfx::`` custom op), ``inductor`` (as ``auto`` outside CUDA graphs), ``quantized`` (a copy
of the model converted once by ``bitfx.quantize``, then compiled as ``auto``: the backend alone
against quantize + backend). Also printed: each variant's first call (the compile).
"""

from __future__ import annotations

import copy
import statistics
import sys
import time

import torch

from bitfx.bench import report

# Variant name -> the bitfx backend's options (None: the bf16 baseline).
VARIANTS = {
    "bf16": None,
    "auto": {},
    "auto-no-static": {"static_launch_user_defined_triton_kernels": False},
    "op": {"launch": "op"},
    "inductor": {"launch": "inductor"},
    "quantized": {},
}


def compile_variant(model: torch.nn.Module, name: str):
    """``model`` compiled in default mode for the variant ``name`` (a key of :data:`VARIANTS`)."""
    options = VARIANTS[name]
    if options is None:
        return torch.compile(model)
    if not options:
        return torch.compile(model, backend="bitfx")
    return torch.compile(model, backend="bitfx", options=dict(options))


def parse_args(argv):
    p = report.parser("launch", __doc__)
    p.add_argument("--models", default="bitnet-2b4t", help="comma-separated shapes of bitfx.bench.model_shapes "
                                                           "(default bitnet-2b4t)")
    p.add_argument("--variants", default="bf16,auto,auto-no-static,op",
                   help=f"comma-separated, from {','.join(VARIANTS)} (bf16 is added where missing)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (default 3)")
    p.add_argument("--reps", type=int, default=20, help="consecutive steps timed per variant and round (default 20)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cpu: the tiny twin of each model, a smoke run of this script (no GPU figures)")
    args = p.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in args.variants:
        if v not in VARIANTS:
            p.error(f"unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
    if "bf16" not in args.variants:
        args.variants.insert(0, "bf16")
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    if args.rounds < 1 or args.reps < 1:
        p.error("--rounds and --reps must be at least 1")
    return args


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    cuda = report.need_cuda("launch", args.device, smoke=True)
    import bitfx
    from bitfx.bench.decode import Decode, time_decode
    from bitfx.bench.model_shapes import build_model, make_config

    print(report.header(report.device_name(cuda), report.versions("triton", "transformers"),
                        report.command("launch", argv)), flush=True)
    rows = []
    for name in args.models:
        model = build_model(make_config(name, tiny=not cuda), args.device)
        with torch.no_grad():
            dense = Decode(model, args.device, torch.bfloat16)
            fns, decs, first = {}, {}, {}
            for v in args.variants:
                target, decs[v] = model, dense
                if v == "quantized":  # a copy of the model, converted by bitfx.quantize
                    target = copy.deepcopy(model)
                    bitfx.quantize(target, dense.prompt, use_cache=False)
                    decs[v] = Decode(target, args.device, torch.bfloat16)
                t0 = time.perf_counter()
                fns[v] = compile_variant(target, v)
                time_decode(decs[v], fns[v], cuda=cuda, graphs=False, reps=1, warmup=1)  # the compile
                first[v] = time.perf_counter() - t0
                print(f"{name} {v:>15}: first call {first[v]:.1f} s", flush=True)
            times: dict[str, list[float]] = {v: [] for v in args.variants}
            for _ in range(args.rounds):
                for v in args.variants:
                    r = time_decode(decs[v], fns[v], cuda=cuda, graphs=False, reps=args.reps)
                    if r["recompiled_while_timed"]:
                        raise RuntimeError(f"bench launch: {v} compiled again while timed")
                    times[v].append(r["ms"])
        base = statistics.median(times["bf16"])
        for v in args.variants:
            ms = statistics.median(times[v])
            rows.append((name, v, ms, base / ms, times[v], first[v]))
            print(f"{name} {v:>15}: {ms:.3f} ms (rounds {', '.join(f'{t:.3f}' for t in times[v])}), "
                  f"{base / ms:.2f}x bf16", flush=True)
        del fns, decs, dense, model
        torch._dynamo.reset()
        if cuda:
            torch.cuda.empty_cache()
    print()
    print("\n".join(report.md_head(["model", "variant", "default-mode step, ms (median of rounds)", "vs bf16",
                                    "rounds, ms", "first call, s"])))
    for name, v, ms, x, ts, f in rows:
        print(report.md_row([name, v, f"{ms:.3f}", f"{x:.2f}x", " / ".join(f"{t:.3f}" for t in ts), f"{f:.1f}"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
