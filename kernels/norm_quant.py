"""RMSNorm fused with per-token absmax int8 quantization (and the same kernel without the norm).

BitNet b1.58 ("The Era of 1-bit LLMs", Ma et al., 2024) quantizes the normalized activations
of every linear layer to int8 with one absmax scale per token. For ``x [M, K]``::

    r   = x * rsqrt(mean(x^2) + eps)                    fp32 (rstd = rsqrt(...) is saved)
    r   = r rounded to x.dtype                          if cast_before_weight (Llama)
    y   = r * g   or   r * (1 + g)                      fp32, with the weight g upcast
    y   = y rounded to norm_dtype
    s_x = 127 * reciprocal(max(max|y|, 1e-5))           correctly rounded, fp32 [M]
    q   = clamp(round_half_even(y * s_x), -128, 127)    int8 [M, K]

with the cast order of :func:`bitfx.reference.norm_quant`. A row whose ``y`` holds NaN or Inf
gets ``s_x = NaN`` and all-zero codes. ``act_quant`` is the same kernel without the norm.

Two optional prologues make the row from two inputs first, each as eager torch computes it in
the rows' dtype, so that a graph's kernel before the norm is not needed:

* ``add_norm_quant``: ``h = a + b`` (a residual add; ``h`` is stored for its other readers);
* ``glu_quant``: ``y = act(gate) * up`` (a gated MLP's activation before its down projection),
  ``act`` one of :data:`GATES`: ``silu`` (``x / (1 + exp(-x))`` with the device's accurate exp and
  division) or ``relu2`` (``relu(x)`` squared); each op's result rounded to the dtype.

Rows that fit in registers (``K <= _MAX_ROW_BLOCK``) are read once; longer rows are walked in
chunks, reading ``x`` three times (sum of squares, absmax, codes).

The launchers compile with ``enable_fp_fusion=False``: a multiply followed by an add must not
become one fused multiply-add, or ``round_half_even(y * s_x)`` would round the exact product
instead of its fp32 value, and the codes would differ from the reference at rounding boundaries.
A launch traced into Inductor's code (``traced=True``) cannot pass that option; there the two
products an add follows (``x * x`` of the sum of squares, ``y * s_x`` of the rounding) are
PTX ``mul.rn.f32`` instructions (``RN_MUL``), which the compiler never fuses, so the numbers
are the same as a launch with fusion off.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from bitfx.layout import SCALE_FLOOR
from bitfx.reference import glu
from bitfx.kernels._launch import Launcher
from bitfx.kernels._utils import (next_pow2, FLOAT_DTYPES, check_device, check_dtype, interpreting,
                                  num_sms, pdl_enabled, rows)

__all__ = ["norm_quant", "act_quant", "add_norm_quant", "glu_quant", "residual_fits", "GATES"]

# Rows of up to this many elements are held in registers; longer ones are walked in chunks.
_MAX_ROW_BLOCK = 16384
_CHUNK = 4096
# Codes for the dtype y is rounded to inside the kernel (see _round_to).
_ROUND_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _round_code(dtype: torch.dtype) -> int:
    """The ``_round_to`` code for ``dtype``: the hardware bf16 conversion except in the interpreter."""
    code = _ROUND_CODE.get(dtype, 0)
    return 3 if code == 2 and not interpreting() else code
_ANY_FLOAT = FLOAT_DTYPES + (torch.float64,)
# The gated activations glu_quant computes in its prologue (bitfx.reference.GLU_ACTS), by the
# codes _gate reads.
GATES = {"silu": 1, "relu2": 2}


def _row_block(K: int, max_block: int) -> tuple[int, bool]:
    """(BLOCK_K, whole row in one block) for rows of K elements."""
    block = next_pow2(max(K, 16))
    if block <= max_block:
        return block, True
    return min(next_pow2(max_block), _CHUNK), False


def _num_warps(block: int) -> int:
    """At least 16 elements per thread, at most 8 warps: 1 warp for 512, 8 from 4096 (BENCHMARKS.md,
    "Launch choices")."""
    return max(1, min(8, block // 512))


def _check_weight(name: str, weight: torch.Tensor | None, K: int) -> torch.Tensor | None:
    """A norm weight of shape [K] and a float dtype, made contiguous (or None)."""
    if weight is None:
        return None
    if weight.dim() != 1:
        raise ValueError(f"{name}: norm weight must be 1-D [K], got shape {tuple(weight.shape)}")
    if weight.shape[0] != K:
        raise ValueError(f"{name}: norm weight has {weight.shape[0]} elements but x has K={K} features")
    check_dtype(name, "norm weight", weight, FLOAT_DTYPES)
    return weight.contiguous()


def _num_programs(M: int, device: torch.device) -> int:
    """Programs of the backward: enough to fill the GPU, few enough that the [P, K] partials stay small."""
    if device.type == "cuda":
        return min(M, 2 * num_sms(device))
    return min(M, 4)


@triton.jit
def _round_to(v, CODE: tl.constexpr):
    """Round fp32 ``v`` to fp32 (0), fp16 (1) or bf16 (2, 3), to nearest even; return it as fp32.

    bf16: code 3 is the GPU's conversion (``cvt.rn.bf16.f32``, one instruction); code 2 rounds
    on the bits (as c10 does; seven instructions), for Triton's interpreter, whose fp32 -> bf16
    conversion truncates. Both give the same value for every input (NaN stays NaN).
    """
    if CODE == 1:
        v = v.to(tl.float16).to(tl.float32)
    elif CODE == 3:
        v = v.to(tl.bfloat16).to(tl.float32)
    elif CODE == 2:
        bits = v.to(tl.int32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & -65536
        v = tl.where(v != v, v, bits.to(tl.float32, bitcast=True))
    return v


@triton.jit
def _gate(x, u, GATE: tl.constexpr, ROUND: tl.constexpr, EXACT_EXP: tl.constexpr):
    """``act(x) * u`` of fp32 ``x`` and ``u`` as eager torch computes it in the rows' dtype
    (``ROUND``): the activation rounded, then the product rounded. ``GATE`` 1: silu,
    ``x / (1 + exp(-x))`` with a correctly rounded division and, with ``EXACT_EXP``, the accurate
    ``exp`` of CUDA's math library that torch's kernel uses (Triton's interpreter has only its
    own); 2: relu2, ``relu(x)`` squared (NaN stays NaN)."""
    if GATE == 1:
        if EXACT_EXP:
            e = libdevice.exp(-x)
        else:
            e = tl.exp(-x)
        a = tl.math.div_rn(x, 1.0 + e)
    else:
        r = tl.where(x < 0.0, 0.0, x)
        a = r * r
    return _round_to(_round_to(a, ROUND) * u, ROUND)


@triton.jit
def _rstd(sum_sq, K, eps):
    """1 / sqrt(sum_sq / K + eps), each step correctly rounded, as torch's CPU rsqrt (and no
    flush of subnormals, which the GPU's approximate rsqrt does)."""
    mean = tl.math.div_rn(sum_sq, K * 1.0)
    # eps arrives as fp32 from a plain launch, as fp64 from Inductor's code: fp32 either way
    return tl.math.div_rn(tl.full([], 1.0, tl.float32), tl.math.sqrt_rn(mean + tl.cast(eps, tl.float32)))


