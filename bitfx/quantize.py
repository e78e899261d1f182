"""``bitfx.quantize``: convert a model's linear layers to :class:`bitfx.modules.BitfxLinear`
(packed ternary weights), in place: by default every linear but the output head, embeddings
and MoE routers (``BitfxConfig(linears="sites")``: only those an RMSNorm feeds).

The layers are the ones ``torch.compile(model, backend="bitfx")`` converts: the same tracing
and decision as :func:`bitfx.explain`. A converted model runs eagerly, compiles with the
backend (which then fuses each norm into the activation quantization) and saves and loads
its state_dict.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from bitfx import fused_norm
from bitfx.config import BitfxConfig, QuantizeConfig
from bitfx.explain import ExplainReport, SkippedLinear, explain
from bitfx.modules import BitfxLinear, Int8Linear
from bitfx.passes.plan import FilterFn

__all__ = ["QuantizeConfig", "QuantizeReport", "quantize"]

logger = logging.getLogger("bitfx")


@dataclass
class QuantizeReport:
    """What :func:`quantize` did, on ``model.bitfx_report``. Byte counts cover the weights of
    the converted layers (biases are kept as they were and not counted)."""

    converted: list[str] = field(default_factory=list)
    skipped: list[SkippedLinear] = field(default_factory=list)
    weight_elements: int = 0
    float_bytes: int = 0  # the replaced float weights, in their own dtype
    packed_bytes: int = 0  # 2-bit ternary codes
    scale_bytes: int = 0  # fp32 weight scales
    int8_head: list[str] = field(default_factory=list)  # output heads made int8 (head="int8")
    head_float_bytes: int = 0  # their float weights, in their own dtype
    head_int8_bytes: int = 0  # their int8 codes and fp32 row scales
    fused_norms: list[str] = field(default_factory=list)  # RMSNorm modules run eagerly as one kernel
    explain_report: Optional[ExplainReport] = None  # the sites it acted on

    @property
    def quantized_bytes(self) -> int:
        return self.packed_bytes + self.scale_bytes

    @property
    def saved_bytes(self) -> int:
        return self.float_bytes - self.quantized_bytes

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "explain_report"}
        d["skipped"] = [dataclasses.asdict(s) for s in self.skipped]
        d["dense_weights"] = [] if self.explain_report is None else [w.name for w in self.explain_report.dense_weights]
        d.update(quantized_bytes=self.quantized_bytes, saved_bytes=self.saved_bytes)
        return d

    def __str__(self) -> str:
        ratio = f" ({self.float_bytes / self.quantized_bytes:.1f}x smaller)" if self.quantized_bytes else ""
        lines = [
            f"bitfx.quantize: converted {len(self.converted)} linear layers ({self.weight_elements:,} weights), "
            f"{len(self.skipped)} left as they were",
            f"  weights {_bytes(self.float_bytes)} -> {_bytes(self.quantized_bytes)} "
            f"(packed {_bytes(self.packed_bytes)} + scales {_bytes(self.scale_bytes)}): "
            f"saved {_bytes(self.saved_bytes)}{ratio}",
        ]
        if self.int8_head:
            lines.append(f"  int8 output head: {', '.join(self.int8_head)} ({_bytes(self.head_float_bytes)} -> "
                         f"{_bytes(self.head_int8_bytes)})")
        if self.fused_norms:
            lines.append(f"  RMSNorm modules run eagerly (CUDA, inference) as one kernel: {len(self.fused_norms)}")
        lines += [f"  not converted: {s.module or '<the model itself>'}: {s.reason}" for s in self.skipped]
        dense = [] if self.explain_report is None else self.explain_report.dense_weights
        if dense:
            count = sum(math.prod(w.shape) for w in dense)
            lines.append(f"  left dense: {len(dense)} weights of more than two dimensions ({count:,} elements; "
                         f"fused mixture-of-experts weights, convolutions), which no linear layer holds: "
                         f"{', '.join(w.name for w in dense[:3])}{', ...' if len(dense) > 3 else ''}")
        return "\n".join(lines)


def _bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


# The hooks a call of the module runs: the backend traces them with the linear, so the swapped
# module keeps them (the dicts themselves move, so the user's RemovableHandles still remove them).
_CALL_HOOKS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
               "_forward_hooks_always_called", "_backward_pre_hooks", "_backward_hooks", "_is_full_backward_hook")


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    old = model.get_submodule(name)
    for attr in _CALL_HOOKS:
        if hasattr(old, attr):
            setattr(new, attr, getattr(old, attr))
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def quantize(
    model: nn.Module,
    *example_inputs,
    config: Optional[BitfxConfig] = None,
    filter_fn: Optional[FilterFn] = None,
    **example_kwargs,
) -> nn.Module:
    """Replace the ``nn.Linear`` layers the backend converts (``config.linears``) by :class:`BitfxLinear`
    (absmean ternary weights, 2 bits each; int8 per-token activations), in place; returns ``model``.

    ``example_inputs`` / ``example_kwargs`` are what ``model(...)`` takes, used once to trace it
    (a Hugging Face model without them gets a small batch of token ids). ``config`` is the
    :class:`bitfx.BitfxConfig` the backend takes too; ``filter_fn(module, fqn) -> bool`` keeps a
    layer out when it returns False. The layers converted are those ``bitfx.explain`` reports
    (the same decision as the backend's), less those it cannot swap for a module. Linear layers whose weight is tied to another
    (an ``lm_head`` tied to the embeddings) are left alone. The float weights of converted
    layers are released. A replaced layer's forward (pre-)hooks, with their kwargs and always-call
    flags, and its backward hooks move to its :class:`BitfxLinear` (the backend traces them too, and
    the handles that registered them still remove them). The report (:class:`QuantizeReport`: layers, skipped layers and why,
    bytes saved) is stored on ``model.bitfx_report`` and logged to the ``bitfx`` logger.

    Each RMSNorm module feeding a converted linear whose whole ``forward`` is that norm then runs
    eagerly on CUDA (inference calls of the traced dtype) as one kernel (:mod:`bitfx.fused_norm`;
    ``report.fused_norms`` names them; ``BITFX_EAGER_NORMS=0`` turns it off); its class, parameters
    and ``state_dict`` stay as they were, and every other call runs its own ``forward``.

    ``BitfxConfig(head="int8")`` also swaps the output head (the linear ``skip_output_head``
    keeps out of the ternary conversion) for an :class:`~bitfx.modules.Int8Linear`: int8 weights
    with one scale per output row. A head tied to the input embedding gets its own int8 copy; the
    embedding keeps its float weight.
    """
    config = dataclasses.replace(config or BitfxConfig(), training=False)  # converts for inference
    if config.linears == "norm":
        raise ValueError(
            "bitfx.quantize: linears='norm' inserts RMSNorms that a BitfxLinear does not hold; train or run such a "
            "model with torch.compile(model, backend='bitfx', options={'linears': 'norm'}), or convert with "
            "linears='all' (the default) or 'sites'"
        )
    plan = explain(model, *example_inputs, config=config, filter_fn=filter_fn, **example_kwargs)
    skipped, seen = [], set()
    for d in plan.decisions:  # every linear at a site that stays as it is, and why
        if d.at_site and not d.quantized and d.module is not None and d.module not in seen:
            seen.add(d.module)
            skipped.append(SkippedLinear(d.module, d.reason or d.replace_reason))
    report = QuantizeReport(skipped=skipped, explain_report=plan)
    with torch.no_grad():
        for name in plan.linears:
            linear = model.get_submodule(name)
            w = linear.weight
            new = BitfxLinear.from_linear(linear, per_channel=config.per_channel, terms=config.terms,
                                         act_bits=config.act_bits)
            _replace(model, name, new)
            report.converted.append(name)
            report.weight_elements += w.numel()
            report.float_bytes += w.numel() * w.element_size()
            report.packed_bytes += new.packed.numel() * new.packed.element_size()
            report.scale_bytes += new.w_scale.numel() * new.w_scale.element_size()
            del linear, w
        if config.head == "int8":
            _int8_heads(model, plan, report)
        _fuse_norms(model, plan, report)
    model.bitfx_report = report
    if not plan.sites:
        logger.warning("bitfx.quantize found no RMSNorm -> Linear site; bitfx.explain(model, ...) says why")
    logger.info("%s", report)
    return model


def _fuse_norms(model: nn.Module, plan: ExplainReport, report: QuantizeReport) -> None:
    """Give each RMSNorm module that feeds a converted linear, and whose whole forward is that
    norm, the eager one-kernel forward (:mod:`bitfx.fused_norm`)."""
    converted = set(report.converted)
    feeding = {s.norm_module for s in plan.sites if s.norm_module is not None and converted & set(s.linear_modules)}
    for name, spec in plan.norm_modules.items():
        if spec is not None and name in feeding:
            fused_norm.install(model.get_submodule(name), spec)
            report.fused_norms.append(name)


def _int8_heads(model: nn.Module, plan: ExplainReport, report: QuantizeReport) -> None:
    """Swap each output head ``plan`` names (an ``nn.Linear`` module) for an :class:`Int8Linear`."""
    heads = []
    for d in plan.decisions:
        if not d.head:
            continue
        if d.module and d.replace_reason is None:
            if d.module not in heads:
                heads.append(d.module)
        else:
            logger.warning("bitfx.quantize: head='int8', but the output head %s stays as it is: %s",
                           d.module or d.node, d.replace_reason or "it belongs to no module")
    if not heads:
        logger.warning("bitfx.quantize: head='int8' but no output head was found to convert (bitfx.explain says "
                       "which linears are what)")
    for name in heads:
        linear = model.get_submodule(name)
        new = Int8Linear.from_linear(linear)
        _replace(model, name, new)
        report.int8_head.append(name)
        report.skipped = [s for s in report.skipped if s.module != name]
        report.head_float_bytes += linear.weight.numel() * linear.weight.element_size()
        report.head_int8_bytes += new.memory_bytes
