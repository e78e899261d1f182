"""Activation bits as a parameter: 8 (BitNet b1.58), 6 and 4, in the reference, the kernels
(CPU interpreter here, CUDA on the device), BitfxLinear, bitfx.quantize and the backend's fused
norm, and checkpoints."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import bitfx
from bitfx import reference as ref
from bitfx.kernels import norm_quant as nq
from tests import models
from tests.helpers import KERNEL_DEVICE


def _absmax_codes(x, bits):
    """BitNet b1.58's per-token absmax activation quantizer as integer codes:
    ``round(x / max|x| * Qmax)`` clamped to ``[-Qmax, Qmax]``, ``Qmax = 2^(bits-1) - 1``."""
    qmax = 2 ** (bits - 1) - 1
    scale = x.abs().amax(-1, keepdim=True).clamp(min=1e-5)
    return torch.clamp(torch.round(x * (qmax / scale)), -qmax, qmax)


@pytest.mark.parametrize("bits", [8, 6, 4])
def test_reference_codes(bits):
    torch.manual_seed(bits)
    x = torch.randn(16, 96) * torch.rand(16, 1) * 4
    q, s = ref.act_quant(x, bits)
    qmax = 2 ** (bits - 1) - 1
    assert q.dtype == torch.int8 and int(q.abs().max()) == qmax
    # The same codes as that formula, except where x * s sits on a rounding boundary
    # (qmax / amax and qmax * (1 / amax) can differ in the last bit).
    assert (q.float() != _absmax_codes(x, bits)).float().mean() < 1e-3
    torch.testing.assert_close(s, qmax / x.abs().amax(-1), rtol=2e-7, atol=0)
    with pytest.raises(ValueError, match="activation bits must be one of"):
        ref.act_quant(x, 5)


@pytest.mark.parametrize("bits", [6, 4])
@pytest.mark.parametrize("norm", [False, True])
def test_kernel_codes_equal_the_reference(bits, norm):
    torch.manual_seed(bits + norm)
    x = torch.randn(5, 72, dtype=torch.bfloat16)
    w = (1 + 0.2 * torch.randn(72)).bfloat16()
    qmax = ref.act_qmax(bits)
    if norm:
        q, s, _ = nq.norm_quant(x.to(KERNEL_DEVICE), w.to(KERNEL_DEVICE), 1e-6, False, True, torch.bfloat16, qmax)
        q_ref, s_ref = ref.norm_quant(x, w, 1e-6, cast_before_weight=True, norm_dtype=torch.bfloat16, bits=bits)
        # The norm's reduction order differs: a code may move by one on a rounding boundary.
        assert (q.cpu().int() - q_ref.int()).abs().max() <= 1
        torch.testing.assert_close(s.cpu(), s_ref, rtol=1e-6, atol=0)
    else:
        q, s = nq.act_quant(x.to(KERNEL_DEVICE), qmax)
        q_ref, s_ref = ref.act_quant(x, bits)
        assert torch.equal(q.cpu(), q_ref) and torch.equal(s.cpu(), s_ref)


@pytest.mark.parametrize("bits", [6, 4])
def test_layer_quantize_backend_and_checkpoint(bits, tmp_path):
    model, ids = models.tiny_llama()
    # The error the activation codes add (against the same ternary weights on float
    # activations) grows as the codes narrow.
    lin = nn.Linear(256, 64)
    x = torch.randn(32, 256)
    errs = {}
    for b in (8, 6, 4):
        layer = bitfx.BitfxLinear.from_linear(lin, act_bits=b)
        with torch.no_grad():
            exact = torch.nn.functional.linear(x, layer.dequantize(torch.float32), lin.bias)
            errs[b] = float((layer(x) - exact).norm() / exact.norm())
    assert errs[8] < errs[6] < errs[4], errs
    q = bitfx.quantize(copy.deepcopy(model), ids, config=bitfx.BitfxConfig(act_bits=bits))
    layer = q.model.layers[0].self_attn.q_proj
    assert layer.act_bits == bits
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        want = ref.ternary_matmul(*ref.act_quant(x, bits), layer.packed, layer.w_scale, None, torch.float32)
        assert torch.equal(layer(x), want)
        eager = q(ids).logits
        torch._dynamo.reset()
        compiled = torch.compile(q, backend="bitfx")(ids).logits  # the norms fuse at the layer's width
        torch._dynamo.reset()
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    path = tmp_path / "b.safetensors"
    bitfx.save(q, path)
    skeleton = copy.deepcopy(model)
    bitfx.load(skeleton, path)
    assert skeleton.model.layers[0].self_attn.q_proj.act_bits == bits
    with torch.no_grad():
        assert torch.equal(skeleton(ids).logits, eager)


def test_act_bits_refused_where_they_do_not_apply():
    with pytest.raises(ValueError, match="act_bits must be 8, 6 or 4"):
        bitfx.BitfxConfig(act_bits=3)
    with pytest.raises(ValueError, match="activation bits must be one of"):
        bitfx.BitfxLinear(8, 8, act_bits=2)
    with pytest.raises(Exception, match="act_bits=4 is a conversion option"):
        torch._dynamo.reset()
        torch.compile(nn.Linear(8, 8), backend="bitfx", options={"act_bits": 4})(torch.randn(2, 8))
    torch._dynamo.reset()


@pytest.mark.cuda
@pytest.mark.parametrize("bits", [8, 6, 4])
def test_cuda_codes_and_layer(bits):
    torch.manual_seed(0)
    x = torch.randn(300, 512, dtype=torch.bfloat16)
    q, s = torch.ops.bitfx.act_quant(x.cuda(), bits)
    q_ref, s_ref = ref.act_quant(x, bits)
    assert torch.equal(q.cpu(), q_ref) and torch.equal(s.cpu(), s_ref)
    lin = nn.Linear(512, 128)
    layer = bitfx.BitfxLinear.from_linear(lin, act_bits=bits)
    want = ref.ternary_matmul(q_ref, s_ref, layer.packed, layer.w_scale, layer.bias, torch.bfloat16)
    with torch.no_grad():
        got = layer.cuda()(x.cuda()).cpu()
    torch.testing.assert_close(got.float(), want.float(), rtol=2**-7, atol=1e-3)
