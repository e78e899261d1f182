"""One op per ternary linear in the backend's CUDA inference graphs.

After the rewrite a site is ``norm_quant`` (``act_quant`` without a norm) and one
``ternary_matmul`` per set of stacked weights reading its codes. Where the codes and scales feed
nothing else, :func:`fuse_fronts` makes each matmul a ``ternary_linear`` of the site's input:
on CUDA a call is then one op call where it was two (the host cost of a custom op, in default
mode), running the same two kernels; with ``BITFX_FRONT_GEMV=1`` a decode-sized call is one
kernel (:mod:`bitfx.kernels.front_gemv`).
"""

from __future__ import annotations

import operator

import torch
from torch import fx

import bitfx.ops  # noqa: F401  (registers torch.ops.bitfx.*)

__all__ = ["fuse_fronts"]

_ops = torch.ops.bitfx
_NORM_ARGS = ("x", "weight", "eps", "offset", "cast_before_weight", "norm_dtype", "bits")
_ACT_ARGS = ("y", "bits")
_MATMUL_ARGS = ("q", "x_scale", "packed", "w_scale", "bias", "out_dtype", "in_features")


def _named(node: fx.Node, names: tuple[str, ...], defaults: dict) -> dict:
    out = dict(defaults)
    out.update(zip(names, node.args))
    out.update(node.kwargs)
    return out


def _front_args(node: fx.Node) -> tuple | None:
    """``(x, norm_weight, eps, offset, cast_before_weight, norm_dtype, normalize, bits)`` of a
    ``norm_quant`` / ``act_quant`` call, or None for any other node."""
    if node.op != "call_function":
        return None
    if node.target is _ops.norm_quant.default:
        a = _named(node, _NORM_ARGS, {"bits": 8})
        return (a["x"], a["weight"], a["eps"], a["offset"], a["cast_before_weight"], a["norm_dtype"], True, a["bits"])
    if node.target is _ops.act_quant.default:
        a = _named(node, _ACT_ARGS, {"bits": 8})
        return (a["y"], None, 0.0, False, False, torch.float32, False, a["bits"])
    return None


def _matmuls_of(front: fx.Node) -> list[fx.Node] | None:
    """The ``ternary_matmul`` calls reading ``front``'s codes and scales, when nothing else reads
    them (else None)."""
    parts: dict[int, fx.Node] = {}
    for user in front.users:
        if user.op != "call_function" or user.target is not operator.getitem or user.args[1] not in (0, 1):
            return None
        if user.args[1] in parts:  # two getitems of one output: leave such a graph alone
            return None
        parts[user.args[1]] = user
    if set(parts) != {0, 1}:
        return None
    q, s = parts[0], parts[1]
    matmuls = []
    for user in {**q.users, **s.users}:
        if user.op != "call_function" or user.target is not _ops.ternary_matmul.default:
            return None
        a = _named(user, _MATMUL_ARGS, {})
        if a.get("q") is not q or a.get("x_scale") is not s:
            return None
        matmuls.append(user)
    return matmuls or None


def fuse_fronts(gm: fx.GraphModule) -> int:
    """Each ``ternary_matmul`` whose front (``norm_quant`` / ``act_quant``) feeds matmuls only, in
    ``gm`` and the graphs it holds, as one ``ternary_linear`` call; returns how many."""
    fused = 0
    for module in gm.modules():
        if not isinstance(module, fx.GraphModule):
            continue
        graph = module.graph
        changed = False
        for front in list(graph.nodes):
            args = _front_args(front)
            matmuls = _matmuls_of(front) if args is not None else None
            if not matmuls:
                continue
            for mm in matmuls:
                a = _named(mm, _MATMUL_ARGS, {})
                with graph.inserting_before(mm):
                    new = graph.call_function(_ops.ternary_linear.default,
                                              (*args, a["packed"], a["w_scale"], a["bias"], a["out_dtype"],
                                               a["in_features"]))
                new.meta.update(mm.meta)
                mm.replace_all_uses_with(new)
                graph.erase_node(mm)
                fused += 1
            for part in list(front.users):
                graph.erase_node(part)
            graph.erase_node(front)
            changed = True
        if changed:
            graph.lint()
            module.recompile()
    return fused
