"""transformers' BitNet format both ways: bitfx's pack/unpack against transformers' own, layer
forwards against transformers' own ``BitLinear`` / ``AutoBitLinear``, and a tiny BitNet model
exported to transformers' layers and read back bit for bit."""

from __future__ import annotations

import copy

import pytest
import torch

import bitfx
from bitfx.hf_bitnet import (
    convert_transformers_bitnet, export_transformers_bitnet, from_transformers, pack_hf, to_transformers, unpack_hf,
)
from tests import models
from tests.test_backend import assert_close_up_to_code_flips

hf = pytest.importorskip("transformers.integrations.bitnet")


def _eager(fn):
    """transformers compiles these helpers with torch.compile; run its own code eagerly."""
    return getattr(fn, "_torchdynamo_orig_callable", fn)


def _ternary(N, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-1, 2, (N, K), generator=g, dtype=torch.int8)


@pytest.mark.parametrize("N,K", [(8, 16), (12, 5), (7, 3), (1, 9), (64, 32)])
def test_pack_and_unpack_match_transformers(N, K):
    t = _ternary(N, K, N * K)
    packed = pack_hf(t)
    theirs = hf.pack_weights(t.clone())  # it adds 1 to its argument in place
    assert torch.equal(packed, theirs)
    assert torch.equal(unpack_hf(packed, N), t)
    assert torch.equal(_eager(hf.unpack_weights)(theirs, torch.int8)[:N], t)
    bad = packed.clone()
    bad[0, 0] = 0xFF
    with pytest.raises(ValueError, match="code 3"):
        unpack_hf(bad, N)


def _hf_bitlinear(N, K, bias, dtype=torch.float32, seed=0):
    layer = hf.BitLinear(K, N, bias, dtype=dtype)
    layer.weight = hf.pack_weights(_ternary(N, K, seed).clone())
    layer.weight_scale = torch.tensor([0.37], dtype=dtype)
    if bias:
        layer.bias = torch.randn(N, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    return layer


def _x(K, seed=3, shape=(2, 5)):
    return torch.randn(*shape, K, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bias", [False, True])
def test_bitlinear_forward_both_ways(bias):
    N, K = 16, 64
    theirs = _hf_bitlinear(N, K, bias)
    ours = from_transformers(theirs)
    x = _x(K)
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        want = theirs(x)
        assert_close_up_to_code_flips(ours(x), want)
        back = to_transformers(ours)
        assert torch.equal(back.weight, theirs.weight) and torch.equal(back.weight_scale, theirs.weight_scale)
        assert torch.equal(back(x), want)


def test_offline_autobitlinear_scale_multiplies():
    N, K = 8, 32
    layer = hf.AutoBitLinear(K, N, bias=True, online_quant=False)
    with torch.no_grad():
        layer.weight.copy_(_ternary(N, K).float())
        layer.weight_scale.fill_(0.05)  # W ~= t * weight_scale
        layer.bias.normal_()
    ours = from_transformers(layer)
    assert torch.allclose(ours.w_scale, torch.full((N,), 20.0))  # bitfx: W ~= t / w_scale
    x = _x(K)
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        assert_close_up_to_code_flips(ours(x), layer(x))


def test_per_channel_and_odd_shapes_have_no_transformers_form():
    lin = torch.nn.Linear(32, 8)
    with pytest.raises(ValueError, match="one weight scale"):
        to_transformers(bitfx.BitfxLinear.from_linear(lin, per_channel=True))
    with pytest.raises(ValueError, match="not a multiple of 4"):
        to_transformers(bitfx.BitfxLinear.from_linear(torch.nn.Linear(32, 6)))
    with pytest.raises(ValueError, match="online AutoBitLinear"):
        from_transformers(hf.AutoBitLinear(32, 8, online_quant=True))


def test_tiny_bitnet_model_round_trip():
    model, ids = models.tiny_bitnet()
    with torch.no_grad():
        bitfx.quantize(model, ids)
        want = model(ids).logits
    converted = sorted(model.bitfx_report.converted)
    exported = copy.deepcopy(model)
    assert sorted(export_transformers_bitnet(exported)) == converted
    assert all(type(exported.get_submodule(n)).__name__ == "BitLinear" for n in converted)
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        assert_close_up_to_code_flips(exported(ids).logits, want)
    assert sorted(convert_transformers_bitnet(exported)) == converted
    with torch.no_grad():
        assert torch.equal(exported(ids).logits, want)


def _kinds(model):
    return {n: type(m).__name__ for n, m in model.named_modules() if n}


def test_a_bad_layer_is_named_and_nothing_is_swapped():
    model, ids = models.tiny_bitnet()
    with torch.no_grad():
        bitfx.quantize(model, ids)
    bad = "model.layers.1.mlp.down_proj"  # the last converted layer: every other one comes first
    good = copy.deepcopy(model)
    model.set_submodule(bad, bitfx.BitfxLinear.from_linear(torch.nn.Linear(model.config.intermediate_size,
                                                                            model.config.hidden_size),
                                                           per_channel=True))
    before = _kinds(model)
    with pytest.raises(ValueError, match=rf"export_transformers_bitnet: 1 of 14 layers .* unchanged:\n  {bad}: "
                                         r"to_transformers: .*one weight scale"):
        export_transformers_bitnet(model)
    assert _kinds(model) == before
    # the other way: a transformers BitLinear whose packed weight holds the code 3
    export_transformers_bitnet(good)
    hf_layer = good.get_submodule(bad)
    hf_layer.weight[0, 0] = 0xFF
    before = _kinds(good)
    with pytest.raises(ValueError, match=rf"convert_transformers_bitnet: 1 of 14 layers .*\n  {bad}: unpack_hf: .*code 3"):
        convert_transformers_bitnet(good)
    assert _kinds(good) == before
