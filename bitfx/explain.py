"""``bitfx.explain``: which linear layers bitfx converts in a model (at RMSNorm -> Linear sites,
and, by default, every other linear but the head, embeddings and routers), and why it passes
over the others.

The report is what :func:`bitfx.quantize` acts on (the same tracing, the same site finder),
in plain data: a person reads ``print(report)``, a program reads ``report.sites`` or
``report.to_dict()``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import itertools
import logging
import threading
import types
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from bitfx.config import BitfxConfig, checked_filter_fn, decide_training
from bitfx.passes.naming import Naming
from bitfx.passes.plan import FilterFn, check_filter_fn, graphs_of, plan_sites

__all__ = [
    "explain",
    "ExplainReport",
    "SiteInfo",
    "RejectedInfo",
    "SkippedLinear",
    "DenseWeight",
    "LinearInfo",
    "capture_graphs",
    "example_inputs_for",
]

logger = logging.getLogger("bitfx")

_DUMMY_SEQ_LEN = 8


@dataclass(frozen=True)
class SiteInfo:
    """One RMSNorm and the linear layers that consume its output (module names, fqn)."""

    norm_module: Optional[str]
    linear_modules: tuple[Optional[str], ...]
    eps: float
    offset: bool  # the norm multiplies by (1 + weight), Gemma-style
    cast_before_weight: bool  # normalized value rounded to the input dtype before the weight (Llama)
    norm_dtype: Optional[str]  # the norm's output dtype when the model fixes it, else None
    has_weight: bool
    already_bitnet: bool  # the model quantizes here itself (straight-through BitLinear code)
    # "norm": the model's RMSNorm, fused; "act": no norm, the input is quantized per token as it
    # is; "inserted": a weightless RMSNorm bitfx inserts (BitfxConfig(linears="norm"))
    kind: str = "norm"

    @property
    def norm_kind(self) -> str:
        """E.g. ``RMSNorm(eps=1e-06): y = r * (1 + w), r rounded to x.dtype first; out bfloat16``."""
        if self.kind == "act":
            return "no RMSNorm: the input is quantized per token (int8) as it is"
        if self.kind == "inserted":
            return f"inserted RMSNorm(eps={self.eps:g}): y = r (no weight)"
        if not self.has_weight:
            y = "y = r (no weight)"
        else:
            y = "y = r * (1 + w)" if self.offset else "y = r * w"
            y += ", r rounded to x.dtype first" if self.cast_before_weight else ", in fp32"
        out = f"; out {self.norm_dtype}" if self.norm_dtype else ""
        return f"RMSNorm(eps={self.eps:g}): {y}{out}"


@dataclass(frozen=True)
class RejectedInfo:
    """A candidate (a norm or a linear layer) the finder looked at and did not take."""

    module: Optional[str]
    node: str  # the FX node, for candidates that belong to no module
    reason: str


@dataclass(frozen=True)
class SkippedLinear:
    """A linear layer the backend converts but :func:`bitfx.quantize` cannot swap for a
    module (a functional linear, a subclass that overrides ``forward``, one already converted)."""

    module: str
    reason: str


@dataclass(frozen=True)
class DenseWeight:
    """A float parameter of more than two dimensions that the traced graph reads: a weight that
    no linear layer holds (the experts of a fused mixture of experts, a convolution, a batched
    matmul), which neither the backend nor :func:`bitfx.quantize` converts."""

    name: str
    shape: tuple
    reason: str


# Why a weight of more than two dimensions stays as it is.
DENSE_WEIGHT_REASON = (
    "a weight of more than two dimensions (fused mixture-of-experts weights, a convolution, a batched matmul): "
    "bitfx converts linear layers, whose weights are 2-D, so this one stays dense"
)


@dataclass(frozen=True)
class LinearInfo:
    """The decision for one linear layer (:func:`bitfx.passes.plan.plan_sites`)."""

    module: Optional[str]
    node: str
    converted: bool  # by the backend (the graph is rewritten)
    quantized: bool  # by bitfx.quantize (the module is swapped)
    reason: Optional[str]  # why it stays dense, None when converted
    replace_reason: Optional[str]  # why bitfx.quantize cannot swap it, None when it can
    at_site: bool = False  # it belongs to a site (an RMSNorm's, or one without a norm)
    head: bool = False  # the output head skip_output_head keeps dense (int8 with head="int8")


@dataclass
class ExplainReport:
    sites: list[SiteInfo] = field(default_factory=list)
    rejected: list[RejectedInfo] = field(default_factory=list)
    skipped: list[SkippedLinear] = field(default_factory=list)
    graphs: int = 0  # graphs Dynamo produced; more than one means graph breaks
    decisions: list[LinearInfo] = field(default_factory=list)  # every linear call traced
    training: bool = False  # traced as the backend sees a training call
    # RMSNorm modules whose whole forward is the norm of a site, by name: the spec an eager run
    # of them in one kernel needs (bitfx.fused_norm; None where two traces of one disagree)
    norm_modules: dict = field(default_factory=dict)
    dense_weights: list[DenseWeight] = field(default_factory=list)  # weights no linear holds, left dense

    @property
    def converted(self) -> list[str]:
        """Names of the linear layers the backend converts, in graph order."""
        out: list[str] = []
        for d in self.decisions:
            if d.converted and d.module is not None and d.module not in out:
                out.append(d.module)
        return out

    @property
    def linears(self) -> list[str]:
        """Names of the linear layers :func:`bitfx.quantize` converts, in graph order."""
        skipped = {s.module for s in self.skipped}
        out: list[str] = []
        for site in self.sites:
            out += [m for m in site.linear_modules if m is not None and m not in skipped and m not in out]
        return out

    def to_dict(self) -> dict:
        return {
            "sites": [dict(dataclasses.asdict(s), norm_kind=s.norm_kind) for s in self.sites],
            "rejected": [dataclasses.asdict(r) for r in self.rejected],
            "skipped": [dataclasses.asdict(s) for s in self.skipped],
            "linears": self.linears,
            "converted": self.converted,
            "decisions": [dataclasses.asdict(d) for d in self.decisions],
            "graphs": self.graphs,
            "training": self.training,
            "norm_modules": {k: v for k, v in self.norm_modules.items() if v is not None},
            "dense_weights": [dataclasses.asdict(w) for w in self.dense_weights],
        }

    def __str__(self) -> str:
        n_lin = sum(len(s.linear_modules) for s in self.sites)
        n_norm = sum(s.kind == "norm" for s in self.sites)
        lines = [
            f"bitfx: {len(self.sites)} sites, {n_norm} of them RMSNorm -> Linear "
            f"({n_lin} linear layers, {len(self.linears)} to convert by quantize), "
            f"{len(self.rejected)} candidates rejected, {self.graphs} graph(s)"
            + (" [traced for training]" if self.training else "")
        ]
        if self.sites:
            lines.append("sites:")
        skipped = {s.module: s.reason for s in self.skipped}
        for s in self.sites:
            tag = " [already BitNet]" if s.already_bitnet else ""
            linears = ", ".join(_name(m) for m in s.linear_modules)
            src = {"act": "<input quantized per token>", "inserted": "<inserted norm>"}.get(s.kind)
            lines.append(f"  {src or s.norm_module or '<functional norm>'} -> {linears}{tag}")
            lines.append(f"      {s.norm_kind}")
            lines += [f"      not converted: {_name(m)}: {skipped[m]}" for m in s.linear_modules if m in skipped]
        if self.rejected:
            lines.append("rejected:")
        for r in self.rejected:
            lines.append(f"  {r.module or '<' + r.node + '>'}: {r.reason}")
        if self.dense_weights:
            lines.append("left dense (weights of more than two dimensions, which no linear layer holds):")
        lines += [f"  {w.name} {list(w.shape)}" for w in self.dense_weights]
        return "\n".join(lines)


def _name(m: Optional[str]) -> str:
    return "<functional linear>" if m is None else m or "<the model itself>"


# Why quantize leaves a model that is itself one nn.Linear as it is.
ROOT_LINEAR_REASON = (
    "the model itself is this nn.Linear: bitfx.quantize swaps layers inside the model in place and cannot replace "
    "the model object; use bitfx.BitfxLinear.from_linear(model), or put the linear in a module"
)


def example_inputs_for(model: nn.Module, example_inputs: tuple, caller: str, example_kwargs: Optional[dict] = None) -> tuple:
    """The inputs to trace with: the given ones, or for a Hugging Face model (a ``config``
    with ``vocab_size``) a small batch of token ids."""
    if example_inputs or example_kwargs:
        return example_inputs
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if not isinstance(vocab, int) or vocab < 1:
        raise ValueError(
            f"bitfx.{caller} traces the model to find its RMSNorm -> Linear sites and needs example inputs: "
            f"call bitfx.{caller}(model, *example_inputs) with what model(...) takes (keyword inputs too)"
        )
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    return (torch.arange(1, _DUMMY_SEQ_LEN + 1, device=device).remainder(vocab).unsqueeze(0),)


_CALLERS = itertools.count()


def _fresh_caller(model: nn.Module):
    """``lambda *a, **k: model(*a, **k)`` with a code object of its own: Dynamo keeps its
    compiled code on the code object it compiles, so the capture's entries live and die with
    this function and leave the caches of every other compiled model untouched."""

    def call(*args, **kwargs):
        return model(*args, **kwargs)

    code = call.__code__.replace(co_name=f"bitfx_capture_{next(_CALLERS)}")
    return types.FunctionType(code, call.__globals__, code.co_name, call.__defaults__, call.__closure__)


def capture_graphs(model: nn.Module, example_inputs: tuple, example_kwargs: Optional[dict] = None,
                   *, training: bool = False) -> list[tuple[torch.fx.GraphModule, list]]:
    """The torch-level FX graphs Dynamo produces for ``model(*example_inputs, **example_kwargs)``
    (several where the model has graph breaks), each with the inputs it was called with. Traced
    with grad mode ``training``. No global Dynamo state is reset, and the capture leaves no
    cache entry behind (:func:`_dynamo_leaves_no_entries`): any number of calls keeps the
    recompile limit of the model's own ``torch.compile`` untouched."""
    graphs: list[tuple[torch.fx.GraphModule, list]] = []

    def capture(gm: torch.fx.GraphModule, inputs):
        graphs.append((gm, list(inputs)))
        return gm.forward

    try:
        with torch.set_grad_enabled(training), _dynamo_leaves_no_entries():
            compiled = torch.compile(_fresh_caller(model), backend=capture, fullgraph=False, **_compile_options())
            compiled(*example_inputs, **(example_kwargs or {}))
        return list(graphs)
    finally:
        # Dynamo may keep the backend (and so this closure) alive: hold no tensor in it.
        graphs.clear()


