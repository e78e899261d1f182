"""bitfx.quantize on tiny transformers: which layers it converts, the memory it saves, and that
the converted model runs, compiles, and saves and loads its state_dict."""

from __future__ import annotations

import copy
import gc
import logging
import weakref

import pytest
import torch
from torch import nn

from bitfx.config import BitfxConfig
from bitfx.modules import BitfxLinear
from bitfx.quantize import QuantizeConfig, QuantizeReport, quantize
from tests.models import (
    bitlinear_model,
    reference_quantized,
    tiny_bitnet,
    tiny_gemma,
    tiny_llama,
    tiny_olmo2,
    tiny_qwen3,
    tiny_torch_llama,
)


def _converted(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, BitfxLinear)]


def _layers(model) -> int:
    return model.config.num_hidden_layers


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def llama():
    """A tiny bf16 Llama quantized with the defaults, a float copy, the float weight of one
    converted layer (watched)."""
    model, ids = tiny_llama(dtype=torch.bfloat16)
    float_model = copy.deepcopy(model)
    watched = weakref.ref(model.model.layers[0].self_attn.q_proj.weight)
    with torch.no_grad():
        assert quantize(model, ids) is model
    return model, ids, watched, float_model


ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
MLP = ("mlp.gate_proj", "mlp.up_proj")


def test_llama_converts_the_seven_linears_per_layer(llama):
    model, ids, _, float_model = llama
    L = _layers(model)
    names = _converted(model)
    assert len(names) == 7 * L  # linears="all", the default
    for i in range(L):
        p = f"model.layers.{i}."
        assert {n for n in names if n.startswith(p)} == {
            p + s for s in (*ATTN, "self_attn.o_proj", *MLP, "mlp.down_proj")
        }
    assert type(model.lm_head) is nn.Linear
    assert model.bitfx_report.converted == names
    # o_proj and down_proj read attention and the activation, not a norm: sites without one.
    sites = model.bitfx_report.explain_report.sites
    assert sorted(m for s in sites if s.kind == "act" for m in s.linear_modules) == sorted(
        f"model.layers.{i}.{s}" for i in range(L) for s in ("self_attn.o_proj", "mlp.down_proj"))
    # linears="sites": the five linears per layer an RMSNorm feeds.
    sites_model = copy.deepcopy(float_model)
    with torch.no_grad():
        quantize(sites_model, ids, config=BitfxConfig(linears="sites"))
    names = _converted(sites_model)
    assert len(names) == 5 * L
    for i in range(L):
        p = f"model.layers.{i}."
        assert {n for n in names if n.startswith(p)} == {p + s for s in (*ATTN, *MLP)}
        # Their inputs come from attention and the activation, not from a norm.
        assert type(sites_model.get_submodule(p + "self_attn.o_proj")) is nn.Linear
        assert type(sites_model.get_submodule(p + "mlp.down_proj")) is nn.Linear
    assert type(sites_model.lm_head) is nn.Linear


def test_llama_memory_report(llama):
    model, _, watched, _ = llama
    r: QuantizeReport = model.bitfx_report
    layers = [model.get_submodule(n) for n in r.converted]
    elements = sum(m.in_features * m.out_features for m in layers)
    assert r.weight_elements == elements
    assert r.float_bytes == 2 * elements  # bf16
    assert r.packed_bytes == sum(m.packed.numel() for m in layers)
    assert r.scale_bytes == 4 * sum(m.out_features for m in layers)
    assert r.saved_bytes == r.float_bytes - r.packed_bytes - r.scale_bytes > 0
    assert 7 * r.packed_bytes <= r.float_bytes
    # K = 64 here: the fp32 scales add 4 bytes per 16 packed bytes of each row.
    assert 6 * r.quantized_bytes <= r.float_bytes
    assert "saved" in str(r) and f"converted {len(layers)} linear layers" in str(r)
    assert r.to_dict()["saved_bytes"] == r.saved_bytes
    gc.collect()
    assert watched() is None, "the float weight of a converted layer is still alive"


