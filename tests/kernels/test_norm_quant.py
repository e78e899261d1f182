"""The fused RMSNorm + int8 quantization kernels against the eager reference.

Exact where the spec says exact (``act_quant``: codes and scales bit for bit), a stated
tolerance for the norm (its reduction order and rsqrt differ from torch's), and the norm's
backward (no kernel: :func:`bitfx.reference.rms_norm_backward`, what the training ops run on
every device, fed the kernel's ``rstd`` or torch's) against autograd of
:func:`bitfx.reference.rms_norm`.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from bitfx import reference as ref
from bitfx.kernels import norm_quant as nq
from tests.helpers import FLOAT_DTYPES, KERNEL_DEVICE, ULP, replay_in_cuda_graph

# Non-finite rows make the interpreter's numpy warn ("invalid value encountered"); that is the
# defined behaviour under test, not a problem.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

# The fp32 part of the norm's error, relative: both sides sum K squares in fp32 in a tree-like
# order (error ~ log2(K) * 2^-24); the rest (mean, 1 / sqrt, the products) is correctly rounded
# on both sides. 1e-5 is ~80 ulps: generous for that, small next to any real bug.
NORM_RTOL = 1e-5

SHAPE_K = st.one_of(st.integers(1, 300), st.sampled_from([1, 2, 3, 5, 7, 31, 97, 127, 131, 257, 293]))
MAGNITUDES = torch.tensor([1.0, 1e4, 1e-6, 0.0])


@contextlib.contextmanager
def row_block_limit(limit: int | None):
    """Make rows longer than ``limit`` take the chunked (multi-pass) path; None: the default."""
    saved = nq._MAX_ROW_BLOCK
    if limit is not None:
        nq._MAX_ROW_BLOCK = limit
    try:
        yield
    finally:
        nq._MAX_ROW_BLOCK = saved


def make_rows(M, K, dtype, seed, layout="contiguous", special_rows=False, device=KERNEL_DEVICE):
    """[M, K] activations on ``device``: randn, optionally with rows scaled by 1e4, 1e-6 or 0.

    ``layout``: contiguous; ``row_stride`` (a column slice with a row stride > K);
    ``every_other`` (``x[:, ::2]``, non-contiguous last dim); ``transposed`` (a ``.t()`` view).
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g)
    if special_rows and M > 0:
        x = x * MAGNITUDES[torch.randint(0, len(MAGNITUDES), (M,), generator=g)].unsqueeze(1)
    x = x.to(dtype)
    if layout == "row_stride":
        out = torch.zeros(M, K + 3, dtype=dtype, device=device)
        out[:, :K] = x
        return out[:, :K]
    if layout == "every_other":
        out = torch.zeros(M, 2 * K, dtype=dtype, device=device)
        out[:, ::2] = x
        return out[:, ::2]
    if layout == "transposed":
        return x.t().contiguous().to(device).t()
    return x.to(device)


def make_weight(K, dtype, seed, offset):
    g = torch.Generator().manual_seed(seed + 1)
    w = 0.5 * torch.randn(K, generator=g) + (0.0 if offset else 1.0)
    return w.to(dtype).to(KERNEL_DEVICE)


@st.composite
def norm_cases(draw, max_m=64):
    M = draw(st.integers(0, max_m))
    K = draw(SHAPE_K)
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    has_weight = draw(st.booleans())
    w_dtype = draw(st.sampled_from([dtype, torch.float32])) if has_weight else None
    offset = draw(st.booleans())
    cbw = draw(st.booleans())
    default_norm_dtype = ref.norm_dtype_for(dtype, w_dtype, cbw)
    norm_dtype = draw(st.sampled_from([default_norm_dtype, *FLOAT_DTYPES]))
    eps = draw(st.sampled_from([1e-6, 1e-5, 0.0]))
    layout = draw(st.sampled_from(["contiguous", "row_stride", "every_other", "transposed"]))
    special_rows = draw(st.booleans())
    chunked = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    return dict(
        M=M, K=K, dtype=dtype, has_weight=has_weight, w_dtype=w_dtype, offset=offset, cbw=cbw,
        norm_dtype=norm_dtype, eps=eps, layout=layout, special_rows=special_rows, chunked=chunked, seed=seed,
    )  # fmt: skip


