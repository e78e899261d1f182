"""The torch.library ops: opcheck, agreement with the reference, STE gradients, bad input.

On CPU the ops run the reference; on CUDA they run the Triton kernels, so the same tests
check the kernels through the ops on the GPU.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from torch.library import opcheck

import bitfx
from bitfx import reference as ref
from bitfx.layout import packed_k
from tests.helpers import FLOAT_DTYPES, HAS_CUDA, assert_close_ulps

ops = torch.ops.bitfx
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])


def _x(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype).to(device)


# ------------------------------------------------------------------ opcheck, every op, every device


def _op_cases(device, M=5, K=40, N=24, dtype=torch.bfloat16):
    x = _x((2, M, K), dtype, device, 1)
    g = _x((K,), dtype, device, 2)
    W = _x((N, K), dtype, device, 3)
    b = _x((N,), dtype, device, 4)
    q, s = ops.norm_quant(x, g, 1e-6, False, True, dtype)
    packed, sw = ops.weight_quant(W, False)
    rstd = torch.rsqrt(x.float().pow(2).mean(-1) + 1e-6)
    return {
        "norm_quant": (ops.norm_quant.default, (x, g, 1e-6, False, True, dtype)),
        "norm_quant_gemma": (ops.norm_quant.default, (x, g, 1e-6, True, False, dtype)),
        "norm_quant_noweight": (ops.norm_quant.default, (x, None, 1e-5, False, True, torch.float32)),
        "act_quant": (ops.act_quant.default, (x,)),
        "weight_quant": (ops.weight_quant.default, (W, False)),
        "weight_quant_per_channel": (ops.weight_quant.default, (W, True)),
        "ternary_matmul": (ops.ternary_matmul.default, (q, s, packed, sw, b, dtype, K)),
        "ternary_matmul_nobias": (ops.ternary_matmul.default, (q, s, packed, sw, None, torch.float32, K)),
        "dequantize": (ops.dequantize.default, (packed, sw, K, dtype)),
        "act_dequant": (ops.act_dequant.default, (q, s, dtype)),
        "rms_norm_backward": (ops.rms_norm_backward.default, (x, x, g, rstd, False, True)),
        "rms_norm_backward_gemma": (ops.rms_norm_backward.default, (x, x, g, rstd, True, False)),
        "ternary_linear_group": (
            ops.ternary_linear_group.default,
            (*(t.detach().clone().requires_grad_() for t in (x, g)), [packed, packed[:7]], [sw, sw[:7]],
             [b.detach().clone().requires_grad_(), b[:7].detach().clone().requires_grad_()],
             K, 1e-6, False, True, dtype, True, dtype),
        ),
        "ternary_linear_group_gemma_nobias": (
            ops.ternary_linear_group.default,
            (x.detach().float().requires_grad_(), g.detach().float().requires_grad_(), [packed], [sw], [], K, 1e-5,
             True, False, torch.float32, True, torch.bfloat16),
        ),
        "ternary_linear_group_nonorm": (
            ops.ternary_linear_group.default,
            (x.detach().clone().requires_grad_(), None, [packed, packed[:5]], [sw, sw[:5]],
             [b.detach().float(), b[:5].detach().float().requires_grad_()], K, 0.0, False, False, dtype, False,
             torch.float32),
        ),
        "bitlinear": (
            ops.bitlinear.default,
            (*(t.detach().clone().requires_grad_() for t in (x, g, W, b)), 1e-6, False, True, dtype, False),
        ),
        "bitlinear_group": (
            ops.bitlinear_group.default,
            (*(t.detach().clone().requires_grad_() for t in (x, g)),
             [W.detach().clone().requires_grad_(), W[:7].detach().clone().requires_grad_()],
             [b.detach().clone().requires_grad_(), b[:7].detach().clone().requires_grad_()],
             1e-6, False, True, dtype, [False, True]),
        ),
        "bitlinear_group_nobias": (
            ops.bitlinear_group.default,
            (x.detach().float().requires_grad_(), None, [W.detach().float().requires_grad_()], [], 1e-5, True, False,
             torch.float32, [False]),
        ),
        "weight_quant_stacked": (ops.weight_quant_stacked.default, ([W, W[:7]], [False, True])),
        "bitlinear_stacked": (
            ops.bitlinear_stacked.default,
            (*(t.detach().clone().requires_grad_() for t in (x, g)),
             [W.detach().clone().requires_grad_(), W[:7].detach().clone().requires_grad_()],
             *ops.weight_quant_stacked([W, W[:7]], [False, True]),
             torch.cat([b, b[:7]]).detach().requires_grad_(), 1e-6, False, True, dtype, True, False),
        ),
        "bitlinear_stacked_nonorm_nobias": (
            ops.bitlinear_stacked.default,
            (x.detach().float().requires_grad_(), None, [W.detach().float().requires_grad_()],
             *ops.weight_quant_stacked([W], [True]), None, 0.0, False, False, torch.float32, False, False),
        ),
        "bitlinear_noweight_nobias": (
            ops.bitlinear.default,
            (x.detach().float().requires_grad_(), None, W.detach().float().requires_grad_(), None, 1e-5, False, True, torch.float32, True),
        ),
    }


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(_op_cases("cpu").keys()))
def test_opcheck(case, device):
    op, args = _op_cases(device)[case]
    # All of opcheck's default tests: schema, autograd registration, fake tensor, aot dispatch (dynamic).
    opcheck(op, args)


# ------------------------------------------------------------------ ops agree with the reference


@given(
    M=st.integers(0, 24),
    K=st.integers(1, 70),
    N=st.integers(1, 40),
    dtype=st.sampled_from(FLOAT_DTYPES),
    offset=st.booleans(),
    cbw=st.booleans(),
    has_bias=st.booleans(),
    per_channel=st.booleans(),
    seed=st.integers(0, 2**16),
)
@example(M=0, K=8, N=4, dtype=torch.float32, offset=False, cbw=True, has_bias=True, per_channel=False, seed=0)
@example(M=1, K=1, N=1, dtype=torch.bfloat16, offset=True, cbw=False, has_bias=False, per_channel=True, seed=0)
def test_bitlinear_forward_matches_reference(M, K, N, dtype, offset, cbw, has_bias, per_channel, seed):
    x = _x((M, K), dtype, "cpu", seed)
    g = _x((K,), dtype, "cpu", seed + 1)
    W = _x((N, K), dtype, "cpu", seed + 2)
    b = _x((N,), dtype, "cpu", seed + 3) if has_bias else None
    out = bitfx.bitlinear(x, g, W, b, 1e-6, offset=offset, cast_before_weight=cbw, per_channel=per_channel)
    want = ref.bitlinear(x, g, W, b, 1e-6, offset=offset, cast_before_weight=cbw, per_channel=per_channel)
    assert out.dtype == want.dtype
    # CPU: the op is the reference, bit for bit.
    assert torch.equal(out, want)


@given(
    M=st.integers(0, 20),
    K=st.integers(1, 70),
    Ns=st.lists(st.integers(1, 24), min_size=1, max_size=3),
    dtype=st.sampled_from(FLOAT_DTYPES),
    offset=st.booleans(),
    has_bias=st.booleans(),
    per_channel=st.lists(st.booleans(), min_size=3, max_size=3),
    seed=st.integers(0, 2**16),
)
@example(M=1, K=1, Ns=[1, 2], dtype=torch.bfloat16, offset=True, has_bias=True, per_channel=[True, False, False], seed=0)
def test_bitlinear_group_is_bitlinear_per_weight(M, K, Ns, dtype, offset, has_bias, per_channel, seed):
    """One norm, several weights: each output is the single-weight op's, bit for bit, and the
    gradients are those of the single-weight ops summed (the norm's input gradient adds up)."""
    pcs = per_channel[: len(Ns)]
    leaves = [_x((2, M, K), dtype, "cpu", seed), _x((K,), dtype, "cpu", seed + 1)]
    Ws = [_x((N, K), dtype, "cpu", seed + 2 + i) for i, N in enumerate(Ns)]
    bs = [_x((N,), dtype, "cpu", seed + 9 + i) for i, N in enumerate(Ns)] if has_bias else []
    grads, grouped_outs = [], None  # the grouped op's outputs (first pass), for the single ops to match
    for grouped in (True, False):
        x, g, *params = (t.detach().clone().requires_grad_() for t in leaves + Ws + bs)
        W, b = params[: len(Ns)], params[len(Ns):]
        if grouped:
            outs = ops.bitlinear_group(x, g, W, b, 1e-6, offset, True, dtype, pcs)[0]
        else:
            outs = [ops.bitlinear(x, g, W[i], b[i] if b else None, 1e-6, offset, True, dtype, pcs[i])[0]
                    for i in range(len(Ns))]
            for o, o_group in zip(outs, grouped_outs):
                assert torch.equal(o, o_group)
        grouped_outs = outs
        loss = sum((o.float() * torch.linspace(-1, 1, o.numel()).reshape(o.shape)).sum() for o in outs)
        loss.backward()
        grads.append([t.grad for t in (x, g, *params)])
    for got, want in zip(*grads):
        assert got.shape == want.shape and got.dtype == want.dtype
        if want.numel() == 0:
            continue
        # The group sums the linears' contributions to the norm's gradient in fp32, the single
        # ops in autograd's accumulation: equal up to rounding of the gradient's dtype.
        scale = want.float().abs().max().clamp(min=1e-6)
        assert ((got.float() - want.float()).abs().max() / scale) <= (1e-5 if dtype == torch.float32 else 2e-2)


def test_bitlinear_group_bad_input():
    x, W = torch.randn(3, 8), torch.randn(4, 8)
    with pytest.raises(ValueError, match="one bias per weight or none at all"):
        ops.bitlinear_group(x, None, [W, W], [torch.randn(4)], 1e-6, False, True, torch.float32, [False, False])
    with pytest.raises(ValueError, match="needs at least one linear weight"):
        ops.bitlinear_group(x, None, [], [], 1e-6, False, True, torch.float32, [])
    with pytest.raises(ValueError, match="linear weight has K=9"):
        ops.bitlinear_group(x, None, [W, torch.randn(4, 9)], [], 1e-6, False, True, torch.float32, [False, False])


# ------------------------------------------------------------------ the stacked training form (what the backend emits)


def _with_nonfinite(W: torch.Tensor, seed: int) -> torch.Tensor:
    """``W`` with a NaN or an Inf in one row on some seeds: its scale group must get NaN."""
    if seed % 3 == 1 and W.numel():
        W = W.clone()
        W[seed % W.shape[0], seed % W.shape[1]] = float("nan") if seed % 2 else float("inf")
    return W


@given(
    K=st.integers(1, 70),
    Ns=st.lists(st.integers(1, 24), min_size=1, max_size=3),
    dtype=st.sampled_from(FLOAT_DTYPES),
    per_channel=st.lists(st.booleans(), min_size=3, max_size=3),
    seed=st.integers(0, 2**16),
)
@example(K=1, Ns=[1], dtype=torch.float32, per_channel=[False] * 3, seed=1)
def test_weight_quant_stacked_is_weight_quant_per_weight(K, Ns, dtype, per_channel, seed):
    """Eager: each block of the stack is the reference's ``weight_quant`` of that weight: the
    scale up to the order of the fp32 sum of |w| (per row, then per weight: a few ulps; NaN for
    a block holding NaN or Inf), the codes exactly those of the scale; on operands whose sums
    are exact in any order (multiples of 1/4), bit for bit."""
    Ws = [_with_nonfinite(_x((N, K), dtype, "cpu", seed + i), seed + i) for i, N in enumerate(Ns)]
    pcs = per_channel[: len(Ns)]
    packed, scale = ops.weight_quant_stacked(Ws, pcs)
    want_scale = torch.cat([ref.weight_scale(W, pc) for W, pc in zip(Ws, pcs)])
    torch.testing.assert_close(scale, want_scale, rtol=1e-6, atol=0, equal_nan=True)
    codes = [ref.pack_ternary(ref.ternarize(W, s)) for W, s in zip(Ws, scale.split(Ns))]
    assert torch.equal(packed, torch.cat(codes))
    g = torch.Generator().manual_seed(seed)
    exact = [(torch.randint(-8, 9, (N, K), generator=g) / 4).to(dtype) for N in Ns]
    packed, scale = ops.weight_quant_stacked(exact, pcs)
    want = [ref.weight_quant(W, pc) for W, pc in zip(exact, pcs)]
    assert torch.equal(packed, torch.cat([p for p, _ in want]))
    assert torch.equal(scale, torch.cat([s for _, s in want]))


def test_weight_quant_stacked_compiled():
    """Under Inductor (how the backend's training graphs run it): the codes are exactly those of
    the compiled scale (``ternarize`` + ``pack_ternary`` of it), and the scale is the
    reference's up to the order of the fp32 sum; on operands whose sums are exact in any order
    (multiples of 1/4), the whole result is the reference's bit for bit."""
    torch._dynamo.reset()
    fn = torch.compile(lambda ws: ops.weight_quant_stacked(ws, [False, True, False]), backend="inductor")
    g = torch.Generator().manual_seed(0)
    Ws = [torch.randn(48, 200, generator=g).bfloat16(), torch.randn(16, 200, generator=g), torch.randn(8, 200, generator=g)]
    packed, scale = fn(Ws)
    want_scale = torch.cat([ref.weight_scale(W, pc) for W, pc in zip(Ws, [False, True, False])])
    # The fp32 sums of 9600 and 200 positive terms in another order: a few ulps (observed 3).
    torch.testing.assert_close(scale, want_scale, rtol=1e-6, atol=0)
    codes = [ref.pack_ternary(ref.ternarize(W, s)) for W, s in zip(Ws, scale.split([48, 16, 8]))]
    assert torch.equal(packed, torch.cat(codes))
    exact = [(torch.randint(-8, 9, (N, 200), generator=g) / 4).to(dt) for N, dt in
             ((48, torch.bfloat16), (16, torch.float32), (8, torch.float16))]
    packed, scale = fn(exact)
    want = [ref.weight_quant(W, pc) for W, pc in zip(exact, [False, True, False])]
    assert torch.equal(packed, torch.cat([p for p, _ in want]))
    assert torch.equal(scale, torch.cat([s for _, s in want]))
    torch._dynamo.reset()


@pytest.mark.parametrize("device", DEVICES)
@given(
    M=st.integers(0, 20),
    K=st.integers(1, 70),
    Ns=st.lists(st.integers(1, 24), min_size=1, max_size=3),
    dtype=st.sampled_from(FLOAT_DTYPES),
    normalize=st.booleans(),
    has_bias=st.booleans(),
    fp8=st.booleans(),
    seed=st.integers(0, 2**16),
)
@example(M=1, K=1, Ns=[1, 2], dtype=torch.bfloat16, normalize=True, has_bias=True, fp8=False, seed=0)
def test_bitlinear_stacked_is_bitlinear_group(device, M, K, Ns, dtype, normalize, has_bias, fp8, seed):
    """Against ``bitlinear_group`` on the same device (on CUDA: the kernels on both sides):
    ``weight_quant_stacked`` gives the group's scales up to the order of the fp32 sum (a few
    ulps) and exactly the codes of its own scales; given the
    group's packed weights, the stacked op's output is the group's outputs side by side, bit
    for bit, and its gradients are the group's up to the order in which the fp32 matmuls
    accumulate (one matmul over the stack against one per weight)."""
    pcs = [(seed + i) % 2 == 0 for i in range(len(Ns))]
    leaves = [_x((2, M, K), dtype, device, seed)] + ([_x((K,), dtype, device, seed + 1)] if normalize else [])
    Ws = [_x((N, K), dtype, device, seed + 2 + i) for i, N in enumerate(Ns)]
    bs = [_x((N,), dtype, device, seed + 9 + i) for i, N in enumerate(Ns)] if has_bias else []
    results = []
    for stacked in (False, True):
        x, *rest = (t.detach().clone().requires_grad_() for t in leaves + Ws + bs)
        g = rest.pop(0) if normalize else None
        W, b = rest[: len(Ns)], rest[len(Ns):]
        if stacked:
            packed, scale = ops.weight_quant_stacked(W, pcs)
            want_scale = torch.cat(group_scales).detach()
            torch.testing.assert_close(scale, want_scale, rtol=1e-6, atol=0)
            codes = torch.cat([ref.pack_ternary(ref.ternarize(w.detach(), s)) for w, s in zip(W, scale.split(Ns))])
            assert torch.equal(packed, codes)
            out = ops.bitlinear_stacked(x, g, W, torch.cat(group_packs), want_scale, torch.cat(b) if b else None,
                                        1e-6, False, True, dtype, normalize, fp8)[0]
        else:
            outs, _, _, _, group_packs, group_scales = ops.bitlinear_group(x, g, W, b, 1e-6, False, True, dtype, pcs,
                                                                           normalize, fp8)
            out = torch.cat(outs, -1)
        (out.float() * torch.linspace(-1, 1, out.numel(), device=device).reshape(out.shape)).sum().backward()
        results.append((out, [t.grad for t in (x, g, *W, *b) if t is not None]))
    (want_out, want_grads), (out, grads) = results
    assert torch.equal(out, want_out)
    for got, want in zip(grads, want_grads):
        assert got.shape == want.shape and got.dtype == want.dtype
        if want.numel() == 0:
            continue
        # fp32 gradients: accumulation order alone; bf16/fp16: the group adds the weights'
        # input gradients in fp32, the stack rounds its one product once: a few units of the dtype.
        scale = want.float().abs().max().clamp(min=1e-6)
        tol = 1e-5 if dtype == torch.float32 and not fp8 else 2e-2
        assert ((got.float() - want.float()).abs().max() / scale) <= tol


def test_bitlinear_stacked_bad_input():
    x, W = torch.randn(3, 8), torch.randn(4, 8)
    packed, scale = ops.weight_quant_stacked([W, W], [False, False])
    with pytest.raises(ValueError, match="packed stack has 8 rows but the weights have 4"):
        ops.bitlinear_stacked(x, None, [W], packed, scale, None, 1e-6, False, True, torch.float32, True)
    with pytest.raises(ValueError, match="norm weight was given but normalize=False"):
        ops.bitlinear_stacked(x, torch.ones(8), [W, W], packed, scale, None, 0.0, False, True, torch.float32, False)
    with pytest.raises(ValueError, match="must share K"):
        ops.weight_quant_stacked([W, torch.randn(4, 9)], [False, False])
    with pytest.raises(ValueError, match="needs at least one linear weight"):
        ops.weight_quant_stacked([], [])
    with pytest.raises(ValueError, match="bias has shape"):
        ops.bitlinear_stacked(x, None, [W, W], packed, scale, torch.randn(4), 1e-6, False, True, torch.float32, True)
    with pytest.raises(ValueError, match="linear weights have K=8 input features but the input has K=5"):
        ops.bitlinear_stacked(torch.randn(3, 5), None, [W, W], packed, scale, None, 1e-6, False, True, torch.float32)


def _grads(fn, x, g, W, b):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, g, W, b)]
    out = fn(*leaves)
    # A fixed, non-trivial upstream gradient.
    upstream = torch.linspace(-1, 1, out.numel(), device=out.device).reshape(out.shape).to(out.dtype)
    (out.float() * upstream.float()).sum().backward()
    return out, [t.grad if t is not None else None for t in leaves]


