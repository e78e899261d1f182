"""One decision, for every linear layer of a graph: converted to ternary or left dense, and why.

The backend, :func:`bitfx.quantize` and :func:`bitfx.explain` all call :func:`plan_sites`, with the
same :class:`~bitfx.config.BitfxConfig` and the same ``filter_fn(module, fqn)``, so the three
cannot disagree. The checks, in order (the first that applies gives the reason):

1. the finder's: the linear reads an RMSNorm output in a form that cannot fuse
   (:func:`bitfx.passes.sites.find_candidates`), or, reading none, cannot quantize its input
   alone (:func:`bitfx.passes.sites.analyze_bare`), or ``config.linears == "sites"``;
2. a MoE router: its output selects experts (it reaches ``topk``/``sort``/``argmax`` through
   element-wise ops), or its module's class is a router: routing decides which weights run, so
   it stays exact;
3. the output head (``config.skip_output_head``): the model's ``get_output_embeddings()``
   weight, or, with no model at hand, a head by name or by shape (:func:`sites.head_nodes`);
4. a weight with several names in the model (tied) or used elsewhere in the graph (an
   embedding lookup, another linear that is not converted): converting one use would change the
   others, or (for ``quantize``) untie them;
5. ``filter_fn(module, fqn)`` returned False.

Linears no RMSNorm feeds become sites without a norm (``site.norm`` None: the per-token
activation quantization alone), one per input they share; with ``config.linears == "norm"``
a weightless RMSNorm is inserted in front of the float ones.

A linear that is converted may still be one that :func:`bitfx.quantize` cannot swap for a
:class:`~bitfx.modules.BitfxLinear` (a functional ``F.linear``, a subclass that overrides
``forward``, an already converted layer): ``replace_reason`` says why; the backend converts it
all the same, since it rewrites the graph, not the module.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from torch import fx, nn

from bitfx.config import BitfxConfig
from bitfx.passes.fx_utils import ROW_OPS, arg_of, is_cast, kind_of, real_users
from bitfx.passes.naming import Naming, module_type_name
from bitfx.passes.records import FindResult, LinearUse, Miss, NormSpec, Rejected, Site
from bitfx.passes.sites import BARE_DONE, analyze_bare, find_candidates, head_nodes, linear_kind, packed_operands

__all__ = ["LinearDecision", "Plan", "plan_sites", "find_sites", "check_filter_fn", "FilterFn", "graphs_of"]

log = logging.getLogger("bitfx")

FilterFn = Callable[[Optional[nn.Module], str], bool]

# Ops whose result selects among alternatives: a linear feeding one of them routes.
_SELECTORS = frozenset({"topk", "sort", "argsort", "argmax", "argmin", "kthvalue", "multinomial"})
# Ops a router's scores do not pass through on their way to the selection.
_ROUTE_STOPS = frozenset({"linear", "mm", "bmm", "matmul", "addmm", "scaled_dot_product_attention", "embedding"})
_ROUTE_DEPTH = 8


@dataclass
class LinearDecision:
    """The decision for one linear call of a graph."""

    node: fx.Node
    name: Optional[str]  # module fqn (``model.layers.0.self_attn.q_proj``), None when unknown
    module: Optional[nn.Module]  # the module that holds the weight, None without a model
    site: Optional[Site]  # the site it belongs to (None: no RMSNorm in front)
    convert: bool
    reason: Optional[str] = None  # why it stays dense (None when converted)
    replace_reason: Optional[str] = None  # why quantize cannot swap its module (None: it can)
    # a linear no RMSNorm feeds that can quantize its input alone (a site without a norm when
    # converted; it still counts as one when a later check keeps it dense)
    bare: bool = False
    # the model's output head, kept out of the ternary conversion (skip_output_head); with
    # BitfxConfig(head="int8") it becomes an int8 head instead
    head: bool = False

    @property
    def quantize(self) -> bool:
        """Whether :func:`bitfx.quantize` converts it (swaps its module)."""
        return self.convert and self.replace_reason is None


@dataclass
class Plan:
    sites: list[Site]  # the sites to rewrite, each with only its converted linears
    decisions: list[LinearDecision]  # every linear of the graph, in graph order
    rejected: list[Rejected] = field(default_factory=list)  # norms and linears left out, and why


def check_filter_fn(filter_fn: Any) -> Optional[FilterFn]:
    """``filter_fn`` if it can be called as ``filter_fn(module, fqn)``; a TypeError naming the
    problem otherwise (the one-argument ``filter_fn(fqn)`` of earlier releases, say)."""
    if filter_fn is None:
        return None
    if not callable(filter_fn):
        raise TypeError(f"bitfx: filter_fn must be a callable filter_fn(module, fqn) -> bool, got {type(filter_fn).__name__}")
    try:
        inspect.signature(filter_fn).bind(None, "")
    except TypeError:
        raise TypeError(
            "bitfx: filter_fn must take two arguments, filter_fn(module, fqn) -> bool (module is the "
            "nn.Module holding the weight, or None for a functional linear; fqn its name such as "
            "'model.layers.0.mlp.up_proj'); the same for torch.compile's backend, bitfx.quantize and bitfx.explain"
        ) from None
    except ValueError:  # no signature to read (a builtin): call it and see
        pass
    return filter_fn


def _op_name(n: fx.Node) -> str:
    if n.op == "call_method":
        return str(n.target)
    if n.op != "call_function":
        return ""
    t = n.target
    packet = getattr(t, "overloadpacket", None)
    if packet is not None:
        return getattr(packet, "__name__", str(packet)).rsplit(".", 1)[-1]
    return getattr(t, "__name__", str(t)).rsplit(".", 1)[-1]


def _selects_experts(linear: fx.Node) -> bool:
    """The linear's output reaches a selection (``topk``...) within a few element-wise steps."""
    frontier, seen = [linear], {linear}
    for _ in range(_ROUTE_DEPTH):
        nxt = []
        for n in frontier:
            for u in real_users(n):
                name = _op_name(u)
                if name in _SELECTORS:
                    return True
                if u in seen or name in _ROUTE_STOPS or linear_kind(u):
                    continue
                seen.add(u)
                nxt.append(u)
        frontier = nxt
    return False


