"""Checkpoints of converted models in safetensors: :func:`save` and :func:`load`.

One ``.safetensors`` file holds every tensor of the model's ``state_dict`` (packed 2-bit codes,
fp32 weight scales, biases and every float tensor), each stored once (tied tensors are written
once and named as aliases), and a metadata header that names and versions the format:

``format``          ``"bitfx-checkpoint"``
``format_version``  ``"1"`` (a reader refuses a newer version, naming both)
``bitfx_version``   the version that wrote it
``layout``          the packed layout (:data:`bitfx.layout.FORMAT`)
``scale``           the scale convention: ``W ~= t / w_scale``, fp32, one per output channel
``ternary``         JSON: for every ternary linear, its name, ``in_features``,
                    ``out_features``, ``bias``, ``per_channel``, ``terms`` (ternary matrices
                    summed), ``act_bits`` and the float dtype it stands for
``int8``            JSON: for every int8 output head (``BitfxConfig(head="int8")``), its name,
                    ``in_features``, ``out_features``, ``bias`` and float dtype (absent in files
                    written before int8 heads: none)
``aliases``         JSON: a tied tensor's name -> the name it is stored under
``checksums``       JSON: every stored tensor's name -> ``"crc32:<8 hex digits>"``, the CRC-32
                    of its raw bytes as the file holds them

:func:`load` checks the whole file against the model before it changes anything (nothing is
loaded half), memory-maps the file, swaps the listed linears for
:class:`~bitfx.modules.BitfxLinear` built on the meta device (no float weight is ever made
for them) and assigns the file's tensors to the model.

Every tensor :func:`load` reads is checked against its checksum first: a flipped bit anywhere
in its data (a code, a scale or norm weight multiplied by a power of two) is a
:class:`CheckpointError` naming the tensor. CRC-32 finds every error of up to 32 consecutive
bits and all but 2^-32 of the others: it finds corruption, not a forgery (a file is trusted as
much as its source). The cost, measured on the 2-core CI machine (AMD EPYC; zlib's CRC-32 runs
at about 1.4 GB/s per core and releases the GIL, so tensors are hashed on several threads):
0.55 s for a 1.2 GB set of tensors; 0.55 to 0.7 s for the 0.77 GB of a ternary
Llama-3.2-1B-shaped checkpoint (its bf16 embedding, one 0.53 GB tensor on one thread, sets the
pace); at load 0.7 to 1.0 s with the memory-mapped file's pages faulted in, where reading it
lazily takes 0.03 s. About 0.5 to 1 s per GB at save and again at load: about what reading the
file once from disk costs, and a model's first run reads every byte anyway, so there is no
switch to skip it.

A checkpoint written without checksums (by bitfx before they were added; the format version
is the same, since a reader that does not know them loads the file as before) loads with a
warning that its tensors were not verified.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Union

import torch
from torch import nn

from bitfx import fused_norm
from bitfx.layout import FORMAT
from bitfx.modules import BitfxLinear, Int8Linear

__all__ = ["save", "load", "CheckpointError", "CHECKPOINT_FORMAT", "CHECKPOINT_VERSION"]

CHECKPOINT_FORMAT = "bitfx-checkpoint"
CHECKPOINT_VERSION = 1
_SCALE = "W ~= t / w_scale; w_scale float32, one per output channel (a per-tensor scale repeated)"

PathLike = Union[str, os.PathLike]


def _version() -> str:
    from bitfx import __version__

    return __version__


_COMPILED_PREFIX = "_orig_mod."


def _unwrap(model: nn.Module) -> nn.Module:
    """The model under ``torch.compile``'s wrapper (``OptimizedModule._orig_mod``), so that a
    checkpoint names tensors as the plain model does, whichever of the two is saved or loaded."""
    from torch._dynamo.eval_frame import OptimizedModule

    while isinstance(model, OptimizedModule):
        model = model._orig_mod
    return model


def _file_path(op: str, path) -> str:
    """``path`` as a str, or a TypeError naming what was given: a bitfx checkpoint is a
    safetensors file, written and memory-mapped by its name (not a file object or buffer, which
    ``torch.save`` would take)."""
    if isinstance(path, (str, os.PathLike)):
        return os.fspath(path)
    raise TypeError(f"bitfx.{op}: path must be a file path (str or os.PathLike), got {type(path).__name__}: a bitfx "
                    f"checkpoint is a safetensors file, written and memory-mapped by its name")


def save(model: nn.Module, path: PathLike) -> None:
    """Write ``model``'s state (converted layers packed, the rest as it is) to ``path``, one
    safetensors file with the format in its metadata. Tensors may be on any device. A
    model wrapped by ``torch.compile`` is saved as the model it wraps (no ``_orig_mod.`` names)."""
    from safetensors.torch import save_file

    path = _file_path("save", path)
    model = _unwrap(model)
    sd = model.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, t in sd.items():
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.detach().to("cpu").contiguous()
    ternary = {
        name: {
            "in_features": m.in_features,
            "out_features": m.out_features,
            "bias": m.bias is not None,
            "per_channel": bool(m.per_channel),
            "terms": m.terms,
            "act_bits": m.act_bits,
            "weight_dtype": str(m.weight_dtype).removeprefix("torch."),
        }
        for name, m in model.named_modules()
        if isinstance(m, BitfxLinear)
    }
    int8 = {
        name: {"in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None,
               "weight_dtype": str(m.weight_dtype).removeprefix("torch.")}
        for name, m in model.named_modules()
        if isinstance(m, Int8Linear)
    }
    metadata = {
        "format": CHECKPOINT_FORMAT,
        "format_version": str(CHECKPOINT_VERSION),
        "bitfx_version": _version(),
        "layout": FORMAT,
        "scale": _SCALE,
        "ternary": json.dumps(ternary, sort_keys=True),
        "int8": json.dumps(int8, sort_keys=True),
        "aliases": json.dumps(aliases, sort_keys=True),
        "norms": json.dumps(fused_norm.fused_norms(model), sort_keys=True),
        "checksums": json.dumps(_checksums(tensors), sort_keys=True),
    }
    save_file(tensors, os.fspath(path), metadata=metadata)


_CHECKSUM = re.compile(r"crc32:[0-9a-f]{8}")


def _crc32(t: torch.Tensor) -> str:
    """CRC-32 of a CPU tensor's raw bytes (little-endian, as safetensors writes them), read in place."""
    t = t.contiguous()
    n = t.numel() * t.element_size()
    data = (ctypes.c_char * n).from_address(t.data_ptr()) if n else b""
    return f"crc32:{zlib.crc32(data):08x}"


