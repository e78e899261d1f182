"""``bitfx.explain``: which RMSNorm -> Linear sites bitfx finds in a model, and why it passes
over the other candidates.

The report is what :func:`bitfx.quantize` acts on (the same tracing, the same site finder),
in plain data: a person reads ``print(report)``, a program reads ``report.sites`` or
``report.to_dict()``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from bitfx.modules import BitfxLinear
from bitfx.passes.sites import find_sites

__all__ = [
    "explain",
    "ExplainReport",
    "SiteInfo",
    "RejectedInfo",
    "SkippedLinear",
    "capture_graphs",
    "example_inputs_for",
]

FilterFn = Callable[[nn.Module, str], bool]

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

    @property
    def norm_kind(self) -> str:
        """E.g. ``RMSNorm(eps=1e-06): y = r * (1 + w), r rounded to x.dtype first; out bfloat16``."""
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
    """A linear layer at a site that :func:`bitfx.quantize` leaves as it is."""

    module: str
    reason: str


@dataclass
class ExplainReport:
    sites: list[SiteInfo] = field(default_factory=list)
    rejected: list[RejectedInfo] = field(default_factory=list)
    skipped: list[SkippedLinear] = field(default_factory=list)
    graphs: int = 0  # graphs Dynamo produced; more than one means graph breaks

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
            "graphs": self.graphs,
        }

    def __str__(self) -> str:
        n_lin = sum(len(s.linear_modules) for s in self.sites)
        lines = [
            f"bitfx: {len(self.sites)} RMSNorm -> Linear sites "
            f"({n_lin} linear layers, {len(self.linears)} to convert), "
            f"{len(self.rejected)} candidates rejected, {self.graphs} graph(s)"
        ]
        if self.sites:
            lines.append("sites:")
        skipped = {s.module: s.reason for s in self.skipped}
        for s in self.sites:
            tag = " [already BitNet]" if s.already_bitnet else ""
            linears = ", ".join(_name(m) for m in s.linear_modules)
            lines.append(f"  {s.norm_module or '<functional norm>'} -> {linears}{tag}")
            lines.append(f"      {s.norm_kind}")
            lines += [f"      not converted: {m}: {skipped[m]}" for m in s.linear_modules if m in skipped]
        if self.rejected:
            lines.append("rejected:")
        for r in self.rejected:
            lines.append(f"  {r.module or '<' + r.node + '>'}: {r.reason}")
        return "\n".join(lines)


def _name(m: Optional[str]) -> str:
    return m if m is not None else "<functional linear>"


def example_inputs_for(model: nn.Module, example_inputs: tuple, caller: str) -> tuple:
    """The inputs to trace with: the given ones, or for a Hugging Face model (a ``config``
    with ``vocab_size``) a small batch of token ids."""
    if example_inputs:
        return example_inputs
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if not isinstance(vocab, int) or vocab < 1:
        raise ValueError(
            f"bitfx.{caller} traces the model to find its RMSNorm -> Linear sites and needs example inputs: "
            f"call bitfx.{caller}(model, *example_inputs) with what model(...) takes"
        )
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    return (torch.arange(1, _DUMMY_SEQ_LEN + 1, device=device).remainder(vocab).unsqueeze(0),)


def capture_graphs(model: nn.Module, example_inputs: tuple) -> list[torch.fx.GraphModule]:
    """The torch-level FX graphs Dynamo produces for ``model(*example_inputs)`` (several where
    the model has graph breaks). Resets Dynamo's caches before and after."""
    graphs: list[torch.fx.GraphModule] = []

    def capture(gm: torch.fx.GraphModule, _inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    try:
        with torch.no_grad():
            torch.compile(model, backend=capture, fullgraph=False)(*example_inputs)
    finally:
        torch._dynamo.reset()
    return graphs


def _weight_owners(model: nn.Module) -> dict[int, list[str]]:
    """id(parameter) -> every name it goes by (tied and shared weights have several)."""
    owners: dict[int, list[str]] = {}
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        for p_name, p in mod.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append(f"{mod_name}.{p_name}" if mod_name else p_name)
    return owners


def _skip_reason(model: nn.Module, name: Optional[str], owners, filter_fn: Optional[FilterFn]) -> Optional[str]:
    if name is None:
        return "a functional linear (no nn.Linear module to replace)"
    try:
        mod = model.get_submodule(name)
    except AttributeError:
        return "no such submodule in the model"
    if isinstance(mod, BitfxLinear):
        return "already converted (a BitfxLinear)"
    if not isinstance(mod, nn.Linear):
        return f"a {type(mod).__name__}, not an nn.Linear"
    if type(mod).forward is not nn.Linear.forward:
        return (
            f"{type(mod).__name__} overrides nn.Linear.forward, and replacing it would drop what that forward "
            f"adds; torch.compile(model, backend='bitfx') fuses it instead"
        )
    names = owners.get(id(mod.weight), [])
    if len(names) > 1:
        others = [n for n in names if n != f"{name}.weight"]
        return f"its weight is shared (tied) with {', '.join(others)}"
    if filter_fn is not None and not filter_fn(mod, name):
        return "filter_fn returned False"
    return None


def _dtype_name(d: Optional[torch.dtype]) -> Optional[str]:
    return None if d is None else str(d).removeprefix("torch.")


def explain(model: nn.Module, *example_inputs, config=None, filter_fn: Optional[FilterFn] = None) -> ExplainReport:
    """Trace ``model(*example_inputs)`` and report its RMSNorm -> Linear sites, the candidates
    the finder rejected (with the reason), and the linear layers :func:`bitfx.quantize` would
    leave alone (tied weights, ``filter_fn(module, fqn)`` False, ...). Changes nothing.

    ``config`` is a :class:`bitfx.QuantizeConfig` (only ``skip_output_head`` matters here).
    Without example inputs a Hugging Face model gets a small batch of token ids.
    """
    skip_output_head = True if config is None else config.skip_output_head
    inputs = example_inputs_for(model, example_inputs, "explain")
    graphs = capture_graphs(model, inputs)
    report = ExplainReport(graphs=len(graphs))
    owners = _weight_owners(model)
    seen_sites, seen_rejected, seen_skipped = set(), set(), set()
    for gm in graphs:
        found = find_sites(gm, skip_output_head=skip_output_head)
        for s in found.sites:
            spec = s.norm
            info = SiteInfo(
                norm_module=s.norm_module,
                linear_modules=tuple(s.linear_modules),
                eps=float(spec.eps),
                offset=bool(spec.offset),
                cast_before_weight=bool(spec.cast_before_weight),
                norm_dtype=_dtype_name(spec.norm_dtype),
                has_weight=s.norm_weight is not None,
                already_bitnet=bool(s.already_bitnet),
            )
            if info in seen_sites:
                continue
            seen_sites.add(info)
            report.sites.append(info)
            for name in info.linear_modules:
                reason = _skip_reason(model, name, owners, filter_fn)
                if reason is not None and name is not None and name not in seen_skipped:
                    seen_skipped.add(name)
                    report.skipped.append(SkippedLinear(name, reason))
        for r in found.rejected:
            info = RejectedInfo(module=r.module, node=r.node.name, reason=r.reason)
            key = (info.module or info.node, info.reason)
            if key in seen_rejected:
                continue
            seen_rejected.add(key)
            report.rejected.append(info)
    return report
