"""BitNet checkpoint directories in transformers' format: :func:`from_pretrained` and :func:`save_pretrained`.

Such a directory holds ``config.json`` (a transformers model config whose ``quantization_config``
says ``quant_method: "bitnet"``) and the tensors, in ``model.safetensors`` or in shards that
``model.safetensors.index.json`` lists. The quantization config says how each ternary linear
``<name>`` is stored (:mod:`bitfx.hf_bitnet` gives the formulas):

``linear_class``            ``"bitlinear"``: ``<name>.weight`` packed uint8 ``[N/4, K]``, ``<name>.weight_scale``
                            (one value, divides); ``"autobitlinear"``: in ``"offline"`` mode the ternary
                            values (float ``[N, K]``, or packed as ``bitlinear``'s) and a scale that
                            multiplies, in ``"online"`` mode the float weight, quantized (absmean, one
                            scale per tensor) when it is used. ``<name>.bias`` where the layer has one.
``use_rms_norm``            each ternary linear holds an RMSNorm of its own, ``<name>.rms_norm.weight``, with
                            ``rms_norm_eps``: loaded as a :class:`~bitfx.hf_bitnet.BitfxNormLinear`
``modules_to_not_convert``  the linears kept in float; absent, transformers' default (the output head, tied
                            weights). Which linears are ternary is decided by transformers' own rule
                            (``get_modules_to_not_convert`` and ``should_convert_module``), so bitfx and
                            transformers read one directory the same way.

Why a function of bitfx's rather than transformers' quantizer registry: transformers lets a
package register a quantization method, but a published directory names ``"bitnet"``, which is
transformers' own method; taking it over would change how every other BitNet model in the
process loads, and the quantizer hooks through which a stored tensor reaches its module were
rewritten between transformers 5.17 and 5.25. So :func:`from_pretrained` reads config.json and
the safetensors files itself, builds the model's skeleton on the meta device with transformers
(``AutoModelForCausalLM.from_config``), checks every tensor against it, then fills it: each
ternary linear is built as a :class:`~bitfx.modules.BitfxLinear` straight from its stored codes
(no float weight is made for it; an online layer's float weight is quantized as it is read, one
layer at a time), the other tensors are taken from the memory-mapped files, tied weights are tied
and the non-persistent buffers (rotary frequencies) computed.

:func:`save_pretrained` writes a model holding ``BitfxLinear`` layers (from :func:`bitfx.quantize`
or :func:`from_pretrained`) as such a directory, in the offline mode (codes and one scale per
layer, which transformers' format holds), which ``transformers.AutoModelForCausalLM.from_pretrained``
loads as its BitNet model. The scale is stored in the model's float dtype, as transformers' layers
hold it: a bfloat16 model's scales are rounded to bfloat16.
"""

from __future__ import annotations

import copy
import json
import os
import re
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn

from bitfx.checkpoint import CheckpointError, _cut, _listed, _meta_buffers, _names, _unwrap
from bitfx.hf_bitnet import BitfxNormLinear, from_autobitlinear_tensors, from_bitlinear_tensors, to_transformers
from bitfx.modules import BitfxLinear, Int8Linear
from bitfx.reference import ternarize, weight_scale

__all__ = ["from_pretrained", "save_pretrained"]

PathLike = Union[str, os.PathLike]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
_LINEAR_CLASSES = ("bitlinear", "autobitlinear")
_MODES = ("offline", "online")
_PER_BYTE = 4  # ternary rows per packed byte in transformers' format
# max_shard_size units: decimal, as transformers reads "5GB", and binary.
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


@dataclass(frozen=True)
class BitNetSpec:
    """A directory's ``quantization_config``, checked."""

    linear_class: str
    quantization_mode: str
    use_rms_norm: bool
    rms_norm_eps: float
    modules_to_not_convert: Optional[list]

    @property
    def online(self) -> bool:
        # transformers' BitLinear is packed whatever the mode says; only AutoBitLinear has an online form.
        return self.linear_class == "autobitlinear" and self.quantization_mode == "online"


# ---------------------------------------------------------------------------------------------- reading


