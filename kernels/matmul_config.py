"""The launch rules of the ternary matmul (:mod:`bitfx.kernels.ternary_matmul`): the path for
each M, the block sizes, K splits and tensor-core tiles of each path, and the once-per-shape
measurement of the tensor-core tile on a GPU. Pure host code; the measurements behind the
fixed rules are in BENCHMARKS.md ("Launch choices")."""

from __future__ import annotations

import torch

from bitfx import layout
from bitfx.kernels._utils import cdiv, env, interpreting, next_pow2, num_sms, pdl_enabled

DP4A_MAX_M = 1
"""Largest M that takes the CUDA-core ``"dp4a"`` GEMV by default (BENCHMARKS.md, "Launch choices")."""

SIMT_MAX_M = 0
"""Largest M that takes the CUDA-core ``"simt"`` path by default (0: never; set from benchmarks)."""

GEMV_MAX_M = 64
"""Largest M that takes the weight-streaming ``"gemv"`` path by default; larger M take ``"tc"``."""

_PATHS = ("dp4a", "simt", "gemv", "tc")


# (BLOCK_M, BLOCK_N, BLOCK_KQ, num_warps, fill) of the tensor-core path, largest first: a tile is
# taken when it gives at least ``fill`` x (number of SMs) tiles (measurements: BENCHMARKS.md,
# "Launch choices").
_TC_TILES = ((128, 256, 64, 8, 0.9), (128, 128, 64, 8, 1.0), (128, 64, 64, 4, 1.0), (64, 64, 128, 4, 1.0))

_TUNABLE = ("BLOCK_M", "BLOCK_N", "BLOCK_KQ", "GROUP_M", "OFFSET_TRICK", "num_warps", "num_stages", "PDL", "PREFETCH")



_CONFIGS: dict = {}


def _memo(fn):
    """``fn``'s configuration, computed once per shape, device and environment (the host time
    of a launch counts at decode); with an ``override`` it is computed afresh."""
    def cached(*args):
        if any(isinstance(a, dict) for a in args):
            return fn(*args)
        key = (fn.__name__, *args, env("BITFX_PDL"), env("TRITON_INTERPRET"))
        cfg = _CONFIGS.get(key)
        if cfg is None:
            cfg = _CONFIGS[key] = fn(*args)
        return cfg
    cached.__wrapped__ = fn
    cached.__doc__ = fn.__doc__
    return cached