def test_llama_runs_eagerly_as_the_reference(llama):
    model, ids, _, float_model = llama
    logits = _logits(model, ids)
    # The float model whose converted linears compute bitfx.reference on their inputs.
    expected = _logits(reference_quantized(float_model, model.bitfx_report.converted), ids)
    assert logits.dtype == torch.bfloat16 and torch.equal(logits, expected)
    # Ternary weights change the numbers, but not beyond recognition: the five RMSNorm-fed
    # linears per layer (linears="sites") keep the logits of this random model within 0.5 cosine.
    float_logits = _logits(float_model, ids).float().flatten()
    sites_model = copy.deepcopy(float_model)
    with torch.no_grad():
        quantize(sites_model, ids, config=BitfxConfig(linears="sites"))
    sites_logits = _logits(sites_model, ids)
    assert torch.equal(sites_logits, _logits(reference_quantized(float_model, sites_model.bitfx_report.converted), ids))
    assert nn.functional.cosine_similarity(sites_logits.float().flatten(), float_logits, dim=0) > 0.5
    # All seven (the default) move a random model further (0.38 to 0.53 over seeds 0-3, fp32 and
    # bf16 alike); still far from unrelated logits (cosine ~0).
    assert nn.functional.cosine_similarity(logits.float().flatten(), float_logits, dim=0) > 0.3


def test_llama_state_dict_round_trip(llama, tmp_path):
    model, ids, _, _ = llama
    torch.save(model.state_dict(), tmp_path / "model.pt")
    fresh, _ = tiny_llama(seed=1, dtype=torch.bfloat16)
    with torch.no_grad():
        quantize(fresh, ids)
    fresh.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    assert torch.equal(_logits(fresh, ids), _logits(model, ids))


def test_llama_float_checkpoint_into_quantized_model_is_refused(llama):
    model, _, _, float_model = llama
    with pytest.raises(RuntimeError, match="float weight, not a packed ternary one"):
        copy.deepcopy(model).load_state_dict(float_model.state_dict())


def test_llama_quantizing_again_converts_nothing(llama):
    model, ids, _, _ = llama
    before = model.bitfx_report
    quantize(model, ids)
    again = model.bitfx_report
    model.bitfx_report = before
    assert again.converted == []
    already = {s.module for s in again.skipped if s.reason == "already converted (a BitfxLinear)"}
    assert already == set(before.converted)
    assert {s.module: s.reason for s in again.skipped if s.module not in already} == {
        "lm_head": "output head (skip_output_head=True)"
    }
    # The finder sees each converted layer (act_quant -> ternary_matmul) at its norm: what the
    # backend fuses.
    assert len(again.explain_report.sites) == len(before.explain_report.sites)
    assert all(s.already_bitnet for s in again.explain_report.sites)


def test_llama_compiles_with_the_backend(llama):
    model, ids, _, _ = llama
    eager = _logits(model, ids)
    torch._dynamo.reset()
    try:
        compiled = _logits(torch.compile(model, backend="bitfx"), ids)
    finally:
        torch._dynamo.reset()
    # The backend fuses each norm into the activation quantization: the int8 codes agree
    # except on rounding boundaries, so compare with a tolerance.
    assert (compiled.float() - eager.float()).abs().max() <= 0.05 * eager.float().abs().max()


def test_gemma_and_tied_output_head():
    model, ids = tiny_gemma()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        quantize(model, ids, config=QuantizeConfig(skip_output_head=False))
    r = model.bitfx_report
    assert len(r.converted) == 7 * _layers(model)
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.model.embed_tokens.weight
    reasons = {s.module: s.reason for s in r.skipped}
    assert "tied" in reasons["lm_head"] and "model.embed_tokens.weight" in reasons["lm_head"]
    normed = [s for s in r.explain_report.sites if s.kind == "norm"]
    assert len(normed) == 2 * _layers(model)
    assert all(s.offset for s in normed)  # Gemma's norm multiplies by (1 + weight)
    assert torch.isfinite(_logits(model, ids)).all()


