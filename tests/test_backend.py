"""The ``bitfx`` backend end to end: Dynamo -> bitfx passes -> Inductor (C++ on CPU).

Each test compiles with Inductor, so they are few and the models tiny. The graphs the passes
produced are inspected through a wrapper backend that records them (the pass rewrites the
graph in place before Inductor sees it)."""

from __future__ import annotations

import functools
import logging
from collections import Counter

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import bitfx.backend
from bitfx import reference as ref
from bitfx.backend import BitfxConfig, bitfx_backend
from tests import models
from tests.helpers import assert_close_up_to_code_flips


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def recording_backend():
    """``(backend, graphs)``: bitfx_backend, plus the list of graphs it compiled (after the
    passes, the weight operands taken out by prepack). Attempts Dynamo restarts (e.g. to
    specialize a float) are not counted."""
    graphs = []

    def backend(gm, example_inputs, **kwargs):
        compiled = bitfx_backend(gm, example_inputs, **kwargs)
        graphs.append(getattr(compiled, "bitfx_graph", gm))
        return compiled

    return backend, graphs


def _op_name(n) -> str:
    """The name of the ``bitfx::`` op a node calls (``""`` for anything else)."""
    name = getattr(getattr(n.target, "overloadpacket", n.target), "_qualified_op_name", "")
    return name.split("::")[1] if name.startswith("bitfx::") else ""


def op_counts(gm) -> Counter:
    c = Counter()
    for n in gm.graph.nodes:
        if name := _op_name(n):
            # an op's form launched by Inductor (bitfx.ops.inductor) counts as the op
            c[name.removesuffix("_triton")] += 1
        elif n.target is F.linear:
            c["linear"] += 1
    return c


def test_registered_by_entry_point():
    from torch._dynamo.backends.registry import lookup_backend

    assert "bitfx" in torch._dynamo.list_backends()
    assert lookup_backend("bitfx") is bitfx_backend


L = models.LAYERS
TRANSFORMERS = {
    # builder, {op: count} in the graph Inductor compiles (linears="all", the default: the 7
    # linears of each layer convert, lm_head stays dense). Per layer: Llama-likes fuse
    # input_layernorm -> q/k/v and post_attention_layernorm -> gate/up (norm_quant), o_proj and
    # down_proj quantize their input alone (act_quant); q/k/v share one matmul, gate/up one: 4
    # matmuls. OLMo2 (post-norm) has no RMSNorm before a linear: 4 act_quant (q/k/v's input,
    # o's, gate/up's, down's), 4 matmuls. BitNet has a sub-norm before o_proj and down_proj: 4
    # norm_quant. No weight_quant: the backend packs the weights once, at compile time.
    "llama": (models.tiny_llama, Counter(norm_quant=2 * L, act_quant=2 * L, ternary_matmul=4 * L, linear=1)),
    "gemma": (models.tiny_gemma, Counter(norm_quant=2 * L, act_quant=2 * L, ternary_matmul=4 * L, linear=1)),
    # Gemma 3: the norms after attention and the MLP feed the residual adds, not linears.
    "gemma3": (models.tiny_gemma3, Counter(norm_quant=2 * L, act_quant=2 * L, ternary_matmul=4 * L, linear=1)),
    # Qwen3 with seed 1: with seed 0, layer 1's o_proj input holds an exact rounding tie
    # (x * s_x = -32.5 in eager) that Inductor's attention, 1 ulp off, rounds the other way: one
    # code flip that moves a whole token's logits (6% of the outputs).
    "qwen3": (functools.partial(models.tiny_qwen3, seed=1), Counter(norm_quant=2 * L, act_quant=2 * L, ternary_matmul=4 * L, linear=1)),
    "olmo2": (models.tiny_olmo2, Counter(act_quant=4 * L, ternary_matmul=4 * L, linear=1)),
    "bitnet": (models.tiny_bitnet, Counter(norm_quant=4 * L, ternary_matmul=4 * L, linear=1)),
}


