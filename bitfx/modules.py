"""``BitfxLinear``: a linear layer holding packed ternary weights (BitNet b1.58 inference).

``out = ternary_matmul(act_quant(x), packed, w_scale) + bias``: the input is quantized per
token to int8, the weight is stored as 2-bit ternary codes (``bitfx.layout``) with
an fp32 scale per output channel (``W ~= t / w_scale``). It calls the very ops the compiler
pass emits (``torch.ops.bitfx.act_quant`` and ``torch.ops.bitfx.ternary_matmul``), so a
converted model and a compiled one compute the same numbers. When a gradient must pass
through it (grad mode on and the input requiring grad), it calls
``torch.ops.bitfx.ternary_linear_group`` instead: the same two kernels, the same output bit for
bit, and a straight-through backward to the input (the packed weight stays frozen).

The codes are checked when a layer is built (``from_ternary``: ``t`` in {-1, 0, 1}) or loaded
(``load_state_dict``: no code 3, padding columns hold the zero code): the CUDA kernels do not
check them per call.
"""

from __future__ import annotations

import operator
import threading
import weakref
import zlib

import torch
from torch import Tensor, nn

from bitfx import ops  # noqa: F401  (registers torch.ops.bitfx.*)
from bitfx.kernels._utils import current_cuda_device, env
from bitfx.ops.library import kernels
from bitfx.layout import FLOAT_DTYPES, FORMAT, check_packed_shape, packed_k
from bitfx.reference import act_qmax, check_ternary_codes, pack_ternary, ternary_terms

__all__ = ["BitfxLinear", "Int8Linear", "FORMAT_ID"]

def _direct_launch(x: Tensor, packed: Tensor) -> bool:
    """Whether an eager call may launch the CUDA kernels itself instead of through
    ``torch.ops.bitfx``: a plain CUDA tensor of a float dtype on the weight's device, nothing
    tracing or intercepting the call (``torch.compile``, a dispatch mode such as
    ``FakeTensorMode``, a functorch transform such as ``vmap``), not the Triton interpreter."""
    return (x.is_cuda and type(x) is Tensor and x.dtype in FLOAT_DTYPES and packed.is_cuda
            and x.get_device() == packed.get_device() and not torch.compiler.is_compiling() and _no_interception())


def _no_interception() -> bool:
    C = torch._C
    stack = getattr(C, "_len_torch_dispatch_stack", None)
    functorch = getattr(C, "_are_functorch_transforms_active", None)
    if stack is None or functorch is None:
        return False
    return stack() == 0 and not functorch()


_MAX_PLANS = 32  # launch plans kept per layer (input layouts and row classes); past that all are dropped
_ROW_CLASSES: dict = {}  # (M, N, Kq, K, x bytes, one kernel possible, device) -> _row_class(...)
_MAX_ROW_CLASSES = 4096


def _row_class(M: int, N: int, Kq: int, K: int, x_bytes: int, front: bool, device: torch.device) -> tuple:
    """The class of ``M`` rows for a launch plan: the launches of two row counts of one class
    differ in their grids and ``M`` alone, so that one plan serves them all, and a prompt that
    grows by a token per call (generation without a KV cache) does not build a plan per call.
    ``("front", blocks...)`` where the rows take the one-kernel form (``front``: the layer and
    the settings allow it; :func:`bitfx.kernels.front_gemv.takes_rows`, its
    :func:`~bitfx.kernels.front_gemv.launch_class`); else the classes of the two kernels
    (:func:`bitfx.kernels.norm_quant.launch_class`, :func:`bitfx.kernels.ternary_matmul.launch_class`)."""
    key = (M, N, Kq, K, x_bytes, front, device)
    got = _ROW_CLASSES.get(key)
    if got is None:
        fg = kernels("front_gemv")
        if front and M > 0 and fg.takes_rows(M, N, Kq, K, x_bytes, device, eager=True):
            got = ("front",) + fg.launch_class(M, N, Kq, device)
        else:
            got = (kernels("norm_quant").launch_class(M, device),
                   kernels("ternary_matmul").launch_class(M, N, Kq, device))
        if not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):  # a measured tile may be missing
            if len(_ROW_CLASSES) >= _MAX_ROW_CLASSES:
                _ROW_CLASSES.clear()
            _ROW_CLASSES[key] = got
    return got


# ------------------------------------------------------------------ siblings: one launch for the linears of one input
#
# A model calls the linears that read one tensor one after the other: q, k and v on the attention's
# normed input, gate and up on the MLP's. Eagerly each is a launch, and the host's launches set an
# eager step's pace. So an eager layer learns its siblings as the model calls them: a layer called
# on the very tensor the thread's previous direct call read, unchanged since (the same object and
# version counter), with the same row length and activation codes, joins that layer's group. From
# then on the group's first layer launches the whole group (``front_gemv_parts``: the rows
# quantized once, each linear against its own weights) and leaves each sibling its output; the
# sibling returns it when it is called on that same tensor, still unchanged, with its weights the
# ones used and the same CUDA stream current. Anything else (another input, a write into it or
# into the weights, a sibling not called before the group launches again) and the sibling
# computes its own output as before, and the group is dissolved (it forms again where the calls
# repeat the pattern). The outputs are the layers' own bit for bit: the same codes and sums.

