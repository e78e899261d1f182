"""BitNet checkpoint directories in transformers' format, both ways: directories written by
transformers' own ``save_pretrained`` (tiny random models, nothing downloaded) loaded by
``bitfx.from_pretrained`` with transformers' logits, and directories written by
``bitfx.save_pretrained`` loaded by transformers' ``from_pretrained`` with bitfx's logits; then
the directories that do not fit, each refused with the problem named."""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

import bitfx
from bitfx.checkpoint import CheckpointError
from bitfx.hf_bitnet import BitfxNormLinear
from tests import models
from tests.helpers import assert_close_up_to_code_flips

hf = pytest.importorskip("transformers.integrations.bitnet")

from transformers import AutoModelForCausalLM, BitNetQuantConfig, LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.quantizers import HfQuantizer  # noqa: E402

EPS = 1e-5  # the layers' own RMSNorm eps, where they hold one


def _llama_with_bias(seed=0, tie=False):
    return models._hf(LlamaConfig, LlamaForCausalLM, seed, torch.float32, attention_bias=True, mlp_bias=True,
                      tie_word_embeddings=tie)


def _transformers_dir(path, linear_class="bitlinear", mode="offline", use_rms_norm=False, skip=None,
                      make=models.tiny_bitnet, max_shard_size="50GB"):
    """A BitNet directory as transformers writes it: ``make()``'s linears replaced by
    transformers' own layers (as its quantizer decides), random ternary codes and scales (online:
    the float weights), random per-layer norms; returns ``(names of the ternary layers, ids)``."""
    model, ids = make()
    q = BitNetQuantConfig(linear_class=linear_class, quantization_mode=mode, use_rms_norm=use_rms_norm,
                          rms_norm_eps=EPS, modules_to_not_convert=skip)
    floats = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    skip_all = HfQuantizer.get_modules_to_not_convert(model, skip, model._keep_in_fp32_modules)
    hf.replace_with_bitnet_linear(model, modules_to_not_convert=skip_all, quantization_config=q)
    g = torch.Generator().manual_seed(11)
    names = []
    for name, mod in model.named_modules():
        if not isinstance(mod, (hf.BitLinear, hf.AutoBitLinear)):
            continue
        names.append(name)
        N, K = mod.out_features, mod.in_features
        t = torch.randint(-1, 2, (N, K), generator=g, dtype=torch.int8)
        scale = 0.5 + torch.rand(1, generator=g)
        # Assigned, not copied: transformers builds some of these on the meta device.
        if isinstance(mod, hf.BitLinear):
            mod.weight = hf.pack_weights(t.clone())
            mod.weight_scale = scale  # W ~= t / weight_scale
        elif mode == "online":
            mod.weight = nn.Parameter(floats[name].weight.detach().clone())
        else:
            mod.weight = nn.Parameter(t.float(), requires_grad=False)
            mod.weight_scale = scale / 20  # W ~= t * weight_scale
        if mod.bias is not None:
            mod.bias = nn.Parameter(floats[name].bias.detach().clone())
        if mod.rms_norm is not None:
            mod.rms_norm.weight = nn.Parameter(1 + 0.3 * torch.randn(K, generator=g))
    model.config.quantization_config = q
    model.save_pretrained(path, max_shard_size=max_shard_size)
    return names, ids


def _transformers_logits(path, ids):
    """What transformers' own BitNet model, loaded from ``path``, computes (its helpers run eagerly)."""
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        model = AutoModelForCausalLM.from_pretrained(path)
        return model, model(ids).logits


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _on_meta(model):
    return [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]


# ---------------------------------------------------------------------------- transformers -> bitfx -> transformers

CASES = [  # linear_class, quantization_mode, use_rms_norm, model
    ("bitlinear", "offline", False, models.tiny_bitnet),
    ("bitlinear", "offline", True, models.tiny_bitnet),
    ("bitlinear", "offline", False, _llama_with_bias),
    ("autobitlinear", "offline", False, _llama_with_bias),
    ("autobitlinear", "offline", True, models.tiny_bitnet),
    ("autobitlinear", "online", False, models.tiny_bitnet),
    ("autobitlinear", "online", True, _llama_with_bias),
]


