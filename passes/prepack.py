"""Weights packed once, whatever was compiled: the backend's inference graphs read ternary
weights packed ahead of their calls, kept with the weights they come from, not with the graph.

After the rewrite, an inference graph computes each ternary matmul's weight operands from the
model's tensors alone: ``weight_quant(W)`` (absmean ternary codes, packed 2-bit, and scales),
the concatenation of sibling weights (q/k/v, gate/up) into one matmul, and their biases.
:func:`prepack` takes those nodes out of the graph and turns each operand into an input of its
own, which the wrapper it returns (:meth:`Prepacked.guard`) supplies on every call.

What a weight is: a graph input that Dynamo itself treats as one, a ``torch.nn.Parameter`` or a
tensor Dynamo marked static (every parameter and buffer of a module it traced), or a constant of
the graph. That holds however Dynamo reached the model: a compiled module, its ``forward``, a
closure over a local model, a function reading the model from module globals, ``generate()``'s
compiled call.

Where packed operands live: in a cache keyed by the identity of the weight tensors they come
from (held weakly: deleting the model frees its weights and their packed forms). So

* two graphs over the same weights (prefill and decode, a recompile) share one packed copy;
* two instances of one class, which share one compiled graph, each get their own packed
  weights, from one thread or several, and alternating between them re-packs nothing;
* the packed operands are static inputs of the graph (fixed addresses under CUDA graphs, as
  parameters are).

When a weight changes after compiling: before each call the wrapper checks that each source
tensor is the one packed, unchanged: the same object, the same autograd version counter (which
every in-place op bumps: an optimizer step, ``copy_``, ``load_state_dict``) and the same data
pointer (``p.data = t`` rebinds it). Where one differs, the operands it feeds are packed again
and copied into their tensors in place (a CUDA graph replayed next reads the new weights):
results are never stale, with or without CUDA graphs. The one change it cannot see is a write
through ``.data`` into the same memory (it bypasses the version counter, as it bypasses
autograd); after one, call :func:`refresh_all`. Parameters made in inference mode keep no
version counter; a graph whose weights are such tensors packs per call, as a plain graph would.
"""

from __future__ import annotations

import copy
import logging
import operator
import weakref
from typing import Any, Callable, Optional, Union

import torch
from torch import fx
from torch.utils.weak import WeakIdKeyDictionary

import bitfx.ops  # noqa: F401  (registers torch.ops.bitfx.*)
from bitfx.passes.fx_utils import is_cast
from bitfx.passes.naming import Naming
from bitfx.passes.plan import _INLINE_BODIES, _hop_name, graphs_of

__all__ = ["Prepacked", "prepack", "refresh_all", "is_weight"]

log = logging.getLogger("bitfx")

_ops = torch.ops.bitfx
# What may compute a matmul's weight operands from the model's tensors: quantize-and-pack,
# taking its outputs apart, stacking siblings, casts.
_FOLDABLE = {_ops.weight_quant.default, _ops.int8_rows.default, operator.getitem, torch.cat,
             torch.ops.aten.cat.default}
_METHODS = {"contiguous", "to", "float", "half", "bfloat16"}
# The weight operands of the ops that read prepacked weights: a ternary_matmul's packed, w_scale,
# bias; an int8 head's qweight, scale, bias.
_OPERANDS = {_ops.ternary_matmul.default: (2, 3, 4), _ops.int8_linear.default: (1, 2, 3)}
_PREFIX = "bitfx_packed_"

# first source tensor -> {(recipe, ids of the other sources): _Entry}
_CACHE = WeakIdKeyDictionary()
_LIVE: "weakref.WeakSet[Prepacked]" = weakref.WeakSet()
_STATIC = "_dynamo_static_input_type"


def is_weight(t: Any, node: Optional[fx.Node] = None) -> bool:
    """Whether ``t`` (a graph input) is a weight as Dynamo sees one: an ``nn.Parameter``, or a
    tensor Dynamo marked static (the parameters and buffers of the modules it traced)."""
    if not isinstance(t, torch.Tensor):
        return False
    if isinstance(t, torch.nn.Parameter) or getattr(t, _STATIC, None):
        return True
    return bool(node is not None and node.meta.get("tensor_dict", {}).get(_STATIC))


def _foldable(n: fx.Node) -> bool:
    if n.op == "call_function":
        return n.target in _FOLDABLE or is_cast(n)
    if n.op == "call_method":
        return n.target in _METHODS
    return False


def _stamp(t: torch.Tensor) -> tuple[int, int]:
    """``(version, data pointer)``: what changes when a tensor is written in place or rebound."""
    return t._version, t.data_ptr()


