"""``python -m bitfx.bench tune``: sweep the ternary matmul's launch configurations (CUDA only).

The dispatch table in :mod:`bitfx.kernels.ternary_matmul` (``_config``) is a deterministic
heuristic, not run-time autotuning (autotuning cannot run inside a CUDA-graph capture, where
decode steps live). This script is how that table is chosen: for each (M, K, N) it times the
matmul alone (int8 codes and scales precomputed) under every candidate configuration, in a
CUDA graph over rotating weight copies (cold L2, :func:`bitfx.bench.timing.time_graph`), checks
each result against the default configuration's exactly (the int32 product is exact, so any
config that differs is wrong), and prints the fastest few per shape. Every candidate reaches the
kernel through its launcher's own override keywords (``path=``, ``split_k=``, ``config=`` of
``ternary_matmul``; ``num_warps=`` of ``norm_quant``); nothing of the kernels is patched.
"""

from __future__ import annotations

import inspect
import itertools
import sys

import torch

import bitfx  # noqa: F401  (registers torch.ops.bitfx)
from bitfx.bench import report
from bitfx.bench.timing import copies_for, time_graph

ops = torch.ops.bitfx


def _candidates(M: int):
    """(path, split_k, config) triples worth trying at this M."""
    out = [(None, None, None)]  # the current heuristic
    if M <= 64:
        for bn, bkq, split, warps in itertools.product((16, 32, 64), (128, 256), (None, 1, 2, 4), (4, 8)):
            if bn * bkq > 16384 or (bn == 16 and warps == 8):
                continue
            out.append(("gemv", split, dict(BLOCK_N=bn, BLOCK_KQ=bkq, num_warps=warps, num_stages=4)))
        if M <= 4:
            import triton

            bms = sorted({min(triton.next_power_of_2(M), 4)})
            for bm, bn, bw, warps, hint in itertools.product(
                bms, (1, 2, 4, 8, 16), (128, 256, 512, 1024), (1, 2, 4, 8), (True,)
            ):
                # at most 32 words a thread, at least one 16-byte load each
                if bm * bn * bw > 32 * 32 * warps or bn * bw < 32 * warps * 4:
                    continue
                out.append(("dp4a", None, dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_W=bw, num_warps=warps, num_stages=1,
                                               STREAM_HINT=hint)))
            # K splits with the default blocks: more programs for skinny weights (few rows) and long rows
            out += [("dp4a", split, None) for split in (2, 4, 8, 16)]
    else:
        tiles = [(128, 128, 8), (128, 256, 8), (256, 128, 8)] if M >= 512 else [(64, 64, 4), (64, 128, 4), (128, 64, 4), (128, 128, 8)]
        bkqs, splits = ((32, 64, 128), (1,)) if M >= 2048 else ((64, 128), (1, 2))
        for (bm, bn, warps), bkq, stages, split in itertools.product(tiles, bkqs, (3, 4), splits):
            if bkq * (4 * bm + bn) * stages > 220 * 1024:  # shared memory: 4 planes of q, bytes of w
                continue
            out.append(("tc", split, dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_KQ=bkq, num_warps=warps, num_stages=stages)))
    return out


