"""The one configuration of bitfx: what :func:`torch.compile`'s ``bitfx`` backend,
:func:`bitfx.quantize` and :func:`bitfx.explain` convert, and how.

All three take the same :class:`BitfxConfig` and the same ``filter_fn(module, fqn) -> bool``
(``module`` the ``nn.Module`` holding the linear's weight, None for a weight no module of the
model holds; ``fqn`` its name, e.g. ``"model.layers.0.mlp.up_proj"``), and decide through
one function (:func:`bitfx.passes.plan.plan_sites`), so they report and convert the same
linears.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Optional

import torch

__all__ = ["BitfxConfig", "QuantizeConfig", "LINEAR_MODES", "BACKWARD_MODES", "LAUNCH_MODES", "HEAD_MODES", "decide_training",
           "filter_result", "checked_filter_fn"]

# What ``BitfxConfig.linears`` may say: every linear of the model (as BitNet b1.58), only those an
# RMSNorm feeds, or every linear with an RMSNorm inserted in front of those that have none.
LINEAR_MODES = ("all", "sites", "norm")
# What ``BitfxConfig.backward`` may say: the straight-through matmuls in the gradient's dtype, or in FP8.
BACKWARD_MODES = ("exact", "fp8")
# What ``BitfxConfig.head`` may say: the output head as it is, or int8 weights per output row.
HEAD_MODES = ("dense", "int8")
# What ``BitfxConfig.launch`` may say: who launches the inference kernels of a compiled CUDA graph.
LAUNCH_MODES = ("op", "inductor", "auto")


@dataclass
class BitfxConfig:
    """What bitfx converts, and how.

    linears: which linear layers become ternary. ``"all"`` (the default, as BitNet b1.58):
        every linear layer but the output head, the embeddings and MoE routers; those an
        RMSNorm feeds fuse the norm into their activation quantization, the others (attention
        output, MLP down projection, low-rank up-projections ...) quantize their input per
        token to int8 themselves. ``"sites"``: only the linears an RMSNorm feeds. ``"norm"``:
        as ``"all"``, with a weightless RMSNorm (``norm_eps``) inserted in front of each linear
        that has none (the "norm inside every BitLinear" recipe); it changes what the model
        computes, so it is for training (quantization-aware) and for models trained that way.
    norm_eps: the epsilon of the norms ``linears="norm"`` inserts.
    per_channel: one weight scale per output channel instead of one per tensor.
    skip_output_head: leave the output head (the model's ``get_output_embeddings()``, or a
        ``lm_head``-like projection into the vocabulary) dense.
    head: what becomes of the output head that ``skip_output_head`` keeps out of the ternary
        conversion. ``"dense"`` (the default): left as it is. ``"int8"``: inference only
        (``bitfx.quantize``, and the backend's inference graphs): int8 weights with one fp32
        scale per output row (symmetric, ``scale = max|W[n]| / 127``), the activations left in
        their float dtype (:mod:`bitfx.ops.head`): half a bf16 head's bytes, which a decode step
        reads whole (the largest single weight of a small model), for a rounding of each weight
        by at most ``scale / 2``. Training graphs keep the head dense. Needs
        ``skip_output_head=True`` (with False the head is ternary).
    terms: ``bitfx.quantize`` only. Fit each weight as a sum of that many ternary matrices with
        per-output-channel scales, greedily on the residual (``1``: plain BitNet); the layer
        serves them in one matmul over the activations. A conversion done once from a
        pretrained dense model: the backend, which quantizes as it trains, takes 1.
    act_bits: ``bitfx.quantize`` only. The width of the per-token activation codes: 8 (BitNet
        b1.58, the default), 6 or 4 (the kernels and the reference both take them).
    training: the backend only. True rewrites to the differentiable ops, False to the
        inference ops; None decides from the call: training when grad mode is on and some
        input of the graph (parameters included) requires grad. ``explain`` traces in the
        same mode, so that it reports what the backend will do.
    backward: the backend's training graphs only. ``"exact"`` (the default): the
        straight-through estimator's two matmuls (input and weight gradient) in the gradient's
        dtype. ``"fp8"``: both in FP8 e4m3 with per-row scales (:mod:`bitfx.ops.fp8`; FP8 tensor
        cores where the GPU has them): the ternary codes are exact in FP8, the gradients and
        activations are rounded to 3 mantissa bits. The forward is unchanged. Linears already
        converted by ``bitfx.quantize`` (frozen packed weights, no weight gradient) keep the
        exact input gradient.
    launch: the backend's graphs on CUDA only: who launches the kernels (of the inference ops,
        and of the training op ``bitlinear_stacked``'s forward).
        ``"op"``: each call goes through the ``bitfx::`` custom op, whose kernels use
        programmatic dependent launch (the matmul starts streaming its weights while the norm
        before it runs). ``"inductor"``: Inductor's generated code launches the Triton kernels
        itself (``torch.library.triton_op`` forms of the ops, :mod:`bitfx.ops.inductor`), through
        Inductor's static launcher, with the host cost of its own kernels instead of a custom
        op's: what a default-mode step waits on, at the price of a longer first compile.
        ``"auto"`` (the default): ``"inductor"`` for inference graphs outside CUDA graphs;
        ``"op"`` under CUDA graphs (``mode="reduce-overhead"``, ``"max-autotune"``, or
        Inductor's ``triton.cudagraphs``), where the host cost is paid once at capture and the
        custom ops' programmatic dependent launch saves GPU time, and for training graphs.
    """

    linears: str = "all"
    norm_eps: float = 1e-6
    per_channel: bool = False
    skip_output_head: bool = True
    head: str = "dense"
    terms: int = 1
    act_bits: int = 8
    training: Optional[bool] = None
    backward: str = "exact"
    launch: str = "auto"

    def __post_init__(self):
        # Every field is type-checked: a string where a bool belongs ("no" is truthy) or a float
        # where an int belongs would otherwise configure something else than was asked.
        if not isinstance(self.linears, str) or self.linears not in LINEAR_MODES:
            raise ValueError(f"BitfxConfig: linears must be one of {LINEAR_MODES}, got {_short(self.linears)}")
        eps = self.norm_eps
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (math.isfinite(eps) and eps > 0):
            raise ValueError(f"BitfxConfig: norm_eps must be a finite positive number, got {_short(eps)}")
        for name in ("per_channel", "skip_output_head"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"BitfxConfig: {name} must be True or False, got {_short(getattr(self, name))}")
        if self.training is not None and not isinstance(self.training, bool):
            raise TypeError(f"BitfxConfig: training must be True, False or None, got {_short(self.training)}")
        if not isinstance(self.terms, int) or isinstance(self.terms, bool) or self.terms < 1:
            raise ValueError(f"BitfxConfig: terms must be a positive int, got {_short(self.terms)}")
        if not isinstance(self.backward, str) or self.backward not in BACKWARD_MODES:
            raise ValueError(f"BitfxConfig: backward must be one of {BACKWARD_MODES}, got {_short(self.backward)}")
        if not isinstance(self.head, str) or self.head not in HEAD_MODES:
            raise ValueError(f"BitfxConfig: head must be one of {HEAD_MODES}, got {_short(self.head)}")
        if self.head != "dense" and not self.skip_output_head:
            raise ValueError(
                f"BitfxConfig: head={self.head!r} is what becomes of the output head that skip_output_head=True "
                f"keeps out of the ternary conversion; with skip_output_head=False the head is converted to ternary"
            )
        if not isinstance(self.launch, str) or self.launch not in LAUNCH_MODES:
            raise ValueError(f"BitfxConfig: launch must be one of {LAUNCH_MODES}, got {_short(self.launch)}")
        if not isinstance(self.act_bits, int) or isinstance(self.act_bits, bool) or self.act_bits not in (4, 6, 8):
            raise ValueError(f"BitfxConfig: act_bits must be 8, 6 or 4 (an int), got {_short(self.act_bits)}")


def _short(value: Any, limit: int = 80) -> str:
    """``repr(value)`` with its type, cut to ``limit`` characters."""
    r = repr(value)
    r = r if len(r) <= limit else r[: limit - 3] + "..."
    return f"{r} ({type(value).__name__})"


def filter_result(value: Any, fqn: str) -> bool:
    """What ``filter_fn(module, fqn)`` returned, checked: it must be a bool (``True``: convert,
    ``False``: keep dense). ``None`` (a function that forgot its ``return``) or a string would
    otherwise decide by truthiness; a TypeError names the layer instead. numpy's ``bool_`` and
    0-d bool tensors count as bools."""
    if isinstance(value, bool):
        return value
    if type(value).__name__ == "bool_" or (getattr(value, "dtype", None) is not None and getattr(value, "shape", None) == ()
                                           and str(value.dtype) in ("torch.bool", "bool")):
        return bool(value)
    raise TypeError(
        f"bitfx: filter_fn(module, {fqn!r}) returned {_short(value)}; it must return True (convert) or False "
        f"(keep dense)"
    )


def checked_filter_fn(filter_fn: Optional[Callable[[Any, str], Any]]) -> Optional[Callable[[Any, str], bool]]:
    """``filter_fn`` whose result goes through :func:`filter_result` (None stays None)."""
    if filter_fn is None:
        return None

    def checked(module, fqn):
        return filter_result(filter_fn(module, fqn), fqn)

    checked.__wrapped__ = filter_fn
    return checked


def decide_training(config: Optional["BitfxConfig"], tensors: Iterable[Any]) -> "BitfxConfig":
    """``config`` (the default one for None) with ``training`` decided: as it says, or, when it
    is None, training if grad mode is on and one of ``tensors`` (a graph's inputs, parameters
    included, or a model's parameters) requires grad. The one place bitfx decides between the
    differentiable ops and the inference ops, for the backend, ``explain`` and the pass alike."""
    config = config or BitfxConfig()
    if config.training is not None:
        return config
    training = torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)
    return replace(config, training=training)


# The name bitfx.quantize used for it; the same class.
QuantizeConfig = BitfxConfig
