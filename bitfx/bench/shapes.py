"""Random shapes: ``python -m bitfx.bench shapes`` (CUDA only).

What is measured: for shapes ``(M, K, N)`` drawn at random, one RMSNorm -> Linear site three
ways, as in :mod:`bitfx.bench.sites`: bitfx (``torch.ops.bitfx.norm_quant`` then
``torch.ops.bitfx.ternary_matmul``), bf16 ``F.rms_norm`` + ``F.linear`` in eager mode, and the
same bf16 site under ``torch.compile(dynamic=True)`` (Inductor). The criterion checked is "no
(M, K, N) slower than bf16 under Inductor": ``vs Inductor = bf16 Inductor µs / bitfx µs``
must stay >= 1 for every shape; ``vs eager`` is the same ratio against bf16 eager.

The shape space: K and N multiples of 128 in [1024, 32768], M in [1, 8192]. K and N are drawn
log-uniform and rounded to a multiple of 128. One draw in four is a decode / small-batch shape
(M = 1 on every other such draw, else M log-uniform in [2, 16]); the other draws spread M
log-uniform over [1, 8192], stratified (one draw per equal slice of log M, slices in random
order) so that every run covers small and large M. Each run draws a fresh list (a seed taken
from the operating system, printed in the header and written to results.json); ``--seed``
repeats a run's list, ``--shapes`` gives an explicit list instead.

Targets, reported in the summary line: every shape with M >= 128 at least as fast as bf16 under
Inductor (``PREFILL_TARGET``), and M = 1 with K * N >= 2^24 at least 3x (``DECODE_TARGET``).

Method (the building blocks of :mod:`bitfx.bench.sites`, imported, not copied): each site is
built by ``sites.Site`` (random normal inputs, rotating weight copies so that the weights stream
from HBM, not from the 50 MB L2), its bitfx output is checked against the CPU reference
(``Site.check``: relative L2 error of the first 64 rows; a shape with error > 0.02 is an ERROR
row), then each way is timed by ``timing.time_graph`` (a CUDA graph over the copies, median of
30 replays). Unlike ``sites.measure_site`` the ``torch._int_mm`` baseline is not timed (it is
not the criterion, and at K = N = 32768 its int8 copies cost another 2 GiB and time).

Memory: the bf16 weight copies of one shape are capped at ``MAX_BF16_WEIGHT_BYTES`` (16 GiB;
down to one copy, two or more where the cap allows; within the shape space above
``timing.copies_for`` never asks for more than two copies of a weight bigger than 100 MB, so
the cap binds only for explicit shapes beyond it), and a shape whose estimated peak GPU memory
exceeds ``MEMORY_GUARD_BYTES`` (40 GB) or 90% of the free memory is skipped and recorded with
the reason.

Each shape also reports the kernel configuration that ``ternary_matmul`` picks for it (path
``dp4a`` / ``gemv`` / ``tc``, tile and split-K), from the launcher's own selection functions.

``--budget-s`` stops drawing new shapes after that many seconds (the shapes measured so far are
still reported). One line per shape is printed as it is measured, then a Markdown table sorted
by ``vs Inductor`` (lowest first) and a summary; ``--out`` (default ``bench_out/shapes``)
receives ``results.json`` (rewritten after every shape) and ``table.md``. The exit status is 0
whatever the ratios (this is a measurement); shapes below 1.0 are flagged in the output.
"""

from __future__ import annotations

import gc
import math
import os
import random
import sys
import time

import torch

from bitfx.bench import report
from bitfx.bench.profiling import compile_count
from bitfx.bench.sites import Site, compiled_bf16
from bitfx.bench.timing import copies_for, time_graph

