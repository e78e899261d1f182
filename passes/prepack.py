"""Weights packed once: the backend's inference graphs read ternary weights packed ahead of
their calls, and re-packed when a weight changes.

After the rewrite, an inference graph computes each ternary matmul's weight operands from the
model's tensors alone: ``weight_quant(W)`` (absmean ternary codes, packed 2-bit, and scales),
the concatenation of sibling weights (q/k/v, gate/up) into one matmul, and their biases.
:func:`prepack` runs those nodes once, on the real tensors the graph was compiled for, keeps
the results as buffers of the graph module (``get_attr``: Inductor and CUDA graphs see fixed
tensors at fixed addresses) and drops the nodes, so that a call reads 2 bits a weight instead
of quantizing and packing every weight.

What happens when a weight changes after compiling (an evaluation loop inside training, a
``load_state_dict``): :meth:`Prepacked.guard` runs before every call of the compiled graph. It
compares each source tensor with the one the graph is now called with (the same object, and
the same autograd version counter, which every in-place op on a tensor bumps: an optimizer
step, ``copy_``, ``load_state_dict``) and, where one differs, recomputes every packed operand
and copies it into its buffer in place, before the graph runs. The buffers keep their
addresses, so a CUDA graph replayed next reads the new weights: results are never stale, with
and without CUDA graphs. The one change it cannot see is a write through ``.data`` (which
bypasses the version counter, as it bypasses autograd); after one, call
``bitfx.passes.prepack.refresh_all()``: the next call of every compiled graph packs again. Parameters made in inference mode keep
no version counter; a graph whose weights are such tensors packs per call, as before.
The check costs the host about a tenth of a microsecond per weight and call (17 us for the 224
weights of the Llama-3-8B shape, measured on a 2-core CPU host).
"""

from __future__ import annotations

import logging
import operator
import weakref
from typing import Any, Callable, Optional

import torch
from torch import fx

import bitfx.ops  # noqa: F401  (registers torch.ops.bitfx.*)
from bitfx.passes.fx_utils import is_cast
from bitfx.passes.naming import Naming

__all__ = ["Prepacked", "prepack", "refresh_all"]

log = logging.getLogger("bitfx")

_ops = torch.ops.bitfx
# What may compute a matmul's weight operands from the model's tensors: quantize-and-pack,
# taking its outputs apart, stacking siblings, casts.
_FOLDABLE = {_ops.weight_quant.default, operator.getitem, torch.cat, torch.ops.aten.cat.default}
_METHODS = {"contiguous", "to", "float", "half", "bfloat16"}
# The weight operands of a ternary_matmul call: packed, w_scale, bias.
_OPERANDS = (2, 3, 4)

_LIVE: "weakref.WeakSet[Prepacked]" = weakref.WeakSet()


def _foldable(n: fx.Node) -> bool:
    if n.op == "call_function":
        return n.target in _FOLDABLE or is_cast(n)
    if n.op == "call_method":
        return n.target in _METHODS
    return False


