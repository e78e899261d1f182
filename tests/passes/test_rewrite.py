"""The rewrite pass: the ops it leaves in the graph, and the numbers the rewritten graph computes
(run eagerly: the bitfx ops' CPU implementation is the reference) against an independent
eager reference, the same model whose converted linears quantize their inputs
(:func:`tests.models.reference_quantized`, :func:`tests.models.reference_ste`)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from bitfx import reference as ref
from bitfx.passes.rewrite import bitfx_pass, rewrite_sites
from bitfx.passes.plan import find_sites
from tests import models


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def op_counts(gm: torch.fx.GraphModule) -> Counter:
    """``{"norm_quant": 4, "linear": 1, ...}``: bitfx ops by name, F.linear as "linear"."""
    c = Counter()
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        t = getattr(n.target, "overloadpacket", n.target)
        name = getattr(t, "_qualified_op_name", "")
        if name.startswith("bitfx::"):
            c[name.split("::")[1]] += 1
        elif t is F.linear:
            c["linear"] += 1
    return c


def _logits(out):
    return out.logits if hasattr(out, "logits") else out


def _check_meta(gm: torch.fx.GraphModule) -> None:
    """Every node's meta value has the shape and dtype of what the node computes."""

    class Check(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            v = n.meta.get("example_value", n.meta.get("val"))
            pairs = list(zip(v, out)) if isinstance(v, tuple) else [(v, out)]
            for fake, real in pairs:
                if isinstance(fake, torch.Tensor):
                    assert tuple(fake.shape) == tuple(real.shape) and fake.dtype == real.dtype, n.format_node()
            if n.op == "call_function" and "bitfx" in str(n.target):
                assert v is not None, f"no meta value on {n.format_node()}"
            return out

    with torch.no_grad():
        Check(gm).run(*gm.meta["example_inputs"])


HF = {
    # builder, RMSNorm sites (find_sites: sites mode), linears converted (lm_head stays dense),
    # ternary_matmul launches: the linears of a site (q/k/v, gate/up) have one dtype and K and
    # no bias, so they share one matmul over their stacked weights: one per site
    "llama": (models.tiny_llama, 2 * models.LAYERS, 5 * models.LAYERS, 2 * models.LAYERS),
    "gemma": (models.tiny_gemma, 2 * models.LAYERS, 5 * models.LAYERS, 2 * models.LAYERS),
    "qwen3": (models.tiny_qwen3, 2 * models.LAYERS, 5 * models.LAYERS, 2 * models.LAYERS),
    "olmo2": (models.tiny_olmo2, 0, 0, 0),
    "bitnet": (models.tiny_bitnet, 4 * models.LAYERS, 7 * models.LAYERS, 4 * models.LAYERS),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(HF))
def test_transformers_inference(name, dtype):
    builder, n_sites, n_linears, n_matmuls = HF[name]
    model, ids = builder(dtype=dtype)
    gm, compiled = models.capture_graph(model, ids)
    total_linears = op_counts(gm)["linear"]
    assert total_linears == 7 * models.LAYERS + 1  # q, k, v, o, gate, up, down per layer; lm_head
    found = find_sites(gm)
    converted = [m for s in found.sites for m in s.linear_modules]
    assert rewrite_sites(gm, found.sites, training=False) == n_sites
    assert op_counts(gm) == Counter(
        {k: v for k, v in {"norm_quant": n_sites, "weight_quant": n_linears, "ternary_matmul": n_matmuls,
                           "linear": total_linears - n_linears}.items() if v}
    )
    assert find_sites(gm).sites == []  # nothing left to take
    _check_meta(gm)
    with torch.no_grad():
        got = _logits(compiled(ids))
        want = _logits(models.reference_quantized(model, converted)(ids))
    # The graph's norms and bitfx's norm_quant round identically here (same cast order,
    # same fp32 arithmetic), so the int8 codes, and hence the logits, agree exactly.
    assert got.dtype == dtype
    assert torch.equal(got, want)


def test_torch_llama_spellings_inference():
    model, ids = models.tiny_torch_llama()
    gm, compiled = models.capture_graph(model, ids)
    n = bitfx_pass(gm, None)  # the default, linears="all"
    # Per layer (4): the two RMSNorm sites (every spelling fuses: 8 norm_quant) and two sites
    # without a norm, o_proj and down_proj (act_quant of their input); 7 linears; matmuls: q/k
    # share one, v (bias) its own, gate/up one, o_proj, down_proj. lm_head stays dense.
    assert n == 4 * 4
    assert op_counts(gm) == Counter(norm_quant=8, act_quant=8, weight_quant=7 * 4, ternary_matmul=5 * 4, linear=1)
    _check_meta(gm)
    converted = [f"layers.{i}.{p}" for i in range(4)
                 for p in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")]
    with torch.no_grad():
        got = compiled(ids)
        want = models.reference_quantized(model, converted)(ids)
    # x / sqrt(v) and x * (1 / sqrt(v)) round differently from bitfx's x * rsqrt(v) (1 ulp, fp32).
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_view_between_norm_and_linears():
    """3-D activations, the MLP on a 2-D view: the view is replayed on the norm's input."""
    model, ids = models.tiny_torch_llama(styles=("llama", "llama", "llama", "llama"))
    gm, compiled = models.capture_graph(model, ids)
    found = find_sites(gm)
    flat = found.sites[3]  # layer 1's MLP norm
    assert flat.linears[0].args[0].target == "view"
    rewrite_sites(gm, found.sites, training=False)
    nq = [n for n in gm.graph.nodes if "norm_quant" in str(n.target)][3]
    assert nq.args[0].target == "reshape" and nq.args[0].args[0] is flat.norm_input
    assert tuple(nq.meta["example_value"][0].shape) == (ids.numel(), models.HIDDEN)
    converted = [f"layers.{i}.{p}" for i in range(2) for p in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")]
    with torch.no_grad():
        assert torch.equal(compiled(ids), models.reference_quantized(model, converted)(ids))


def test_norm_kept_for_its_other_users():
    torch.manual_seed(0)  # the residual consumes the norm too
    net, x = models.NormFeedsLinearAndResidual(32).eval(), torch.randn(2, 5, 32)
    gm, compiled = models.capture_graph(net, x)
    found = find_sites(gm)
    norm_out = found.sites[0].norm_nodes[-1]
    assert rewrite_sites(gm, found.sites, training=False) == 1
    assert norm_out in gm.graph.nodes and len(norm_out.users) == 1  # now only the add
    assert op_counts(gm) == Counter(norm_quant=1, weight_quant=1, ternary_matmul=1)
    with torch.no_grad():
        assert torch.equal(compiled(x), models.reference_quantized(net, ["proj"])(x))


def test_norm_nodes_erased_when_only_linears_used_them():
    model, ids = models.tiny_llama()
    gm, _ = models.capture_graph(model, ids)
    found = find_sites(gm)
    dead = [n for s in found.sites for n in s.norm_nodes]
    rewrite_sites(gm, found.sites, training=False)
    assert not any(n in gm.graph.nodes for n in dead)
    assert sum(1 for n in gm.graph.nodes if n.target == "pow") == 1  # only the final norm's (lm_head)


def test_per_channel_option():
    model, ids = models.tiny_llama()
    gm, compiled = models.capture_graph(model, ids)
    found = find_sites(gm)
    converted = [m for s in found.sites for m in s.linear_modules]
    rewrite_sites(gm, found.sites, training=False, per_channel=True)
    assert all(n.args[1] is True for n in gm.graph.nodes if "weight_quant" in str(n.target))
    with torch.no_grad():
        assert torch.equal(_logits(compiled(ids)), _logits(models.reference_quantized(model, converted, per_channel=True)(ids)))


def test_bias_and_rms_norm_module():
    torch.manual_seed(0)
    norm, a, b = nn.RMSNorm(48, eps=1e-5), nn.Linear(48, 24), nn.Linear(48, 40)

    def fn(x):
        y = norm(x)
        return a(y), b(y)

    x = torch.randn(3, 7, 48)
    gm, compiled = models.capture_graph(fn, x)
    assert bitfx_pass(gm, None) == 1
    # a and b agree on dtype, K and bias dtype: one matmul over both weights, split after.
    assert op_counts(gm) == Counter(norm_quant=1, weight_quant=2, ternary_matmul=1)
    with torch.no_grad():
        got = compiled(x)
        y = norm(x)
        for lin, out in zip((a, b), got):
            q, s = ref.act_quant(y)
            packed, s_w = ref.weight_quant(lin.weight)
            assert torch.equal(out, ref.ternary_matmul(q, s, packed, s_w, lin.bias, torch.float32))


def test_eager_bitlinear_inference():
    """Already-BitNet code: the STE chains are replaced, the numbers stay the eager model's."""
    model, x = models.bitlinear_model(bias=True)
    gm, compiled = models.capture_graph(model, x)
    assert op_counts(gm)["linear"] == 4
    assert bitfx_pass(gm, None) == 4
    assert op_counts(gm) == Counter(norm_quant=4, weight_quant=4, ternary_matmul=4)
    targets = {str(n.target) for n in gm.graph.nodes}
    assert not targets & {"round", "clamp_", "detach"}  # the eager quantizers are gone
    _check_meta(gm)
    with torch.no_grad():
        got, want = compiled(x), model(x)
    # Eager multiplies dequantized floats; bitfx accumulates the integer codes exactly.
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_eager_bitlinear_training():
    model, x = models.bitlinear_model(bias=True)
    model.train()
    gm, compiled = models.capture_graph(model, x, grad=True)
    assert bitfx_pass(gm, None) == 4  # training decided from grad mode + parameters
    # one per norm (each feeds one linear); the four weights, parameters, packed by one op
    assert op_counts(gm) == Counter(bitlinear_stacked=4, weight_quant_stacks=1)
    eager = models.bitlinear_model(bias=True)[0].train()
    got, want = compiled(x), eager(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    got.square().mean().backward()
    want.square().mean().backward()
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_training_rewrite_gradients():
    """Training form on Llama-style spellings: forward and every gradient match the eager
    straight-through reference (the model's own norms, STE linears)."""
    model, ids = models.tiny_torch_llama(styles=("llama", "gemma", "functional", "no_weight"))
    gm, compiled = models.capture_graph(model, ids, grad=True)
    found = find_sites(gm)
    converted = [m for s in found.sites for m in s.linear_modules]
    assert rewrite_sites(gm, found.sites, training=True) == 4
    # One op for q/k, one for v (it alone has a bias), one for gate/up, per layer, each with
    # its weights quantized and stacked along N.
    assert op_counts(gm) == Counter(bitlinear_stacked=6, weight_quant_stacked=6, linear=2 * 2 + 1)
    _check_meta(gm)
    oracle = models.reference_ste(model, converted)
    got, want = compiled(ids), oracle(ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    target = torch.randint(0, models.VOCAB, ids.shape)
    F.cross_entropy(got.flatten(0, 1), target.flatten()).backward()
    F.cross_entropy(want.flatten(0, 1), target.flatten()).backward()
    for (name, p), q in zip(model.named_parameters(), oracle.parameters()):
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-6, msg=name)


def test_training_graph_packs_its_parameters_once():
    """``pack_once``: the sites' ``weight_quant_stacked`` calls on parameters become one
    ``weight_quant_stacks``, each site reading its stack as a view; forward and every gradient
    are those of the per-site graph (the same packed bytes and scales). A weight the graph
    computes (here a product with a parameter) keeps its site's op, where it is made."""
    from bitfx.passes.rewrite import pack_once

    model, ids = models.tiny_torch_llama(styles=("llama", "gemma", "functional", "no_weight"))
    gm, compiled = models.capture_graph(model, ids, grad=True)
    found = find_sites(gm)
    rewrite_sites(gm, found.sites, training=True)
    per_site = compiled(ids)
    target = torch.randint(0, models.VOCAB, ids.shape)
    F.cross_entropy(per_site.flatten(0, 1), target.flatten()).backward()
    want_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    wq = [n for n in gm.graph.nodes if n.target is torch.ops.bitfx.weight_quant_stacked.default]
    w = wq[-1].args[0][0]  # one site's weight made by the graph: w * 1
    with gm.graph.inserting_before(wq[-1]):
        made = gm.graph.call_function(torch.mul, (w, 1.0))
    made.meta.update(w.meta)
    wq[-1].args = ([made, *wq[-1].args[0][1:]], *wq[-1].args[1:])
    assert pack_once(gm.graph) == 5
    gm.recompile()
    c = op_counts(gm)
    assert c["weight_quant_stacks"] == 1 and c["weight_quant_stacked"] == 1 and c["bitlinear_stacked"] == 6
    got = compiled(ids)
    assert torch.equal(got, per_site)
    F.cross_entropy(got.flatten(0, 1), target.flatten()).backward()
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, want_grads[n]), n


def test_pack_once_merges_per_device():
    """Sites on two devices (a model split over them): one ``weight_quant_stacks`` per device with
    two sites or more, each reading only its device's weights; a device with one site keeps its
    op. The merged graph returns the per-site bytes and scales."""
    import operator

    from bitfx.passes.rewrite import pack_once

    g = torch.fx.Graph()
    vals = [torch.randn(8, 16), torch.randn(4, 16), torch.randn(6, 40), torch.empty(8, 16, device="meta"),
            torch.empty(3, 16, device="meta")]
    ws = []
    for i, v in enumerate(vals):
        ws.append(g.placeholder(f"w{i}"))
        ws[-1].meta["val"] = v
    outs = []
    for group, flags in (([0, 1], [False, True]), ([2], [False]), ([3, 4], [True, False])):
        n = g.call_function(torch.ops.bitfx.weight_quant_stacked.default, ([ws[i] for i in group], flags))
        outs += [g.call_function(operator.getitem, (n, 0)), g.call_function(operator.getitem, (n, 1))]
    g.output(tuple(outs))
    gm = torch.fx.GraphModule(torch.nn.Module(), g)
    want = gm(*vals)
    assert pack_once(gm.graph) == 2
    gm.recompile()
    c = op_counts(gm)
    assert c["weight_quant_stacks"] == 1 and c["weight_quant_stacked"] == 1
    got = gm(*vals)
    for a, b in zip(got[:4], want[:4]):
        assert torch.equal(a, b)
    assert got[4].device.type == "meta" and got[4].shape == want[4].shape


def test_bitfx_quantized_modules_fuse_with_their_norm():
    torch.manual_seed(0)
    norm = models.LlamaNorm(32)
    with torch.no_grad():
        norm.weight.add_(0.2 * torch.randn(32))
    q = models.OpsPackedLinear(nn.Linear(32, 16))
    k = models.OpsPackedLinear(nn.Linear(32, 8, bias=False), per_channel=True)

    def fn(x):
        y = norm(x)
        return q(y), k(y), k(y.view(-1, 32))

    x = torch.randn(2, 3, 32)
    with torch.no_grad():
        want = fn(x)
    for training in (False, True):
        gm, compiled = models.capture_graph(fn, x)
        assert op_counts(gm) == Counter(act_quant=3, ternary_matmul=3)
        assert rewrite_sites(gm, find_sites(gm).sites, training=training) == 1
        if training:
            # Frozen packed weights a gradient passes through: one differentiable group op per
            # (view, bias presence): q (bias), k (no bias), k on the view.
            assert op_counts(gm) == Counter(ternary_linear_group=3)
        else:
            # One norm_quant for the linears that see the norm output as it is, one for the view.
            assert op_counts(gm) == Counter(norm_quant=2, ternary_matmul=3)
        _check_meta(gm)
        with torch.no_grad():
            got = compiled(x)
        for g, w in zip(got, want):
            assert torch.equal(g, w)


def test_dynamic_shapes_rewrite():
    model, ids = models.tiny_torch_llama(styles=("llama", "module"))
    gm, compiled = models.capture_graph(model, ids, dynamic=True)
    assert bitfx_pass(gm, None) == 4  # two RMSNorm sites, o_proj and down_proj without a norm
    converted = [f"layers.0.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")]
    oracle = models.reference_quantized(model, converted)
    with torch.no_grad():
        for T in (3, 17, 100):
            ids = torch.randint(0, models.VOCAB, (2, T))
            assert torch.equal(compiled(ids), oracle(ids))


def test_norm_of_a_converted_linear():
    """down(norm_b(up(norm_a(x)))): the second site's norm reads the first site's (ternary) output."""

    class Sandwich(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm_a, self.up = models.LlamaNorm(32), nn.Linear(32, 48)
            self.norm_b, self.down = models.LlamaNorm(48), nn.Linear(48, 32)

        def forward(self, x):
            return self.down(self.norm_b(self.up(self.norm_a(x))))

    torch.manual_seed(0)
    net, x = Sandwich().eval(), torch.randn(2, 5, 32)
    gm, compiled = models.capture_graph(net, x)
    assert bitfx_pass(gm, None) == 2
    assert op_counts(gm) == Counter(norm_quant=2, weight_quant=2, ternary_matmul=2)
    with torch.no_grad():
        assert torch.equal(compiled(x), models.reference_quantized(net, ["up", "down"])(x))


def test_torch_export_graph():
    """An aten-level graph (torch.export) works too."""
    model, ids = models.tiny_torch_llama()
    ep = torch.export.export(model, (ids,))
    found = find_sites(ep.graph_module)
    assert [s.norm_module for s in found.sites] == [f"layers.{i}.{n}" for i in range(4) for n in ("attn_norm", "mlp_norm")]
    converted = [m for s in found.sites for m in s.linear_modules]
    assert rewrite_sites(ep.graph_module, found.sites, training=False) == 8
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(ids), models.reference_quantized(model, converted)(ids), rtol=1e-5, atol=1e-5)


def test_eager_per_channel_weight_quant():
    """An eager quantizer with one scale per output channel keeps its grouping."""

    class PerChannel(models.BitLinear):
        def forward(self, x):
            w = self.weight
            y = self.norm(x)
            s = 1.0 / w.abs().mean(dim=-1, keepdim=True).clamp(min=1e-5)
            w_q = w + ((w * s).round().clamp(-1, 1) / s - w).detach()
            return F.linear(y + (models.activation_quant(y) - y).detach(), w_q)

    torch.manual_seed(0)
    net, x = PerChannel(32, 16).eval(), torch.randn(4, 32)
    gm, compiled = models.capture_graph(net, x)
    assert bitfx_pass(gm, None) == 1
    (wq,) = [n for n in gm.graph.nodes if "weight_quant" in str(n.target)]
    assert wq.args[1] is True
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), net(x), rtol=1e-5, atol=1e-5)


