"""The model-level tests again on a GPU, where the sites run the Triton kernels.

The CPU tests (``test_backend.py``, ``test_quantize.py``) check the same properties with the
reference implementation behind the ops; here the models live on CUDA, so every ``bitfx::``
op dispatches to its Triton kernel, and Inductor compiles the rest for the GPU. Also: a
decode step under ``mode="reduce-overhead"`` replays a CUDA graph.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

import bitfx
from tests import models
from tests.test_backend import (
    TRANSFORMERS,
    assert_close_up_to_code_flips,
    assert_prepacked,
    check_training_loss_falls,
    converted_linears,
    op_counts,
    recording_backend,
)

pytestmark = [pytest.mark.cuda, pytest.mark.usefixtures("fresh_dynamo")]


@pytest.mark.parametrize("name", list(TRANSFORMERS))
def test_transformers_inference_fullgraph_cuda(name):
    builder, ops = TRANSFORMERS[name]
    model, ids = builder()
    model, ids = model.cuda(), ids.cuda()
    backend, graphs = recording_backend()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    with torch.no_grad():
        got = compiled(ids).logits
        want = models.reference_quantized(model, converted_linears(model))(ids).logits  # all but lm_head
    assert len(graphs) == 1
    # On CUDA each front and the matmuls reading it become ternary_linear calls (passes/fronts.py;
    # default mode here: no residual add joins its norm, passes/residual.py).
    assert op_counts(graphs[0]) == Counter(ternary_linear=ops["ternary_matmul"], linear=ops["linear"])
    assert_prepacked(graphs[0])
    assert_close_up_to_code_flips(got, want)


def test_bf16_llama_cuda():
    model, ids = models.tiny_llama(dtype=torch.bfloat16)
    model, ids = model.cuda(), ids.cuda()
    compiled = torch.compile(model, backend="bitfx", fullgraph=True)
    converted = converted_linears(model)  # linears="all": every linear but lm_head
    with torch.no_grad():
        got = compiled(ids).logits.float()
        want = models.reference_quantized(model, converted)(ids).logits.float()
    # bf16 activations: the codes flip where bf16 rounding differs; the logits agree to a few
    # bf16 ulps of their scale.
    scale = want.abs().max().item()
    torch.testing.assert_close(got, want, rtol=0, atol=0.05 * scale)


def test_training_loss_falls_cuda():
    check_training_loss_falls("cuda", steps=150)


def test_quantize_round_trip_and_compile_cuda(tmp_path):
    model, ids = models.tiny_llama(dtype=torch.bfloat16)
    model, ids = model.cuda(), ids.cuda()
    with torch.no_grad():
        bitfx.quantize(model, ids)
        eager = model(ids).logits
    torch.save(model.state_dict(), tmp_path / "q.pt")
    fresh, _ = models.tiny_llama(seed=1, dtype=torch.bfloat16)
    fresh = fresh.cuda()
    with torch.no_grad():
        bitfx.quantize(fresh, ids)
        fresh.load_state_dict(torch.load(tmp_path / "q.pt", weights_only=True))
        assert torch.equal(fresh(ids).logits, eager)
        compiled = torch.compile(model, backend="bitfx", fullgraph=True)
        got = compiled(ids).logits
    scale = eager.float().abs().max().item()
    torch.testing.assert_close(got.float(), eager.float(), rtol=0, atol=0.05 * scale)


def test_reduce_overhead_decode_step_replays_a_cuda_graph():
    """One-token decode steps of a small Llama-style model, compiled with the backend and
    ``mode="reduce-overhead"``: Inductor records a CUDA graph (the bitfx ops inside it) and
    later steps replay it, without skipping the graph for a host sync or a CPU tensor."""
    torch.manual_seed(0)
    model = models.TinyLlama(styles=("llama", "llama"), vocab=64, dim=256, hidden=512, heads=4).cuda().eval()
    compiled = torch.compile(model, backend="bitfx", mode="reduce-overhead", fullgraph=True)
    reference = models.reference_quantized(model, converted_linears(model))  # all but lm_head
    from torch._dynamo.utils import counters

    counters.clear()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for step in range(3):  # warm-up and recording
            out = compiled(torch.randint(0, 64, (1, 1), generator=g).cuda())
        ids = torch.randint(0, 64, (1, 1), generator=g).cuda()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            out = compiled(ids).clone()
            torch.cuda.synchronize()
        want = reference(ids)
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    names = {e.name for e in prof.events()}
    assert "cudaGraphLaunch" in names, sorted(n for n in names if "Graph" in n or "graph" in n)
    # The bitfx kernels ran (inside the replayed graph: the step made no other launch of them).
    launched = [n for n in names if n.startswith(("_norm_quant_kernel", "_ternary_", "_front_gemv_kernel"))]
    assert launched, sorted(names)
    assert_close_up_to_code_flips(out, want)
