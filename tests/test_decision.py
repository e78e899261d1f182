"""One decision for the backend, bitfx.quantize and bitfx.explain, and the cases that used to
escape it: names by identity, checkpointed blocks, autograd.Function norms, MoE routers, a
linear used with and without a norm, keyword inputs, filter_fn's signature, and no global
Dynamo reset."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn as nn
import torch.utils.checkpoint as cp
from torch._dynamo.testing import CompileCounter

import bitfx
from bitfx.backend import bitfx_backend
from tests import models


def _backend_decisions(model, *args, training=False, **kwargs):
    """What the backend converted: ``(converted names, {dense name: reason}, output)``."""
    seen = {"converted": [], "dense": {}}

    def backend(gm, example_inputs, **kw):
        compiled = bitfx_backend(gm, example_inputs, **kw)
        for g in [gm]:
            seen["converted"] += g.meta["bitfx"]["converted"]
            seen["dense"].update(g.meta["bitfx"]["dense"])
        return compiled

    torch._dynamo.reset()
    with torch.set_grad_enabled(training):
        out = torch.compile(model, backend=backend, **kwargs)(*args)
    torch._dynamo.reset()
    return seen["converted"], seen["dense"], out


@pytest.mark.parametrize("arch", list(models.TRANSFORMERS))
def test_backend_quantize_and_explain_agree(arch):
    model, ids = models.TRANSFORMERS[arch]()
    report = bitfx.explain(model, ids, config=bitfx.BitfxConfig(training=False))
    converted, dense, _ = _backend_decisions(model, ids)
    assert sorted(converted) == sorted(report.converted)
    explained_dense = {d.module: d.reason for d in report.decisions if not d.converted}
    assert dense == explained_dense
    q = bitfx.quantize(copy.deepcopy(model), ids)
    swapped = [n for n, m in q.named_modules() if isinstance(m, bitfx.BitfxLinear)]
    assert sorted(swapped) == sorted(report.linears) == sorted(q.bitfx_report.converted)
    assert set(report.linears) <= set(report.converted)
    assert report.converted and "lm_head" in explained_dense
    if arch in ("llama", "gemma", "gemma3", "qwen3", "olmo2", "bitnet"):  # linears="all": 7 of 7 per layer
        every = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
        assert len(every) == 7 * models.LAYERS and sorted(report.converted) == sorted(every)
    if arch == "olmo2":  # post-norm: no RMSNorm feeds a linear, every site quantizes its input alone
        assert report.sites and all(s.kind == "act" and s.norm_module is None for s in report.sites)
    for name in report.converted:  # names by identity: every one is a module of the model
        assert isinstance(model.get_submodule(name), nn.Linear)


def test_moe_router_and_mla_on_deepseek_v3():
    model, ids = models.tiny_deepseek_v3()
    report = bitfx.explain(model, ids, config=bitfx.BitfxConfig(training=False))
    dense = {d.module: d.reason for d in report.decisions if not d.converted}
    assert "router" in dense["model.layers.1.mlp.gate"]
    # MLA: the low-rank up-projections read their norms (one through a view) and convert.
    for i in range(models.LAYERS):
        for p in ("q_b_proj", "kv_b_proj", "q_a_proj", "kv_a_proj_with_mqa"):
            assert f"model.layers.{i}.self_attn.{p}" in report.converted
    assert "model.layers.1.mlp.shared_experts.gate_proj" in report.converted
    # The backend leaves the router exact: its output equals the reference model that
    # converts exactly the reported linears (and nothing else).
    converted, _, out = _backend_decisions(model, ids)
    want = models.reference_quantized(model, report.converted)
    with torch.no_grad():
        torch.testing.assert_close(out.logits, want(ids).logits, rtol=2e-5, atol=2e-5)


def test_mamba2_gated_norm_through_a_view_feeds_out_proj():
    model, ids = models.tiny_mamba2()
    with torch.no_grad():
        report = bitfx.explain(model, ids)
        converted, _, out = _backend_decisions(model, ids)
        want = models.reference_quantized(model, report.converted)(ids).logits
    for i in range(models.LAYERS):
        assert f"backbone.layers.{i}.mixer.out_proj" in report.converted
        assert f"backbone.layers.{i}.mixer.in_proj" in report.converted
    assert sorted(converted) == sorted(report.converted)
    torch.testing.assert_close(out.logits, want, rtol=2e-5, atol=2e-5)


def test_autobitlinear_sub_norms_feed_o_proj_and_down_proj():
    """transformers' AutoBitLinear (online): the sub-norm's only user is the linear's own
    activation quantizer, whose ``.float()`` used to be read as the norm's last cast."""
    from tests.helpers import assert_close_up_to_code_flips

    model, ids = models.tiny_bitnet_autobitlinear()
    with torch.no_grad():
        report = bitfx.explain(model, ids)
        converted, _, out = _backend_decisions(model, ids)
        want = model(ids).logits
    per_layer = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert sorted(report.converted) == sorted(
        f"model.layers.{i}.{'self_attn' if p[0] in 'qkvo' else 'mlp'}.{p}" for i in range(models.LAYERS) for p in per_layer
    ) == sorted(converted)
    assert all(s.already_bitnet for s in report.sites)
    # Already BitNet: the fused ops compute the model's own quantizers' numbers.
    assert_close_up_to_code_flips(out.logits, want)