def sweep(M: int, K: int, N: int, top: int = 5, paths: tuple | None = None, site: bool = False, pdl_both: bool = False):
    """Time every candidate; with ``site``, the whole decode site (``norm_quant`` of bf16 x, then
    the matmul) instead of the matmul alone. Candidates run with and without programmatic
    dependent launch in site mode (or with ``pdl_both``), without it otherwise."""
    from bitfx.kernels import ternary_matmul as tm

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(M, K, device="cuda", generator=g).to(torch.bfloat16)
    gamma = (1 + 0.1 * torch.randn(K, device="cuda", generator=g)).to(torch.bfloat16)
    q, s_x = ops.norm_quant(x, gamma, 1e-6, False, True, torch.bfloat16)
    w = torch.randn(N, K, device="cuda", generator=g).to(torch.bfloat16)
    packed, s_w = ops.weight_quant(w, False)
    copies = [packed.clone() for _ in range(copies_for(packed.numel()))]

    def run(p, path, split, cfg):
        if site:
            qq, ss = ops.norm_quant(x, gamma, 1e-6, False, True, torch.bfloat16)
        else:
            qq, ss = q, s_x
        return tm.ternary_matmul(qq, ss, p, s_w, None, torch.bfloat16, path=path, split_k=split, config=cfg)

    want = run(packed, None, None, None)
    rows = []
    cands = [c for i, c in enumerate(_candidates(M)) if i == 0 or paths is None or c[0] in paths]
    for path, split, cfg in cands:
        pdls = (None,) if cfg is None else (True, False) if site or pdl_both else (False,)
        for pdl in pdls:
            c = cfg if pdl is None else dict(cfg, PDL=pdl)
            try:
                got = run(packed, path, split, c)
                if not torch.equal(got, want):
                    rows.append(dict(path=path, split=split, cfg=c, us=float("nan"), err="WRONG"))
                    continue
                t = time_graph([lambda p=p: run(p, path, split, c) for p in copies])
                rows.append(dict(path=path, split=split, cfg=c, us=t * 1e6))
            except Exception as e:  # a config the compiler rejects (shared memory, registers): skip it
                rows.append(dict(path=path, split=split, cfg=c, us=float("nan"), err=type(e).__name__))
    ok = sorted((r for r in rows if r["us"] == r["us"]), key=lambda r: r["us"])
    default = rows[0]["us"]
    nbytes = (M * K * 2 if site else M * K) + packed.numel() + M * N * 2
    print(f"M={M} K={K} N={N} {'site' if site else 'matmul'}: default {default:.1f} us; {len(ok)}/{len(rows)} configs ran",
          flush=True)
    for r in ok[:top]:
        print(f"   {r['us']:8.1f} us  {nbytes / r['us'] / 1e6:6.2f} TB/s  {2 * M * N * K / r['us'] / 1e6:7.0f} TOP/s  "
              f"path={r['path']} split={r['split']} {r['cfg']}", flush=True)
    wrong = [r for r in rows if r.get("err") == "WRONG"]
    if wrong:
        print(f"   WRONG results from {len(wrong)} configs: {wrong[:3]}", flush=True)
    return dict(M=M, K=K, N=N, site=site, default_us=default, rows=rows)


def takes_num_warps(launcher) -> bool:
    """Whether a launcher takes a ``num_warps=`` override (the norm_quant sweep needs it)."""
    try:
        return "num_warps" in inspect.signature(launcher).parameters
    except (TypeError, ValueError):
        return False


def sweep_norm_quant(M: int, K: int):
    """Time ``norm_quant`` with each warp count, passed to its launcher as ``num_warps=``."""
    from bitfx.kernels import norm_quant as nq

    if not takes_num_warps(nq.norm_quant):
        print(f"norm_quant M={M} K={K}: skipped: this norm_quant launcher takes no num_warps= override", flush=True)
        return
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(K, device="cuda", dtype=torch.bfloat16)
    want = nq.norm_quant(x, g, 1e-6, False, True, torch.bfloat16)
    nbytes = M * K * 3 + M * 4
    for warps in (1, 2, 4, 8, 16, 32):
        def run(w=warps):
            return nq.norm_quant(x, g, 1e-6, False, True, torch.bfloat16, num_warps=w)

        got = run()
        same = all(torch.equal(a, b) for a, b in zip(got[:2], want[:2]))
        t = time_graph([run], reps=50)
        print(f"norm_quant M={M} K={K} warps={warps}: {t * 1e6:.1f} us {nbytes / t / 1e12:.2f} TB/s "
              f"{'' if same else 'DIFFERENT'}", flush=True)


def main(argv=None) -> int:
    p = report.parser("tune", __doc__)
    p.add_argument("--shapes", default="1x8192x8192,1x4096x4096,1x4096x14336,1x14336x4096",
                   help="comma-separated MxKxN")
    p.add_argument("--top", type=int, default=5)
    p.add_argument("--json", default=None, help="write all rows here")
    p.add_argument("--paths", default="", help="comma-separated paths to sweep (default: all)")
    p.add_argument("--norm", default="", help="comma-separated MxK for norm_quant warp sweeps")
    p.add_argument("--site", action="store_true", help="time norm_quant + matmul, not the matmul alone")
    args = p.parse_args(argv)
    report.need_cuda("tune")
    for s in filter(None, args.norm.split(",")):
        sweep_norm_quant(*(int(v) for v in s.split("x")))
    res = []
    for s in args.shapes.split(","):
        M, K, N = (int(v) for v in s.split("x"))
        res.append(sweep(M, K, N, args.top, tuple(args.paths.split(",")) if args.paths else None, args.site))
    if args.json:
        report.write_json(args.json, res, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
