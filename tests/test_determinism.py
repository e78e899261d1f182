"""Ternary training through the backend is reproducible under
``torch.use_deterministic_algorithms(True)``: the same seed gives the same losses and weights,
bit for bit, as eager float training does; the main job trains so on the CPU.

Inductor decomposes an embedding's backward into an accumulating ``index_put`` that it
generates as atomic adds from parallel threads; their order changed the embedding gradient's
rounding from run to run (two main-job runs ended at losses 0.525 and 0.534). In deterministic
mode Inductor calls ATen's ``index_put`` instead; bitfx's own ops repeat bit for bit either way."""

from __future__ import annotations

import torch

from bitfx.demo.example import ExampleConfig, ExampleLlama
from bitfx.demo.train import deterministic

VOCAB = 24


def _train(steps: int = 3):
    """Ternary training from one seed: batches of 2048 tokens (many repeats of each of the
    VOCAB ids, so parallel adds into an embedding row's gradient collide)."""
    torch.manual_seed(0)
    model = ExampleLlama(ExampleConfig(vocab=VOCAB, dim=32, hidden=64, heads=2, layers=1))
    compiled = torch.compile(model, backend="bitfx")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    losses, grads = [], []
    for _ in range(steps):
        ids = torch.randint(0, VOCAB, (32, 65), generator=g)
        logits = compiled(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grads.append(model.embed.weight.grad.clone())
        opt.step()
        losses.append(loss.item())
    return losses, grads, {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_ternary_training_repeats_bit_for_bit():
    # With torch.get_num_threads() == 1 unordered parallel adds cannot show; CI runs two.
    with deterministic():
        runs = [_train() for _ in range(2)]
    losses, grads, weights = runs[0]
    for other_losses, other_grads, other_weights in runs[1:]:
        assert other_losses == losses
        for step, (a, b) in enumerate(zip(grads, other_grads)):
            assert torch.equal(a, b), f"the embedding gradient of step {step + 1} differs between runs"
        for name, value in weights.items():
            assert torch.equal(value, other_weights[name]), name


def test_deterministic_block_restores_the_callers_setting():
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    with deterministic():
        assert torch.are_deterministic_algorithms_enabled()
    assert (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()) == before