class _Block(nn.Module):
    def __init__(self, K=32, N=48):
        super().__init__()
        self.norm = nn.RMSNorm(K, eps=1e-6)
        self.up, self.gate = nn.Linear(K, N, bias=False), nn.Linear(K, N, bias=False)
        self.down = nn.Linear(N, K, bias=False)

    def forward(self, x):
        h = self.norm(x)
        return x + self.down(torch.nn.functional.silu(self.gate(h)) * self.up(h))


class _Checkpointed(nn.Module):
    def __init__(self, use_reentrant: bool | None, blocks=2):
        super().__init__()
        self.blocks = nn.ModuleList(_Block() for _ in range(blocks))
        self.use_reentrant = use_reentrant

    def forward(self, x):
        for b in self.blocks:
            x = b(x) if self.use_reentrant is None else cp.checkpoint(b, x, use_reentrant=self.use_reentrant)
        return x


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_checkpointed_blocks_are_rewritten(use_reentrant):
    torch.manual_seed(0)
    model = _Checkpointed(use_reentrant)
    plain = _Checkpointed(None)
    plain.load_state_dict(model.state_dict())
    x = torch.randn(2, 5, 32)
    report = bitfx.explain(model, x)
    # Each block: its norm's site (gate, up) and down, without a norm (linears="all").
    assert [(s.norm_module, s.kind) for s in report.sites] == [
        ("blocks.0.norm", "norm"), (None, "act"), ("blocks.1.norm", "norm"), (None, "act")]
    assert report.converted == [f"blocks.{i}.{p}" for i in range(2) for p in ("gate", "up", "down")]
    # Inference: the same numbers as the un-checkpointed model through the backend.
    converted, _, got = _backend_decisions(model, x)
    assert sorted(converted) == sorted(report.converted)
    _, _, want = _backend_decisions(plain, x)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # Training: checkpointing recomputes the fused ops; gradients equal the plain model's.
    grads = []
    for m in (model, plain):
        torch._dynamo.reset()
        xi = x.clone().requires_grad_(True)
        loss = torch.compile(m, backend="bitfx")(xi).square().mean()
        loss.backward()
        grads.append([xi.grad] + [p.grad.clone() for p in m.parameters()])
        m.zero_grad()
    torch._dynamo.reset()
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


class _NormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w):
        rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        ctx.save_for_backward(x, w, rstd)
        return x * rstd * w

    @staticmethod
    def backward(ctx, g):
        x, w, rstd = ctx.saved_tensors
        r = x * rstd
        gw = g * w
        dx = rstd * (gw - r * (r * gw).mean(-1, keepdim=True))
        return dx, (g * r).reshape(-1, x.shape[-1]).sum(0)


class _FunctionNormModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(1 + 0.1 * torch.randn(32))
        self.lin = nn.Linear(32, 16)

    def forward(self, x):
        return self.lin(_NormFn.apply(x, self.w))


def test_autograd_function_norm_is_reported_in_training():
    model = _FunctionNormModel()
    x = torch.randn(4, 32)
    sites = bitfx.BitfxConfig(linears="sites")
    report = bitfx.explain(model, x, config=sites)  # grad mode on, parameters require grad: a training trace
    assert report.training and report.converted == []
    reason = {r.module: r.reason for r in report.rejected}["lin"]
    assert "torch.autograd.Function" in reason and "training" in reason
    converted, dense, _ = _backend_decisions(model, x, training=True, options={"linears": "sites"})
    assert converted == [] and dense["lin"] == reason
    # Traced for inference, Dynamo inlines the Function and the norm fuses.
    with torch.no_grad():
        assert bitfx.explain(model, x, config=sites).converted == ["lin"]
    assert _backend_decisions(model, x, options={"linears": "sites"})[0] == ["lin"]
    # linears="all" (the default): in training the linear converts all the same, as a site
    # without a norm (the Function's output is quantized per token); for inference the norm fuses.
    report = bitfx.explain(model, x)
    assert report.training and report.converted == ["lin"] and report.rejected == []
    assert [(s.kind, s.linear_modules) for s in report.sites] == [("act", ("lin",))]
    converted, dense, _ = _backend_decisions(model, x, training=True)
    assert converted == ["lin"] and dense == {}
    with torch.no_grad():
        report = bitfx.explain(model, x)
    assert report.converted == ["lin"] and [s.kind for s in report.sites] == ["norm"]
    assert _backend_decisions(model, x)[0] == ["lin"]


