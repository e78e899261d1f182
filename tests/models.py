"""Tiny models shared by the compiler and quantize tests: random weights, CPU-sized.

Transformers architectures (each returns ``(model, input_ids)``, the model in eval mode, fp32
unless ``dtype`` says otherwise; call ``model(ids).logits``):

* :func:`tiny_llama`: 2 decoder layers; sites per layer: input_layernorm -> q,k,v and
  post_attention_layernorm -> gate,up (5 linears).
* :func:`tiny_gemma`: as Llama, with Gemma's ``1 + weight`` norm; tied lm_head.
* :func:`tiny_gemma3`: Gemma 3: ``1 + weight`` norms in a sandwich (a norm before and after
  attention and the MLP: only the ones before feed linears), per-head q/k norms, a sliding
  window on alternate layers.
* :func:`tiny_qwen3`: as Llama, plus per-head q/k norms over head_dim (not sites).
* :func:`tiny_olmo2`: post-norm: no norm feeds a linear (0 sites).
* :func:`tiny_bitnet`: BitNet with plain ``nn.Linear``: 4 sites per layer (input_layernorm ->
  q,k,v; attn_sub_norm -> o_proj; post_attention_layernorm -> gate,up; ffn_sub_norm -> down).

The vocabulary (``VOCAB``) is the largest width, so the output head is unambiguous.
Norm weights are randomized too (transformers initializes them to ones or zeros).

Plain torch:

* :class:`TinyLlama`: a Llama-like model whose norms are written in many spellings
  (:data:`NORM_STYLES`); odd layers run their MLP on a 2-D view of the 3-D activations.
* :class:`BitLinearModel`: eager BitNet code in the style of seed 000's ``BitLinear``
  (``x + (activation_quant(x) - x).detach()``, ``w + (weight_quant(w) - w).detach()``).
* :func:`reference_quantized`: a copy of a model whose named linears compute the BitNet
  reference (:mod:`bitfx.reference`) on the activations their model hands them.
"""

from __future__ import annotations

import copy
import types

import torch
import torch.nn as nn
import torch.nn.functional as F

from bitfx import reference as ref

VOCAB = 160
HIDDEN = 64
INTERMEDIATE = 96
HEADS = 4
KV_HEADS = 2
HEAD_DIM = 16
LAYERS = 2
SEQ = 8
MAX_POS = 1024


def _ids(seed: int, batch: int = 2, seq: int = SEQ, vocab: int = VOCAB) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randint(0, vocab, (batch, seq), generator=g)


def _randomize_norms(model: nn.Module, seed: int, centre: float) -> None:
    """Give every 1-D parameter (norm weights, biases) random values around ``centre``."""
    g = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(centre + 0.2 * torch.randn(p.shape, generator=g))


def _hf(config_cls, model_cls, seed: int, dtype: torch.dtype, centre: float = 1.0, **overrides):
    kw = dict(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
        max_position_embeddings=MAX_POS, use_cache=False, initializer_range=0.1,
    )
    kw.update(overrides)
    config = config_cls(**kw)
    torch.manual_seed(seed)
    model = model_cls(config)
    _randomize_norms(model, seed, centre)
    return model.to(dtype).eval(), _ids(seed)


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    return _hf(LlamaConfig, LlamaForCausalLM, seed, dtype)


def tiny_gemma(seed: int = 0, dtype: torch.dtype = torch.float32):
    from transformers import GemmaConfig, GemmaForCausalLM

    return _hf(GemmaConfig, GemmaForCausalLM, seed, dtype, centre=0.0, hidden_activation="gelu_pytorch_tanh")


def tiny_gemma3(seed: int = 0, dtype: torch.dtype = torch.float32):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    return _hf(Gemma3TextConfig, Gemma3ForCausalLM, seed, dtype, centre=0.0, sliding_window=4,
               layer_types=["sliding_attention", "full_attention"])


