"""The ops a gradient passes through: ``weight_quant_stacked`` and ``bitlinear_stacked`` (what
the backend emits in training graphs), ``ternary_linear_group`` (frozen packed weights of a
``bitfx.quantize``d model, in grad mode), and :func:`bitlinear`, the BitLinear layer as a function.

The backward is the straight-through estimator, written in plain torch but for the weight's
dequantization: under ``torch.compile`` AOTAutograd traces it into the backward graph, where
Inductor fuses the activations' dequantization into the kernels around the matmuls and the norm's
backward (:func:`bitfx.reference.rms_norm_backward`) into one reduction; run eagerly it computes
the same numbers. The packed weight is dequantized by ``bitfx::dequantize`` (its codes unchecked:
they were checked when packed): one node of the backward graph rather than a chain of shifts,
masks and casts per 2-bit plane, each of which Inductor would trace and compile. On CUDA it is a
Triton kernel; on the CPU the reference runs eagerly, no longer fused by Inductor (BENCHMARKS.md
weighs the compile time saved against that). Double backward (``create_graph=True``) is refused:
the second derivative of a straight-through estimator is not defined by it.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional

import torch
from torch import Tensor

from bitfx import reference as ref
from bitfx.layout import CODE_OFFSET, FLOAT_DTYPES, PLANES, SCALE_FLOOR, packed_k, stack_offsets, stack_rows
import bitfx.ops.fp8 as fp8
from bitfx.ops.inference import _linear_guard, cuda_front, ref_front
from bitfx.ops.library import (bias_list, check_float_dtype, check_in_features, check_linear_weight, check_norm_args,
                               check_normalize, check_packed_weight, check_same_device, kernels, register,
                               register_autograd, unit_rows)

__all__ = ["bitlinear"]


# ---------------------------------------------------------------- shared backward pieces


def _no_double_backward(op: str) -> None:
    # The autograd engine runs a backward in grad mode only under create_graph=True.
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"bitfx.{op}: double backward (create_graph=True) is not supported: the straight-through "
            f"estimator defines first derivatives only"
        )


def _act_dequant(q: Tensor, x_scale: Tensor, dtype: torch.dtype) -> Tensor:
    """``(q / s_x).to(dtype)``: the activations the forward's matmul used."""
    return (q.float() / x_scale.float().unsqueeze(-1)).to(dtype)


def _dequantize(packed: Tensor, w_scale: Tensor, K: int, dtype: torch.dtype) -> Tensor:
    """``(t / s_w).to(dtype) [N, K]`` (the codes unchecked: they were checked when packed)."""
    return torch.ops.bitfx.dequantize(packed, w_scale, K, dtype, validate_codes=False)


def _norm_tail(dy: Tensor, x: Optional[Tensor], norm_weight: Optional[Tensor], rstd: Tensor, offset: bool,
               cast_before_weight: bool, normalize: bool, x_shape, x_dtype) -> tuple[Tensor, Optional[Tensor]]:
    """``(dx, dnorm_weight)`` from the gradient ``dy`` reaching the norm's output: the norm's
    backward (``normalize``), else ``dy`` itself is the input's gradient."""
    if not normalize:
        return dy.reshape(x_shape).to(x_dtype), None
    dx, dg = ref.rms_norm_backward(dy.reshape(x_shape), x, norm_weight, rstd, offset, cast_before_weight)
    return dx, None if norm_weight is None else dg.to(norm_weight.dtype)