@triton.jit
def _g_eff(W, cols, mask, HAS_WEIGHT: tl.constexpr, OFFSET: tl.constexpr):
    """The norm's effective weight at ``cols`` in fp32: ``g``, ``1 + g`` (OFFSET), or 1 (no weight)."""
    if HAS_WEIGHT:
        g = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        if OFFSET:
            g = 1.0 + g
    else:
        g = tl.zeros(cols.shape, dtype=tl.float32) + 1.0
    return g


@triton.jit
def _norm_chunk(
    x,
    g,
    rstd,
    X_ROUND: tl.constexpr,
    NORM: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    CAST_BEFORE_WEIGHT: tl.constexpr,
    Y_ROUND: tl.constexpr,
):
    """y for one chunk of a row, from its fp32 ``x`` and effective weight ``g`` (identity when not NORM)."""
    y = x
    if NORM:
        y = x * rstd
        if CAST_BEFORE_WEIGHT:
            y = _round_to(y, X_ROUND)
        if HAS_WEIGHT:
            y = y * g
        y = _round_to(y, Y_ROUND)
    return y


@triton.jit
def _load_norm_chunk(X, W, c, K, rstd, NORM: tl.constexpr, HAS_WEIGHT: tl.constexpr, OFFSET: tl.constexpr,
                     CAST_BEFORE_WEIGHT: tl.constexpr, X_ROUND: tl.constexpr, Y_ROUND: tl.constexpr):
    """y at columns ``c`` of a row (the chunked passes): x and g loaded (0 past K), then ``_norm_chunk``."""
    m = c < K
    x = tl.load(X + c, mask=m, other=0.0).to(tl.float32)
    g = _g_eff(W, c, m, HAS_WEIGHT and NORM, OFFSET)
    return _norm_chunk(x, g, rstd, X_ROUND, NORM, HAS_WEIGHT, CAST_BEFORE_WEIGHT, Y_ROUND)


