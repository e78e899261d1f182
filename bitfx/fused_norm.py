"""A model's RMSNorm module run eagerly as one kernel, after :func:`bitfx.quantize`.

A converted model that runs eagerly still computes its RMSNorms as the model wrote them: six or
more separate torch ops per norm (``float``, ``pow``, ``mean``, ``add``, ``rsqrt``, the products,
the casts back), each costing the host a dispatch and a launch, which at generation sizes is
what a token's time is made of. ``bitfx.quantize`` traces the model anyway; where a norm feeding
a converted linear is a module whose whole ``forward`` is that norm (its input goes in, the norm
of it comes out, nothing else happens inside), the module gets a ``forward`` of its own
(:class:`FusedNormForward`, an instance attribute: its class, its parameters and its
``state_dict`` stay as they were) that launches :func:`bitfx.kernels.front_gemv.front_norm`
instead, for the calls that allow it:

* one positional tensor argument, on CUDA, not under ``torch.compile`` or any tracing, dispatch
  mode or functorch transform;
* of the dtype the model was traced with, with the norm weight still the module's parameter of
  the traced dtype and shape, on the input's device;
* no gradient to carry (grad mode off, or neither the input nor the weight requires grad).

Every other call runs the class's own ``forward``: ``torch.compile`` then traces the norm as
the model wrote it (and the backend fuses it into its kernels as before), training trains it,
and a CPU model computes it in torch. The kernel computes the norm as the model does, in the
cast order the site finder read from the model (:class:`bitfx.passes.records.NormSpec`), up to
its fp32 reduction order (the tolerance the spec states for the norm). ``BITFX_EAGER_NORMS=0``
turns it off (read when a launch plan is made). :func:`bitfx.save` records the fused norms and
:func:`bitfx.load` gives them back.

**The norm and its linears in one launch.** The first ``BitfxLinear`` that launches directly on
the very output of the norm's launch, unchanged, becomes the norm's *lead*
(:mod:`bitfx.modules`, "siblings"). From then on the norm's launch is
:func:`~bitfx.kernels.front_gemv.front_norm_parts`: it stores the norm's output and computes the
lead's output too (its whole group's, where it leads the linears of one input: q, k and v), and
leaves each linear its output; the linear takes it when it is called on that output, unchanged,
with its weights the ones used and the same stream current. So a pre-norm block's site is one
launch where it was two. The output of the norm is the norm-alone launch's bit for bit (the same
kernel computes its ``rstd`` in the same order), and each linear's output is what it computes
alone on that output, bit for bit: an eager model gives the same numbers on its first call and
on every later one. Anything else (a write into the norm's output, a linear not called, called
on another tensor, rows beyond the one-kernel form's budget) and the linears compute their own
outputs; a stash that does not hold cuts the lead (it may be learned again). With
``BITFX_EAGER_GROUPS=0`` no lead is learned.
"""

from __future__ import annotations

import math
import weakref

import torch
from torch import Tensor, nn

from bitfx.kernels._utils import current_cuda_device
from bitfx.layout import FLOAT_DTYPES
from bitfx.modules import _LAST, _PartsPlans, _as_rows, _launch_parts, _no_interception, env_switch, leave_outputs
from bitfx.ops.library import kernels
from bitfx.reference import act_qmax

__all__ = ["FusedNormForward", "install", "fused_norms", "check_spec"]

_DTYPES = {str(d).removeprefix("torch."): d for d in FLOAT_DTYPES}
_KEYS = ("weight", "eps", "offset", "cast_before_weight", "K", "x_dtype", "weight_dtype", "out_dtype")
_MAX_PLANS = 16


def eager_norms_enabled() -> bool:
    """``BITFX_EAGER_NORMS``: unset or 1, fused norms launch their kernel; 0, never."""
    return env_switch("BITFX_EAGER_NORMS")


