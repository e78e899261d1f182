"""The records the site finder hands to the rewrite and to the API: what a norm computes, a
site (one norm and its linears), a candidate left out and why, and a failed match."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx

__all__ = ["NormSpec", "NormMatch", "Site", "Rejected", "FindResult", "LinearUse", "Miss"]


class Miss:
    """A failed match: falsy, with its reason (as PyTorch's pattern matcher's ``FailedMatch``).

    ``candidate`` tells the two kinds apart: False, the node is not what was sought (no RMSNorm,
    no linear reading a norm: nothing to report); True, it is, but bitfx cannot take it (the
    reason is reported to the user).
    """

    __slots__ = ("reason", "candidate", "culprit")

    def __init__(self, reason: str, candidate: bool = False, culprit: fx.Node | None = None):
        self.reason = reason
        self.candidate = candidate
        self.culprit = culprit  # the node at fault, where one is (an input of the wrong dtype)

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return f"Miss({self.reason!r}{', candidate=True' if self.candidate else ''})"


def not_taken(reason: str, culprit: fx.Node | None = None) -> Miss:
    """A candidate that bitfx cannot take, for the stated reason."""
    return Miss(reason, candidate=True, culprit=culprit)


NO_MATCH = Miss("no match")

@dataclass
class NormSpec:
    """How a matched RMSNorm computes; the arguments of :func:`bitfx.reference.rms_norm`."""

    eps: float
    offset: bool  # multiplies by 1 + weight (Gemma)
    cast_before_weight: bool  # r is rounded to x.dtype before the weight multiplies it (Llama)
    norm_dtype: torch.dtype | None  # dtype of the norm's output (None: reference.norm_dtype_for)


@dataclass
class Site:
    norm_input: fx.Node  # x
    # The norm's weight node (placeholder/get_attr; the node computing ``weight + 1`` when a
    # half-precision model rounds that sum itself) or None.
    norm_weight: fx.Node | None
    # The norm (None: a site without one, whose linears quantize their input per token alone;
    # a NormSpec with no ``norm_nodes``: a norm the rewrite inserts, ``linears="norm"``)
    norm: NormSpec | None
    norm_nodes: list[fx.Node]  # nodes of the matched norm chain (last = its output); [] without a model norm
    linears: list[fx.Node]  # the linear call nodes fed by this norm
    norm_module: str | None  # e.g. "model.layers.0.input_layernorm"
    linear_modules: list[str | None]  # e.g. "model.layers.0.self_attn.q_proj"
    # True when the linears already quantize (eager STE / quant code, or bitfx quantized modules)
    already_bitnet: bool
    uses: list["LinearUse"] = field(default_factory=list)  # how each linear reads the norm

    def use_of(self, linear: fx.Node) -> "LinearUse | None":
        return next((u for u in self.uses if u.node is linear), None)

    def already_bitnet_linear(self, linear: fx.Node) -> bool:
        u = self.use_of(linear)
        return u is not None and u.act_quant is not None

    def restricted(self, linears: list[fx.Node], names: list[str | None]) -> "Site":
        """This site with only ``linears`` (named ``names``)."""
        keep = set(linears)
        uses = [u for u in self.uses if u.node in keep]
        return Site(self.norm_input, self.norm_weight, self.norm, self.norm_nodes, list(linears),
                    self.norm_module, list(names), any(u.act_quant is not None for u in uses), uses)


@dataclass
class Rejected:
    node: fx.Node  # the norm's output, or a linear that was left out
    module: str | None
    reason: str
    weight: fx.Node | None = None  # a rejected norm's weight (names it by identity)
    culprit: fx.Node | None = None  # the node at fault, where one is (an input of the wrong dtype)


@dataclass
class FindResult:
    sites: list[Site]
    rejected: list[Rejected]
    dropped: list[Rejected] = field(default_factory=list)  # linears reading a norm that cannot fuse


@dataclass
class LinearUse:
    """How one linear of a site consumes the norm: what :mod:`bitfx.passes.rewrite` needs."""

    node: fx.Node  # the linear (F.linear / aten.linear) or bitfx ternary_matmul call
    kind: str  # "linear" or "bitfx" (a ternary_matmul on packed weights, fed by act_quant)
    path: list[fx.Node]  # row-preserving ops from the norm output to the linear input, in order
    weight: fx.Node | None  # the dense weight [N, K] ("linear"; the source of an eager-quantized one)
    bias: fx.Node | None
    act_quant: str | None  # None, "eager" (aq(y)), "ste" (y + (aq(y) - y).detach()) or "bitfx"
    weight_quant: str | None  # None, "eager", "ste" or "packed"
    per_channel: bool | None  # the eager weight quantizer's grouping (None: not eager)
    out_dtype: torch.dtype
    nodes: list[fx.Node] = field(default_factory=list)  # quantizer nodes that die with the rewrite
    output: fx.Node | None = None  # the node that holds the linear's result, when not ``node`` itself
    act_bits: int = 8  # the activation code width a packed linear quantizes to

    @property
    def result(self) -> fx.Node:
        return self.output if self.output is not None else self.node


@dataclass
class NormMatch:
    """A matched RMSNorm in a graph."""

    output: fx.Node  # the norm's output (the last node of ``nodes``)
    input: fx.Node  # x
    weight: fx.Node | None
    spec: NormSpec
    nodes: list[fx.Node]
    K: int
    module: str | None
    # Row-preserving views inside the norm (before its weight): a linear sees ``x`` through them.
    inner: list[fx.Node] = field(default_factory=list)
