"""The int8 weight-only linear of a language model's output head ("int8 head").

The head's weight ``W [N, K]`` (N the vocabulary, 32k to 256k; K the model width) is stored
as per-output-row int8 codes with fp32 scales (:func:`bitfx.reference.int8_rows`); the
activations keep their float dtype. For ``x [..., K]`` (bf16, fp16 or fp32)::

    acc = x @ q^T                   fp32 [M, N] (M: the rows of x)
    out = acc * scale + b           fp32 epilogue, cast to x.dtype [..., N]

Two kernels, picked by M:

* few rows (``M <= GEMV_MAX_M``: decode) -- ``_int8_gemv_kernel``, a bandwidth-bound GEMV on
  the CUDA cores. A program owns ``BLOCK_N`` weight rows and walks K in ``BLOCK_K`` steps; each
  step loads one ``[BLOCK_N, BLOCK_K]`` int8 tile (16 contiguous bytes a thread), converts it
  to fp32 and meets it with every row of x (the rows loop inside the program, so the weights
  leave HBM once). One row: elementwise partial sums, reduced over K once after the loop.
  Several: each step's products are reduced per row into ``acc [BLOCK_N, BLOCK_M]``.
* more rows -- ``_int8_matmul_kernel``, tensor-core tiles: the int8 tile is converted in
  registers to x's dtype (the codes are integers of magnitude <= 127: exact in bf16 and fp16)
  and is the left operand of ``tl.dot`` (``acc^T = W x^T``, fp32 accumulation); fp32 x takes
  ``input_precision="ieee"`` (no tf32 rounding of the activations).

Numbers: both kernels sum the exact products ``x[m, k] q[n, k]`` in fp32, in an order of their
own, and apply ``scale`` and ``b`` in fp32 (possibly as one fused multiply-add); they differ
from the reference by fp32 summation order and the final rounding to x's dtype only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from bitfx.kernels._launch import Launcher
from bitfx.kernels._utils import FLOAT_DTYPES, cdiv, check_device, check_dtype, interpreting, next_pow2, num_sms
from bitfx.kernels.ternary_matmul import grouped_tile

__all__ = ["int8_linear", "GEMV_MAX_M", "gemv_config", "matmul_config"]

GEMV_MAX_M = 2
"""Largest M (rows of x) that takes the CUDA-core GEMV; larger M take the tensor-core kernel.
Each row more costs the GEMV a reduction per step (its sm_90 SASS per 32-byte step: 336
instructions at M=1, 632 at M=4), and on the H200 at the 2B4T head (N=128256, K=2560) it
streams 3.4 TB/s at M=1, 2.6 at M=2 and 1.6 at M=4, where the tensor-core kernel reads
2.1 TB/s at M=5 (BENCHMARKS.md)."""

# Bytes of int8 weight a thread loads per step and row of its tile: one 16-byte vector load.
_VEC = 16
# The longest K step: 32 threads x 16 bytes, one warp across a 512-byte row segment.
_MAX_BLOCK_K = 512
# Warps of a GEMV program, and the weight rows each thread holds at most per step (the tile is
# then at most 2 x 16 bytes a thread: 4 KB a program; more would cost registers, fewer
# programs per SM, and so fewer loads in flight).
_GEMV_WARPS = 4
_MAX_ROWS_PER_THREAD = 2
# The GEMV grid fills every SM at least this many times where N allows (wave quantization
# then costs at most a quarter of a wave).
_WAVES = 4
# (BLOCK_N, BLOCK_M, BLOCK_K, num_warps) of the tensor-core kernel, largest first: the first
# whose tiles cover every SM is taken (the last one otherwise). fp32 x (no tensor cores with
# ieee precision) takes the smallest.
_MATMUL_TILES = ((128, 128, 64, 8), (128, 64, 64, 4), (64, 64, 64, 4))
_GROUP_M = 8


@triton.jit
def _codes_f32(wq):
    """int8 codes -> fp32, exactly: ``q + 0x4B000080`` read as fp32 is ``2^23 + 128 + q`` (the
    code sits in the low mantissa bits, where fp32's step is 1), minus ``2^23 + 128``. An integer
    add and a float add per code, on the full-rate pipes, instead of an int-to-float conversion
    (a quarter-rate instruction on Hopper, about as many per second as HBM delivers bytes)."""
    return (wq.to(tl.int32) + 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0


@triton.jit
def _out_value(v, BF16_BITS: tl.constexpr):
    """The fp32 epilogue value ``v`` ready for the cast to out's dtype. ``BF16_BITS`` (bf16 output
    in Triton's interpreter, whose fp32 -> bf16 cast truncates): first rounded to bf16's
    precision on the bits, to nearest even (NaN kept), so the cast is exact and the result is
    the GPU's ``cvt.rn``."""
    if BF16_BITS:
        bits = v.to(tl.int32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & -65536
        v = tl.where(v != v, v, bits.to(tl.float32, bitcast=True))
    return v


@triton.jit
def _int8_gemv_kernel(
    x_ptr, w_ptr, scale_ptr, bias_ptr, out_ptr,  # x [M, K] float, q int8 [N, K], scale fp32 [N], b [N], out [M, N]
    N, K, stride_xm, stride_wn, stride_om,
    ROWS: tl.constexpr,  # M, the rows of x (1 .. GEMV_MAX_M)
    BLOCK_M: tl.constexpr,  # next_pow2(ROWS): the accumulator's width
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,  # BLOCK_K divides K: masks constant along K keep the loads 16 bytes wide
    HAS_BIAS: tl.constexpr, BF16_BITS: tl.constexpr,  # (_out_value)
):
    """Program ``pid``: ``out[:, pid * BLOCK_N ...]`` for all ``ROWS`` rows of x (module docstring)."""
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn  # [BLOCK_N, 1]
    rows = tl.arange(0, BLOCK_M)
    if ROWS == 1:  # products summed elementwise, reduced over K once after the loop
        part = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        if EVEN_K:
            wq = tl.load(w_rows + k[None, :], mask=n_mask[:, None], other=0, eviction_policy="evict_first")
        else:
            wq = tl.load(w_rows + k[None, :], mask=n_mask[:, None] & (k < K)[None, :], other=0,
                         eviction_policy="evict_first")
        w = _codes_f32(wq)  # fp32 [BLOCK_N, BLOCK_K]
        if ROWS == 1:
            if EVEN_K:
                xk = tl.load(x_ptr + k).to(tl.float32)
            else:
                xk = tl.load(x_ptr + k, mask=k < K, other=0.0).to(tl.float32)
            part += w * xk[None, :]
        else:
            for m in tl.static_range(ROWS):
                if EVEN_K:
                    xk = tl.load(x_ptr + m * stride_xm + k).to(tl.float32)
                else:
                    xk = tl.load(x_ptr + m * stride_xm + k, mask=k < K, other=0.0).to(tl.float32)
                dot = tl.sum(w * xk[None, :], axis=1)  # [BLOCK_N]
                acc = tl.where(rows[None, :] == m, acc + dot[:, None], acc)  # column m only
    if ROWS == 1:
        acc = tl.sum(part, axis=1)[:, None]  # [BLOCK_N, 1]

    s = tl.load(scale_ptr + offs_n, mask=n_mask, other=0.0)
    out = acc * s[:, None]
    if HAS_BIAS:
        out += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
    out_offs = rows.to(tl.int64)[None, :] * stride_om + offs_n[:, None]  # [BLOCK_N, BLOCK_M]
    tl.store(out_ptr + out_offs, _out_value(out, BF16_BITS).to(out_ptr.dtype.element_ty),
             mask=n_mask[:, None] & (rows < ROWS)[None, :])


_GEMV = Launcher(_int8_gemv_kernel)


def gemv_config(M: int, N: int, K: int, device: torch.device, sms: int | None = None) -> dict:
    """Blocks of the GEMV for ``M`` rows of x and an ``[N, K]`` int8 weight.

    ``BLOCK_K``: the row in one step up to :data:`_MAX_BLOCK_K` bytes (32 threads x 16 bytes),
    at least 16. The threads of a program then cover ``rows = 32 num_warps x 16 / BLOCK_K``
    weight rows at a time; ``BLOCK_N`` is that times 1 or :data:`_MAX_ROWS_PER_THREAD`: the
    largest power of two that still gives :data:`_WAVES` programs per SM (``sms``: the rule
    for a GPU of that many SMs instead of ``device``'s). The head (N >= 32k, K >= 2k) gets
    512-byte steps of 4 to 8 rows: thousands of programs.
    """
    sms = num_sms(device) if sms is None else sms
    block_k = min(_MAX_BLOCK_K, max(_VEC, next_pow2(K)))
    num_warps = _GEMV_WARPS
    rows = 32 * num_warps * _VEC // block_k  # weight rows the threads cover with one 16-byte load each
    block_n = rows
    while block_n < rows * _MAX_ROWS_PER_THREAD and cdiv(N, 2 * block_n) >= _WAVES * sms:
        block_n *= 2
    if interpreting():  # small blocks: small test shapes still cover several programs and K steps
        block_k, block_n = min(block_k, 32), min(block_n, 8)
    return dict(BLOCK_M=next_pow2(M), BLOCK_N=block_n, BLOCK_K=block_k, EVEN_K=K % block_k == 0,
                num_warps=num_warps, num_stages=1)


@triton.jit
def _int8_matmul_kernel(
    x_ptr, w_ptr, scale_ptr, bias_ptr, out_ptr,  # x [M, K] float, q int8 [N, K], scale fp32 [N], b [N], out [M, N]
    M, N, K, stride_xm, stride_wn, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,  # BLOCK_K divides K
    DOT_F32: tl.constexpr,  # both operands as fp32, full-precision products (fp32 x; the interpreter)
    HAS_BIAS: tl.constexpr, BF16_BITS: tl.constexpr,  # (_out_value)
):
    """``acc^T [BLOCK_N, BLOCK_M] = q x^T`` per tile (the codes converted to x's dtype are the
    left operand, which Hopper's wgmma takes from registers), tiles in grouped (``GROUP_M``)
    order for L2 reuse, then ``acc * scale + b`` in x's dtype."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm  # [BLOCK_M, 1]
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn  # [BLOCK_N, 1]
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        if EVEN_K:
            xt = tl.load(x_rows + k[None, :], mask=m_mask[:, None], other=0.0)
            wq = tl.load(w_rows + k[None, :], mask=n_mask[:, None], other=0)
        else:
            xt = tl.load(x_rows + k[None, :], mask=m_mask[:, None] & (k < K)[None, :], other=0.0)
            wq = tl.load(w_rows + k[None, :], mask=n_mask[:, None] & (k < K)[None, :], other=0)
        if DOT_F32:
            acc = tl.dot(_codes_f32(wq), tl.trans(xt.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(wq.to(xt.dtype), tl.trans(xt), acc)  # the codes are exact in bf16 and fp16

    s = tl.load(scale_ptr + offs_n, mask=n_mask, other=0.0)
    out = acc * s[:, None]
    if HAS_BIAS:
        out += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
    out_offs = offs_m.to(tl.int64)[None, :] * stride_om + offs_n[:, None]  # [BLOCK_N, BLOCK_M]
    tl.store(out_ptr + out_offs, _out_value(out, BF16_BITS).to(out_ptr.dtype.element_ty),
             mask=n_mask[:, None] & m_mask[None, :])


_MATMUL = Launcher(_int8_matmul_kernel)


def matmul_config(M: int, N: int, K: int, dtype: torch.dtype, device: torch.device, sms: int | None = None) -> dict:
    """Tile of the tensor-core kernel: the largest of :data:`_MATMUL_TILES` that still gives
    every SM a tile (``sms``: for a GPU of that many SMs), the smallest for fp32 x; ``BLOCK_M``
    no wider than M rounded up to a power of two (at least 16), K steps no longer than the row
    (``tl.dot`` needs at least 16)."""
    sms = num_sms(device) if sms is None else sms
    if dtype == torch.float32:
        block_n, block_m, block_k, warps = _MATMUL_TILES[-1]
        block_k = 32  # the fp32 tiles cost twice the registers and shared memory
    else:
        for block_n, block_m, block_k, warps in _MATMUL_TILES:
            block_m = min(block_m, max(16, next_pow2(M)))  # few rows: no MMA columns beyond them
            if cdiv(M, block_m) * cdiv(N, block_n) >= sms:
                break
    group_m = _GROUP_M
    if interpreting():  # small blocks: small test shapes still cover several tiles, steps and groups
        block_n, block_m, block_k, group_m = 16, 16, 32, 2
    block_k = min(block_k, max(16, next_pow2(K)))
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m, EVEN_K=K % block_k == 0,
                num_warps=warps, num_stages=3)


def int8_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``out = (x @ q^T) * scale + b``: ``[..., N]`` in ``x.dtype`` (module docstring).

    ``x [..., K]`` fp32/fp16/bf16 (any number of leading dimensions, none or empty ones too);
    ``qweight`` int8 ``[N, K]``, contiguous; ``scale`` fp32 ``[N]``; ``bias [N]`` (a float
    dtype, x's as a rule) or None; all on one CUDA device (or the CPU under
    ``TRITON_INTERPRET=1``). Within fp32 summation order and the final rounding of
    :func:`bitfx.reference.int8_linear`.
    """
    name = "int8_linear"
    device = check_device(name, x, qweight, scale, bias)
    check_dtype(name, "activations x", x, FLOAT_DTYPES)
    check_dtype(name, "int8 weight qweight", qweight, (torch.int8,))
    check_dtype(name, "weight scale", scale, (torch.float32,))
    if qweight.dim() != 2:
        raise ValueError(f"{name}: int8 weight must be 2-D [N, K], got shape {tuple(qweight.shape)}")
    N, K = qweight.shape
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"{name}: activations have shape {tuple(x.shape)}, but the weight [N, K] = [{N}, {K}] "
                         f"needs their last dimension to be K = {K}")
    if not qweight.is_contiguous():
        raise ValueError(f"{name}: int8 weight must be contiguous (strides {tuple(qweight.stride())}, expected "
                         f"({K}, 1)); pass qweight.contiguous(), once, when the weight is loaded")
    if tuple(scale.shape) != (N,):
        raise ValueError(f"{name}: weight scale has shape {tuple(scale.shape)}, expected ({N},)")
    if bias is not None:
        check_dtype(name, "bias", bias, FLOAT_DTYPES)
        if tuple(bias.shape) != (N,):
            raise ValueError(f"{name}: bias has shape {tuple(bias.shape)}, expected ({N},)")
        bias = bias.contiguous()
    scale = scale.contiguous()

    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    if K > 1 and x2.stride(1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    out = torch.empty((M, N), dtype=x.dtype, device=device)
    if M == 0 or N == 0:
        return out.view(*lead, N)
    args = (x2, qweight, scale, bias, out)
    bf16_bits = interpreting() and x.dtype == torch.bfloat16
    if M <= GEMV_MAX_M:
        cfg = gemv_config(M, N, K, device)
        constexprs = dict(ROWS=M, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
                          EVEN_K=cfg["EVEN_K"], HAS_BIAS=bias is not None, BF16_BITS=bf16_bits)
        _GEMV((cdiv(N, cfg["BLOCK_N"]),), args + (N, K, x2.stride(0), qweight.stride(0), out.stride(0)),
              constexprs, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    else:
        cfg = matmul_config(M, N, K, x.dtype, device)
        constexprs = dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
                          GROUP_M=cfg["GROUP_M"], EVEN_K=cfg["EVEN_K"],
                          DOT_F32=x.dtype == torch.float32 or interpreting(), HAS_BIAS=bias is not None,
                          BF16_BITS=bf16_bits)
        grid = (cdiv(M, cfg["BLOCK_M"]) * cdiv(N, cfg["BLOCK_N"]),)
        _MATMUL(grid, args + (M, N, K, x2.stride(0), qweight.stride(0), out.stride(0)), constexprs,
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out.view(*lead, N)
