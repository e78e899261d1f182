"""The ``bitfx::`` op library (:mod:`bitfx.ops.library`): the catalogue, opcheck of every op on
every device, and the input checks every implementation shares (bad input, 0-D input, device
mismatch, ``in_features``, invalid packed codes).

On CPU the ops run the reference; on CUDA they run the Triton kernels, so the same tests check
the kernels' guards through the ops on the GPU.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from torch.library import opcheck

import bitfx
import bitfx.ops
from bitfx.layout import packed_k
from bitfx.ops import SCHEMAS
from tests.helpers import DEVICES, seeded_randn as _x

ops = torch.ops.bitfx

# The ops the split of bitfx/ops.py pruned (op names under torch.ops.bitfx).
PRUNED_OPS = ("bitlinear", "bitlinear_group", "act_dequant", "rms_norm_backward")


# ------------------------------------------------------------------ the catalogue is what is registered


def _registered_bitfx_ops() -> set[str]:
    """The names of the ops the dispatcher knows under ``bitfx::`` (overload names stripped)."""
    names = torch._C._dispatch_get_all_op_names()
    return {n[len("bitfx::"):].split(".")[0] for n in names if n.startswith("bitfx::")}


def test_catalogue_lists_exactly_the_registered_ops():
    from bitfx.ops import inductor  # the ops' forms launched by Inductor (their schemas inferred)

    forms = {op._schema.name.split("::")[1] for op in inductor.TRITON_FORMS.values()}
    assert forms == {f"{op._schema.name.split('::')[1]}_triton" for op in inductor.TRITON_FORMS}
    assert _registered_bitfx_ops() == set(SCHEMAS) | forms
    for name in SCHEMAS:
        packet = getattr(ops, name)
        assert isinstance(packet, torch._ops.OpOverloadPacket), name
        assert packet._qualified_op_name == f"bitfx::{name}"
        # bitfx.ops re-exports every packet under its own name.
        assert getattr(bitfx.ops, name) is packet, name


def test_pruned_ops_are_gone():
    registered = _registered_bitfx_ops()
    for name in PRUNED_OPS:
        assert not hasattr(ops, name), name
        assert name not in registered, name
    # bitfx.ops.bitlinear is the function (built on the stacked ops), no longer an op.
    assert not hasattr(bitfx.ops, "bitlinear_full")
    assert not isinstance(bitfx.ops.bitlinear, torch._ops.OpOverloadPacket)
    assert bitfx.bitlinear is bitfx.ops.bitlinear
    nq = importlib.import_module("bitfx.kernels.norm_quant")
    assert not hasattr(nq, "act_dequant") and not hasattr(nq, "rms_norm_backward")
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("bitfx.fp8")  # moved to bitfx.ops.fp8


# ------------------------------------------------------------------ opcheck, every op, every device


def _op_cases(device, M=5, K=40, N=24, dtype=torch.bfloat16):
    """``{case: (op name, args)}``: at least one case for every op of the catalogue."""
    x = _x((2, M, K), dtype, device, 1)
    g = _x((K,), dtype, device, 2)
    W = _x((N, K), dtype, device, 3)
    b = _x((N,), dtype, device, 4)
    q, s = ops.norm_quant(x, g, 1e-6, False, True, dtype)
    packed, sw = ops.weight_quant(W, False)

    def leaf(t):
        return t.detach().clone().requires_grad_()

    return {
        "norm_quant": ("norm_quant", (x, g, 1e-6, False, True, dtype)),
        "norm_quant_gemma": ("norm_quant", (x, g, 1e-6, True, False, dtype)),
        "norm_quant_noweight": ("norm_quant", (x, None, 1e-5, False, True, torch.float32)),
        "add_norm_quant": ("add_norm_quant", (x, _x((2, M, K), dtype, device, 5), g, 1e-6, False, True, dtype)),
        "add_norm_quant_fp32_gemma_noweight": (
            "add_norm_quant", (x.float(), x.float()[:, :1].expand(2, M, K), None, 1e-5, True, False, torch.float32, 6)),
        "glu_quant_relu2": ("glu_quant", (x, _x((2, M, K), dtype, device, 6), "relu2", g, 1e-6, False, True, dtype,
                                          True)),
        "glu_quant_silu_nonorm_strided": (
            "glu_quant", (x[..., :K // 2], x[..., K // 2:], "silu", None, 0.0, False, False, torch.float32, False, 4)),
        "act_quant": ("act_quant", (x,)),
        "weight_quant": ("weight_quant", (W, False)),
        "weight_quant_per_channel": ("weight_quant", (W, True)),
        "ternary_matmul": ("ternary_matmul", (q, s, packed, sw, b, dtype, K)),
        "ternary_matmul_nobias": ("ternary_matmul", (q, s, packed, sw, None, torch.float32, K)),
        "ternary_linear": ("ternary_linear", (x, g, 1e-6, False, True, dtype, True, 8, packed, sw, b, dtype, K)),
        "ternary_linear_one_row_nonorm": (
            "ternary_linear", (x[:1, :1], None, 0.0, False, False, torch.float32, False, 6, packed, sw, None,
                               torch.float32, K)),
        "dequantize": ("dequantize", (packed, sw, K, dtype)),
        "dequantize_unvalidated": ("dequantize", (packed, sw, K, torch.float32, False)),
        "ternary_linear_group": (
            "ternary_linear_group",
            (leaf(x), leaf(g), [packed, packed[:7]], [sw, sw[:7]], [leaf(b), leaf(b[:7])],
             K, 1e-6, False, True, dtype, True, dtype),
        ),
        "ternary_linear_group_gemma_nobias": (
            "ternary_linear_group",
            (leaf(x.float()), leaf(g.float()), [packed], [sw], [], K, 1e-5, True, False, torch.float32, True,
             torch.bfloat16),
        ),
        "ternary_linear_group_nonorm": (
            "ternary_linear_group",
            (leaf(x), None, [packed, packed[:5]], [sw, sw[:5]], [b.detach().float(), leaf(b[:5].float())], K, 0.0,
             False, False, dtype, False, torch.float32),
        ),
        "weight_quant_stacked": ("weight_quant_stacked", ([W, W[:7]], [False, True])),
        "weight_quant_stacks": ("weight_quant_stacks", ([W, W[:7], W[:3, :9].contiguous()], [False, True, False],
                                                        [2, 1])),
        "bitlinear_stacked": (
            "bitlinear_stacked",
            (leaf(x), leaf(g), [leaf(W), leaf(W[:7])], *ops.weight_quant_stacked([W, W[:7]], [False, True]),
             leaf(torch.cat([b, b[:7]])), 1e-6, False, True, dtype, True, False),
        ),
        "bitlinear_stacked_nonorm_nobias": (
            "bitlinear_stacked",
            (leaf(x.float()), None, [leaf(W.float())], *ops.weight_quant_stacked([W], [True]), None, 0.0, False,
             False, torch.float32, False, False),
        ),
        "concat_buffer": ("concat_buffer", ([leaf(x), leaf(x[..., :6]), leaf(x[..., 1:4])], -1)),
        "concat_buffer_leading_dim_one_part": ("concat_buffer", ([leaf(W.float())], 0)),
        "int8_rows": ("int8_rows", (W,)),
        "decode_attention_gqa_bool_mask": (
            "decode_attention", (_x((2, 4, 1, 16), dtype, device, 7), _x((2, 2, 9, 16), dtype, device, 8),
                                 _x((2, 2, 9, 16), dtype, device, 9),
                                 (torch.arange(9, device=device) < 6).view(1, 1, 1, 9), 0.25)),
        "decode_attention_fp32_float_mask": (
            "decode_attention", (_x((1, 3, 1, 8), torch.float32, device, 7), _x((1, 3, 5, 8), torch.float32, device, 8),
                                 _x((1, 3, 5, 8), torch.float32, device, 9), _x((1, 3, 1, 5), torch.float32, device, 1),
                                 0.5)),
        "int8_linear": ("int8_linear", (leaf(x), *ops.int8_rows(W), leaf(b))),
        "int8_linear_fp32_nobias": ("int8_linear", (x.float(), *ops.int8_rows(W.float()), None)),
        "bitlinear_stacked_noweight_gemma_fp8": (
            "bitlinear_stacked",
            (leaf(x.float()), None, [leaf(W.float())], *ops.weight_quant_stacked([W], [False]), leaf(b.float()),
             1e-5, True, False, torch.float32, True, True),
        ),
    }


def _opcheck_params():
    """One parameter per case, by op of the catalogue; an op without a case gives a failing one."""
    cases = _op_cases("cpu")
    params = []
    for name in SCHEMAS:
        mine = [c for c, (op, _) in cases.items() if op == name]
        params += [pytest.param(name, c, id=c) for c in mine] or [pytest.param(name, None, id=f"{name}-NO-CASE")]
    return params


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,case", _opcheck_params())
def test_opcheck(name, case, device):
    assert case is not None, f"bitfx::{name} is in the catalogue but has no opcheck case in _op_cases"
    op_name, args = _op_cases(device)[case]
    # All of opcheck's default tests: schema, autograd registration, fake tensor, aot dispatch (dynamic).
    opcheck(getattr(ops, op_name).default, args)


def _permutable(a) -> bool:
    # float tensors (activations, weights to quantize); int8 codes keep their layout: int8_linear's
    # CUDA kernel refuses a strided int8 weight by name, asking for it contiguous once when loaded
    return isinstance(a, torch.Tensor) and a.dim() >= 2 and a.is_floating_point() and a.shape[-1] > 1 and a.shape[-2] > 1


def _permuted(a):
    """``a`` with the same values, its last two dimensions stored transposed (a float tensor of
    two or more dimensions, each of them longer than 1; lists element by element; anything else
    as it is)."""
    if isinstance(a, list):
        return [_permuted(t) for t in a]
    return a.detach().mT.contiguous().mT.requires_grad_(a.requires_grad) if _permutable(a) else a


def _flat(args) -> list:
    return [t for a in args for t in (a if isinstance(a, list) else [a])]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", [c for c, (_, args) in _op_cases("cpu").items() if any(map(_permutable, _flat(args)))])
def test_opcheck_permuted_inputs(case, device):
    """Inputs stored transposed (a model's activations after a transpose, as a Mamba block's
    are): the op gives the outputs its fake implementation promises, contiguous, whatever the
    inputs' strides; opcheck compares every output's strides with the fake's."""
    op_name, args = _op_cases(device)[case]
    args = tuple(_permuted(a) for a in args)
    assert any(isinstance(t, torch.Tensor) and not t.is_contiguous() for t in _flat(args))
    opcheck(getattr(ops, op_name).default, args)


