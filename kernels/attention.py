"""Attention of one query per head against a key/value cache: the decode step's attention in
one kernel, reading a grouped (GQA) cache where it lies.

A transformers decode step calls ``scaled_dot_product_attention`` on a query of one token and
the whole cache. With grouped heads (fewer key/value heads than query heads) the model first
repeats every key/value head for its query heads (``repeat_kv``: an expand and a reshape, which
Inductor materializes, the whole cache copied per layer and step) and under CUDA graphs the
attention itself is a library kernel sized for long sequences. Here::

    program (b, h, split):  keys l of the split (all of them without splits), kv head h // group
        s[l] = scale * q[b, h] . k[b, h // group, l] (+ float mask) (-inf where a bool mask is False)
        online softmax over the split's keys, blocks of BLOCK_L:  m, l_sum, acc[D] in fp32
        out[b, h] = acc / l_sum   (0 for a query whose every key is masked out)

The kernel lets the next one launch as it starts (:data:`PDL_TRIGGER`). Long caches are split
over programs (:func:`config`) and the partial results combined by a
second kernel with the usual max-rescaling. Scores, softmax and sums in fp32 whatever the
inputs' dtype; the output rounded once to the query's dtype. The order of the sums differs from
the library kernels' (SPEC: attention is float, compared with a tolerance); a query with every
key masked gets zeros, as torch's math attention gives.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from bitfx.kernels._launch import Launcher
from bitfx.kernels._utils import cdiv, interpreting, next_pow2, num_sms, pdl_enabled

__all__ = ["decode_attention", "config"]

# Keys one program takes at least before the cache is split over more programs: below it the
# second (combining) launch costs more than the parallelism gains.
SPLIT_KEYS = 512

_NONE, _BOOL, _FLOAT = 0, 1, 2

# The one-pass form lets the kernel after it start at once (programmatic dependent launch, where
# :func:`bitfx.kernels._utils.pdl_enabled`): the norm that reads the attention's output (a
# kernel launched with PDL, which waits for this one to finish before it reads anything) is
# then resident when the attention ends, instead of launched after it.
PDL_TRIGGER = True
# The largest tile of keys x head_dim a program holds (fp32, 2048 elements a warp).
_TILE = 16384


@triton.jit
def _attend_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, o_ptr, part_ptr, stat_ptr,
    Hq, L, D, group, chunk, scale,
    sq_b, sq_h, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l, sm_b, sm_h, sm_l, so_b, so_h,
    MASK: tl.constexpr,  # 0: none; 1: bool (False: masked out); 2: float, added to the scores
    SPLIT: tl.constexpr,  # write the split's unnormalized sums to part/stat instead of out
    PDL_TRIGGER: tl.constexpr,  # let the next kernel (launched with PDL: a norm) start now; it waits for this one
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    if PDL_TRIGGER:
        tl.extra.cuda.gdc_launch_dependents()
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // Hq
    h = bh % Hq
    hk = h // group
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    q = tl.load(q_ptr + b.to(tl.int64) * sq_b + h * sq_h + d, mask=dmask, other=0.0).to(tl.float32)
    k_row = k_ptr + b.to(tl.int64) * sk_b + hk.to(tl.int64) * sk_h
    v_row = v_ptr + b.to(tl.int64) * sv_b + hk.to(tl.int64) * sv_h
    m_row = mask_ptr + b.to(tl.int64) * sm_b + h.to(tl.int64) * sm_h
    m_i = tl.full((), float("-inf"), tl.float32)
    l_i = tl.zeros((), dtype=tl.float32)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    start = split * chunk
    end = tl.minimum(start + chunk, L)
    for l0 in range(start, end, BLOCK_L):
        ls = l0 + tl.arange(0, BLOCK_L)
        lmask = ls < end
        tile = lmask[:, None] & dmask[None, :]
        k = tl.load(k_row + ls.to(tl.int64)[:, None] * sk_l + d[None, :], mask=tile, other=0.0).to(tl.float32)
        s = tl.sum(k * q[None, :], axis=1) * scale
        if MASK == 1:
            keep = tl.load(m_row + ls * sm_l, mask=lmask, other=0)
            s = tl.where(keep != 0, s, float("-inf"))
        if MASK == 2:
            s += tl.load(m_row + ls * sm_l, mask=lmask, other=0.0).to(tl.float32)
        s = tl.where(lmask, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        base = tl.where(m_new == float("-inf"), 0.0, m_new)  # every key so far masked: no NaN from -inf - -inf
        alpha = tl.exp(m_i - base)
        p = tl.exp(s - base)
        v = tl.load(v_row + ls.to(tl.int64)[:, None] * sv_l + d[None, :], mask=tile, other=0.0).to(tl.float32)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        m_i = m_new
    if SPLIT:
        row = bh * tl.num_programs(1) + split
        tl.store(part_ptr + row.to(tl.int64) * BLOCK_D + d, acc)
        tl.store(stat_ptr + row * 2, m_i)
        tl.store(stat_ptr + row * 2 + 1, l_i)
    else:
        out = acc / tl.where(l_i > 0, l_i, 1.0)  # every key masked: acc is 0, and so the output
        tl.store(o_ptr + b.to(tl.int64) * so_b + h * so_h + d, out.to(o_ptr.dtype.element_ty), mask=dmask)


@triton.jit
def _combine_kernel(
    part_ptr, stat_ptr, o_ptr,
    Hq, D, splits, so_b, so_h,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``out[b, h] = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s`` over the splits of one head."""
    bh = tl.program_id(0)
    b = bh // Hq
    h = bh % Hq
    sp = tl.arange(0, BLOCK_S)
    smask = sp < splits
    d = tl.arange(0, BLOCK_D)
    rows = bh * splits + sp
    m = tl.load(stat_ptr + rows * 2, mask=smask, other=float("-inf"))
    lsum = tl.load(stat_ptr + rows * 2 + 1, mask=smask, other=0.0)
    top = tl.max(m, axis=0)
    base = tl.where(top == float("-inf"), 0.0, top)
    w = tl.where(smask, tl.exp(m - base), 0.0)
    acc = tl.load(part_ptr + rows.to(tl.int64)[:, None] * BLOCK_D + d[None, :], mask=smask[:, None], other=0.0)
    num = tl.sum(w[:, None] * acc, axis=0)
    den = tl.sum(w * lsum, axis=0)
    out = num / tl.where(den > 0, den, 1.0)  # every key masked: num is 0
    tl.store(o_ptr + b.to(tl.int64) * so_b + h * so_h + d, out.to(o_ptr.dtype.element_ty), mask=d < D)