def _read_config(path: str, where: str) -> dict:
    if not os.path.exists(path):
        raise CheckpointError(f"bitfx.from_pretrained: {where} does not exist")
    if not os.path.isdir(path):
        raise CheckpointError(f"bitfx.from_pretrained: {where} is not a directory (a BitNet checkpoint is a "
                              f"directory holding {CONFIG_NAME} and safetensors files)")
    file = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(file):
        raise CheckpointError(f"bitfx.from_pretrained: {where} holds no {CONFIG_NAME}, so it is no transformers "
                              f"checkpoint directory")
    try:
        with open(file, encoding="utf-8") as fh:
            raw = json.load(fh)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"bitfx.from_pretrained: {where}/{CONFIG_NAME} is not valid JSON "
                              f"({_cut(str(e))})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"bitfx.from_pretrained: {where}/{CONFIG_NAME} must hold a JSON object, got "
                              f"{type(raw).__name__}")
    return raw


def read_spec(raw: dict, where: str = "config.json") -> BitNetSpec:
    """The ``quantization_config`` of a parsed config.json, checked field by field; a
    :class:`~bitfx.checkpoint.CheckpointError` names what is wrong."""
    q = raw.get("quantization_config")
    if q is None:
        raise CheckpointError(f"bitfx.from_pretrained: {where} has no quantization_config: a float checkpoint, not a "
                              f"BitNet one (load it with transformers and convert it with bitfx.quantize)")
    if not isinstance(q, dict):
        raise CheckpointError(f"bitfx.from_pretrained: {where}: quantization_config must be a JSON object, got "
                              f"{type(q).__name__}")
    if q.get("quant_method") != "bitnet":
        method = _cut(repr(q.get("quant_method")), 60)
        raise CheckpointError(f"bitfx.from_pretrained: {where}: quant_method is {method}, expected 'bitnet' (bitfx "
                              f"reads BitNet b1.58 checkpoints only)")
    problems = []
    linear_class = q.get("linear_class", "bitlinear")
    if linear_class not in _LINEAR_CLASSES:
        problems.append(f"linear_class must be one of {', '.join(_LINEAR_CLASSES)}, got {_cut(repr(linear_class), 60)}")
    mode = q.get("quantization_mode", "offline")
    if mode not in _MODES:
        problems.append(f"quantization_mode must be one of {', '.join(_MODES)}, got {_cut(repr(mode), 60)}")
    use_rms_norm = q.get("use_rms_norm", False)
    if not isinstance(use_rms_norm, bool):
        problems.append(f"use_rms_norm must be true or false, got {_cut(repr(use_rms_norm), 60)}")
    eps = q.get("rms_norm_eps", 1e-6)
    if use_rms_norm is True and not (isinstance(eps, (int, float)) and not isinstance(eps, bool) and eps > 0):
        problems.append(f"rms_norm_eps must be a positive number with use_rms_norm, got {_cut(repr(eps), 60)}")
    skip = q.get("modules_to_not_convert")
    if skip is not None and not (isinstance(skip, list) and all(isinstance(s, str) for s in skip)):
        problems.append(f"modules_to_not_convert must be a list of module names, got {_cut(repr(skip), 120)}")
    if problems:
        raise CheckpointError(f"bitfx.from_pretrained: {where}: malformed quantization_config:" + _listed(problems))
    return BitNetSpec(linear_class, mode, use_rms_norm, float(eps) if use_rms_norm else 1e-6, skip)


