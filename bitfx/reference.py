"""The eager reference: BitNet b1.58 in plain torch.

This module is the specification of every number bitfx computes, the CPU implementation of
the ``bitfx::`` ops, and the oracle the tests compare the Triton kernels against. Paper:
"The Era of 1-bit LLMs: All Large Language Models are in 1.58 Bits" (Ma et al., 2024).

For ``x`` of shape ``[..., K]``, a norm weight ``g`` of shape ``[K]`` (optional), a linear
weight ``W`` of shape ``[N, K]`` and an optional bias ``b``::

    r   = x * rsqrt(mean(x^2, -1) + eps)                      fp32
    y   = r * g          (or r * (1 + g), Gemma's offset)      rounded to the norm's dtype
    s_x = 127 * reciprocal(max(max(|y|, -1), 1e-5))            per row, fp32
    q   = clamp(round_half_even(y * s_x), -128, 127)           int8
    s_w = reciprocal(max(mean(|W|), 1e-5))                     per tensor (or per row of W)
    t   = clamp(round_half_even(W * s_w), -1, 1)               int8 in {-1, 0, 1}
    acc = q @ t^T                                              exact int32
    out = acc / s_x / s_w + b                                  cast to the output dtype

``127 * reciprocal(a)`` is exactly what torch computes for the eager idiom ``127.0 / a``
(``Tensor.__rtruediv__`` is ``reciprocal() * 127``), so already-BitNet code written that way
gets the same scales bit for bit.

Non-finite values (NaN, +-Inf) are defined, not left to chance: a row of activations (or a
scale group of weights) that holds any non-finite value gets the scale NaN and all-zero
codes, so every output it touches is NaN, as a dense linear layer would give.

Training uses the straight-through estimator: the gradient passes through both quantizers
as if they were the identity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bitfx.layout import CODE_OFFSET, FORMAT, PLANES, SCALE_FLOOR, check_packed_shape, packed_k

__all__ = [
    "rms_norm",
    "norm_dtype_for",
    "act_quant",
    "norm_quant",
    "weight_scale",
    "ternarize",
    "weight_quant",
    "ternary_terms",
    "pack_ternary",
    "unpack_ternary",
    "check_ternary_codes",
    "ternary_matmul_int32",
    "ternary_matmul",
    "bitlinear",
    "bitlinear_ste",
    "ternary_linear_ste",
    "rms_norm_backward",
    "int8_rows",
    "int8_linear",
]



def norm_dtype_for(x_dtype: torch.dtype, weight_dtype: torch.dtype | None, cast_before_weight: bool) -> torch.dtype:
    """The dtype a norm's output has when its model computes it eagerly.

    Llama-style (``cast_before_weight``): ``weight * r.to(x.dtype)``, so the promoted dtype of
    ``x`` and the weight. Gemma-style: everything in fp32, then ``.type_as(x)``: ``x.dtype``.
    """
    if cast_before_weight and weight_dtype is not None:
        return torch.promote_types(x_dtype, weight_dtype)
    return x_dtype


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    *,
    offset: bool = False,
    cast_before_weight: bool = True,
    norm_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """RMSNorm over the last dimension, in the cast order of the common model families.

    ``r = x * rsqrt(mean(x^2) + eps)`` in fp32. With ``cast_before_weight`` (Llama,
    ``torch.nn.functional.rms_norm``) ``r`` is rounded to ``x.dtype`` before the weight
    multiplies it; otherwise (Gemma) the weight is applied in fp32. ``offset`` multiplies by
    ``1 + weight`` (Gemma) instead of ``weight``. The result is rounded to ``norm_dtype``
    (default: :func:`norm_dtype_for`). Differentiable.
    """
    if norm_dtype is None:
        norm_dtype = norm_dtype_for(x.dtype, None if weight is None else weight.dtype, cast_before_weight)
    xf = x.float()
    r = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    if cast_before_weight:
        r = r.to(x.dtype).float()
    if weight is not None:
        g = weight.float()
        r = r * (1.0 + g if offset else g)
    return r.to(norm_dtype)


def rms_norm_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    rstd: torch.Tensor,
    offset: bool = False,
    cast_before_weight: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward of ``y = g * x * rstd`` with the casts taken as the identity.

    ``dx = rstd * (g dy - r * mean(r * g dy))`` with ``r = x * rstd`` (fp32) and
    ``dg = sum over rows of dy * r`` (fp32 ``[K]``; zeros when there is no weight). With
    ``cast_before_weight`` (Llama) the ``r`` in ``dg`` is rounded to ``x.dtype`` first: the
    value the forward multiplied the weight by. The training ops' backward is this function,
    traced into the compiled backward graph.
    """
    K = x.shape[-1]
    r = x.float() * rstd.unsqueeze(-1)
    dyf = dy.float()
    gdy = dyf if weight is None else dyf * (1.0 + weight.float() if offset else weight.float())
    dx = rstd.unsqueeze(-1) * (gdy - r * (r * gdy).mean(dim=-1, keepdim=True))
    if weight is None:
        dg = torch.zeros(K, dtype=torch.float32, device=x.device)
    else:
        r_w = r.to(x.dtype).float() if cast_before_weight else r
        dg = (dyf * r_w).reshape(-1, K).sum(0)
    return dx.to(x.dtype), dg


