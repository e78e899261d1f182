"""The site finder on Dynamo's torch-level graphs: which norms and linears it takes, with what
NormSpec, and what it leaves out and why. Graphs come from a capturing backend (no Inductor)."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import assume, example, given
from hypothesis import strategies as st

from bitfx import reference as ref
from bitfx.passes.naming import _clean_fqn
from bitfx.passes.plan import find_sites
from bitfx.passes.records import FindResult, NormSpec
from tests import models
from tests.helpers import ULP


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def _find(model, *args, **kw) -> FindResult:
    gm, _ = models.capture_graph(model, *args)
    return find_sites(gm, **kw)


def _short(fqns):
    return [f.rsplit(".", 1)[-1] for f in fqns]


LLAMA_LAYER = [("input_layernorm", ["q_proj", "k_proj", "v_proj"]), ("post_attention_layernorm", ["gate_proj", "up_proj"])]
BITNET_LAYER = [
    ("input_layernorm", ["q_proj", "k_proj", "v_proj"]),
    ("self_attn.attn_sub_norm", ["o_proj"]),
    ("post_attention_layernorm", ["gate_proj", "up_proj"]),
    ("mlp.ffn_sub_norm", ["down_proj"]),
]


@pytest.mark.parametrize(
    "builder, layer, offset",
    [
        (models.tiny_llama, LLAMA_LAYER, False),
        (models.tiny_gemma, LLAMA_LAYER, True),
        (models.tiny_qwen3, LLAMA_LAYER, False),
        (models.tiny_bitnet, BITNET_LAYER, False),
    ],
    ids=["llama", "gemma", "qwen3", "bitnet"],
)
def test_transformers_sites(builder, layer, offset):
    model, ids = builder()
    res = _find(model, ids)
    expected = [(f"model.layers.{i}.{norm}", linears) for i in range(models.LAYERS) for norm, linears in layer]
    assert [(s.norm_module, _short(s.linear_modules)) for s in res.sites] == expected
    # Llama/Gemma/Qwen3: 2 sites and 5 linears per layer; BitNet: 4 sites and 7 linears per layer.
    assert len(res.sites) == len(layer) * models.LAYERS
    assert sum(len(s.linears) for s in res.sites) == sum(len(ls) for _, ls in layer) * models.LAYERS
    for s in res.sites:
        assert s.norm.offset is offset
        assert s.norm.norm_dtype == torch.float32
        assert not s.already_bitnet
        assert s.norm_weight is not None and s.norm_weight.op == "placeholder"
        assert all(lin.target is F.linear for lin in s.linears)
        assert s.linear_modules[0].startswith(s.norm_module.rsplit(".", 2)[0])
    head = [r for r in res.rejected if r.module == "model.norm"]
    assert len(head) == 1 and "lm_head: output head" in head[0].reason


def test_qwen3_per_head_norms_rejected():
    model, ids = models.tiny_qwen3()
    res = _find(model, ids)
    qk = [r for r in res.rejected if r.module and r.module.endswith(("q_norm", "k_norm"))]
    assert len(qk) == 2 * models.LAYERS
    for r in qk:
        assert "feeds no linear" in r.reason and "per-head q/k norm" in r.reason
        assert f"K={models.HEAD_DIM}" in r.reason


def test_olmo2_post_norm_has_no_site():
    model, ids = models.tiny_olmo2()
    res = _find(model, ids)
    assert res.sites == []
    post = [r for r in res.rejected if r.module and r.module.endswith(("post_attention_layernorm", "post_feedforward_layernorm"))]
    assert len(post) == 2 * models.LAYERS
    assert all("post-norm" in r.reason and "users: add" in r.reason for r in post)


# (offset, cast_before_weight, eps) the finder must read from each spelling, in bf16 where the
# cast order matters. Weighted norms rounding r to bf16 before the weight are Llama-style.
STYLE_SPECS = {
    "llama": (False, True, 1e-6),
    "sqrt_div": (False, True, 1e-5),  # all in bf16: r is bf16 when the weight multiplies it
    "recip_sqrt": (False, False, 1e-6),
    "gemma": (True, False, 1e-6),
    "offset_right": (False, False, 1e-5),  # (weight + 1) rounds in bf16: it is the weight
    "no_weight": (False, False, 1e-6),
    "functional": (False, None, 1e-5),  # None: torch.rms_norm's own order (measured)
    "module": (False, None, torch.finfo(torch.float32).eps),  # nn.RMSNorm(eps=None)
}


def test_tiny_torch_llama_spellings():
    model, ids = models.tiny_torch_llama()
    res = _find(model, ids)
    styles = list(models.NORM_STYLES)
    assert len(res.sites) == len(styles) and sum(len(s.linears) for s in res.sites) == 5 * len(styles) // 2
    for i, (site, style) in enumerate(zip(res.sites, styles)):
        layer, kind = divmod(i, 2)
        assert site.norm_module == f"layers.{layer}.{('attn_norm', 'mlp_norm')[kind]}"
        assert _short(site.linear_modules) == (["q_proj", "k_proj", "v_proj"], ["gate_proj", "up_proj"])[kind]
        offset, _, eps = STYLE_SPECS[style]
        assert site.norm.offset is (offset or style == "offset_right"), style  # fp32: (w + 1) is exact
        assert site.norm.eps == pytest.approx(eps, rel=1e-12), style
        assert (site.norm_weight is None) == (style == "no_weight")
    # Odd layers feed their MLP linears through a 2-D view of the norm output.
    odd_mlp = res.sites[3]
    assert odd_mlp.linears[0].args[0].target in ("view", torch.Tensor.view)


class _NormLinear(nn.Module):
    def __init__(self, norm: nn.Module, K=64, N=32, bias=True):
        super().__init__()
        self.norm = norm
        self.lin = nn.Linear(K, N, bias=bias)

    def forward(self, x):
        return self.lin(self.norm(x))


def _randomized(module: nn.Module, dtype) -> nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn(p.shape))
    return module.to(dtype).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("style", list(models.NORM_STYLES))
def test_spelling_spec_reproduces_the_norm(style, dtype):
    """The NormSpec read from the graph, fed to the reference, gives the model's own norm:
    exactly where the arithmetic is the same, within an ulp where it differs only in rsqrt vs
    1/sqrt, within a few ulps where the model computes in half precision throughout."""
    net = _randomized(_NormLinear(models.NORM_STYLES[style](64)), dtype)
    x = (2 * torch.randn(4, 16, 64)).to(dtype)
    res = _find(net, x)
    assert len(res.sites) == 1 and res.rejected == []
    site = res.sites[0]
    spec = site.norm
    offset, cbw, eps = STYLE_SPECS[style]
    if dtype == torch.float32 and style == "offset_right":
        offset = True
    assert spec.offset is offset
    if cbw is not None and dtype != torch.float32:
        assert spec.cast_before_weight is cbw
    assert spec.eps == pytest.approx(eps, rel=1e-12)
    assert spec.norm_dtype == dtype
    g = getattr(net.norm, "weight", None)
    if style == "offset_right" and dtype != torch.float32:
        g = g + 1  # the rounded (weight + 1) is the weight here
        assert site.norm_weight.op != "placeholder"
    with torch.no_grad():
        want = net.norm(x)
        got = ref.rms_norm(x, g, spec.eps, offset=spec.offset, cast_before_weight=spec.cast_before_weight,
                           norm_dtype=spec.norm_dtype)
    if style in ("llama", "gemma", "no_weight", "functional", "module") or (style == "offset_right" and dtype != torch.float32):
        assert torch.equal(got, want)
    else:
        ulps = 1.01 if (style != "sqrt_div" or dtype == torch.float32) else 4
        torch.testing.assert_close(got, want, rtol=ulps * ULP[dtype], atol=1e-6)


class _Spelled(nn.Module):
    """One RMSNorm spelled from hypothesis-drawn choices, then a linear."""

    def __init__(self, c: dict, K: int):
        super().__init__()
        self.c = c
        self.weight = nn.Parameter(1 + 0.3 * torch.randn(K)) if c["weight"] != "none" else None
        self.lin = nn.Linear(K, 24, bias=c["bias"])

    def norm(self, x):
        c = self.c
        h = {"none": lambda t: t, "float": lambda t: t.float(), "to": lambda t: t.to(torch.float32)}[c["upcast"]](x)
        sq = {"pow": lambda t: t.pow(2), "mul": lambda t: t * t, "starstar": lambda t: t**2}[c["square"]](h)
        var = sq.mean(-1, keepdim=True) if c["mean"] == "method" else torch.mean(sq, dim=-1, keepdim=True)
        v = var + c["eps"] if c["eps_side"] == "right" else c["eps"] + var
        r = {
            "rsqrt": lambda: h * torch.rsqrt(v),
            "rsqrt_method": lambda: v.rsqrt() * h,
            "div_sqrt": lambda: h / torch.sqrt(v),
            "recip_sqrt": lambda: h * (1.0 / torch.sqrt(v)),
            "pow_half": lambda: h * v ** -0.5,
        }[c["inv"]]()
        if c["cast"] == "before":
            r = r.to(x.dtype)
        w = self.weight
        out = {
            "none": lambda: r,
            "left": lambda: w * r,
            "right": lambda: r * w,
            "offset": lambda: r * (1.0 + w.float()),
            "offset_rev": lambda: (w.float() + 1) * r,
        }[c["weight"]]()
        if c["cast"] == "after":
            out = out.type_as(x)
        return out

    def forward(self, x):
        return self.lin(self.norm(x))


@given(
    c=st.fixed_dictionaries({
        "upcast": st.sampled_from(["none", "float", "to"]),
        "square": st.sampled_from(["pow", "mul", "starstar"]),
        "mean": st.sampled_from(["method", "function"]),
        "eps": st.sampled_from([1e-5, 1e-6, 1e-8, 0.0, 0.25]),
        "eps_side": st.sampled_from(["left", "right"]),
        "inv": st.sampled_from(["rsqrt", "rsqrt_method", "div_sqrt", "recip_sqrt", "pow_half"]),
        "cast": st.sampled_from(["none", "before", "after"]),
        "weight": st.sampled_from(["none", "left", "right", "offset", "offset_rev"]),
        "bias": st.booleans(),
    }),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    K=st.sampled_from([8, 48, 96]),
)
@example(  # one feature: every reduction is over a single element
    c={"upcast": "float", "square": "mul", "mean": "function", "eps": 1e-6, "eps_side": "left", "inv": "div_sqrt",
       "cast": "after", "weight": "offset", "bias": True},
    dtype=torch.bfloat16, K=1,
)
def test_hypothesis_spellings(c, dtype, K):
    torch.manual_seed(0)
    net = _Spelled(c, K)
    if c["weight"] in ("offset", "offset_rev"):
        with torch.no_grad():
            net.weight.sub_(1)
    net = net.to(dtype).eval()
    x = (3 * torch.randn(2, 5, K)).to(dtype)
    with torch.no_grad():
        want = net.norm(x)
    assume(want.dtype == net.lin.weight.dtype)  # an fp32 result in a bf16 model cannot feed its linear
    torch._dynamo.reset()
    res = _find(net, x)
    assert len(res.sites) == 1, res.rejected
    site = res.sites[0]
    spec = site.norm
    assert site.linears[0].target is F.linear
    assert spec.eps == c["eps"]
    assert spec.offset is c["weight"].startswith("offset")
    assert (site.norm_weight is None) == (c["weight"] == "none")
    assert spec.norm_dtype == want.dtype
    if c["weight"] != "none" and dtype != torch.float32:
        r_in_x_dtype = c["upcast"] == "none" or c["cast"] == "before"
        assert spec.cast_before_weight is r_in_x_dtype
    with torch.no_grad():
        got = ref.rms_norm(x, net.weight, spec.eps, offset=spec.offset,
                           cast_before_weight=spec.cast_before_weight, norm_dtype=spec.norm_dtype)
    exact_arith = c["inv"] in ("rsqrt", "rsqrt_method") and (c["upcast"] != "none" or dtype == torch.float32)
    if exact_arith and c["square"] != "starstar":
        assert torch.equal(got, want)
    else:
        ulps = 1.01 if (c["upcast"] != "none" or dtype == torch.float32) else 6
        torch.testing.assert_close(got, want, rtol=ulps * ULP[dtype], atol=1e-6)


def test_not_a_norm_over_the_last_dim():
    class MeanOverTokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(16, 8)

        def forward(self, x):
            y = x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + 1e-6)
            return self.lin(y)

    res = _find(MeanOverTokens(), torch.randn(2, 5, 16))
    assert res.sites == [] and res.rejected == []


def test_output_head_and_skip_flag():
    model, ids = models.tiny_llama()
    gm, _ = models.capture_graph(model, ids)
    default = find_sites(gm)
    assert all("lm_head" not in m for s in default.sites for m in s.linear_modules)
    with_head = find_sites(gm, skip_output_head=False)
    assert len(with_head.sites) == len(default.sites) + 1
    last = with_head.sites[-1]
    assert last.norm_module == "model.norm" and last.linear_modules == ["lm_head"]
    # Slicing the tokens (logits_to_keep) is a row op between the final norm and lm_head.
    assert last.linears[0].args[0].target is operator.getitem


def test_output_head_without_a_head_name():
    """A plain-torch model whose vocabulary projection has no head name: the last linear,
    strictly the widest, wider than its input."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.n1, self.n2, self.n3 = nn.RMSNorm(32), nn.RMSNorm(32), nn.RMSNorm(32)
            self.a, self.b, self.proj = nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 100)

        def forward(self, x):
            x = x + self.a(self.n1(x))
            x = x + self.b(self.n2(x))
            return self.proj(self.n3(x))

    res = _find(Net(), torch.randn(2, 3, 32))
    assert [s.linear_modules for s in res.sites] == [["a"], ["b"]]
    assert any(r.module == "n3" and "output head" in r.reason for r in res.rejected)


