"""The residual add in front of a pre-norm site, fused into the site's front.

A pre-norm transformer block adds each sublayer's output to the residual stream and normalizes
the sum for the next sublayer::

    h = residual + out                 # an add of its own: the kernel before it is a matmul
    q, s_x = bitfx.norm_quant(h, ...)  # (Inductor cannot fuse into a custom op)

In a backend graph the add is a kernel of its own, launched once per norm (two per block),
where bf16 Inductor fuses it into its norm's kernel. :func:`fuse_residual_adds` makes such a
pair one ``bitfx.add_norm_quant(residual, out, ...) -> (h, q, s_x)``: the norm kernel adds the
two rows itself, stores ``h`` (torch's ``residual + out`` bit for bit) for the add's other
users, and quantizes the sum as ``norm_quant`` would. Taken where:

* the add is an out-of-place ``+`` of two tensors of the norm input's shape and dtype (no
  broadcast, no ``alpha``, no type promotion), the norm's input exactly (no view between);
* the rows fit the kernel's one-pass form (:func:`bitfx.kernels.norm_quant.residual_fits`,
  static K);
* the norm weight exists where the add stands (the fused op takes the add's place, so that
  ``h`` is there for every user of the sum, and the addends are read where the add read them).
"""

from __future__ import annotations

import operator

import torch
from torch import fx

import bitfx.ops  # noqa: F401  (registers torch.ops.bitfx.*)
from bitfx.layout import FLOAT_DTYPES
from bitfx.passes.rewrite import _Builder, _val

__all__ = ["fuse_residual_adds"]

_ops = torch.ops.bitfx
_ADDS = (operator.add, torch.add, torch.Tensor.add, torch.ops.aten.add.Tensor)
_NORM_ARGS = ("x", "weight", "eps", "offset", "cast_before_weight", "norm_dtype", "bits")


def _addends(node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """``(a, b)`` of an out-of-place ``a + b`` of two tensors of ``node``'s shape and dtype."""
    if node.op == "call_method":
        if node.target != "add" or len(node.args) != 2 or node.kwargs:
            return None
    elif node.op != "call_function" or node.target not in _ADDS or len(node.args) != 2 or node.kwargs:
        return None
    a, b = node.args
    out = _val(node)
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node) and isinstance(out, torch.Tensor)):
        return None
    for t in (_val(a), _val(b)):
        if not (isinstance(t, torch.Tensor) and t.shape == out.shape and t.dtype == out.dtype
                and t.device == out.device):
            return None
    return a, b


def fuse_residual_adds(gm: fx.GraphModule) -> int:
    """Make each ``norm_quant`` whose input is a residual add (module docstring) one
    ``add_norm_quant``; returns how many."""
    from bitfx.kernels.norm_quant import residual_fits

    graph = gm.graph
    b = _Builder(graph)
    count = 0
    for nq in list(graph.nodes):
        if nq.op != "call_function" or nq.target is not _ops.norm_quant.default:
            continue
        args = dict(zip(_NORM_ARGS, nq.args), **nq.kwargs)
        add = args["x"]
        pair = _addends(add) if isinstance(add, fx.Node) else None
        x = _val(add)  # (a tensor wherever pair is not None)
        if pair is None or x.dim() == 0 or x.dtype not in FLOAT_DTYPES:
            continue
        K = x.shape[-1]
        if not isinstance(K, int) or not residual_fits(K):  # rows of a static length the kernel holds
            continue
        if any(u.op != "call_function" or u.target is not operator.getitem for u in nq.users):
            continue
        weight = args["weight"]
        if isinstance(weight, fx.Node):  # the fused op stands where the add stood: the weight before it
            order = {n: i for i, n in enumerate(graph.nodes)}
            if order[weight] > order[add]:
                continue
        with graph.inserting_after(add):
            fused = b.call(_ops.add_norm_quant.default, *pair, weight, args["eps"], args["offset"],
                           args["cast_before_weight"], args["norm_dtype"], args.get("bits", 8), like=nq)
        with graph.inserting_after(fused):
            h = b.getitem(fused, 0)
        for u in list(nq.users):  # q and s_x: items 1 and 2 of the fused op
            with graph.inserting_after(h):
                u.replace_all_uses_with(b.getitem(fused, u.args[1] + 1))
            graph.erase_node(u)
        graph.erase_node(nq)
        add.replace_all_uses_with(h)
        graph.erase_node(add)
        count += 1
    if count:
        graph.lint()
        gm.recompile()
    return count
