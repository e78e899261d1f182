"""Weight quantization and packing kernels against the eager reference (bitfx.reference).

Exact where the spec says exact: the codes and the packed bytes given the same scale, the
unpacking, and ``t / s_w``. ``weight_scale`` sums |W| in another order than torch, so it is compared
with a relative tolerance of 1e-5: the terms are non-negative, so a summation of depth d (the
longest chain of additions any term goes through) errs by at most d * 2**-24 relative. For the
interpreted sizes d < 40 on both sides (blocked + tree sums in the kernel, torch's cascade sum):
< 2.4e-6. The large GPU weights go through deeper reductions in torch, but rounding errors of
random sign grow like sqrt(d) * 2**-24 (~1e-6). Division and reciprocal are correctly rounded.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from bitfx import reference as ref
from bitfx import layout
from bitfx.kernels import weight_pack
from bitfx.kernels.weight_pack import (dequantize, quantize_pack, unpack_ternary, weight_quant, weight_quant_stacked,
                                       weight_quant_stacks, weight_scale)
from tests.helpers import FLOAT_DTYPES, HAS_CUDA, KERNEL_DEVICE, ULP

DEV = KERNEL_DEVICE
SCALE_RTOL = 1e-5  # see the module docstring
INTERESTING_K = [1, 2, 3, 4, 5, 7, 13, 31, 61, 63, 64, 65, 127, 129, 257]

pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")  # inf/NaN on purpose


def _make_weight(N, K, dtype, seed, exponent, special, layout_kind, device=DEV):
    """A weight [N, K] of ``dtype`` with magnitudes ~10**exponent, special rows, and given strides."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g, dtype=torch.float64) * 10.0**exponent
    if special == "row_magnitudes":  # rows of very different size: per-channel scales differ
        w *= 10.0 ** torch.randint(-3, 4, (N, 1), generator=g, dtype=torch.float64)
    w = w.to(dtype)
    rows = torch.randint(0, N, (max(1, N // 3),), generator=g)
    cols = torch.randint(0, K, (rows.numel(),), generator=g)
    if special == "zero_rows":
        w[rows] = 0
    elif special == "nan":
        w[rows, cols] = float("nan")
    elif special == "inf":
        w[rows, cols] = float("inf")
        w[rows[:1], cols[:1]] = float("-inf")
    elif special == "ties":  # multiples of 1/4: W * s_w hits +-0.5, +-1.5 exactly for s_w = 2
        w = (torch.randint(-8, 9, (N, K), generator=g) / 4.0).to(dtype)
    w = w.to(device)
    if layout_kind == "transposed":  # stride (1, N)
        w = w.t().contiguous().t()
    elif layout_kind == "strided":  # stride (2K, 2)
        wide = torch.zeros(N, 2 * K, dtype=dtype, device=device)
        wide[:, ::2] = w
        w = wide[:, ::2]
    return w


@st.composite
def weights(draw, max_n=40, max_k=300):
    N = draw(st.integers(1, max_n))
    K = draw(st.one_of(st.sampled_from(INTERESTING_K), st.integers(1, max_k)))
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    exp_range = (-4, 3) if dtype == torch.float16 else (-30, 30)
    exponent = draw(st.one_of(st.just(0), st.integers(*exp_range)))
    special = draw(st.sampled_from(["none", "row_magnitudes", "zero_rows", "nan", "inf", "ties"]))
    layout_kind = draw(st.sampled_from(["contiguous", "transposed", "strided"]))
    seed = draw(st.integers(0, 2**31 - 1))
    return _make_weight(N, K, dtype, seed, exponent, special, layout_kind)


def _assert_scales_close(actual, expected):
    assert actual.dtype == torch.float32 and actual.shape == expected.shape
    torch.testing.assert_close(actual.cpu(), expected.cpu(), rtol=SCALE_RTOL, atol=0.0, equal_nan=True)


# ----------------------------------------------------------------------------------------------
# weight_scale
# ----------------------------------------------------------------------------------------------


@given(w=weights(), per_channel=st.booleans())
@example(w=_make_weight(1, 1, torch.float32, 0, 0, "none", "contiguous"), per_channel=False)
@example(w=_make_weight(3, 1, torch.bfloat16, 1, 0, "none", "strided"), per_channel=True)
def test_weight_scale_matches_reference(w, per_channel):
    s = weight_scale(w, per_channel)
    _assert_scales_close(s, ref.weight_scale(w, per_channel))
    if not per_channel:
        assert torch.equal(s, s[:1].expand_as(s)) or bool(s.isnan().all())


def test_weight_scale_nonfinite_groups():
    w = torch.randn(5, 37, device=DEV)
    w[1, 3] = float("nan")
    w[3, 0] = float("-inf")
    s = weight_scale(w, per_channel=True)
    assert s.isnan().tolist() == [False, True, False, True, False]
    assert weight_scale(w, per_channel=False).isnan().all()
    # A finite row whose |W| sum overflows fp32 is finite: mean = inf, scale 0, as the reference.
    big = torch.full((2, 8), 3e38, device=DEV)
    torch.testing.assert_close(weight_scale(big, True).cpu(), ref.weight_scale(big, True).cpu())
    assert weight_scale(big, True).eq(0).all()


def test_weight_scale_floor_and_zero_weight():
    w = torch.zeros(4, 9, device=DEV)
    w[2] = 1e-9
    for per_channel in (False, True):
        s = weight_scale(w, per_channel)
        _assert_scales_close(s, ref.weight_scale(w, per_channel))
        assert torch.equal(s.cpu(), torch.full((4,), 1e-5, dtype=torch.float32).reciprocal())


# ----------------------------------------------------------------------------------------------
# quantize_pack
# ----------------------------------------------------------------------------------------------


@given(w=weights(), per_channel=st.booleans())
@example(w=_make_weight(1, 1, torch.float16, 0, 0, "none", "contiguous"), per_channel=False)
@example(w=_make_weight(4, 65, torch.float32, 2, 0, "ties", "transposed"), per_channel=True)
def test_quantize_pack_exact(w, per_channel):
    s_ref = ref.weight_scale(w, per_channel)
    packed = quantize_pack(w, s_ref)
    assert packed.dtype == torch.uint8 and packed.shape == (w.shape[0], layout.packed_k(w.shape[1]))
    assert torch.equal(packed, ref.pack_ternary(ref.ternarize(w, s_ref)))
    # The fused pair: exact given its own scale.
    packed2, s = weight_quant(w, per_channel)
    _assert_scales_close(s, s_ref)
    assert torch.equal(packed2, ref.pack_ternary(ref.ternarize(w, s)))


@st.composite
def stacks(draw, max_n=24, max_k=200):
    """Weights of one K (what a site stacks), each with its own rows, dtype, magnitudes, special
    values and strides, and a per-channel flag each."""
    K = draw(st.one_of(st.sampled_from(INTERESTING_K), st.integers(1, max_k)))
    count = draw(st.integers(1, 4))
    ws = []
    for _ in range(count):
        dtype = draw(st.sampled_from(FLOAT_DTYPES))
        exponent = draw(st.integers(-4, 3) if dtype == torch.float16 else st.integers(-30, 30))
        ws.append(_make_weight(draw(st.integers(1, max_n)), K, dtype, draw(st.integers(0, 2**31 - 1)), exponent,
                               draw(st.sampled_from(["none", "row_magnitudes", "zero_rows", "nan", "inf", "ties"])),
                               draw(st.sampled_from(["contiguous", "transposed", "strided"]))))
    return ws, draw(st.lists(st.booleans(), min_size=count, max_size=count))


@given(stack=stacks())
@example(stack=([_make_weight(3, 5, torch.bfloat16, 0, 0, "none", "contiguous"),
                 _make_weight(1, 5, torch.float32, 1, 0, "inf", "transposed")], [False, True]))
def test_weight_quant_stacked(stack):
    """The training step's weight packing on CUDA: each block of the stack is ``weight_quant`` of
    its weight (the scale up to the order of the fp32 sum, NaN for a group holding NaN or Inf;
    the codes exactly those of the scale), written in place in the stack; on weights whose sums
    are exact in any order (multiples of 1/4), bit for bit the op's plain-torch reference."""
    ws, pcs = stack
    packed, scale = weight_quant_stacked(ws, pcs)
    Ns = [w.shape[0] for w in ws]
    Kq = layout.packed_k(ws[0].shape[1])
    assert packed.shape == (sum(Ns), Kq) and packed.dtype == torch.uint8 and packed.is_contiguous()
    assert scale.shape == (sum(Ns),) and scale.dtype == torch.float32
    for w, pc, p, s in zip(ws, pcs, packed.split(Ns), scale.split(Ns)):
        _assert_scales_close(s, ref.weight_scale(w, pc))
        assert torch.equal(p, ref.pack_ternary(ref.ternarize(w, s)))
    exact = [(w.nan_to_num(0.0, 0.0, 0.0) * 4).round().clamp(-8, 8).div(4) for w in ws]
    want = torch.ops.bitfx.weight_quant_stacked.default([w.cpu() for w in exact], pcs)  # the reference (CPU)
    got = weight_quant_stacked(exact, pcs)
    assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1])


@given(parts=st.lists(stacks(max_n=12, max_k=130), min_size=1, max_size=3))
@example(parts=[([_make_weight(1, 1, torch.bfloat16, 0, 0, "none", "contiguous")], [False]),
                ([_make_weight(5, 130, torch.float32, 1, 0, "nan", "transposed"),
                  _make_weight(2, 130, torch.bfloat16, 2, 0, "ties", "strided")], [True, False])])
def test_weight_quant_stacks(parts):
    """Every stack of a training graph at once (weights of several dtypes, K differing between
    stacks, any strides, NaN and Inf): each stack's rows of the flat outputs, at the places
    ``layout.stack_offsets`` gives, are ``weight_quant_stacked`` of that stack: the scales up
    to the order of the fp32 sum of |w| (NaN for a group holding NaN or Inf; bit for bit on
    weights whose sums are exact in any order, multiples of 1/4), the codes exactly those of the
    scales. A second call reads the launch table kept from the first; the per-weight launches a
    CUDA graph's capture falls back on give the same bytes."""
    weights = [w for ws, _ in parts for w in ws]
    flags = [f for _, fs in parts for f in fs]
    stacks_ = [len(ws) for ws, _ in parts]
    rows = [(sum(w.shape[0] for w in ws), ws[0].shape[1]) for ws, _ in parts]
    offsets, nbytes, nrows = layout.stack_offsets(rows)
    for attempt in range(2):
        packed, scale = weight_quant_stacks(weights, flags, stacks_)
        assert packed.shape == (nbytes,) and packed.dtype == torch.uint8
        assert scale.shape == (nrows,) and scale.dtype == torch.float32
        for (ws, fs), (byte0, row0), (n, K) in zip(parts, offsets, rows):
            Kq = layout.packed_k(K)
            p, sc = packed[byte0:byte0 + n * Kq].view(n, Kq), scale[row0:row0 + n]
            want_p, want_s = weight_quant_stacked(ws, fs)
            torch.testing.assert_close(sc, want_s, rtol=SCALE_RTOL, atol=0, equal_nan=True)
            at = 0
            for w in ws:
                assert torch.equal(p[at:at + w.shape[0]], ref.pack_ternary(ref.ternarize(w, sc[at:at + w.shape[0]])))
                at += w.shape[0]
    places = weight_pack._places(weights, stacks_)[0]
    fallback = weight_pack._stacks_per_weight(weights, flags, places, torch.empty_like(scale), torch.empty_like(scale),
                                              torch.empty_like(packed))
    torch.testing.assert_close(fallback[1], scale, rtol=SCALE_RTOL, atol=0, equal_nan=True)
    exact = [(w.nan_to_num(0.0, 0.0, 0.0) * 4).round().clamp(-8, 8).div(4) for w in weights]
    got = weight_quant_stacks(exact, flags, stacks_)
    want = torch.ops.bitfx.weight_quant_stacks.default([w.cpu() for w in exact], flags, stacks_)  # the reference
    assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1])
    fallback = weight_pack._stacks_per_weight(exact, flags, places, torch.empty_like(got[1]), torch.empty_like(got[1]),
                                              torch.zeros_like(got[0]))
    assert torch.equal(fallback[0], got[0]) and torch.equal(fallback[1], got[1])