def converted_linears(model: nn.Module) -> list[str]:
    """What the backend converts by default: every ``nn.Linear`` but the output head."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]


def assert_prepacked(gm) -> None:
    """Every ternary matmul of an inference graph reads weights packed at compile time: its
    packed weight and scale operands are graph inputs (packed by the prepack guard, or a
    ``bitfx.quantize``d layer's own buffers), never computed in the graph."""
    import bitfx.ops.inductor  # noqa: F401  (the forms launched by Inductor: registered)

    ops = torch.ops.bitfx
    # where each op takes its packed weight and scale: the matmuls, and the whole linears of CUDA graphs
    operands = {ops.ternary_matmul: slice(2, 4), ops.ternary_matmul_triton: slice(2, 4),
                ops.ternary_linear: slice(8, 10), ops.ternary_linear_triton: slice(8, 10)}
    mms = [n for n in gm.graph.nodes if n.op == "call_function" and getattr(n.target, "overloadpacket", None)
           in operands]
    assert mms, "no ternary matmul in the graph"
    for n in mms:
        for a in n.args[operands[n.target.overloadpacket]]:
            assert a.op == "placeholder", n.format_node()  # nothing computes it in the graph


@pytest.mark.parametrize("name", list(TRANSFORMERS))
def test_transformers_inference_fullgraph(name):
    builder, ops = TRANSFORMERS[name]
    model, ids = builder()
    backend, graphs = recording_backend()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    with torch.no_grad():
        got = compiled(ids).logits
        converted = converted_linears(model)
        assert len(converted) == 7 * L
        want = models.reference_quantized(model, converted)(ids).logits
    assert len(graphs) == 1
    assert op_counts(graphs[0]) == ops
    assert_prepacked(graphs[0])
    assert_close_up_to_code_flips(got, want)


def test_string_backend_with_options():
    torch.manual_seed(0)
    norm, a, b = nn.RMSNorm(48), nn.Linear(48, 24), nn.Linear(48, 40, bias=False)

    def fn(x):
        y = norm(x)
        return a(y), b(y)

    x = torch.randn(3, 5, 48)
    compiled = torch.compile(
        fn, backend="bitfx", fullgraph=True,
        options={"filter_fn": lambda module, fqn: fqn != "b", "per_channel": True, "epilogue_fusion": False},
    )
    with torch.no_grad():
        got_a, got_b = compiled(x)
        y = norm(x)
        q, s = ref.act_quant(y)
        packed, s_w = ref.weight_quant(a.weight, per_channel=True)
        want_a = ref.ternary_matmul(q, s, packed, s_w, a.bias, torch.float32)
        torch.testing.assert_close(got_a, want_a, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got_b, b(y), rtol=1e-6, atol=1e-6)  # filtered out: dense


def test_options_filter_and_config_object():
    model, ids = models.tiny_torch_llama(styles=("llama", "module"))  # one layer
    not_mlp_in = lambda module, fqn: "proj" in fqn and "gate" not in fqn and "up" not in fqn  # noqa: E731
    qkv = lambda module, fqn: isinstance(module, nn.Linear) and fqn.endswith(("q_proj", "k_proj", "v_proj"))  # noqa: E731
    # The attention norm's site: q/k share a matmul, v (bias) has its own.
    attn_only = Counter(norm_quant=1, ternary_matmul=2, linear=5)
    for options, want in (
        # all linears: q/k/v at the norm, o_proj and down_proj without one; gate/up filtered out
        ({"filter_fn": not_mlp_in}, Counter(norm_quant=1, act_quant=2, ternary_matmul=4, linear=3)),
        ({"config": BitfxConfig(per_channel=True), "filter_fn": qkv}, attn_only),
        # linears="sites", as an option and in the config object: o_proj and down_proj stay dense
        ({"linears": "sites", "filter_fn": not_mlp_in}, attn_only),
        ({"config": BitfxConfig(linears="sites"), "filter_fn": not_mlp_in}, attn_only),
    ):
        torch._dynamo.reset()
        backend, graphs = recording_backend()
        with torch.no_grad():
            torch.compile(model, backend=backend, options=options)(ids)
        assert op_counts(graphs[0]) == want, options
        assert_prepacked(graphs[0])


def test_unknown_option_is_an_error():
    with pytest.raises(Exception, match="no_such_option"):
        with torch.no_grad():
            torch.compile(lambda x: x * 2, backend="bitfx", options={"no_such_option": 1})(torch.ones(2))


def test_one_compile_for_sequence_lengths_1_to_512():
    """An unbacked sequence length: one compile serves every length, 1 included, with no
    graph break (fullgraph). Eager BitNet blocks over [batch, seq, features]."""
    model, _ = models.bitlinear_model()
    backend, graphs = recording_backend()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    with torch.no_grad():
        for T in (7, 1, 2, 64, 512):
            x = torch.randn(2, T, models.HIDDEN)
            torch._dynamo.decorators.mark_unbacked(x, 1)
            assert_close_up_to_code_flips(compiled(x), model(x))
    assert len(graphs) == 1
    assert op_counts(graphs[0]) == Counter(norm_quant=4, ternary_matmul=4)  # weights packed at compile time
    assert_prepacked(graphs[0])


def test_dynamic_true_llama_style():
    """``dynamic=True`` on a Llama-style model: one compile for lengths 2..512; length 1 is
    Dynamo's 0/1 specialization (a second graph, still rewritten). An unbacked length does
    not get through SDPA/bmm in Dynamo and Inductor's CPU lowering, with or without bitfx."""
    model, _ = models.tiny_torch_llama(styles=("llama", "module"))
    oracle = models.reference_quantized(model, converted_linears(model))
    backend, graphs = recording_backend()
    compiled = torch.compile(model, backend=backend, fullgraph=True, dynamic=True)
    with torch.no_grad():
        for T in (7, 2, 64, 512):
            ids = torch.randint(0, models.VOCAB, (2, T))
            assert_close_up_to_code_flips(compiled(ids), oracle(ids))
        assert len(graphs) == 1
        ids = torch.randint(0, models.VOCAB, (2, 1))
        assert_close_up_to_code_flips(compiled(ids), oracle(ids))
    assert len(graphs) == 2
    for gm in graphs:
        # Two norm sites (q/k, v with its bias, gate/up: 3 matmuls), o_proj and down_proj
        # without a norm (2 act_quant, 2 matmuls); weights packed at compile time; lm_head dense.
        assert op_counts(gm) == Counter(norm_quant=2, act_quant=2, ternary_matmul=5, linear=1)
        assert_prepacked(gm)


def test_transformers_llama_dynamic():
    """A transformers model with ``dynamic=True``: one compile for lengths 2..512 (its own
    attention code specializes length 1: ``is_causal = q_len > 1``; not a bitfx graph break)."""
    model, _ = models.tiny_llama()
    backend, graphs = recording_backend()
    compiled = torch.compile(model, backend=backend, fullgraph=True, dynamic=True)
    with torch.no_grad():
        for T in (5, 2, 33, 512):
            compiled(torch.randint(0, models.VOCAB, (1, T)))
    assert len(graphs) == 1
    assert op_counts(graphs[0])["norm_quant"] == 2 * models.LAYERS


def test_eager_bitlinear_compiled_equals_eager():
    model, x = models.bitlinear_model(bias=True)
    backend, graphs = recording_backend()
    with torch.no_grad():
        got = torch.compile(model, backend=backend, fullgraph=True)(x)
        want = model(x)
    assert op_counts(graphs[0]) == Counter(norm_quant=4, ternary_matmul=4)  # weights packed at compile time
    assert_prepacked(graphs[0])
    assert_close_up_to_code_flips(got, want)


def check_training_loss_falls(device: str = "cpu", steps: int = 200):
    """A small Llama-style model compiled with the backend trains (AOTAutograd runs the
    bitlinear op's straight-through backward); gradients reach norm and linear weights."""
    torch.manual_seed(0)
    model = models.TinyLlama(styles=("llama", "gemma"), vocab=48, dim=32, hidden=64, heads=2).to(device).train()
    backend, graphs = recording_backend()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 48, (4, 16), generator=g).to(device)
    inputs, targets = ids[:, :-1], ids[:, 1:]
    losses = []
    for step in range(steps):
        loss = F.cross_entropy(compiled(inputs).flatten(0, 1), targets.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if step == 0:
            layer = model.layers[0]
            for p in (layer.attn_norm.weight, layer.mlp_norm.weight, layer.q_proj.weight, layer.up_proj.weight,
                      layer.o_proj.weight, layer.down_proj.weight):
                assert p.grad is not None and p.grad.abs().sum() > 0
        opt.step()
        losses.append(loss.item())
    assert len(graphs) == 1
    # q/k, v (bias), gate/up at the norms; o_proj and down_proj without a norm (normalize=False)
    # the five sites' weights, parameters, packed by one op for the graph
    assert op_counts(graphs[0]) == Counter(bitlinear_stacked=5, weight_quant_stacks=1, linear=1)
    # the op, or its form launched by Inductor (the same arguments; op_counts counts them as one)
    assert sum(n.args[10] is False for n in graphs[0].graph.nodes
               if _op_name(n) in ("bitlinear_stacked", "bitlinear_stacked_triton")) == 2
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])


