"""The inference ops: ``norm_quant``, ``add_norm_quant``, ``glu_quant``, ``act_quant``, ``weight_quant``, ``ternary_matmul``,
``ternary_linear``, ``dequantize`` (schemas in :data:`bitfx.ops.library.SCHEMAS`), and the one CUDA front that
every op quantizing activations uses (:func:`cuda_front`).

No autograd: these ops read no float weight a gradient could reach (the backend emits them in
inference graphs; ``BitfxLinear`` calls them when no gradient must pass, and
``ternary_linear_group`` when one must).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from bitfx import reference as ref
from bitfx.layout import FLOAT_DTYPES, packed_k
from bitfx.ops.library import (check_codes, check_float_dtype, check_in_features, check_linear_weight,
                               check_norm_args, check_normalize, check_packed_weight, check_same_device, kernels,
                               register, rows, unit_rows)

__all__ = ["cuda_front", "ref_front", "check_matmul_args", "matmul_guard", "fused_front", "check_residual_args",
           "check_glu_args"]


# ---------------------------------------------------------------- the activation front (norm or not)


def ref_front(x: Tensor, norm_weight: Optional[Tensor], eps: float, offset: bool, cast_before_weight: bool,
              norm_dtype: torch.dtype, normalize: bool, bits: int = 8) -> tuple[Tensor, Tensor, Tensor]:
    """The reference front: ``(q [..., K], x_scale [...], rstd [...])`` of the norm and the
    activation quantization (``normalize=False``: ``act_quant`` of ``x`` alone, ``rstd`` zeros)."""
    if not normalize:
        q, x_scale = ref.act_quant(x, bits)
        return q, x_scale, x.new_zeros(x.shape[:-1], dtype=torch.float32)
    rstd = torch.rsqrt(x.float().pow(2).mean(dim=-1) + eps)
    q, x_scale = ref.norm_quant(x, norm_weight, eps, offset=offset, cast_before_weight=cast_before_weight,
                                norm_dtype=norm_dtype, bits=bits)
    return q, x_scale, rstd


def cuda_front(x: Tensor, norm_weight: Optional[Tensor], eps: float, offset: bool, cast_before_weight: bool,
               norm_dtype: torch.dtype, normalize: bool, bits: int = 8) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """The Triton front: ``(q int8 [M, K], x_scale f32 [M], rstd f32 [M] or None)`` of ``x``'s rows,
    normalized (``normalize``) or not; bit for bit :func:`ref_front`'s codes and scales."""
    nq = kernels("norm_quant")
    if normalize:
        return nq.norm_quant(rows(x), norm_weight, eps, offset, cast_before_weight, norm_dtype, ref.act_qmax(bits))
    q, x_scale = nq.act_quant(rows(x), ref.act_qmax(bits))
    return q, x_scale, None


def _guard_front(x: Tensor, weight: Optional[Tensor], norm_dtype: torch.dtype) -> bool:
    """The cheap per-call guard of the CUDA front (what a caller outside a graph could get wrong)."""
    return (x.dtype in FLOAT_DTYPES and x.dim() >= 1 and norm_dtype in FLOAT_DTYPES
            and (weight is None or (weight.dim() == 1 and weight.shape[0] == x.shape[-1])))


# ---------------------------------------------------------------- norm_quant


@register("norm_quant", "reference")
def _(x, weight, eps, offset, cast_before_weight, norm_dtype, bits=8):
    check_norm_args("norm_quant", x, weight, norm_dtype)
    return ref.norm_quant(x, weight, eps, offset=offset, cast_before_weight=cast_before_weight, norm_dtype=norm_dtype,
                          bits=bits)


@register("norm_quant", "cuda")
def _(x, weight, eps, offset, cast_before_weight, norm_dtype, bits=8):
    if not _guard_front(x, weight, norm_dtype):
        check_norm_args("norm_quant", x, weight, norm_dtype)
    q, scale, _ = cuda_front(x, weight, eps, offset, cast_before_weight, norm_dtype, True, bits)
    return q.view(x.shape), scale.view(x.shape[:-1])


