"""The inference ops (:mod:`bitfx.ops.inference`: ``norm_quant``, ``act_quant``, ``weight_quant``,
``ternary_matmul``, ``dequantize``) against the reference, non-finite input, and (on CUDA) the
kernels through the ops at larger shapes.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from bitfx import reference as ref
from tests.helpers import DEVICES, FLOAT_DTYPES, assert_close_ulps, seeded_randn as _x

ops = torch.ops.bitfx


# ------------------------------------------------------------------ CPU: the ops are the reference


@given(
    M=st.integers(0, 24),
    K=st.integers(1, 70),
    N=st.integers(1, 40),
    dtype=st.sampled_from(FLOAT_DTYPES),
    offset=st.booleans(),
    cbw=st.booleans(),
    has_weight=st.booleans(),
    has_bias=st.booleans(),
    per_channel=st.booleans(),
    seed=st.integers(0, 2**16),
)
@example(M=0, K=8, N=4, dtype=torch.float32, offset=False, cbw=True, has_weight=True, has_bias=True,
         per_channel=False, seed=0)
@example(M=1, K=1, N=1, dtype=torch.bfloat16, offset=True, cbw=False, has_weight=False, has_bias=False,
         per_channel=True, seed=0)
def test_cpu_inference_ops_are_the_reference(M, K, N, dtype, offset, cbw, has_weight, has_bias, per_channel, seed):
    """On the CPU each op is its reference function, bit for bit, every flag passed through."""
    x = _x((2, M, K), dtype, "cpu", seed)
    g = _x((K,), dtype, "cpu", seed + 1) if has_weight else None
    W = _x((N, K), dtype, "cpu", seed + 2)
    b = _x((N,), dtype, "cpu", seed + 3) if has_bias else None
    norm_dtype = ref.norm_dtype_for(dtype, None if g is None else g.dtype, cbw)
    q, s = ops.norm_quant(x, g, 1e-6, offset, cbw, norm_dtype)
    q_ref, s_ref = ref.norm_quant(x, g, 1e-6, offset=offset, cast_before_weight=cbw, norm_dtype=norm_dtype)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
    qa, sa = ops.act_quant(x)
    qa_ref, sa_ref = ref.act_quant(x)
    assert torch.equal(qa, qa_ref) and torch.equal(sa, sa_ref)
    packed, sw = ops.weight_quant(W, per_channel)
    packed_ref, sw_ref = ref.weight_quant(W, per_channel)
    assert torch.equal(packed, packed_ref) and torch.equal(sw, sw_ref)
    out = ops.ternary_matmul(q, s, packed, sw, b, dtype, K)
    want = ref.ternary_matmul(q_ref, s_ref, packed_ref, sw_ref, b, dtype)
    assert out.dtype == want.dtype and torch.equal(out, want)
    dq = ops.dequantize(packed, sw, K, dtype)
    assert torch.equal(dq, (ref.unpack_ternary(packed_ref, K).float() / sw_ref[:, None]).to(dtype))


@pytest.mark.parametrize("device", DEVICES)
@given(
    N=st.integers(0, 40),
    K=st.integers(1, 300),
    dtype=st.sampled_from(FLOAT_DTYPES),
    per_channel=st.booleans(),
    seed=st.integers(0, 2**16),
)
@example(N=0, K=8, dtype=torch.float32, per_channel=False, seed=0)
@example(N=1, K=1, dtype=torch.bfloat16, per_channel=True, seed=0)
@example(N=5, K=257, dtype=torch.float16, per_channel=True, seed=1)  # prime K: padding columns
def test_unvalidated_dequantize_is_the_reference(device, N, K, dtype, per_channel, seed):
    """``dequantize(..., validate_codes=False)`` (the training backward's) gives the reference's
    ``(t / s_w).to(dtype)`` bit for bit, as the validating default does, on every device."""
    packed, sw = ref.weight_quant(_x((N, K), torch.float32, "cpu", seed), per_channel)
    want = (ref.unpack_ternary(packed, K).float() / sw[:, None]).to(dtype)
    for validate in (False, True):
        got = ops.dequantize(packed.to(device), sw.to(device), K, dtype, validate_codes=validate)
        assert got.dtype == dtype and torch.equal(got.cpu(), want)


# ------------------------------------------------------------------ non-finite input


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_rows_give_nan_rows(device, bad):
    x = _x((4, 32), torch.float32, device, 0)
    x[2, 5] = bad
    W = _x((8, 32), torch.float32, device, 1)
    q, s = ops.norm_quant(x, None, 1e-6, False, True, torch.float32)
    assert torch.isnan(s[2]) and torch.isfinite(s[[0, 1, 3]]).all()
    assert (q[2] == 0).all()
    packed, sw = ops.weight_quant(W, False)
    out = ops.ternary_matmul(q, s, packed, sw, None, torch.float32, 32)
    assert torch.isnan(out[2]).all() and torch.isfinite(out[[0, 1, 3]]).all()


@pytest.mark.parametrize("device", DEVICES)
def test_nonfinite_weight_poisons_its_scale_group(device):
    W = _x((6, 32), torch.float32, device, 0)
    W[1, 3] = float("inf")
    _, sw_ch = ops.weight_quant(W, True)
    assert torch.isnan(sw_ch[1]) and torch.isfinite(sw_ch[[0, 2, 3, 4, 5]]).all()
    _, sw_t = ops.weight_quant(W, False)
    assert torch.isnan(sw_t).all()


# ------------------------------------------------------------------ CUDA: kernels through the ops, larger shapes


@pytest.mark.cuda
@given(
    M=st.sampled_from([1, 2, 3, 7, 16, 33, 64, 129, 300]),
    K=st.sampled_from([64, 127, 256, 1000, 2048, 4099]),
    N=st.sampled_from([1, 17, 64, 255, 1024]),
    dtype=st.sampled_from(FLOAT_DTYPES),
    per_channel=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_cuda_ops_match_reference(M, K, N, dtype, per_channel, seed):
    x = _x((M, K), dtype, "cuda", seed)
    g = _x((K,), dtype, "cuda", seed + 1)
    W = _x((N, K), dtype, "cuda", seed + 2)
    b = _x((N,), dtype, "cuda", seed + 3)
    q, s = ops.norm_quant(x, g, 1e-6, False, True, dtype)
    q_ref, s_ref = ref.norm_quant(x.cpu(), g.cpu(), 1e-6)
    torch.testing.assert_close(s.cpu(), s_ref, rtol=1e-5, atol=0)
    # Codes: equal except where the reduction-order difference moves a value across a rounding boundary.
    assert (q.cpu().int() - q_ref.int()).abs().max() <= 1
    assert (q.cpu() != q_ref).float().mean() < 1e-3
    # Given the same codes and scales, the matmul agrees with the reference.
    packed, sw = ops.weight_quant(W, per_channel)
    sw_ref = ref.weight_scale(W.cpu(), per_channel)
    torch.testing.assert_close(sw.cpu(), sw_ref, rtol=1e-5, atol=0)
    out = ops.ternary_matmul(q, s, packed, sw, b, dtype, K)
    want = ref.ternary_matmul(q.cpu(), s.cpu(), packed.cpu(), sw.cpu(), b.cpu(), dtype)
    assert_close_ulps(out, want, ulps=2, atol=1e-5)