def _assert_grads_close(names, grads, grads_ref, dtype) -> None:
    """Gradients of an op against its fp32 straight-through reference, by name. The reference
    differentiates in fp32; the op's backward runs its matmuls in the gradient's dtype. fp32:
    reduction-order noise; half: operands rounded to 8 or 11 bits and accumulated over K or M
    terms: 2% of the gradient's scale."""
    for name, got, want in zip(names, grads, grads_ref):
        if want is None:
            assert got is None, name
            continue
        assert got.dtype == want.dtype, name
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        scale = want.float().abs().max().clamp(min=1e-6)
        err = (got.float() - want.float()).abs().max() / scale
        assert err <= tol, (name, float(err))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("offset,cbw,has_g,has_b,per_channel", [
    (False, True, True, True, False),
    (True, False, True, False, True),
    (False, True, False, False, False),
])
def test_bitlinear_gradients_match_ste_reference(device, dtype, offset, cbw, has_g, has_b, per_channel):
    M, K, N = 12, 48, 20
    x = _x((3, M, K), dtype, device, 10)
    g = _x((K,), dtype, device, 11) if has_g else None
    W = _x((N, K), dtype, device, 12)
    b = _x((N,), dtype, device, 13) if has_b else None
    kw = dict(offset=offset, cast_before_weight=cbw, per_channel=per_channel)
    out, grads = _grads(lambda *a: bitfx.bitlinear(*a, 1e-6, **kw), x, g, W, b)
    out_ref, grads_ref = _grads(lambda *a: ref.bitlinear_ste(*a, 1e-6, **kw), x, g, W, b)
    assert out.dtype == out_ref.dtype == dtype
    # Forward: the op's exact int32 product vs the STE reference's fp32 matmul of the same
    # dequantized values, both rounded to dtype: within 2 ulps of dtype (plus fp32 noise near 0).
    assert_close_ulps(out, out_ref, ulps=2, atol=1e-5)
    _assert_grads_close("x g W b".split(), grads, grads_ref, dtype)


