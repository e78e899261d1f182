"""The int8 head: per-row int8 weight quantization (bitfx.reference.int8_rows) and the int8
weight-only linear kernels (bitfx.kernels.int8_gemv) against int8_linear.

Tolerance. Both sides compute ``out = rn_d(fl(sum_k x_k q_k) * s + b)`` with every operation
in fp32 and ``rn_d`` the final rounding to the output dtype ``d``; they differ in the order of
the fp32 sum (and in fusing a product with the following add). The products ``x_k q_k`` are
exact for bf16/fp16 x (at most 8 + 7 or 11 + 7 significant bits) and rounded once for fp32 x.
Whatever the order, a sum of K products followed by the scale and the bias is at most K + 2
roundings away from the exact value, each of relative size at most u = 2^-24 (2u where a
tensor core truncates instead of rounding), of the magnitudes involved, so each side's fp32
value lies within (K + 2) 2u S of the exact one, with

    S[m, n] = s[n] sum_k |x[m, k]| |q[n, k]| + |b[n]|            (computed in fp64)

and the two fp32 values within B = 4 (K + 2) u S of each other. The final roundings add at
most half an ulp of ``d`` each: ``ulp_d(v) / 2 <= ULP[d] |v| / 2`` above the subnormal range,
one subnormal step below it. Hence, element by element,

    |out - ref| <= B + ULP[d] (|ref| + B) + SUBNORMAL_STEP[d]

with NaN where the reference has NaN. A real fault (a K step skipped, a row's scale or bias
mixed up, a wrong column) moves an element by about S / K or more: 60 times B at K = 257.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from bitfx import reference as ref
from bitfx.kernels import int8_gemv as ig
from bitfx.kernels.int8_gemv import int8_linear
from bitfx.layout import SCALE_FLOOR
from tests.helpers import FLOAT_DTYPES, KERNEL_DEVICE, ULP

DEV = KERNEL_DEVICE
CUDA = DEV.type == "cuda"
U = 2.0**-24
SUBNORMAL_STEP = {torch.float32: 2.0**-149, torch.float16: 2.0**-24, torch.bfloat16: 2.0**-133}

pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")  # NaN on purpose


def _operands(lead, N, K, dtype, seed, bias=False, device=DEV):
    """x [*lead, K] (values of a few units, as a head's normalized input), an int8 weight made by
    int8_rows from a random float [N, K] with row magnitudes over four decades, a bias or None."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*lead, K, generator=g) * 2).to(dtype)
    W = torch.randn(N, K, generator=g) * 10.0 ** (torch.rand(N, 1, generator=g) * 4 - 3)
    q, s = ref.int8_rows(W)
    b = (torch.randn(N, generator=g) * 4).to(dtype) if bias else None
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return to(x), to(q), to(s), to(b)


def assert_matches_reference(got, x, q, s, b):
    """The bound of the module docstring, element by element."""
    x, q, s, b = (None if t is None else t.cpu() for t in (x, q, s, b))
    want = ref.int8_linear(x, q, s, b)
    assert got.dtype == want.dtype == x.dtype and got.shape == want.shape, (got.dtype, got.shape, want.shape)
    K = q.shape[1]
    S = (x.double().abs().reshape(-1, K) @ q.double().abs().t()) * s.double()
    if b is not None:
        S = S + b.double().abs()
    S = S.reshape(want.shape)
    g, w = got.cpu().double(), want.double()
    B = 4 * (K + 2) * U * S
    tol = B + ULP[want.dtype] * (w.abs() + B) + SUBNORMAL_STEP[want.dtype]
    ok = ((g - w).abs() <= tol) | (g.isnan() & w.isnan())
    if not bool(ok.all()):
        i = tuple((~ok).nonzero()[0].tolist())
        raise AssertionError(f"out{list(i)} = {g[i].item()!r}, reference {w[i].item()!r}, tolerance {tol[i].item()!r}; "
                             f"{int((~ok).sum())} of {ok.numel()} elements out of bounds")


# ----------------------------------------------------------------------------------------------
# int8_rows
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_int8_rows_codes_scales_and_round_trip(dtype):
    g = torch.Generator().manual_seed(1)
    N, K = 9, 70
    W = torch.randn(N, K, generator=g) * 10.0 ** torch.linspace(-4, 3, N).unsqueeze(1)
    W[2] = 0.0  # a zero row
    W[5] = W[5] * 1e-9  # a row below the floor
    W[6, 3] = -W[6].abs().max() * 2  # the row's absmax is a negative value
    W = W.to(dtype)
    q, s = ref.int8_rows(W)
    assert q.dtype == torch.int8 and q.shape == (N, K) and q.is_contiguous()
    assert s.dtype == torch.float32 and s.shape == (N,) and s.is_contiguous()
    assert int(q.min()) >= -127 and int(q.max()) <= 127
    amax = W.float().abs().amax(dim=1)
    torch.testing.assert_close(s, amax.clamp(min=SCALE_FLOOR) / 127, rtol=0, atol=0)
    full = amax >= SCALE_FLOOR
    assert torch.equal(q.abs().amax(dim=1)[full], torch.full((int(full.sum()),), 127, dtype=torch.int8))
    assert q[6, 3] == -127
    assert torch.equal(q[2], torch.zeros(K, dtype=torch.int8)) and s[2] == SCALE_FLOOR / 127
    assert int(q[5].abs().max()) < 127  # under the floor: the floor's scale, small codes
    # W / s in fp32 is rounded once (relative u on a value <= 127.5: under 2^-17 codes), then
    # rounded to the nearest code: each element is back within half a scale step (+ that).
    err = (q.double() * s.double().unsqueeze(1) - W.double()).abs()
    assert bool((err <= s.double().unsqueeze(1) * (0.5 + 2.0**-17)).all()), err.max()


def test_int8_rows_rounds_half_to_even():
    W = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -2.5, 126.5, -3.49]])  # scale exactly 1
    q, s = ref.int8_rows(W)
    assert s.item() == 1.0
    assert q.tolist() == [[127, 0, 2, 2, 0, -2, 126, -3]]