def test_filter_fn():
    model, ids = models.tiny_llama()
    gm, _ = models.capture_graph(model, ids)
    res = find_sites(gm, filter_fn=lambda module, fqn: ".mlp." not in fqn and not fqn.endswith("k_proj"))
    assert [_short(s.linear_modules) for s in res.sites] == [["q_proj", "v_proj"]] * models.LAYERS
    reasons = {r.module: r.reason for r in res.rejected}
    assert reasons["model.layers.0.self_attn.k_proj"] == "filter_fn returned False"
    assert "filter_fn returned False" in reasons["model.layers.1.post_attention_layernorm"]
    assert "none of its linears" in reasons["model.layers.1.post_attention_layernorm"]


def test_norm_feeding_linear_and_residual():
    res = _find(models.NormFeedsLinearAndResidual(32), torch.randn(2, 3, 32))
    assert len(res.sites) == 1 and res.sites[0].linear_modules == ["proj"]


def test_functional_rms_norm_without_module():
    def fn(x, w, W):
        return F.linear(F.rms_norm(x, (x.shape[-1],), w), W)

    res = _find(fn, torch.randn(3, 16), torch.ones(16), torch.randn(8, 16))
    assert len(res.sites) == 1
    site = res.sites[0]
    assert site.norm_module is None and site.linear_modules == [None]
    assert site.norm.eps == torch.finfo(torch.float32).eps