class _SharedLinear(nn.Module):
    """One nn.Linear used after a norm and on the raw input."""

    def __init__(self, K=32):
        super().__init__()
        self.norm, self.proj = nn.RMSNorm(K), nn.Linear(K, K)

    def forward(self, x):
        return self.proj(self.norm(x)) + self.proj(x)


def test_a_linear_used_with_and_without_a_norm_stays_dense_everywhere():
    model, x = _SharedLinear(), torch.randn(2, 3, 32)
    sites = bitfx.BitfxConfig(linears="sites")  # only the use after the norm is a candidate
    with torch.no_grad():
        report = bitfx.explain(model, x, config=sites)
        converted, dense, out = _backend_decisions(model, x, options={"linears": "sites"})
        q = bitfx.quantize(copy.deepcopy(model), x, config=sites)
        assert converted == [] and report.converted == [] and q.bitfx_report.converted == []
        reasons = [d.reason for d in report.decisions if d.module == "proj"]
        assert len(reasons) == 2 and any("one weight gets one decision" in r for r in reasons)
        assert "proj" in dense
        torch.testing.assert_close(out, model(x))


def test_a_linear_used_with_and_without_a_norm_converts_everywhere_with_all_linears():
    """linears="all": both uses are candidates (the norm's site and one without a norm), so the
    one decision for the weight is to convert it, at both uses."""
    torch.manual_seed(0)
    model, x = _SharedLinear(), torch.randn(2, 3, 32)
    with torch.no_grad():
        report = bitfx.explain(model, x)
        converted, dense, out = _backend_decisions(model, x)
        q = bitfx.quantize(copy.deepcopy(model), x)
        assert report.converted == ["proj"] and q.bitfx_report.converted == ["proj"]
        assert all(d.converted for d in report.decisions if d.module == "proj")
        assert sorted((s.kind, s.linear_modules) for s in report.sites) == [("act", ("proj",)), ("norm", ("proj",))]
        assert converted == ["proj", "proj"] and dense == {}  # the backend converts both uses
        assert isinstance(q.proj, bitfx.BitfxLinear)
        want = models.reference_quantized(model, ["proj"])(x)  # both uses quantize their input
        assert torch.equal(out, want) and torch.equal(q(x), want)


def _wrapped(forward):
    """A decorator that hides ``self`` in ``*args`` (as transformers' wrappers do)."""

    @functools.wraps(forward)
    def wrapper(*args, **kwargs):
        return forward(*args, **kwargs)

    return wrapper


class _WrappedForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = _Block()

    @_wrapped
    def forward(self, x):
        return self.inner(x)


def test_names_by_identity_under_a_wrapped_forward():
    model, x = _WrappedForward(), torch.randn(2, 3, 32)
    with torch.no_grad():
        report = bitfx.explain(model, x)
        converted, _, _ = _backend_decisions(model, x)
    assert report.converted == ["inner.gate", "inner.up", "inner.down"]
    assert sorted(converted) == sorted(report.converted)
    assert report.sites[0].norm_module == "inner.norm"
    assert (report.sites[1].norm_module, report.sites[1].kind) == (None, "act")  # down: no norm


def test_filter_fn_takes_module_and_fqn_everywhere():
    model, x = _Block(), torch.randn(2, 3, 32)
    calls = []

    def keep_up(module, fqn):
        calls.append((type(module).__name__, fqn))
        return fqn == "up"

    with torch.no_grad():
        report = bitfx.explain(model, x, filter_fn=keep_up)
        q = bitfx.quantize(copy.deepcopy(model), x, filter_fn=keep_up)
        torch._dynamo.reset()
        compiled = torch.compile(copy.deepcopy(model), backend="bitfx", options={"filter_fn": keep_up})
        compiled(x)
    assert report.converted == ["up"] and q.bitfx_report.converted == ["up"]
    assert ("Linear", "gate") in calls and ("Linear", "up") in calls
    for call in (lambda f: bitfx.explain(model, x, filter_fn=f), lambda f: bitfx.quantize(model, x, filter_fn=f),
                 lambda f: torch.compile(model, backend="bitfx", options={"filter_fn": f})(x)):
        torch._dynamo.reset()
        with pytest.raises(Exception, match=r"filter_fn\(module, fqn\)"):
            call(lambda fqn: True)
    torch._dynamo.reset()