@triton.jit
def _mul(a, b, RN_MUL: tl.constexpr):
    """``a * b`` in fp32; with ``RN_MUL`` as ``mul.rn.f32``, a product no later add is fused into."""
    if RN_MUL:
        return tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return a * b


@triton.jit
def _abs_or_inf(y):
    """|y|, with NaN as +inf: its maximum over a row is +inf exactly when the row is bad (holds NaN
    or +-Inf), so one reduction gives both the absmax and the bad-row flag."""
    return tl.where(y == y, tl.abs(y), float("inf"))


@triton.jit
def _quantize(y, scale, bad, QMAX: tl.constexpr, RN_MUL: tl.constexpr):
    """clamp(round_half_even(y * scale), -QMAX - 1, QMAX) as int8; zero where the row is bad."""
    v = _mul(y, scale, RN_MUL)
    # 1.5 * 2^23: adding and subtracting it rounds |v| < 2^22 to an integer, ties to even.
    v = (v + 12582912.0) - 12582912.0
    v = tl.minimum(tl.maximum(v, -QMAX - 1.0), QMAX * 1.0)
    v = tl.where(bad, 0.0, v)
    return v.to(tl.int8)


@triton.jit
def _row_rstd(X, K, eps, cols, RN_MUL: tl.constexpr):
    """``rstd`` of the row at ``X``, its sum of squares walked in chunks of ``cols``' length (the
    first pass of :func:`_row_stats`; a kernel that needs the norm alone calls it directly, and
    gets the same number for the same chunks and warps)."""
    acc = tl.zeros(cols.shape, dtype=tl.float32)
    for k0 in range(0, K, cols.shape[0]):
        c = k0 + cols
        x = tl.load(X + c, mask=c < K, other=0.0).to(tl.float32)
        acc += _mul(x, x, RN_MUL)
    return _rstd(tl.sum(acc, axis=0), K, eps)


@triton.jit
def _row_stats(X, W, K, eps, cols, NORM: tl.constexpr, HAS_WEIGHT: tl.constexpr, OFFSET: tl.constexpr,
               CAST_BEFORE_WEIGHT: tl.constexpr, X_ROUND: tl.constexpr, Y_ROUND: tl.constexpr,
               RN_MUL: tl.constexpr):
    """``(rstd, amax)`` of the row at ``X`` (``rstd`` 0 without the norm; ``amax`` +inf for a bad
    row), walking it in chunks of ``cols``' length: one pass for the sum of squares, one for
    the absmax of ``y``."""
    rstd = tl.full([], 0.0, tl.float32)
    if NORM:
        rstd = _row_rstd(X, K, eps, cols, RN_MUL)
    amax_acc = tl.zeros(cols.shape, dtype=tl.float32)
    for k0 in range(0, K, cols.shape[0]):
        y = _load_norm_chunk(X, W, k0 + cols, K, rstd, NORM, HAS_WEIGHT, OFFSET, CAST_BEFORE_WEIGHT, X_ROUND, Y_ROUND)
        amax_acc = tl.maximum(amax_acc, _abs_or_inf(y))
    return rstd, tl.max(amax_acc, axis=0)


@triton.jit
def _absmax_scale(amax, QMAX: tl.constexpr):
    """``(s_x, bad)``: ``QMAX * rn(1 / max(amax, 1e-5))``, NaN for a bad row (``amax`` +inf)."""
    bad = amax == float("inf")
    one = tl.full([], 1.0, tl.float32)
    scale = QMAX * tl.math.div_rn(one, tl.maximum(amax, 1e-5))
    return tl.where(bad, float("nan"), scale), bad


