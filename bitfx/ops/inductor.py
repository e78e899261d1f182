"""The inference ops as Triton kernels that Inductor launches itself.

``bitfx::norm_quant``, ``add_norm_quant``, ``glu_quant``, ``act_quant``, ``ternary_matmul``, ``ternary_linear`` and the training
op ``bitlinear_stacked`` are custom ops: in a graph compiled
by Inductor each call goes through the dispatcher into Python (the op's guard, the launch
rules, the launcher), some 40 µs of host time per op against about 15 µs for a kernel of
Inductor's own. With ``BitfxConfig(launch="inductor")`` (or ``"auto"`` outside CUDA graphs)
the backend swaps them for the ``*_triton`` forms defined here (:func:`retarget`):
``torch.library.triton_op`` ops whose bodies launch the same kernels through ``wrap_triton``.
Inductor traces through them once, when it compiles, and its generated code then allocates the
outputs and launches the kernels directly, like its own.

The same kernels compute the same numbers: the launch rules are those of the custom ops (the
path chosen on M, blocks and splits on its example value when M is symbolic), the kernels
launch without programmatic dependent launch (Inductor passes no such option; with ``"auto"``
the custom ops, which use it, are kept under CUDA graphs), and the norm's products that an add follows are
``mul.rn`` instructions instead of a compile option (``bitfx.kernels.norm_quant``).

Arguments are checked when the graph is traced (the bodies run once on fake tensors), not per
call. The kernels (and Triton) are imported when a form first runs or is traced; the backend
imports this module only for a graph it swaps.
"""

import contextlib
import copy
from typing import Any, Callable, Iterator, Optional

import torch
from torch import Tensor

from bitfx import reference as ref
from bitfx.ops.inference import _check_linear, check_glu_args, check_matmul_args, check_residual_args, fused_front
from bitfx.ops.library import check_norm_args, kernels, unit_rows
from bitfx.ops.training import _check_stacked, _front_outputs, _stacked_backward, _stacked_setup_context

__all__ = ["norm_quant_triton", "add_norm_quant_triton", "glu_quant_triton", "act_quant_triton", "ternary_matmul_triton",
           "ternary_linear_triton",
           "bitlinear_stacked_triton", "retarget", "TRITON_FORMS", "kernel_analysis_memo"]


@torch.library.triton_op("bitfx::norm_quant_triton", mutates_args=())
def norm_quant_triton(x: Tensor, weight: Optional[Tensor], eps: float, offset: bool, cast_before_weight: bool,
                      norm_dtype: torch.dtype, bits: int = 8) -> tuple[Tensor, Tensor]:
    """``bitfx::norm_quant`` launched by Inductor: ``(q int8 [..., K], x_scale f32 [...])``."""
    check_norm_args("norm_quant", x, weight, norm_dtype)
    q, scale, _ = kernels("norm_quant")._launch_quant(unit_rows(x), weight, eps, offset, cast_before_weight, norm_dtype,
                                                      norm=True, qmax=ref.act_qmax(bits), traced=True)
    return q.view(x.shape), scale.view(x.shape[:-1])


@torch.library.triton_op("bitfx::add_norm_quant_triton", mutates_args=())
def add_norm_quant_triton(a: Tensor, b: Tensor, weight: Optional[Tensor], eps: float, offset: bool,
                          cast_before_weight: bool, norm_dtype: torch.dtype, bits: int = 8
                          ) -> tuple[Tensor, Tensor, Tensor]:
    """``bitfx::add_norm_quant`` launched by Inductor: ``(h, q int8 [..., K], x_scale f32 [...])``."""
    check_residual_args("add_norm_quant", a, b)
    check_norm_args("add_norm_quant", a, weight, norm_dtype)
    nq = kernels("norm_quant")
    h, q, scale, _ = nq.add_norm_quant(unit_rows(a), unit_rows(b), weight, eps, offset, cast_before_weight, norm_dtype,
                                       ref.act_qmax(bits), traced=True)
    return h.view(a.shape), q.view(a.shape), scale.view(a.shape[:-1])


