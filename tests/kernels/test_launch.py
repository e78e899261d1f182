"""The cached launcher (bitfx.kernels._launch) and the eager direct path of BitfxLinear.

A cached compiled kernel may be reused only for arguments Triton would have compiled it for:
the key must separate every specialization Triton makes (16-byte alignment of pointers, ints
equal to 1, divisible by 16, beyond int32). The CUDA tests check that a launch through the
cache gives the same bits as the uncached path and that a new specialization compiles anew.
"""

from __future__ import annotations

import pytest
import torch

from bitfx import reference as ref
from bitfx.kernels._launch import _arg_key
from bitfx.modules import BitfxLinear


def test_key_separates_triton_specializations():
    base = torch.zeros(64, dtype=torch.int8)
    assert _arg_key(base) != _arg_key(base[1:])  # 16-byte aligned vs not
    assert _arg_key(base) != _arg_key(base.to(torch.int32))  # dtype
    assert _arg_key(1) != _arg_key(2)  # == 1 is a constant to Triton
    assert _arg_key(16) != _arg_key(17)  # divisibility by 16
    assert _arg_key(2 ** 31) != _arg_key(2 ** 31 - 16)  # int64 vs int32
    assert _arg_key(32) == _arg_key(48) and _arg_key(17) == _arg_key(33)
    assert _arg_key(None) != _arg_key(0.5) and _arg_key(True) != _arg_key(1)


def test_key_refuses_unknown_arguments():
    with pytest.raises(TypeError, match="unsupported kernel argument of type str"):
        _arg_key("x")


def _ops_forward(layer: BitfxLinear, x: torch.Tensor) -> torch.Tensor:
    """The layer's output through torch.ops.bitfx (the dispatcher path)."""
    bits = () if layer.act_bits == 8 else (layer.act_bits,)
    q, s = torch.ops.bitfx.act_quant(x, *bits)
    return torch.ops.bitfx.ternary_matmul(q, s, layer.packed, layer.w_scale, layer.bias, x.dtype, layer.in_features)


@pytest.mark.cuda
@pytest.mark.parametrize("M", [1, 3, 40, 300])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("bias", [False, True])
def test_direct_path_matches_the_ops(M, dtype, bias):
    torch.manual_seed(M)
    linear = torch.nn.Linear(200, 136, bias=bias, device="cuda", dtype=dtype)
    layer = BitfxLinear.from_linear(linear)
    x = torch.randn(M, 200, device="cuda", dtype=dtype)
    with torch.no_grad():
        direct = layer(x)
    torch.testing.assert_close(direct, _ops_forward(layer, x), rtol=0, atol=0)
    # Leading dims and a non-contiguous last dimension take the same path.
    xt = torch.randn(200, 2, M, device="cuda", dtype=dtype).permute(1, 2, 0)
    torch.testing.assert_close(layer(xt), _ops_forward(layer, xt.contiguous()), rtol=0, atol=0)


@pytest.mark.cuda
def test_direct_path_with_four_bit_activations_and_under_fake_mode():
    linear = torch.nn.Linear(96, 64, device="cuda", dtype=torch.bfloat16)
    layer = BitfxLinear.from_linear(linear)
    layer.act_bits = 4
    x = torch.randn(5, 96, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(layer(x), _ops_forward(layer, x), rtol=0, atol=0)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fx = mode.from_tensor(x)
        out = layer(fx)  # a fake input goes through the ops' fake implementations
    assert out.shape == (5, 64) and out.dtype == torch.bfloat16


@pytest.mark.cuda
def test_cached_launch_respecializes_on_alignment():
    from bitfx.kernels import ternary_matmul as tm

    torch.manual_seed(0)
    K, N, M = 256, 96, 64
    w = torch.randn(N, K, device="cuda")
    packed, s_w = torch.ops.bitfx.weight_quant(w, False)
    buf = torch.randint(-128, 128, (M * K + 16,), dtype=torch.int8, device="cuda")
    s_x = torch.rand(M, device="cuda") + 0.5
    expected = {}
    for offset in (0, 1, 0, 1):  # aligned, misaligned, then both again from the cache
        q = buf[offset:offset + M * K].view(M, K)
        out = tm.ternary_matmul(q, s_x, packed, s_w, None, torch.float32, path="tc")
        want = ref.ternary_matmul(q.cpu(), s_x.cpu(), packed.cpu(), s_w.cpu(), None, torch.float32)
        torch.testing.assert_close(out.cpu(), want, rtol=2 ** -21, atol=0)
        if offset in expected:
            assert torch.equal(out, expected[offset])
        expected[offset] = out
    keys = [k for k in tm._MATMUL._kernels if k[0][0][0] == torch.int8]
    assert {k[0][0][1] for k in keys} == {True, False}  # one compiled kernel per alignment