def _checksums(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """:func:`_crc32` of each tensor, the largest first, on several threads (zlib releases the GIL)."""
    names = sorted(tensors, key=lambda k: -tensors[k].numel() * tensors[k].element_size())
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return dict(zip(names, pool.map(lambda k: _crc32(tensors[k]), names)))


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model, or is not a readable bitfx checkpoint."""


# Bounds on what the metadata may say: no checkpoint bitfx writes comes near them, and an error
# message about a malformed one stays short whatever the file holds.
_MAX_NAME = 1024  # characters in a tensor or module name
_MAX_FEATURES = 2**31 - 1
_MAX_TERMS = 64
_MAX_PROBLEMS = 20  # listed in one CheckpointError; the rest are counted
# The float dtypes a BitfxLinear may stand for (its bias's dtype), by the names bitfx.save writes.
_WEIGHT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                  "float64": torch.float64}
# Fields of one "ternary" entry: required ones, then optional ones with the value a file
# written before them means.
_SPEC_REQUIRED = ("in_features", "out_features", "bias", "per_channel", "weight_dtype")
_SPEC_DEFAULTS = {"terms": 1, "act_bits": 8}


def _read_header(path: PathLike):
    """Open ``path`` and check its metadata against the format: ``(file, ternary, aliases)``,
    ``ternary`` as {name: spec with every field}, or a :class:`CheckpointError` naming what is
    wrong (bounded in length, whatever the file holds)."""
    from safetensors import safe_open

    where = _cut(os.fspath(path))
    try:
        f = safe_open(os.fspath(path), framework="pt", device="cpu")
    except FileNotFoundError:
        raise
    except Exception as e:  # safetensors' own error type differs between releases
        raise CheckpointError(f"bitfx.load: {where} is not a readable safetensors file "
                              f"(truncated or corrupted?): {_cut(str(e))}") from None
    meta = f.metadata() or {}  # safetensors holds str -> str
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"bitfx.load: {where} is not a bitfx checkpoint (metadata format "
            f"{_cut(repr(meta.get('format')))}, expected {CHECKPOINT_FORMAT!r}); bitfx.save writes one"
        )
    version = meta.get("format_version", "")
    if version != str(CHECKPOINT_VERSION):
        raise CheckpointError(
            f"bitfx.load: {where} is format version {_cut(repr(version))} (written by bitfx "
            f"{_cut(str(meta.get('bitfx_version')))}); this bitfx {_version()} reads version {CHECKPOINT_VERSION}"
        )
    if meta.get("layout") != FORMAT:
        raise CheckpointError(
            f"bitfx.load: {where} packs its weights as {_cut(repr(meta.get('layout')))}; this bitfx reads {FORMAT!r}"
        )
    problems: list[str] = []
    ternary = _json_field(meta, "ternary", problems)
    aliases = _json_field(meta, "aliases", problems)
    ternary = _check_layers("ternary", ternary, problems, _SPEC_REQUIRED, _SPEC_DEFAULTS)
    int8 = _check_layers("int8", _json_field(meta, "int8", problems), problems, _INT8_FIELDS, {})
    for name in sorted(set(int8) & set(ternary)):
        problems.append(f"int8: {_cut(repr(name), 120)} is listed as ternary too")
    aliases = _check_aliases(aliases, problems)
    norms = _check_norms(_json_field(meta, "norms", problems), problems)
    checksums = None
    if "checksums" in meta:
        checksums = _check_checksums(_json_field(meta, "checksums", problems), problems)
    if problems:
        raise CheckpointError(f"bitfx.load: {where} has malformed metadata; nothing was loaded:" + _listed(problems))
    return f, ternary, int8, aliases, checksums, norms


def _check_norms(norms, problems: list) -> dict:
    """``{module name: fused norm spec}`` (:mod:`bitfx.fused_norm`; a file written before them
    holds none); whether the model has those modules is checked against it."""
    if not isinstance(norms, dict):
        problems.append("norms: not a JSON object")
        return {}
    out = {}
    for name, spec in norms.items():
        bad = _bad_name(name)
        found = [f"norms: {bad}"] if bad else fused_norm.check_spec(f"norms: {_cut(repr(name), 120)}", spec, None)
        problems += found
        if not found:
            out[name] = spec
    return out


def _check_checksums(checksums, problems: list) -> dict:
    """``{name: "crc32:<8 hex>"}``; which tensors they cover is checked as they are read."""
    if not isinstance(checksums, dict):
        problems.append(f"checksums: must be a JSON object {{name: checksum}}, got {type(checksums).__name__}")
        return {}
    bad = sorted(_cut(repr(k), 120) for k, v in checksums.items()
                 if not (isinstance(v, str) and _CHECKSUM.fullmatch(v)))
    if bad:
        problems.append(f"checksums: not of the form 'crc32:<8 hex digits>' for {_names(bad)}")
    return checksums


def _json_field(meta: dict, key: str, problems: list) -> object:
    try:
        return json.loads(meta.get(key, "{}"))
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError; nesting too deep
        problems.append(f"{key}: not valid JSON ({_cut(str(e) or type(e).__name__)})")
        return {}


def _is_int(v, lo: int, hi: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _bad_name(name) -> Optional[str]:
    if not isinstance(name, str):
        return f"a name must be a string, got {_cut(repr(name), 80)}"
    if not name or len(name) > _MAX_NAME:
        return f"a name must hold 1 to {_MAX_NAME} characters, got {len(name)}: {_cut(repr(name), 80)}"
    return None


# What each field of a layer's metadata may hold: (test, the words for it).
_FIELD_CHECKS = {
    "in_features": (lambda v: _is_int(v, 1, _MAX_FEATURES), f"an int in [1, {_MAX_FEATURES}]"),
    "out_features": (lambda v: _is_int(v, 1, _MAX_FEATURES), f"an int in [1, {_MAX_FEATURES}]"),
    "bias": (lambda v: isinstance(v, bool), "true or false"),
    "per_channel": (lambda v: isinstance(v, bool), "true or false"),
    "terms": (lambda v: _is_int(v, 1, _MAX_TERMS), f"an int in [1, {_MAX_TERMS}]"),
    "act_bits": (lambda v: _is_int(v, 4, 8) and v in (4, 6, 8), "8, 6 or 4"),
    "weight_dtype": (lambda v: isinstance(v, str) and v in _WEIGHT_DTYPES, f"one of {', '.join(_WEIGHT_DTYPES)}"),
}
# The fields of an int8 head's metadata (all required).
_INT8_FIELDS = ("in_features", "out_features", "bias", "weight_dtype")


def _wrong_fields(spec: dict) -> list[str]:
    """What is wrong with each field of ``spec`` (one layer's metadata), in words."""
    return [f"{k} must be {what}, got {_cut(json.dumps(v), 80)}" for k, v in spec.items()
            for ok, what in [_FIELD_CHECKS[k]] if not ok(v)]


def _check_layers(key: str, specs, problems: list, required: tuple, defaults: dict) -> dict:
    """The ``key`` metadata (``ternary`` or ``int8``: {name: fields} of each such layer) checked
    field by field: every ``required`` field, those of ``defaults`` optional (filled in), no other."""
    if not isinstance(specs, dict):
        problems.append(f"{key}: must be a JSON object {{name: fields}}, got {type(specs).__name__}")
        return {}
    out = {}
    for name, spec in specs.items():
        bad = _bad_name(name)
        if bad:
            problems.append(f"{key}: {bad}")
            continue
        where = f"{key}[{_cut(repr(name), 120)}]"
        if not isinstance(spec, dict):
            problems.append(f"{where}: must be a JSON object of fields, got {type(spec).__name__}")
            continue
        unknown = sorted(set(spec) - set(required) - set(defaults))
        lacking = [k for k in required if k not in spec]
        if unknown or lacking:
            problems.append(f"{where}: " + "; ".join(
                ([f"fields missing: {', '.join(lacking)}"] if lacking else [])
                + ([f"unknown fields: {_cut(', '.join(map(str, unknown)), 120)}"] if unknown else [])))
            continue
        spec = {**defaults, **spec}
        wrong = _wrong_fields(spec)
        if wrong:
            problems.append(f"{where}: " + "; ".join(wrong))
            continue
        out[name] = spec
    return out


def _check_aliases(aliases, problems: list) -> dict:
    if not isinstance(aliases, dict):
        problems.append(f"aliases: must be a JSON object {{alias: stored name}}, got {type(aliases).__name__}")
        return {}
    out = {}
    for alias, target in aliases.items():
        bad = _bad_name(alias) or _bad_name(target)
        if bad or alias == target:
            problems.append(f"aliases[{_cut(repr(alias), 120)}]: {bad or 'an alias of itself'}")
            continue
        out[alias] = target
    return out


def _listed(problems: list) -> str:
    """``problems`` as indented lines: at most ``_MAX_PROBLEMS``, each cut, then a count of the rest."""
    lines = [_cut(p, 400) for p in problems[:_MAX_PROBLEMS]]
    if len(problems) > _MAX_PROBLEMS:
        lines.append(f"... and {len(problems) - _MAX_PROBLEMS} more")
    return "\n  " + "\n  ".join(lines)


def load(model: nn.Module, path: PathLike, *, device: Optional[Union[str, torch.device]] = None,
         strict: bool = True) -> nn.Module:
    """Load a :func:`save`\\ d checkpoint into ``model``, in place; returns ``model``.

    ``model`` is the float model's skeleton, best built on the meta device (``with
    torch.device("meta"): model = Model(config)``) so that no float weight is made for the
    layers the checkpoint holds ternary; the linears it lists are swapped for
    :class:`BitfxLinear`. Tensors are memory-mapped from the file (``device=None`` or
    ``"cpu"``) or copied to ``device``. Every problem (another format version, malformed
    metadata, a truncated file, a tensor whose bytes do not match its checksum, a missing or
    unexpected tensor, a shape, dtype or code that does not fit)
    raises :class:`CheckpointError` naming it, before the model is changed; so does a ``device``
    the tensors cannot be moved to (a ValueError for a device torch does not know, a RuntimeError
    for one it cannot reach or fill). Buffers the
    ``state_dict`` does not hold (non-persistent ones) stay as the skeleton has them, except
    those a meta skeleton has on the meta device: a module holding them that has no parameters
    and is built from its ``config`` (transformers' rotary embeddings) is built again to compute
    them (on ``device``); any other is named in a warning. A
    ``model`` wrapped by ``torch.compile`` is loaded through to the model it wraps.
    """
    path = _file_path("load", path)
    given, model = model, _unwrap(model)
    target = _device(device)
    f, ternary, int8, aliases, checksums, norms = _read_header(path)
    where = _cut(os.fspath(path))
    if checksums is None:
        warnings.warn(f"bitfx.load: {where} holds no checksums (written by bitfx "
                      f"{_cut(str(f.metadata().get('bitfx_version')), 40)} before they were added): its tensors are "
                      f"loaded without verification; bitfx.save writes them", stacklevel=2)
    problems: list[str] = []
    replacements: dict[str, Union[BitfxLinear, Int8Linear]] = {}
    for kind, specs in (("a ternary linear", ternary), ("an int8 output head", int8)):
        for name, spec in specs.items():
            try:
                old = model.get_submodule(name)
            except AttributeError:
                problems.append(f"{name}: the checkpoint holds {kind} the model does not have")
                continue
            if isinstance(old, (nn.Linear, BitfxLinear, Int8Linear)):
                shape = (old.out_features, old.in_features)
            else:
                problems.append(f"{name}: the checkpoint holds {kind}, the model a {type(old).__name__}")
                continue
            if shape != (spec["out_features"], spec["in_features"]):
                problems.append(f"{name}: [out, in] = {list(shape)} in the model, "
                                f"{[spec['out_features'], spec['in_features']]} in the checkpoint")
                continue
            dtype = _WEIGHT_DTYPES[spec["weight_dtype"]]
            if specs is int8:
                replacements[name] = Int8Linear(spec["in_features"], spec["out_features"], spec["bias"],
                                                device="meta", dtype=dtype)
                continue
            replacements[name] = BitfxLinear(spec["in_features"], spec["out_features"], spec["bias"],
                                             per_channel=spec["per_channel"], terms=spec["terms"],
                                             act_bits=spec["act_bits"], device="meta", dtype=dtype)

    norm_modules = {}
    for name, spec in norms.items():
        try:
            norm_modules[name] = model.get_submodule(name)
        except AttributeError:
            problems.append(f"{name}: the checkpoint holds a fused RMSNorm the model does not have")
            continue
        problems += fused_norm.check_spec(name, spec, norm_modules[name])

    # The state the model will have once the linears are swapped: names, shapes, dtypes.
    expected: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if not any(name.startswith(r + ".") for r in replacements):
            expected[name] = t
    for r, m in replacements.items():
        for k, t in m.state_dict(keep_vars=True).items():
            expected[f"{r}.{k}"] = t
    stored = set(f.keys())
    names = stored | set(aliases)
    missing = sorted(set(expected) - names)
    unexpected = sorted(names - set(expected))
    if missing and strict:
        problems.append(f"missing from the checkpoint: {_names(missing)}")
    if unexpected and strict:
        problems.append(f"in the checkpoint but not the model: {_names(unexpected)}")
        if all(n.startswith(_COMPILED_PREFIX) for n in unexpected):
            problems.append(f"(the names start with {_COMPILED_PREFIX!r}: the file was saved from a torch.compile "
                            f"wrapper by an older bitfx; save the model again with this one)")
    bad_alias = sorted(a for a, target in aliases.items() if target not in stored)
    if bad_alias:
        problems.append(f"aliases of tensors the file does not hold: {_names(bad_alias)}")
    both = sorted(set(aliases) & stored)
    if both:
        problems.append(f"names both stored and aliased to another tensor: {_names(both)}")

    state: dict[str, torch.Tensor] = {}
    loaded: dict[str, torch.Tensor] = {}  # one tensor per stored name: aliases stay tied
    verify: list[str] = []
    for name in sorted(names & set(expected)):
        src = aliases.get(name, name)
        if src not in stored:
            continue
        if src not in loaded:
            loaded[src] = f.get_tensor(src)
            if checksums is not None:
                verify.append(src)
        got, want = loaded[src], expected[name]
        if tuple(got.shape) != tuple(want.shape):
            problems.append(f"{name}: shape {list(got.shape)} in the checkpoint, {list(want.shape)} in the model")
        elif got.dtype != want.dtype:
            # No silent cast, float to float included: a model built in another dtype than the
            # one saved is not the model the checkpoint was written from.
            problems.append(f"{name}: dtype {str(got.dtype).removeprefix('torch.')} in the checkpoint, "
                            f"{str(want.dtype).removeprefix('torch.')} in the model (build the model in the "
                            f"checkpoint's dtype)")
        else:
            state[name] = got
    if verify:
        # Every tensor read is verified; a changed one is named first, whatever else it breaks.
        lacking = [src for src in sorted(verify) if src not in checksums]
        got = _checksums({src: loaded[src] for src in verify if src in checksums})
        problems[:0] = [f"{src}: checksum {got[src]}, the file records {checksums[src]}: its data changed after "
                        f"bitfx.save wrote it (a corrupted file)" for src in sorted(got) if got[src] != checksums[src]]
        if lacking:
            problems.insert(0, f"no checksum recorded for {_names(lacking)} (a tensor added to the file after "
                               f"bitfx.save wrote it?)")
    for r, m in replacements.items():
        problems += [f"{r}.{p}" for p in m._check_state(state, r + ".", strict)]
    if problems:
        raise CheckpointError(f"bitfx.load: {where} does not fit the model; nothing was loaded:" + _listed(problems))

    if target is not None and target.type != "cpu":
        # The last step that can fail (no such device, out of memory): before the model changes.
        try:
            moved = {src: t.to(target) for src, t in loaded.items()}
        except Exception as e:  # noqa: BLE001  (whatever the device's runtime raises)
            raise RuntimeError(f"bitfx.load: could not move {where}'s tensors to {target} "
                               f"({type(e).__name__}: {_cut(str(e))}); nothing was loaded") from e
        state = {k: moved[aliases.get(k, k)] for k in state}
        del moved

    # Buffers no checkpoint holds (non-persistent: rotary frequencies) that a meta skeleton has on
    # meta: computed again by their module's constructor where that is cheap and certain.
    rebuilt, left_on_meta = _meta_buffers(model, replacements, target or torch.device("cpu"))

    for name, m in replacements.items():
        m._loaded_as = name  # named by its forward if strict=False left it without its tensors
    undo = _snapshot(model)
    try:
        for (module, buffer), value in rebuilt.items():
            module._buffers[buffer] = value
        for name, m in replacements.items():
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, m)
        model.load_state_dict(state, strict=strict, assign=True)
        # assign gives every name its own Parameter: make the tied ones one object again.
        for alias, target_name in aliases.items():
            if alias in state and target_name in state:
                owner, _, attr = alias.rpartition(".")
                t_owner, _, t_attr = target_name.rpartition(".")
                tied = getattr(model.get_submodule(t_owner) if t_owner else model, t_attr)
                setattr(model.get_submodule(owner) if owner else model, attr, tied)
        for name, spec in norms.items():
            fused_norm.install(norm_modules[name], spec)
    except BaseException:
        _restore(undo)  # checked above, so not expected: still, never leave the model half loaded
        raise
    if missing and not strict:
        empty = sorted({r for r in replacements for n in missing if n.startswith(r + ".")})
        warnings.warn(
            f"bitfx.load(strict=False): {where} holds no tensor for {_names(missing)}; they are left as the model "
            f"had them" + (f" (on the meta device for the ternary layers {_names(empty)}, which raise when called "
                           f"until those are loaded)" if empty else ""),
            stacklevel=2,
        )
    if left_on_meta:
        warnings.warn(
            f"bitfx.load: {_names(left_on_meta)} (non-persistent buffers: no checkpoint holds them) are still on the "
            f"meta device, and bitfx cannot compute them again; set them (as the module's __init__ does) before running "
            f"the model", stacklevel=2,
        )
    return given


def _meta_buffers(model: nn.Module, replacements: dict, device: torch.device) -> tuple[dict, list]:
    """``({(module, buffer name): value}, [names left on meta])`` for the model's non-persistent
    buffers on the meta device. A module with such buffers, no parameters (so that building it
    again costs nothing) and a ``config`` its class is built from (transformers' rotary
    embeddings: ``type(m)(m.config)``) is built again on the CPU and its buffers taken, in the
    skeleton's dtypes, on ``device``; any other is left and named."""
    values, left = {}, []
    for prefix, m in model.named_modules():
        if any(prefix == r or prefix.startswith(r + ".") for r in replacements):
            continue
        names = sorted(b for b in m._non_persistent_buffers_set if m._buffers.get(b) is not None and m._buffers[b].is_meta)
        if not names:
            continue
        fresh = None
        config = getattr(m, "config", None)
        if config is not None and not any(True for _ in m.parameters()):
            try:
                with torch.device("cpu"):
                    fresh = type(m)(config)
            except Exception:  # noqa: BLE001  (a constructor that wants more: the buffers are named below)
                fresh = None
        for b in names:
            want = m._buffers[b]
            got = None if fresh is None else fresh._buffers.get(b)
            if isinstance(got, torch.Tensor) and not got.is_meta and got.shape == want.shape:
                values[(m, b)] = got.to(device=device, dtype=want.dtype)
            else:
                left.append(f"{prefix}.{b}" if prefix else b)
    return values, left


def _names(names: list, limit: int = 8) -> str:
    """The first ``limit`` of ``names``, and how many more."""
    more = f" ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(_cut(str(n), 120) for n in names[:limit]) + more


def _device(device) -> Optional[torch.device]:
    """``device`` as a ``torch.device``, checked before anything is read."""
    if device is None:
        return None
    try:
        return torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise ValueError(f"bitfx.load: device={_cut(repr(device))} is not a device torch knows ({_cut(str(e))})") from None


def _cut(text: str, limit: int = 200) -> str:
    """``text`` cut to ``limit`` characters, so that no error message grows with its input."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _snapshot(model: nn.Module) -> list:
    """What ``load`` may change in ``model``: every module's parameters, buffers and children."""
    return [(m, dict(m._parameters), dict(m._buffers), dict(m._modules)) for m in model.modules()]


def _restore(snapshot: list) -> None:
    for m, params, buffers, children in snapshot:
        for store, saved in ((m._parameters, params), (m._buffers, buffers), (m._modules, children)):
            store.clear()
            store.update(saved)
