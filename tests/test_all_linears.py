"""Every linear of a block ternary (``BitfxConfig(linears="all")``, the default): each kind of
linear against the reference, the narrow mode, the inserted-norm mode, and the report."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import bitfx
from bitfx import reference as ref
from bitfx.config import BitfxConfig
from tests import models

pytest.importorskip("transformers")

PER_LAYER = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
             "mlp.up_proj", "mlp.down_proj")


def _layer_names(prefix: str, layers: int) -> list[str]:
    return [f"{prefix}.layers.{i}.{p}" for i in range(layers) for p in PER_LAYER]


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def test_llama_explain_and_quantize_report_seven_of_seven():
    model, ids = models.tiny_llama()
    report = bitfx.explain(model, ids, config=BitfxConfig(training=False))
    want = _layer_names("model", models.LAYERS)
    assert sorted(report.converted) == sorted(want)
    assert sorted(report.linears) == sorted(want)
    dense = {d.module: d.reason for d in report.decisions if not d.converted}
    assert list(dense) == ["lm_head"] and "output head" in dense["lm_head"]
    kinds = sorted(s.kind for s in report.sites)
    assert kinds == sorted(["norm"] * 2 * models.LAYERS + ["act"] * 2 * models.LAYERS)
    no_norm = [s.linear_modules for s in report.sites if s.kind == "act"]
    assert sorted(m for ms in no_norm for m in ms) == sorted(
        f"model.layers.{i}.{p}" for i in range(models.LAYERS) for p in ("self_attn.o_proj", "mlp.down_proj"))
    assert "quantized per token" in str(report)

    q = bitfx.quantize(copy.deepcopy(model), ids)
    assert sorted(q.bitfx_report.converted) == sorted(want)
    assert isinstance(q.lm_head, nn.Linear) and not isinstance(q.lm_head, bitfx.BitfxLinear)
    assert all(isinstance(q.get_submodule(n), bitfx.BitfxLinear) for n in want)


def test_narrow_mode_keeps_the_norm_fed_linears_only():
    model, ids = models.tiny_llama()
    report = bitfx.explain(model, ids, config=BitfxConfig(linears="sites", training=False))
    assert len(report.converted) == 5 * models.LAYERS
    assert all(s.kind == "norm" for s in report.sites)
    reasons = {d.module: d.reason for d in report.decisions if not d.converted}
    assert reasons["model.layers.0.self_attn.o_proj"] == "no RMSNorm feeds it (linears='sites')"
    q = bitfx.quantize(copy.deepcopy(model), ids, config=BitfxConfig(linears="sites"))
    assert isinstance(q.model.layers[0].mlp.down_proj, nn.Linear)
    assert isinstance(q.model.layers[0].mlp.up_proj, bitfx.BitfxLinear)


def test_bad_linears_mode_is_named():
    with pytest.raises(ValueError, match="linears must be one of"):
        BitfxConfig(linears="every")
    with pytest.raises(ValueError, match="linears='norm' inserts RMSNorms"):
        model, ids = models.tiny_llama()
        bitfx.quantize(model, ids, config=BitfxConfig(linears="norm"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_every_kind_of_linear_matches_the_reference(dtype):
    """The rewritten graph (run eagerly: the ops' CPU implementations) gives, bit for bit, the
    logits of a reference model in which each of the seven linears of a layer quantizes its
    input per token and its weight absmean-ternary on the activation the model hands it (the
    norm-fed ones after the model's own norm, the attention output and down projection on
    their raw inputs)."""
    from bitfx.passes.rewrite import bitfx_pass
    from tests.passes.test_rewrite import op_counts

    model, ids = models.tiny_llama(dtype=dtype)
    gm, compiled = models.capture_graph(model, ids)
    assert bitfx_pass(gm, BitfxConfig(training=False)) == 4 * models.LAYERS
    L = models.LAYERS
    assert op_counts(gm) == {"norm_quant": 2 * L, "act_quant": 2 * L, "weight_quant": 7 * L,
                             "ternary_matmul": 4 * L, "linear": 1}
    with torch.no_grad():
        got = compiled(ids).logits
        want = models.reference_quantized(model, _layer_names("model", L))(ids).logits
    assert got.dtype == dtype
    assert torch.equal(got, want)


def test_quantized_model_matches_the_backend():
    """``bitfx.quantize`` run eagerly equals the rewritten graph run eagerly, bit for bit; under
    Inductor (the backend, alone or on the converted model) the surrounding fp32 ops (attention,
    softmax, residuals) are fused and summed in another order, so those compare within 1e-4."""
    from bitfx.passes.rewrite import bitfx_pass

    model, ids = models.tiny_llama()
    gm, graph = models.capture_graph(model, ids)
    bitfx_pass(gm, BitfxConfig(training=False))
    q = bitfx.quantize(copy.deepcopy(model), ids)
    with torch.no_grad():
        rewritten = graph(ids).logits
        eager = q(ids).logits
        compiled = torch.compile(model, backend="bitfx")(ids).logits
        both = torch.compile(q, backend="bitfx")(ids).logits
    assert torch.equal(eager, rewritten)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(both, eager, rtol=1e-4, atol=1e-4)


class _Block(nn.Module):
    """A norm-less MLP (two linears sharing an input, one after them) and a low-rank pair."""

    def __init__(self, d=32, h=48, r=8):
        super().__init__()
        self.gate = nn.Linear(d, h, bias=False)
        self.up = nn.Linear(d, h, bias=False)
        self.down = nn.Linear(h, d, bias=True)
        self.a = nn.Linear(d, r, bias=False)
        self.b = nn.Linear(r, d, bias=False)

    def forward(self, x):
        y = self.down(F.silu(self.gate(x)) * self.up(x))
        return y + self.b(self.a(y))


def _quantized(lin: nn.Linear, y):
    q, s_x = ref.act_quant(y)
    packed, s_w = ref.weight_quant(lin.weight.detach(), False)
    return ref.ternary_matmul(q, s_x, packed, s_w, lin.bias, y.dtype)


def _reference_block(m: _Block, x, norm_eps=None):
    def lin(layer, y):
        if norm_eps is not None:
            y = ref.rms_norm(y, None, norm_eps, cast_before_weight=False)
        return _quantized(layer, y)

    y = lin(m.down, F.silu(lin(m.gate, x)) * lin(m.up, x))
    return y + lin(m.b, lin(m.a, y))


def test_norm_less_linears_fuse_siblings_and_match_the_reference():
    torch.manual_seed(0)
    m = _Block().eval()
    x = torch.randn(3, 5, 32)
    from tests.passes.test_rewrite import op_counts

    gm, compiled = models.capture_graph(m, x)
    from bitfx.passes.rewrite import bitfx_pass

    assert bitfx_pass(gm, BitfxConfig(training=False)) == 4  # {gate, up} on x, down, a, b
    counts = op_counts(gm)
    assert counts["act_quant"] == 4 and counts["weight_quant"] == 5 and counts["ternary_matmul"] == 4
    assert counts["linear"] == 0
    with torch.no_grad():
        assert torch.equal(compiled(x), _reference_block(m, x))
        # Inductor fuses silu * up and the residual add (fp32, another rounding order)
        torch.testing.assert_close(torch.compile(m, backend="bitfx")(x), _reference_block(m, x), rtol=1e-4, atol=1e-4)


def test_inserted_norm_mode():
    torch.manual_seed(0)
    m = _Block().eval()
    x = torch.randn(2, 4, 32)
    with torch.no_grad():
        got = torch.compile(m, backend="bitfx", options={"linears": "norm", "norm_eps": 1e-5})(x)
    assert torch.equal(got, _reference_block(m, x, norm_eps=1e-5))
    report = bitfx.explain(m, x, config=BitfxConfig(linears="norm", norm_eps=1e-5, training=False))
    assert {s.kind for s in report.sites} == {"inserted"}
    assert "inserted RMSNorm(eps=1e-05)" in str(report)


def test_training_norm_less_linears_get_straight_through_gradients():
    """Training graphs: the norm-less linears are ``bitlinear_stacked(normalize=False)``, whose
    forward and gradients equal the straight-through reference's."""
    torch.manual_seed(0)
    m = _Block()
    x = torch.randn(3, 5, 32, requires_grad=True)
    names = ["gate", "up", "down", "a", "b"]
    want_model = models.reference_ste(m, names)
    out = torch.compile(m, backend="bitfx")(x)
    want = want_model(x)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)  # fp32 matmul orders differ (1 ulp)
    g = torch.randn_like(out)
    gx, = torch.autograd.grad(out, x, g, retain_graph=True)
    gx_ref, = torch.autograd.grad(want, x, g, retain_graph=True)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-4, atol=1e-5)
    for n in names:
        gw, = torch.autograd.grad(out, getattr(m, n).weight, g, retain_graph=True)
        gw_ref, = torch.autograd.grad(want, getattr(want_model, n).weight, g, retain_graph=True)
        torch.testing.assert_close(gw, gw_ref, rtol=1e-4, atol=1e-5)


