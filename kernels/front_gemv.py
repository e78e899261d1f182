"""The whole ternary linear of one token in one kernel: RMSNorm (or none), per-token int8
quantization and the dp4a GEMV.

A decode step runs every site as two kernels, ``norm_quant`` (a few microseconds, most of it
the launch) and the ternary GEMV. Here each program of the GEMV computes the row's statistics
itself (``rstd`` and the absmax scale ``s_x``, by the formulas and helpers of
:mod:`bitfx.kernels.norm_quant`), then makes the activation codes of each K step as it needs
them, packed four to a 32-bit word, and meets them with its weight rows in ``dp4a``
instructions as :func:`bitfx.kernels.ternary_matmul._ternary_dp4a_kernel` does::

    program (pid_n, m):  rstd, s_x of row m          (every program of the row, the same numbers)
                         for each K step:  codes q[m, k] of the step -> words -> dp4a with
                                           BLOCK_N weight rows
                         out[m, n] = (sum q c - sum q) * (1 / s_x) * (1 / s_w) + b

The codes never reach memory, and a site is one launch. The price is that every program
quantizes the whole row (a few thousand elements, read from L1/L2), so programs are few and
wide (:func:`front_config`), and the cost grows with the rows: :data:`FRONT_MAX_M` bounds
where it is used. Compiled steps take it only with ``BITFX_FRONT_GEMV=1`` (:func:`enabled`): timed on
the H200 in the BitNet 2B4T decode step under CUDA graphs it is slower than the two kernels,
2.115 ms per step against 1.657 ms (120 sites; about 4 µs more per site): every program's pass
over the whole row costs more than the launch it saves (BENCHMARKS.md). An eager ``BitfxLinear``
takes it by default: there each launch costs the host more than the kernels run, so it takes it
for more rows too, while their re-reads stay small (:func:`takes_rows`).

The same kernel serves an eager norm module (:mod:`bitfx.fused_norm`): :func:`front_norm`
launches the norm alone (one program per row, ``GEMV`` off) and :func:`front_norm_parts` the
norm with the linears that read its output, the first program of each row storing the normed
row (``WRITE_Y``). Both compute ``rstd`` with the same helper, chunks and warps, so their ``y``
is the same bit for bit, and each linear's codes are made from the very values stored.

Numbers: given the row's ``rstd`` and ``s_x``, the codes are those of ``norm_quant``
(the same elementwise helpers, the products an add follows as ``mul.rn``) and the epilogue
is the GEMV's, so the output equals ``norm_quant`` followed by the GEMV bit for bit whenever the
row's sum of squares is exact (any order of an exact sum gives it); otherwise ``rstd`` may differ
in its last bit from ``norm_quant``'s (another reduction order, as SPEC allows for the norm).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from bitfx.kernels._launch import Launcher
from bitfx.kernels._utils import cdiv, env, interpreting, next_pow2, num_sms, pdl_enabled
from bitfx.kernels.norm_quant import (_absmax_scale, _load_norm_chunk, _quantize, _round_code, _row_rstd, _row_stats,
                                      check_norm_args)
from bitfx.kernels.ternary_matmul import _dp4a, _dp4a_plane, _pdl_prologue

__all__ = ["front_gemv", "front_gemv_parts", "front_norm", "front_norm_parts", "MAX_PARTS", "FRONT_MAX_M", "EAGER_BYTES",
           "front_config", "takes_rows", "launch_class", "enabled"]

# Rows up to this many take the fused kernel (one program row per token; each row re-reads the
# weights, from L2 after the first). More rows: norm_quant and the GEMV, which reads them once.
FRONT_MAX_M = 1
# An eager call takes it for more rows while the bytes its programs read, every row's pass over
# the packed weight and each program's two passes over its row, stay within this many: about
# 1.5-3 us of an H100's or H200's L2 bandwidth, less than the host spends on the second launch
# it saves (the host sets an eager call's pace). A small layer (the main job's 256 x 704) takes
# it for about a hundred rows, a 2560 x 2560 one for two.
EAGER_BYTES = 8 << 20
_MAX_GRID_ROWS = 65535  # the grid's second dimension: one program row per token
# Warps per program: every program quantizes its whole row, which with one warp (the dp4a
# GEMV's choice) costs a few thousand instructions per thread (about 3.7k in the sm_90 SASS of
# the loop for 4 x 256 words); spread over 8 warps, about 1.1k for 4096 weight words.
_NUM_WARPS = 8
# The row passes read chunks of up to this many elements (16 per thread).
_ROW_CHUNK = 4096
# Weight words held per program and step: BLOCK_N x BLOCK_W (16 per thread).
_TILE_WORDS = 4096
# Registers a thread may take (Triton's ``maxnreg``; direct CUDA launches: Inductor's launches of
# the traced form take warps and stages only). The programs are about one per SM, so occupancy
# gains little from fewer. Left to itself, the ptxas of Triton 3.6 holds an 8-warp program to 64
# registers and spills at K=2048, N=3072 (8 stack bytes, sm_90); with this bound it takes 115-120
# and spills nowhere (Triton 3.9: 72-74 without it, 115-120 with it, no spills either way).
# Timed on an H100 (Triton 3.6, M=1, bf16; BENCHMARKS.md), in us without / with the bound:
# 17.9 / 9.5 (2048 x 3072), 11.9 / 10.8, 29.3 / 16.5 (2560 x 13824), 16.4 / 16.9, 15.2 / 29.3
# (4096 x 6144, the one tile of 64 rows), 41.1 / 44.0, 28.9 / 28.4: 8% less time over the seven
# shapes (geometric mean), one of them slower.
_MAX_REGS = 128


def enabled(eager: bool = False) -> bool:
    """Whether ``bitfx::ternary_linear`` (and an eager ``BitfxLinear``) takes this kernel for few
    rows. ``BITFX_FRONT_GEMV=1``: everywhere; ``=0``: nowhere; unset: for an ``eager`` call only.
    Eager, the host sets the pace (two launches cost it more than either kernel runs), so one
    launch wins; in a compiled step, and above all under CUDA graphs, launches are cheap and the
    two kernels measured faster (module docstring)."""
    value = env("BITFX_FRONT_GEMV")
    if value is None or value == "":
        return eager
    if value not in ("0", "1"):
        raise ValueError(f"BITFX_FRONT_GEMV must be 0 or 1 (or unset), got {value!r}")
    return value == "1"


@triton.jit
def _code_words(X, W, start, live, K, rstd, scale, bad, NORM: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                OFFSET: tl.constexpr, CAST_BEFORE_WEIGHT: tl.constexpr, X_ROUND: tl.constexpr,
                Y_ROUND: tl.constexpr, QMAX: tl.constexpr, RN_MUL: tl.constexpr, EVEN_W: tl.constexpr):
    """The int8 codes of columns ``start .. start + 3`` of the row at ``X``, packed into one int32
    word each (byte b: column start + b): ``[BLOCK_W]`` from ``start [BLOCK_W]``. The four
    columns of a word are adjacent, so they are read as one ``[BLOCK_W, 4]`` tile (vector
    loads); columns past K read 0, and words not ``live`` (past the packed row) are 0."""
    b = tl.arange(0, 4)
    y = _load_norm_chunk(X, W, start[:, None] + b[None, :], K, rstd, NORM, HAS_WEIGHT, OFFSET, CAST_BEFORE_WEIGHT,
                         X_ROUND, Y_ROUND)
    code = _quantize(y, scale, bad, QMAX, RN_MUL).to(tl.int32)
    word = tl.sum((code & 0xFF) << (8 * b)[None, :], axis=1)  # disjoint bytes: the sum is their OR
    if not EVEN_W:
        word = tl.where(live, word, 0)
    return word


@triton.jit
def _front_gemv_kernel(
    X,  # [M, K] float activations, row stride stride_x
    W,  # [K] norm weight (unused unless HAS_WEIGHT)
    w_ptr,  # packed weight as int32 words [N, Kq4] (uint8 rows with BYTE_PTRS)
    sw_ptr, bias_ptr, out_ptr,  # s_w fp32 [N], bias [N], out [M, N]
    SX,  # [M] fp32 out: s_x (written by the first program of each row, if WRITE_SX)
    Y,  # [M, K] out, contiguous: the normed rows (written by the first program of each row, if WRITE_Y)
    # Parts 1..3 (PARTS > 1): the packed words, s_w and bias of further linears of the same rows,
    # N1..N3 their output rows, T1..T3 the first program (along axis 0) of each, C1..C3 the
    # first column of each in the concatenated output.
    w1, w2, w3, sw1, sw2, sw3, b1, b2, b3, N1, N2, N3, T1, T2, T3, C1, C2, C3,
    N, K, Kq4, stride_x, stride_wn, stride_om, eps,
    NORM: tl.constexpr, HAS_WEIGHT: tl.constexpr, OFFSET: tl.constexpr, CAST_BEFORE_WEIGHT: tl.constexpr,
    X_ROUND: tl.constexpr, Y_ROUND: tl.constexpr, QMAX: tl.constexpr,
    BLOCK_K: tl.constexpr,  # chunk of the row passes
    BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
    EVEN_W: tl.constexpr,  # BLOCK_W divides Kq4
    USE_ASM: tl.constexpr, HAS_BIAS: tl.constexpr, STREAM_HINT: tl.constexpr,
    PDL: tl.constexpr, PREFETCH: tl.constexpr, RN_MUL: tl.constexpr, BYTE_PTRS: tl.constexpr,
    WRITE_SX: tl.constexpr,
    PARTS: tl.constexpr,  # linears sharing the rows: 1 (w_ptr ...) to 4 (and w1 .. w3 ...)
    WRITE_Y: tl.constexpr,  # store the normed rows y (NORM)
    GEMV: tl.constexpr,  # the linears; False: the norm alone (WRITE_Y), one program per row
):
    """Program ``(pid_n, m)``: ``out[m, BLOCK_N rows]`` of the ternary linear of row ``m`` of X
    (module docstring). With ``PARTS`` > 1, several linears of the same rows in one launch: the
    programs from ``T_p`` on compute part ``p`` (its own weights, scales, bias and ``N_p`` rows),
    and part ``p`` of the output is its own contiguous ``[M, N_p]`` block at element ``M * C_p``
    (``C_p`` the parts' rows before it), so that each linear's output is a plain tensor.

    ``WRITE_Y``: the first program of each row also stores the row's ``y`` (the values its codes
    are made from); ``GEMV=False`` launches only that (a grid of one program per row): the
    norm's ``rstd`` comes from the same helper, chunks and warps either way, so the ``y`` of
    the norm alone is the ``y`` of the launch with its linears, bit for bit."""
    lead = tl.program_id(0) == 0
    row = tl.program_id(1).to(tl.int64)
    if GEMV:
        if BYTE_PTRS:
            w_ptr = w_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
        pid_n = tl.program_id(0)
        if PARTS > 1:  # the part of this program: the last whose first program it has reached
            first = tl.zeros((), tl.int32)
            col = tl.zeros((), tl.int64)
            for p in tl.static_range(1, PARTS):
                wp = w1 if p == 1 else (w2 if p == 2 else w3)
                swp = sw1 if p == 1 else (sw2 if p == 2 else sw3)
                bp = b1 if p == 1 else (b2 if p == 2 else b3)
                np_ = N1 if p == 1 else (N2 if p == 2 else N3)
                tp = T1 if p == 1 else (T2 if p == 2 else T3)
                cp = C1 if p == 1 else (C2 if p == 2 else C3)
                here = pid_n >= tp
                w_ptr = tl.where(here, wp, w_ptr)
                sw_ptr = tl.where(here, swp, sw_ptr)
                if HAS_BIAS:
                    bias_ptr = tl.where(here, bp, bias_ptr)
                N = tl.where(here, np_, N)
                first = tl.where(here, tp, first)
                col = tl.where(here, cp, col)
            out_ptr += col * tl.num_programs(1).to(tl.int64)  # part p's block: [M, N_p] after M * C_p elements
            stride_om = N
            pid_n -= first
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
        if PDL:  # weights into L2 while the kernel that wrote X finishes; X read after it has
            _pdl_prologue(w_ptr, offs_n, N, stride_wn, 0, Kq4, 4, PREFETCH)
    X += row * stride_x
    cols = tl.arange(0, BLOCK_K)

    # The row's statistics, as norm_quant's chunked passes compute them.
    if GEMV:
        rstd, amax = _row_stats(X, W, K, eps, cols, NORM, HAS_WEIGHT, OFFSET, CAST_BEFORE_WEIGHT, X_ROUND, Y_ROUND,
                                RN_MUL)
    else:
        rstd = _row_rstd(X, K, eps, cols, RN_MUL)  # _row_stats' first pass, alone
    if WRITE_Y:
        if lead:
            y_row = Y + row * K
            for k0 in range(0, K, BLOCK_K):
                c = k0 + cols
                y = _load_norm_chunk(X, W, c, K, rstd, NORM, HAS_WEIGHT, OFFSET, CAST_BEFORE_WEIGHT, X_ROUND, Y_ROUND)
                tl.store(y_row + c, y.to(y_row.dtype.element_ty), mask=c < K)

    if GEMV:
        scale, bad = _absmax_scale(amax, QMAX)
        if WRITE_SX:
            if pid_n == 0:
                tl.store(SX + row, scale)

        # The product: codes made per K step, four planes of BLOCK_W words each.
        acc = tl.zeros((BLOCK_N, BLOCK_W), dtype=tl.int32)
        qsum = tl.zeros((1, BLOCK_W), dtype=tl.int32)
        ones = tl.full((1, BLOCK_W), 0x01010101, tl.int32)
        Kq = 4 * Kq4  # columns per plane
        for w0 in range(0, Kq4, BLOCK_W):
            widx = w0 + tl.arange(0, BLOCK_W)
            live = widx < Kq4
            if EVEN_W:
                wmask = n_mask[:, None]
            else:
                wmask = n_mask[:, None] & live[None, :]
            if STREAM_HINT:
                wt = tl.load(w_rows + widx[None, :], mask=wmask, other=0, eviction_policy="evict_first")
            else:
                wt = tl.load(w_rows + widx[None, :], mask=wmask, other=0)
            for j in tl.static_range(4):
                qj = _code_words(X, W, j * Kq + 4 * widx, live, K, rstd, scale, bad, NORM, HAS_WEIGHT, OFFSET,
                                 CAST_BEFORE_WEIGHT, X_ROUND, Y_ROUND, QMAX, RN_MUL, EVEN_W)[None, :]
                acc = _dp4a_plane(wt, qj, j, acc, BLOCK_N, 1, BLOCK_W, USE_ASM)
                qsum = _dp4a(ones, qj, qsum, USE_ASM)
        total = tl.sum(acc, axis=1)[:, None] - tl.sum(qsum, axis=1)[None, :]  # [BLOCK_N, 1]

        # The GEMV's epilogue (_store_tile), with s_x from registers.
        inv_x = tl.math.div_rn(1.0, tl.zeros([1], dtype=tl.float32) + scale)
        inv_w = tl.math.div_rn(1.0, tl.load(sw_ptr + offs_n, mask=n_mask, other=1.0))
        out = total.to(tl.float32) * inv_x[None, :] * inv_w[:, None]
        if HAS_BIAS:
            out += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
        tl.store(out_ptr + row * stride_om + offs_n[:, None], out.to(out_ptr.dtype.element_ty),
                 mask=n_mask[:, None])


_FRONT = Launcher(_front_gemv_kernel)


def front_config(N: int, Kq: int, device: torch.device, sms: int | None = None, M: int = 1) -> dict:
    """Blocks of the fused kernel for ``M`` rows against ``N`` weight rows of ``Kq`` packed bytes.

    Every program quantizes its whole row (K elements, whatever its share of the weights), so
    the programs are few and large: about one per SM, ``BLOCK_N`` the power of two from 16 to
    128 nearest above ``M * N / SMs`` (several rows: fewer programs per row, so fewer passes over
    each row); ``BLOCK_W`` such that a step holds :data:`_TILE_WORDS`
    weight words (the whole packed row where it is shorter). The weights stream through L2
    ahead of the loads (the prefetch of :func:`_pdl_prologue`), so few programs still keep
    the memory busy."""
    sms = num_sms(device) if sms is None else sms  # (sms given: the rule for another GPU, bench sass)
    block_n = min(128, max(16, next_pow2(cdiv(N * max(M, 1), sms))))
    kq4 = Kq // 4
    block_w = max(1, min(_TILE_WORDS // block_n, next_pow2(kq4)))
    if interpreting():
        block_n, block_w = min(block_n, 8), min(block_w, 8)
    return dict(BLOCK_N=block_n, BLOCK_W=block_w, EVEN_W=kq4 % block_w == 0)


def takes_rows(M: int, N: int, Kq: int, K: int, x_bytes: int, device: torch.device, eager: bool) -> bool:
    """Whether ``M`` rows of ``K`` elements of ``x_bytes`` bytes each, against ``N`` packed rows
    of ``Kq`` bytes, take the fused kernel (where it is turned on and the operands suit it): up
    to :data:`FRONT_MAX_M` rows; an ``eager`` call more while its programs read at most
    :data:`EAGER_BYTES` (``M`` passes over the packed weight, two passes over a row per
    program)."""
    if M <= FRONT_MAX_M:
        return True
    if not eager or M > _MAX_GRID_ROWS:
        return False
    tiles = cdiv(N, front_config(N, Kq, device, M=M)["BLOCK_N"])
    return M * (N * Kq + 2 * tiles * K * x_bytes) <= EAGER_BYTES


def launch_class(M: int, N: int, Kq: int, device: torch.device) -> tuple:
    """What the launch for ``M`` rows depends on besides ``M`` (its grid's rows; ``M`` is no
    kernel argument): the blocks of :func:`front_config`. A bound launch (``bind=True``) serves
    every row count of its class."""
    return tuple(front_config(N, Kq, device, M=M).items())


MAX_PARTS = 4  # linears of one launch of :func:`front_gemv_parts`


_NO_PARTS = (None,) * 9 + (0,) * 9
"""The kernel's part arguments in a direct launch of one linear (PARTS=1: read by nothing).
None, not tensors: the compiled launcher reads each tensor argument's address on the host, per
launch, and specializes None away. A traced launch (Inductor's generated code) passes the
linear's own tensors there instead (:func:`_traced_parts`), the form its kernel signatures were
built and tested with."""


def _traced_parts(w, w_scale, bias) -> tuple:
    b = w_scale if bias is None else bias
    return (w, w, w, w_scale, w_scale, w_scale, b, b, b) + (0,) * 9


def front_gemv_parts(x, qmax, parts, out_dtype, bind=False):
    """The ternary linears ``parts`` (``[(packed, w_scale, bias), ...]``, 1 to :data:`MAX_PARTS`,
    all of ``x``'s row length, all with a bias or none) of the same rows ``x [M, K]``, in one
    launch: the rows quantized once per program as :func:`front_gemv` does (no norm), each
    part's programs against its own weights. Returns ``(outs, again)``: ``outs[p]`` the
    ``[M, N_p]`` output of part ``p``, bit for bit :func:`front_gemv`'s for that linear alone (the
    same codes, the same integer sums and epilogue); the parts are contiguous blocks of one
    allocation. ``again(x)`` (``bind``; else None) repeats the launch for another ``x`` of the
    same row length, strides, dtype, device and 16-byte alignment, any number of rows of this
    one's :func:`launch_class` for the parts' total rows, and returns the parts' outputs flat
    (``[M * N_p]``, for the caller to view in the shape it returns). The operands are the caller's to
    check, as for :func:`front_gemv` (the packed rows of every part contiguous, with one row
    stride, starting 4-byte aligned)."""
    if not 1 <= len(parts) <= MAX_PARTS:
        raise ValueError(f"front_gemv_parts: 1 to {MAX_PARTS} linears, got {len(parts)}")
    _, outs, again = _rows_launch("front_gemv_parts", x, None, qmax, parts, out_dtype, bind)
    return outs, again


def front_norm(x, weight, eps, offset, cast_before_weight, norm_dtype, bind=False):
    """RMSNorm alone, as this kernel computes it: ``y [M, K]`` of ``norm_dtype`` for ``x [M, K]``
    (rows of any stride, the last dimension contiguous), ``weight [K]`` or None, in the cast order
    of :func:`bitfx.kernels.norm_quant.norm_quant` (one program per row). Its ``y`` is bit for bit
    the ``y`` of :func:`front_norm_parts` for the same rows, whose linears quantize it, so an
    eager norm module gives the same numbers whether its linears run in its launch or after it.
    Against ``norm_quant``'s own ``y`` it may differ in ``rstd``'s last bit (another order of
    the fp32 sum of squares, as the norm's tolerance allows). ``bind``: also return
    ``again(x) -> y`` for another ``x`` of this one's row length, strides, dtype, device and
    16-byte alignment, any number of rows (None where nothing launched: empty rows)."""
    x, norm = _check_norm("front_norm", x, weight, eps, offset, cast_before_weight, norm_dtype)
    if x.shape[0] == 0 or x.shape[1] == 0:
        y = torch.empty(x.shape, dtype=norm_dtype, device=x.device)
        return (y, None) if bind else y
    y, _, again = _rows_launch("front_norm", x, norm, 127, (), None, bind)
    return (y, again) if bind else y


def front_norm_parts(x, weight, eps, offset, cast_before_weight, norm_dtype, qmax, parts, bind=False):
    """RMSNorm of ``x [M, K]`` and the ternary linears ``parts`` of the normed rows, in one launch:
    ``(y, outs, again)``. ``y`` is :func:`front_norm`'s bit for bit (the first program of each
    row stores it); ``outs[p]`` (``[M, N_p]``, of ``norm_dtype``) is bit for bit what
    :func:`front_gemv_parts` gives for ``y`` (each program makes the codes from the values it
    stores). ``again(x) -> (y, flat outputs)`` (``bind``) as :func:`front_gemv_parts`'s. The
    weights are the caller's to check, as there; ``x`` and the norm are checked here."""
    if not 1 <= len(parts) <= MAX_PARTS:
        raise ValueError(f"front_norm_parts: 1 to {MAX_PARTS} linears, got {len(parts)}")
    x, norm = _check_norm("front_norm_parts", x, weight, eps, offset, cast_before_weight, norm_dtype)
    return _rows_launch("front_norm_parts", x, norm, qmax, parts, norm_dtype, bind)


def _check_norm(name, x, weight, eps, offset, cast_before_weight, norm_dtype):
    """``x`` as rows and the norm's arguments as one tuple, checked as ``norm_quant`` checks them."""
    x, weight = check_norm_args(name, x, weight, norm_dtype)
    return x, (weight, float(eps), bool(offset), bool(cast_before_weight), norm_dtype)


def _rows_launch(name, x, norm, qmax, parts, out_dtype, bind):
    """One launch over the rows ``x [M, K]``: the linears ``parts`` (none: the norm alone, one
    program per row) of the rows, RMSNorm'd first where ``norm`` is given
    (``(weight, eps, offset, cast_before_weight, norm_dtype)``; its ``y`` stored). Returns
    ``(y or None, outs, again)``, ``again`` as the public functions above describe theirs."""
    P = len(parts)
    M, K = x.shape
    device = x.device
    if P:
        Kq = parts[0][0].shape[1]
        stride_w = parts[0][0].stride(0)
        has_bias = parts[0][2] is not None
        for packed, w_scale, bias in parts:
            if packed.shape[1] != Kq or packed.stride(0) != stride_w or (bias is not None) != has_bias:
                raise ValueError(f"{name}: the linears differ in packed row length, row stride or having a bias")
        ns = [p[0].shape[0] for p in parts]
        N = sum(ns)
        if M == 0 or K == 0 or min(ns) == 0:
            raise ValueError(f"{name}: empty operands (M={M}, K={K}, N={ns})")
        cfg = front_config(N, Kq, device, M=M)
        block_n = cfg["BLOCK_N"]
        tiles = [cdiv(n, block_n) for n in ns]
        firsts = [sum(tiles[:p]) for p in range(P)]
        cols = [sum(ns[:p]) for p in range(P)]
        ws = [p[0].view(torch.int32) for p in parts]
        pad = MAX_PARTS - P
        rest = lambda seq, fill: list(seq[1:]) + [fill] * pad  # noqa: E731 (parts 1..3)
        part_args = (*rest(ws, ws[0]), *rest([p[1] for p in parts], parts[0][1]),
                     *rest([p[2] if has_bias else p[1] for p in parts], parts[0][2] if has_bias else parts[0][1]),
                     *rest(ns, 0), *rest(firsts, 0), *rest(cols, 0))
        head = (ws[0], parts[0][1], parts[0][2])
        sizes = (ns[0], K, Kq // 4, x.stride(0), stride_w // 4, ns[0])
        grid_n = sum(tiles)
        blocks = dict(BLOCK_N=block_n, BLOCK_W=cfg["BLOCK_W"], EVEN_W=cfg["EVEN_W"])
    else:  # the norm alone: no weights to read (the GEMV's arguments are read by nothing)
        ns, N, part_args, head = [], 0, _NO_PARTS, (None, None, None)
        sizes = (0, K, 0, x.stride(0), 0, 0)
        grid_n = 1
        blocks = dict(BLOCK_N=16, BLOCK_W=1, EVEN_W=True)
    if norm is None:
        weight, eps, offset, cbw, norm_dtype = None, 0.0, False, False, torch.float32
    else:
        weight, eps, offset, cbw, norm_dtype = norm
    cuda = device.type == "cuda" and torch.version.hip is None and not interpreting()
    pdl = pdl_enabled(device) and P > 0
    flat = torch.empty(M * N, dtype=out_dtype, device=device) if P else None
    y = torch.empty((M, K), dtype=norm_dtype, device=device) if norm is not None else None
    w = x if weight is None else weight
    args = (x, w, *head, flat, flat, y, *part_args, *sizes, eps)
    # The same chunk, warps and registers with and without the linears: the norm's numbers
    # are the same in both launches (the kernel's docstring).
    constexprs = dict(NORM=norm is not None, HAS_WEIGHT=weight is not None, OFFSET=offset, CAST_BEFORE_WEIGHT=cbw,
                      X_ROUND=_round_code(x.dtype), Y_ROUND=_round_code(norm_dtype), QMAX=int(qmax),
                      BLOCK_K=min(_ROW_CHUNK, next_pow2(max(K, 256))) if not interpreting() else 16,
                      **blocks, USE_ASM=cuda, HAS_BIAS=P > 0 and parts[0][2] is not None, STREAM_HINT=True,
                      PDL=pdl, PREFETCH=pdl, RN_MUL=cuda, BYTE_PTRS=False, WRITE_SX=False, PARTS=max(P, 1),
                      WRITE_Y=norm is not None, GEMV=P > 0)
    regs = {"maxnreg": _MAX_REGS} if cuda and _MAX_REGS else {}
    launch = _FRONT.launch((grid_n, M), args, constexprs, bind=bind, num_warps=_NUM_WARPS, num_stages=1,
                           launch_pdl=pdl, **regs)
    outs = [t.view(M, n) for t, n in zip(flat.split([M * n for n in ns]), ns)] if P else []
    if not bind:
        return y, outs, None
    empty, tail = torch.empty, args[8:]
    w0, s0, b0 = head

    if norm is None:
        def again(x):
            """The parts' outputs flat (``[M * N_p]`` each, the rows of part p one after another:
            ``.view(M, N_p)`` or any shape of those elements); one split, no views per part."""
            M = x.shape[0]
            flat = empty(M * N, dtype=out_dtype, device=device)
            launch(x, x, w0, s0, b0, flat, flat, None, *tail, rows=M)
            return flat.split([M * n for n in ns])
    elif P:
        def again(x):
            """``(y, the parts' outputs flat)``."""
            M = x.shape[0]
            flat = empty(M * N, dtype=out_dtype, device=device)
            y = empty((M, K), dtype=norm_dtype, device=device)
            launch(x, w, w0, s0, b0, flat, flat, y, *tail, rows=M)
            return y, flat.split([M * n for n in ns])
    else:
        def again(x):
            """``y``."""
            y = empty((x.shape[0], K), dtype=norm_dtype, device=device)
            launch(x, w, None, None, None, None, None, y, *tail, rows=x.shape[0])
            return y

    return y, outs, again


def front_gemv(x, weight, eps, offset, cast_before_weight, norm_dtype, normalize, qmax, packed, w_scale, bias,
               out_dtype, traced=False, bind=False, scale=True):
    """``(out [M, N], s_x [M])`` (``s_x`` None unless ``scale``): the ternary linear of ``x``'s
    rows, RMSNorm'd (``normalize``) or not, in one launch (module docstring). The caller checked
    the arguments (the op's guard): ``x [M, K]`` float with a contiguous last dimension,
    ``weight [K]`` or None, ``packed`` uint8
    ``[N, packed_k(K)]`` with contiguous rows starting 4-byte aligned, ``w_scale`` fp32 ``[N]``,
    ``bias [N]`` or None, ``out_dtype`` fp32/fp16/bf16, ``norm_dtype`` as ``norm_quant`` takes it.

    ``traced``: launched through ``wrap_triton`` (no programmatic dependent launch), for a form
    Inductor launches. ``bind``: also return ``again(x) -> out``, the same launch for another
    ``x`` of this one's row length, strides, dtype, device and 16-byte alignment (any number of
    rows of its :func:`launch_class`: the rows are the grid's, not a kernel argument), with this
    call's weights (:meth:`Launcher.bind`): an eager layer's launch plan."""
    M, K = x.shape
    N, Kq = packed.shape
    device = x.device
    if not traced and (M == 0 or N == 0 or K == 0):
        raise ValueError(f"front_gemv: empty operands (M={M}, N={N}, K={K}); the two-kernel path takes them")
    out = torch.empty((M, N), dtype=out_dtype, device=device)
    s_x = torch.empty((M,), dtype=torch.float32, device=device) if scale else None
    if traced:
        K, N, Kq = int(K), int(N), int(Kq)
    cfg = front_config(N, Kq, device, M=1 if traced else M)  # (traced: M may be symbolic; few rows there)
    pdl = pdl_enabled(device) and not traced
    w = packed if traced else packed.view(torch.int32)
    stride_wn = int(packed.stride(0)) // 4
    args = (x, x if weight is None else weight, w, w_scale, bias, out, out if s_x is None else s_x,
            x if traced else None,  # Y: not written (WRITE_Y off)
            *(_traced_parts(w, w_scale, bias) if traced else _NO_PARTS), N, K, Kq // 4, x.stride(0), stride_wn,
            out.stride(0), float(eps))
    constexprs = dict(NORM=bool(normalize), HAS_WEIGHT=weight is not None and bool(normalize), OFFSET=bool(offset),
                      CAST_BEFORE_WEIGHT=bool(cast_before_weight), X_ROUND=_round_code(x.dtype),
                      Y_ROUND=_round_code(norm_dtype), QMAX=int(qmax),
                      BLOCK_K=min(_ROW_CHUNK, next_pow2(max(K, 256))) if not interpreting() else 16,
                      BLOCK_N=cfg["BLOCK_N"], BLOCK_W=cfg["BLOCK_W"], EVEN_W=cfg["EVEN_W"],
                      USE_ASM=device.type == "cuda" and torch.version.hip is None and not interpreting(),
                      HAS_BIAS=bias is not None, STREAM_HINT=True, PDL=pdl, PREFETCH=pdl,
                      RN_MUL=device.type == "cuda" and torch.version.hip is None and not interpreting(),
                      BYTE_PTRS=traced, WRITE_SX=bool(scale), PARTS=1, WRITE_Y=False, GEMV=True)
    regs = {"maxnreg": _MAX_REGS} if constexprs["USE_ASM"] and _MAX_REGS else {}  # CUDA (not HIP, not the interpreter)
    launch = _FRONT.launch((cdiv(N, cfg["BLOCK_N"]), M), args, constexprs, traced=traced, bind=bind,
                           num_warps=_NUM_WARPS, num_stages=1, launch_pdl=pdl, **regs)
    if not bind:
        return out, s_x
    empty, sizes, tiles_n = torch.empty, args[8:], cdiv(N, cfg["BLOCK_N"])

    same_dtype = out_dtype == x.dtype

    def again(x):
        M = x.shape[0]
        out = x.new_empty((M, N)) if same_dtype else empty((M, N), dtype=out_dtype, device=device)
        sx = empty((M,), dtype=torch.float32, device=device) if scale else out
        launch(x, x if weight is None else weight, w, w_scale, bias, out, sx, None, *sizes, rows=M)
        return out

    return out, s_x, again