def tiny_qwen3(seed: int = 0, dtype: torch.dtype = torch.float32):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return _hf(Qwen3Config, Qwen3ForCausalLM, seed, dtype, tie_word_embeddings=False)


def tiny_olmo2(seed: int = 0, dtype: torch.dtype = torch.float32):
    from transformers import Olmo2Config, Olmo2ForCausalLM

    return _hf(Olmo2Config, Olmo2ForCausalLM, seed, dtype, tie_word_embeddings=False)


def tiny_bitnet(seed: int = 0, dtype: torch.dtype = torch.float32):
    from transformers import BitNetConfig, BitNetForCausalLM

    return _hf(BitNetConfig, BitNetForCausalLM, seed, dtype, tie_word_embeddings=False)


def tiny_bitnet_autobitlinear(seed: int = 0, dtype: torch.dtype = torch.float32):
    """BitNet whose linears (all but ``lm_head``) are transformers' own ``AutoBitLinear`` in
    online mode: each quantizes its activation and weight eagerly; the sub-norms
    (``attn_sub_norm`` -> ``o_proj``, ``ffn_sub_norm`` -> ``down_proj``) have that quantizer as
    their only user."""
    from transformers.integrations.bitnet import AutoBitLinear

    model, ids = tiny_bitnet(seed, dtype)
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Linear) and name != "lm_head":
            new = AutoBitLinear(mod.in_features, mod.out_features, mod.bias is not None, dtype=dtype, online_quant=True)
            new.load_state_dict(mod.state_dict())
            model.set_submodule(name, new)
    return model.eval(), ids


def tiny_deepseek_v3(seed: int = 0, dtype: torch.dtype = torch.float32):
    """DeepSeek-V3: MLA attention (q_a_layernorm -> q_b_proj, kv_a_layernorm -> a view ->
    kv_b_proj) and, from the second layer on, a MoE block whose router (``mlp.gate``, an
    ``F.linear`` on the post-attention norm's output) selects experts with top-k."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    return _hf(
        DeepseekV3Config, DeepseekV3ForCausalLM, seed, dtype, n_routed_experts=4, num_experts_per_tok=2,
        n_group=1, topk_group=1, first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=16, moe_intermediate_size=32, head_dim=8, num_key_value_heads=HEADS,
        tie_word_embeddings=False,
    )


def tiny_mamba2(seed: int = 0, dtype: torch.dtype = torch.float32):
    """Mamba2 (one group): its gated RMSNorm normalizes a ``[..., 1, K]`` view, views it back to
    ``[..., K]`` and weights it before ``out_proj``; ``norm`` -> ``in_proj`` is a plain site."""
    from transformers import Mamba2Config, Mamba2ForCausalLM

    config = Mamba2Config(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_heads=8, head_dim=16,
                          state_size=16, n_groups=1, expand=2, chunk_size=SEQ, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = Mamba2ForCausalLM(config)
    _randomize_norms(model, seed, 1.0)
    return model.to(dtype).eval(), _ids(seed)


# Every transformers architecture of the suite, by name.
TRANSFORMERS = {
    "llama": tiny_llama, "gemma": tiny_gemma, "gemma3": tiny_gemma3, "qwen3": tiny_qwen3, "olmo2": tiny_olmo2,
    "bitnet": tiny_bitnet, "bitnet_autobitlinear": tiny_bitnet_autobitlinear, "deepseek_v3": tiny_deepseek_v3,
    "mamba2": tiny_mamba2,
}


# ---------------------------------------------------------------- plain-torch RMSNorm spellings

class LlamaNorm(nn.Module):
    """fp32 statistics, ``r`` rounded to the input dtype, then ``weight * r``."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        h = x.to(torch.float32)
        var = h.pow(2).mean(-1, keepdim=True)
        h = h * torch.rsqrt(var + self.eps)
        return self.weight * h.to(dtype)