def test_training_report_and_graph_for_a_llama():
    model, ids = models.tiny_llama()
    model.train()
    report = bitfx.explain(model, ids, config=BitfxConfig(training=True))
    assert report.training and len(report.converted) == 7 * models.LAYERS
    gm, _ = models.capture_graph(model, ids, grad=True)
    from bitfx.passes.rewrite import bitfx_pass
    from tests.passes.test_rewrite import op_counts

    bitfx_pass(gm, BitfxConfig(training=True))
    c = op_counts(gm)
    # every site's weights are parameters: packed by one op for the whole graph
    assert c["bitlinear_stacked"] == 4 * models.LAYERS and c["linear"] == 1
    assert c["weight_quant_stacks"] == 1 and c["weight_quant_stacked"] == 0


def test_moe_router_and_head_stay_dense_in_all_mode():
    model, ids = models.tiny_deepseek_v3()
    report = bitfx.explain(model, ids, config=BitfxConfig(training=False))
    dense = {d.module: d.reason for d in report.decisions if not d.converted}
    assert any("router" in (r or "") for r in dense.values())
    assert "lm_head" in dense
    converted = report.converted
    assert any(n.endswith("o_proj") for n in converted)
    assert any(n.endswith("down_proj") for n in converted)
    # The experts' weights, where the model holds them as one 3-D tensor each (no linear layer),
    # are named as left dense, with their shapes; every 2-D weight is a linear's decision instead.
    fused = {n: tuple(p.shape) for n, p in model.named_parameters() if p.dim() > 2}
    assert {(w.name, w.shape) for w in report.dense_weights} == set(fused.items())
    if fused:
        assert "left dense" in str(report) and all(name in str(report) for name in fused)
        q = bitfx.quantize(copy.deepcopy(model), ids)
        assert "left dense: " in str(q.bitfx_report)
        assert q.bitfx_report.to_dict()["dense_weights"] == list(fused)