def test_int8_rows_of_an_empty_weight():
    q, s = ref.int8_rows(torch.zeros(3, 0))
    assert q.shape == (3, 0) and torch.equal(s, torch.full((3,), SCALE_FLOOR / 127))
    q, s = ref.int8_rows(torch.zeros(0, 5))
    assert q.shape == (0, 5) and s.shape == (0,)


@pytest.mark.parametrize("weight,match", [
    (torch.ones(4), "2-D"),
    (torch.ones(2, 3, 4), "2-D"),
    (torch.ones(2, 3, dtype=torch.int32), "float weight"),
    (torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), r"finite.*row 0, column 1"),
    (torch.tensor([[1.0, 2.0], [float("-inf"), 1.0]]), r"finite.*row 1, column 0"),
])
def test_int8_rows_refuses_bad_weights(weight, match):
    with pytest.raises(ValueError, match=match):
        ref.int8_rows(weight)


# ----------------------------------------------------------------------------------------------
# The kernels against the reference
# ----------------------------------------------------------------------------------------------

# M -> the leading dimensions of x: 2-D and 3-D, zero rows among more dimensions too. M <= GEMV_MAX_M
# (2) takes the GEMV, more rows the tensor-core kernel.
LEAD = {0: (2, 0), 1: (1,), 2: (1, 2), 3: (3, 1), 4: (2, 2), 5: (5,), 16: (4, 4), 17: (17,), 40: (2, 20)}


@pytest.mark.parametrize("M", sorted(LEAD))
@pytest.mark.parametrize("K", [1, 100, 257])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_both_kernels_match_the_reference(M, K, dtype):
    N = 37 if not CUDA else 1001  # odd: a partial block of rows
    for bias in (False, True):
        x, q, s, b = _operands(LEAD[M], N, K, dtype, seed=M * 1000 + K, bias=bias)
        got = int8_linear(x, q, s, b)
        assert got.shape == (*LEAD[M], N)
        assert_matches_reference(got, x, q, s, b)