@triton.jit
def _norm_quant_kernel(
    X,  # [M, K] fp32/fp16/bf16 (fp64 too when not NORM), row stride stride_x
    W,  # [K] norm weight (unused unless HAS_WEIGHT)
    Q,  # [M, K] int8 out, contiguous
    SCALE,  # [M] fp32 out: s_x
    RSTD,  # [M] fp32 out: rsqrt(mean(x^2) + eps) (unused unless NORM)
    stride_x,
    K,
    eps,
    R,  # [M, K] the residual added to X, or the gate's up rows (unused unless RESIDUAL or GATE), row stride stride_r
    H,  # [M, K] out, contiguous: X + R in X's dtype, the row the norm reads (unused unless RESIDUAL)
    stride_r,
    NORM: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    OFFSET: tl.constexpr,
    CAST_BEFORE_WEIGHT: tl.constexpr,
    X_ROUND: tl.constexpr,
    Y_ROUND: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ONE_BLOCK: tl.constexpr,
    PDL_TRIGGER: tl.constexpr,  # let the next kernel (launched with PDL) start now
    EARLY_G: tl.constexpr,  # load the norm weight before the first reduction (few rows)
    QMAX: tl.constexpr = 127,  # largest code: 2^(bits-1) - 1
    RN_MUL: tl.constexpr = False,  # products an add follows as mul.rn (launches with FP fusion on)
    RESIDUAL: tl.constexpr = False,  # the row is X + R, stored to H first (ONE_BLOCK rows only)
    GATE: tl.constexpr = 0,  # the row is act(X) * R, act by its GATES code (ONE_BLOCK rows only)
    EXACT_EXP: tl.constexpr = True,  # silu's exp from CUDA's math library (False in the interpreter)
    PDL_WAIT: tl.constexpr = False,  # launched with PDL: wait for the kernel before it first
):
    """One program per row: (optional) RMSNorm, then absmax quantization of that row to codes
    in [-QMAX - 1, QMAX] (int8 storage). With ``RESIDUAL`` the row is first ``h = x + r``,
    computed in fp32 and rounded to x's dtype as torch's add rounds it, and stored: the norm
    reads the stored values. With ``GATE`` the row is ``act(x) * r`` (:func:`_gate`).

    With ``PDL_WAIT`` the kernel is launched with programmatic dependent launch: it may start
    while the kernel before it (a GEMV that wrote ``x``, say) still runs, so before it reads or
    writes any memory it waits (``gdc_wait``) until that kernel has finished and its writes are
    visible; what it saves is its own launch latency."""
    if PDL_WAIT:
        tl.extra.cuda.gdc_wait()
    if PDL_TRIGGER:  # it waits for this kernel to finish before it reads q or the scales
        tl.extra.cuda.gdc_launch_dependents()
    row = tl.program_id(0).to(tl.int64)
    X += row * stride_x
    Q += row * K
    cols = tl.arange(0, BLOCK_K)
    rstd = 0.0
    if ONE_BLOCK:
        mask = cols < K
        x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
        if RESIDUAL:
            x = _round_to(x + tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32), X_ROUND)
            tl.store(H + row * K + cols, x.to(H.dtype.element_ty), mask=mask)
        if GATE != 0:  # masked columns: act(0) * 0 = 0, as the plain row's 0
            x = _gate(x, tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32), GATE, X_ROUND,
                      EXACT_EXP)
        # Few rows (decode): g is loaded with x, before the first reduction, so that the row
        # costs one memory round trip. Many rows: after it, so that fewer registers are live
        # across the reduction and more programs fit on an SM (BENCHMARKS.md, "Launch choices").
        if EARLY_G:
            g = _g_eff(W, cols, mask, HAS_WEIGHT and NORM, OFFSET)
        if NORM:
            rstd = _rstd(tl.sum(_mul(x, x, RN_MUL), axis=0), K, eps)
        if not EARLY_G:
            g = _g_eff(W, cols, mask, HAS_WEIGHT and NORM, OFFSET)
        y = _norm_chunk(x, g, rstd, X_ROUND, NORM, HAS_WEIGHT, CAST_BEFORE_WEIGHT, Y_ROUND)
        amax = tl.max(_abs_or_inf(y), axis=0)
    else:
        rstd, amax = _row_stats(X, W, K, eps, cols, NORM, HAS_WEIGHT, OFFSET, CAST_BEFORE_WEIGHT, X_ROUND, Y_ROUND,
                                RN_MUL)
    scale, bad = _absmax_scale(amax, QMAX)
    tl.store(SCALE + row, scale)
    if NORM:
        tl.store(RSTD + row, rstd)
    if ONE_BLOCK:
        tl.store(Q + cols, _quantize(y, scale, bad, QMAX, RN_MUL), mask=mask)
    else:
        for k0 in range(0, K, BLOCK_K):
            c = k0 + cols
            y = _load_norm_chunk(X, W, c, K, rstd, NORM, HAS_WEIGHT, OFFSET, CAST_BEFORE_WEIGHT, X_ROUND, Y_ROUND)
            tl.store(Q + c, _quantize(y, scale, bad, QMAX, RN_MUL), mask=c < K)