@contextlib.contextmanager
def _dynamo_leaves_no_entries():
    """Remove the cache entries Dynamo adds to code objects while the block runs (in this thread).

    A graph break inside the model makes Dynamo compile the model's own functions (its
    ``forward``, every function on the way to the break, and their resume functions), whose
    code objects every instance and every later ``torch.compile`` share: each capture would
    add an entry there, and eight of them reach Dynamo's recompile limit, after which the
    model's class runs uncompiled. Dynamo reports every code object it compiles to its
    bytecode hooks; once the block is over, each one that held no cache entry before it is
    reset (``reset_code``: as if never compiled). One that did (the model was compiled before)
    keeps the capture's entries, since Dynamo cannot drop single entries (an invalidated one
    still counts): torch versions with ``torch.compile(isolate_recompiles=True)`` keep them
    apart (:func:`_compile_options`), so that the model's own compile does not count them."""
    from torch._dynamo import convert_frame, eval_frame

    thread = threading.get_ident()
    fresh: dict[types.CodeType, bool] = {}  # code object -> held no entry before the block

    def record(code, new_code):
        if threading.get_ident() == thread and code not in fresh:
            fresh[code] = not eval_frame._debug_get_cache_entry_list(code)
        return None

    handle = convert_frame.register_bytecode_hook(record)
    try:
        yield
    finally:
        handle.remove()
        for code, was_fresh in fresh.items():
            if was_fresh:
                torch._C._dynamo.eval_frame.reset_code(code)