#
# A fused norm module (bitfx.fused_norm) goes one step further: the first layer that launches
# directly on the very output of its last launch, unchanged, becomes its lead; from then on the
# norm's own launch computes that layer's outputs too (its group's, where it leads one): the norm
# and the linears in one kernel (front_norm_parts), each layer's output left in its stash as a
# group leader leaves its siblings'. A stash that does not hold cuts the norm's lead.

class _Last(threading.local):
    """This thread's last launches (None: none to follow)."""

    call = None  # (weakref to x, x's version, weakref to the layer) of its last direct launch
    norm = None  # (weakref to y, y's version, weakref to the fused norm forward) of its last norm-alone launch


_LAST = _Last()


def _link_norm(layer: "BitfxLinear", x: Tensor) -> None:
    """The first direct launch after a fused norm's: if it reads that norm's output, unchanged,
    ``layer`` becomes the norm's lead."""
    last = _LAST.norm
    _LAST.norm = None
    if last[0]() is x and last[1] == x._version and groups_enabled():
        fwd = last[2]()
        if fwd is not None:
            fwd.lead = weakref.ref(layer)


def leave_outputs(members: list, outs: list, x: Tensor, qmax: int, owner) -> None:
    """Leave each layer of ``members`` its output in ``outs`` for its next call on ``x``
    (:func:`_launch_direct` takes it if ``x`` is unchanged, the layer's weights are the ones
    used, unchanged, its activation codes of width ``qmax`` still, and the stream the same);
    ``owner``: a weak reference to the fused norm forward that launched them (None: a group's
    leader). A write that bypasses the version counters (through ``.data``, or a kernel launched
    outside torch's ops) is not seen: the outputs are those of the values before it."""
    version, xref, stream = x._version, weakref.ref(x), _stream_of(x)
    for m, out in zip(members, outs):
        b = m._buffers
        packed, w_scale, bias = b["packed"], b["w_scale"], b["bias"]
        m.__dict__["_stash"] = (xref, version, stream, out, packed, packed._version, w_scale, w_scale._version,
                                bias, None if bias is None else bias._version, qmax, owner)


class _PartsPlans:
    """The launch plans of several linears launched as one (:func:`_launch_parts`): input layout
    and row class -> the bound launch; ``sig``: :func:`_group_signature` of the weights they hold."""

    __slots__ = ("plans", "sig")

    def __init__(self):
        self.plans: dict = {}
        self.sig = None

    def clear(self) -> None:
        self.plans.clear()
        self.sig = None


class _Group(_PartsPlans):
    """Layers of one input, in call order (the first launches for all; held by weak references,
    so that a group keeps no layer alive); their launch plans."""

    __slots__ = ("refs",)

    def __init__(self, first: "BitfxLinear"):
        super().__init__()
        self.refs = [weakref.ref(first)]


def env_switch(name: str, default: bool = True) -> bool:
    """An on/off environment setting: 1, on; 0, off; unset (or empty), ``default``; else a ValueError."""
    value = env(name)
    if value in (None, ""):
        return default
    if value == "1":
        return True
    if value == "0":
        return False
    raise ValueError(f"{name} must be 0 or 1 (or unset), got {value!r}")


def groups_enabled() -> bool:
    """``BITFX_EAGER_GROUPS``: unset or 1, eager layers of one input launch together; 0, never.
    Read when a group would form."""
    return env_switch("BITFX_EAGER_GROUPS")


def _dissolve(group: "_Group | None") -> None:
    if group is None:
        return
    for ref in group.refs:
        m = ref()
        if m is not None and m.__dict__.get("_group") is group:
            m.__dict__.pop("_group", None)
            m.__dict__.pop("_stash", None)
    group.refs = []
    group.clear()


def _weights(layer: "BitfxLinear") -> tuple:
    b = layer._buffers
    return b["packed"], b["w_scale"], b["bias"]


def _learn(layer: "BitfxLinear", x: Tensor, qmax: int, front_ok: bool) -> None:
    """After a direct launch of ``layer`` on ``x``: join the group of the previous direct launch's
    layer if that one read this very tensor, unchanged; then note this launch."""
    if x.is_inference():  # no version counter: a write into it between the calls could not be seen
        _LAST.call = None
        return
    last = _LAST.call
    version = x._version
    if (last is not None and last[0]() is x and last[1] == version and front_ok
            and layer.__dict__.get("_group") is None):
        prev = last[2]()
        if prev is None:
            _LAST.call = (weakref.ref(x), version, weakref.ref(layer))
            return
        pd = prev.__dict__
        pb, lb = _weights(prev), _weights(layer)
        if (prev is not layer and act_qmax(prev.act_bits) == qmax and prev.in_features == layer.in_features
                and prev.terms == 1 and pd.get("_front", (None, False))[1]
                and pb[0].stride(0) == lb[0].stride(0) and pb[0].device == lb[0].device
                and (pb[2] is None) == (lb[2] is None) and groups_enabled()):
            group = pd.get("_group")
            if group is None:
                group = pd["_group"] = _Group(prev)
            if group.refs[-1]() is prev and len(group.refs) < kernels("front_gemv").MAX_PARTS:
                group.refs.append(weakref.ref(layer))
                group.plans.clear()
                layer.__dict__["_group"] = group
    _LAST.call = (weakref.ref(x), version, weakref.ref(layer))


