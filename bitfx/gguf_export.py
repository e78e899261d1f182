"""``bitfx.export_gguf``: write a converted Llama-style model as a GGUF file that llama.cpp runs.

The ternary layers (:class:`bitfx.modules.BitfxLinear`) are written in llama.cpp's ``TQ2_0`` type:
blocks of 256 weights along a row, each 64 bytes of 2-bit codes (``t + 1``, the code bitfx
stores too) and one fp16 scale ``d``, a weight being ``d * t``. Of the two ternary types
upstream llama.cpp runs on the CPU, ``TQ1_0`` packs 1.69 bits per weight (five trits per byte)
and ``TQ2_0`` 2.06; ``TQ2_0`` decodes with shifts and masks alone, reads prompts about 1.8x as
fast as ``TQ1_0`` on CPUs and generates at about the same speed (llama.cpp's own figures), and
it holds bitfx's weights exactly, with bitfx's own 2-bit code: a BitNet weight is
``t / w_scale``, so the block scale is ``d = 1 / w_scale`` of the block's row. Per-tensor and per-output-channel scales are
both written exactly (one row's blocks share its scale), up to the rounding of ``d`` to fp16
(relative 2^-11). llama.cpp multiplies ``TQ2_0`` weights by activations quantized to 8 bits
per block of 256 (``Q8_K``), where bitfx quantizes them per token; the two agree where a row
is one block and differ by the quantization step elsewhere.

Refused, with an error naming the layer and the reason (never written as floats instead):
layers of ``terms > 1`` (a sum of ternary matrices: one scale per block cannot hold it),
activation codes narrower than 8 bits (llama.cpp quantizes to 8), a weight scale that held
NaN or does not fit fp16, and a ternary layer whose input width is not a multiple of 256 (the
block; the MLP's hidden width is padded with zero weights instead, which changes no output).
Embeddings, norms, biases and float linear layers (the output head by default) are written in
F16 (``float_type="f32"``: F32); norms and biases always in F32. An int8 output head
(:class:`bitfx.modules.Int8Linear`, ``BitfxConfig(head="int8")``) is written as the float
weight it multiplies by, ``qweight * scale``, in the same float type: llama.cpp's own 8-bit type,
``Q8_0`` (blocks of 32 weights, an fp16 scale each), would hold its codes exactly, but the
llama.cpp build the tests run (llama-cpp-python 0.3.36, a CPU with AMX) crashes evaluating a
batch of tokens through a ``Q8_0`` head, also with ``gguf``'s own ``Q8_0`` bytes.

The architectures: transformers' ``LlamaForCausalLM`` (RoPE in the rotate-half convention; the
q and k rows are permuted into llama.cpp's interleaved pairs, codes, scales and biases alike;
``rope_type`` "default" only) and the built-in model of ``python -m bitfx``
(``bitfx.demo.example.ExampleLlama``, which has no position encoding: the file sets llama.cpp's
RoPE frequency scale to 0, every rotation angle 0, the identity). Both are written as
llama.cpp's ``llama`` architecture. Other models get a TypeError.

The vocabulary: one string per token id, written as a SentencePiece-style (``llama``) list
without merges, so llama.cpp's tokenizer maps each string to its id and text is split into the
listed strings (a character-level vocabulary maps one character to one id). A space is
written as U+2581, the form llama.cpp's tokenizer looks up. Without a vocabulary the tokens
are named ``<id:N>``: the file runs on token ids, text input does not tokenize meaningfully.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from bitfx.modules import BitfxLinear, Int8Linear
from bitfx.reference import unpack_ternary

__all__ = ["export_gguf", "GGUF_BLOCK"]

GGUF_BLOCK = 256  # weights per TQ2_0 block (llama.cpp's QK_K)
_TQ2_0_BYTES = GGUF_BLOCK // 4 + 2  # 64 bytes of 2-bit codes, then the fp16 scale
_SPACE = "\u2581"  # how SentencePiece vocabularies (and llama.cpp's "llama" tokenizer) write a space
PathLike = Union[str, os.PathLike]


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ImportError("bitfx.export_gguf needs the gguf package: pip install gguf "
                          "(or pip install 'bitfx[gguf]', which adds llama-cpp-python to run the file)") from None
    return gguf


# ---------------------------------------------------------------------------------------- weights


@dataclass
class _Weight:
    """One linear layer's weight as rows: ternary ``codes`` int8 ``[N, K]`` with the per-row
    block scale ``d`` (fp32 ``[N]``, ``W = d * codes``), or a float ``[N, K]`` in ``codes``
    with ``d`` None. ``bias``: fp32 ``[N]`` or None."""

    name: str
    codes: Tensor
    d: Optional[Tensor]
    bias: Optional[Tensor]

    @property
    def ternary(self) -> bool:
        return self.d is not None

    def rows(self, index: Tensor) -> "_Weight":
        """The rows ``index`` (a permutation of the output features)."""
        pick = (lambda t: None if t is None else t[index])
        return _Weight(self.name, self.codes[index], pick(self.d), pick(self.bias))

    def pad(self, rows: int = 0, cols: int = 0) -> "_Weight":
        """Zero weights appended: ``rows`` more outputs (each 0, bias 0) or ``cols`` more inputs."""
        codes = nn.functional.pad(self.codes, (0, cols, 0, rows))
        pad = (lambda t: None if t is None else nn.functional.pad(t, (0, rows)))
        return _Weight(self.name, codes, pad(self.d), pad(self.bias))


def _weight(module: nn.Module, name: str) -> _Weight:
    """A linear layer's rows; a ternary layer llama.cpp cannot represent raises a ValueError."""
    if isinstance(module, BitfxLinear):
        if module.terms != 1:
            raise ValueError(
                f"bitfx.export_gguf: {name} is a sum of {module.terms} ternary matrices (terms={module.terms}); "
                f"TQ2_0 holds one ternary matrix with one scale per block: convert with terms=1 to export"
            )
        if module.act_bits != 8:
            raise ValueError(
                f"bitfx.export_gguf: {name} quantizes its input to {module.act_bits}-bit codes; llama.cpp multiplies "
                f"TQ2_0 weights by 8-bit activations, so it would compute another model: convert with act_bits=8"
            )
        w_scale = module.w_scale.detach().float().cpu()
        if not bool(torch.isfinite(w_scale).all()):
            n = int((~torch.isfinite(w_scale)).nonzero()[0, 0])
            raise ValueError(f"bitfx.export_gguf: {name} has the weight scale {float(w_scale[n])} at output {n} "
                             f"(its float weight held NaN or Inf); there is no ternary weight to write")
        d = 1.0 / w_scale
        d16 = d.half().float()
        bad = ~(torch.isfinite(d16) & ((d16 - d).abs() <= d * 2.0**-10))
        if bool(bad.any()):
            n = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"bitfx.export_gguf: {name}: the block scale 1 / w_scale = {float(d[n]):.3g} at output {n} is outside "
                f"fp16's normal range (6.1e-05 to 65504), where TQ2_0 stores it"
            )
        codes = unpack_ternary(module.packed.detach().cpu(), module.in_features)
        bias = None if module.bias is None else module.bias.detach().float().cpu()
        return _Weight(name, codes, d, bias)
    if isinstance(module, Int8Linear):
        bias = None if module.bias is None else module.bias.detach().float().cpu()
        return _Weight(name, module.dequantize(torch.float32).detach().cpu(), None, bias)
    if isinstance(module, nn.Linear):
        bias = None if module.bias is None else module.bias.detach().float().cpu()
        return _Weight(name, module.weight.detach().float().cpu(), None, bias)
    raise TypeError(f"bitfx.export_gguf: {name} is a {type(module).__name__}; expected nn.Linear, bitfx.BitfxLinear "
                    f"or bitfx.Int8Linear")