# ---------------------------------------------------------------- the kernels' paths the rewrite now takes

from hypothesis import example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tests.helpers import KERNEL_DEVICE, assert_close_ulps  # noqa: E402


@settings(deadline=None)
@given(M=st.integers(1, 40), K=st.integers(1, 160), Ns=st.lists(st.integers(1, 40), min_size=2, max_size=3),
       bias=st.booleans(), seed=st.integers(0, 2**16))
@example(M=1, K=64, Ns=[32, 8, 8], bias=False, seed=0)  # q/k/v at decode
@example(M=17, K=33, Ns=[5, 5], bias=True, seed=1)  # gate/up, odd K
def test_stacked_weights_give_the_concatenated_outputs(M, K, Ns, bias, seed):
    """The sibling fusion's premise, on the kernel: one matmul over weights stacked along N gives
    each weight's own output, bit for bit (int32 accumulation, the same per-element epilogue),
    whatever launch configuration the larger N picks."""
    from bitfx.kernels.ternary_matmul import ternary_matmul

    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-128, 128, (M, K), generator=g, dtype=torch.int8).to(KERNEL_DEVICE)
    s_x = (127.0 / (1 + torch.rand(M, generator=g) * 10)).to(KERNEL_DEVICE)
    packs, scales, biases = [], [], []
    for n in Ns:
        t = torch.randint(-1, 2, (n, K), generator=g, dtype=torch.int8)
        packs.append(ref.pack_ternary(t).to(KERNEL_DEVICE))
        scales.append((1.0 / (0.01 + torch.rand(n, generator=g))).to(KERNEL_DEVICE))
        biases.append(torch.randn(n, generator=g).to(torch.bfloat16).to(KERNEL_DEVICE) if bias else None)
    parts = [ternary_matmul(q, s_x, p, s, b, torch.bfloat16) for p, s, b in zip(packs, scales, biases)]
    fused = ternary_matmul(q, s_x, torch.cat(packs), torch.cat(scales), torch.cat(biases) if bias else None,
                           torch.bfloat16)
    assert torch.equal(fused, torch.cat(parts, dim=-1))


