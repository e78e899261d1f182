"""Find RMSNorm -> Linear sites in the torch-level FX graph that Dynamo produces.

A *site* is one RMSNorm and the linear layers that consume its output::

    y = rms_norm(x[..., K], g[K]?, eps)              # in any of the spellings below
    out_i = linear(view_i(y), W_i[N_i, K], b_i?)    # i = 1.. (q/k/v, gate/up, fused qkv, ...)

so that :mod:`bitfx.passes.rewrite` can compute ``norm_quant(x)`` once and one ternary matmul
per linear. The finder works on *meaning*, read from the graph and from the shapes and dtypes
in ``node.meta["val"]`` / ``node.meta["example_value"]`` (symbolic sizes allowed), not on
traced patterns:

* RMSNorm as one node (``torch.rms_norm`` / ``F.rms_norm``, which ``nn.RMSNorm`` calls), or as
  a chain ``x' * rsqrt(mean(x'^2, -1, keepdim=True) + eps)`` with ``x' = x`` or ``x.float()``,
  ``x*x`` or ``pow(x, 2)``, ``rsqrt(v)``, ``1/sqrt(v)``, ``x/sqrt(v)``, optional casts
  before and after the weight, the weight on either side, ``1 + g`` (Gemma), or no weight.
  The cast order fixes :class:`NormSpec` (see :func:`bitfx.reference.rms_norm`).
* From each linear (``F.linear`` / ``torch._C._nn.linear`` / ``aten.linear``, which is how
  an ``nn.Linear`` call appears, or ``torch.ops.bitfx.ternary_matmul`` fed by
  ``torch.ops.bitfx.act_quant``, which is how a ``bitfx.quantize`` module appears) the finder
  walks its input back through row-preserving ops (view, reshape, contiguous, transpose or
  indexing of leading dims, ...: every one keeps each length-K row intact) and through an
  eager BitNet activation quantization (``y + (aq(y) - y).detach()`` or ``aq(y)``, with
  ``aq(y) = (y*s).round().clamp(-128, 127) / s``, ``s = 127 / |y|.max(-1).clamp(min=1e-5)``)
  to a norm's output. The weight may likewise be ``w + (wq(w) - w).detach()`` or ``wq(w)``
  with the absmean ternary ``wq`` (``s = 1 / |w|.mean().clamp(min=1e-5)``,
  ``(w*s).round().clamp(-1, 1) / s``). Such already-BitNet linears compute the numbers of
  :mod:`bitfx.reference` already; their sites are marked ``already_bitnet``.

The fused norm computes its statistics in fp32 (:func:`bitfx.reference.rms_norm`): a norm the
model computes in fp32, or upcast, is reproduced bit for bit in the cast order read from the
graph; one computed entirely in fp16/bf16 arithmetic is matched too, to within a few ulps.

A norm whose output feeds no linear (post-norm models such as OLMo2, per-head q/k norms such as
Qwen3's) is reported as :class:`Rejected` with the reason, as is a norm whose linears are all
filtered out or are the output head, and each linear left out of a site that keeps others.

The output head is the linear named like one (last name component in :data:`HEAD_NAMES`:
``lm_head``, ``output``, ...) or, in a graph with no such name, the last linear of the graph
when it is strictly the widest of at least three and wider than its input (a projection into
a vocabulary). Linears that already quantize are never taken for the head.

The same finder reads aten-level graphs (``torch.export``). Not recognized (left dense):
``x @ W.t()`` / ``torch.matmul`` spelled linears, ``call_module`` graphs from
``torch.fx.symbolic_trace``, quantizers inside an ``autograd.Function`` that Dynamo keeps as
one (transformers' ``AutoBitLinear`` online mode traced for training; traced under no_grad its
quantizers are inlined and recognized), an ``eps`` held in a tensor, norms over several dims.
"""

from __future__ import annotations

import functools
import logging
import operator
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import fx
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from bitfx import reference as ref

__all__ = [
    "NormSpec",
    "Site",
    "Rejected",
    "FindResult",
    "LinearUse",
    "find_sites",
    "analyze_linear",
    "module_fqn",
    "HEAD_NAMES",
]

log = logging.getLogger("bitfx.passes")

# Module names (last component) taken to be the output head of a model.
HEAD_NAMES = frozenset({"lm_head", "output", "embed_out", "head", "score", "classifier"})

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_SCALE_FLOOR = 1e-5  # the quantizers' floor, as in bitfx.reference


# ---------------------------------------------------------------- public records

@dataclass
class NormSpec:
    """How a matched RMSNorm computes; the arguments of :func:`bitfx.reference.rms_norm`."""

    eps: float
    offset: bool  # multiplies by 1 + weight (Gemma)
    cast_before_weight: bool  # r is rounded to x.dtype before the weight multiplies it (Llama)
    norm_dtype: torch.dtype | None  # dtype of the norm's output (None: reference.norm_dtype_for)


@dataclass
class Site:
    norm_input: fx.Node  # x
    # The norm's weight node (placeholder/get_attr; the node computing ``weight + 1`` when a
    # half-precision model rounds that sum itself) or None.
    norm_weight: fx.Node | None
    norm: NormSpec
    norm_nodes: list[fx.Node]  # nodes of the matched norm chain (last = its output)
    linears: list[fx.Node]  # the linear call nodes fed by this norm
    norm_module: str | None  # e.g. "model.layers.0.input_layernorm"
    linear_modules: list[str | None]  # e.g. "model.layers.0.self_attn.q_proj"
    # True when the linears already quantize (eager STE / quant code, or bitfx quantized modules)
    already_bitnet: bool


