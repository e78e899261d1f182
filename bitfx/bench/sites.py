"""The site benchmark: ``python -m bitfx.bench sites`` (CUDA only).

Checks each kernel against the reference at the benchmarked shapes, then measures, against
bf16 baselines measured in the same run:

* decode / small batch / prefill: bitfx ``norm_quant`` + ``ternary_matmul`` (the whole site:
  RMSNorm, activation quantization, ternary matmul, epilogue) vs bf16 ``F.rms_norm`` +
  ``F.linear`` (eager, and under ``torch.compile``), and ``torch._int_mm`` (int8 matmul alone,
  no norm and no quantization) where it accepts the shape;
* a sweep of M = 1, 2, 4 ... 8192 for the four LLM shapes;
* norm + quant alone, as achieved bandwidth;
* training forward + backward of ``bitfx.bitlinear`` vs bf16 RMSNorm + Linear, and the bytes
  saved for backward.

Method (:mod:`bitfx.bench.timing`): every timed call is captured in a CUDA graph that runs it
over enough rotating weight copies that the weights do not sit in the 50 MB L2 (cold-L2
decode), then the graph is replayed many times and the median per call is reported
(``time_graph``). Training steps are timed with CUDA events (``median_s``: median of
repetitions after warm-up). Inputs are random normal, never zeros.

Prints the tables last, writes them as Markdown to ``--out`` (default ``bench_out/``) and a
plot of speed-up vs M per shape (``sweep.png``).
"""

from __future__ import annotations

import math
import os
import sys
import time

import torch
import torch.nn.functional as F

import bitfx
from bitfx import reference as ref
from bitfx.bench import report
from bitfx.bench.model_shapes import SITE_SHAPES as SHAPES
from bitfx.bench.timing import copies_for, median_s, time_graph
from bitfx.demo.plot import NO_PLOT, plot_lines

SWEEP_M = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192]
TABLE_SITES = [(M, K, N) for K, N in SHAPES for M in (1, 16)] + [(4096, 8192, 8192), (4096, 4096, 14336)]
"""(M, K, N) of the site table: decode and small batch at every shape, then prefill at two."""
EPS = 1e-6

ops = torch.ops.bitfx


# ------------------------------------------------------------------ the site, four ways


class Site:
    """One RMSNorm -> Linear site of shape (M, K, N) with rotating weight copies for each method."""

    def __init__(self, M, K, N, seed=0):
        g = torch.Generator(device="cuda").manual_seed(seed)
        self.M, self.K, self.N = M, K, N
        self.x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, generator=g)
        self.g = (1 + 0.1 * torch.randn(K, device="cuda", generator=g)).to(torch.bfloat16)
        w = (torch.randn(N, K, device="cuda", generator=g) * 0.02).to(torch.bfloat16)
        self.w = w
        self.packed, self.w_scale = ops.weight_quant(w, False)
        self.n_packed = copies_for(self.packed.numel())
        self.packed_copies = [self.packed.clone() for _ in range(self.n_packed)]
        self.n_bf16 = copies_for(w.numel() * 2)
        self.w_copies = [w.clone() for _ in range(self.n_bf16)]
        self.int8_w = None

    def bitfx_fn(self, packed):
        def f():
            q, s = ops.norm_quant(self.x, self.g, EPS, False, True, torch.bfloat16)
            return ops.ternary_matmul(q, s, packed, self.w_scale, None, torch.bfloat16, self.K)
        return f

    def bf16_fn(self, w, compiled=None):
        fn = compiled or _bf16_site
        return lambda: fn(self.x, self.g, w)

    def int_mm_fns(self):
        if self.M <= 16:
            return None  # torch._int_mm needs M > 16
        q = torch.randint(-127, 128, (self.M, self.K), device="cuda", dtype=torch.int8)
        n = copies_for(self.N * self.K)
        ws = [torch.randint(-1, 2, (self.K, self.N), device="cuda", dtype=torch.int8).t().contiguous().t() for _ in range(n)]
        return [lambda w=w: torch._int_mm(q, w) for w in ws]

    def check(self):
        """The bitfx output against the reference (:mod:`bitfx.reference`, plain torch, run on the
        same device so that 32768-wide weights take milliseconds, not a minute of CPU), from the
        same inputs, on the first 64 rows."""
        out = self.bitfx_fn(self.packed)().float()
        rows = slice(0, min(self.M, 64))
        want = ref.bitlinear(self.x[rows], self.g, self.w, None, EPS).float()
        err = ((out[rows] - want).norm() / want.norm()).item()
        return err


def _bf16_site(x, g, w):
    return F.linear(F.rms_norm(x, (x.shape[-1],), g, EPS), w)


_compiled_bf16 = None


def compiled_bf16():
    global _compiled_bf16
    if _compiled_bf16 is None:
        _compiled_bf16 = torch.compile(_bf16_site, dynamic=True)
    return _compiled_bf16