@st.composite
def problems(draw):
    M = draw(st.one_of(st.sampled_from([0, 1, 2, 5, 16, 17, 33]), st.integers(0, 40)))
    return dict(
        M=M,
        N=draw(st.one_of(st.sampled_from([1, 2, 15, 16, 17, 33]), st.integers(1, 48))),
        K=draw(st.one_of(st.sampled_from([1, 15, 16, 17, 31, 32, 33, 63, 64, 65]), st.integers(1, 96))),
        dtype=draw(st.sampled_from(FLOAT_DTYPES)),
        bias=draw(st.booleans()),
        three_d=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@given(p=problems())
@example(p=dict(M=16, N=1, K=1, dtype=torch.float32, bias=True, three_d=False, seed=0))
@example(p=dict(M=17, N=33, K=65, dtype=torch.bfloat16, bias=False, three_d=True, seed=1))
def test_fuzzed_shapes_match_the_reference(p):
    M, N, K = p["M"], p["N"], p["K"]
    lead = (1, M) if p["three_d"] else (M,)
    x, q, s, b = _operands(lead, N, K, p["dtype"], seed=p["seed"], bias=p["bias"])
    assert_matches_reference(int8_linear(x, q, s, b), x, q, s, b)


@pytest.mark.parametrize("M", [2, 20])
def test_strided_and_one_dimensional_activations(M):
    """Rows of a wider buffer (read in place), a transposed x (copied) and a single 1-D row."""
    N, K = 21, 48
    x, q, s, b = _operands((M,), N, K + 8, torch.bfloat16, seed=M, bias=True)
    x, q = x[:, 3:K + 3], q[:, :K].contiguous()
    assert not x.is_contiguous()
    assert_matches_reference(int8_linear(x, q, s, b), x, q, s, b)
    xt = x.t().contiguous().t()
    assert xt.stride(-1) != 1
    assert_matches_reference(int8_linear(xt, q, s, b), xt, q, s, b)
    assert_matches_reference(int8_linear(x[0], q, s, b), x[0], q, s, b)


def test_nan_rows_stay_nan():
    """A NaN activation makes its whole output row NaN (NaN times a zero code too), on both kernels."""
    for M in (2, 18):
        x, q, s, b = _operands((M,), 19, 40, torch.float32, seed=M)
        x[1, 7] = float("nan")
        got = int8_linear(x, q, s, b).cpu()
        assert bool(got[1].isnan().all()) and not bool(got[0].isnan().any())
        assert_matches_reference(got, x, q, s, b)


def test_empty_outputs():
    x, q, s, _ = _operands((3,), 5, 8, torch.float16, seed=0)
    out = int8_linear(x, q[:0], s[:0])
    assert out.shape == (3, 0) and out.dtype == torch.float16
    x0 = torch.zeros(2, 0, 3, 8, dtype=torch.float16, device=DEV)
    assert int8_linear(x0, q, s).shape == (2, 0, 3, 5)


# ----------------------------------------------------------------------------------------------
# Input validation
# ----------------------------------------------------------------------------------------------


def test_bad_arguments_are_refused(monkeypatch):
    x, q, s, b = _operands((2,), 6, 16, torch.bfloat16, seed=0, bias=True)
    bad = [
        ((x.to(torch.float64), q, s), TypeError, "activations x must be one of"),
        ((x.to(torch.int8), q, s), TypeError, "activations x"),
        ((x, q.to(torch.int16), s), TypeError, "int8 weight qweight must be one of int8"),
        ((x, q.float(), s), TypeError, "int8 weight"),
        ((x, q, s.half()), TypeError, "weight scale must be one of float32"),
        ((x[:, :15], q, s), ValueError, r"last dimension to be K = 16"),
        ((x, q[:, :8], s), ValueError, r"last dimension to be K = 8"),
        ((x, q.reshape(-1), s), ValueError, "2-D"),
        ((x, q, s[:5]), ValueError, r"weight scale has shape \(5,\), expected \(6,\)"),
        ((x, q, s, b[:4]), ValueError, r"bias has shape \(4,\), expected \(6,\)"),
        ((x, q, s, b.to(torch.int32)), TypeError, "bias must be one of"),
        ((x[0, 0], q, s), ValueError, "last dimension"),
    ]
    for args, err, match in bad:
        with pytest.raises(err, match=match):
            int8_linear(*args)
    # Non-contiguous weights: a transposed copy and a column slice (rows not K apart).
    qt = q.t().contiguous().t()
    wide = torch.zeros(6, 32, dtype=torch.int8, device=DEV)
    for w in (qt, wide[:, :16]):
        with pytest.raises(ValueError, match="int8 weight must be contiguous"):
            int8_linear(x, w, s)
    # Devices: CPU tensors need the interpreter; one device for all.
    if CUDA:
        with pytest.raises(ValueError, match="one device"):
            int8_linear(x.cpu(), q, s)
    else:
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match="need CUDA tensors"):
            int8_linear(x, q, s)