@dataclass
class Rejected:
    node: fx.Node  # the norm's output, or a linear that was left out
    module: str | None
    reason: str


@dataclass
class FindResult:
    sites: list[Site]
    rejected: list[Rejected]


@dataclass
class LinearUse:
    """How one linear of a site consumes the norm: what :mod:`bitfx.passes.rewrite` needs."""

    node: fx.Node  # the linear (F.linear / aten.linear) or bitfx ternary_matmul call
    kind: str  # "linear" or "bitfx" (a ternary_matmul on packed weights, fed by act_quant)
    path: list[fx.Node]  # row-preserving ops from the norm output to the linear input, in order
    weight: fx.Node | None  # the dense weight [N, K] ("linear"; the source of an eager-quantized one)
    bias: fx.Node | None
    act_quant: str | None  # None, "eager" (aq(y)), "ste" (y + (aq(y) - y).detach()) or "bitfx"
    weight_quant: str | None  # None, "eager", "ste" or "packed"
    per_channel: bool | None  # the eager weight quantizer's grouping (None: not eager)
    out_dtype: torch.dtype
    nodes: list[fx.Node] = field(default_factory=list)  # quantizer nodes that die with the rewrite


# ---------------------------------------------------------------- the op vocabulary

aten = torch.ops.aten

_FN_KINDS: dict[Any, str] = {
    operator.mul: "mul", torch.mul: "mul",
    operator.add: "add", torch.add: "add",
    operator.sub: "sub", torch.sub: "sub",
    operator.truediv: "div", torch.div: "div", torch.true_divide: "div",
    operator.pow: "pow", torch.pow: "pow", torch.square: "square",
    torch.mean: "mean", torch.rsqrt: "rsqrt", torch.sqrt: "sqrt", torch.reciprocal: "reciprocal",
    torch.abs: "abs", torch.amax: "amax", torch.max: "max", operator.getitem: "getitem",
    torch.clamp: "clamp", torch.clip: "clamp", torch.clamp_min: "clamp_min", torch.round: "round",
    torch.detach: "detach",
    F.linear: "linear", torch._C._nn.linear: "linear",
    torch.rms_norm: "rms_norm", F.rms_norm: "rms_norm",
    torch.reshape: "reshape", torch.flatten: "flatten", torch.unsqueeze: "unsqueeze",
    torch.squeeze: "squeeze", torch.transpose: "transpose", torch.permute: "permute",
    torch.clone: "clone",
}

_ATEN_KINDS: dict[Any, str] = {
    aten.mul: "mul", aten.add: "add", aten.sub: "sub", aten.div: "div", aten.pow: "pow",
    aten.mean: "mean", aten.rsqrt: "rsqrt", aten.sqrt: "sqrt", aten.reciprocal: "reciprocal",
    aten.abs: "abs", aten.amax: "amax", aten.max: "max", aten.clamp: "clamp",
    aten.clamp_min: "clamp_min", aten.round: "round", aten.detach: "detach", aten.linear: "linear",
    aten.rms_norm: "rms_norm", aten.view: "view", aten.reshape: "reshape", aten._unsafe_view: "view",
    aten.clone: "clone", aten.unsqueeze: "unsqueeze", aten.squeeze: "squeeze",
    aten.transpose: "transpose", aten.permute: "permute", aten.flatten: "flatten",
    aten._to_copy: "cast", aten.to: "cast", aten.type_as: "cast", torch.ops.prims.convert_element_type: "cast",
}

# Checks that export graphs attach to values; they do not count as uses.
_CHECKS = (aten._assert_tensor_metadata, aten._assert_scalar)

_METHOD_KINDS: dict[str, str] = {
    "mul": "mul", "add": "add", "sub": "sub", "div": "div", "true_divide": "div",
    "pow": "pow", "square": "square", "mean": "mean", "rsqrt": "rsqrt", "sqrt": "sqrt",
    "reciprocal": "reciprocal", "abs": "abs", "amax": "amax", "max": "max",
    # The quantizers' in-place clamps act on temporaries (``.max(...).values.clamp_(min=...)``).
    "clamp": "clamp", "clamp_": "clamp", "clip": "clamp", "clip_": "clamp",
    "clamp_min": "clamp_min", "clamp_min_": "clamp_min", "round": "round", "detach": "detach",
    "to": "cast", "type": "cast", "type_as": "cast", "float": "cast", "half": "cast",
    "bfloat16": "cast", "double": "cast",
    "view": "view", "view_as": "view", "reshape": "reshape", "reshape_as": "reshape",
    "contiguous": "contiguous", "flatten": "flatten", "unsqueeze": "unsqueeze",
    "squeeze": "squeeze", "transpose": "transpose", "permute": "permute", "clone": "clone",
}

# Ops that keep every length-K row of their input intact (checked further in _is_row_op).
_ROW_OPS = frozenset(
    {"view", "reshape", "contiguous", "flatten", "unsqueeze", "squeeze", "transpose", "permute",
     "getitem", "clone", "cast"}
)