class FusedNormForward:
    """The ``forward`` of a norm module (module docstring). ``spec``: the weight's name in the
    module (None: a norm without weight), ``eps``, ``offset`` (``1 + weight``),
    ``cast_before_weight``, ``K``, and the dtypes of the input, the weight and the output the
    model was traced with (their names)."""

    def __init__(self, module: nn.Module, spec: dict):
        self.module = module
        self.spec = dict(spec)
        self._unpack()

    def _unpack(self):
        s = self.spec
        self.weight_name = s["weight"]
        self.K = s["K"]
        self.x_dtype = _DTYPES[s["x_dtype"]]
        self.weight_dtype = None if s["weight_dtype"] is None else _DTYPES[s["weight_dtype"]]
        self.out_dtype = _DTYPES[s["out_dtype"]]
        self.plans: dict = {}
        self.lead = None  # weak reference to the linear whose outputs (its group's) this launch computes
        self.lead_plans = _PartsPlans()  # for the norm weight lead_w
        self.lead_w = None

    def __getstate__(self):  # launch plans hold compiled launchers: not copied, made again
        return {"module": self.module, "spec": self.spec}

    def __setstate__(self, state):
        self.module = state["module"]
        self.spec = state["spec"]
        self._unpack()

    def __call__(self, *args, **kwargs):
        module = self.module
        if len(args) == 1 and not kwargs and not torch.compiler.is_compiling():
            x = args[0]
            if (type(x) is Tensor and x.is_cuda and x.dtype is self.x_dtype and x.dim() >= 1
                    and x.shape[-1] == self.K and _no_interception()):
                name = self.weight_name
                w = None
                if name is not None:
                    w = module._parameters.get(name)
                    if w is None:
                        w = module._buffers.get(name)
                if (name is None or (w is not None and type(w) in (Tensor, nn.Parameter) and w.dtype is self.weight_dtype
                                     and w.dim() == 1 and w.shape[0] == self.K and w.device == x.device)):
                    if not (torch.is_grad_enabled() and (x.requires_grad or (w is not None and w.requires_grad))):
                        y = self._launch(x, w)
                        if y is not None:
                            return y
        return type(module).forward(module, *args, **kwargs)

    def _launch(self, x: Tensor, w: Tensor | None) -> Tensor | None:
        """The norm of ``x`` through this module's launch plan for its layout (None: the
        setting turns the kernel off, and the caller runs the module's forward); with its
        lead's linears in the same launch where it has a lead (:meth:`_lead_launch`)."""
        x2 = _as_rows(x)
        device = x2.device
        current = current_cuda_device() if x2.is_cuda else -1  # the device Triton launches on
        key = (x2.stride(0), device.index, current, not x2.data_ptr() & 15)
        plan = self.plans.get(key)
        if plan is not None and plan[0] is w:
            again = plan[1]
            if again is None:
                return None
        elif not eager_norms_enabled():
            self.plans[key] = (w, None)
            return None
        else:
            again = None
        if x2.shape[0] == 0:  # no rows: nothing to launch
            return torch.empty(x.shape, dtype=self.out_dtype, device=device)
        if current != -1 and current != device.index:  # Triton launches on the current device: make it the input's
            with torch.cuda.device(device):
                return self._launch(x, w)
        if self.lead is not None:
            y = self._lead_launch(x, x2, w, current)
            if y is not None:
                return y
        if again is not None:
            y = again(x2).view(x.shape)
        else:
            s = self.spec
            y, again = kernels("front_gemv").front_norm(x2, w, s["eps"], s["offset"], s["cast_before_weight"],
                                                        self.out_dtype, bind=True)
            if len(self.plans) >= _MAX_PLANS:
                self.plans.clear()
            self.plans[key] = (w, again)
            y = y.view(x.shape)
        if not y.is_inference():  # (no version counter: a write into it could not be seen)
            _LAST.norm = (weakref.ref(y), y._version, weakref.ref(self))
        return y

    def _lead_launch(self, x: Tensor, x2: Tensor, w: Tensor | None, current: int) -> Tensor | None:
        """The norm and its lead's linears in one launch (``front_norm_parts``, through
        ``modules._launch_parts``): the norm's output, each linear's output left for it
        (``modules.leave_outputs``); None where they cannot go together this time (the caller
        launches the norm alone)."""
        if x.is_inference() or torch.is_inference_mode_enabled():  # y would have no version counter (see _LAST)
            return None
        leader = self.lead()
        if leader is None:
            self.lead = None
            return None
        group = leader.__dict__.get("_group")
        leads_group = group is not None and group.refs and group.refs[0]() is leader
        members = [r() for r in group.refs] if leads_group else [leader]
        qmax = act_qmax(leader.act_bits)
        for m in members:
            if m is None or m.__dict__.get("_stash") is not None:  # gone, or it did not come for its last output
                self._cut(members)
                return None
            front = m.__dict__.get("_front")
            if (front is None or front[0] is not m._buffers["packed"] or not front[1] or m.terms != 1
                    or m.in_features != self.K or act_qmax(m.act_bits) != qmax):
                return None  # (its next launch of its own decides again whether it can)
        if self.lead_w is not w:  # the plans hold the norm weight they were made with
            self.lead_plans.clear()
            self.lead_w = w
        s = self.spec

        def launch(parts):
            y, outs, again = kernels("front_gemv").front_norm_parts(
                x2, w, s["eps"], s["offset"], s["cast_before_weight"], self.out_dtype, qmax, parts, bind=True)
            return (y, [o.view(-1) for o in outs]), again

        got = _launch_parts(self.lead_plans, members, x2, qmax, current, launch)
        if got is None:
            return None
        y = got[0].view(x.shape)
        leave_outputs(members, got[1], y, qmax, weakref.ref(self))
        return y

    def _cut(self, members: list) -> None:
        """The lead's pattern broke: no lead, and the outputs left for its linears dropped."""
        self.lead = None
        self.lead_plans.clear()
        self.lead_w = None
        for m in members:
            if m is not None:
                m.__dict__.pop("_stash", None)