def _tq2_0_blocks(codes: Tensor, d: Tensor) -> Tensor:
    """Ternary ``codes`` int8 ``[N, K]`` (K a multiple of 256) with the row scale ``d`` fp32
    ``[N]`` as TQ2_0 bytes, uint8 ``[N, K / 256 * 66]``.

    A block holds 256 weights of one row, ``j = 128 h + 32 n + l`` (``h`` < 2, ``n`` < 4,
    ``l`` < 32): byte ``32 h + l`` of its 64 code bytes holds ``t_j + 1`` in bits ``2n, 2n+1``;
    then ``d`` as fp16, little-endian.
    """
    N, K = codes.shape
    c = (codes.to(torch.int16) + 1).to(torch.uint8).view(N, K // GGUF_BLOCK, 2, 4, 32)
    qs = c[:, :, :, 0] | c[:, :, :, 1] << 2 | c[:, :, :, 2] << 4 | c[:, :, :, 3] << 6  # [N, B, 2, 32]
    scale = d.to(torch.float16).view(torch.uint8).view(N, 1, 2).expand(N, K // GGUF_BLOCK, 2)
    return torch.cat([qs.reshape(N, K // GGUF_BLOCK, 64), scale], dim=-1).reshape(N, -1)


# ------------------------------------------------------------------------------- architectures


@dataclass
class _Llama:
    """A Llama-style decoder in the terms llama.cpp's ``llama`` architecture reads."""

    vocab: int
    dim: int
    ff: int
    heads: int
    kv_heads: int
    head_dim: int
    eps: float
    rope_theta: Optional[float]  # None: no position encoding
    context: int
    eos: Optional[int]  # the model's own end-of-sequence id, if it declares one
    embed: Tensor
    out_norm: Tensor
    head: _Weight
    layers: list = field(default_factory=list)  # dicts: attn_norm, ffn_norm (tensors), q k v o gate up down (_Weight)


def _loaded_class(module: str, name: str):
    """The class ``module.name`` if that module is imported (a model of the class exists only then), else None."""
    mod = sys.modules.get(module)
    return getattr(mod, name, None)


def _describe(model: nn.Module, context_length: Optional[int]) -> _Llama:
    hf = _loaded_class("transformers.models.llama.modeling_llama", "LlamaForCausalLM")
    example = _loaded_class("bitfx.demo.example", "ExampleLlama")
    if hf is not None and isinstance(model, hf):
        return _hf_llama(model, context_length)
    if example is not None and isinstance(model, example):
        return _example_llama(model, context_length)
    raise TypeError(
        f"bitfx.export_gguf writes transformers' LlamaForCausalLM and the built-in model of python -m bitfx "
        f"(bitfx.demo.example.ExampleLlama); got {type(model).__module__}.{type(model).__name__}"
    )


def _interleave_rope_rows(w: _Weight, heads: int, head_dim: int) -> _Weight:
    """From the rotate-half order (pairs ``(i, i + hd/2)`` of each head) to llama.cpp's
    interleaved one (pairs ``(2i, 2i + 1)``): new row ``2i + s`` of a head is old row ``s hd/2 + i``."""
    per_head = torch.arange(head_dim).view(2, head_dim // 2).t().reshape(-1)
    return w.rows((torch.arange(heads)[:, None] * head_dim + per_head).reshape(-1))


def _hf_llama(model, context_length) -> _Llama:
    c = model.config
    name = "bitfx.export_gguf (LlamaForCausalLM)"
    rope = dict(getattr(c, "rope_parameters", None) or {})
    if not rope:  # transformers 4: rope_theta and rope_scaling
        rope = {"rope_type": (getattr(c, "rope_scaling", None) or {}).get("rope_type", "default"),
                "rope_theta": getattr(c, "rope_theta", 10000.0)}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"{name}: rope_type {rope.get('rope_type')!r} is not written; only 'default' RoPE")
    if getattr(c, "hidden_act", "silu") != "silu":
        raise ValueError(f"{name}: hidden_act {c.hidden_act!r}; llama.cpp's llama architecture uses silu")
    heads, kv_heads = c.num_attention_heads, c.num_key_value_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    m = model.model
    layers = []
    for i, layer in enumerate(m.layers):
        a, f = layer.self_attn, layer.mlp
        p = f"model.layers.{i}"
        layers.append({
            "attn_norm": layer.input_layernorm.weight,
            "q": _interleave_rope_rows(_weight(a.q_proj, f"{p}.self_attn.q_proj"), heads, head_dim),
            "k": _interleave_rope_rows(_weight(a.k_proj, f"{p}.self_attn.k_proj"), kv_heads, head_dim),
            "v": _weight(a.v_proj, f"{p}.self_attn.v_proj"),
            "o": _weight(a.o_proj, f"{p}.self_attn.o_proj"),
            "ffn_norm": layer.post_attention_layernorm.weight,
            "gate": _weight(f.gate_proj, f"{p}.mlp.gate_proj"),
            "up": _weight(f.up_proj, f"{p}.mlp.up_proj"),
            "down": _weight(f.down_proj, f"{p}.mlp.down_proj"),
        })
    return _Llama(
        vocab=c.vocab_size, dim=c.hidden_size, ff=c.intermediate_size, heads=heads, kv_heads=kv_heads,
        head_dim=head_dim, eps=float(c.rms_norm_eps), rope_theta=float(rope.get("rope_theta", 10000.0)),
        context=context_length or c.max_position_embeddings,
        eos=c.eos_token_id if isinstance(getattr(c, "eos_token_id", None), int) else None,
        embed=m.embed_tokens.weight, out_norm=m.norm.weight,
        head=_weight(model.lm_head, "lm_head"), layers=layers,
    )


def _example_llama(model, context_length) -> _Llama:
    blocks = list(model.layers)
    norms = [model.norm] + [b.attn_norm for b in blocks] + [b.mlp_norm for b in blocks]
    eps = {float(n.eps) for n in norms}
    if len(eps) != 1:
        raise ValueError(f"bitfx.export_gguf: the model's RMSNorms use several eps {sorted(eps)}; llama.cpp has one")
    dim = model.embed.weight.shape[1]
    heads = blocks[0].heads if blocks else 1
    layers = [{
        "attn_norm": b.attn_norm.weight,
        **{k: _weight(getattr(b, f"{k}_proj"), f"layers.{i}.{k}_proj") for k in ("q", "k", "v", "o")},
        "ffn_norm": b.mlp_norm.weight,
        **{k: _weight(getattr(b, f"{k}_proj"), f"layers.{i}.{k}_proj") for k in ("gate", "up", "down")},
    } for i, b in enumerate(blocks)]
    return _Llama(
        vocab=model.embed.weight.shape[0], dim=dim, ff=blocks[0].gate_proj.out_features if blocks else 0,
        heads=heads, kv_heads=heads, head_dim=dim // heads, eps=eps.pop(), rope_theta=None,
        context=context_length or 2048, eos=None, embed=model.embed.weight, out_norm=model.norm.weight,
        head=_weight(model.lm_head, "lm_head"), layers=layers,
    )


# ------------------------------------------------------------------------------------- writing


def _check_blocks(w: _Weight) -> None:
    K = w.codes.shape[1]
    if w.ternary and K % GGUF_BLOCK:
        raise ValueError(
            f"bitfx.export_gguf: {w.name} is ternary with {K} inputs, not a multiple of {GGUF_BLOCK}: TQ2_0 (and "
            f"llama.cpp's other ternary type, TQ1_0) stores a row in blocks of {GGUF_BLOCK} weights, and padding the "
            f"input would change the layer's width; the model's hidden size (and heads x head size) must be a "
            f"multiple of {GGUF_BLOCK}"
        )


def _pad_ff(spec: _Llama) -> int:
    """Pad the MLP's hidden width to a multiple of 256 when a ternary down projection reads it:
    gate and up gain zero rows (outputs 0, silu(0) * 0 = 0), down gains zero columns; no output changes."""
    if not any(layer["down"].ternary for layer in spec.layers):
        return spec.ff
    ff = -(-spec.ff // GGUF_BLOCK) * GGUF_BLOCK
    extra = ff - spec.ff
    for layer in spec.layers:
        layer["gate"], layer["up"] = layer["gate"].pad(rows=extra), layer["up"].pad(rows=extra)
        layer["down"] = layer["down"].pad(cols=extra)
    return ff


def _vocab_tokens(vocab: Optional[Sequence[str]], n: int) -> list[str]:
    if vocab is None:
        return [f"<id:{i}>" for i in range(n)]
    tokens = list(vocab)
    if len(tokens) != n:
        raise ValueError(f"bitfx.export_gguf: vocab has {len(tokens)} tokens, the model's embedding {n}")
    bad = [i for i, t in enumerate(tokens) if not isinstance(t, str) or not t]
    if bad:
        raise ValueError(
            f"bitfx.export_gguf: vocab[{bad[0]}] is {tokens[bad[0]]!r}; every token must be a non-empty str"
        )
    if _SPACE in "".join(tokens) and " " in "".join(tokens):
        raise ValueError(f"bitfx.export_gguf: vocab holds both ' ' and U+2581, which llama.cpp's tokenizer reads as "
                         f"the same character")
    tokens = [t.replace(" ", _SPACE) for t in tokens]
    if len(set(tokens)) != n:
        seen = {}
        for i, t in enumerate(tokens):
            if t in seen:
                raise ValueError(f"bitfx.export_gguf: vocab[{seen[t]}] and vocab[{i}] are both {t!r}")
            seen[t] = i
    return tokens


def _float(t: Tensor, np_dtype, name: str):
    import numpy as np

    out = t.detach().float().cpu().numpy().astype(np_dtype)
    if not np.isfinite(out).all():
        raise ValueError(f"bitfx.export_gguf: {name} holds values that are not finite in {np.dtype(np_dtype).name}")
    return out


def export_gguf(
    model: nn.Module,
    path: PathLike,
    *,
    vocab: Optional[Sequence[str]] = None,
    eos_token_id: Optional[int] = None,
    context_length: Optional[int] = None,
    float_type: str = "f16",
    name: Optional[str] = None,
) -> None:
    """Write ``model`` (converted by :func:`bitfx.quantize`) to ``path`` as a GGUF file for llama.cpp.

    ``vocab``: the string of each token id (default: placeholders, see the module docstring).
    ``eos_token_id``: the token that ends a generation (default: the config's ``eos_token_id``
    for transformers models; else llama.cpp's default for this vocabulary type, id 2; a
    character-level model may name its newline). ``context_length``: the context llama.cpp
    offers by default (default: the config's ``max_position_embeddings``; 2048 for the built-in
    model, which has no position limit). ``float_type``: ``"f16"`` or ``"f32"`` for the
    embedding and float linear layers. ``name``: ``general.name``.

    The ternary layers become TQ2_0, the rest F16/F32 (the module docstring says what is
    refused). A model with no ternary layer is refused: this writes bitfx's ternary models.
    """
    import numpy as np

    gguf = _gguf()
    if float_type not in ("f16", "f32"):
        raise ValueError(f"bitfx.export_gguf: float_type must be 'f16' or 'f32', got {float_type!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"bitfx.export_gguf: model must be an nn.Module, got {type(model).__name__}")
    model = getattr(model, "_orig_mod", model)  # a torch.compile wrapper holds the same modules
    if not any(isinstance(m, BitfxLinear) for m in model.modules()):
        raise ValueError("bitfx.export_gguf: the model holds no ternary layer (BitfxLinear); convert it with "
                         "bitfx.quantize(model, example_ids) first")
    spec = _describe(model, context_length)
    ff = _pad_ff(spec)
    weights = [spec.head] + [w for layer in spec.layers for w in layer.values() if isinstance(w, _Weight)]
    for w in weights:
        _check_blocks(w)
    tokens = _vocab_tokens(vocab, spec.vocab)
    eos_token_id = spec.eos if eos_token_id is None else eos_token_id
    if eos_token_id is not None and not 0 <= eos_token_id < spec.vocab:
        raise ValueError(f"bitfx.export_gguf: eos_token_id {eos_token_id} is not a token id (0 to {spec.vocab - 1})")

    fdtype = np.float16 if float_type == "f16" else np.float32
    T = gguf.GGMLQuantizationType
    writer = gguf.GGUFWriter(os.fspath(path), "llama")
    writer.add_name(name or type(model).__name__)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_TQ2_0)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(spec.context)
    writer.add_embedding_length(spec.dim)
    writer.add_block_count(len(spec.layers))
    writer.add_feed_forward_length(ff)
    writer.add_head_count(spec.heads)
    writer.add_head_count_kv(spec.kv_heads)
    writer.add_key_length(spec.head_dim)
    writer.add_value_length(spec.head_dim)
    writer.add_rope_dimension_count(spec.head_dim)
    writer.add_layer_norm_rms_eps(spec.eps)
    writer.add_vocab_size(spec.vocab)
    if spec.rope_theta is None:
        # No position encoding: the frequency scale 1 / factor = 0 makes every angle 0, cos 1, sin 0.
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(math.inf)
    else:
        writer.add_rope_freq_base(spec.rope_theta)

    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_types([gguf.TokenType.NORMAL] * len(tokens))
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(False)
    if eos_token_id is not None:
        writer.add_eos_token_id(eos_token_id)

    def add_linear(gguf_name: str, w: _Weight) -> None:
        if w.ternary:
            writer.add_tensor(f"{gguf_name}.weight", _tq2_0_blocks(w.codes, w.d).numpy(), raw_dtype=T.TQ2_0)
        else:
            writer.add_tensor(f"{gguf_name}.weight", _float(w.codes, fdtype, w.name))
        if w.bias is not None:
            writer.add_tensor(f"{gguf_name}.bias", _float(w.bias, np.float32, f"{w.name}.bias"))

    writer.add_tensor("token_embd.weight", _float(spec.embed, fdtype, "the embedding"))
    for i, layer in enumerate(spec.layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", _float(layer["attn_norm"], np.float32, f"layer {i}'s norm"))
        for key, gguf_name in (("q", "attn_q"), ("k", "attn_k"), ("v", "attn_v"), ("o", "attn_output")):
            add_linear(f"blk.{i}.{gguf_name}", layer[key])
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", _float(layer["ffn_norm"], np.float32, f"layer {i}'s MLP norm"))
        for key in ("gate", "up", "down"):
            add_linear(f"blk.{i}.ffn_{key}", layer[key])
    writer.add_tensor("output_norm.weight", _float(spec.out_norm, np.float32, "the final norm"))
    add_linear("output", spec.head)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