def _is_router(linear: fx.Node, module: Optional[nn.Module]) -> bool:
    cls = type(module).__name__ if module is not None else (module_type_name(linear) or "")
    return "router" in cls.lower() or _selects_experts(linear)


def _weight_node(n: fx.Node) -> Any:
    """The weight operand of a linear call (the packed buffer of a bitfx one)."""
    if linear_kind(n) == "bitfx":
        return packed_operands(n)[0]
    return arg_of(n, 1, "weight")


def _source(n: Any) -> Any:
    while is_cast(n):
        n = n.args[0]
    return n


def _replace_reason(kind: str, module: Optional[nn.Module], weight_leaf: bool) -> Optional[str]:
    if kind == "bitfx":  # a BitfxLinear's packed weights
        return "already converted (a BitfxLinear)"
    if module is None or not weight_leaf:
        return "a functional linear (no nn.Linear module to replace)"
    if not isinstance(module, nn.Linear):
        return f"a {type(module).__name__}, not an nn.Linear"
    if type(module).forward is not nn.Linear.forward:
        return (
            f"{type(module).__name__} overrides nn.Linear.forward, and replacing it would drop what that forward "
            f"adds; torch.compile(model, backend='bitfx') fuses it instead"
        )
    return None


def plan_sites(gm: fx.GraphModule, config: Optional[BitfxConfig] = None, filter_fn: Optional[FilterFn] = None,
               naming: Optional[Naming] = None) -> Plan:
    """Decide every linear of ``gm``; see the module's docstring for the rules.

    ``config``: what to convert (``linears``, ``skip_output_head``; None: the defaults);
    ``naming``: how to name weights (by identity when it has the model); ``filter_fn(module, fqn)``.
    The graph is not modified.
    """
    filter_fn = check_filter_fn(filter_fn)
    naming = naming or Naming()
    config = config or BitfxConfig()
    skip_head = config.skip_output_head
    found = find_candidates(gm)
    site_of = {lin: s for s in found.sites for lin in s.linears}
    structural = {r.node: r for r in found.dropped}
    rejected = [_renamed(r, naming) for r in found.rejected]

    linears = [n for n in gm.graph.nodes if linear_kind(n)]
    head_ids = naming.output_heads() if skip_head else set()
    heads_by_shape = set()
    if skip_head and not head_ids:
        uses = {u.node: u for s in found.sites for u in s.uses}
        heads_by_shape = head_nodes(linears, uses, naming)

    opaque = _opaque_norm_outputs(gm)
    mode = config.linears
    decisions: list[LinearDecision] = []
    bare: dict[fx.Node, tuple[fx.Node, LinearUse]] = {}
    for lin in linears:
        kind = linear_kind(lin)
        site = site_of.get(lin)
        use = site.use_of(lin) if site is not None else None
        alone = None  # analyze_bare's answer, for a linear no RMSNorm feeds
        if site is None and mode != "sites" and lin not in structural:
            alone = analyze_bare(lin)
            if isinstance(alone, tuple):
                use = alone[1]
        w = use.weight if use is not None and use.weight is not None else _weight_node(lin)
        module, name = naming.weight_name(w, call=lin)
        names = naming.param_names(w)
        weight_leaf = kind == "linear" and (not names or f"{name}.weight" in names)
        d = LinearDecision(lin, name, module, site, convert=False)
        d.replace_reason = _replace_reason(kind, module, weight_leaf)
        quantizes = use is not None and use.act_quant is not None  # BitNet code of the model's own
        if site is None and not isinstance(alone, tuple):
            r = structural.get(lin)
            fn = _opaque_norm(lin, opaque)
            if r is not None:
                d.reason = r.reason
            elif alone == BARE_DONE:
                d.convert = True
            elif isinstance(alone, Miss) and alone.candidate:
                d.reason = alone.reason
                rejected.append(Rejected(lin, name, d.reason, culprit=alone.culprit))
            elif fn is not None:
                d.reason = (f"its input is an RMSNorm computed inside a torch.autograd.Function {fn}, which "
                            f"Dynamo keeps whole when it traces for training: the norm cannot fuse (it does "
                            f"under torch.no_grad())")
                rejected.append(Rejected(lin, name, d.reason))
                log.warning("bitfx: %s left dense: %s", name or lin.name, d.reason)
            else:
                d.reason = "no RMSNorm feeds it (linears='sites')"
        elif kind == "bitfx":
            d.convert = True  # packed already: the rewrite only fuses the quantization into it
        elif _is_router(lin, module):
            d.reason = "a MoE router (its output selects experts); routing stays exact"
        elif quantizes:
            d.convert = True  # the model quantizes here itself: fusing changes no number
            d = _filtered(d, filter_fn, module, name)
        elif skip_head and (id(naming.tensor(w)) in head_ids or lin in heads_by_shape):
            d.head = kind == "linear"
            d.reason = "output head (skip_output_head=True)" if lin not in heads_by_shape else (
                "output head, guessed by shape: the model declares none (get_output_embeddings) and this is the "
                "graph's last and widest linear, feeding the output alone (skip_output_head=True)")
            if d.head and config.head == "int8":
                d.reason += "; int8 weights per output row (head='int8'" + (
                    ", inference only)" if config.training is not False else ")")
            if lin in heads_by_shape:
                log.warning("bitfx: %s left dense as the output head, guessed by shape (the model declares no "
                            "get_output_embeddings()); pass skip_output_head=False or a filter_fn to decide it",
                            d.name or lin.name)
        elif len(names) > 1:
            others = [x for x in names if x != f"{name}.weight"] or names[1:]
            d.reason = f"its weight is shared (tied) with {', '.join(others)}"
        else:
            other = _other_use(lin, w)
            if other is not None:
                d.reason = f"its weight is also used by {other}"
            else:
                d.convert = True
                d = _filtered(d, filter_fn, module, name)
        if isinstance(alone, tuple):
            bare[lin] = alone
            d.bare = True
            if d.convert and _opaque_norm(lin, opaque) is not None:
                log.info("bitfx: %s quantizes its input itself: the RMSNorm in front of it runs inside a "
                         "torch.autograd.Function and cannot fuse", name or lin.name)
        decisions.append(d)

    _one_decision_per_weight(decisions, naming)

    sites: list[Site] = []
    for s in found.sites:
        mine = [d for d in decisions if d.site is s]
        kept = [d for d in mine if d.convert]
        dropped = [d for d in mine if not d.convert]
        if not kept:
            parts = [f"{d.name or d.node.name}: {d.reason}" for d in dropped]
            rejected.append(Rejected(s.norm_nodes[-1], _norm_name(s, naming),
                                     "none of its linears can be converted (" + "; ".join(parts) + ")"))
            continue
        rejected.extend(Rejected(d.node, d.name, d.reason) for d in dropped if d.node not in structural)
        site = s.restricted([d.node for d in kept], [d.name for d in kept])
        site.norm_module = _norm_name(s, naming)
        sites.append(site)
    sites += _bare_sites(decisions, bare, mode, config.norm_eps)
    position = {n: i for i, n in enumerate(gm.graph.nodes)}
    sites.sort(key=lambda s: position[s.linears[0]])
    return Plan(sites, decisions, rejected)


