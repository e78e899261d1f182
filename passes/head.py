"""The int8 output head in the backend's inference graphs (``BitfxConfig(head="int8")``).

The output head that ``skip_output_head`` keeps out of the ternary conversion (the plan marks it,
:attr:`bitfx.passes.plan.LinearDecision.head`) becomes::

    qweight, scale = bitfx.int8_rows(W)                 # per output row; prepacked once
    out            = bitfx.int8_linear(x, qweight, scale, b)

``int8_rows`` computes from the weight alone, so :func:`bitfx.passes.prepack.prepack` takes it
out of the graph like the ternary weights' quantization: a decode step reads the int8 codes,
half the bytes of a bf16 head, and quantizes nothing. What ``bitfx.quantize(..., config=
BitfxConfig(head="int8"))`` stores in its :class:`~bitfx.modules.Int8Linear` is the same
``int8_rows`` of the same weight, so the two compute the same logits.
"""

from __future__ import annotations

import logging
import operator

import torch
from torch import fx

import bitfx.ops  # noqa: F401  (registers torch.ops.bitfx.*)
from bitfx.passes.fx_utils import arg_of, kind_of
from bitfx.passes.plan import Plan

__all__ = ["int8_heads"]

log = logging.getLogger("bitfx")


def int8_heads(gm: fx.GraphModule, plan: Plan) -> int:
    """Rewrite each output head of ``plan`` (a dense linear call of ``gm``) to ``int8_linear`` on
    ``int8_rows`` of its weight. Returns the number of heads rewritten; ends with a linted,
    recompiled graph."""
    graph = gm.graph
    count = 0
    for d in plan.decisions:
        lin = d.node
        if not d.head or kind_of(lin) != "linear" or lin.graph is not graph:
            continue
        x, w, b = arg_of(lin, 0, "input"), arg_of(lin, 1, "weight"), arg_of(lin, 2, "bias")
        if not isinstance(w, fx.Node) or len(lin.args) + len(lin.kwargs) > 3:
            log.info("bitfx: output head %s left dense: a linear call of an unexpected form", d.name or lin.name)
            continue
        with graph.inserting_before(lin):
            rows = graph.call_function(torch.ops.bitfx.int8_rows.default, (w,))
            q = graph.call_function(operator.getitem, (rows, 0))
            s = graph.call_function(operator.getitem, (rows, 1))
            out = graph.call_function(torch.ops.bitfx.int8_linear.default, (x, q, s, b))
        val = lin.meta.get("val", lin.meta.get("example_value"))
        wval = w.meta.get("val", w.meta.get("example_value"))
        if wval is not None:
            rows.meta["val"] = torch.ops.bitfx.int8_rows.default(wval)
            q.meta["val"], s.meta["val"] = rows.meta["val"]
        if val is not None:
            out.meta["val"] = val
        out.meta.update({k: v for k, v in lin.meta.items() if k not in ("val", "example_value")})
        lin.replace_all_uses_with(out)
        graph.erase_node(lin)
        count += 1
        log.info("bitfx: output head %s as an int8 head", d.name or lin.name)
    if count:
        graph.lint()
        gm.recompile()
    return count
