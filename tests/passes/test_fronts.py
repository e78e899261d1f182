"""Each site's front and matmul as one ``ternary_linear`` call (bitfx.passes.fronts), and the op
itself on the CPU (its reference is the front then the matmul, so the rewritten graph computes
the same numbers exactly)."""

from __future__ import annotations

import operator
from collections import Counter

import pytest
import torch

import bitfx.ops  # noqa: F401
from bitfx import reference as ref
from bitfx.passes.fronts import fuse_fronts
from tests import models

_ops = torch.ops.bitfx


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def _counts(gm) -> Counter:
    c = Counter()
    for n in gm.graph.nodes:
        name = getattr(getattr(n.target, "overloadpacket", n.target), "_qualified_op_name", "")
        if name.startswith("bitfx::"):
            c[name.split("::")[1]] += 1
    return c


def test_every_matmul_of_a_llama_becomes_one_op():
    gm, run, before = models.rewritten_graph(*models.tiny_torch_llama())
    matmuls = _counts(gm)["ternary_matmul"]
    assert fuse_fronts(gm) == matmuls
    counts = _counts(gm)
    assert counts["ternary_linear"] == matmuls
    assert counts["norm_quant"] == counts["act_quant"] == counts["ternary_matmul"] == 0
    for n in gm.graph.nodes:  # the new calls carry the values Inductor reads
        if n.target is _ops.ternary_linear.default:
            assert isinstance(n.meta.get("val"), torch.Tensor) or "example_value" in n.meta
    with torch.no_grad():
        assert torch.equal(run(), before)


@pytest.mark.parametrize("builder", ["tiny_llama", "tiny_gemma", "tiny_qwen3", "tiny_olmo2", "tiny_bitnet",
                                     "tiny_deepseek_v3", "tiny_mamba2"])
def test_transformers_models_keep_their_outputs(builder):
    """Every matmul of each model family's rewritten graph becomes one op, nothing else changes:
    the graph's outputs stay the same, exactly (the op's reference is the two ops)."""
    pytest.importorskip("transformers")
    gm, logits, before = models.rewritten_logits_graph(builder)
    matmuls = _counts(gm)["ternary_matmul"]
    assert matmuls > 0 and fuse_fronts(gm) == matmuls
    assert _counts(gm)["ternary_linear"] == matmuls and _counts(gm)["ternary_matmul"] == 0
    with torch.no_grad():
        assert torch.equal(logits(), before)


def _front_graph(extra_use: str):
    """x -> norm_quant -> two matmuls, and (extra_use) the codes or scales read by something else."""
    g = torch.fx.Graph()
    x, w, p1, s1, p2, s2 = (g.placeholder(n) for n in ("x", "w", "p1", "s1", "p2", "s2"))
    nq = g.call_function(_ops.norm_quant.default, (x, w, 1e-6, False, True, torch.float32))
    q, s = g.call_function(operator.getitem, (nq, 0)), g.call_function(operator.getitem, (nq, 1))
    o1 = g.call_function(_ops.ternary_matmul.default, (q, s, p1, s1, None, torch.float32, 16))
    o2 = g.call_function(_ops.ternary_matmul.default, (q, s, p2, s2, None, torch.float32, 16))
    outs = [o1, o2]
    if extra_use == "codes":
        outs.append(g.call_function(torch.ops.aten.sum.default, (q,)))
    elif extra_use == "scales":
        outs.append(s)
    g.output(tuple(outs))
    return torch.fx.GraphModule(torch.nn.Module(), g)


def _inputs():
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 16, generator=gen), torch.rand(16, generator=gen) + 0.5
    p1, s1 = ref.weight_quant(torch.randn(8, 16, generator=gen), False)
    p2, s2 = ref.weight_quant(torch.randn(5, 16, generator=gen), True)
    return x, w, p1, s1, p2, s2


def test_two_matmuls_of_one_front():
    gm = _front_graph("none")
    args = _inputs()
    want = gm(*args)
    assert fuse_fronts(gm) == 2
    assert _counts(gm) == Counter(ternary_linear=2)
    got = gm(*args)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("extra_use", ["codes", "scales"])