def _case(M=1, K=1, dtype=torch.float32, **kw):
    base = dict(
        M=M, K=K, dtype=dtype, has_weight=True, w_dtype=dtype, offset=False, cbw=True, norm_dtype=dtype,
        eps=1e-6, layout="contiguous", special_rows=False, chunked=False, seed=0,
    )  # fmt: skip
    base.update(kw)
    return base


def _rel_y(case) -> float:
    """Relative error bound of the kernel's y against the reference's, per element.

    The fp32 part (NORM_RTOL), plus one ulp of each dtype y is rounded to: the kernel's and the
    reference's fp32 values may straddle a rounding midpoint and round to neighbouring values.
    """
    rel = NORM_RTOL
    if case["cbw"] and case["dtype"] != torch.float32:
        rel += ULP[case["dtype"]]
    if case["norm_dtype"] != torch.float32:
        rel += ULP[case["norm_dtype"]]
    return rel


def run_norm_quant(case, device=KERNEL_DEVICE):
    x = make_rows(case["M"], case["K"], case["dtype"], case["seed"], case["layout"], case["special_rows"], device)
    w = make_weight(case["K"], case["w_dtype"], case["seed"], case["offset"]) if case["has_weight"] else None
    with row_block_limit(32 if case["chunked"] else None):
        q, s, rstd = nq.norm_quant(x, w, case["eps"], case["offset"], case["cbw"], case["norm_dtype"])
    return x, w, q, s, rstd


