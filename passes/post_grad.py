"""Passes over Inductor's post-grad graphs (forward and backward, after AOTAutograd), run by
the backend's post-grad pass slot (:class:`bitfx.cache_key.KeyedPass`).

:func:`concat_gradients`: in a training backward, the gradient of a stacked output
(``bitlinear_stacked``'s ``[..., ΣN]``, split into q/k/v or gate/up in the forward) is
``aten.cat`` of the parts' gradients along the last dimension, then the straight-through
products ``dW = dout^T A`` and ``dy = dout (t / s_w)``. Inductor makes such a cat of computed
parts one pointwise kernel over the whole output (see :mod:`bitfx.ops.lowering` for why that
is slow here); the pass turns it into ``bitfx::concat_buffer``, a buffer the parts' producers
write into. The values are the same: a cat either way.
"""

from __future__ import annotations

import torch
from torch import fx

__all__ = ["concat_gradients"]

_aten = torch.ops.aten
_VIEWS = (_aten.view.default, _aten.reshape.default, _aten._unsafe_view.default)


def _dim(n: fx.Node) -> int:
    return n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)


def _feeds_stacked_product(cat: fx.Node) -> bool:
    """Whether ``cat`` (through views) is the gradient operand of an ``mm`` against a
    ``bitfx::dequantize`` weight: the input-gradient product of the straight-through backward."""
    dequantize = torch.ops.bitfx.dequantize.default
    frontier, seen = [cat], set()
    while frontier:
        n = frontier.pop()
        for u in n.users:
            if u in seen:
                continue
            seen.add(u)
            if u.target in _VIEWS and u.args[0] is n:
                frontier.append(u)
            elif (u.target is _aten.mm.default and u.args[0] is n and isinstance(u.args[1], fx.Node)
                  and u.args[1].target is dequantize):
                return True
    return False


def concat_gradients(graph: fx.Graph) -> int:
    """Replace each last-dimension ``aten.cat`` of two or more parts of one dtype that feeds a
    straight-through input-gradient product with ``bitfx::concat_buffer``. Returns how many
    were replaced (0 where this torch's Inductor cannot lower the op: nothing changes)."""
    from bitfx.ops.lowering import register_concat_buffer

    cats = []
    for n in graph.nodes:
        if n.op != "call_function" or n.target is not _aten.cat.default:
            continue
        parts, val = n.args[0], n.meta.get("val")
        if not isinstance(val, torch.Tensor) or not isinstance(parts, (list, tuple)) or len(parts) < 2:
            continue
        vals = [p.meta.get("val") if isinstance(p, fx.Node) else None for p in parts]
        if not all(isinstance(v, torch.Tensor) and v.dtype == val.dtype and v.dim() == val.dim() for v in vals):
            continue
        if _dim(n) % val.dim() != val.dim() - 1 or not _feeds_stacked_product(n):
            continue
        cats.append(n)
    if not cats or not register_concat_buffer():
        return 0
    for n in cats:
        with graph.inserting_before(n):
            new = graph.call_function(torch.ops.bitfx.concat_buffer.default, (list(n.args[0]), n.meta["val"].dim() - 1))
        new.meta.update(n.meta)
        n.replace_all_uses_with(new)
        graph.erase_node(n)
    graph.lint()
    return len(cats)
