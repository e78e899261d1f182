"""transformers' BitNet format, both ways.

transformers (``transformers.integrations.bitnet``) stores a ternary linear in one of two ways:

* ``BitLinear``: ``weight`` uint8 ``[ceil(N/4), K]``, four ternary values per byte *along the
  output dimension*: byte ``[r, k]`` holds rows ``r + i * ceil(N/4)`` for ``i = 0..3`` in bits
  ``2i..2i+1``, as code ``t + 1``; ``weight_scale`` (one value) divides:
  ``out = (q @ t^T) / (s_x * weight_scale)``, so it is bitfx's ``w_scale`` (``W ~= t / w_scale``).
* ``AutoBitLinear`` (offline): ``weight`` holds the ternary values themselves in the float
  dtype (a checkpoint may store them packed as ``BitLinear``'s; transformers unpacks them at
  load), and ``weight_scale`` multiplies: ``out = F.linear(aq(x), t, b) * weight_scale``, so
  ``W ~= t * weight_scale``, bitfx's ``w_scale`` is its reciprocal and its bias is
  ``b * weight_scale``.

Either may hold an RMSNorm of its own (``use_rms_norm=True``: transformers' ``LlamaRMSNorm``
with ``rms_norm_eps``, applied to the input before the activation quantization, in online and
offline mode alike): such a layer becomes a :class:`BitfxNormLinear`, its RMSNorm (the same
module) followed by the ``BitfxLinear``, which the backend fuses into one ``norm_quant`` +
``ternary_matmul`` as it does any RMSNorm -> Linear site.

:func:`from_transformers` reads either into :class:`~bitfx.modules.BitfxLinear` (bitfx's own
layout, :mod:`bitfx.layout`), :func:`to_transformers` writes a ``BitfxLinear`` back as
a ``BitLinear`` (its format holds one scale per tensor), and :func:`convert_transformers_bitnet`
/ :func:`export_transformers_bitnet` do so for every such layer of a model, in place.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from bitfx.modules import BitfxLinear

__all__ = [
    "pack_hf", "unpack_hf", "from_transformers", "to_transformers", "BitfxNormLinear",
    "convert_transformers_bitnet", "export_transformers_bitnet", "from_bitlinear_tensors",
    "from_autobitlinear_tensors",
]

_PER_BYTE = 4


def pack_hf(t: Tensor) -> Tensor:
    """Ternary codes int8 ``[N, K]`` -> transformers' packed uint8 ``[ceil(N/4), K]``."""
    if t.dim() != 2 or t.dtype != torch.int8:
        raise ValueError(f"pack_hf: ternary codes must be int8 [N, K], got {t.dtype} {tuple(t.shape)}")
    if bool(((t < -1) | (t > 1)).any()):
        raise ValueError("pack_hf: ternary codes must lie in {-1, 0, 1}")
    N, K = t.shape
    rows = -(-N // _PER_BYTE)
    codes = torch.zeros((_PER_BYTE * rows, K), dtype=torch.uint8, device=t.device)  # padding bits 0, as transformers
    codes[:N] = (t + 1).to(torch.uint8)
    planes = codes.view(_PER_BYTE, rows, K)
    return planes[0] | planes[1] << 2 | planes[2] << 4 | planes[3] << 6


def unpack_hf(packed: Tensor, out_features: int) -> Tensor:
    """Inverse of :func:`pack_hf`: int8 ``[out_features, K]`` in {-1, 0, 1}; a code 3 (not a
    ternary value) raises."""
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"unpack_hf: expected uint8 [ceil(N/4), K], got {packed.dtype} {tuple(packed.shape)}")
    rows = packed.shape[0]
    if rows != -(-out_features // _PER_BYTE):
        raise ValueError(f"unpack_hf: {rows} packed rows cannot hold out_features={out_features} "
                         f"(need {-(-out_features // _PER_BYTE)})")
    b = packed.to(torch.int16)
    codes = torch.cat([(b >> (2 * i)) & 3 for i in range(_PER_BYTE)], dim=0)[:out_features]
    if bool((codes == 3).any()):
        raise ValueError("unpack_hf: the packed weight holds code 3, which is no ternary value (corrupted?)")
    return (codes - 1).to(torch.int8)


def _is(module: nn.Module, name: str) -> bool:
    return type(module).__name__ == name and type(module).__module__.startswith("transformers.")


class BitfxNormLinear(nn.Module):
    """``linear(rms_norm(x))``: a transformers BitNet layer built with ``use_rms_norm=True``,
    converted. ``rms_norm`` is the layer's own RMSNorm module (its weight, eps and casts), kept
    as it is; ``linear`` the :class:`BitfxLinear`. The state_dict holds ``rms_norm.*`` as
    transformers' layer does, and ``linear.*``."""

    def __init__(self, rms_norm: nn.Module, linear: BitfxLinear) -> None:
        super().__init__()
        if not isinstance(linear, BitfxLinear):
            raise TypeError(f"BitfxNormLinear: linear must be a BitfxLinear, got {type(linear).__name__}")
        self.rms_norm = rms_norm
        self.linear = linear

    @property
    def in_features(self) -> int:
        return self.linear.in_features

    @property
    def out_features(self) -> int:
        return self.linear.out_features

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.rms_norm(x))