def test_bitlinear_gradient_ste_formula():
    """The weight gradient is dout^T (q / s_x) and the activation side sees dout (t / s_w)."""
    torch.manual_seed(0)
    M, K, N = 6, 16, 5
    x = torch.randn(M, K, requires_grad=True)
    W = torch.randn(N, K, requires_grad=True)
    out = bitfx.bitlinear(x, None, W, None, 1e-6)
    dout = torch.randn_like(out)
    out.backward(dout)
    q, s = ref.norm_quant(x.detach(), None, 1e-6)
    torch.testing.assert_close(W.grad, dout.t() @ (q.float() / s[:, None]), rtol=1e-5, atol=1e-6)


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


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs_raise_clear_errors(device):
    x = _x((4, 32), torch.float32, device)
    W = _x((8, 32), torch.float32, device)
    q, s = ops.norm_quant(x, None, 1e-6, False, True, torch.float32)
    packed, sw = ops.weight_quant(W, False)
    with pytest.raises(TypeError, match="input must be float32, float16 or bfloat16, got int64"):
        ops.norm_quant(torch.ones(4, 32, dtype=torch.long, device=device), None, 1e-6, False, True, torch.float32)
    with pytest.raises(ValueError, match=r"norm weight has shape \(31,\).*K=32"):
        ops.norm_quant(x, torch.ones(31, device=device), 1e-6, False, True, torch.float32)
    with pytest.raises(TypeError, match="activation codes must be int8, got float32"):
        ops.ternary_matmul(x, s, packed, sw, None, torch.float32, 32)
    with pytest.raises(TypeError, match="packed ternary weight must be uint8"):
        ops.ternary_matmul(q, s, packed.to(torch.int8), sw, None, torch.float32, 32)
    # K=80 activations, a weight packed for K=32.
    q80, s80 = ops.norm_quant(_x((4, 80), torch.float32, device), None, 1e-6, False, True, torch.float32)
    with pytest.raises(ValueError, match=r"activations have K=80 features .* packed for in_features=32"):
        ops.ternary_matmul(q80, s80, packed, sw, None, torch.float32, 32)
    with pytest.raises(ValueError, match=r"16 bytes per row but in_features=80 needs 32"):
        ops.ternary_matmul(q80, s80, packed, sw, None, torch.float32, 80)
    with pytest.raises(ValueError, match=r"weight scale has shape \(7,\), expected \(8,\)"):
        ops.ternary_matmul(q, s, packed, sw[:7], None, torch.float32, 32)
    with pytest.raises(ValueError, match=r"bias has shape \(3,\), expected \(8,\)"):
        ops.ternary_matmul(q, s, packed, sw, torch.ones(3, device=device), torch.float32, 32)
    with pytest.raises(ValueError, match="linear weight has K=32 input features but the input has K=16"):
        bitfx.bitlinear(_x((4, 16), torch.float32, device), None, W)
    with pytest.raises(ValueError, match="linear weight must be 2-D"):
        ops.weight_quant(W.reshape(-1), False)
    with pytest.raises(TypeError, match="out_dtype must be a float dtype"):
        ops.ternary_matmul(q, s, packed, sw, None, torch.int32, 32)


