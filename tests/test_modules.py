"""BitfxLinear: its numbers are the reference's, its state_dict round-trips and refuses what
does not fit."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bitfx import reference as ref
from bitfx.layout import FORMAT, packed_k
from bitfx.modules import BitfxLinear
from tests.helpers import HAS_CUDA

DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])


def _linear(K, N, bias, dtype, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(K, N, bias=bias)
    return lin.to(dtype)


def _expected(x, lin, per_channel):
    q, s_x = ref.act_quant(x)
    packed, s_w = ref.weight_quant(lin.weight.detach(), per_channel)
    b = None if lin.bias is None else lin.bias.detach()
    return ref.ternary_matmul(q, s_x, packed, s_w, b, x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("K, N", [(64, 48), (37, 5), (1, 3)])
def test_forward_is_the_reference(dtype, per_channel, bias, K, N):
    lin = _linear(K, N, bias, dtype)
    m = BitfxLinear.from_linear(lin, per_channel=per_channel)
    x = torch.randn(2, 3, K, dtype=dtype)
    out = m(x)
    assert out.dtype == dtype and out.shape == (2, 3, N)
    assert torch.equal(out, _expected(x, lin, per_channel))
    assert m.packed.dtype == torch.uint8 and m.packed.shape == (N, packed_k(K))
    assert m.w_scale.dtype == torch.float32 and m.w_scale.shape == (N,)
    if bias:
        assert m.bias.dtype == dtype and torch.equal(m.bias, lin.bias.detach())
    else:
        assert m.bias is None
    assert not list(m.parameters())


def test_forward_approximates_the_float_layer():
    lin = _linear(256, 64, True, torch.float32)
    m = BitfxLinear.from_linear(lin)
    x = torch.randn(8, 256)
    # The dequantized weight times the fake-quantized input, in fp32: agrees to rounding.
    q, s_x = ref.act_quant(x)
    dense = nn.functional.linear(q.float() / s_x.unsqueeze(-1), m.dequantize(torch.float32), lin.bias)
    torch.testing.assert_close(m(x), dense, rtol=1e-5, atol=1e-5)


def test_from_ternary():
    t = torch.tensor([[1, 0, -1, 1, 0], [0, 0, 0, -1, 1]], dtype=torch.int8)
    m = BitfxLinear.from_ternary(t, torch.tensor([2.0, 4.0]), bias=torch.tensor([0.5, -0.5]))
    assert torch.equal(ref.unpack_ternary(m.packed, 5), t)
    assert torch.equal(m.dequantize(torch.float32), t.float() / torch.tensor([[2.0], [4.0]]))
    x = torch.randn(3, 5)
    q, s_x = ref.act_quant(x)
    assert torch.equal(m(x), ref.ternary_matmul(q, s_x, m.packed, m.w_scale, m.bias, x.dtype))


def test_wrong_input_features():
    m = BitfxLinear.from_linear(_linear(64, 8, False, torch.float32))
    with pytest.raises(ValueError, match="60 features.*expected 64"):
        m(torch.randn(2, 60))


def test_to_dtype_keeps_fp32_scales():
    lin = _linear(32, 16, True, torch.float32)
    m = BitfxLinear.from_linear(lin)
    scale = m.w_scale.clone()
    m.to(torch.bfloat16)
    assert m.w_scale.dtype == torch.float32 and torch.equal(m.w_scale, scale)
    assert m.bias.dtype == torch.bfloat16 and m.packed.dtype == torch.uint8
    assert m.ternary_format.dtype == torch.int64
    assert m(torch.randn(4, 32, dtype=torch.bfloat16)).dtype == torch.bfloat16
    m.half()
    assert m.w_scale.dtype == torch.float32 and m.bias.dtype == torch.float16


def test_state_dict_round_trip(tmp_path):
    m = BitfxLinear.from_linear(_linear(40, 24, True, torch.bfloat16), per_channel=True)
    torch.save(m.state_dict(), tmp_path / "layer.pt")
    fresh = BitfxLinear(40, 24, bias=True, dtype=torch.bfloat16)
    fresh.load_state_dict(torch.load(tmp_path / "layer.pt", weights_only=True))
    x = torch.randn(5, 40, dtype=torch.bfloat16)
    assert torch.equal(fresh(x), m(x))
    assert set(m.state_dict()) == {"packed", "w_scale", "bias", "ternary_format"}


def _sd(K=64, N=8):
    return BitfxLinear.from_linear(_linear(K, N, True, torch.float32)).state_dict()


def _load(sd, K=64, N=8, strict=True):
    BitfxLinear(K, N).load_state_dict(sd, strict=strict)


def test_load_wrong_packed_dtype():
    sd = _sd()
    sd["packed"] = sd["packed"].to(torch.int8)
    with pytest.raises(RuntimeError, match="packed: must be uint8.*got int8"):
        _load(sd)


def test_load_wrong_packed_shape():
    sd = _sd(K=64)
    sd["packed"] = torch.zeros(8, 32, dtype=torch.uint8)  # 128 columns' worth
    with pytest.raises(RuntimeError, match="packed: .*32 bytes per row, but K=64 needs 16"):
        _load(sd, strict=False)
    sd = _sd(K=64, N=8)
    with pytest.raises(RuntimeError, match="packed: .*8 rows, expected N=6"):
        _load(sd, N=6, strict=False)


def test_load_other_in_features_same_packed_width():
    # K=60 and K=64 pack to the same 16 bytes per row: only the tag tells them apart.
    sd = _sd(K=60)
    with pytest.raises(RuntimeError, match="packed for in_features=60, this layer has 64"):
        _load(sd, K=64)


def test_load_wrong_format_tag():
    sd = _sd()
    sd["ternary_format"] = torch.tensor([12345, 64])
    with pytest.raises(RuntimeError, match=f"another format than {FORMAT}"):
        _load(sd)
    del sd["ternary_format"]
    with pytest.raises(RuntimeError, match="ternary_format: missing; not a bitfx checkpoint"):
        _load(sd)


def test_load_wrong_scale():
    sd = _sd()
    sd["w_scale"] = sd["w_scale"].to(torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"w_scale: expected float32 of shape \(8,\), got bfloat16"):
        _load(sd)


def test_load_float_checkpoint():
    sd = _linear(64, 8, True, torch.float32).state_dict()
    with pytest.raises(RuntimeError, match="holds a float weight.*bitfx.quantize"):
        _load(sd)


def test_compiles_with_the_ops():
    m = BitfxLinear.from_linear(_linear(64, 32, True, torch.float32))
    x = torch.randn(3, 7, 64)
    torch._dynamo.reset()
    try:
        out = torch.compile(m, backend="aot_eager", fullgraph=True)(x)
    finally:
        torch._dynamo.reset()
    assert torch.equal(out, m(x))


# ------------------------------------------------------------------ invalid codes: refused at construction and load


def _codes_sd(K=10, N=4):
    return BitfxLinear.from_linear(_linear(K, N, True, torch.float32)).state_dict()


@pytest.mark.parametrize("where, pattern", [
    ("code3", r"packed: packed ternary weight holds the invalid 2-bit code 3 .* at row 2, column 1"),
    ("padding", r"packed: .*code 2 in a padding column \(k >= K=10 must hold code 1"),
])
def test_load_refuses_invalid_codes(where, pattern):
    sd = _codes_sd()
    packed = sd["packed"].clone()
    if where == "code3":
        packed[2, 1] |= 0b11  # plane 0 of byte 1: column 1
    else:
        packed[0, 15] = (packed[0, 15] & ~0b11) | 0b10  # column 15 >= K: padding, now code 2
    sd["packed"] = packed
    m = BitfxLinear(10, 4)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(RuntimeError, match=pattern):
        m.load_state_dict(sd)
    # Nothing was loaded: the layer is as it was.
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf")])
def test_load_refuses_nonpositive_or_infinite_scales(bad):
    sd = _codes_sd()
    sd["w_scale"] = sd["w_scale"].clone()
    sd["w_scale"][3] = bad
    with pytest.raises(RuntimeError, match=r"w_scale: must be positive and finite .* for output 3"):
        BitfxLinear(10, 4).load_state_dict(sd)


def test_load_keeps_nan_scales():
    """A NaN scale is what weight_quant gives a weight that held NaN or Inf: defined, and loaded."""
    lin = _linear(10, 4, False, torch.float32)
    with torch.no_grad():
        lin.weight[1, 2] = float("inf")
    m = BitfxLinear.from_linear(lin, per_channel=True)
    assert torch.isnan(m.w_scale[1])
    fresh = BitfxLinear(10, 4, bias=False, per_channel=True)
    fresh.load_state_dict(m.state_dict())
    assert torch.equal(fresh.w_scale.isnan(), m.w_scale.isnan())


# ------------------------------------------------------------------ from_ternary checks its input


def test_from_ternary_refuses_bad_input():
    t = torch.tensor([[1, 0, -1], [0, 1, 1]], dtype=torch.int8)
    s = torch.tensor([2.0, 4.0])
    with pytest.raises(ValueError, match=r"bias has shape \(3,\), expected \(2,\)"):
        BitfxLinear.from_ternary(t, s, bias=torch.zeros(3))
    with pytest.raises(TypeError, match="bias must be a float tensor of shape \\(2,\\), got int64"):
        BitfxLinear.from_ternary(t, s, bias=torch.zeros(2, dtype=torch.long))
    for bad in (0.0, -2.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="w_scale must be finite and positive"):
            BitfxLinear.from_ternary(t, bad)
        with pytest.raises(ValueError, match="w_scale must be finite and positive .* for output 1"):
            BitfxLinear.from_ternary(t, torch.tensor([2.0, bad]))
    with pytest.raises(ValueError, match=r"w_scale must be a scalar or of shape \(2,\), got shape \(3,\)"):
        BitfxLinear.from_ternary(t, torch.ones(3))
    with pytest.raises(TypeError, match="t must hold int8 ternary codes .* got float32"):
        BitfxLinear.from_ternary(t.float(), s)
    with pytest.raises(ValueError, match=r"t must hold ternary codes in \{-1, 0, 1\}, got 2 at \[1, 0\]"):
        BitfxLinear.from_ternary(torch.tensor([[1, 0, -1], [2, 1, 1]], dtype=torch.int8), s)
    with pytest.raises(ValueError, match=r"t must be 2-D \[N, K\] with K >= 1, got shape \(3,\)"):
        BitfxLinear.from_ternary(t[0], s)
    m = BitfxLinear.from_ternary(t, 2.0)  # a scalar scale serves every output
    assert torch.equal(m.w_scale, torch.full((2,), 2.0))


# ------------------------------------------------------------------ weight_dtype follows casts


def test_weight_dtype_follows_casts():
    m = BitfxLinear.from_linear(_linear(16, 8, True, torch.float32))
    assert m.weight_dtype == torch.float32
    m.half()
    assert m.weight_dtype == torch.float16 and m.w_scale.dtype == torch.float32
    m.float()
    assert m.weight_dtype == torch.float32 and m.bias.dtype == torch.float32
    m.to(torch.bfloat16)
    assert m.weight_dtype == torch.bfloat16
    m.to("cpu")  # a device move alone keeps it
    assert m.weight_dtype == torch.bfloat16
    assert m.dequantize().dtype == torch.bfloat16


# ------------------------------------------------------------------ 0-D input


def test_zero_dim_input():
    m = BitfxLinear.from_linear(_linear(8, 4, False, torch.float32))
    with pytest.raises(ValueError, match=r"input must be a tensor \[\.\.\., 8\] \(features last\), got \(\)"):
        m(torch.tensor(1.0))


# ------------------------------------------------------------------ grad mode: the input's gradient passes through


class _OpLog(torch.utils._python_dispatch.TorchDispatchMode):
    """The bitfx ops a call dispatches."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "bitfx":
            self.ops.append(func.__name__.split(".")[0])
        return func(*args, **(kwargs or {}))


