"""Rewrite the RMSNorm -> Linear sites found by :mod:`bitfx.passes.sites` into ``torch.ops.bitfx`` ops.

Inference, per site (one norm feeding linears ``i = 1..``)::

    q, s_x       = bitfx.norm_quant(x, g, eps, offset, cast_before_weight, norm_dtype)   # once
    packed, s_w  = bitfx.weight_quant(W_i, per_channel)                                # per linear
    out_i        = bitfx.ternary_matmul(q, s_x, packed, s_w, b_i, out_dtype_i)

Training, per site (the op's autograd is the straight-through estimator; the norm and the
activation quantization run once for all the site's linears, and their weights are stacked
along N into one matmul)::

    packed, s_w = bitfx.weight_quant_stacked([W_1, W_2, ...], [per_channel_1, ...])  # no gradient
    out, ...    = bitfx.bitlinear_stacked(x, g, [W_1, W_2, ...], packed, s_w, cat(b_1, b_2, ...),
                                          eps, offset, cast_before_weight, norm_dtype, normalize,
                                          fp8_backward)
    out_1, out_2, ... = split(out, [N_1, N_2, ...], -1)

``weight_quant_stacked`` is one opaque node per site (its own kernels on CUDA; traced into aten
ops it made a 350M model's forward compile 13 s longer); the weights also go to
``bitlinear_stacked`` itself, whose backward gives them their straight-through gradients.
Then :func:`pack_once` merges the sites whose weights are the graph's parameters into one
``weight_quant_stacks`` for the whole graph (one op call a step instead of one per site).

The row-preserving ops that stood between the norm and a linear (views, reshapes, indexing of
leading dims; see :func:`bitfx.passes.fx_utils.is_row_op`) are applied to ``x`` instead: the
norm and the quantizer act on each length-K row alone, so they commute with such ops.
``view`` becomes ``reshape`` there (``x`` need not be contiguous where the norm output was).

Linears of a ``bitfx.quantize`` module (``ternary_matmul`` on packed buffers fed by
``act_quant(y)``) keep their packed weights; the norm and ``act_quant`` become one
``norm_quant``. The norm's other users keep the original norm; the nodes that die with the
rewrite (the norm, eager quantizers, the linears) are erased.

One ``norm_quant`` serves every linear of a site that reads the norm output through the same
row ops (usually all of them: none at all); linears reading it through different views get
one each.

Where this plugs in: :mod:`bitfx.backend` runs it on the torch-level graph Dynamo produces,
before ``compile_fx``, so Inductor's caches see and key on the rewritten graph; the training
ops' backward formulas, which are Python traced later, join the caches' keys through
:mod:`bitfx.cache_key`.
"""

from __future__ import annotations

import logging
import operator
from typing import Any, Optional

import torch
from torch import fx

import bitfx.ops  # noqa: F401  (registers torch.ops.bitfx.*, whatever imported this module)
from bitfx import reference as ref
from bitfx.config import BitfxConfig, decide_training
from bitfx.layout import packed_k, stack_offsets, stack_rows
from bitfx.passes.head import int8_heads
from bitfx.passes.naming import Naming
from bitfx.passes.plan import FilterFn, graphs_of, plan_sites
from bitfx.passes.records import LinearUse, Site
from bitfx.passes.sites import analyze_linear, packed_operands

__all__ = ["rewrite_sites", "bitfx_pass", "pack_once"]

log = logging.getLogger("bitfx.passes")

_ops = torch.ops.bitfx
_COPY_META = ("nn_module_stack", "stack_trace", "source_fn_stack")


def _val(n: Any) -> Any:
    if not isinstance(n, fx.Node):
        return n
    return n.meta.get("val", n.meta.get("example_value"))