def test_packed_format_mismatch_message():
    with pytest.raises(ValueError, match=r"has 16 bytes per row but in_features=80 needs 32"):
        q = torch.zeros(2, 80, dtype=torch.int8)
        ops.ternary_matmul(q, torch.ones(2), torch.zeros(4, 16, dtype=torch.uint8), torch.ones(4), None, torch.float32,
                           80)
    assert packed_k(80) == 32


@pytest.mark.cuda
def test_device_mismatch_is_named():
    x = _x((4, 32), torch.float32, "cuda")
    with pytest.raises(ValueError, match="all tensors must be on one device"):
        ops.norm_quant(x, torch.ones(32), 1e-6, False, True, torch.float32)


def test_device_mismatch_is_named_meta():
    x = torch.randn(4, 32)
    with pytest.raises(ValueError, match="all tensors must be on one device"):
        ops.norm_quant(x, torch.ones(32, device="meta"), 1e-6, False, True, torch.float32)


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


# ------------------------------------------------------------------ ternary_matmul: the K the weight was packed for


@pytest.mark.parametrize("device", DEVICES + ["meta"])
def test_ternary_matmul_checks_in_features(device):
    """K=32 and K=64 pack to the same 16 bytes per row: only in_features tells them apart."""
    assert packed_k(32) == packed_k(64) == 16
    W = _x((8, 32), torch.float32, "cpu", 1)
    packed, sw = (t.to(device) for t in ops.weight_quant(W, False))
    x64 = _x((3, 64), torch.float32, "cpu", 2)
    q, s = (t.to(device) for t in ops.act_quant(x64))
    with pytest.raises(ValueError, match=r"activations have K=64 features .* packed for in_features=32"):
        ops.ternary_matmul(q, s, packed, sw, None, torch.float32, 32)
    with pytest.raises(ValueError, match=r"activations have K=64 features .* packed for in_features=32"):
        ops.ternary_linear_group(x64.to(device), None, [packed], [sw], [], 32, 0.0, False, False, torch.float32,
                                 False, torch.float32)
    out = ops.ternary_matmul(q[:, :32], s, packed, sw, None, torch.float32, 32)
    assert out.shape == (3, 8)