def _open_files(path: str, where: str) -> dict:
    """``{tensor name: open safetensors file}`` for the directory's one file or its shards."""
    from safetensors import safe_open

    index = os.path.join(path, INDEX_NAME)
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as fh:
                weight_map = json.load(fh).get("weight_map")
        except (ValueError, RecursionError, AttributeError) as e:
            raise CheckpointError(f"bitfx.from_pretrained: {where}/{INDEX_NAME} is not a valid index "
                                  f"({_cut(str(e) or type(e).__name__)})") from None
        if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                       for k, v in weight_map.items()):
            raise CheckpointError(f"bitfx.from_pretrained: {where}/{INDEX_NAME}: weight_map must map tensor names "
                                  f"to file names")
    elif os.path.isfile(os.path.join(path, WEIGHTS_NAME)):
        weight_map = None
    else:
        other = [n for n in ("pytorch_model.bin", "model.bin") if os.path.isfile(os.path.join(path, n))]
        hint = f" (it holds {other[0]}: bitfx reads safetensors only)" if other else ""
        raise CheckpointError(f"bitfx.from_pretrained: {where} holds neither {WEIGHTS_NAME} nor {INDEX_NAME}{hint}")

    files = sorted(set(weight_map.values())) if weight_map is not None else [WEIGHTS_NAME]
    escaping = [f for f in files if os.path.basename(f) != f or f in ("", ".", "..")]
    if escaping:
        raise CheckpointError(f"bitfx.from_pretrained: {where}/{INDEX_NAME} names files outside the directory: "
                              f"{_names(escaping)}")
    missing = [f for f in files if not os.path.isfile(os.path.join(path, f))]
    if missing:
        counts = [f"{f} ({sum(v == f for v in weight_map.values())} tensors)" for f in missing]
        raise CheckpointError(f"bitfx.from_pretrained: {where} lacks shard(s) its {INDEX_NAME} lists: "
                              f"{_names(counts)}")
    handles = {}
    for f in files:
        try:
            handles[f] = safe_open(os.path.join(path, f), framework="pt", device="cpu")
        except Exception as e:  # safetensors' own error type differs between releases
            raise CheckpointError(f"bitfx.from_pretrained: {where}/{f} is not a readable safetensors file "
                                  f"(truncated or corrupted?): {_cut(str(e))}") from None
    if weight_map is None:
        return {name: handles[WEIGHTS_NAME] for name in handles[WEIGHTS_NAME].keys()}
    absent = sorted(name for name, f in weight_map.items() if name not in set(handles[f].keys()))
    if absent:
        raise CheckpointError(f"bitfx.from_pretrained: {where}: tensors its {INDEX_NAME} places in a shard that "
                              f"does not hold them: {_names(absent)}")
    return {name: handles[f] for name, f in weight_map.items()}


def ternary_linears(model: nn.Module, modules_to_not_convert: Optional[list], names=None) -> list[str]:
    """Which of ``names`` (default: ``model``'s ``nn.Linear`` layers) transformers makes ternary for
    a ``quantization_config`` holding ``modules_to_not_convert``: its own rule, its own defaults
    (None: the output head and tied weights) plus the model's keep-in-fp32 modules."""
    from transformers.quantizers import HfQuantizer
    from transformers.quantizers.quantizers_utils import should_convert_module

    keep = getattr(model, "_keep_in_fp32_modules", None)
    skip = HfQuantizer.get_modules_to_not_convert(model, None if modules_to_not_convert is None
                                                  else list(modules_to_not_convert), list(keep) if keep else None)
    if names is None:
        names = [n for n, m in model.named_modules() if n and isinstance(m, nn.Linear)]
    return [n for n in names if should_convert_module(n, skip)]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _what(t: torch.Tensor) -> str:
    return f"{_dtype_name(t.dtype)} {list(t.shape)}"


def _config_dtype(config) -> torch.dtype:
    dtype = getattr(config, "dtype", None)
    if isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype):
        dtype = getattr(torch, dtype)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def _layer_keys(spec: BitNetSpec, bias: bool) -> list[str]:
    return (["weight"] + ([] if spec.online else ["weight_scale"]) + (["bias"] if bias else [])
            + (["rms_norm.weight"] if spec.use_rms_norm else []))