def from_transformers(module: nn.Module) -> nn.Module:
    """A transformers ``BitLinear``, or an offline ``AutoBitLinear``, as a :class:`BitfxLinear`
    with the same numbers, or, when it holds an RMSNorm (``use_rms_norm=True``), as a
    :class:`BitfxNormLinear` (that RMSNorm, then the ``BitfxLinear``). An online
    ``AutoBitLinear`` holds float weights: use :func:`bitfx.quantize` or the backend on it."""
    linear = _ternary_from_transformers(module)
    norm = getattr(module, "rms_norm", None)
    return linear if norm is None else BitfxNormLinear(norm, linear)


def _ternary_from_transformers(module: nn.Module) -> BitfxLinear:
    bias = getattr(module, "bias", None)
    bias = None if bias is None else bias.detach()
    if _is(module, "BitLinear"):
        return from_bitlinear_tensors(module.weight, module.weight_scale.detach(), bias, module.out_features,
                                      module.weight_scale.dtype, where="from_transformers: BitLinear")
    if _is(module, "AutoBitLinear"):
        if getattr(module, "online_quant", False):
            raise ValueError("from_transformers: an online AutoBitLinear holds float weights; convert its model "
                             "with bitfx.quantize or compile it with the bitfx backend")
        w = module.weight.detach()
        return from_autobitlinear_tensors(w, module.weight_scale.detach(), bias, module.out_features, w.dtype,
                                          where="from_transformers: AutoBitLinear")
    raise TypeError(f"from_transformers: expected transformers' BitLinear or AutoBitLinear, got {type(module).__name__}")


def _one_scale(weight_scale: Tensor, where: str) -> Tensor:
    s = weight_scale.float().reshape(-1)
    if s.numel() != 1:
        raise ValueError(f"{where}.weight_scale must hold one value, got {s.numel()}")
    return s[0]


def from_bitlinear_tensors(weight: Tensor, weight_scale: Tensor, bias: Tensor | None, out_features: int,
                           weight_dtype: torch.dtype, *, where: str = "BitLinear") -> BitfxLinear:
    """A ``BitLinear``'s stored tensors as a :class:`BitfxLinear`: ``weight`` packed uint8
    ``[ceil(N/4), K]``, ``weight_scale`` one value that divides (``W ~= t / weight_scale``, so
    it is bitfx's ``w_scale``), ``bias`` ``[N]`` or None. ``where`` names the layer in errors."""
    t = unpack_hf(weight, out_features)
    return BitfxLinear.from_ternary(t, _one_scale(weight_scale, where), bias, weight_dtype=weight_dtype)


def from_autobitlinear_tensors(weight: Tensor, weight_scale: Tensor, bias: Tensor | None, out_features: int,
                               weight_dtype: torch.dtype, *, where: str = "AutoBitLinear") -> BitfxLinear:
    """An offline ``AutoBitLinear``'s stored tensors as a :class:`BitfxLinear`: ``weight`` the
    ternary values in a float dtype ``[N, K]`` or packed as a ``BitLinear``'s (uint8
    ``[ceil(N/4), K]``, which transformers unpacks at load), ``weight_scale`` one value that
    multiplies after the bias: ``(x t^T + b) * weight_scale``, so bitfx's ``w_scale`` is its
    reciprocal and its bias ``b * weight_scale``. ``where`` names the layer in errors."""
    if weight.dtype == torch.uint8:
        t = unpack_hf(weight, out_features)
    else:
        if weight.dim() != 2 or weight.shape[0] != out_features:
            raise ValueError(f"{where}.weight must be [out_features={out_features}, K] (ternary values) or packed uint8 "
                             f"[{-(-out_features // _PER_BYTE)}, K], got {str(weight.dtype).removeprefix('torch.')} "
                             f"{list(weight.shape)}")
        t = weight.round()
        if not torch.equal(t, weight) or bool((t.abs() > 1).any()):
            raise ValueError(f"{where}: an offline AutoBitLinear's weight must hold ternary values (-1, 0, 1)")
        t = t.to(torch.int8)
    s = _one_scale(weight_scale, where)
    bias = None if bias is None else (bias.float() * s).to(bias.dtype)
    return BitfxLinear.from_ternary(t, 1.0 / s, bias, weight_dtype=weight_dtype)