def test_ternary_matmul_in_features_symbolic():
    """The fake implementation checks in_features against a symbolic K too (torch.compile, dynamic)."""
    W = _x((8, 32), torch.float32, "cpu", 1)
    packed, sw = ops.weight_quant(W, False)

    def f(x):
        q, s = ops.act_quant(x)
        return ops.ternary_matmul(q, s, packed, sw, None, torch.float32, 32)

    compiled = torch.compile(f, backend="aot_eager", dynamic=True, fullgraph=True)
    x = _x((3, 32), torch.float32, "cpu", 2)
    assert torch.equal(compiled(x), f(x))
    # Dynamo reports the fake implementation's ValueError (K is a symbol there, or 64).
    with pytest.raises(Exception, match=r"ValueError.*activations have K=\w+ features .* packed for in_features=32"):
        compiled(_x((3, 64), torch.float32, "cpu", 2))


# ------------------------------------------------------------------ invalid packed codes (CPU: the reference checks)


def test_cpu_ops_refuse_invalid_codes():
    W = _x((4, 10), torch.float32, "cpu", 1)
    packed, sw = ops.weight_quant(W, False)
    q, s = ops.act_quant(_x((2, 10), torch.float32, "cpu", 2))
    bad = packed.clone()
    bad[1, 0] |= 0b11  # code 3 at row 1, column 0
    with pytest.raises(ValueError, match=r"invalid 2-bit code 3 .* at row 1, column 0"):
        ops.ternary_matmul(q, s, bad, sw, None, torch.float32, 10)
    with pytest.raises(ValueError, match=r"invalid 2-bit code 3"):
        ops.dequantize(bad, sw, 10, torch.float32)
    pad = packed.clone()
    pad[0, 15] = 0  # columns 15, 31, 47, 63: all padding for K=10, now code 0
    with pytest.raises(ValueError, match=r"code 0 in a padding column \(k >= K=10 must hold code 1"):
        ops.ternary_matmul(q, s, pad, sw, None, torch.float32, 10)


