"""The training ops (:mod:`bitfx.ops.training`): ``weight_quant_stacked``, ``bitlinear_stacked``
(what the backend emits in training graphs), ``ternary_linear_group`` (frozen packed weights in
grad mode) and :func:`bitfx.bitlinear` (the BitLinear layer as a function, built on the first
two): forward against the reference, gradients against the plain-torch straight-through
reference (:mod:`bitfx.reference`), the norm's backward, the refusal of double backward, and
the weight's dequantization in the traced backward graph (one ``bitfx::dequantize`` node).

On CPU the ops run the reference; on CUDA they run the Triton kernels.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given
from hypothesis import strategies as st

import bitfx
from bitfx import reference as ref
from tests.helpers import DEVICES, FLOAT_DTYPES, assert_close_ulps, seeded_randn as _x

ops = torch.ops.bitfx


# ------------------------------------------------------------------ weight_quant_stacked


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


@pytest.mark.parametrize("device", DEVICES)
def test_weight_quant_stacks_is_weight_quant_stacked_per_stack(device):
    """``weight_quant_stacks``: each stack's bytes and scales, at ``layout.stack_offsets``'s
    places in the flat outputs, are ``weight_quant_stacked`` of that stack (bit for bit on the
    CPU, where both are the plain-torch reference; on CUDA the scales up to the order of the
    fp32 sum); under Inductor too; and arguments that do not describe stacks are refused by name."""
    from bitfx.layout import packed_k, stack_offsets

    Ws = [_x((12, 40), torch.bfloat16, device, 1), _x((4, 40), torch.float32, device, 2),
          _x((7, 65), torch.bfloat16, device, 3), _x((3, 9), torch.float16, device, 4).t().contiguous().t()]
    flags, stacks = [False, True, False, True], [2, 1, 1]
    offsets, nbytes, nrows = stack_offsets([(16, 40), (7, 65), (3, 9)])
    for fn in (ops.weight_quant_stacks, torch.compile(ops.weight_quant_stacks, backend="inductor", fullgraph=True)):
        packed, scale = fn(Ws, flags, stacks)
        assert packed.shape == (nbytes,) and scale.shape == (nrows,)
        at = 0
        for n, (byte0, row0), (rows, K) in zip(stacks, offsets, [(16, 40), (7, 65), (3, 9)]):
            want_p, want_s = ops.weight_quant_stacked(Ws[at:at + n], flags[at:at + n])
            got_p = packed[byte0:byte0 + rows * packed_k(K)].view(rows, packed_k(K))
            if device == "cpu":
                assert torch.equal(got_p, want_p) and torch.equal(scale[row0:row0 + rows], want_s)
            else:
                torch.testing.assert_close(scale[row0:row0 + rows], want_s, rtol=1e-6, atol=0)
                sc = scale[row0:row0 + rows].split([w.shape[0] for w in Ws[at:at + n]])
                assert torch.equal(got_p, torch.cat([ref.pack_ternary(ref.ternarize(w, c))
                                                     for w, c in zip(Ws[at:at + n], sc)]))
            at += n
    with pytest.raises(ValueError, match="stacks"):
        ops.weight_quant_stacks(Ws, flags, [2, 1])
    with pytest.raises(ValueError, match="share K"):
        ops.weight_quant_stacks(Ws, flags, [3, 1])


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


# ------------------------------------------------------------------ bitlinear_stacked (what the backend emits)


def _linear_ste(y: torch.Tensor, W: torch.Tensor, b, per_channel: bool) -> torch.Tensor:
    """:func:`bitfx.reference.bitlinear_ste` without the norm (``y`` is quantized as it is): the
    plain-torch straight-through reference of a linear no norm feeds (``normalize=False``)."""
    q, s_x = ref.act_quant(y.detach())
    yq = y.float() + (q.float() / s_x.unsqueeze(-1) - y.float()).detach()
    s_w = ref.weight_scale(W.detach(), per_channel)
    t = ref.ternarize(W.detach(), s_w)
    wq = W.float() + (t.float() / s_w.unsqueeze(1) - W.float()).detach()
    return F.linear(yq, wq, None if b is None else b.float()).to(y.dtype)


def _front(x, g, normalize, dtype):
    """The activation codes and scales the stacked op must use: on CPU the reference's; on CUDA
    the inference ops' (the same kernels, checked against the reference in tests/kernels and
    tests/ops/test_inference.py)."""
    if x.device.type == "cpu":
        return ref.norm_quant(x, g, 1e-6, norm_dtype=dtype) if normalize else ref.act_quant(x)
    return ops.norm_quant(x, g, 1e-6, False, True, dtype) if normalize else ops.act_quant(x)


def _matmul(q, s, packed, w_scale, bias, dtype):
    """One weight's output given the codes: the reference on CPU, the inference op on CUDA."""
    if q.device.type == "cpu":
        return ref.ternary_matmul(q, s, packed, w_scale, bias, dtype)
    return ops.ternary_matmul(q, s, packed, w_scale, bias, dtype, q.shape[-1])


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
def test_bitlinear_stacked_matches_the_reference(device, M, K, Ns, dtype, normalize, has_bias, fp8, seed):
    """Against the reference, weight by weight: ``weight_quant_stacked`` gives the reference's
    scales up to the order of the fp32 sum (a few ulps) and exactly the codes of its own scales;
    given the reference's packed weights, the stacked op's output is the reference's outputs
    side by side, bit for bit (on CUDA: the inference ops' kernels), and its gradients are the
    plain-torch straight-through reference's (``fp8_backward``: the forward alone; its
    gradients are bounded in tests/ops/test_fp8.py)."""
    pcs = [(seed + i) % 2 == 0 for i in range(len(Ns))]
    leaves = [_x((2, M, K), dtype, device, seed)] + ([_x((K,), dtype, device, seed + 1)] if normalize else [])
    Ws = [_x((N, K), dtype, device, seed + 2 + i) for i, N in enumerate(Ns)]
    bs = [_x((N,), dtype, device, seed + 9 + i) for i, N in enumerate(Ns)] if has_bias else []

    packed, scale = ops.weight_quant_stacked(Ws, pcs)
    want = [ref.weight_quant(W.cpu(), pc) for W, pc in zip(Ws, pcs)]
    ref_packed, ref_scale = torch.cat([p for p, _ in want]), torch.cat([s for _, s in want])
    torch.testing.assert_close(scale.cpu(), ref_scale, rtol=1e-6, atol=0)
    codes = torch.cat([ref.pack_ternary(ref.ternarize(W.cpu(), s)) for W, s in zip(Ws, scale.cpu().split(Ns))])
    assert torch.equal(packed.cpu(), codes)

    results = []
    for reference in (False, True):
        x, *rest = (t.detach().clone().requires_grad_() for t in leaves + Ws + bs)
        g = rest.pop(0) if normalize else None
        W, b = rest[: len(Ns)], rest[len(Ns):]
        if reference:
            outs = [ref.bitlinear_ste(x, g, w, bi, 1e-6, norm_dtype=dtype, per_channel=pc) if normalize
                    else _linear_ste(x, w, bi, pc) for w, bi, pc in zip(W, b or [None] * len(W), pcs)]
            out = torch.cat(outs, -1)
        else:
            out, q, s_x, rstd = ops.bitlinear_stacked(x, g, W, ref_packed.to(device), ref_scale.to(device),
                                                      torch.cat(b) if b else None, 1e-6, False, True, dtype,
                                                      normalize, fp8)
            q_want, s_want = _front(x.detach(), None if g is None else g.detach(), normalize, dtype)
            assert torch.equal(q, q_want) and torch.equal(s_x, s_want)
            if normalize:
                rstd_want = torch.rsqrt(x.detach().float().pow(2).mean(-1) + 1e-6)
                torch.testing.assert_close(rstd, rstd_want, rtol=1e-6, atol=0)
            else:
                assert torch.equal(rstd, torch.zeros(2, M, device=device))
            parts = [_matmul(q_want, s_want, p.to(device), s.to(device), bi, dtype)
                     for (p, s), bi in zip(want, [t.detach() for t in b] or [None] * len(W))]
            assert out.dtype == dtype and torch.equal(out, torch.cat(parts, -1))
        (out.float() * torch.linspace(-1, 1, out.numel(), device=device).reshape(out.shape)).sum().backward()
        results.append([t.grad for t in (x, g, *W, *b) if t is not None])
    if fp8:
        return
    grads, grads_ref = results
    names = ["x"] + (["g"] if normalize else []) + [f"W{i}" for i in range(len(Ns))] + [f"b{i}" for i in range(len(bs))]
    _assert_grads_close(names, grads, grads_ref, dtype)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("has_bias", [True, False])