def _whole_module_norm(g, s, naming: Naming, model: nn.Module) -> Optional[dict]:
    """The spec of :class:`bitfx.fused_norm.FusedNormForward` for the site's norm module when its
    whole forward is that norm, else None: every node traced inside the module (or a module in
    it) is a node of the matched norm chain, the chain's input comes from outside, its output is
    the only value that leaves the module and has the input's shape, the weight is a parameter
    (or buffer) of the module itself, and the dtypes are ones the kernel computes in, the output
    dtype the one the norm's cast order gives."""
    from bitfx.passes.fx_utils import tensor_meta
    from bitfx.passes.naming import module_fqn
    from bitfx.reference import norm_dtype_for

    name, spec = s.norm_module, s.norm
    if spec is None or not s.norm_nodes:
        return None
    try:
        module = model.get_submodule(name)
    except AttributeError:
        return None
    chain = set(s.norm_nodes)
    out = s.norm_nodes[-1]

    def within(node) -> bool:
        fqn = module_fqn(node)
        return fqn is not None and (fqn == name or fqn.startswith(name + "."))

    inside = [n for n in g.graph.nodes if n.op in ("call_function", "call_method", "call_module") and within(n)]
    if out not in inside or s.norm_input in inside or any(n not in chain for n in inside):
        return None
    for n in inside:
        if n is not out and any(u not in chain for u in n.users):
            return None
    if any(u in chain for u in out.users):
        return None
    xm, om = tensor_meta(s.norm_input), tensor_meta(out)
    if xm is None or om is None or tuple(xm.shape) != tuple(om.shape) or not len(xm.shape):
        return None
    K = xm.shape[-1]
    if not isinstance(K, int):
        return None
    weight, w_dtype = None, None
    if s.norm_weight is not None:
        if s.norm_weight.op not in ("placeholder", "get_attr"):
            return None  # a weight the model computes (``weight + 1`` rounded): not a tensor of the module
        leaves = [p[len(name) + 1:] for p in naming.param_names(s.norm_weight) if p.startswith(name + ".")]
        leaves = [leaf for leaf in leaves if "." not in leaf]
        t = naming.tensor(s.norm_weight)
        if not leaves or t is None:
            return None
        weight = leaves[0]
        held = module._parameters.get(weight, module._buffers.get(weight))
        if held is not t or tuple(t.shape) != (K,):
            return None
        w_dtype = t.dtype
    floats = (torch.float32, torch.float16, torch.bfloat16)
    if xm.dtype not in floats or om.dtype not in floats or (w_dtype is not None and w_dtype not in floats):
        return None
    if (spec.norm_dtype or norm_dtype_for(xm.dtype, w_dtype, spec.cast_before_weight)) != om.dtype:
        return None
    return {"weight": weight, "eps": float(spec.eps), "offset": bool(spec.offset),
            "cast_before_weight": bool(spec.cast_before_weight), "K": int(K), "x_dtype": _dtype_name(xm.dtype),
            "weight_dtype": _dtype_name(w_dtype), "out_dtype": _dtype_name(om.dtype)}