def test_weight_quant_stacks_table_follows_the_weights():
    """The launch table is kept per set of weights (their addresses, shapes and strides): new
    weights of the same shapes, or the same weights written in place, are packed from what
    they hold now, never from a table or values of an earlier call."""
    g = torch.Generator().manual_seed(3)
    make = lambda: [torch.randn(6, 40, generator=g).to(DEV), torch.randn(3, 40, generator=g).to(DEV),  # noqa: E731
                    torch.randn(4, 72, generator=g).to(DEV).bfloat16()]
    first, second = make(), make()
    for ws in (first, second, first):
        got = weight_quant_stacks(ws, [False, True, False], [2, 1])
        want = torch.cat([weight_quant_stacked(ws[:2], [False, True])[0].reshape(-1),
                          weight_quant_stacked(ws[2:], [False])[0].reshape(-1)])
        assert torch.equal(got[0], want)
    first[0].mul_(-1)  # in place: same address, new values
    got = weight_quant_stacks(first, [False, True, False], [2, 1])
    assert torch.equal(got[0][: 9 * 16].view(9, 16), weight_quant_stacked(first[:2], [False, True])[0])


@pytest.mark.cuda
def test_weight_quant_stacks_under_cuda_graph_trees():
    """Compiled with ``mode="reduce-overhead"``, the first call builds the launch table during the
    graph tree's warm-up, while the thread allocates from the graph's pool: the table must come
    from elsewhere (a live tensor of the pool that no output holds is refused), and the
    recorded and replayed calls give the eager bytes."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(5)
    ws = [torch.nn.Parameter(torch.randn(n, 96, generator=g).cuda().bfloat16()) for n in (32, 16, 48)]

    def f():
        packed, scale = torch.ops.bitfx.weight_quant_stacks(ws, [False, True, False], [2, 1])
        return packed + 0, scale * 1

    want = weight_quant_stacks([w.detach() for w in ws], [False, True, False], [2, 1])
    weight_pack._TABLES.clear()  # built afresh by the warm-up
    compiled = torch.compile(f, backend="inductor", mode="reduce-overhead", fullgraph=True)
    for _ in range(4):  # warm-up, record, replays
        packed, scale = compiled()
        assert torch.equal(packed, want[0]) and torch.equal(scale, want[1])
    torch._dynamo.reset()


@given(
    N=st.integers(1, 20),
    K=st.sampled_from(INTERESTING_K),
    scale=st.sampled_from([2.0, 4.0, 1.0, 0.5, 2.0 / 3.0, -2.0, 0.0, float("inf"), float("nan"), 1e30, 1e-30]),
    dtype=st.sampled_from(FLOAT_DTYPES),
    seed=st.integers(0, 2**31 - 1),
)
def test_quantize_pack_ties_and_odd_scales(N, K, scale, dtype, seed):
    """Half-way cases round to even (0.5 -> 0, 1.5 -> 2 -> 1), and any given s_w is honoured."""
    w = _make_weight(N, K, dtype, seed, 0, "ties", "contiguous")
    w[0, 0] = float("inf")  # inf * 0 = NaN -> 0; inf * s -> +-1
    s_w = torch.full((N,), scale, dtype=torch.float32, device=DEV)
    assert torch.equal(quantize_pack(w, s_w), ref.pack_ternary(ref.ternarize(w, s_w)))


def test_quantize_pack_rounding_boundaries():
    v = torch.tensor([0.5, -0.5, 1.5, -1.5, 2.5, -2.5, 0.49999997, 0.50000006, -0.50000006, 1e30, -1e30, 0.0, -0.0])
    w = v.reshape(1, -1).to(DEV)
    packed = quantize_pack(w, torch.ones(1, device=DEV))
    t = unpack_ternary(packed, w.shape[1]).cpu()
    assert t.tolist() == [[0, 0, 1, -1, 1, -1, 0, 1, -1, 1, -1, 0, 0]]
    assert torch.equal(t, torch.round(v).clamp(-1, 1).to(torch.int8).reshape(1, -1))


@pytest.mark.parametrize("per_channel", [False, True])
def test_nonfinite_rows_get_zero_codes(per_channel):
    w = torch.randn(6, 50, device=DEV)
    w[2, 7] = float("nan")
    w[4, 0] = float("inf")
    packed, s = weight_quant(w, per_channel)
    bad = [2, 4] if per_channel else list(range(6))
    assert s.isnan().nonzero().flatten().tolist() == bad
    assert (packed[bad] == 0x55).all()  # four codes 1 = zero weights
    assert torch.equal(packed, ref.weight_quant(w, per_channel)[0])


# ----------------------------------------------------------------------------------------------
# unpack_ternary / dequantize
# ----------------------------------------------------------------------------------------------


@st.composite
def ternary(draw, max_n=40, max_k=300):
    N = draw(st.integers(1, max_n))
    K = draw(st.one_of(st.sampled_from(INTERESTING_K), st.integers(1, max_k)))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    t = torch.randint(-1, 2, (N, K), generator=g, dtype=torch.int8)
    if draw(st.booleans()):
        t[:: max(1, N // 2)] = 0  # all-zero rows
    return t.to(DEV)


@given(t=ternary())
@example(t=torch.ones(1, 1, dtype=torch.int8, device=DEV))
@example(t=-torch.ones(3, 64, dtype=torch.int8, device=DEV))
def test_pack_unpack_roundtrip(t):
    N, K = t.shape
    packed = ref.pack_ternary(t)
    assert torch.equal(unpack_ternary(packed, K), t)
    # Our own packing of t (t * 1 rounds to itself) is the reference packing, and unpacks to t.
    for dtype in FLOAT_DTYPES:
        ours = quantize_pack(t.to(dtype), torch.ones(N, device=DEV))
        assert torch.equal(ours, packed)
        assert torch.equal(unpack_ternary(ours, K), t)


def _pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """uint8 ``[N, Kq]`` from raw 2-bit codes ``[N, 4 Kq]`` (any of 0..3, padding columns included)."""
    N, W = codes.shape
    planes = codes.to(torch.int32).view(N, layout.PLANES, W // layout.PLANES)
    return (planes[:, 0] | planes[:, 1] << 2 | planes[:, 2] << 4 | planes[:, 3] << 6).to(torch.uint8)


@given(N=st.integers(1, 20), K=st.sampled_from(INTERESTING_K), seed=st.integers(0, 2**31 - 1))
def test_unpack_ignores_padding_bytes(N, K, seed):
    """The kernel drops the padding codes (k >= K) whatever they hold; the reference refuses
    padding that is not code 1 (a zero weight) and unpacks the clean weight to the same codes."""
    g = torch.Generator().manual_seed(seed)
    width = layout.PLANES * layout.packed_k(K)
    codes = torch.randint(0, 3, (N, width), generator=g)
    codes[:, K:] = layout.CODE_OFFSET
    t = (codes[:, :K] - layout.CODE_OFFSET).to(torch.int8)
    assert torch.equal(ref.unpack_ternary(_pack_codes(codes), K), t)
    if width > K:  # K a multiple of 64 has no padding columns
        codes[:, K:] = torch.randint(0, 4, (N, width - K), generator=g)
        codes[-1, -1] = 0
    packed = _pack_codes(codes).to(DEV)
    assert torch.equal(unpack_ternary(packed, K).cpu(), t)
    wide = torch.zeros(N, packed.shape[1] + 16, dtype=torch.uint8, device=DEV)
    wide[:, : packed.shape[1]] = packed
    assert torch.equal(unpack_ternary(wide[:, : packed.shape[1]], K).cpu(), t)
    if width > K:
        with pytest.raises(ValueError, match=r"in a padding column \(k >= K="):
            ref.unpack_ternary(packed.cpu(), K)


def test_reference_unpack_refuses_invalid_codes():
    """Code 3 anywhere, or padding other than code 1: a ValueError naming row and column."""
    K = 5
    codes = torch.full((3, layout.PLANES * layout.packed_k(K)), layout.CODE_OFFSET)
    ok = _pack_codes(codes)
    assert torch.equal(ref.unpack_ternary(ok, K), torch.zeros(3, K, dtype=torch.int8))
    ref.check_ternary_codes(ok, K)
    codes[1, 4] = 3
    with pytest.raises(ValueError, match=r"invalid 2-bit code 3 .* at row 1, column 4"):
        ref.unpack_ternary(_pack_codes(codes), K)
    codes[1, 4] = 1
    codes[2, 5] = 2  # k = 5 >= K: padding must be 1
    with pytest.raises(ValueError, match=r"code 2 in a padding column \(k >= K=5 must hold code 1.* at row 2, column 5"):
        ref.check_ternary_codes(_pack_codes(codes), K)
    with pytest.raises(ValueError, match=r"padding column"):
        ref.unpack_ternary(_pack_codes(codes), K)


@given(t=ternary(), dtype=st.sampled_from(FLOAT_DTYPES), seed=st.integers(0, 2**31 - 1))
@example(t=torch.ones(1, 1, dtype=torch.int8, device=DEV), dtype=torch.float32, seed=0)
def test_dequantize(t, dtype, seed):
    N, K = t.shape
    g = torch.Generator().manual_seed(seed)
    s_w = (10.0 ** (torch.rand(N, generator=g) * 6 - 1)).to(DEV)  # 0.1 .. 1e5
    if N > 2:
        s_w[0] = float("nan")  # a NaN scale gives a NaN row (0 / NaN too)
    packed = ref.pack_ternary(t)
    out = dequantize(packed, s_w, K, dtype)
    expected = (t.float() / s_w[:, None]).to(dtype)
    assert out.dtype == dtype and out.shape == (N, K)
    if dtype == torch.bfloat16 and not HAS_CUDA:
        # Triton's interpreter casts fp32 -> bf16 by truncation (the GPU rounds to nearest even):
        # at most one bf16 ulp apart there; exact on the GPU.
        torch.testing.assert_close(out.float(), expected.float(), rtol=ULP[dtype], atol=0.0, equal_nan=True)
    else:
        torch.testing.assert_close(out, expected, rtol=0.0, atol=0.0, equal_nan=True)


# ----------------------------------------------------------------------------------------------
# Shapes and bad input
# ----------------------------------------------------------------------------------------------


def test_empty_weight():
    w = torch.zeros(0, 10, device=DEV)
    packed, s = weight_quant(w, per_channel=False)
    assert packed.shape == (0, 16) and s.shape == (0,)
    assert unpack_ternary(packed, 10).shape == (0, 10)
    assert dequantize(packed, s, 10, torch.bfloat16).shape == (0, 10)


def test_bad_inputs():
    w = torch.randn(4, 10, device=DEV)
    s = torch.ones(4, device=DEV)
    with pytest.raises(ValueError, match="2-D"):
        weight_scale(w[0])
    with pytest.raises(TypeError, match="linear weight must be one of"):
        weight_scale(w.to(torch.int32))
    with pytest.raises(ValueError, match="at least one input feature"):
        weight_scale(torch.zeros(4, 0, device=DEV))
    with pytest.raises(ValueError, match="weight scale has shape"):
        quantize_pack(w, torch.ones(5, device=DEV))
    with pytest.raises(TypeError, match="weight scale must be one of float32"):
        quantize_pack(w, s.half())
    packed = quantize_pack(w, s)
    with pytest.raises(TypeError, match="must be uint8"):
        unpack_ternary(packed.to(torch.int8), 10)
    with pytest.raises(ValueError, match="bytes per row"):
        unpack_ternary(packed, 100)
    with pytest.raises(TypeError, match="dtype must be one of"):
        dequantize(packed, s, 10, torch.int8)
    with pytest.raises(ValueError, match="one device"):
        quantize_pack(w, torch.ones(4, device="meta"))


def test_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="need CUDA tensors"):
        weight_scale(torch.randn(3, 5))


# ----------------------------------------------------------------------------------------------
# GPU: large shapes
# ----------------------------------------------------------------------------------------------


def test_table_launch_reads_16_bytes_at_a_time_only_where_it_may():
    """The table kernels read a launch's weights 16 bytes at a time (``DENSE``, a promise to
    the compiler) only when every one has unit column stride, a 16-byte aligned address and
    rows and row strides of whole 16 bytes; any other weight in the launch (a view at an odd
    address, a short row, a column-major or strided one) makes it read element by element, and
    every such set packs as the reference does."""
    g = torch.Generator().manual_seed(5)
    quarters = lambda *shape: (torch.randint(-8, 9, shape, generator=g) / 4.0).to(DEV)  # noqa: E731
    flat = quarters(8 * 64 + 1).bfloat16()
    dense = quarters(8, 64).bfloat16()
    cases = {
        "contiguous": ([dense], True),
        "fp32 rows of 16 bytes": ([quarters(8, 4)], True),
        "rows of a wider buffer": ([quarters(8, 72).bfloat16()[:, :64]], True),
        "short rows": ([quarters(8, 60).bfloat16()], False),
        "odd address": ([dense, flat[1:].view(8, 64)], False),
        "column-major": ([dense, quarters(64, 8).bfloat16().t()], False),
        "strided columns": ([quarters(8, 128).bfloat16()[:, ::2]], False),
    }
    for name, (ws, want) in cases.items():
        assert weight_pack._dense(ws) is want, name
        flags, stacks_ = [i % 2 == 1 for i in range(len(ws))], [1] * len(ws)
        got = weight_quant_stacks(ws, flags, stacks_)
        ref_out = torch.ops.bitfx.weight_quant_stacks.default([w.cpu() for w in ws], flags, stacks_)
        assert torch.equal(got[0].cpu(), ref_out[0]) and torch.equal(got[1].cpu(), ref_out[1]), name


@pytest.mark.cuda
@pytest.mark.parametrize("N,K", [(4096, 4096), (1000, 4099), (14336, 4096), (3, 8191)])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("per_channel", [False, True])
def test_large_weights_cuda(N, K, dtype, per_channel):
    w = (torch.randn(N, K, device="cuda") * 0.02).to(dtype)
    packed, s = weight_quant(w, per_channel)
    s_ref = ref.weight_scale(w, per_channel)
    _assert_scales_close(s, s_ref)
    assert torch.equal(quantize_pack(w, s_ref), ref.pack_ternary(ref.ternarize(w, s_ref)))
    assert torch.equal(unpack_ternary(packed, K), ref.ternarize(w, s))
    expected = (ref.ternarize(w, s).float() / s[:, None]).to(dtype)
    assert torch.equal(dequantize(packed, s, K, dtype), expected)
    wt = w.t().contiguous().t()  # column-major weight
    assert torch.equal(quantize_pack(wt, s), packed)
