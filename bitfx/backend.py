"""The ``bitfx`` torch.compile backend: the bitfx passes, then Inductor.

::

    model = torch.compile(model, backend="bitfx")
    model = torch.compile(model, backend="bitfx", options={"filter_fn": lambda module, fqn: "mlp" in fqn})
    model = torch.compile(model, backend="bitfx", options={"config": BitfxConfig(per_channel=True)})

The backend is registered by the ``torch_dynamo_backends`` entry point in ``pyproject.toml``
(``bitfx = "bitfx.backend:bitfx_backend"``), so the name works right after installation.

How options arrive: ``torch.compile(..., options={...})`` calls a custom backend as
``backend(gm, example_inputs, options={...})`` and ``mode="..."`` as ``mode=...`` (torch's
``_TorchCompileWrapper``; the same in torch 2.11 and 2.13; torch itself takes the keys
``guard_filter_fn`` and ``use_aoti`` out first). The keys named like :class:`BitfxConfig`'s
fields (or ``"config"``, a whole :class:`BitfxConfig`) configure the passes, ``"filter_fn"``
is the ``filter_fn(module, fqn)`` that :func:`bitfx.quantize` and :func:`bitfx.explain` take
too; every other key is an Inductor config patch (``torch._inductor.list_options()``), as with the inductor backend.
``mode`` maps to Inductor's options for that mode.

Where the passes plug in: they rewrite the torch-level graph Dynamo hands over, *before*
``compile_fx``. Inductor's caches (FX graph cache, AOTAutograd cache) key on the graph they
receive, which already contains the ``torch.ops.bitfx`` calls; the training ops' backward
formulas are Python traced later, so the backend adds a no-op post-grad pass whose
``CustomGraphPass.uuid()`` is a hash of bitfx's sources (:mod:`bitfx.cache_key`).

Determinism: Inductor generates an embedding's backward (an accumulating ``index_put``) as
atomic adds from parallel threads, whose order, and so the rounding of the embedding gradient,
changes from run to run; everything bitfx adds repeats bit for bit. For training that repeats
exactly, turn on ``torch.use_deterministic_algorithms(True)``: Inductor then calls ATen's
``index_put`` for it (the main job does so on the CPU). The backend does not change Inductor's
decomposition table itself: a custom table cannot be pickled into the compile caches' keys, and
every graph would compile afresh.

Training or inference: :func:`bitfx.config.decide_training`, once per graph (``training`` in
the options, or grad mode and inputs requiring grad). ``training=False`` for a graph traced to
be differentiated is refused: the inference ops pass no gradient.

Inference graphs read weights packed once (:mod:`bitfx.passes.prepack`: ``weight_quant`` of
each weight and the stacking of sibling weights run ahead of the calls, kept with the weights,
and run again before a call whose weights changed since), however the model was reached, so
the backend alone is as fast as ``bitfx.quantize`` then the backend; ``quantize`` still saves
the memory of the float weights. With ``dynamic=True`` Dynamo first hands over float
attributes (a norm's ``eps``) as symbolic inputs; the pass specializes the ones a norm uses,
and Inductor restarts the trace with them constant, so a compile may run the pass twice.

Who launches the kernels of a graph on CUDA (``BitfxConfig.launch``): the custom
ops (``"op"``), or Inductor's own generated code (``"inductor"``; ``"auto"``, the default:
inference graphs outside CUDA graphs), through the ``triton_op`` forms of the ops (:mod:`bitfx.ops.inductor`), so that a
default-mode call pays Inductor's host cost per kernel, not a custom op's; the backend then turns
on Inductor's static launch of user-defined Triton kernels (``static_launch_user_defined_triton_kernels``,
unless the options set it), which Inductor's own kernels have by default. With the custom ops,
each site's front and matmul become one ``ternary_linear`` call (:mod:`bitfx.passes.fronts`):
one op call per site instead of two (with ``BITFX_FRONT_GEMV=1``, one kernel for a decode row).

On CUDA under CUDA graphs (with the custom ops) two kernels of Inductor's join the fronts that
read them: a residual add that a norm reads directly (:mod:`bitfx.passes.residual`,
``bitfx::add_norm_quant``), one kernel fewer per pre-norm site, and a gated MLP's activation
(SiLU or ReLU² times ``up``) that a down projection's front reads (:mod:`bitfx.passes.glu`,
``bitfx::glu_quant``), one fewer per MLP. With ``BITFX_FUSE_ATTENTION=1`` (opt-in: not yet timed or
tested on a GPU), a one-token attention on a key/value cache there becomes
``bitfx::decode_attention`` (:mod:`bitfx.passes.attention`): one kernel that reads grouped
key/value heads where they lie, where Inductor copies the repeated cache per layer before a
library attention kernel. ``BITFX_FUSE_RESIDUAL=0`` keeps the adds, ``BITFX_FUSE_GLU=0`` the
activations.

Logging: logger ``"bitfx"``. ``BITFX_LOG=1`` (or ``info``) prints what was rewritten,
``BITFX_LOG=debug`` also what was left out and why.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from typing import Any, Optional

import torch
from torch import nn

import bitfx.ops  # noqa: F401  (registers torch.ops.bitfx.*)
from bitfx.cache_key import keyed
from bitfx.config import BitfxConfig, checked_filter_fn, decide_training
from bitfx.passes.attention import fuse_decode_attention
from bitfx.passes.naming import Naming
from bitfx.passes.plan import check_filter_fn
from bitfx.passes.rewrite import bitfx_pass
from bitfx.passes.fronts import fuse_fronts
from bitfx.passes.glu import fuse_glu_fronts
from bitfx.passes.residual import fuse_residual_adds
from bitfx.passes.prepack import prepack

__all__ = ["BitfxConfig", "bitfx_backend"]

log = logging.getLogger("bitfx")

_FIELDS = {f.name for f in dataclasses.fields(BitfxConfig)}


def _split_options(options: Optional[dict[str, Any]]) -> tuple[BitfxConfig, Any, dict[str, Any]]:
    """``(config, filter_fn, inductor_options)`` from ``torch.compile``'s ``options``."""
    options = dict(options or {})
    config = options.pop("config", None) or BitfxConfig()
    if not isinstance(config, BitfxConfig):
        raise TypeError(f"bitfx backend: options['config'] must be a bitfx.BitfxConfig, got {type(config).__name__}")
    filter_fn = checked_filter_fn(check_filter_fn(options.pop("filter_fn", None)))
    ours = {k: options.pop(k) for k in list(options) if k in _FIELDS}
    if ours:
        config = dataclasses.replace(config, **ours)
    if config.terms != 1:
        raise ValueError(
            f"bitfx backend: terms={config.terms} is a conversion done once from a dense model: convert it with "
            f"bitfx.quantize(model, ..., config=BitfxConfig(terms={config.terms})) and compile the converted model"
        )
    if config.act_bits != 8:
        raise ValueError(
            f"bitfx backend: act_bits={config.act_bits} is a conversion option: convert the model with "
            f"bitfx.quantize(model, ..., config=BitfxConfig(act_bits={config.act_bits})) and compile the converted "
            f"model (its norms then fuse at that width); the backend's own ops quantize activations to 8 bits"
        )
    return config, filter_fn, options


