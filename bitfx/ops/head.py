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

import torch

from bitfx import reference as ref
from bitfx.ops.library import check_int8_linear, check_linear_weight, kernels, register, register_autograd


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
    return ref.int8_linear(x, qweight, scale, bias)


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
