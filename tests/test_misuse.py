"""Misuse gets a clear error, never a silently different result: configuration fields of the
wrong type, a ``filter_fn`` that returns no bool, hooks of replaced layers, a root ``nn.Linear``."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import bitfx
from bitfx.config import BitfxConfig


class _Net(nn.Module):
    """RMSNorm -> up, gate; down: three linears bitfx converts by default."""

    def __init__(self, K=64, N=96):
        super().__init__()
        self.norm = nn.RMSNorm(K)
        self.up, self.gate, self.down = nn.Linear(K, N), nn.Linear(K, N), nn.Linear(N, K)

    def forward(self, x):
        h = self.norm(x)
        return x + self.down(self.gate(h) * self.up(h))


def _net():
    torch.manual_seed(0)
    return _Net(), torch.randn(2, 5, 64)


# ---------------------------------------------------------------- BitfxConfig field types


@pytest.mark.parametrize("field,value", [
    ("per_channel", "no"), ("per_channel", 0), ("per_channel", None),
    ("skip_output_head", "yes"), ("skip_output_head", 1),
    ("training", "yes"), ("training", 0),
])
def test_bool_fields_take_only_bools(field, value):
    with pytest.raises(TypeError, match=f"BitfxConfig: {field} must be True(, False)? or"):
        BitfxConfig(**{field: value})


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, 0, -1e-6, True, "1e-6", None])
def test_norm_eps_must_be_finite_and_positive(value):
    with pytest.raises(ValueError, match="norm_eps must be a finite positive number"):
        BitfxConfig(norm_eps=value)


@pytest.mark.parametrize("field,value", [("act_bits", 8.0), ("act_bits", True), ("terms", 1.0), ("terms", True),
                                         ("terms", "2")])
def test_int_fields_take_only_ints(field, value):
    with pytest.raises(ValueError, match=f"BitfxConfig: {field} must be"):
        BitfxConfig(**{field: value})


@pytest.mark.parametrize("field,value", [("linears", ["all"]), ("backward", None)])
def test_mode_fields_take_only_their_names(field, value):
    with pytest.raises(ValueError, match=f"BitfxConfig: {field} must be one of"):
        BitfxConfig(**{field: value})


def test_valid_configs_still_construct():
    c = BitfxConfig(norm_eps=1, per_channel=True, skip_output_head=False, training=None, terms=2, act_bits=6)
    assert (c.norm_eps, c.per_channel, c.terms, c.act_bits) == (1, True, 2, 6)
    assert BitfxConfig(training=True).training is True


def test_a_long_bad_value_is_cut_in_the_message():
    with pytest.raises(ValueError) as e:
        BitfxConfig(linears="x" * 100_000)
    assert len(str(e.value)) < 300


# ---------------------------------------------------------------- filter_fn must return a bool


@pytest.mark.parametrize("value", [None, "no", 1, 0, [], "False"])
def test_filter_fn_returning_a_non_bool_names_the_layer(value):
    model, x = _net()
    with pytest.raises(TypeError, match=r"filter_fn\(module, '(up|gate|down)'\) returned .*must return True"):
        bitfx.explain(model, x, filter_fn=lambda module, fqn: value)
    with pytest.raises(TypeError, match=r"filter_fn\(module, '(up|gate|down)'\) returned"):
        bitfx.quantize(model, x, filter_fn=lambda module, fqn: value)
    assert isinstance(model.up, nn.Linear) and not isinstance(model.up, bitfx.BitfxLinear)


def test_filter_fn_returning_bools_still_decides():
    model, x = _net()
    report = bitfx.explain(model, x, filter_fn=lambda module, fqn: fqn != "down")
    assert sorted(report.linears) == ["gate", "up"]
    from bitfx.config import filter_result

    assert filter_result(torch.tensor(True), "a") is True and filter_result(False, "a") is False


# ---------------------------------------------------------------- quantize keeps the hooks


def _double_input(module, args):
    return (2 * args[0],)


def test_quantize_keeps_forward_hooks_and_pre_hooks():
    model, x = _net()
    plain = bitfx.BitfxLinear.from_linear(model.up)  # what quantize makes of `up`, without hooks
    model.up.register_forward_pre_hook(_double_input)
    handle = model.up.register_forward_hook(lambda module, args, kwargs, out: out + 1, with_kwargs=True,
                                            always_call=True)
    with torch.no_grad():
        compiled = torch.compile(model, backend="bitfx")(x)  # the backend traces the hooks
        bitfx.quantize(model, x)
        h = model.norm(x)
        assert isinstance(model.up, bitfx.BitfxLinear)
        assert torch.equal(model.up(h), plain(2 * h) + 1)
        from tests.test_backend import assert_close_up_to_code_flips

        assert_close_up_to_code_flips(model(x), compiled)
        handle.remove()  # the user's handle still removes it from the replacement
        assert torch.equal(model.up(h), plain(2 * h))


# ---------------------------------------------------------------- a model that is one nn.Linear


def test_a_root_linear_is_reported_as_the_model_itself():
    torch.manual_seed(0)
    model, x = nn.Linear(64, 32), torch.randn(2, 64)
    report = bitfx.explain(model, x)
    (d,) = report.decisions
    assert d.module == "" and d.converted and not d.quantized
    assert "functional" not in d.replace_reason and "the model itself is this nn.Linear" in d.replace_reason
    assert "BitfxLinear.from_linear(model)" in d.replace_reason
    assert "<the model itself>" in str(report) and "functional" not in str(report)
    with torch.no_grad():
        assert bitfx.quantize(model, x) is model
    assert [s.reason for s in model.bitfx_report.skipped] == [d.replace_reason]
    assert "not converted: <the model itself>: the model itself is this nn.Linear" in str(model.bitfx_report)