@torch.library.triton_op("bitfx::glu_quant_triton", mutates_args=())
def glu_quant_triton(gate: Tensor, up: Tensor, act: str, weight: Optional[Tensor], eps: float, offset: bool,
                     cast_before_weight: bool, norm_dtype: torch.dtype, normalize: bool, bits: int = 8
                     ) -> tuple[Tensor, Tensor]:
    """``bitfx::glu_quant`` launched by Inductor: ``(q int8 [..., K], x_scale f32 [...])``."""
    check_glu_args("glu_quant", gate, up, act, weight, norm_dtype, normalize)
    q, scale, _ = kernels("norm_quant").glu_quant(unit_rows(gate), unit_rows(up), act, weight, eps, offset,
                                                  cast_before_weight, norm_dtype, normalize, ref.act_qmax(bits),
                                                  traced=True)
    return q.view(gate.shape), scale.view(gate.shape[:-1])


@torch.library.triton_op("bitfx::act_quant_triton", mutates_args=())
def act_quant_triton(y: Tensor, bits: int = 8) -> tuple[Tensor, Tensor]:
    """``bitfx::act_quant`` launched by Inductor: ``(q int8 [..., K], x_scale f32 [...])``."""
    check_norm_args("act_quant", y, None, torch.float32)
    q, scale, _ = kernels("norm_quant")._launch_quant(unit_rows(y), None, 0.0, False, False, torch.float32, norm=False,
                                                      qmax=ref.act_qmax(bits), traced=True)
    return q.view(y.shape), scale.view(y.shape[:-1])


@torch.library.triton_op("bitfx::ternary_matmul_triton", mutates_args=())
def ternary_matmul_triton(q: Tensor, x_scale: Tensor, packed: Tensor, w_scale: Tensor, bias: Optional[Tensor],
                          out_dtype: torch.dtype, in_features: int) -> Tensor:
    """``bitfx::ternary_matmul`` launched by Inductor: ``out [..., N]`` in ``out_dtype``."""
    check_matmul_args("ternary_matmul", q, x_scale, packed, w_scale, bias, out_dtype, in_features)
    out = kernels("ternary_matmul").run(unit_rows(q), x_scale.reshape(-1), unit_rows(packed), w_scale, bias, out_dtype,
                                        traced=True)
    return out.view(*q.shape[:-1], packed.shape[0])


@torch.library.triton_op("bitfx::ternary_linear_triton", mutates_args=())
def ternary_linear_triton(x: Tensor, norm_weight: Optional[Tensor], eps: float, offset: bool, cast_before_weight: bool,
                          norm_dtype: torch.dtype, normalize: bool, bits: int, packed: Tensor, w_scale: Tensor,
                          bias: Optional[Tensor], out_dtype: torch.dtype, in_features: int) -> Tensor:
    """``bitfx::ternary_linear`` launched by Inductor: one kernel for few rows (chosen on the
    rows' count, a guard where it is symbolic), else the norm (or quantization) kernel and the
    matmul kernel."""
    _check_linear(x, norm_weight, norm_dtype, normalize, bits, packed, w_scale, bias, out_dtype, in_features)
    x2, packed2, qmax = unit_rows(x), unit_rows(packed), ref.act_qmax(bits)
    if fused_front(x2, packed2, traced=True):
        out, _ = kernels("front_gemv").front_gemv(x2, norm_weight, eps, offset, cast_before_weight, norm_dtype,
                                                  normalize, qmax, packed2, w_scale, bias, out_dtype, traced=True)
    else:
        out, _, _, _ = _traced_front_matmul(x2, norm_weight, eps, offset, cast_before_weight, norm_dtype, normalize,
                                            qmax, packed2, w_scale, bias, out_dtype)
    return out.view(*x.shape[:-1], packed.shape[0])


def _traced_front_matmul(x2, norm_weight, eps, offset, cast_before_weight, norm_dtype, normalize, qmax, packed,
                         w_scale, bias, out_dtype):
    """``(out, q, x_scale, rstd)``: the norm (or quantization) kernel and the matmul kernel,
    launched through ``wrap_triton``, for rows ``x2 [M, K]``."""
    q, scale, rstd = kernels("norm_quant")._launch_quant(x2, norm_weight, eps, offset, cast_before_weight, norm_dtype,
                                                         norm=normalize, qmax=qmax, traced=True)
    return kernels("ternary_matmul").run(q, scale, packed, w_scale, bias, out_dtype, traced=True), q, scale, rstd