# ------------------------------------------------------------------ 0-D inputs


def _zero_dim_calls(device):
    x0 = torch.tensor(1.0, device=device)
    q0 = torch.tensor(1, dtype=torch.int8, device=device)
    s0 = torch.tensor(1.0, device=device)
    W = torch.randn(4, 8).to(device)
    packed = torch.full((4, 16), 0b01010101, dtype=torch.uint8, device=device)
    sw = torch.ones(4, device=device)
    f32 = torch.float32
    return {
        "norm_quant": lambda: ops.norm_quant(x0, None, 1e-6, False, True, f32),
        "act_quant": lambda: ops.act_quant(x0),
        "ternary_matmul": lambda: ops.ternary_matmul(q0, s0, packed, sw, None, f32, 8),
        "bitlinear": lambda: ops.bitlinear(x0, None, W, None, 1e-6, False, True, f32, False),
        "bitlinear_group": lambda: ops.bitlinear_group(x0, None, [W], [], 1e-6, False, True, f32, [False]),
        "act_dequant": lambda: ops.act_dequant(q0, s0, f32),
        "rms_norm_backward": lambda: ops.rms_norm_backward(x0, x0, None, s0, False, True),
        "ternary_linear_group": lambda: ops.ternary_linear_group(x0, None, [packed], [sw], [], 8, 0.0, False, False,
                                                                 f32, False, f32),
    }


@pytest.mark.parametrize("device", DEVICES + ["meta"])
@pytest.mark.parametrize("op", list(_zero_dim_calls("cpu")))
def test_zero_dim_input_is_named(op, device):
    with pytest.raises(ValueError, match=r"must have at least one dimension \(the features\)"):
        _zero_dim_calls(device)[op]()