def test_opcheck_cases_name_catalogue_ops():
    assert {op for op, _ in _op_cases("cpu").values()} <= set(SCHEMAS)


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
    # bitfx.bitlinear checks through bitlinear_stacked (the op it is built on).
    with pytest.raises(ValueError, match="linear weights have K=32 input features but the input has K=16"):
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


def test_bitlinear_stacked_bad_input():
    x, W = torch.randn(3, 8), torch.randn(4, 8)
    f32 = torch.float32
    packed, scale = ops.weight_quant_stacked([W, W], [False, False])
    with pytest.raises(ValueError, match="packed stack has 8 rows but the weights have 4"):
        ops.bitlinear_stacked(x, None, [W], packed, scale, None, 1e-6, False, True, f32, True)
    with pytest.raises(ValueError, match="norm weight was given but normalize=False"):
        ops.bitlinear_stacked(x, torch.ones(8), [W, W], packed, scale, None, 0.0, False, True, f32, False)
    with pytest.raises(ValueError, match="must share K"):
        ops.weight_quant_stacked([W, torch.randn(4, 9)], [False, False])
    with pytest.raises(ValueError, match="must share K"):
        ops.bitlinear_stacked(x, None, [W, torch.randn(4, 9)], packed, scale, None, 1e-6, False, True, f32)
    with pytest.raises(ValueError, match="needs at least one linear weight"):
        ops.weight_quant_stacked([], [])
    with pytest.raises(ValueError, match="needs at least one linear weight"):
        ops.bitlinear_stacked(x, None, [], packed, scale, None, 1e-6, False, True, f32)
    with pytest.raises(ValueError, match="2 weights but 1 per_channel flags"):
        ops.weight_quant_stacked([W, W], [False])
    with pytest.raises(ValueError, match="bias has shape"):
        ops.bitlinear_stacked(x, None, [W, W], packed, scale, torch.randn(4), 1e-6, False, True, f32, True)
    with pytest.raises(ValueError, match="linear weights have K=8 input features but the input has K=5"):
        ops.bitlinear_stacked(torch.randn(3, 5), None, [W, W], packed, scale, None, 1e-6, False, True, f32)


