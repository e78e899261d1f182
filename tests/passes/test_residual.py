"""The residual add before a pre-norm site fused into its front (bitfx.passes.residual), and the
op ``add_norm_quant`` itself: its reference is the add then ``norm_quant``, so a rewritten graph
computes the same numbers exactly on the CPU; its kernel (the interpreter here, the GPU where
there is one) gives torch's sum bit for bit and ``norm_quant``'s codes of it."""

from __future__ import annotations

import operator

import pytest
import torch

import bitfx.ops  # noqa: F401
from bitfx.kernels import norm_quant as nq
from bitfx.passes.residual import fuse_residual_adds
from tests import models
from tests.helpers import KERNEL_DEVICE
from tests.test_backend import op_counts

_ops = torch.ops.bitfx

pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def test_the_adds_of_a_llama_join_their_norms():
    """The test Llama (each norm in another style): every norm that reads a residual add
    directly takes it in (the first reads the embedding; two read a reshape of the sum and keep
    their add); the graph's output is the same, exactly, and the new calls carry values for
    Inductor."""
    gm, run, before = models.rewritten_graph(*models.tiny_torch_llama())
    norms = op_counts(gm)["norm_quant"]
    on_adds = sum(1 for n in gm.graph.nodes if n.target is _ops.norm_quant.default
                  and n.args[0].op == "call_function" and n.args[0].target is operator.add)
    assert on_adds >= 4
    assert fuse_residual_adds(gm) == on_adds
    assert op_counts(gm)["add_norm_quant"] == on_adds and op_counts(gm)["norm_quant"] == norms - on_adds
    for n in gm.graph.nodes:
        if n.target is _ops.add_norm_quant.default:
            assert "val" in n.meta or "example_value" in n.meta
    with torch.no_grad():
        assert torch.equal(run(), before)


@pytest.mark.parametrize("builder", ["tiny_llama", "tiny_gemma", "tiny_qwen3", "tiny_bitnet"])
def test_transformers_models_keep_their_outputs(builder):
    pytest.importorskip("transformers")
    gm, logits, before = models.rewritten_logits_graph(builder)
    assert fuse_residual_adds(gm) > 0
    with torch.no_grad():
        assert torch.equal(logits(), before)


def _graph(kind: str):
    """a, b -> a + b -> norm_quant -> (q, s), and the sum returned too (the residual stream)."""
    g = torch.fx.Graph()
    a, b, w = (g.placeholder(n) for n in ("a", "b", "w"))
    if kind == "late_weight":  # the norm weight computed after the add: left alone
        s = g.call_function(operator.add, (a, b))
        w = g.call_function(operator.add, (w, 1.0))
    elif kind == "alpha":
        s = g.call_function(torch.add, (a, b), {"alpha": 2})
    elif kind == "inplace":
        s = g.call_method("add_", (a, b))
    else:
        s = g.call_function(operator.add, (a, b))
    x = g.call_method("view", (s, -1, 16)) if kind == "view" else s
    n = g.call_function(_ops.norm_quant.default, (x, w, 1e-6, False, True, torch.float32))
    q, sx = g.call_function(operator.getitem, (n, 0)), g.call_function(operator.getitem, (n, 1))
    g.output((q, sx, s))
    return torch.fx.GraphModule(torch.nn.Module(), g)


def _values(gm, shapes):
    """Fake values on every node (what the pass reads), from the real inputs' shapes."""
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    FakeTensorProp(gm).propagate(*[torch.empty(s, dtype=d) for s, d in shapes])


@pytest.mark.parametrize("kind", ["plain", "late_weight", "alpha", "inplace", "view", "broadcast", "promote",
                                  "long_rows"])
def test_which_adds_are_fused(kind):
    """Only an out-of-place add of two tensors of the norm input's shape and dtype, read by the
    norm directly, with the weight there before it and rows the one-pass kernel takes."""
    K = 16 if kind != "long_rows" else 2 * nq._MAX_ROW_BLOCK + 1
    shapes = [((2, 3, K), torch.float32), ((2, 3, K), torch.float32), ((K,), torch.float32)]
    if kind == "broadcast":
        shapes[1] = ((K,), torch.float32)
    if kind == "promote":
        shapes[1] = ((2, 3, K), torch.float16)
    gm = _graph(kind)
    _values(gm, shapes)
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn(s, generator=gen).to(d) for s, d in shapes]
    want = gm(*[t.clone() for t in inputs])
    fused = fuse_residual_adds(gm)
    assert fused == (1 if kind == "plain" else 0)
    got = gm(*[t.clone() for t in inputs])
    assert all(torch.equal(x, y) for x, y in zip(got, want))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("K", [1, 5, 64, 300])