def _build_ternary(name: str, linear: nn.Linear, spec: BitNetSpec, get, dtype: torch.dtype) -> nn.Module:
    """One ternary linear from its stored tensors, as the transformers layer ``spec`` names
    computes it (its float tensors in the model's ``dtype``, as transformers holds them)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    N, K = linear.out_features, linear.in_features
    weight = get(f"{name}.weight")
    bias = get(f"{name}.bias") if linear.bias is not None else None
    if bias is not None:
        if not bias.is_floating_point() or tuple(bias.shape) != (N,):
            raise ValueError(f"{name}.bias: {_what(bias)} in the checkpoint, expected a float [{N}]")
        bias = bias.to(dtype)
    packed_shape = [-(-N // _PER_BYTE), K]
    if spec.online:
        if not weight.is_floating_point() or tuple(weight.shape) != (N, K):
            raise ValueError(f"{name}.weight: {_what(weight)} in the checkpoint, an online layer holds its float "
                             f"weight [{N}, {K}]")
        w = weight.to(dtype)  # transformers quantizes the weight as the model holds it
        s = weight_scale(w)
        layer = BitfxLinear.from_ternary(ternarize(w, s), s, bias, weight_dtype=dtype)
    else:
        if weight.dtype == torch.uint8 and list(weight.shape) != packed_shape:
            raise ValueError(f"{name}.weight: {_what(weight)} in the checkpoint, the model's [{N}, {K}] linear packs "
                             f"to {packed_shape}")
        if spec.linear_class == "bitlinear" and weight.dtype != torch.uint8:
            raise ValueError(f"{name}.weight: {_what(weight)} in the checkpoint, a bitlinear layer stores packed "
                             f"uint8 {packed_shape}")
        if weight.dtype != torch.uint8 and (not weight.is_floating_point() or tuple(weight.shape) != (N, K)):
            raise ValueError(f"{name}.weight: {_what(weight)} in the checkpoint, expected the ternary values "
                             f"[{N}, {K}] or packed uint8 {packed_shape}")
        scale = get(f"{name}.weight_scale")
        if not scale.is_floating_point() or scale.numel() != 1:
            raise ValueError(f"{name}.weight_scale: {_what(scale)} in the checkpoint, expected one float value")
        scale = scale.to(dtype)  # transformers holds the scale in the model's dtype
        convert = from_bitlinear_tensors if spec.linear_class == "bitlinear" else from_autobitlinear_tensors
        layer = convert(weight, scale, bias, N, dtype, where=name)
    if not spec.use_rms_norm:
        return layer
    norm_weight = get(f"{name}.rms_norm.weight")
    if not norm_weight.is_floating_point() or tuple(norm_weight.shape) != (K,):
        raise ValueError(f"{name}.rms_norm.weight: {_what(norm_weight)} in the checkpoint, expected a float [{K}]")
    with torch.device("meta"):
        norm = LlamaRMSNorm(K, eps=spec.rms_norm_eps)
    norm.weight = nn.Parameter(norm_weight.to(dtype), requires_grad=False)
    return BitfxNormLinear(norm, layer)


def from_pretrained(path: PathLike, *, dtype: Optional[torch.dtype] = None,
                    device: Optional[Union[str, torch.device]] = None) -> nn.Module:
    """Load a BitNet checkpoint directory (transformers' format; see the module's docstring)
    into a transformers causal-LM model whose ternary linears are :class:`BitfxLinear` (or
    :class:`~bitfx.hf_bitnet.BitfxNormLinear` with ``use_rms_norm``); returns it in eval mode.

    ``dtype``: the float dtype of the model (default: the one config.json names, else float32);
    float tensors stored in another are cast, as transformers does. ``device``: where the model
    ends (default: the CPU, tensors memory-mapped from the files). Reads only local files. A
    directory that does not fit (no config.json, another ``quant_method``, a missing shard, a
    missing, unexpected or misshapen tensor, a packed code that is no ternary value) raises
    :class:`~bitfx.checkpoint.CheckpointError` naming every problem, before the model is built."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = os.fspath(path)
    where = _cut(path)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"bitfx.from_pretrained: dtype must be a float torch.dtype, got {_cut(repr(dtype), 60)}")
    if device is not None:
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError, ValueError) as e:
            raise ValueError(f"bitfx.from_pretrained: device={_cut(repr(device))} is not a device torch knows "
                             f"({_cut(str(e))})") from None
    spec = read_spec(_read_config(path, where), f"{where}/{CONFIG_NAME}")
    files = _open_files(path, where)
    config = AutoConfig.from_pretrained(path)
    # The config's quantization_config describes the files, not the bitfx model built from them.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    dtype = dtype or _config_dtype(config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)

    ternary = ternary_linears(model, spec.modules_to_not_convert)
    float_state = {k: t for k, t in model.state_dict(keep_vars=True).items()
                   if not any(k.startswith(n + ".") for n in ternary)}
    expected = set(float_state) | {f"{n}.{k}" for n in ternary
                                   for k in _layer_keys(spec, model.get_submodule(n).bias is not None)}
    tied = dict(getattr(model, "all_tied_weights_keys", None) or {})  # {target: source}
    stored = set(files)
    problems = []
    for n in ternary:
        if f"{n}.weight" in tied or f"{n}.weight" in tied.values():
            problems.append(f"{n}: a ternary linear whose weight is tied to another tensor (list it in "
                            f"modules_to_not_convert)")
    missing = sorted(k for k in expected - stored if not (k in tied and tied[k] in stored))
    if missing:
        problems.append(f"missing from the checkpoint: {_names(missing)}")
    unexpected = sorted(stored - expected)
    if unexpected:
        problems.append(f"in the checkpoint but not the model: {_names(unexpected)}")

    def get(key):
        return files[key].get_tensor(key)

    built = {}
    for n in ternary:
        linear = model.get_submodule(n)
        if any(k not in stored for k in (f"{n}.{k}" for k in _layer_keys(spec, linear.bias is not None))):
            continue  # named above
        try:
            built[n] = _build_ternary(n, linear, spec, get, dtype)
        except (ValueError, TypeError) as e:
            problems.append(str(e) if str(e).startswith(n + ".") else f"{n}: {e}")
    state = {}
    for k, want in float_state.items():
        if k not in stored:
            continue
        got = get(k)
        if tuple(got.shape) != tuple(want.shape):
            problems.append(f"{k}: shape {list(got.shape)} in the checkpoint, {list(want.shape)} in the model")
        elif got.is_floating_point() and want.is_floating_point():
            state[k] = got.to(want.dtype)  # as transformers casts to the model's dtype
        elif got.dtype != want.dtype:
            problems.append(f"{k}: dtype {_dtype_name(got.dtype)} in the checkpoint, {_dtype_name(want.dtype)} in "
                            f"the model")
        else:
            state[k] = got
    if problems:
        raise CheckpointError(f"bitfx.from_pretrained: {where} does not fit its {CONFIG_NAME} "
                              f"({type(model).__name__}, {spec.linear_class}, {spec.quantization_mode}); nothing was "
                              f"loaded:" + _listed(problems))

    model.load_state_dict(state, strict=False, assign=True)  # the ternary names, still nn.Linear on meta, left out
    for n, layer in built.items():
        model.set_submodule(n, layer)
    model.tie_weights()
    rebuilt, left = _meta_buffers(model, {}, torch.device("cpu"))
    for (module, buffer), value in rebuilt.items():
        module._buffers[buffer] = value
    left += [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta and n not in left]
    if left:
        raise RuntimeError(f"bitfx.from_pretrained: {_names(left)} of {type(model).__name__} have no value (on the "
                           f"meta device): no checkpoint holds them and bitfx cannot compute them")
    if device is not None:
        model.to(device)
    return model.eval()