def _kind(n: Any) -> str | None:
    """A canonical name for what ``n`` computes, or None."""
    if not isinstance(n, fx.Node):
        return None
    if n.op == "call_method":
        return _METHOD_KINDS.get(n.target)
    if n.op != "call_function":
        return None
    t = n.target
    packet = getattr(t, "overloadpacket", None)
    if packet is not None:
        if getattr(packet, "_qualified_op_name", "").startswith("bitfx::"):
            return "bitfx." + packet._qualified_op_name.split("::", 1)[1]
        return _ATEN_KINDS.get(packet)
    if isinstance(t, torch._ops.OpOverloadPacket):
        if t._qualified_op_name.startswith("bitfx::"):
            return "bitfx." + t._qualified_op_name.split("::", 1)[1]
        return _ATEN_KINDS.get(t)
    try:
        return _FN_KINDS.get(t)
    except TypeError:  # unhashable target
        return None


def _arg(n: fx.Node, i: int, name: str, default: Any = None) -> Any:
    if len(n.args) > i:
        return n.args[i]
    return n.kwargs.get(name, default)


def _const(a: Any) -> float | None:
    if isinstance(a, bool) or not isinstance(a, (int, float)):
        return None
    return float(a)


def _is_scalar(a: Any) -> bool:
    """A Python number, or a graph node holding a symbolic float (Dynamo makes float module
    attributes such as ``self.eps`` graph inputs under ``dynamic=True``)."""
    return _const(a) is not None or isinstance(_val(a), (torch.SymFloat, torch.SymInt))


def _scalar_value(a: Any) -> float:
    """The value of an :func:`_is_scalar` argument; a symbolic one is specialized (guarded),
    as Inductor's own pass would do with a float that feeds a norm."""
    c = _const(a)
    if c is not None:
        return c
    from torch.fx.experimental.symbolic_shapes import guard_scalar

    return float(guard_scalar(_val(a)))


def _val(n: Any) -> Any:
    if not isinstance(n, fx.Node):
        return None
    v = n.meta.get("val", n.meta.get("example_value"))
    if v is None and "tensor_meta" in n.meta:
        v = n.meta["tensor_meta"]  # ShapeProp's TensorMetadata: has .shape and .dtype
    return v


def _tensor_meta(n: Any):
    v = _val(n)
    return v if hasattr(v, "shape") and hasattr(v, "dtype") else None


def _dtype(n: Any) -> torch.dtype | None:
    v = _tensor_meta(n)
    return None if v is None else v.dtype


def _shape(n: Any) -> tuple | None:
    v = _tensor_meta(n)
    return None if v is None else tuple(v.shape)


def _int(s: Any) -> int | None:
    """``s`` as a Python int when it is one statically (never adds a guard)."""
    if isinstance(s, int):
        return s
    if isinstance(s, torch.SymInt) and is_concrete_int(s):
        return int(s)
    return None


def _last_dim(n: Any) -> int | None:
    s = _shape(n)
    return None if not s else _int(s[-1])


def _users(n: fx.Node) -> list[fx.Node]:
    return [u for u in n.users if getattr(u.target, "overloadpacket", None) not in _CHECKS]


def _is_cast(n: Any) -> bool:
    """A dtype (or no-op device) conversion that keeps the shape: ``.to``, ``.float()``, ``type_as``..."""
    if _kind(n) != "cast":
        return False
    src = n.args[0] if n.args else None
    if not isinstance(src, fx.Node):
        return False
    a, b = _tensor_meta(src), _tensor_meta(n)
    if a is None or b is None or tuple(a.shape) != tuple(b.shape):
        return False
    dev_a, dev_b = getattr(a, "device", None), getattr(b, "device", None)
    return dev_a == dev_b


def _strip_upcasts(n: Any) -> Any:
    """Follow exact widening casts to fp32 back to their source (``x.float()`` -> ``x``)."""
    while _is_cast(n) and _dtype(n) == torch.float32 and _dtype(n.args[0]) in _FLOATS:
        n = n.args[0]
    return n


def _dims(d: Any) -> list | None:
    if d is None:
        return None
    if isinstance(d, (list, tuple)):
        return list(d)
    return [d]


def _is_last_dim(d: Any, ndim: int) -> bool:
    dims = _dims(d)
    return dims is not None and len(dims) == 1 and isinstance(dims[0], int) and dims[0] in (-1, ndim - 1)