def test_a_front_read_by_anything_else_is_kept(extra_use):
    gm = _front_graph(extra_use)
    assert fuse_fronts(gm) == 0
    assert _counts(gm)["norm_quant"] == 1 and _counts(gm)["ternary_matmul"] == 2


def test_op_reference_is_the_front_then_the_matmul():
    x, w, p1, s1, _, _ = _inputs()
    x = x.to(torch.bfloat16).reshape(1, 3, 16)
    got = _ops.ternary_linear(x, w.to(torch.bfloat16), 1e-6, True, True, torch.bfloat16, True, 8, p1, s1, None,
                              torch.bfloat16, 16)
    q, sx = _ops.norm_quant(x, w.to(torch.bfloat16), 1e-6, True, True, torch.bfloat16)
    assert got.shape == (1, 3, 8) and torch.equal(got, _ops.ternary_matmul(q, sx, p1, s1, None, torch.bfloat16, 16))
    got = _ops.ternary_linear(x, None, 0.0, False, False, torch.float32, False, 4, p1, s1, None, torch.float32, 16)
    q, sx = _ops.act_quant(x, 4)
    assert torch.equal(got, _ops.ternary_matmul(q, sx, p1, s1, None, torch.float32, 16))


def test_op_refuses_bad_arguments_by_name():
    x, w, p1, s1, _, _ = _inputs()
    with pytest.raises(ValueError, match="in_features"):
        _ops.ternary_linear(x, w, 1e-6, False, True, torch.float32, True, 8, p1, s1, None, torch.float32, 20)
    with pytest.raises(ValueError, match="normalize=False"):
        _ops.ternary_linear(x, w, 1e-6, False, True, torch.float32, False, 8, p1, s1, None, torch.float32, 16)
    with pytest.raises(TypeError, match="uint8"):
        _ops.ternary_linear(x, w, 1e-6, False, True, torch.float32, True, 8, p1.to(torch.int8), s1, None,
                            torch.float32, 16)


def test_opcheck():
    x, w, p1, s1, _, _ = _inputs()
    torch.library.opcheck(_ops.ternary_linear.default,
                          (x, w, 1e-6, False, True, torch.float32, True, 8, p1, s1, None, torch.float32, 16))


@pytest.mark.cuda
@pytest.mark.parametrize("fused_on", [True, False])
def test_cuda_op_takes_one_kernel_for_one_row_and_two_for_many(fused_on, monkeypatch):
    """On CUDA: one row, the fused kernel (when BITFX_FRONT_GEMV=1); several rows, or without it,
    norm_quant and the GEMV; for these integer activations exactly the ops run one after the other."""
    from torch.profiler import ProfilerActivity, profile

    monkeypatch.setenv("BITFX_FRONT_GEMV", "1" if fused_on else "0")

    gen = torch.Generator().manual_seed(1)
    K, N = 2560, 6912
    p, s = ref.weight_quant(torch.randn(N, K, generator=gen), False)
    w = (torch.rand(K, generator=gen) + 0.5).to(torch.bfloat16).cuda()
    p, s = p.cuda(), s.cuda()
    for M in (1, 3, 64):
        x = torch.randint(-9, 10, (M, K), generator=gen).to(torch.bfloat16).cuda()
        args = (1e-6, False, True, torch.bfloat16, True, 8, p, s, None, torch.bfloat16, K)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            got = _ops.ternary_linear(x, w, *args)
            torch.cuda.synchronize()
        names = [e.name for e in prof.events() if "kernel" in e.name]
        q, sx = _ops.norm_quant(x, w, 1e-6, False, True, torch.bfloat16)
        assert torch.equal(got, _ops.ternary_matmul(q, sx, p, s, None, torch.bfloat16, K))
        fused = any("_front_gemv_kernel" in n for n in names)
        assert fused == (fused_on and M == 1), names
