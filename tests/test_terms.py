"""k-term ternary conversion, a greedy decomposition: W ~= sum_i t_i / s_i, each term fitted to
the residual the earlier ones leave, with per-output-channel absmean scales, served by one matmul
over the stacked terms."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import bitfx
from bitfx import reference as ref
from tests import models
from tests.helpers import HAS_CUDA


def _reference_out(x, lin, terms):
    """sum_i (q @ t_i^T) / s_x / s_i + b in fp32 from the reference's pieces, cast to x.dtype."""
    t, s = ref.ternary_terms(lin.weight.detach(), terms)
    q, s_x = ref.act_quant(x)
    out = sum(ref.ternary_matmul(q, s_x, ref.pack_ternary(t[i]), s[i], None, torch.float32) for i in range(terms))
    if lin.bias is not None:
        out = out + lin.bias.detach().float()
    return out.to(x.dtype)


def test_reconstruction_error_strictly_falls_with_terms():
    torch.manual_seed(0)
    for shape in ((64, 128), (8, 7), (33, 256)):
        w = torch.randn(shape) * torch.rand(shape[0], 1)  # rows of different scales
        errs = []
        for k in range(1, 6):
            t, s = ref.ternary_terms(w, k)
            assert t.dtype == torch.int8 and t.shape == (k, *shape) and set(t.unique().tolist()) <= {-1, 0, 1}
            # The first term is per-channel BitNet itself.
            assert torch.equal(t[0], ref.ternarize(w, ref.weight_scale(w, True)))
            errs.append(float(((t.float() / s.unsqueeze(-1)).sum(0) - w).norm() / w.norm()))
        assert all(a > b for a, b in zip(errs, errs[1:])), errs


@pytest.mark.parametrize("terms", [1, 2, 3])
@pytest.mark.parametrize("bias", [False, True])
def test_layer_is_the_reference(terms, bias):
    torch.manual_seed(terms)
    lin = nn.Linear(64, 24, bias=bias)
    layer = bitfx.BitfxLinear.from_linear(lin, terms=terms)
    assert layer.packed.shape == (terms * 24, 16) and layer.w_scale.shape == (terms * 24,)
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        got = layer(x)
    want = _reference_out(x, lin, terms) if terms > 1 else ref.ternary_matmul(
        *ref.act_quant(x), *ref.weight_quant(lin.weight.detach()), lin.bias, torch.float32)
    assert torch.equal(got, want)
    # The dense weight it stands for.
    t, s = ref.ternary_terms(lin.weight.detach(), terms)
    if terms > 1:
        torch.testing.assert_close(layer.dequantize(torch.float32), (t.float() / s.unsqueeze(-1)).sum(0))


def test_output_error_falls_with_terms_on_a_model():
    model, ids = models.tiny_llama()
    with torch.no_grad():
        dense = model(ids).logits
    errs = []
    for k in (1, 2, 3):
        q = bitfx.quantize(copy.deepcopy(model), ids, config=bitfx.BitfxConfig(terms=k))
        assert all(m.terms == k for m in q.modules() if isinstance(m, bitfx.BitfxLinear))
        with torch.no_grad():
            errs.append(float((q(ids).logits - dense).norm() / dense.norm()))
    assert errs[0] > errs[1] > errs[2], errs


def test_terms_compile_fuse_and_save(tmp_path):
    model, ids = models.tiny_llama()
    q = bitfx.quantize(copy.deepcopy(model), ids, config=bitfx.BitfxConfig(terms=2))
    with torch.no_grad():
        eager = q(ids).logits
        torch._dynamo.reset()
        compiled = torch.compile(q, backend="bitfx")(ids).logits
        torch._dynamo.reset()
    # The backend fuses each norm into the activation quantization of the two-term layers.
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    path = tmp_path / "k2.safetensors"
    bitfx.save(q, path)
    skeleton = copy.deepcopy(model)
    bitfx.load(skeleton, path)
    assert skeleton.model.layers[0].self_attn.q_proj.terms == 2
    with torch.no_grad():
        assert torch.equal(skeleton(ids).logits, eager)


def test_terms_are_refused_where_they_do_not_apply():
    with pytest.raises(ValueError, match="terms must be a positive int"):
        bitfx.BitfxConfig(terms=0)
    with pytest.raises(Exception, match=r"terms=2 is a conversion done once"):
        torch._dynamo.reset()
        torch.compile(nn.Linear(8, 8), backend="bitfx", options={"terms": 2})(torch.randn(2, 8))
    torch._dynamo.reset()


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("terms", [2, 3])
def test_terms_on_cuda(terms):
    torch.manual_seed(0)
    lin = nn.Linear(256, 96, bias=True)
    layer = bitfx.BitfxLinear.from_linear(lin, terms=terms).cuda()
    for M in (1, 16, 300):
        x = torch.randn(M, 256).bfloat16()
        with torch.no_grad():
            got = layer(x.cuda()).cpu()
        want = _reference_out(x, lin, terms)
        # The Triton epilogue rounds acc / s_x / s_w in its own order: a few ulps of fp32 before
        # the terms are summed, then one bf16 rounding.
        torch.testing.assert_close(got.float(), want.float(), rtol=2**-7, atol=1e-3)
