"""A gated MLP's activation fused into its down projection's front (bitfx.passes.glu), and the op
``glu_quant`` itself: its reference is the activation as eager torch computes it, then
``norm_quant`` or ``act_quant``, so a rewritten graph computes the same numbers exactly on the
CPU; its kernel (the interpreter here, the GPU where there is one) makes the product as torch
does and quantizes it as the front it replaces."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F

import bitfx.ops  # noqa: F401
from bitfx import reference as ref
from bitfx.kernels import norm_quant as nq
from bitfx.passes.glu import fuse_glu_fronts
from tests import models
from tests.helpers import HAS_CUDA, KERNEL_DEVICE
from tests.passes.test_residual import _values
from tests.test_backend import op_counts

_ops = torch.ops.bitfx

pytestmark = pytest.mark.usefixtures("fresh_dynamo")


@pytest.mark.parametrize("builder, fused", [("tiny_llama", 2), ("tiny_qwen3", 2), ("tiny_olmo2", 2),
                                            ("tiny_bitnet", 2), ("tiny_gemma", 0)])
def test_gated_mlps_of_transformers_models_join_their_fronts(builder, fused):
    """Each block's SiLU (Llama, Qwen3, OLMo2: the down projection's act_quant) or ReLU² (BitNet:
    its ffn_sub_norm's norm_quant) times ``up`` joins the front; Gemma's GELU keeps its kernel.
    The logits are the same, exactly."""
    pytest.importorskip("transformers")
    gm, logits, before = models.rewritten_logits_graph(builder)
    fronts = op_counts(gm)
    assert fuse_glu_fronts(gm) == fused
    after = op_counts(gm)
    assert after["glu_quant"] == fused
    assert after["norm_quant"] + after["act_quant"] == fronts["norm_quant"] + fronts["act_quant"] - fused
    assert not any(n.target in (F.silu, torch.square, F.relu, torch.relu) for n in gm.graph.nodes if fused)
    with torch.no_grad():
        assert torch.equal(logits(), before)


# (kind, fused): products made in each way a model writes them, and ones the pass must leave
_KINDS = {
    "silu": 1, "silu_up_first": 1, "silu_inplace_false": 1, "relu_square": 1, "relu_pow": 1, "relu_pow_float": 1,
    "relu_mul_self": 1, "relu_methods": 1, "act_quant_front": 1, "aten_silu": 1, "aten_relu_pow": 1,
    "gelu": 0, "silu_inplace": 0, "relu_cube": 0, "sigmoid_times_gate": 0, "broadcast_up": 0, "promote": 0,
    "product_read_twice": 0, "view_between": 0, "long_rows": 0,
}


def _graph(kind: str):
    """gate, up, w -> act(gate) * up -> norm_quant (or act_quant) -> (q, s)."""
    g = torch.fx.Graph()
    gate, up, w = (g.placeholder(n) for n in ("gate", "up", "w"))
    fn, meth = g.call_function, g.call_method
    if kind.startswith("silu") or kind == "act_quant_front":
        a = fn(F.silu, (gate,), {"inplace": kind == "silu_inplace"} if "inplace" in kind else {})
    elif kind == "aten_silu":
        a = fn(torch.ops.aten.silu.default, (gate,))
    elif kind == "aten_relu_pow":
        a = fn(torch.ops.aten.pow.Tensor_Scalar, (fn(torch.ops.aten.relu.default, (gate,)), 2))
    elif kind == "gelu":
        a = fn(F.gelu, (gate,), {"approximate": "tanh"})
    elif kind == "sigmoid_times_gate":
        a = fn(operator.mul, (gate, fn(torch.sigmoid, (gate,))))
    elif kind == "relu_methods":
        a = meth("square", (meth("relu", (gate,)),))
    else:
        r = fn(F.relu, (gate,))
        if kind == "relu_pow":
            a = fn(operator.pow, (r, 2))
        elif kind == "relu_pow_float":
            a = meth("pow", (r, 2.0))
        elif kind == "relu_mul_self":
            a = fn(operator.mul, (r, r))
        elif kind == "relu_cube":
            a = fn(operator.pow, (r, 3))
        else:
            a = fn(torch.square, (r,))
    y = fn(operator.mul, (up, a) if kind == "silu_up_first" else (a, up))
    x = meth("view", (y, -1, 16)) if kind == "view_between" else y
    if kind == "act_quant_front":
        n = fn(_ops.act_quant.default, (x,))
    else:
        n = fn(_ops.norm_quant.default, (x, w, 1e-6, False, True, torch.float32))
    q, sx = fn(operator.getitem, (n, 0)), fn(operator.getitem, (n, 1))
    g.output((q, sx, y) if kind == "product_read_twice" else (q, sx))
    return torch.fx.GraphModule(torch.nn.Module(), g)


@pytest.mark.parametrize("kind", list(_KINDS))
def test_which_products_are_fused(kind):
    """SiLU or ReLU² (in each way a model writes it) times a tensor of the same shape and dtype,
    read by the front alone and directly, with rows the one-pass kernel takes; nothing else.
    The graph computes the same numbers either way."""
    K = 16 if kind != "long_rows" else 2 * nq._MAX_ROW_BLOCK + 1
    gen = torch.Generator().manual_seed(0)
    gate = torch.randn(2, 3, K, generator=gen) * 3
    up = torch.randn(K if kind == "broadcast_up" else (2, 3, K), generator=gen)
    if kind == "promote":
        up = up.half()
    inputs = [gate, up, torch.randn(K, generator=gen)]
    gm = _graph(kind)
    _values(gm, [(t.shape, t.dtype) for t in inputs])
    want = gm(*[t.clone() for t in inputs])
    assert fuse_glu_fronts(gm) == _KINDS[kind]
    got = gm(*[t.clone() for t in inputs])
    assert all(torch.equal(x, y) for x, y in zip(got, want))
    if _KINDS[kind]:
        targets = [n.target for n in gm.graph.nodes if n.op != "placeholder" and n.op != "output"]
        assert _ops.glu_quant.default in targets
        assert not any(t in (operator.mul, operator.pow, F.silu, F.relu, torch.square, "square", "relu", "pow")
                       for t in targets)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("act", ["silu", "relu2"])
@pytest.mark.parametrize("K", [1, 5, 64, 300])
def test_kernel_makes_the_product_as_torch_and_quantizes_as_the_front(dtype, act, K):
    """The kernel's codes, scales and rstd are those of ``norm_quant`` (or ``act_quant``) of torch's
    ``act(gate) * up``, bit for bit; strided rows (gate and up as the halves of one stacked output).

    SiLU is not exact in Triton's interpreter: its ``exp`` there is numpy's (the interpreter has
    no CUDA math library), which differs from torch's in the last bit of some values, and so
    may a product in the dtype: a code may then move by one, a scale and rstd by one step of
    the dtype. On a GPU the kernel uses the CUDA math library's ``exp`` that torch's SiLU
    kernel uses, and every case is exact."""
    g = torch.Generator().manual_seed(K)
    stacked = (torch.randn(6, 2 * K + 3, generator=g) * 3).to(dtype).to(KERNEL_DEVICE)
    gate, up = stacked[:, :K], stacked[:, K + 3:]
    w = (1 + 0.1 * torch.randn(K, generator=g)).to(dtype).to(KERNEL_DEVICE)
    y = ref.glu(act, gate, up)
    exact = KERNEL_DEVICE.type == "cuda" or act == "relu2"
    step = torch.finfo(dtype).eps
    for normalize in (True, False):
        q, s, r = nq.glu_quant(gate, up, act, w if normalize else None, 1e-6, False, True, dtype, normalize)
        q2, s2, r2 = nq._launch_quant(y, w if normalize else None, 1e-6, False, True, dtype, normalize)
        assert (r is None) == (r2 is None) == (not normalize)
        if exact:
            assert torch.equal(q, q2) and torch.equal(s, s2) and (r is None or torch.equal(r, r2))
        else:
            assert (q.int() - q2.int()).abs().max().item() <= 1
            torch.testing.assert_close(s, s2, rtol=step, atol=0)
            if r is not None:
                torch.testing.assert_close(r, r2, rtol=step, atol=0)


def test_kernel_keeps_nan_and_long_rows():
    """ReLU² of NaN is NaN (the row gets scale NaN and zero codes, as norm_quant of torch's
    product); rows longer than the one-pass kernel make the product in torch first."""
    gate, up = torch.randn(3, 32), torch.randn(3, 32)
    gate[1, 5] = float("nan")
    gate, up = gate.to(KERNEL_DEVICE), up.to(KERNEL_DEVICE)
    q, s, _ = nq.glu_quant(gate, up, "relu2", None, 0.0, False, False, torch.float32, False)
    q2, s2, _ = nq._launch_quant(ref.glu("relu2", gate, up), None, 0.0, False, False, torch.float32, False)
    assert torch.equal(q, q2)
    assert s[1].isnan() and s2[1].isnan() and torch.equal(s[[0, 2]], s2[[0, 2]])
    K = nq._MAX_ROW_BLOCK + 1
    gate, up = torch.randn(1, K).to(KERNEL_DEVICE), torch.randn(1, K).to(KERNEL_DEVICE)
    q, s, r = nq.glu_quant(gate, up, "silu", None, 1e-6, False, True, torch.float32, True)
    q2, s2, r2 = nq._launch_quant(ref.glu("silu", gate, up), None, 1e-6, False, True, torch.float32, True)
    assert torch.equal(q, q2) and torch.equal(s, s2) and torch.equal(r, r2)


def test_op_checks_its_arguments():
    a = torch.randn(2, 8)
    with pytest.raises(ValueError, match="one shape"):
        _ops.glu_quant(a, torch.randn(8), "silu", None, 1e-6, False, True, torch.float32, True)
    with pytest.raises(TypeError, match="one dtype"):
        _ops.glu_quant(a, a.half(), "silu", None, 1e-6, False, True, torch.float32, True)
    with pytest.raises(ValueError, match="act must be one of"):
        _ops.glu_quant(a, a, "gelu", None, 1e-6, False, True, torch.float32, True)
    with pytest.raises(ValueError, match="normalize=False"):
        _ops.glu_quant(a, a, "silu", torch.ones(8), 1e-6, False, True, torch.float32, False)
    with pytest.raises(ValueError, match="act must be one of"):
        nq.glu_quant(a, a, "swish", None, 1e-6, False, True, torch.float32, True)
    assert set(nq.GATES) == set(ref.GLU_ACTS)


@pytest.mark.parametrize("act", ["silu", "relu2"])
def test_op_reference_is_the_activation_then_the_front(act):
    g = torch.Generator().manual_seed(1)
    gate, up = torch.randn(3, 4, 32, generator=g).bfloat16(), torch.randn(3, 4, 32, generator=g).bfloat16()
    w = torch.randn(32, generator=g).bfloat16()
    y = F.silu(gate) * up if act == "silu" else torch.relu(gate).square() * up
    q, s = _ops.glu_quant(gate, up, act, w, 1e-5, True, True, torch.bfloat16, True)
    q2, s2 = _ops.norm_quant(y, w, 1e-5, True, True, torch.bfloat16)
    assert torch.equal(q, q2) and torch.equal(s, s2)
    q, s = _ops.glu_quant(gate, up, act, None, 0.0, False, False, torch.float32, False, 6)
    q2, s2 = _ops.act_quant(y, 6)
    assert torch.equal(q, q2) and torch.equal(s, s2)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("builder", ["tiny_llama", "tiny_bitnet"])
def test_backend_fuses_the_activations_on_cuda(builder, monkeypatch):
    """Under CUDA graphs with the custom ops the backend fuses each MLP's activation; the bf16
    logits match those of the same compile with ``BITFX_FUSE_GLU=0`` up to code flips: the fused
    kernel rounds the activation, then the product, to bf16 as eager torch does, where
    Inductor's kernel rounds once."""
    from tests.helpers import assert_close_up_to_code_flips
    from tests.test_backend import recording_backend

    pytest.importorskip("transformers")
    model, ids = getattr(models, builder)(dtype=torch.bfloat16)
    model, ids = model.cuda().eval(), ids.cuda()
    outs = {}
    for fuse in ("1", "0"):
        monkeypatch.setenv("BITFX_FUSE_GLU", fuse)
        torch._dynamo.reset()
        backend, graphs = recording_backend()
        compiled = torch.compile(model, backend=backend, fullgraph=True, options={"triton.cudagraphs": True})
        with torch.no_grad():
            for _ in range(3):
                out = compiled(ids).logits.clone()
        outs[fuse] = out.float()
        assert (op_counts(graphs[0])["glu_quant"] == 2) == (fuse == "1")
    assert_close_up_to_code_flips(outs["1"], outs["0"], rtol=2**-7, flipped_rows=2)
