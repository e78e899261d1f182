"""The post-grad pass: a stacked output's gradient cat becomes ``bitfx::concat_buffer``, only
where it feeds the straight-through input-gradient product, and the graph computes the same
values; in a compiled training step the gradients equal those with the pass off, bit for bit."""

from __future__ import annotations

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import bitfx  # noqa: F401  (registers the backend)
from bitfx.passes.post_grad import concat_gradients
from tests import models

pytestmark = pytest.mark.usefixtures("fresh_dynamo")

_cat = torch.ops.aten.cat.default
_concat = torch.ops.bitfx.concat_buffer.default


def _count(graph: torch.fx.Graph, target) -> int:
    return sum(n.target is target for n in graph.nodes)


def _backward_like(a, b, c, packed, w_scale, acts):
    """The shape of the straight-through backward of a stacked site: the parts' gradients
    (computed) cat along the last dimension, viewed as rows, then ``dy = d (t / s_w)`` and
    ``dW = d^T A``; besides, a last-dimension cat that feeds no such product, one along
    dim 0 that does, and one whose parts differ in dtype."""
    d = torch.cat([a * 2, b + 1, c.neg()], -1).reshape(-1, 12)
    dy = d @ torch.ops.bitfx.dequantize(packed, w_scale, 8, torch.float32, False)
    dw = d.t() @ acts
    other = torch.cat([a, b], -1).sum()
    rows = torch.cat([a.reshape(-1, 4), b.reshape(-1, 4)], 0)  # a cat along rows
    dy_rows = rows @ torch.ops.bitfx.dequantize(packed[:4], w_scale[:4], 8, torch.float32, False)
    mixed = torch.cat([a * 3, b.bfloat16(), c], -1).reshape(-1, 12)  # promoted to fp32 by the cat
    return dy, dw, other, dy_rows, mixed @ torch.ops.bitfx.dequantize(packed, w_scale, 8, torch.float32, False)


def test_concat_gradients_replaces_the_stacked_gradient_cat_only():
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(2, 3, 4, generator=g) for _ in range(3))
    packed, w_scale = torch.ops.bitfx.weight_quant(torch.randn(12, 8, generator=g), False)
    acts = torch.randn(6, 8, generator=g)
    args = (a, b, c, packed, w_scale, acts)
    gm = make_fx(_backward_like, tracing_mode="fake")(*args)
    assert _count(gm.graph, _cat) == 4
    assert concat_gradients(gm.graph) == 1
    gm.recompile()
    assert _count(gm.graph, _cat) == 3 and _count(gm.graph, _concat) == 1
    (n,) = [n for n in gm.graph.nodes if n.target is _concat]
    assert n.args[1] == 2 and len(n.args[0]) == 3  # the last dimension, normalized
    for got, want in zip(gm(*args), _backward_like(*args)):
        assert torch.equal(got, want)
    assert concat_gradients(gm.graph) == 0  # nothing left to replace


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_training_step_writes_stacked_gradients_in_one_buffer(monkeypatch, device):
    """A transformers Llama's compiled training step: each layer's q/k/v and gate/up gradient is
    one ``concat_buffer`` in the backward (no ``aten.cat`` feeds a straight-through product),
    and the loss and every gradient equal the step compiled with the pass off
    (``BITFX_CONCAT_GRADS=0``), bit for bit: on CUDA the parts' kernels change (each part's
    producer writes its slice instead of one kernel over the cat), not their arithmetic."""
    seen = []

    def record(graph):
        seen.append((_count(graph, _concat), sum(n.target is _cat for n in graph.nodes
                                                 if any(u.target is torch.ops.aten.reshape.default for u in n.users))))

    def step(concat: bool):
        monkeypatch.setenv("BITFX_CONCAT_GRADS", "1" if concat else "0")
        torch._dynamo.reset()
        seen.clear()
        model, ids = models.tiny_llama(0, torch.bfloat16)
        model, ids = model.to(device).train(), ids.to(device)
        compiled = torch.compile(model, backend="bitfx", options={"post_grad_custom_post_pass": record})
        loss = compiled(ids).logits.float().pow(2).mean()
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters()}, list(seen)

    loss, grads, graphs = step(True)
    loss_off, grads_off, graphs_off = step(False)
    # Forward, then backward: 2 layers x (q/k/v, gate/up) cats in the backward.
    assert [g[0] for g in graphs] == [0, 2 * models.LAYERS]
    assert graphs[1][1] == 0 and graphs_off[1] == (0, 2 * models.LAYERS)
    assert torch.equal(loss, loss_off)
    assert grads.keys() == grads_off.keys()
    for name, grad in grads.items():
        assert grad is not None and torch.equal(grad, grads_off[name]), name