class Prepacked:
    """The packed operands of one compiled graph and the tensors they come from."""

    def __init__(self, nodes: list[fx.Node], sources: dict[fx.Node, tuple[Optional[int], torch.Tensor]],
                 outputs: list[fx.Node]):
        # A graph of its own that recomputes the operands from the source tensors (the nodes
        # leave the compiled graph).
        g = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        for k, n in enumerate(sources):
            env[n] = g.placeholder(f"source_{k}")
        for n in nodes:
            env[n] = g.node_copy(n, env.__getitem__)
        g.output(tuple(env[o] for o in outputs))
        self._recompute = fx.GraphModule(torch.nn.Module(), g)
        self._index = list(sources.values())  # (placeholder index or None for get_attr, tensor)
        self._versions = [t._version for _, t in self._index]
        self.buffers: list[torch.Tensor] = []
        self.refreshes = 0  # how many times the weights were packed again

    def _evaluate(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        with torch.no_grad():
            return list(self._recompute(*tensors))

    def stale(self, args) -> bool:
        """Whether a source tensor of this call is not the one packed (another object, or
        changed in place since)."""
        for (i, t), v in zip(self._index, self._versions):
            a = t if i is None else args[i]
            if a is not t or a._version != v:
                return True
        return False

    def refresh(self, args=()) -> None:
        """Pack again from the tensors of this call (``args``: the graph's inputs), in place."""
        self._index = [(i, t if i is None else args[i]) for i, t in self._index]
        for buf, new in zip(self.buffers, self._evaluate([t for _, t in self._index])):
            buf.copy_(new)
        self._versions = [t._version for _, t in self._index]
        self.refreshes += 1
        log.info("a weight changed since it was packed: packed %d operand(s) again", len(self.buffers))

    def guard(self, compiled: Callable) -> Callable:
        """``compiled`` preceded by the staleness check and, where needed, a refresh."""
        stale, refresh = self.stale, self.refresh

        def run(*args):
            if stale(args):
                refresh(args)
            return compiled(*args)

        run.bitfx_prepacked = self
        return run


def refresh_all() -> int:
    """Re-pack every live compiled graph's weights from the tensors it was last called with (for
    changes the version counter does not see: writes through ``.data``). Returns how many."""
    n = 0
    for p in list(_LIVE):
        p._versions = [-1] * len(p._versions)  # the next call re-packs
        n += 1
    return n


def prepack(gm: fx.GraphModule, example_inputs: list, naming: Naming) -> Optional[Prepacked]:
    """Fold the weight operands of ``gm``'s ternary matmuls into buffers of ``gm`` (see the module
    docstring); None where there is nothing to fold (or the weights keep no version counter)."""
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    index = {n: i for i, n in enumerate(placeholders)}

    def source(n: fx.Node) -> Optional[torch.Tensor]:
        """The model tensor ``n`` stands for (a parameter or buffer), else None."""
        if n.op == "get_attr":
            t = getattr(gm, str(n.target), None)
            return t if isinstance(t, torch.Tensor) else None
        if n.op == "placeholder" and naming.param_names(n):
            t = example_inputs[index[n]]
            return t if isinstance(t, torch.Tensor) else None
        return None

    constant: dict[fx.Node, bool] = {}

    def is_constant(n: Any) -> bool:
        if not isinstance(n, fx.Node):
            return True
        if n not in constant:
            constant[n] = source(n) is not None or (
                _foldable(n) and all(is_constant(a) for a in n.all_input_nodes))
        return constant[n]

    outputs: list[fx.Node] = []
    for n in graph.nodes:
        if n.op == "call_function" and n.target is _ops.ternary_matmul.default:
            for k in _OPERANDS:
                a = n.args[k] if k < len(n.args) else None
                if isinstance(a, fx.Node) and a not in outputs and source(a) is None and is_constant(a):
                    outputs.append(a)
    if not outputs:
        return None

    needed: set[fx.Node] = set()
    todo = list(outputs)
    while todo:
        n = todo.pop()
        if n in needed:
            continue
        needed.add(n)
        todo += n.all_input_nodes
    order = {n: i for i, n in enumerate(graph.nodes)}
    nodes = sorted((n for n in needed if source(n) is None), key=order.__getitem__)
    sources = {n: (index.get(n), source(n)) for n in sorted(needed, key=order.__getitem__) if source(n) is not None}
    for _, t in sources.values():
        try:
            t._version
        except RuntimeError:  # an inference tensor: no version counter, no safe way to pack once
            log.warning("bitfx: the model's weights are inference tensors (made under torch.inference_mode), "
                        "which keep no version counter: its weights are packed per call")
            return None

    p = Prepacked(nodes, sources, outputs)
    values = p._evaluate([t for _, t in sources.values()])
    last_placeholder = placeholders[-1] if placeholders else None
    for k, (node, value) in enumerate(zip(outputs, values)):
        name = f"_bitfx_packed_{k}"
        while hasattr(gm, name):
            name += "_"
        value = value.contiguous()
        gm.register_buffer(name, value)
        # A Dynamo graph names where each of its parameters and buffers comes from; AOTAutograd
        # lifts them as static inputs (fixed addresses under CUDA graphs) and asks for that name.
        sources_of = getattr(gm, "_param_name_to_source", None)
        if isinstance(sources_of, dict):
            from torch._dynamo.source import ConstantSource

            sources_of[name] = ConstantSource(name)
        p.buffers.append(value)
        if last_placeholder is not None:
            ctx = graph.inserting_after(last_placeholder)
        else:
            ctx = graph.inserting_before(next(iter(graph.nodes)))
        with ctx:
            ga = graph.get_attr(name)
        ga.meta.update({k2: v for k2, v in node.meta.items() if k2 in ("val", "example_value", "tensor_meta")})
        node.replace_all_uses_with(ga)
    for n in reversed(nodes):
        if not n.users:
            graph.erase_node(n)
    graph.lint()
    gm.recompile()
    _LIVE.add(p)
    log.info("packed %d weight operand(s) once, from %d model tensor(s)", len(outputs), len(sources))
    return p
