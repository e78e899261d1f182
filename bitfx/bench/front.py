"""The one-kernel decode linear with and without its register bound: ``python -m bitfx.bench front``.

``bitfx.kernels.front_gemv`` (an eager ``BitfxLinear``'s kernel for one row: the norm and the
token's int8 codes made inside the GEMV's programs) launches with ``maxnreg`` =
``front_gemv._MAX_REGS``. This times the kernel (CUDA, M=1, bf16, ``triton.testing.do_bench``:
L2 flushed before each call, the launch included) at each decode site of the chosen model shapes
(the sites of ``python -m bitfx.bench sass``), with the bound and with none (ptxas' own
register choice), in alternating repeats; the table gives the fastest repeat of each, and the
outputs of the two are checked to be the same bits.
"""

from __future__ import annotations

import math
import sys

import torch

from bitfx.bench import report
from bitfx.bench.sass import SHAPES


def main(argv=None) -> int:
    p = report.parser("front", __doc__)
    p.add_argument("--models", default=",".join(SHAPES), help=f"comma-separated, from {','.join(SHAPES)} (default all)")
    p.add_argument("--repeats", type=int, default=2, help="timings of each form per site (default 2)")
    args = p.parse_args(argv)
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in names if m not in SHAPES]
    if unknown:
        p.error(f"unknown model(s) {unknown}; choose from {list(SHAPES)}")
    report.need_cuda("front")
    from triton.testing import do_bench

    from bitfx.kernels import front_gemv as fg
    from bitfx.reference import pack_ternary

    bound = fg._MAX_REGS
    print(report.header(report.device_name(), report.versions("triton"), report.command("front", argv)))
    print(f"\n| model | site (K x N) | no bound, us | maxnreg {bound}, us | ratio |\n| --- | --- | --- | --- | --- |")
    logs = []
    g = torch.Generator(device="cuda").manual_seed(0)
    try:
        for model in names:
            for K, N in SHAPES[model]:
                x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16, generator=g)
                w = torch.randn(K, device="cuda", dtype=torch.bfloat16, generator=g)
                packed = pack_ternary(torch.randint(-1, 2, (N, K), device="cuda", dtype=torch.int8, generator=g))
                s_w = torch.rand(N, device="cuda", generator=g) + 0.5
                best, outs = {}, {}
                for _ in range(args.repeats):
                    for regs in (0, bound):
                        fg._MAX_REGS = regs

                        def call():
                            return fg.front_gemv(x, w, 1e-6, False, True, torch.float32, True, 127, packed, s_w,
                                                 None, torch.bfloat16)

                        outs[regs] = call()[0]
                        t = do_bench(call, warmup=25, rep=100) * 1e3
                        best[regs] = min(best.get(regs, math.inf), t)
                if not torch.equal(outs[0], outs[bound]):
                    raise RuntimeError(f"bench front: {model} {K} x {N}: the two forms disagree")
                logs.append(math.log(best[bound] / best[0]))
                print(f"| {model} | {K} x {N} | {best[0]:.2f} | {best[bound]:.2f} | {best[0] / best[bound]:.2f}x |",
                      flush=True)
    finally:
        fg._MAX_REGS = bound
    print(f"\ngeometric mean of the time with the bound over the time without: {math.exp(sum(logs) / len(logs)):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
