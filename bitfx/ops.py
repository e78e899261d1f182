"""The ``bitfx::`` operators: every ``torch.library`` registration of the project, in one place.

Each op is functional (no mutation) and has

* a default implementation: the plain-torch reference of :mod:`bitfx.reference` (this is
  what runs on CPU and on any device without a Triton kernel);
* a CUDA implementation: the Triton kernels of :mod:`bitfx.kernels`;
* a fake implementation built from symbolic sizes, for ``torch.compile``;
* for the training ops ``bitlinear`` and ``bitlinear_group``, and for ``ternary_linear_group``
  (frozen packed weights in grad mode), an autograd formula (straight-through estimator).

Ops, with shapes (``...`` any leading dims, ``Kq = kernels.layout.packed_k(K)``):

``norm_quant(x[..., K], weight[K]?, eps, offset, cast_before_weight, norm_dtype) -> (q int8[..., K], x_scale f32[...])``
``act_quant(y[..., K]) -> (q int8[..., K], x_scale f32[...])``
``weight_quant(w[N, K], per_channel) -> (packed u8[N, Kq], w_scale f32[N])``
``ternary_matmul(q int8[..., K], x_scale f32[...], packed u8[N, Kq], w_scale f32[N], bias[N]?, out_dtype, in_features) -> out[..., N]``
    (``in_features``: the K the weight was packed for; must equal ``q.shape[-1]``)
``bitlinear(x[..., K], norm_weight[K]?, weight[N, K], bias[N]?, eps, offset, cast_before_weight, norm_dtype, per_channel)
    -> (out[..., N], q, x_scale, rstd f32[...], packed, w_scale)``; only ``out`` is meant for users, the rest is saved
    for the backward.
``bitlinear_group(x, norm_weight?, [weight...], [bias...], eps, offset, cast_before_weight, norm_dtype, [per_channel...])
    -> ([out...], q, x_scale, rstd, [packed...], [w_scale...])``: one norm, several linears.
``ternary_linear_group(x[..., K], norm_weight[K]?, [packed u8[N_i, Kq]...], [w_scale f32[N_i]...], [bias[N_i]...],
    in_features, eps, offset, cast_before_weight, norm_dtype, normalize, out_dtype) -> ([out[..., N_i]...], q, x_scale, rstd)``:
    (norm +) activation quantization once, then one ``ternary_matmul`` per frozen packed weight; differentiable
    with respect to ``x``, ``norm_weight`` and the biases (straight-through), not the packed weights.
``dequantize(packed u8[N, Kq], w_scale f32[N], K, dtype) -> [N, K]``,
``act_dequant(q int8[..., K], x_scale f32[...], dtype) -> [..., K]`` and
``rms_norm_backward(dy[..., K], x[..., K], weight[K]?, rstd[...], offset, cast_before_weight) -> (dx[..., K], dweight f32[K])``:
    the pieces of the backward.

Packed weights are not checked for invalid codes per call on CUDA (it would cost a pass over
the weight): ``BitfxLinear`` checks its codes when it is built or loaded
(:func:`bitfx.reference.check_ternary_codes`); on CPU the reference checks them on every unpack.
"""

from __future__ import annotations

import importlib
from typing import Optional

import torch
from torch import Tensor

from bitfx import fp8
from bitfx import reference as ref
from bitfx.kernels.layout import CODE_OFFSET, PLANES, packed_k

__all__ = [
    "norm_quant",
    "act_quant",
    "weight_quant",
    "ternary_matmul",
    "bitlinear",
    "bitlinear_full",
    "bitlinear_group",
    "bitlinear_stacked",
    "weight_quant_stacked",
    "ternary_linear_group",
    "dequantize",
    "act_dequant",
    "rms_norm_backward",
]

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _kernels(name: str):
    # Triton is imported only when a CUDA kernel first runs.
    return importlib.import_module(f"bitfx.kernels.{name}")


def _dtype_name(d: torch.dtype) -> str:
    return str(d).replace("torch.", "")


# ---------------------------------------------------------------- input checks (all impls)

def _check_float(op: str, what: str, t: Tensor) -> None:
    if t.dtype not in _FLOATS:
        raise TypeError(f"bitfx.{op}: {what} must be float32, float16 or bfloat16, got {_dtype_name(t.dtype)}")


def _check_same_device(op: str, *tensors: Optional[Tensor]) -> None:
    present = [t for t in tensors if t is not None]
    for t in present[1:]:
        if t.device != present[0].device:
            raise ValueError(f"bitfx.{op}: all tensors must be on one device, got {present[0].device} and {t.device}")


def _check_has_features(op: str, what: str, t: Tensor) -> None:
    if t.dim() < 1:
        raise ValueError(f"bitfx.{op}: {what} must have at least one dimension (the features), got a 0-D tensor")


def _check_norm_args(op: str, x: Tensor, weight: Optional[Tensor], norm_dtype: torch.dtype) -> None:
    _check_float(op, "input", x)
    _check_has_features(op, "input", x)
    if weight is not None:
        _check_float(op, "norm weight", weight)
        if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
            raise ValueError(
                f"bitfx.{op}: norm weight has shape {tuple(weight.shape)} but the input has "
                f"K={x.shape[-1]} features (last dimension); expected ({x.shape[-1]},)"
            )
    if norm_dtype not in _FLOATS:
        raise TypeError(f"bitfx.{op}: norm_dtype must be a float dtype, got {norm_dtype}")
    _check_same_device(op, x, weight)


def _check_linear_weight(op: str, w: Tensor) -> None:
    _check_float(op, "linear weight", w)
    if w.dim() != 2:
        raise ValueError(f"bitfx.{op}: linear weight must be 2-D [N, K], got shape {tuple(w.shape)}")


def _check_packed_weight(op: str, packed: Tensor, w_scale: Tensor, bias: Optional[Tensor], in_features) -> None:
    """A packed weight ``[N, packed_k(in_features)]`` uint8, its scale fp32 ``[N]``, a float bias ``[N]`` or None."""
    if packed.dtype != torch.uint8:
        raise TypeError(
            f"bitfx.{op}: packed ternary weight must be uint8 (from bitfx weight_quant), got {_dtype_name(packed.dtype)}"
        )
    if packed.dim() != 2:
        raise ValueError(f"bitfx.{op}: packed ternary weight must be 2-D [N, Kq], got shape {tuple(packed.shape)}")
    torch._check_with(
        ValueError,
        packed.shape[1] == packed_k(in_features),
        lambda: f"bitfx.{op}: packed ternary weight has {packed.shape[1]} bytes per row but in_features="
        f"{in_features} needs {packed_k(in_features)}: a weight packed for another K, or in another format",
    )
    N = packed.shape[0]
    if w_scale.dtype != torch.float32:
        raise TypeError(f"bitfx.{op}: weight scale must be float32, got {_dtype_name(w_scale.dtype)}")
    if w_scale.dim() != 1 or w_scale.shape[0] != N:
        raise ValueError(f"bitfx.{op}: weight scale has shape {tuple(w_scale.shape)}, expected ({N},)")
    if bias is not None:
        _check_float(op, "bias", bias)
        if bias.dim() != 1 or bias.shape[0] != N:
            raise ValueError(f"bitfx.{op}: bias has shape {tuple(bias.shape)}, expected ({N},)")


