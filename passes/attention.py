"""The decode step's attention as one ``bitfx.decode_attention`` call.

A transformers decode step attends one new token per head to the whole key/value cache::

    k = cache_k[:, :, None, :, :].expand(B, Hk, n, L, D).reshape(B, Hk * n, L, D)   # repeat_kv
    v = ...                                                                       # the same
    out = scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=s)            # q [B, Hq, 1, D]

With grouped heads (``Hk < Hq``) Inductor materializes both repeats: the whole cache copied per
layer and step, in kernels of their own, before a library attention kernel made for long
queries. :func:`fuse_decode_attention` calls ``bitfx.decode_attention(q, cache_k, cache_v, mask,
s)`` instead, which reads each key/value head for its query heads where it lies, in one kernel
(:mod:`bitfx.kernels.attention`). Taken where the call is

* ``scaled_dot_product_attention`` (torch's function or the aten op) with no dropout, not
  causal (one query: a causal mask would keep only the first key), a static scale (or the
  default ``1 / sqrt(D)``);
* on a query of one token, ``[B, Hq, 1, D]`` with static ``D`` up to the kernel's limit, keys
  and values of its dtype and ``D``, the mask None, bool or float;
* and the keys and values are each a repeat of ``[B, Hk, L, D]`` heads along dim 1 (the
  expand-and-reshape above, or ``repeat_interleave``), or taken as they are (``Hk`` heads with
  ``enable_gqa``, else all ``Hq``).

Anything else keeps the library call, and so does a graph traced with ``dynamic=True`` (its
heads and head_dim symbolic: the group and the head_dim limit need their values); a cache length
that Dynamo made symbolic after it changed is taken. The repeats' nodes go when nothing else reads them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import fx

import bitfx.ops  # noqa: F401  (registers torch.ops.bitfx.*)
from bitfx.layout import FLOAT_DTYPES
from bitfx.ops.library import MAX_HEAD_DIM
from bitfx.passes.fx_utils import arg_of, const_of, kind_of, shape_of, static_int
from bitfx.passes.rewrite import _Builder, _val

__all__ = ["fuse_decode_attention"]

_ops = torch.ops.bitfx
_aten = torch.ops.aten
_SDPA = (F.scaled_dot_product_attention, _aten.scaled_dot_product_attention.default)


def _repeat_source(node) -> tuple[fx.Node, int] | None:
    """``(src, n)`` where ``node`` repeats each head of ``src [B, Hk, L, D]`` ``n`` times along
    dim 1 (head ``h`` of ``node`` is head ``h // n`` of ``src``), else None."""
    out = shape_of(node)
    if out is None or len(out) != 4:
        return None
    if kind_of(node) == "repeat_interleave":
        src = node.args[0]
        n = arg_of(node, 1, "repeats")
        dim = arg_of(node, 2, "dim")
        s = shape_of(src)
        if isinstance(n, int) and dim in (1, -3) and s is not None and len(s) == 4 and len(node.kwargs) <= 2:
            return src, n
        return None
    if kind_of(node) not in ("reshape", "view"):
        return None
    ex = node.args[0]
    if kind_of(ex) != "expand" or len(ex.users) != 1:
        return None
    five = shape_of(ex)
    up = ex.args[0]
    up_shape = shape_of(up)
    if five is None or up_shape is None or len(five) != 5 or len(up_shape) != 5 or up_shape[2] != 1:
        return None
    if kind_of(up) == "getitem":
        src, idx = up.args
        full = slice(None, None, None)
        if not (isinstance(idx, tuple) and len(idx) >= 3 and idx[0] == full and idx[1] == full and idx[2] is None
                and all(e == full or e is Ellipsis for e in idx[3:])):
            return None
    elif kind_of(up) == "unsqueeze" and arg_of(up, 1, "dim") in (2, -3):
        src = up.args[0]
    else:
        return None
    s = shape_of(src)
    if s is None or len(s) != 4:
        return None
    B, Hk, n, L, D = five
    if tuple(out) != (B, Hk * n, L, D) or tuple(s) != (B, Hk, L, D):
        return None
    n = static_int(n)
    return (src, n) if n is not None else None


def _kv(node, Hq: int, gqa: bool) -> fx.Node | None:
    """The ``[B, Hk, L, D]`` heads ``node`` (an SDPA key or value) repeats for ``Hq`` query heads."""
    rep = _repeat_source(node)
    if rep is not None:
        src, n = rep
        heads = static_int(shape_of(src)[1])
        return src if heads is not None and heads * n == Hq else None
    heads = static_int(shape_of(node)[1]) if shape_of(node) is not None and len(shape_of(node)) == 4 else None
    if heads is None or heads == 0 or (heads != Hq and not (gqa and Hq % heads == 0)):
        return None
    return node


def _decode_call(node: fx.Node):
    """``(q, k, v, mask, scale)`` of an SDPA call the op takes (module docstring), else None."""
    if node.op != "call_function" or node.target not in _SDPA:
        return None
    q, k, v = (arg_of(node, i, name) for i, name in enumerate(("query", "key", "value")))
    mask = arg_of(node, 3, "attn_mask")
    dropout = arg_of(node, 4, "dropout_p", 0.0)
    causal = arg_of(node, 5, "is_causal", False)
    scale = node.kwargs.get("scale", node.args[6] if len(node.args) > 6 else None)
    gqa = node.kwargs.get("enable_gqa", node.args[7] if len(node.args) > 7 else False)
    if const_of(dropout) != 0.0 or causal is not False or gqa not in (True, False):
        return None
    if scale is not None and const_of(scale) is None:
        return None
    tq = _val(q)
    if not (isinstance(tq, torch.Tensor) and tq.dim() == 4 and tq.dtype in FLOAT_DTYPES):
        return None
    Hq, S, D = (static_int(s) for s in tq.shape[1:])
    if S != 1 or Hq is None or D is None or not 0 < D <= MAX_HEAD_DIM:
        return None
    if mask is not None:
        tm = _val(mask)
        if not (isinstance(tm, torch.Tensor) and (tm.dtype == torch.bool or tm.dtype in FLOAT_DTYPES)):
            return None
    ks, vs = _kv(k, Hq, gqa), _kv(v, Hq, gqa)
    if ks is None or vs is None:
        return None
    tk, tv = _val(ks), _val(vs)
    if not all(isinstance(t, torch.Tensor) and t.dtype == tq.dtype and t.dim() == 4 for t in (tk, tv)):
        return None
    if tuple(tk.shape) != tuple(tv.shape) or static_int(tk.shape[3]) != D or tk.shape[0] != tq.shape[0]:
        return None
    if mask is not None:
        try:
            torch.broadcast_shapes(tuple(_val(mask).shape), (tq.shape[0], Hq, 1, tk.shape[2]))
        except RuntimeError:
            return None
    return q, ks, vs, mask, (1.0 / math.sqrt(D) if scale is None else const_of(scale))


_REPEAT_KINDS = ("reshape", "view", "expand", "unsqueeze", "repeat_interleave", "getitem")


def _drop_dead_repeats(node) -> None:
    """Erase ``node`` and the repeat before it (:func:`_repeat_source`'s nodes) once unused."""
    while kind_of(node) in _REPEAT_KINDS and not node.users:
        src = node.args[0]
        node.graph.erase_node(node)
        node = src


def fuse_decode_attention(gm: fx.GraphModule) -> int:
    """Make each one-token SDPA call on a (repeated) key/value cache one ``decode_attention``
    (module docstring); returns how many."""
    graph = gm.graph
    b = _Builder(graph)
    count = 0
    for node in list(graph.nodes):
        call = _decode_call(node)
        if call is None:
            continue
        with graph.inserting_before(node):
            new = b.call(_ops.decode_attention.default, *call, like=node)
        k, v = (arg_of(node, i, name) for i, name in ((1, "key"), (2, "value")))
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        for rep in (k, v):
            _drop_dead_repeats(rep)
        count += 1
    if count:
        graph.lint()
        gm.recompile()
    return count