ACT_BITS = (4, 6, 8)  # activation code widths bitfx quantizes to


def act_qmax(bits: int) -> int:
    """The largest code of ``bits``-bit activations, ``2^(bits-1) - 1`` (127 for 8 bits); codes
    lie in ``[-qmax - 1, qmax]``."""
    if bits not in ACT_BITS:
        raise ValueError(f"activation bits must be one of {ACT_BITS}, got {bits!r}")
    return 2 ** (bits - 1) - 1


def act_quant(y: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token absmax quantization to ``bits``-bit codes (int8 storage).

    ``y [..., K]`` (any float dtype, upcast to fp32) -> ``q`` int8 ``[..., K]`` and the scale
    ``s_x = qmax / max(max|y|, 1e-5)`` fp32 ``[...]`` with ``y ~= q / s_x``, ``qmax = 2^(bits-1) - 1``
    (127 for 8 bits). Rows holding NaN or Inf get scale NaN and zero codes.
    """
    qmax = act_qmax(bits)
    yf = y.float()
    finite = torch.isfinite(yf).all(dim=-1)
    amax = yf.abs().amax(dim=-1) if yf.shape[-1] > 0 else yf.new_zeros(yf.shape[:-1])
    scale = amax.clamp(min=SCALE_FLOOR).reciprocal() * float(qmax)
    q = torch.round(yf * scale.unsqueeze(-1)).clamp(-qmax - 1, qmax)
    q = torch.where(finite.unsqueeze(-1), q, 0.0).to(torch.int8)
    scale = torch.where(finite, scale, float("nan"))
    return q, scale


def norm_quant(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    *,
    offset: bool = False,
    cast_before_weight: bool = True,
    norm_dtype: torch.dtype | None = None,
    bits: int = 8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm (see :func:`rms_norm`) followed by :func:`act_quant`: ``(q int8, s_x fp32)``."""
    y = rms_norm(x, weight, eps, offset=offset, cast_before_weight=cast_before_weight, norm_dtype=norm_dtype)
    return act_quant(y, bits)


GLU_ACTS = ("silu", "relu2")  # the gated activations the fused front computes (bitfx::glu_quant)


def glu(act: str, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """A gated MLP's activation, as eager torch computes it: ``F.silu(gate) * up`` (``"silu"``)
    or ``F.relu(gate).square() * up`` (``"relu2"``, BitNet b1.58's), each op's result in the
    tensors' dtype."""
    if act == "silu":
        return torch.nn.functional.silu(gate) * up
    if act == "relu2":
        return torch.square(torch.relu(gate)) * up
    raise ValueError(f"gated activation must be one of {GLU_ACTS}, got {act!r}")


def _check_weight(w: torch.Tensor) -> None:
    if w.dim() != 2:
        raise ValueError(f"linear weight must be 2-D [N, K], got shape {tuple(w.shape)}")
    if not w.is_floating_point():
        raise TypeError(f"linear weight must be a float tensor, got {w.dtype}")


def weight_scale(w: torch.Tensor, per_channel: bool = False) -> torch.Tensor:
    """Absmean weight scale ``s_w = 1 / max(mean(|W|), 1e-5)``, fp32, shape ``[N]``.

    Per tensor (all N entries equal) or per output channel (mean over each row). A scale
    group holding NaN or Inf gets NaN.
    """
    _check_weight(w)
    wf = w.float().abs()
    if per_channel:
        mean = wf.mean(dim=1)
        finite = torch.isfinite(wf).all(dim=1)
    else:
        mean = wf.mean().expand(w.shape[0])
        finite = torch.isfinite(wf).all().expand(w.shape[0])
    scale = mean.clamp(min=SCALE_FLOOR).reciprocal()
    return torch.where(finite, scale, float("nan")).contiguous()


def ternarize(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``t = clamp(round_half_even(W * s_w), -1, 1)`` as int8 ``[N, K]``, given ``s_w [N]``.

    Rows whose scale is NaN get zero codes.
    """
    _check_weight(w)
    s = scale.float().unsqueeze(1)
    t = torch.round(w.float() * s).clamp(-1, 1)
    return torch.where(torch.isnan(s) | torch.isnan(t), 0.0, t).to(torch.int8)


def weight_quant(w: torch.Tensor, per_channel: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Absmean ternary quantization and packing: ``(packed uint8 [N, Kq], s_w fp32 [N])``."""
    scale = weight_scale(w, per_channel)
    return pack_ternary(ternarize(w, scale)), scale


def ternary_terms(w: torch.Tensor, terms: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``W ~= sum_i t_i / s_i``: ``terms`` ternary matrices fitted greedily on the residual, each
    with per-output-channel absmean scales (``terms = 1``: per-channel BitNet).

    ``R_1 = W``; ``s_i = weight_scale(R_i, per_channel=True)``, ``t_i = ternarize(R_i, s_i)``,
    ``R_{i+1} = R_i - t_i / s_i`` (fp32). Returns ``t`` int8 ``[terms, N, K]`` and ``s`` fp32
    ``[terms, N]``. Each term removes part of the residual, so the reconstruction error falls
    with ``terms``.
    """
    _check_weight(w)
    if not isinstance(terms, int) or terms < 1:
        raise ValueError(f"terms must be a positive int, got {terms!r}")
    residual = w.float()
    ts, ss = [], []
    for _ in range(terms):
        s = weight_scale(residual, per_channel=True)
        t = ternarize(residual, s)
        ts.append(t)
        ss.append(s)
        residual = residual - t.float() / s.unsqueeze(1)
    return torch.stack(ts), torch.stack(ss)


def pack_ternary(t: torch.Tensor) -> torch.Tensor:
    """Pack int8 ternary codes ``[N, K]`` into the layout of :mod:`bitfx.layout`."""
    if t.dim() != 2:
        raise ValueError(f"ternary codes must be 2-D [N, K], got shape {tuple(t.shape)}")
    if t.dtype != torch.int8:
        raise TypeError(f"ternary codes must be int8, got {t.dtype}")
    N, K = t.shape
    Kq = packed_k(K)
    codes = torch.full((N, PLANES * Kq), CODE_OFFSET, dtype=torch.int32, device=t.device)
    codes[:, :K] = t.to(torch.int32) + CODE_OFFSET
    if ((codes < 0) | (codes > 2)).any():
        raise ValueError("ternary codes must lie in {-1, 0, 1}")
    planes = codes.view(N, PLANES, Kq)
    packed = planes[:, 0] | planes[:, 1] << 2 | planes[:, 2] << 4 | planes[:, 3] << 6
    return packed.to(torch.uint8)


def _codes(packed: torch.Tensor, K: int) -> torch.Tensor:
    """The 2-bit codes of every column, padding included: int32 ``[N, 4 Kq]``."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed ternary weight must be uint8, got {packed.dtype}")
    check_packed_shape(packed.shape, K)
    N, Kq = packed.shape
    shifts = torch.arange(0, 2 * PLANES, 2, dtype=torch.int32, device=packed.device).view(1, PLANES, 1)
    # plane j (bits 2j, 2j+1 of each byte) holds the columns [j Kq, (j + 1) Kq)
    return ((packed.to(torch.int32).unsqueeze(1) >> shifts) & 3).reshape(N, PLANES * Kq)


def unpacked_codes(packed: torch.Tensor, K: int) -> torch.Tensor:
    """The ternary codes ``t`` of a packed weight as int8 ``[N, K]``, not checked for validity
    (no data-dependent branch: traceable with fake tensors; see :func:`unpack_ternary`)."""
    return _ternary(_codes(packed, K), K)


def _ternary(codes: torch.Tensor, K: int) -> torch.Tensor:
    """The 2-bit codes of the first K columns as ternary values, int8."""
    return (codes[:, :K] - CODE_OFFSET).to(torch.int8)


def _check_codes(codes: torch.Tensor, K: int) -> None:
    """A ValueError naming the first invalid code: 3 anywhere (no ternary value), or a padding
    column ``k >= K`` whose code is not ``CODE_OFFSET`` (a zero weight)."""
    bad = codes == 3
    bad[:, K:] = codes[:, K:] != CODE_OFFSET
    if not bool(bad.any()):
        return
    n, k = (int(i) for i in bad.nonzero()[0])
    count = int(bad.sum())
    what = (
        "the invalid 2-bit code 3 (valid: 0, 1, 2 for -1, 0, +1)" if k < K
        else f"code {int(codes[n, k])} in a padding column (k >= K={K} must hold code {CODE_OFFSET}, a zero weight)"
    )
    raise ValueError(
        f"packed ternary weight holds {what} at row {n}, column {k} ({count} invalid code(s) in all): "
        f"a corrupted checkpoint, or a weight not packed in the {FORMAT} format for K={K}"
    )


def check_ternary_codes(packed: torch.Tensor, K: int) -> None:
    """Raise a ValueError if ``packed`` (uint8 ``[N, packed_k(K)]``) holds a code that is no
    ternary weight of the :mod:`bitfx.layout` format: the code 3, or a padding column
    (``k >= K``) whose code is not 1. The Triton kernels do not check this per call (it would
    cost a pass over the weight); ``BitfxLinear`` checks its weights when built or loaded."""
    _check_codes(_codes(packed, K), K)


def unpack_ternary(packed: torch.Tensor, K: int) -> torch.Tensor:
    """Inverse of :func:`pack_ternary`: int8 ``[N, K]`` in {-1, 0, 1}.

    Raises a ValueError on codes that are no ternary weight (see :func:`check_ternary_codes`).
    """
    codes = _codes(packed, K)
    _check_codes(codes, K)
    return _ternary(codes, K)


def _check_matmul_args(q, x_scale, packed, w_scale, bias):
    if q.dtype != torch.int8:
        raise TypeError(f"activation codes must be int8, got {q.dtype}")
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed ternary weight must be uint8, got {packed.dtype}")
    K = q.shape[-1]
    check_packed_shape(packed.shape, K)
    N = packed.shape[0]
    if x_scale.shape != q.shape[:-1]:
        raise ValueError(f"activation scale has shape {tuple(x_scale.shape)}, expected {tuple(q.shape[:-1])}")
    if w_scale.shape != (N,):
        raise ValueError(f"weight scale has shape {tuple(w_scale.shape)}, expected ({N},)")
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({N},)")


def ternary_matmul_int32(q: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """The exact integer product ``acc = q @ t^T``, int32 ``[..., N]``.

    Computed in floating point, which is exact here: every product is an integer of magnitude
    at most 128, so every partial sum, in any order, is an integer of magnitude at most
    ``128 K``: exact in float32 while ``128 K <= 2**24`` (K up to 131072), else in float64
    (exact for any K a tensor can have).
    """
    if q.dtype != torch.int8:
        raise TypeError(f"activation codes must be int8, got {q.dtype}")
    K = q.shape[-1]
    t = unpack_ternary(packed, K)
    dt = torch.float32 if 128 * K <= 2**24 else torch.float64
    return (q.to(dt) @ t.to(dt).t()).to(torch.int32)


def ternary_matmul(
    q: torch.Tensor,
    x_scale: torch.Tensor,
    packed: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``out = acc / s_x / s_w + b`` in fp32, cast to ``out_dtype``; ``[..., N]``."""
    _check_matmul_args(q, x_scale, packed, w_scale, bias)
    acc = ternary_matmul_int32(q, packed).float()
    out = acc / x_scale.float().unsqueeze(-1) / w_scale.float()
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


def bitlinear(
    x: torch.Tensor,
    norm_weight: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    eps: float = 1e-6,
    *,
    offset: bool = False,
    cast_before_weight: bool = True,
    norm_dtype: torch.dtype | None = None,
    per_channel: bool = False,
) -> torch.Tensor:
    """The whole BitLinear forward (no autograd): norm, quantize both sides, ternary matmul.

    The output dtype is the norm's output dtype, as ``F.linear`` on the norm output would give.
    """
    if norm_dtype is None:
        norm_dtype = norm_dtype_for(x.dtype, None if norm_weight is None else norm_weight.dtype, cast_before_weight)
    q, s_x = norm_quant(x, norm_weight, eps, offset=offset, cast_before_weight=cast_before_weight, norm_dtype=norm_dtype)
    packed, s_w = weight_quant(weight, per_channel)
    return ternary_matmul(q, s_x, packed, s_w, bias, norm_dtype)


def bitlinear_ste(
    x: torch.Tensor,
    norm_weight: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    eps: float = 1e-6,
    *,
    offset: bool = False,
    cast_before_weight: bool = True,
    norm_dtype: torch.dtype | None = None,
    per_channel: bool = False,
) -> torch.Tensor:
    """:func:`bitlinear` written with the straight-through estimator, for autograd.

    ``y + (q/s_x - y).detach()`` and ``W + (t/s_w - W).detach()``: the forward value is the
    quantized product (in fp32 here, so it agrees with :func:`bitlinear` to fp32 rounding),
    the gradient is that of ``F.linear(y, W, b)`` with the quantizers taken as the identity.
    This is the oracle for the gradients of ``bitfx::bitlinear``.
    """
    if norm_dtype is None:
        norm_dtype = norm_dtype_for(x.dtype, None if norm_weight is None else norm_weight.dtype, cast_before_weight)
    y = rms_norm(x, norm_weight, eps, offset=offset, cast_before_weight=cast_before_weight, norm_dtype=norm_dtype)
    q, s_x = act_quant(y.detach())
    yq = y.float() + (q.float() / s_x.unsqueeze(-1) - y.float()).detach()
    s_w = weight_scale(weight.detach(), per_channel)
    t = ternarize(weight.detach(), s_w)
    wq = weight.float() + (t.float() / s_w.unsqueeze(1) - weight.float()).detach()
    out = F.linear(yq, wq, None if bias is None else bias.float())
    return out.to(norm_dtype)


def ternary_linear_ste(
    x: torch.Tensor,
    norm_weight: torch.Tensor | None,
    t: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    eps: float = 1e-6,
    *,
    normalize: bool = True,
    offset: bool = False,
    cast_before_weight: bool = True,
    norm_dtype: torch.dtype | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """A linear layer with a fixed ternary weight ``t / s_w`` (int8 codes ``t [N, K]``, fp32
    ``w_scale [N]``), written with the straight-through estimator, for autograd.

    ``y = rms_norm(x, g)`` (``y = x`` when not ``normalize``), ``yq = y + (q/s_x - y).detach()``,
    ``out = F.linear(yq, t / s_w, b)`` in fp32, cast to ``out_dtype`` (default: the norm's dtype,
    or ``x.dtype`` without the norm). Gradients reach ``x``, ``norm_weight`` and ``bias``; the
    weight is a constant. This is the oracle for the gradients of ``bitfx::ternary_linear_group``
    (and of ``BitfxLinear`` in grad mode).
    """
    if normalize:
        if norm_dtype is None:
            norm_dtype = norm_dtype_for(x.dtype, None if norm_weight is None else norm_weight.dtype, cast_before_weight)
        y = rms_norm(x, norm_weight, eps, offset=offset, cast_before_weight=cast_before_weight, norm_dtype=norm_dtype)
    else:
        y = x
    if out_dtype is None:
        out_dtype = y.dtype
    q, s_x = act_quant(y.detach())
    yq = y.float() + (q.float() / s_x.unsqueeze(-1) - y.float()).detach()
    w = t.float() / w_scale.float().unsqueeze(1)
    out = F.linear(yq, w, None if bias is None else bias.float())
    return out.to(out_dtype)


INT8_QMAX = 127  # int8 weight codes are symmetric: [-127, 127] (-128 is never produced)


def int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-row symmetric int8 quantization of a float weight ``W [N, K]`` (the int8 head).

    ``scale[n] = max(max_k |W[n, k]|, 1e-5) / 127`` and
    ``q = clamp(round_half_even(W / scale), -127, 127)``, both in fp32, so that
    ``W ~= q * scale[:, None]`` with an error of at most ``scale / 2`` per element. A row of
    zeros (or of magnitudes below the floor) gets the floor's scale and small codes. Returns
    ``(q int8 [N, K] contiguous, scale fp32 [N])``. Raises a ValueError for a weight that is
    not a 2-D float tensor or holds NaN or Inf (no scale represents it).
    """
    if weight.dim() != 2:
        raise ValueError(f"int8 weight quantization needs a 2-D [N, K] weight, got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise ValueError(f"int8 weight quantization needs a float weight, got {weight.dtype}")
    wf = weight.float()
    bad = ~torch.isfinite(wf)
    if bool(bad.any()):
        n, k = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"int8 weight quantization needs finite values: the weight holds {int(bad.sum())} NaN/Inf "
            f"value(s), the first at row {n}, column {k} ({wf[n, k].item()})"
        )
    N, K = wf.shape
    amax = wf.abs().amax(dim=1) if K > 0 else wf.new_zeros(N)
    scale = amax.clamp(min=SCALE_FLOOR) / INT8_QMAX
    q = torch.round(wf / scale.unsqueeze(1)).clamp(-INT8_QMAX, INT8_QMAX).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def int8_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The int8 weight-only linear: ``out = (x @ q^T) * scale + b`` in fp32, cast to ``x.dtype``.

    ``x [..., K]`` float (activations are not quantized), ``qweight`` int8 ``[N, K]`` and
    ``scale`` fp32 ``[N]`` as :func:`int8_rows` makes them, ``bias [N]`` or None; the result
    has shape ``[..., N]``. The CPU implementation of the int8 head and the oracle of
    ``bitfx.kernels.int8_gemv``.
    """
    if not x.is_floating_point():
        raise TypeError(f"activations must be a float tensor, got {x.dtype}")
    if qweight.dtype != torch.int8:
        raise TypeError(f"int8 weight must be int8, got {qweight.dtype}")
    if qweight.dim() != 2 or x.dim() < 1 or x.shape[-1] != qweight.shape[1]:
        raise ValueError(f"int8 weight has shape {tuple(qweight.shape)}, activations {tuple(x.shape)}: "
                         f"expected [N, K] with K = x.shape[-1]")
    N = qweight.shape[0]
    if scale.shape != (N,):
        raise ValueError(f"weight scale has shape {tuple(scale.shape)}, expected ({N},)")
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({N},)")
    out = (x.float() @ qweight.float().t()) * scale.float()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                     scale: float) -> torch.Tensor:
    """Attention of one query per head, ``softmax(scale * q k^T + mask) v``, in fp32, rounded once
    to ``q``'s dtype: ``q [B, Hq, 1, D]``, ``k, v [B, Hk, L, D]`` with ``Hk`` dividing ``Hq``
    (query head ``h`` reads key/value head ``h // (Hq // Hk)``), ``mask`` None, bool (True: the
    key is attended) or float (added to the scores), broadcastable to ``[B, Hq, 1, L]``. A query
    with every key masked out gets zeros (as torch's math attention). The oracle of
    ``bitfx.kernels.attention``."""
    if k.shape[2] == 0:  # no key at all: every key masked, so zeros (as torch's attention gives)
        return torch.zeros_like(q)
    group = q.shape[1] // k.shape[1]
    kf = k.float().repeat_interleave(group, dim=1)
    vf = v.float().repeat_interleave(group, dim=1)
    s = (q.float() @ kf.transpose(-1, -2)) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.float()
    top = s.amax(dim=-1, keepdim=True)
    p = torch.exp(s - torch.where(top == float("-inf"), 0.0, top))
    total = p.sum(dim=-1, keepdim=True)
    out = (p @ vf) / torch.where(total > 0, total, 1.0)
    return out.to(q.dtype)
