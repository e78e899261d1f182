"""What an FX node computes, and what its metadata says: the vocabulary the matchers read.

Graphs come at three levels (Dynamo's torch-level graph, AOTAutograd's or ``torch.export``'s
aten graph, and ``call_method`` nodes inside either); :func:`kind_of` gives each node one
canonical name (``"mul"``, ``"rms_norm"``, ``"cast"``, ``"bitfx.ternary_matmul"``...) so
that a matcher is written once for all of them. Shapes and dtypes come from
``node.meta["val"]`` / ``node.meta["example_value"]`` (symbolic sizes allowed); nothing here
adds a guard.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx
from torch.fx.experimental.symbolic_shapes import is_concrete_int

__all__ = [
    "FLOATS", "ROW_OPS", "kind_of", "arg_of", "const_of", "is_scalar", "scalar_value", "meta_val",
    "tensor_meta", "dtype_of", "shape_of", "static_int", "last_dim", "real_users", "is_cast",
    "strip_upcasts", "as_dims", "is_last_dim", "sole_user", "other_operand", "plain_binary", "is_row_op",
]

FLOATS = (torch.float32, torch.float16, torch.bfloat16)

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
    torch.clone: "clone", torch.repeat_interleave: "repeat_interleave",
}

_ATEN_KINDS: dict[Any, str] = {
    aten.mul: "mul", aten.add: "add", aten.sub: "sub", aten.div: "div", aten.pow: "pow",
    aten.mean: "mean", aten.rsqrt: "rsqrt", aten.sqrt: "sqrt", aten.reciprocal: "reciprocal",
    aten.abs: "abs", aten.amax: "amax", aten.max: "max", aten.clamp: "clamp",
    aten.clamp_min: "clamp_min", aten.round: "round", aten.detach: "detach", aten.linear: "linear",
    aten.rms_norm: "rms_norm", aten.view: "view", aten.reshape: "reshape", aten._unsafe_view: "view",
    aten.clone: "clone", aten.unsqueeze: "unsqueeze", aten.squeeze: "squeeze",
    aten.transpose: "transpose", aten.permute: "permute", aten.flatten: "flatten",
    aten.expand: "expand", aten.repeat_interleave: "repeat_interleave",
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
    "expand": "expand", "repeat_interleave": "repeat_interleave",
}

# Ops that keep every length-K row of their input intact (checked further in is_row_op).
ROW_OPS = frozenset(
    {"view", "reshape", "contiguous", "flatten", "unsqueeze", "squeeze", "transpose", "permute",
     "getitem", "clone", "cast"}
)


def kind_of(n: Any) -> str | None:
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


def arg_of(n: fx.Node, i: int, name: str, default: Any = None) -> Any:
    if len(n.args) > i:
        return n.args[i]
    return n.kwargs.get(name, default)


def const_of(a: Any) -> float | None:
    if isinstance(a, bool) or not isinstance(a, (int, float)):
        return None
    return float(a)


def is_scalar(a: Any) -> bool:
    """A Python number, or a graph node holding a symbolic float (Dynamo makes float module
    attributes such as ``self.eps`` graph inputs under ``dynamic=True``)."""
    return const_of(a) is not None or isinstance(meta_val(a), (torch.SymFloat, torch.SymInt))


def scalar_value(a: Any) -> float:
    """The value of an :func:`is_scalar` argument; a symbolic one is specialized (guarded),
    as Inductor's own pass would do with a float that feeds a norm."""
    c = const_of(a)
    if c is not None:
        return c
    from torch.fx.experimental.symbolic_shapes import guard_scalar

    return float(guard_scalar(meta_val(a)))


def meta_val(n: Any) -> Any:
    if not isinstance(n, fx.Node):
        return None
    v = n.meta.get("val", n.meta.get("example_value"))
    if v is None and "tensor_meta" in n.meta:
        v = n.meta["tensor_meta"]  # ShapeProp's TensorMetadata: has .shape and .dtype
    return v


def tensor_meta(n: Any):
    v = meta_val(n)
    return v if hasattr(v, "shape") and hasattr(v, "dtype") else None