def _bare_sites(decisions: list[LinearDecision], bare: dict, mode: str, norm_eps: float) -> list[Site]:
    """The converted linears no RMSNorm feeds, as sites without a norm (``site.norm`` None: the
    per-token activation quantization alone), one per input they share (``linears="norm"``: an
    inserted weightless RMSNorm for the float ones; a model's own BitNet code keeps its own)."""
    groups: dict[tuple, list[tuple[LinearDecision, LinearUse]]] = {}
    for d in decisions:
        if d.convert and d.node in bare:
            source, use = bare[d.node]
            insert = mode == "norm" and use.act_quant is None
            groups.setdefault((source, insert), []).append((d, use))
    sites = []
    for (source, insert), members in groups.items():
        spec = NormSpec(float(norm_eps), False, False, None) if insert else None
        uses = [u for _, u in members]
        site = Site(source, None, spec, [], [d.node for d, _ in members], None, [d.name for d, _ in members],
                    any(u.act_quant is not None for u in uses), uses)
        for d, _ in members:
            d.site = site
        sites.append(site)
    return sites


def _norm_name(site: Site, naming: Naming) -> Optional[str]:
    """The norm module's name: the owner of its weight, by identity; else the finder's."""
    if site.norm_weight is not None:
        mod, fqn = naming.owner(site.norm_weight)
        if mod is not None:
            return fqn
    return site.norm_module