def test_kernel_adds_as_torch_and_quantizes_as_norm_quant(dtype, K):
    """The kernel's h is ``a + b`` bit for bit; its codes, scales and rstd those of ``norm_quant(h)``
    (one kernel, one reduction order); strided rows too."""
    g = torch.Generator().manual_seed(K)
    a = (torch.randn(6, K + 3, generator=g) * 4).to(dtype).to(KERNEL_DEVICE)[:, :K]  # a row stride > K
    b = torch.randn(6, K, generator=g).to(dtype).to(KERNEL_DEVICE)
    w = (1 + 0.1 * torch.randn(K, generator=g)).to(dtype).to(KERNEL_DEVICE)
    for cast_before_weight in (True, False):
        h, q, s, r = nq.add_norm_quant(a, b, w, 1e-6, False, cast_before_weight, dtype)
        assert torch.equal(h, a + b)
        q2, s2, r2 = nq.norm_quant(a + b, w, 1e-6, False, cast_before_weight, dtype)
        assert torch.equal(q, q2) and torch.equal(s, s2) and torch.equal(r, r2)


def test_op_checks_its_addends():
    a = torch.randn(2, 8)
    with pytest.raises(ValueError, match="one shape"):
        _ops.add_norm_quant(a, torch.randn(8), None, 1e-6, False, True, torch.float32)
    with pytest.raises(TypeError, match="one dtype"):
        _ops.add_norm_quant(a, a.half(), None, 1e-6, False, True, torch.float32)


def test_op_reference_is_the_add_then_norm_quant():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(3, 4, 32, generator=g).bfloat16(), torch.randn(3, 4, 32, generator=g).bfloat16()
    w = torch.randn(32, generator=g).bfloat16()
    h, q, s = _ops.add_norm_quant(a, b, w, 1e-5, True, True, torch.bfloat16)
    q2, s2 = _ops.norm_quant(a + b, w, 1e-5, True, True, torch.bfloat16)
    assert torch.equal(h, a + b) and torch.equal(q, q2) and torch.equal(s, s2)


@pytest.mark.parametrize("switch", ["BITFX_FUSE_RESIDUAL", "BITFX_FUSE_GLU", "BITFX_FUSE_ATTENTION"])
def test_when_the_backend_fuses_the_adds(switch, monkeypatch):
    """Residual adds, gated activations and decode attention: CUDA inference graphs under CUDA
    graphs with the custom ops; not in default mode, not where Inductor launches the kernels, not
    on the CPU, not in training, not with the switch at 0 (which leaves the other fusions as they
    are); the attention only with its switch at 1 (opt-in), the others also with theirs unset."""
    from bitfx import BitfxConfig
    from bitfx.backend import _fuses_prologues
    from tests.ops.test_inductor_forms import _fake_cuda

    def fuses(config, inputs, patches, which=switch):
        return _fuses_prologues(config, inputs, patches, which)

    cuda, cpu, graphs = [_fake_cuda()], [torch.ones(2)], {"triton.cudagraphs": True}
    inference = BitfxConfig(training=False)
    for name in ("BITFX_FUSE_RESIDUAL", "BITFX_FUSE_GLU", "BITFX_FUSE_ATTENTION"):
        monkeypatch.delenv(name, raising=False)
    assert fuses(inference, cuda, graphs) == (switch != "BITFX_FUSE_ATTENTION")
    monkeypatch.setenv(switch, "1")
    assert fuses(inference, cuda, graphs)
    assert fuses(BitfxConfig(training=False, launch="op"), cuda, graphs)
    assert not fuses(inference, cuda, {})
    assert not fuses(BitfxConfig(training=False, launch="op"), cuda, {})
    assert not fuses(BitfxConfig(training=False, launch="inductor"), cuda, graphs)
    assert not fuses(inference, cpu, graphs)
    assert not fuses(BitfxConfig(training=True), cuda, graphs)
    monkeypatch.setenv(switch, "0")
    assert not fuses(inference, cuda, graphs)
    for other in ("BITFX_FUSE_RESIDUAL", "BITFX_FUSE_GLU"):
        if other != switch:
            assert fuses(inference, cuda, graphs, other)
    monkeypatch.setenv(switch, "2")
    with pytest.raises(ValueError, match=switch):
        fuses(inference, cuda, graphs)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_backend_fuses_the_adds_on_cuda(mode, dtype, monkeypatch):
    """On CUDA the backend fuses the adds under CUDA graphs with the custom ops, not in default
    mode; the logits match those of the same compile with ``BITFX_FUSE_RESIDUAL=0`` up to code
    flips (the fused sum is torch's, rounded as the unfused add's kernel stores it)."""
    from tests.helpers import assert_close_up_to_code_flips
    from tests.test_backend import recording_backend

    model, ids = models.tiny_llama(dtype=dtype)
    model, ids = model.cuda(), ids.cuda()
    outs = {}
    for fuse in ("1", "0"):
        monkeypatch.setenv("BITFX_FUSE_RESIDUAL", fuse)
        torch._dynamo.reset()
        backend, graphs = recording_backend()
        compiled = torch.compile(model, backend=backend, fullgraph=True,
                                 options={"triton.cudagraphs": mode == "reduce-overhead"})
        with torch.no_grad():
            for _ in range(3):
                out = compiled(ids).logits.clone()
        outs[fuse] = out.float()
        fused = op_counts(graphs[0])["add_norm_quant"]
        assert (fused > 0) == (fuse == "1" and mode == "reduce-overhead")
    assert_close_up_to_code_flips(outs["1"], outs["0"], flipped_rows=1)