# ---------------------------------------------------------------------------------------------- writing


def _shard_bytes(max_shard_size) -> int:
    if isinstance(max_shard_size, int) and not isinstance(max_shard_size, bool) and max_shard_size > 0:
        return max_shard_size
    if isinstance(max_shard_size, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]+)\s*", max_shard_size)
        if m and m.group(2).upper() in _UNITS and float(m.group(1)) > 0:
            return max(1, int(float(m.group(1)) * _UNITS[m.group(2).upper()]))
    raise ValueError(f"bitfx.save_pretrained: max_shard_size must be a positive number of bytes or a size such as "
                     f"'5GB' or '500MiB', got {_cut(repr(max_shard_size), 60)}")


def _ternary_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``{name: BitfxLinear or BitfxNormLinear}``, a BitfxNormLinear's own linear not listed apart."""
    out, inside = {}, set()
    for name, m in model.named_modules():
        if isinstance(m, BitfxNormLinear):
            out[name] = m
            inside.add(id(m.linear))
        elif isinstance(m, BitfxLinear) and id(m) not in inside:
            out[name] = m
    return out


def _norm_eps(layers: dict[str, nn.Module]) -> Optional[float]:
    """The one ``rms_norm_eps`` of the layers' own RMSNorms, None when they hold none; a
    ValueError where transformers' one ``use_rms_norm`` / ``rms_norm_eps`` cannot say it."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    with_norm = [n for n, m in layers.items() if isinstance(m, BitfxNormLinear)]
    if not with_norm:
        return None
    if len(with_norm) != len(layers):
        without = [n for n in layers if n not in with_norm]
        raise ValueError(f"bitfx.save_pretrained: transformers' format gives every ternary linear an RMSNorm of its "
                         f"own or none; {_names(with_norm)} hold one, {_names(without)} do not")
    other = [n for n in with_norm if type(layers[n].rms_norm) is not LlamaRMSNorm]
    if other:
        raise ValueError(f"bitfx.save_pretrained: transformers' format holds a LlamaRMSNorm in each ternary linear; "
                         f"{_names(other)} hold a {type(layers[other[0]].rms_norm).__name__}")
    eps = {float(layers[n].rms_norm.variance_epsilon) for n in with_norm}
    if len(eps) > 1:
        raise ValueError(f"bitfx.save_pretrained: transformers' format holds one rms_norm_eps; the layers' norms "
                         f"have {sorted(eps)}")
    return eps.pop()


def _layer_state(layer: nn.Module, linear_class: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The tensors transformers' ``linear_class`` layer (offline) stores for ``layer``."""
    sd = to_transformers(layer, dtype).state_dict()
    if linear_class == "autobitlinear":
        # The codes packed as BitLinear's (transformers unpacks them at load); the scale multiplies
        # after the bias: weight_scale = 1 / w_scale, bias = b * w_scale.
        linear = layer.linear if isinstance(layer, BitfxNormLinear) else layer
        s = linear.w_scale[:1].float()
        sd["weight_scale"] = (1.0 / s).to(dtype)
        if linear.bias is not None:
            sd["bias"] = (linear.bias.float() * s).to(dtype)
    return sd