def to_transformers(layer: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """``layer`` (a :class:`BitfxLinear`, or a :class:`BitfxNormLinear`, whose RMSNorm the result
    holds as ``rms_norm``) as transformers' ``BitLinear`` (packed along the output dimension,
    one weight scale). A per-channel ``layer`` (scales that differ) has no such form: ValueError."""
    from transformers.integrations.bitnet import BitLinear

    from bitfx.reference import unpack_ternary

    if isinstance(layer, BitfxNormLinear):
        out = to_transformers(layer.linear, dtype)
        norm = copy.deepcopy(layer.rms_norm)  # its weight, eps and casts, as the layer had them
        out.rms_norm = norm if dtype is None else norm.to(dtype)
        return out
    if not isinstance(layer, BitfxLinear):
        raise TypeError(f"to_transformers: expected a BitfxLinear or BitfxNormLinear, got {type(layer).__name__}")

    if layer.terms != 1:
        raise ValueError(f"to_transformers: transformers' BitLinear holds one ternary matrix; this layer sums "
                         f"{layer.terms} (terms={layer.terms})")
    if layer.act_bits != 8:
        raise ValueError(f"to_transformers: transformers' BitLinear quantizes activations to 8 bits; this layer to "
                         f"{layer.act_bits} (act_bits={layer.act_bits})")
    s = layer.w_scale
    if not bool((s == s[0]).all()):
        raise ValueError("to_transformers: transformers' BitLinear holds one weight scale; this layer has one "
                         "per output channel (per_channel=True)")
    if layer.out_features % _PER_BYTE:
        raise ValueError(f"to_transformers: transformers' BitLinear holds out_features // 4 packed rows; "
                         f"out_features={layer.out_features} is not a multiple of 4")
    dtype = dtype or layer.weight_dtype
    t = unpack_ternary(layer.packed, layer.in_features)
    out = BitLinear(layer.in_features, layer.out_features, layer.bias is not None, device=layer.packed.device,
                    dtype=dtype)
    out.weight = pack_hf(t)
    out.weight_scale = s[:1].to(dtype)
    if layer.bias is not None:
        out.bias = layer.bias.detach().to(dtype)
    return out


def _swap(model: nn.Module, pick, make, caller: str) -> list[str]:
    """Build every replacement first, then swap: a layer that cannot convert raises (naming it
    and every other such layer) with the model unchanged."""
    names = [n for n, m in model.named_modules() if n and pick(m)]
    made: dict[str, nn.Module] = {}
    problems: list[str] = []
    for name in names:
        try:
            made[name] = make(model.get_submodule(name))
        except (ValueError, TypeError) as e:
            problems.append(f"{name}: {e}")
    if problems:
        more = f"\n  ... and {len(problems) - 8} more" if len(problems) > 8 else ""
        raise ValueError(f"{caller}: {len(problems)} of {len(names)} layers cannot be converted; the model is "
                         f"unchanged:\n  " + "\n  ".join(problems[:8]) + more)
    for name, new in made.items():
        _set(model, name, new)
    return names


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def convert_transformers_bitnet(model: nn.Module) -> list[str]:
    """Swap every transformers ``BitLinear`` / offline ``AutoBitLinear`` of ``model`` for a
    :class:`BitfxLinear`, in place; returns their names. Every layer is converted before any is
    swapped: one that cannot be raises a ValueError naming it, and the model is unchanged."""
    return _swap(model, lambda m: _is(m, "BitLinear") or (_is(m, "AutoBitLinear") and not m.online_quant),
                 from_transformers, "convert_transformers_bitnet")


def export_transformers_bitnet(model: nn.Module, dtype: torch.dtype | None = None) -> list[str]:
    """Swap every :class:`BitfxLinear` of ``model`` for transformers' ``BitLinear``, in place;
    returns their names. Every layer is converted before any is swapped: one that cannot be
    (per-channel scales, ``out_features`` not a multiple of 4) raises a ValueError naming it, and
    the model is unchanged."""
    wrapped = {id(m.linear) for m in model.modules() if isinstance(m, BitfxNormLinear)}
    return _swap(model, lambda m: isinstance(m, BitfxNormLinear) or (isinstance(m, BitfxLinear) and id(m) not in wrapped),
                 lambda m: to_transformers(m, dtype), "export_transformers_bitnet")