def test_stacked_forward_plan_launches_with_each_calls_tensors(monkeypatch, normalize, has_bias):
    """``bitlinear_stacked``'s CUDA forward (:func:`bitfx.ops.training.stacked_forward`) binds
    its launches on the first call of a signature and reuses them after: every call gives the
    unplanned kernels' codes, scales, rstd and output bit for bit, for that call's own rows and
    weights (new tensors each call, as a training step's are; the plan holds none of them), and
    a new signature (other rows) gets a plan of its own (each path of the matmul). Run by the
    Triton kernels (the interpreter without a GPU)."""
    import gc
    import weakref
    from collections import OrderedDict

    from bitfx.kernels import norm_quant as nqk
    from bitfx.kernels import ternary_matmul as tmk
    from bitfx.ops import training
    from tests.helpers import KERNEL_DEVICE as dev

    monkeypatch.setattr(training, "_PLANS", OrderedDict())
    built, planned = [], []
    launch_quant = nqk._launch_quant
    monkeypatch.setattr(nqk, "_launch_quant", lambda *a, **k: built.append(1) or launch_quant(*a, **k))
    K, Ns, dtype = 40, [12, 20], torch.bfloat16
    for call, M in enumerate([5, 5, 5, 1, 1, 70, 70, 3, 3]):  # the GEMV, dp4a and tensor-core paths
        x = _x((M, K), dtype, dev, 10 * call)
        g = _x((K,), dtype, dev, 10 * call + 1) if normalize else None
        Ws = [_x((N, K), dtype, dev, 10 * call + 2 + i) for i, N in enumerate(Ns)]
        packed, w_scale = ops.weight_quant_stacked(Ws, [False, True])
        if call == 8:  # operands in other strides: a signature of their own
            packed, w_scale = packed.t().contiguous().t(), w_scale.repeat_interleave(2)[::2]
            g = None if g is None else g.repeat_interleave(2)[::2]
        bias = _x((sum(Ns),), dtype, dev, 10 * call + 7) if has_bias else None
        before = len(built)
        out, q, s_x, rstd = training.stacked_forward(x, g, packed, w_scale, bias, 1e-6, False, True, dtype, normalize)
        planned.append(len(built) == before)
        if call == 0:  # a plan holds none of the tensors of the call that built it
            first = [weakref.ref(t) for t in (packed, w_scale, g, bias) if t is not None]
        if normalize:
            q_want, s_want, rstd_want = nqk.norm_quant(x, g, 1e-6, False, True, dtype)
            assert torch.equal(rstd, rstd_want)
        else:
            (q_want, s_want), rstd_want = nqk.act_quant(x), None
            assert rstd is None
        assert torch.equal(q, q_want) and torch.equal(s_x, s_want)
        assert torch.equal(out, tmk.ternary_matmul(q_want, s_want, packed, w_scale, bias, dtype))
    assert planned == [False, True, True, False, True, False, True, False, False]
    gc.collect()
    assert all(ref_() is None for ref_ in first)


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
def test_bitlinear_stacked_is_bitlinear_per_weight(M, K, Ns, dtype, offset, has_bias, per_channel, seed):
    """One norm, several weights stacked (``weight_quant_stacked`` + ``bitlinear_stacked``, the
    sibling fusion): each block of the output is ``bitfx.bitlinear`` of its weight alone, bit for
    bit, and the gradients are those of the single-weight calls summed (the norm's input
    gradient adds up)."""
    pcs = per_channel[: len(Ns)]
    leaves = [_x((2, M, K), dtype, "cpu", seed), _x((K,), dtype, "cpu", seed + 1)]
    Ws = [_x((N, K), dtype, "cpu", seed + 2 + i) for i, N in enumerate(Ns)]
    bs = [_x((N,), dtype, "cpu", seed + 9 + i) for i, N in enumerate(Ns)] if has_bias else []
    grads, stacked_outs = [], None  # the stacked op's outputs (first pass), for the single calls to match
    for stacked in (True, False):
        x, g, *params = (t.detach().clone().requires_grad_() for t in leaves + Ws + bs)
        W, b = params[: len(Ns)], params[len(Ns):]
        if stacked:
            packed, scale = ops.weight_quant_stacked(W, pcs)
            out = ops.bitlinear_stacked(x, g, W, packed, scale, torch.cat(b) if b else None, 1e-6, offset, True,
                                        dtype)[0]
            outs = list(out.split(Ns, -1))
        else:
            outs = [bitfx.bitlinear(x, g, W[i], b[i] if b else None, 1e-6, offset=offset, norm_dtype=dtype,
                                    per_channel=pcs[i]) for i in range(len(Ns))]
            for o, o_stacked in zip(outs, stacked_outs):
                assert torch.equal(o, o_stacked)
        stacked_outs = outs
        loss = sum((o.float() * torch.linspace(-1, 1, o.numel()).reshape(o.shape)).sum() for o in outs)
        loss.backward()
        grads.append([t.grad for t in (x, g, *params)])
    for got, want in zip(*grads):
        assert got.shape == want.shape and got.dtype == want.dtype
        if want.numel() == 0:
            continue
        # The stack sums the linears' contributions to the norm's gradient in one matmul, the
        # single calls in autograd's accumulation: equal up to rounding of the gradient's dtype.
        scale = want.float().abs().max().clamp(min=1e-6)
        assert ((got.float() - want.float()).abs().max() / scale) <= (1e-5 if dtype == torch.float32 else 2e-2)