def test_qwen3_leaves_the_qk_norms_alone():
    model, ids = tiny_qwen3()
    quantize(model, ids)
    r = model.bitfx_report
    assert len(r.converted) == 7 * _layers(model)
    norms = {s.norm_module for s in r.explain_report.sites if s.kind == "norm"}
    assert len(norms) == 2 * _layers(model) and not any(n.endswith(("q_norm", "k_norm")) for n in norms)
    assert torch.isfinite(_logits(model, ids)).all()


def test_olmo2_has_no_sites():
    model, ids = tiny_olmo2()
    float_model = copy.deepcopy(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    quantize(model, ids, config=BitfxConfig(linears="sites"))
    assert model.bitfx_report.converted == [] and _converted(model) == []
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    # linears="all" (the default): post-norm, every linear but the head quantizes its input alone.
    quantize(model, ids)
    names = _converted(model)
    assert len(names) == 7 * _layers(model) and model.bitfx_report.converted == names
    assert all(s.kind == "act" for s in model.bitfx_report.explain_report.sites)
    assert type(model.lm_head) is nn.Linear
    assert torch.equal(_logits(model, ids), _logits(reference_quantized(float_model, names), ids))


def test_bitnet_converts_seven_linears_per_layer_per_channel():
    model, ids = tiny_bitnet()
    quantize(model, ids, config=QuantizeConfig(per_channel=True))
    names = _converted(model)
    assert len(names) == 7 * _layers(model)
    assert {"model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj"} <= set(names)
    assert type(model.lm_head) is nn.Linear
    scales = model.get_submodule(names[0]).w_scale
    assert scales.unique().numel() > 1  # one scale per output channel
    assert torch.isfinite(_logits(model, ids)).all()


def test_filter_fn_and_dummy_inputs(caplog):
    model, _ = tiny_llama()
    with caplog.at_level(logging.INFO, logger="bitfx"):
        quantize(model, filter_fn=lambda module, fqn: ".mlp." not in fqn)  # token ids made up from the config
    r = model.bitfx_report
    assert len(r.converted) == 4 * _layers(model)  # q, k, v and o_proj
    mlp = {f"model.layers.{i}.mlp.{p}" for i in range(_layers(model)) for p in ("gate_proj", "up_proj", "down_proj")}
    reasons = {s.module: s.reason for s in r.skipped}
    assert set(reasons) == mlp | {"lm_head"}
    assert all(reasons[m] == "filter_fn returned False" for m in mlp)
    assert "bitfx.quantize: converted" in caplog.text


def test_needs_example_inputs_without_a_config():
    model = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(ValueError, match="needs example inputs"):
        quantize(model)


def test_plain_torch_norm_spellings():
    model, ids = tiny_torch_llama()
    float_model = copy.deepcopy(model)
    quantize(model, ids)
    names = model.bitfx_report.converted
    assert len(names) == 7 * len(model.layers)
    assert {n.rsplit(".", 1)[1] for n in names} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                   "down_proj"}
    # Every spelling is found as an RMSNorm site (two per layer); o_proj and down_proj have no norm.
    sites = model.bitfx_report.explain_report.sites
    normed = [n for s in sites if s.kind == "norm" for n in s.linear_modules]
    assert sum(s.kind == "norm" for s in sites) == 2 * len(model.layers)
    assert {n.rsplit(".", 1)[1] for n in normed} == {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}
    assert len(normed) == 5 * len(model.layers)
    with torch.no_grad():
        assert torch.equal(model(ids), reference_quantized(float_model, names)(ids))


def test_eager_bitlinear_layers_are_left_to_the_backend():
    model, x = bitlinear_model()
    quantize(model, x)
    r = model.bitfx_report
    assert r.converted == [] and _converted(model) == []
    assert len(r.skipped) == 4 and all("overrides nn.Linear.forward" in s.reason for s in r.skipped)
