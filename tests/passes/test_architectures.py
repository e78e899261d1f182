"""The passes on transformers architectures the other tests do not build: each tiny model's graph
rewritten by the bitfx pass, then by the residual-add and gated-activation passes, computes the
same logits, exactly, on the CPU (every op's reference); the counts say which of its norms and
activations each pass took, from how the model is written:

* pre-norm RMSNorm blocks (Mistral, Qwen2, Granite with its multipliers, GLM and Phi-3 with
  their stacked ``gate_up_proj`` split by ``chunk``): three residual adds of two layers join
  their norms (the first layer's input norm reads the embedding), and both SiLU products join
  the down projections' fronts;
* Gemma 2's sandwich norms take the adds, and its GELU keeps its kernel;
* LayerNorm models (StableLM, Cohere's parallel block) have no RMSNorm site, so no add joins
  one, while their SiLU products still join the down projections' activation quantization;
* Nemotron (LayerNorm, an ungated ReLU²) takes neither.

An architecture this transformers lacks is skipped.
"""

from __future__ import annotations

import pytest
import torch

from bitfx.passes.glu import fuse_glu_fronts
from bitfx.passes.residual import fuse_residual_adds
from tests import models
from tests.test_backend import op_counts

pytestmark = pytest.mark.usefixtures("fresh_dynamo")

# architecture (transformers' class prefix): (residual adds fused, activations fused)
_ARCHS = {
    "Mistral": (3, 2), "Qwen2": (3, 2), "Granite": (3, 2), "Glm": (3, 2), "Phi3": (3, 2),
    "Gemma2": (3, 0), "StableLm": (0, 2), "Cohere": (0, 2), "Nemotron": (0, 0),
}


@pytest.mark.parametrize("arch", sorted(_ARCHS))
def test_passes_on_more_architectures(arch):
    transformers = pytest.importorskip("transformers")
    config_cls = getattr(transformers, f"{arch}Config", None)
    model_cls = getattr(transformers, f"{arch}ForCausalLM", None)
    if config_cls is None or model_cls is None:
        pytest.skip(f"transformers {transformers.__version__} has no {arch}")
    # (the tiny vocabulary holds no real special token)
    model, ids = models._hf(config_cls, model_cls, 0, torch.float32, pad_token_id=None, bos_token_id=None,
                            eos_token_id=None)
    gm, run, before = models.rewritten_graph(lambda t: model(t).logits, ids)
    sites = op_counts(gm)
    assert sites["ternary_matmul"] > 0 and sites["linear"] == 1  # every linear but the output head
    adds, acts = _ARCHS[arch]
    assert fuse_residual_adds(gm) == adds
    assert fuse_glu_fronts(gm) == acts
    after = op_counts(gm)
    assert after["add_norm_quant"] == adds and after["glu_quant"] == acts
    with torch.no_grad():
        assert torch.equal(run(), before)


def test_mamba_block_with_transposed_activations_compiles():
    """FalconMamba's ``x_proj`` reads the convolution's output transposed (the token dimension
    stride 1), so its activation quantization gets a permuted input. The backend's compiled
    model runs (Inductor checks every custom op's output strides against the fake's) and
    computes what ``bitfx.quantize`` + eager computes. Inductor reorders the float arithmetic
    between the linears (the convolution, the selective scan) by a few ulps: hence a bound of
    1e-5 of the logits' scale rather than equality; a moved activation code would move a
    logit by about 1e-2 of it."""
    import copy

    import bitfx

    transformers = pytest.importorskip("transformers")
    config_cls = getattr(transformers, "FalconMambaConfig", None)
    model_cls = getattr(transformers, "FalconMambaForCausalLM", None)
    if config_cls is None or model_cls is None:
        pytest.skip(f"transformers {transformers.__version__} has no FalconMamba")
    model, ids = models._hf(config_cls, model_cls, 0, torch.float32, pad_token_id=None, bos_token_id=None,
                            eos_token_id=None)
    with torch.no_grad():
        expected = bitfx.quantize(copy.deepcopy(model))(ids).logits
        got = torch.compile(model, backend="bitfx")(ids).logits
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