_NORM_QUANT = Launcher(_norm_quant_kernel)


def _launch_quant(x, weight, eps, offset, cast_before_weight, norm_dtype, norm, qmax=127, traced=False, bind=False):
    """Allocate ``(q, s_x, rstd)`` on x's device and launch one program per row.

    ``traced``: launched through ``wrap_triton`` (:meth:`Launcher.traced`), for the
    ``triton_op`` forms of the ops: shapes may be symbolic there (``M`` is), and the launch has
    no PDL trigger (its inline PTX would count as a write to every argument in Inductor's
    analysis of the kernel) and no FP-fusion option (``RN_MUL`` instead).

    ``bind``: also return ``again(x) -> (q, s_x, rstd)``, the same launch for another ``x`` of
    this one's row length, strides, dtype, device and 16-byte alignment, with any number of
    rows of the same :func:`launch_class` (:meth:`Launcher.bind`; None for empty rows, which
    launch nothing): an eager layer's launch plan, which holds this call's norm weight.
    ``bind="operands"``: ``again(x, weight)`` instead, the norm weight given per call and none
    held, matching this call's as ``x`` must (None where this one is, else the same dtype and
    16-byte alignment, contiguous): a training op's plan, whose weights are new tensors each
    step."""
    M, K = x.shape
    device = x.device
    q = torch.empty((M, K), dtype=torch.int8, device=device)
    scale = torch.empty((M,), dtype=torch.float32, device=device)
    rstd = torch.empty((M,), dtype=torch.float32, device=device) if norm else None
    if M == 0 or K == 0:
        if K == 0 and M != 0:
            # Empty rows: amax 0, so s_x = 127 / 1e-5 (computed as the reference does); rstd is
            # rsqrt of the mean of nothing, NaN.
            scale.fill_(SCALE_FLOOR).reciprocal_().mul_(float(qmax))
            if rstd is not None:
                rstd.fill_(float("nan"))
        return (q, scale, rstd, None) if bind else (q, scale, rstd)
    if traced:
        K = int(K)  # the block covers the row: a graph holds for this K only (a guard when K is symbolic)
    block, one_block = _row_block(K, _MAX_ROW_BLOCK)
    w = x if weight is None else weight
    stride, eps = x.stride(0), float(eps)
    r = _rstd_slot(rstd, scale, traced)
    # No residual: None (specialized away) in a direct launch, x (read by nothing) in a traced one.
    args = (x, w, q, scale, r, stride, K, eps) + ((x, x, 0) if traced else (None, None, 0))
    constexprs = _constexprs(x, weight, offset, cast_before_weight, norm_dtype, norm, qmax, traced, M, block, one_block)
    launch = _NORM_QUANT.launch((M,), args, constexprs, traced=traced, bind=bind, num_warps=_num_warps(block),
                                enable_fp_fusion=False, **_pdl_option(constexprs))
    if not bind:
        return q, scale, rstd
    empty, i8, f32 = torch.empty, torch.int8, torch.float32

    def operands(x, weight):  # (holds no tensor)
        M = x.shape[0]
        q, scale = empty((M, K), dtype=i8, device=device), empty((M,), dtype=f32, device=device)
        r = empty((M,), dtype=f32, device=device) if norm else scale
        launch(x, x if weight is None else weight, q, scale, r, stride, K, eps, None, None, 0, grid=(M,))
        return q, scale, (r if norm else None)

    if bind == "operands":
        return q, scale, rstd, operands
    return q, scale, rstd, lambda x: operands(x, weight)


def _rstd_slot(rstd, scale, traced: bool):
    """The kernel's ``RSTD`` argument: ``rstd``, or, without the norm (``rstd`` None), a tensor
    the kernel does not write: ``scale`` in a direct launch; in a traced one a scratch tensor,
    since an argument aliasing an output would cost Inductor a copy of it."""
    if rstd is not None:
        return rstd
    return torch.empty((1,), dtype=torch.float32, device=scale.device) if traced else scale