KN_MIN, KN_MAX, KN_MULTIPLE = 1024, 32768, 128
M_MAX = 8192
SMALL_M_MAX = 16  # decode / small batch
SMALL_EVERY = 4  # one draw in SMALL_EVERY is a decode / small-batch shape
DECODE_KN = 2**24  # "large" decode shapes: K * N >= 4096 * 4096
DECODE_TARGET = 3.0  # M = 1 with K * N >= DECODE_KN: bitfx at least this many times bf16 Inductor
PREFILL_M = 128  # M >= PREFILL_M: bitfx at least as fast as bf16 Inductor (PREFILL_TARGET)
PREFILL_TARGET = 1.0
ERR_LIMIT = 0.02
MAX_BF16_WEIGHT_BYTES = 16 * 2**30
MEMORY_GUARD_BYTES = 40 * 10**9


# ------------------------------------------------------------------ the shapes


def _log_uniform(rng: random.Random, lo: float, hi: float) -> float:
    return math.exp(rng.uniform(math.log(lo), math.log(hi)))


def _round_multiple(x: float, multiple: int, lo: int, hi: int) -> int:
    """``x`` rounded to the nearest multiple of ``multiple``, kept within the multiples in ``[lo, hi]``."""
    lo_m = -(-lo // multiple) * multiple
    hi_m = hi // multiple * multiple
    return int(min(max(round(x / multiple) * multiple, lo_m), hi_m))


def draw_shapes(n: int, seed: int, *, m_max: int = M_MAX, kn_min: int = KN_MIN, kn_max: int = KN_MAX,
                multiple: int = KN_MULTIPLE, small_every: int = SMALL_EVERY,
                small_m_max: int = SMALL_M_MAX) -> list[tuple[int, int, int]]:
    """``n`` distinct shapes ``(M, K, N)``, the same for the same arguments.

    K, N: log-uniform over ``[kn_min, kn_max]``, rounded to a multiple of ``multiple``. M: draws
    ``0, small_every, 2 small_every, ...`` are decode / small batch (M = 1 on every other one,
    else log-uniform over ``[2, small_m_max]``); the others are log-uniform over ``[1, m_max]``,
    one per equal slice of ``log M`` (slices shuffled), so that any n >= 2 small_every covers
    both ends of the range.
    """
    rng = random.Random(seed)
    is_small = [i % small_every == 0 for i in range(n)]
    n_spread = n - sum(is_small)
    strata = list(range(n_spread))
    rng.shuffle(strata)
    shapes: list[tuple[int, int, int]] = []
    seen: set[tuple[int, int, int]] = set()
    j = 0
    for i in range(n):
        for _ in range(1000):  # redraw the rare duplicate
            if is_small[i]:
                M = 1 if (i // small_every) % 2 == 0 else round(_log_uniform(rng, 2, small_m_max))
            else:
                u = (strata[j] + rng.random()) / n_spread
                M = round(math.exp(u * math.log(m_max)))
            M = min(max(int(M), 1), m_max)
            K = _round_multiple(_log_uniform(rng, kn_min, kn_max), multiple, kn_min, kn_max)
            N = _round_multiple(_log_uniform(rng, kn_min, kn_max), multiple, kn_min, kn_max)
            if (M, K, N) not in seen:
                break
        if not is_small[i]:
            j += 1
        seen.add((M, K, N))
        shapes.append((M, K, N))
    return shapes


def fresh_seed() -> int:
    """A seed for this run's shapes from the operating system's entropy (each run a new draw)."""
    return random.SystemRandom().randrange(2**31)


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
    """``"M,K,N;M,K,N"`` -> ``[(M, K, N), ...]`` (positive integers)."""
    shapes = []
    for part in text.replace(" ", "").split(";"):
        if not part:
            continue
        fields = part.split(",")
        if len(fields) != 3 or not all(f.isdigit() and int(f) > 0 for f in fields):
            raise ValueError(f"--shapes: {part!r} is not M,K,N (three positive integers)")
        shapes.append(tuple(int(f) for f in fields))
    if not shapes:
        raise ValueError("--shapes: no shape given")
    return shapes


# ------------------------------------------------------------------ the kernel configuration


def kernel_choice(M: int, K: int, N: int, device: torch.device) -> dict:
    """The configuration ``bitfx.kernels.ternary_matmul`` picks for this shape (read-only):
    the same selection functions its launcher calls (``_default_path``, then ``_dp4a_config`` or
    ``_config``), with no overrides. ``path`` is "?" if those private functions changed."""
    try:
        from bitfx.kernels import ternary_matmul as tm
        from bitfx.layout import packed_k

        Kq = packed_k(K)
        path = tm._default_path(M)
        if path == "dp4a":
            cfg = tm._dp4a_config(M, N, Kq, device, None, None)
            tile = f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_W']}w"  # q rows x weight rows x K words
        else:
            tile = tm._TUNED.get((tm.cdiv(M, 128) * 128, N, Kq, device)) if path == "tc" else None  # measured
            cfg = tm._config(M, N, Kq, device, path, None, None, tile)
            tile = f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_KQ']}"  # q rows x weight rows x packed bytes
        return dict(path=path, tile=tile, split_k=int(cfg["SPLIT_K"]))
    except Exception as e:  # noqa: BLE001 (a report column, never a reason to stop)
        return dict(path="?", tile=f"({type(e).__name__})", split_k=0)


def _kernel_cell(r: dict) -> str:
    path = r.get("path")
    if not path:
        return ""
    split = r.get("split_k") or 0
    return f"{path} {r.get('tile', '')}" + (f" sk{split}" if split > 1 else "")


# ------------------------------------------------------------------ memory


def plan_memory(M: int, K: int, N: int) -> dict:
    """Rotating copies and an upper estimate of the peak GPU bytes of one shape.

    ``sites.Site`` holds the bf16 weight, ``copies_for`` bf16 copies (trimmed to the cap by
    :class:`CappedSite`), the packed weight and its copies, and x; building it briefly holds
    two fp32 [N, K] temporaries (randn, then * 0.02). The calls add the norm output, the codes,
    the output, a split-K int32 workspace and the fp32 copy of the output that the check makes.
    """
    from bitfx.layout import packed_k

    w_bytes = 2 * N * K
    n_bf16_built = copies_for(w_bytes)
    n_bf16 = max(1, min(n_bf16_built, MAX_BF16_WEIGHT_BYTES // w_bytes))
    packed_bytes = N * packed_k(K)
    n_packed = copies_for(packed_bytes)
    x_bytes = 2 * M * K
    built = w_bytes * (1 + n_bf16_built) + packed_bytes * (1 + n_packed) + x_bytes
    transient = 8 * N * K + w_bytes + x_bytes
    calls = 3 * M * K + 12 * M * N
    peak = max(transient, built) + calls
    return dict(n_bf16=n_bf16, n_bf16_built=n_bf16_built, n_packed=n_packed, peak_bytes=peak)


class CappedSite(Site):
    """``sites.Site`` with at most ``max_bf16_copies`` rotating bf16 weight copies (>= 1)."""

    def __init__(self, M, K, N, max_bf16_copies: int, seed: int = 0):
        super().__init__(M, K, N, seed=seed)
        if len(self.w_copies) > max_bf16_copies:
            self.w_copies = self.w_copies[:max(1, max_bf16_copies)]
            self.n_bf16 = len(self.w_copies)
            torch.cuda.empty_cache()


# ------------------------------------------------------------------ one shape


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:200] if lines else ""


def measure_shape(M: int, K: int, N: int, mem_limit: int) -> dict:
    """One shape: the memory guard, the reference check, then bitfx / bf16 eager / bf16 Inductor."""
    row = dict(M=M, K=K, N=N, status="ok", reason="", err=float("nan"), bitfx_us=float("nan"),
               bf16_us=float("nan"), bf16_compile_us=float("nan"))
    row.update(kernel_choice(M, K, N, torch.device("cuda", torch.cuda.current_device())))
    plan = plan_memory(M, K, N)
    row.update(n_bf16_copies=plan["n_bf16"], n_packed_copies=plan["n_packed"], est_gb=plan["peak_bytes"] / 1e9)
    if plan["peak_bytes"] > mem_limit:
        row.update(status="skipped", reason=f"estimated peak {plan['peak_bytes'] / 1e9:.1f} GB of GPU memory "
                                            f"> the {mem_limit / 1e9:.1f} GB guard", seconds=0.0)
        return row
    t0 = time.time()
    compiles0 = compile_count()
    site = None
    try:
        site = CappedSite(M, K, N, plan["n_bf16"])
        row["err"] = site.check()
        row["check_s"] = time.time() - t0
        row["bitfx_us"] = time_graph([site.bitfx_fn(p) for p in site.packed_copies]) * 1e6
        row["bf16_us"] = time_graph([site.bf16_fn(w) for w in site.w_copies]) * 1e6
        compiled = compiled_bf16()
        row["bf16_compile_us"] = time_graph([site.bf16_fn(w, compiled) for w in site.w_copies]) * 1e6
    except (torch.cuda.OutOfMemoryError, MemoryError) as e:
        row.update(status="skipped", reason=f"out of memory ({type(e).__name__}): {_first_line(e)}")
    except Exception as e:  # noqa: BLE001 (recorded as a failed shape; the run goes on)
        row.update(status="failed", reason=f"{type(e).__name__}: {_first_line(e)}")
    finally:
        site = None
        gc.collect()
        torch.cuda.empty_cache()
    row["compiles"] = compile_count() - compiles0  # new Inductor graphs (the first shape, and M = 1)
    row["seconds"] = time.time() - t0
    if row["status"] == "ok":
        row["vs_inductor"] = row["bf16_compile_us"] / row["bitfx_us"]
        row["vs_eager"] = row["bf16_us"] / row["bitfx_us"]
    return row


# ------------------------------------------------------------------ report


def _ratio(r: dict, key: str) -> float:
    """The row's ``key`` time over its bitfx time (NaN where either is missing)."""
    return report.ratio(r.get(key), r.get("bitfx_us"))


def _sort_key(r: dict):
    x = _ratio(r, "bf16_compile_us")
    return (math.isnan(x), x if not math.isnan(x) else 0.0, r["M"], r["K"], r["N"])


def _is_error(r: dict) -> bool:
    err = r.get("err", float("nan"))
    return math.isnan(err) or err > ERR_LIMIT


def _fmt_na(x: float, spec: str) -> str:
    return report.fmt(x, spec, "n/a")


def _shape(r: dict) -> str:
    return f"M={r['M']} K={r['K']} N={r['N']}"


def summary(results: dict) -> str:
    """The one-line verdict of a run (``results`` as written to results.json)."""
    rows = results["rows"]
    ok = sorted([r for r in rows if r["status"] == "ok"], key=_sort_key)
    skipped = [r for r in rows if r["status"] == "skipped"]
    failed = [r for r in rows if r["status"] == "failed"]
    parts = [f"{len(ok)} shapes measured"]
    if skipped or failed or results.get("not_run"):
        parts[0] += (f" ({len(skipped)} skipped, {len(failed)} failed, "
                     f"{len(results.get('not_run', []))} not run for the time budget)")
    ratios = [r for r in ok if not math.isnan(_ratio(r, "bf16_compile_us"))]
    if ratios:
        low = ratios[0]
        parts.append(f"lowest vs Inductor {_ratio(low, 'bf16_compile_us'):.2f}x at {_shape(low)}")
        parts.append(f"{sum(_ratio(r, 'bf16_compile_us') < 1.0 for r in ratios)} below 1.0")
    else:
        parts.append("no ratio measured")
    prefill = [r for r in ratios if r["M"] >= PREFILL_M]
    if prefill:
        low = prefill[0]
        x = _ratio(low, "bf16_compile_us")
        below = sum(_ratio(r, "bf16_compile_us") < PREFILL_TARGET for r in prefill)
        met = "met" if below == 0 else "NOT met"
        parts.append(f"M >= {PREFILL_M}: lowest {x:.2f}x at {_shape(low)}, {below} of {len(prefill)} below "
                     f"{PREFILL_TARGET:g}x (target >= {PREFILL_TARGET:g}x: {met})")
    else:
        parts.append(f"M >= {PREFILL_M}: none measured")
    decode = [r for r in ratios if r["M"] == 1 and r["K"] * r["N"] >= DECODE_KN]
    if decode:
        d = decode[0]
        x = _ratio(d, "bf16_compile_us")
        met = "met" if x >= DECODE_TARGET else "NOT met"
        parts.append(f"decode (M=1, K*N >= 2^24): lowest {x:.2f}x at {_shape(d)} "
                     f"(target >= {DECODE_TARGET:g}x: {met}, {len(decode)} shapes)")
    else:
        parts.append("decode (M=1, K*N >= 2^24): none measured")
    parts.append(f"{sum(_is_error(r) for r in ok)} with rel err > {ERR_LIMIT:g}")
    return "Summary: " + "; ".join(parts)


def render(results: dict) -> str:
    """The Markdown report of a run: the measured shapes sorted by ``vs Inductor`` (lowest
    first; below 1.0 in bold), the summary, and the shapes skipped, failed or not run."""
    rows = results["rows"]
    ok = sorted([r for r in rows if r["status"] == "ok"], key=_sort_key)
    lines = []
    if results.get("header"):
        lines += [results["header"], ""]
    lines.append("| M | K | N | bitfx µs | bf16 µs | bf16 Inductor µs | vs Inductor | vs eager | rel err | kernel |")
    lines.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in ok:
        vs_ind = _ratio(r, "bf16_compile_us")
        ind = _fmt_na(vs_ind, ".2f") + ("x" if not math.isnan(vs_ind) else "")
        if vs_ind < 1.0:
            ind = f"**{ind}**"
        vs_eager = _ratio(r, "bf16_us")
        err = _fmt_na(r.get("err", float("nan")), ".1e") + (" ERROR" if _is_error(r) else "")
        lines.append(
            f"| {r['M']} | {r['K']} | {r['N']} | {_fmt_na(r['bitfx_us'], '.1f')} | {_fmt_na(r['bf16_us'], '.1f')} | "
            f"{_fmt_na(r['bf16_compile_us'], '.1f')} | {ind} | {_fmt_na(vs_eager, '.2f')}"
            f"{'x' if not math.isnan(vs_eager) else ''} | {err} | {_kernel_cell(r)} |"
        )
    lines.append("")
    lines.append(summary(results))
    below = [r for r in ok if _ratio(r, "bf16_compile_us") < 1.0]
    if below:
        lines.append("Slower than bf16 under Inductor: " + ", ".join(
            f"{_shape(r)} ({_ratio(r, 'bf16_compile_us'):.2f}x, {_kernel_cell(r)})" for r in below))
    errors = [r for r in ok if _is_error(r)]
    if errors:
        lines.append(f"ERROR (rel err > {ERR_LIMIT:g}): " + ", ".join(
            f"{_shape(r)} ({_fmt_na(r.get('err', float('nan')), '.2e')})" for r in errors))
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"{r['status']}: {_shape(r)}: {r.get('reason', '')}")
    if results.get("not_run"):
        lines.append(f"not run (time budget): {len(results['not_run'])} shapes: "
                     + ", ".join(f"{M}x{K}x{N}" for M, K, N in results["not_run"]))
    lines.append("")
    lines.append("vs Inductor = bf16 Inductor µs / bitfx µs; vs eager = bf16 µs / bitfx µs (> 1: bitfx faster). "
                 "kernel: ternary_matmul's path and tile (q rows x weight rows x packed K bytes; dp4a: x K words), "
                 "skN = split-K in N parts.")
    return "\n".join(lines)


def _line(i: int, n: int, r: dict) -> str:
    head = f"[{i:>3}/{n}] M={r['M']:<5} K={r['K']:<5} N={r['N']:<5} {_kernel_cell(r):<24}"
    if r["status"] != "ok":
        return f"{head} {r['status'].upper()}: {r['reason']}"
    vs_ind = _ratio(r, "bf16_compile_us")
    flag = "  <-- SLOWER than bf16 Inductor" if vs_ind < 1.0 else ""
    if _is_error(r):
        flag += f"  <-- ERROR rel err > {ERR_LIMIT:g}"
    return (f"{head} bitfx {r['bitfx_us']:9.1f} µs  bf16 {r['bf16_us']:9.1f}  Inductor {r['bf16_compile_us']:9.1f}  "
            f"vs Inductor {vs_ind:5.2f}x  vs eager {_ratio(r, 'bf16_us'):5.2f}x  err {r['err']:.1e}  "
            f"({r['seconds']:.1f} s{', compiled' if r.get('compiles') else ''}){flag}")


# ------------------------------------------------------------------ main


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = report.parser("shapes", __doc__)
    p.add_argument("--n", type=int, default=None, help="number of random shapes (default 40; 8 with --quick)")
    p.add_argument("--seed", type=int, default=None,
                   help="repeat the shapes of the run with this seed (default: a fresh seed each run, printed)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="stop starting new shapes after this many seconds (default 240; 90 with --quick)")
    p.add_argument("--out", default=os.path.join("bench_out", "shapes"))
    p.add_argument("--shapes", default=None, help="explicit shapes 'M,K,N;M,K,N' instead of random ones")
    p.add_argument("--quick", action="store_true", help="a smoke run: 8 shapes, 90 s budget")
    args = p.parse_args(argv)
    if args.seed is None:
        args.seed = fresh_seed()
    n = args.n if args.n is not None else (8 if args.quick else 40)
    budget = args.budget_s if args.budget_s is not None else (90.0 if args.quick else 240.0)
    try:
        shapes = parse_shapes(args.shapes) if args.shapes else draw_shapes(n, args.seed)
    except ValueError as e:
        p.error(str(e))
    report.need_cuda("shapes")

    t0 = time.time()
    # Dynamic shapes give one Inductor graph for M > 1 and one for M = 1; a higher recompile
    # limit keeps any further specialization compiled rather than silently falling back to eager.
    from torch._dynamo import config as dynamo_config

    if hasattr(dynamo_config, "recompile_limit"):
        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 64)
    os.makedirs(args.out, exist_ok=True)
    free, _ = torch.cuda.mem_get_info()
    mem_limit = int(min(MEMORY_GUARD_BYTES, 0.9 * free))
    source = f"--shapes (explicit, {len(shapes)})" if args.shapes else f"{len(shapes)} random shapes, seed {args.seed}"
    header = report.header(report.device_name(), {"torch": torch.__version__, "triton": report.version("triton")},
                           report.command("shapes", argv), source, f"budget {budget:g} s")
    print(header, flush=True)
    results = {"header": header, "seed": args.seed, "shapes": [list(s) for s in shapes], "rows": [], "not_run": [],
               "memory_guard_gb": mem_limit / 1e9}
    json_path = os.path.join(args.out, "results.json")
    try:
        for i, (M, K, N) in enumerate(shapes):
            if time.time() - t0 > budget:
                results["not_run"] = [list(s) for s in shapes[i:]]
                print(f"time budget of {budget:g} s spent: {len(shapes) - i} shapes not run", flush=True)
                break
            r = measure_shape(M, K, N, mem_limit)
            results["rows"].append(r)
            print(_line(i + 1, len(shapes), r), flush=True)
            results["elapsed_s"] = time.time() - t0
            report.write_json(json_path, results)
            if r["status"] == "failed" and any(s in r["reason"] for s in ("CUDA error", "[CUDA]", "illegal")):
                results["not_run"] = [list(s) for s in shapes[i + 1:]]
                print("a CUDA error leaves the context unusable: stopping", flush=True)
                break
    except KeyboardInterrupt:
        done = len(results["rows"])
        results["not_run"] = [list(s) for s in shapes[done:]]
        print("interrupted: reporting what was measured", flush=True)
    results["elapsed_s"] = time.time() - t0
    table = render(results)
    report.write_results(args.out, results, table)
    print(f"\n(total {results['elapsed_s']:.0f} s; {json_path}, {os.path.join(args.out, 'table.md')})\n")
    print(table, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