@pytest.mark.parametrize("linear_class,mode,use_rms_norm,make", CASES,
                         ids=[f"{c}-{m}-{'norm' if n else 'nonorm'}-{f.__name__.strip('_')}" for c, m, n, f in CASES])
def test_a_transformers_dir_loads_with_its_logits_and_saves_back(tmp_path, linear_class, mode, use_rms_norm, make):
    names, ids = _transformers_dir(tmp_path / "hf", linear_class, mode, use_rms_norm, make=make)
    theirs, want = _transformers_logits(tmp_path / "hf", ids)
    assert {n for n, m in theirs.named_modules() if type(m).__name__ in ("BitLinear", "AutoBitLinear")} == set(names)

    model = bitfx.from_pretrained(tmp_path / "hf")
    kind = BitfxNormLinear if use_rms_norm else bitfx.BitfxLinear
    assert all(type(model.get_submodule(n)) is kind for n in names)  # no float weight was made for them
    assert type(model.lm_head) is nn.Linear and not model.training
    assert _on_meta(model) == []
    assert torch.equal(model.model.rotary_emb.inv_freq, theirs.model.rotary_emb.inv_freq)
    got = _logits(model, ids)
    # transformers' activation scale is 127 / amax, bitfx's 127 * (1 / amax) correctly rounded:
    # they differ in the last bit at times, and a code on a rounding boundary then moves by one,
    # moving the logits of that token (one row; seen: the last token of a sequence, all its
    # logits, by 0.2% of the logits' scale, with transformers 5.25 and torch 2.13 on the CPU).
    assert_close_up_to_code_flips(got, want, flipped_rows=1)

    # and back: transformers reads bitfx's directory as its own BitNet model, with bitfx's logits
    back = linear_class if mode == "offline" else "bitlinear"
    bitfx.save_pretrained(model, tmp_path / "bitfx", linear_class=back)
    written = json.loads((tmp_path / "bitfx" / "config.json").read_text())["quantization_config"]
    assert written == {"quant_method": "bitnet", "linear_class": back, "quantization_mode": "offline",
                       "use_rms_norm": use_rms_norm, "rms_norm_eps": EPS if use_rms_norm else 1e-6,
                       "modules_to_not_convert": ["lm_head"]}
    theirs, again = _transformers_logits(tmp_path / "bitfx", ids)
    layer = {"bitlinear": "BitLinear", "autobitlinear": "AutoBitLinear"}[back]
    assert {n for n, m in theirs.named_modules() if type(m).__name__ == layer} == set(names)
    assert all((theirs.get_submodule(n).rms_norm is not None) == use_rms_norm for n in names)
    assert_close_up_to_code_flips(again, got, flipped_rows=1)  # (the scales' formulas, as above)
    # and bitfx reads its own directory to the same numbers
    assert_close_up_to_code_flips(_logits(bitfx.from_pretrained(tmp_path / "bitfx"), ids), got)


def test_dtype_and_device_are_the_callers(tmp_path):
    names, ids = _transformers_dir(tmp_path, use_rms_norm=True)
    model = bitfx.from_pretrained(tmp_path, dtype=torch.bfloat16, device="cpu")
    assert model.dtype == torch.bfloat16 and model.lm_head.weight.dtype == torch.bfloat16
    layer = model.get_submodule(names[0])
    assert layer.linear.weight_dtype == torch.bfloat16 and layer.rms_norm.weight.dtype == torch.bfloat16
    assert layer.linear.w_scale.dtype == torch.float32
    logits = _logits(model, ids)
    assert logits.dtype == torch.bfloat16 and bool(torch.isfinite(logits).all())
    with pytest.raises(ValueError, match="dtype must be a float torch.dtype"):
        bitfx.from_pretrained(tmp_path, dtype=torch.int8)
    with pytest.raises(ValueError, match="not a device torch knows"):
        bitfx.from_pretrained(tmp_path, device="gpu0")


