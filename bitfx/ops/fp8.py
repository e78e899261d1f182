"""FP8 matmuls for the backward of the training ops (``BitfxConfig(backward="fp8")``).

The backward of a ternary linear ``out = (q / s_x) @ (t / s_w).T`` has two matmuls:

* the input gradient ``dout @ (t / s_w)``: the ternary codes ``t`` are exact in FP8 (e4m3);
  ``dout / s_w`` (one scale per tensor or per output channel, folded into the gradient) is
  rounded to e4m3 with one scale per token row;
* the weight gradient ``dout.T @ (q / s_x)``: both operands are rounded to e4m3, ``dout`` with
  one scale per output channel, the activations with one scale per input feature (the int8
  codes, up to 127, are not exact in e4m3's 3 mantissa bits).

A scale is the row's absolute maximum over 448 (e4m3's largest finite value), so that the row's
largest element is representable; e4m3 then keeps 3 mantissa bits: each element carries a
relative rounding error of at most 2**-4 (at most ``2**-10`` times the scale for the few below
e4m3's normal range). The products accumulate in fp32.

On a GPU with FP8 tensor cores (compute capability 8.9 or higher) the matmul is
``torch._scaled_mm`` with row-wise scales (operands padded with zeros to multiples of 16, which
changes no sum); elsewhere (the CPU, older GPUs) the same rounded operands are multiplied in fp32,
which is the definition the GPU path is tested against. Everything here is plain torch, so that
under ``torch.compile`` Inductor fuses the scaling, rounding and transposes around the matmul.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["E4M3", "E4M3_MAX", "round_rows", "scaled_mm", "input_grad", "weight_grad"]

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
_TINY = 1e-30  # the scale of an all-zero row (any positive number: its codes are all 0)


def round_rows(t: Tensor) -> tuple[Tensor, Tensor]:
    """``t [R, C]`` as e4m3 codes ``[R, C]`` and fp32 scales ``[R, 1]``, ``t ≈ codes * scale``:
    one scale per row, the row's absolute maximum over 448."""
    t = t.float()
    if t.shape[1] == 0:  # no columns (a step of no tokens): nothing to scale
        return t.to(E4M3), t.new_full((t.shape[0], 1), _TINY)
    scale = (t.abs().amax(dim=1, keepdim=True) / E4M3_MAX).clamp_min(_TINY)
    return (t / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


def _tensor_cores(a: Tensor) -> bool:
    if a.device.type != "cuda" or not hasattr(torch, "_scaled_mm"):
        return False
    return torch.cuda.get_device_capability(a.device) >= (8, 9)


def _pad16(t: Tensor, rows: bool, cols: bool) -> Tensor:
    r = (-t.shape[0]) % 16 if rows else 0
    c = (-t.shape[1]) % 16 if cols else 0
    return F.pad(t, (0, c, 0, r)) if r or c else t


def scaled_mm(a: Tensor, a_scale: Tensor, b: Tensor, b_scale: Tensor, out_dtype: torch.dtype) -> Tensor:
    """``(a * a_scale) @ (b * b_scale).T`` in fp32, as ``out_dtype [M, N]``: ``a [M, C]`` and
    ``b [N, C]`` e4m3 codes with per-row scales ``[M, 1]`` and ``[N, 1]`` (both row-major: the
    contraction runs along the rows of each)."""
    if a.dtype != E4M3 or b.dtype != E4M3:
        raise TypeError(f"bitfx.ops.fp8.scaled_mm: operands must be float8_e4m3fn, got {a.dtype} and {b.dtype}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"bitfx.ops.fp8.scaled_mm: contraction sizes differ: {tuple(a.shape)} and {tuple(b.shape)}")
    M, N = a.shape[0], b.shape[0]
    if not _tensor_cores(a):
        out = (a.float() * a_scale) @ (b.float() * b_scale).t()
        return out.to(out_dtype)
    # cuBLAS's row-wise FP8 GEMM: a row-major, b column-major, every size a multiple of 16,
    # scales [M, 1] and [1, N] in fp32, a bf16 result (zero rows/columns change no sum).
    a16 = _pad16(a, True, True).contiguous()
    b16 = _pad16(b, True, True).contiguous()
    sa = F.pad(a_scale.float(), (0, 0, 0, a16.shape[0] - M), value=1.0).contiguous()
    sb = F.pad(b_scale.float(), (0, 0, 0, b16.shape[0] - N), value=1.0).reshape(1, -1).contiguous()
    out = torch._scaled_mm(a16, b16.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)
    return out[:M, :N].to(out_dtype)


def input_grad(douts: list[Tensor], w_codes: list[Tensor], w_scales: list[Tensor], out_dtype: torch.dtype) -> Tensor:
    """``sum_i douts[i] @ (w_codes[i] / w_scales[i])`` (``douts[i] [M, N_i]``, ``w_codes[i]``
    ternary ``[N_i, K]`` of any integer or float dtype, ``w_scales[i]`` one per tensor or per
    output channel) as one FP8 matmul over the siblings stacked along N."""
    g = torch.cat([d.float() / s.float().reshape(1, -1) for d, s in zip(douts, w_scales)], dim=1)
    g8, g_scale = round_rows(g)
    t = torch.cat([c.to(torch.float32) for c in w_codes], dim=0).t().to(E4M3)  # [K, sum N], exact
    ones = torch.ones((t.shape[0], 1), dtype=torch.float32, device=t.device)
    return scaled_mm(g8, g_scale, t, ones, out_dtype)


def weight_grad(dout: Tensor, acts_t8: Tensor, acts_scale: Tensor, out_dtype: torch.dtype) -> Tensor:
    """``dout.T @ acts`` as ``out_dtype [N, K]``: ``dout [M, N]``; the activations given already
    rounded and transposed (``acts_t8 [K, M]`` e4m3, ``acts_scale [K, 1]``: :func:`round_rows` of
    ``acts.T``, shared by sibling linears)."""
    d8, d_scale = round_rows(dout.t())
    return scaled_mm(d8, d_scale, acts_t8, acts_scale, out_dtype)