class NormFeedsLinearAndResidual(nn.Module):
    """``proj(norm(x)) + norm(x)``: the norm has a consumer besides its linear."""

    def __init__(self, dim: int = 32):
        super().__init__()
        self.norm = LlamaNorm(dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        y = self.norm(x)
        return self.proj(y) + y


class SqrtDivNorm(nn.Module):
    """``x*x``, ``x / sqrt(var + eps)``, weight on the right, no casts."""

    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        var = (x * x).mean(dim=-1, keepdim=True)
        return x / torch.sqrt(var + self.eps) * self.weight


class RecipSqrtNorm(nn.Module):
    """``x.float() * (1 / sqrt(eps + var))``, weight applied in fp32, then ``type_as``."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        h = x.float()
        var = torch.mean(h.pow(2), dim=-1, keepdim=True)
        h = h * (1.0 / torch.sqrt(var + self.eps))
        return (h * self.weight.float()).type_as(x)


class GemmaNorm(nn.Module):
    """Gemma: ``r * (1 + weight)`` in fp32, then cast."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).type_as(x)


class OffsetRightNorm(nn.Module):
    """``(weight + 1) * r`` with the offset on the weight's right and the weight on the left."""

    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x):
        h = x.float()
        h = h * h.pow(2).mean(-1, keepdim=True).add(self.eps).rsqrt()
        return ((self.weight + 1) * h).to(x.dtype)


class NoWeightNorm(nn.Module):
    """No weight: ``x * rsqrt(mean(x^2) + eps)`` in fp32, cast back."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps

    def forward(self, x):
        h = x.float()
        return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class FunctionalNorm(nn.Module):
    """``F.rms_norm`` with an explicit eps."""

    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def _module_norm(dim):
    return nn.RMSNorm(dim)  # eps=None: finfo(float32).eps


NORM_STYLES = {
    "llama": LlamaNorm,
    "sqrt_div": SqrtDivNorm,
    "recip_sqrt": RecipSqrtNorm,
    "gemma": GemmaNorm,
    "offset_right": OffsetRightNorm,
    "no_weight": NoWeightNorm,
    "functional": FunctionalNorm,
    "module": _module_norm,
}


class TinyBlock(nn.Module):
    def __init__(self, dim, hidden, heads, attn_norm, mlp_norm, flat_mlp):
        super().__init__()
        self.heads = heads
        self.attn_norm = NORM_STYLES[attn_norm](dim)
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=True)
        self.o_proj = nn.Linear(dim, dim, bias=False)
        self.mlp_norm = NORM_STYLES[mlp_norm](dim)
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        self.flat_mlp = flat_mlp

    def forward(self, x):
        B, T, D = x.shape
        h = self.attn_norm(x)
        q = self.q_proj(h).view(B, T, self.heads, -1).transpose(1, 2)
        k = self.k_proj(h).view(B, T, self.heads, -1).transpose(1, 2)
        v = self.v_proj(h).view(B, T, self.heads, -1).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o_proj(a.transpose(1, 2).reshape(B, T, D))
        h = self.mlp_norm(x)
        if self.flat_mlp:  # the linears see a 2-D view of the 3-D norm output
            h = h.view(-1, D)
        m = self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))
        return x + m.view(B, T, D)


class TinyLlama(nn.Module):
    """A Llama-like decoder in plain torch. ``styles`` lists the norm spelling of each norm in
    order (two per layer: attention, MLP); layers with an odd index run the MLP on a 2-D view."""

    def __init__(self, styles=tuple(NORM_STYLES), vocab=VOCAB, dim=HIDDEN, hidden=INTERMEDIATE, heads=HEADS,
                 final_norm="llama"):
        super().__init__()
        styles = list(styles)
        if len(styles) % 2:
            styles.append("llama")
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(
            TinyBlock(dim, hidden, heads, styles[2 * i], styles[2 * i + 1], flat_mlp=bool(i % 2))
            for i in range(len(styles) // 2)
        )
        self.norm = NORM_STYLES[final_norm](dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


def tiny_torch_llama(seed: int = 0, dtype: torch.dtype = torch.float32, styles=tuple(NORM_STYLES), **kw):
    """:class:`TinyLlama` with random weights and norm weights, and example ids."""
    torch.manual_seed(seed)
    model = TinyLlama(styles, **kw)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                centre = 0.0 if isinstance(model.get_submodule(name.rsplit(".", 1)[0]), (GemmaNorm, OffsetRightNorm)) else 1.0
                p.copy_(centre + 0.2 * torch.randn(p.shape))
            else:
                p.normal_(0.0, 0.1)
    return model.to(dtype).eval(), _ids(seed, vocab=model.lm_head.out_features)


# ---------------------------------------------------------------- eager BitNet (seed 000 style)

def activation_quant(x):
    """Per-token absmax int8 quantize-dequantize, eager (seed 000)."""
    scale = 127.0 / x.abs().max(dim=-1, keepdim=True).values.clamp_(min=1e-5)
    return (x * scale).round().clamp_(-128, 127) / scale


def weight_quant(w):
    """Per-tensor absmean ternary quantize-dequantize, eager (seed 000)."""
    scale = 1.0 / w.abs().mean().clamp_(min=1e-5)
    return (w * scale).round().clamp_(-1, 1) / scale


class BitLinear(nn.Linear):
    """Seed 000's eager ``BitLinear``: its own RMSNorm, then straight-through quantizers."""

    def __init__(self, in_features, out_features, bias=False, eps=1e-8):
        super().__init__(in_features, out_features, bias=bias)
        self.norm = nn.RMSNorm(in_features, eps=eps)

    def forward(self, x):
        w = self.weight
        x_norm = self.norm(x)
        x_quant = x_norm + (activation_quant(x_norm) - x_norm).detach()
        w_quant = w + (weight_quant(w) - w).detach()
        return F.linear(x_quant, w_quant, self.bias)


