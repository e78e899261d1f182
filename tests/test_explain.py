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


class _Broken(nn.Module):
    """RMSNorm -> Linear, a graph break, RMSNorm -> Linear: Dynamo compiles ``forward`` itself
    (and its resume function), whose code object every instance shares."""

    def __init__(self, K=32):
        super().__init__()
        self.n1, self.l1, self.n2, self.l2 = nn.RMSNorm(K), nn.Linear(K, K), nn.RMSNorm(K), nn.Linear(K, K)

    def forward(self, x):
        x = self.l1(self.n1(x))
        torch._dynamo.graph_break()
        return self.l2(self.n2(x))


def _entries(fn) -> int:
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    return len(_debug_get_cache_entry_list(fn.__code__))


def test_repeated_explain_and_quantize_through_a_graph_break_leave_compile_working():
    """Each capture used to leave a cache entry on ``_Broken.forward``: the 9th call met
    Dynamo's recompile limit, and explain (and the backend, for every instance) converted
    nothing from then on."""
    import copy

    from bitfx.quantize import quantize
    from tests.test_backend import op_counts, recording_backend

    torch.manual_seed(0)
    model, x = _Broken(), torch.randn(2, 32)
    assert _entries(_Broken.forward) == 0
    counts = [len(explain(model, x).converted) for _ in range(12)]
    for _ in range(3):
        with torch.no_grad():
            q = quantize(copy.deepcopy(model), x)
        assert sorted(q.bitfx_report.converted) == ["l1", "l2"]
    assert counts == [2] * 12
    assert _entries(_Broken.forward) == 0  # nothing left for the user's compile to count
    backend, graphs = recording_backend()
    with torch.no_grad():
        torch.compile(model, backend=backend)(x)
    assert sum(op_counts(g)["ternary_matmul"] for g in graphs) == 2  # the user's compile still converts both


@pytest.mark.skipif("isolate_recompiles" not in __import__("inspect").signature(torch.compile).parameters,
                    reason="this torch keeps no separate recompile regions")
def test_repeated_explain_of_a_compiled_model_leaves_its_compile_working():
    from torch._dynamo.eval_frame import _get_cache_entries_for_region

    from tests.test_backend import op_counts, recording_backend

    torch.manual_seed(0)
    model, x = _Broken(), torch.randn(2, 32)
    backend, graphs = recording_backend()
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        compiled(x)
    own = len(_get_cache_entries_for_region(_Broken.forward.__code__, -1))
    counts = [len(explain(model, x).converted) for _ in range(12)]
    assert counts == [2] * 12
    assert len(_get_cache_entries_for_region(_Broken.forward.__code__, -1)) == own  # the captures' are apart
    graphs.clear()
    with torch.no_grad():
        for n in range(3, 6):  # new shapes: recompiles, within the limit
            compiled(torch.randn(n, 7, 32))
    assert graphs and all(op_counts(g)["ternary_matmul"] == 1 for g in graphs)