def test_modules_to_not_convert_keeps_those_linears_float(tmp_path):
    skip = ["lm_head", "mlp.down_proj"]  # a suffix, as transformers matches it
    names, ids = _transformers_dir(tmp_path, skip=skip)
    assert names and not any(n.endswith("down_proj") for n in names)
    _, want = _transformers_logits(tmp_path, ids)
    model = bitfx.from_pretrained(tmp_path)
    for i in range(models.LAYERS):
        assert type(model.get_submodule(f"model.layers.{i}.mlp.down_proj")) is nn.Linear
    assert all(type(model.get_submodule(n)) is bitfx.BitfxLinear for n in names)
    assert_close_up_to_code_flips(_logits(model, ids), want)


def test_a_sharded_transformers_dir_loads(tmp_path):
    names, ids = _transformers_dir(tmp_path, max_shard_size="30KB")
    assert (tmp_path / "model.safetensors.index.json").exists() and not (tmp_path / "model.safetensors").exists()
    _, want = _transformers_logits(tmp_path, ids)
    assert_close_up_to_code_flips(_logits(bitfx.from_pretrained(tmp_path), ids), want)


# ---------------------------------------------------------------------------- bitfx -> transformers


def _quantized(make=models.tiny_llama, **kw):
    model, ids = make(**kw)
    with torch.no_grad():
        bitfx.quantize(model, ids)
    return model, ids


@pytest.mark.parametrize("linear_class", ["bitlinear", "autobitlinear"])
def test_a_quantized_model_saves_sharded_and_transformers_loads_it(tmp_path, linear_class):
    model, ids = _quantized(_llama_with_bias, tie=True)  # tied head: quantize leaves it float
    want = _logits(model, ids)
    converted = sorted(model.bitfx_report.converted)
    files = bitfx.save_pretrained(model, tmp_path, max_shard_size="12KiB", linear_class=linear_class)
    assert len(files) > 2 and sorted(os.listdir(tmp_path)) == sorted(
        [*files, "config.json", "generation_config.json", "model.safetensors.index.json"])
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == sorted(files)
    assert "lm_head.weight" not in index["weight_map"]  # tied: transformers ties it again
    theirs, got = _transformers_logits(tmp_path, ids)
    layer = {"bitlinear": "BitLinear", "autobitlinear": "AutoBitLinear"}[linear_class]
    assert sorted(n for n, m in theirs.named_modules() if type(m).__name__ == layer) == converted
    assert theirs.lm_head.weight is theirs.model.embed_tokens.weight
    assert_close_up_to_code_flips(got, want)
    mine = _logits(bitfx.from_pretrained(tmp_path), ids)
    if linear_class == "bitlinear":  # the same codes and fp32 scales: the same numbers
        assert torch.equal(mine, want)
    else:  # the scale stored as its reciprocal, the bias multiplied by it: fp32 rounding
        assert_close_up_to_code_flips(mine, want)