class BitLinearModel(nn.Module):
    """Residual MLP blocks of eager :class:`BitLinear` layers over ``x [..., dim]``."""

    def __init__(self, dim=HIDDEN, hidden=INTERMEDIATE, blocks=2, bias=False):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"up": BitLinear(dim, hidden, bias=bias), "down": BitLinear(hidden, dim, bias=bias)})
            for _ in range(blocks)
        )

    def forward(self, x):
        for b in self.blocks:
            x = x + b["down"](F.silu(b["up"](x)))
        return x


def bitlinear_model(seed: int = 0, blocks: int = 2, bias: bool = False):
    """:class:`BitLinearModel` with random weights, and an example input ``[2, SEQ, HIDDEN]``."""
    torch.manual_seed(seed)
    model = BitLinearModel(blocks=blocks, bias=bias)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape))
    return model.eval(), torch.randn(2, SEQ, HIDDEN)


# ---------------------------------------------------------------- the reference

def _reference_linear_forward(self, y):
    q, s_x = ref.act_quant(y)
    packed, s_w = ref.weight_quant(self.weight, self._bitfx_per_channel)
    return ref.ternary_matmul(q, s_x, packed, s_w, self.bias, y.dtype)


def reference_quantized(model: nn.Module, linear_fqns, per_channel: bool = False) -> nn.Module:
    """A deep copy of ``model`` whose ``nn.Linear`` modules named in ``linear_fqns`` compute
    ``ternary_matmul(act_quant(y), weight_quant(W)) + b`` (:mod:`bitfx.reference`) on the
    activation ``y`` their model gives them (the model's own norm output). Inference only."""
    model = copy.deepcopy(model)
    for fqn in linear_fqns:
        lin = model.get_submodule(fqn)
        if not isinstance(lin, nn.Linear):
            raise TypeError(f"{fqn} is a {type(lin).__name__}, not an nn.Linear")
        lin._bitfx_per_channel = per_channel
        lin.forward = types.MethodType(_reference_linear_forward, lin)
    return model