def test_training_loss_falls():
    check_training_loss_falls("cpu")


def test_logging(caplog):
    caplog.set_level(logging.INFO, logger="bitfx")
    torch.manual_seed(0)
    norm, lin = nn.RMSNorm(16), nn.Linear(16, 8)
    with torch.no_grad():
        torch.compile(lambda x: lin(norm(x)), backend="bitfx")(torch.randn(2, 16))
    text = caplog.text
    assert "fused" in text and "rewrote 1 site(s), 1 linear(s) (inference)" in text


def test_bitfx_log_env(monkeypatch):
    log = logging.getLogger("bitfx")
    old_level, old_handlers = log.level, list(log.handlers)
    try:
        monkeypatch.setenv("BITFX_LOG", "debug")
        log.handlers.clear()
        bitfx.backend._setup_logging()
        assert log.level == logging.DEBUG and len(log.handlers) == 1
    finally:
        log.handlers[:] = old_handlers
        log.setLevel(old_level)


def test_training_false_on_a_graph_traced_for_gradients_is_refused():
    """The inference ops pass no gradient: training=False for a call in grad mode with parameters
    requiring grad would leave every weight without one after backward(). Refused, naming it."""
    torch.manual_seed(0)
    norm, lin = nn.RMSNorm(32), nn.Linear(32, 16)

    def fn(x):
        return lin(norm(x))

    compiled = torch.compile(fn, backend="bitfx", options={"training": False})
    with pytest.raises(Exception, match="training=False"):
        compiled(torch.randn(3, 32)).sum().backward()
    with torch.no_grad():  # inference, as the option says: fine
        assert compiled(torch.randn(3, 32)).shape == (3, 16)