class _Builder:
    """Creates nodes with ``meta["val"]`` (and ``meta["example_value"]`` on Dynamo graphs)
    computed under the graph's fake mode, so that later passes see consistent shapes."""

    def __init__(self, graph: fx.Graph):
        self.graph = graph
        self.replaced: dict[fx.Node, fx.Node] = {}
        self.keys: tuple[str, ...] = ()
        # The mode that made the graph's own values (not the ambient one: Dynamo hands its
        # backend a fresh fake mode, and fake tensors of two modes do not mix).
        self.fake_mode = None
        for n in graph.nodes:
            keys = tuple(k for k in ("val", "example_value") if k in n.meta)
            if keys and not self.keys:
                self.keys = keys
            mode = getattr(_val(n), "fake_mode", None)
            if mode is not None and self.fake_mode is None:
                self.fake_mode = mode

    def resolve(self, a: Any) -> Any:
        """``a`` with every replaced node (an earlier site's linear) swapped for its replacement."""

        def follow(n: fx.Node) -> fx.Node:
            while n in self.replaced:
                n = self.replaced[n]
            return n

        return fx.node.map_arg(a, follow)

    def replace(self, old: fx.Node, new: fx.Node) -> None:
        old.replace_all_uses_with(new)
        self.replaced[old] = new

    def node(self, op: str, target: Any, args: tuple, kwargs: Optional[dict] = None, like: Optional[fx.Node] = None) -> fx.Node:
        args, kwargs = self.resolve(tuple(args)), self.resolve(dict(kwargs or {}))
        n = self.graph.create_node(op, target, args, kwargs)
        if like is not None:
            for k in _COPY_META:
                if k in like.meta:
                    n.meta[k] = like.meta[k]
        if self.fake_mode is not None and self.keys:
            if all(_val(a) is not None for a in n.all_input_nodes):
                fargs, fkwargs = fx.node.map_arg((args, kwargs), _val)
                with self.fake_mode:
                    if op == "call_method":
                        v = getattr(fargs[0], target)(*fargs[1:], **fkwargs)
                    else:
                        v = target(*fargs, **fkwargs)
                for k in self.keys:
                    n.meta[k] = v
        return n

    def call(self, target, *args, like=None) -> fx.Node:
        return self.node("call_function", target, tuple(args), like=like)

    def getitem(self, n: fx.Node, i: int) -> fx.Node:
        return self.node("call_function", operator.getitem, (n, i))


_VIEW_TO_RESHAPE = {"view": "reshape", "view_as": "reshape_as"}


def _replay_path(b: _Builder, path: list[fx.Node], x: fx.Node) -> fx.Node:
    """Apply the row-preserving ops of ``path`` to ``x`` (views as reshapes)."""
    for p in path:
        target = p.target
        if p.op == "call_method":
            target = _VIEW_TO_RESHAPE.get(target, target)
        elif target in (torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default):
            target = torch.ops.aten.reshape.default
        x = b.node(p.op, target, (x, *p.args[1:]), dict(p.kwargs), like=p)
    return x


def _path_key(path: list[fx.Node]) -> tuple:
    return tuple((p.op, str(p.target), repr(p.args[1:]), repr(p.kwargs)) for p in path)


def _norm_args(site: Site) -> tuple:
    """``(eps, offset, cast_before_weight, norm_dtype)`` of the site's norm; for a site without a
    norm (``site.norm`` None) the dtype its linears compute in, the input's."""
    spec = site.norm
    if spec is None:
        return 0.0, False, False, _val(site.norm_input).dtype
    norm_dtype = spec.norm_dtype
    if norm_dtype is None:
        xd = _val(site.norm_input).dtype
        gd = None if site.norm_weight is None else _val(site.norm_weight).dtype
        norm_dtype = ref.norm_dtype_for(xd, gd, spec.cast_before_weight)
    return float(spec.eps), bool(spec.offset), bool(spec.cast_before_weight), norm_dtype


def _bits(bits: int) -> tuple:
    """The trailing ``bits`` argument of the quantizing ops, left out at its default of 8."""
    return () if bits == 8 else (int(bits),)


def _norm_quant(b: _Builder, site: Site, path: list[fx.Node], bits: int = 8,
                like: Optional[fx.Node] = None) -> tuple[fx.Node, fx.Node]:
    """``(q, s_x)`` of the site's input: ``norm_quant``, or ``act_quant`` for a site without a norm."""
    x = _replay_path(b, path, site.norm_input)
    if site.norm is None:
        nq = b.call(_ops.act_quant.default, x, *_bits(bits), like=like)
    else:
        nq = b.call(_ops.norm_quant.default, x, site.norm_weight, *_norm_args(site), *_bits(bits),
                    like=site.norm_nodes[-1] if site.norm_nodes else like)
    return b.getitem(nq, 0), b.getitem(nq, 1)