def _compile_options() -> dict:
    """``torch.compile`` keywords for the capture: its own recompile region where torch has them."""
    return {"isolate_recompiles": True} if "isolate_recompiles" in inspect.signature(torch.compile).parameters else {}


def _check_integer_input(r, naming: Naming) -> None:
    """An example input of an integer dtype that the model normalizes as features: the trace
    then shows a model that is not the one users run (the norms fed by it cannot convert, the
    ones after it can), so bitfx says so instead of converting part of the model."""
    n = r.culprit
    t = naming.tensor(n) if n is not None else None
    if t is None or naming.param_names(n) or t.is_floating_point():
        return
    raise ValueError(
        f"bitfx: an example input ({str(t.dtype).removeprefix('torch.')}, shape {tuple(t.shape)}) reaches the "
        f"RMSNorm {r.module or r.node.name} as its features; pass the floating-point inputs the model takes "
        f"(token ids go through an embedding first)"
    )


def _dtype_name(d: Optional[torch.dtype]) -> Optional[str]:
    return None if d is None else str(d).removeprefix("torch.")


def explain(model: nn.Module, *example_inputs, config: Optional[BitfxConfig] = None,
            filter_fn: Optional[FilterFn] = None, **example_kwargs) -> ExplainReport:
    """Trace ``model(*example_inputs, **example_kwargs)`` and report, for every linear layer,
    whether ``torch.compile(model, backend="bitfx")`` and :func:`bitfx.quantize` convert it and
    why not: the RMSNorm -> Linear sites, the candidates rejected (with the reason), the layers
    ``quantize`` leaves alone (tied weights, ``filter_fn(module, fqn)`` False, ...). The same
    decision the backend and ``quantize`` take (:func:`bitfx.passes.plan.plan_sites`). Changes
    nothing, and leaves other compiled models' caches alone.

    ``config``: a :class:`bitfx.BitfxConfig`. The model is traced in the mode the backend would
    see for a call made now (training when grad mode is on and parameters require grad, or as
    ``config.training`` says). Without example inputs a Hugging Face model gets a small batch
    of token ids.
    """
    # filter_fn must return a bool: its result is checked, naming the layer (not taken by truthiness).
    filter_fn = checked_filter_fn(check_filter_fn(filter_fn))
    # What the backend would decide for a call now (its inputs are the model's parameters and these).
    config = decide_training(config, [*model.parameters(), *example_inputs, *example_kwargs.values()])
    training = bool(config.training)
    inputs = example_inputs_for(model, example_inputs, "explain", example_kwargs)
    graphs = capture_graphs(model, inputs, example_kwargs, training=training)
    report = ExplainReport(graphs=len(graphs), training=training)
    seen_sites, seen_rejected, seen_skipped, seen_linears = set(), set(), set(), set()
    for gm, graph_inputs in graphs:
        naming = Naming([("", model)], graph_inputs)
        for g in graphs_of(gm, naming):
            plan = plan_sites(g, config, filter_fn, naming)
            for d in plan.decisions:
                replace_reason = d.replace_reason
                if d.name == "" and d.module is model and isinstance(model, nn.Linear) and replace_reason:
                    replace_reason = ROOT_LINEAR_REASON  # not "a functional linear": the root module
                quantized = d.convert and replace_reason is None
                info = LinearInfo(d.name, d.node.name, d.convert, quantized, d.reason, replace_reason,
                                  d.site is not None or d.bare, d.head)
                key = (info.module or info.node, info.converted, info.reason)
                if key not in seen_linears:
                    seen_linears.add(key)
                    report.decisions.append(info)
                if d.convert and replace_reason and d.name is not None and d.name not in seen_skipped:
                    seen_skipped.add(d.name)
                    report.skipped.append(SkippedLinear(d.name, replace_reason))
            for s in plan.sites:
                if s.norm_module is not None and s.norm_nodes:
                    whole = _whole_module_norm(g, s, naming, model)
                    known = report.norm_modules.get(s.norm_module, whole)
                    report.norm_modules[s.norm_module] = whole if known == whole else None
                spec = s.norm
                info = SiteInfo(
                    norm_module=s.norm_module,
                    linear_modules=tuple(s.linear_modules),
                    eps=float(spec.eps) if spec is not None else 0.0,
                    offset=bool(spec is not None and spec.offset),
                    cast_before_weight=bool(spec is not None and spec.cast_before_weight),
                    norm_dtype=_dtype_name(spec.norm_dtype) if spec is not None else None,
                    has_weight=s.norm_weight is not None,
                    already_bitnet=bool(s.already_bitnet),
                    kind="act" if spec is None else "norm" if s.norm_nodes else "inserted",
                )
                if info not in seen_sites:
                    seen_sites.add(info)
                    report.sites.append(info)
            for r in plan.rejected:
                _check_integer_input(r, naming)
                info = RejectedInfo(module=r.module, node=r.node.name, reason=r.reason)
                key = (info.module or info.node, info.reason)
                if key not in seen_rejected:
                    seen_rejected.add(key)
                    report.rejected.append(info)
    report.dense_weights = _dense_weights(model, graphs)
    return report


def _dense_weights(model: nn.Module, graphs: list) -> list[DenseWeight]:
    """The model's float parameters of more than two dimensions that a traced graph reads (an
    input of it), by name, in the model's order."""
    read = {id(t) for _, inputs in graphs for t in inputs if isinstance(t, torch.Tensor)}
    return [DenseWeight(name, tuple(p.shape), DENSE_WEIGHT_REASON) for name, p in model.named_parameters()
            if p.dim() > 2 and p.is_floating_point() and id(p) in read]