def _stream_of(x: Tensor) -> int:
    """The handle of the stream current on ``x``'s GPU (0 for a tensor elsewhere)."""
    return kernels("_launch").stream_handle(x.get_device()) if x.is_cuda else 0


def _group_signature(flat: tuple, device: torch.device) -> tuple:
    """``(flat, N, Kq)`` for a group's layers' weights ``flat`` (``packed, w_scale, bias`` of each
    layer in turn; ``N`` their rows together), with
    ``N`` None where they cannot launch as one on the input's ``device``: packed weights on
    another device, packed rows of different
    lengths or strides or not readable as words, scales or biases of different dtypes, some with a
    bias and some without, the one-kernel form turned off."""
    first, scale0, bias0 = flat[:3]
    ok = kernels("front_gemv").enabled(eager=True)
    for packed, w_scale, bias in _by_layer(flat):
        ok = (ok and packed.device == device and packed.shape[1] == first.shape[1]
              and packed.stride(0) == first.stride(0) and packed.stride(0) % 4 == 0 and not packed.data_ptr() & 3
              and w_scale.dtype == scale0.dtype and (bias is None) == (bias0 is None)
              and (bias is None or bias.dtype == bias0.dtype))
    return flat, (sum(t.shape[0] for t in flat[::3]) if ok else None), first.shape[1]


def _by_layer(flat: tuple) -> list:
    """``[(packed, w_scale, bias), ...]`` from the flat tuple of a group's weights."""
    return [flat[i:i + 3] for i in range(0, len(flat), 3)]


def _launch_parts(holder: _PartsPlans, members: list, x2: Tensor, qmax: int, current: int, launch):
    """The linears ``members`` on the rows ``x2`` in one launch through ``holder``'s plan for
    this input and row class, or None where the launch does not suit them (more rows than the
    one-kernel form takes for their weights together, weights that cannot launch together).
    ``launch(parts)``: the first launch, ``(result, again)``; the plan is ``again``, whose result
    for later rows is returned alike (the group's outputs flat; the norm's output and theirs)."""
    flat = tuple(t for m in members for t in _weights(m))
    device = x2.device
    sig = holder.sig
    if sig is None or len(sig[0]) != len(flat) or not all(map(operator.is_, flat, sig[0])):
        holder.plans.clear()
        sig = holder.sig = _group_signature(flat, device)
    _, N, Kq = sig
    if N is None:
        return None
    M, K = x2.shape
    row_class = _row_class(M, N, Kq, K, x2.element_size(), True, device)
    if row_class[0] != "front":
        return None
    key = (K, x2.stride(), x2.dtype, not x2.data_ptr() & 15, device, current, qmax, row_class)
    again = holder.plans.get(key)
    if again is not None:
        return again(x2)
    result, again = launch(_by_layer(flat))
    if len(holder.plans) >= _MAX_PLANS:
        holder.plans.clear()
    holder.plans[key] = again
    return result


def _launch_group(group: _Group, members: list, x2: Tensor, qmax: int, current: int, out_dtype):
    """The group's outputs for the rows ``x2`` in one launch (flat: ``[M * N_p]`` per layer), or
    None (:func:`_launch_parts`)."""
    def launch(parts):
        outs, again = kernels("front_gemv").front_gemv_parts(x2, qmax, parts, out_dtype, bind=True)
        return [o.view(-1) for o in outs], again

    return _launch_parts(group, members, x2, qmax, current, launch)


def _launch_direct(layer: "BitfxLinear", x: Tensor, bias: Tensor | None, qmax: int) -> Tensor:
    """An eager direct launch: a sibling's output left for this call (module notes above), the
    group's launch where ``layer`` leads one, else the layer's own (:func:`_launch_one`)."""
    state = layer.__dict__
    stash = state.get("_stash")
    if stash is not None:
        # The output a sibling left for this call, if it holds: the same tensor, unchanged; this
        # layer's weights the ones used (the same tensors, unchanged); the same stream current.
        state["_stash"] = None
        xref, version, stream, out, packed, pv, w_scale, sv, b, bv, sq, owner = stash
        buffers = layer._buffers
        if (xref() is x and x._version == version and buffers["packed"] is packed and packed._version == pv
                and buffers["w_scale"] is w_scale and w_scale._version == sv and buffers["bias"] is b
                and (b is None or b._version == bv) and sq == qmax and _stream_of(x) == stream):
            _LAST.call = (xref, version, weakref.ref(layer))  # a later sibling of the same input may join
            return out.view(*x.shape[:-1], -1)
        _dissolve(state.get("_group"))  # called on another input than its siblings' (or a write): no pattern
        fwd = None if owner is None else owner()
        if fwd is not None:  # left by a fused norm: it launches its linears no more (it may learn them again)
            fwd.lead = None
    if _LAST.norm is not None:
        _link_norm(layer, x)
    group = state.get("_group")
    if group is not None and group.refs and group.refs[0]() is layer:
        out = _group_call(layer, group, x, qmax)
        if out is not None:
            return out
    out = _launch_one(layer, x, bias, qmax)
    _learn(layer, x, qmax, state["_front"][1])
    return out