def dtype_of(n: Any) -> torch.dtype | None:
    v = tensor_meta(n)
    return None if v is None else v.dtype


def shape_of(n: Any) -> tuple | None:
    v = tensor_meta(n)
    return None if v is None else tuple(v.shape)


def static_int(s: Any) -> int | None:
    """``s`` as a Python int when it is one statically (never adds a guard)."""
    if isinstance(s, int):
        return s
    if isinstance(s, torch.SymInt) and is_concrete_int(s):
        return int(s)
    return None


def last_dim(n: Any) -> int | None:
    s = shape_of(n)
    return None if not s else static_int(s[-1])


def real_users(n: fx.Node) -> list[fx.Node]:
    return [u for u in n.users if getattr(u.target, "overloadpacket", None) not in _CHECKS]


def is_cast(n: Any) -> bool:
    """A dtype (or no-op device) conversion that keeps the shape: ``.to``, ``.float()``, ``type_as``..."""
    if kind_of(n) != "cast":
        return False
    src = n.args[0] if n.args else None
    if not isinstance(src, fx.Node):
        return False
    a, b = tensor_meta(src), tensor_meta(n)
    if a is None or b is None or tuple(a.shape) != tuple(b.shape):
        return False
    dev_a, dev_b = getattr(a, "device", None), getattr(b, "device", None)
    return dev_a == dev_b


def strip_upcasts(n: Any) -> Any:
    """Follow exact widening casts to fp32 back to their source (``x.float()`` -> ``x``)."""
    while is_cast(n) and dtype_of(n) == torch.float32 and dtype_of(n.args[0]) in FLOATS:
        n = n.args[0]
    return n


def as_dims(d: Any) -> list | None:
    if d is None:
        return None
    if isinstance(d, (list, tuple)):
        return list(d)
    return [d]


def is_last_dim(d: Any, ndim: int) -> bool:
    dims = as_dims(d)
    return dims is not None and len(dims) == 1 and isinstance(dims[0], int) and dims[0] in (-1, ndim - 1)


def sole_user(n: fx.Node) -> fx.Node | None:
    users = real_users(n)
    return users[0] if len(users) == 1 else None


def other_operand(n: fx.Node, known: Any) -> Any:
    """The operand of binary ``n`` that is not ``known`` (None if neither is)."""
    a, b = n.args[0], n.args[1] if len(n.args) > 1 else n.kwargs.get("other")
    if a is known:
        return b
    if b is known:
        return a
    return None


def plain_binary(n: fx.Node) -> bool:
    return len(n.args) >= 2 and n.kwargs.get("alpha", 1) == 1 and n.kwargs.get("rounding_mode") is None


def is_row_op(n: fx.Node, K: int) -> bool:
    """``n`` keeps each length-K row of its input intact (view of leading dims, copy, ...)."""
    k = kind_of(n)
    if k not in ROW_OPS or not n.args or not isinstance(n.args[0], fx.Node):
        return False
    src = n.args[0]
    si, so = shape_of(src), shape_of(n)
    if si is None or so is None or not si or not so:
        return False
    if static_int(si[-1]) != K or static_int(so[-1]) != K or dtype_of(src) != dtype_of(n):
        return False
    ndim = len(si)
    if k == "cast":
        return is_cast(n)  # same dtype (checked above): a no-op .to()
    if k == "transpose":
        d0, d1 = arg_of(n, 1, "dim0"), arg_of(n, 2, "dim1")
        return all(isinstance(d, int) and d not in (-1, ndim - 1) for d in (d0, d1))
    if k == "permute":
        dims = n.args[1:] if len(n.args) > 2 else as_dims(arg_of(n, 1, "dims"))
        return bool(dims) and dims[-1] in (-1, ndim - 1)
    if k == "getitem":
        return index_keeps_rows(n.args[1], ndim)
    # view / reshape / flatten / (un)squeeze / contiguous / clone: a row-major reshape whose
    # last dimension stays K maps row i to row i.
    return True


def index_keeps_rows(idx: Any, ndim: int) -> bool:
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