def _is_grad_packed(u: LinearUse) -> bool:
    return u.kind == "bitfx" and u.output is not None


def _rewrite_packed(b: _Builder, site: Site, uses: list[LinearUse], order) -> None:
    """Packed (frozen) weights where a gradient must pass: one differentiable
    ``ternary_linear_group`` per set of linears reading the norm through the same row ops
    (output dtype, bias presence and K alike); the norm weight keeps its STE gradient."""
    eps, offset, cbw, norm_dtype = _norm_args(site)
    groups: dict[tuple, list[LinearUse]] = {}
    for u in uses:
        K = packed_operands(u.node)[3]
        groups.setdefault((_path_key(u.path), u.out_dtype, u.bias is not None, K, u.act_bits), []).append(u)
    for (_, out_dtype, has_bias, K, bits), group in groups.items():
        first = min(group, key=lambda u: order[u.node])
        with b.graph.inserting_before(first.node):
            x = _replay_path(b, group[0].path, site.norm_input)
            ops = [packed_operands(u.node) for u in group]
            tlg = b.call(_ops.ternary_linear_group.default, x, site.norm_weight, [o[0] for o in ops],
                         [o[1] for o in ops], [o[2] for o in ops] if has_bias else [], int(K), eps, offset, cbw,
                         norm_dtype, site.norm is not None, out_dtype, *_bits(bits), like=first.node)
            outs = b.getitem(tlg, 0)
            results = [b.getitem(outs, i) for i in range(len(group))]
        for u, out in zip(group, results):
            b.replace(u.result, out)


def _packed_of(b: _Builder, u: LinearUse, per_channel: bool) -> tuple[Any, Any, Any, int]:
    """``(packed, w_scale, bias, in_features)`` of one linear: a packed layer's own buffers, or
    ``weight_quant`` of a dense weight (the backend then packs it once, ahead of the calls)."""
    if u.kind == "bitfx":
        packed, w_scale, bias, K = packed_operands(u.node)
        return packed, w_scale, bias, int(K)
    pc = u.per_channel if u.weight_quant is not None else per_channel
    wq = b.call(_ops.weight_quant.default, u.weight, bool(pc), like=u.node)
    return b.getitem(wq, 0), b.getitem(wq, 1), u.bias, int(_val(u.weight).shape[1])


def _hoist(operands: list[Any], before: fx.Node) -> None:
    """Move the nodes that compute ``operands`` (weights and biases: casts of parameters, never
    activations) in front of ``before``, in order, so that one launch placed there can read them."""
    order = {n: i for i, n in enumerate(before.graph.nodes)}
    at = order[before]
    late: set[fx.Node] = set()
    todo = [a for a in operands if isinstance(a, fx.Node)]
    while todo:
        n = todo.pop()
        if n in late or order[n] < at:
            continue
        late.add(n)
        todo += n.all_input_nodes
    for n in sorted(late, key=order.__getitem__):
        before.prepend(n)


def _fusable(u: LinearUse) -> tuple:
    """Linears reading the same codes that can share one matmul launch: the same output dtype,
    in_features and bias dtype (or no bias)."""
    if u.kind == "bitfx":
        _, _, bias, K = packed_operands(u.node)
    else:
        bias, K = u.bias, _val(u.weight).shape[1]
    return u.out_dtype, int(K), None if bias is None else _val(bias).dtype


def _split_for_users(b: _Builder, part: fx.Node, old: fx.Node) -> fx.Node:
    """``part`` (a column slice of a fused output) made contiguous when a user of ``old`` views
    it in a way a slice cannot be viewed (checked on the fake values)."""
    pv = _val(part)
    if pv is None or b.fake_mode is None:
        return b.node("call_method", "contiguous", (part,))
    for u in old.users:
        if u.op == "call_method" and u.target == "view" or u.target in (torch.Tensor.view, torch.ops.aten.view.default):
            args = fx.node.map_arg(u.args[1:], _val)
            kwargs = fx.node.map_arg(dict(u.kwargs), _val)
            try:
                with b.fake_mode:
                    pv.view(*args, **kwargs)
            except Exception:  # noqa: BLE001 (any failure: the slice cannot be viewed so)
                return b.node("call_method", "contiguous", (part,))
    return part