def _check_in_features(op: str, x: Tensor, in_features) -> None:
    K = x.shape[-1]
    torch._check_with(
        ValueError,
        K == in_features,
        lambda: f"bitfx.{op}: the activations have K={K} features (last dimension) but the weight was "
        f"packed for in_features={in_features}",
    )


def _check_matmul_args(q, x_scale, packed, w_scale, bias, out_dtype, in_features) -> None:
    op = "ternary_matmul"
    if q.dtype != torch.int8:
        raise TypeError(f"bitfx.{op}: activation codes must be int8, got {_dtype_name(q.dtype)}")
    _check_has_features(op, "activation codes", q)
    _check_packed_weight(op, packed, w_scale, bias, in_features)
    _check_in_features(op, q, in_features)
    if x_scale.dtype != torch.float32:
        raise TypeError(f"bitfx.{op}: activation scale must be float32, got {_dtype_name(x_scale.dtype)}")
    if tuple(x_scale.shape) != tuple(q.shape[:-1]):
        raise ValueError(f"bitfx.{op}: activation scale has shape {tuple(x_scale.shape)}, expected {tuple(q.shape[:-1])}")
    if out_dtype not in _FLOATS:
        raise TypeError(f"bitfx.{op}: out_dtype must be a float dtype, got {out_dtype}")
    _check_same_device(op, q, x_scale, packed, w_scale, bias)


def _rows(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1])


# The four inference ops (norm_quant, act_quant, weight_quant, ternary_matmul) are defined
# with ``Library.define`` and plain kernels per dispatch key: a ``custom_op`` adds a Python
# autograd layer in front of every call, which cost about 110 us of host time per call on the
# H100 host (166 us per ternary_matmul call, 53 us of it the launcher), more than a decode
# kernel runs. They have no gradient (the training ops below do), so they need no such layer;
# their schema, fake implementation and kernels are as a custom_op's would be.
_LIB = torch.library.Library("bitfx", "FRAGMENT")


class _InferenceOp:
    """``torch.ops.bitfx.<name>`` defined from ``schema``, the decorated function its reference
    (CompositeExplicitAutograd: every device without a kernel of its own, the CPU first)."""

    def __init__(self, schema: str, fn):
        self._name = fn.__name__
        _LIB.define(schema)
        _LIB.impl(self._name, fn, "CompositeExplicitAutograd")
        self._op = getattr(torch.ops.bitfx, self._name)
        self.__doc__, self.__wrapped__ = fn.__doc__, fn

    def __call__(self, *args, **kwargs):
        return self._op(*args, **kwargs)

    def register_fake(self, fn):
        torch.library.register_fake(f"bitfx::{self._name}", fn, lib=_LIB)
        return fn


def _inference_op(schema: str):
    return lambda fn: _InferenceOp(schema, fn)


# The CUDA kernels are registered with the dispatcher directly (``Library.impl`` at the CUDA
# key) rather than through ``CustomOpDef.register_kernel``, whose wrapper (output aliasing
# checks, a Dynamo-disabled frame) costs host time on every call.
_CUDA_LIB = torch.library.Library("bitfx", "IMPL")


def _cuda_kernel(op):
    def register(fn):
        _CUDA_LIB.impl(op._name.rsplit("::", 1)[-1], fn, "CUDA")
        return fn
    return register


# ---------------------------------------------------------------- norm_quant

@_inference_op("norm_quant(Tensor x, Tensor? weight, float eps, bool offset, bool cast_before_weight, "
               "ScalarType norm_dtype, SymInt bits=8) -> (Tensor, Tensor)")
def norm_quant(
    x: Tensor,
    weight: Optional[Tensor],
    eps: float,
    offset: bool,
    cast_before_weight: bool,
    norm_dtype: torch.dtype,
    bits: int = 8,
) -> tuple[Tensor, Tensor]:
    """RMSNorm + per-token quantization to ``bits``-bit codes in int8 (reference:
    :func:`bitfx.reference.norm_quant`)."""
    _check_norm_args("norm_quant", x, weight, norm_dtype)
    return ref.norm_quant(x, weight, eps, offset=offset, cast_before_weight=cast_before_weight, norm_dtype=norm_dtype,
                          bits=bits)


@_cuda_kernel(norm_quant)
def _(x, weight, eps, offset, cast_before_weight, norm_dtype, bits=8):
    _check_norm_args("norm_quant", x, weight, norm_dtype)
    q, scale, _ = _kernels("norm_quant").norm_quant(_rows(x), weight, eps, offset, cast_before_weight, norm_dtype,
                                                   ref.act_qmax(bits))
    return q.view(x.shape), scale.view(x.shape[:-1])


@norm_quant.register_fake
def _(x, weight, eps, offset, cast_before_weight, norm_dtype, bits=8):
    _check_norm_args("norm_quant", x, weight, norm_dtype)
    ref.act_qmax(bits)
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty(x.shape[:-1], dtype=torch.float32)


# ---------------------------------------------------------------- act_quant

@_inference_op("act_quant(Tensor y, SymInt bits=8) -> (Tensor, Tensor)")
def act_quant(y: Tensor, bits: int = 8) -> tuple[Tensor, Tensor]:
    """Per-token absmax quantization to ``bits``-bit codes in int8 (reference:
    :func:`bitfx.reference.act_quant`)."""
    _check_norm_args("act_quant", y, None, torch.float32)
    return ref.act_quant(y, bits)


@_cuda_kernel(act_quant)
def _(y, bits=8):
    _check_norm_args("act_quant", y, None, torch.float32)
    q, scale = _kernels("norm_quant").act_quant(_rows(y), ref.act_qmax(bits))
    return q.view(y.shape), scale.view(y.shape[:-1])


@act_quant.register_fake
def _(y, bits=8):
    _check_norm_args("act_quant", y, None, torch.float32)
    ref.act_qmax(bits)
    return y.new_empty(y.shape, dtype=torch.int8), y.new_empty(y.shape[:-1], dtype=torch.float32)


# ---------------------------------------------------------------- weight_quant

@_inference_op("weight_quant(Tensor w, bool per_channel) -> (Tensor, Tensor)")
def weight_quant(w: Tensor, per_channel: bool) -> tuple[Tensor, Tensor]:
    """Absmean ternary quantization + 2-bit packing (reference: :func:`bitfx.reference.weight_quant`)."""
    _check_linear_weight("weight_quant", w)
    return ref.weight_quant(w, per_channel)


@_cuda_kernel(weight_quant)
def _(w, per_channel):
    _check_linear_weight("weight_quant", w)
    return _kernels("weight_pack").weight_quant(w, per_channel)


@weight_quant.register_fake
def _(w, per_channel):
    _check_linear_weight("weight_quant", w)
    N, K = w.shape
    return w.new_empty((N, packed_k(K)), dtype=torch.uint8), w.new_empty((N,), dtype=torch.float32)


# ---------------------------------------------------------------- ternary_matmul

@_inference_op("ternary_matmul(Tensor q, Tensor x_scale, Tensor packed, Tensor w_scale, Tensor? bias, "
               "ScalarType out_dtype, SymInt in_features) -> Tensor")
