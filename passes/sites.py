"""Find RMSNorm -> Linear sites in the torch-level FX graph that Dynamo produces.

A *site* is one RMSNorm and the linear layers that consume its output::

    y = rms_norm(x[..., K], g[K]?, eps)              # in any spelling (bitfx.passes.norms)
    out_i = linear(view_i(y), W_i[N_i, K], b_i?)    # i = 1.. (q/k/v, gate/up, fused qkv, ...)

so that :mod:`bitfx.passes.rewrite` can compute ``norm_quant(x)`` once and one ternary matmul
per linear. The finder works on *meaning*, read from the graph and from the shapes and dtypes
in ``node.meta["val"]`` / ``node.meta["example_value"]`` (symbolic sizes allowed), not on
traced patterns.

From each linear (``F.linear`` / ``torch._C._nn.linear`` / ``aten.linear``, which is how
an ``nn.Linear`` call appears, or ``torch.ops.bitfx.ternary_matmul`` fed by
``torch.ops.bitfx.act_quant``, which is how a ``bitfx.quantize`` module appears) the finder
walks its input back through row-preserving ops (view, reshape, contiguous, transpose or
indexing of leading dims, ...: every one keeps each length-K row intact) and through an
eager BitNet activation quantization (:mod:`bitfx.passes.quantizers`) to a norm's output.
The weight may likewise be eagerly quantized. Such already-BitNet linears compute the
numbers of :mod:`bitfx.reference` already; their sites are marked ``already_bitnet``.

A norm whose output feeds no linear (post-norm models such as OLMo2, per-head q/k norms such as
Qwen3's) is reported as :class:`Rejected` with the reason, as is a norm whose linears are all
filtered out or are the output head, and each linear left out of a site that keeps others.

The output head is the linear named like one (last name component in :data:`HEAD_NAMES`:
``lm_head``, ``output``, ...) or, in a graph with no such name, the last linear of the graph
when it is strictly the widest of at least three and wider than its input (a projection into
a vocabulary). Linears that already quantize are never taken for the head.

The same finder reads aten-level graphs (``torch.export``). Not recognized (left dense):
``x @ W.t()`` / ``torch.matmul`` spelled linears, ``call_module`` graphs from
``torch.fx.symbolic_trace``, quantizers inside an ``autograd.Function`` that Dynamo keeps as
one (transformers' ``AutoBitLinear`` online mode traced for training; traced under no_grad its
quantizers are inlined and recognized), an ``eps`` held in a tensor, norms over several dims.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import fx

from bitfx.passes.fx_utils import (
    FLOATS, ROW_OPS, arg_of, dtype_of, is_cast, is_row_op, kind_of, last_dim, real_users, shape_of, static_int,
)
from bitfx.passes.naming import module_fqn
from bitfx.passes.norms import find_norms, norm_module
from bitfx.passes.quantizers import match_act_quant, match_weight_quant, unwrap_quant
from bitfx.passes.records import (
    NO_MATCH, FindResult, LinearUse, Miss, NormMatch, NormSpec, Rejected, Site, not_taken,
)

__all__ = [
    "NormSpec",
    "Site",
    "Rejected",
    "FindResult",
    "LinearUse",
    "find_candidates",
    "analyze_linear",
    "analyze_bare",
    "BARE_DONE",
    "linear_kind",
    "packed_operands",
    "head_nodes",
    "module_fqn",
    "HEAD_NAMES",
]

log = logging.getLogger("bitfx.passes")

# Module names (last component) taken to be the output head of a model.
HEAD_NAMES = frozenset({"lm_head", "output", "embed_out", "head", "score", "classifier"})


# ---------------------------------------------------------------- rows and linears

def linear_kind(n: Any) -> str | None:
    """``"linear"`` for a dense linear call, ``"bitfx"`` for a ternary matmul on packed weights, else None."""
    if not isinstance(n, fx.Node):
        return None
    k = kind_of(n)
    if k == "linear":
        return "linear"
    if k == "bitfx.ternary_matmul":
        return "bitfx"
    if k == "bitfx.ternary_linear_group" and _packed_grad_output(n) is not None:
        return "bitfx"
    return None


def _packed_grad_output(n: fx.Node) -> fx.Node | None:
    """For a ``bitfx.ternary_linear_group`` call of one packed weight and no norm (a
    ``BitfxLinear`` traced in grad mode), the node that reads its output, ``outs[0]``."""
    a = n.args
    if len(a) < 12 or a[1] is not None or a[10] is not False or not isinstance(a[2], (list, tuple)) or len(a[2]) != 1:
        return None
    outs = [u for u in n.users if kind_of(u) == "getitem" and u.args[1] == 0]
    if len(outs) != 1 or len(n.users) != 1:
        return None
    firsts = [u for u in outs[0].users if kind_of(u) == "getitem" and u.args[1] == 0]
    return firsts[0] if len(firsts) == 1 and len(outs[0].users) == 1 else None


def packed_operands(n: fx.Node) -> tuple[Any, Any, Any, Any]:
    """``(packed, w_scale, bias, in_features)`` of a packed (``"bitfx"``) linear call."""
    if kind_of(n) == "bitfx.ternary_linear_group":
        bias = n.args[4][0] if n.args[4] else None
        return n.args[2][0], n.args[3][0], bias, n.args[5]
    return n.args[2], n.args[3], arg_of(n, 4, "bias"), arg_of(n, 6, "in_features")


def _trace_to_norm(inp: Any, outputs: dict[fx.Node, NormMatch], allow_quant: bool):
    """Walk back from a linear's input to a norm output through row ops and (if allowed) one
    eager activation quantizer: ``(norm, path, act_form, quant_nodes)`` or None."""
    n = inp
    path: list[fx.Node] = []
    act, qnodes = None, []
    for _ in range(64):
        if not isinstance(n, fx.Node):
            return None
        norm = outputs.get(n)
        if norm is not None:
            return norm, path[::-1], act, qnodes
        if allow_quant and act is None:
            src, form, _, nodes = unwrap_quant(n, match_act_quant)
            if form is not None:
                act, qnodes, n = form, nodes, src
                # The quantizer's own upcast (``y.float()``) may have been read as the norm's
                # last cast, when the quantizer is the norm's only user: the norm ends there.
                end = next((c for c in nodes if c in outputs), None)
                if end is not None:
                    return outputs[end], path[::-1], act, [c for c in nodes if c is not end]
                continue
        norm_k = last_dim(n)
        if norm_k is not None and is_row_op(n, norm_k):
            path.append(n)
            n = n.args[0]
            continue
        return None
    return None


def _weight_is_parameter(w: fx.Node) -> bool:
    while is_cast(w):
        w = w.args[0]
    return isinstance(w, fx.Node) and w.op in ("placeholder", "get_attr")


def _analyze(linear: fx.Node, outputs: dict[fx.Node, NormMatch]) -> tuple[NormMatch, LinearUse] | Miss:
    """How ``linear`` consumes a norm: ``(norm, use)``, or a :class:`Miss` (a candidate one
    when it reads a norm but cannot be converted)."""
    kind = linear_kind(linear)
    out_dtype = dtype_of(linear)
    if kind == "bitfx" and kind_of(linear) == "bitfx.ternary_linear_group":
        found = _trace_to_norm(linear.args[0], outputs, allow_quant=False)
        if found is None:
            return NO_MATCH
        norm, path, _, _ = found
        path = norm.inner + path
        out = _packed_grad_output(linear)
        bits = linear.args[12] if len(linear.args) > 12 else linear.kwargs.get("bits", 8)
        return norm, LinearUse(
            linear, "bitfx", path, None, packed_operands(linear)[2], "bitfx", "packed", None, dtype_of(out),
            [out.args[0]], output=out, act_bits=int(bits),
        )
    if kind == "bitfx":
        q, s = linear.args[0], linear.args[1]
        if not (kind_of(q) == "getitem" and kind_of(s) == "getitem" and q.args[0] is s.args[0]
                and q.args[1] == 0 and s.args[1] == 1 and kind_of(q.args[0]) == "bitfx.act_quant"):
            return NO_MATCH
        aq = q.args[0]
        found = _trace_to_norm(aq.args[0], outputs, allow_quant=False)
        if found is None:
            return NO_MATCH
        norm, path, _, _ = found
        path = norm.inner + path
        bias = arg_of(linear, 4, "bias")
        return norm, LinearUse(
            linear, "bitfx", path, None, bias, "bitfx", "packed", None, out_dtype, [aq, q, s],
            act_bits=int(arg_of(aq, 1, "bits", 8)),
        )
    found = _trace_to_norm(arg_of(linear, 0, "input"), outputs, allow_quant=True)
    if found is None:
        return NO_MATCH
    norm, path, act, qnodes = found
    use = _dense_use(linear, norm.inner + path, norm.K, "the norm's", act, qnodes)
    return (norm, use) if use else use


def _dense_use(linear: fx.Node, path: list[fx.Node], K: int | None, k_of: str, act: str | None,
               qnodes: list[fx.Node]) -> LinearUse | Miss:
    """The :class:`LinearUse` of a dense linear reading rows of ``K`` features (``k_of``: whose
    K, for the message) through ``path``, its input quantized eagerly in form ``act`` (by
    ``qnodes``) or not; a candidate :class:`Miss` with the reason it cannot be converted."""
    w, bias, out_dtype = arg_of(linear, 1, "weight"), arg_of(linear, 2, "bias"), dtype_of(linear)
    base_w, wform, extra, wnodes = unwrap_quant(w, match_weight_quant)
    per_channel = extra[0] if wform is not None else None
    ws = shape_of(base_w)
    if ws is None or len(ws) != 2 or K is None or static_int(ws[1]) != K or dtype_of(base_w) not in FLOATS:
        return not_taken(f"the weight is not a float [N, K] matrix matching {k_of} K")
    if out_dtype not in FLOATS:
        return not_taken(f"output dtype {out_dtype} is not float32, float16 or bfloat16")
    if (act is None) != (wform is None):
        have, miss = ("activation", "weight") if act is not None else ("weight", "activation")
        return not_taken(f"quantizes its {have} eagerly but not its {miss} in a form bitfx recognizes")
    if not _weight_is_parameter(base_w):
        return not_taken(f"its weight is computed in the graph ({base_w.op} {base_w.target}), not a parameter")
    if bias is not None and (shape_of(bias) is None or len(shape_of(bias)) != 1 or dtype_of(bias) not in FLOATS):
        return not_taken("the bias is not a float [N] vector")
    return LinearUse(linear, "linear", path, base_w, bias, act, wform, per_channel, out_dtype, qnodes + wnodes)


def analyze_linear(site: Site, linear: fx.Node) -> LinearUse:
    """The :class:`LinearUse` of one of ``site.linears`` (re-read from the graph)."""
    spec_norm = NormMatch(site.norm_nodes[-1], site.norm_input, site.norm_weight, site.norm,
                      site.norm_nodes, last_dim(site.norm_input), site.norm_module)
    res = _analyze(linear, {site.norm_nodes[-1]: spec_norm})
    if not res:
        raise ValueError(f"bitfx: {linear.format_node()} does not consume the norm {site.norm_nodes[-1].name}"
                         + (f": {res.reason}" if res.candidate else ""))
    return res[1]


# A linear already ternary with its own activation quantization and nothing to fuse: a
# ``BitfxLinear`` traced in grad mode (``ternary_linear_group`` without a norm). Truthy.
BARE_DONE = "already ternary (a BitfxLinear), nothing to fuse"


def analyze_bare(linear: fx.Node) -> tuple[fx.Node, LinearUse] | str | Miss:
    """How a linear that no RMSNorm feeds becomes ternary: ``(source, use)`` where ``source`` is
    the node whose rows it multiplies (after an eager activation quantizer, if any: the one
    per-token quantization of the rewrite replaces it); :data:`BARE_DONE` for a packed layer
    that needs no rewrite; a candidate :class:`Miss` with the reason it cannot convert."""
    kind = linear_kind(linear)
    out_dtype = dtype_of(linear)
    if kind == "bitfx" and kind_of(linear) == "bitfx.ternary_linear_group":
        return BARE_DONE
    if kind == "bitfx":
        q, s = linear.args[0], linear.args[1]
        if not (kind_of(q) == "getitem" and kind_of(s) == "getitem" and q.args[0] is s.args[0]
                and q.args[1] == 0 and s.args[1] == 1 and kind_of(q.args[0]) == "bitfx.act_quant"):
            return BARE_DONE  # codes made some other way (a norm_quant already): leave them
        aq = q.args[0]
        return aq.args[0], LinearUse(
            linear, "bitfx", [], None, arg_of(linear, 4, "bias"), "bitfx", "packed", None, out_dtype, [aq, q, s],
            act_bits=int(arg_of(aq, 1, "bits", 8)),
        )
    inp = arg_of(linear, 0, "input")
    src, act, _, qnodes = unwrap_quant(inp, match_act_quant) if isinstance(inp, fx.Node) else (inp, None, (), [])
    if not isinstance(src, fx.Node):
        return not_taken("its input is not a tensor of the graph")
    if dtype_of(src) not in FLOATS:
        return not_taken(f"its input is {dtype_of(src)}, not float32, float16 or bfloat16", culprit=src)
    use = _dense_use(linear, [], last_dim(src), "the input's", act, qnodes)
    return (src, use) if use else use


def _out_features(n: fx.Node) -> int | None:
    return last_dim(n)


def head_nodes(linears: list[fx.Node], uses: dict[fx.Node, LinearUse], naming=None) -> set[fx.Node]:
    """The output head: linears named like one (``lm_head``, ``output``, ...), or else the last
    linear of the graph when its out_features is strictly the largest of at least three
    linears and exceeds its in_features (a projection into a vocabulary) and its value reaches
    the graph's output alone (not added to a residual stream). Linears that already quantize
    (BitNet code) are never taken for a head."""
    def name(n):
        if naming is not None:
            u = uses.get(n)
            return naming.weight_name(u.weight if u is not None and u.weight is not None else arg_of(n, 1, "weight"), n)[1]
        return module_fqn(n)

    named = {n for n in linears if (name(n) or "").rsplit(".", 1)[-1] in HEAD_NAMES}
    if named:
        return named
    if len(linears) < 3:
        return set()
    last = linears[-1]
    u = uses.get(last)
    if u is not None and u.act_quant is not None:
        return set()
    n_last = _out_features(last)
    others = [_out_features(n) for n in linears[:-1]]
    k_last = last_dim(arg_of(last, 0, "input")) if linear_kind(last) == "linear" else None
    if n_last is None or any(o is None or o >= n_last for o in others):
        return set()
    if k_last is not None and n_last <= k_last:
        return set()
    if not _feeds_output_alone(last):  # a residual projection adds to the stream; a head's logits are the output
        return set()
    return {last}


def _feeds_output_alone(n: fx.Node) -> bool:
    """Whether ``n``'s value reaches the graph's output through ops of that value alone (casts,
    views, scaling or softcapping by constants), never combined with another tensor."""
    todo, seen = [n], set()
    reached = False
    while todo:
        v = todo.pop()
        for u in v.users:
            if u.op == "output":
                reached = True
            elif u in seen:
                continue
            elif len(u.all_input_nodes) == 1:
                seen.add(u)
                todo.append(u)
            else:
                return False
    return reached


# ---------------------------------------------------------------- the finder

def find_candidates(gm: fx.GraphModule) -> FindResult:
    """All RMSNorm -> Linear sites of ``gm`` (graph order) as the graph allows them, before any
    policy (output head, routers, ``filter_fn``: :func:`bitfx.passes.plan.plan_sites` decides
    those), and the norms and linears that cannot fuse, with the reason. ``dropped`` lists every
    linear that reads a norm but cannot fuse. The graph is not modified.
    """
    graph = gm.graph
    norms, bad = find_norms(graph)
    rejected = [Rejected(n, norm_module(n) or module_fqn(n), f"RMSNorm not supported: {m.reason}", culprit=m.culprit)
                for n, m in bad]
    outputs = {nm.output: nm for nm in norms}
    order = {n: i for i, n in enumerate(graph.nodes)}

    per_norm: dict[fx.Node, list[LinearUse]] = {nm.output: [] for nm in norms}
    dropped: dict[fx.Node, list[Rejected]] = {nm.output: [] for nm in norms}
    all_dropped: list[Rejected] = []
    for lin in graph.nodes:
        if not linear_kind(lin):
            continue
        res = _analyze(lin, outputs)
        if not res:
            if res.candidate:
                # Which norm it hangs off, for the report: trace without the strict checks.
                found = _trace_to_norm(arg_of(lin, 0, "input"), outputs, allow_quant=True)
                if found is not None:
                    r = Rejected(lin, module_fqn(lin), res.reason)
                    dropped[found[0].output].append(r)
                    all_dropped.append(r)
            continue
        norm, use = res
        per_norm[norm.output].append(use)

    sites: list[Site] = []
    for nm in norms:
        kept = sorted(per_norm[nm.output], key=lambda u: order[u.node])
        if not kept:
            rejected.append(Rejected(nm.output, nm.module, _why_no_site(nm, dropped[nm.output]), nm.weight))
            continue
        rejected.extend(dropped[nm.output])
        sites.append(Site(
            norm_input=nm.input,
            norm_weight=nm.weight,
            norm=nm.spec,
            norm_nodes=nm.nodes,
            linears=[u.node for u in kept],
            norm_module=nm.module,
            linear_modules=[module_fqn(u.node) for u in kept],
            already_bitnet=any(u.act_quant is not None for u in kept),
            uses=kept,
        ))
    for s in sites:
        log.debug("site: %s -> %s%s", s.norm_module or s.norm_nodes[-1].name, s.linear_modules,
                  " (already BitNet)" if s.already_bitnet else "")
    return FindResult(sites, rejected, all_dropped)


def _why_no_site(nm: NormMatch, dropped: list[Rejected]) -> str:
    if dropped:
        parts = [f"{r.module or r.node.name}: {r.reason}" for r in dropped]
        return "none of its linears can be converted (" + "; ".join(parts) + ")"
    users = sorted({kind_of(u) or str(u.target) for u in real_users(nm.output)})
    reason = f"its output feeds no linear layer (users: {', '.join(users) or 'none'})"
    src = _producer_linear(nm.input)
    if src is not None:
        reason += (f"; it normalizes the output of linear {module_fqn(src) or src.name} over its last "
                   f"dimension (K={nm.K}): a post-norm or per-head q/k norm")
    return reason


def _producer_linear(n: Any) -> fx.Node | None:
    for _ in range(16):
        if not isinstance(n, fx.Node):
            return None
        if linear_kind(n):
            return n
        if kind_of(n) in ROW_OPS and n.args:
            n = n.args[0]
            continue
        return None
    return None