@register("norm_quant", "fake")
def _(x, weight, eps, offset, cast_before_weight, norm_dtype, bits=8):
    check_norm_args("norm_quant", x, weight, norm_dtype)
    ref.act_qmax(bits)
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty(x.shape[:-1], dtype=torch.float32)


# ---------------------------------------------------------------- add_norm_quant


def check_residual_args(op: str, a: Tensor, b: Tensor) -> None:
    """The two addends of ``add_norm_quant``: one shape, one float dtype, one device."""
    check_same_device(op, a, b)
    if a.shape != b.shape:
        raise ValueError(f"bitfx.{op}: the addends must have one shape (no broadcasting), got {tuple(a.shape)} "
                         f"and {tuple(b.shape)}")
    if a.dtype != b.dtype:
        raise TypeError(f"bitfx.{op}: the addends must have one dtype, got {a.dtype} and {b.dtype}")


@register("add_norm_quant", "reference")
def _(a, b, weight, eps, offset, cast_before_weight, norm_dtype, bits=8):
    check_residual_args("add_norm_quant", a, b)
    check_norm_args("add_norm_quant", a, weight, norm_dtype)
    h = a + b
    q, x_scale = ref.norm_quant(h, weight, eps, offset=offset, cast_before_weight=cast_before_weight,
                                norm_dtype=norm_dtype, bits=bits)
    return h, q, x_scale


@register("add_norm_quant", "cuda")
def _(a, b, weight, eps, offset, cast_before_weight, norm_dtype, bits=8):
    if not (a.shape == b.shape and a.dtype == b.dtype and _guard_front(a, weight, norm_dtype)):
        check_residual_args("add_norm_quant", a, b)
        check_norm_args("add_norm_quant", a, weight, norm_dtype)
    h, q, scale, _ = kernels("norm_quant").add_norm_quant(unit_rows(a), unit_rows(b), weight, eps, offset,
                                                          cast_before_weight, norm_dtype, ref.act_qmax(bits))
    return h.view(a.shape), q.view(a.shape), scale.view(a.shape[:-1])


@register("add_norm_quant", "fake")
def _(a, b, weight, eps, offset, cast_before_weight, norm_dtype, bits=8):
    check_residual_args("add_norm_quant", a, b)
    check_norm_args("add_norm_quant", a, weight, norm_dtype)
    ref.act_qmax(bits)
    return (a.new_empty(a.shape), a.new_empty(a.shape, dtype=torch.int8),
            a.new_empty(a.shape[:-1], dtype=torch.float32))


# ---------------------------------------------------------------- glu_quant


def check_glu_args(op: str, gate: Tensor, up: Tensor, act: str, weight: Optional[Tensor], norm_dtype: torch.dtype,
                   normalize: bool) -> None:
    """The arguments of ``glu_quant``: two operands of one shape, float dtype and device, a
    gated activation bitfx computes, the norm's arguments (no weight without the norm)."""
    check_residual_args(op, gate, up)
    if act not in ref.GLU_ACTS:
        raise ValueError(f"bitfx.{op}: act must be one of {ref.GLU_ACTS}, got {act!r}")
    check_norm_args(op, gate, weight, norm_dtype)
    check_normalize(op, weight, normalize)


@register("glu_quant", "reference")
def _(gate, up, act, weight, eps, offset, cast_before_weight, norm_dtype, normalize, bits=8):
    check_glu_args("glu_quant", gate, up, act, weight, norm_dtype, normalize)
    q, x_scale, _ = ref_front(ref.glu(act, gate, up), weight, eps, offset, cast_before_weight, norm_dtype, normalize,
                              bits)
    return q, x_scale