def _front_outputs(x: Tensor, q: Tensor, x_scale: Tensor, rstd: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """The CUDA front's row outputs in ``x``'s leading shape (``rstd`` zeros without a norm)."""
    lead = x.shape[:-1]
    rstd = x.new_zeros(lead, dtype=torch.float32) if rstd is None else rstd.view(lead)
    return q.view(x.shape), x_scale.view(lead), rstd


def _fake_front(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    lead = x.shape[:-1]
    return (x.new_empty(x.shape, dtype=torch.int8), x.new_empty(lead, dtype=torch.float32),
            x.new_empty(lead, dtype=torch.float32))


# ---------------------------------------------------------------- weight_quant_stacked


def _check_stack_weights(op: str, weights: list[Tensor], per_channel: list[bool]) -> None:
    if len(weights) == 0:
        raise ValueError(f"bitfx.{op}: needs at least one linear weight")
    if len(per_channel) != len(weights):
        raise ValueError(f"bitfx.{op}: {len(weights)} weights but {len(per_channel)} per_channel flags")
    for w in weights:
        check_linear_weight(op, w)
        if w.shape[1] != weights[0].shape[1]:
            raise ValueError(
                f"bitfx.{op}: the weights must share K (in_features) to be stacked, got "
                f"{[tuple(v.shape) for v in weights]}"
            )
    check_same_device(op, *weights)


@register("weight_quant_stacked", "reference")
def _(weights: list[Tensor], per_channel: list[bool]) -> tuple[Tensor, Tensor]:
    """``weight_quant`` of each weight, stacked along N: ``(packed u8[sum N_i, Kq], w_scale
    f32[sum N_i])``, each block with its own scale (per tensor or per channel); no gradient (the
    straight-through gradient reaches the weights through ``bitlinear_stacked``).

    An opaque op in a compiled graph, not a composite that AOTAutograd traces for Inductor to
    fuse: traced, its few dozen nodes per site made the forward's compile 13 s longer at the
    350M shape on an H100 (36.6 s against 20.3 s for an 8-layer model on the CPU). One call per
    site cost that step 5 ms of host time (0.86x bf16 against 0.91x, BENCHMARKS.md): the sites
    whose weights are the graph's parameters are merged into one ``weight_quant_stacks``
    (:func:`bitfx.passes.rewrite.pack_once`); this op stays for weights the graph computes. On
    CUDA it is two cached Triton launches per weight
    (:func:`bitfx.kernels.weight_pack.weight_quant_stacked`).

    Here, plain torch: one row reduction and one packing over the whole stack. The group means
    and reciprocals are computed in fp64 and rounded once to fp32: correctly rounded, as the
    reference's fp32 division and the Triton kernels' ``div_rn`` are, whatever the compiler
    does with an fp32 division (double rounding is innocuous for 53 >= 2 * 24 + 2 bits). The
    sum of ``|w|`` is taken per row, then per weight: its fp32 order may differ from the
    reference's (a few ulps of the scale); the codes are exactly those of the scale."""
    _check_stack_weights("weight_quant_stacked", weights, per_channel)
    return _stack_reference(weights, per_channel)


def _stack_reference(weights: list[Tensor], per_channel: list[bool]) -> tuple[Tensor, Tensor]:
    """``weight_quant_stacked``'s plain-torch body (its docstring), for checked arguments."""
    parts = [w.detach().float() for w in weights]
    wf = torch.cat(parts) if len(parts) > 1 else parts[0]
    N, K = wf.shape
    a = wf.abs()
    row_sum = a.sum(dim=1)
    # A group holds NaN or Inf exactly where its largest |w| is not finite (max propagates NaN):
    # one test on the groups' maxima, not an all() over every element per group (fewer nodes).
    row_max = a.amax(dim=1)
    means, maxima, at = [], [], 0
    for w, pc in zip(weights, per_channel):
        n = w.shape[0]
        if pc:
            means.append(row_sum[at:at + n].double() / K)
            maxima.append(row_max[at:at + n])
        else:
            means.append(row_sum[at:at + n].sum(0, keepdim=True).double() / (n * K))
            maxima.append(row_max[at:at + n].amax(0, keepdim=True))
        at += n
    mean = (torch.cat(means) if len(means) > 1 else means[0]).float()
    group_max = torch.cat(maxima) if len(maxima) > 1 else maxima[0]
    group_scale = (1.0 / mean.clamp(min=SCALE_FLOOR).double()).float()
    group_scale = torch.where(torch.isfinite(group_max), group_scale, float("nan"))
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


@register("weight_quant_stacked", "cuda")
def _(weights: list[Tensor], per_channel: list[bool]) -> tuple[Tensor, Tensor]:
    _check_stack_weights("weight_quant_stacked", weights, per_channel)  # shapes, dtypes, devices: no device read
    return kernels("weight_pack").weight_quant_stacked(weights, per_channel)


@register("weight_quant_stacked", "fake")
def _(weights: list[Tensor], per_channel: list[bool]) -> tuple[Tensor, Tensor]:
    _check_stack_weights("weight_quant_stacked", weights, per_channel)
    n = sum(w.shape[0] for w in weights)
    K = weights[0].shape[1]
    w = weights[0]
    return w.new_empty((n, packed_k(K)), dtype=torch.uint8), w.new_empty((n,), dtype=torch.float32)


def _weight_quant_stacked_setup(ctx, inputs, output) -> None:
    ctx.weights, ctx.inputs = len(inputs[0]), len(inputs)
    ctx.mark_non_differentiable(*output)


def _weight_quant_stacked_backward(ctx, d_packed, d_scale):
    # Codes and scales carry no gradient (marked non-differentiable): nothing reaches the weights here.
    return ([None] * ctx.weights,) + (None,) * (ctx.inputs - 1)


register_autograd("weight_quant_stacked", _weight_quant_stacked_backward, _weight_quant_stacked_setup)


# ---------------------------------------------------------------- weight_quant_stacks


def _check_stacks(op: str, weights: list[Tensor], per_channel: list[bool], stacks: list[int]) -> None:
    if len(per_channel) != len(weights):
        raise ValueError(f"bitfx.{op}: {len(weights)} weights but {len(per_channel)} per_channel flags")
    if not stacks or any(n < 1 for n in stacks) or sum(stacks) != len(weights):
        raise ValueError(
            f"bitfx.{op}: stacks {list(stacks)} must be positive counts of weights adding up to the "
            f"{len(weights)} weights given"
        )
    at = 0
    for n in stacks:
        _check_stack_weights(op, weights[at:at + n], per_channel[at:at + n])
        at += n
    check_same_device(op, *weights)


@register("weight_quant_stacks", "reference")
def _(weights: list[Tensor], per_channel: list[bool], stacks: list[int]) -> tuple[Tensor, Tensor]:
    """``weight_quant_stacked`` of each stack (``stacks``: how many of the weights, in order,
    each takes; K may differ between stacks), in one pair of flat outputs: ``(packed u8[total
    bytes], w_scale f32[total rows])``, stack ``s``'s packed ``[rows_s, Kq_s]`` from byte
    ``offsets[s][0]`` and its scales from row ``offsets[s][1]`` (:func:`bitfx.layout.
    stack_offsets`). What the backend emits once per training graph for the weights it reads
    as parameters, where it would emit one ``weight_quant_stacked`` per site: one op call and
    on CUDA three launches (:func:`bitfx.kernels.weight_pack.weight_quant_stacks`) instead of
    one call and two launches per weight. No gradient, as ``weight_quant_stacked``."""
    _check_stacks("weight_quant_stacks", weights, per_channel, stacks)
    offsets, nbytes, nrows = stack_offsets(stack_rows(weights, stacks))
    device = weights[0].device
    packed = torch.empty(nbytes, dtype=torch.uint8, device=device)
    scale = torch.empty(nrows, dtype=torch.float32, device=device)
    at = 0
    for n, (byte0, row0) in zip(stacks, offsets):
        p, s = _stack_reference(weights[at:at + n], per_channel[at:at + n])
        packed[byte0:byte0 + p.numel()] = p.reshape(-1)
        scale[row0:row0 + s.numel()] = s
        at += n
    return packed, scale


@register("weight_quant_stacks", "cuda")
def _(weights: list[Tensor], per_channel: list[bool], stacks: list[int]) -> tuple[Tensor, Tensor]:
    _check_stacks("weight_quant_stacks", weights, per_channel, stacks)  # shapes, dtypes, devices: no device read
    return kernels("weight_pack").weight_quant_stacks(weights, per_channel, stacks)


@register("weight_quant_stacks", "fake")
def _(weights: list[Tensor], per_channel: list[bool], stacks: list[int]) -> tuple[Tensor, Tensor]:
    _check_stacks("weight_quant_stacks", weights, per_channel, stacks)
    _, nbytes, nrows = stack_offsets(stack_rows(weights, stacks))
    w = weights[0]
    return w.new_empty((nbytes,), dtype=torch.uint8), w.new_empty((nrows,), dtype=torch.float32)


register_autograd("weight_quant_stacks", _weight_quant_stacked_backward, _weight_quant_stacked_setup)


# ---------------------------------------------------------------- bitlinear_stacked


def _check_stacked(x, norm_weight, weights, packed, w_scale, bias, norm_dtype, normalize):
    op = "bitlinear_stacked"
    check_normalize(op, norm_weight, normalize)
    check_norm_args(op, x, norm_weight, norm_dtype)
    _check_stack_weights(op, weights, [False] * len(weights))
    K = x.shape[-1]
    if weights[0].shape[1] != K:
        raise ValueError(
            f"bitfx.{op}: linear weights have K={weights[0].shape[1]} input features but the input has "
            f"K={K} (last dimension)"
        )
    check_packed_weight(op, packed, w_scale, bias, K)
    n = sum(w.shape[0] for w in weights)
    if packed.shape[0] != n:
        raise ValueError(
            f"bitfx.{op}: the packed stack has {packed.shape[0]} rows but the weights have {n} "
            f"({[tuple(w.shape) for w in weights]}); pack them with weight_quant_stacked"
        )
    check_same_device(op, x, norm_weight, packed, w_scale, bias, weights[0])


@register("bitlinear_stacked", "reference")
def _(x, norm_weight, weights, packed, w_scale, bias, eps, offset, cast_before_weight, norm_dtype,
      normalize=True, fp8_backward=False):
    """RMSNorm (``normalize``; else none) -> int8 activation codes -> one exact ternary matmul
    against ``packed``/``w_scale`` (``weight_quant_stacked(weights)``: the linears' weights
    stacked along N) + ``bias`` (stacked, or None). ``out[..., rows of weight i]`` is the
    BitLinear of weight i to the last bit (for the same scale). ``weights`` are read only by
    the backward: ``dW = dout^T (q / s_x)`` split per weight, ``dy = dout (t / s_w)`` over the
    whole stack, then the norm's backward; no gradient reaches ``packed``/``w_scale``.
    ``fp8_backward``: those two matmuls in FP8 (:mod:`bitfx.ops.fp8`)."""
    _check_stacked(x, norm_weight, weights, packed, w_scale, bias, norm_dtype, normalize)
    q, x_scale, rstd = ref_front(x, norm_weight, eps, offset, cast_before_weight, norm_dtype, normalize)
    return ref.ternary_matmul(q, x_scale, packed, w_scale, bias, norm_dtype), q, x_scale, rstd


def _stacked_guard(x, norm_weight, weights, packed, w_scale, bias, norm_dtype, normalize) -> bool:
    """The cheap per-call guard of ``bitlinear_stacked`` on CUDA: every condition of
    :func:`_check_stacked` on shapes, dtypes and devices (no read of device memory). When it
    holds, the kernels launch without their launchers' own checks."""
    if not (weights and x.dim() >= 1
            and _linear_guard(x, norm_weight, norm_dtype, normalize, packed, w_scale, bias, norm_dtype, x.shape[-1])):
        return False
    K, device = x.shape[-1], x.device
    return ((norm_weight is None or norm_weight.dtype in FLOAT_DTYPES)
            and all(w.dim() == 2 and w.shape[1] == K and w.dtype in FLOAT_DTYPES and w.device == device
                    for w in weights)
            and sum(w.shape[0] for w in weights) == packed.shape[0])


# The forward's launch plans (:func:`stacked_forward`), by call signature, the most recent last.
_PLANS: OrderedDict = OrderedDict()
_PLANS_KEPT = 64


def _layout(t: Optional[Tensor]):
    """What a launch plan depends on in an operand besides its shape: dtype, strides, 16-byte alignment."""
    return None if t is None else (t.dtype, t.stride(), not t.data_ptr() & 15)


def stacked_forward(x2: Tensor, norm_weight: Optional[Tensor], packed: Tensor, w_scale: Tensor,
                    bias: Optional[Tensor], eps: float, offset: bool, cast_before_weight: bool,
                    norm_dtype: torch.dtype, normalize: bool) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """``bitlinear_stacked``'s forward on the Triton kernels: ``(out [M, ΣN], q [M, K], x_scale
    [M], rstd [M] or None)`` for rows ``x2 [M, K]`` with a contiguous last dimension and
    arguments the op's guard or check passed (the other operands in any strides).

    A training step calls the op once per site with arguments of the same signature every
    step, and the host time of the launches decides a step that small kernels make host-bound.
    So the first call of a signature resolves the launch rules and binds both kernels'
    compiled launchers (``bind``: :meth:`bitfx.kernels._launch.Launcher.bind`), and the next
    calls only allocate the outputs and launch. The signature is everything the launches
    depend on: the rows' shape, strides, dtype and 16-byte alignment, the norm weight's and the
    packed weight's, its scale's and the bias's layouts, the scalars, the device. A plan holds
    no tensor (``bind="operands"``): the weights are new tensors each step (views into one
    packed buffer), passed to each launch; a plan that held them would keep a step's packed
    weights alive. The plans of the last :data:`_PLANS_KEPT` signatures are kept."""
    nq, tm = kernels("norm_quant"), kernels("ternary_matmul")
    if norm_weight is not None and norm_weight.stride(0) != 1:
        norm_weight = norm_weight.contiguous()
    if packed.shape[1] > 1 and packed.stride(1) != 1:  # the kernels read rows of bytes
        packed = packed.contiguous()
    key = (x2.shape, _layout(x2), x2.device, _layout(norm_weight), packed.shape, _layout(packed), _layout(w_scale),
           _layout(bias), eps, offset, cast_before_weight, norm_dtype, normalize)
    plan = _PLANS.get(key)
    if plan is not None:
        front, matmul = plan
        q, x_scale, rstd = front(x2, norm_weight)
        return matmul(q, x_scale, packed, w_scale, bias), q, x_scale, rstd
    if normalize:
        q, x_scale, rstd, front = nq._launch_quant(x2, norm_weight, eps, offset, cast_before_weight, norm_dtype,
                                                   norm=True, bind="operands")
    else:  # act_quant's launch: no norm, the codes of x itself
        q, x_scale, rstd, front = nq._launch_quant(x2, None, 0.0, False, False, torch.float32, norm=False,
                                                   bind="operands")
    out, matmul = tm.run(q, x_scale, packed, w_scale, bias, norm_dtype, bind="operands")
    if front is not None and matmul is not None:
        _PLANS[key] = (front, matmul)
        while len(_PLANS) > _PLANS_KEPT:
            _PLANS.popitem(last=False)
    return out, q, x_scale, rstd


@register("bitlinear_stacked", "cuda")
def _(x, norm_weight, weights, packed, w_scale, bias, eps, offset, cast_before_weight, norm_dtype,
      normalize=True, fp8_backward=False):
    if not _stacked_guard(x, norm_weight, weights, packed, w_scale, bias, norm_dtype, normalize):
        _check_stacked(x, norm_weight, weights, packed, w_scale, bias, norm_dtype, normalize)
    out, q, x_scale, rstd = stacked_forward(unit_rows(x), norm_weight, packed, w_scale, bias, float(eps), bool(offset),
                                            bool(cast_before_weight), norm_dtype, bool(normalize))
    return (out.view(*x.shape[:-1], packed.shape[0]), *_front_outputs(x, q, x_scale, rstd))


@register("bitlinear_stacked", "fake")
def _(x, norm_weight, weights, packed, w_scale, bias, eps, offset, cast_before_weight, norm_dtype,
      normalize=True, fp8_backward=False):
    _check_stacked(x, norm_weight, weights, packed, w_scale, bias, norm_dtype, normalize)
    return (x.new_empty((*x.shape[:-1], packed.shape[0]), dtype=norm_dtype), *_fake_front(x))


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
    _no_double_backward("bitlinear_stacked")
    x, norm_weight, q, x_scale, rstd, packed, w_scale = ctx.saved_tensors
    x_shape, x_dtype = ctx.x_meta
    K = x_shape[-1]
    d2 = dout.reshape(-1, packed.shape[0])
    M = d2.shape[0]
    dtypes = set(ctx.weight_dtypes)
    if ctx.fp8:
        dy = fp8.input_grad([d2], [ref.unpacked_codes(packed, K)], [w_scale], torch.float32)
        acts_t8, acts_scale = fp8.round_rows(_act_dequant(q.reshape(M, K), x_scale.reshape(M), torch.float32).t())
        dw = fp8.weight_grad(d2, acts_t8, acts_scale, dtypes.pop() if len(dtypes) == 1 else torch.float32)
    else:
        # Both in the gradient's dtype (bf16 tensor cores in bf16 training), accumulated in
        # fp32 inside each matmul: the input gradient is rounded once, over the whole stack.
        dw = d2.t() @ _act_dequant(q.reshape(M, K), x_scale.reshape(M), d2.dtype)
        dy = d2 @ _dequantize(packed, w_scale, K, d2.dtype)
    dweights = [part.to(dt) for part, dt in zip(torch.split(dw, ctx.sizes, 0), ctx.weight_dtypes)]
    dbias = None if ctx.bias_dtype is None else d2.sum(0).to(ctx.bias_dtype)
    dx, dnorm = _norm_tail(dy, x, norm_weight, rstd, ctx.offset, ctx.cast_before_weight, ctx.normalize, x_shape,
                           x_dtype)
    return (dx, dnorm, dweights, None, None, dbias) + (None,) * (len(ctx.needs_input_grad) - 6)


register_autograd("bitlinear_stacked", _stacked_backward, _stacked_setup_context)


# ---------------------------------------------------------------- concat_buffer (a stacked output's gradient)


def _check_concat(parts: list[Tensor], dim: int) -> None:
    op = "concat_buffer"
    if len(parts) == 0:
        raise ValueError(f"bitfx.{op}: needs at least one tensor to concatenate")
    dtypes = {p.dtype for p in parts}
    if len(dtypes) != 1:
        raise TypeError(f"bitfx.{op}: the parts must share one dtype (no promotion), got {sorted(map(str, dtypes))}")
    check_same_device(op, *parts)
    rank = parts[0].dim()
    if not -rank <= dim < rank:
        raise IndexError(f"bitfx.{op}: dim {dim} is out of range for parts of {rank} dimensions")
    d = dim % rank
    lead = [tuple(p.shape[:d]) + tuple(p.shape[d + 1:]) for p in parts]
    if any(p.dim() != rank for p in parts) or any(other != lead[0] for other in lead[1:]):
        raise ValueError(
            f"bitfx.{op}: the parts must agree on every dimension but {dim}, got {[tuple(p.shape) for p in parts]}"
        )


@register("concat_buffer", "reference")
def _(parts: list[Tensor], dim: int) -> Tensor:
    """``torch.cat(parts, dim)``. What the op adds is its Inductor lowering
    (:func:`bitfx.ops.lowering.register_concat_buffer`): one buffer that each part's producer
    writes its slice of, where Inductor's ``aten.cat`` of computed parts is one pointwise kernel
    evaluating every part's computation under masks over the whole output."""
    _check_concat(parts, dim)
    return torch.cat(parts, dim)


@register("concat_buffer", "fake")
def _(parts: list[Tensor], dim: int) -> Tensor:
    _check_concat(parts, dim)
    return torch.cat(parts, dim)


def _concat_setup_context(ctx, inputs, output) -> None:
    parts, dim = inputs
    ctx.dim, ctx.sizes = dim, [p.shape[dim] for p in parts]


def _concat_backward(ctx, grad):
    return list(torch.split(grad, ctx.sizes, ctx.dim)), None


register_autograd("concat_buffer", _concat_backward, _concat_setup_context)


# ---------------------------------------------------------------- ternary_linear_group (frozen packed weights)


def _check_ternary_group(x, norm_weight, packed, w_scale, biases, in_features, norm_dtype, normalize, out_dtype):
    op = "ternary_linear_group"
    check_norm_args(op, x, norm_weight, norm_dtype)
    check_normalize(op, norm_weight, normalize)
    if len(packed) == 0:
        raise ValueError(f"bitfx.{op}: needs at least one packed weight")
    if len(w_scale) != len(packed) or len(biases) not in (0, len(packed)):
        raise ValueError(
            f"bitfx.{op}: {len(packed)} packed weights but {len(w_scale)} weight scales and {len(biases)} "
            f"biases; give one scale per weight, and one bias per weight or none at all"
        )
    for p, s, b in zip(packed, w_scale, bias_list(biases, len(packed))):
        check_packed_weight(op, p, s, b, in_features)
    check_in_features(op, x, in_features)
    check_float_dtype(op, "out_dtype", out_dtype)
    check_same_device(op, x, norm_weight, *packed, *w_scale, *biases)


@register("ternary_linear_group", "reference")
def _(x, norm_weight, packed, w_scale, biases, in_features, eps, offset, cast_before_weight, norm_dtype, normalize,
      out_dtype, bits=8):
    """Frozen packed ternary weights that a gradient can pass through: ``(outs, q, x_scale, rstd)``.

    ``q, s_x`` = the front of ``x`` (norm + quantization if ``normalize``, else quantization
    alone; ``rstd`` zeros then); ``outs[i] = ternary_matmul(q, s_x, packed[i], w_scale[i],
    biases[i], out_dtype, in_features)``, bit for bit (the same kernels). ``biases``: one per
    weight, or empty. Backward (straight-through): ``dy = sum_i dout_i (t_i / s_w_i)``,
    ``dbias_i = sum over rows of dout_i``, then the norm's backward; the packed weights and
    their scales get no gradient."""
    _check_ternary_group(x, norm_weight, packed, w_scale, biases, in_features, norm_dtype, normalize, out_dtype)
    q, x_scale, rstd = ref_front(x, norm_weight, eps, offset, cast_before_weight, norm_dtype, normalize, bits)
    outs = [ref.ternary_matmul(q, x_scale, p, s, b, out_dtype)
            for p, s, b in zip(packed, w_scale, bias_list(biases, len(packed)))]
    return outs, q, x_scale, rstd


@register("ternary_linear_group", "cuda")
def _(x, norm_weight, packed, w_scale, biases, in_features, eps, offset, cast_before_weight, norm_dtype, normalize,
      out_dtype, bits=8):
    if not (x.dim() >= 1 and x.shape[-1] == in_features and len(packed) == len(w_scale)
            and len(biases) in (0, len(packed))
            and all(p.dim() == 2 and p.shape[1] == packed_k(in_features) and s.shape == p.shape[:1]
                    for p, s in zip(packed, w_scale))):
        _check_ternary_group(x, norm_weight, packed, w_scale, biases, in_features, norm_dtype, normalize, out_dtype)
    q, x_scale, rstd = cuda_front(x, norm_weight, eps, offset, cast_before_weight, norm_dtype, normalize, bits)
    tm = kernels("ternary_matmul")
    outs = [tm.ternary_matmul(q, x_scale, p, s, b, out_dtype).view(*x.shape[:-1], p.shape[0])
            for p, s, b in zip(packed, w_scale, bias_list(biases, len(packed)))]
    return (outs, *_front_outputs(x, q, x_scale, rstd))


@register("ternary_linear_group", "fake")
def _(x, norm_weight, packed, w_scale, biases, in_features, eps, offset, cast_before_weight, norm_dtype, normalize,
      out_dtype, bits=8):
    _check_ternary_group(x, norm_weight, packed, w_scale, biases, in_features, norm_dtype, normalize, out_dtype)
    return ([x.new_empty((*x.shape[:-1], p.shape[0]), dtype=out_dtype) for p in packed], *_fake_front(x))


def _ternary_group_setup_context(ctx, inputs, output):
    x, norm_weight, packed, w_scale, biases, in_features, eps, offset, cast_before_weight, norm_dtype, normalize = \
        inputs[:11]
    ctx.save_for_backward(x, norm_weight, output[3], *packed, *w_scale)
    ctx.n, ctx.K = len(packed), in_features
    ctx.offset, ctx.cast_before_weight, ctx.normalize = offset, cast_before_weight, normalize
    ctx.bias_dtypes = [b.dtype for b in biases]


def _ternary_group_backward(ctx, douts, *_unused):
    """Straight-through: ``dy = sum_i dout_i (t_i / s_w_i)`` (each product in dout's dtype, summed
    in fp32), ``dbias_i = sum over rows of dout_i``, then the norm's backward if there is a norm."""
    _no_double_backward("ternary_linear_group")
    x, norm_weight, rstd, *rest = ctx.saved_tensors
    packed, w_scale = rest[: ctx.n], rest[ctx.n:]
    K = ctx.K
    dy = torch.zeros((x.numel() // K, K), dtype=torch.float32, device=x.device)
    dbiases = []
    for i in range(ctx.n):
        if douts[i] is None:  # an output nothing used
            dbiases.append(None)
            continue
        d2 = douts[i].reshape(-1, packed[i].shape[0])
        dy += d2 @ _dequantize(packed[i], w_scale[i], K, d2.dtype)
        dbiases.append(d2.sum(0).to(ctx.bias_dtypes[i]) if ctx.bias_dtypes else None)
    dx, dnorm = _norm_tail(dy, x, norm_weight, rstd, ctx.offset, ctx.cast_before_weight, ctx.normalize, x.shape,
                           x.dtype)
    none = [None] * ctx.n  # the packed weights and their scales are frozen
    # No gradient for the scalar arguments: one None for each the call passed (the dispatcher
    # leaves out a trailing argument at its default, ``bits``; needs_input_grad has the call's shape).
    return (dx, dnorm, none, none, dbiases if ctx.bias_dtypes else []) + (None,) * (len(ctx.needs_input_grad) - 5)


register_autograd("ternary_linear_group", _ternary_group_backward, _ternary_group_setup_context)


# ---------------------------------------------------------------- bitlinear, the function


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
    """The BitLinear layer as a function: RMSNorm (weighted by ``norm_weight``; weightless when None),
    int8 activation codes, ternary weight, exact matmul; ``out[..., N]`` in the norm's dtype,
    differentiable (straight-through estimator) with respect to ``x``, ``norm_weight``,
    ``weight`` and ``bias``. The ops the backend emits in training: ``weight_quant_stacked``,
    then ``bitlinear_stacked``."""
    if norm_dtype is None:
        norm_dtype = ref.norm_dtype_for(x.dtype, None if norm_weight is None else norm_weight.dtype, cast_before_weight)
    packed, w_scale = torch.ops.bitfx.weight_quant_stacked([weight], [per_channel])
    return torch.ops.bitfx.bitlinear_stacked(x, norm_weight, [weight], packed, w_scale, bias, eps, offset,
                                             cast_before_weight, norm_dtype)[0]