def _group_call(layer: "BitfxLinear", group: _Group, x: Tensor, qmax: int) -> Tensor | None:
    """The leader's call: the whole group launched, each sibling's output left for it (its
    ``_stash``, :func:`leave_outputs`)."""
    if x.is_inference():  # (no version counter: see _learn)
        return None
    members = [ref() for ref in group.refs]
    for m in members[1:]:
        if m is None or m.__dict__.get("_stash") is not None:  # gone, or did not come for its last output
            _dissolve(group)
            return None
    x2 = _as_rows(x)
    device = x2.device
    current = current_cuda_device() if x2.is_cuda else -1  # the device Triton launches on
    if current != -1 and device.index != current:
        with torch.cuda.device(device):
            return _group_call(layer, group, x, qmax)
    outs = _launch_group(group, members, x2, qmax, current, x.dtype)
    if outs is None:
        return None
    leave_outputs(members[1:], outs[1:], x, qmax, None)
    _LAST.call = (weakref.ref(x), x._version, weakref.ref(layer))
    return outs[0].view(*x.shape[:-1], -1)


def _as_rows(x: Tensor) -> Tensor:
    """``x [..., K]`` as ``[M, K]`` rows with a contiguous last dimension (the kernels' layout)."""
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    return x2.contiguous() if x2.shape[1] > 1 and x2.stride(1) != 1 else x2


def _launch_one(layer: "BitfxLinear", x: Tensor, bias: Tensor | None, qmax: int) -> Tensor:
    """``act_quant`` + ``ternary_matmul`` on CUDA (for few rows, or a small layer, the two in one
    kernel, :mod:`bitfx.kernels.front_gemv`, whose codes and output are the two kernels' bit for
    bit: the absmax scale is order-free): the same numbers as the ops,
    through the layer's launch plan for this input (row length, strides, dtype, 16-byte
    alignment, device, and the class of its row count: :func:`_row_class`): the launch rules
    resolved and the compiled launchers bound on the first call
    (:meth:`bitfx.kernels._launch.Launcher.bind`), so that a later call allocates its output
    and launches its kernels, nothing more. A plan holds the layer's tensors by identity:
    a buffer replaced (``.to()``, assignment) gets new plans; a write into one is read by the
    next launch as by any. Whether the one-kernel form may serve the layer (its packed rows
    readable as words, ``BITFX_FRONT_GEMV``) is decided once per packed weight. The kernels run
    on the input's device, made current for the call where another is (``device_map``)."""
    flat = x.dim() == 2
    x2 = _as_rows(x)
    state, buffers = layer.__dict__, layer._buffers
    packed, w_scale = buffers["packed"], buffers["w_scale"]
    M, K = x2.shape
    N, Kq = packed.shape
    front = state.get("_front")
    if front is None or front[0] is not packed:
        ok = (K > 0 and N > 0 and packed.stride(0) % 4 == 0 and not packed.data_ptr() & 3
              and kernels("front_gemv").enabled(eager=True))
        front = state["_front"] = (packed, ok)
    device = x2.device
    current = current_cuda_device() if x2.is_cuda else -1  # the device Triton launches on
    if current != -1 and device.index != current:  # a model spread over GPUs: launch on the input's
        with torch.cuda.device(device):
            return _launch_one(layer, x, bias, qmax)
    row_class = _row_class(M, N, Kq, K, x2.element_size(), front[1], device)
    key = (K, x2.stride(), x2.dtype, not x2.data_ptr() & 15, device, current, qmax, row_class)
    plans = state.get("_plans")
    if plans is None:
        plans = state["_plans"] = {}
    plan = plans.get(key)
    if plan is not None and plan[0] is packed and plan[1] is w_scale and plan[2] is bias:
        out = plan[3](x2)
    else:
        if row_class[0] == "front":  # quantization and matmul in one kernel, the same numbers
            out, _, run = kernels("front_gemv").front_gemv(x2, None, 0.0, False, False, torch.float32, False, qmax,
                                                           packed, w_scale, bias, x.dtype, bind=True, scale=False)
        else:
            q, x_scale, _, quant = kernels("norm_quant")._launch_quant(x2, None, 0.0, False, False, torch.float32,
                                                                       norm=False, qmax=qmax, bind=True)
            out, matmul = kernels("ternary_matmul").run(q, x_scale, packed, w_scale, bias, x.dtype, bind=True)
            run = None if quant is None or matmul is None else _two_launches(quant, matmul)
        if plan is not None or len(plans) >= _MAX_PLANS:
            plans.clear()  # tensors replaced since (or too many shapes): drop what the old plans hold
        if run is not None:
            plans[key] = (packed, w_scale, bias, run)
    return out if flat else out.view(*x.shape[:-1], N)


def _two_launches(quant, matmul):
    """A plan's launches for many rows: the quantization kernel, then the matmul on its outputs."""
    def run(x2):
        q, x_scale, _ = quant(x2)
        return matmul(q, x_scale)

    return run


# The packed layout's name as a number, so that the tag is a tensor: state_dicts then stay
# plain tensors (torch.load(weights_only=True), safetensors).
FORMAT_ID = zlib.crc32(FORMAT.encode())
_ZERO_CODES = 0b01010101  # four codes "1", i.e. four zero weights