def measure_site(M, K, N, with_compile=True):
    site = Site(M, K, N)
    err = site.check()
    t_bitfx = time_graph([site.bitfx_fn(p) for p in site.packed_copies])
    t_bf16 = time_graph([site.bf16_fn(w) for w in site.w_copies])
    t_comp = time_graph([site.bf16_fn(w, compiled_bf16()) for w in site.w_copies]) if with_compile else float("nan")
    mm = site.int_mm_fns()
    t_int = time_graph(mm) if mm else float("nan")
    # Bytes the bitfx site must move at least: x (bf16) in, packed weights in, out (bf16).
    bytes_min = M * K * 2 + site.packed.numel() + M * N * 2
    ops_count = 2 * M * K * N
    del site
    torch.cuda.empty_cache()
    return dict(M=M, K=K, N=N, err=err, bitfx_us=t_bitfx * 1e6, bf16_us=t_bf16 * 1e6, bf16_compile_us=t_comp * 1e6,
                int_mm_us=t_int * 1e6, tbps=bytes_min / t_bitfx / 1e12, tops=ops_count / t_bitfx / 1e12)


# ------------------------------------------------------------------ norm + quant alone


def measure_norm_quant(M=4096, K=8192):
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(K, device="cuda", dtype=torch.bfloat16)
    q, s = ops.norm_quant(x, g, EPS, False, True, torch.bfloat16)
    q_ref, s_ref = ref.norm_quant(x[:64].cpu(), g.cpu(), EPS)
    mism = (q[:64].cpu() != q_ref).float().mean().item()
    t = time_graph([lambda: ops.norm_quant(x, g, EPS, False, True, torch.bfloat16)], reps=50)
    copy_src = torch.empty(M * K * 3 // 2, device="cuda", dtype=torch.uint8)
    copy_dst = torch.empty_like(copy_src)
    t_copy = time_graph([lambda: copy_dst.copy_(copy_src)], reps=50)
    nbytes = M * K * 2 + M * K + M * 4
    return dict(M=M, K=K, us=t * 1e6, tbps=nbytes / t / 1e12, copy_tbps=2 * copy_src.numel() / t_copy / 1e12,
                code_mismatch=mism)


# ------------------------------------------------------------------ training


def _saved_bytes(fn):
    seen = {}

    def pack(t):
        key = (t.untyped_storage().data_ptr(), t.dtype, tuple(t.shape))
        seen[key] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def measure_training(M=8192, K=4096, N=14336):
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.ones(K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(N, K, device="cuda") * 0.02).to(torch.bfloat16).requires_grad_()
    dout = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)

    def bf16_step():
        out = _bf16_site(x, g, w)
        out.backward(dout)

    def bitfx_step():
        out = bitfx.bitlinear(x, g, w, None, EPS)
        out.backward(dout)

    t_bf16 = median_s(bf16_step)
    t_bitfx = median_s(bitfx_step)
    _, b_bf16 = _saved_bytes(lambda: _bf16_site(x, g, w))
    _, b_bitfx = _saved_bytes(lambda: bitfx.bitlinear(x, g, w, None, EPS))
    res = dict(M=M, K=K, N=N, bf16_us=t_bf16 * 1e6, bitfx_us=t_bitfx * 1e6, saved_bf16=b_bf16, saved_bitfx=b_bitfx,
               fla_us=float("nan"))
    try:  # fla's FusedBitLinear, when the package is importable
        from fla.modules.fused_bitlinear import FusedBitLinear  # type: ignore

        layer = FusedBitLinear(K, N, bias=False).cuda().to(torch.bfloat16)

        def fla_step():
            layer(x).backward(dout)

        res["fla_us"] = median_s(fla_step) * 1e6
    except ImportError:
        pass
    return res


# ------------------------------------------------------------------ report