def test_concat_buffer_bad_input():
    a = torch.randn(3, 4)
    with pytest.raises(ValueError, match="needs at least one tensor"):
        ops.concat_buffer([], 0)
    with pytest.raises(TypeError, match="share one dtype"):
        ops.concat_buffer([a, a.double()], 1)
    with pytest.raises(ValueError, match=r"agree on every dimension but 1, got \[\(3, 4\), \(2, 4\)\]"):
        ops.concat_buffer([a, a[:2]], 1)
    with pytest.raises(IndexError, match="dim 2 is out of range"):
        ops.concat_buffer([a, a], 2)
    assert torch.equal(ops.concat_buffer([a, a[:, :1]], -1), torch.cat([a, a[:, :1]], -1))


def _frozen(Ns, K, seed):
    """Packed weights and their scales of random [N, K] float weights (the reference's packing)."""
    packs = [ops.weight_quant(_x((N, K), torch.float32, "cpu", seed + i), False) for i, N in enumerate(Ns)]
    return [p for p, _ in packs], [s for _, s in packs]


def test_ternary_linear_group_bad_input():
    K = 8
    packs, scales = _frozen([4, 4], K, 0)
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


# ------------------------------------------------------------------ device mismatch


@pytest.mark.cuda
def test_device_mismatch_is_named():
    x = _x((4, 32), torch.float32, "cuda")
    with pytest.raises(ValueError, match="all tensors must be on one device"):
        ops.norm_quant(x, torch.ones(32), 1e-6, False, True, torch.float32)


