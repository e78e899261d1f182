"""Ternary x int8 matmul (BitNet b1.58, Ma et al. 2024), from decode (M = 1) to prefill.

For int8 activation codes ``q [M, K]`` with per-row scales ``s_x [M]`` and a packed ternary weight
``t [N, K]`` (``bitfx.layout``) with scales ``s_w [N]``::

    acc = q @ t^T                      exact int32 [M, N]
    out = acc / s_x / s_w + b          fp32 epilogue, cast to out_dtype

One kernel family computes the transposed tile ``acc^T [BLOCK_N, BLOCK_M]``: the unpacked weight
is the left operand (on Hopper a ``wgmma`` takes it from registers, so the packed bytes go
global -> shared (cp.async) -> registers -> unpack -> tensor core) and the small M is the MMA's
``n`` (>= 8, padded to 16), which suits decode ("swap AB"). The configurations (``path``):

* ``"dp4a"`` (default for M <= ``DP4A_MAX_M``): a CUDA-core GEMV, one warp per 4 weight rows,
  four int8 products per ``dp4a`` instruction (``_ternary_dp4a_kernel``). On Hopper it is
  launched with programmatic dependent launch: it starts while the kernel that wrote ``q`` is
  still running, has L2 fetch its weights, and waits before it reads ``q`` (``_pdl_prologue``).
* ``"gemv"`` (default up to ``GEMV_MAX_M``): weight streaming. A program owns ``BLOCK_N``
  rows of the weight and all M rows of ``q`` (padded to 16), walks K with large steps, and K is
  split over several programs for long rows when N alone cannot fill the GPU.
* ``"tc"`` (larger M): 64 x 64 to 128 x 256 tiles (``_TC_TILES``) in grouped (``GROUP_M``)
  order for L2 reuse.
* ``"simt"`` (M <= ``SIMT_MAX_M``, off by default): products on the CUDA cores instead of
  ``tl.dot``, ``acc += sum_i c * q``; an alternative for M = 1 to measure against ``"gemv"``.

Each K step loads one ``[BLOCK_N, BLOCK_KQ]`` byte tile and, per plane ``j``, the activation
slice ``q[:, j*Kq + i]``, and accumulates ``tl.dot(codes_j, q_j^T)`` (int8 x int8 -> int32).
Constexpr flags: ``OFFSET_TRICK`` multiplies by the raw codes ``c = t + 1`` and subtracts
``sum_k q`` once per row (``sum q t = sum q c - sum q``); ``USE_ASM`` unpacks four bytes per
32-bit register with PTX (two instructions for four codes); ``SPLIT_K > 1`` adds partial int32
tiles into a zeroed workspace with integer atomics (exact and order-free) and the last split to
finish a tile runs the epilogue.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from bitfx import layout
from bitfx.kernels._launch import Launcher, _arg_key
from bitfx.kernels._utils import cdiv, FLOAT_DTYPES, check_device, check_dtype, interpreting, rows
# The launch rules (path per M, blocks, splits, measured tiles), re-exported for the benchmarks and tests.
from bitfx.kernels.matmul_config import (  # noqa: F401
    _PATHS, _TC_TILES, _TUNABLE, _TUNED, DP4A_MAX_M, GEMV_MAX_M, SIMT_MAX_M, _config, _default_path, _dp4a_config,
    _tuned_tile,
)

__all__ = ["ternary_matmul", "ternary_matmul_int32", "run", "launch_class", "DP4A_MAX_M", "GEMV_MAX_M", "SIMT_MAX_M"]


@triton.jit
def _plane(b, J: tl.constexpr, MINUS_ONE: tl.constexpr, USE_ASM: tl.constexpr):
    """Plane ``J`` of the packed bytes ``b`` (uint8): int8 codes ``(b >> 2J) & 3``, or ``t = c - 1``.

    With ``USE_ASM`` (NVIDIA), four bytes share one 32-bit register and are unpacked together:
    ``(x >> 2J) & 0x03030303``; ``c - 1`` per byte without borrows is ``((c | 0x80) - 1) ^ 0x80``.
    Every output byte depends only on its own input byte, so the packing order does not matter.
    """
    if USE_ASM:
        # (The asm strings stay literal arguments: older Triton cannot hold a str in a variable.)
        if MINUS_ONE:
            if J == 0:
                c = tl.inline_asm_elementwise(
                    "{ .reg .b32 t; and.b32 t, $1, 0x03030303; or.b32 t, t, 0x80808080; "
                    "sub.u32 t, t, 0x01010101; xor.b32 $0, t, 0x80808080; }",
                    "=r,r", [b], dtype=tl.int8, is_pure=True, pack=4)
            elif J == 1:
                c = tl.inline_asm_elementwise(
                    "{ .reg .b32 t; shr.b32 t, $1, 2; and.b32 t, t, 0x03030303; or.b32 t, t, 0x80808080; "
                    "sub.u32 t, t, 0x01010101; xor.b32 $0, t, 0x80808080; }",
                    "=r,r", [b], dtype=tl.int8, is_pure=True, pack=4)
            elif J == 2:
                c = tl.inline_asm_elementwise(
                    "{ .reg .b32 t; shr.b32 t, $1, 4; and.b32 t, t, 0x03030303; or.b32 t, t, 0x80808080; "
                    "sub.u32 t, t, 0x01010101; xor.b32 $0, t, 0x80808080; }",
                    "=r,r", [b], dtype=tl.int8, is_pure=True, pack=4)
            else:
                c = tl.inline_asm_elementwise(
                    "{ .reg .b32 t; shr.b32 t, $1, 6; and.b32 t, t, 0x03030303; or.b32 t, t, 0x80808080; "
                    "sub.u32 t, t, 0x01010101; xor.b32 $0, t, 0x80808080; }",
                    "=r,r", [b], dtype=tl.int8, is_pure=True, pack=4)
        else:
            if J == 0:
                c = tl.inline_asm_elementwise(
                    "and.b32 $0, $1, 0x03030303;", "=r,r", [b], dtype=tl.int8, is_pure=True, pack=4)
            elif J == 1:
                c = tl.inline_asm_elementwise(
                    "{ .reg .b32 t; shr.b32 t, $1, 2; and.b32 $0, t, 0x03030303; }",
                    "=r,r", [b], dtype=tl.int8, is_pure=True, pack=4)
            elif J == 2:
                c = tl.inline_asm_elementwise(
                    "{ .reg .b32 t; shr.b32 t, $1, 4; and.b32 $0, t, 0x03030303; }",
                    "=r,r", [b], dtype=tl.int8, is_pure=True, pack=4)
            else:
                c = tl.inline_asm_elementwise(
                    "{ .reg .b32 t; shr.b32 t, $1, 6; and.b32 $0, t, 0x03030303; }",
                    "=r,r", [b], dtype=tl.int8, is_pure=True, pack=4)
    else:
        c = ((b >> (2 * J)) & 3).to(tl.int8)
        if MINUS_ONE:
            c = (c - 1).to(tl.int8)
    return c


@triton.jit
def _store_tile(
    acc, out_ptr, out_offs, mask, sx_ptr, sw_ptr, bias_ptr, offs_m, offs_n, m_mask, n_mask,
    FLOAT_OUT: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    """Store ``acc^T [BLOCK_N, BLOCK_M]`` int32, or ``acc * (1/s_x) * (1/s_w) + b`` in out's dtype."""
    if FLOAT_OUT:
        inv_x = tl.math.div_rn(1.0, tl.load(sx_ptr + offs_m, mask=m_mask, other=1.0))
        inv_w = tl.math.div_rn(1.0, tl.load(sw_ptr + offs_n, mask=n_mask, other=1.0))
        out = acc.to(tl.float32) * inv_x[None, :] * inv_w[:, None]
        if HAS_BIAS:
            out += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
        tl.store(out_ptr + out_offs, out.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(out_ptr + out_offs, acc, mask=mask)


@triton.jit
def _finish_tile(
    acc, out_ptr, out_offs, mask, sx_ptr, sw_ptr, bias_ptr, offs_m, offs_n, m_mask, n_mask, ws_ptr, lock,
    SPLIT_K: tl.constexpr, FLOAT_OUT: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    """Store a finished ``acc^T`` tile, or with ``SPLIT_K > 1`` add this split's partial sums into
    the zeroed int32 workspace (integer atomics: exact and order-free; without a float epilogue
    the workspace is the output) and let the last split of the tile (``lock``: its arrival
    counter) run the epilogue on the total."""
    if SPLIT_K == 1:
        _store_tile(acc, out_ptr, out_offs, mask, sx_ptr, sw_ptr, bias_ptr, offs_m, offs_n, m_mask, n_mask,
                    FLOAT_OUT, HAS_BIAS)
    else:
        tl.atomic_add(ws_ptr + out_offs, acc, mask=mask, sem="relaxed")
        if FLOAT_OUT:
            tl.debug_barrier()  # every thread's adds happen before the release below
            arrived = tl.atomic_add(lock, 1, sem="acq_rel")
            if arrived == SPLIT_K - 1:  # the last split of this tile: all partial sums are in
                total = tl.load(ws_ptr + out_offs, mask=mask, other=0, cache_modifier=".cg")
                _store_tile(total, out_ptr, out_offs, mask, sx_ptr, sw_ptr, bias_ptr, offs_m, offs_n,
                            m_mask, n_mask, FLOAT_OUT, HAS_BIAS)


@triton.jit
def _pdl_prologue(w_ptr, offs_n, N, stride_wn, begin, end, ELEM_BYTES: tl.constexpr, PREFETCH: tl.constexpr):
    """The start of a kernel launched with programmatic dependent launch (``PDL``).

    Such a kernel may start while the kernel before it in the stream (the one that wrote ``q``
    and its scales) is still running. First the program's whole weight slice, elements
    ``[begin, end)`` of rows ``offs_n``, is requested into L2 (``cp.async.bulk.prefetch.L2``,
    one instruction per row), so that HBM streams weights during the wait; then ``gdc_wait``
    blocks until the previous kernel has finished and its writes are visible. The prefetch is
    safe whoever wrote the weights: L2 is the point of coherence, and a prefetch fills no L1
    line that a later load could read stale. Finally the next PDL kernel may launch.
    Slices start 16-byte aligned and span a multiple of 16 bytes (``layout.ROW_ALIGN``).
    """
    if PREFETCH:
        rows = w_ptr + tl.minimum(offs_n, N - 1).to(tl.int64) * stride_wn + begin
        nbytes = tl.full(offs_n.shape, 0, tl.int32) + (end - begin) * ELEM_BYTES
        tl.inline_asm_elementwise("cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0;", "=r,l,r",
                                  [rows, nbytes], dtype=tl.int32, is_pure=False, pack=1)
    tl.extra.cuda.gdc_wait()
    tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """``(pid_m, pid_n)``: the output tile of program ``pid`` of an ``[M, N]`` output in tiles of
    ``BLOCK_M x BLOCK_N``, in grouped order (``GROUP_M`` row tiles down each column of tiles
    before the next column), so that programs running together share their operands in L2."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _ternary_matmul_kernel(
    q_ptr, sx_ptr, w_ptr, sw_ptr, bias_ptr, out_ptr,  # q int8 [M, K], s_x [M], packed uint8 [N, Kq], s_w [N], b [N], out [M, N]
    ws_ptr, lock_ptr,  # split-K: zeroed int32 [M, N] workspace and [tiles] arrival counters
    M, N, K, Kq, steps_per_split,
    stride_qm, stride_wn, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KQ: tl.constexpr,
    GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr,
    USE_DOT: tl.constexpr, OFFSET_TRICK: tl.constexpr, USE_ASM: tl.constexpr,
    FLOAT_OUT: tl.constexpr, HAS_BIAS: tl.constexpr,
    EVEN_KQ: tl.constexpr,  # BLOCK_KQ divides Kq: no step runs past a row
    EVEN_K: tl.constexpr,  # K == 4 Kq: no padding columns
    PDL: tl.constexpr, PREFETCH: tl.constexpr,  # programmatic dependent launch, L2 prefetch (_pdl_prologue)
):
    """``acc[m, n] = sum_k q[m, k] t[n, k]`` (int32), then the epilogue of :func:`_store_tile`.

    Program ``(pid, pid_k)`` owns the output tile ``[BLOCK_M, BLOCK_N]`` picked by ``pid`` in
    grouped order, and the packed bytes ``[pid_k * steps_per_split * BLOCK_KQ, ...)`` of it.
    Each step loads one ``[BLOCK_N, BLOCK_KQ]`` byte tile and, per plane ``j``, the activation
    slice ``q[:, j*Kq + i]``; activations at ``k >= K`` are masked to 0, so the padding codes
    never matter.
    """
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m, pid_n = grouped_tile(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    q_rows = q_ptr + offs_m.to(tl.int64)[:, None] * stride_qm  # [BLOCK_M, 1]
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn  # [BLOCK_N, 1]

    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.int32)
    if not USE_DOT:  # products summed elementwise, reduced over K once after the loop
        if BLOCK_M == 1:
            part = tl.zeros((BLOCK_N, BLOCK_KQ), dtype=tl.int32)
        else:
            part = tl.zeros((BLOCK_N, BLOCK_M, BLOCK_KQ), dtype=tl.int32)
    if OFFSET_TRICK:
        qpart = tl.zeros((BLOCK_M, BLOCK_KQ), dtype=tl.int32)
    i_begin = pid_k * steps_per_split * BLOCK_KQ
    i_end = min(i_begin + steps_per_split * BLOCK_KQ, Kq)
    if PDL:
        _pdl_prologue(w_ptr, offs_n, N, stride_wn, i_begin, i_end, 1, PREFETCH)
    for i0 in range(i_begin, i_end, BLOCK_KQ):
        idx = i0 + tl.arange(0, BLOCK_KQ)
        if EVEN_KQ:  # masks constant along K keep the loads 16 bytes wide
            b = tl.load(w_rows + idx[None, :], mask=n_mask[:, None], other=0)
        else:
            in_row = idx < Kq
            b = tl.load(w_rows + idx[None, :], mask=n_mask[:, None] & in_row[None, :], other=0)
        for j in tl.static_range(4):
            k = j * Kq + idx
            if EVEN_KQ and EVEN_K:
                qj = tl.load(q_rows + k[None, :], mask=m_mask[:, None], other=0)
            elif EVEN_KQ:
                qj = tl.load(q_rows + k[None, :], mask=m_mask[:, None] & (k < K)[None, :], other=0)
            else:
                qj = tl.load(q_rows + k[None, :], mask=m_mask[:, None] & (in_row & (k < K))[None, :], other=0)
            cj = _plane(b, j, not OFFSET_TRICK, USE_ASM)  # int8 [BLOCK_N, BLOCK_KQ]: c = t + 1, or t
            if USE_DOT:
                acc = tl.dot(cj, tl.trans(qj), acc, out_dtype=tl.int32)
            elif BLOCK_M == 1:
                part += cj.to(tl.int32) * qj.to(tl.int32)
            else:
                part += cj.to(tl.int32)[:, None, :] * qj.to(tl.int32)[None, :, :]
            if OFFSET_TRICK:
                qpart += qj.to(tl.int32)
    if not USE_DOT:
        if BLOCK_M == 1:
            acc += tl.sum(part, axis=1)[:, None]
        else:
            acc += tl.sum(part, axis=2)
    if OFFSET_TRICK:
        acc -= tl.sum(qpart, axis=1)[None, :]

    out_offs = offs_m.to(tl.int64)[None, :] * stride_om + offs_n[:, None]  # [BLOCK_N, BLOCK_M]
    mask = n_mask[:, None] & m_mask[None, :]
    _finish_tile(acc, out_ptr, out_offs, mask, sx_ptr, sw_ptr, bias_ptr, offs_m, offs_n, m_mask, n_mask,
                 ws_ptr, lock_ptr + pid_m * tl.cdiv(N, BLOCK_N) + pid_n, SPLIT_K, FLOAT_OUT, HAS_BIAS)


@triton.jit
def _dp4a(c, q, acc, USE_ASM: tl.constexpr):
    """``acc + sum_b c.byte[b] * q.byte[b]`` per int32 lane: bytes of ``c`` unsigned, of ``q`` signed."""
    if USE_ASM:
        return tl.inline_asm_elementwise(
            "dp4a.u32.s32 $0, $1, $2, $3;", "=r,r,r,r", [c, q, acc], dtype=tl.int32, is_pure=True, pack=1)
    else:
        for b in tl.static_range(4):
            acc += ((c >> (8 * b)) & 0xFF) * ((q << (24 - 8 * b)) >> 24)
        return acc


@triton.jit
def _q_words(q_rows, kw, qmask, K4, EVEN_K: tl.constexpr):
    """Activation words ``q[m, kw]`` ([BLOCK_M, BLOCK_W]); words past the row (``kw >= K4``) read 0."""
    if EVEN_K:
        qj = tl.load(q_rows + kw[None, :], mask=qmask, other=0)
    else:
        qj = tl.load(q_rows + kw[None, :], mask=qmask & (kw < K4)[None, :], other=0)
    return qj


@triton.jit
def _dp4a_plane(wt, qj, J: tl.constexpr, acc, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_W: tl.constexpr,
                USE_ASM: tl.constexpr):
    """``acc += codes of plane J of wt . qj`` per word: 2-D for one row of q, else broadcast along M."""
    cj = (wt >> (2 * J)) & 0x03030303
    if BLOCK_M == 1:
        acc = _dp4a(cj, tl.broadcast_to(qj, (BLOCK_N, BLOCK_W)), acc, USE_ASM)
    else:
        c3 = tl.broadcast_to(cj[:, None, :], (BLOCK_N, BLOCK_M, BLOCK_W))
        q3 = tl.broadcast_to(qj[None, :, :], (BLOCK_N, BLOCK_M, BLOCK_W))
        acc = _dp4a(c3, q3, acc, USE_ASM)
    return acc


@triton.jit
def _ternary_dp4a_kernel(
    q_ptr, sx_ptr, w_ptr, sw_ptr, bias_ptr, out_ptr,  # q as int32 words [M, K4], packed as int32 words [N, Kq4]
    ws_ptr, lock_ptr,
    M, N, K4, Kq4, words_per_split,
    stride_qm, stride_wn, stride_om,  # in words (q, w) and elements (out)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, SPLIT_K: tl.constexpr,
    USE_ASM: tl.constexpr, FLOAT_OUT: tl.constexpr, HAS_BIAS: tl.constexpr,
    EVEN_W: tl.constexpr,  # BLOCK_W divides Kq4: no step runs past a row
    STREAM_HINT: tl.constexpr,  # evict-first loads of the weights
    EVEN_K: tl.constexpr,  # K4 == 4 Kq4: no padding words
    PDL: tl.constexpr, PREFETCH: tl.constexpr,  # programmatic dependent launch, L2 prefetch (_pdl_prologue)
    BYTE_PTRS: tl.constexpr = False,  # q and the packed weight given as int8 / uint8: read as words
):
    """Small-M ternary GEMV on the CUDA cores with ``dp4a`` (4 int8 products per instruction).

    A 32-bit word of packed weights holds, per plane ``j``, the codes ``c = t + 1`` of four
    consecutive columns ``k = j Kq + 4i .. 4i + 3``; ``(word >> 2j) & 0x03030303`` lays them
    out as four bytes, which meet the matching int32 word of ``q`` in one ``dp4a``. Then
    ``acc = sum q c - sum q`` (the offset trick; ``sum q`` is a ``dp4a`` with ``0x01010101``).
    Program ``(pid_n, pid_k, pid_m)`` owns ``BLOCK_N`` weight rows, ``BLOCK_M`` rows of ``q``
    and one K split; everything stays in the blocked layout (no shared-memory shuffles).
    """
    if BYTE_PTRS:  # the same addresses as words (rows start 4-byte aligned: the launcher checks)
        q_ptr = q_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
        w_ptr = w_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_mask = offs_n < N
    m_mask = offs_m < M
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn  # [BLOCK_N, 1]
    q_rows = q_ptr + offs_m.to(tl.int64)[:, None] * stride_qm  # [BLOCK_M, 1]
    # M = 1 keeps everything 2-D ([BLOCK_N, BLOCK_W], q broadcast along N): the 3-D form would
    # move every plane of codes through shared memory to broadcast it along M.
    if BLOCK_M == 1:
        acc = tl.zeros((BLOCK_N, BLOCK_W), dtype=tl.int32)
        qsum = tl.zeros((1, BLOCK_W), dtype=tl.int32)
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_M, BLOCK_W), dtype=tl.int32)
        qsum = tl.zeros((BLOCK_M, BLOCK_W), dtype=tl.int32)
    ones = tl.full(qsum.shape, 0x01010101, tl.int32)
    w_begin = pid_k * words_per_split
    w_end = tl.minimum(w_begin + words_per_split, Kq4)
    if PDL:
        _pdl_prologue(w_ptr, offs_n, N, stride_wn, w_begin, w_end, 4, PREFETCH)
    for w0 in range(w_begin, w_end, BLOCK_W):
        widx = w0 + tl.arange(0, BLOCK_W)
        if EVEN_W:  # masks constant along K keep the loads 16 bytes wide
            wmask = n_mask[:, None]
            qmask = m_mask[:, None]
        else:
            live = widx < w_end
            wmask = n_mask[:, None] & live[None, :]
            qmask = m_mask[:, None] & live[None, :]
        if STREAM_HINT:  # each weight byte is read once: keep it from evicting q and the scales
            wt = tl.load(w_rows + widx[None, :], mask=wmask, other=0, eviction_policy="evict_first")
        else:
            wt = tl.load(w_rows + widx[None, :], mask=wmask, other=0)
        # The four planes' activation words, all loaded before the first product (L2 latency once).
        q0 = _q_words(q_rows, 0 * Kq4 + widx, qmask, K4, EVEN_K)
        q1 = _q_words(q_rows, 1 * Kq4 + widx, qmask, K4, EVEN_K)
        q2 = _q_words(q_rows, 2 * Kq4 + widx, qmask, K4, EVEN_K)
        q3 = _q_words(q_rows, 3 * Kq4 + widx, qmask, K4, EVEN_K)
        acc = _dp4a_plane(wt, q0, 0, acc, BLOCK_N, BLOCK_M, BLOCK_W, USE_ASM)
        acc = _dp4a_plane(wt, q1, 1, acc, BLOCK_N, BLOCK_M, BLOCK_W, USE_ASM)
        acc = _dp4a_plane(wt, q2, 2, acc, BLOCK_N, BLOCK_M, BLOCK_W, USE_ASM)
        acc = _dp4a_plane(wt, q3, 3, acc, BLOCK_N, BLOCK_M, BLOCK_W, USE_ASM)
        qsum = _dp4a(ones, q0, _dp4a(ones, q1, _dp4a(ones, q2, _dp4a(ones, q3, qsum, USE_ASM), USE_ASM), USE_ASM), USE_ASM)
    if BLOCK_M == 1:
        total = tl.sum(acc, axis=1)[:, None] - tl.sum(qsum, axis=1)[None, :]  # [BLOCK_N, 1]
    else:
        total = tl.sum(acc, axis=2) - tl.sum(qsum, axis=1)[None, :]  # [BLOCK_N, BLOCK_M]

    out_offs = offs_m.to(tl.int64)[None, :] * stride_om + offs_n[:, None]
    mask = n_mask[:, None] & m_mask[None, :]
    _finish_tile(total, out_ptr, out_offs, mask, sx_ptr, sw_ptr, bias_ptr, offs_m, offs_n, m_mask, n_mask,
                 ws_ptr, lock_ptr + pid_m * tl.num_programs(0) + pid_n, SPLIT_K, FLOAT_OUT, HAS_BIAS)


_MATMUL = Launcher(_ternary_matmul_kernel)
_DP4A = Launcher(_ternary_dp4a_kernel)


def _split_k_workspace(out: torch.Tensor, split_k: int, tiles: int, float_out: bool, traced: bool = False):
    """``(ws, lock)`` for :func:`_finish_tile`: a zeroed int32 workspace and per-tile arrival
    counters when K is split (the int32 output itself is the workspace); unused otherwise, and
    then ``out`` itself, or (``traced``) one spare int32: a kernel argument Inductor sees
    aliasing the output it writes would cost a copy of that output."""
    if split_k == 1:
        if traced:
            spare = torch.empty((1,), dtype=torch.int32, device=out.device)
            return spare, spare
        return out, out
    if not float_out:
        return out.zero_(), out
    ws = torch.zeros(out.shape, dtype=torch.int32, device=out.device)
    return ws, torch.zeros(tiles, dtype=torch.int32, device=out.device)


def _as_words(q: torch.Tensor, traced: bool = False) -> torch.Tensor:
    """``q`` int8 ``[M, K]`` as int32 words ``[M, ceil(K/4)]``; zero-padded copy unless it can be
    viewed. ``traced``: the int8 rows themselves (padded likewise), for the kernel to read as
    words (``BYTE_PTRS``): a dtype view of another width is a call into ATen per launch in
    Inductor's code; with no address to read, the offset into an aligned allocation counts."""
    M, K = q.shape
    start = q.storage_offset() if traced else q.data_ptr()
    if not (K % 4 == 0 and q.stride(0) % 4 == 0 and q.stride(-1) == 1 and start % 4 == 0):
        padded = torch.zeros((M, 4 * cdiv(K, 4)), dtype=torch.int8, device=q.device)
        padded[:, :K] = q
        q = padded
    return q if traced else q.view(torch.int32)


def _hint(n) -> int:
    """An int for the launch rules: ``n`` itself, or a symbolic size's example value (the
    rules pick block sizes and splits; any choice computes the same numbers)."""
    if isinstance(n, int):
        return n
    hint = getattr(getattr(n, "node", None), "hint", None)
    return int(hint) if hint is not None else 1


def _untraced_modes():
    """A context without the dispatch modes of a trace (fake tensors, functionalization,
    proxies): the tensor-core tile is measured on real tensors even while a graph is traced."""
    from torch.utils._python_dispatch import _disable_current_modes

    return _disable_current_modes()


def _launch_dp4a(q, x_scale, packed, w_scale, bias, out, float_out, split_k, config, traced=False, bind=False):
    bindable = bind  # with bind, the caller takes (out, again); again is None where nothing can be bound
    M, K = q.shape
    N, Kq = packed.shape
    if traced:  # the weight's shape is the graph's (it may be handed over as symbolic): specialized on it
        N, Kq = int(N), int(Kq)
    cfg = _dp4a_config(_hint(M), N, Kq, out.device, split_k, config)
    q32 = _as_words(q, traced)
    start = packed.storage_offset() if traced else packed.data_ptr()
    if packed.stride(0) % 4 or start % 4:
        packed = packed.contiguous()
        bindable = False  # a plan would keep the copy, blind to later writes into the layer's own weight
    w32 = packed if traced else packed.view(torch.int32)
    word = 4 if traced else 1  # traced: int8 / uint8 rows, read as words by the kernel (BYTE_PTRS)
    tiles_m = cdiv(M, cfg["BLOCK_M"])
    ws, lock = _split_k_workspace(out, cfg["SPLIT_K"], cfg["tiles_n"] * tiles_m, float_out, traced)
    grid = (cfg["tiles_n"], cfg["SPLIT_K"], tiles_m)
    pdl = cfg["PDL"] and not traced
    K4 = int(q32.shape[1]) // word  # (traced: a graph's K, specialized)
    args = (q32, x_scale, w32, w_scale, bias, out, ws, lock,
            M, N, K4, Kq // 4, cfg["words_per_split"],
            q32.stride(0) // word, w32.stride(0) // word, out.stride(0))
    constexprs = dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_W=cfg["BLOCK_W"], SPLIT_K=cfg["SPLIT_K"],
                      USE_ASM=cfg["USE_ASM"], FLOAT_OUT=float_out, HAS_BIAS=bias is not None,
                      EVEN_W=(Kq // 4) % cfg["BLOCK_W"] == 0, STREAM_HINT=cfg["STREAM_HINT"],
                      EVEN_K=K4 == Kq, PDL=pdl, PREFETCH=cfg["PREFETCH"] and pdl, BYTE_PTRS=traced)
    launch = _DP4A.launch(grid, args, constexprs, traced=traced, bind=bindable, num_warps=cfg["num_warps"],
                          num_stages=cfg["num_stages"], launch_pdl=pdl)
    if launch is None:
        return (out, None) if bind else out
    split, tiles_n, block_m, sizes = cfg["SPLIT_K"], cfg["tiles_n"], cfg["BLOCK_M"], args[9:]  # the ints after M
    empty, dtype, device, i32 = torch.empty, out.dtype, out.device, torch.int32

    def with_words(q, x_scale, words, w_scale, bias):  # (holds no tensor)
        M = q.shape[0]
        tiles_m = cdiv(M, block_m)
        out = empty((M, N), dtype=dtype, device=device)
        ws, lock = _split_k_workspace(out, split, tiles_n * tiles_m, float_out)
        launch(_as_words(q), x_scale, words, w_scale, bias, out, ws, lock, M, *sizes, grid=(tiles_n, split, tiles_m))
        return out

    if bind == "operands":
        return out, lambda q, x_scale, packed, w_scale, bias: with_words(q, x_scale, packed.view(i32), w_scale, bias)
    return out, lambda q, x_scale: with_words(q, x_scale, w32, w_scale, bias)


def _launch(name, q, x_scale, packed, w_scale, bias, out_dtype, float_out, path, split_k, config=None):
    check_dtype(name, "activation codes q", q, (torch.int8,))
    check_dtype(name, "packed ternary weight", packed, (torch.uint8,))
    q = rows(name, "activation codes q [M, K]", q)
    packed = rows(name, "packed ternary weight [N, Kq]", packed)
    M, K = q.shape
    layout.check_packed_shape(packed.shape, K)
    N, Kq = packed.shape
    device = check_device(name, q, packed, x_scale, w_scale, bias)
    if float_out:
        check_dtype(name, "activation scale x_scale", x_scale, (torch.float32,))
        check_dtype(name, "weight scale w_scale", w_scale, (torch.float32,))
        if tuple(x_scale.shape) != (M,):
            raise ValueError(f"{name}: activation scale has shape {tuple(x_scale.shape)}, expected ({M},)")
        if tuple(w_scale.shape) != (N,):
            raise ValueError(f"{name}: weight scale has shape {tuple(w_scale.shape)}, expected ({N},)")
        if bias is not None:
            check_dtype(name, "bias", bias, FLOAT_DTYPES)
            if tuple(bias.shape) != (N,):
                raise ValueError(f"{name}: bias has shape {tuple(bias.shape)}, expected ({N},)")
        if out_dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name}: out_dtype must be one of float32, float16, bfloat16, got {out_dtype}")
    return run(q, x_scale, packed, w_scale, bias, out_dtype, float_out, path, split_k, config)


def run(q, x_scale, packed, w_scale, bias, out_dtype, float_out=True, path=None, split_k=None, config=None,
        traced=False, bind=False):
    """The launch without the argument checks, for callers that made them (the op's guard,
    ``BitfxLinear``'s buffers, checked when packed or loaded): ``q`` int8 ``[M, K]`` with a
    contiguous last dimension, ``packed`` uint8 ``[N, packed_k(K)]`` likewise, fp32 scales
    ``[M]`` and ``[N]``, a float bias ``[N]`` or None, one device.

    ``traced``: launched through ``wrap_triton`` for the ``triton_op`` form of the op
    (:mod:`bitfx.ops.inductor`). ``M`` may be symbolic there: the path is chosen on it (a guard
    of the graph), the blocks and splits on its example value, and the grid is computed from
    it; the kernels launch without programmatic dependent launch (Inductor does not pass it).

    ``bind``: return ``(out, again)``, ``again(q, x_scale) -> out`` the same launch for new
    codes and scales of this call's shapes (fresh allocations, as the norm kernel's outputs
    are), with the weight, its scale and the bias of this call (:meth:`Launcher.bind`); None
    where a plan would hold copies of them (blind to later writes into the originals) or the
    output is empty: an eager layer's launch plan. ``bind="operands"``: ``again(q, x_scale,
    packed, w_scale, bias)`` instead, the weight operands given per call and none held,
    matching this call's as the codes must (shapes, strides, dtypes, 16-byte alignment, a bias
    where this call has one): a training op's plan, whose packed weights are new tensors each
    step."""
    M, K = q.shape
    N, Kq = packed.shape
    device = q.device
    if traced:  # the row length and the weight's shape are the graph's: specialized on them
        K, N, Kq = int(K), int(N), int(Kq)
    given = (w_scale, bias)
    if float_out:
        x_scale, w_scale = x_scale.contiguous(), w_scale.contiguous()
        if bias is not None:
            bias = bias.contiguous()
    # A plan would keep copies, blind to later writes into the layer's own tensors: none then.
    bindable = bind and w_scale is given[0] and bias is given[1]
    if path is None:
        path = _default_path(M)
    elif path not in _PATHS:
        raise ValueError(f"ternary_matmul: path must be one of {_PATHS} or None, got {path!r}")

    out = torch.empty((M, N), dtype=out_dtype, device=device)
    if M == 0 or N == 0:
        return (out, None) if bind else out
    if path == "dp4a":
        got = _launch_dp4a(q, x_scale, packed, w_scale, bias, out, float_out, split_k, config, traced,
                           bind if bindable else False)
        return (got if bindable else (got, None)) if bind else got
    Mh = _hint(M)
    tile = None
    if path == "tc" and config is None and device.type == "cuda" and not interpreting():
        if not traced:
            tile = _tuned_tile(M, N, Kq, device)
        elif isinstance(M, int):
            with _untraced_modes():
                tile = _tuned_tile(M, N, Kq, device)
    cfg = _config(Mh, N, Kq, device, path, split_k, config, tile)
    tiles = cdiv(M, cfg["BLOCK_M"]) * cdiv(N, cfg["BLOCK_N"])
    ws, lock = _split_k_workspace(out, cfg["SPLIT_K"], tiles, float_out, traced)
    grid = (tiles, cfg["SPLIT_K"])
    pdl = cfg["PDL"] and not traced
    args = (q, x_scale, packed, w_scale, bias, out, ws, lock,
            M, N, K, Kq, cfg["steps_per_split"],
            q.stride(0), packed.stride(0), out.stride(0))
    constexprs = dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_KQ=cfg["BLOCK_KQ"],
                      GROUP_M=cfg["GROUP_M"], SPLIT_K=cfg["SPLIT_K"],
                      USE_DOT=cfg["USE_DOT"], OFFSET_TRICK=cfg["OFFSET_TRICK"], USE_ASM=cfg["USE_ASM"],
                      FLOAT_OUT=float_out, HAS_BIAS=bias is not None,
                      EVEN_KQ=Kq % cfg["BLOCK_KQ"] == 0, EVEN_K=K == layout.PLANES * Kq,
                      PDL=pdl, PREFETCH=cfg["PREFETCH"] and pdl)
    launch = _MATMUL.launch(grid, args, constexprs, traced=traced, bind=bindable, num_warps=cfg["num_warps"],
                            num_stages=cfg["num_stages"], launch_pdl=pdl)
    if launch is None:
        return (out, None) if bind else out
    split, sizes, empty = cfg["SPLIT_K"], args[9:], torch.empty  # sizes: the launch's ints after M
    block_m, tiles_n = cfg["BLOCK_M"], cdiv(N, cfg["BLOCK_N"])

    def operands(q, x_scale, packed, w_scale, bias):  # (holds no tensor)
        M = q.shape[0]
        tiles = cdiv(M, block_m) * tiles_n
        out = empty((M, N), dtype=out_dtype, device=device)
        ws, lock = _split_k_workspace(out, split, tiles, float_out)
        launch(q, x_scale, packed, w_scale, bias, out, ws, lock, M, *sizes, grid=(tiles, split))
        return out

    if bind == "operands":
        return out, operands
    return out, lambda q, x_scale: operands(q, x_scale, packed, w_scale, bias)


def launch_class(M: int, N: int, Kq: int, device: torch.device) -> tuple:
    """What :func:`run`'s launch for ``M`` rows (the default path, split and blocks) depends on
    besides ``M`` itself: the path, its configuration (less the tile count, which the grid
    takes from ``M``) and Triton's specialization of the int ``M`` (equal to 1, divisible by 16,
    beyond int32). A bound launch (``run(..., bind=True)``) serves every ``M`` of its class:
    its ``again`` takes the rows from the codes it is given."""
    path = _default_path(M)
    if path == "dp4a":
        cfg, derived = _dp4a_config(M, N, Kq, device, None, None), "tiles_m"
    else:
        tile = None
        if path == "tc" and device.type == "cuda" and not interpreting():
            tile = _tuned_tile(M, N, Kq, device)
        cfg, derived = _config(M, N, Kq, device, path, None, None, tile), "tiles"
    return path, tuple(item for item in cfg.items() if item[0] != derived), _arg_key(M)


def ternary_matmul(
    q: torch.Tensor,
    x_scale: torch.Tensor,
    packed: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
    *,
    path: str | None = None,
    split_k: int | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """``out = (q @ t^T) / s_x / s_w + b``: ``[M, N]`` in ``out_dtype`` (fp32, fp16 or bf16).

    ``q`` int8 ``[M, K]``, ``x_scale`` fp32 ``[M]``, ``packed`` uint8 ``[N, packed_k(K)]``,
    ``w_scale`` fp32 ``[N]``, ``bias`` ``[N]`` (any float dtype) or None. The product is exact in
    int32; the epilogue is ``acc * (1/s_x) * (1/s_w) + b`` in fp32 (correctly rounded reciprocals),
    within a few fp32 ulps of the reference's two divisions. NaN scales give NaN rows / columns.
    ``path`` ("simt", "gemv", "tc"), ``split_k`` and ``config`` (block sizes, warps, stages)
    override the heuristic (for tests and tuning).

    The codes are not validated per call (that would cost a pass over the weight): the padding
    columns ``k >= K`` never count, and the invalid code 3 would count as ``t = 2``.
    ``BitfxLinear`` validates its weights when built or loaded
    (:func:`bitfx.reference.check_ternary_codes`); the reference raises on such codes.
    """
    return _launch("ternary_matmul", q, x_scale, packed, w_scale, bias, out_dtype, True, path, split_k, config)


def ternary_matmul_int32(
    q: torch.Tensor, packed: torch.Tensor, *, path: str | None = None, split_k: int | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """The exact integer product ``acc = q @ t^T``: int32 ``[M, N]`` for ``q`` int8 ``[M, K]``."""
    return _launch("ternary_matmul_int32", q, None, packed, None, None, torch.int32, False, path, split_k, config)