def _rewrite_inference(b: _Builder, site: Site, uses: list[LinearUse], per_channel: bool, order) -> None:
    """One ``norm_quant`` (``act_quant``) per set of linears reading the same rows; linears of a
    set that agree on output dtype, K and bias share one ``ternary_matmul`` over their weights
    stacked along N (q/k/v, gate/up), whose output is split back into theirs."""
    grad = [u for u in uses if _is_grad_packed(u)]
    if grad:  # a BitfxLinear traced in grad mode: keep its gradient path
        _rewrite_packed(b, site, grad, order)
    groups: dict[tuple, list[LinearUse]] = {}
    for u in uses:
        if not _is_grad_packed(u):
            groups.setdefault((_path_key(u.path), u.act_bits), []).append(u)
    for group in groups.values():
        first = min(group, key=lambda u: order[u.node])
        with b.graph.inserting_before(first.node):
            q, s = _norm_quant(b, site, group[0].path, group[0].act_bits, like=first.node)
        fused: dict[tuple, list[LinearUse]] = {}
        for u in group:
            fused.setdefault(_fusable(u), []).append(u)
        for (out_dtype, K, _), members in fused.items():
            members.sort(key=lambda u: order[u.node])
            at = members[0].node
            if len(members) == 1:
                with b.graph.inserting_before(at):
                    packed, w_scale, bias, _ = _packed_of(b, members[0], per_channel)
                    new = b.call(_ops.ternary_matmul.default, q, s, packed, w_scale, bias, out_dtype, K, like=at)
                b.replace(at, new)
                continue
            _hoist([x for u in members for x in (u.weight, u.bias, *(packed_operands(u.node)[:3]
                    if u.kind == "bitfx" else ()))], at)
            with b.graph.inserting_before(at):
                ops = [_packed_of(b, u, per_channel) for u in members]
                cat = lambda xs: b.call(torch.cat, list(xs), 0, like=at)  # noqa: E731
                bias = cat(o[2] for o in ops) if ops[0][2] is not None else None
                out = b.call(_ops.ternary_matmul.default, q, s, cat(o[0] for o in ops), cat(o[1] for o in ops), bias,
                             out_dtype, K, like=at)
                sizes = [int(_val(o[1]).shape[0]) for o in ops]
                parts = b.call(torch.split, out, sizes, -1, like=at)
                results = [_split_for_users(b, b.getitem(parts, i), u.node) for i, u in enumerate(members)]
            for u, r in zip(members, results):
                b.replace(u.node, r)


def _rewrite_training(b: _Builder, site: Site, uses: list[LinearUse], per_channel: bool, order,
                      fp8_backward: bool = False) -> None:
    packed = [u for u in uses if u.kind == "bitfx"]
    if packed:  # frozen packed weights: a gradient passes to x and the norm weight
        _rewrite_packed(b, site, packed, order)
    eps, offset, cbw, norm_dtype = _norm_args(site)
    # One bitlinear_stacked per set of linears that read the norm through the same row ops and
    # agree on having a bias (the stacked bias covers every weight or none).
    groups: dict[tuple, list[LinearUse]] = {}
    for u in uses:
        if u.kind != "bitfx":
            groups.setdefault((_path_key(u.path), u.bias is not None), []).append(u)
    for group in groups.values():
        group.sort(key=lambda u: order[u.node])
        first = group[0]
        weights = [u.weight for u in group]
        biases = [u.bias for u in group] if first.bias is not None else []
        _hoist(weights + biases, first.node)
        with b.graph.inserting_before(first.node):
            x = _replay_path(b, first.path, site.norm_input)
            flags = [bool(u.per_channel if u.weight_quant is not None else per_channel) for u in group]
            wq = b.call(_ops.weight_quant_stacked.default, weights, flags, like=first.node)
            bias = None if not biases else biases[0] if len(biases) == 1 else b.call(torch.cat, biases, 0, like=first.node)
            bl = b.call(_ops.bitlinear_stacked.default, x, site.norm_weight, weights, b.getitem(wq, 0),
                        b.getitem(wq, 1), bias, eps, offset, cbw, norm_dtype, site.norm is not None, fp8_backward,
                        like=first.node)
            out = b.getitem(bl, 0)
            if len(group) == 1:
                parts = [out]
            else:
                sizes = [int(_val(w).shape[0]) for w in weights]
                split = b.call(torch.split, out, sizes, -1, like=first.node)
                parts = [_split_for_users(b, b.getitem(split, i), u.node) for i, u in enumerate(group)]
            results = []
            for u, part in zip(group, parts):
                if u.out_dtype != norm_dtype:
                    part = b.node("call_method", "to", (part, u.out_dtype), like=u.node)
                results.append(part)
        for u, out in zip(group, results):
            b.replace(u.node, out)