def _apply_keeping_fp32(module: nn.Module, scale: str, apply, fn, recurse):
    """``module._apply(fn)`` (``apply``: the parent class's) for a layer of quantized weights:
    ``model.to(torch.bfloat16)`` / ``.half()`` cast every float buffer, but its scales (the buffer
    ``scale``) stay fp32, which the ops require, following a change of device only. The dtype of
    the weight the layer stands for (``weight_dtype``) follows what ``fn`` does to a float tensor
    of that dtype (a probe: ``.half().float()`` ends at float32; ``.to(device)`` alone keeps it)."""
    before = getattr(module, scale)
    apply(fn, recurse)
    moved = getattr(module, scale)
    if moved.dtype != torch.float32:
        setattr(module, scale, before.to(device=moved.device))
    probe = fn(torch.empty(0, dtype=module.weight_dtype, device=before.device))
    if isinstance(probe, Tensor) and probe.is_floating_point():
        module.weight_dtype = probe.dtype
    return module


class _CheckedState(nn.Module):
    """A layer whose ``load_state_dict`` refuses a state its ``_check_state(sd, prefix, strict)``
    finds wrong (a list of problems in words), naming each, before anything is copied.

    Its ``weight`` is the dense weight it multiplies by (``dequantize()``, ``[N, K]`` in
    ``weight_dtype``), built afresh at each read, for code written against ``nn.Linear`` that
    reads a layer's ``weight`` (its dtype, device or shape, as some transformers models do in
    their forward; a compiled graph that reads only those drops the dequantization). It is a
    copy, so writing into it must not pass for a change of the layer: eagerly it is made as an
    inference tensor, which torch refuses to update in place outside ``torch.inference_mode``
    (a model that rescales its weights in place, as RWKV does, stops there instead of running on
    unchanged codes; a write through ``.data`` is not seen), and assigning one is refused."""

    @property
    def weight(self) -> Tensor:
        if torch.compiler.is_compiling():
            return self.dequantize()
        with torch.inference_mode():
            return self.dequantize()

    def __setattr__(self, name, value):
        if name == "weight":
            kind = type(self).__name__
            raise AttributeError(
                f"{kind}.weight is read-only: the layer holds quantized codes and scales, and its weight is their "
                f"dequantized copy; to change the weight, convert a float nn.Linear holding it with "
                f"{kind}.from_linear(...)"
            )
        super().__setattr__(name, value)

    def _check_state(self, sd, prefix, strict) -> list[str]:
        raise NotImplementedError

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, error_msgs):
        problems = self._check_state(state_dict, prefix, strict)
        if problems:
            error_msgs.extend(f"bitfx: {prefix or '<root>.'}{p}" for p in problems)
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, error_msgs)