@torch.library.triton_op("bitfx::bitlinear_stacked_triton", mutates_args=())
def bitlinear_stacked_triton(x: Tensor, norm_weight: Optional[Tensor], weights: list[Tensor], packed: Tensor,
                             w_scale: Tensor, bias: Optional[Tensor], eps: float, offset: bool,
                             cast_before_weight: bool, norm_dtype: torch.dtype, normalize: bool = True,
                             fp8_backward: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``bitfx::bitlinear_stacked`` (training) with its forward's two kernels launched by
    Inductor: ``(out [..., ΣN], q, x_scale, rstd)``; the same backward (the straight-through
    formulas of :mod:`bitfx.ops.training`)."""
    _check_stacked(x, norm_weight, weights, packed, w_scale, bias, norm_dtype, normalize)
    out, q, scale, rstd = _traced_front_matmul(unit_rows(x), norm_weight, eps, offset, cast_before_weight, norm_dtype,
                                               normalize, 127, packed, w_scale, bias, norm_dtype)
    return (out.view(*x.shape[:-1], packed.shape[0]), *_front_outputs(x, q, scale, rstd))


bitlinear_stacked_triton.register_autograd(_stacked_backward, setup_context=_stacked_setup_context)


# Each custom op and its form launched by Inductor: same arguments, same outputs.
TRITON_FORMS = {
    torch.ops.bitfx.norm_quant.default: torch.ops.bitfx.norm_quant_triton.default,
    torch.ops.bitfx.add_norm_quant.default: torch.ops.bitfx.add_norm_quant_triton.default,
    torch.ops.bitfx.glu_quant.default: torch.ops.bitfx.glu_quant_triton.default,
    torch.ops.bitfx.act_quant.default: torch.ops.bitfx.act_quant_triton.default,
    torch.ops.bitfx.ternary_matmul.default: torch.ops.bitfx.ternary_matmul_triton.default,
    torch.ops.bitfx.ternary_linear.default: torch.ops.bitfx.ternary_linear_triton.default,
    torch.ops.bitfx.bitlinear_stacked.default: torch.ops.bitfx.bitlinear_stacked_triton.default,
}


def _launchable(node: torch.fx.Node) -> bool:
    """Whether the call ``node`` can take its form launched by Inductor: its activations' shape
    is known to the graph (the example value Dynamo recorded) and has no unbacked size. The
    launch rules choose a kernel from the number of rows, which a graph with an unbacked
    length cannot decide once for all calls; the custom op decides per call."""
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    x = node.args[0]
    val = x.meta.get("val", x.meta.get("example_value")) if isinstance(x, torch.fx.Node) else None
    return isinstance(val, torch.Tensor) and not free_unbacked_symbols(val)


def retarget(gm: torch.fx.GraphModule) -> int:
    """Every call of an op that has a form launched by Inductor (:data:`TRITON_FORMS`), in ``gm`` and
    the graphs it holds, to that form where the shapes allow (:func:`_launchable`); returns how many
    were swapped."""
    swapped = 0
    for module in gm.modules():
        if not isinstance(module, torch.fx.GraphModule):
            continue
        changed = False
        for node in module.graph.nodes:
            if node.op == "call_function" and node.target in TRITON_FORMS and _launchable(node):
                node.target = TRITON_FORMS[node.target]
                changed = True
                swapped += 1
        if changed:
            module.recompile()
    return swapped


# Torch's analysis of which arguments a user-defined Triton kernel reads and writes builds the
# kernel's Triton IR, for every call in the graph, several times per call (functionalization, the
# Inductor graph, the kernel's IR node); a training forward makes 48 calls of two kernels. Keyed on
# exactly what the IR is built from, one analysis per distinct launch (:func:`kernel_analysis_memo`).
_ANALYSES = ("identify_accessed_tensors", "identify_mutated_tensors")  # torch 2.13's name; earlier torch's
_MEMO: dict[tuple, Any] = {}
_MEMO_KEPT = 4096  # answers kept, the oldest dropped first: a process compiling ever new shapes stays bounded


def _is_bitfx_kernel(kernel: Any) -> bool:
    """Whether ``kernel`` (a ``JITFunction``, or an autotuner of one) is one of bitfx's kernels."""
    fn = kernel
    for _ in range(3):  # autotuner -> JITFunction -> Python function
        fn = getattr(fn, "fn", fn)
    return getattr(fn, "__module__", "").startswith("bitfx.kernels.")


def _analysis_key(kernel: Any, kwargs: dict[str, Any], tma_metadata: Any) -> Optional[tuple]:
    """What torch builds a kernel's IR from for the analysis, or ``None`` where that is not
    certain (not a bitfx kernel, tensor descriptors, an argument of a kind not listed): a tensor
    (fake, or Inductor's ``TensorBox``) is replaced there by a fresh one of its dtype, a symbolic
    size by a constant, and every other value (constexprs, Python scalars: Triton specializes on
    an int's value) is used as it is."""
    from torch._inductor.ir import TensorBox
    from torch._subclasses.fake_tensor import FakeTensor

    if tma_metadata or not _is_bitfx_kernel(kernel):
        return None
    key = [_ir_source(kernel)]
    for name, value in kwargs.items():
        if isinstance(value, FakeTensor):
            key.append((name, "fake tensor", value.dtype))
        elif isinstance(value, TensorBox):  # apart from a tensor: earlier torch lists only tensors' writes
            key.append((name, "tensor box", value.get_dtype()))
        elif isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            key.append((name, "symbolic"))
        elif value is None or type(value) in (bool, int, float, str, torch.dtype):
            key.append((name, type(value).__name__, value))
        else:
            return None
    try:
        hash(key[0])
    except TypeError:
        return None
    return tuple(key)


def _ir_source(kernel: Any) -> tuple:
    """The kernel that torch builds the IR of, and the values the analysis adds to the call's:
    a launch with warps or stages (as the forms' are) reaches it as a new one-config autotuner
    per call around the same ``JITFunction``; the IR is that function's, with the config's
    arguments (not its warps and stages)."""
    from triton.runtime.autotuner import Autotuner

    if isinstance(kernel, Autotuner):
        extra = tuple(sorted(kernel.configs[0].kwargs.items())) if kernel.configs else ()
        return (kernel.fn, extra)
    return (kernel, ())


def _memoized(analysis: Callable) -> Callable:
    """``analysis`` (torch's, ``(kernel, kwargs, tma_descriptor_metadata)``) answered once per
    :func:`_analysis_key`; a copy of the answer each time, so no caller shares another's sets."""

    def memoized(*args, **kw):  # passed on as given: torch's signature varies between releases
        if len(args) < 2 or len(args) > 3 or set(kw) - {"tma_descriptor_metadata"}:
            return analysis(*args, **kw)
        tma = args[2] if len(args) == 3 else kw.get("tma_descriptor_metadata")
        key = _analysis_key(args[0], args[1], tma)
        if key is None:
            return analysis(*args, **kw)
        if key not in _MEMO:
            _MEMO[key] = analysis(*args, **kw)
            while len(_MEMO) > _MEMO_KEPT:
                del _MEMO[next(iter(_MEMO))]
        return copy.deepcopy(_MEMO[key])

    memoized.__wrapped__ = analysis
    return memoized


@contextlib.contextmanager
def kernel_analysis_memo() -> Iterator[None]:
    """While a graph with the forms compiles: torch's kernel access analysis answered once per
    distinct launch of a bitfx kernel instead of once per call and per stage (the first compile
    of a training step with the forms spent most of its extra time there). Other kernels are
    analysed as before; torch's functions are restored on exit."""
    from torch._higher_order_ops import triton_kernel_wrap
    from torch._inductor import ir

    patched = []
    for module in (triton_kernel_wrap, ir):
        for name in _ANALYSES:
            original = module.__dict__.get(name)
            if callable(original) and not hasattr(original, "__wrapped__"):
                patched.append((module, name, original))
                setattr(module, name, _memoized(original))
    try:
        yield
    finally:
        for module, name, original in patched:
            setattr(module, name, original)