def check_spec(name: str, spec, module: nn.Module | None) -> list[str]:
    """What is wrong with ``spec`` as the fused norm of ``module`` (named ``name``): empty when it fits."""
    if not isinstance(spec, dict) or set(spec) != set(_KEYS):
        return [f"{name}: a fused norm's entry must hold exactly {list(_KEYS)}"]
    problems = []
    K, eps = spec["K"], spec["eps"]
    if isinstance(K, bool) or not isinstance(K, int) or K < 1:
        problems.append(f"{name}: fused norm K={K!r} is not a positive int")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < math.inf:
        problems.append(f"{name}: fused norm eps={eps!r} is not a finite number >= 0")
    for flag in ("offset", "cast_before_weight"):
        if not isinstance(spec[flag], bool):
            problems.append(f"{name}: fused norm {flag}={spec[flag]!r} is not a bool")
    for key in ("x_dtype", "out_dtype", "weight_dtype"):
        if spec[key] not in _DTYPES and not (key == "weight_dtype" and spec[key] is None):
            problems.append(f"{name}: fused norm {key}={spec[key]!r} is not one of {sorted(_DTYPES)}")
    weight = spec["weight"]
    if (weight is None) != (spec["weight_dtype"] is None) or (weight is not None and not isinstance(weight, str)):
        problems.append(f"{name}: fused norm weight={weight!r} and weight_dtype={spec['weight_dtype']!r} disagree")
    if problems or module is None:
        return problems
    if weight is not None:
        w = module._parameters.get(weight, module._buffers.get(weight))
        if w is None:
            problems.append(f"{name}: a fused norm with weight {weight!r}, which the model's "
                            f"{type(module).__name__} does not hold")
        elif tuple(w.shape) != (K,):
            problems.append(f"{name}.{weight}: shape {list(w.shape)} in the model, a fused norm of K={K}")
    return problems


def install(module: nn.Module, spec: dict) -> None:
    """Give ``module`` the fused ``forward`` for ``spec`` (replacing one it had)."""
    module.forward = FusedNormForward(module, spec)


def fused_norms(model: nn.Module) -> dict:
    """``{module name: spec}`` of the model's fused norms."""
    return {name: dict(m.__dict__["forward"].spec) for name, m in model.named_modules()
            if isinstance(m.__dict__.get("forward"), FusedNormForward)}