@register("glu_quant", "cuda")
def _(gate, up, act, weight, eps, offset, cast_before_weight, norm_dtype, normalize, bits=8):
    if not (gate.shape == up.shape and gate.dtype == up.dtype and act in ref.GLU_ACTS
            and (normalize or weight is None) and _guard_front(gate, weight, norm_dtype)):
        check_glu_args("glu_quant", gate, up, act, weight, norm_dtype, normalize)
    q, scale, _ = kernels("norm_quant").glu_quant(unit_rows(gate), unit_rows(up), act, weight, eps, offset,
                                                  cast_before_weight, norm_dtype, normalize, ref.act_qmax(bits))
    return q.view(gate.shape), scale.view(gate.shape[:-1])


@register("glu_quant", "fake")
def _(gate, up, act, weight, eps, offset, cast_before_weight, norm_dtype, normalize, bits=8):
    check_glu_args("glu_quant", gate, up, act, weight, norm_dtype, normalize)
    ref.act_qmax(bits)
    return gate.new_empty(gate.shape, dtype=torch.int8), gate.new_empty(gate.shape[:-1], dtype=torch.float32)


# ---------------------------------------------------------------- act_quant


@register("act_quant", "reference")
def _(y, bits=8):
    check_norm_args("act_quant", y, None, torch.float32)
    return ref.act_quant(y, bits)


@register("act_quant", "cuda")
def _(y, bits=8):
    if not _guard_front(y, None, torch.float32):
        check_norm_args("act_quant", y, None, torch.float32)
    q, scale, _ = cuda_front(y, None, 0.0, False, False, torch.float32, False, bits)
    return q.view(y.shape), scale.view(y.shape[:-1])


@register("act_quant", "fake")
def _(y, bits=8):
    check_norm_args("act_quant", y, None, torch.float32)
    ref.act_qmax(bits)
    return y.new_empty(y.shape, dtype=torch.int8), y.new_empty(y.shape[:-1], dtype=torch.float32)


# ---------------------------------------------------------------- weight_quant


@register("weight_quant", "reference")
def _(w, per_channel):
    check_linear_weight("weight_quant", w)
    return ref.weight_quant(w, per_channel)


@register("weight_quant", "cuda")
def _(w, per_channel):
    check_linear_weight("weight_quant", w)
    return kernels("weight_pack").weight_quant(w, per_channel)


@register("weight_quant", "fake")
def _(w, per_channel):
    check_linear_weight("weight_quant", w)
    N, K = w.shape
    return w.new_empty((N, packed_k(K)), dtype=torch.uint8), w.new_empty((N,), dtype=torch.float32)


# ---------------------------------------------------------------- ternary_matmul


def check_matmul_args(op, q, x_scale, packed, w_scale, bias, out_dtype, in_features) -> None:
    check_codes(op, q, x_scale)
    check_packed_weight(op, packed, w_scale, bias, in_features)
    check_in_features(op, q, in_features)
    check_float_dtype(op, "out_dtype", out_dtype)
    check_same_device(op, q, x_scale, packed, w_scale, bias)


def matmul_guard(q: Tensor, x_scale: Tensor, packed: Tensor, w_scale: Tensor, bias: Optional[Tensor],
                 out_dtype: torch.dtype, in_features: int) -> bool:
    """The cheap per-call guard of a ternary matmul on CUDA (shapes, dtypes, devices; no read of
    device memory): codes int8 of ``in_features`` features with fp32 scales of their leading
    shape, a packed uint8 ``[N, packed_k(K)]`` weight with contiguous rows, its fp32 ``[N]``
    scale, a float ``[N]`` bias or None, a float output dtype, one device. When it holds, the
    kernel is launched without the launcher's own checks."""
    return (q.dtype == torch.int8 and q.dim() >= 1 and q.shape[-1] == in_features and x_scale.dtype == torch.float32
            and x_scale.shape == q.shape[:-1] and x_scale.device == q.device and out_dtype in FLOAT_DTYPES
            and _packed_guard(packed, w_scale, bias, in_features, q.device))