def check_norm_quant(case, x, w, q, s, rstd):
    """The properties the fused kernel must have, against the reference on CPU."""
    M, K = case["M"], case["K"]
    assert q.shape == (M, K) and q.dtype == torch.int8
    assert s.shape == (M,) and s.dtype == torch.float32
    assert rstd.shape == (M,) and rstd.dtype == torch.float32
    q, s, rstd = q.cpu(), s.cpu(), rstd.cpu()
    xc, wc = x.cpu(), None if w is None else w.cpu()
    kw = dict(offset=case["offset"], cast_before_weight=case["cbw"], norm_dtype=case["norm_dtype"])
    y_ref = ref.rms_norm(xc, wc, case["eps"], **kw).float()
    s_ref = ref.act_quant(y_ref)[1]
    rstd_ref = torch.rsqrt(xc.float().pow(2).mean(-1) + case["eps"])
    torch.testing.assert_close(rstd, rstd_ref, rtol=NORM_RTOL, atol=0.0, equal_nan=True)

    # Rows the reference calls non-finite are non-finite here too: NaN scale, zero codes.
    bad = torch.isnan(s_ref)
    assert torch.equal(torch.isnan(s), bad)
    assert not q[bad].any()

    # Scales: 127 / amax, and amax carries y's relative error.
    rel = _rel_y(case)
    good = ~bad
    torch.testing.assert_close(s[good], s_ref[good], rtol=1.01 * rel, atol=0.0)

    # Codes: q is round(y * s) for a y within rel of the reference's. Given the kernel's own
    # scale, |q - y_ref * s| <= 0.5 + (that relative error of y * s), element by element.
    v = y_ref[good] * s[good].unsqueeze(1)
    err = (q[good].float() - v).abs()
    assert (err <= 0.5 + rel * v.abs() * 1.01 + 1e-6).all(), err.max()
    # ... and codes other than round(y_ref * s) occur only at rounding boundaries: rare (seen:
    # a handful in 10^6 elements; allowed: 0.1%).
    mismatches = (q[good].float() != torch.round(v).clamp(-128, 127)).sum().item()
    assert mismatches <= max(2, q.numel() // 1000), mismatches


@given(norm_cases())
@example(_case(M=0, K=5))
@example(_case(M=1, K=1))
@example(_case(M=3, K=1, dtype=torch.bfloat16, has_weight=False, layout="transposed"))
@example(_case(M=4, K=131, dtype=torch.float16, offset=True, cbw=False, chunked=True, layout="every_other"))
@example(_case(M=8, K=97, dtype=torch.bfloat16, special_rows=True, eps=0.0, layout="row_stride"))
def test_norm_quant_matches_reference(case):
    check_norm_quant(case, *run_norm_quant(case))


def test_norm_quant_k0():
    x = torch.empty(3, 0, device=KERNEL_DEVICE)
    q, s, rstd = nq.norm_quant(x, None, 1e-6, False, True, torch.float32)
    q_ref, s_ref = ref.norm_quant(x.cpu())
    assert q.shape == (3, 0) and torch.equal(s.cpu(), s_ref)
    assert torch.isnan(rstd).all()


@st.composite
def quant_inputs(draw, max_m=64):
    M = draw(st.integers(0, max_m))
    K = draw(SHAPE_K)
    dtype = draw(st.sampled_from(FLOAT_DTYPES + (torch.float64,)))
    layout = draw(st.sampled_from(["contiguous", "row_stride", "every_other", "transposed"]))
    seed = draw(st.integers(0, 2**31 - 1))
    y = make_rows(M, K, dtype, seed, layout, special_rows=draw(st.booleans()))
    if M > 0 and draw(st.booleans()):
        # Poison a few elements with NaN, +Inf or -Inf.
        g = torch.Generator().manual_seed(seed + 2)
        n = draw(st.integers(1, 3))
        rows_, cols = torch.randint(0, M, (n,), generator=g), torch.randint(0, K, (n,), generator=g)
        vals = torch.tensor([float("nan"), float("inf"), float("-inf")])[torch.randint(0, 3, (n,), generator=g)]
        y[rows_, cols] = vals.to(dtype).to(y.device)
    return y, draw(st.booleans())


def assert_same(q, q_ref, s, s_ref):
    """Codes and scales bit for bit (NaN scales compare equal)."""
    assert torch.equal(q.cpu(), q_ref)
    torch.testing.assert_close(s.cpu(), s_ref, rtol=0.0, atol=0.0, equal_nan=True)


def _exact_ties(dtype):
    """Rows whose y * s lands exactly on .5 ties (amax 127 gives s = 1): round half to even."""
    k = torch.arange(-127, 128, dtype=torch.float64)
    y = torch.stack([k, k + 0.5 * (k.abs() < 127)])  # second row: ties k + 0.5, amax still 127
    return y.to(dtype).to(KERNEL_DEVICE)


@given(quant_inputs())
@example((torch.empty(0, 7, device=KERNEL_DEVICE), False))
@example((torch.ones(1, 1, device=KERNEL_DEVICE), False))
@example((torch.zeros(2, 1, device=KERNEL_DEVICE), True))
@example((_exact_ties(torch.float32), False))
@example((_exact_ties(torch.bfloat16), True))
def test_act_quant_is_exact(case):
    y, chunked = case
    with row_block_limit(32 if chunked else None):
        q, s = nq.act_quant(y)
    q_ref, s_ref = ref.act_quant(y.cpu())
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    assert_same(q, q_ref, s, s_ref)


def test_act_quant_round_half_even():
    # amax 127 -> s_x = 127 * fl(1 / 127), exactly 1 in fp32: 2.5, -0.5, 126.5, ... are ties.
    y = torch.tensor([[127.0, 2.5, -0.5, 126.5, 1.5, -3.5, 0.49999997, -127.0]], device=KERNEL_DEVICE)
    q, s = nq.act_quant(y)
    q_ref, s_ref = ref.act_quant(y.cpu())
    assert_same(q, q_ref, s, s_ref)


@given(norm_cases())
def test_quantizing_the_reference_norm_is_exact(case):
    # Given the same y (the reference's norm output), the quantization step is bit for bit.
    x = make_rows(case["M"], case["K"], case["dtype"], case["seed"], case["layout"], case["special_rows"])
    w = make_weight(case["K"], case["w_dtype"], case["seed"], case["offset"]) if case["has_weight"] else None
    kw = dict(offset=case["offset"], cast_before_weight=case["cbw"], norm_dtype=case["norm_dtype"])
    y = ref.rms_norm(x.cpu(), None if w is None else w.cpu(), case["eps"], **kw)
    q, s = nq.act_quant(y.to(KERNEL_DEVICE))
    q_ref, s_ref = ref.norm_quant(x.cpu(), None if w is None else w.cpu(), case["eps"], **kw)
    assert_same(q, q_ref, s, s_ref)


def test_norm_quant_nonfinite_rows():
    x = make_rows(6, 40, torch.float32, seed=3)
    x[1, 7] = float("nan")
    x[3, 0] = float("inf")
    x[4, 39] = float("-inf")
    w = make_weight(40, torch.float32, 3, False)
    for chunked in (False, True):
        bad = torch.tensor([False, True, False, True, True, False])
        # Both calls take the same path: the chunked and whole-row paths sum the squares in a
        # different order, so their rstd (and hence s_x) may differ by an ulp on the GPU.
        with row_block_limit(32 if chunked else None):
            q, s, _ = nq.norm_quant(x, w, 1e-6, False, True, torch.float32)
            # The other rows are those of the same input without the poisoned rows.
            q_ok, s_ok, _ = nq.norm_quant(x[~bad.to(x.device)], w, 1e-6, False, True, torch.float32)
        assert torch.equal(torch.isnan(s.cpu()), bad)
        assert not q.cpu()[bad].any()
        assert torch.equal(q.cpu()[~bad], q_ok.cpu()) and torch.equal(s.cpu()[~bad], s_ok.cpu())


def test_norm_quant_fp16_overflow_is_nonfinite():
    # y = r * g overflows fp16: the row's y holds Inf, so scale NaN and zero codes, as the reference.
    x = torch.ones(2, 4, dtype=torch.float16, device=KERNEL_DEVICE)
    w = torch.tensor([1.0, 1.0, 1.0, 1e5], device=KERNEL_DEVICE)
    q, s, _ = nq.norm_quant(x, w, 1e-6, False, False, torch.float16)
    q_ref, s_ref = ref.norm_quant(x.cpu(), w.cpu(), 1e-6, cast_before_weight=False, norm_dtype=torch.float16)
    assert torch.isnan(s_ref).all()
    assert_same(q, q_ref, s, s_ref)


# ---------------------------------------------------------------- backward


@st.composite
def backward_cases(draw, max_m=64):
    case = draw(norm_cases(max_m))
    # The backward is compared in fp32 and in bf16 (x, weight and dy all of that dtype).
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    case.update(dtype=dtype, w_dtype=dtype if case["has_weight"] else None)
    case["norm_dtype"] = ref.norm_dtype_for(dtype, case["w_dtype"], case["cbw"])
    case["use_kernel_rstd"] = draw(st.booleans())
    return case


def check_backward(case, device=KERNEL_DEVICE):
    M, K, dtype = case["M"], case["K"], case["dtype"]
    x = make_rows(M, K, dtype, case["seed"], case["layout"], device=device)
    w = make_weight(K, case["w_dtype"], case["seed"], case["offset"]) if case["has_weight"] else None
    g = torch.Generator().manual_seed(case["seed"] + 3)
    dy = torch.randn(M, K, generator=g).to(case["norm_dtype"])
    kw = dict(offset=case["offset"], cast_before_weight=case["cbw"], norm_dtype=case["norm_dtype"])

    # Oracle: autograd of the reference on CPU.
    xr = x.cpu().clone().requires_grad_(True)
    wr = None if w is None else w.cpu().clone().requires_grad_(True)
    ref.rms_norm(xr, wr, case["eps"], **kw).backward(dy)

    # The rstd the training ops hand the backward: the kernel's (CUDA) or torch's (the reference front).
    if case["use_kernel_rstd"]:
        with row_block_limit(32 if case["chunked"] else None):
            _, _, rstd = nq.norm_quant(x, w, case["eps"], case["offset"], case["cbw"], case["norm_dtype"])
    else:
        rstd = torch.rsqrt(x.float().pow(2).mean(-1) + case["eps"])
    dx, dw = ref.rms_norm_backward(dy.to(device), x, w, rstd, case["offset"], case["cbw"])
    assert dx.shape == (M, K) and dx.dtype == dtype
    assert dw.shape == (K,) and dw.dtype == torch.float32
    if w is None:
        assert not dw.any()  # zeros: there is no weight

    # dx = rstd * (u - r * c) cancels; bound the error by the size of the terms, per row:
    # scale = rstd * max(|u| + |r * c|). fp32: NORM_RTOL of that (c is a tree-ordered fp32
    # mean on both sides, as the forward's mean(x^2)). Low precision: the backward
    # and autograd each round dx to x.dtype, and autograd also rounds u to x.dtype on its way
    # through the r.to(x.dtype) cast: 3 ulps.
    xf, dyf = x.cpu().double(), dy.double()
    rs = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + case["eps"])
    r = xf * rs
    geff = 1.0 if w is None else (1.0 + w.cpu().double() if case["offset"] else w.cpu().double())
    u = dyf * geff
    c = (r * u).mean(-1, keepdim=True)
    scale = rs * (u.abs() + (r * c).abs()).amax(-1, keepdim=True) if K else rs
    tol = NORM_RTOL + (3 * ULP[dtype] if dtype != torch.float32 else 0.0)
    err = (dx.cpu().double() - xr.grad.double()).abs()
    assert (err <= tol * scale + 1e-30).all(), (err / scale).max()

    if w is not None:
        # dweight = sum_rows dy * r: an fp32 sum of M terms in any order errs by at most
        # M * 2^-24 of sum |dy * r|, on each side (plus NORM_RTOL for r); autograd rounds its result
        # to the weight's dtype (half an ulp of it), and with cast_before_weight both sides
        # round r to x.dtype (a neighbour at a midpoint: one ulp of one term).
        assert dw.dtype == torch.float32 and dw.shape == (K,)
        mag = (dyf * r).abs().sum(0)
        tol_w = NORM_RTOL + 2 * M * 2.0**-24 + (ULP[dtype] if dtype != torch.float32 else 0.0)
        err_w = (dw.cpu().double() - wr.grad.double()).abs()
        assert (err_w <= tol_w * mag + ULP[case["w_dtype"]] * wr.grad.double().abs() + 1e-30).all()