def rewrite_sites(gm: fx.GraphModule, sites: list[Site], *, training: bool, per_channel: bool = False,
                  fp8_backward: bool = False) -> int:
    """Replace each site of ``sites`` (from :func:`find_sites` on this ``gm``) with bitfx ops.

    ``training`` picks the differentiable ``bitlinear`` form; ``per_channel`` the weight
    scales of linears whose weights were dense (eager-quantized ones keep their own grouping);
    ``fp8_backward`` the training ops' FP8 backward matmuls.
    Returns the number of sites rewritten.
    """
    graph = gm.graph
    b = _Builder(graph)
    order = {n: i for i, n in enumerate(graph.nodes)}
    doomed: list[fx.Node] = []
    count = 0
    for site in sites:
        uses = [site.use_of(lin) or analyze_linear(site, lin) for lin in site.linears]
        if training:
            _rewrite_training(b, site, uses, per_channel, order, fp8_backward)
        else:
            _rewrite_inference(b, site, uses, per_channel, order)
        doomed += site.norm_nodes
        for u in uses:
            doomed += u.path + u.nodes + [u.node, u.result]
        count += 1
        log.info(
            "%s %s -> %s (%s%s)",
            "fused" if not training else "bitlinear",
            site.norm_module or (site.norm_nodes[-1].name if site.norm_nodes else
                                 "activation quantization" if site.norm is None else "inserted RMSNorm"),
            ", ".join(m or u.node.name for m, u in zip(site.linear_modules, uses)),
            "training" if training else "inference",
            ", already BitNet" if site.already_bitnet else "",
        )
    _erase_dead(graph, doomed)
    graph.lint()
    gm.recompile()
    return count


def pack_once(graph: fx.Graph) -> int:
    """The training graph's ``weight_quant_stacked`` calls whose weights are the graph's inputs
    (parameters, as Dynamo lifts them, or attributes) made one ``weight_quant_stacks`` per
    device in front of the first, each site then reading its stack as a view of the flat
    outputs (at :func:`bitfx.layout.stack_offsets`'s places). A step then runs one op call and,
    on CUDA, three launches per weight dtype for all its weights, where it ran one call and two
    launches per weight site by site. Weights the graph computes (an all-gather's output, a
    cast) keep their site's op, where they are made; so do the calls of a device that has only
    one. Returns how many calls were merged."""
    by_device: dict[Any, list[fx.Node]] = {}
    for n in graph.nodes:
        if (n.op == "call_function" and n.target is _ops.weight_quant_stacked.default
                and all(isinstance(w, fx.Node) and w.op in ("placeholder", "get_attr")
                        and isinstance(_val(w), torch.Tensor) for w in n.args[0])
                and all(u.op == "call_function" and u.target is operator.getitem and u.args[1] in (0, 1)
                        for u in n.users)):
            by_device.setdefault(_val(n.args[0][0]).device, []).append(n)
    merged = 0
    for calls in by_device.values():
        if len(calls) > 1:
            _merge_packing(graph, calls)
            merged += len(calls)
    return merged