# ------------------------------------------------------------------ bitfx.bitlinear, the function


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
    """CPU: ``bitfx.bitlinear`` is the reference's BitLinear bit for bit given the weight it packs
    (``weight_quant_stacked``: the reference's scale up to the order of the fp32 sum of |w|, a
    few ulps per tensor); on weights whose sums are exact in any order (multiples of 1/4),
    :func:`bitfx.reference.bitlinear` itself, bit for bit."""
    x = _x((M, K), dtype, "cpu", seed)
    g = _x((K,), dtype, "cpu", seed + 1)
    W = _x((N, K), dtype, "cpu", seed + 2)
    b = _x((N,), dtype, "cpu", seed + 3) if has_bias else None
    kw = dict(offset=offset, cast_before_weight=cbw, per_channel=per_channel)
    out = bitfx.bitlinear(x, g, W, b, 1e-6, **kw)
    packed, scale = ops.weight_quant_stacked([W], [per_channel])
    torch.testing.assert_close(scale, ref.weight_scale(W, per_channel), rtol=1e-6, atol=0)
    norm_dtype = ref.norm_dtype_for(dtype, dtype, cbw)
    q, s = ref.norm_quant(x, g, 1e-6, offset=offset, cast_before_weight=cbw, norm_dtype=norm_dtype)
    want = ref.ternary_matmul(q, s, packed, scale, b, norm_dtype)
    assert out.dtype == want.dtype
    assert torch.equal(out, want)
    gen = torch.Generator().manual_seed(seed)
    exact = (torch.randint(-8, 9, (N, K), generator=gen) / 4).to(dtype)
    assert torch.equal(bitfx.bitlinear(x, g, exact, b, 1e-6, **kw), ref.bitlinear(x, g, exact, b, 1e-6, **kw))


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
    assert len(names) == len(grads) == len(grads_ref)
    for name, got, want in zip(names, grads, grads_ref):
        if want is None:
            assert got is None, name
            continue
        assert got.dtype == want.dtype and got.shape == want.shape, name
        if want.numel() == 0:
            continue
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


