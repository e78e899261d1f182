"""transformers' BitNet format both ways: bitfx's pack/unpack against transformers' own, layer
forwards against transformers' own ``BitLinear`` / ``AutoBitLinear``, and a tiny BitNet model
exported to transformers' layers and read back bit for bit."""

from __future__ import annotations

import copy

import pytest
import torch

import bitfx
from bitfx.hf_bitnet import (
    BitfxNormLinear, convert_transformers_bitnet, export_transformers_bitnet, from_transformers, pack_hf, to_transformers, unpack_hf,
)
from tests import models
from tests.helpers import assert_close_up_to_code_flips

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


# ---------------------------------------------------------------- use_rms_norm=True: the layer's own RMSNorm


def _with_norm(layer, K, seed):
    with torch.no_grad():
        layer.rms_norm.weight.copy_(1 + 0.3 * torch.randn(K, generator=torch.Generator().manual_seed(seed)))
    return layer


def test_bitlinear_with_its_rms_norm_keeps_it():
    """The issue's reproducer: the norm was dropped and the output off by ~4 relative."""
    N, K = 16, 64
    lay = hf.BitLinear(K, N, False, dtype=torch.float32, use_rms_norm=True)
    lay.weight = hf.pack_weights(_ternary(N, K).clone())
    lay.weight_scale = torch.tensor([2.0])
    _with_norm(lay, K, 1)
    ours = from_transformers(lay)
    assert isinstance(ours, BitfxNormLinear) and ours.rms_norm is lay.rms_norm
    x = 3 * _x(K)
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        want = lay(x)
        assert_close_up_to_code_flips(ours(x), want)
        back = to_transformers(ours)
        assert back.rms_norm is not None and torch.equal(back.rms_norm.weight, lay.rms_norm.weight)
        assert back.rms_norm.variance_epsilon == lay.rms_norm.variance_epsilon
        assert torch.equal(back(x), want)


def test_offline_autobitlinear_with_its_rms_norm_keeps_it():
    N, K = 8, 32
    layer = hf.AutoBitLinear(K, N, bias=True, online_quant=False, use_rms_norm=True, rms_norm_eps=1e-3)
    with torch.no_grad():
        layer.weight.copy_(_ternary(N, K).float())
        layer.weight_scale.fill_(0.05)
        layer.bias.normal_()
    _with_norm(layer, K, 2)
    ours = from_transformers(layer)
    assert isinstance(ours, BitfxNormLinear)
    x = 3 * _x(K)
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        assert_close_up_to_code_flips(ours(x), layer(x))


def _tiny_bitnet_with_norms(mode):
    """A tiny BitNetForCausalLM whose linears (all but lm_head) are transformers' own BitNet
    layers built with use_rms_norm=True: packed ``BitLinear`` ("bitlinear"), ``AutoBitLinear``
    in offline mode (ternary values and a scale) or in online mode (float weights)."""
    model, ids = models.tiny_bitnet()
    g = torch.Generator().manual_seed(7)
    for i, (name, mod) in enumerate(list(model.named_modules())):
        if not isinstance(mod, torch.nn.Linear) or name == "lm_head":
            continue
        N, K = mod.out_features, mod.in_features
        if mod.bias is not None:
            raise AssertionError("tiny_bitnet has no bias")
        t = torch.randint(-1, 2, (N, K), generator=g, dtype=torch.int8)
        scale = 0.5 + torch.rand(1, generator=g)
        if mode == "bitlinear":
            new = hf.BitLinear(K, N, False, dtype=torch.float32, use_rms_norm=True, rms_norm_eps=1e-5)
            new.weight = hf.pack_weights(t.clone())
            new.weight_scale = scale  # W ~= t / weight_scale
        else:
            new = hf.AutoBitLinear(K, N, False, dtype=torch.float32, online_quant=mode == "online",
                                   use_rms_norm=True, rms_norm_eps=1e-5)
            with torch.no_grad():
                if mode == "online":
                    new.weight.copy_(mod.weight)
                else:
                    new.weight.copy_(t.float())
                    new.weight_scale.copy_(scale / 20)  # W ~= t * weight_scale
        model.set_submodule(name, _with_norm(new, K, i))
    return model.eval().requires_grad_(False), ids


@pytest.mark.parametrize("mode", ["bitlinear", "offline"])
def test_tiny_bitnet_with_rms_norms_converts_with_its_logits(mode):
    model, ids = _tiny_bitnet_with_norms(mode)
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        want = model(ids).logits
    names = convert_transformers_bitnet(model)
    assert len(names) == 7 * models.LAYERS
    assert all(isinstance(model.get_submodule(n), BitfxNormLinear) for n in names)
    with torch.no_grad():
        assert_close_up_to_code_flips(model(ids).logits, want)
        sites = bitfx.explain(model, ids).sites  # the backend fuses each norm into its layer's quantization
    assert {(s.norm_module, s.linear_modules) for s in sites} == {(f"{n}.rms_norm", (f"{n}.linear",)) for n in names}
    # and back to transformers' layers, each with its norm
    assert sorted(export_transformers_bitnet(model)) == sorted(names)
    assert all(model.get_submodule(n).rms_norm is not None for n in names)
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        assert_close_up_to_code_flips(model(ids).logits, want)


def test_tiny_bitnet_with_rms_norms_online_compiles_with_its_logits():
    """Online mode holds float weights: the backend converts it (the norm fused, not dropped)."""
    model, ids = _tiny_bitnet_with_norms("online")
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        want = model(ids).logits
    assert convert_transformers_bitnet(model) == []  # float weights: nothing to read
    with torch.no_grad():
        report = bitfx.explain(model, ids)
        assert len(report.converted) == 7 * models.LAYERS
        assert all(s.norm_module.endswith("_proj.rms_norm") for s in report.sites)
        assert_close_up_to_code_flips(torch.compile(model, backend="bitfx")(ids).logits, want)