def _renamed(r: Rejected, naming: Naming) -> Rejected:
    """``r`` named by identity where its node is a linear or a norm whose weight the model owns."""
    if linear_kind(r.node):
        mod, name = naming.weight_name(_weight_node(r.node), call=r.node)
        return Rejected(r.node, name if mod is not None else r.module, r.reason)
    if r.weight is not None:
        mod, fqn = naming.owner(r.weight)
        if mod is not None:
            return Rejected(r.node, fqn, r.reason, r.weight, r.culprit)
    return r


def _opaque_norm_outputs(gm: fx.GraphModule) -> dict[fx.Node, str]:
    """Outputs of ``torch.autograd.Function`` calls (Dynamo's ``autograd_function_apply``,
    kept whole in training graphs) whose forward computes an RMSNorm -> the Function's name."""
    from bitfx.passes.norms import find_norms

    out: dict[fx.Node, str] = {}
    for n in gm.graph.nodes:
        if _hop_name(n) != "autograd_function_apply" or not n.args or not isinstance(n.args[0], fx.Node):
            continue
        fwd = getattr(gm, str(n.args[0].target), None)
        if not isinstance(fwd, fx.GraphModule) or not find_norms(fwd.graph)[0]:
            continue
        lines = [ln.strip() for ln in str(n.meta.get("stack_trace") or "").splitlines()
                 if ln.strip() and set(ln.strip()) != {"^"} and not ln.strip().startswith("File ")]
        name = f"called at `{lines[-1]}`" if lines else f"({n.args[0].target})"
        out[n] = name
        for u in n.users:
            out[u] = name
    return out


