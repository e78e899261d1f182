"""bitfx.explain: the report lists the sites and the rejected candidates with reasons, in words
and as plain data, and leaves the model as it was."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from bitfx.config import BitfxConfig
from bitfx.explain import ExplainReport, SiteInfo, explain
from bitfx.quantize import QuantizeConfig
from tests.models import tiny_gemma, tiny_llama, tiny_qwen3


@pytest.fixture(scope="module")
def llama_report():
    model, ids = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = explain(model, ids)
    return model, before, report


def test_llama_sites(llama_report):
    model, _, report = llama_report
    L = model.config.num_hidden_layers
    assert isinstance(report, ExplainReport) and report.graphs >= 1
    # linears="all": per layer the two RMSNorm sites, and o_proj and down_proj as sites without a norm
    assert len(report.sites) == 4 * L
    assert [s.kind for s in report.sites] == ["norm", "act", "norm", "act"] * L
    by_norm = {s.norm_module: s for s in report.sites if s.kind == "norm"}
    assert len(by_norm) == 2 * L
    attn = by_norm["model.layers.0.input_layernorm"]
    assert isinstance(attn, SiteInfo)
    assert set(attn.linear_modules) == {f"model.layers.0.self_attn.{p}_proj" for p in "qkv"}
    assert set(by_norm["model.layers.0.post_attention_layernorm"].linear_modules) == {
        "model.layers.0.mlp.gate_proj",
        "model.layers.0.mlp.up_proj",
    }
    assert attn.eps == model.config.rms_norm_eps
    assert attn.cast_before_weight and not attn.offset and attn.has_weight and not attn.already_bitnet
    bare = [s for s in report.sites if s.kind == "act"]
    assert [s.linear_modules for s in bare] == [
        (f"model.layers.{i}.{p}",) for i in range(L) for p in ("self_attn.o_proj", "mlp.down_proj")]
    assert all(s.norm_module is None and not s.has_weight for s in bare)
    assert len(report.linears) == 7 * L and report.skipped == []
    assert report.converted == report.linears  # every converted layer is an nn.Linear quantize can swap
    assert all(d.at_site for d in report.decisions)  # o_proj and down_proj too (sites without a norm)
    dense = {d.module: d.reason for d in report.decisions if not d.converted}
    assert dense == {"lm_head": "output head (skip_output_head=True)"}
    # linears="sites": only the RMSNorm sites; o_proj (and down_proj) stay dense, and say why.
    sites = explain(model, tiny_llama()[1], config=BitfxConfig(linears="sites"))
    assert [s.norm_module for s in sites.sites] == list(by_norm) and len(sites.linears) == 5 * L
    dense = {d.module: d.reason for d in sites.decisions if not d.converted}
    assert dense["model.layers.0.self_attn.o_proj"].startswith("no RMSNorm feeds it")


def test_llama_rejected_have_reasons(llama_report):
    _, _, report = llama_report
    assert report.rejected, "the final norm, whose one linear is the output head, is a candidate the finder passes over"
    assert all(r.reason for r in report.rejected)
    # The final norm feeds only the output head, left dense by default.
    final = [r for r in report.rejected if r.module == "model.norm"]
    assert len(final) == 1 and "lm_head: output head" in final[0].reason


def test_llama_report_reads(llama_report):
    _, _, report = llama_report
    text = str(report)
    assert "model.layers.0.input_layernorm -> model.layers.0.self_attn.q_proj" in text
    assert "<input quantized per token> -> model.layers.0.self_attn.o_proj" in text
    assert "rejected:" in text
    for r in report.rejected:
        assert f"{r.module or '<' + r.node + '>'}: {r.reason}" in text


def test_llama_report_is_plain_data(llama_report):
    _, _, report = llama_report
    d = json.loads(json.dumps(report.to_dict()))
    assert len(d["sites"]) == len(report.sites) and len(d["rejected"]) == len(report.rejected)
    assert d["sites"][0]["norm_module"] == report.sites[0].norm_module
    assert d["linears"] == report.linears


def test_explain_changes_nothing(llama_report):
    model, before, _ = llama_report
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not hasattr(model, "bitfx_report")


def test_qwen3_qk_norms_are_not_sites():
    model, ids = tiny_qwen3()
    report = explain(model, ids)
    L = model.config.num_hidden_layers
    norms = {s.norm_module for s in report.sites if s.kind == "norm"}
    assert len(norms) == 2 * L and not any(n.endswith(("q_norm", "k_norm")) for n in norms)
    assert len(report.linears) == 7 * L  # linears="all": o_proj and down_proj as sites without a norm


def test_gemma_tied_output_head_is_reported_dense():
    model, ids = tiny_gemma()  # lm_head tied to the embeddings
    report = explain(model, ids, config=QuantizeConfig(skip_output_head=False))
    normed = [s for s in report.sites if s.kind == "norm"]
    assert len(normed) == 2 * model.config.num_hidden_layers and all(s.offset for s in normed)
    assert "RMSNorm(eps=1e-06): y = r * (1 + w)" in str(report)
    # Tied: neither the backend nor quantize converts it (converting one use changes the other).
    assert "lm_head" not in {m for s in report.sites for m in s.linear_modules}
    assert "lm_head" not in report.linears and "lm_head" not in report.converted
    assert "model.norm: none of its linears can be converted (lm_head: its weight is shared (tied) with " \
           "model.embed_tokens.weight)" in str(report)


class _TwoGraphs(nn.Module):
    """RMSNorm -> Linear twice, with a graph break between."""

    def __init__(self, K=32):
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(K, eps=1e-5), nn.RMSNorm(K, eps=1e-5)
        self.fc1, self.fc2 = nn.Linear(K, K), nn.Linear(K, K)

    def forward(self, x):
        x = x + self.fc1(self.norm1(x))
        torch._dynamo.graph_break()
        return x + self.fc2(self.norm2(x))


def test_graph_breaks_and_plain_modules():
    model = _TwoGraphs()
    report = explain(model, torch.randn(2, 5, 32))
    assert report.graphs == 2
    assert [(s.norm_module, s.linear_modules) for s in report.sites] == [("norm1", ("fc1",)), ("norm2", ("fc2",))]
    with pytest.raises(ValueError, match=r"needs example inputs: call bitfx.explain\(model, \*example_inputs\)"):
        explain(model)