def ternary_matmul(
    q: Tensor,
    x_scale: Tensor,
    packed: Tensor,
    w_scale: Tensor,
    bias: Optional[Tensor],
    out_dtype: torch.dtype,
    in_features: int,
) -> Tensor:
    """int8 activations x packed ternary weights, exact int32 accumulation, float epilogue
    (reference: :func:`bitfx.reference.ternary_matmul`).

    ``in_features`` is the K the weight was packed for (several K share a packed width, e.g.
    ``packed_k(32) == packed_k(64)``): it must equal ``q.shape[-1]``. The CUDA kernel does not
    check the codes for validity per call (``BitfxLinear`` does when built or loaded); the CPU
    reference raises on an invalid code."""
    _check_matmul_args(q, x_scale, packed, w_scale, bias, out_dtype, in_features)
    return ref.ternary_matmul(q, x_scale, packed, w_scale, bias, out_dtype)


@_cuda_kernel(ternary_matmul)
def _(q, x_scale, packed, w_scale, bias, out_dtype, in_features):
    _check_matmul_args(q, x_scale, packed, w_scale, bias, out_dtype, in_features)
    out = _kernels("ternary_matmul").ternary_matmul(_rows(q), x_scale.reshape(-1), packed, w_scale, bias, out_dtype)
    return out.view(*q.shape[:-1], packed.shape[0])


@ternary_matmul.register_fake
def _(q, x_scale, packed, w_scale, bias, out_dtype, in_features):
    _check_matmul_args(q, x_scale, packed, w_scale, bias, out_dtype, in_features)
    return q.new_empty((*q.shape[:-1], packed.shape[0]), dtype=out_dtype)


# ---------------------------------------------------------------- dequantize (backward piece)

@torch.library.custom_op("bitfx::dequantize", mutates_args=())
def dequantize(packed: Tensor, w_scale: Tensor, K: int, dtype: torch.dtype) -> Tensor:
    """``t / s_w`` as a dense ``[N, K]`` matrix of ``dtype`` (invalid codes: a ValueError on CPU,
    not checked on CUDA)."""
    return (ref.unpack_ternary(packed, K).float() / w_scale.float().unsqueeze(1)).to(dtype)


@_cuda_kernel(dequantize)
def _(packed, w_scale, K, dtype):
    return _kernels("weight_pack").dequantize(packed, w_scale, K, dtype)


@dequantize.register_fake
def _(packed, w_scale, K, dtype):
    return packed.new_empty((packed.shape[0], K), dtype=dtype)


# ---------------------------------------------------------------- act_dequant (backward piece)

def _check_act_dequant_args(q, x_scale, dtype) -> None:
    op = "act_dequant"
    if q.dtype != torch.int8:
        raise TypeError(f"bitfx.{op}: activation codes must be int8, got {_dtype_name(q.dtype)}")
    _check_has_features(op, "activation codes", q)
    if x_scale.dtype != torch.float32:
        raise TypeError(f"bitfx.{op}: activation scale must be float32, got {_dtype_name(x_scale.dtype)}")
    if tuple(x_scale.shape) != tuple(q.shape[:-1]):
        raise ValueError(f"bitfx.{op}: activation scale has shape {tuple(x_scale.shape)}, expected {tuple(q.shape[:-1])}")
    if dtype not in _FLOATS:
        raise TypeError(f"bitfx.{op}: dtype must be a float dtype, got {dtype}")
    _check_same_device(op, q, x_scale)


@torch.library.custom_op("bitfx::act_dequant", mutates_args=())
def act_dequant(q: Tensor, x_scale: Tensor, dtype: torch.dtype) -> Tensor:
    """``q / s_x`` as ``dtype [..., K]``: the activations the forward's matmul used."""
    _check_act_dequant_args(q, x_scale, dtype)
    return _bw_act_dequant(q, x_scale, dtype)


@_cuda_kernel(act_dequant)
def _(q, x_scale, dtype):
    _check_act_dequant_args(q, x_scale, dtype)
    return _kernels("norm_quant").act_dequant(_rows(q), x_scale.reshape(-1), dtype).view(q.shape)


@act_dequant.register_fake
def _(q, x_scale, dtype):
    _check_act_dequant_args(q, x_scale, dtype)
    return q.new_empty(q.shape, dtype=dtype)


# ---------------------------------------------------------------- rms_norm_backward (backward piece)

def _check_norm_backward_args(dy, x, weight, rstd) -> None:
    op = "rms_norm_backward"
    _check_norm_args(op, x, weight, torch.float32)
    _check_float(op, "dy", dy)
    if tuple(dy.shape) != tuple(x.shape):
        raise ValueError(f"bitfx.{op}: dy has shape {tuple(dy.shape)} but x has shape {tuple(x.shape)}")
    if rstd.dtype != torch.float32:
        raise TypeError(f"bitfx.{op}: rstd must be float32, got {_dtype_name(rstd.dtype)}")
    if tuple(rstd.shape) != tuple(x.shape[:-1]):
        raise ValueError(f"bitfx.{op}: rstd has shape {tuple(rstd.shape)}, expected {tuple(x.shape[:-1])}")
    _check_same_device(op, dy, x, weight, rstd)


@torch.library.custom_op("bitfx::rms_norm_backward", mutates_args=())
def rms_norm_backward(
    dy: Tensor, x: Tensor, weight: Optional[Tensor], rstd: Tensor, offset: bool, cast_before_weight: bool
) -> tuple[Tensor, Tensor]:
    """Gradients of ``y = x * rstd * g`` (casts taken as the identity): ``(dx in x.dtype, dg f32[K])``.
    ``dg`` is all zeros when there is no weight. With ``cast_before_weight`` the ``r = x * rstd``
    in ``dg`` is rounded to ``x.dtype``, as the forward multiplied the weight by it."""
    _check_norm_backward_args(dy, x, weight, rstd)
    return ref.rms_norm_backward(dy, x, weight, rstd, offset, cast_before_weight)


@_cuda_kernel(rms_norm_backward)
def _(dy, x, weight, rstd, offset, cast_before_weight):
    _check_norm_backward_args(dy, x, weight, rstd)
    K = x.shape[-1]
    dx, dg = _kernels("norm_quant").rms_norm_backward(
        _rows(dy), _rows(x), weight, rstd.reshape(-1), offset, cast_before_weight
    )
    if dg is None:
        dg = x.new_zeros((K,), dtype=torch.float32)
    return dx.view(x.shape), dg


@rms_norm_backward.register_fake
def _(dy, x, weight, rstd, offset, cast_before_weight):
    _check_norm_backward_args(dy, x, weight, rstd)
    return torch.empty_like(x), x.new_empty((x.shape[-1],), dtype=torch.float32)