PDL_WAIT = True
"""Launch the norm kernel with programmatic dependent launch where :func:`pdl_enabled` allows
(``BITFX_PDL=0`` turns it off with the GEMV's): its launch overlaps the kernel before it, which in
a decode step is mostly the GEMV of the site before (BENCHMARKS.md)."""


def _pdl_option(constexprs: dict) -> dict:
    """The launch option that goes with the ``PDL_WAIT`` constexpr (none where it is off, so
    that launches without it keep their compiled kernel's key)."""
    return {"launch_pdl": True} if constexprs["PDL_WAIT"] else {}


def _constexprs(x, weight, offset, cast_before_weight, norm_dtype, norm, qmax, traced, M, block, one_block,
                residual=False, gate=0) -> dict:
    """The constexprs of a ``_norm_quant_kernel`` launch for rows like ``x``'s."""
    device = x.device
    pdl = pdl_enabled(device) and not traced  # (traced: Inductor's launch takes no PDL option)
    return dict(NORM=norm, HAS_WEIGHT=weight is not None, OFFSET=bool(offset),
                CAST_BEFORE_WEIGHT=bool(cast_before_weight), X_ROUND=_round_code(x.dtype),
                Y_ROUND=_round_code(norm_dtype), BLOCK_K=block, ONE_BLOCK=one_block,
                PDL_TRIGGER=pdl, EARLY_G=bool(M < num_sms(device)),
                QMAX=int(qmax), RN_MUL=traced and device.type == "cuda" and torch.version.hip is None,
                RESIDUAL=residual, GATE=gate, EXACT_EXP=not interpreting(),
                PDL_WAIT=pdl and PDL_WAIT)


def residual_fits(K: int) -> bool:
    """Whether rows of ``K`` elements take the residual add in the kernel (:func:`add_norm_quant`):
    rows held in registers, read once."""
    return _row_block(K, _MAX_ROW_BLOCK)[1]


def add_norm_quant(a, b, weight, eps, offset, cast_before_weight, norm_dtype, qmax=127, traced=False):
    """``(h, q, s_x, rstd)``: ``h = a + b`` (``[M, K]``, one float dtype, rows with a unit
    last stride; stored contiguous), then :func:`norm_quant` of ``h``, in one kernel: the
    residual add before a pre-norm site, which a graph would otherwise launch as a kernel of its
    own. ``h`` is torch's ``a + b`` bit for bit (the fp32 sum rounded to the dtype), and the
    codes are those of ``norm_quant(h)``. Rows longer than :func:`residual_fits` allows add in
    torch first, then launch ``norm_quant``; so does an empty ``a``."""
    M, K = a.shape
    if M == 0 or K == 0 or not residual_fits(int(K)):
        h = a + b
        return (h, *_launch_quant(h, weight, eps, offset, cast_before_weight, norm_dtype, True, qmax, traced))
    h = torch.empty((M, int(K)), dtype=a.dtype, device=a.device)
    return (h, *_launch_pair(a, b, h, weight, eps, offset, cast_before_weight, norm_dtype, True, qmax, traced,
                             residual=True))


def glu_quant(gate, up, act, weight, eps, offset, cast_before_weight, norm_dtype, normalize, qmax=127,
              traced=False):
    """``(q, s_x, rstd)`` of ``y = act(gate) * up`` (``[M, K]``, one float dtype, rows with a
    unit last stride): :func:`norm_quant` of ``y`` (``normalize``; ``rstd`` None otherwise) or
    :func:`act_quant` of it, in one kernel: the gated activation before a down projection,
    which a graph would otherwise launch as a kernel of its own. ``y`` is what eager torch
    computes (``F.silu(gate) * up``, ``F.relu(gate).square() * up``; :func:`_gate`) and is not
    stored. ``act``: a name of :data:`GATES`. Rows longer than :func:`residual_fits` allows
    compute ``y`` in torch first; so does an empty ``gate``."""
    if act not in GATES:
        raise ValueError(f"glu_quant: act must be one of {sorted(GATES)}, got {act!r}")
    M, K = gate.shape
    if M == 0 or K == 0 or not residual_fits(int(K)):
        y = glu(act, gate, up)
        return _launch_quant(y, weight, eps, offset, cast_before_weight, norm_dtype, normalize, qmax, traced)
    return _launch_pair(gate, up, None, weight, eps, offset, cast_before_weight, norm_dtype, normalize, qmax, traced,
                        gate=GATES[act])