def _packed_guard(packed: Tensor, w_scale: Tensor, bias: Optional[Tensor], in_features, device) -> bool:
    """The cheap guard of a packed weight operand (no read of device memory): uint8
    ``[N, packed_k(in_features)]`` with contiguous rows, its fp32 ``[N]`` scale, a float ``[N]``
    bias or None, all on ``device``."""
    return (packed.dtype == torch.uint8 and packed.dim() == 2 and packed.shape[1] == packed_k(in_features)
            and (packed.stride(1) == 1 or packed.shape[1] <= 1) and w_scale.dtype == torch.float32
            and w_scale.shape == packed.shape[:1] and packed.device == device and w_scale.device == device
            and (bias is None or (bias.dtype in FLOAT_DTYPES and bias.shape == packed.shape[:1]
                                  and bias.device == device)))


@register("ternary_matmul", "reference")
def _(q, x_scale, packed, w_scale, bias, out_dtype, in_features):
    # in_features: the K the weight was packed for (several K share a packed width); the CPU
    # reference raises on an invalid code, the CUDA kernel does not check codes per call.
    check_matmul_args("ternary_matmul", q, x_scale, packed, w_scale, bias, out_dtype, in_features)
    return ref.ternary_matmul(q, x_scale, packed, w_scale, bias, out_dtype)


@register("ternary_matmul", "cuda")
def _(q, x_scale, packed, w_scale, bias, out_dtype, in_features):
    if not matmul_guard(q, x_scale, packed, w_scale, bias, out_dtype, in_features):
        check_matmul_args("ternary_matmul", q, x_scale, packed, w_scale, bias, out_dtype, in_features)
    q2 = rows(q)
    if q2.shape[1] > 1 and q2.stride(1) != 1:
        q2 = q2.contiguous()
    out = kernels("ternary_matmul").run(q2, x_scale.reshape(-1), packed, w_scale, bias, out_dtype)
    return out.view(*q.shape[:-1], packed.shape[0])


@register("ternary_matmul", "fake")
def _(q, x_scale, packed, w_scale, bias, out_dtype, in_features):
    check_matmul_args("ternary_matmul", q, x_scale, packed, w_scale, bias, out_dtype, in_features)
    return q.new_empty((*q.shape[:-1], packed.shape[0]), dtype=out_dtype)


# ---------------------------------------------------------------- ternary_linear (front + matmul)


def _check_linear(x, norm_weight, norm_dtype, normalize, bits, packed, w_scale, bias, out_dtype, in_features) -> None:
    op = "ternary_linear"
    check_norm_args(op, x, norm_weight, norm_dtype)
    check_normalize(op, norm_weight, normalize)
    ref.act_qmax(bits)
    check_packed_weight(op, packed, w_scale, bias, in_features)
    check_in_features(op, x, in_features)
    check_float_dtype(op, "out_dtype", out_dtype)
    check_same_device(op, x, norm_weight, packed, w_scale, bias)


def _linear_guard(x, norm_weight, norm_dtype, normalize, packed, w_scale, bias, out_dtype, in_features) -> bool:
    """The cheap per-call guard of ``ternary_linear`` on CUDA (no read of device memory)."""
    device = x.device
    return (_guard_front(x, norm_weight, norm_dtype) and x.shape[-1] == in_features
            and (normalize or norm_weight is None) and (norm_weight is None or norm_weight.device == device)
            and out_dtype in FLOAT_DTYPES and _packed_guard(packed, w_scale, bias, in_features, device))


def fused_front(x2: Tensor, packed: Tensor, traced: bool = False, eager: bool = False) -> bool:
    """Whether the rows ``x2 [M, K]`` against ``packed`` take the one-kernel form
    (:mod:`bitfx.kernels.front_gemv`): few rows (``FRONT_MAX_M``; an ``eager`` call more, as
    :func:`bitfx.kernels.front_gemv.takes_rows` says), nothing empty, packed rows the kernel can
    read as words, and the kernel turned on (:func:`bitfx.kernels.front_gemv.enabled`: by default
    for an ``eager`` layer's call only). ``traced`` (a form Inductor launches): the packed
    weight's alignment from its offset into an aligned allocation, not its address."""
    M, K = x2.shape
    N, Kq = packed.shape
    fg = kernels("front_gemv")
    start = packed.storage_offset() if traced else packed.data_ptr()
    return (0 < M and K > 0 and N > 0 and packed.stride(0) % 4 == 0 and start % 4 == 0 and fg.enabled(eager)
            and fg.takes_rows(M, N, Kq, K, x2.element_size(), x2.device, eager))


