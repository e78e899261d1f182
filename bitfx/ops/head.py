"""The int8 output head's ops: ``int8_rows`` (a float weight to per-row int8 codes and scales)
and ``int8_linear`` (float activations times those codes), schemas in
:data:`bitfx.ops.library.SCHEMAS`.

``BitfxConfig(head="int8")`` gives the output head, which BitNet keeps in high precision, int8
weights with one fp32 scale per output row (the vocabulary's logits): half the bytes of a bf16
head, the largest single weight of a small model, read whole on every decode step. The
activations are not quantized, so the only change to the logits is the weight's rounding
(at most half a step, ``scale / 2``, per weight).

``int8_linear`` has an autograd formula for its input (a gradient passes through a frozen int8
head to the layers before it); the codes and scales are buffers, not trained.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from bitfx import reference as ref
from bitfx.ops.library import check_float, check_linear_weight, check_same_device, dtype_name, kernels, register, register_autograd

__all__ = ["check_int8_linear"]


def check_int8_linear(op: str, x: Tensor, qweight: Tensor, scale: Tensor, bias: Optional[Tensor]) -> None:
    """``x [..., K]`` float, ``qweight`` int8 ``[N, K]``, ``scale`` fp32 ``[N]``, ``bias`` float ``[N]`` or None."""
    check_float(op, "input", x)
    if x.dim() < 1:
        raise ValueError(f"bitfx.{op}: input must have at least one dimension (the features), got a 0-D tensor")
    if qweight.dtype != torch.int8:
        raise TypeError(f"bitfx.{op}: the weight codes must be int8 (from bitfx int8_rows), got {dtype_name(qweight.dtype)}")
    if qweight.dim() != 2:
        raise ValueError(f"bitfx.{op}: the weight codes must be 2-D [N, K], got shape {tuple(qweight.shape)}")
    N, K = qweight.shape
    torch._check_with(ValueError, x.shape[-1] == K,
                      lambda: f"bitfx.{op}: the input has K={x.shape[-1]} features (last dimension) but the weight "
                              f"has {K}")
    if scale.dtype != torch.float32:
        raise TypeError(f"bitfx.{op}: the weight scale must be float32, got {dtype_name(scale.dtype)}")
    if scale.dim() != 1 or scale.shape[0] != N:
        raise ValueError(f"bitfx.{op}: the weight scale has shape {tuple(scale.shape)}, expected ({N},)")
    if bias is not None:
        check_float(op, "bias", bias)
        if bias.dim() != 1 or bias.shape[0] != N:
            raise ValueError(f"bitfx.{op}: bias has shape {tuple(bias.shape)}, expected ({N},)")
    check_same_device(op, x, qweight, scale, bias)


# ---------------------------------------------------------------- int8_rows


@register("int8_rows", "reference")
def _(w):
    check_linear_weight("int8_rows", w)
    return ref.int8_rows(w)


@register("int8_rows", "fake")
def _(w):
    check_linear_weight("int8_rows", w)
    return w.new_empty(w.shape, dtype=torch.int8), w.new_empty(w.shape[:1], dtype=torch.float32)


# ---------------------------------------------------------------- int8_linear


@register("int8_linear", "reference")
def _(x, qweight, scale, bias):
    check_int8_linear("int8_linear", x, qweight, scale, bias)
    return ref.int8_linear_reference(x, qweight, scale, bias)


@register("int8_linear", "cuda")
def _(x, qweight, scale, bias):
    check_int8_linear("int8_linear", x, qweight, scale, bias)  # shapes and dtypes only: no device read
    return kernels("int8_gemv").int8_linear(x, qweight, scale, bias)


@register("int8_linear", "fake")
def _(x, qweight, scale, bias):
    check_int8_linear("int8_linear", x, qweight, scale, bias)
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


def _setup(ctx, inputs, output):
    x, qweight, scale, bias = inputs
    ctx.save_for_backward(qweight, scale)
    ctx.x_dtype = x.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad):
    qweight, scale = ctx.saved_tensors
    # d out / d x = qweight * scale: the head's dequantized weight, in fp32 as the forward sums
    grad_x = ((grad.float() * scale) @ qweight.float()).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
    grad_b = None
    if ctx.bias_dtype is not None and ctx.needs_input_grad[3]:
        grad_b = grad.reshape(-1, grad.shape[-1]).float().sum(0).to(ctx.bias_dtype)
    return grad_x, None, None, grad_b


register_autograd("int8_linear", _backward, _setup)
