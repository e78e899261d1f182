"""The numbers every part of bitfx shares: the packed ternary weight layout, the scale
floor and the float dtypes the ops take. The one place they are defined; the reference, the
ops and the kernels import them from here (this module imports torch alone).

The packed layout:

A ternary matrix ``t`` of shape ``[N, K]`` with entries in {-1, 0, 1} is stored as a
``uint8`` tensor ``packed`` of shape ``[N, Kq]``, four 2-bit codes per byte:

* ``Kq = packed_k(K) = round_up(ceil(K / 4), 16)``: every packed row is a multiple of
  16 bytes, so rows start 16-byte aligned and a kernel can load them with wide loads.
* The K axis is cut into four *planes* of ``Kq`` columns each: plane ``j`` holds the
  columns ``k = j * Kq + i`` for ``i`` in ``[0, Kq)``. Byte ``packed[n, i]`` holds the
  four planes' codes at position ``i``::

      packed[n, i] = c(n, i) | c(n, Kq + i) << 2 | c(n, 2 Kq + i) << 4 | c(n, 3 Kq + i) << 6

* The code is the weight plus one, ``c = t + 1`` in {0, 1, 2}; columns ``k >= K``
  (padding) hold code 1, a zero weight. Code 3, or padding holding another code, is not
  this format: ``bitfx.reference.check_ternary_codes`` refuses it (the kernels do not check).

Why this shape: a kernel walking K in steps of ``BK`` packed bytes loads one contiguous
``[BN, BK]`` byte tile and four contiguous ``BK``-wide activation slices (one per
plane), and unpacks plane ``j`` with one shift and one mask, ``(b >> 2j) & 3``. The
layout does not depend on any block size, so the same packed weights serve the small-M
(GEMV) path and the tensor-core (``tl.dot``) path. With the ``t + 1`` code, the dot
product ``sum_k q_k t_k`` equals ``sum_k q_k c_k - sum_k q_k``: a kernel may
multiply by the raw codes and subtract the row sum of the activations once.

"""

import torch

PLANES = 4  # 2-bit codes per byte
ROW_ALIGN = 16  # bytes; packed rows are a multiple of this
CODE_OFFSET = 1  # stored code = ternary value + CODE_OFFSET
FORMAT = "bitfx-ternary-2bit-planes-v1"

# The floor of every absmax / absmean scale: s_x = qmax / max(max|y|, SCALE_FLOOR), s_w = 1 / max(mean|W|, SCALE_FLOOR).
SCALE_FLOOR = 1e-5

# The float dtypes activations, norm weights, linear weights, biases and outputs may have.
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def packed_k(K: int) -> int:
    """Bytes per packed row for a weight with ``K`` input features."""
    if K < 1:
        raise ValueError(f"a ternary weight needs at least one input feature, got K={K}")
    per_plane = -(-K // PLANES)
    return -(-per_plane // ROW_ALIGN) * ROW_ALIGN


def check_packed_shape(packed_shape, K: int, N: int | None = None) -> None:
    """Raise a ValueError naming the problem if ``packed_shape`` cannot hold an [N, K] weight."""
    if len(packed_shape) != 2:
        raise ValueError(f"packed ternary weight must be 2-D [N, Kq], got shape {tuple(packed_shape)}")
    want = packed_k(K)
    if packed_shape[1] != want:
        raise ValueError(
            f"packed ternary weight has {packed_shape[1]} bytes per row, but K={K} needs "
            f"{want} ({FORMAT}: round_up(ceil(K/4), {ROW_ALIGN})); was it packed for another K "
            f"or in another format?"
        )
    if N is not None and packed_shape[0] != N:
        raise ValueError(f"packed ternary weight has {packed_shape[0]} rows, expected N={N}")


def stack_rows(weights, stacks) -> list[tuple[int, int]]:
    """``(rows, K)`` of each stack: ``stacks`` counts how many of ``weights`` (anything with a
    ``[N, K]`` shape), in order, each stack takes."""
    out, at = [], 0
    for n in stacks:
        out.append((sum(int(w.shape[0]) for w in weights[at:at + n]), int(weights[at].shape[1])))
        at += n
    return out


def stack_offsets(stacks) -> tuple[list[tuple[int, int]], int, int]:
    """Where each stack of packed weights lies in the flat outputs of ``weight_quant_stacks``:
    for stacks given as ``(rows, K)``, each stack's ``(byte offset, first row)`` (its packed
    ``[rows, packed_k(K)]`` at that byte of the uint8 buffer, its scales from that row of the
    fp32 one), then the total bytes and rows. Stacks follow each other without padding: every
    packed row is a multiple of ``ROW_ALIGN`` bytes, so every stack starts aligned."""
    out, at, row = [], 0, 0
    for rows, K in stacks:
        out.append((at, row))
        at += rows * packed_k(K)
        row += rows
    return out, at, row