# ------------------------------------------------------------------ double backward is refused, a first backward is not


def _training_calls(device="cpu"):
    """``{name: build}``: ``build()`` gives ``(outputs, leaves)`` of one training op call."""
    K, dtype = 16, torch.float32

    def leaves(*shapes, seed=0):
        return [_x(s, dtype, device, seed + i).requires_grad_() for i, s in enumerate(shapes)]

    def bitlinear():
        x, g, W, b = leaves((3, K), (K,), (5, K), (5,))
        return [bitfx.bitlinear(x, g, W, b)], [x, g, W, b]

    def bitlinear_stacked():
        x, g, W0, W1 = leaves((3, K), (K,), (5, K), (4, K), seed=4)
        packed, scale = ops.weight_quant_stacked([W0, W1], [False, True])
        return [ops.bitlinear_stacked(x, g, [W0, W1], packed, scale, None, 1e-6, False, True, dtype)[0]], [x, g, W0, W1]

    def ternary_linear_group():
        x, g, b = leaves((3, K), (K,), (5,), seed=8)
        packed, scale = ops.weight_quant(_x((5, K), dtype, device, 11), False)
        outs = ops.ternary_linear_group(x, g, [packed], [scale], [b], K, 1e-6, False, True, dtype, True, dtype)[0]
        return outs, [x, g, b]

    return {"bitlinear": bitlinear, "bitlinear_stacked": bitlinear_stacked,
            "ternary_linear_group": ternary_linear_group}


