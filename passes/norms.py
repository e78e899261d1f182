"""RMSNorm in any spelling, read from an FX graph.

* One node: ``torch.rms_norm`` / ``F.rms_norm`` (which ``nn.RMSNorm`` calls), ``aten.rms_norm``.
* A chain ``x' * rsqrt(mean(x'^2, -1, keepdim=True) + eps)`` with ``x' = x`` or ``x.float()``,
  ``x*x`` or ``pow(x, 2)``, ``rsqrt(v)``, ``1/sqrt(v)``, ``x/sqrt(v)``, optional casts before
  and after the weight, the weight on either side, ``1 + g`` (Gemma), or no weight.

The cast order read from the graph fixes the :class:`~bitfx.passes.records.NormSpec` (see
:func:`bitfx.reference.rms_norm`), so the fused norm reproduces the model's own bit for bit
where the model computes in fp32, and to a few ulps where it computes in fp16/bf16.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import fx

from bitfx import reference as ref
from bitfx.passes.fx_utils import (
    FLOATS, arg_of, const_of, dtype_of, is_cast, is_last_dim, is_row_op, is_scalar, kind_of, meta_val,
    other_operand, plain_binary, scalar_value, shape_of, sole_user, static_int, strip_upcasts,
)
from bitfx.passes.naming import module_fqn, module_type_name
from bitfx.passes.records import NO_MATCH, Miss, NormMatch, NormSpec, not_taken

__all__ = ["find_norms", "norm_module"]


@functools.cache
def _torch_rms_norm_casts_before_weight(device_type: str) -> bool:
    """Whether ``torch.rms_norm`` rounds ``r`` to the input dtype before the weight multiplies it.

    It did in older releases (a composite: ``(x * rstd).type_as(x) * weight``); newer ones
    apply the weight in fp32 (``_fused_rms_norm``; so torch 2.13 on CPU). Measured once per
    device type, in bf16, on 512 values.
    """
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily(), torch.no_grad():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(8, 64, generator=g).bfloat16().to(device_type)
        w = (1 + 0.5 * torch.randn(64, generator=g)).bfloat16().to(device_type)
        y = torch.rms_norm(x, (64,), w, 1e-6).cpu()
        x, w = x.cpu(), w.cpu()
        before = ref.rms_norm(x, w, 1e-6, cast_before_weight=True, norm_dtype=torch.bfloat16)
        after = ref.rms_norm(x, w, 1e-6, cast_before_weight=False, norm_dtype=torch.bfloat16)
        # The closer of the two (a kernel may also differ in the reduction order: an ulp here and there).
        return bool((y != before).sum() < (y != after).sum())


def _match_rms_norm_node(n: fx.Node) -> NormMatch | Miss:
    """``torch.rms_norm(x, (K,), weight, eps)``: one node."""
    x = n.args[0]
    shape = arg_of(n, 1, "normalized_shape")
    weight = arg_of(n, 2, "weight")
    eps = arg_of(n, 3, "eps")
    xs, dt = shape_of(x), dtype_of(x)
    if xs is None or dt is None or dtype_of(n) is None:
        return not_taken("no shape information (node.meta['val'])")
    K = static_int(xs[-1]) if xs else None
    if K is None:
        return not_taken("the normalized (last) dimension has no static size")
    shape = list(shape) if isinstance(shape, (list, tuple)) else [shape]
    if len(shape) != 1 or static_int(shape[0]) != K:
        return not_taken(f"normalizes over {len(shape)} trailing dimensions; only the last one can fuse")
    if dt not in FLOATS:
        return not_taken(f"input dtype {dt} is not float32, float16 or bfloat16")
    if eps is None:
        # torch takes finfo of the computation dtype (fp32 for fp16/bf16/fp32 inputs), not of x.dtype.
        eps = torch.finfo(torch.float32).eps
    if not is_scalar(eps):
        return not_taken("eps is not a number")
    eps = scalar_value(eps)
    device = getattr(meta_val(x), "device", None)
    device_type = device.type if device is not None and device.type in ("cpu", "cuda") else "cpu"
    if device_type == "cuda" and not torch.cuda.is_available():
        device_type = "cpu"
    spec = NormSpec(
        eps=eps, offset=False,
        cast_before_weight=_torch_rms_norm_casts_before_weight(device_type) if weight is not None else False,
        norm_dtype=dtype_of(n),
    )
    return NormMatch(n, x, weight, spec, [n], K, norm_module(n))



def _square_of(n: Any) -> Any:
    """``x`` when ``n`` is ``x**2``, ``x*x`` or ``square(x)``."""
    k = kind_of(n)
    if k == "pow" and len(n.args) >= 2 and const_of(n.args[1]) == 2.0:
        return n.args[0]
    if k == "mul" and len(n.args) >= 2 and n.args[0] is n.args[1] and isinstance(n.args[0], fx.Node):
        return n.args[0]
    if k == "square":
        return n.args[0]
    return None


def _match_rms_chain(mean: fx.Node) -> NormMatch | Miss:
    """Match the hand-written RMSNorm whose ``mean(x'^2, -1, keepdim=True)`` is ``mean``.

    A :class:`Miss`, falsy, when it is not (``candidate=False``) or is one bitfx cannot take
    (``candidate=True``, with the reason).
    """
    xp = _square_of(mean.args[0] if mean.args else None)
    if not isinstance(xp, fx.Node):
        return NO_MATCH
    xs = shape_of(xp)
    if xs is None or not xs:
        return NO_MATCH
    if not is_last_dim(arg_of(mean, 1, "dim"), len(xs)) or not arg_of(mean, 2, "keepdim", False):
        return NO_MATCH
    nodes = [mean.args[0], mean]
    # + eps
    add = next((u for u in mean.users if kind_of(u) == "add" and plain_binary(u) and is_scalar(other_operand(u, mean))), None)
    if add is None:
        return NO_MATCH
    eps = other_operand(add, mean)  # read (and, if symbolic, specialized) once the whole norm matches
    nodes.append(add)
    # r = x' * rsqrt(v)  |  x' * (1 / sqrt(v))  |  x' / sqrt(v)  |  x' * v ** -0.5
    r = None
    for u in add.users:
        k = kind_of(u)
        inv = None
        if k == "rsqrt" or (k == "pow" and u.args[0] is add and const_of(u.args[1]) == -0.5):
            inv = u
        elif k == "sqrt":
            for v in u.users:
                kv = kind_of(v)
                if kv == "div" and plain_binary(v) and v.args[0] is xp and v.args[1] is u:
                    r, nodes = v, nodes + [u, v]
                    break
                if (kv == "reciprocal" or (kv == "div" and plain_binary(v) and const_of(v.args[0]) == 1.0 and v.args[1] is u)):
                    inv, nodes = v, nodes + [u]
                    break
        if r is not None:
            break
        if inv is not None:
            one = sole_user(inv)  # aten spells 1 / s as reciprocal(s) * 1.0
            if one is not None and kind_of(one) == "mul" and plain_binary(one) and const_of(other_operand(one, inv)) == 1.0:
                nodes.append(inv)
                inv = one
            m = next((v for v in inv.users if kind_of(v) == "mul" and plain_binary(v) and other_operand(v, inv) is xp), None)
            if m is not None:
                r, nodes = m, nodes + [inv, m]
                break
    if r is None:
        return NO_MATCH
    x = strip_upcasts(xp)
    if xp is not x:
        nodes.insert(0, xp)
    src = xp
    while is_cast(src):
        src = src.args[0]
    if dtype_of(src) is not None and not dtype_of(src).is_floating_point:
        return not_taken(f"it normalizes a {str(dtype_of(src)).removeprefix('torch.')} tensor ({src.name}), "
                         f"cast to float: integers where features belong", culprit=src)
    K = static_int(xs[-1])
    x_dtype = dtype_of(x)
    if K is None:
        return not_taken("the normalized (last) dimension has no static size")
    if x_dtype not in FLOATS:
        return not_taken(f"input dtype {x_dtype} is not float32, float16 or bfloat16")

    # Optional cast, weight multiply (g, g.float(), 1 + g), optional cast: the norm's tail.
    out = r
    pre_cast = None
    u = sole_user(out)
    if u is not None and is_cast(u):
        pre_cast, out = u, u
        nodes.append(u)
    weight, offset, mul = None, False, None
    # Row-preserving views between r and the weight, around at most one cast (a grouped norm
    # of one group, Mamba2's: normalized as [..., 1, K], viewed back to [..., K], weighted).
    chain: list[fx.Node] = []
    u = sole_user(out)
    while u is not None and (
        (not is_cast(u) and is_row_op(u, K)) or (is_cast(u) and pre_cast is None and not any(map(is_cast, chain)))
    ):
        chain.append(u)
        u = sole_user(u)
    inner: list[fx.Node] = []
    if chain and u is not None and kind_of(u) == "mul" and plain_binary(u):
        found = _weight_operand(other_operand(u, chain[-1]), K)
        if found is not None:
            weight, offset, extra = found
            mul = u
            inner = [c for c in chain if not is_cast(c)]
            pre_cast = next((c for c in chain if is_cast(c)), pre_cast)
            nodes.extend(chain + extra + [u])
            out = u
    u = sole_user(out)
    if mul is None and u is not None and kind_of(u) == "mul" and plain_binary(u):
        g_expr = other_operand(u, out)
        found = _weight_operand(g_expr, K)
        if found is not None:
            weight, offset, extra = found
            mul = u
            nodes.extend(extra + [u])
            out = u
    if mul is None:
        inner = []
    if mul is not None:
        u = sole_user(out)
        if u is not None and is_cast(u):
            nodes.append(u)
            out = u
    norm_dtype = dtype_of(out)
    if norm_dtype not in FLOATS:
        return not_taken(f"output dtype {norm_dtype} is not float32, float16 or bfloat16")
    if mul is None:
        cbw = False  # no weight: only the final rounding, which norm_dtype gives
    else:
        r_dtype = dtype_of(pre_cast) if pre_cast is not None else dtype_of(r)
        if r_dtype == x_dtype:
            cbw = True  # Llama: weight * r.to(x.dtype) (also every all-fp32 norm)
        elif r_dtype == torch.float32:
            cbw = False  # Gemma / OLMo2: the weight multiplies the fp32 r, then one rounding
        else:
            return not_taken(f"rounds the normalized value to {r_dtype}, neither the input dtype {x_dtype} nor float32")
    spec = NormSpec(eps=scalar_value(eps), offset=offset, cast_before_weight=cbw, norm_dtype=norm_dtype)
    return NormMatch(out, x, weight, spec, nodes, K, norm_module(out), inner)


def _weight_operand(g: Any, K: int) -> tuple[fx.Node, bool, list[fx.Node]] | None:
    """``(weight, offset, nodes)`` if ``g`` is a norm weight ``[K]``: ``w``, ``w.float()``,
    ``1 + w``, ``w + 1``, ``1.0 + w.float()``."""
    if not isinstance(g, fx.Node):
        return None
    nodes: list[fx.Node] = []
    offset = False
    inner = strip_upcasts(g)
    if inner is not g:
        nodes.append(g)
    if kind_of(inner) == "add" and plain_binary(inner):
        a, b = inner.args[0], inner.args[1]
        one, w = (a, b) if const_of(a) is not None else (b, a)
        if const_of(one) == 1.0 and isinstance(w, fx.Node) and dtype_of(inner) != torch.float32:
            # ``weight + 1`` rounded to a half dtype: that rounded vector is the weight.
            pass
        elif const_of(one) == 1.0 and isinstance(w, fx.Node):
            offset = True
            nodes.append(inner)
            w2 = strip_upcasts(w)
            if w2 is not w:
                nodes.append(w)
            inner = w2
        else:
            return None
    s = shape_of(inner)
    if s is None or len(s) != 1 or static_int(s[0]) != K or dtype_of(inner) not in FLOATS:
        return None
    return inner, offset, nodes


def norm_module(out: fx.Node) -> str | None:
    """The norm's module name when the norm is a module of its own (its class says Norm)."""
    t = module_type_name(out)
    if t is None or "norm" not in t.lower():
        return None
    return module_fqn(out)


def find_norms(graph: fx.Graph) -> tuple[list[NormMatch], list[tuple[fx.Node, Miss]]]:
    norms: list[NormMatch] = []
    bad: list[tuple[fx.Node, Miss]] = []
    for n in graph.nodes:
        k = kind_of(n)
        if k == "rms_norm":
            m = _match_rms_norm_node(n)
        elif k == "mean":
            m = _match_rms_chain(n)
        else:
            continue
        if m:
            norms.append(m)
        elif m.candidate:
            bad.append((n, m))
    return norms, bad