def _ste_reference(m, x):
    t = ref.unpack_ternary(m.packed, m.in_features)
    return ref.ternary_linear_ste(x, None, t, m.w_scale, m.bias, normalize=False, out_dtype=x.dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_grad_mode_input_gradient(device, dtype, bias):
    m = BitfxLinear.from_linear(_linear(48, 12, bias, dtype), per_channel=True).to(device)
    x = torch.randn(2, 5, 48, dtype=dtype).to(device)
    with torch.no_grad(), _OpLog() as log_inf:
        want = m(x)
    # Inference (no grad, or an input that needs none): act_quant + ternary_matmul, what the pass matches.
    assert log_inf.ops == ["act_quant", "ternary_matmul"]
    with _OpLog() as log_plain:
        assert torch.equal(m(x), want)
    assert log_plain.ops == ["act_quant", "ternary_matmul"]

    xg = x.clone().requires_grad_()
    with _OpLog() as log_grad:
        out = m(xg)
    assert log_grad.ops == ["ternary_linear_group"]
    assert torch.equal(out.detach(), want)  # the same kernels: bit for bit
    dout = torch.linspace(-1, 1, out.numel()).reshape(out.shape).to(dtype).to(device)
    out.backward(dout)

    xr = x.clone().requires_grad_()
    _ste_reference(m, xr).backward(dout)
    assert xg.grad.dtype == dtype
    # The op runs dout @ (t / s_w) in dout's dtype, the reference in fp32.
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    scale = xr.grad.float().abs().max()
    assert (xg.grad.float() - xr.grad.float()).abs().max() <= tol * scale
    assert not list(m.parameters())


def test_grad_mode_model_trains_around_frozen_layers():
    """A float layer before a frozen BitfxLinear gets its gradient through it."""
    torch.manual_seed(0)
    front = nn.Linear(16, 32)
    m = BitfxLinear.from_linear(_linear(32, 8, True, torch.float32))
    x = torch.randn(4, 16)
    m(front(x)).sum().backward()
    assert front.weight.grad is not None and front.weight.grad.abs().sum() > 0
    h = front(x).detach().requires_grad_()
    _ste_reference(m, h).sum().backward()
    want = h.grad.t() @ x
    torch.testing.assert_close(front.weight.grad, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_compile_inductor_grad_mode(device):
    """torch.compile (Inductor) of a model of BitfxLinear layers in grad mode: the input
    gradient is the straight-through one."""
    torch.manual_seed(0)
    model = nn.Sequential(
        BitfxLinear.from_linear(_linear(32, 24, True, torch.float32)),
        nn.ReLU(),
        BitfxLinear.from_linear(_linear(24, 8, False, torch.float32, seed=1), per_channel=True),
    ).to(device)
    x = torch.randn(3, 32).to(device)
    dout = torch.linspace(-1, 1, 3 * 8).reshape(3, 8).to(device)

    def reference(x):
        h = torch.relu(_ste_reference(model[0], x))
        return _ste_reference(model[2], h)

    xr = x.clone().requires_grad_()
    out_ref = reference(xr)
    out_ref.backward(dout)

    torch._dynamo.reset()
    try:
        compiled = torch.compile(model, backend="inductor")
        xc = x.clone().requires_grad_()
        out = compiled(xc)
        out.backward(dout)
    finally:
        torch._dynamo.reset()
    with torch.no_grad():
        eager = model(x)
    # The same ops as eager; Inductor compiles only the ReLU around them.
    assert torch.equal(out.detach(), eager)
    torch.testing.assert_close(out.detach(), out_ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xc.grad, xr.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("M", [1, 5, 200])
def test_eager_launch_plan_follows_the_layer(M):
    """Eager on CUDA a layer launches through a plan per input shape, bound on its first call:
    later calls give the ops' numbers, a write into a buffer is read by the next call, a
    replaced buffer gets a new plan, and a copy of the layer runs its own tensors."""
    import copy

    ops = torch.ops.bitfx
    layer = BitfxLinear.from_linear(_linear(256, 96, True, torch.bfloat16).cuda())
    other = BitfxLinear.from_linear(_linear(256, 96, True, torch.bfloat16, seed=1).cuda())
    x = torch.randn(M, 256, dtype=torch.bfloat16, device="cuda")

    def by_ops(lay):
        with torch.no_grad():
            q, s = ops.act_quant(x)
            return ops.ternary_matmul(q, s, lay.packed, lay.w_scale, lay.bias, x.dtype, 256)

    with torch.no_grad():
        want = by_ops(layer)
        for _ in range(3):
            assert torch.equal(layer(x), want)
        assert len(layer._plans) == 1
        twin = copy.deepcopy(layer)
        for name in ("packed", "w_scale", "bias"):
            getattr(layer, name).copy_(getattr(other, name))  # written in place: the plan reads it
        assert torch.equal(layer(x), by_ops(other))
        assert torch.equal(twin(x), want)  # the copy kept its own tensors
        layer.packed = twin.packed.clone()  # replaced: a new plan
        layer.w_scale, layer.bias = twin.w_scale.clone(), twin.bias.clone()
        assert torch.equal(layer(x), want)
        assert len(layer._plans) == 1
        layer.cpu()
        assert "_plans" not in layer.__dict__  # moving drops the plans (and what they hold)
        layer.cuda()
        assert torch.equal(layer(x), want)


class _ReadsWeightDtype(nn.Module):
    """As some transformers models write it: the input cast to a linear's weight dtype first."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(40, 24)

    def forward(self, x):
        return self.proj(x.to(self.proj.weight.dtype))


@pytest.mark.parametrize("layer", ["ternary", "int8"])
def test_weight_reads_as_the_dense_weight_and_cannot_be_assigned(layer):
    from bitfx.modules import Int8Linear

    torch.manual_seed(0)
    lin = nn.Linear(40, 24).to(torch.bfloat16)
    m = BitfxLinear.from_linear(lin) if layer == "ternary" else Int8Linear.from_linear(lin)
    w = m.weight
    assert w.shape == (24, 40) and w.dtype == torch.bfloat16 and w.device == lin.weight.device
    assert torch.equal(w, m.dequantize())
    assert "weight" not in m.state_dict() and not list(m.parameters())
    for value in (torch.zeros(24, 40), nn.Parameter(torch.zeros(24, 40))):
        with pytest.raises(AttributeError, match=r"weight is read-only.*from_linear"):
            m.weight = value
    assert torch.equal(m.weight, w)


def test_model_that_reads_a_linear_weight_runs_after_quantize(fresh_dynamo):
    import bitfx

    torch.manual_seed(0)
    model = _ReadsWeightDtype().eval()
    x = torch.randn(3, 40, dtype=torch.float64)
    converted = bitfx.quantize(model, x.float())
    assert isinstance(converted.proj, BitfxLinear)
    with torch.no_grad():
        eager = converted(x)
        compiled = torch.compile(converted, backend="bitfx")(x)
    assert eager.dtype == torch.float32
    expected = converted.proj(x.float())
    assert torch.equal(eager, expected) and torch.equal(compiled, expected)


def test_writing_into_a_converted_weight_is_refused():
    """A model that rescales a linear's weight in place (RWKV's ``weight.div_`` when it switches
    to eval) must not run on unchanged codes: the copy ``weight`` gives refuses the write."""
    m = BitfxLinear.from_linear(nn.Linear(40, 24))
    for write in (lambda w: w.div_(2), lambda w: w.mul_(2), lambda w: w.copy_(torch.zeros(24, 40))):
        with torch.no_grad(), pytest.raises(RuntimeError, match="[Ii]nplace update to inference tensor"):
            write(m.weight)
    x = torch.randn(3, 40, requires_grad=True)
    with pytest.raises(RuntimeError, match="[Ii]nference tensor"):  # nor is it a differentiable stand-in
        nn.functional.linear(x, m.weight).sum().backward()