def _float_tensors(model: nn.Module, ternary: dict) -> dict[str, torch.Tensor]:
    """The state_dict's other tensors on the CPU: a tied weight transformers ties again at load is
    written once, under its source's name; any other sharing of memory is written as copies."""
    tied = dict(getattr(model, "all_tied_weights_keys", None) or {})  # {target: source}
    out: dict[str, torch.Tensor] = {}
    owners: dict[int, str] = {}
    sd = model.state_dict()
    for name, t in sd.items():
        if any(name.startswith(n + ".") for n in ternary):
            continue
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if ptr is not None and ptr in owners:
            if tied.get(name) == owners[ptr]:
                continue  # transformers ties it again at load
            t = t.clone()
        elif ptr is not None:
            owners[ptr] = name
        out[name] = t.detach().to("cpu").contiguous()
    return out


def _check_decision(model: nn.Module, ternary: dict, float_linears: list) -> None:
    """transformers, reading the written ``modules_to_not_convert``, converts exactly the ternary layers."""
    chosen = set(ternary_linears(model, float_linears, [*ternary, *float_linears]))
    wrong = sorted((set(ternary) - chosen) | (chosen & set(float_linears)))
    if wrong:
        raise ValueError(f"bitfx.save_pretrained: transformers would not read {_names(wrong)} as they are in the model "
                         f"(ternary or float): their names overlap others in modules_to_not_convert, or the model "
                         f"keeps them in float32")


def _write_shards(tensors: dict[str, torch.Tensor], path: str, limit: int) -> list[str]:
    """Write ``tensors`` in order, a new shard whenever the next would pass ``limit`` bytes (a
    tensor larger than it alone in one); returns the file names."""
    from safetensors.torch import save_file

    shards: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    if len(shards) == 1:
        names = {WEIGHTS_NAME: shards[0]}
    else:
        names = {f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors": s for i, s in enumerate(shards)}
    for file, keys in names.items():
        save_file({k: tensors[k] for k in keys}, os.path.join(path, file), metadata={"format": "pt"})
    index = os.path.join(path, INDEX_NAME)
    if len(names) > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map = {k: file for file, keys in names.items() for k in keys}
        with open(index, "w", encoding="utf-8") as fh:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh, indent=2, sort_keys=True)
            fh.write("\n")
    elif os.path.exists(index):
        os.remove(index)
    for old in os.listdir(path):  # an earlier save's files, which would otherwise be read with these
        if (old == WEIGHTS_NAME or _SHARD_NAME.fullmatch(old)) and old not in names:
            os.remove(os.path.join(path, old))
    return list(names)


