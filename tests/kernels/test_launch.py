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
from tests.helpers import ops_forward


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
    torch.testing.assert_close(direct, ops_forward(layer, x), rtol=0, atol=0)
    # Leading dims and a non-contiguous last dimension take the same path.
    xt = torch.randn(200, 2, M, device="cuda", dtype=dtype).permute(1, 2, 0)
    torch.testing.assert_close(layer(xt), ops_forward(layer, xt.contiguous()), rtol=0, atol=0)


@pytest.mark.cuda
def test_direct_path_with_four_bit_activations_and_under_fake_mode():
    linear = torch.nn.Linear(96, 64, device="cuda", dtype=torch.bfloat16)
    layer = BitfxLinear.from_linear(linear)
    layer.act_bits = 4
    x = torch.randn(5, 96, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(layer(x), ops_forward(layer, x), rtol=0, atol=0)
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


# ------------------------------------------------------------------ launch plans (bind), on any device


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU: Triton's interpreter


@pytest.mark.parametrize("norm,has_weight,K", [(True, True, 40), (True, False, 64), (False, False, 36)])
def test_bound_quant_launch_repeats_the_launch(norm, has_weight, K):
    """``again(x)`` of a bound launch gives what a fresh launch gives for that ``x``."""
    from bitfx.kernels import norm_quant as nq

    g = torch.randn(K, device=DEVICE) if has_weight else None
    x0, x1 = torch.randn(3, K, device=DEVICE), torch.randn(3, K, device=DEVICE) * 5
    x2 = torch.randn(2, K, device=DEVICE)  # fewer rows, the same class: the same bound launch serves them
    assert nq.launch_class(2, x0.device) == nq.launch_class(3, x0.device)
    q, s, r, again = nq._launch_quant(x0, g, 1e-6, False, True, torch.float32, norm=norm, qmax=127, bind=True)
    want0 = nq._launch_quant(x0, g, 1e-6, False, True, torch.float32, norm=norm, qmax=127)
    want1 = nq._launch_quant(x1, g, 1e-6, False, True, torch.float32, norm=norm, qmax=127)
    want2 = nq._launch_quant(x2, g, 1e-6, False, True, torch.float32, norm=norm, qmax=127)
    for got, want in ((q, s, r), want0), (again(x1), want1), (again(x2), want2):
        assert got[0].shape == want[0].shape and got[1].shape == want[1].shape
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert (got[2] is None) == (not norm) and (not norm or torch.equal(got[2], want[2]))


@pytest.mark.parametrize("M,K,split_k", [(1, 64, None), (1, 60, 2), (5, 128, None), (5, 128, 2), (70, 96, None)])
@pytest.mark.parametrize("has_bias", [False, True])
def test_bound_matmul_launch_repeats_the_launch(M, K, split_k, has_bias):
    """``again(q, x_scale)`` of a bound matmul: every path (dp4a, gemv, tensor cores), split K,
    and codes padded to whole words (K % 4 != 0)."""
    from bitfx.kernels import ternary_matmul as tm

    N = 24
    packed, w_scale = torch.ops.bitfx.weight_quant(torch.randn(N, K, device=DEVICE), True)
    bias = torch.randn(N, device=DEVICE) if has_bias else None
    q0, q1 = (torch.randint(-128, 128, (M, K), dtype=torch.int8, device=DEVICE) for _ in range(2))
    s0, s1 = torch.rand(M, device=DEVICE) + 0.5, torch.rand(M, device=DEVICE) + 0.5
    out, again = tm.run(q0, s0, packed, w_scale, bias, torch.float32, split_k=split_k, bind=True)
    assert again is not None
    assert torch.equal(out, tm.run(q0, s0, packed, w_scale, bias, torch.float32, split_k=split_k))
    assert torch.equal(again(q1, s1), tm.run(q1, s1, packed, w_scale, bias, torch.float32, split_k=split_k))
    # Another row count of the same class (the same path, blocks and Triton specialization of M):
    # the bound launch takes the rows from the codes, and its grid from them.
    Kq = packed.shape[1]
    same = [m for m in range(M + 1, M + 40) if tm.launch_class(m, N, Kq, packed.device) == tm.launch_class(M, N, Kq, packed.device)]
    if M > 1:  # M = 1 is a class of its own (Triton specializes an int equal to 1)
        assert same, "no other row count shares the class"
        M2 = same[-1]
        q2 = torch.randint(-128, 128, (M2, K), dtype=torch.int8, device=DEVICE)
        s2 = torch.rand(M2, device=DEVICE) + 0.5
        got = again(q2, s2)
        assert got.shape == (M2, N)
        assert torch.equal(got, tm.run(q2, s2, packed, w_scale, bias, torch.float32, split_k=split_k))
    else:
        assert not same


def test_no_plan_over_copies():
    """A plan would keep a copy of a non-contiguous scale, blind to writes into the original."""
    from bitfx.kernels import ternary_matmul as tm

    packed, w_scale = torch.ops.bitfx.weight_quant(torch.randn(8, 32, device=DEVICE), True)
    strided = torch.stack([w_scale, w_scale], 1)[:, 0]
    q = torch.randint(-128, 128, (1, 32), dtype=torch.int8, device=DEVICE)
    out, again = tm.run(q, torch.ones(1, device=DEVICE), packed, strided, None, torch.float32, bind=True)
    assert again is None and out.shape == (1, 8)


def test_eager_plan_logic(monkeypatch):
    """The plans of ``BitfxLinear``'s eager path (run here on the device at hand; the module
    takes this path on CUDA): one per input shape, reused, reading writes into the buffers,
    replaced with a buffer, dropped by a move and by a copy of the module. The two-kernel form
    (the one-kernel form off), whose row classes are finer."""
    import copy

    from bitfx import modules

    monkeypatch.setenv("BITFX_FRONT_GEMV", "0")

    layer = BitfxLinear.from_linear(torch.nn.Linear(64, 16).to(DEVICE))
    other = BitfxLinear.from_linear(torch.nn.Linear(64, 16).to(DEVICE))
    x = torch.randn(2, 3, 64, device=DEVICE)
    qmax = 127
    with torch.no_grad():
        want = ops_forward(layer, x)
        first = modules._launch_direct(layer, x, layer.bias, qmax)
        plans = dict(layer._plans)
        assert len(plans) == 1
        torch.testing.assert_close(first, want, rtol=1e-5, atol=1e-5)  # CPU: the ops are the reference
        assert torch.equal(modules._launch_direct(layer, x, layer.bias, qmax), first)
        assert layer._plans == plans  # reused, not rebuilt
        modules._launch_direct(layer, x[:, :1], layer.bias, qmax)
        assert len(layer._plans) == 2  # another row class (2 rows against 6; the interpreter's 4 SMs), another plan
        for T in (4, 5):  # 8 and 10 rows: the class of the first 6, so its plan, each with its own output
            xt = torch.randn(2, T, 64, device=DEVICE)
            got = modules._launch_direct(layer, xt, layer.bias, qmax)
            assert got.shape == (2, T, 16)
            torch.testing.assert_close(got, ops_forward(layer, xt), rtol=1e-5, atol=1e-5)
        assert len(layer._plans) == 2
        modules._launch_direct(layer, torch.randn(16, 64, device=DEVICE), layer.bias, qmax)
        assert len(layer._plans) == 3  # 16 rows: Triton specializes an int divisible by 16, so a class of its own
        for name in ("packed", "w_scale", "bias"):
            getattr(layer, name).copy_(getattr(other, name))
        assert torch.equal(modules._launch_direct(layer, x, layer.bias, qmax),
                           modules._launch_direct(other, x, other.bias, qmax))
        layer.w_scale = layer.w_scale.clone()  # replaced: the plans go, a new one is made
        modules._launch_direct(layer, x, layer.bias, qmax)
        assert len(layer._plans) == 1
        assert "_plans" not in copy.deepcopy(layer).__dict__
        monkeypatch.setattr(modules, "_MAX_PLANS", 2)
        for T in (4, 5, 6):
            modules._launch_direct(layer, x[:, :1].expand(2, T, 64).contiguous(), layer.bias, qmax)
        assert len(layer._plans) <= 2
        layer.to(DEVICE, torch.float32)
        assert "_plans" not in layer.__dict__


@pytest.mark.parametrize("front", [True, False])
@pytest.mark.parametrize("K,bias", [(36, True), (64, False)])
def test_eager_plans_across_growing_and_shrinking_row_counts(monkeypatch, K, bias, front):
    """A prompt that grows by a row per call (generation without a KV cache), then shorter
    ones again: every call equals the ops (the CPU: their reference, the interpreter's kernels;
    CUDA: the same kernels, so the same bits), and the layer keeps one plan per row class, not
    per row count. K = 36 is not a whole number of 4-code words (the codes are padded). With
    the one-kernel form (a layer this small takes it for all these rows) and without."""
    from bitfx import modules

    if front:
        monkeypatch.delenv("BITFX_FRONT_GEMV", raising=False)
    else:
        monkeypatch.setenv("BITFX_FRONT_GEMV", "0")
    torch.manual_seed(K)
    layer = BitfxLinear.from_linear(torch.nn.Linear(K, 24, bias=bias).to(DEVICE))
    counts = list(range(2, 20)) + [33, 17, 3, 2, 48]
    N, Kq = layer.packed.shape
    classes = {modules._row_class(m, N, Kq, K, 4, front, layer.packed.device) for m in counts}
    assert all((c[0] == "front") == front for c in classes)
    exact = DEVICE == "cuda"
    with torch.no_grad():
        for m in counts:
            x = torch.randn(1, m, K, device=DEVICE)
            got = modules._launch_direct(layer, x, layer.bias, 127)
            want = ops_forward(layer, x)
            assert got.shape == (1, m, 24)
            if exact:
                assert torch.equal(got, want), f"{m} rows"
            else:
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert len(layer._plans) == len(classes) < len(set(counts))


def test_eager_one_kernel_form_within_its_byte_budget(monkeypatch):
    """Row counts whose passes fit ``EAGER_BYTES`` take the one-kernel form (class "front", one
    kernel's plan), the others the two kernels; both equal the ops, and a layer moving between
    them keeps a plan for each class."""
    from bitfx import modules
    from bitfx.kernels import front_gemv as fg

    monkeypatch.delenv("BITFX_FRONT_GEMV", raising=False)
    monkeypatch.setattr(modules, "_ROW_CLASSES", {})  # classes made under this budget only
    torch.manual_seed(0)
    K, N = 40, 24
    layer = BitfxLinear.from_linear(torch.nn.Linear(K, N).to(DEVICE))
    Kq = layer.packed.shape[1]
    dev = layer.packed.device
    per_row = N * Kq + 2 * -(-N // fg.front_config(N, Kq, dev, M=5)["BLOCK_N"]) * K * 4
    monkeypatch.setattr(fg, "EAGER_BYTES", 5 * per_row)
    fronts = {m: modules._row_class(m, N, Kq, K, 4, True, dev)[0] == "front" for m in range(1, 12)}
    assert fronts[1] and fronts[5], fronts
    assert not any(fronts[m] for m in range(6, 12)), fronts  # 6 rows read more than the budget
    with torch.no_grad():
        for m in (3, 9, 4, 10, 5, 6):
            x = torch.randn(m, K, device=DEVICE)
            got = modules._launch_direct(layer, x, layer.bias, 127)
            if DEVICE == "cuda":
                assert torch.equal(got, ops_forward(layer, x)), f"{m} rows"
            else:
                torch.testing.assert_close(got, ops_forward(layer, x), rtol=1e-5, atol=1e-5)
    kinds = sorted(k[-1][0] == "front" for k in layer._plans)
    assert kinds[-1] and not kinds[0], layer._plans.keys()
