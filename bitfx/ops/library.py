"""The ``bitfx::`` operator library: the catalogue of schemas, the one registration helper, and
the input checks every implementation shares.

Every op is defined here, in :data:`SCHEMAS`, and implemented in :mod:`bitfx.ops.inference`
or :mod:`bitfx.ops.training` with :func:`register`: one implementation per dispatch key
(``"reference"``: the plain-torch reference, which runs on the CPU and on any device without a
kernel of its own; ``"cuda"``: the Triton kernels; ``"composite"``: plain torch that
AOTAutograd decomposes, so Inductor fuses it), a fake implementation for ``torch.compile``
(symbolic shapes), and, for the differentiable ops, an autograd formula.

Checks: the fake implementation runs the op's whole check (once, when a graph is traced); the
reference runs it on every call (it is the specification, not a fast path); a CUDA
implementation runs a cheap guard on shapes and dtypes (no read of device memory) and falls
back on the whole check, for its message, only when the guard fails. Packed codes are checked
when a weight is packed or loaded (``BitfxLinear``), never per call.
"""

from __future__ import annotations

import functools
import importlib
from typing import Callable, Optional

import torch
from torch import Tensor

from bitfx.kernels._utils import on_input_device
from bitfx.layout import FLOAT_DTYPES, packed_k

__all__ = ["LIB", "SCHEMAS", "register", "kernels", "rows", "unit_rows", "dtype_name"]

LIB = torch.library.Library("bitfx", "FRAGMENT")

# The catalogue: every bitfx op, its schema and what it computes (``...`` any leading dims,
# ``Kq = packed_k(K)``, ``ΣN`` the rows of weights stacked along N).
SCHEMAS = {
    # RMSNorm + per-token quantization: x[..., K] -> (q int8[..., K], x_scale f32[...])
    "norm_quant": "(Tensor x, Tensor? weight, float eps, bool offset, bool cast_before_weight, "
                  "ScalarType norm_dtype, SymInt bits=8) -> (Tensor, Tensor)",
    # the residual add before a pre-norm site, then norm_quant of the sum: a, b [..., K] (one
    # float dtype) -> (h = a + b, q int8[..., K], x_scale f32[...])
    "add_norm_quant": "(Tensor a, Tensor b, Tensor? weight, float eps, bool offset, bool cast_before_weight, "
                      "ScalarType norm_dtype, SymInt bits=8) -> (Tensor, Tensor, Tensor)",
    # a gated MLP's activation (act: "silu" or "relu2", as eager torch computes it), then
    # norm_quant (normalize) or act_quant of it: gate, up [..., K] (one float dtype) -> (q, x_scale)
    "glu_quant": "(Tensor gate, Tensor up, str act, Tensor? weight, float eps, bool offset, bool cast_before_weight, "
                 "ScalarType norm_dtype, bool normalize, SymInt bits=8) -> (Tensor, Tensor)",
    # per-token quantization alone: y[..., K] -> (q, x_scale)
    "act_quant": "(Tensor y, SymInt bits=8) -> (Tensor, Tensor)",
    # absmean ternary + 2-bit packing: w[N, K] -> (packed u8[N, Kq], w_scale f32[N])
    "weight_quant": "(Tensor w, bool per_channel) -> (Tensor, Tensor)",
    # q @ t^T exact in int32, then / x_scale / w_scale + bias: -> out[..., N]
    "ternary_matmul": "(Tensor q, Tensor x_scale, Tensor packed, Tensor w_scale, Tensor? bias, "
                      "ScalarType out_dtype, SymInt in_features) -> Tensor",
    # the whole ternary linear of x: norm (or not) + quantization + matmul, one kernel for few
    # rows on CUDA (what the backend's inference graphs run per site): -> out[..., N]
    "ternary_linear": "(Tensor x, Tensor? norm_weight, float eps, bool offset, bool cast_before_weight, "
                      "ScalarType norm_dtype, bool normalize, SymInt bits, Tensor packed, Tensor w_scale, "
                      "Tensor? bias, ScalarType out_dtype, SymInt in_features) -> Tensor",
    # t / w_scale as a dense [N, K] matrix; validate_codes=False: the codes trusted (checked when
    # packed), no pass over them on the CPU (the training backward)
    "dequantize": "(Tensor packed, Tensor w_scale, SymInt K, ScalarType dtype, bool validate_codes=True) -> Tensor",
    # frozen packed weights a gradient passes through: -> ([out_i[..., N_i]], q, x_scale, rstd)
    "ternary_linear_group": "(Tensor x, Tensor? norm_weight, Tensor[] packed, Tensor[] w_scale, Tensor[] biases, "
                            "SymInt in_features, float eps, bool offset, bool cast_before_weight, "
                            "ScalarType norm_dtype, bool normalize, ScalarType out_dtype, SymInt bits=8) "
                            "-> (Tensor[], Tensor, Tensor, Tensor)",
    # weight_quant of each weight (same K), stacked along N: -> (packed u8[ΣN, Kq], w_scale f32[ΣN])
    "weight_quant_stacked": "(Tensor[] weights, bool[] per_channel) -> (Tensor, Tensor)",
    # several such stacks at once (stacks: how many weights each takes; K may differ between
    # stacks): -> (packed u8[total bytes], w_scale f32[total rows]), each stack at
    # bitfx.layout.stack_offsets's places
    "weight_quant_stacks": "(Tensor[] weights, bool[] per_channel, int[] stacks) -> (Tensor, Tensor)",
    # training: norm (+) quantization, one matmul against the stack, STE backward to the weights
    # -> (out[..., ΣN], q, x_scale, rstd)
    "bitlinear_stacked": "(Tensor x, Tensor? norm_weight, Tensor[] weights, Tensor packed, Tensor w_scale, "
                         "Tensor? bias, float eps, bool offset, bool cast_before_weight, ScalarType norm_dtype, "
                         "bool normalize=True, bool fp8_backward=False) -> (Tensor, Tensor, Tensor, Tensor)",
    # torch.cat(parts, dim) that Inductor lowers as one buffer the parts' producers write into
    # (never a fused pointwise cat): the gradient of a stacked output's split, built by
    # bitfx.passes.post_grad in a compiled backward -> out (parts' dtype)
    "concat_buffer": "(Tensor[] parts, int dim) -> Tensor",
    # the int8 output head (BitfxConfig(head="int8")): per-row symmetric int8 codes of a float
    # weight: w[N, K] -> (qweight i8[N, K], scale f32[N]), W ~= qweight * scale
    "int8_rows": "(Tensor w) -> (Tensor, Tensor)",
    # x (float, not quantized) @ (qweight * scale)^T + bias, fp32 accumulation: -> out[..., N]
    "int8_linear": "(Tensor x, Tensor qweight, Tensor scale, Tensor? bias) -> Tensor",
    # one query per head against a key/value cache, grouped heads read where they lie:
    # q[B, Hq, 1, D], k, v[B, Hk, L, D], mask (bool: keep, or float: added) broadcast to
    # [B, Hq, 1, L] -> softmax(scale q k^T + mask) v [B, Hq, 1, D]
    "decode_attention": "(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale) -> Tensor",
}