@given(backward_cases())
@example(dict(_case(M=0, K=5), use_kernel_rstd=False))
@example(dict(_case(M=1, K=1), use_kernel_rstd=True))
@example(dict(_case(M=7, K=1, dtype=torch.bfloat16, norm_dtype=torch.bfloat16), use_kernel_rstd=False))
@example(dict(_case(M=9, K=131, offset=True, chunked=True, layout="every_other"), use_kernel_rstd=True))
@example(dict(_case(M=5, K=100, dtype=torch.bfloat16, norm_dtype=torch.bfloat16, chunked=True), use_kernel_rstd=False))
def test_rms_norm_backward_matches_autograd(case):
    check_backward(case)


# ---------------------------------------------------------------- bad input


def test_bad_input_messages():
    dev = KERNEL_DEVICE
    x = torch.randn(4, 6, device=dev)
    w = torch.randn(6, device=dev)
    with pytest.raises(TypeError, match=r"norm_quant: x must be one of float32, float16, bfloat16, got int32"):
        nq.norm_quant(torch.ones(4, 6, dtype=torch.int32, device=dev), w, 1e-6, False, True, torch.float32)
    with pytest.raises(TypeError, match=r"act_quant: y must be one of .* got int8"):
        nq.act_quant(torch.ones(4, 6, dtype=torch.int8, device=dev))
    with pytest.raises(ValueError, match=r"norm weight has 5 elements but x has K=6"):
        nq.norm_quant(x, torch.randn(5, device=dev), 1e-6, False, True, torch.float32)
    with pytest.raises(ValueError, match=r"norm weight must be 1-D"):
        nq.norm_quant(x, torch.randn(1, 6, device=dev), 1e-6, False, True, torch.float32)
    with pytest.raises(TypeError, match=r"norm weight must be one of .* got int64"):
        nq.norm_quant(x, torch.ones(6, dtype=torch.int64, device=dev), 1e-6, False, True, torch.float32)
    with pytest.raises(ValueError, match=r"all tensors must be on one device"):
        nq.norm_quant(x, torch.randn(6, device="meta"), 1e-6, False, True, torch.float32)
    for shape in [(6,), (2, 3, 6)]:
        with pytest.raises(ValueError, match=r"x must be 2-D, got shape"):
            nq.norm_quant(torch.randn(shape, device=dev), w, 1e-6, False, True, torch.float32)
        with pytest.raises(ValueError, match=r"y must be 2-D, got shape"):
            nq.act_quant(torch.randn(shape, device=dev))
    with pytest.raises(TypeError, match=r"norm_dtype must be one of"):
        nq.norm_quant(x, w, 1e-6, False, True, torch.int8)


