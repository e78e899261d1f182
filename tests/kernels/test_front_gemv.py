"""The one-kernel ternary linear for few rows (bitfx.kernels.front_gemv) against the two
kernels it replaces: ``norm_quant`` (or ``act_quant``) then the dp4a GEMV.

Exact: where the row's sum of squares is exact in fp32 (integer-valued activations: any
summation order gives the same sum), the row's ``rstd`` and ``s_x`` are the norm kernel's, the
codes are made by the same elementwise helpers, and the epilogue is the GEMV's: the scales and
every output element must be equal bit for bit, NaN rows included.

Otherwise the sum of squares may be added in another order than the norm kernel's (SPEC: the
norm is compared with a tolerance): ``rstd`` may move by an ulp or two, ``s_x`` likewise (rtol
1e-6, a few fp32 ulps), and a code may move by one where a value lies on a rounding boundary
(``assert_close_up_to_code_flips``).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from bitfx import reference as ref
from bitfx.layout import packed_k
from bitfx.kernels import front_gemv as fg
from bitfx.kernels import norm_quant as nq
from bitfx.kernels import ternary_matmul as tm
from tests.helpers import KERNEL_DEVICE, assert_close_up_to_code_flips, ops_forward

DEV = KERNEL_DEVICE
CUDA = DEV.type == "cuda"
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")


def _operands(M, N, K, dtype, seed, integer=True, bias=False, per_channel=False):
    g = torch.Generator().manual_seed(seed)
    if integer:
        x = torch.randint(-9, 10, (M, K), generator=g).to(dtype)
    else:
        x = (torch.randn(M, K, generator=g) * 3).to(dtype)
    gw = (torch.randn(K, generator=g) * 0.5 + 1).to(dtype)
    W = torch.randn(N, K, generator=g)
    packed, s_w = ref.weight_quant(W, per_channel)
    b = torch.randn(N, generator=g).to(dtype) if bias else None
    to = lambda t: None if t is None else t.to(DEV)  # noqa: E731
    return to(x), to(gw), to(packed), to(s_w), to(b)


def _two_kernels(x, gw, eps, offset, cbw, norm_dtype, normalize, qmax, packed, s_w, b, out_dtype):
    if normalize:
        q, s, _ = nq.norm_quant(x, gw, eps, offset, cbw, norm_dtype, qmax)
    else:
        q, s = nq.act_quant(x, qmax)
    return tm.ternary_matmul(q, s, packed, s_w, b, out_dtype, path="dp4a"), s


# (K, N): K past one row chunk and not a multiple of 4 or of the packed width; N past a block.
SHAPES_CPU = [(5, 3), (37, 20), (64, 9), (130, 33)]
SHAPES_CUDA = SHAPES_CPU + [(2560, 3840), (2560, 13824), (6912, 2560), (4095, 1000), (16384, 64)]
CASES = [  # (x dtype, normalize, offset, cast_before_weight, norm_dtype, bias, qmax)
    (torch.bfloat16, True, False, True, torch.bfloat16, False, 127),
    (torch.float32, True, True, False, torch.float32, True, 127),
    (torch.float16, True, False, False, torch.float32, False, 31),
    (torch.bfloat16, False, False, False, torch.float32, True, 127),
    (torch.float32, False, False, False, torch.float32, False, 7),
]


@pytest.mark.parametrize("K,N", SHAPES_CUDA if CUDA else SHAPES_CPU)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_equals_the_two_kernels_bit_for_bit(K, N, case):
    dtype, normalize, offset, cbw, norm_dtype, bias, qmax = CASES[case]
    x, gw, packed, s_w, b = _operands(1, N, K, dtype, seed=K + N + case, bias=bias)
    gw = gw if normalize else None
    for out_dtype in (torch.float32, dtype):
        want, s_want = _two_kernels(x, gw, 1e-6, offset, cbw, norm_dtype, normalize, qmax, packed, s_w, b, out_dtype)
        got, s_got = fg.front_gemv(x, gw, 1e-6, offset, cbw, norm_dtype, normalize, qmax, packed, s_w, b, out_dtype)
        assert torch.equal(s_got, s_want)
        assert got.dtype == out_dtype and torch.equal(got, want), (got - want).abs().max()


@given(M=st.integers(1, 80 if CUDA else 4), K=st.integers(1, 300 if CUDA else 90),
       N=st.integers(1, 300 if CUDA else 40),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), normalize=st.booleans(),
       offset=st.booleans(), cbw=st.booleans(), bias=st.booleans(), bits=st.sampled_from([8, 6, 4]),
       seed=st.integers(0, 2**16))
def test_fuzzed_shapes_equal_the_two_kernels(M, K, N, dtype, normalize, offset, cbw, bias, bits, seed):
    """Any rows (an eager call takes the kernel for several; their count sets the blocks), any K
    (padding columns, partial words), any N (partial row blocks), every flag: the same scale and
    output as the two kernels, bit for bit (integer-valued rows: exact sums of squares)."""
    x, gw, packed, s_w, b = _operands(M, N, K, dtype, seed=seed, bias=bias)
    gw = gw if normalize else None
    qmax = 2 ** (bits - 1) - 1
    args = (x, gw, 1e-6, offset, cbw, dtype, normalize, qmax, packed, s_w, b, dtype)
    want, s_want = _two_kernels(*args)
    got, s_got = fg.front_gemv(*args)
    assert torch.equal(s_got, s_want) and torch.equal(got, want), (got - want).abs().max()


def test_rows_of_a_wider_buffer_and_several_rows():
    """Rows with a stride (a slice of a wider activation) and M > 1 (one program row each)."""
    K, N = (40, 24) if not CUDA else (2560, 2560)
    wide, gw, packed, s_w, _ = _operands(3, N, K + 8, torch.bfloat16, seed=5)
    x = wide[:, :K]
    gw = gw[:K]
    packed, s_w = ref.weight_quant(torch.randn(N, K), False)
    packed, s_w = packed.to(DEV), s_w.to(DEV)
    want, s_want = _two_kernels(x, gw, 1e-5, False, True, torch.bfloat16, True, 127, packed, s_w, None, torch.bfloat16)
    got, s_got = fg.front_gemv(x, gw, 1e-5, False, True, torch.bfloat16, True, 127, packed, s_w, None, torch.bfloat16)
    assert torch.equal(s_got, s_want) and torch.equal(got, want)


def test_bad_rows_give_nan_like_the_two_kernels():
    K, N = (33, 12) if not CUDA else (2560, 512)
    for bad in (float("nan"), float("inf")):
        x, gw, packed, s_w, b = _operands(1, N, K, torch.float32, seed=3, bias=True)
        x[0, K // 2] = bad
        want, s_want = _two_kernels(x, gw, 1e-6, False, True, torch.float32, True, 127, packed, s_w, b, torch.float32)
        got, s_got = fg.front_gemv(x, gw, 1e-6, False, True, torch.float32, True, 127, packed, s_w, b, torch.float32)
        assert torch.isnan(s_got).all() and torch.isnan(s_want).all()
        assert torch.equal(torch.isnan(got), torch.isnan(want)) and torch.isnan(got).all()


def test_random_activations_agree_up_to_the_norms_rounding():
    K, N = (200, 40) if not CUDA else (6912, 2560)
    for seed in range(3):
        x, gw, packed, s_w, _ = _operands(1, N, K, torch.bfloat16, seed=seed, integer=False)
        want, s_want = _two_kernels(x, gw, 1e-6, False, True, torch.bfloat16, True, 127, packed, s_w, None,
                                    torch.float32)
        got, s_got = fg.front_gemv(x, gw, 1e-6, False, True, torch.bfloat16, True, 127, packed, s_w, None,
                                   torch.float32)
        torch.testing.assert_close(s_got, s_want, rtol=1e-6, atol=0)
        assert_close_up_to_code_flips(got.cpu(), want.cpu())


def test_without_the_scale_the_same_output():
    """``scale=False`` (an eager layer's launches: nobody reads ``s_x``) writes no scales and
    gives the same output bit for bit, bound or not, for any rows of the bound class."""
    x, gw, packed, s_w, b = _operands(6, 40, 72, torch.float32, seed=3, integer=False, bias=True)
    args = (x, None, 0.0, False, False, torch.float32, False, 127, packed, s_w, b, torch.float32)
    want, s_want = fg.front_gemv(*args)
    got, s_got = fg.front_gemv(*args, scale=False)
    assert s_got is None and s_want.shape == (6,)
    assert torch.equal(got, want)
    out, s_none, again = fg.front_gemv(*args, bind=True, scale=False)
    assert s_none is None and torch.equal(out, want)
    x2 = torch.randn(4, 72, device=x.device) * 3
    assert fg.launch_class(4, 40, packed.shape[1], x.device) == fg.launch_class(6, 40, packed.shape[1], x.device)
    assert torch.equal(again(x2), fg.front_gemv(x2, *args[1:])[0])


def test_empty_operands_are_refused():
    x, gw, packed, s_w, _ = _operands(1, 8, 16, torch.float32, seed=0)
    with pytest.raises(ValueError, match="empty"):
        fg.front_gemv(x[:0], gw, 1e-6, False, False, torch.float32, True, 127, packed, s_w, None, torch.float32)


def test_blocks_follow_the_gpu_not_a_table(monkeypatch):
    """About one program per SM: the rows per program follow N / SMs (16 to 128), and a step
    holds at most the tile's words, no more than the packed row has."""
    monkeypatch.setattr(fg, "interpreting", lambda: False)  # the GPU's rule (the interpreter shrinks blocks)
    dev = torch.device("cpu")
    sms = fg.num_sms(dev)
    for N, Kq, want_n in [(8, 64, 16), (40 * sms, 640, 64), (1000 * sms, 640, 128), (3000, 3584, 128)]:
        cfg = fg.front_config(N, Kq, dev)
        assert cfg["BLOCK_N"] == min(want_n, 128)
        assert cfg["BLOCK_N"] * cfg["BLOCK_W"] <= fg._TILE_WORDS and cfg["BLOCK_W"] <= fg.next_pow2(Kq // 4)
        assert cfg["EVEN_W"] == ((Kq // 4) % cfg["BLOCK_W"] == 0)


def test_eager_rows_follow_the_byte_budget(monkeypatch):
    """One row always takes the fused kernel; more rows only for an eager call, and only while
    ``M`` passes over the packed weight plus two passes over a row per program fit
    ``EAGER_BYTES``: the last row count that fits is the one the formula gives."""
    monkeypatch.setattr(fg, "interpreting", lambda: False)
    dev = torch.device("cpu")
    for N, K, x_bytes in [(704, 256, 4), (256, 704, 2), (2560, 2560, 2), (6912, 2560, 2), (20000, 8192, 2)]:
        Kq = packed_k(K)
        assert fg.takes_rows(1, N, Kq, K, x_bytes, dev, eager=False)
        assert fg.takes_rows(1, N, Kq, K, x_bytes, dev, eager=True)
        assert not fg.takes_rows(2, N, Kq, K, x_bytes, dev, eager=False)

        def read(M):
            tiles = -(-N // fg.front_config(N, Kq, dev, M=M)["BLOCK_N"])
            return M * (N * Kq + 2 * tiles * K * x_bytes)

        fits = [M for M in range(2, 2000) if fg.takes_rows(M, N, Kq, K, x_bytes, dev, eager=True)]
        assert fits == [M for M in range(2, 2000) if read(M) <= fg.EAGER_BYTES]
        if N * Kq * 2 > fg.EAGER_BYTES:
            assert not fits  # a large weight: two rows already read more than the budget
    assert fg.takes_rows(100, 704, packed_k(256), 256, 4, dev, eager=True)  # the main job's GPU model, a prompt


def test_switch_reads_the_environment(monkeypatch):
    """Unset: the one-kernel form for eager calls only; 1: everywhere; 0: nowhere; else an error."""
    monkeypatch.delenv("BITFX_FRONT_GEMV", raising=False)
    assert (fg.enabled(), fg.enabled(eager=True)) == (False, True)
    monkeypatch.setenv("BITFX_FRONT_GEMV", "1")
    assert (fg.enabled(), fg.enabled(eager=True)) == (True, True)
    monkeypatch.setenv("BITFX_FRONT_GEMV", "0")
    assert (fg.enabled(), fg.enabled(eager=True)) == (False, False)
    monkeypatch.setenv("BITFX_FRONT_GEMV", "yes")
    with pytest.raises(ValueError, match="BITFX_FRONT_GEMV must be 0 or 1"):
        fg.enabled()


def _kernels_of_a_planned_call(layer, x) -> list[str]:
    """The CUDA kernels (no copies or fills) of an eager call of ``layer`` on ``x`` once its
    launch plan exists; both calls equal the ops (two kernels) bit for bit."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        want = ops_forward(layer, x)
        assert torch.equal(layer(x), want)  # the first call makes the plan
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            got = layer(x)
            torch.cuda.synchronize()
    assert torch.equal(got, want)
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
            and "memset" not in e.name.lower() and "memcpy" not in e.name.lower()]


@pytest.mark.cuda
@pytest.mark.parametrize("setting,kernels", [(None, 1), ("0", 2), ("1", 1)])
@pytest.mark.parametrize("act_bits", [8, 4])
def test_eager_layer_launches_once_per_decode_row(monkeypatch, setting, kernels, act_bits):
    """An eager ``BitfxLinear`` on one row: one kernel by default (the host is the limit there),
    two with ``BITFX_FRONT_GEMV=0``; the output is the ops' (two kernels) bit for bit either way."""
    from bitfx.modules import BitfxLinear

    if setting is None:
        monkeypatch.delenv("BITFX_FRONT_GEMV", raising=False)
    else:
        monkeypatch.setenv("BITFX_FRONT_GEMV", setting)
    torch.manual_seed(act_bits)
    layer = BitfxLinear.from_linear(torch.nn.Linear(2560, 640, device="cuda", dtype=torch.bfloat16))
    layer.act_bits = act_bits
    x = torch.randn(1, 1, 2560, device="cuda", dtype=torch.bfloat16)
    launched = _kernels_of_a_planned_call(layer, x)
    assert len(launched) == kernels, launched


@pytest.mark.cuda
@pytest.mark.parametrize("K,N,M,kernels", [(256, 704, 2, 1), (256, 704, 37, 1), (704, 256, 100, 1),
                                           (2560, 2560, 8, 2)])
def test_eager_layer_launches_once_for_rows_within_the_budget(monkeypatch, K, N, M, kernels):
    """Several rows through a small eager layer: one kernel while the re-reads fit the budget
    (``takes_rows``), two beyond it; the output is the ops' (two kernels) bit for bit."""
    from bitfx.modules import BitfxLinear

    monkeypatch.delenv("BITFX_FRONT_GEMV", raising=False)
    torch.manual_seed(M)
    layer = BitfxLinear.from_linear(torch.nn.Linear(K, N, device="cuda", dtype=torch.bfloat16))
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    assert fg.takes_rows(M, N, layer.packed.shape[1], K, 2, x.device, eager=True) == (kernels == 1)
    launched = _kernels_of_a_planned_call(layer, x)
    assert len(launched) == kernels, launched


# (K, [N_p per part], bias): parts of unequal rows, blocks split across parts, one to four parts.
PARTS_CPU = [(37, [20, 9, 9], False), (64, [8, 8], True), (130, [33], False), (16, [5, 17, 3, 11], True)]
PARTS_CUDA = PARTS_CPU + [(2560, [2560, 512, 512], False), (256, [704, 704], True), (4096, [4096, 1024, 1024, 7], False)]


@pytest.mark.parametrize("K,ns,bias", PARTS_CUDA if CUDA else PARTS_CPU)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_parts_equal_each_linear_alone(K, ns, bias, dtype):
    """Several linears of the same rows in one launch (``front_gemv_parts``): each part's
    output is bit for bit what :func:`front_gemv` gives for that linear alone, a contiguous
    ``[M, N_p]`` tensor, bound or not, for other row counts of the bound class too."""
    g = torch.Generator().manual_seed(K + sum(ns))
    parts = []
    for i, n in enumerate(ns):
        _, _, packed, s_w, b = _operands(1, n, K, dtype, seed=K * 7 + i, bias=bias)
        parts.append((packed, s_w, b))
    for M in (1, 3):
        x = ((torch.randn(M, K, generator=g) * 3).to(dtype)).to(DEV)
        outs, again = fg.front_gemv_parts(x, 127, parts, dtype, bind=True)
        plain, _ = fg.front_gemv_parts(x, 127, parts, dtype)
        assert len(outs) == len(ns)
        for out, same, (packed, s_w, b), n in zip(outs, plain, parts, ns):
            want, _ = fg.front_gemv(x, None, 0.0, False, False, torch.float32, False, 127, packed, s_w, b, dtype)
            assert out.shape == (M, n) and out.is_contiguous() and out.dtype == dtype
            assert torch.equal(out, want) and torch.equal(same, want)
        if M == 3:
            x2 = ((torch.randn(2, K, generator=g) * 3).to(dtype)).to(DEV)
            for out, (packed, s_w, b) in zip(again(x2), parts):  # flat: [2 * N_p] each
                want, _ = fg.front_gemv(x2, None, 0.0, False, False, torch.float32, False, 127, packed, s_w, b, dtype)
                assert out.shape == (want.numel(),) and torch.equal(out.view(want.shape), want)


def test_parts_refuse_what_one_launch_cannot_take():
    _, _, p1, s1, _ = _operands(1, 8, 16, torch.float32, seed=0)
    _, _, p2, s2, b2 = _operands(1, 8, 32, torch.float32, seed=1, bias=True)
    x = torch.randn(2, 16, device=DEV)
    with pytest.raises(ValueError, match="1 to 4"):
        fg.front_gemv_parts(x, 127, [(p1, s1, None)] * 5, torch.float32)
    with pytest.raises(ValueError, match="differ"):
        fg.front_gemv_parts(x, 127, [(p1, s1, None), (p2, s2, b2)], torch.float32)
    with pytest.raises(ValueError, match="empty"):
        fg.front_gemv_parts(x[:0], 127, [(p1, s1, None)], torch.float32)