def _frame_roots() -> list[tuple[str, nn.Module, str]]:
    """The modules the frame Dynamo is compiling holds in its locals (the compiled model as
    ``self``, or ``args[0]`` under a decorator that wraps ``forward``): the roots against which
    the graph's weights are named by identity. Empty where this torch does not expose the
    frame; the pass then names modules from Dynamo's ``nn_module_stack`` text."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
        f_locals = dict(tx.f_locals) if tx is not None else {}
    except (ImportError, AttributeError, RuntimeError, AssertionError):
        return []
    roots: list[tuple[str, nn.Module, str]] = []
    seen: set[int] = set()

    def add(obj: Any, label: str) -> None:
        if isinstance(obj, nn.Module) and id(obj) not in seen:
            seen.add(id(obj))
            roots.append(("", obj, label))

    for name, value in f_locals.items():
        add(value, name)
        if isinstance(value, (tuple, list)):
            for i, v in enumerate(value):
                add(v, f"{name}.{i}")
        elif isinstance(value, dict):
            for k, v in value.items():
                add(v, str(k))
    return roots


def _on_cuda(inputs: list) -> bool:
    """Whether a graph with these inputs runs on CUDA (some input is a CUDA tensor)."""
    return any(isinstance(t, torch.Tensor) and t.is_cuda for t in inputs)


def _inductor_launches(config: BitfxConfig, inputs: list, inductor_patches: dict[str, Any]) -> bool:
    """Whether the bitfx ops of a graph with these inputs (the inference ops, and the training op
    ``bitlinear_stacked``) become Triton kernels launched by
    Inductor's code (``BitfxConfig.launch``): on CUDA only, with ``"inductor"``, and with
    ``"auto"`` for inference graphs outside CUDA graphs (the mode's options, the call's own, or
    Inductor's global setting). ``config.training`` is decided already."""
    if config.launch == "op" or not _on_cuda(inputs):
        return False
    if config.launch == "inductor":
        return True
    if config.training:  # "auto": a training step keeps the custom ops (the training figures' path)
        return False
    from torch._inductor import config as inductor_config

    return not inductor_patches.get("triton.cudagraphs", inductor_config.triton.cudagraphs)


# The environment switches of the fusions under CUDA graphs, and whether each is on when unset:
# the decode attention is opt-in until its kernel has been timed and tested on a GPU.
_SWITCH_DEFAULTS = {"BITFX_FUSE_RESIDUAL": True, "BITFX_FUSE_GLU": True, "BITFX_FUSE_ATTENTION": False}


def _fuses_prologues(config: BitfxConfig, inputs: list, inductor_patches: dict[str, Any], switch: str) -> bool:
    """Whether an inference graph's kernels before its fronts join them (the residual adds,
    :mod:`bitfx.passes.residual`; the gated activations, :mod:`bitfx.passes.glu`), and its
    one-token attentions become ``decode_attention`` (:mod:`bitfx.passes.attention`): on CUDA
    under CUDA graphs with the custom ops (what ``launch="auto"`` keeps there), unless the
    environment setting ``switch`` is 0 (the attention: if it is 1; :data:`_SWITCH_DEFAULTS`). Not yet where Inductor launches the kernels: the ops' forms for
    that (``add_norm_quant_triton``, ``glu_quant_triton``) compute the same numbers as the
    kernel, but whole models compiled so have not been checked on a GPU. Nor in a default-mode
    graph of custom ops: there the add or the activation is one of Inductor's kernels, and the
    fused op would cost a custom op's host time where ``ternary_linear`` runs the front and the
    matmul in one call."""
    from torch._inductor import config as inductor_config

    from bitfx.modules import env_switch

    if config.training or not _on_cuda(inputs) or not env_switch(switch, _SWITCH_DEFAULTS[switch]):
        return False
    graphs = inductor_patches.get("triton.cudagraphs", inductor_config.triton.cudagraphs)
    return bool(graphs) and not _inductor_launches(config, inputs, inductor_patches)


# Inductor's setting that lets its static launcher (a C++ launch with no Python per argument)
# launch user-defined Triton kernels too; off by default, where Inductor's own kernels get it.
_STATIC_USER_LAUNCH = "static_launch_user_defined_triton_kernels"


def _static_launch(inductor_patches: dict[str, Any]) -> dict[str, Any]:
    """``inductor_patches`` with Inductor's static launcher turned on for the bitfx kernels its
    code launches (where this torch has the setting, and the caller did not set it): without
    it, each goes through Triton's Python launcher, several times the host cost of Inductor's
    own kernels, and a default-mode decode step waits on the host."""
    from torch._inductor import config as inductor_config

    if _STATIC_USER_LAUNCH in inductor_patches or not hasattr(inductor_config, _STATIC_USER_LAUNCH):
        return inductor_patches
    return {**inductor_patches, _STATIC_USER_LAUNCH: True}


def bitfx_backend(gm: torch.fx.GraphModule, example_inputs, *, mode: Optional[str] = None,
                  options: Optional[dict[str, Any]] = None):
    """Rewrite RMSNorm -> Linear sites to ``torch.ops.bitfx`` ops, then compile with Inductor."""
    from torch._inductor.compile_fx import compile_fx

    config, filter_fn, inductor_patches = _split_options(options)
    if mode is not None and mode != "default":
        from torch._inductor import list_mode_options

        inductor_patches = {**list_mode_options(mode), **inductor_patches}
    inputs = list(example_inputs)
    differentiated = decide_training(dataclasses.replace(config, training=None), inputs).training
    if config.training is False and differentiated:
        raise RuntimeError(
            "bitfx backend: options training=False, but this call is traced for gradients (grad mode on and "
            "parameters or inputs requiring grad), and the inference ops pass no gradient: a backward() would "
            "leave every weight without one. Call the model under torch.no_grad() or torch.inference_mode() "
            "for inference, or leave training unset (or True) to train"
        )
    config = decide_training(config, inputs)
    naming = Naming(_frame_roots(), inputs)
    bitfx_pass(gm, config, filter_fn, naming)
    # Inference: the weight operands become inputs supplied per call, packed once (appended to `inputs`).
    packs = None
    if not config.training:
        gm, packs = prepack(gm, inputs, naming)
    if _fuses_prologues(config, inputs, inductor_patches, "BITFX_FUSE_RESIDUAL"):
        log.info("bitfx: %d residual adds fused into their norms", fuse_residual_adds(gm))
    if _fuses_prologues(config, inputs, inductor_patches, "BITFX_FUSE_GLU"):
        log.info("bitfx: %d gated activations fused into their fronts", fuse_glu_fronts(gm))
    if _fuses_prologues(config, inputs, inductor_patches, "BITFX_FUSE_ATTENTION"):
        log.info("bitfx: %d one-token attentions as decode_attention", fuse_decode_attention(gm))
    if not config.training and _on_cuda(inputs):
        # CUDA inference: each site's front and matmul as one op (one kernel for decode rows)
        log.info("bitfx: %d ternary linears as one op each", fuse_fronts(gm))
    memo = contextlib.nullcontext()
    if _inductor_launches(config, inputs, inductor_patches):
        from bitfx.ops.inductor import kernel_analysis_memo, retarget

        log.info("bitfx: %d op calls launched by Inductor's code", retarget(gm))
        inductor_patches = _static_launch(inductor_patches)
        memo = kernel_analysis_memo()
    # bitfx's sources join the compile caches' keys (the backward formulas are Python: bitfx/cache_key.py)
    with memo:
        compiled = compile_fx(gm, inputs, config_patches=keyed(inductor_patches))
    if packs is None:
        return compiled
    run = packs.guard(compiled)
    run.bitfx_graph = gm  # the graph compiled: the packed operands are its last inputs
    return run


def _setup_logging() -> None:
    level = os.environ.get("BITFX_LOG", "").strip().lower()
    if not level or level in ("0", "false", "off"):
        return
    log.setLevel(logging.DEBUG if level in ("2", "debug") else logging.INFO)
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[%(name)s] %(message)s"))
        log.addHandler(handler)


_setup_logging()