for _name, _schema in SCHEMAS.items():
    LIB.define(_name + _schema)

_KEYS = {"reference": "CompositeExplicitAutograd", "composite": "CompositeImplicitAutograd", "cuda": "CUDA"}


def register(name: str, key: str) -> Callable:
    """Decorator: ``fn`` as the implementation of ``bitfx::name`` for ``key`` (``"reference"``,
    ``"composite"``, ``"cuda"``, ``"fake"``). A ``"cuda"`` implementation runs on its inputs'
    device (:func:`bitfx.kernels._utils.on_input_device`)."""
    if name not in SCHEMAS:
        raise KeyError(f"bitfx: no op {name!r} in the catalogue")

    def add(fn: Callable) -> Callable:
        if key == "fake":
            torch.library.register_fake(f"bitfx::{name}", fn, lib=LIB)
        elif key == "cuda":  # Triton launches on the current device: make it the inputs'
            LIB.impl(name, on_input_device(fn), _KEYS[key])
        elif key == "reference":
            LIB.impl(name, _contiguous_outputs(fn), _KEYS[key])
        else:
            LIB.impl(name, fn, _KEYS[key])
        return fn

    return add


def _contiguous_outputs(fn: Callable) -> Callable:
    """``fn`` with every tensor it returns made contiguous. The fake implementations and the
    kernels give fresh contiguous outputs; torch's elementwise ops in a reference would instead
    carry a permuted input's layout into its codes and scales, and a compiled graph planned with
    the fake's strides stops on the mismatch (Inductor checks each custom op's output strides)."""

    def contiguous(out):
        if isinstance(out, Tensor):
            return out.contiguous()
        if isinstance(out, (tuple, list)):
            return type(out)(contiguous(o) for o in out)
        return out

    @functools.wraps(fn)
    def impl(*args, **kwargs):
        return contiguous(fn(*args, **kwargs))

    return impl