def test_device_mismatch_is_named_meta():
    x = torch.randn(4, 32)
    with pytest.raises(ValueError, match="all tensors must be on one device"):
        ops.norm_quant(x, torch.ones(32, device="meta"), 1e-6, False, True, torch.float32)


def test_device_mismatch_is_named_meta_stacked():
    """The training op checks its weights' device against the input's too."""
    x, W = torch.randn(3, 8), torch.randn(4, 8)
    packed, scale = ops.weight_quant_stacked([W], [False])
    with pytest.raises(ValueError, match="all tensors must be on one device"):
        ops.bitlinear_stacked(x, None, [W.to("meta")], packed, scale, None, 1e-6, False, True, torch.float32)


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
    # Unvalidated (codes checked when packed): no pass over the codes; code 3 reads as 3 - 1 = 2,
    # as the CUDA kernel reads it.
    unchecked = ops.dequantize(bad, sw, 10, torch.float32, validate_codes=False)
    assert unchecked[1, 0] == 2 / sw[1]
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
        "bitlinear_stacked": lambda: ops.bitlinear_stacked(x0, None, [W], packed, sw, None, 1e-6, False, True, f32),
        "bitlinear_stacked_nonorm": lambda: ops.bitlinear_stacked(x0, None, [W], packed, sw, None, 0.0, False, False,
                                                                  f32, False),
        "bitlinear_function": lambda: bitfx.bitlinear(x0, None, W, None, 1e-6, norm_dtype=f32),
        "ternary_linear_group": lambda: ops.ternary_linear_group(x0, None, [packed], [sw], [], 8, 0.0, False, False,
                                                                 f32, False, f32),
    }


@pytest.mark.parametrize("device", DEVICES + ["meta"])
@pytest.mark.parametrize("op", list(_zero_dim_calls("cpu")))
def test_zero_dim_input_is_named(op, device):
    with pytest.raises(ValueError, match=r"must have at least one dimension \(the features\)"):
        _zero_dim_calls(device)[op]()
