"""Absmean ternary weight quantization and packing (BitNet b1.58, Ma et al. 2024).

For a linear weight ``W [N, K]``::

    s_w = 1 / max(mean(|W|), 1e-5)                     fp32 [N]  (per tensor or per row)
    t   = clamp(round_half_even(W * s_w), -1, 1)        int8 [N, K]
    packed                                              uint8 [N, Kq], see bitfx.layout

and the inverse direction used by the training backward, ``t / s_w``. A scale group (the whole
tensor, or one row) holding NaN or Inf gets ``s_w = NaN`` and all-zero codes; the numbers are
those of :mod:`bitfx.reference` (exactly for the codes, up to reduction order for ``s_w``).
"""

from __future__ import annotations

import collections
import concurrent.futures

import torch
import triton
import triton.language as tl

from bitfx import layout
from bitfx.kernels._launch import Launcher
from bitfx.kernels._utils import cdiv, next_pow2, FLOAT_DTYPES, check_device, check_dtype, interpreting, on_input_device

__all__ = ["weight_scale", "quantize_pack", "weight_quant", "weight_quant_stacked", "weight_quant_stacks",
           "unpack_ternary", "dequantize", "unpack_run"]



def _check_weight(name: str, w: torch.Tensor) -> None:
    if w.dim() != 2:
        raise ValueError(f"{name}: linear weight must be 2-D [N, K], got shape {tuple(w.shape)}")
    check_dtype(name, "linear weight", w, FLOAT_DTYPES)
    layout.packed_k(w.shape[1])  # raises for K < 1


def _check_scale(name: str, s_w: torch.Tensor, N: int) -> torch.Tensor:
    check_dtype(name, "weight scale", s_w, (torch.float32,))
    if tuple(s_w.shape) != (N,):
        raise ValueError(f"{name}: weight scale has shape {tuple(s_w.shape)}, expected ({N},)")
    return s_w.contiguous()