# ---------------------------------------------------------------- on the GPU, at model sizes


@pytest.mark.cuda
@given(norm_cases(max_m=512), st.sampled_from([1, 7, 2048, 4095, 8192, 16384, 20000]))
def test_norm_quant_large_cuda(case, K):
    case.update(K=K, chunked=False)  # K = 20000 takes the chunked path by itself
    check_norm_quant(case, *run_norm_quant(case))


@pytest.mark.cuda
@given(
    st.integers(0, 512),
    st.sampled_from([1, 4095, 8192, 20000]),
    st.sampled_from(FLOAT_DTYPES),
    st.integers(0, 2**31 - 1),
)
def test_act_quant_large_cuda(M, K, dtype, seed):
    y = make_rows(M, K, dtype, seed, special_rows=True)
    if M:
        y[0, K // 2] = float("nan")
    q, s = nq.act_quant(y)
    q_ref, s_ref = ref.act_quant(y.cpu())
    assert_same(q, q_ref, s, s_ref)


@pytest.mark.cuda
@given(backward_cases(max_m=512), st.sampled_from([1, 2048, 4095, 8192, 12000, 20000]))
def test_rms_norm_backward_large_cuda(case, K):
    case.update(K=K, chunked=False)  # K = 20000: the kernel's rstd from the chunked path
    check_backward(case)


@pytest.mark.cuda
def test_bf16_rounding_codes_agree():
    """``_round_to`` code 3 (the GPU's cvt.rn.bf16.f32) and code 2 (rounding on the bits, for
    the interpreter) give the same fp32 value for every input: ties, subnormals, overflow to
    inf, infinities, NaN, and random bit patterns over the whole fp32 range."""
    import triton
    import triton.language as tl

    @triton.jit
    def _apply(x_ptr, out_ptr, n, CODE: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        tl.store(out_ptr + offs, nq._round_to(tl.load(x_ptr + offs, mask=m), CODE), mask=m)

    g = torch.Generator().manual_seed(0)
    bits = torch.randint(-(2**31), 2**31 - 1, (1 << 20,), generator=g, dtype=torch.int64).to(torch.int32)
    special = torch.tensor([0x3F808000, 0x3F818000, 0x3F80FFFF, 0x00000001, 0x00008000, 0x00018000, 0x807F8000,
                            0x7F7F8000, 0x7F7FFFFF, 0xFF7F8000, 0x7F800000, 0xFF800000, 0x7FC00000, 0x7F800001,
                            0x80000000, 0x00000000], dtype=torch.int64).to(torch.int32)
    x = torch.cat([special, bits]).view(torch.float32).cuda()
    outs = []
    for code in (2, 3):
        out = torch.empty_like(x)
        _apply[(triton.cdiv(x.numel(), 1024),)](x, out, x.numel(), CODE=code, BLOCK=1024)
        outs.append(out.cpu())
    a, b = outs
    assert torch.equal(torch.isnan(a), torch.isnan(b))
    ok = ~torch.isnan(a)
    assert torch.equal(a[ok].view(torch.int32), b[ok].view(torch.int32))
    # and both are torch's own rounding to bf16
    want = x.cpu().to(torch.bfloat16).to(torch.float32)
    assert torch.equal(a[ok].view(torch.int32), want[ok].view(torch.int32))


@pytest.mark.cuda
def test_pdl_norms_after_gemv_in_cuda_graph_read_fresh_rows():
    """The norm kernel is launched with programmatic dependent launch: it may start while the
    GEMV before it still runs (the dp4a GEMV lets its dependents launch at once), and must wait
    for that GEMV's output before reading it. Inside a CUDA graph, each GEMV here follows a copy
    of new activation codes, and the three norm kernels (``norm_quant``, the residual add's and
    the gated activation's) read its output at once: every result must be that of the new
    values, bit for bit what the same kernels give outside a graph with PDL turned off."""
    from bitfx.kernels import _utils
    from bitfx.kernels.ternary_matmul import ternary_matmul

    if not _utils.pdl_enabled(torch.device("cuda")):
        pytest.skip("programmatic dependent launch needs compute capability 9.0")
    K, N = 8192, 4096  # 8 MB of packed weight: the GEMV runs for microseconds
    g = torch.Generator().manual_seed(0)
    packed = ref.pack_ternary(torch.randint(-1, 2, (2 * N, K), generator=g, dtype=torch.int8)).cuda()
    w_scale = (torch.rand(2 * N, generator=g) + 0.5).cuda()
    weight = (torch.rand(N, generator=g) + 0.5).to(torch.bfloat16).cuda()
    resid = torch.randn(1, N, generator=g).to(torch.bfloat16).cuda()
    sources = [(torch.randint(-128, 128, (1, K), generator=g, dtype=torch.int8).cuda(),
                (torch.rand(1, generator=g) + 0.5).cuda()) for _ in range(3)]
    q_buf, s_buf = torch.empty_like(sources[0][0]), torch.empty_like(sources[0][1])

    def chain():
        y = ternary_matmul(q_buf, s_buf, packed, w_scale, None, torch.bfloat16)  # [1, 2N]
        a = nq.norm_quant(y[:, :N], weight, 1e-6, False, True, torch.bfloat16)
        y = ternary_matmul(q_buf, s_buf, packed, w_scale, None, torch.bfloat16)
        b = nq.add_norm_quant(y[:, :N], resid, weight, 1e-6, False, True, torch.bfloat16)
        y = ternary_matmul(q_buf, s_buf, packed, w_scale, None, torch.bfloat16)
        c = nq.glu_quant(y[:, :N], y[:, N:], "silu", weight, 1e-6, False, True, torch.bfloat16, True)
        return [t for t in (*a, *b, *c) if t is not None]

    want = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BITFX_PDL", "0")
        for q, s in sources:
            q_buf.copy_(q)
            s_buf.copy_(s)
            want.append([t.clone() for t in chain()])
    outs = [[torch.empty_like(t) for t in w] for w in want]
    assert nq._constexprs(resid, weight, False, True, torch.bfloat16, True, 127, False, 1, 1024, True)["PDL_WAIT"]

    def step():
        for (q, s), out in zip(sources, outs):
            q_buf.copy_(q)
            s_buf.copy_(s)
            for o, t in zip(out, chain()):
                o.copy_(t)

    replay_in_cuda_graph(step, [o for out in outs for o in out])
    for out, w in zip(outs, want):
        for o, t in zip(out, w):
            assert torch.equal(o, t)