def register_autograd(name: str, backward: Callable, setup_context: Callable) -> None:
    """The autograd formula of ``bitfx::name``."""
    torch.library.register_autograd(f"bitfx::{name}", backward, setup_context=setup_context, lib=LIB)


_KERNEL_MODULES: dict = {}


def kernels(name: str):
    """``bitfx.kernels.<name>``, imported when a CUDA kernel first runs (Triton stays unimported otherwise)."""
    module = _KERNEL_MODULES.get(name)
    if module is None:
        module = _KERNEL_MODULES[name] = importlib.import_module(f"bitfx.kernels.{name}")
    return module


def rows(t: Tensor) -> Tensor:
    """``t [..., K]`` as ``[M, K]``."""
    return t.reshape(-1, t.shape[-1])


def unit_rows(t: Tensor) -> Tensor:
    """``t [..., K]`` as ``[M, K]`` rows with a contiguous last dimension (copied if it has none):
    what a kernel reading rows by a row stride takes."""
    t2 = rows(t)
    if t2.shape[-1] > 1 and t2.stride(-1) != 1:
        t2 = t2.contiguous()
    return t2


def dtype_name(d: torch.dtype) -> str:
    return str(d).replace("torch.", "")


# ---------------------------------------------------------------- checks


def check_float(op: str, what: str, t: Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"bitfx.{op}: {what} must be float32, float16 or bfloat16, got {dtype_name(t.dtype)}")


def check_float_dtype(op: str, what: str, dtype: torch.dtype) -> None:
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"bitfx.{op}: {what} must be a float dtype, got {dtype}")


def check_same_device(op: str, *tensors: Optional[Tensor]) -> None:
    present = [t for t in tensors if t is not None]
    for t in present[1:]:
        if t.device != present[0].device:
            raise ValueError(f"bitfx.{op}: all tensors must be on one device, got {present[0].device} and {t.device}")


def check_norm_args(op: str, x: Tensor, weight: Optional[Tensor], norm_dtype: torch.dtype) -> None:
    """``x [..., K]`` float with at least one dimension, ``weight [K]`` float or None, a float ``norm_dtype``."""
    check_float(op, "input", x)
    if x.dim() < 1:
        raise ValueError(f"bitfx.{op}: input must have at least one dimension (the features), got a 0-D tensor")
    if weight is not None:
        check_float(op, "norm weight", weight)
        if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
            raise ValueError(
                f"bitfx.{op}: norm weight has shape {tuple(weight.shape)} but the input has "
                f"K={x.shape[-1]} features (last dimension); expected ({x.shape[-1]},)"
            )
    check_float_dtype(op, "norm_dtype", norm_dtype)
    check_same_device(op, x, weight)


def check_normalize(op: str, norm_weight: Optional[Tensor], normalize: bool) -> None:
    if not normalize and norm_weight is not None:
        raise ValueError(f"bitfx.{op}: a norm weight was given but normalize=False; pass None")


def check_linear_weight(op: str, w: Tensor) -> None:
    check_float(op, "linear weight", w)
    if w.dim() != 2:
        raise ValueError(f"bitfx.{op}: linear weight must be 2-D [N, K], got shape {tuple(w.shape)}")


# The widest attention head ``decode_attention`` takes (its kernel holds a query row and a block
# of keys in registers).
MAX_HEAD_DIM = 256