def test_an_int8_head_saves_as_the_float_weight_it_multiplies_by(tmp_path):
    """BitfxConfig(head="int8"): transformers' format has no int8 head, so the head is written as
    qweight * scale, untied from the embedding it was tied to; transformers' logits then are the
    bitfx model's (up to the ternary layers' code flips), not those of the float head."""
    model, ids = _llama_with_bias(tie=True)
    with torch.no_grad():
        bitfx.quantize(model, ids, config=bitfx.BitfxConfig(head="int8"))
    assert isinstance(model.lm_head, bitfx.Int8Linear)
    want = _logits(model, ids)
    bitfx.save_pretrained(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    assert "lm_head" in config["quantization_config"]["modules_to_not_convert"]
    theirs, got = _transformers_logits(tmp_path, ids)
    assert type(theirs.lm_head) is nn.Linear and theirs.lm_head.weight is not theirs.model.embed_tokens.weight
    assert torch.equal(theirs.lm_head.weight.float(), model.lm_head.dequantize(theirs.lm_head.weight.dtype).float())
    assert_close_up_to_code_flips(got, want)


def test_float_linears_are_named_in_modules_to_not_convert(tmp_path):
    model, ids = models.tiny_llama()
    with torch.no_grad():
        bitfx.quantize(model, ids, filter_fn=lambda m, fqn: not fqn.endswith("o_proj"))
    want = _logits(model, ids)
    bitfx.save_pretrained(model, tmp_path)
    skip = json.loads((tmp_path / "config.json").read_text())["quantization_config"]["modules_to_not_convert"]
    assert skip == ["lm_head"] + [f"model.layers.{i}.self_attn.o_proj" for i in range(models.LAYERS)]
    theirs, got = _transformers_logits(tmp_path, ids)
    assert type(theirs.model.layers[0].self_attn.o_proj) is nn.Linear
    assert type(theirs.model.layers[0].self_attn.q_proj) is hf.BitLinear
    assert_close_up_to_code_flips(got, want)


def test_saving_again_replaces_the_earlier_files(tmp_path):
    model, ids = _quantized()
    bitfx.save_pretrained(torch.compile(model, backend="bitfx"), tmp_path, max_shard_size=20_000)  # saved unwrapped
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert bitfx.save_pretrained(model, tmp_path) == ["model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["config.json", "generation_config.json", "model.safetensors"]
    assert torch.equal(_logits(bitfx.from_pretrained(tmp_path), ids), _logits(model, ids))


def test_what_the_format_cannot_hold_is_refused_before_writing(tmp_path):
    model, ids = _quantized()
    name = "model.layers.1.mlp.down_proj"
    lin = nn.Linear(models.INTERMEDIATE, models.HIDDEN, bias=False)
    model.set_submodule(name, bitfx.BitfxLinear.from_linear(lin, per_channel=True))
    with pytest.raises(ValueError, match=rf"1 of 14 ternary layers .*nothing was written:\n  {name}: .*one weight "
                                         rf"scale"):
        bitfx.save_pretrained(model, tmp_path / "out")
    model.set_submodule(name, bitfx.BitfxLinear.from_linear(lin, act_bits=4))
    with pytest.raises(ValueError, match=rf"{name}: .*8 bits"):
        bitfx.save_pretrained(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="max_shard_size"):
        bitfx.save_pretrained(model, tmp_path / "out", max_shard_size="5 parsecs")
    with pytest.raises(ValueError, match="linear_class"):
        bitfx.save_pretrained(model, tmp_path / "out", linear_class="bitnet")
    with pytest.raises(ValueError, match="no BitfxLinear"):
        bitfx.save_pretrained(models.tiny_llama()[0], tmp_path / "out")
    with pytest.raises(TypeError, match="transformers model"):
        bitfx.save_pretrained(nn.Sequential(bitfx.BitfxLinear.from_linear(nn.Linear(8, 8))), tmp_path / "out")


# ---------------------------------------------------------------------------- directories that do not fit


@pytest.fixture
def hf_dir(tmp_path):
    _transformers_dir(tmp_path / "ckpt", max_shard_size="30KB")
    return tmp_path / "ckpt"


def _edit_config(path, edit):
    config = json.loads((path / "config.json").read_text())
    edit(config)
    (path / "config.json").write_text(json.dumps(config))


def _edit_tensors(path, edit):
    """Rewrite the shard holding each tensor ``edit`` names: ``edit(tensors)`` changes the dict in place."""
    from safetensors.torch import load_file, save_file

    for file in sorted(os.listdir(path)):
        if file.endswith(".safetensors"):
            tensors = load_file(path / file)
            edit(tensors)
            save_file(tensors, path / file, metadata={"format": "pt"})


def test_a_missing_or_odd_directory_is_named(tmp_path, hf_dir):
    with pytest.raises(CheckpointError, match="does not exist"):
        bitfx.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "file").write_text("")
    with pytest.raises(CheckpointError, match="is not a directory"):
        bitfx.from_pretrained(tmp_path / "file")
    os.remove(hf_dir / "config.json")
    with pytest.raises(CheckpointError, match="holds no config.json"):
        bitfx.from_pretrained(hf_dir)


def test_another_quant_method_is_refused(hf_dir):
    _edit_config(hf_dir, lambda c: c["quantization_config"].update(quant_method="gptq"))
    with pytest.raises(CheckpointError, match="quant_method is 'gptq', expected 'bitnet'"):
        bitfx.from_pretrained(hf_dir)
    _edit_config(hf_dir, lambda c: c.pop("quantization_config"))
    with pytest.raises(CheckpointError, match="no quantization_config: a float checkpoint"):
        bitfx.from_pretrained(hf_dir)


def test_a_malformed_quantization_config_is_named(hf_dir):
    _edit_config(hf_dir, lambda c: c["quantization_config"].update(linear_class="bitlinear2", use_rms_norm="yes"))
    with pytest.raises(CheckpointError, match=r"(?s)linear_class must be one of .*'bitlinear2'.*use_rms_norm must be"):
        bitfx.from_pretrained(hf_dir)


def test_a_missing_shard_is_named(hf_dir):
    shards = sorted(f for f in os.listdir(hf_dir) if f.startswith("model-"))
    assert len(shards) > 1
    os.remove(hf_dir / shards[1])
    with pytest.raises(CheckpointError, match=rf"lacks shard\(s\) its model.safetensors.index.json lists: {shards[1]}"):
        bitfx.from_pretrained(hf_dir)


def test_a_misshapen_tensor_is_named(hf_dir):
    q = "model.layers.0.self_attn.q_proj.weight"
    norm = "model.norm.weight"

    def edit(t):
        if q in t:
            t[q] = t[q][:8].contiguous()
        if norm in t:
            t[norm] = t[norm][:32].contiguous()

    _edit_tensors(hf_dir, edit)
    with pytest.raises(CheckpointError, match=r"(?s)nothing was loaded:.*"
                                              rf"{q}: uint8 \[8, 64\] in the checkpoint, the model's \[64, 64\] "
                                              rf"linear packs to \[16, 64\].*{norm}: shape \[32\] in the checkpoint, "
                                              rf"\[64\] in the model"):
        bitfx.from_pretrained(hf_dir)


def test_missing_and_unexpected_tensors_are_named(hf_dir):
    gone = "model.layers.1.mlp.up_proj.weight_scale"

    def edit(t):
        t.pop(gone, None)
        if "model.norm.weight" in t:
            t["model.extra"] = torch.zeros(2)

    _edit_tensors(hf_dir, edit)
    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())
    index["weight_map"].pop(gone)
    index["weight_map"]["model.extra"] = index["weight_map"]["model.norm.weight"]
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"(?s)missing from the checkpoint: {gone}.*"
                                              r"in the checkpoint but not the model: model.extra"):
        bitfx.from_pretrained(hf_dir)