def _merge_packing(graph: fx.Graph, calls: list[fx.Node]) -> None:
    """``calls`` (``weight_quant_stacked`` on one device's graph inputs, in graph order) as one
    ``weight_quant_stacks`` and views of its outputs."""
    b = _Builder(graph)
    weights = [w for n in calls for w in n.args[0]]
    flags = [bool(f) for n in calls for f in n.args[1]]
    stacks = [len(n.args[0]) for n in calls]
    rows = stack_rows([_val(w) for w in weights], stacks)
    offsets, _, _ = stack_offsets(rows)
    first = calls[0]
    _hoist(weights, first)
    with graph.inserting_before(first):
        merged = b.call(_ops.weight_quant_stacks.default, weights, flags, stacks, like=first)
        packed, scale = b.getitem(merged, 0), b.getitem(merged, 1)
        views = []
        for (byte0, row0), (n_rows, K) in zip(offsets, rows):
            Kq = packed_k(K)
            p = b.call(torch.ops.aten.slice.Tensor, packed, 0, byte0, byte0 + n_rows * Kq)
            views.append((b.call(torch.ops.aten.view.default, p, [n_rows, Kq]),
                          b.call(torch.ops.aten.slice.Tensor, scale, 0, row0, row0 + n_rows)))
    for n, pair in zip(calls, views):
        for u in list(n.users):
            u.replace_all_uses_with(pair[u.args[1]])
            graph.erase_node(u)
        graph.erase_node(n)


def _erase_dead(graph: fx.Graph, nodes: list[fx.Node]) -> None:
    """Erase those of ``nodes`` nothing uses any more (users first)."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    for n in sorted({n for n in nodes if n in order}, key=order.__getitem__, reverse=True):
        if not n.users and n.op in ("call_function", "call_method", "call_module"):
            graph.erase_node(n)


def bitfx_pass(gm: fx.GraphModule, config: Optional[BitfxConfig] = None, filter_fn: Optional[FilterFn] = None,
               naming: Optional[Naming] = None) -> int:
    """Find and rewrite all sites of ``gm`` and of the subgraphs it calls (activation
    checkpointing's bodies) as :func:`bitfx.passes.plan.plan_sites` decides, with ``config``
    and ``filter_fn(module, fqn)``. ``naming`` names weights by identity (the backend gives it
    the model). ``config.training`` None is decided by :func:`bitfx.config.decide_training`
    from the values the graph computes (traced under ``no_grad``, none requires grad, whatever
    the parameters say; a graph without values: from its parameters). Returns the number of
    sites rewritten."""
    from bitfx.modules import env_switch

    naming = naming or Naming()
    computed = [_val(n) for n in gm.graph.nodes if n.op not in ("placeholder", "get_attr", "output")]
    traced = [v for v in computed if isinstance(v, torch.Tensor)]
    # A value computed with autograd recording has a grad_fn; traced under no_grad, none has.
    config = decide_training(config, [v for v in traced if v.grad_fn is not None] if traced else list(gm.parameters()))
    training = bool(config.training)
    per_channel = config.per_channel
    fp8_backward = config.backward == "fp8"
    total = 0
    record = gm.meta.setdefault("bitfx", {"converted": [], "dense": {}})
    for g in graphs_of(gm, naming):
        plan = plan_sites(g, config, filter_fn, naming)
        for d in plan.decisions:
            key = d.name or d.node.name
            if d.convert:
                record["converted"].append(key)
            else:
                record["dense"][key] = d.reason
        for r in plan.rejected:
            log.debug("left %s (%s): %s", r.module or r.node.name, r.node.name, r.reason)
        n = rewrite_sites(g, plan.sites, training=training, per_channel=per_channel, fp8_backward=fp8_backward)
        total += n
        if training and env_switch("BITFX_PACK_ONCE", True):
            merged = pack_once(g.graph)
            if merged:
                g.graph.lint()
                g.recompile()
                log.info("packed the weights of %d training sites in one weight_quant_stacks", merged)
        if not training and config.head == "int8":
            int8_heads(g, plan)
        if plan.sites or plan.rejected:
            log.info(
                "rewrote %d site(s), %d linear(s) (%s)%s; left %d norm(s)/linear(s) as they were",
                n, sum(len(s.linears) for s in plan.sites), "training" if training else "inference",
                "" if g is gm else " in a checkpointed block", len(plan.rejected),
            )
    return total