class BitfxLinear(_CheckedState):
    """Drop-in for an inference ``nn.Linear``: ``x [..., in_features] -> [..., out_features]``
    in ``x.dtype``.

    Buffers (all in the state_dict): ``packed`` uint8 ``[N, Kq]``, ``w_scale`` fp32 ``[N]``,
    ``bias`` ``[N]`` (the replaced layer's dtype) or None, and ``ternary_format`` int64
    ``[FORMAT_ID, in_features]``, checked on load together with the other buffers' dtypes
    and shapes. The module holds no parameters: it is not trainable.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        per_channel: bool = False,
        terms: int = 1,
        act_bits: int = 8,
        device=None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(terms, int) or terms < 1:
            raise ValueError(f"BitfxLinear: terms must be a positive int, got {terms!r}")
        act_qmax(act_bits)  # a clear error for widths bitfx does not quantize to
        # Activations are quantized per token to act_bits-bit codes (8: int8, as BitNet b1.58).
        self.act_bits = int(act_bits)
        self.in_features = in_features
        self.out_features = out_features
        self.per_channel = per_channel or terms > 1
        # W ~= sum over terms of t_i / s_i: the packed rows are the terms' stacked [terms * N, Kq].
        self.terms = terms
        # The dtype of the float weight this layer stands for (memory figures, repr).
        self.weight_dtype = dtype or torch.get_default_dtype()
        Kq = packed_k(in_features)
        rows = terms * out_features
        self.register_buffer("packed", torch.full((rows, Kq), _ZERO_CODES, dtype=torch.uint8, device=device))
        self.register_buffer("w_scale", torch.ones(rows, dtype=torch.float32, device=device))
        b = torch.zeros(out_features, dtype=self.weight_dtype, device=device) if bias else None
        self.register_buffer("bias", b)
        self.register_buffer(
            "ternary_format", torch.tensor([FORMAT_ID, in_features], dtype=torch.int64, device=device)
        )

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_linear(cls, linear: nn.Linear, per_channel: bool = False, terms: int = 1,
                    act_bits: int = 8) -> "BitfxLinear":
        """Quantize ``linear.weight`` (absmean ternary, per tensor or per output channel) and
        pack it; the bias is kept as it is (shared, not copied). ``terms > 1`` fits the weight
        as a sum of that many ternary matrices with per-channel scales, greedily on the
        residual (:func:`bitfx.reference.ternary_terms`). ``act_bits``: the width of the
        activation codes (8, 6 or 4)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"BitfxLinear.from_linear expects an nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach()
        bias = None if linear.bias is None else linear.bias.detach()
        if terms == 1:
            packed, w_scale = torch.ops.bitfx.weight_quant(w, per_channel)
            return cls._from_buffers(packed, w_scale, bias, linear.in_features, per_channel, w.dtype, 1, act_bits)
        t, s = ternary_terms(w, terms)
        N, K = w.shape
        return cls._from_buffers(pack_ternary(t.reshape(terms * N, K)), s.reshape(terms * N), bias, K, True,
                                 w.dtype, terms, act_bits)

    @classmethod
    def from_ternary(cls, t: Tensor, w_scale: Tensor | float, bias: Tensor | None = None, *,
                     weight_dtype: torch.dtype | None = None) -> "BitfxLinear":
        """From ternary codes ``t`` (int8 ``[N, K]`` in {-1, 0, 1}) and ``w_scale`` (``[N]`` or a
        scalar; finite and positive) with ``W ~= t / w_scale``, e.g. a checkpoint trained as
        BitNet. ``bias``: a float ``[N]`` tensor or None. ``weight_dtype``: the float dtype the
        layer stands for (default: the bias's, else torch's default). Raises a ValueError or
        TypeError that names the problem."""
        name = "BitfxLinear.from_ternary"
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: t must be a tensor of int8 ternary codes, got {type(t).__name__}")
        if t.dtype != torch.int8:
            raise TypeError(
                f"{name}: t must hold int8 ternary codes in {{-1, 0, 1}}, got {str(t.dtype).removeprefix('torch.')}"
                f" (for a float weight use BitfxLinear.from_linear)"
            )
        if t.dim() != 2 or t.shape[1] < 1:
            raise ValueError(f"{name}: t must be 2-D [N, K] with K >= 1, got shape {tuple(t.shape)}")
        bad = (t < -1) | (t > 1)
        if bool(bad.any()):
            n, k = (int(i) for i in bad.nonzero()[0])
            raise ValueError(f"{name}: t must hold ternary codes in {{-1, 0, 1}}, got {int(t[n, k])} at [{n}, {k}]")
        N, K = t.shape
        s = torch.as_tensor(w_scale, device=t.device)
        if s.is_complex() or s.dtype == torch.bool:
            raise TypeError(f"{name}: w_scale must be a real number or tensor, got {str(s.dtype).removeprefix('torch.')}")
        if s.dim() > 1 or (s.dim() == 1 and s.shape[0] != N):
            raise ValueError(f"{name}: w_scale must be a scalar or of shape ({N},), got shape {tuple(s.shape)}")
        s = s.to(torch.float32).expand(N).contiguous()
        bad = ~(torch.isfinite(s) & (s > 0))
        if bool(bad.any()):
            n = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"{name}: w_scale must be finite and positive (W ~= t / w_scale), got {float(s[n])} for output {n}"
            )
        if bias is not None:
            if not isinstance(bias, Tensor) or not bias.is_floating_point():
                what = str(bias.dtype).removeprefix("torch.") if isinstance(bias, Tensor) else type(bias).__name__
                raise TypeError(f"{name}: bias must be a float tensor of shape ({N},), got {what}")
            if tuple(bias.shape) != (N,):
                raise ValueError(f"{name}: bias has shape {tuple(bias.shape)}, expected ({N},) (one per output)")
            if bias.device != t.device:
                raise ValueError(f"{name}: bias is on {bias.device} but t is on {t.device}")
        dtype = weight_dtype or (torch.get_default_dtype() if bias is None else bias.dtype)
        return cls._from_buffers(pack_ternary(t), s, bias, K, False, dtype)

    @classmethod
    def _from_buffers(cls, packed, w_scale, bias, in_features, per_channel, weight_dtype, terms=1,
                      act_bits=8) -> "BitfxLinear":
        N = packed.shape[0] // terms
        check_packed_shape(packed.shape, in_features)
        m = cls(in_features, N, bias is not None, per_channel=per_channel, terms=terms, act_bits=act_bits,
                device="meta", dtype=weight_dtype)
        m.packed, m.w_scale, m.bias = packed, w_scale, bias
        m.ternary_format = torch.tensor([FORMAT_ID, in_features], dtype=torch.int64, device=packed.device)
        return m

    # ------------------------------------------------------------------ compute

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() < 1:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(
                f"BitfxLinear: input must be a tensor [..., {self.in_features}] (features last), got {shape}"
            )
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"BitfxLinear: input has {x.shape[-1]} features (last dimension), expected {self.in_features}"
            )
        buffers = self._buffers  # (three reads through nn.Module.__getattr__ cost the host a microsecond or two)
        packed, w_scale, bias = buffers["packed"], buffers["w_scale"], buffers["bias"]
        grad = torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad))
        if (not grad and self.terms == 1 and not w_scale.is_meta and (bias is None or not bias.is_meta)
                and _direct_launch(x, packed)):
            # Eager on CUDA (a CUDA weight is loaded): the op's kernels launched directly (no
            # dispatcher, no per-call checks: the buffers were checked when built or loaded, the
            # input above).
            return _launch_direct(self, x, bias, act_qmax(self.act_bits))
        if (packed.is_meta or w_scale.is_meta or (bias is not None and bias.is_meta)) and not x.is_meta:
            self._raise_unloaded()
        # Several terms: one matmul over the stacked [terms * N] rows (one pass over the
        # activations), in fp32, then the terms summed and the bias added.
        out_dtype = x.dtype if self.terms == 1 else torch.float32
        op_bias = bias if self.terms == 1 else None
        bits = () if self.act_bits == 8 else (self.act_bits,)  # the ops' default: 8
        if grad:
            # A gradient must pass through (the packed weight stays frozen): the same two kernels,
            # with a straight-through backward.
            out = torch.ops.bitfx.ternary_linear_group(
                x, None, [self.packed], [self.w_scale], [] if op_bias is None else [op_bias], self.in_features,
                0.0, False, False, x.dtype, False, out_dtype, *bits,
            )[0][0]
        else:
            q, x_scale = torch.ops.bitfx.act_quant(x, *bits)
            out = torch.ops.bitfx.ternary_matmul(q, x_scale, self.packed, self.w_scale, op_bias, out_dtype,
                                                 self.in_features)
        if self.terms == 1:
            return out
        out = out.unflatten(-1, (self.terms, self.out_features)).sum(-2)
        if bias is not None:
            out = out + bias.float()
        return out.to(x.dtype)

    def _raise_unloaded(self):
        missing = [n for n in ("packed", "w_scale", "bias") if getattr(self, n) is not None and getattr(self, n).is_meta]
        name = getattr(self, "_loaded_as", None)
        raise RuntimeError(
            f"BitfxLinear{f' {name!r}' if name else ''} (in_features={self.in_features}, "
            f"out_features={self.out_features}) has no data for {', '.join(missing)} (still on the meta device): the "
            f"checkpoint loaded with bitfx.load(..., strict=False) did not hold them; load them before running it"
        )

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """The weight this layer multiplies by, ``sum_i t_i / w_scale_i``, as a dense ``[N, K]`` matrix."""
        w = torch.ops.bitfx.dequantize(self.packed, self.w_scale, self.in_features, torch.float32)
        return w.unflatten(0, (self.terms, self.out_features)).sum(0).to(dtype or self.weight_dtype)

    @property
    def memory_bytes(self) -> int:
        """Bytes of the packed weight and its scales (the bias is not counted)."""
        return self.packed.numel() * self.packed.element_size() + self.w_scale.numel() * self.w_scale.element_size()

    # ------------------------------------------------------------------ module plumbing

    def __getstate__(self):
        # Launch plans are bound to this layer's tensors: a copy (deepcopy, pickle) makes its own.
        state = self.__dict__.copy()
        for key in ("_plans", "_front", "_group", "_stash"):  # (a copy learns its own siblings)
            state.pop(key, None)
        return state

    def _apply(self, fn, recurse=True):
        for key in ("_plans", "_front", "_stash"):  # launch plans hold the tensors being replaced
            self.__dict__.pop(key, None)
        _dissolve(self.__dict__.get("_group"))
        return _apply_keeping_fp32(self, "w_scale", super()._apply, fn, recurse)


    def _check_state(self, sd, prefix, strict) -> list[str]:
        """What is wrong with ``sd`` for this layer, in words (empty when it loads)."""
        N, K = self.out_features, self.in_features
        R = self.terms * N  # packed rows: the terms' ternary matrices stacked
        if prefix + "packed" not in sd and prefix + "weight" in sd:
            return [
                "weight: the checkpoint holds a float weight, not a packed ternary one; load it into the "
                "float model and convert that with bitfx.quantize"
            ]
        out = []
        tag = sd.get(prefix + "ternary_format")
        if tag is None:
            if strict:
                out.append(f"ternary_format: missing; not a bitfx checkpoint (expected format {FORMAT})")
        elif tag.dtype != torch.int64 or tuple(tag.shape) != (2,) or int(tag[0]) != FORMAT_ID:
            out.append(
                f"ternary_format: the packed weight is in another format than {FORMAT} (tag {tag.tolist()}, "
                f"expected [{FORMAT_ID}, {K}])"
            )
        elif int(tag[1]) != K:
            out.append(f"ternary_format: the weight was packed for in_features={int(tag[1])}, this layer has {K}")
        packed = sd.get(prefix + "packed")
        if packed is not None:
            if packed.dtype != torch.uint8:
                out.append(f"packed: must be uint8 ({FORMAT}), got {str(packed.dtype).removeprefix('torch.')}")
            elif tuple(packed.shape) != (R, packed_k(K)):
                try:
                    check_packed_shape(packed.shape, K, R)
                    out.append(f"packed: shape {tuple(packed.shape)}, expected {(R, packed_k(K))}")
                except ValueError as e:
                    out.append(f"packed: {e}")
            elif not packed.is_meta:
                # The kernels do not check the codes per call: a corrupted weight is refused here.
                try:
                    check_ternary_codes(packed, K)
                except ValueError as e:
                    out.append(f"packed: {e}")
        w_scale = sd.get(prefix + "w_scale")
        if w_scale is not None and (w_scale.dtype != torch.float32 or tuple(w_scale.shape) != (R,)):
            out.append(
                f"w_scale: expected float32 of shape ({R},), got {str(w_scale.dtype).removeprefix('torch.')} "
                f"of shape {tuple(w_scale.shape)}"
            )
        elif w_scale is not None and not w_scale.is_meta:
            bad = (w_scale <= 0) | torch.isinf(w_scale)  # NaN is defined: a weight that held NaN or Inf
            if bool(bad.any()):
                n = int(bad.nonzero()[0, 0])
                out.append(
                    f"w_scale: must be positive and finite (or NaN, for a weight that held NaN or Inf), got "
                    f"{float(w_scale[n])} for output {n}"
                )
        bias = sd.get(prefix + "bias")
        if bias is not None and self.bias is not None and (not bias.is_floating_point() or tuple(bias.shape) != (N,)):
            out.append(f"bias: expected a float tensor of shape ({N},), got {bias.dtype} of shape {tuple(bias.shape)}")
        return out

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"per_channel={self.per_channel}, " + (f"terms={self.terms}, " if self.terms > 1 else "")
            + (f"act_bits={self.act_bits}, " if self.act_bits != 8 else "") + f"format={FORMAT}"
        )