def test_eager_bitlinear_is_already_bitnet():
    model, x = models.bitlinear_model()
    res = _find(model, x)
    assert [(s.norm_module, s.linear_modules) for s in res.sites] == [
        (f"blocks.{i}.{p}.norm", [f"blocks.{i}.{p}"]) for i in range(2) for p in ("up", "down")
    ]
    for s in res.sites:
        assert s.already_bitnet
        assert s.norm == NormSpec(eps=1e-8, offset=False, cast_before_weight=False, norm_dtype=torch.float32)
        # The linear's weight input is the STE expression; its source is the parameter.
        assert s.linears[0].args[1].op != "placeholder"


def test_eager_activation_quant_without_weight_quant_is_left():
    class Half(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.RMSNorm(32)
            self.lin = nn.Linear(32, 16)

        def forward(self, x):
            y = self.norm(x)
            return self.lin(y + (models.activation_quant(y) - y).detach())

    res = _find(Half(), torch.randn(2, 32))
    assert res.sites == []
    assert "quantizes its activation eagerly but not its weight" in res.rejected[0].reason


def test_quantizer_with_other_constants_is_not_taken():
    """An activation quantizer with another floor is not bitfx's: the linear is not fed by the norm."""

    class Other(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.RMSNorm(32)
            self.lin = nn.Linear(32, 16)

        def forward(self, x):
            y = self.norm(x)
            s = 127.0 / y.abs().max(dim=-1, keepdim=True).values.clamp(min=1e-3)
            return self.lin((y * s).round().clamp(-128, 127) / s)

    res = _find(Other(), torch.randn(2, 32))
    assert res.sites == [] and "feeds no linear" in res.rejected[0].reason


def test_bitfx_quantized_linears_form_one_site():
    norm, q, k = nn.RMSNorm(32), models.OpsPackedLinear(nn.Linear(32, 16)), models.OpsPackedLinear(nn.Linear(32, 8, bias=False))

    def fn(x):
        y = norm(x)
        return q(y), k(y.view(-1, 32))

    res = _find(fn, torch.randn(2, 3, 32))
    assert len(res.sites) == 1
    site = res.sites[0]
    assert site.already_bitnet
    assert [getattr(lin.target, "overloadpacket", lin.target) for lin in site.linears] == [torch.ops.bitfx.ternary_matmul] * 2


def test_find_sites_does_not_modify_the_graph():
    model, ids = models.tiny_torch_llama()
    gm, _ = models.capture_graph(model, ids)
    before = gm.code
    find_sites(gm)
    assert gm.code == before


def test_dynamic_shapes_graph():
    model, ids = models.tiny_torch_llama(styles=("llama", "functional"))
    gm, _ = models.capture_graph(model, ids, dynamic=True)
    res = find_sites(gm)
    assert len(res.sites) == 2 and sum(len(s.linears) for s in res.sites) == 5
    x_shape = res.sites[0].norm_input.meta["example_value"].shape
    assert not isinstance(x_shape[1], int)  # the sequence length is symbolic


@pytest.mark.parametrize(
    "path, fqn",
    [
        ("L['self'].model.layers[0].self_attn.q_proj", "model.layers.0.self_attn.q_proj"),
        ("L['fn'].blocks[1]['up']", "blocks.1.up"),
        ("getattr(L['self'].layers, '3').mlp", "layers.3.mlp"),
        ("G['model'].layers[2]", "layers.2"),  # a model the compiled function calls
        ("L['lin']", "lin"),  # a free-standing module the function uses
        ("model.layers.0", "model.layers.0"),
    ],
)
def test_module_names(path, fqn):
    assert _clean_fqn(path) == fqn