def reference_ste(model: nn.Module, linear_fqns, per_channel: bool = False) -> nn.Module:
    """A deep copy of ``model`` whose named ``nn.Linear`` modules run the straight-through
    BitLinear of seed 000 on the activation ``y`` their model gives them:
    ``F.linear(y + (deq(q_y) - y).detach(), W + (deq(t_W) - W).detach(), b)``, the quantizers
    being :mod:`bitfx.reference`'s. The training oracle (forward and gradients)."""
    model = copy.deepcopy(model)
    for fqn in linear_fqns:
        lin = model.get_submodule(fqn)
        lin._bitfx_per_channel = per_channel
        lin.forward = types.MethodType(_ste_linear_forward, lin)
    return model


def _ste_linear_forward(self, y):
    q, s_x = ref.act_quant(y.detach())
    y_q = (q.float() / s_x.unsqueeze(-1)).to(y.dtype)
    w = self.weight
    s_w = ref.weight_scale(w.detach(), self._bitfx_per_channel)
    w_q = (ref.ternarize(w.detach(), s_w).float() / s_w.unsqueeze(1)).to(w.dtype)
    return F.linear(y + (y_q - y).detach(), w + (w_q - w).detach(), self.bias)


def capture_graph(model, *args, dynamic=None, grad: bool = False):
    """Compile ``model`` with a backend that keeps Dynamo's torch-level graph: returns
    ``(gm, compiled)`` (``gm.meta["example_inputs"]``: the real inputs Dynamo passed). ``compiled`` runs whatever ``gm`` holds when called (so after a pass
    has rewritten ``gm``, it runs the rewritten graph, eagerly). ``grad`` traces with grad
    mode on (a training graph); ``fullgraph=True`` always."""
    torch._dynamo.reset()
    box = {}

    def backend(gm, example_inputs):
        box["gm"] = gm
        gm.meta["example_inputs"] = list(example_inputs)
        return lambda *a: box["gm"](*a)

    compiled = torch.compile(model, backend=backend, fullgraph=True, dynamic=dynamic)
    with torch.set_grad_enabled(grad):
        compiled(*args)
    return box["gm"], compiled


def rewritten_graph(fn, ids):
    """``(gm, run, out)``: ``fn(ids)``'s graph captured (:func:`capture_graph`) and rewritten by
    the bitfx pass, ``run()`` the rewritten graph (whatever ``gm`` holds when called) on ``ids``,
    and its output now, for a later pass to keep."""
    from bitfx.passes.rewrite import bitfx_pass

    gm, compiled = capture_graph(fn, ids)
    bitfx_pass(gm, None)
    with torch.no_grad():
        return gm, lambda: compiled(ids), compiled(ids)


def rewritten_logits_graph(builder: str):
    """:func:`rewritten_graph` of the tiny transformers model ``builder`` (a name of this
    module): its logits."""
    model, ids = globals()[builder]()
    model.eval()
    return rewritten_graph(lambda t: model(t).logits, ids)


class OpsPackedLinear(nn.Module):
    """The shape of a ``bitfx.quantize`` module, built from the ops alone (for pass tests):
    packed ternary buffers, ``act_quant`` then ``ternary_matmul``."""

    def __init__(self, lin: nn.Linear, per_channel: bool = False):
        super().__init__()
        packed, s_w = ref.weight_quant(lin.weight.detach(), per_channel)
        self.register_buffer("packed", packed)
        self.register_buffer("w_scale", s_w)
        self.in_features = lin.in_features
        self.bias = None if lin.bias is None else nn.Parameter(lin.bias.detach().clone())

    def forward(self, x):
        q, s = torch.ops.bitfx.act_quant(x)
        return torch.ops.bitfx.ternary_matmul(q, s, self.packed, self.w_scale, self.bias, x.dtype, self.in_features)