@pytest.mark.cuda
@settings(deadline=None, max_examples=20)
@given(M=st.integers(1, 70), K=st.integers(1, 300), N=st.integers(1, 64), seed=st.integers(0, 2**16))
def test_bitlinear_stacked_without_norm_on_cuda(M, K, N, seed):
    """``bitlinear_stacked(normalize=False)`` (a linear no norm feeds, training) on the CUDA
    kernels: its codes equal the reference's, its output within 4 bf16 ulps of the reference's
    given the weight it packed (``weight_quant_stacked``), its gradient to the input the
    straight-through one."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(torch.bfloat16)
    w = (torch.randn(N, K, generator=g) * 0.05).to(torch.bfloat16)
    xc, wc = x.cuda().requires_grad_(), w.cuda().requires_grad_()
    packed_c, s_w_c = torch.ops.bitfx.weight_quant_stacked([wc], [False])
    out, q, s_x, _ = torch.ops.bitfx.bitlinear_stacked(xc, None, [wc], packed_c, s_w_c, None, 0.0, False, False,
                                                       torch.bfloat16, False)
    q_ref, s_ref = ref.act_quant(x)
    assert torch.equal(q.cpu(), q_ref)
    packed, s_w = packed_c.cpu(), s_w_c.cpu()
    torch.testing.assert_close(s_w, ref.weight_scale(w, False), rtol=1e-6, atol=0)
    want = ref.ternary_matmul(q_ref, s_ref, packed, s_w, None, torch.bfloat16)
    assert_close_ulps(out.cpu(), want, 4, atol=1e-6)
    dout = torch.randn(M, N, generator=g).to(torch.bfloat16)
    dx, = torch.autograd.grad(out, xc, dout.cuda())
    w_q = (ref.unpack_ternary(packed, K).float() / s_w.unsqueeze(1))
    torch.testing.assert_close(dx.float().cpu(), (dout.float() @ w_q.to(torch.bfloat16).float()), rtol=2e-2, atol=1e-2)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_whole_model_training_step_matches_the_ste_reference(arch):
    """A transformers Llama (and a Gemma 3: sandwich norms, ``1 + weight``) trained through the backend with every linear ternary: the loss and
    the gradient of every parameter match a plain-torch straight-through reference of the same
    model (each linear quantizes its input per token and its weight absmean-ternary on what the
    model hands it; gradients pass straight through). Tolerances: the forward to 1e-5 (the fused
    norm's x * rsqrt(v) against the model's own spelling, 1 fp32 ulp, fed through quantizers);
    gradients to 1e-4 relative (the STE backward sums the q/k/v and gate/up input gradients in
    fp32 before the norm's backward, the reference in autograd's order)."""
    model, ids = models.TRANSFORMERS[arch](dtype=torch.float32)
    model.train()
    names = _layer_names("model", models.LAYERS)
    want_model = models.reference_ste(model, names)
    got = torch.compile(model, backend="bitfx", fullgraph=True)(ids, labels=ids).loss
    want = want_model(ids, labels=ids).loss
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    got.backward()
    want.backward()
    ours = dict(model.named_parameters())
    theirs = dict(want_model.named_parameters())
    assert ours.keys() == theirs.keys()
    for name, p in ours.items():
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, theirs[name].grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