class _Recipe:
    """How the packed operands of some weights (one matmul's packed codes, scales and bias, say)
    are computed from those weights: a small graph of its own."""

    def __init__(self, graph: fx.Graph):
        self.module = fx.GraphModule(torch.nn.Module(), graph)
        self.key = self.module.code  # equal recipes over the same tensors give the same operands

    def compute(self, tensors: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        with torch.no_grad():
            return tuple(t.contiguous() for t in self.module(*tensors))


class _Entry:
    """Packed operands and the tensors they were packed from (weakly), with their stamps."""

    __slots__ = ("sources", "stamps", "value", "__weakref__")

    def __init__(self, tensors: list[torch.Tensor], value: tuple[torch.Tensor, ...]):
        self.sources = [weakref.ref(t) for t in tensors]
        self.stamps = [_stamp(t) for t in tensors]
        self.value = value

    def holds(self, tensors: list[torch.Tensor]) -> bool:
        return all(r() is t for r, t in zip(self.sources, tensors))

    def fresh(self, tensors: list[torch.Tensor]) -> bool:
        return all(s == _stamp(t) for s, t in zip(self.stamps, tensors))


def _packed(recipe: _Recipe, tensors: list[torch.Tensor]) -> tuple[tuple[torch.Tensor, ...], bool]:
    """The operands ``recipe`` makes of ``tensors``: from the cache when they are unchanged,
    else packed (again, in place where they were packed before). ``(operands, packed now)``."""
    bucket = _CACHE.get(tensors[0])
    if bucket is None:
        bucket = _CACHE[tensors[0]] = {}
    key = (recipe.key, tuple(id(t) for t in tensors[1:]))
    entry = bucket.get(key)
    if entry is not None and entry.holds(tensors):
        if entry.fresh(tensors):
            return entry.value, False
        new = recipe.compute(tensors)
        if all(a.shape == b.shape and a.dtype == b.dtype for a, b in zip(new, entry.value)):
            for old, v in zip(entry.value, new):
                old.copy_(v)  # the same addresses: a CUDA graph replayed next reads them
        else:
            entry.value = new
        entry.stamps = [_stamp(t) for t in tensors]
        return entry.value, True
    value = recipe.compute(tensors)
    bucket[key] = _Entry(tensors, value)
    return value, True


Source = Union[int, torch.Tensor]  # a graph input's index, or a constant of the graph


class Prepacked:
    """The packed operands of one compiled graph: how they are made, and from which inputs."""

    def __init__(self, operands: list[tuple[_Recipe, list[Source]]]):
        self.operands = operands
        # Every source once (a graph input's index, or a constant tensor), in a fixed order.
        self._positions: list[Source] = []
        for _, sources in operands:
            for s in sources:
                if not any(s is q if isinstance(s, torch.Tensor) else s == q for q in self._positions):
                    self._positions.append(s)
        self.refreshes = 0  # calls that packed some operand again (a weight changed)
        inputs = [s for s in self._positions if isinstance(s, int)]
        self._constants = tuple(s for s in self._positions if not isinstance(s, int))
        # The sources of a call, as one tuple: the graph inputs picked in C, then the constants.
        self._pick_inputs = (operator.itemgetter(*inputs) if len(inputs) > 1
                             else (lambda args: (args[inputs[0]],)) if inputs else (lambda args: ()))
        # The last call's sources (their version counters and data pointers, weakly the tensors)
        # and its operands (weakly): a call whose sources hold the same memory, unchanged, reuses
        # them without a cache lookup. A source's death clears the record (weakref callbacks),
        # so while it stands no other storage can sit at a recorded address.
        self._last: Optional[tuple] = None

    @staticmethod
    def _pick(args, s: Source) -> torch.Tensor:
        return args[s] if isinstance(s, int) else s

    def _sources(self, args) -> tuple:
        return self._pick_inputs(args) + self._constants

    def _forget(self, _ref=None) -> None:
        self._last = None

    def resolve(self, args) -> list[torch.Tensor]:
        """The operands for a call with graph inputs ``args``, packed where needed."""
        pick = self._pick
        values, packed_now = [], False
        for recipe, sources in self.operands:
            tensors = [pick(args, s) for s in sources]
            try:
                value, fresh = _packed(recipe, tensors)
            except RuntimeError:  # an inference tensor: no version counter, nothing to cache
                value, fresh = recipe.compute(tensors), True
            values += value
            packed_now |= fresh
        if packed_now:
            self.refreshes += 1
            log.info("packed %d weight operand(s) from the weights of this call", len(values))
        self._last = None
        try:
            ts = self._sources(args)
            forget = self._forget
            record = ([t._version for t in ts], [t.data_ptr() for t in ts],
                      [weakref.ref(t, forget) for t in ts], [weakref.ref(v, forget) for v in values])
            self._last = record
        except RuntimeError:  # inference tensors keep no version counter: resolve every call
            self._last = None
        return values

    def current(self, args) -> Optional[list[torch.Tensor]]:
        """The last call's operands if this call's sources are the same, unchanged tensors."""
        last = self._last
        if last is None:
            return None
        versions, ptrs, _, refs = last
        ts = self._sources(args)
        try:
            if [t._version for t in ts] != versions or [t.data_ptr() for t in ts] != ptrs:
                return None
        except RuntimeError:  # an inference tensor now
            return None
        values = [r() for r in refs]
        return None if any(v is None for v in values) else values

    def guard(self, compiled: Callable) -> Callable:
        """``compiled`` called with this call's packed operands after its own inputs."""
        current, resolve = self.current, self.resolve

        def run(*args):
            values = current(args)
            if values is None:
                values = resolve(args)
            return compiled(*args, *values)

        run.bitfx_prepacked = self
        return run


def refresh_all() -> int:
    """Pack every weight again at the next call of every compiled graph (for changes the version
    counter does not see: writes through ``.data``). Returns how many graphs."""
    for bucket in list(_CACHE.values()):
        for entry in bucket.values():
            entry.stamps = [(-1, -1)] * len(entry.stamps)
    n = 0
    for p in list(_LIVE):
        p._last = None
        n += 1
    return n


def _matmul_operands(graph: fx.Graph):
    """The weight operands (packed codes, scales, bias) of the graph's ternary matmuls and int8 heads."""
    for n in graph.nodes:
        if n.op == "call_function" and n.target in _OPERANDS:
            for k in _OPERANDS[n.target]:
                a = n.args[k] if k < len(n.args) else None
                if isinstance(a, fx.Node):
                    yield a


def _hoist_from_bodies(gm: fx.GraphModule, is_constant: Callable[[Any], bool]) -> list[fx.Node]:
    """Blocks run through ``torch.utils.checkpoint`` (or ``wrap``) are subgraphs of ``gm``, their
    weights arguments of the call. A weight operand computed inside such a body from weights
    alone is computed before the call instead, in ``gm``, and passed in as one more argument.
    Returns those outer nodes, for :func:`prepack` to take out of ``gm`` with the others."""
    hoisted: list[fx.Node] = []
    for call in list(gm.graph.nodes):
        if not (_hop_name(call) in _INLINE_BODIES and call.args and isinstance(call.args[0], fx.Node)
                and call.args[0].op == "get_attr"):
            continue
        body = getattr(gm, str(call.args[0].target), None)
        if not isinstance(body, fx.GraphModule):
            continue
        body = copy.deepcopy(body)  # the graph Dynamo handed over keeps its own body
        setattr(gm, str(call.args[0].target), body)
        holders = [n for n in body.graph.nodes if n.op == "placeholder"]
        outer = dict(zip(holders, call.args[1:]))
        inner_constant: dict[fx.Node, bool] = {}

        def constant_inside(n: Any) -> bool:
            if not isinstance(n, fx.Node):
                return True
            if n not in inner_constant:
                if n.op == "placeholder":
                    inner_constant[n] = n in outer and is_constant(outer[n])
                else:
                    inner_constant[n] = _foldable(n) and all(constant_inside(a) for a in n.all_input_nodes)
            return inner_constant[n]

        targets = []
        for a in _matmul_operands(body.graph):
            if a.op != "placeholder" and a not in targets and constant_inside(a):
                targets.append(a)
        if not targets:
            continue
        args = list(call.args)
        last = holders[-1]
        for a in targets:
            needed, todo = set(), [a]
            while todo:
                n = todo.pop()
                if n not in needed and n.op != "placeholder":
                    needed.add(n)
                    todo += n.all_input_nodes
            env = dict(outer)
            with gm.graph.inserting_before(call):
                for n in [n for n in body.graph.nodes if n in needed]:
                    env[n] = gm.graph.node_copy(n, env.__getitem__)
            with body.graph.inserting_after(last):
                ph = body.graph.placeholder(f"{_PREFIX}arg_{len(args)}")
            ph.meta.update({k: v for k, v in a.meta.items() if k in ("val", "example_value", "tensor_meta")})
            last = ph
            a.replace_all_uses_with(ph)
            args.append(env[a])
            hoisted.append(env[a])
        call.args = tuple(args)
        body.graph.eliminate_dead_code()
        body.graph.lint()
        body.recompile()
    return hoisted


def _own_copy(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` with a graph of its own: Dynamo reads the inputs of the graph it handed over after
    the backend returns, so inputs are added to a copy. Dynamo's annotations come along."""
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    g.output(g.graph_copy(gm.graph, env))
    for old, new in env.items():
        if hasattr(old, "_dynamo_source"):
            new._dynamo_source = old._dynamo_source
    own = fx.GraphModule(gm, g, class_name=type(gm).__name__)
    for k, v in gm.__dict__.items():
        own.__dict__.setdefault(k, v)
    own.meta = dict(gm.meta)
    return own


def prepack(gm: fx.GraphModule, example_inputs: list, naming: Naming
            ) -> tuple[fx.GraphModule, Optional[Prepacked]]:
    """Take the weight operands of ``gm``'s ternary matmuls out of the graph: each becomes an
    input, appended after the graph's own (see the module docstring). Returns the graph to
    compile (a copy of ``gm``, which is left as it is, or ``gm`` itself when there is nothing to
    take out) and the :class:`Prepacked` whose :meth:`~Prepacked.guard` supplies the operands
    (or None); ``example_inputs`` is extended by their examples (fake tensors of the graph's
    mode, static shapes), for the compiler."""
    if not any(n.op == "call_function" and n.target in _OPERANDS for g in graphs_of(gm) for n in g.graph.nodes):
        return gm, None
    gm = _own_copy(gm)
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    index = {n: i for i, n in enumerate(placeholders)}

    def source(n: fx.Node) -> Optional[torch.Tensor]:
        """The model tensor ``n`` stands for (a weight), else None."""
        if n.op == "get_attr":
            t = getattr(gm, str(n.target), None)
            return t if isinstance(t, torch.Tensor) else None
        if n.op == "placeholder" and index[n] < len(example_inputs):
            t = example_inputs[index[n]]
            if is_weight(t, n) or (isinstance(t, torch.Tensor) and naming.param_names(n)):
                return t
        return None

    constant: dict[fx.Node, bool] = {}

    def is_constant(n: Any) -> bool:
        if not isinstance(n, fx.Node):
            return True
        if n not in constant:
            constant[n] = source(n) is not None or (
                _foldable(n) and all(is_constant(a) for a in n.all_input_nodes))
        return constant[n]

    outputs: list[fx.Node] = _hoist_from_bodies(gm, is_constant)
    for a in _matmul_operands(graph):
        if a not in outputs and source(a) is None and is_constant(a):
            outputs.append(a)
    if not outputs:
        return gm, None

    order = {n: i for i, n in enumerate(graph.nodes)}
    # Operands computed from the same weights (a matmul's packed codes and scales, say) share one recipe.
    groups: dict[tuple, list[fx.Node]] = {}
    needs: dict[fx.Node, set] = {}
    for out in outputs:
        needed, todo = set(), [out]
        while todo:
            n = todo.pop()
            if n not in needed:
                needed.add(n)
                todo += n.all_input_nodes
        needs[out] = needed
        srcs = tuple(sorted((n for n in needed if source(n) is not None), key=order.__getitem__))
        groups.setdefault(srcs, []).append(out)
    operands, folded, outputs = [], set(), []
    for srcs, outs in groups.items():
        nodes = sorted({n for o in outs for n in needs[o] if source(n) is None}, key=order.__getitem__)
        folded.update(nodes)
        g = fx.Graph()
        env = {s: g.placeholder(f"source_{k}") for k, s in enumerate(srcs)}
        for n in nodes:
            env[n] = g.node_copy(n, env.__getitem__)
        g.output(tuple(env[o] for o in outs))
        where = [index[s] if s.op == "placeholder" else source(s) for s in srcs]
        operands.append((_Recipe(g), where))
        outputs += outs
    p = Prepacked(operands)
    values = p.resolve(example_inputs)

    fake_mode = next((v.fake_mode for n in placeholders
                      for v in [n.meta.get("val", n.meta.get("example_value"))] if hasattr(v, "fake_mode")), None)
    last = placeholders[-1] if placeholders else None
    examples = []
    for k, (out, value) in enumerate(zip(outputs, values)):
        with graph.inserting_after(last) if last is not None else graph.inserting_before(next(iter(graph.nodes))):
            ph = graph.placeholder(f"{_PREFIX}{k}")
        last = ph
        example = value
        if fake_mode is not None:
            # Static shapes: the compiler takes this fake for the input rather than fakeify the
            # real tensor, which under dynamic shapes would give its sizes symbols of no source.
            example = fake_mode.from_tensor(value, static_shapes=True)
            for key in ("val", "example_value"):
                if key in out.meta or key in placeholders[0].meta:
                    ph.meta[key] = example
        examples.append(example)
        # A static input, as Dynamo marks a parameter: AOTAutograd then keeps its address fixed
        # under CUDA graphs instead of copying it in every call.
        ph.meta["tensor_dict"] = {_STATIC: "unguarded"}
        ph._dynamo_source = None
        out.replace_all_uses_with(ph)
    for n in sorted(folded, key=order.__getitem__, reverse=True):
        if not n.users:
            graph.erase_node(n)
    graph.lint()
    gm.recompile()
    example_inputs.extend(examples)
    _LIVE.add(p)
    log.info("packed %d weight operand(s) once, from the model's weights", len(outputs))
    return gm, p