def test_a_packed_code_that_is_no_ternary_value_is_named(hf_dir):
    q = "model.layers.1.self_attn.v_proj.weight"

    def edit(t):
        if q in t:
            t[q][0, 0] = 0xFF

    _edit_tensors(hf_dir, edit)
    with pytest.raises(CheckpointError, match=r"model.layers.1.self_attn.v_proj: unpack_hf: .*code 3"):
        bitfx.from_pretrained(hf_dir)


def test_an_offline_autobitlinear_weight_must_be_ternary(tmp_path):
    _transformers_dir(tmp_path, "autobitlinear", "offline")
    q = "model.layers.0.mlp.gate_proj.weight"

    def edit(t):
        t[q][0, 0] = 0.5

    _edit_tensors(tmp_path, edit)
    with pytest.raises(CheckpointError, match=r"model.layers.0.mlp.gate_proj: .*must hold ternary values"):
        bitfx.from_pretrained(tmp_path)


def test_layers_whose_norms_one_config_cannot_say_are_refused(tmp_path):
    names, _ = _transformers_dir(tmp_path / "hf", use_rms_norm=True)
    model = bitfx.from_pretrained(tmp_path / "hf")
    model.set_submodule(names[0], model.get_submodule(names[0]).linear)  # this one without its norm
    with pytest.raises(ValueError, match=rf"an RMSNorm of its own or none; .* hold one, {names[0]} do not"):
        bitfx.save_pretrained(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