class Int8Linear(_CheckedState):
    """The int8 output head (``BitfxConfig(head="int8")``): a drop-in for an inference
    ``nn.Linear``, ``x [..., in_features] -> [..., out_features]`` in ``x.dtype``, computing
    ``x @ (qweight * scale)^T + bias`` with fp32 accumulation (``torch.ops.bitfx.int8_linear``).
    The activations are not quantized.

    Buffers (all in the state_dict): ``qweight`` int8 ``[N, K]`` (symmetric codes in
    [-127, 127]), ``scale`` fp32 ``[N]`` (``W ~= qweight * scale``, one per output row), ``bias``
    ``[N]`` (the replaced layer's dtype) or None. Checked on load: dtypes, shapes, codes within
    [-127, 127] and finite scales. No parameters: it is not trainable; a gradient passes through
    it to its input.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, device=None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight_dtype = dtype or torch.get_default_dtype()
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=self.weight_dtype, device=device) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        """Round ``linear.weight`` to int8 per output row (``bitfx::int8_rows``); the bias is kept
        as it is (shared, not copied)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"Int8Linear.from_linear expects an nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach()
        qweight, scale = torch.ops.bitfx.int8_rows(w)
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta", dtype=w.dtype)
        m.qweight, m.scale = qweight, scale
        m.bias = None if linear.bias is None else linear.bias.detach()
        return m

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() < 1 or x.shape[-1] != self.in_features:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"Int8Linear: input must be a tensor [..., {self.in_features}] (features last), got {shape}")
        if (self.qweight.is_meta or self.scale.is_meta) and not x.is_meta:
            raise RuntimeError(
                f"Int8Linear (in_features={self.in_features}, out_features={self.out_features}) has no data for its "
                f"weight (still on the meta device): load its qweight and scale before running it"
            )
        return torch.ops.bitfx.int8_linear(x, self.qweight, self.scale, self.bias)

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """The weight this layer multiplies by, ``qweight * scale``, as a dense ``[N, K]`` matrix."""
        return (self.qweight.float() * self.scale[:, None]).to(dtype or self.weight_dtype)

    @property
    def memory_bytes(self) -> int:
        """Bytes of the int8 weight and its scales (the bias is not counted)."""
        return self.qweight.numel() + 4 * self.scale.numel()

    def _apply(self, fn, recurse=True):
        return _apply_keeping_fp32(self, "scale", super()._apply, fn, recurse)


    def _check_state(self, sd, prefix, strict=True) -> list[str]:
        """What is wrong with ``sd`` for this layer, in words (empty when it loads): a float
        ``weight`` in place of codes, dtypes and shapes (``load_state_dict`` would cast a float
        tensor into the int8 buffer without a word), codes outside [-127, 127], scales that are
        not finite and positive."""
        N, K = self.out_features, self.in_features
        if prefix + "qweight" not in sd and prefix + "weight" in sd:
            return ["weight: the checkpoint holds a float weight, not an int8 head; load it into the float model "
                    "and convert that with bitfx.quantize(..., config=BitfxConfig(head='int8'))"]
        out = []
        q = sd.get(prefix + "qweight")
        if q is not None:
            if q.dtype != torch.int8 or tuple(q.shape) != (N, K):
                out.append(f"qweight: expected int8 of shape {(N, K)}, got {str(q.dtype).removeprefix('torch.')} of "
                           f"shape {tuple(q.shape)}")
            elif not q.is_meta and q.numel() and int(q.min()) < -127:
                out.append("qweight: holds the code -128; int8 head codes are symmetric, in [-127, 127]")
        s = sd.get(prefix + "scale")
        if s is not None:
            if s.dtype != torch.float32 or tuple(s.shape) != (N,):
                out.append(f"scale: expected float32 of shape ({N},), got {str(s.dtype).removeprefix('torch.')} of "
                           f"shape {tuple(s.shape)}")
            elif not s.is_meta:
                bad = ~(torch.isfinite(s) & (s > 0))
                if bool(bad.any()):
                    n = int(bad.nonzero()[0, 0])
                    out.append(f"scale: must be finite and positive, got {float(s[n])} for output {n}")
        bias = sd.get(prefix + "bias")
        if bias is not None and self.bias is not None and (not bias.is_floating_point() or tuple(bias.shape) != (N,)):
            out.append(f"bias: expected a float tensor of shape ({N},), got {bias.dtype} of shape {tuple(bias.shape)}")
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"
