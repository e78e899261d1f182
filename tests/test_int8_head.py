"""The int8 output head (``BitfxConfig(head="int8")``): ``bitfx.quantize`` swaps the head for an
``Int8Linear``, the backend's inference graphs run ``int8_linear`` on codes packed once, the two
give the same logits, and the logits move from the dense head's by no more than the weights'
rounding allows. Saved and loaded with ``state_dict`` and ``bitfx.save``/``bitfx.load``."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import bitfx
from bitfx.config import BitfxConfig
from bitfx.modules import BitfxLinear, Int8Linear
from tests import models

pytest.importorskip("transformers")

INT8 = BitfxConfig(head="int8")


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def _op_calls(fn, name: str) -> int:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key == name)


def _head_input(model, ids) -> torch.Tensor:
    """What the output head reads (the final norm's output), captured by a hook."""
    seen = []
    h = model.get_output_embeddings().register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    try:
        with torch.no_grad():
            model(ids)
    finally:
        h.remove()
    return seen[0]


def test_config_checks_head():
    with pytest.raises(ValueError, match="head must be one of"):
        BitfxConfig(head="int4")
    with pytest.raises(ValueError, match="skip_output_head=False"):
        BitfxConfig(head="int8", skip_output_head=False)
    assert BitfxConfig().head == "dense"  # the default is unchanged


@pytest.mark.parametrize("family", ["tiny_llama", "tiny_gemma"])  # Gemma ties its head to the embedding
def test_quantize_makes_an_int8_head_within_its_rounding(family):
    model, ids = getattr(models, family)()
    dense_head = copy.deepcopy(model)
    bitfx.quantize(dense_head, ids)
    bitfx.quantize(model, ids, config=INT8)
    head = model.get_output_embeddings()
    assert isinstance(head, Int8Linear)
    assert model.bitfx_report.int8_head == [n for n, m in model.named_modules() if m is head]
    assert model.bitfx_report.converted == dense_head.bitfx_report.converted  # the ternary layers unchanged
    assert head.qweight.dtype == torch.int8 and int(head.qweight.abs().max()) == 127
    assert isinstance(model.get_input_embeddings().weight, torch.nn.Parameter)  # a tied embedding keeps its weight
    W = dense_head.get_output_embeddings().weight.detach().float()
    # Each weight moves by at most half a step (scale / 2); so each logit by at most sum_k |x_k| * scale / 2.
    assert bool(((head.dequantize(torch.float32) - W).abs() <= head.scale[:, None] / 2 * (1 + 1e-6)).all())
    x = _head_input(model, ids).float()
    with torch.no_grad():
        got, want = model(ids).logits.float(), dense_head(ids).logits.float()
    bound = x.abs().sum(-1, keepdim=True) * head.scale / 2
    # plus fp32 summation: K products of size |x| |W| each rounded by 2^-24 at most
    bound = bound + 2 * x.shape[-1] * 2.0**-24 * (x.abs() @ W.abs().T)
    assert bool(((got - want).abs() <= bound).all())
    assert (got - want).abs().max() > 0  # the head really changed


def test_backend_int8_head_matches_quantize_and_packs_once():
    model, ids = models.tiny_llama()
    quantized = copy.deepcopy(model)
    bitfx.quantize(quantized, ids, config=INT8)
    compiled = torch.compile(model, backend="bitfx", options={"head": "int8"})
    with torch.no_grad():
        want = quantized(ids).logits
        got = compiled(ids).logits
        # int8_rows ran once, when the graph was compiled; never per call
        assert _op_calls(lambda: [compiled(ids) for _ in range(3)], "bitfx::int8_rows") == 0
        assert _op_calls(lambda: compiled(ids), "bitfx::int8_linear") == 1
    # The same int8_linear on the same codes; the rest is the same ternary model, compiled (Inductor
    # may fuse the float ops around the ops differently from eager: fp32 rounding only).
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # quantize then the backend: the Int8Linear's op goes through the graph as it is
    compiled_q = torch.compile(quantized, backend="bitfx", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled_q(ids).logits, want, rtol=1e-5, atol=1e-5)
        assert _op_calls(lambda: compiled_q(ids), "bitfx::int8_linear") == 1


def test_backend_dense_head_by_default():
    model, ids = models.tiny_llama()
    compiled = torch.compile(model, backend="bitfx")
    with torch.no_grad():
        compiled(ids)
        assert _op_calls(lambda: compiled(ids), "bitfx::int8_linear") == 0


def test_training_graph_keeps_the_head_dense():
    model, ids = models.tiny_llama()
    model.train()
    compiled = torch.compile(model, backend="bitfx", options={"head": "int8"})
    loss = compiled(ids, labels=ids).loss
    loss.backward()
    assert model.lm_head.weight.grad is not None and bool(model.lm_head.weight.grad.abs().sum() > 0)


def test_gradient_passes_through_the_int8_head():
    lin = torch.nn.Linear(24, 10, bias=True)
    head = Int8Linear.from_linear(lin)
    x = torch.randn(3, 24, requires_grad=True)
    y = head(x)
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(x.grad, g @ head.dequantize(torch.float32), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(y, x.detach() @ head.dequantize(torch.float32).T + lin.bias.detach(),
                               rtol=1e-6, atol=1e-6)


def test_state_dict_and_checkpoint_round_trip(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    # a tied head: the file holds the embedding and the int8 head
    model, ids = models._hf(LlamaConfig, LlamaForCausalLM, 0, torch.float32, tie_word_embeddings=True)
    skeleton_src = copy.deepcopy(model)
    bitfx.quantize(model, ids, config=INT8)
    with torch.no_grad():
        want = model(ids).logits
    # state_dict into a model quantized the same way
    other = copy.deepcopy(skeleton_src)
    bitfx.quantize(other, ids, config=INT8)
    other.get_output_embeddings().qweight.zero_()
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(other(ids).logits, want)
    # bitfx.save / bitfx.load into a meta skeleton: the head comes back as an Int8Linear
    path = tmp_path / "m.safetensors"
    bitfx.save(model, path)
    with torch.device("meta"):
        skeleton = type(skeleton_src)(skeleton_src.config)
    bitfx.load(skeleton, path)
    assert isinstance(skeleton.get_output_embeddings(), Int8Linear)
    assert any(isinstance(m, BitfxLinear) for m in skeleton.modules())
    with torch.no_grad():
        assert torch.equal(skeleton.to(torch.float32)(ids).logits, want)


def test_bad_state_is_refused_by_name():
    head = Int8Linear.from_linear(torch.nn.Linear(16, 8, bias=False))
    sd = head.state_dict()
    with pytest.raises(RuntimeError, match="qweight: expected int8"):
        head.load_state_dict({**sd, "qweight": sd["qweight"].float()})
    bad = sd["qweight"].clone()
    bad[0, 0] = -128
    with pytest.raises(RuntimeError, match="-128"):
        head.load_state_dict({**sd, "qweight": bad})
    with pytest.raises(RuntimeError, match="scale: must be finite and positive"):
        head.load_state_dict({**sd, "scale": torch.zeros(8)})
    with pytest.raises(RuntimeError, match="float weight, not an int8 head"):
        head.load_state_dict({"weight": torch.randn(8, 16)}, strict=False)
    with pytest.raises(ValueError, match="features"):
        head(torch.randn(2, 15))


def test_malformed_int8_metadata_is_named(tmp_path):
    """A checkpoint whose int8-head metadata is not what bitfx.save writes is refused, naming it."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    model, ids = models.tiny_llama()
    bitfx.quantize(model, ids, config=INT8)
    path = tmp_path / "m.safetensors"
    bitfx.save(model, path)
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    cases = {
        "in_features must be an int": {"lm_head": {**json.loads(meta["int8"])["lm_head"], "in_features": "64"}},
        "fields missing: bias": {"lm_head": {k: v for k, v in json.loads(meta["int8"])["lm_head"].items() if k != "bias"}},
        "is listed as ternary too": {**json.loads(meta["int8"]), "model.layers.0.mlp.up_proj": {
            **json.loads(meta["int8"])["lm_head"]}},
    }
    for match, int8 in cases.items():
        bad = tmp_path / "bad.safetensors"
        save_file(tensors, str(bad), metadata={**meta, "int8": json.dumps(int8)})
        fresh, _ = models.tiny_llama()
        with pytest.raises(bitfx.CheckpointError, match=match):
            bitfx.load(fresh, bad)


def test_a_model_without_a_head_module_says_so(caplog):
    """head='int8' on a model whose last linear is no module of its own: nothing converted, and a
    warning instead of silence."""

    class Functional(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = torch.nn.RMSNorm(16)
            self.up = torch.nn.Linear(16, 16)
            self.out = torch.nn.Parameter(torch.randn(40, 16))

        def forward(self, x):
            return torch.nn.functional.linear(self.up(self.norm(x)), self.out)

    model = Functional()
    with caplog.at_level("WARNING", logger="bitfx"):
        bitfx.quantize(model, torch.randn(2, 16), config=INT8)
    assert model.bitfx_report.int8_head == []
    assert "head='int8'" in caplog.text


def test_an_already_converted_model_gets_the_int8_head():
    """A model whose linears are ternary already (an earlier quantize, bitfx.from_pretrained):
    quantize with head='int8' converts the head alone and leaves the ternary layers as they are."""
    model, ids = models.tiny_llama()
    bitfx.quantize(model, ids)
    packed = {n: m.packed for n, m in model.named_modules() if isinstance(m, BitfxLinear)}
    bitfx.quantize(model, ids, config=INT8)
    assert isinstance(model.lm_head, Int8Linear) and model.bitfx_report.int8_head == ["lm_head"]
    now = {n: m.packed for n, m in model.named_modules() if isinstance(m, BitfxLinear)}
    assert now.keys() == packed.keys() and all(now[n] is packed[n] for n in now)  # the same buffers