def check_decode_attention(op: str, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor]) -> int:
    """The arguments of ``decode_attention`` (:data:`SCHEMAS`); returns the group, query heads
    per key/value head."""
    for what, t in (("query", q), ("key", k), ("value", v)):
        check_float(op, what, t)
        if t.dim() != 4:
            raise ValueError(f"bitfx.{op}: {what} must be 4-D [batch, heads, length, head_dim], got shape "
                             f"{tuple(t.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"bitfx.{op}: query, key and value must share a dtype, got {dtype_name(q.dtype)}, "
                        f"{dtype_name(k.dtype)} and {dtype_name(v.dtype)}")
    B, Hq, S, D = q.shape
    torch._check_with(ValueError, S == 1, lambda: f"bitfx.{op}: one query per head (length 1), got length {S}")
    if tuple(k.shape) != tuple(v.shape) or k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"bitfx.{op}: key {tuple(k.shape)} and value {tuple(v.shape)} must both be "
                         f"[{B}, heads, length, {D}] for the query {tuple(q.shape)}")
    Hk = k.shape[1]
    if Hk == 0 or Hq % Hk != 0:
        raise ValueError(f"bitfx.{op}: {Hq} query heads are not a multiple of {Hk} key/value heads")
    if not 0 < D <= MAX_HEAD_DIM:
        raise ValueError(f"bitfx.{op}: head_dim {D} outside 1..{MAX_HEAD_DIM}")
    if mask is not None:
        if mask.dtype != torch.bool:
            check_float(op, "attention mask", mask)
        try:
            torch.broadcast_shapes(tuple(mask.shape), (B, Hq, 1, k.shape[2]))
        except RuntimeError:
            raise ValueError(f"bitfx.{op}: attention mask of shape {tuple(mask.shape)} does not broadcast to "
                             f"[{B}, {Hq}, 1, {k.shape[2]}]") from None
    check_same_device(op, q, k, v, mask)
    return Hq // Hk


def check_packed_weight(op: str, packed: Tensor, w_scale: Tensor, bias: Optional[Tensor], in_features) -> None:
    """A packed weight ``[N, packed_k(in_features)]`` uint8, its scale fp32 ``[N]``, a float bias ``[N]`` or None."""
    if packed.dtype != torch.uint8:
        raise TypeError(
            f"bitfx.{op}: packed ternary weight must be uint8 (from bitfx weight_quant), got {dtype_name(packed.dtype)}"
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
        raise TypeError(f"bitfx.{op}: weight scale must be float32, got {dtype_name(w_scale.dtype)}")
    if w_scale.dim() != 1 or w_scale.shape[0] != N:
        raise ValueError(f"bitfx.{op}: weight scale has shape {tuple(w_scale.shape)}, expected ({N},)")
    check_bias(op, bias, N)


def check_bias(op: str, bias: Optional[Tensor], N) -> None:
    """A float bias ``[N]``, or None."""
    if bias is not None:
        check_float(op, "bias", bias)
        if bias.dim() != 1 or bias.shape[0] != N:
            raise ValueError(f"bitfx.{op}: bias has shape {tuple(bias.shape)}, expected ({N},)")


def check_int8_linear(op: str, x: Tensor, qweight: Tensor, scale: Tensor, bias: Optional[Tensor]) -> None:
    """``x [..., K]`` float, ``qweight`` int8 ``[N, K]``, ``scale`` fp32 ``[N]``, ``bias`` float ``[N]`` or None
    (the int8 head's operands)."""
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
    check_bias(op, bias, N)
    check_same_device(op, x, qweight, scale, bias)


def check_in_features(op: str, x: Tensor, in_features) -> None:
    K = x.shape[-1]
    torch._check_with(
        ValueError,
        K == in_features,
        lambda: f"bitfx.{op}: the activations have K={K} features (last dimension) but the weight was "
        f"packed for in_features={in_features}",
    )


def check_codes(op: str, q: Tensor, x_scale: Tensor) -> None:
    """Activation codes ``q int8 [..., K]`` and their scales ``x_scale f32 [...]``."""
    if q.dtype != torch.int8:
        raise TypeError(f"bitfx.{op}: activation codes must be int8, got {dtype_name(q.dtype)}")
    if q.dim() < 1:
        raise ValueError(f"bitfx.{op}: activation codes must have at least one dimension (the features), got 0-D")
    if x_scale.dtype != torch.float32:
        raise TypeError(f"bitfx.{op}: activation scale must be float32, got {dtype_name(x_scale.dtype)}")
    if tuple(x_scale.shape) != tuple(q.shape[:-1]):
        raise ValueError(f"bitfx.{op}: activation scale has shape {tuple(x_scale.shape)}, expected {tuple(q.shape[:-1])}")


def bias_list(biases: list, n: int) -> list:
    """One optional bias per weight from a list holding one per weight or none at all (a list of
    optional tensors would hide the biases from autograd: ops flatten only lists of tensors)."""
    return list(biases) if biases else [None] * n