def _opaque_norm(lin: fx.Node, opaque: dict[fx.Node, str]) -> Optional[str]:
    """The autograd.Function whose RMSNorm ``lin`` reads (through row-preserving ops), or None."""
    if not opaque:
        return None
    n = arg_of(lin, 0, "input")
    for _ in range(16):
        if not isinstance(n, fx.Node):
            return None
        if n in opaque:
            return opaque[n]
        if kind_of(n) in ROW_OPS and n.args:
            n = n.args[0]
            continue
        return None
    return None


def _filtered(d: LinearDecision, filter_fn, module, name) -> LinearDecision:
    if filter_fn is not None and not filter_fn(module, name or ""):
        d.convert, d.reason = False, "filter_fn returned False"
    return d


def _other_use(lin: fx.Node, w: Any) -> Optional[str]:
    """A use of the weight ``w`` (through casts) other than as a linear's weight: an embedding
    lookup of a tied weight, say. Eager quantizer nodes of ``lin`` itself do not count."""
    src = _source(w)
    if not isinstance(src, fx.Node):
        return None
    todo, seen = [src], set()
    while todo:
        n = todo.pop()
        for u in real_users(n):
            if u in seen:
                continue
            seen.add(u)
            if is_cast(u):
                todo.append(u)
            elif linear_kind(u) and _source(_weight_node(u)) is src:
                continue
            elif u is lin or _feeds_only(u, lin):
                continue
            else:
                return f"{_op_name(u) or u.op} ({u.name})"
    return None


def _feeds_only(n: fx.Node, lin: fx.Node, depth: int = 12) -> bool:
    """Every path from ``n`` leads into ``lin`` (an eager weight quantizer of that linear)."""
    if depth == 0:
        return False
    users = real_users(n)
    return bool(users) and all(u is lin or _feeds_only(u, lin, depth - 1) for u in users)


def _one_decision_per_weight(decisions: list[LinearDecision], naming: Naming) -> None:
    """A weight read by several linear calls gets one decision: if any use stays dense, all do
    (a module used once after a norm and once without one, say)."""
    groups: dict[Any, list[LinearDecision]] = {}
    for d in decisions:
        w = _weight_node(d.node)
        t = naming.tensor(w)
        key = ("t", id(t)) if t is not None else ("n", _source(w))
        groups.setdefault(key, []).append(d)
    for group in groups.values():
        dense = [d for d in group if not d.convert]
        if not dense or len(dense) == len(group):
            continue
        why = dense[0]
        for d in group:
            if d.convert:
                d.convert = False
                d.reason = (f"the same weight is also used by {why.node.name} "
                            f"({why.reason}); one weight gets one decision")


def find_sites(gm: fx.GraphModule, *, filter_fn: Optional[FilterFn] = None, skip_output_head: bool = True,
               naming: Optional[Naming] = None) -> FindResult:
    """The sites :func:`plan_sites` converts, and every candidate left out with its reason."""
    plan = plan_sites(gm, BitfxConfig(skip_output_head=skip_output_head, linears="sites"), filter_fn, naming)
    return FindResult(plan.sites, plan.rejected)


# Higher-order ops whose first argument is a subgraph run in line on the remaining arguments
# (activation checkpointing's body, ``wrap``): sites inside them are rewritten in place.
_INLINE_BODIES = ("tag_activation_checkpoint", "wrap")


def _hop_name(n: fx.Node) -> str:
    return getattr(n.target, "__name__", "") if n.op == "call_function" else ""


def graphs_of(gm: fx.GraphModule, naming: Optional[Naming] = None) -> list[fx.GraphModule]:
    """``gm`` and the bodies of the checkpointed regions it calls (recursively), each body's
    placeholders tied in ``naming`` to the outer arguments they stand for."""
    out = [gm]
    for n in gm.graph.nodes:
        if _hop_name(n) in _INLINE_BODIES and n.args and isinstance(n.args[0], fx.Node) and n.args[0].op == "get_attr":
            body = getattr(gm, str(n.args[0].target), None)
            if isinstance(body, fx.GraphModule):
                if naming is not None:
                    naming.link_subgraph(n, body)
                out += graphs_of(body, naming)
    return out