_ATTEND = Launcher(_attend_kernel)
_COMBINE = Launcher(_combine_kernel)


def config(heads: int, L: int, D: int, sms: int) -> tuple[int, int, int, int]:
    """``(splits, chunk, BLOCK_L, num_warps)`` for ``heads`` query rows (batch x query heads)
    against ``L`` keys of width ``D``: one program per row while that already fills the GPU or
    the cache is short; otherwise the keys split into chunks of at least :data:`SPLIT_KEYS` (a
    multiple of ``BLOCK_L``) until about two programs per SM (``sms`` of them)."""
    block_d = next_pow2(D)
    # A block of keys is one round trip to memory: a short cache in one block (a tile of up to
    # 16384 elements, 2048 a warp, no spills on sm_90: python -m bitfx.bench sass), else in blocks
    # of that size.
    block_l = max(16, min(next_pow2(L), _TILE // block_d)) if not interpreting() else 16
    splits = 1
    if L > SPLIT_KEYS:
        splits = max(1, min(cdiv(2 * sms, heads), cdiv(L, SPLIT_KEYS)))
    chunk = cdiv(cdiv(L, splits), block_l) * block_l
    splits = cdiv(L, chunk)
    return splits, chunk, block_l, max(2, min(8, block_d * block_l // 2048))


def _rows_last_unit(t: torch.Tensor) -> torch.Tensor:
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                     scale: float) -> torch.Tensor:
    """``softmax(scale * q k^T + mask) v`` for ``q [B, Hq, 1, D]`` against ``k, v [B, Hk, L, D]``
    (query head ``h`` reads key/value head ``h // (Hq // Hk)``), ``mask`` None, bool (True: keep)
    or float (added), broadcastable to ``[B, Hq, 1, L]``: ``[B, Hq, 1, D]`` in ``q``'s dtype.
    The arguments are those ``bitfx::decode_attention`` checked
    (:func:`bitfx.ops.library.check_decode_attention`): one dtype, one device, ``Hk`` dividing
    ``Hq``, ``D <= MAX_HEAD_DIM``."""
    B, Hq, _, D = q.shape
    group = Hq // k.shape[1]
    device = q.device
    L = k.shape[2]
    out = torch.empty((B, Hq, 1, D), dtype=q.dtype, device=device)
    if out.numel() == 0 or L == 0:  # (no key: zeros, as for a query whose every key is masked)
        return out.zero_()
    q, k, v = (_rows_last_unit(t) for t in (q, k, v))
    if mask is None:
        kind, m, sm = _NONE, q, (0, 0, 0)
    else:
        m = mask.expand(B, Hq, 1, L)
        kind = _BOOL if m.dtype == torch.bool else _FLOAT
        if kind == _BOOL:
            m = m.view(torch.uint8)
        sm = (m.stride(0), m.stride(1), m.stride(3))
    # (the interpreter: a few SMs, so that its tests take the split form too)
    splits, chunk, block_l, warps = config(B * Hq, L, D, num_sms(device) if device.type == "cuda" else 4)
    block_d = next_pow2(D)
    if splits > 1:
        part = torch.empty((B * Hq * splits, block_d), dtype=torch.float32, device=device)
        stat = torch.empty((B * Hq * splits, 2), dtype=torch.float32, device=device)
    else:
        part = stat = out
    _ATTEND((B * Hq, splits), (
        q, k, v, m, out, part, stat, Hq, L, D, group, chunk, float(scale),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        *sm, out.stride(0), out.stride(1),
    ), dict(MASK=kind, SPLIT=splits > 1, PDL_TRIGGER=pdl_enabled(device) and splits == 1 and PDL_TRIGGER,
            BLOCK_L=block_l, BLOCK_D=block_d), num_warps=warps, num_stages=2)
    if splits > 1:
        _COMBINE((B * Hq,), (part, stat, out, Hq, D, splits, out.stride(0), out.stride(1)),
                 dict(BLOCK_S=next_pow2(splits), BLOCK_D=block_d), num_warps=4, num_stages=1)
    return out