@register("ternary_linear", "reference")
def _(x, norm_weight, eps, offset, cast_before_weight, norm_dtype, normalize, bits, packed, w_scale, bias, out_dtype,
      in_features):
    _check_linear(x, norm_weight, norm_dtype, normalize, bits, packed, w_scale, bias, out_dtype, in_features)
    q, x_scale, _ = ref_front(x, norm_weight, eps, offset, cast_before_weight, norm_dtype, normalize, bits)
    return ref.ternary_matmul(q, x_scale, packed, w_scale, bias, out_dtype)


@register("ternary_linear", "cuda")
def _(x, norm_weight, eps, offset, cast_before_weight, norm_dtype, normalize, bits, packed, w_scale, bias, out_dtype,
      in_features):
    if not _linear_guard(x, norm_weight, norm_dtype, normalize, packed, w_scale, bias, out_dtype, in_features):
        _check_linear(x, norm_weight, norm_dtype, normalize, bits, packed, w_scale, bias, out_dtype, in_features)
    x2 = rows(x)
    if x2.shape[1] > 1 and x2.stride(1) != 1:
        x2 = x2.contiguous()
    if fused_front(x2, packed):
        out, _ = kernels("front_gemv").front_gemv(x2, norm_weight, eps, offset, cast_before_weight, norm_dtype,
                                                  normalize, ref.act_qmax(bits), packed, w_scale, bias, out_dtype)
    else:
        q, x_scale, _ = cuda_front(x2, norm_weight, eps, offset, cast_before_weight, norm_dtype, normalize, bits)
        out = kernels("ternary_matmul").run(q, x_scale, packed, w_scale, bias, out_dtype)
    return out.view(*x.shape[:-1], packed.shape[0])


@register("ternary_linear", "fake")
def _(x, norm_weight, eps, offset, cast_before_weight, norm_dtype, normalize, bits, packed, w_scale, bias, out_dtype,
      in_features):
    _check_linear(x, norm_weight, norm_dtype, normalize, bits, packed, w_scale, bias, out_dtype, in_features)
    return x.new_empty((*x.shape[:-1], packed.shape[0]), dtype=out_dtype)


# ---------------------------------------------------------------- dequantize


def _check_dequantize(packed, w_scale, K, dtype) -> None:
    check_packed_weight("dequantize", packed, w_scale, None, K)
    check_float_dtype("dequantize", "dtype", dtype)
    check_same_device("dequantize", packed, w_scale)


@register("dequantize", "reference")
def _(packed, w_scale, K, dtype, validate_codes=True):
    # t / s_w as a dense [N, K] matrix; invalid codes: a ValueError here unless validate_codes is
    # False (then the same numbers without the pass over the codes); never checked on CUDA.
    _check_dequantize(packed, w_scale, K, dtype)
    t = ref.unpack_ternary(packed, K) if validate_codes else ref.unpacked_codes(packed, K)
    return (t.float() / w_scale.float().unsqueeze(1)).to(dtype)


@register("dequantize", "cuda")
def _(packed, w_scale, K, dtype, validate_codes=True):
    if not (dtype in FLOAT_DTYPES and _packed_guard(packed, w_scale, None, K, packed.device)):
        _check_dequantize(packed, w_scale, K, dtype)
    return kernels("weight_pack").unpack_run(packed, w_scale.contiguous(), K, dtype)


@register("dequantize", "fake")
def _(packed, w_scale, K, dtype, validate_codes=True):
    _check_dequantize(packed, w_scale, K, dtype)
    return packed.new_empty((packed.shape[0], K), dtype=dtype)