# ----------------------------------------------------------------------------------------------
# The launch rules (host code only)
# ----------------------------------------------------------------------------------------------


def test_gemv_blocks_follow_the_gpu_not_a_table(monkeypatch):
    """16 bytes a thread per row and step, steps of up to 512 bytes, BLOCK_N one or two passes of
    the threads over the rows, doubled only while N still gives every SM _WAVES programs."""
    monkeypatch.setattr(ig, "interpreting", lambda: False)  # the GPU's rule (the interpreter shrinks blocks)
    dev = torch.device("cpu")
    for sms in (4, 132):
        for N, K in [(128256, 2560), (32000, 4096), (256000, 8192), (151936, 3584), (1000, 100), (7, 1)]:
            cfg = ig.gemv_config(1, N, K, dev, sms=sms)
            threads = 32 * cfg["num_warps"]
            assert cfg["BLOCK_K"] == min(512, max(16, ig.next_pow2(K)))
            rows = threads * 16 // cfg["BLOCK_K"]
            assert cfg["BLOCK_N"] in (rows, 2 * rows)
            if cfg["BLOCK_N"] == 2 * rows:
                assert ig.cdiv(N, cfg["BLOCK_N"]) >= ig._WAVES * sms
            elif ig.cdiv(N, 2 * rows) >= ig._WAVES * sms:
                raise AssertionError(f"N={N}, K={K}, {sms} SMs: {cfg['BLOCK_N']} rows a program, room for more")
            assert cfg["EVEN_K"] == (K % cfg["BLOCK_K"] == 0)
    # The Llama-3 head (K = 2048 .. 4096) on an H100: 512-byte steps, 8 rows, thousands of programs.
    cfg = ig.gemv_config(1, 128256, 2560, dev, sms=132)
    assert (cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["EVEN_K"]) == (8, 512, True)


def test_matmul_tiles_fill_the_gpu(monkeypatch):
    monkeypatch.setattr(ig, "interpreting", lambda: False)
    dev = torch.device("cpu")
    assert ig.matmul_config(4096, 128256, 4096, torch.bfloat16, dev, sms=132)["BLOCK_M"] == 128
    small = ig.matmul_config(64, 2048, 4096, torch.bfloat16, dev, sms=132)
    assert (small["BLOCK_N"], small["BLOCK_M"]) == (64, 64)  # even the smallest tile leaves SMs idle
    f32 = ig.matmul_config(4096, 128256, 4096, torch.float32, dev, sms=132)
    assert f32["BLOCK_K"] == 32
    assert ig.matmul_config(40, 100, 3, torch.float16, dev, sms=132)["BLOCK_K"] == 16


# ----------------------------------------------------------------------------------------------
# On a GPU: a real head's shape
# ----------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("M", [1, 4, 16, 200])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_head_shapes_on_cuda(M, dtype):
    N, K = 32003, 2304  # K: 4.5 steps of 512 bytes (masked last step), N: a partial block
    x, q, s, b = _operands((M,), N, K, dtype, seed=M, bias=M % 2 == 0)
    assert_matches_reference(int8_linear(x, q, s, b), x, q, s, b)
