"""The FP8 backward of the training ops (``BitfxConfig(backward="fp8")``, :mod:`bitfx.ops.fp8`).

Its products are checked against the exact ones with the rounding bound of e4m3 rather than a
fitted tolerance: an operand element ``a`` with row scale ``s`` is stored with an error of at
most ``EPS * |a| + TAU * s`` (``EPS = 2**-4``: half a unit of e4m3's 3 mantissa bits;
``TAU = 2**-10``: half the spacing of e4m3's subnormals, which start below ``2**-6 * s``), so a
product of rounded operands differs from the exact one by at most
``(|A| + E_A) @ (|B| + E_B) - |A| @ |B|`` (``E`` those per-element bounds), plus fp32's
accumulation (2e-6 of ``|A| @ |B|`` here) and, on the GPU, the bf16 result's rounding (2**-8).
"""

from __future__ import annotations

import pytest
import torch

import bitfx
from bitfx.ops import fp8
from bitfx import reference as ref
from bitfx.config import BitfxConfig
from tests import models

EPS, TAU = 2.0**-4, 2.0**-10


def _element_bound(t: torch.Tensor) -> torch.Tensor:
    """The per-element rounding bound of :func:`bitfx.ops.fp8.round_rows` on ``t [R, C]``."""
    scale = t.abs().amax(dim=1, keepdim=True) / fp8.E4M3_MAX
    return EPS * t.abs() + TAU * scale


def _product_bound(a: torch.Tensor, b: torch.Tensor, a_rows: bool = True, b_cols: bool = True) -> torch.Tensor:
    """Bound on ``|round(a) @ round(b) - a @ b|`` for ``a [M, C]`` rounded per row and ``b [C, N]``
    rounded per column (``*_rows/cols=False``: exact operand)."""
    ea = _element_bound(a) if a_rows else torch.zeros_like(a)
    eb = _element_bound(b.t()).t() if b_cols else torch.zeros_like(b)
    exact = a.abs() @ b.abs()
    return (a.abs() + ea) @ (b.abs() + eb) - exact + 2e-6 * exact


def test_round_rows_keeps_each_element_within_the_e4m3_bound():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(64, 300, generator=g) * torch.logspace(-6, 6, 64).unsqueeze(1)  # rows far apart in size
    t[3] = 0.0  # an all-zero row
    t[5, :100] *= 1e-6  # elements in the subnormal range of their row
    codes, scale = fp8.round_rows(t)
    assert codes.dtype == torch.float8_e4m3fn and scale.shape == (64, 1)
    back = codes.float() * scale
    assert torch.all((back - t).abs() <= _element_bound(t) * (1 + 1e-6))
    assert torch.equal(back[3], torch.zeros(300))
    # the row's largest element maps to 448 (e4m3's largest finite), so no code saturates early
    assert torch.all(codes.float().abs().amax(dim=1)[t.abs().amax(dim=1) > 0] == fp8.E4M3_MAX)