def _loss(outs):
    return sum((o * torch.linspace(-1, 1, o.numel(), device=o.device).reshape(o.shape)).sum() for o in outs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(_training_calls()))
def test_double_backward_is_refused(name, device):
    """The straight-through estimator defines first derivatives only: a backward that would be
    differentiated again (``create_graph=True``) raises, naming double backward."""
    outs, leaves = _training_calls(device)[name]()
    with pytest.raises(RuntimeError, match="double backward"):
        first = torch.autograd.grad(_loss(outs), leaves, create_graph=True)
        torch.autograd.grad(sum(d.sum() for d in first), leaves)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(_training_calls()))
def test_first_backward_runs_in_grad_mode(name, device):
    """The refusal keys on ``create_graph``, not on the ambient grad mode: a first backward runs
    under ``torch.enable_grad()`` (as inside a training step) and gives the gradients of a plain
    ``torch.autograd.grad``."""
    outs, leaves = _training_calls(device)[name]()
    want = torch.autograd.grad(_loss(outs), leaves)
    assert all(d is not None and d.shape == t.shape and torch.isfinite(d).all() for d, t in zip(want, leaves))
    outs, leaves = _training_calls(device)[name]()
    with torch.enable_grad():
        _loss(outs).backward()
    for t, d in zip(leaves, want):
        assert torch.equal(t.grad, d)