def _launch_pair(a, b, h, weight, eps, offset, cast_before_weight, norm_dtype, norm, qmax, traced, residual=False,
                 gate=0):
    """``(q, s_x, rstd)``: one program per row of the row made from ``a`` and ``b`` (the
    residual add, stored to ``h``, or the gated activation), then the norm (``norm``) and the
    quantization; rows that fit one block."""
    M, K = a.shape
    device = a.device
    if traced:
        K = int(K)
    block, one_block = _row_block(K, _MAX_ROW_BLOCK)
    q = torch.empty((M, K), dtype=torch.int8, device=device)
    scale = torch.empty((M,), dtype=torch.float32, device=device)
    rstd = torch.empty((M,), dtype=torch.float32, device=device) if norm else None
    r = _rstd_slot(rstd, scale, traced)
    args = (a, a if weight is None else weight, q, scale, r, a.stride(0), K, float(eps), b, a if h is None else h,
            b.stride(0))
    constexprs = _constexprs(a, weight, offset, cast_before_weight, norm_dtype, norm, qmax, traced, M, block, one_block,
                             residual=residual, gate=gate)
    _NORM_QUANT.launch((M,), args, constexprs, traced=traced, num_warps=_num_warps(block), enable_fp_fusion=False,
                       **_pdl_option(constexprs))
    return q, scale, rstd


def launch_class(M: int, device: torch.device) -> bool:
    """What the launch of :func:`_launch_quant` for ``M`` rows depends on besides ``M`` itself
    (the grid): a bound launch (``bind``) serves every ``M`` of its class. The rows are not a
    kernel argument, so Triton's specialization does not depend on them."""
    return bool(M < num_sms(device))  # EARLY_G


def norm_quant(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    offset: bool,
    cast_before_weight: bool,
    norm_dtype: torch.dtype,
    qmax: int = 127,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused RMSNorm + per-token int8 quantization: ``(q int8 [M, K], s_x fp32 [M], rstd fp32 [M])``.

    ``x [M, K]`` fp32/fp16/bf16 (rows may have any stride; a non-contiguous last dimension is
    copied), ``weight [K]`` float or None. ``offset`` multiplies by ``1 + weight``;
    ``cast_before_weight`` rounds ``r`` to ``x.dtype`` before the weight; ``y`` is rounded to
    ``norm_dtype`` (fp32/fp16/bf16) before quantization. See the module docstring for the
    formula; ``q / s_x`` approximates :func:`bitfx.reference.rms_norm`, and ``rstd`` is saved
    for the backward.
    """
    x, weight = check_norm_args("norm_quant", x, weight, norm_dtype)
    return _launch_quant(x, weight, eps, offset, cast_before_weight, norm_dtype, norm=True, qmax=qmax)


def check_norm_args(name: str, x: torch.Tensor, weight: torch.Tensor | None, norm_dtype: torch.dtype):
    """``(x as [M, K] rows, weight)`` for a norm kernel's launch, checked: one device, a float
    ``x``, a ``[K]`` float weight (or None), ``norm_dtype`` one the kernels round to."""
    check_device(name, x, weight)
    x = rows(name, "x", x)
    check_dtype(name, "x", x, FLOAT_DTYPES)
    weight = _check_weight(name, weight, x.shape[1])
    if norm_dtype not in _ROUND_CODE:
        raise TypeError(f"{name}: norm_dtype must be one of float32, float16, bfloat16, got {norm_dtype}")
    return x, weight


def act_quant(y: torch.Tensor, qmax: int = 127) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token absmax int8 quantization of ``y [M, K]`` (any float dtype, upcast to fp32).

    ``(q int8 [M, K], s_x fp32 [M])``, bit for bit :func:`bitfx.reference.act_quant`:
    ``s_x = 127 * reciprocal(max(max|y|, 1e-5))``, ``q = clamp(round_half_even(y * s_x), -128, 127)``;
    rows holding NaN or Inf get ``s_x = NaN`` and zero codes.
    """
    name = "act_quant"
    check_device(name, y)
    y = rows(name, "y", y)
    check_dtype(name, "y", y, _ANY_FLOAT)
    q, scale, _ = _launch_quant(y, None, 0.0, False, False, torch.float32, norm=False, qmax=qmax)
    return q, scale