def module_fqn(node: fx.Node) -> str | None:
    """The fully qualified name of the innermost module a node was traced in, e.g.
    ``"model.layers.0.self_attn.q_proj"`` (Dynamo writes ``L['self'].model.layers[0]...``),
    relative to the compiled model (see :func:`_clean_fqn`)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    return _clean_fqn(path)


def _module_type_name(node: fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    t = list(stack.values())[-1][1]  # a class (Dynamo) or its qualified name (export)
    return t.__name__ if isinstance(t, type) else str(t).rsplit(".", 1)[-1]


_ROOT = re.compile(r"""^[LG]\[['"]([^'"]*)['"]\]""")


_GETATTR = re.compile(r"""getattr\(([^(),]+),\s*['"]([^'"]+)['"]\)""")


def _clean_fqn(path: str) -> str:
    path = str(path)
    while True:  # getattr(L['self'].layers, '0') -> L['self'].layers.0
        new = _GETATTR.sub(r"\1.\2", path)
        if new == path:
            break
        path = new
    # Names are relative to the root object (the compiled module, L['self'], or a module the
    # compiled function calls, L['model'] / G['model']); a root that is itself the module in
    # question (a free-standing nn.Linear ``a``: "G['a']") is named by its variable.
    m = _ROOT.match(path)
    if m is not None:
        path = m.group(1) if m.end() == len(path) else path[m.end():]
    path = re.sub(r"""\[['"]([^'"]+)['"]\]""", r".\1", path)  # ['name'] -> .name
    path = re.sub(r"\[(\d+)\]", r".\1", path)  # [0] -> .0
    path = path.replace("._modules.", ".")
    return path.strip(".")


# ---------------------------------------------------------------- RMSNorm

@dataclass
class _Norm:
    output: fx.Node
    input: fx.Node
    weight: fx.Node | None
    spec: NormSpec
    nodes: list[fx.Node]
    K: int
    module: str | None


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


def _match_rms_norm_node(n: fx.Node) -> _Norm | str:
    """``torch.rms_norm(x, (K,), weight, eps)``: one node."""
    x = n.args[0]
    shape = _arg(n, 1, "normalized_shape")
    weight = _arg(n, 2, "weight")
    eps = _arg(n, 3, "eps")
    xs, dt = _shape(x), _dtype(x)
    if xs is None or dt is None or _dtype(n) is None:
        return "no shape information (node.meta['val'])"
    K = _int(xs[-1]) if xs else None
    if K is None:
        return "the normalized (last) dimension has no static size"
    shape = list(shape) if isinstance(shape, (list, tuple)) else [shape]
    if len(shape) != 1 or _int(shape[0]) != K:
        return f"normalizes over {len(shape)} trailing dimensions; only the last one can fuse"
    if dt not in _FLOATS:
        return f"input dtype {dt} is not float32, float16 or bfloat16"
    if eps is None:
        # torch takes finfo of the computation dtype (fp32 for fp16/bf16/fp32 inputs), not of x.dtype.
        eps = torch.finfo(torch.float32).eps
    if not _is_scalar(eps):
        return "eps is not a number"
    eps = _scalar_value(eps)
    device = getattr(_val(x), "device", None)
    device_type = device.type if device is not None and device.type in ("cpu", "cuda") else "cpu"
    if device_type == "cuda" and not torch.cuda.is_available():
        device_type = "cpu"
    spec = NormSpec(
        eps=eps, offset=False,
        cast_before_weight=_torch_rms_norm_casts_before_weight(device_type) if weight is not None else False,
        norm_dtype=_dtype(n),
    )
    return _Norm(n, x, weight, spec, [n], K, _norm_module(n))


def _sole_user(n: fx.Node) -> fx.Node | None:
    users = _users(n)
    return users[0] if len(users) == 1 else None


def _other(n: fx.Node, known: Any) -> Any:
    """The operand of binary ``n`` that is not ``known`` (None if neither is)."""
    a, b = n.args[0], n.args[1] if len(n.args) > 1 else n.kwargs.get("other")
    if a is known:
        return b
    if b is known:
        return a
    return None


def _plain_binary(n: fx.Node) -> bool:
    return len(n.args) >= 2 and n.kwargs.get("alpha", 1) == 1 and n.kwargs.get("rounding_mode") is None


def _square_of(n: Any) -> Any:
    """``x`` when ``n`` is ``x**2``, ``x*x`` or ``square(x)``."""
    k = _kind(n)
    if k == "pow" and len(n.args) >= 2 and _const(n.args[1]) == 2.0:
        return n.args[0]
    if k == "mul" and len(n.args) >= 2 and n.args[0] is n.args[1] and isinstance(n.args[0], fx.Node):
        return n.args[0]
    if k == "square":
        return n.args[0]
    return None


def _match_rms_chain(mean: fx.Node) -> _Norm | str | None:
    """Match the hand-written RMSNorm whose ``mean(x'^2, -1, keepdim=True)`` is ``mean``.

    Returns None when ``mean`` is not an RMSNorm's, a string (the reason) when it is one that
    bitfx cannot take.
    """
    xp = _square_of(mean.args[0] if mean.args else None)
    if not isinstance(xp, fx.Node):
        return None
    xs = _shape(xp)
    if xs is None or not xs:
        return None
    if not _is_last_dim(_arg(mean, 1, "dim"), len(xs)) or not _arg(mean, 2, "keepdim", False):
        return None
    nodes = [mean.args[0], mean]
    # + eps
    add = next((u for u in mean.users if _kind(u) == "add" and _plain_binary(u) and _is_scalar(_other(u, mean))), None)
    if add is None:
        return None
    eps = _other(add, mean)  # read (and, if symbolic, specialized) once the whole norm matches
    nodes.append(add)
    # r = x' * rsqrt(v)  |  x' * (1 / sqrt(v))  |  x' / sqrt(v)  |  x' * v ** -0.5
    r = None
    for u in add.users:
        k = _kind(u)
        inv = None
        if k == "rsqrt" or (k == "pow" and u.args[0] is add and _const(u.args[1]) == -0.5):
            inv = u
        elif k == "sqrt":
            for v in u.users:
                kv = _kind(v)
                if kv == "div" and _plain_binary(v) and v.args[0] is xp and v.args[1] is u:
                    r, nodes = v, nodes + [u, v]
                    break
                if (kv == "reciprocal" or (kv == "div" and _plain_binary(v) and _const(v.args[0]) == 1.0 and v.args[1] is u)):
                    inv, nodes = v, nodes + [u]
                    break
        if r is not None:
            break
        if inv is not None:
            one = _sole_user(inv)  # aten spells 1 / s as reciprocal(s) * 1.0
            if one is not None and _kind(one) == "mul" and _plain_binary(one) and _const(_other(one, inv)) == 1.0:
                nodes.append(inv)
                inv = one
            m = next((v for v in inv.users if _kind(v) == "mul" and _plain_binary(v) and _other(v, inv) is xp), None)
            if m is not None:
                r, nodes = m, nodes + [inv, m]
                break
    if r is None:
        return None
    x = _strip_upcasts(xp)
    if xp is not x:
        nodes.insert(0, xp)
    K = _int(xs[-1])
    x_dtype = _dtype(x)
    if K is None:
        return "the normalized (last) dimension has no static size"
    if x_dtype not in _FLOATS:
        return f"input dtype {x_dtype} is not float32, float16 or bfloat16"

    # Optional cast, weight multiply (g, g.float(), 1 + g), optional cast: the norm's tail.
    out = r
    pre_cast = None
    u = _sole_user(out)
    if u is not None and _is_cast(u):
        pre_cast, out = u, u
        nodes.append(u)
    weight, offset, mul = None, False, None
    u = _sole_user(out)
    if u is not None and _kind(u) == "mul" and _plain_binary(u):
        g_expr = _other(u, out)
        found = _weight_operand(g_expr, K)
        if found is not None:
            weight, offset, extra = found
            mul = u
            nodes.extend(extra + [u])
            out = u
    if mul is not None:
        u = _sole_user(out)
        if u is not None and _is_cast(u):
            nodes.append(u)
            out = u
    norm_dtype = _dtype(out)
    if norm_dtype not in _FLOATS:
        return f"output dtype {norm_dtype} is not float32, float16 or bfloat16"
    if mul is None:
        cbw = False  # no weight: only the final rounding, which norm_dtype gives
    else:
        r_dtype = _dtype(pre_cast) if pre_cast is not None else _dtype(r)
        if r_dtype == x_dtype:
            cbw = True  # Llama: weight * r.to(x.dtype) (also every all-fp32 norm)
        elif r_dtype == torch.float32:
            cbw = False  # Gemma / OLMo2: the weight multiplies the fp32 r, then one rounding
        else:
            return f"rounds the normalized value to {r_dtype}, neither the input dtype {x_dtype} nor float32"
    spec = NormSpec(eps=_scalar_value(eps), offset=offset, cast_before_weight=cbw, norm_dtype=norm_dtype)
    return _Norm(out, x, weight, spec, nodes, K, _norm_module(out))


def _weight_operand(g: Any, K: int) -> tuple[fx.Node, bool, list[fx.Node]] | None:
    """``(weight, offset, nodes)`` if ``g`` is a norm weight ``[K]``: ``w``, ``w.float()``,
    ``1 + w``, ``w + 1``, ``1.0 + w.float()``."""
    if not isinstance(g, fx.Node):
        return None
    nodes: list[fx.Node] = []
    offset = False
    inner = _strip_upcasts(g)
    if inner is not g:
        nodes.append(g)
    if _kind(inner) == "add" and _plain_binary(inner):
        a, b = inner.args[0], inner.args[1]
        one, w = (a, b) if _const(a) is not None else (b, a)
        if _const(one) == 1.0 and isinstance(w, fx.Node) and _dtype(inner) != torch.float32:
            # ``weight + 1`` rounded to a half dtype: that rounded vector is the weight.
            pass
        elif _const(one) == 1.0 and isinstance(w, fx.Node):
            offset = True
            nodes.append(inner)
            w2 = _strip_upcasts(w)
            if w2 is not w:
                nodes.append(w)
            inner = w2
        else:
            return None
    s = _shape(inner)
    if s is None or len(s) != 1 or _int(s[0]) != K or _dtype(inner) not in _FLOATS:
        return None
    return inner, offset, nodes


def _norm_module(out: fx.Node) -> str | None:
    """The norm's module name when the norm is a module of its own (its class says Norm)."""
    t = _module_type_name(out)
    if t is None or "norm" not in t.lower():
        return None
    return module_fqn(out)


def _find_norms(graph: fx.Graph) -> tuple[list[_Norm], list[tuple[fx.Node, str]]]:
    norms: list[_Norm] = []
    bad: list[tuple[fx.Node, str]] = []
    for n in graph.nodes:
        k = _kind(n)
        if k == "rms_norm":
            m = _match_rms_norm_node(n)
        elif k == "mean":
            m = _match_rms_chain(n)
        else:
            continue
        if isinstance(m, _Norm):
            norms.append(m)
        elif isinstance(m, str):
            bad.append((n, m))
    return norms, bad


# ---------------------------------------------------------------- eager BitNet quantizers

def _clamp_bounds(n: fx.Node) -> tuple[float | None, float | None]:
    if _kind(n) == "clamp_min":
        return _const(_arg(n, 1, "min")), None
    lo, hi = _arg(n, 1, "min"), _arg(n, 2, "max")
    return (None if lo is None else _const(lo)), (None if hi is None else _const(hi))


def _is_floor_clamp(n: Any) -> bool:
    """``.clamp(min=1e-5)`` (or ``clamp_min``), the quantizers' floor."""
    if _kind(n) not in ("clamp", "clamp_min"):
        return False
    lo, hi = _clamp_bounds(n)
    return lo == _SCALE_FLOOR and hi is None and _arg(n, 2, "max") is None


def _match_quant_body(c: Any, lo: float, hi: float) -> tuple[fx.Node, fx.Node, list[fx.Node]] | None:
    """``(src, scale, nodes)`` for ``c = (src * scale).round().clamp(lo, hi) / scale``, optionally
    cast (``nodes`` then starts with the cast)."""
    cast = []
    if _is_cast(c):
        cast = [c]
        c = c.args[0]
    if _kind(c) != "div" or not _plain_binary(c):
        return None
    cl, s = c.args[0], c.args[1]
    if _kind(cl) != "clamp" or _clamp_bounds(cl) != (lo, hi):
        return None
    rd = cl.args[0]
    if _kind(rd) != "round" or len(rd.args) > 1 or rd.kwargs.get("decimals"):
        return None
    m = rd.args[0]
    if _kind(m) != "mul" or not _plain_binary(m):
        return None
    src = _other(m, s)
    if not isinstance(src, fx.Node):
        return None
    return src, s, cast + [c, cl, rd, m]


def _match_act_quant(c: Any) -> tuple[fx.Node, list[fx.Node]] | None:
    """``(y, nodes)`` if ``c`` is the eager per-token absmax int8 quantize-dequantize of ``y``:
    ``s = 127 / |y|.max(-1, keepdim=True).values.clamp(min=1e-5)``, ``(y*s).round().clamp(-128, 127) / s``,
    optionally on ``y.float()`` and cast back."""
    body = _match_quant_body(c, -128.0, 127.0)
    if body is None:
        return None
    src, s, nodes = body
    # s = 127 / floor(amax(|src|))
    if _kind(s) != "div" or not _plain_binary(s) or _const(s.args[0]) != 127.0:
        return None
    fl = s.args[1]
    if not _is_floor_clamp(fl):
        return None
    amax = fl.args[0]
    if _kind(amax) == "getitem" and amax.args[1] == 0 and _kind(amax.args[0]) == "max":
        mx = amax.args[0]
        extra = [amax, mx]
    elif _kind(amax) == "amax":
        mx = amax
        extra = [amax]
    else:
        return None
    ab = mx.args[0]
    if _kind(ab) != "abs" or ab.args[0] is not src:
        return None
    ndim = len(_shape(src) or ())
    if not _is_last_dim(_arg(mx, 1, "dim"), ndim) or not _arg(mx, 2, "keepdim", False):
        return None
    nodes += [s, fl] + extra + [ab]
    y = _strip_upcasts(src)
    if y is not src:
        nodes.append(src)
    return y, nodes


def _match_weight_quant(c: Any) -> tuple[fx.Node, bool, list[fx.Node]] | None:
    """``(w, per_channel, nodes)`` if ``c`` is the eager absmean ternary quantize-dequantize of
    ``w``: ``s = 1 / |w|.mean().clamp(min=1e-5)``, ``(w*s).round().clamp(-1, 1) / s``
    (``mean(-1, keepdim=True)``: per output channel)."""
    body = _match_quant_body(c, -1.0, 1.0)
    if body is None:
        return None
    src, s, nodes = body
    if _kind(s) == "div" and _plain_binary(s) and _const(s.args[0]) == 1.0:
        fl = s.args[1]
    elif _kind(s) == "reciprocal":
        fl = s.args[0]
    else:
        return None
    if not _is_floor_clamp(fl):
        return None
    mean = fl.args[0]
    if _kind(mean) != "mean":
        return None
    ab = mean.args[0]
    if _kind(ab) != "abs" or ab.args[0] is not src:
        return None
    dim = _arg(mean, 1, "dim")
    if dim is None or _dims(dim) == []:
        per_channel = False
    elif _is_last_dim(dim, 2) and _arg(mean, 2, "keepdim", False):
        per_channel = True
    else:
        return None
    nodes += [s, fl, mean, ab]
    w = _strip_upcasts(src)
    if w is not src:
        nodes.append(src)
    return w, per_channel, nodes


def _match_ste(n: Any) -> tuple[fx.Node, fx.Node, list[fx.Node]] | None:
    """``(base, q, nodes)`` if ``n`` is ``base + (q - base).detach()``."""
    if _kind(n) != "add" or not _plain_binary(n):
        return None
    for base, d in ((n.args[0], n.args[1]), (n.args[1], n.args[0])):
        if _kind(d) == "detach" and _kind(d.args[0]) == "sub" and _plain_binary(d.args[0]):
            sub = d.args[0]
            if sub.args[1] is base and isinstance(base, fx.Node):
                return base, sub.args[0], [n, d, sub]
    return None


def _unwrap_quant(n: fx.Node, matcher) -> tuple[fx.Node, str | None, Any, list[fx.Node]]:
    """Strip an STE-wrapped or plain eager quantizer: ``(source, form, extra, nodes)``."""
    ste = _match_ste(n)
    if ste is not None:
        base, q, nodes = ste
        m = matcher(q)
        if m is not None and m[0] is _strip_upcasts(base):
            return base, "ste", m[1:-1], nodes + m[-1]
    m = matcher(n)
    if m is not None:
        return m[0], "eager", m[1:-1], m[-1]
    return n, None, (), []


# ---------------------------------------------------------------- rows and linears

def _is_row_op(n: fx.Node, K: int) -> bool:
    """``n`` keeps each length-K row of its input intact (view of leading dims, copy, ...)."""
    k = _kind(n)
    if k not in _ROW_OPS or not n.args or not isinstance(n.args[0], fx.Node):
        return False
    src = n.args[0]
    si, so = _shape(src), _shape(n)
    if si is None or so is None or not si or not so:
        return False
    if _int(si[-1]) != K or _int(so[-1]) != K or _dtype(src) != _dtype(n):
        return False
    ndim = len(si)
    if k == "cast":
        return _is_cast(n)  # same dtype (checked above): a no-op .to()
    if k == "transpose":
        d0, d1 = _arg(n, 1, "dim0"), _arg(n, 2, "dim1")
        return all(isinstance(d, int) and d not in (-1, ndim - 1) for d in (d0, d1))
    if k == "permute":
        dims = n.args[1:] if len(n.args) > 2 else _dims(_arg(n, 1, "dims"))
        return bool(dims) and dims[-1] in (-1, ndim - 1)
    if k == "getitem":
        return _index_keeps_rows(n.args[1], ndim)
    # view / reshape / flatten / (un)squeeze / contiguous / clone: a row-major reshape whose
    # last dimension stays K maps row i to row i.
    return True


def _index_keeps_rows(idx: Any, ndim: int) -> bool:
    idx = idx if isinstance(idx, tuple) else (idx,)
    for e in idx:
        if isinstance(e, (fx.Node, list)) or (e is not Ellipsis and e is not None and not isinstance(e, (int, slice))):
            return False  # tensor or other advanced indexing: not analysed
    consumes = [e for e in idx if e is not None]
    full = slice(None, None, None)
    if Ellipsis in consumes:
        after = consumes[consumes.index(Ellipsis) + 1:]
        return all(e == full for e in after)
    if len(consumes) < ndim:
        return True
    return consumes[ndim - 1] == full


def _linear_like(n: fx.Node) -> str | None:
    k = _kind(n)
    if k == "linear":
        return "linear"
    if k == "bitfx.ternary_matmul":
        return "bitfx"
    return None


def _trace_to_norm(inp: Any, outputs: dict[fx.Node, _Norm], allow_quant: bool):
    """Walk back from a linear's input to a norm output through row ops and (if allowed) one
    eager activation quantizer: ``(norm, path, act_form, quant_nodes)`` or None."""
    n = inp
    path: list[fx.Node] = []
    act, qnodes = None, []
    for _ in range(64):
        if not isinstance(n, fx.Node):
            return None
        norm = outputs.get(n)
        if norm is not None:
            return norm, path[::-1], act, qnodes
        if allow_quant and act is None:
            src, form, _, nodes = _unwrap_quant(n, _match_act_quant)
            if form is not None:
                act, qnodes, n = form, nodes, src
                continue
        norm_k = _last_dim(n)
        if norm_k is not None and _is_row_op(n, norm_k):
            path.append(n)
            n = n.args[0]
            continue
        return None
    return None


def _weight_is_parameter(w: fx.Node) -> bool:
    while _is_cast(w):
        w = w.args[0]
    return isinstance(w, fx.Node) and w.op in ("placeholder", "get_attr")


def _analyze(linear: fx.Node, outputs: dict[fx.Node, _Norm]) -> tuple[_Norm, LinearUse] | str | None:
    """How ``linear`` consumes a norm: None (it does not), a reason string (it does, but
    cannot be converted), or ``(norm, use)``."""
    kind = _linear_like(linear)
    out_dtype = _dtype(linear)
    if kind == "bitfx":
        q, s = linear.args[0], linear.args[1]
        if not (_kind(q) == "getitem" and _kind(s) == "getitem" and q.args[0] is s.args[0]
                and q.args[1] == 0 and s.args[1] == 1 and _kind(q.args[0]) == "bitfx.act_quant"):
            return None
        aq = q.args[0]
        found = _trace_to_norm(aq.args[0], outputs, allow_quant=False)
        if found is None:
            return None
        norm, path, _, _ = found
        bias = _arg(linear, 4, "bias")
        return norm, LinearUse(
            linear, "bitfx", path, None, bias, "bitfx", "packed", None, out_dtype, [aq, q, s],
        )
    inp, w = _arg(linear, 0, "input"), _arg(linear, 1, "weight")
    bias = _arg(linear, 2, "bias")
    found = _trace_to_norm(inp, outputs, allow_quant=True)
    if found is None:
        return None
    norm, path, act, qnodes = found
    base_w, wform, extra, wnodes = _unwrap_quant(w, _match_weight_quant)
    per_channel = extra[0] if wform is not None else None
    ws = _shape(base_w)
    if ws is None or len(ws) != 2 or _int(ws[1]) != norm.K or _dtype(base_w) not in _FLOATS:
        return "the weight is not a float [N, K] matrix matching the norm's K"
    if out_dtype not in _FLOATS:
        return f"output dtype {out_dtype} is not float32, float16 or bfloat16"
    if (act is None) != (wform is None):
        have, miss = ("activation", "weight") if act is not None else ("weight", "activation")
        return f"quantizes its {have} eagerly but not its {miss} in a form bitfx recognizes"
    if not _weight_is_parameter(base_w):
        return f"its weight is computed in the graph ({base_w.op} {base_w.target}), not a parameter"
    if bias is not None and (_shape(bias) is None or len(_shape(bias)) != 1 or _dtype(bias) not in _FLOATS):
        return "the bias is not a float [N] vector"
    return norm, LinearUse(
        linear, "linear", path, base_w, bias, act, wform, per_channel, out_dtype, qnodes + wnodes,
    )


def analyze_linear(site: Site, linear: fx.Node) -> LinearUse:
    """The :class:`LinearUse` of one of ``site.linears`` (re-read from the graph)."""
    spec_norm = _Norm(site.norm_nodes[-1], site.norm_input, site.norm_weight, site.norm,
                      site.norm_nodes, _last_dim(site.norm_input), site.norm_module)
    res = _analyze(linear, {site.norm_nodes[-1]: spec_norm})
    if not isinstance(res, tuple):
        raise ValueError(f"bitfx: {linear.format_node()} does not consume the norm {site.norm_nodes[-1].name}"
                         + (f": {res}" if isinstance(res, str) else ""))
    return res[1]


def _out_features(n: fx.Node) -> int | None:
    return _last_dim(n)


def _head_nodes(linears: list[fx.Node], uses: dict[fx.Node, LinearUse]) -> set[fx.Node]:
    """The output head: linears named like one (``lm_head``, ``output``, ...), or else the last
    linear of the graph when its out_features is strictly the largest of at least three
    linears and exceeds its in_features (a projection into a vocabulary). Linears that already
    quantize (BitNet code) are never taken for a head."""
    named = {n for n in linears if (module_fqn(n) or "").rsplit(".", 1)[-1] in HEAD_NAMES}
    if named:
        return named
    if len(linears) < 3:
        return set()
    last = linears[-1]
    u = uses.get(last)
    if u is not None and u.act_quant is not None:
        return set()
    n_last = _out_features(last)
    others = [_out_features(n) for n in linears[:-1]]
    k_last = _last_dim(_arg(last, 0, "input")) if _linear_like(last) == "linear" else None
    if n_last is None or any(o is None or o >= n_last for o in others):
        return set()
    if k_last is not None and n_last <= k_last:
        return set()
    return {last}


# ---------------------------------------------------------------- the finder

def find_sites(
    gm: fx.GraphModule,
    *,
    filter_fn: Optional[Callable[[str], bool]] = None,
    skip_output_head: bool = True,
) -> FindResult:
    """All RMSNorm -> Linear sites of ``gm`` (graph order), and the norms and linears left out.

    ``filter_fn(fqn)`` decides which linears (by module name, ``""`` when unknown) may be
    converted; ``skip_output_head`` leaves the output head (e.g. ``lm_head``) dense.
    The graph is not modified.
    """
    graph = gm.graph
    norms, bad = _find_norms(graph)
    rejected = [Rejected(n, _norm_module(n) or module_fqn(n), f"RMSNorm not supported: {why}") for n, why in bad]
    outputs = {nm.output: nm for nm in norms}
    order = {n: i for i, n in enumerate(graph.nodes)}

    linears = [n for n in graph.nodes if _linear_like(n)]
    per_norm: dict[fx.Node, list[LinearUse]] = {nm.output: [] for nm in norms}
    dropped: dict[fx.Node, list[Rejected]] = {nm.output: [] for nm in norms}
    uses: dict[fx.Node, LinearUse] = {}
    for lin in linears:
        res = _analyze(lin, outputs)
        if res is None:
            continue
        if isinstance(res, str):
            # Which norm it hangs off, for the report: trace without the strict checks.
            found = _trace_to_norm(_arg(lin, 0, "input"), outputs, allow_quant=True)
            if found is not None:
                dropped[found[0].output].append(Rejected(lin, module_fqn(lin), res))
            continue
        norm, use = res
        uses[lin] = use
        per_norm[norm.output].append(use)

    heads = _head_nodes(linears, uses) if skip_output_head else set()
    sites: list[Site] = []
    for nm in norms:
        kept: list[LinearUse] = []
        for use in per_norm[nm.output]:
            fqn = module_fqn(use.node)
            if use.node in heads and use.act_quant is None:
                dropped[nm.output].append(Rejected(use.node, fqn, "output head (skip_output_head=True)"))
            elif filter_fn is not None and not filter_fn(fqn or ""):
                dropped[nm.output].append(Rejected(use.node, fqn, "filtered out by filter_fn"))
            else:
                kept.append(use)
        if not kept:
            reason = _why_no_site(nm, dropped[nm.output])
            rejected.append(Rejected(nm.output, nm.module, reason))
            continue
        rejected.extend(dropped[nm.output])
        kept.sort(key=lambda u: order[u.node])
        sites.append(Site(
            norm_input=nm.input,
            norm_weight=nm.weight,
            norm=nm.spec,
            norm_nodes=nm.nodes,
            linears=[u.node for u in kept],
            norm_module=nm.module,
            linear_modules=[module_fqn(u.node) for u in kept],
            already_bitnet=any(u.act_quant is not None for u in kept),
        ))
    for s in sites:
        log.debug("site: %s -> %s%s", s.norm_module or s.norm_nodes[-1].name, s.linear_modules,
                  " (already BitNet)" if s.already_bitnet else "")
    return FindResult(sites, rejected)


def _why_no_site(nm: _Norm, dropped: list[Rejected]) -> str:
    if dropped:
        parts = [f"{r.module or r.node.name}: {r.reason}" for r in dropped]
        return "none of its linears can be converted (" + "; ".join(parts) + ")"
    users = sorted({_kind(u) or str(u.target) for u in _users(nm.output)})
    reason = f"its output feeds no linear layer (users: {', '.join(users) or 'none'})"
    src = _producer_linear(nm.input)
    if src is not None:
        reason += (f"; it normalizes the output of linear {module_fqn(src) or src.name} over its last "
                   f"dimension (K={nm.K}): a post-norm or per-head q/k norm")
    return reason


def _producer_linear(n: Any) -> fx.Node | None:
    for _ in range(16):
        if not isinstance(n, fx.Node):
            return None
        if _linear_like(n):
            return n
        if _kind(n) in _ROW_OPS and n.args:
            n = n.args[0]
            continue
        return None
    return None
