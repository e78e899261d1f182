"""BitfxLinear: its numbers are the reference's, its state_dict round-trips and refuses what
does not fit."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bitfx import reference as ref
from bitfx.kernels.layout import FORMAT, packed_k
from bitfx.modules import BitfxLinear


def _linear(K, N, bias, dtype, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(K, N, bias=bias)
    return lin.to(dtype)


def _expected(x, lin, per_channel):
    q, s_x = ref.act_quant(x)
    packed, s_w = ref.weight_quant(lin.weight.detach(), per_channel)
    b = None if lin.bias is None else lin.bias.detach()
    return ref.ternary_matmul(q, s_x, packed, s_w, b, x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("K, N", [(64, 48), (37, 5), (1, 3)])
def test_forward_is_the_reference(dtype, per_channel, bias, K, N):
    lin = _linear(K, N, bias, dtype)
    m = BitfxLinear.from_linear(lin, per_channel=per_channel)
    x = torch.randn(2, 3, K, dtype=dtype)
    out = m(x)
    assert out.dtype == dtype and out.shape == (2, 3, N)
    assert torch.equal(out, _expected(x, lin, per_channel))
    assert m.packed.dtype == torch.uint8 and m.packed.shape == (N, packed_k(K))
    assert m.w_scale.dtype == torch.float32 and m.w_scale.shape == (N,)
    if bias:
        assert m.bias.dtype == dtype and torch.equal(m.bias, lin.bias.detach())
    else:
        assert m.bias is None
    assert not list(m.parameters())


def test_forward_approximates_the_float_layer():
    lin = _linear(256, 64, True, torch.float32)
    m = BitfxLinear.from_linear(lin)
    x = torch.randn(8, 256)
    # The dequantized weight times the fake-quantized input, in fp32: agrees to rounding.
    q, s_x = ref.act_quant(x)
    dense = nn.functional.linear(q.float() / s_x.unsqueeze(-1), m.dequantize(torch.float32), lin.bias)
    torch.testing.assert_close(m(x), dense, rtol=1e-5, atol=1e-5)


def test_from_ternary():
    t = torch.tensor([[1, 0, -1, 1, 0], [0, 0, 0, -1, 1]], dtype=torch.int8)
    m = BitfxLinear.from_ternary(t, torch.tensor([2.0, 4.0]), bias=torch.tensor([0.5, -0.5]))
    assert torch.equal(ref.unpack_ternary(m.packed, 5), t)
    assert torch.equal(m.dequantize(torch.float32), t.float() / torch.tensor([[2.0], [4.0]]))
    x = torch.randn(3, 5)
    q, s_x = ref.act_quant(x)
    assert torch.equal(m(x), ref.ternary_matmul(q, s_x, m.packed, m.w_scale, m.bias, x.dtype))


def test_wrong_input_features():
    m = BitfxLinear.from_linear(_linear(64, 8, False, torch.float32))
    with pytest.raises(ValueError, match="60 features.*expected 64"):
        m(torch.randn(2, 60))


def test_to_dtype_keeps_fp32_scales():
    lin = _linear(32, 16, True, torch.float32)
    m = BitfxLinear.from_linear(lin)
    scale = m.w_scale.clone()
    m.to(torch.bfloat16)
    assert m.w_scale.dtype == torch.float32 and torch.equal(m.w_scale, scale)
    assert m.bias.dtype == torch.bfloat16 and m.packed.dtype == torch.uint8
    assert m.ternary_format.dtype == torch.int64
    assert m(torch.randn(4, 32, dtype=torch.bfloat16)).dtype == torch.bfloat16
    m.half()
    assert m.w_scale.dtype == torch.float32 and m.bias.dtype == torch.float16


def test_state_dict_round_trip(tmp_path):
    m = BitfxLinear.from_linear(_linear(40, 24, True, torch.bfloat16), per_channel=True)
    torch.save(m.state_dict(), tmp_path / "layer.pt")
    fresh = BitfxLinear(40, 24, bias=True, dtype=torch.bfloat16)
    fresh.load_state_dict(torch.load(tmp_path / "layer.pt", weights_only=True))
    x = torch.randn(5, 40, dtype=torch.bfloat16)
    assert torch.equal(fresh(x), m(x))
    assert set(m.state_dict()) == {"packed", "w_scale", "bias", "ternary_format"}


def _sd(K=64, N=8):
    return BitfxLinear.from_linear(_linear(K, N, True, torch.float32)).state_dict()


def _load(sd, K=64, N=8, strict=True):
    BitfxLinear(K, N).load_state_dict(sd, strict=strict)


def test_load_wrong_packed_dtype():
    sd = _sd()
    sd["packed"] = sd["packed"].to(torch.int8)
    with pytest.raises(RuntimeError, match="packed: must be uint8.*got int8"):
        _load(sd)


def test_load_wrong_packed_shape():
    sd = _sd(K=64)
    sd["packed"] = torch.zeros(8, 32, dtype=torch.uint8)  # 128 columns' worth
    with pytest.raises(RuntimeError, match="packed: .*32 bytes per row, but K=64 needs 16"):
        _load(sd, strict=False)
    sd = _sd(K=64, N=8)
    with pytest.raises(RuntimeError, match="packed: .*8 rows, expected N=6"):
        _load(sd, N=6, strict=False)


def test_load_other_in_features_same_packed_width():
    # K=60 and K=64 pack to the same 16 bytes per row: only the tag tells them apart.
    sd = _sd(K=60)
    with pytest.raises(RuntimeError, match="packed for in_features=60, this layer has 64"):
        _load(sd, K=64)


def test_load_wrong_format_tag():
    sd = _sd()
    sd["ternary_format"] = torch.tensor([12345, 64])
    with pytest.raises(RuntimeError, match=f"another format than {FORMAT}"):
        _load(sd)
    del sd["ternary_format"]
    with pytest.raises(RuntimeError, match="ternary_format: missing; not a bitfx checkpoint"):
        _load(sd)


def test_load_wrong_scale():
    sd = _sd()
    sd["w_scale"] = sd["w_scale"].to(torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"w_scale: expected float32 of shape \(8,\), got bfloat16"):
        _load(sd)


def test_load_float_checkpoint():
    sd = _linear(64, 8, True, torch.float32).state_dict()
    with pytest.raises(RuntimeError, match="holds a float weight.*bitfx.quantize"):
        _load(sd)


def test_compiles_with_the_ops():
    m = BitfxLinear.from_linear(_linear(64, 32, True, torch.float32))
    x = torch.randn(3, 7, 64)
    torch._dynamo.reset()
    try:
        out = torch.compile(m, backend="aot_eager", fullgraph=True)(x)
    finally:
        torch._dynamo.reset()
    assert torch.equal(out, m(x))