def test_bitfx_linear_modules_fuse_with_their_norm():
    """bitfx.quantize's BitfxLinear (act_quant + ternary_matmul on packed buffers) after a norm."""
    from bitfx.modules import BitfxLinear

    torch.manual_seed(0)
    norm = models.LlamaNorm(32)
    q, v = BitfxLinear.from_linear(nn.Linear(32, 16)), BitfxLinear.from_linear(nn.Linear(32, 24), per_channel=True)

    def fn(x):
        y = norm(x)
        return q(y), v(y)

    x = torch.randn(2, 5, 32)
    gm, compiled = models.capture_graph(fn, x)
    with torch.no_grad():
        want = fn(x)
    assert bitfx_pass(gm, None) == 1
    # Both have a bias: one matmul over their packed buffers stacked along N.
    assert op_counts(gm) == Counter(norm_quant=1, ternary_matmul=1)
    with torch.no_grad():
        for got, w in zip(compiled(x), want):
            assert torch.equal(got, w)


def test_transformers_autobitlinear_online_inference():
    """transformers' AutoBitLinear (online quantization) traced under no_grad: its
    autograd.Functions are inlined into the eager quantizers, which bitfx recognizes. (Traced
    for training they stay autograd.Function calls and the linear is left as it is.)"""
    from transformers.integrations.bitnet import AutoBitLinear

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.RMSNorm(32)
            self.proj = AutoBitLinear(32, 16, bias=False, online_quant=True)

        def forward(self, x):
            return self.proj(self.norm(x))

    torch.manual_seed(0)
    net, x = Net().eval(), torch.randn(4, 32)
    gm, compiled = models.capture_graph(net, x)
    found = find_sites(gm)
    assert [(s.linear_modules, s.already_bitnet) for s in found.sites] == [(["proj"], True)]
    assert rewrite_sites(gm, found.sites, training=False) == 1
    assert op_counts(gm) == Counter(norm_quant=1, weight_quant=1, ternary_matmul=1)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), net(x), rtol=1e-5, atol=1e-5)