# ------------------------------------------------------------------ the norm's backward: cast_before_weight


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rms_norm_backward_honours_cast_before_weight(dtype):
    """:func:`bitfx.reference.rms_norm_backward` (the training ops' norm backward): with
    cast_before_weight the norm weight's gradient multiplies dy by r rounded to x.dtype (what
    the forward multiplied the weight by); without it, by the fp32 r. dx does not depend on it."""
    x = _x((6, 40), dtype, "cpu", 1)
    g = _x((40,), dtype, "cpu", 2)
    dy = _x((6, 40), dtype, "cpu", 3)
    rstd = torch.rsqrt(x.float().pow(2).mean(-1) + 1e-6)
    dx_t, dg_t = ref.rms_norm_backward(dy, x, g, rstd, False, True)
    dx_f, dg_f = ref.rms_norm_backward(dy, x, g, rstd, False, False)
    assert torch.equal(dx_t, dx_f)
    assert not torch.equal(dg_t, dg_f)
    r = x.float() * rstd[:, None]
    torch.testing.assert_close(dg_t, (dy.float() * r.to(dtype).float()).sum(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dg_f, (dy.float() * r).sum(0), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ["bitlinear", "bitlinear_stacked"])
@pytest.mark.parametrize("cbw", [True, False])
def test_bitlinear_backward_passes_cast_before_weight(device, op, cbw):
    """The training ops hand cast_before_weight on to the norm's backward: the norm weight's
    gradient is rms_norm_backward(dy, ..., cast_before_weight) of the straight-through dy."""
    dtype = torch.float16
    M, K, N = 6, 40, 12
    x = _x((M, K), dtype, device, 1).requires_grad_()
    g = _x((K,), dtype, device, 2).requires_grad_()
    W = _x((N, K), dtype, device, 3).requires_grad_()
    packed, sw = ops.weight_quant_stacked([W.detach()], [False])  # what both calls pack W to
    if op == "bitlinear":
        out = bitfx.bitlinear(x, g, W, None, 1e-6, cast_before_weight=cbw, norm_dtype=dtype)
    else:
        out = ops.bitlinear_stacked(x, g, [W], packed, sw, None, 1e-6, False, cbw, dtype)[0]
    dout = _x((M, N), dtype, device, 4)
    out.backward(dout)
    dy = dout @ ops.dequantize(packed, sw, K, dtype)
    rstd = torch.rsqrt(x.detach().float().pow(2).mean(-1) + 1e-6)
    dgs = {flag: ref.rms_norm_backward(dy, x.detach(), g.detach(), rstd, False, flag)[1].to(dtype)
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


@pytest.mark.parametrize("normalize", [True, False])
def test_what_a_ternary_linear_saves_for_backward(normalize):
    """The activations ``bitlinear_stacked`` keeps for its backward: the int8 codes and fp32 row
    scales of its input (the weight gradient's operand), never a float copy of the quantized
    activations; with a norm also the norm's input and its ``rstd`` (the norm's own backward
    needs them, as bf16's does), and the packed 2-bit weight with its scales."""
    from torch.autograd.graph import saved_tensors_hooks

    M, K, N = 6, 64, 48
    x = torch.randn(2, M, K, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(K, dtype=torch.bfloat16, requires_grad=True) if normalize else None
    w = torch.randn(N, K, dtype=torch.bfloat16, requires_grad=True)
    packed, w_scale = torch.ops.bitfx.weight_quant_stacked([w.detach()], [False])
    saved = []
    with saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = torch.ops.bitfx.bitlinear_stacked(x, g, [w], packed, w_scale, None, 1e-6, False, True, torch.bfloat16,
                                                normalize)[0]
    out.float().sum().backward()
    kinds = sorted((str(t.dtype).replace("torch.", ""), tuple(t.shape)) for t in saved)
    want = [("float32", (2, M)), ("float32", (N,)), ("int8", (2, M, K)), ("uint8", tuple(packed.shape))]
    if normalize:  # the norm's input, its weight (a parameter) and rstd
        want += [("bfloat16", (2, M, K)), ("bfloat16", (K,)), ("float32", (2, M))]
    else:  # rstd is zeros without a norm (kept so the backward's inputs have one form)
        want += [("float32", (2, M))]
    assert kinds == sorted(want)
    assert w.grad is not None and x.grad is not None


# ------------------------------------------------------------------ the traced backward: one node per dequantized weight


def _traced_backward(loss_fn, *args) -> torch.fx.Graph:
    """The ATen graph AOTAutograd traces for the backward of ``loss_fn(*args)`` (a scalar), the
    graph Inductor compiles under ``torch.compile``."""
    from functorch.compile import aot_function, make_boxed_func

    graphs = []

    def keep(gm, _):
        graphs.append(gm.graph)
        return make_boxed_func(gm.forward)

    aot_function(loss_fn, fw_compiler=lambda gm, _: make_boxed_func(gm.forward), bw_compiler=keep)(*args).backward()
    (graph,) = graphs
    return graph


def _assert_dequantized_by_the_op(graph: torch.fx.Graph, weights: int) -> None:
    """Each packed weight dequantized by one ``bitfx::dequantize`` node with its codes unvalidated
    (they were checked when packed), and no unpacking of 2-bit planes (shifts, masks) traced."""
    calls = [n for n in graph.nodes if n.op == "call_function"]
    dequantize = [n for n in calls if n.target is ops.dequantize.default]
    assert len(dequantize) == weights
    for n in dequantize:
        args = {a.name: v for a, v in zip(n.target._schema.arguments, n.args)} | dict(n.kwargs)
        assert args["validate_codes"] is False
    unpacking = sorted({str(n.target) for n in calls if "shift" in str(n.target) or "bitwise" in str(n.target)})
    assert unpacking == []


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("normalize", [True, False])
def test_bitlinear_stacked_backward_dequantizes_the_stack_in_one_node(device, normalize):
    """The input gradient ``dout (t / s_w)`` of a stack of two weights: one dequantization of the
    whole packed stack in the traced backward graph."""
    K, dtype = 40, torch.bfloat16
    x, g, W0, W1 = (_x(s, dtype, device, i).requires_grad_() for i, s in enumerate([(3, K), (K,), (5, K), (4, K)]))

    def loss(x, g, W0, W1):
        packed, scale = ops.weight_quant_stacked([W0, W1], [False, True])
        out = ops.bitlinear_stacked(x, g if normalize else None, [W0, W1], packed, scale, None, 1e-6, False, True,
                                    dtype, normalize)[0]
        return out.float().sum()

    _assert_dequantized_by_the_op(_traced_backward(loss, x, g, W0, W1), 1)


@pytest.mark.parametrize("device", DEVICES)
def test_ternary_linear_group_backward_dequantizes_each_weight_in_one_node(device):
    """``dy = sum_i dout_i (t_i / s_w_i)`` over two frozen packed weights: one dequantization node each."""
    K, dtype = 48, torch.float32
    packs, scales, _ = _frozen([20, 7], K, 12, device, per_channel=True)
    x, g = _x((2, 6, K), dtype, device, 10).requires_grad_(), _x((K,), dtype, device, 11).requires_grad_()

    def loss(x, g, *packed_and_scales):
        packed, scale = list(packed_and_scales[:2]), list(packed_and_scales[2:])
        outs = ops.ternary_linear_group(x, g, packed, scale, [], K, 1e-6, False, True, dtype, True, dtype)[0]
        return sum(o.sum() for o in outs)

    _assert_dequantized_by_the_op(_traced_backward(loss, x, g, *packs, *scales), 2)
