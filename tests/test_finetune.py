"""bitfx.finetune: a float model trained as a ternary one from its own weights, and the
distillation term of its loss against the formula written in its docstring."""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch

import bitfx
from bitfx.finetune import distillation_loss
from bitfx.demo.example import ExampleConfig, ExampleLlama


def _kd_by_hand(zs, zt, y, T, ignore_index=-100):
    """``T² · mean over kept tokens of Σ_v p_t (log p_t − log p_s)``, softmax written out."""
    total, n = 0.0, 0
    for s_row, t_row, target in zip(zs.reshape(-1, zs.shape[-1]).double(), zt.reshape(-1, zt.shape[-1]).double(),
                                     y.reshape(-1).tolist()):
        if target == ignore_index:
            continue
        ps = torch.exp(s_row / T) / torch.exp(s_row / T).sum()
        pt = torch.exp(t_row / T) / torch.exp(t_row / T).sum()
        total += float((pt * (pt.log() - ps.log())).sum())
        n += 1
    return T * T * total / n


def _ce_by_hand(zs, y, ignore_index=-100):
    rows = [(r.double(), t) for r, t in zip(zs.reshape(-1, zs.shape[-1]), y.reshape(-1).tolist()) if t != ignore_index]
    return sum(float(torch.logsumexp(r, 0) - r[t]) for r, t in rows) / len(rows)


@pytest.mark.parametrize("T, alpha", [(1.0, 0.5), (2.0, 0.25), (0.5, 1.0)])
def test_distillation_term_is_the_documented_formula(T, alpha):
    g = torch.Generator().manual_seed(3)
    zs, zt = torch.randn(2, 5, 11, generator=g) * 3, torch.randn(2, 5, 11, generator=g) * 3
    y = torch.randint(0, 11, (2, 5), generator=g)
    y[0, 1] = -100  # skipped by both terms
    loss, ce, kd = distillation_loss(zs, zt, y, alpha=alpha, temperature=T)
    assert math.isclose(kd.item(), _kd_by_hand(zs, zt, y, T), rel_tol=1e-5)
    assert math.isclose(ce.item(), _ce_by_hand(zs, y), rel_tol=1e-5)
    assert math.isclose(loss.item(), (1 - alpha) * ce.item() + alpha * kd.item(), rel_tol=1e-6)
    same, _, zero = distillation_loss(zt, zt, y, alpha=alpha, temperature=T)
    assert abs(zero.item()) < 1e-6  # KL of a distribution with itself


def test_distillation_rejects_bad_input():
    z, y = torch.randn(2, 3, 5), torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="alpha"):
        distillation_loss(z, z, y, alpha=1.5)
    with pytest.raises(ValueError, match="temperature"):
        distillation_loss(z, z, y, alpha=0.5, temperature=0.0)
    with pytest.raises(ValueError, match="no teacher"):
        distillation_loss(z, None, y, alpha=0.5)
    with pytest.raises(ValueError, match="differ in shape"):
        distillation_loss(z, torch.randn(2, 3, 6), y, alpha=0.5)
    with pytest.raises(ValueError, match="do not match targets"):
        distillation_loss(z, None, y[:, :2])


def _tiny(vocab=16):
    torch.manual_seed(0)
    return ExampleLlama(ExampleConfig(vocab=vocab, dim=32, hidden=64, heads=2, layers=1))


def _repeated_batch(vocab=16, steps=8):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, vocab, (4, 17), generator=g)
    return [(ids[:, :-1], ids[:, 1:])] * steps


def test_finetune_from_float_weights_lowers_the_loss_and_reports_its_terms():
    model = _tiny()
    float_copy = copy.deepcopy(model)
    data = _repeated_batch()
    seen = []
    result = bitfx.finetune(model, data, steps=8, lr=1e-2, alpha=0.5, temperature=2.0,
                            callback=lambda step, stats, compiled: seen.append(step))
    assert seen == list(range(1, 9))
    assert result.model is model and len(result.loss) == 8
    assert result.loss[-1] < 0.8 * result.loss[0]
    # Step 1: the student starts from the teacher's weights, so only quantization separates them.
    assert result.kd[0] > 0
    for loss, ce, kd in zip(result.loss, result.ce, result.kd):
        assert math.isclose(loss, 0.5 * ce + 0.5 * kd, rel_tol=1e-5)
    # The first step's terms, recomputed by hand from the same model and the frozen float copy.
    x, y = data[0]
    from bitfx.explain import _compile_options

    zs = torch.compile(copy.deepcopy(float_copy), backend="bitfx", **_compile_options())(x).detach()
    with torch.no_grad():
        zt = float_copy(x)
    assert math.isclose(result.kd[0], _kd_by_hand(zs, zt, y, 2.0), rel_tol=1e-4)
    assert math.isclose(result.ce[0], _ce_by_hand(zs, y), rel_tol=1e-4)
    # The weights moved; the frozen teacher was a copy (the caller's float model is untouched).
    assert not torch.equal(model.layers[0].q_proj.weight, float_copy.layers[0].q_proj.weight)


def test_finetune_rejects_bad_input():
    model, data = _tiny(), _repeated_batch(steps=2)
    with pytest.raises(ValueError, match="steps"):
        bitfx.finetune(model, data, steps=0)
    with pytest.raises(ValueError, match="alpha"):
        bitfx.finetune(model, data, steps=1, alpha=-0.1)
    with pytest.raises(ValueError, match="teacher was given but alpha=0"):
        bitfx.finetune(model, data, steps=1, teacher=copy.deepcopy(model))
    with pytest.raises(TypeError, match="nn.Module"):
        bitfx.finetune(lambda x: x, data, steps=1)
    with pytest.raises(ValueError, match="already converted by bitfx.quantize"):
        bitfx.finetune(bitfx.quantize(copy.deepcopy(model), data[0][0]), data, steps=1)
    with pytest.raises(ValueError, match="ran out after 2 of 3 steps"):
        bitfx.finetune(model, data, steps=3)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        bitfx.load_float_model("/nonexistent/checkpoint")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        bitfx.load_float_model(os.path.dirname(__file__))



def test_finetune_refuses_a_model_that_runs_uncompiled():
    """A frame Dynamo does not compile (skipped, or past its recompile limit) would train in
    floating point: refused after the first step."""
    model = _tiny()
    model.forward = torch.compiler.disable(model.forward)
    with pytest.raises(RuntimeError, match="ran uncompiled"):
        bitfx.finetune(model, _repeated_batch(), steps=2, lr=1e-2)


def test_finetune_under_no_grad_says_grad_mode_is_off():
    """With grad mode off the loss has no autograd graph at all: the error names that cause, not
    Dynamo's."""
    with torch.no_grad(), pytest.raises(RuntimeError, match="grad mode is off"):
        bitfx.finetune(_tiny(), _repeated_batch(), steps=1, lr=1e-2)