def test_scaled_mm_is_exact_on_representable_operands():
    """Operands every element of which e4m3 holds at its row scale: the FP8 product is the fp32 one."""
    g = torch.Generator().manual_seed(1)
    a = torch.randint(-2, 3, (40, 72), generator=g).float()
    b = torch.randint(-2, 3, (24, 72), generator=g).float()
    a[:, 0], b[:, 0] = 2.0, -2.0  # every row's maximum is 2: the elements are 0, ±112·s, ±224·s, ±448·s
    a8, sa = fp8.round_rows(a)
    b8, sb = fp8.round_rows(b)
    torch.testing.assert_close(fp8.scaled_mm(a8, sa, b8, sb, torch.float32), a @ b.t(), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("per_channel", [False, True])
def test_input_and_weight_gradient_within_the_rounding_bound(per_channel):
    g = torch.Generator().manual_seed(2)
    M, K, Ns = 50, 96, (40, 24)
    douts = [torch.randn(M, n, generator=g) for n in Ns]
    weights = [torch.randn(n, K, generator=g) for n in Ns]
    packs = [ref.weight_quant(w, per_channel) for w in weights]
    codes = [ref.unpack_ternary(p, K) for p, _ in packs]
    scales = [s for _, s in packs]
    got = fp8.input_grad(douts, codes, scales, torch.float32)
    a = torch.cat([d / s.reshape(1, -1) for d, s in zip(douts, scales)], dim=1)
    t = torch.cat([c.float() for c in codes], dim=0)
    want = a @ t
    assert torch.all((got - want).abs() <= _product_bound(a, t, b_cols=False))
    assert not torch.equal(got, want)  # rounding happened: the bound is not vacuous here

    x = torch.randn(M, K, generator=g)
    q, s_x = ref.act_quant(x)
    acts = q.float() / s_x.unsqueeze(1)
    acts_t8, acts_scale = fp8.round_rows(acts.t())
    for d in douts:
        got_w = fp8.weight_grad(d, acts_t8, acts_scale, torch.float32)
        want_w = d.t() @ acts
        assert torch.all((got_w - want_w).abs() <= _product_bound(d.t(), acts))


def _group(x, g, ws, normalize, fp8_backward, dout_seed=3):
    """``bitlinear_stacked`` over ``ws`` (packed by ``weight_quant_stacked``, per tensor): the
    outputs split per weight, their upstream gradients, the leaves' gradients."""
    for t in [x, g, *ws]:
        if t is not None:
            t.grad = None
    packed, scale = torch.ops.bitfx.weight_quant_stacked(ws, [False] * len(ws))
    out = torch.ops.bitfx.bitlinear_stacked(x, g, ws, packed, scale, None, 1e-6, False, False, x.dtype, normalize,
                                            fp8_backward)[0]
    outs = out.split([w.shape[0] for w in ws], dim=-1)
    gen = torch.Generator().manual_seed(dout_seed)
    douts = [torch.randn(o.shape, generator=gen) for o in outs]
    torch.autograd.backward(outs, douts)
    return [o.detach() for o in outs], douts, [None if t is None else t.grad.clone() for t in [x, g, *ws]]


def _packed(ws):
    """The scales and codes ``bitlinear_stacked`` multiplies by in :func:`_group`: per weight."""
    K = ws[0].shape[1]
    packed, scale = torch.ops.bitfx.weight_quant_stacked([w.detach() for w in ws], [False] * len(ws))
    sizes = [w.shape[0] for w in ws]
    return list(scale.split(sizes)), ref.unpack_ternary(packed, K).float()


def test_stacked_op_fp8_backward_leaves_the_forward_and_bounds_the_gradients():
    torch.manual_seed(4)
    M, K = 48, 64
    x = torch.randn(M, K, requires_grad=True)
    ws = [torch.randn(32, K, requires_grad=True), torch.randn(80, K, requires_grad=True)]
    # Without a norm: the input gradient is the FP8 product itself, bounded as above.
    out_e, douts, grads_e = _group(x, None, ws, False, False)
    out_f, _, grads_f = _group(x, None, ws, False, True)
    assert all(torch.equal(a, b) for a, b in zip(out_e, out_f))
    scales, codes = _packed(ws)
    a = torch.cat([d / s.reshape(1, -1) for d, s in zip(douts, scales)], dim=1)
    assert torch.all((grads_f[0] - grads_e[0]).abs() <= _product_bound(a, codes, b_cols=False) + 1e-5)
    q, s_x = ref.act_quant(x.detach())
    acts = q.float() / s_x.unsqueeze(1)
    for d, ge, gf in zip(douts, grads_e[2:], grads_f[2:]):
        assert torch.all((gf - ge).abs() <= _product_bound(d.t(), acts) + 1e-5)
    # With the norm: its backward takes the FP8 input gradient; the weight gradients as above.
    norm_w = torch.rand(K, requires_grad=True)
    _, douts, grads_e = _group(x, norm_w, ws, True, False)
    _, _, grads_f = _group(x, norm_w, ws, True, True)
    q, s_x = ref.norm_quant(x.detach(), norm_w.detach(), 1e-6)
    acts = q.float() / s_x.unsqueeze(1)
    for d, ge, gf in zip(douts, grads_e[2:], grads_f[2:]):
        assert torch.all((gf - ge).abs() <= _product_bound(d.t(), acts) + 1e-5)
    for ge, gf in zip(grads_e[:2], grads_f[:2]):  # each rounding moves them by a few percent, no more
        assert float((gf - ge).norm() / ge.norm()) < 0.1


def test_backend_option_trains_with_fp8_backward():
    """``backward="fp8"`` through the backend: the loss is the exact run's; the gradients are
    near it (a few percent, the rounding of gradients and activations to 3 mantissa bits) and
    not equal to it (the FP8 path ran)."""
    grads, losses = {}, {}
    for mode in ("exact", "fp8"):
        model, ids = models.tiny_llama(dtype=torch.float32)
        model.train()
        loss = torch.compile(model, backend="bitfx", options={"backward": mode}, fullgraph=True)(ids, labels=ids).loss
        loss.backward()
        losses[mode] = loss.detach()
        grads[mode] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        torch._dynamo.reset()
    torch.testing.assert_close(losses["fp8"], losses["exact"], rtol=0, atol=0)
    assert grads["fp8"].keys() == grads["exact"].keys()
    differ = 0
    for name, ge in grads["exact"].items():
        gf = grads["fp8"][name]
        assert float((gf - ge).norm() / ge.norm().clamp_min(1e-12)) < 0.15, name
        differ += not torch.equal(gf, ge)
    assert differ > len(grads["exact"]) // 2


def test_config_rejects_an_unknown_backward():
    with pytest.raises(ValueError, match="backward must be one of"):
        BitfxConfig(backward="fp16")
    assert bitfx.BitfxConfig(backward="fp8").backward == "fp8"


@pytest.mark.cuda
def test_scaled_mm_on_the_gpu_matches_the_definition():
    """The tensor-core path (where the GPU has one; else the definition itself) against the fp32
    product of the same rounded operands, sizes not multiples of 16 included (zero padding).

    Bound: the bf16 result's rounding (2**-8 of the value) plus the accumulation's error,
    relative to ``mag = |A| @ |B|``. Hopper's FP8 tensor cores do not accumulate in full fp32:
    their accumulator keeps about 14 bits when aligning products (DeepSeek-V3's technical report
    measured this; cuBLAS promotes partial sums to fp32 between blocks of the contraction). On
    an H100 this test failed an fp32-only bound (1e-5 of ``mag``); it prints the error it sees
    against 2**-12 (2.4e-4). A transposed or misapplied scale errs by the size of the values."""
    g = torch.Generator().manual_seed(5)
    worst = 0.0
    for M, C, N in [(64, 128, 96), (37, 200, 50), (1, 48, 16), (2048, 1024, 512)]:
        a8, sa = fp8.round_rows(torch.randn(M, C, generator=g))
        b8, sb = fp8.round_rows(torch.randn(N, C, generator=g) * 3)
        want = fp8.scaled_mm(a8, sa, b8, sb, torch.float32)  # CPU: the definition
        got = fp8.scaled_mm(a8.cuda(), sa.cuda(), b8.cuda(), sb.cuda(), torch.float32).cpu()
        mag = (a8.float() * sa).abs() @ (b8.float() * sb).abs().t()
        excess = ((got - want).abs() - 2.0**-8 * want.abs()).clamp_min(0) / mag
        worst = max(worst, float(excess.max()))
        assert torch.all(excess <= 2.0**-12), (M, C, N, float(excess.max()))
    print(f"FP8 tensor-core matmul: accumulation error at most {worst:.2e} of |A| @ |B|")
