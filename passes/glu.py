"""A gated MLP's activation, fused into the front of its down projection.

A gated MLP computes ``down(act(gate(x)) * up(x))``. In a backend graph the stacked gate/up
matmul is a bitfx kernel, and so is the front of the down projection (``norm_quant`` where a
norm precedes it, BitNet b1.58's ``ffn_sub_norm``; ``act_quant`` where none does, Llama's). The
activation between them is then a kernel of its own, once per block::

    a = act(gate)                      # silu(gate), or relu(gate) squared
    y = a * up                         # one Inductor kernel: it cannot fuse into a custom op
    q, s_x = bitfx.norm_quant(y, ...)  # or bitfx.act_quant(y)

:func:`fuse_glu_fronts` makes the three one ``bitfx.glu_quant(gate, up, act, ...) -> (q, s_x)``:
the norm kernel computes ``y`` itself from the two rows, as eager torch computes it (each op's
result rounded to the tensors' dtype: :func:`bitfx.reference.glu`), and quantizes it as the
front it replaces would. Taken where:

* the front reads the product directly (no view between), and reads it alone (the product has
  no other user);
* the product is an out-of-place ``*`` of two tensors of one shape and float dtype (no
  broadcast, no type promotion), one of them an activation bitfx computes
  (:data:`bitfx.reference.GLU_ACTS`) of a tensor of that shape and dtype: ``F.silu``
  (not in place), or the square (``torch.square``, ``** 2``, ``r * r``) of a ReLU (not in
  place). Other activations (GELU, ...) keep their kernel;
* the rows fit the kernel's one-pass form (:func:`bitfx.kernels.norm_quant.residual_fits`, static K).

The activation's nodes stay where another node reads them.
"""

from __future__ import annotations

import operator
from typing import Optional

import torch
from torch import fx

import bitfx.ops  # noqa: F401  (registers torch.ops.bitfx.*)
from bitfx.layout import FLOAT_DTYPES
from bitfx.passes.fronts import _front_args
from bitfx.passes.rewrite import _Builder, _erase_dead, _val

__all__ = ["fuse_glu_fronts"]

_ops = torch.ops.bitfx
_aten = torch.ops.aten
_F = torch.nn.functional
_MULS = (operator.mul, torch.mul, torch.Tensor.mul, _aten.mul.Tensor)
_POWS = (operator.pow, torch.pow, torch.Tensor.pow, _aten.pow.Tensor_Scalar)
_SQUARES = (torch.square, torch.Tensor.square, _aten.square.default)
_RELUS = (torch.relu, _F.relu, torch.Tensor.relu, _aten.relu.default)
_SILUS = (_F.silu, _aten.silu.default)


def _calls(node: fx.Node, functions: tuple, method: str) -> bool:
    """Whether ``node`` calls one of ``functions`` or the tensor method ``method``."""
    if node.op == "call_function":
        return node.target in functions
    return node.op == "call_method" and node.target == method


def _not_in_place(node: fx.Node, nargs: int) -> bool:
    """The call has its first ``nargs`` arguments and, beyond them, at most ``inplace=False``."""
    extra = list(node.args[nargs:]) + [v for k, v in node.kwargs.items() if k == "inplace"]
    others = [k for k in node.kwargs if k != "inplace"]
    return len(node.args) >= nargs and not others and all(v is False for v in extra) and len(node.args) <= nargs + 1


def _like(node: fx.Node, ref: torch.Tensor) -> bool:
    """``node``'s value is a tensor of ``ref``'s shape, dtype and device."""
    t = _val(node)
    return isinstance(t, torch.Tensor) and t.shape == ref.shape and t.dtype == ref.dtype and t.device == ref.device


def _operands(node: fx.Node, functions: tuple, method: str) -> Optional[tuple]:
    """The two positional operands of a binary call ``node`` (no keyword arguments)."""
    if not _calls(node, functions, method) or len(node.args) != 2 or node.kwargs:
        return None
    return node.args


def _squared(node: fx.Node) -> Optional[fx.Node]:
    """``r`` where ``node`` is ``r`` squared: ``torch.square(r)``, ``r ** 2``, ``r * r``."""
    if _calls(node, _SQUARES, "square"):
        return node.args[0] if len(node.args) == 1 and not node.kwargs else None
    pair = _operands(node, _POWS, "pow")
    if pair is not None:
        return pair[0] if isinstance(pair[0], fx.Node) and pair[1] in (2, 2.0) and type(pair[1]) is not bool else None
    pair = _operands(node, _MULS, "mul")
    if pair is not None and pair[0] is pair[1]:
        return pair[0]
    return None


def _activation(node, like: torch.Tensor) -> Optional[tuple[fx.Node, str, list[fx.Node]]]:
    """``(gate, act, nodes)`` where ``node`` is ``act(gate)`` of a gated activation bitfx
    computes, every value in it of ``like``'s shape and dtype; ``nodes``: the activation's."""
    if not isinstance(node, fx.Node) or not _like(node, like):
        return None
    if _calls(node, _SILUS, "silu") and _not_in_place(node, 1):
        gate, act, nodes = node.args[0], "silu", [node]
    else:
        r = _squared(node)
        if not (isinstance(r, fx.Node) and _calls(r, _RELUS, "relu") and _not_in_place(r, 1) and _like(r, like)):
            return None
        gate, act, nodes = r.args[0], "relu2", [node, r]
    return (gate, act, nodes) if isinstance(gate, fx.Node) and _like(gate, like) else None


def _glu(product) -> Optional[tuple[fx.Node, fx.Node, str, list[fx.Node]]]:
    """``(gate, up, act, nodes)`` where ``product`` is ``act(gate) * up`` (either order);
    ``nodes``: the product's and the activation's, which the fused op makes unneeded."""
    if not isinstance(product, fx.Node):
        return None
    pair = _operands(product, _MULS, "mul")
    y = _val(product)
    if pair is None or not isinstance(y, torch.Tensor) or y.dtype not in FLOAT_DTYPES or y.dim() == 0:
        return None
    for first, second in (pair, pair[::-1]):
        found = _activation(first, y)
        if found is not None and isinstance(second, fx.Node) and _like(second, y):
            gate, act, nodes = found
            return gate, second, act, [product, *nodes]
    return None


def fuse_glu_fronts(gm: fx.GraphModule) -> int:
    """Make each ``norm_quant`` or ``act_quant`` that reads a gated activation's product (module
    docstring) one ``glu_quant``; returns how many."""
    from bitfx.kernels.norm_quant import residual_fits

    graph = gm.graph
    b = _Builder(graph)
    count = 0
    for front in list(graph.nodes):
        parsed = _front_args(front)
        if parsed is None:
            continue
        product, bits = parsed[0], parsed[-1]
        found = _glu(product)
        if found is None or len(product.users) != 1:
            continue
        K = _val(product).shape[-1]
        if not isinstance(K, int) or not residual_fits(K):
            continue
        gate, up, act, nodes = found
        with graph.inserting_before(front):
            fused = b.call(_ops.glu_quant.default, gate, up, act, *parsed[1:-1], bits, like=front)
        front.replace_all_uses_with(fused)
        graph.erase_node(front)
        _erase_dead(graph, nodes)  # the activation's nodes that nothing else reads
        count += 1
    if count:
        graph.lint()
        gm.recompile()
    return count