@_memo
def _config(M: int, N: int, Kq: int, device: torch.device, path: str, split_k: int | None,
            override: dict | None = None, tile: tuple | None = None) -> dict:
    """Block sizes, K split and flags of one launch: a deterministic heuristic, except the
    tensor-core tile where ``tile`` (``_tuned_tile``'s measurement) is given.

    ``override`` replaces any of ``_TUNABLE`` (benchmarks and tuning sweeps use it).
    """
    if path == "simt":
        # CUDA cores, 8 KB of packed weight per step; the [BLOCK_N, BLOCK_M, BLOCK_KQ] products
        # stay at 8K elements (64 registers a thread) for every BLOCK_M.
        block_m = min(next_pow2(M), 4)
        block_n, block_kq = min(32, next_pow2(N)), 256 // block_m
        cfg = dict(BLOCK_M=block_m, GROUP_M=1, USE_DOT=False, OFFSET_TRICK=True, num_warps=4, num_stages=3)
    elif path == "gemv":
        # Weight streaming: 8 KB of packed weight per step; BLOCK_N = 64 is one warpgroup's wgmma
        # m, and q (M padded to 16 .. 64) its n. Raw codes + row sums of q are cheaper than
        # c - 1 while BLOCK_M < BLOCK_N.
        block_m = min(max(16, next_pow2(M)), 64)
        block_n, block_kq = 64, 128
        cfg = dict(BLOCK_M=block_m, GROUP_M=1, USE_DOT=True, OFFSET_TRICK=block_m <= 32, num_warps=4,
                   num_stages=4 if block_m <= 32 else 3)  # 40 KB of shared memory a stage at BLOCK_M = 64
    else:
        # Tensor cores: t = c - 1 keeps q a pure cp.async -> shared -> wgmma operand (no row sums
        # in registers). The largest tile that still gives every SM a tile: 128 (q rows) x 256
        # (weight rows) for prefill, down to 64 x 64 for a few hundred rows.
        # The rule picks a first guess; on a GPU, the tile is then measured once per shape (M in
        # steps of 128) among all of _TC_TILES and the fastest kept (_tuned_tile): wave
        # quantization and occupancy make the best tile shape-dependent in ways a rule misses.
        for block_m, block_n, block_kq, warps, fill in _TC_TILES:
            if cdiv(M, block_m) * cdiv(N, block_n) >= fill * num_sms(device):
                break
        if tile is not None:  # measured (_tuned_tile)
            block_m, block_n, block_kq, warps = tile
        cfg = dict(BLOCK_M=block_m, GROUP_M=8, USE_DOT=True, OFFSET_TRICK=False, num_warps=warps, num_stages=3)
    # Programmatic dependent launch (see _pdl_prologue) is off on these paths: it lost at M=16
    # on most shapes (BENCHMARKS.md, "Launch choices").
    cfg["PDL"] = False
    cfg["PREFETCH"] = True
    if interpreting():  # small blocks: small test shapes still cover several tiles, steps and groups
        block_n, block_kq = min(block_n, 16), 32
        if cfg["USE_DOT"]:
            block_m = cfg["BLOCK_M"] = 16
            cfg["GROUP_M"] = min(cfg["GROUP_M"], 2)
    if override:
        unknown = set(override) - set(_TUNABLE)
        if unknown:
            raise ValueError(f"ternary_matmul: unknown config keys {sorted(unknown)}; tunable: {_TUNABLE}")
        cfg.update(override)
        block_m = cfg["BLOCK_M"]
        block_n = override.get("BLOCK_N", block_n)
        block_kq = override.get("BLOCK_KQ", block_kq)
    # Short rows: no longer step than the row (tl.dot wants K >= 16, int8 MMAs K = 32).
    block_kq = min(block_kq, max(next_pow2(Kq), 32 if cfg["USE_DOT"] else 16))

    tiles = cdiv(M, block_m) * cdiv(N, block_n)
    steps = cdiv(Kq, block_kq)
    if split_k is None and path == "gemv":
        # Split long rows only (>= 24 steps), in chunks of >= 7 steps: a short row loses more to
        # the zeroed workspace (one more launch) than it gains (BENCHMARKS.md, "Launch choices").
        split_k = min(4, steps // 7) if 2 * tiles <= num_sms(device) and steps >= 24 else 1
    elif split_k is None:  # split K only when the output tiles alone leave most SMs idle
        split_k = num_sms(device) // tiles if 4 * tiles <= num_sms(device) else 1
    split_k = max(1, min(int(split_k), steps))
    steps_per_split = cdiv(steps, split_k)
    split_k = cdiv(steps, steps_per_split)  # no empty splits
    cfg.update(BLOCK_N=block_n, BLOCK_KQ=block_kq, SPLIT_K=split_k, steps_per_split=steps_per_split, tiles=tiles)
    cfg["PDL"] = bool(cfg["PDL"]) and pdl_enabled(device)
    # Inline PTX on NVIDIA GPUs only (not in the interpreter, not on ROCm).
    cfg["USE_ASM"] = device.type == "cuda" and torch.version.hip is None and not interpreting()
    return cfg


_TUNED: dict = {}


def _tuned_tile(M: int, N: int, Kq: int, device: torch.device) -> tuple | None:
    """The fastest of ``_TC_TILES`` for ``M`` (rounded up to a multiple of 128), N and Kq on
    ``device``, timed once on random operands with CUDA events (median of 5 after a warm-up)
    and cached for the process. None while a CUDA graph is being captured (no timing is
    possible then; the rule's tile is used, and nothing is cached)."""
    Mb = cdiv(M, 128) * 128
    key = (Mb, N, Kq, device)
    if key in _TUNED:
        return _TUNED[key]
    if torch.cuda.is_current_stream_capturing():
        return None
    import statistics

    from bitfx.kernels.ternary_matmul import _launch  # the kernel's module imports these rules

    K = Kq * layout.PLANES
    q = torch.randint(-128, 128, (Mb, K), dtype=torch.int8, device=device)
    packed = torch.randint(0, 255, (N, Kq), dtype=torch.uint8, device=device) & 0x55  # codes 0 and 1 only
    x_scale = torch.ones(Mb, device=device)
    w_scale = torch.ones(N, device=device)

    def candidate(over):
        return lambda: _launch("ternary_matmul", q, x_scale, packed, w_scale, None, torch.bfloat16, True, "tc", None,
                               over)

    tiles = [(block_m, block_n, block_kq, warps) for block_m, block_n, block_kq, warps, _ in _TC_TILES]
    runs = [candidate(dict(BLOCK_M=m, BLOCK_N=n, BLOCK_KQ=kq, num_warps=w)) for m, n, kq, w in tiles]
    _first_launches(runs, device)
    best, best_t = None, float("inf")
    for tile, run in zip(tiles, runs):
        run()
        times = []
        for _ in range(5):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        t = statistics.median(times)
        if t < best_t:
            best, best_t = tile, t
    _TUNED[key] = best
    return best


def _first_launches(runs: list, device: torch.device) -> None:
    """The first launch of each of ``runs``, each from a thread of its own, so that Triton
    compiles the kernels side by side (its compiler passes and ptxas run outside the GIL: four
    tiles compiled for sm_90 on a 2-core CPU took 4.97 s one after another, 3.18 s side by
    side) instead of one after another; the tile measurement of a new shape was 5.4 s of a
    350M training step's first call on an H100 (BENCHMARKS.md). A thread launches on its own
    current stream (the device's default one), so the device is synchronized before (the
    operands were made on the caller's stream) and after. An error in any launch is raised here."""
    from concurrent.futures import ThreadPoolExecutor

    torch.cuda.synchronize(device)

    def first(run):
        with torch.cuda.device(device):
            run()

    with ThreadPoolExecutor(max_workers=len(runs)) as pool:
        for done in [pool.submit(first, run) for run in runs]:
            done.result()
    torch.cuda.synchronize(device)


def _default_path(M: int) -> str:
    """The dispatch on M: ``"dp4a"`` up to DP4A_MAX_M, ``"simt"`` up to SIMT_MAX_M, ``"gemv"`` up to
    GEMV_MAX_M, else ``"tc"``."""
    if M <= DP4A_MAX_M:
        return "dp4a"
    return "simt" if M <= SIMT_MAX_M else "gemv" if M <= GEMV_MAX_M else "tc"


@_memo
def _dp4a_config(M: int, N: int, Kq: int, device: torch.device, split_k: int | None, override: dict | None,
                 sms: int | None = None) -> dict:
    """Block sizes and K split of the dp4a GEMV (see ``_config``); ``sms``: size the split for
    that many SMs instead of ``device``'s (``python -m bitfx.bench sass``)."""
    # M = 1: one warp per program, 4 weight rows x 256 words (1 KB each) per step, loaded
    # evict-first, launched with programmatic dependent launch and an L2 prefetch of the
    # program's weights: within 3% of each swept shape's best (BENCHMARKS.md, "Launch choices").
    cfg = dict(BLOCK_M=min(next_pow2(max(M, 1)), 4), BLOCK_N=4, BLOCK_W=256, num_warps=1, num_stages=1,
               STREAM_HINT=True, PDL=pdl_enabled(device), PREFETCH=True)
    if interpreting():
        cfg.update(BLOCK_N=8, BLOCK_W=8)
    if override:
        unknown = set(override) - set(cfg)
        if unknown:
            raise ValueError(f"ternary_matmul: unknown dp4a config keys {sorted(unknown)}; tunable: {tuple(cfg)}")
        cfg.update(override)
    kq4 = Kq // 4
    cfg["BLOCK_W"] = min(cfg["BLOCK_W"], next_pow2(kq4))
    tiles_n = cdiv(N, cfg["BLOCK_N"])
    tiles_m = cdiv(M, cfg["BLOCK_M"])
    steps = cdiv(kq4, cfg["BLOCK_W"])
    if split_k is None:  # split K only while the output tiles alone leave the SMs short of two waves
        split_k = max(1, 2 * (num_sms(device) if sms is None else sms) // (tiles_n * tiles_m))
    split_k = max(1, min(int(split_k), steps))
    steps_per_split = cdiv(steps, split_k)
    split_k = cdiv(steps, steps_per_split)
    cfg.update(SPLIT_K=split_k, words_per_split=steps_per_split * cfg["BLOCK_W"], tiles_n=tiles_n, tiles_m=tiles_m)
    cfg["PDL"] = bool(cfg["PDL"]) and pdl_enabled(device)
    cfg["USE_ASM"] = device.type == "cuda" and torch.version.hip is None and not interpreting()
    return cfg