def _fake_norm_outputs(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Fakes of what the training ops save from the norm: ``(q int8[..., K], x_scale f32[...], rstd f32[...])``."""
    lead = x.shape[:-1]
    return (x.new_empty(x.shape, dtype=torch.int8), x.new_empty(lead, dtype=torch.float32),
            x.new_empty(lead, dtype=torch.float32))


# ---------------------------------------------------------------- bitlinear (training)

# The training ops' backward formulas are plain torch (no bitfx op): under torch.compile
# AOTAutograd traces them into the backward graph, where Inductor fuses the dequantization into
# the kernels around the matmuls and the norm's backward (``ref.rms_norm_backward``) into one
# reduction, with no Python per call; run eagerly they compute what the bitfx ops compute.

def _bw_act_dequant(q: Tensor, x_scale: Tensor, dtype: torch.dtype) -> Tensor:
    """``(q / s_x).to(dtype)``: :func:`act_dequant`'s definition."""
    return (q.float() / x_scale.float().unsqueeze(-1)).to(dtype)


def _bw_dequantize(packed: Tensor, w_scale: Tensor, K: int, dtype: torch.dtype) -> Tensor:
    """``(t / s_w).to(dtype) [N, K]``: :func:`dequantize` without its check of the codes."""
    t = ref.unpacked_codes(packed, K)
    return (t.float() / w_scale.float().unsqueeze(1)).to(dtype)


def _check_bitlinear_args(x, norm_weight, weight, bias, norm_dtype):
    _check_norm_args("bitlinear", x, norm_weight, norm_dtype)
    _check_linear_weight("bitlinear", weight)
    if weight.shape[1] != x.shape[-1]:
        raise ValueError(
            f"bitfx.bitlinear: linear weight has K={weight.shape[1]} input features but the input has "
            f"K={x.shape[-1]} (last dimension)"
        )
    if bias is not None:
        _check_float("bitlinear", "bias", bias)
        if bias.dim() != 1 or bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bitfx.bitlinear: bias has shape {tuple(bias.shape)}, expected ({weight.shape[0]},)")
    _check_same_device("bitlinear", x, norm_weight, weight, bias)


@torch.library.custom_op("bitfx::bitlinear", mutates_args=())
def bitlinear_full(
    x: Tensor,
    norm_weight: Optional[Tensor],
    weight: Tensor,
    bias: Optional[Tensor],
    eps: float,
    offset: bool,
    cast_before_weight: bool,
    norm_dtype: torch.dtype,
    per_channel: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """RMSNorm -> int8 quant -> ternary weight quant -> exact matmul, with the straight-through
    backward. Returns ``(out, q, x_scale, rstd, packed, w_scale)``; the last five are what the
    backward needs (int8 codes, 2-bit weights and scales: no float activation is saved)."""
    _check_bitlinear_args(x, norm_weight, weight, bias, norm_dtype)
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(dim=-1) + eps)
    q, x_scale = ref.norm_quant(x, norm_weight, eps, offset=offset, cast_before_weight=cast_before_weight, norm_dtype=norm_dtype)
    packed, w_scale = ref.weight_quant(weight, per_channel)
    out = ref.ternary_matmul(q, x_scale, packed, w_scale, bias, norm_dtype)
    return out, q, x_scale, rstd, packed, w_scale


@_cuda_kernel(bitlinear_full)
def _(x, norm_weight, weight, bias, eps, offset, cast_before_weight, norm_dtype, per_channel):
    _check_bitlinear_args(x, norm_weight, weight, bias, norm_dtype)
    q, x_scale, rstd = _kernels("norm_quant").norm_quant(_rows(x), norm_weight, eps, offset, cast_before_weight, norm_dtype)
    packed, w_scale = _kernels("weight_pack").weight_quant(weight, per_channel)
    out = _kernels("ternary_matmul").ternary_matmul(q, x_scale, packed, w_scale, bias, norm_dtype)
    lead = x.shape[:-1]
    return out.view(*lead, weight.shape[0]), q.view(x.shape), x_scale.view(lead), rstd.view(lead), packed, w_scale


@bitlinear_full.register_fake
def _(x, norm_weight, weight, bias, eps, offset, cast_before_weight, norm_dtype, per_channel):
    _check_bitlinear_args(x, norm_weight, weight, bias, norm_dtype)
    N, K = weight.shape
    lead = x.shape[:-1]
    return (
        x.new_empty((*lead, N), dtype=norm_dtype),
        *_fake_norm_outputs(x),
        x.new_empty((N, packed_k(K)), dtype=torch.uint8),
        x.new_empty((N,), dtype=torch.float32),
    )


def _bitlinear_setup_context(ctx, inputs, output):
    x, norm_weight, weight, bias, eps, offset, cast_before_weight, norm_dtype, per_channel = inputs
    _, q, x_scale, rstd, packed, w_scale = output
    ctx.save_for_backward(x, norm_weight, q, x_scale, rstd, packed, w_scale)
    ctx.offset = offset
    ctx.cast_before_weight = cast_before_weight
    ctx.K = weight.shape[1]
    ctx.weight_dtype = weight.dtype
    ctx.has_bias = bias is not None
    ctx.bias_dtype = None if bias is None else bias.dtype


def _bitlinear_backward(ctx, dout, *_unused):
    """Straight-through: dW = dout^T (q / s_x), dy = dout (t / s_w), db = sum(dout), then the norm's backward."""
    x, norm_weight, q, x_scale, rstd, packed, w_scale = ctx.saved_tensors
    N = packed.shape[0]
    d2 = dout.reshape(-1, N)
    # The matmuls run in the gradient's dtype (bf16 tensor cores in bf16 training).
    mm_dtype = d2.dtype
    y_dq = _bw_act_dequant(q.reshape(-1, ctx.K), x_scale.reshape(-1), mm_dtype)
    w_dq = _bw_dequantize(packed, w_scale, ctx.K, mm_dtype)
    dweight = (d2.t() @ y_dq).to(ctx.weight_dtype)
    dy = (d2 @ w_dq).reshape(x.shape)
    dbias = d2.sum(0).to(ctx.bias_dtype) if ctx.has_bias else None
    dx, dg = ref.rms_norm_backward(dy, x, norm_weight, rstd, ctx.offset, ctx.cast_before_weight)
    dnorm = None if norm_weight is None else dg.to(norm_weight.dtype)
    return dx, dnorm, dweight, dbias, None, None, None, None, None


torch.library.register_autograd("bitfx::bitlinear", _bitlinear_backward, setup_context=_bitlinear_setup_context)


# ---------------------------------------------------------------- bitlinear_group (training, one norm, several linears)

def _ref_codes(x, norm_weight, eps, offset, cast_before_weight, norm_dtype, normalize, bits=8):
    """The training ops' reference front: ``(q, x_scale, rstd)`` of the norm and activation
    quantization (``normalize=False``: ``act_quant`` of ``x`` alone, ``rstd`` zeros)."""
    if not normalize:
        q, x_scale = ref.act_quant(x, bits)
        return q, x_scale, x.new_zeros(x.shape[:-1], dtype=torch.float32)
    rstd = torch.rsqrt(x.float().pow(2).mean(dim=-1) + eps)
    q, x_scale = ref.norm_quant(x, norm_weight, eps, offset=offset, cast_before_weight=cast_before_weight,
                                norm_dtype=norm_dtype, bits=bits)
    return q, x_scale, rstd


def _check_group_args(x, norm_weight, weights, biases, norm_dtype, per_channel, normalize=True):
    if not normalize and norm_weight is not None:
        raise ValueError("bitfx.bitlinear_group: a norm weight was given but normalize=False; pass None")
    if len(weights) == 0:
        raise ValueError("bitfx.bitlinear_group: needs at least one linear weight")
    if len(biases) not in (0, len(weights)) or len(per_channel) != len(weights):
        raise ValueError(
            f"bitfx.bitlinear_group: {len(weights)} weights but {len(biases)} biases and "
            f"{len(per_channel)} per_channel flags; give one flag per weight, and one bias per "
            f"weight or none at all"
        )
    for w, b in zip(weights, _bias_list(biases, len(weights))):
        _check_bitlinear_args(x, norm_weight, w, b, norm_dtype)


def _bias_list(biases: list, n: int) -> list:
    # A list of optional tensors would hide the biases from autograd (custom ops flatten only
    # lists of tensors), so the op takes a bias for every weight or for none.
    return list(biases) if biases else [None] * n


@torch.library.custom_op("bitfx::bitlinear_group", mutates_args=())
def bitlinear_group(
    x: Tensor,
    norm_weight: Optional[Tensor],
    weights: list[Tensor],
    biases: list[Tensor],
    eps: float,
    offset: bool,
    cast_before_weight: bool,
    norm_dtype: torch.dtype,
    per_channel: list[bool],
    normalize: bool = True,
    fp8_backward: bool = False,
) -> tuple[list[Tensor], Tensor, Tensor, Tensor, list[Tensor], list[Tensor]]:
    """``bitlinear`` for one norm feeding several linears (q/k/v, gate/up): the norm and the
    activation quantization run once, their codes serve every weight. Returns
    ``(outs, q, x_scale, rstd, packed, w_scales)``, ``outs[i] = bitlinear(x, g, weights[i], biases[i])``
    to the last bit; the gradient reaching the norm is the sum over the linears. ``biases`` holds
    one bias per weight, or is empty (no biases). ``normalize=False``: no norm, the input is
    quantized as it is (``act_quant``; ``norm_weight`` must be None, ``norm_dtype`` is the
    output dtype, ``rstd`` zeros): a linear no RMSNorm feeds. ``fp8_backward``: the backward's
    two matmuls in FP8 (:mod:`bitfx.fp8`) instead of the gradient's dtype; the forward is the same."""
    _check_group_args(x, norm_weight, weights, biases, norm_dtype, per_channel, normalize)
    q, x_scale, rstd = _ref_codes(x, norm_weight, eps, offset, cast_before_weight, norm_dtype, normalize)
    outs, packs, scales = [], [], []
    for w, b, pc in zip(weights, _bias_list(biases, len(weights)), per_channel):
        packed, w_scale = ref.weight_quant(w, pc)
        outs.append(ref.ternary_matmul(q, x_scale, packed, w_scale, b, norm_dtype))
        packs.append(packed)
        scales.append(w_scale)
    return outs, q, x_scale, rstd, packs, scales


@_cuda_kernel(bitlinear_group)
def _(x, norm_weight, weights, biases, eps, offset, cast_before_weight, norm_dtype, per_channel, normalize=True, fp8_backward=False):
    _check_group_args(x, norm_weight, weights, biases, norm_dtype, per_channel, normalize)
    lead = x.shape[:-1]
    if normalize:
        q, x_scale, rstd = _kernels("norm_quant").norm_quant(_rows(x), norm_weight, eps, offset, cast_before_weight,
                                                             norm_dtype)
    else:
        q, x_scale = _kernels("norm_quant").act_quant(_rows(x), ref.act_qmax(8))
        rstd = x.new_zeros(lead, dtype=torch.float32)
    outs, packs, scales = [], [], []
    for w, b, pc in zip(weights, _bias_list(biases, len(weights)), per_channel):
        packed, w_scale = _kernels("weight_pack").weight_quant(w, pc)
        out = _kernels("ternary_matmul").ternary_matmul(q, x_scale, packed, w_scale, b, norm_dtype)
        outs.append(out.view(*lead, w.shape[0]))
        packs.append(packed)
        scales.append(w_scale)
    return outs, q.view(x.shape), x_scale.view(lead), rstd.view(lead), packs, scales


@bitlinear_group.register_fake
def _(x, norm_weight, weights, biases, eps, offset, cast_before_weight, norm_dtype, per_channel, normalize=True, fp8_backward=False):
    _check_group_args(x, norm_weight, weights, biases, norm_dtype, per_channel, normalize)
    lead = x.shape[:-1]
    return (
        [x.new_empty((*lead, w.shape[0]), dtype=norm_dtype) for w in weights],
        *_fake_norm_outputs(x),
        [x.new_empty((w.shape[0], packed_k(w.shape[1])), dtype=torch.uint8) for w in weights],
        [x.new_empty((w.shape[0],), dtype=torch.float32) for w in weights],
    )


def _group_setup_context(ctx, inputs, output):
    x, norm_weight, weights, biases, eps, offset, cast_before_weight, norm_dtype, per_channel = inputs[:9]
    _, q, x_scale, rstd, packs, scales = output
    ctx.normalize = inputs[9] if len(inputs) > 9 else True
    ctx.fp8 = bool(inputs[10]) if len(inputs) > 10 else False
    # Without a norm the backward needs only the codes: x's shape and dtype are kept.
    ctx.save_for_backward(x if ctx.normalize else None, norm_weight, q, x_scale, rstd, *packs, *scales)
    ctx.x_meta = (x.shape, x.dtype)
    ctx.n = len(weights)
    ctx.offset = offset
    ctx.cast_before_weight = cast_before_weight
    ctx.K = x.shape[-1]
    ctx.weight_dtypes = [w.dtype for w in weights]
    ctx.bias_dtypes = [b.dtype for b in biases]


def _group_backward(ctx, douts, *_unused):
    """Straight-through, per linear as :func:`_bitlinear_backward`; the norm's input gradient
    sums ``dout_i (t_i / s_w_i)`` over the linears (in fp32) before the norm's backward (none
    with ``normalize=False``: that sum is the input's gradient)."""
    x, norm_weight, q, x_scale, rstd, *rest = ctx.saved_tensors
    packs, scales = rest[: ctx.n], rest[ctx.n:]
    x_shape, x_dtype = ctx.x_meta
    if ctx.fp8:
        dy, dweights, dbiases = _group_backward_fp8(ctx, douts, q, x_scale, packs, scales)
    else:
        dy, dweights, dbiases = _group_backward_exact(ctx, douts, q, x_scale, packs, scales)
    if ctx.normalize:
        dx, dg = ref.rms_norm_backward(dy.reshape(x_shape), x, norm_weight, rstd, ctx.offset, ctx.cast_before_weight)
        dnorm = None if norm_weight is None else dg.to(norm_weight.dtype)
    else:
        dx, dnorm = dy.reshape(x_shape).to(x_dtype), None
    # One None for each scalar argument the call passed (a trailing normalize at its default is left out).
    return (dx, dnorm, dweights, dbiases if ctx.bias_dtypes else []) + (None,) * (len(ctx.needs_input_grad) - 4)


def _group_backward_exact(ctx, douts, q, x_scale, packs, scales):
    """The straight-through matmuls in the gradient's dtype: ``(dy fp32, dweights, dbiases)``."""
    K = ctx.K
    y_dq = None
    dy = torch.zeros((q.numel() // K, K), dtype=torch.float32, device=q.device)
    dweights, dbiases = [], []
    for i in range(ctx.n):
        dout = douts[i]
        if dout is None:  # an output nothing used
            dweights.append(None)
            dbiases.append(None)
            continue
        N = packs[i].shape[0]
        d2 = dout.reshape(-1, N)
        if y_dq is None:
            y_dq = _bw_act_dequant(q.reshape(-1, K), x_scale.reshape(-1), d2.dtype)
        dweights.append((d2.t() @ y_dq.to(d2.dtype)).to(ctx.weight_dtypes[i]))
        dy += d2 @ _bw_dequantize(packs[i], scales[i], K, d2.dtype)
        dbiases.append(d2.sum(0).to(ctx.bias_dtypes[i]) if ctx.bias_dtypes else None)
    return dy, dweights, dbiases


def _group_backward_fp8(ctx, douts, q, x_scale, packs, scales):
    """The two straight-through matmuls in FP8 (:mod:`bitfx.fp8`): the input gradient as one
    matmul over the siblings' stacked codes, each weight gradient against the activations
    rounded once per feature. ``(dy, dweights, dbiases)``."""
    K = ctx.K
    M = q.numel() // K
    live = [i for i in range(ctx.n) if douts[i] is not None]
    d2s = {i: douts[i].reshape(M, packs[i].shape[0]) for i in live}
    dweights, dbiases = [None] * ctx.n, [None] * ctx.n
    if not live:  # no output was used
        return q.new_zeros((M, K), dtype=torch.float32), dweights, dbiases
    codes = [ref.unpacked_codes(packs[i], K) for i in live]
    dy = fp8.input_grad([d2s[i] for i in live], codes, [scales[i] for i in live], torch.float32)
    acts = _bw_act_dequant(q.reshape(M, K), x_scale.reshape(M), torch.float32)
    acts_t8, acts_scale = fp8.round_rows(acts.t())
    for i in live:
        dweights[i] = fp8.weight_grad(d2s[i], acts_t8, acts_scale, ctx.weight_dtypes[i])
        if ctx.bias_dtypes:
            dbiases[i] = d2s[i].sum(0).to(ctx.bias_dtypes[i])
    return dy, dweights, dbiases


torch.library.register_autograd("bitfx::bitlinear_group", _group_backward, setup_context=_group_setup_context)


# ---------------------------------------------------------------- stacked training form (what the backend emits)

# The backend's training graphs quantize the weights with plain torch (``weight_quant_stacked``,
# decomposed by AOTAutograd, so Inductor fuses it into its own kernels: no Python launch per
# weight) and run one ``bitlinear_stacked`` per norm: the norm and activation quantization, then
# ONE ternary matmul over the sibling weights stacked along N (q/k/v, gate/up). Its backward is
# one matmul per straight-through product over the stack, not one per weight. Per call, the
# host launches two Triton kernels instead of (1 + 4 per weight) for ``bitlinear_group``.

def _check_stack_weights(op: str, weights: list[Tensor], per_channel: list[bool]) -> None:
    if len(weights) == 0:
        raise ValueError(f"bitfx.{op}: needs at least one linear weight")
    if len(per_channel) != len(weights):
        raise ValueError(f"bitfx.{op}: {len(weights)} weights but {len(per_channel)} per_channel flags")
    for w in weights:
        _check_linear_weight(op, w)
        if w.shape[1] != weights[0].shape[1]:
            raise ValueError(
                f"bitfx.{op}: the weights must share K (in_features) to be stacked, got "
                f"{[tuple(v.shape) for v in weights]}"
            )
    _check_same_device(op, *weights)


_LIB.define("weight_quant_stacked(Tensor[] weights, bool[] per_channel) -> (Tensor, Tensor)")


def _weight_quant_stacked(weights: list[Tensor], per_channel: list[bool]) -> tuple[Tensor, Tensor]:
    """``weight_quant`` of each weight, stacked along N: ``(packed u8[sum N_i, Kq], w_scale
    f32[sum N_i])``, each block with its own scale (per tensor or per channel). Plain torch
    (CompositeImplicitAutograd): traced into the graph, where Inductor fuses it; no gradient
    (the straight-through gradient reaches the weights through ``bitlinear_stacked``).

    Written for few graph nodes (compile time grows with them): one row reduction and one
    packing over the whole stack, a handful of nodes per weight for its scale. The group means
    and reciprocals are computed in fp64 and rounded once to fp32: correctly rounded, as the
    reference's fp32 division and the Triton kernels' ``div_rn`` are, whatever the compiler
    does with an fp32 division (double rounding is innocuous for 53 >= 2 * 24 + 2 bits). The
    sum of ``|w|`` is taken per row, then per weight: its fp32 order may differ from the
    reference's (a few ulps of the scale); the codes are exactly those of the scale."""
    _check_stack_weights("weight_quant_stacked", weights, per_channel)
    parts = [w.detach().float() for w in weights]
    wf = torch.cat(parts) if len(parts) > 1 else parts[0]
    N, K = wf.shape
    row_sum = wf.abs().sum(dim=1)
    row_finite = torch.isfinite(wf).all(dim=1)
    means, finite, at = [], [], 0
    for w, pc in zip(weights, per_channel):
        n = w.shape[0]
        if pc:
            means.append(row_sum[at:at + n].double() / K)
            finite.append(row_finite[at:at + n])
        else:
            means.append(row_sum[at:at + n].sum(0, keepdim=True).double() / (n * K))
            finite.append(row_finite[at:at + n].all(0, keepdim=True))
        at += n
    mean = (torch.cat(means) if len(means) > 1 else means[0]).float()
    group_finite = torch.cat(finite) if len(finite) > 1 else finite[0]
    group_scale = (1.0 / mean.clamp(min=ref._SCALE_FLOOR).double()).float()
    group_scale = torch.where(group_finite, group_scale, float("nan"))
    if all(per_channel):
        scale = group_scale
    else:  # each per-tensor scale repeated over its block's rows
        pieces, g = [], 0
        for w, pc in zip(weights, per_channel):
            n = w.shape[0]
            pieces.append(group_scale[g:g + n] if pc else group_scale[g:g + 1].expand(n))
            g += n if pc else 1
        scale = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
    v = wf * scale.unsqueeze(1)
    # clamp(round_half_even(v), -1, 1) == (v > 0.5) - (v < -0.5) for every fp32 v (NaN: 0)
    codes = (v > 0.5).to(torch.int32) - (v < -0.5).to(torch.int32) + CODE_OFFSET
    Kq = packed_k(K)
    planes = torch.nn.functional.pad(codes, (0, PLANES * Kq - K), value=CODE_OFFSET).view(N, PLANES, Kq)
    shifts = torch.arange(0, 2 * PLANES, 2, dtype=torch.int32, device=wf.device).view(1, PLANES, 1)
    packed = (planes << shifts).sum(dim=1)
    return packed.to(torch.uint8), scale


_LIB.impl("weight_quant_stacked", _weight_quant_stacked, "CompositeImplicitAutograd")
weight_quant_stacked = torch.ops.bitfx.weight_quant_stacked


def _check_stacked_args(x, norm_weight, weights, packed, w_scale, bias, norm_dtype, normalize):
    op = "bitlinear_stacked"
    if not normalize and norm_weight is not None:
        raise ValueError(f"bitfx.{op}: a norm weight was given but normalize=False; pass None")
    _check_norm_args(op, x, norm_weight, norm_dtype)
    _check_stack_weights(op, weights, [False] * len(weights))
    K = x.shape[-1]
    if weights[0].shape[1] != K:
        raise ValueError(
            f"bitfx.{op}: linear weights have K={weights[0].shape[1]} input features but the input has "
            f"K={K} (last dimension)"
        )
    _check_packed_weight(op, packed, w_scale, bias, K)
    n = sum(w.shape[0] for w in weights)
    if packed.shape[0] != n:
        raise ValueError(
            f"bitfx.{op}: the packed stack has {packed.shape[0]} rows but the weights have {n} "
            f"({[tuple(w.shape) for w in weights]}); pack them with weight_quant_stacked"
        )
    _check_same_device(op, x, norm_weight, packed, w_scale, bias, weights[0])


_LIB.define(
    "bitlinear_stacked(Tensor x, Tensor? norm_weight, Tensor[] weights, Tensor packed, Tensor w_scale, "
    "Tensor? bias, float eps, bool offset, bool cast_before_weight, ScalarType norm_dtype, bool normalize=True, "
    "bool fp8_backward=False) -> (Tensor, Tensor, Tensor, Tensor)"
)


def _bitlinear_stacked(x, norm_weight, weights, packed, w_scale, bias, eps, offset, cast_before_weight, norm_dtype,
                       normalize=True, fp8_backward=False):
    """RMSNorm (``normalize``; else none) -> int8 activation codes -> one exact ternary matmul
    against ``packed``/``w_scale`` (``weight_quant_stacked(weights)``: the linears' weights
    stacked along N) + ``bias`` (stacked, or None). Returns ``(out[..., sum N_i], q, x_scale,
    rstd)``: ``out[..., rows of weight i]`` equals ``bitlinear(x, g, weights[i], b_i)`` to the
    last bit (for the same scale). ``weights`` are read only by the backward, which is the
    straight-through estimator: ``dW = dout^T (q / s_x)`` split per weight, ``dy = dout (t / s_w)``
    over the whole stack, then the norm's backward; no gradient reaches ``packed``/``w_scale``.
    ``fp8_backward``: those two matmuls in FP8 (:mod:`bitfx.fp8`)."""
    _check_stacked_args(x, norm_weight, weights, packed, w_scale, bias, norm_dtype, normalize)
    q, x_scale, rstd = _ref_codes(x, norm_weight, eps, offset, cast_before_weight, norm_dtype, normalize)
    return ref.ternary_matmul(q, x_scale, packed, w_scale, bias, norm_dtype), q, x_scale, rstd


_LIB.impl("bitlinear_stacked", _bitlinear_stacked, "CompositeExplicitAutograd")


def _stacked_cuda(x, norm_weight, weights, packed, w_scale, bias, eps, offset, cast_before_weight, norm_dtype,
                  normalize=True, fp8_backward=False):
    # The shapes and dtypes were checked when the graph was traced (the fake implementation);
    # per call only what a caller outside a graph could get wrong cheaply: the stack against x.
    K = x.shape[-1]
    if packed.dim() != 2 or packed.shape[1] != packed_k(K) or w_scale.shape != packed.shape[:1]:
        _check_stacked_args(x, norm_weight, weights, packed, w_scale, bias, norm_dtype, normalize)
    lead = x.shape[:-1]
    if normalize:
        q, x_scale, rstd = _kernels("norm_quant").norm_quant(_rows(x), norm_weight, eps, offset, cast_before_weight,
                                                             norm_dtype)
    else:
        q, x_scale = _kernels("norm_quant").act_quant(_rows(x), ref.act_qmax(8))
        rstd = x.new_zeros(lead, dtype=torch.float32)
    out = _kernels("ternary_matmul").ternary_matmul(q, x_scale, packed, w_scale, bias, norm_dtype)
    return out.view(*lead, packed.shape[0]), q.view(x.shape), x_scale.view(lead), rstd.view(lead)


_CUDA_LIB.impl("bitlinear_stacked", _stacked_cuda, "CUDA")


@torch.library.register_fake("bitfx::bitlinear_stacked", lib=_LIB)
def _(x, norm_weight, weights, packed, w_scale, bias, eps, offset, cast_before_weight, norm_dtype,
      normalize=True, fp8_backward=False):
    _check_stacked_args(x, norm_weight, weights, packed, w_scale, bias, norm_dtype, normalize)
    return (x.new_empty((*x.shape[:-1], packed.shape[0]), dtype=norm_dtype), *_fake_norm_outputs(x))


def _stacked_setup_context(ctx, inputs, output):
    x, norm_weight, weights, packed, w_scale, bias = inputs[:6]
    _, q, x_scale, rstd = output
    ctx.normalize = inputs[10] if len(inputs) > 10 else True
    ctx.fp8 = bool(inputs[11]) if len(inputs) > 11 else False
    ctx.offset, ctx.cast_before_weight = inputs[7], inputs[8]
    # Without a norm the backward needs only the codes: x's shape and dtype are kept.
    ctx.save_for_backward(x if ctx.normalize else None, norm_weight, q, x_scale, rstd, packed, w_scale)
    ctx.x_meta = (x.shape, x.dtype)
    ctx.sizes = [w.shape[0] for w in weights]
    ctx.weight_dtypes = [w.dtype for w in weights]
    ctx.bias_dtype = None if bias is None else bias.dtype


def _stacked_backward(ctx, dout, *_unused):
    x, norm_weight, q, x_scale, rstd, packed, w_scale = ctx.saved_tensors
    x_shape, x_dtype = ctx.x_meta
    K = x_shape[-1]
    N = packed.shape[0]
    d2 = dout.reshape(-1, N)
    M = d2.shape[0]
    dtypes = set(ctx.weight_dtypes)
    if ctx.fp8:
        dy = fp8.input_grad([d2], [ref.unpacked_codes(packed, K)], [w_scale], torch.float32)
        acts_t8, acts_scale = fp8.round_rows(_bw_act_dequant(q.reshape(M, K), x_scale.reshape(M), torch.float32).t())
        dw = fp8.weight_grad(d2, acts_t8, acts_scale, dtypes.pop() if len(dtypes) == 1 else torch.float32)
    else:
        # Both in the gradient's dtype (bf16 tensor cores in bf16 training), accumulated in
        # fp32 inside each matmul: the input gradient is rounded once, over the whole stack.
        dw = d2.t() @ _bw_act_dequant(q.reshape(M, K), x_scale.reshape(M), d2.dtype)
        dy = d2 @ _bw_dequantize(packed, w_scale, K, d2.dtype)
    dweights = [part.to(dt) for part, dt in zip(torch.split(dw, ctx.sizes, 0), ctx.weight_dtypes)]
    dbias = None if ctx.bias_dtype is None else d2.sum(0).to(ctx.bias_dtype)
    if ctx.normalize:
        dx, dg = ref.rms_norm_backward(dy.reshape(x_shape), x, norm_weight, rstd, ctx.offset, ctx.cast_before_weight)
        dnorm = None if norm_weight is None else dg.to(norm_weight.dtype)
    else:
        dx, dnorm = dy.reshape(x_shape).to(x_dtype), None
    return (dx, dnorm, dweights, None, None, dbias) + (None,) * (len(ctx.needs_input_grad) - 6)


torch.library.register_autograd("bitfx::bitlinear_stacked", _stacked_backward, setup_context=_stacked_setup_context,
                                lib=_LIB)
bitlinear_stacked = torch.ops.bitfx.bitlinear_stacked


# ---------------------------------------------------------------- ternary_linear_group (frozen packed weights, grad mode)

def _check_ternary_group_args(x, norm_weight, packed, w_scale, biases, in_features, norm_dtype, normalize, out_dtype):
    op = "ternary_linear_group"
    _check_norm_args(op, x, norm_weight, norm_dtype)
    if not normalize and norm_weight is not None:
        raise ValueError(f"bitfx.{op}: a norm weight was given but normalize=False; pass None")
    if len(packed) == 0:
        raise ValueError(f"bitfx.{op}: needs at least one packed weight")
    if len(w_scale) != len(packed) or len(biases) not in (0, len(packed)):
        raise ValueError(
            f"bitfx.{op}: {len(packed)} packed weights but {len(w_scale)} weight scales and {len(biases)} "
            f"biases; give one scale per weight, and one bias per weight or none at all"
        )
    for p, s, b in zip(packed, w_scale, _bias_list(biases, len(packed))):
        _check_packed_weight(op, p, s, b, in_features)
    _check_in_features(op, x, in_features)
    if out_dtype not in _FLOATS:
        raise TypeError(f"bitfx.{op}: out_dtype must be a float dtype, got {out_dtype}")
    _check_same_device(op, x, norm_weight, *packed, *w_scale, *biases)


@torch.library.custom_op("bitfx::ternary_linear_group", mutates_args=())
def ternary_linear_group(
    x: Tensor,
    norm_weight: Optional[Tensor],
    packed: list[Tensor],
    w_scale: list[Tensor],
    biases: list[Tensor],
    in_features: int,
    eps: float,
    offset: bool,
    cast_before_weight: bool,
    norm_dtype: torch.dtype,
    normalize: bool,
    out_dtype: torch.dtype,
    bits: int = 8,
) -> tuple[list[Tensor], Tensor, Tensor, Tensor]:
    """Frozen packed ternary weights that a gradient can pass through: ``(outs, q, x_scale, rstd)``.

    ``q, s_x = norm_quant(x, g, ...)`` if ``normalize``, else ``act_quant(x)`` (``g`` must be
    None then, and ``rstd`` is zeros); ``outs[i] = ternary_matmul(q, s_x, packed[i], w_scale[i],
    biases[i], out_dtype, in_features)``, bit for bit (the same kernels). ``biases`` holds one
    bias per weight, or is empty. Backward (straight-through): ``dy = sum_i dout_i (t_i / s_w_i)``,
    ``dbias_i = sum over rows of dout_i``, then the norm's backward (``dx = dy`` without the norm);
    the packed weights and their scales get no gradient. Codes are not checked for validity on
    CUDA (see the module docstring)."""
    _check_ternary_group_args(x, norm_weight, packed, w_scale, biases, in_features, norm_dtype, normalize, out_dtype)
    q, x_scale, rstd = _ref_codes(x, norm_weight, eps, offset, cast_before_weight, norm_dtype, normalize, bits)
    outs = [ref.ternary_matmul(q, x_scale, p, s, b, out_dtype)
            for p, s, b in zip(packed, w_scale, _bias_list(biases, len(packed)))]
    return outs, q, x_scale, rstd


@_cuda_kernel(ternary_linear_group)
def _(x, norm_weight, packed, w_scale, biases, in_features, eps, offset, cast_before_weight, norm_dtype, normalize,
      out_dtype, bits=8):
    _check_ternary_group_args(x, norm_weight, packed, w_scale, biases, in_features, norm_dtype, normalize, out_dtype)
    nq, tm = _kernels("norm_quant"), _kernels("ternary_matmul")
    lead = x.shape[:-1]
    if normalize:
        q, x_scale, rstd = nq.norm_quant(_rows(x), norm_weight, eps, offset, cast_before_weight, norm_dtype,
                                         ref.act_qmax(bits))
        rstd = rstd.view(lead)
    else:
        q, x_scale = nq.act_quant(_rows(x), ref.act_qmax(bits))
        rstd = x.new_zeros(lead, dtype=torch.float32)
    outs = [tm.ternary_matmul(q, x_scale, p, s, b, out_dtype).view(*lead, p.shape[0])
            for p, s, b in zip(packed, w_scale, _bias_list(biases, len(packed)))]
    return outs, q.view(x.shape), x_scale.view(lead), rstd


@ternary_linear_group.register_fake
def _(x, norm_weight, packed, w_scale, biases, in_features, eps, offset, cast_before_weight, norm_dtype, normalize,
      out_dtype, bits=8):
    _check_ternary_group_args(x, norm_weight, packed, w_scale, biases, in_features, norm_dtype, normalize, out_dtype)
    lead = x.shape[:-1]
    return (
        [x.new_empty((*lead, p.shape[0]), dtype=out_dtype) for p in packed],
        *_fake_norm_outputs(x),
    )


def _ternary_group_setup_context(ctx, inputs, output):
    x, norm_weight, packed, w_scale, biases, in_features, eps, offset, cast_before_weight, norm_dtype, normalize = inputs[:11]
    _, _, _, rstd = output
    ctx.save_for_backward(x, norm_weight, rstd, *packed, *w_scale)
    ctx.n = len(packed)
    ctx.K = in_features
    ctx.offset = offset
    ctx.cast_before_weight = cast_before_weight
    ctx.normalize = normalize
    ctx.bias_dtypes = [b.dtype for b in biases]


def _ternary_group_backward(ctx, douts, *_unused):
    """Straight-through: ``dy = sum_i dout_i (t_i / s_w_i)`` (each product in dout's dtype, summed
    in fp32), ``dbias_i = sum over rows of dout_i``, then the norm's backward if there is a norm."""
    x, norm_weight, rstd, *rest = ctx.saved_tensors
    packed, w_scale = rest[: ctx.n], rest[ctx.n:]
    K = ctx.K
    dy = torch.zeros((x.numel() // K, K), dtype=torch.float32, device=x.device)
    dbiases = []
    for i in range(ctx.n):
        dout = douts[i]
        if dout is None:  # an output nothing used
            dbiases.append(None)
            continue
        N = packed[i].shape[0]
        d2 = dout.reshape(-1, N)
        dy += d2 @ _bw_dequantize(packed[i], w_scale[i], K, d2.dtype)
        dbiases.append(d2.sum(0).to(ctx.bias_dtypes[i]) if ctx.bias_dtypes else None)
    dy = dy.reshape(x.shape)
    dnorm = None
    if ctx.normalize:
        dx, dg = ref.rms_norm_backward(dy, x, norm_weight, rstd, ctx.offset, ctx.cast_before_weight)
        dnorm = None if norm_weight is None else dg.to(norm_weight.dtype)
    else:
        dx = dy.to(x.dtype)
    none = [None] * ctx.n  # the packed weights and their scales are frozen
    # No gradient for the scalar arguments: one None for each the call passed (the dispatcher
    # leaves out a trailing argument at its default, ``bits``; needs_input_grad has the call's shape).
    return (dx, dnorm, none, none, dbiases if ctx.bias_dtypes else []) + (None,) * (len(ctx.needs_input_grad) - 5)


torch.library.register_autograd(
    "bitfx::ternary_linear_group", _ternary_group_backward, setup_context=_ternary_group_setup_context
)


def bitlinear(
    x: Tensor,
    norm_weight: Optional[Tensor],
    weight: Tensor,
    bias: Optional[Tensor] = None,
    eps: float = 1e-6,
    *,
    offset: bool = False,
    cast_before_weight: bool = True,
    norm_dtype: Optional[torch.dtype] = None,
    per_channel: bool = False,
) -> Tensor:
    """The BitLinear layer as a function: ``out[..., N]`` in the norm's dtype, differentiable
    (straight-through estimator) with respect to ``x``, ``norm_weight``, ``weight`` and ``bias``."""
    if norm_dtype is None:
        norm_dtype = ref.norm_dtype_for(x.dtype, None if norm_weight is None else norm_weight.dtype, cast_before_weight)
    return bitlinear_full(x, norm_weight, weight, bias, eps, offset, cast_before_weight, norm_dtype, per_channel)[0]
