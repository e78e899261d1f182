"""The ``bitfx`` backend end to end: Dynamo -> bitfx passes -> Inductor (C++ on CPU).

Each test compiles with Inductor, so they are few and the models tiny. The graphs the passes
produced are inspected through a wrapper backend that records them (the pass rewrites the
graph in place before Inductor sees it)."""

from __future__ import annotations

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


@pytest.fixture(autouse=True)
def _reset_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def recording_backend():
    """``(backend, graphs)``: bitfx_backend, plus the list of graphs it compiled (after the
    passes). Attempts Dynamo restarts (e.g. to specialize a float) are not counted."""
    graphs = []

    def backend(gm, example_inputs, **kwargs):
        compiled = bitfx_backend(gm, example_inputs, **kwargs)
        graphs.append(gm)
        return compiled

    return backend, graphs


def op_counts(gm) -> Counter:
    c = Counter()
    for n in gm.graph.nodes:
        name = getattr(getattr(n.target, "overloadpacket", n.target), "_qualified_op_name", "")
        if name.startswith("bitfx::"):
            c[name.split("::")[1]] += 1
        elif n.target is F.linear:
            c["linear"] += 1
    return c


def test_registered_by_entry_point():
    from torch._dynamo.backends.registry import lookup_backend

    assert "bitfx" in torch._dynamo.list_backends()
    assert lookup_backend("bitfx") is bitfx_backend


TRANSFORMERS = {
    # builder, {op: count} in the graph Inductor compiles (per 2 layers; lm_head stays dense)
    "llama": (models.tiny_llama, Counter(norm_quant=4, weight_quant=10, ternary_matmul=10, linear=5)),
    "gemma": (models.tiny_gemma, Counter(norm_quant=4, weight_quant=10, ternary_matmul=10, linear=5)),
    "qwen3": (models.tiny_qwen3, Counter(norm_quant=4, weight_quant=10, ternary_matmul=10, linear=5)),
    "olmo2": (models.tiny_olmo2, Counter(linear=15)),
    "bitnet": (models.tiny_bitnet, Counter(norm_quant=8, weight_quant=14, ternary_matmul=14, linear=1)),
}


@pytest.mark.parametrize("name", list(TRANSFORMERS))
def test_transformers_inference_fullgraph(name):
    builder, ops = TRANSFORMERS[name]
    model, ids = builder()
    backend, graphs = recording_backend()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    with torch.no_grad():
        got = compiled(ids).logits
        dense = ("lm_head",) if name == "bitnet" else ("lm_head", "o_proj", "down_proj")
        converted = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not n.endswith(dense)]
        if name == "olmo2":
            converted = []
        want = models.reference_quantized(model, converted)(ids).logits
    assert len(graphs) == 1
    assert op_counts(graphs[0]) == ops
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
    model, ids = models.tiny_torch_llama(styles=("llama", "module"))
    for options in (
        {"filter_fn": lambda module, fqn: "proj" in fqn and "gate" not in fqn and "up" not in fqn},
        {"config": BitfxConfig(per_channel=True),
         "filter_fn": lambda module, fqn: isinstance(module, nn.Linear) and fqn.endswith(("q_proj", "k_proj", "v_proj"))},
    ):
        torch._dynamo.reset()
        backend, graphs = recording_backend()
        with torch.no_grad():
            torch.compile(model, backend=backend, options=options)(ids)
        assert op_counts(graphs[0]) == Counter(norm_quant=1, weight_quant=3, ternary_matmul=3, linear=5)


def test_unknown_option_is_an_error():
    with pytest.raises(Exception, match="no_such_option"):
        with torch.no_grad():
            torch.compile(lambda x: x * 2, backend="bitfx", options={"no_such_option": 1})(torch.ones(2))


def assert_close_up_to_code_flips(got, want, max_fraction=0.01):
    """Compiled vs eager: Inductor (and bitfx's fused norm) round the float code around the
    sites differently, so an int8 code may move by one where a value lies on a rounding
    boundary. All but ``max_fraction`` of the outputs agree to fp32 rounding; all to a few
    codes' worth of the output scale."""
    scale = want.abs().max().item()
    off = ~torch.isclose(got, want, rtol=1e-5, atol=1e-5 * scale)
    assert off.float().mean().item() <= max_fraction, f"{off.sum().item()} of {off.numel()} outputs differ"
    torch.testing.assert_close(got, want, rtol=0, atol=0.03 * scale)


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
    assert op_counts(graphs[0]) == Counter(norm_quant=4, weight_quant=4, ternary_matmul=4)


def test_dynamic_true_llama_style():
    """``dynamic=True`` on a Llama-style model: one compile for lengths 2..512; length 1 is
    Dynamo's 0/1 specialization (a second graph, still rewritten). An unbacked length does
    not get through SDPA/bmm in Dynamo and Inductor's CPU lowering, with or without bitfx."""
    model, _ = models.tiny_torch_llama(styles=("llama", "module"))
    oracle = models.reference_quantized(model, [f"layers.0.{p}" for p in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")])
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
        assert op_counts(gm) == Counter(norm_quant=2, weight_quant=5, ternary_matmul=5, linear=2 + 1)


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
    assert op_counts(graphs[0]) == Counter(norm_quant=4, weight_quant=4, ternary_matmul=4)
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
            for p in (layer.attn_norm.weight, layer.mlp_norm.weight, layer.q_proj.weight, layer.up_proj.weight):
                assert p.grad is not None and p.grad.abs().sum() > 0
        opt.step()
        losses.append(loss.item())
    assert len(graphs) == 1
    assert op_counts(graphs[0]) == Counter(bitlinear_group=3, linear=2 + 1)  # q/k, v (bias), gate/up
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