def test_example_inputs_as_keywords():
    model, ids = models.tiny_llama()
    by_keyword = bitfx.explain(model, input_ids=ids)
    n = 7 * models.LAYERS  # every linear of each layer; lm_head stays dense
    assert by_keyword.converted == bitfx.explain(model, ids).converted and len(by_keyword.converted) == n
    q = bitfx.quantize(copy.deepcopy(model), input_ids=ids)
    assert len(q.bitfx_report.converted) == n


def test_explain_and_quantize_leave_other_compiled_models_alone():
    torch._dynamo.reset()
    counter = CompileCounter()
    a, x = _Block(), torch.randn(2, 3, 32)
    compiled = torch.compile(a, backend=counter)
    compiled(x)
    assert counter.frame_count == 1
    bitfx.explain(_Block(), x)
    bitfx.quantize(_Block(), x)
    model, ids = models.tiny_llama()
    bitfx.explain(model, ids)
    compiled(x)
    assert counter.frame_count == 1, "explain/quantize threw away another model's compiled code"


def test_quantized_model_compiles_and_backpropagates_in_grad_mode():
    model, ids = models.tiny_llama()
    bitfx.quantize(model, ids)
    with torch.no_grad():
        want = model(ids).logits
    # Eager, grad mode on: the frozen packed layers pass the gradient (straight-through).
    eager = model(ids).logits
    eager.square().mean().backward()
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    torch._dynamo.reset()
    got = torch.compile(model, backend="bitfx")(ids).logits  # used to fail: no autograd formula
    torch._dynamo.reset()
    # The fused norm + quantization rounds like the model's own norm: codes agree except on
    # rounding boundaries, so a tolerance of a few codes' worth.
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    got.square().mean().backward()
    assert not any(b.requires_grad for b in model.buffers())
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, eager_grads[n], rtol=1e-3, atol=1e-5, msg=n)
    assert model.model.layers[0].input_layernorm.weight.grad.abs().sum() > 0


class _TwoNorms(nn.Module):
    def __init__(self, K=32):
        super().__init__()
        self.n1, self.n2 = models.LlamaNorm(K), models.LlamaNorm(K)
        self.a, self.b, self.c, self.d, self.e = (nn.Linear(K, K) for _ in range(5))

    def forward(self, x):
        h = self.n1(x)
        x = self.a(h) + self.b(h)
        h = self.n2(x)
        return self.c(h) + self.d(h) + self.e(x)


def test_integer_example_input_is_an_error_not_a_partial_conversion():
    model = _TwoNorms()
    ints = torch.randint(0, 5, (2, 3, 32))
    # linears="all" (the default) also converts e, which reads no norm; "sites" only a-d.
    for config, want in ((None, ["a", "b", "c", "d", "e"]), (bitfx.BitfxConfig(linears="sites"), ["a", "b", "c", "d"])):
        with torch.no_grad():
            assert bitfx.explain(model, torch.randn(2, 3, 32), config=config).converted == want
            for call in (bitfx.explain, bitfx.quantize):
                # Used to convert c and d only, with a note on n1 in the report.
                with pytest.raises(ValueError, match=r"example input \(int64, shape \(2, 3, 32\)\) reaches the RMSNorm n1"):
                    call(model, ints, config=config)
        assert not any(isinstance(m, bitfx.BitfxLinear) for m in model.modules())


class _ResidualLast(nn.Module):
    """No get_output_embeddings, and the graph's last and widest linear (``b``, wider than its
    input) adds to the residual stream: a projection of the block, not a head."""

    def __init__(self, d: int = 48, h: int = 16):
        super().__init__()
        self.n1, self.n2 = nn.RMSNorm(d), nn.RMSNorm(d)
        self.a, self.c, self.b = nn.Linear(d, h), nn.Linear(d, h), nn.Linear(h, d)

    def forward(self, x):
        u = torch.relu(self.a(self.n1(x))) * self.c(self.n2(x))
        return x + self.b(u)


class _HeadLast(_ResidualLast):
    """The same linears, the last one's output returned alone (softcapped): taken for a head."""

    def forward(self, x):
        u = torch.relu(self.a(self.n1(x))) * self.c(self.n2(x))
        return torch.tanh(self.b(u + 0 * x[..., :16]) / 30.0) * 30.0


def test_head_guess_never_takes_a_residual_projection():
    x = torch.randn(2, 5, 48)
    report = bitfx.explain(_ResidualLast(), x)
    assert sorted(report.converted) == ["a", "b", "c"]
    guessed = bitfx.explain(_HeadLast(), x)
    assert sorted(guessed.converted) == ["a", "c"]  # b feeds the output alone: the guessed head
    reason = next(d.reason for d in guessed.decisions if d.module == "b")
    assert "guessed by shape" in reason