# ------------------------------------------------------------------ rms_norm_backward: cast_before_weight


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rms_norm_backward_honours_cast_before_weight(dtype):
    """With cast_before_weight the norm weight's gradient multiplies dy by r rounded to x.dtype
    (what the forward multiplied the weight by); without it, by the fp32 r. dx does not depend on it."""
    x = _x((6, 40), dtype, "cpu", 1)
    g = _x((40,), dtype, "cpu", 2)
    dy = _x((6, 40), dtype, "cpu", 3)
    rstd = torch.rsqrt(x.float().pow(2).mean(-1) + 1e-6)
    dx_t, dg_t = ops.rms_norm_backward(dy, x, g, rstd, False, True)
    dx_f, dg_f = ops.rms_norm_backward(dy, x, g, rstd, False, False)
    assert torch.equal(dx_t, dx_f)
    assert not torch.equal(dg_t, dg_f)
    r = x.float() * rstd[:, None]
    torch.testing.assert_close(dg_t, (dy.float() * r.to(dtype).float()).sum(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dg_f, (dy.float() * r).sum(0), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ["bitlinear", "bitlinear_group"])
@pytest.mark.parametrize("cbw", [True, False])
def test_bitlinear_backward_passes_cast_before_weight(device, op, cbw):
    """The training ops hand cast_before_weight on to the norm's backward: the norm weight's
    gradient is rms_norm_backward(dy, ..., cast_before_weight) of the straight-through dy."""
    dtype = torch.float16
    M, K, N = 6, 40, 12
    x = _x((M, K), dtype, device, 1).requires_grad_()
    g = _x((K,), dtype, device, 2).requires_grad_()
    W = _x((N, K), dtype, device, 3).requires_grad_()
    if op == "bitlinear":
        out = ops.bitlinear(x, g, W, None, 1e-6, False, cbw, dtype, False)[0]
    else:
        out = ops.bitlinear_group(x, g, [W], [], 1e-6, False, cbw, dtype, [False])[0][0]
    dout = _x((M, N), dtype, device, 4)
    out.backward(dout)
    packed, sw = ops.weight_quant(W.detach(), False)
    dy = dout @ ops.dequantize(packed, sw, K, dtype)
    rstd = torch.rsqrt(x.detach().float().pow(2).mean(-1) + 1e-6)
    dgs = {flag: ops.rms_norm_backward(dy, x.detach(), g.detach(), rstd, False, flag)[1].to(dtype)
           for flag in (True, False)}
    # The same arithmetic on both sides: the same bits (the kernel's rstd may differ from torch's
    # by an ulp on CUDA, hence a tolerance there).
    if device == "cpu":
        assert torch.equal(g.grad, dgs[cbw])
    else:
        torch.testing.assert_close(g.grad, dgs[cbw], rtol=2e-3, atol=1e-3)
    assert not torch.equal(dgs[True], dgs[False])


# ------------------------------------------------------------------ ternary_linear_group (frozen packed weights)


def _frozen(Ns, K, seed, device, per_channel=False):
    """Packed weights and their scales (and the codes t) of random [N, K] float weights."""
    packs, scales, codes = [], [], []
    for i, N in enumerate(Ns):
        W = _x((N, K), torch.float32, "cpu", seed + i)
        p, s = ref.weight_quant(W, per_channel)
        packs.append(p.to(device))
        scales.append(s.to(device))
        codes.append(ref.unpack_ternary(p, K).to(device))
    return packs, scales, codes


@given(
    M=st.integers(0, 8),
    K=st.integers(1, 70),
    Ns=st.lists(st.integers(1, 24), min_size=1, max_size=3),
    dtype=st.sampled_from(FLOAT_DTYPES),
    normalize=st.booleans(),
    offset=st.booleans(),
    cbw=st.booleans(),
    has_bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
@example(M=1, K=1, Ns=[1, 2], dtype=torch.bfloat16, normalize=True, offset=True, cbw=False, has_bias=True, seed=0)
@example(M=0, K=8, Ns=[3], dtype=torch.float32, normalize=False, offset=False, cbw=True, has_bias=False, seed=0)
def test_ternary_linear_group_forward_is_the_inference_ops(M, K, Ns, dtype, normalize, offset, cbw, has_bias, seed):
    """Each output is ternary_matmul of the (norm_)act_quant codes, bit for bit."""
    x = _x((2, M, K), dtype, "cpu", seed)
    g = _x((K,), dtype, "cpu", seed + 1) if normalize else None
    packs, scales, _ = _frozen(Ns, K, seed + 2, "cpu")
    bs = [_x((N,), dtype, "cpu", seed + 9 + i) for i, N in enumerate(Ns)] if has_bias else []
    outs, q, s, rstd = ops.ternary_linear_group(x, g, packs, scales, bs, K, 1e-6, offset, cbw, dtype, normalize,
                                                dtype)
    if normalize:
        q_want, s_want = ops.norm_quant(x, g, 1e-6, offset, cbw, dtype)
        torch.testing.assert_close(rstd, torch.rsqrt(x.float().pow(2).mean(-1) + 1e-6), rtol=1e-6, atol=0)
    else:
        q_want, s_want = ops.act_quant(x)
        assert torch.equal(rstd, torch.zeros(2, M))
    assert torch.equal(q, q_want) and torch.equal(s, s_want)
    for i, out in enumerate(outs):
        want = ops.ternary_matmul(q_want, s_want, packs[i], scales[i], bs[i] if bs else None, dtype, K)
        assert out.dtype == want.dtype and torch.equal(out, want)


def _ste_grads(fn, leaves, out_count):
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in leaves]
    outs = fn(*leaves)
    loss = 0.0
    for i, o in enumerate(outs[:out_count]):
        upstream = torch.linspace(-1, 1 + i, o.numel(), device=o.device).reshape(o.shape)
        loss = loss + (o.float() * upstream).sum()
    loss.backward()
    return outs, [None if t is None else t.grad for t in leaves]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("normalize,offset,cbw,has_g,has_b", [
    (True, False, True, True, True),
    (True, True, False, True, False),
    (True, False, True, False, True),
    (False, False, False, False, True),
    (False, False, False, False, False),
])
def test_ternary_linear_group_gradients_match_ste_reference(device, dtype, normalize, offset, cbw, has_g, has_b):
    M, K, Ns = 6, 48, [20, 7]
    x = _x((2, M, K), dtype, device, 10)
    g = _x((K,), dtype, device, 11) if has_g else None
    packs, scales, codes = _frozen(Ns, K, 12, device, per_channel=True)
    bs = [_x((N,), dtype, device, 20 + i) for i, N in enumerate(Ns)] if has_b else []
    n = len(Ns)

    def op(x, g, *b):
        return ops.ternary_linear_group(x, g, packs, scales, list(b), K, 1e-6, offset, cbw, dtype, normalize, dtype)[0]

    def reference(x, g, *b):
        return [ref.ternary_linear_ste(x, g, codes[i], scales[i], b[i] if b else None, 1e-6, normalize=normalize,
                                       offset=offset, cast_before_weight=cbw, norm_dtype=dtype, out_dtype=dtype)
                for i in range(n)]

    outs, grads = _ste_grads(op, [x, g, *bs], n)
    outs_ref, grads_ref = _ste_grads(reference, [x, g, *bs], n)
    for o, o_ref in zip(outs, outs_ref):
        # The exact int32 product vs the reference's fp32 matmul of the same values: 2 ulps of dtype.
        assert_close_ulps(o, o_ref, ulps=2, atol=1e-5)
    # The op runs dout @ (t / s_w) in dout's dtype and the norm's backward (cast_before_weight
    # like the forward).
    _assert_grads_close(["x", "g"] + [f"b{i}" for i in range(len(bs))], grads, grads_ref, dtype)


def test_ternary_linear_group_weights_get_no_gradient():
    K = 16
    packs, scales, _ = _frozen([5], K, 0, "cpu")
    w_scale = scales[0].clone().requires_grad_()
    x = _x((3, K), torch.float32, "cpu", 1).requires_grad_()
    out = ops.ternary_linear_group(x, None, packs, [w_scale], [], K, 0.0, False, False, torch.float32, False,
                                   torch.float32)[0][0]
    out.sum().backward()
    assert w_scale.grad is None
    # dx = dout (t / s_w) with dout all ones: the column sums of the dequantized weight.
    want = ops.dequantize(packs[0], scales[0], K, torch.float32).sum(0).expand(3, K)
    torch.testing.assert_close(x.grad, want, rtol=1e-6, atol=1e-6)


def test_ternary_linear_group_bad_input():
    K = 8
    packs, scales, _ = _frozen([4, 4], K, 0, "cpu")
    x = torch.randn(3, K)
    f32 = torch.float32
    with pytest.raises(ValueError, match="needs at least one packed weight"):
        ops.ternary_linear_group(x, None, [], [], [], K, 0.0, False, False, f32, False, f32)
    with pytest.raises(ValueError, match="2 packed weights but 1 weight scales and 0 biases"):
        ops.ternary_linear_group(x, None, packs, scales[:1], [], K, 0.0, False, False, f32, False, f32)
    with pytest.raises(ValueError, match="one bias per weight or none at all"):
        ops.ternary_linear_group(x, None, packs, scales, [torch.ones(4)], K, 0.0, False, False, f32, False, f32)
    with pytest.raises(ValueError, match="a norm weight was given but normalize=False"):
        ops.ternary_linear_group(x, torch.ones(K), packs, scales, [], K, 0.0, False, False, f32, False, f32)
    with pytest.raises(ValueError, match=r"activations have K=8 features .* packed for in_features=7"):
        ops.ternary_linear_group(x, None, packs, scales, [], 7, 0.0, False, False, f32, False, f32)
    with pytest.raises(ValueError, match=r"16 bytes per row but in_features=80 needs 32"):
        ops.ternary_linear_group(torch.randn(3, 80), None, packs, scales, [], 80, 0.0, False, False, f32, False, f32)
    with pytest.raises(TypeError, match="packed ternary weight must be uint8"):
        ops.ternary_linear_group(x, None, [packs[0].to(torch.int8)], scales[:1], [], K, 0.0, False, False, f32,
                                 False, f32)
    with pytest.raises(TypeError, match="weight scale must be float32, got float16"):
        ops.ternary_linear_group(x, None, packs[:1], [scales[0].half()], [], K, 0.0, False, False, f32, False, f32)
    with pytest.raises(ValueError, match=r"bias has shape \(3,\), expected \(4,\)"):
        ops.ternary_linear_group(x, None, packs, scales, [torch.ones(4), torch.ones(3)], K, 0.0, False, False, f32,
                                 False, f32)
    with pytest.raises(TypeError, match="input must be float32, float16 or bfloat16, got int64"):
        ops.ternary_linear_group(x.long(), None, packs, scales, [], K, 0.0, False, False, f32, False, f32)
    with pytest.raises(TypeError, match="out_dtype must be a float dtype"):
        ops.ternary_linear_group(x, None, packs, scales, [], K, 0.0, False, False, f32, False, torch.int32)