def _tile_rows_cols(K: int) -> tuple[int, int]:
    """Block sizes for a row-wise pass over K columns: [BLOCK_N, BLOCK_K], ~4K elements a tile."""
    block_k = min(next_pow2(K), 128 if interpreting() else 1024)
    block_n = max(1, min(64, 4096 // block_k))
    return block_n, block_k


def _tile_rows_packed(Kq: int) -> tuple[int, int]:
    """Block sizes for a pass over packed rows of Kq bytes (4 Kq weights): [BLOCK_N, BLOCK_KQ]."""
    block_kq = min(next_pow2(Kq), 64 if interpreting() else 256)
    return max(1, min(64, 4096 // block_kq)), block_kq


# --------------------------------------------------------------------------------------------
# weight_scale
# --------------------------------------------------------------------------------------------


@triton.jit
def _abs_row_sum_kernel(
    w_ptr, out_ptr,  # w [N, K] (any strides), out fp32 [row0 + N]
    row0, N, K, stride_wn, stride_wk,  # row0: the first row of out written (a block of a stack)
    FINISH: tl.constexpr,  # True: out = 1 / max(sum / K, 1e-5) (per-channel scale); False: out = sum
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``out[n] = sum_k |w[n, k]|`` in fp32 (or the per-row scale), NaN if the row is not all finite."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    total = _abs_sums(w_ptr, rows, row_mask, K, stride_wn, stride_wk, BLOCK_N, BLOCK_K)
    if FINISH:
        mean = tl.math.div_rn(total, K * 1.0)  # K <= 2**24 converts exactly
        # correctly rounded, as torch.reciprocal; a NaN row stays NaN (tl.maximum would drop it)
        total = tl.where(mean != mean, mean, tl.math.div_rn(1.0, tl.maximum(mean, 1e-5)))
    tl.store(out_ptr + row0 + rows, total, mask=row_mask)


@triton.jit
def _abs_sums(w_ptr, rows, row_mask, K, stride_wn, stride_wk, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``sum_k |w[rows, k]|`` in fp32, NaN for a row holding NaN or Inf."""
    row_ptr = w_ptr + rows.to(tl.int64)[:, None] * stride_wn
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    bad = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        mask = row_mask[:, None] & (cols < K)[None, :]
        a = tl.abs(tl.load(row_ptr + cols[None, :] * stride_wk, mask=mask, other=0.0).to(tl.float32))
        acc += a
        bad |= (~(a < float("inf"))).to(tl.int32)  # NaN and +-Inf (a finite row's sum may still overflow)
    return tl.where(tl.max(bad, axis=1) > 0, float("nan"), tl.sum(acc, axis=1))


@on_input_device
def weight_scale(w: torch.Tensor, per_channel: bool = False) -> torch.Tensor:
    """Absmean scale ``s_w = 1 / max(mean(|W|), 1e-5)``: fp32 ``[N]`` for ``w [N, K]``.

    Per tensor (one scale repeated N times) or per output channel (the mean over each row).
    A scale group holding NaN or Inf gets NaN. Equal to ``reference.weight_scale`` up to the
    order of the fp32 summation. ``w`` is fp32, fp16 or bf16, any strides.
    """
    name = "weight_scale"
    _check_weight(name, w)
    device = check_device(name, w)
    N, K = w.shape
    out = torch.empty(N, dtype=torch.float32, device=device)
    if N == 0:
        return out
    block_n, block_k = _tile_rows_cols(K)
    _abs_row_sum_kernel[(cdiv(N, block_n),)](
        w, out, 0, N, K, w.stride(0), w.stride(1),
        FINISH=per_channel, BLOCK_N=block_n, BLOCK_K=block_k,
    )
    if per_channel:
        return out
    # Per tensor: one more program combines the row sums and writes the scale to every row.
    _tensor_scale_kernel[(1,)](out, N, float(N * K), BLOCK=min(next_pow2(N), 1024))
    return out


@triton.jit
def _tensor_scale_kernel(s_ptr, N, count, BLOCK: tl.constexpr):
    """In place over the row sums ``s [N]``: ``s[:] = 1 / max(sum(s) / count, 1e-5)`` (NaN when a
    row sum is NaN), in one program: the per-tensor scale without a round trip through torch."""
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for n0 in range(0, N, BLOCK):
        idx = n0 + tl.arange(0, BLOCK)
        acc += tl.load(s_ptr + idx, mask=idx < N, other=0.0)
    mean = tl.math.div_rn(tl.sum(acc, axis=0), count)
    scale = tl.where(mean != mean, mean, tl.math.div_rn(1.0, tl.maximum(mean, 1e-5)))
    for n0 in range(0, N, BLOCK):
        idx = n0 + tl.arange(0, BLOCK)
        tl.store(s_ptr + idx, tl.zeros((BLOCK,), dtype=tl.float32) + scale, mask=idx < N)


# --------------------------------------------------------------------------------------------
# quantize_pack
# --------------------------------------------------------------------------------------------


@triton.jit
def _quantize_pack_kernel(
    w_ptr, s_ptr, out_ptr,  # w [N, K] (any strides), s fp32 [N], out uint8 [N, Kq] contiguous
    N, K, Kq, stride_wn, stride_wk,
    BLOCK_N: tl.constexpr, BLOCK_KQ: tl.constexpr,
):
    """``packed[n, i] = sum_j (t[n, j*Kq + i] + 1) << 2j``, ``t = clamp(round_half_even(w * s), -1, 1)``.

    ``clamp(round_half_even(v), -1, 1) == (v > 0.5) - (v < -0.5)`` for every fp32 ``v``: half-way
    cases round to the even 0 or +-2 (then clamped to +-1), +-Inf give +-1, and NaN (a NaN scale,
    or 0 * Inf) gives 0, as the reference's ``where(isnan, 0, t)``. Columns ``k >= K`` load 0 and
    so get code 1 (zero weight).
    """
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    s = tl.load(s_ptr + rows, mask=row_mask, other=0.0)
    _pack_rows(w_ptr, s, out_ptr, rows, rows, row_mask, tl.program_id(1) * BLOCK_KQ, K, Kq, stride_wn, stride_wk,
               BLOCK_N, BLOCK_KQ)


@triton.jit
def _pack_rows(w_ptr, s, out_ptr, rows, out_rows, row_mask, col0, K, Kq, stride_wn, stride_wk,
               BLOCK_N: tl.constexpr, BLOCK_KQ: tl.constexpr):
    """The packed bytes ``[col0, col0 + BLOCK_KQ)`` of weight rows ``rows`` (scales ``s``),
    stored at rows ``out_rows`` of ``out [., Kq]`` (contiguous)."""
    idx = col0 + tl.arange(0, BLOCK_KQ)
    row_ptr = w_ptr + rows.to(tl.int64)[:, None] * stride_wn
    packed = tl.zeros((BLOCK_N, BLOCK_KQ), dtype=tl.int32)
    for j in tl.static_range(4):
        k = j * Kq + idx
        mask = row_mask[:, None] & ((idx < Kq) & (k < K))[None, :]
        v = tl.load(row_ptr + k[None, :] * stride_wk, mask=mask, other=0.0).to(tl.float32) * s[:, None]
        t = (v > 0.5).to(tl.int32) - (v < -0.5).to(tl.int32)
        packed |= (t + 1) << (2 * j)
    out_mask = row_mask[:, None] & (idx < Kq)[None, :]
    tl.store(out_ptr + out_rows.to(tl.int64)[:, None] * Kq + idx[None, :], packed.to(tl.uint8), mask=out_mask)


@on_input_device
def quantize_pack(w: torch.Tensor, s_w: torch.Tensor) -> torch.Tensor:
    """Ternarize ``w [N, K]`` with the scales ``s_w`` fp32 ``[N]`` and pack: uint8 ``[N, Kq]``.

    Exactly ``reference.pack_ternary(reference.ternarize(w, s_w))``; rows whose scale is NaN get
    zero weights. ``w`` is fp32, fp16 or bf16, any strides.
    """
    name = "quantize_pack"
    _check_weight(name, w)
    device = check_device(name, w, s_w)
    N, K = w.shape
    s_w = _check_scale(name, s_w, N)
    Kq = layout.packed_k(K)
    out = torch.empty((N, Kq), dtype=torch.uint8, device=device)
    if N == 0:
        return out
    block_n, block_kq = _tile_rows_packed(Kq)
    grid = (cdiv(N, block_n), cdiv(Kq, block_kq))
    _quantize_pack_kernel[grid](
        w, s_w, out, N, K, Kq, w.stride(0), w.stride(1), BLOCK_N=block_n, BLOCK_KQ=block_kq
    )
    return out


def weight_quant(w: torch.Tensor, per_channel: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Absmean ternary quantization and packing: ``(packed uint8 [N, Kq], s_w fp32 [N])`` (each
    launcher on ``w``'s device)."""
    s_w = weight_scale(w, per_channel)
    return quantize_pack(w, s_w), s_w


@triton.jit
def _stack_pack_kernel(
    w_ptr, sums_ptr, scale_ptr, out_ptr,  # w [N, K] (any strides); sums, scale fp32 and out uint8 [ΣN, Kq] of the stack
    row0, N, K, Kq, stride_wn, stride_wk,  # row0: the block's first row in the stack
    PER_CHANNEL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KQ: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """One weight's block of a stack: its scale from the row sums of ``|w|`` (``sums``, NaN for a
    row holding NaN or Inf), then its codes packed as ``_quantize_pack_kernel`` packs them.

    ``s = 1 / max(mean, 1e-5)`` with the mean and the reciprocal in fp64, each rounded once to
    fp32 (the op's reference computes them so): per row (``PER_CHANNEL``) the row's sum over K;
    per tensor the sum of the block's row sums (every program adds them in the same order, so
    all agree) over N K. A group with a NaN sum gets NaN (and zero codes). The programs of the
    first column of K write the scales of their rows."""
    pid_n = tl.program_id(0)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    if PER_CHANNEL:
        total = tl.load(sums_ptr + row0 + rows, mask=row_mask, other=0.0)
        mean = (total.to(tl.float64) / K).to(tl.float32)
    else:
        acc = tl.zeros((BLOCK_S,), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_S):
            idx = n0 + tl.arange(0, BLOCK_S)
            acc += tl.load(sums_ptr + row0 + idx, mask=idx < N, other=0.0)
        total = tl.sum(acc, axis=0)
        count = (tl.full((), 0, tl.int64) + N) * K  # (N or K may be the constant 1: Triton specializes it)
        mean = (total.to(tl.float64) / count.to(tl.float64)).to(tl.float32)
        mean = tl.zeros((BLOCK_N,), dtype=tl.float32) + mean
    s = _group_scale(mean)
    if tl.program_id(1) == 0:
        tl.store(scale_ptr + row0 + rows, s, mask=row_mask)
    _pack_rows(w_ptr, s, out_ptr, rows, row0 + rows, row_mask, tl.program_id(1) * BLOCK_KQ, K, Kq, stride_wn,
               stride_wk, BLOCK_N, BLOCK_KQ)


@triton.jit
def _group_scale(mean):
    """``1 / max(mean, 1e-5)``, the reciprocal in fp64 rounded once to fp32 (correctly rounded);
    a NaN mean (a group holding NaN or Inf) stays NaN, which ``tl.maximum`` would drop."""
    scale = (1.0 / tl.maximum(mean, 1e-5).to(tl.float64)).to(tl.float32)
    return tl.where(mean != mean, mean, scale)


_ROW_SUM = Launcher(_abs_row_sum_kernel)
_STACK_PACK = Launcher(_stack_pack_kernel)


def weight_quant_stacked(weights: list, per_channel: list) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`weight_quant` of each weight (float ``[N_i, K]``, one K, one device, any strides),
    written into one stack along N: ``(packed uint8 [sum N_i, Kq], s_w fp32 [sum N_i])``, each
    block with its own scale (per tensor or per row as ``per_channel[i]`` says). What a training
    step runs at a site whose weights the graph computes (``bitfx::weight_quant_stacked`` on
    CUDA; parameters are packed all at once, :func:`weight_quant_stacks`): two launches per weight through
    cached launchers (the row sums of ``|w|``, then the scale and the packing), each writing
    its block of the stack in place (no concatenated copy of the weights, no views). The
    arguments are those the op checked."""
    K = weights[0].shape[1]
    device = weights[0].device
    Kq = layout.packed_k(K)
    total = sum(w.shape[0] for w in weights)
    sums = torch.empty(total, dtype=torch.float32, device=device)
    scale = torch.empty(total, dtype=torch.float32, device=device)
    packed = torch.empty((total, Kq), dtype=torch.uint8, device=device)
    at = 0
    for w, pc in zip(weights, per_channel):
        if w.shape[0]:
            _pack_weight(w, pc, sums, scale, packed, at)
        at += w.shape[0]
    return packed, scale


def _pack_weight(w, pc, sums, scale, packed, at):
    """Weight ``w``'s block of a stack, from row ``at`` of ``sums``, ``scale`` and ``packed``:
    the row sums, then the scale and the packing (two launches)."""
    N, K = w.shape
    Kq = packed.shape[1]
    block_n, block_k = _tile_rows_cols(K)
    block_nq, block_kq = _tile_rows_packed(Kq)
    _ROW_SUM((cdiv(N, block_n),), (w, sums, at, N, K, w.stride(0), w.stride(1)),
             dict(FINISH=False, BLOCK_N=block_n, BLOCK_K=block_k), num_warps=4, num_stages=3)
    _STACK_PACK((cdiv(N, block_nq), cdiv(Kq, block_kq)), (w, sums, scale, packed, at, N, K, Kq, w.stride(0),
                                                          w.stride(1)),
                dict(PER_CHANNEL=bool(pc), BLOCK_N=block_nq, BLOCK_KQ=block_kq,
                     BLOCK_S=_sum_chunk()), num_warps=4, num_stages=3)


def _sum_chunk() -> int:
    """The chunk a per-tensor scale's sum of row sums is taken in (every packing kernel: one order)."""
    return 64 if interpreting() else 1024


# --------------------------------------------------------------------------------------------
# weight_quant_stacks: every stack of a training graph in three launches
# --------------------------------------------------------------------------------------------

# A weight's entry in the launch table (int64): its address, rows, columns, strides, first row
# in the flat scales, byte offset of its first packed row, packed row length, per-row scales.
_COLS = 9


@triton.jit
def _entry(wtab, i, w_like):
    """``(w, N, K, stride_n, stride_k, row0, out_at, Kq, per_channel)`` of weight ``i``."""
    e = wtab + i * 9
    w = tl.load(e).to(w_like.dtype)  # the address, typed as the launch's weights are
    return (w, tl.load(e + 1), tl.load(e + 2), tl.load(e + 3), tl.load(e + 4), tl.load(e + 5), tl.load(e + 6),
            tl.load(e + 7), tl.load(e + 8))


@triton.jit
def _program_rows(wtab, btab, w_like, BLOCK_N: tl.constexpr, DENSE: tl.constexpr):
    """This program's block ``(i, r) = btab[program_id]``: weight ``i``'s ``(w, K, stride_n,
    stride_k, row0, out_at, Kq)`` and its rows ``r + [0, BLOCK_N)`` with their mask.

    The table's values are runtime loads, about which the compiler knows nothing: without
    ``DENSE`` every weight element is a load of its own (2 bytes for bf16). ``DENSE`` is the
    launcher's promise (:func:`_dense`) that every weight of the launch has unit column stride,
    a 16-byte aligned address, and rows (``K``) and row strides of whole 16 bytes; said to the
    compiler, the loads become 16 bytes wide."""
    pid = tl.program_id(0)
    w, N, K, stride_n, stride_k, row0, out_at, Kq, _ = _entry(wtab, tl.load(btab + 2 * pid), w_like)
    if DENSE:
        per16: tl.constexpr = 128 // w_like.dtype.element_ty.primitive_bitwidth  # elements in 16 bytes
        w = tl.multiple_of(w, 16)
        K = tl.multiple_of(K, per16)
        stride_n = tl.multiple_of(stride_n, per16)
        stride_k = 1
    Kq = tl.multiple_of(Kq, 16)  # (layout.ROW_ALIGN: packed rows are whole 16 bytes)
    rows = tl.load(btab + 2 * pid + 1) + tl.arange(0, BLOCK_N)
    return w, K, stride_n, stride_k, row0, out_at, Kq, rows, rows < N


def _dense(weights: list) -> bool:
    """Whether the weights of one table launch may be read 16 bytes at a time (the promise of
    :func:`_program_rows`'s ``DENSE``): unit column stride, a 16-byte aligned address, and rows
    and row strides of whole 16 bytes, for every one."""
    for w in weights:
        size = w.element_size()
        if w.stride(1) != 1 or w.data_ptr() % 16 or (w.shape[1] * size) % 16 or (w.stride(0) * size) % 16:
            return False
    return True


@triton.jit
def _table_row_sum_kernel(w_like, wtab, btab, sums_ptr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          DENSE: tl.constexpr):
    """Program ``p``: rows ``[r, r + BLOCK_N)`` of weight ``i``, ``(i, r) = btab[p]``:
    ``sums[row0 + n] = sum_k |w[n, k]|`` (NaN for a row holding NaN or Inf)."""
    w, K, stride_n, stride_k, row0, _, _, rows, row_mask = _program_rows(wtab, btab, w_like, BLOCK_N, DENSE)
    total = _abs_sums(w, rows, row_mask, K, stride_n, stride_k, BLOCK_N, BLOCK_K)
    tl.store(sums_ptr + row0 + rows, total, mask=row_mask)


@triton.jit
def _table_scale_kernel(w_like, wtab, sums_ptr, scale_ptr, BLOCK_S: tl.constexpr):
    """Program ``i``: the scales of weight ``i`` from its row sums, per row or per tensor, as
    :func:`_stack_pack_kernel` makes them (the per-tensor sum in chunks of ``BLOCK_S``)."""
    _, N, K, _, _, row0, _, _, per_channel = _entry(wtab, tl.program_id(0), w_like)
    if per_channel != 0:
        for n0 in range(0, N, BLOCK_S):
            idx = n0 + tl.arange(0, BLOCK_S)
            total = tl.load(sums_ptr + row0 + idx, mask=idx < N, other=0.0)
            mean = (total.to(tl.float64) / K.to(tl.float64)).to(tl.float32)
            tl.store(scale_ptr + row0 + idx, _group_scale(mean), mask=idx < N)
    else:
        acc = tl.zeros((BLOCK_S,), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_S):
            idx = n0 + tl.arange(0, BLOCK_S)
            acc += tl.load(sums_ptr + row0 + idx, mask=idx < N, other=0.0)
        mean = (tl.sum(acc, axis=0).to(tl.float64) / (N * K).to(tl.float64)).to(tl.float32)
        s = tl.zeros((BLOCK_S,), dtype=tl.float32) + _group_scale(mean)
        for n0 in range(0, N, BLOCK_S):
            idx = n0 + tl.arange(0, BLOCK_S)
            tl.store(scale_ptr + row0 + idx, s, mask=idx < N)


@triton.jit
def _table_pack_kernel(w_like, wtab, btab, scale_ptr, out_ptr, BLOCK_N: tl.constexpr, BLOCK_KQ: tl.constexpr,
                       DENSE: tl.constexpr):
    """Program ``p``: the packed rows ``[r, r + BLOCK_N)`` of weight ``i`` (``btab[p]``), whole
    rows, written at its byte offset in ``out``."""
    w, K, stride_n, stride_k, row0, out_at, Kq, rows, row_mask = _program_rows(wtab, btab, w_like, BLOCK_N, DENSE)
    s = tl.load(scale_ptr + row0 + rows, mask=row_mask, other=0.0)
    for col0 in range(0, Kq, BLOCK_KQ):
        _pack_rows(w, s, out_ptr + out_at, rows, rows, row_mask, col0, K, Kq, stride_n, stride_k, BLOCK_N, BLOCK_KQ)


_TABLE_ROW_SUM = Launcher(_table_row_sum_kernel)
_TABLE_SCALE = Launcher(_table_scale_kernel)
_TABLE_PACK = Launcher(_table_pack_kernel)

# Launch tables by their weights' addresses, shapes, strides and flags: a training step packs
# the same parameters every step, so each table is built and copied to the device once.
_TABLES: "collections.OrderedDict" = collections.OrderedDict()
_TABLES_KEPT = 16  # the least recently used beyond this are dropped (not one a CUDA graph captured)
# An entry: [the launch plan per dtype, whether a captured graph reads it, (total bytes, total rows)].


def _blocks(sizes: list[int], block: int) -> torch.Tensor:
    """``[(i, r)]`` int32 pairs: weight ``i``'s row blocks ``r = 0, block, ...``, in order."""
    counts = torch.tensor([cdiv(n, block) for n in sizes], dtype=torch.int64)
    which = torch.repeat_interleave(torch.arange(len(sizes)), counts)
    starts = torch.cumsum(counts, 0) - counts
    r = (torch.arange(int(counts.sum())) - torch.repeat_interleave(starts, counts)) * block
    return torch.stack([which, r], 1).to(torch.int32)


def _upload(tables: list, device: torch.device) -> list:
    """The launch tables on ``device``, in memory of the allocator's own: copied by a thread of
    its own, on its default stream, and waited for there. Kept across calls, they must not come
    from a CUDA graph's memory pool, which the calling thread may be allocating from (the
    warm-up runs of ``mode="reduce-overhead"``; the graph trees refuse a live tensor of their
    pool that no output holds). Once per set of weights."""
    if device.type != "cuda":
        return [t.to(device) for t in tables]

    def copy():
        with torch.cuda.device(device):
            out = [t.to(device) for t in tables]
            torch.cuda.current_stream(device).synchronize()
        return out

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(copy).result()


def _launch_plan(weights, per_channel, places, device):
    """Per weight dtype: ``(w_like, weight table, row-sum blocks, pack blocks, weights, tiles)``."""
    plans = []
    for dtype in dict.fromkeys(w.dtype for w in weights):
        idx = [j for j, w in enumerate(weights) if w.dtype == dtype and w.shape[0] > 0]
        if not idx:
            continue
        rows = []
        for j in idx:
            w = weights[j]
            N, K = w.shape
            row0, out_at = places[j]
            rows.append([w.data_ptr(), N, K, w.stride(0), w.stride(1), row0, out_at, layout.packed_k(K),
                         int(bool(per_channel[j]))])
        sizes = [r[1] for r in rows]
        bn, bk = _tile_rows_cols(max(r[2] for r in rows))
        bnq, bkq = _tile_rows_packed(max(r[7] for r in rows))
        wtab, sum_blocks, pack_blocks = _upload([torch.tensor(rows, dtype=torch.int64), _blocks(sizes, bn),
                                                 _blocks(sizes, bnq)], device)
        plans.append((weights[idx[0]], wtab, sum_blocks, pack_blocks, len(idx), (bn, bk, bnq, bkq),
                      _dense([weights[j] for j in idx])))
    return plans


def weight_quant_stacks(weights: list, per_channel: list, stacks: list) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`weight_quant_stacked` of several stacks at once (``stacks``: how many of
    ``weights``, in order, each stack takes; the weights of a stack share K, stacks need not):
    ``(packed uint8 [total bytes], s_w fp32 [total rows])``, stack ``s``'s packed
    ``[rows, Kq]`` and scales at :func:`bitfx.layout.stack_offsets`'s places. What a training
    step runs once for every weight it reads as a parameter (``bitfx::weight_quant_stacks``):
    three launches per weight dtype (the row sums, the scales, the packing), reading the
    weights where they lie through a table of their addresses, built once per set of weights
    and kept. The scales and codes are those of :func:`weight_quant_stacked` (the per-tensor
    sum taken in the same chunks). While a CUDA graph is captured, a table not built
    yet is not copied (the copy would be captured): the stacks are packed as
    :func:`weight_quant_stacked` packs them, into the same places. The arguments are those
    the op checked."""
    device = weights[0].device
    key = (device, tuple((w.data_ptr(), w.dtype, *w.shape, *w.stride()) for w in weights), tuple(map(bool, per_channel)),
           tuple(stacks), interpreting())
    entry = _TABLES.get(key)
    if entry is None:
        places, nbytes, nrows = _places(weights, stacks)
    else:
        nbytes, nrows = entry[2]
    packed = torch.empty(nbytes, dtype=torch.uint8, device=device)
    scale = torch.empty(nrows, dtype=torch.float32, device=device)
    sums = torch.empty(nrows, dtype=torch.float32, device=device)
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if entry is None and capturing:
        return _stacks_per_weight(weights, per_channel, places, sums, scale, packed)
    if entry is None:
        entry = _TABLES[key] = [_launch_plan(weights, per_channel, places, device), False, (nbytes, nrows)]
        while len(_TABLES) > _TABLES_KEPT:
            old = next((k for k, e in _TABLES.items() if not e[1]), None)
            if old is None:
                break
            del _TABLES[old]
    _TABLES.move_to_end(key)
    entry[1] = entry[1] or capturing  # a captured graph reads the table at every replay: keep it
    opts = dict(num_warps=4, num_stages=3)
    for w_like, wtab, sum_blocks, pack_blocks, count, (bn, bk, bnq, bkq), dense in entry[0]:
        _TABLE_ROW_SUM((sum_blocks.shape[0],), (w_like, wtab, sum_blocks, sums),
                       dict(BLOCK_N=bn, BLOCK_K=bk, DENSE=dense), **opts)
        _TABLE_SCALE((count,), (w_like, wtab, sums, scale), dict(BLOCK_S=_sum_chunk()), **opts)
        _TABLE_PACK((pack_blocks.shape[0],), (w_like, wtab, pack_blocks, scale, packed),
                    dict(BLOCK_N=bnq, BLOCK_KQ=bkq, DENSE=dense), **opts)
    return packed, scale


def _places(weights: list, stacks: list) -> tuple[list[tuple[int, int]], int, int]:
    """Each weight's ``(first row, first byte)`` in the flat outputs of
    :func:`weight_quant_stacks`, then their total bytes and rows."""
    offsets, nbytes, nrows = layout.stack_offsets(layout.stack_rows(weights, stacks))
    places, at = [], 0
    for n, (byte0, row0) in zip(stacks, offsets):
        for w in weights[at:at + n]:
            places.append((row0, byte0))
            row0 += w.shape[0]
            byte0 += w.shape[0] * layout.packed_k(w.shape[1])
        at += n
    return places, nbytes, nrows


def _stacks_per_weight(weights, per_channel, places, sums, scale, packed):
    """The stacks packed by :func:`weight_quant_stacked`'s per-weight launches, into ``places``."""
    for w, pc, (row0, byte0) in zip(weights, per_channel, places):
        N, K = w.shape
        if N == 0:
            continue
        Kq = layout.packed_k(K)
        _pack_weight(w, pc, sums[row0:row0 + N], scale[row0:row0 + N], packed[byte0:byte0 + N * Kq].view(N, Kq), 0)
    return packed, scale


# --------------------------------------------------------------------------------------------
# unpack_ternary / dequantize
# --------------------------------------------------------------------------------------------


@triton.jit
def _unpack_kernel(
    p_ptr, s_ptr, out_ptr,  # packed uint8 [N, Kq] (row stride), s fp32 [N], out [N, K] contiguous
    N, K, Kq, stride_pn,
    DEQUANT: tl.constexpr,  # False: out = t (int8); True: out = t / s in out's dtype
    BLOCK_N: tl.constexpr, BLOCK_KQ: tl.constexpr,
):
    """``t[n, j*Kq + i] = ((packed[n, i] >> 2j) & 3) - 1`` for ``j*Kq + i < K``; optionally ``t / s[n]``.

    ``t * (1 / s)`` with a correctly rounded reciprocal equals ``t / s`` bit for bit for
    ``t`` in {-1, 0, 1}. Codes are not validated (the invalid code 3 gives ``t = 2``): the
    reference raises on it, and ``BitfxLinear`` validates its weights when built or loaded.
    """
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    idx = tl.program_id(1) * BLOCK_KQ + tl.arange(0, BLOCK_KQ)
    row_mask = rows < N
    b = tl.load(
        p_ptr + rows.to(tl.int64)[:, None] * stride_pn + idx[None, :],
        mask=row_mask[:, None] & (idx < Kq)[None, :], other=0,
    ).to(tl.int32)
    if DEQUANT:
        s = tl.load(s_ptr + rows, mask=row_mask, other=1.0)
        inv = tl.math.div_rn(1.0, s)
    out_row = out_ptr + rows.to(tl.int64)[:, None] * K
    for j in tl.static_range(4):
        k = j * Kq + idx
        t = ((b >> (2 * j)) & 3) - 1
        if DEQUANT:
            val = (t.to(tl.float32) * inv[:, None]).to(out_ptr.dtype.element_ty)
        else:
            val = t.to(tl.int8)
        tl.store(out_row + k[None, :], val, mask=row_mask[:, None] & ((idx < Kq) & (k < K))[None, :])


_UNPACK = Launcher(_unpack_kernel)


def _unpack_launch(name: str, packed: torch.Tensor, s_w: torch.Tensor | None, K: int, dtype: torch.dtype):
    if packed.dtype != torch.uint8:
        raise TypeError(f"{name}: packed ternary weight must be uint8, got {str(packed.dtype).replace('torch.', '')}")
    layout.check_packed_shape(packed.shape, K)
    check_device(name, packed, s_w)
    if s_w is not None:
        s_w = _check_scale(name, s_w, packed.shape[0])
    return unpack_run(packed, s_w, K, dtype)


def unpack_run(packed: torch.Tensor, s_w: torch.Tensor | None, K: int, dtype: torch.dtype) -> torch.Tensor:
    """The launch of :func:`dequantize` (``s_w`` given) or :func:`unpack_ternary` (``s_w`` None,
    ``dtype`` int8) without the argument checks, for callers that made them (the
    ``bitfx::dequantize`` op's guard, in the training backward): ``packed`` uint8
    ``[N, packed_k(K)]``, ``s_w`` fp32 ``[N]`` contiguous, one device. Launched through the
    cached launcher (no per-call argument binding)."""
    if packed.shape[1] > 1 and packed.stride(1) != 1:
        packed = packed.contiguous()
    N, Kq = packed.shape
    out = torch.empty((N, K), dtype=dtype, device=packed.device)
    if N == 0:
        return out
    block_n, block_kq = _tile_rows_packed(Kq)
    _UNPACK((cdiv(N, block_n), cdiv(Kq, block_kq)), (packed, s_w, out, N, K, Kq, packed.stride(0)),
            dict(DEQUANT=s_w is not None, BLOCK_N=block_n, BLOCK_KQ=block_kq))
    return out


@on_input_device
def unpack_ternary(packed: torch.Tensor, K: int) -> torch.Tensor:
    """Unpack uint8 ``[N, Kq]`` to the ternary codes ``t`` int8 ``[N, K]`` in {-1, 0, 1}."""
    return _unpack_launch("unpack_ternary", packed, None, K, torch.int8)


@on_input_device
def dequantize(packed: torch.Tensor, s_w: torch.Tensor, K: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dequantized weight ``t / s_w`` (fp32 division, then cast to ``dtype``): ``[N, K]``.

    Equal bit for bit to ``(reference.unpack_ternary(packed, K).float() / s_w[:, None]).to(dtype)``.
    """
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dequantize: dtype must be one of float32, float16, bfloat16, got {dtype}")
    return _unpack_launch("dequantize", packed, s_w, K, dtype)