def site_table(sites: list[dict]) -> str:
    """The site rows (``measure_site`` results, e.g. of :data:`TABLE_SITES`) as a Markdown table."""
    lines = ["| regime | M | K | N | bitfx µs | bf16 µs | bf16 compile µs | _int_mm µs | vs bf16 | vs compile | vs _int_mm | TB/s | TOP/s | rel err |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sites:
        regime = "decode" if r["M"] == 1 else ("small batch" if r["M"] == 16 else "prefill")
        lines.append(
            f"| {regime} | {r['M']} | {r['K']} | {r['N']} | {r['bitfx_us']:.1f} | {r['bf16_us']:.1f} | "
            f"{r['bf16_compile_us']:.1f} | {report.fmt(r['int_mm_us'], '.1f', 'n/a')} | {report.times(r['bf16_us'], r['bitfx_us'], 'n/a')} | "
            f"{report.times(r['bf16_compile_us'], r['bitfx_us'], 'n/a')} | {report.times(r['int_mm_us'], r['bitfx_us'], 'n/a')} | "
            f"{r['tbps']:.2f} | {r['tops']:.0f} | {r['err']:.1e} |"
        )
    return "\n".join(lines)


def render(results: dict, sweep_m: list[int]) -> str:
    """The tables of a run (``results`` as written to results.json), as Markdown."""
    nq, tr = results["norm_quant"], results["training"]
    lines = [results["header"], ""]
    lines.append(site_table(results["sites"]))
    lines.append("")
    lines.append(
        f"norm+quant alone, M={nq['M']} K={nq['K']}: {nq['us']:.1f} µs, {nq['tbps']:.2f} TB/s = "
        f"{100 * nq['tbps'] / nq['copy_tbps']:.0f}% of the copy bandwidth ({nq['copy_tbps']:.2f} TB/s); "
        f"codes differing from the CPU reference: {100 * nq['code_mismatch']:.3f}%"
    )
    fla = "not importable" if math.isnan(tr["fla_us"]) else f"{tr['fla_us']:.0f} µs"
    lines.append(
        f"training fwd+bwd M={tr['M']} K={tr['K']} N={tr['N']}: bitfx {tr['bitfx_us']:.0f} µs "
        f"({6 * tr['M'] * tr['K'] * tr['N'] / tr['bitfx_us'] / 1e6:.0f} TOP/s-equivalent: 6·M·N·K for the three matmuls), "
        f"bf16 {tr['bf16_us']:.0f} µs "
        f"({report.times(tr['bf16_us'], tr['bitfx_us'], 'n/a')}), fla FusedBitLinear {fla}; saved for backward: bitfx "
        f"{tr['saved_bitfx'] / 2**20:.1f} MiB vs bf16 {tr['saved_bf16'] / 2**20:.1f} MiB "
        f"({100 * tr['saved_bitfx'] / tr['saved_bf16']:.0f}%)"
    )
    lines.append("")
    lines.append("Sweep (speed-up of bitfx over bf16 eager / over bf16 torch.compile):")
    lines.append("| M | " + " | ".join(f"{K}x{N}" for K, N in SHAPES) + " |")
    lines.append("|---" * (len(SHAPES) + 1) + "|")
    for M in sweep_m:
        cells = []
        for K, N in SHAPES:
            r = next(r for r in results["sweep"] if r["M"] == M and r["K"] == K and r["N"] == N)
            cells.append(f"{r['bf16_us'] / r['bitfx_us']:.2f} / {r['bf16_compile_us'] / r['bitfx_us']:.2f}")
        lines.append(f"| {M} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_sweep(results: dict, path: str, device: str) -> bool:
    """Speed-up over bf16 eager against M, one line per shape, as a PNG; False when matplotlib
    is missing (nothing drawn)."""
    lines = {}
    for K, N in SHAPES:
        rs = [r for r in results["sweep"] if r["K"] == K and r["N"] == N]
        lines[f"K={K}, N={N}"] = ([r["M"] for r in rs], [r["bf16_us"] / r["bitfx_us"] for r in rs])
    return plot_lines(path, lines, title=f"bitfx RMSNorm + ternary Linear against bf16 on {device}",
                      xlabel="M (tokens)", ylabel="speed-up over bf16 RMSNorm + F.linear", xlog=2, hline=1.0,
                      marker="o")


def _measured(results: list, r: dict) -> None:
    results.append(r)
    print(r, flush=True)


def main(argv=None) -> int:
    p = report.parser("sites", __doc__)
    p.add_argument("--out", default="bench_out")
    p.add_argument("--quick", action="store_true", help="fewer sweep points (for a smoke run)")
    args = p.parse_args(argv)
    report.need_cuda("sites")
    dev = report.device_name()
    header = report.header(dev, {"torch": torch.__version__, "triton": report.version("triton")},
                           report.command("sites", argv))
    print(header, flush=True)
    t0 = time.time()
    results = {"header": header, "sites": [], "sweep": []}

    for M, K, N in TABLE_SITES:
        _measured(results["sites"], measure_site(M, K, N))
    results["norm_quant"] = measure_norm_quant()
    print(results["norm_quant"], flush=True)
    results["training"] = measure_training()
    print(results["training"], flush=True)
    sweep_m = [1, 16, 256, 4096] if args.quick else SWEEP_M
    for K, N in SHAPES:
        for M in sweep_m:
            _measured(results["sweep"], measure_site(M, K, N, with_compile=True))

    table = render(results, sweep_m)
    report.write_results(args.out, results, table, table_name="tables.md")
    if not plot_sweep(results, os.path.join(args.out, "sweep.png"), dev):
        print(NO_PLOT, flush=True)
    print(f"\n(total {time.time() - t0:.0f} s)\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
