"""The ternary x int8 matmul kernels against the eager reference (bitfx.reference).

The int32 accumulator is compared exactly, on every path ("simt", "gemv", "tc") and K split.

The float output is compared element by element with the bound

    |out - ref| <= 8u |acc / s_x / s_w| + 2 ulp(out_dtype) |ref| + (smallest subnormal step)

with u = 2**-24; NaN and Inf must match (or, at the overflow threshold, the largest finite value
may face an Inf of the same sign). Why: the kernel computes ``acc * rn(1/s_x) * rn(1/s_w)`` (four
roundings, each a relative error <= u) where the reference computes ``acc / s_x / s_w`` (two):
the fp32 products differ by <= 6u |acc / s_x / s_w|. Adding the bias rounds once on each side
(<= u |sum| each, none with an FMA); after a cancellation against the bias only an absolute bound
in |acc / s_x / s_w| holds, hence that term. The final cast to fp16/bf16 may fall on different
sides of a rounding boundary: one ulp of the output dtype at |ref|, two to be safe about which
side's ulp, plus the subnormal step for results near zero. Without a bias this is the relative
bound of ``assert_close_ulps`` with 4 ulps (fp32: 6u = 3 fp32 ulps at |ref|, +1 for the boundary).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from bitfx import reference as ref
from bitfx import layout
from bitfx.kernels import ternary_matmul as tm
from bitfx.kernels.ternary_matmul import ternary_matmul, ternary_matmul_int32
from tests.helpers import FLOAT_DTYPES, KERNEL_DEVICE, ULP, assert_close_ulps, replay_in_cuda_graph

DEV = KERNEL_DEVICE
U = 2.0**-24
SUBNORMAL_STEP = {torch.float32: 2.0**-149, torch.float16: 2.0**-24, torch.bfloat16: 2.0**-133}
PATHS = [None, "dp4a", "simt", "gemv", "tc"]
INTERESTING_K = [1, 2, 3, 5, 7, 13, 31, 61, 63, 64, 65, 127, 128, 129, 251, 257]

pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")  # inf/NaN on purpose


def _make_operands(M, N, K, seed, q_layout="contiguous", w_layout="contiguous", zero_rows=False, device=DEV):
    """q int8 [M, K] (full range incl. -128) and a packed ternary weight [N, Kq], with given strides."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-128, 128, (M, K), generator=g, dtype=torch.int8)
    t = torch.randint(-1, 2, (N, K), generator=g, dtype=torch.int8)
    if zero_rows and N > 0:
        t[:: max(1, N // 3)] = 0
    if zero_rows and M > 0:
        q[:: max(1, M // 2)] = 0
    packed = ref.pack_ternary(t).to(device)
    q = q.to(device)
    if q_layout == "transposed":  # stride (1, M): the launcher copies it
        q = q.t().contiguous().t()
    elif q_layout == "row_stride":  # rows of a wider buffer: stride (K + 5, 1)
        wide = torch.zeros(M, K + 5, dtype=torch.int8, device=device)
        wide[:, :K] = q
        q = wide[:, :K]
    if w_layout == "row_stride":  # stride (Kq + 16, 1)
        Kq = packed.shape[1]
        wide = torch.zeros(N, Kq + 16, dtype=torch.uint8, device=device)
        wide[:, :Kq] = packed
        packed = wide[:, :Kq]
    return q, packed


def _make_scales(M, N, seed, special=False, device=DEV):
    """s_x = 127 / amax (amax in 1e-3 .. 1e2) and s_w = 1 / mean|W| (mean in 1e-5 .. 1)."""
    g = torch.Generator().manual_seed(seed + 1)
    x_scale = 127.0 / 10.0 ** (torch.rand(M, generator=g) * 5 - 3)
    w_scale = 1.0 / 10.0 ** (torch.rand(N, generator=g) * 5 - 5)
    if special:
        x_scale[::3] = float("nan")
        w_scale[1::4] = float("nan")
        x_scale[1::5] = 0.0
        w_scale[2::5] = float("inf")
    return x_scale.to(device), w_scale.to(device)


@st.composite
def problems(draw, max_m=64, max_n=48, max_k=300):
    path = draw(st.sampled_from(PATHS))
    M = draw(st.one_of(st.sampled_from([0, 1, 2, 3, 16, 17, 33, 64, 65]), st.integers(0, max_m)))
    if path in ("simt", "dp4a"):
        M = min(M, 9)  # the CUDA-core paths are meant for small M (and slow in the interpreter)
    N = draw(st.one_of(st.sampled_from([1, 2, 15, 16, 17, 33]), st.integers(1, max_n)))
    K = draw(st.one_of(st.sampled_from(INTERESTING_K), st.integers(1, max_k)))
    return dict(
        M=M, N=N, K=K, path=path,
        split_k=draw(st.sampled_from([None, None, 1, 2, 3, 5])),
        q_layout=draw(st.sampled_from(["contiguous", "transposed", "row_stride"])),
        w_layout=draw(st.sampled_from(["contiguous", "row_stride"])),
        zero_rows=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _pin(M, N, K, path=None, split_k=None, **kw):
    return dict(M=M, N=N, K=K, path=path, split_k=split_k, q_layout=kw.get("q_layout", "contiguous"),
                w_layout=kw.get("w_layout", "contiguous"), zero_rows=kw.get("zero_rows", False), seed=kw.get("seed", 0))


def _assert_epilogue_close(actual, q, x_scale, packed, w_scale, bias, out_dtype):
    """The bound of the module docstring, element by element; NaN/Inf must match exactly."""
    expected = ref.ternary_matmul(q, x_scale, packed, w_scale, bias, out_dtype)
    assert actual.dtype == expected.dtype == out_dtype and actual.shape == expected.shape
    if bias is None:
        finite = actual.isfinite() & expected.isfinite()
        assert_close_ulps(actual[finite], expected[finite], ulps=4, atol=SUBNORMAL_STEP[out_dtype])
    acc = ref.ternary_matmul_int32(q, packed).double()
    prod = (acc / x_scale.double()[:, None] / w_scale.double()).abs()
    a, e = actual.double(), expected.double()
    same = (a == e) | (a.isnan() & e.isnan())
    # At the overflow threshold one side may round to the largest finite value, the other to inf.
    big = torch.finfo(out_dtype).max
    same |= (a.abs() >= big) & (e.abs() >= big) & (a.sign() == e.sign())
    tol = 8 * U * prod + 2 * ULP[out_dtype] * e.abs() + SUBNORMAL_STEP[out_dtype]
    ok = same | ((a - e).abs() <= tol)
    if not bool(ok.all()):
        i = tuple((~ok).nonzero()[0].tolist())
        raise AssertionError(f"out{list(i)} = {a[i].item()!r}, reference {e[i].item()!r}, tolerance {tol[i].item()!r}; "
                             f"{int((~ok).sum())} of {ok.numel()} elements out of bounds")


# ----------------------------------------------------------------------------------------------
# The exact integer product
# ----------------------------------------------------------------------------------------------


@given(p=problems())
@example(p=_pin(0, 5, 7))
@example(p=_pin(1, 1, 1))
@example(p=_pin(1, 3, 1, "simt"))
@example(p=_pin(1, 33, 300, "dp4a", 3, q_layout="transposed"))
@example(p=_pin(5, 17, 203, "dp4a", None, q_layout="row_stride", w_layout="row_stride"))
@example(p=_pin(1, 17, 129, "gemv", 3))
@example(p=_pin(3, 2, 1, "tc"))
@example(p=_pin(2, 1, 300, "simt", 2, q_layout="transposed", w_layout="row_stride"))
@example(p=_pin(65, 33, 61, None, None, q_layout="row_stride"))
def test_int32_accumulator_exact(p):
    q, packed = _make_operands(p["M"], p["N"], p["K"], p["seed"], p["q_layout"], p["w_layout"], p["zero_rows"])
    acc = ternary_matmul_int32(q, packed, path=p["path"], split_k=p["split_k"])
    assert acc.dtype == torch.int32 and acc.shape == (p["M"], p["N"])
    assert torch.equal(acc, ref.ternary_matmul_int32(q, packed))


@pytest.mark.parametrize("path", PATHS)
def test_int32_extremes(path):
    """|acc| at its largest for the shape: q = -128 everywhere against t = -1 / +1."""
    M, N, K = 3, 4, 509
    q = torch.full((M, K), -128, dtype=torch.int8, device=DEV)
    t = torch.ones(N, K, dtype=torch.int8)
    t[1] = -1
    t[2, ::2] = 0
    packed = ref.pack_ternary(t).to(DEV)
    for split_k in (None, 1, 4):
        acc = ternary_matmul_int32(q, packed, path=path, split_k=split_k)
        assert torch.equal(acc, ref.ternary_matmul_int32(q, packed))
        assert acc[0, 0].item() == -128 * K and acc[0, 1].item() == 128 * K


def _pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """uint8 ``[N, Kq]`` from raw 2-bit codes ``[N, 4 Kq]`` (any of 0..3, padding columns included)."""
    N, W = codes.shape
    planes = codes.to(torch.int32).view(N, layout.PLANES, W // layout.PLANES)
    return (planes[:, 0] | planes[:, 1] << 2 | planes[:, 2] << 4 | planes[:, 3] << 6).to(torch.uint8)


def test_padding_codes_never_count():
    """Whatever the padding columns (k >= K) hold, they never count in the kernels; the reference
    refuses such a weight (padding must hold code 1, a zero weight), and agrees on the clean one."""
    g = torch.Generator().manual_seed(7)
    for K in (1, 5, 66, 130):
        width = layout.PLANES * layout.packed_k(K)
        codes = torch.randint(0, 3, (9, width), generator=g)
        clean = codes.clone()
        clean[:, K:] = layout.CODE_OFFSET
        junk = codes.clone()
        junk[:, K:] = torch.randint(0, 4, (9, width - K), generator=g)
        junk[0, -1] = 3
        assert torch.equal(_pack_codes(clean), ref.pack_ternary((clean[:, :K] - 1).to(torch.int8)))
        q = torch.randint(-128, 128, (5, K), generator=g, dtype=torch.int8)
        want = ref.ternary_matmul_int32(q, _pack_codes(clean))
        for path in PATHS:
            assert torch.equal(ternary_matmul_int32(q.to(DEV), _pack_codes(junk).to(DEV), path=path).cpu(), want)
        with pytest.raises(ValueError, match=r"padding column \(k >= K=\d+ must hold code 1"):
            ref.ternary_matmul_int32(q, _pack_codes(junk))


def test_reference_refuses_code_3():
    """The 2-bit code 3 is no ternary value: the reference (the CPU ops) raises, naming where it is.
    The kernels do not check per call (BitfxLinear checks its weights when built or loaded)."""
    K = 10
    codes = torch.full((4, layout.PLANES * layout.packed_k(K)), layout.CODE_OFFSET)
    codes[2, 7] = 3
    q = torch.ones(3, K, dtype=torch.int8)
    with pytest.raises(ValueError, match=r"invalid 2-bit code 3 .* at row 2, column 7 \(1 invalid"):
        ref.ternary_matmul_int32(q, _pack_codes(codes))
    with pytest.raises(ValueError, match=r"invalid 2-bit code 3"):
        ref.ternary_matmul(q, torch.ones(3), _pack_codes(codes), torch.ones(4))


# ----------------------------------------------------------------------------------------------
# The float epilogue
# ----------------------------------------------------------------------------------------------


@given(
    p=problems(),
    out_dtype=st.sampled_from(FLOAT_DTYPES),
    bias_dtype=st.sampled_from([None, torch.float32, torch.float16, torch.bfloat16]),
    special=st.booleans(),
)
@example(p=_pin(0, 4, 9), out_dtype=torch.bfloat16, bias_dtype=torch.float32, special=False)
@example(p=_pin(1, 1, 1), out_dtype=torch.float32, bias_dtype=None, special=False)
@example(p=_pin(1, 40, 1, "gemv", 2), out_dtype=torch.float16, bias_dtype=torch.bfloat16, special=True)
@example(p=_pin(7, 9, 200, "simt", 3), out_dtype=torch.float32, bias_dtype=torch.float32, special=True)
@example(p=_pin(66, 20, 100, "tc", 2), out_dtype=torch.bfloat16, bias_dtype=None, special=False)
def test_float_output(p, out_dtype, bias_dtype, special):
    M, N = p["M"], p["N"]
    q, packed = _make_operands(M, N, p["K"], p["seed"], p["q_layout"], p["w_layout"], p["zero_rows"])
    x_scale, w_scale = _make_scales(M, N, p["seed"], special)
    bias = None
    if bias_dtype is not None:
        g = torch.Generator().manual_seed(p["seed"] + 2)
        bias = (torch.randn(N, generator=g) * 10.0 ** torch.randint(-3, 4, (N,), generator=g)).to(bias_dtype).to(DEV)
    out = ternary_matmul(q, x_scale, packed, w_scale, bias, out_dtype, path=p["path"], split_k=p["split_k"])
    _assert_epilogue_close(out, q, x_scale, packed, w_scale, bias, out_dtype)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("split_k", [1, 3])
def test_nan_scales_propagate(path, split_k):
    """A NaN activation scale makes its row NaN, a NaN weight scale its column, even where acc = 0."""
    M, N, K = 5, 7, 130
    q, packed = _make_operands(M, N, K, 3)
    q[1] = 0  # acc = 0 in row 1: 0 / NaN is still NaN
    x_scale, w_scale = _make_scales(M, N, 3)
    x_scale[1] = x_scale[3] = float("nan")
    w_scale[4] = float("nan")
    bias = torch.randn(N, device=DEV)
    out = ternary_matmul(q, x_scale, packed, w_scale, bias, torch.bfloat16, path=path, split_k=split_k)
    expect_nan = torch.zeros(M, N, dtype=torch.bool)
    expect_nan[[1, 3]] = True
    expect_nan[:, 4] = True
    assert torch.equal(out.isnan().cpu(), expect_nan)
    assert torch.equal(ref.ternary_matmul(q, x_scale, packed, w_scale, bias, torch.bfloat16).isnan().cpu(), expect_nan)


def test_from_quantized_floats():
    """End to end with scales made by the reference quantizers (non-finite rows included)."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(6, 97, generator=g)
    x[2, 5] = float("inf")
    w = torch.randn(19, 97, generator=g) * 0.05
    q, s_x = ref.act_quant(x.to(DEV))
    for per_channel in (False, True):
        packed, s_w = ref.weight_quant(w.to(DEV), per_channel)
        for path in PATHS:
            out = ternary_matmul(q, s_x, packed, s_w, None, torch.float16, path=path)
            _assert_epilogue_close(out, q, s_x, packed, s_w, None, torch.float16)
            assert out[2].isnan().all() and not out[[0, 1, 3, 4, 5]].isnan().any()


# ----------------------------------------------------------------------------------------------
# Dispatch, shapes and bad input
# ----------------------------------------------------------------------------------------------


def test_dispatch_rule():
    assert [tm._default_path(M) for M in (1, 2, 3, 16, 64, 65, 4096)] == ["dp4a"] + ["gemv"] * 4 + ["tc"] * 2
    for M in (1, 2, 7):
        cfg = tm._dp4a_config(M, 4096, layout.packed_k(4096), DEV, None, None)
        assert cfg["SPLIT_K"] * cfg["words_per_split"] >= layout.packed_k(4096) // 4
    for M in (1, 5, 64, 65, 1000):
        for path in ("simt", "gemv", "tc"):
            cfg = tm._config(M, 4096, layout.packed_k(4096), DEV, path, None)
            assert cfg["USE_DOT"] == (path != "simt") and cfg["SPLIT_K"] >= 1
            assert cfg["SPLIT_K"] * cfg["steps_per_split"] * cfg["BLOCK_KQ"] >= layout.packed_k(4096)


@pytest.mark.parametrize("M,N", [(0, 5), (3, 0), (0, 0)])
def test_empty(M, N):
    q = torch.zeros(M, 10, dtype=torch.int8, device=DEV)
    packed = torch.full((N, 16), 0x55, dtype=torch.uint8, device=DEV)
    x_scale, w_scale = torch.ones(M, device=DEV), torch.ones(N, device=DEV)
    out = ternary_matmul(q, x_scale, packed, w_scale, None, torch.bfloat16)
    assert out.shape == (M, N) and out.dtype == torch.bfloat16
    assert ternary_matmul_int32(q, packed).shape == (M, N)


def test_bad_inputs():
    q = torch.zeros(3, 10, dtype=torch.int8, device=DEV)
    packed = torch.full((4, 16), 0x55, dtype=torch.uint8, device=DEV)
    sx, sw = torch.ones(3, device=DEV), torch.ones(4, device=DEV)
    with pytest.raises(TypeError, match="activation codes q must be one of int8"):
        ternary_matmul(q.float(), sx, packed, sw)
    with pytest.raises(TypeError, match="packed ternary weight must be one of uint8"):
        ternary_matmul_int32(q, packed.to(torch.int8))
    with pytest.raises(ValueError, match="16 bytes per row, but K=100 needs 32"):
        ternary_matmul(torch.zeros(3, 100, dtype=torch.int8, device=DEV), sx, packed, sw)
    with pytest.raises(ValueError, match="activation scale has shape"):
        ternary_matmul(q, torch.ones(4, device=DEV), packed, sw)
    with pytest.raises(ValueError, match="weight scale has shape"):
        ternary_matmul(q, sx, packed, torch.ones(3, device=DEV))
    with pytest.raises(ValueError, match="bias has shape"):
        ternary_matmul(q, sx, packed, sw, torch.ones(3, device=DEV))
    with pytest.raises(TypeError, match="bias must be one of"):
        ternary_matmul(q, sx, packed, sw, torch.ones(4, dtype=torch.int32, device=DEV))
    with pytest.raises(TypeError, match="x_scale must be one of float32"):
        ternary_matmul(q, sx.half(), packed, sw)
    with pytest.raises(TypeError, match="out_dtype"):
        ternary_matmul(q, sx, packed, sw, None, torch.int32)
    with pytest.raises(ValueError, match="2-D"):
        ternary_matmul(q[None], sx, packed, sw)
    with pytest.raises(ValueError, match="path must be one of"):
        ternary_matmul(q, sx, packed, sw, path="fast")
    with pytest.raises(ValueError, match="one device"):
        ternary_matmul(q, sx, packed, torch.ones(4, device="meta"))


def test_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q = torch.zeros(2, 10, dtype=torch.int8)
    with pytest.raises(ValueError, match="need CUDA tensors"):
        ternary_matmul_int32(q, torch.full((4, 16), 0x55, dtype=torch.uint8))


# ----------------------------------------------------------------------------------------------
# GPU: large shapes, every path
# ----------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("M", [1, 2, 5, 16, 33, 64, 65, 128, 300, 512])
@pytest.mark.parametrize("N,K", [(4096, 4096), (1024, 4096), (4096, 1024), (333, 4097), (4095, 777)])
@pytest.mark.parametrize("path", PATHS)
def test_large_cuda(M, N, K, path):
    if path == "simt" and M > 16:
        pytest.skip("the CUDA-core path is for tiny M")
    q, packed = _make_operands(M, N, K, M * 7 + N, device="cuda")
    acc = ternary_matmul_int32(q, packed, path=path)
    assert torch.equal(acc, ref.ternary_matmul_int32(q, packed))
    x_scale, w_scale = _make_scales(M, N, 1, device="cuda")
    bias = torch.randn(N, device="cuda", dtype=torch.bfloat16)
    for out_dtype in FLOAT_DTYPES:
        out = ternary_matmul(q, x_scale, packed, w_scale, bias, out_dtype, path=path)
        _assert_epilogue_close(out, q, x_scale, packed, w_scale, bias, out_dtype)


@pytest.mark.cuda
def test_tuned_tile_compiles_candidates_side_by_side(monkeypatch):
    """The tensor-core tile of a new shape is measured among every candidate, each compiled by a
    thread of its own (``_first_launches``): the pick is a candidate, cached per shape, and each
    candidate's kernel, compiled in a thread, then computes the exact int32 product here."""
    from bitfx.kernels import matmul_config as mc

    monkeypatch.setattr(mc, "_TUNED", {})
    device = torch.device("cuda", torch.cuda.current_device())
    M, N, K = 300, 448, 640
    q, packed = _make_operands(M, N, K, 11, device="cuda")
    Kq = packed.shape[1]
    with torch.cuda.stream(torch.cuda.Stream()):  # a caller on a side stream: the threads use the default one
        tile = mc._tuned_tile(M, N, Kq, device)
    candidates = [t[:4] for t in mc._TC_TILES]
    assert tile in candidates and mc._TUNED == {(384, N, Kq, device): tile}
    want = ref.ternary_matmul_int32(q, packed)
    for block_m, block_n, block_kq, warps in candidates:
        over = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_KQ=block_kq, num_warps=warps)
        assert torch.equal(ternary_matmul_int32(q, packed, path="tc", config=over), want), over


@pytest.mark.cuda
@pytest.mark.parametrize("split_k", [2, 7, 64])
def test_split_k_cuda(split_k):
    q, packed = _make_operands(4, 256, 8192, 5, device="cuda")
    x_scale, w_scale = _make_scales(4, 256, 5, device="cuda")
    assert torch.equal(ternary_matmul_int32(q, packed, split_k=split_k), ref.ternary_matmul_int32(q, packed))
    out = ternary_matmul(q, x_scale, packed, w_scale, None, torch.float32, split_k=split_k)
    _assert_epilogue_close(out, q, x_scale, packed, w_scale, None, torch.float32)


@pytest.mark.cuda
@pytest.mark.parametrize("M,path", [(1, "dp4a"), (16, "gemv"), (3, "gemv"), (1, "gemv")])
def test_pdl_in_cuda_graph_reads_fresh_inputs(M, path):
    """Small-M kernels can start early (programmatic dependent launch, the default for "dp4a")
    and prefetch their weights into L2 while the kernel before them runs. Inside a CUDA graph, each matmul here follows a
    copy that has just overwritten its q *and its packed weights*: the result must be that of
    the new values, exactly, and equal to the result with PDL turned off."""
    from bitfx.kernels import _utils

    if not _utils.pdl_enabled(torch.device("cuda")):
        pytest.skip("programmatic dependent launch needs compute capability 9.0")
    N, K = 2048, 4096
    sources = [_make_operands(M, N, K, seed, device="cuda") for seed in range(3)]
    q_buf, w_buf = torch.empty_like(sources[0][0]), torch.empty_like(sources[0][1])
    outs = [torch.empty(M, N, dtype=torch.int32, device="cuda") for _ in sources]

    def step():
        for (q, packed), out in zip(sources, outs):
            q_buf.copy_(q)
            w_buf.copy_(packed)
            out.copy_(ternary_matmul_int32(q_buf, w_buf, path=path, config=dict(PDL=True)))

    replay_in_cuda_graph(step, outs)
    for (q, packed), out in zip(sources, outs):
        assert torch.equal(out, ref.ternary_matmul_int32(q, packed))


@pytest.mark.cuda
def test_pdl_switch(monkeypatch):
    """BITFX_PDL=0 turns programmatic dependent launch off; the results do not depend on it."""
    from bitfx.kernels import _utils

    q, packed = _make_operands(1, 512, 1024, 3, device="cuda")
    with_pdl = ternary_matmul_int32(q, packed)
    monkeypatch.setenv("BITFX_PDL", "0")
    assert not _utils.pdl_enabled(torch.device("cuda"))
    assert not tm._dp4a_config(1, 512, packed.shape[1], torch.device("cuda"), None, None)["PDL"]
    assert torch.equal(ternary_matmul_int32(q, packed), with_pdl)