def save_pretrained(model: nn.Module, path: PathLike, *, max_shard_size: Union[int, str] = "5GB",
                    linear_class: str = "bitlinear") -> list[str]:
    """Write ``model`` (a transformers model holding :class:`BitfxLinear` or
    :class:`~bitfx.hf_bitnet.BitfxNormLinear` layers) as a BitNet checkpoint directory that
    ``transformers.AutoModelForCausalLM.from_pretrained(path)`` loads as its BitNet model:
    config.json with ``quantization_config`` (``quant_method: "bitnet"``, offline mode,
    ``linear_class`` ``"bitlinear"`` or ``"autobitlinear"``, ``use_rms_norm`` as the layers have
    it, ``modules_to_not_convert`` naming every linear left in float), the generation config,
    and the tensors in ``model.safetensors``, or in shards of at most ``max_shard_size`` (bytes,
    or a size such as ``"5GB"``) listed by ``model.safetensors.index.json``; an earlier save's
    weight files there are removed. Returns the weight files' names.

    An int8 output head (``BitfxConfig(head="int8")``) is written as the float weight it multiplies
    by (``qweight * scale`` in the model's dtype) and listed in ``modules_to_not_convert``; a head
    that was tied to the embedding is untied in the written config (its weight is its own now).

    The format holds one ternary matrix and one scale per layer, 8-bit activations and
    ``out_features`` a multiple of 4: a layer that is not so (``per_channel``, ``terms > 1``,
    ``act_bits != 8``) raises a ValueError naming every such layer, before anything is written.
    """
    from transformers import BitNetQuantConfig

    model = _unwrap(model)
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "save_pretrained"):
        raise TypeError(f"bitfx.save_pretrained: expected a transformers model (with a config), got "
                        f"{type(model).__name__}")
    if linear_class not in _LINEAR_CLASSES:
        raise ValueError(f"bitfx.save_pretrained: linear_class must be one of {', '.join(_LINEAR_CLASSES)}, got "
                         f"{_cut(repr(linear_class), 60)}")
    limit = _shard_bytes(max_shard_size)
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"bitfx.save_pretrained: {_cut(path)} exists and is not a directory")
    ternary = _ternary_layers(model)
    if not ternary:
        raise ValueError(f"bitfx.save_pretrained: {type(model).__name__} holds no BitfxLinear layer; convert it with "
                         f"bitfx.quantize first (a float model is saved with transformers' own save_pretrained)")
    eps = _norm_eps(ternary)
    dtype = getattr(model, "dtype", None)  # a transformers model's: that of its float parameters
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"bitfx.save_pretrained: {type(model).__name__} has no float parameters to take the "
                         f"checkpoint's dtype from")

    tensors: dict[str, torch.Tensor] = {}
    problems = []
    for name, layer in ternary.items():
        try:
            sd = _layer_state(layer, linear_class, dtype)
        except ValueError as e:
            problems.append(f"{name}: {e}")
            continue
        tensors.update({f"{name}.{k}": v.detach().to("cpu").contiguous() for k, v in sd.items()})
    if problems:
        raise ValueError(f"bitfx.save_pretrained: {len(problems)} of {len(ternary)} ternary layers have no form in "
                         f"transformers' BitNet format; nothing was written:" + _listed(problems))
    # An int8 head (BitfxConfig(head="int8")) has no form of its own there: it is written as the
    # float weight it multiplies by, a float linear transformers loads as it is.
    int8 = {n: m for n, m in model.named_modules() if n and isinstance(m, Int8Linear)}
    float_linears = sorted(n for n, m in model.named_modules() if n and isinstance(m, (nn.Linear, Int8Linear)))
    _check_decision(model, ternary, float_linears)
    tensors.update(_float_tensors(model, {**ternary, **int8}))
    for name, head in int8.items():
        tensors[f"{name}.weight"] = head.dequantize(dtype).detach().to("cpu").contiguous()
        if head.bias is not None:
            tensors[f"{name}.bias"] = head.bias.detach().to("cpu", dtype).contiguous()

    out_config = copy.deepcopy(config)
    out_config.quantization_config = BitNetQuantConfig(
        modules_to_not_convert=float_linears, linear_class=linear_class, quantization_mode="offline",
        use_rms_norm=eps is not None, rms_norm_eps=1e-6 if eps is None else eps,
    )
    out_config.dtype = dtype
    out_config.architectures = [type(model).__name__]
    if int8 and getattr(out_config, "tie_word_embeddings", False):
        out_config.tie_word_embeddings = False  # the head's own (int8-rounded) weight, not the embedding's
    os.makedirs(path, exist_ok=True)
    files = _write_shards(tensors, path, limit)
    out_config.save_pretrained(path)
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(path)
    return files
